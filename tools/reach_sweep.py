"""The reach sweep: every model transformers' own test suite builds, loaded by memplan, full and
streamed from disk, compared bit for bit with ``from_pretrained`` of the same folder.

Each ``tests/models/*/test_modeling_*.py`` of a transformers source tree defines test classes whose
``setUp`` builds a ``*ModelTester``: a tiny config and inputs for its architecture. For every test
class, the first model class and the first head are saved (``torch.manual_seed(0)``, floating
persistent buffers moved off their init values, ``save_pretrained``), loaded by transformers and by
memplan, and run on the tester's own inputs. Equal means ``torch.equal`` on every output tensor;
where transformers' own save/load round trip moves the output (≤ 1e-5) and memplan equals the
unsaved model to the bit, that counts as equal too.

Not part of ``make test``: it needs a transformers source tree (``tests/``, ``utils/`` and
``src/transformers/testing_utils.py`` of one checkout; the release's source distribution lacks
the per-model tests) and what its test files import::

    pip install parameterized httpx datasets timeout-decorator scipy
    python tools/reach_sweep.py --tests /path/to/transformers [--only llama,bert] [--jobs 2]

A tree older or newer than the installed transformers may import names the release lacks: each
is stubbed (a constant the testers read is taken from the tree's own ``testing_utils.py``), and
the modules that needed one are counted apart in the summary.

Each test module runs in a process of its own (a crash or hang costs one module). Results go to
``--out`` as JSON lines, and a summary by outcome and by error is printed. Test modules that do
not import against the installed transformers (older or newer than it) are counted apart.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

MODES = ("full", "streamed")
ROUND_TRIP_TOLERANCE = 1e-5


def _modules(tests: Path, only: set[str]) -> list[Path]:
    found = sorted((tests / "tests" / "models").glob("*/test_modeling_*.py"))
    return [p for p in found if not only or p.parent.name in only]


def _run_module(script: Path, tests: Path, module: Path, modes: str, timeout: float) -> list[dict[str, Any]]:
    with tempfile.NamedTemporaryFile("r", suffix=".jsonl") as out:
        command = [sys.executable, str(script), "--worker", str(module), "--tests", str(tests)]
        command += ["--modes", modes, "--out", out.name]
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=tests)
        except subprocess.TimeoutExpired:
            return [{"module": module.parent.name, "status": "module-timeout"}]
        rows = [json.loads(line) for line in out.read().splitlines()]
    if done.returncode != 0 and not rows:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
        return [{"module": module.parent.name, "status": "module-crash", "message": tail[0][:300]}]
    return rows


def _summary(rows: list[dict[str, Any]]) -> str:
    lines = []
    modules = {r["module"] for r in rows}
    apart = Counter(r["status"] for r in rows if "mode" not in r)
    lines.append(f"{len(modules)} model directories; apart from the comparisons: {dict(apart) or 'nothing'}")
    for mode in MODES:
        mine = [r for r in rows if r.get("mode") == mode]
        if not mine:
            continue
        counted = [r for r in mine if r["status"] != "transformers-fails"]
        equal = sum(r["status"] in ("equal", "equal-round-trip") for r in counted)
        apart = len(mine) - len(counted)
        lines.append(f"{mode}: {equal} of {len(counted)} classes equal ({apart} transformers cannot build)")
        causes = Counter(
            f"{r['status']}: {r.get('error', '')}" for r in counted if not r["status"].startswith("equal")
        )
        lines.extend(f"  {n:4d}  {cause[:160]}" for cause, n in causes.most_common())
    outcomes: dict[tuple[str, ...], dict[str, bool]] = {}
    for r in rows:
        if r.get("mode") in MODES:
            key = (r["module"], r["test_class"], r["model_class"])
            seen = outcomes.setdefault(key, {})
            seen[r["mode"]] = seen.get(r["mode"], True) and r["status"].startswith("equal")
    both = sum(len(v) == len(MODES) and all(v.values()) for v in outcomes.values())
    lines.append(f"equal in both modes: {both}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tests", type=Path, required=True, help="a transformers source tree")
    parser.add_argument("--only", default="", help="model types, comma separated (default: all)")
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per test module")
    parser.add_argument("--out", type=Path, default=Path("reach_sweep.jsonl"))
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    tests = args.tests.resolve()
    if args.worker:
        return _worker(args.worker, tests, tuple(args.modes.split(",")), args.out)
    modules = _modules(tests, {m for m in args.only.split(",") if m})
    if not modules:
        print(f"no tests/models/*/test_modeling_*.py under {tests}", file=sys.stderr)
        return 2
    script = Path(__file__).resolve()
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool, args.out.open("w") as out:
        jobs = [pool.submit(_run_module, script, tests, m, args.modes, args.timeout) for m in modules]
        for job in jobs:
            for row in job.result():
                out.write(json.dumps(row) + "\n")
                rows.append(row)
            out.flush()
    print(_summary(rows))
    print(f"{time.perf_counter() - start:.0f} s; rows in {args.out}")
    return 0


# ---- the worker: one test module, in a process of its own -------------------------------------


def _worker(module: Path, tests: Path, modes: tuple[str, ...], out: Path) -> int:
    sys.path.insert(0, str(tests))
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    warnings.simplefilter("ignore")
    name = f"tests.models.{module.parent.name}.{module.stem}"
    with out.open("w") as sink:
        for row in _module_rows(name, module.parent.name, modes):
            sink.write(json.dumps(row) + "\n")
            sink.flush()
    return 0


_MISSING_NAME = re.compile(r"cannot import name '(\w+)' from '([\w.]+)'")


class _Stub:
    """A name the test files import that the installed transformers lacks (the tree is older or
    newer): importable, but using it fails loudly. The sweep uses only the testers' configs and
    inputs, never these helpers."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError(f"{self.name} is not in the installed transformers")

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Stub(f"{self.name}.{attr}")


def _from_source_tree(owner: str, attr: str) -> Any:
    """``attr`` of ``transformers.testing_utils`` as the tree's own ``src/`` defines it (constants
    the testers read, such as their default sizes), or None."""
    source = Path(sys.path[0]) / "src" / "transformers" / "testing_utils.py"
    if owner != "transformers.testing_utils" or not source.is_file():
        return None
    import ast

    for node in ast.parse(source.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == attr for t in node.targets):
            try:
                return ast.literal_eval(node.value)
            except ValueError:
                return None
    return None


def _import_with_stubs(name: str, stubbed: list[str]) -> Any:
    """``name`` imported; each name or module it imports that the installed transformers lacks
    is stubbed (and listed in ``stubbed``) and the import tried again."""
    import importlib
    import types

    for _ in range(50):
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if not exc.name or not exc.name.startswith(("tests.", "transformers.")):
                raise
            module = types.ModuleType(exc.name)
            module.__getattr__ = _Stub  # type: ignore[method-assign]
            sys.modules[exc.name] = module
            stubbed.append(exc.name)
        except ImportError as exc:
            found = _MISSING_NAME.search(str(exc))
            if not found or not found.group(2).startswith(("transformers", "tests")):
                raise
            attr, owner = found.groups()
            value = _from_source_tree(owner, attr)
            setattr(sys.modules[owner], attr, _Stub(f"{owner}.{attr}") if value is None else value)
            stubbed.append(f"{owner}.{attr}" + ("" if value is None else " (from the tree's source)"))
    raise ImportError(f"{name}: too many names missing ({', '.join(stubbed[-3:])}, ...)")


def _module_rows(name: str, model_type: str, modes: tuple[str, ...]) -> Iterator[dict[str, Any]]:
    import unittest

    stubbed: list[str] = []
    try:
        test_module = _import_with_stubs(name, stubbed)
    except Exception as exc:  # an older or newer test file than the installed transformers
        yield {"module": model_type, "status": "import-error", "message": _message(exc)}
        return
    if stubbed:
        yield {"module": model_type, "status": "imported-with-stubs", "stubbed": stubbed}
    seen: set[str] = set()
    for test_class in vars(test_module).values():
        if not (isinstance(test_class, type) and issubclass(test_class, unittest.TestCase)):
            continue
        if test_class.__module__ != name:
            continue
        if not (
            getattr(test_class, "all_model_classes", None) or getattr(test_class, "model_tester_class", None)
        ):
            continue
        yield from _test_class_rows(test_class, model_type, modes, seen)


def _picked(model_classes: tuple[type, ...]) -> list[type]:
    """The first model class and the first head after it."""
    first = model_classes[0]
    heads = [c for c in model_classes[1:] if c.__name__ != first.__name__]
    return [first, *heads[:1]]


def _test_class_rows(
    test_class: type, model_type: str, modes: tuple[str, ...], seen: set[str]
) -> Iterator[dict[str, Any]]:
    base = {"module": model_type, "test_class": test_class.__name__}
    try:
        case = test_class("setUp")
        case.setUp()
        config, inputs = case.model_tester.prepare_config_and_inputs_for_common()
    except Exception as exc:
        yield base | {"status": "tester-fails", "message": _message(exc)}
        return
    if not case.all_model_classes:
        return
    for model_class in _picked(tuple(case.all_model_classes)):
        if model_class.__name__ in seen:
            continue
        seen.add(model_class.__name__)
        row = base | {"model_class": model_class.__name__}
        prepare = getattr(case, "_prepare_for_class", None)
        try:
            class_inputs = prepare(inputs, model_class) if prepare else dict(inputs)
        except Exception as exc:
            class_inputs = dict(inputs)
            row["inputs_note"] = _message(exc)
        yield from _compare(model_class, config, class_inputs, row, modes)


def _compare(
    model_class: type, config: Any, inputs: dict[str, Any], row: dict[str, Any], modes: tuple[str, ...]
) -> Iterator[dict[str, Any]]:
    import copy

    with tempfile.TemporaryDirectory(prefix="reach-") as folder:
        try:
            unsaved, reference = _references(model_class, copy.deepcopy(config), inputs, Path(folder))
        except Exception as exc:
            for mode in modes:
                yield row | {"mode": mode, "status": "transformers-fails", "message": _message(exc)}
            return
        for mode in modes:
            started = time.perf_counter()
            yield (
                row
                | {
                    "mode": mode,
                    **_memplan_outcome(model_class, Path(folder), inputs, mode, unsaved, reference),
                }
                | {"seconds": round(time.perf_counter() - started, 2)}
            )


def _references(
    model_class: type, config: Any, inputs: dict[str, Any], folder: Path
) -> tuple[list[Any], list[Any]]:
    import torch

    torch.manual_seed(0)
    model = model_class(config).eval()
    _train_buffers(model)
    unsaved = _outputs(model, inputs)
    model.save_pretrained(folder)
    del model
    reference = model_class.from_pretrained(folder).eval()
    for param in reference.parameters():
        param.data = param.data.clone()  # own memory: BLAS picks its order by alignment
    return unsaved, _outputs(reference, inputs)


def _train_buffers(model: Any) -> None:
    """Floating persistent buffers off their init values, so a load that keeps them differs."""
    import torch

    with torch.no_grad():
        for module in model.modules():
            for attr, buffer in module._buffers.items():
                if (
                    buffer is not None
                    and attr not in module._non_persistent_buffers_set
                    and buffer.is_floating_point()
                ):
                    buffer.add_(torch.rand_like(buffer) + 0.5)


def _outputs(model: Any, inputs: dict[str, Any]) -> list[Any]:
    import copy

    import torch

    torch.manual_seed(0)
    with torch.no_grad():
        result = model(**copy.deepcopy(inputs))
    return [t.detach().clone() for t in _tensors(result)]


def _tensors(value: Any) -> Iterator[Any]:
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif hasattr(value, "to_tuple"):
        yield from _tensors(value.to_tuple())


def _memplan_outcome(
    model_class: type,
    folder: Path,
    inputs: dict[str, Any],
    mode: str,
    unsaved: list[Any],
    reference: list[Any],
) -> dict[str, Any]:
    try:
        model = _load(model_class, folder, mode, _workload(inputs))
        mine = _outputs(model, inputs)
    except Exception as exc:
        return {"status": "error", "error": type(exc).__name__, "message": _message(exc)}
    outcome: dict[str, Any] = {"status": _verdict(mine, unsaved, reference)}
    streamer = model.memplan.streamer
    if mode == "streamed":
        outcome["fetches"] = streamer.stats.fetches if streamer is not None else 0
    if outcome["status"] == "differ":
        outcome["max_relative"] = _max_relative(mine, reference)
    return outcome


def _verdict(mine: list[Any], unsaved: list[Any], reference: list[Any]) -> str:
    if _equal(mine, reference):
        return "equal"
    if _equal(mine, unsaved) and _max_relative(reference, unsaved) <= ROUND_TRIP_TOLERANCE:
        return "equal-round-trip"
    return "differ"


def _equal(a: list[Any], b: list[Any]) -> bool:
    import torch

    def same(x: Any, y: Any) -> bool:  # NaN where the other has NaN (GroupViT's tester outputs them)
        if x.shape != y.shape or x.dtype != y.dtype:
            return False
        if torch.equal(x, y):
            return True
        return bool(x.is_floating_point() and torch.allclose(x, y, rtol=0.0, atol=0.0, equal_nan=True))

    return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))


def _max_relative(a: list[Any], b: list[Any]) -> float:
    worst = 0.0
    if len(a) != len(b):
        return math.inf
    for x, y in zip(a, b, strict=True):
        if x.shape != y.shape:
            return math.inf
        if not x.is_floating_point():
            worst = max(worst, 0.0 if x.equal(y) else math.inf)
            continue
        scale = float(y.abs().max()) or 1.0
        worst = max(worst, float((x.double() - y.double()).abs().max()) / scale)
    return worst


def _workload(inputs: dict[str, Any]) -> Any:
    """What the tester's inputs ask of the model: their batch, and their tokens where they are text."""
    import torch

    from memplan import Workload

    tensors = [v for v in inputs.values() if isinstance(v, torch.Tensor) and v.ndim > 0]
    batch = int(tensors[0].shape[0]) if tensors else 1
    ids = inputs.get("input_ids", inputs.get("decoder_input_ids"))
    context = int(ids.shape[-1]) if isinstance(ids, torch.Tensor) and ids.ndim > 1 else None
    return Workload(batch=max(batch, 1), context=context)


def _load(model_class: type, folder: Path, mode: str, workload: Any) -> Any:
    import memplan
    from memplan import Device, Policy, Streamed
    from memplan.planner import Overheads

    exact = Overheads(cuda_context=0, allocator_slack=0.0)
    checkpoint = memplan.with_computed_buffers(memplan.inspect(folder), model_class)
    limit = checkpoint.max_positions
    if workload.context is not None and limit is not None and workload.context > limit:
        # A tester feeding more tokens than its config's positions (rotary models run past them):
        # memplan plans for what the config allows, and refuses more (ContextTooLong).
        workload = dataclasses.replace(workload, context=limit)
    spec = "cpu=8GiB"
    candidate = "full"
    if mode == "streamed":
        candidate = "streamed-disk"
        one = Streamed(Device("cuda", 0), "disk", resident_layers=1, prefetch_depth=1, dtype="F32")
        peak = memplan.estimate(checkpoint, workload, one, overheads=exact).on(Device("cuda", 0)).peak
        spec = f"cuda:0={math.ceil(peak / 0.9) + 1024},{spec}"
    policy = Policy(order=(candidate,), overheads=exact, prefetch_depth=1)
    plan = memplan.plan(checkpoint, memplan.probe(spec), workload, policy)
    return memplan.load(folder, plan=plan, model_cls=model_class, progress=False)


def _message(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


if __name__ == "__main__":
    sys.exit(main())
