"""Checkpoint names onto model names by transformers' own conversion rules, tensor by tensor.

transformers 5 renames checkpoint keys (``block_sparse_moe`` -> ``mlp``, ``language_model.model``
-> ``model.language_model``, old ViT names, a base-model prefix added or dropped) and fuses some
(each expert's ``w1``/``w3`` into one ``gate_up_proj``) while it loads, by the rules in its
``conversion_mapping``. We ask transformers for the same rules and apply them to the names here,
so every model tensor knows which checkpoint tensors it is made of; the loader then reads those,
runs transformers' converter on them and places the result, one model tensor at a time.
"""

from __future__ import annotations

import copy
import functools
import threading
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

__all__ = ["Conversion", "KeyMap", "key_map", "prefix_map"]

Rename = Callable[[str], tuple[str, str | None]]  # checkpoint name -> (model name, converter pattern)


@dataclass
class Conversion:
    """A model tensor made of several checkpoint tensors (or several made of one): transformers'
    converter, and the checkpoint names it reads under each of its source patterns, in its order."""

    converter: Any  # transformers.core_model_loading.WeightConverter
    first: str  # the model name transformers files the group under
    model: nn.Module  # some converters read the model's config
    sources: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    _pending: dict[str, torch.Tensor] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def targets(self) -> list[str]:
        """Every model name this conversion yields (one-to-many converters yield several)."""
        patterns: list[str] = self.converter.target_patterns
        return [self.first.replace(patterns[0], p, 1) for p in patterns]

    @property
    def names(self) -> list[str]:
        return [name for names in self.sources.values() for name in names]

    def take(self, target: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """``target``'s tensor; the siblings a one-to-many converter yields with it are kept until
        taken, so each checkpoint tensor is read once per conversion."""
        with self._lock:
            if target not in self._pending:
                self._pending = self._run(read)
            return self._pending.pop(target)

    def _run(self, read: Callable[[str], torch.Tensor]) -> dict[str, torch.Tensor]:
        converter = copy.deepcopy(self.converter)  # convert() consumes what was collected into it
        for pattern, names in self.sources.items():
            for name in names:
                converter.add_tensor(self.first, name, pattern, functools.partial(read, name))
        converted = converter.convert(
            self.first, model=self.model, config=getattr(self.model, "config", None)
        )
        return {k: v[0] if isinstance(v, list) else v for k, v in converted.items()}


@dataclass(frozen=True)
class KeyMap:
    """Where each model tensor comes from: one checkpoint tensor (``plain``) or a conversion."""

    plain: dict[str, str]  # model name -> checkpoint name
    fused: dict[str, Conversion]  # model name -> the conversion that yields it
    known: frozenset[str]  # checkpoint names that land somewhere in the model

    def model_name(self, checkpoint_name: str) -> str | None:
        """The model's name for a checkpoint tensor read as it is, if the model has one."""
        return self._renamed.get(checkpoint_name)

    @functools.cached_property
    def _renamed(self) -> dict[str, str]:
        return {source: target for target, source in self.plain.items()}


def key_map(model: nn.Module, checkpoint_names: Iterable[str]) -> KeyMap:
    """Map ``checkpoint_names`` onto ``model``'s parameters and buffers as transformers would."""
    state = set(model.state_dict()) | {name for name, _ in model.named_buffers()}
    rename, converters, order = _rules(model, state)
    plain: dict[str, str] = {}
    fused: dict[str, Conversion] = {}
    known: set[str] = set()
    for name in sorted(checkpoint_names, key=order):
        target, pattern = rename(name)
        if target not in state and name in state:  # renamed away from a name the model has
            target, pattern = _with_prefix(name, _base(model), state), None
        if target not in state:
            continue
        known.add(name)
        if pattern is None:
            plain.setdefault(target, name)
            continue
        conversion = fused.get(target) or Conversion(converters[pattern], target, model)
        conversion.sources[pattern].append(name)
        for each in conversion.targets:
            fused.setdefault(each, conversion)
    return KeyMap(plain, fused, frozenset(known))


def _rules(model: nn.Module, state: set[str]) -> tuple[Rename, dict[str, Any], Callable[[str], Any]]:
    """transformers' renaming for ``model`` (none for a model of another library), its converters
    by source pattern, and the order it collects checkpoint tensors in."""
    base = _base(model)
    if not _is_transformers_model(model):
        return (lambda name: (_with_prefix(name, base, state), None)), {}, str
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import (
        WeightConverter,
        WeightRenaming,
        dot_natural_key,
        rename_source_key,
    )

    mapping = get_model_conversion_mapping(model)  # type: ignore[arg-type]  # a PreTrainedModel, checked above
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]

    def rename(name: str) -> tuple[str, str | None]:
        renamed, pattern = rename_source_key(name, renamings, converters)
        return _with_prefix(renamed, base, state), pattern

    by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
    return rename, by_pattern, dot_natural_key


def _with_prefix(name: str, base: str, state: set[str]) -> str:
    """``name`` with the base-model prefix dropped or added where that names a model tensor: a
    task model loads a bare base model's checkpoint, and a base model a task model's."""
    if not base:
        return name
    stripped = name.removeprefix(f"{base}.")
    if stripped != name and stripped in state:
        return stripped
    prefixed = f"{base}.{name}"
    return prefixed if prefixed in state else name


def _base(model: nn.Module) -> str:
    return str(getattr(model, "base_model_prefix", "") or "")


def _is_transformers_model(model: nn.Module) -> bool:
    import sys

    modeling = sys.modules.get("transformers.modeling_utils")
    return modeling is not None and isinstance(model, modeling.PreTrainedModel)


def prefix_map(pairs: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Checkpoint module names -> model module names, learnt from (checkpoint, model) tensor-name
    pairs: where two names end alike, what comes before the common end is the same module.

    The planner names layers as the checkpoint does; the loader hooks modules by the model's names.
    """
    votes: dict[str, Counter[str]] = defaultdict(Counter)
    for source, target in pairs:
        src, dst = source.split("."), target.split(".")
        common = 0
        while common < min(len(src), len(dst)) - 1 and src[-1 - common] == dst[-1 - common]:
            common += 1
        for dropped in range(1, common + 1):
            votes[".".join(src[:-dropped])][".".join(dst[:-dropped])] += 1
    return {prefix: counts.most_common(1)[0][0] for prefix, counts in votes.items()}
