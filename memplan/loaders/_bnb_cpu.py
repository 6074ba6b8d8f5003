"""4-bit layers on a CPU with AVX512-BF16, where bitsandbytes repacks each weight on its first
forward (``Linear4bit.forward`` -> ``_convert_weight_packed_for_cpu``) for a native kernel.

Two things go wrong there with bitsandbytes 0.50 alone, and memplan's layers avoid both:

- A layer whose ``(out, in)`` the packed layout cannot take (inputs that are no whole number of
  quantization blocks, outputs no whole number of 32-row blocks) fails its first forward
  (transformers+bitsandbytes fails the same way). memplan keeps it on the generic CPU path.
- ``Linear4bit._save_to_state_dict`` undoes the repacking in place, and its inverse loses what
  the repacking changed: a plain layer's scales are saved in the packed (transposed, bfloat16)
  order, a double-quant layer's are quantized again from bfloat16 values. Saving changed the
  live model's next outputs and wrote other weights than were loaded. memplan's layers keep the
  quantization state they had before the repacking (its tensors, not copies: a few percent of the
  layer) and save from it, leaving the live layer packed.
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from memplan._bnb import import_bitsandbytes
from memplan._bnb_state import UNPACKED

if TYPE_CHECKING:
    from torch import nn

__all__ = ["prepare_4bit_layers_for_cpu"]

_REPACK_ROWS = 32  # output rows per block of the packed layout (bitsandbytes' block_n)


def prepare_4bit_layers_for_cpu(model: nn.Module) -> tuple[str, ...]:
    """Make every 4-bit layer of ``model`` safe on either CPU path (hooks that keep each layer's
    state as it was before repacking, part of the layer for as long as it lives: ``remove_hooks``
    leaves them); a note naming the layers kept on the generic path and why (none where the CPU
    lacks the feature)."""
    bnb = import_bitsandbytes()
    kept = []
    for name, module in model.named_modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        if getattr(module, "support_avx512bf16_for_cpu", False):
            why = _cannot_repack(module)
            if why is not None:
                module.support_avx512bf16_for_cpu = False
                kept.append(f"{name} ({why})")
        module.register_forward_pre_hook(_keep_unpacked_state)
        module._save_to_state_dict = functools.partial(_save_unpacked, module)
    return _note(kept)


def _note(kept: list[str]) -> tuple[str, ...]:
    if not kept:
        return ()
    shown = ", ".join(kept[:4]) + (f" and {len(kept) - 4} more" if len(kept) > 4 else "")
    return (
        f"{len(kept)} 4-bit layers kept on bitsandbytes' generic CPU path, which its AVX512-BF16 "
        f"repacking cannot take: {shown}",
    )


def _cannot_repack(module: nn.Module) -> str | None:
    state = getattr(module.weight, "quant_state", None)
    if state is None or getattr(state, "packing_format_for_cpu", False) or len(state.shape) != 2:
        return None
    outputs, inputs = (int(n) for n in state.shape)
    if inputs % state.blocksize:
        return f"{inputs} inputs, not a multiple of the blocksize {state.blocksize}"
    if outputs % _REPACK_ROWS:
        return f"{outputs} outputs, not a multiple of {_REPACK_ROWS}"
    return None


def _keep_unpacked_state(module: nn.Module, args: Any) -> None:
    """Before a forward that may repack: a shallow copy of the state, which keeps the tensors
    the repacking replaces (it sets new ones on the state; it changes none in place)."""
    state = getattr(module.weight, "quant_state", None)
    if state is not None and not getattr(state, "packing_format_for_cpu", False):
        setattr(module, UNPACKED, copy.copy(state))


def _save_unpacked(
    module: nn.Module, destination: OrderedDict[str, Any], prefix: str, keep_vars: bool
) -> None:
    """``Linear4bit._save_to_state_dict`` as it would be had the layer never been repacked."""
    import torch
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    state = getattr(module.weight, "quant_state", None)
    unpacked = getattr(module, UNPACKED, None)
    if state is None or not getattr(state, "packing_format_for_cpu", False) or unpacked is None:
        type(module)._save_to_state_dict(module, destination, prefix, keep_vars)
        return
    torch.nn.Module._save_to_state_dict(module, destination, prefix, keep_vars)
    # The weight's reshuffle is exact; the scales the inverse gives are not, and are not used.
    packed: Any = module.weight
    data, _ = _convert_weight_packed_for_cpu_inverse(packed.data, copy.copy(state))
    destination[prefix + "weight"] = data
    for name, value in unpacked.as_dict(packed=True).items():
        destination[prefix + "weight." + name] = value if keep_vars else value.detach()
