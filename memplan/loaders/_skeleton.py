"""The model's modules with every parameter on the meta device: structure without memory."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from memplan.errors import CheckpointError, UnsupportedQuantization
from memplan.planner import Checkpoint

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["ModelFactory", "build_skeleton", "check_config", "empty_parameters", "with_computed_buffers"]

_BUILD_LOCK = threading.Lock()

ModelFactory = Callable[..., "nn.Module"]


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Parameters this thread registers inside go to the meta device; buffers stay real.

    Buffers such as rotary frequency tables are computed in ``__init__`` and absent from
    checkpoints, so they must survive; the same choice as accelerate's ``init_empty_weights``.
    Each meta parameter carries transformers' ``_is_hf_initialized`` flag: the ``post_init`` that
    ends a model's ``__init__`` then initialises its buffers as ever but skips its parameters,
    whose initial values the load replaces (on meta, torch's initialisers run as slow reference
    code: a fifth of a second for a 1B Llama).

    Only this thread's modules: ``init_empty_weights`` patches ``nn.Module.register_parameter``
    for the whole process, and a module another thread built meanwhile got meta parameters.
    Here the patch is installed while any thread is inside and asks a thread-local flag, so
    other threads' modules are built as ever (``with torch.device("meta")``, thread-local too,
    would put the buffers on meta as well).
    """
    _install()
    _building.depth = getattr(_building, "depth", 0) + 1
    try:
        yield
    finally:
        _building.depth -= 1
        _uninstall()


_building = threading.local()  # .depth: how many empty_parameters() this thread is inside
_patch_lock = threading.Lock()  # guards the two below, and the swap of register_parameter
_patch_users = 0
_original_register: Callable[..., None] | None = None


def _register_empty(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    """``nn.Module.register_parameter`` while the patch is in: the original's, then on the
    thread inside :func:`empty_parameters`, the parameter moved to meta."""
    assert _original_register is not None  # set before this is installed, never unset
    _original_register(module, name, param)
    if getattr(_building, "depth", 0) and param is not None and param.device.type != "meta":
        extra = {k: v for k, v in vars(param).items() if not k.startswith("_")}
        empty = type(param)(param.to("meta"), requires_grad=False, **extra)
        empty._is_hf_initialized = True  # type: ignore[attr-defined]
        module._parameters[name] = empty


def _install() -> None:
    global _patch_users, _original_register
    from torch import nn

    with _patch_lock:
        # Still in since an earlier build (someone patched over it, and put it back): keep it.
        if _patch_users == 0 and nn.Module.register_parameter is not _register_empty:
            _original_register = nn.Module.register_parameter
            nn.Module.register_parameter = _register_empty  # type: ignore[method-assign,assignment]
        _patch_users += 1


def _uninstall() -> None:
    global _patch_users
    from torch import nn

    with _patch_lock:
        _patch_users -= 1
        # Patched over by another library since: removing ours would remove theirs. Ours, left
        # in, does what the original does on every thread outside empty_parameters().
        if _patch_users == 0 and nn.Module.register_parameter is _register_empty:
            nn.Module.register_parameter = _original_register  # type: ignore[method-assign,assignment]


def _config(checkpoint: Checkpoint, factory: ModelFactory | None) -> Any:
    """transformers' config object for transformers' classes (or none given), else config.json as a dict."""
    config_file = _config_file(checkpoint)
    if not config_file.is_file():
        return None
    if (
        not _has_transformers()
        or (factory is not None and not _is_transformers_class(factory))
        or (factory is not None and _is_diffusers_class(factory))  # diffusers configs are plain dicts
    ):
        return json.loads(config_file.read_text())
    reader = _config_class(factory, checkpoint.architecture.architectures)
    try:
        return reader.from_pretrained(config_file.parent)
    except Exception as exc:  # ValueError, KeyError, OSError, huggingface_hub's strict field checks...
        raise CheckpointError(config_file, f"transformers cannot read this config: {exc}") from exc


def _config_class(factory: ModelFactory | None, architectures: Iterable[str]) -> Any:
    """What reads the config: the config class of the model class given or named in config.json,
    as ``from_pretrained`` reads it (Bark's sub-models have configs ``AutoConfig`` does not know),
    else ``AutoConfig``."""
    import transformers

    own = getattr(factory or _named_class(architectures), "config_class", None)
    return own if callable(getattr(own, "from_pretrained", None)) else transformers.AutoConfig


def _named_class(architectures: Iterable[str]) -> ModelFactory | None:
    """The first of ``architectures`` (config.json's class names) that transformers has."""
    import transformers

    found = (getattr(transformers, name, None) for name in architectures)
    return next((cls for cls in found if cls is not None), None)


def _transformers_class(config: Any) -> ModelFactory:
    """The class ``config.architectures`` names, else the base model, as transformers' ``AutoModel``
    picks it: a config that names no head gets none (a BERT without ``architectures`` is a
    ``BertModel``, not a language model missing its head)."""
    import transformers

    named = _named_class(getattr(config, "architectures", None) or ())
    return named or transformers.AutoModel  # type: ignore[return-value]  # a factory with from_config


def _has_transformers() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def _is_transformers_class(factory: ModelFactory) -> bool:
    return hasattr(factory, "from_config") or hasattr(factory, "_from_config")


def _is_diffusers_class(factory: ModelFactory) -> bool:
    return str(getattr(factory, "__module__", "")).startswith("diffusers.")


def _construct(factory: ModelFactory, config: Any, dtype: torch.dtype) -> nn.Module:
    import torch

    if _is_diffusers_class(factory):  # from_config takes the config dict and no dtype
        return factory.from_config(config)  # type: ignore[attr-defined,no-any-return]

    builder = getattr(factory, "from_config", None) or getattr(factory, "_from_config", None)
    if builder is not None and config is not None:
        return builder(config, dtype=dtype)  # type: ignore[no-any-return]
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype if dtype.is_floating_point else previous)
    try:
        return factory(config) if config is not None else factory()
    finally:
        torch.set_default_dtype(previous)


def _config_file(checkpoint: Checkpoint) -> Path:
    """config.json in the model's folder, or beside its one weights file."""
    folder = checkpoint.path if checkpoint.path.is_dir() else checkpoint.path.parent
    return folder / "config.json"


def check_config(checkpoint: Checkpoint) -> None:
    """Refuse a config.json asking for more layers than the checkpoint could hold, before a skeleton
    of them is built (``num_hidden_layers=10**12`` would build forever). Layers the config lacks
    show up later as tensors the model has no place for."""
    if checkpoint.components:
        names = ", ".join(name for name, _ in checkpoint.components)
        raise CheckpointError(
            checkpoint.path,
            f"a diffusers pipeline: load each component with its class, e.g. memplan.load(path / "
            f"'unet', model_cls=UNet2DConditionModel) (components: {names})",
        )
    stored = checkpoint.architecture.quantization
    if stored is not None and not stored.loadable:
        raise UnsupportedQuantization(_config_file(checkpoint), stored.method)
    wanted = checkpoint.architecture.num_layers
    # One layer holds at least one tensor unless layers share one (ALBERT's): a config asking for
    # more layers than the checkpoint has tensors cannot describe it. Fewer layers than the config
    # counts is the model's to judge once built: a parameter the checkpoint lacks is an error then.
    if wanted is not None and wanted > max(len(checkpoint.layers), len(checkpoint.tensors)):
        raise CheckpointError(
            _config_file(checkpoint),
            f"config.json asks for {wanted} layers, the checkpoint has {len(checkpoint.tensors)} tensors",
        )


def build_skeleton(checkpoint: Checkpoint, model_cls: ModelFactory | None, dtype: torch.dtype) -> nn.Module:
    """Build ``model_cls`` (or transformers' class for the config) with meta parameters, in eval mode."""
    # One build at a time: transformers' lazy imports are not thread-safe (8 threads loading in a
    # fresh process raised ImportError).
    with _BUILD_LOCK:
        return _build(checkpoint, model_cls, dtype)


def _build(checkpoint: Checkpoint, model_cls: ModelFactory | None, dtype: torch.dtype) -> nn.Module:
    config = _config(checkpoint, model_cls)
    factory = model_cls
    if factory is None:
        if config is None or isinstance(config, dict):
            raise CheckpointError(
                checkpoint.path,
                f"cannot tell which model class {checkpoint.name} is: pass model_cls=..., or install "
                "transformers (pip install 'memplan[hf]') and keep config.json beside the weights",
            )
        factory = _transformers_class(config)
    with empty_parameters():
        model = _construct(factory, config, dtype)
    return model.eval()


def with_computed_buffers(checkpoint: Checkpoint, model_cls: ModelFactory | None = None) -> Checkpoint:
    """``checkpoint`` with the buffers its model computes rather than stores, measured on a
    skeleton (GPT-Neo builds a causal mask of ``max_positions``² per layer in ``__init__``: no
    header says so). A config that cannot be built is measured as nothing; the load says why."""
    from memplan.loaders._conversion import key_map
    from memplan.loaders._materialize import computed_buffer_bytes
    from memplan.loaders._reader import torch_dtype

    try:
        check_config(checkpoint)
        model = build_skeleton(checkpoint, model_cls, torch_dtype(checkpoint.dtype))
    except Exception:  # whatever a model's __init__ raises, the load raises it where it can say why
        return checkpoint
    found = computed_buffer_bytes(model, key_map(model, checkpoint.tensors))
    return replace(checkpoint, computed_buffers=tuple(found.items()))
