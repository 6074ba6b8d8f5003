"""Parameters the checkpoint lacks (a new task head): made where they belong and initialised as
transformers initialises them, with a warning that they need training."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from memplan.gpu import Device
from memplan.loaders._materialize import Binding, Materializer, set_tensor

if TYPE_CHECKING:
    from torch import nn

__all__ = ["initialize_new"]


def initialize_new(
    model: nn.Module, missing: list[Binding], materializer: Materializer, device_for: Callable[[str], Device]
) -> tuple[str, ...]:
    """Place every parameter of ``missing`` on its device (charged) and initialise it with
    transformers' own ``initialize_weights``, leaving every loaded tensor as it is; their names."""
    if not missing:
        return ()
    import torch

    for binding in missing:
        nbytes = math.prod(binding.shape) * materializer.dtype.itemsize

        def make(where: str, shape: tuple[int, ...] = binding.shape) -> torch.Tensor:
            return torch.empty(shape, dtype=materializer.dtype, device=where)

        tensor = materializer.placement.place(device_for(binding.name), nbytes, binding.name, make)
        set_tensor(binding, tensor, trainable=materializer.trainable)
    _initialize_only(model, {id(getattr(m, a)) for b in missing for m, a in b.owners})
    names = tuple(b.name for b in missing)
    warnings.warn(
        f"{type(model).__name__}: the checkpoint lacks {', '.join(names)}; newly initialised, "
        "train them before use",
        stacklevel=5,
    )
    return names


def _initialize_only(model: nn.Module, fresh: set[int]) -> None:
    """transformers' ``initialize_weights`` on the modules holding ``fresh`` parameters only.

    transformers skips modules and tensors flagged ``_is_hf_initialized`` (what it loaded); the
    same flags keep its initialisers off everything we loaded, streamed placeholders included.
    """
    for module in model.modules():
        params = [p for p in module._parameters.values() if p is not None]
        for param in params:
            if id(param) not in fresh:
                param._is_hf_initialized = True  # type: ignore[attr-defined]
        module._is_hf_initialized = not any(id(p) in fresh for p in params)  # type: ignore[assignment]  # a plain flag
    model.initialize_weights()  # type: ignore[operator]  # checked callable when the binding was made
