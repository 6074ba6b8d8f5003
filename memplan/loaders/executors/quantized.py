"""Linear layers as bitsandbytes int8 or nf4 on one device: quantized on arrival, taken from the
quantized-weights cache, or loaded as a pre-quantized checkpoint stored them."""

from __future__ import annotations

from typing import TYPE_CHECKING

from memplan.loaders._bnb_cpu import prepare_4bit_layers_for_cpu
from memplan.loaders._materialize import Binding, Origin, is_quantized_weight
from memplan.loaders._prequantized import stored_layers
from memplan.loaders._qcache import QuantCache, open_quant_cache
from memplan.loaders._quantize import record_quantization, replace_linears, summary, transformers_choice
from memplan.loaders.executors.base import Build, DeviceFor, Executor, register_executor
from memplan.loaders.executors.full import place_on_one_device
from memplan.planner import Quantized, is_quant_state, is_quantizable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from memplan.loaders._conversion import KeyMap
    from memplan.loaders._reader import TensorReader


@register_executor
class QuantizedExecutor(Executor[Quantized]):
    strategy_type = Quantized

    def __init__(self, strategy: Quantized) -> None:
        super().__init__(strategy)
        self.cache: QuantCache | None = None

    def begin(self, reader: TensorReader, *, quant_cache: bool) -> QuantCache | None:
        strategy = self.strategy
        self.cache = open_quant_cache(
            reader.checkpoint, strategy, strategy.dtype, window=reader.window, enabled=quant_cache
        )
        return self.cache

    def end(self, *, completed: bool) -> None:
        if self.cache is None:
            return
        try:
            if completed:
                self.cache.finish()  # unfinished, it is never marked complete, so never trusted
        finally:
            self.cache.close()

    def reads_everything(self) -> bool:
        return not (self.cache is not None and self.cache.complete)

    def prepare(self, model: nn.Module, reader: TensorReader, keys: KeyMap, dtype: torch.dtype) -> None:
        """Swap bitsandbytes layers in: where the checkpoint stored them, or where transformers
        would convert."""
        import torch

        strategy, checkpoint = self.strategy, reader.checkpoint
        stored = checkpoint.architecture.quantization
        if strategy.prequantized and stored is not None:
            layers = _model_modules(keys, stored_layers(checkpoint, stored.method))
            # The 4-bit layers compute in the dtype the checkpoint was saved to compute in.
            compute = getattr(torch, stored.compute_dtype or "", None)
            compute = compute if isinstance(compute, torch.dtype) else dtype
            replace_linears(model, layers, strategy, compute, stored.threshold)
        else:
            replace_linears(model, _to_quantize(model, strategy, reader, keys), strategy, dtype)
        model.eval()  # the new layers were built in training mode, which changes bnb's int8 path

    def assign_origins(self, bindings: list[Binding], reader: TensorReader) -> None:
        for binding in bindings:
            if not is_quantized_weight(binding):
                continue
            if self.strategy.prequantized:
                binding.origin = Origin.STORED
            elif self.cache is not None and self.cache.has(binding.source):
                binding.origin = Origin.CACHED
            else:
                binding.origin = Origin.QUANTIZE

    def also_used(self, reader: TensorReader) -> tuple[str, ...]:
        if not self.strategy.prequantized:
            return ()
        return tuple(n for n in reader.checkpoint.tensors if is_quant_state(n))

    def place(self, build: Build) -> DeviceFor:
        device_for = place_on_one_device(build, self.strategy.device)
        record_quantization(build.model, self.strategy, build.materializer.dtype)
        return device_for

    def notes(self, model: nn.Module) -> tuple[str, ...]:
        # Not the load's removable hooks: they are what keeps these layers' saves exact.
        kept = prepare_4bit_layers_for_cpu(model)
        return (summary(model, self.strategy.method), *kept)


def _to_quantize(model: nn.Module, strategy: Quantized, reader: TensorReader, keys: KeyMap) -> set[str]:
    """The modules transformers+bnb would convert; for a model of no transformers class, the
    planner's (the blocks' Linears, by the checkpoint's names)."""
    chosen = transformers_choice(model, strategy.skip_modules)
    if chosen is not None:
        return chosen
    skip, tensors = strategy.skip_modules, reader.checkpoint.tensors.values()
    return _model_modules(keys, {t.module for t in tensors if is_quantizable(t, skip)})


def _model_modules(keys: KeyMap, layers: set[str]) -> set[str]:
    """The model's names for layers the checkpoint names (the planner's names), by their weights."""
    found = (keys.model_name(f"{layer}.weight") for layer in layers)
    return {name.removesuffix(".weight") for name in found if name is not None}
