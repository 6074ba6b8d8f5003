"""The ``memplan`` command. Exit codes: 0 ok, 1 bad input or does not fit, 2 usage."""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, NoReturn

from memplan._bnb import quiet_bitsandbytes
from memplan.errors import DoesNotFit, ForwardCheckFailed, MemplanError
from memplan.gpu import probe, render_inventory
from memplan.monitor import parse_address
from memplan.planner import Corrections, Plan, Policy, Workload, compute_dtype, dtype_name, inspect, plan

__all__ = ["main", "render_inventory"]  # render_inventory: memplan.gpu's, kept importable here

EXIT_OK, EXIT_BAD_INPUT, EXIT_USAGE = 0, 1, 2


def _cmd_probe(args: argparse.Namespace) -> int:
    inventory = probe(args.simulate)
    print(inventory.to_json() if args.json else render_inventory(inventory))
    return EXIT_OK


def _plan_from(args: argparse.Namespace) -> Plan:
    checkpoint = inspect(args.model, revision=args.revision)
    if getattr(args, "build", False):
        from memplan.loaders import with_computed_buffers

        checkpoint = with_computed_buffers(checkpoint)
    inventory = probe(args.simulate)
    workload = Workload(batch=args.batch, context=args.context, kv_dtype=args.kv_dtype)
    base = Policy.seed_thresholds() if args.policy == "thresholds" else Policy()
    allow = args.allow_quantization or base.allow_quantization
    policy = replace(base, allow_quantization=allow, headroom=args.headroom, dtype=args.dtype)
    corrections = Corrections() if inventory.simulated else Corrections.load()
    return plan(checkpoint, inventory, workload, policy, corrections=corrections)


def _nothing_fits(args: argparse.Namespace, exc: DoesNotFit) -> int:
    print(exc.plan.to_json() if args.json else exc.plan.explain())
    print(f"memplan: nothing fits: {exc}", file=sys.stderr)
    return EXIT_BAD_INPUT


def _cmd_plan(args: argparse.Namespace) -> int:
    try:
        result = _plan_from(args)
    except DoesNotFit as exc:
        return _nothing_fits(args, exc)
    print(result.to_json() if args.json else result.explain())
    return EXIT_OK


def _cmd_load(args: argparse.Namespace) -> int:
    from memplan.loaders import handle_of, load

    try:
        chosen = _plan_from(args)
    except DoesNotFit as exc:
        return _nothing_fits(args, exc)
    model = load(args.model, revision=args.revision, plan=chosen, progress=not args.json)
    forward = _forward_check(model, min(args.tokens, chosen.workload.tokens))
    handle = handle_of(model)
    assert handle is not None  # load() hangs one on every model it returns
    report = handle.report
    if args.json:
        print(json.dumps({"report": report.to_dict(), "forward": forward}, indent=2))
    else:
        print(report.explain())
        print(f"  {_forward_line(forward)}")
    return EXIT_OK


def _forward_line(forward: dict[str, Any]) -> str:
    if "skipped" in forward:
        return f"forward skipped: {forward['skipped']}"
    return f"forward on {forward['inputs']}: {forward['seconds']:.3f} s, output {forward['shape']}"


def _forward_check(model: Any, tokens: int) -> dict[str, Any]:
    """One forward on inputs built from the config, the proof that the loaded model runs; a model
    whose inputs memplan cannot build is not run, and the result says why."""
    import time

    import torch

    inputs = _dummy_inputs(model, tokens)
    if isinstance(inputs, str):
        return {"skipped": inputs}
    start = time.perf_counter()
    try:
        with torch.no_grad(), quiet_bitsandbytes():
            out = model(**inputs)
    except Exception as exc:  # the boundary: the model's own error, as one line
        raise ForwardCheckFailed(f"{type(exc).__name__}: {exc}") from exc
    output = _first_tensor(out)
    if output is None:
        return {"skipped": f"{type(model).__name__} returned no tensor to check"}
    if not torch.isfinite(output.float()).all():
        raise ForwardCheckFailed("the loaded model produced non-finite outputs")
    described = ", ".join(f"{name} {list(value.shape)}" for name, value in inputs.items())
    return {"seconds": time.perf_counter() - start, "shape": list(output.shape), "inputs": described}


def _first_tensor(out: Any) -> Any:
    """The output to check: ``logits`` where the model has them, else its first tensor."""
    import torch

    if isinstance(out, torch.Tensor):
        return out
    logits = getattr(out, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    values = out.values() if isinstance(out, dict) else out if isinstance(out, tuple) else ()
    return next((v for v in values if isinstance(v, torch.Tensor)), None)


def _dummy_inputs(model: Any, tokens: int) -> dict[str, Any] | str:
    """Keyword inputs for one forward of ``model``, from its config: token ids, decoder ids, pixel
    values, audio features; or why there are none (a one-line note)."""
    import inspect

    import torch

    config: Any = getattr(model, "config", None)
    accepted = inspect.signature(model.forward).parameters
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    vocab = int(getattr(text, "vocab_size", 0) or 0)
    ids = (torch.arange(tokens) % max(vocab, 1)).unsqueeze(0)
    inputs: dict[str, Any] = {}
    for name, value in (("input_ids", ids), ("decoder_input_ids", ids)):
        if name in accepted and vocab:
            inputs[name] = value
    # A vision-language model wants its image tokens and pixels to agree: text alone runs it.
    images = not any(hasattr(config, k) for k in ("image_token_index", "image_token_id"))
    vision = getattr(config, "vision_config", None) or config
    size, channels = getattr(vision, "image_size", None), getattr(vision, "num_channels", 3)
    if "pixel_values" in accepted and images and isinstance(size, int):
        inputs["pixel_values"] = torch.zeros(1, channels, size, size)
    mels, frames = getattr(config, "num_mel_bins", None), getattr(config, "max_source_positions", None)
    if "input_features" in accepted and isinstance(mels, int) and isinstance(frames, int):
        inputs["input_features"] = torch.zeros(1, mels, 2 * frames)  # two frames per encoder position
    if not inputs:
        return f"cannot build inputs for {type(model).__name__} from its config"
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in inputs.items()}


def _common(command: argparse.ArgumentParser) -> None:
    command.add_argument("--json", action="store_true", help="print JSON for scripts")
    command.add_argument(
        "--simulate",
        metavar="SPEC",
        help="simulated devices instead of real ones, e.g. 'cuda:0=24GiB@20GiB,cpu=64GiB'",
    )


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text!r}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value < math.inf:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _checked(parse: Callable[[str], object]) -> Callable[[str], str]:
    """An argparse type that refuses what ``parse`` refuses, with its message, and keeps the text."""

    def check(text: str) -> str:
        try:
            parse(text)
        except MemplanError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        return text

    return check


def _png(text: str) -> str:
    """Checked before sampling starts: a typo must not cost the whole run's timeline."""
    folder = Path(text).expanduser().parent
    if not folder.is_dir():
        raise argparse.ArgumentTypeError(f"folder {folder} does not exist")
    return text


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line that says where to look, not the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _plan_arguments(cmd: argparse.ArgumentParser) -> None:
    cmd.add_argument(
        "model",
        help="model folder (safetensors or .bin, sharded or not), one weights file, or a Hugging Face "
        "repo id (org/name, from the local cache first)",
    )
    cmd.add_argument("--revision", help="branch, tag or commit of a repo id (default: main)")
    cmd.add_argument(
        "--context", type=_positive, help="tokens per sequence (default: the model's limit, at most 4096)"
    )
    cmd.add_argument("--batch", type=_positive, default=1, help="sequences at once (default 1)")
    cmd.add_argument(
        "--kv-dtype", type=_checked(dtype_name), help="KV cache dtype, e.g. fp8 (default: the compute dtype)"
    )
    cmd.add_argument(
        "--dtype",
        type=_checked(compute_dtype),
        help="compute dtype: bf16, fp16 or fp32 (default: the checkpoint's)",
    )
    cmd.add_argument("--allow-quantization", action="store_true", help="consider bitsandbytes int8 and nf4")
    cmd.add_argument("--headroom", type=_fraction, default=0.10, help="fraction of free memory to leave")
    cmd.add_argument(
        "--policy", choices=("default", "thresholds"), default="default",
        help="default compares estimated peaks; thresholds uses the needed/available ratio rules",
    )  # fmt: skip
    _common(cmd)


def _add_plan(commands: Any) -> None:
    cmd = commands.add_parser("plan", help="choose how to load a model: full, quantized, sharded or streamed")
    _plan_arguments(cmd)
    cmd.add_argument(
        "--build", action="store_true",
        help="build the model skeleton (needs transformers) to count the buffers it computes, as load does",
    )  # fmt: skip
    cmd.set_defaults(run=_cmd_plan)


def _add_load(commands: Any) -> None:
    cmd = commands.add_parser("load", help="plan, load the model, run one forward and print the load report")
    _plan_arguments(cmd)
    cmd.add_argument(
        "--tokens",
        type=_positive,
        default=8,
        help="tokens in the test forward (default 8, at most the context)",
    )
    cmd.set_defaults(run=_cmd_load)


def _cmd_demo(args: argparse.Namespace) -> int:
    from memplan.demo import run_demo

    return run_demo()


def _add_monitor(commands: Any) -> None:
    from memplan.monitor.commands import cmd_doctor, cmd_monitor

    cmd = commands.add_parser("monitor", help="sample memory per device; plot it or serve it to Prometheus")
    cmd.add_argument("--interval", type=_seconds, default=0.5, help="seconds between samples (default 0.5)")
    cmd.add_argument("--duration", type=_seconds, help="stop after this many seconds (default: at Ctrl-C)")
    cmd.add_argument("--history", type=_positive, default=100, help="samples kept (default 100)")
    cmd.add_argument(
        "--plot", metavar="PNG", type=_png, help="write a memory timeline to this PNG at the end"
    )
    cmd.add_argument(
        "--prometheus", metavar="HOST:PORT", type=_checked(parse_address),
        help="serve metrics, e.g. 127.0.0.1:9400",
    )  # fmt: skip
    _common(cmd)
    cmd.set_defaults(run=cmd_monitor)
    doctor = commands.add_parser("doctor", help="check this machine's setup (and a model's plan) with advice")
    doctor.add_argument("model", nargs="?", help="also plan this model and say what would load it better")
    _common(doctor)
    doctor.set_defaults(run=cmd_doctor)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="memplan", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    probe_cmd = commands.add_parser("probe", help="measure host, CUDA, MPS and disk memory")
    _common(probe_cmd)
    probe_cmd.set_defaults(run=_cmd_probe)
    _add_plan(commands)
    _add_load(commands)
    _add_monitor(commands)
    demo = commands.add_parser("demo", help="plan a small Llama on four simulated machines, load it on two")
    demo.set_defaults(run=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    # The boundary: memplan's errors, and the OS refusing a file or a port the user named, are one
    # line that says what went wrong, never a traceback.
    except (MemplanError, OSError) as exc:
        print(f"memplan: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
