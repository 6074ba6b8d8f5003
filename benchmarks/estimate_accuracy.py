"""How close memplan's estimated peak is to the peak measured loading and running the model.

Three kinds of model, random-init bf16: a decoder (Llama, ~0.1B and ~1.1B parameters; full, int8
and nf4), an encoder-decoder (BART, ~0.1B) and a vision-language model (Llava: a CLIP vision tower
and a Llama, ~0.14B). For each: plan on the host, then in a fresh process load with memplan and run
one forward at the stated workload, and compare the estimate with the process's peak RSS.

Workload: batch 1, ``--context`` tokens (512) with the KV cache kept (``use_cache=True``). BART
encodes ``--context`` tokens and its decoder takes ``--context`` tokens; Llava's prompt is
``--context`` tokens, the first 196 of them the image's (one 224x224 image).

Two rows per case:

- whole process: the estimate (with the default host runtime overhead) vs peak RSS;
- model only: the estimate less its fixed overhead vs peak RSS less the RSS after imports.

    python benchmarks/estimate_accuracy.py            # full size
    python benchmarks/estimate_accuracy.py --quick    # tiny models (CI smoke run)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))
from _common import (
    LLAMA_1B,
    LLAMA_100M,
    LLAMA_QUICK,
    current_rss,
    make_checkpoint,
    make_llama,
    mib,
    peak_rss,
    run_worker,
)

QUANTIZED = ("full", "int8", "nf4")


def _bart(quick: bool) -> Any:
    from transformers import BartConfig

    width, layers, ffn = (256, 2, 1024) if quick else (768, 6, 3072)
    return BartConfig(
        vocab_size=8192, d_model=width, encoder_layers=layers, decoder_layers=layers,
        encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, encoder_attention_heads=width // 64,
        decoder_attention_heads=width // 64, max_position_embeddings=1024,
    )  # fmt: skip


def _llava(quick: bool) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    width, layers, image = (256, 2, 64) if quick else (768, 12, 224)
    vision = CLIPVisionConfig(
        hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=width // 64, image_size=image, patch_size=16,
    )  # fmt: skip
    text = LlamaConfig(**(LLAMA_QUICK if quick else LLAMA_100M | {"num_hidden_layers": 6}))
    patches = (image // 16) ** 2  # the "default" feature strategy drops the CLS token
    token = text.vocab_size - 1  # the image placeholder: a token id the text model has
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=token, image_seq_length=patches
    )


@dataclass(frozen=True)
class Case:
    label: str
    kind: str  # decoder | encoder-decoder | vlm
    folder: str
    strategies: tuple[str, ...]
    make: Callable[[Path], Path]


def cases(quick: bool) -> list[Case]:
    llamas = {"tiny": LLAMA_QUICK} if quick else {"0.1B": LLAMA_100M, "1.1B": LLAMA_1B}
    folders = {"tiny": "memplan-bench-1b-quick", "0.1B": "memplan-bench-100m", "1.1B": "memplan-bench-1b"}
    suffix = "-quick" if quick else ""
    found = [
        Case(f"llama {label}", "decoder", folders[label], QUANTIZED, lambda p, s=shape: make_llama(p, s))
        for label, shape in llamas.items()
    ]
    return [
        *found,
        Case("bart", "encoder-decoder", f"memplan-bench-bart{suffix}", ("full",),
             lambda p: make_checkpoint(p, "BartForConditionalGeneration", _bart(quick))),
        Case("llava", "vlm", f"memplan-bench-llava{suffix}", ("full",),
             lambda p: make_checkpoint(p, "LlavaForConditionalGeneration", _llava(quick))),
    ]  # fmt: skip


def inputs(kind: str, config: Any, context: int, dtype: Any) -> dict[str, Any]:
    """One forward's arguments at the stated workload."""
    import torch

    ids = (torch.arange(context) % 1000 + 3).unsqueeze(0)
    if kind == "decoder":
        return {"input_ids": ids}
    if kind == "encoder-decoder":
        return {"input_ids": ids, "decoder_input_ids": ids}
    ids[0, : config.image_seq_length] = config.image_token_index
    size = config.vision_config.image_size
    return {"input_ids": ids, "pixel_values": torch.randn(1, 3, size, size, dtype=dtype)}


def worker(path: Path, strategy: str, context: int, kind: str) -> dict[str, Any]:
    import bitsandbytes  # noqa: F401  (imports are the runtime, measured apart)
    import torch
    import transformers  # noqa: F401

    import memplan

    base = current_rss()
    workload = memplan.Workload(context=context)
    policy = memplan.Policy(order=(strategy,), allow_quantization=True)
    chosen = memplan.plan(memplan.inspect(path), memplan.probe("cpu=64GiB"), workload, policy)
    estimate = chosen.estimate.on(memplan.Device("cpu"))  # type: ignore[union-attr]
    model = memplan.load(path, plan=chosen, progress=False)
    with torch.no_grad():
        model(**inputs(kind, model.config, context, model.dtype), use_cache=True)
    return {"estimate": estimate.peak, "overhead": estimate.overhead, "peak": peak_rss(), "base": base}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument(
        "--worker", nargs=4, metavar=("MODEL", "STRATEGY", "CONTEXT", "KIND"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        model, strategy, context, kind = args.worker
        print(json.dumps(worker(Path(model), strategy, int(context), kind)))
        return
    root = Path(tempfile.gettempdir())
    print(f"batch 1, context {args.context} tokens, one forward with the KV cache; goal: within +-5%")
    print(
        f"{'model':10} {'kind':15} {'strategy':8} {'what':14} {'estimated':>10} {'measured':>10} {'ratio':>6}"
    )
    for case in cases(args.quick):
        path = case.make(root / case.folder)
        for strategy in case.strategies:
            r = run_worker(Path(__file__), str(path), strategy, str(args.context), case.kind)
            rows = (
                ("whole process", r["estimate"], r["peak"]),
                ("model only", r["estimate"] - r["overhead"], r["peak"] - r["base"]),
            )
            for what, est, measured in rows:
                print(
                    f"{case.label:10} {case.kind:15} {strategy:8} {what:14} {mib(est):>10} {mib(measured):>10}"
                    f" {est / measured:6.3f} ({(est - measured) / measured:+.1%})"
                )


if __name__ == "__main__":
    main()
