"""How close memplan's estimated peak is to the peak measured loading and running the model.

Every strategy on a decoder at two sizes (random-init bf16 Llamas of ~0.1B and ~1.1B parameters:
full, int8, nf4, offloaded, streamed from host memory, streamed from disk), and one model of each
kind at full (a MoE decoder, an encoder-decoder, an encoder, a vision model, a vision-language
model, ~0.1B each). For each: plan, then in a fresh process load with memplan and run one
forward at the stated workload, and compare the estimate with what the process really held.

Workload: batch 1, ``--context`` tokens (512) with the KV cache kept (``use_cache=True``).
Encoders and the encoder-decoder take ``--context`` tokens; the vision models one image.

Offloaded and streamed-from-host plans need an accelerator: a simulated ``cuda:0`` holding half
the model, whose tensors live in host memory (budgets enforced), so the process's peak RSS holds
both devices; their estimates are summed, without a CUDA context (none exists). Streamed from
disk runs on the host with a budget that keeps half the layers on disk.

Each cell compares the estimate of the model's own bytes (everything but the fixed runtime
overhead) with the peak RSS less the RSS after the imports. Goal (issue 21.2): every cell within
+-10%, the median within +-5%, and no estimate more than 5% below its measured peak.

    python benchmarks/estimate_accuracy.py            # full size (~10 minutes)
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

STRATEGIES = ("full", "int8", "nf4", "offloaded", "streamed-host", "streamed-disk")
SIMULATED = ("offloaded", "streamed-host")  # need an accelerator: a simulated one, data on the host


def _bart(quick: bool) -> Any:
    from transformers import BartConfig

    width, layers, ffn = (256, 2, 1024) if quick else (768, 6, 3072)
    return BartConfig(
        vocab_size=8192, d_model=width, encoder_layers=layers, decoder_layers=layers,
        encoder_ffn_dim=ffn, decoder_ffn_dim=ffn, encoder_attention_heads=width // 64,
        decoder_attention_heads=width // 64, max_position_embeddings=1024,
    )  # fmt: skip


def _vision(quick: bool) -> dict[str, Any]:
    width, layers, image = (256, 2, 64) if quick else (768, 12, 224)
    return {
        "hidden_size": width, "intermediate_size": 4 * width, "num_hidden_layers": layers,
        "num_attention_heads": width // 64, "image_size": image, "patch_size": 16,
    }  # fmt: skip


def _llava(quick: bool) -> Any:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(**_vision(quick))
    text = LlamaConfig(**(LLAMA_QUICK if quick else LLAMA_100M | {"num_hidden_layers": 6}))
    patches = (vision.image_size // 16) ** 2  # the "default" feature strategy drops the CLS token
    token = text.vocab_size - 1  # the image placeholder: a token id the text model has
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=token, image_seq_length=patches
    )


def _vit(quick: bool) -> Any:
    from transformers import ViTConfig

    return ViTConfig(**_vision(quick))


def _bert(quick: bool) -> Any:
    from transformers import BertConfig

    width, layers = (256, 2) if quick else (768, 12)
    return BertConfig(
        vocab_size=8192, hidden_size=width, num_hidden_layers=layers, num_attention_heads=width // 64,
        intermediate_size=4 * width, max_position_embeddings=1024,
    )  # fmt: skip


def _moe(quick: bool) -> Any:
    from transformers import Qwen3MoeConfig

    shape = LLAMA_QUICK if quick else LLAMA_100M
    return Qwen3MoeConfig(
        **shape, head_dim=64, num_experts=8, num_experts_per_tok=2,
        moe_intermediate_size=shape["intermediate_size"] // 4,
    )  # fmt: skip


@dataclass(frozen=True)
class Case:
    label: str
    kind: str  # decoder | encoder | encoder-decoder | vision | vlm
    folder: str
    strategies: tuple[str, ...]
    make: Callable[[Path], Path]


def _family(label: str, kind: str, cls: str, config: Callable[[bool], Any], quick: bool) -> Case:
    folder = f"memplan-bench-{label}" + ("-quick" if quick else "")
    return Case(label, kind, folder, ("full",), lambda p: make_checkpoint(p, cls, config(quick)))


def cases(quick: bool) -> list[Case]:
    llamas = {"tiny": LLAMA_QUICK} if quick else {"0.1B": LLAMA_100M, "1.1B": LLAMA_1B}
    folders = {"tiny": "memplan-bench-1b-quick", "0.1B": "memplan-bench-100m", "1.1B": "memplan-bench-1b"}
    found = [
        Case(f"llama {label}", "decoder", folders[label], STRATEGIES, lambda p, s=shape: make_llama(p, s))
        for label, shape in llamas.items()
    ]
    return [
        *found,
        _family("moe", "decoder", "Qwen3MoeForCausalLM", _moe, quick),
        _family("bart", "encoder-decoder", "BartForConditionalGeneration", _bart, quick),
        _family("bert", "encoder", "BertModel", _bert, quick),
        _family("vit", "vision", "ViTModel", _vit, quick),
        _family("llava", "vlm", "LlavaForConditionalGeneration", _llava, quick),
    ]


def inputs(kind: str, config: Any, context: int, dtype: Any) -> dict[str, Any]:
    """One forward's arguments at the stated workload."""
    import torch

    ids = (torch.arange(context) % 1000 + 3).unsqueeze(0)
    if kind == "decoder":
        return {"input_ids": ids, "use_cache": True}
    if kind == "encoder":
        return {"input_ids": ids}
    if kind == "encoder-decoder":
        return {"input_ids": ids, "decoder_input_ids": ids, "use_cache": True}
    vision = config if kind == "vision" else config.vision_config
    pixels = torch.randn(1, 3, vision.image_size, vision.image_size, dtype=dtype)
    if kind == "vision":
        return {"pixel_values": pixels}
    ids[0, : config.image_seq_length] = config.image_token_index
    return {"input_ids": ids, "pixel_values": pixels, "use_cache": True}


def _plan(path: Path, strategy: str, context: int) -> Any:
    """``strategy``'s plan: on the host, or with a simulated accelerator that holds half the
    model; streamed from disk, with a host budget that keeps about half the layers on disk."""
    import memplan

    checkpoint, workload = memplan.inspect(path), memplan.Workload(context=context)
    simulated = memplan.Overheads(cuda_context=0, allocator_slack=0.0)  # no CUDA context exists
    policy = memplan.Policy(order=(strategy,), allow_quantization=True, overheads=simulated)
    spec = "cpu=64GiB"
    if strategy in SIMULATED:  # half the model, or what the smallest offload needs if more
        gpu = checkpoint.nbytes // 2
        try:
            return memplan.plan(checkpoint, memplan.probe(f"cuda:0={gpu},{spec}"), workload, policy)
        except memplan.DoesNotFit as short:
            spec = f"cuda:0={int(short.needed / (1 - policy.headroom)) + (1 << 20)},{spec}"
    elif strategy == "streamed-disk":
        cpu = memplan.Device("cpu")
        half = memplan.Streamed(cpu, "disk", len(checkpoint.layers) // 2, policy.prefetch_depth, "BF16")
        peak = memplan.estimate(checkpoint, workload, half, overheads=simulated).on(cpu).peak
        spec = f"cpu={int(peak / (1 - policy.headroom)) + (1 << 20)}"
    return memplan.plan(checkpoint, memplan.probe(spec), workload, policy)


def worker(path: Path, strategy: str, context: int, kind: str) -> dict[str, Any]:
    import bitsandbytes  # noqa: F401  (imports are the runtime, measured apart)
    import torch
    import transformers  # noqa: F401

    import memplan

    base = current_rss()
    chosen = _plan(path, strategy, context)
    model_bytes = sum(d.peak - d.overhead for d in chosen.estimate.devices)
    model = memplan.load(path, plan=chosen, progress=False, quant_cache=False)  # quantizes, every run
    with torch.no_grad():
        model(**inputs(kind, model.config, context, model.dtype))
    return {
        "estimate": model_bytes, "measured": peak_rss() - base, "base": base,
        "plan": memplan.planner.describe(chosen.strategy),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--only", help="run the cases whose label starts with this")
    parser.add_argument("--runs", type=int, default=1, help="fresh processes per cell; the median is shown")
    parser.add_argument(
        "--worker", nargs=4, metavar=("MODEL", "STRATEGY", "CONTEXT", "KIND"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.worker:
        model, strategy, context, kind = args.worker
        print(json.dumps(worker(Path(model), strategy, int(context), kind)))
        return
    root = Path(tempfile.gettempdir())
    print(f"batch 1, context {args.context} tokens, one forward; estimate of the model's bytes vs peak RSS")
    print(f"(median of {args.runs} fresh process(es) per cell)")
    print("above the imports; goal: every cell within +-10%, median within +-5%, none below -5%")
    print(f"{'model':10} {'kind':15} {'strategy':13} {'estimated':>10} {'measured':>10} {'ratio':>6}")
    errors = []
    for case in cases(args.quick):
        if args.only and not case.label.startswith(args.only):
            continue
        path = case.make(root / case.folder)
        for strategy in case.strategies:
            found = [
                run_worker(Path(__file__), str(path), strategy, str(args.context), case.kind)
                for _ in range(args.runs)
            ]
            r = sorted(found, key=lambda run: run["measured"])[len(found) // 2]  # the median run
            error = (r["estimate"] - r["measured"]) / r["measured"]
            errors.append(error)
            print(
                f"{case.label:10} {case.kind:15} {strategy:13} {mib(r['estimate']):>10} {mib(r['measured']):>10}"
                f" {r['estimate'] / r['measured']:6.3f} ({error:+.1%})  {r['plan']}"
            )
    errors.sort()
    median = errors[len(errors) // 2] if len(errors) % 2 else sum(errors[len(errors) // 2 - 1 :][:2]) / 2
    print(f"median {median:+.1%}, worst over {max(errors):+.1%}, worst under {min(errors):+.1%}")


if __name__ == "__main__":
    main()
