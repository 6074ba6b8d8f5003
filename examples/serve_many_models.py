"""Serve several models over HTTP under one memory budget: a ResidencyManager keeps the models in
use on the GPU, demotes the others to host memory and disk, and loads each on its first request.

Without a CUDA device the GPU is simulated (its budget enforced, the bytes in host memory), so
this runs anywhere:

    python examples/serve_many_models.py --models chat=/models/a code=/models/b \\
        --gpu 512MiB --host-tier 1.5GiB --disk /tmp/spill --port 8000
    curl -X POST localhost:8000/v1/models/chat/forward -d '{"input_ids": [[1, 2, 3]]}'
    curl localhost:8000/metrics

Routes:
- ``POST /v1/models/{name}/forward`` with ``{"input_ids": [[...], ...]}`` (rows of equal length)
  runs one forward and answers ``{"model", "tier", "shape", "argmax", "checksum"}``: the tier it
  ran on, the logits' shape, the argmax token of each position, and the SHA-256 of the logits as
  bfloat16, row-major (compare it with your own run of the model).
- ``GET /v1/models``: each model, whether it is loaded, and its tier.
- ``GET /metrics``: Prometheus text: tiers, and per model its tier, loads, promotions,
  demotions and a request-latency histogram.

Errors are JSON ``{"error": message, "type": ..., ...the error's fields}``: an unknown model is
404, a bad body 400, a model no tier can hold 507 (``DoesNotFit``: needed, available, device), a
model that cannot move up while every tier above holds models in use 503 after ``--wait``
seconds, any other memplan error 500.

Each forward runs on a pool of ``--threads`` threads, inside a lease (``rm.use``): a leased
model never moves, so a request never sees its weights go. The server is aiohttp, imported
when it starts: ``lease`` needs only memplan (benchmarks/serving.py uses it).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

import memplan
from memplan import Allocator, MemplanError, ResidencyManager, Workload, get_tier
from memplan.gpu import parse_simulation
from memplan.monitor import MemplanCollector

# The status each memplan error answers with; the most specific class listed wins.
STATUS = {
    memplan.NoSuchEntry: 404,
    memplan.DoesNotFit: 507,
    memplan.TierFull: 503,
    MemplanError: 500,
}


class BadRequest(Exception):
    """A request body the server cannot run (400)."""


def checksum(logits: torch.Tensor) -> str:
    """SHA-256 of ``logits`` as bfloat16, row-major."""
    raw = logits.detach().to("cpu", torch.bfloat16).contiguous().view(torch.int16)
    return hashlib.sha256(raw.numpy().tobytes()).hexdigest()


def parse_input_ids(body: bytes, context: int | None) -> torch.Tensor:
    """``{"input_ids": [[...], ...]}``: rows of equal length, of non-negative ints."""
    try:
        rows = json.loads(body)["input_ids"]
    except (ValueError, TypeError, KeyError):
        raise BadRequest('expected JSON {"input_ids": [[token, ...], ...]}') from None
    if not isinstance(rows, list) or not rows or not all(isinstance(r, list) and r for r in rows):
        raise BadRequest("input_ids must be a non-empty list of non-empty lists")
    if len({len(r) for r in rows}) != 1:
        raise BadRequest("every row of input_ids must have the same length")
    if not all(type(t) is int and t >= 0 for r in rows for t in r):
        raise BadRequest("input_ids must hold non-negative integers")
    if context is not None and len(rows[0]) > context:
        raise BadRequest(f"{len(rows[0])} tokens a row; this server runs at most {context}")
    return torch.tensor(rows)


# -- the server ----------------------------------------------------------------------------------
class Server:
    """The models behind the routes: a manager, the metrics, and the threads forwards run on."""

    def __init__(self, rm: ResidencyManager, names: list[str], *, threads: int, wait_s: float,
                 context: int | None) -> None:  # fmt: skip
        self.rm, self.names, self.wait_s, self.context = rm, names, wait_s, context
        self.loads: list[memplan.LoadReport] = []  # each model's load, once: memplan_load_seconds
        self.collector = MemplanCollector(manager=rm, loads=self.loads, models=names)
        self.executor = ThreadPoolExecutor(threads, thread_name_prefix="memplan-serve")
        self._reported: set[str] = set()
        self._lock = threading.Lock()

    def forward(self, name: str, ids: torch.Tensor) -> dict[str, Any]:
        """One forward of ``name`` (on a pool thread): what the route answers."""
        with self.rm.use(name, wait_s=self.wait_s) as model, torch.no_grad():
            tier = self.rm.tier_of(name).name  # leased: it stays there until the lease ends
            vocab = model.get_input_embeddings().num_embeddings
            if int(ids.max()) >= vocab:
                raise BadRequest(f"token {int(ids.max())} is outside {name}'s vocabulary of {vocab}")
            logits = model(ids.to(next(model.parameters()).device)).logits
            self._note_load(name, model)
        return {
            "model": name, "tier": tier, "shape": list(logits.shape),
            "argmax": logits.argmax(-1).tolist(), "checksum": checksum(logits),
        }  # fmt: skip

    def _note_load(self, name: str, model: Any) -> None:
        report = getattr(getattr(model, "memplan", None), "report", None)
        with self._lock:
            if report is not None and name not in self._reported:
                self._reported.add(name)
                self.loads.append(report)

    def models(self) -> list[dict[str, Any]]:
        loaded = set(self.rm.names())
        return [
            {"name": n, "loaded": n in loaded, "tier": self.rm.tier_of(n).name if n in loaded else None}
            for n in self.names
        ]

    def close(self) -> None:
        self.executor.shutdown(wait=True)
        self.rm.close()


def error_body(exc: Exception, **extra: Any) -> dict[str, Any]:
    """The error's message, type and scalar fields (a device as its name)."""
    fields = {
        k: str(v) if isinstance(v, memplan.Device) else v
        for k, v in vars(exc).items()
        if isinstance(v, str | int | float | memplan.Device)
    }
    return {"error": str(exc), "type": type(exc).__name__, **fields, **extra}


def status_of(exc: MemplanError) -> int:
    return next(STATUS[c] for c in type(exc).__mro__ if c in STATUS)


def build_app(server: Server) -> Any:
    """The aiohttp application serving ``server``'s routes."""
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

    registry = CollectorRegistry()
    registry.register(server.collector)
    routes = web.RouteTableDef()

    @routes.post("/v1/models/{name}/forward")
    async def forward(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in server.rm:  # before anything is observed: a series only for known models
            unknown = memplan.NoSuchEntry(name)
            return web.json_response(error_body(unknown, models=server.names), status=404)
        start = time.perf_counter()
        try:
            ids = parse_input_ids(await request.read(), server.context)
            loop = asyncio.get_running_loop()
            answer = await loop.run_in_executor(server.executor, server.forward, name, ids)
            return web.json_response(answer)
        except BadRequest as exc:
            return web.json_response(error_body(exc), status=400)
        except MemplanError as exc:
            status = status_of(exc)
            headers = {"Retry-After": "1"} if status == 503 else None
            return web.json_response(error_body(exc, model=name), status=status, headers=headers)
        finally:
            server.collector.observe_request(name, time.perf_counter() - start)

    @routes.get("/v1/models")
    async def models(request: web.Request) -> web.Response:
        return web.json_response({"models": server.models()})

    @routes.get("/metrics")
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.add_routes(routes)

    async def close(app: web.Application) -> None:
        server.close()

    app.on_cleanup.append(close)
    return app


# -- the command line ----------------------------------------------------------------------------
def gpu_allocator(size: str) -> Allocator:
    """The machine's accelerator where it has one (``MEMPLAN_SIMULATE`` honoured), else a
    simulated one of ``size``."""
    inventory = memplan.probe()
    if any(m.device.is_accelerator for m in inventory.devices):
        return Allocator(inventory)
    return Allocator(parse_simulation(f"cuda:0={size}"))


def model_arg(text: str) -> tuple[str, Path]:
    name, eq, path = text.partition("=")
    if not eq or not name or not path or "/" in name:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH (a name without '/'), got {text!r}")
    return name, Path(path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--models", nargs="+", type=model_arg, required=True, metavar="NAME=PATH")
    parser.add_argument("--gpu", default="512MiB", help="GPU tier budget (default %(default)s)")
    parser.add_argument("--host-tier", default="1.5GiB", help="host tier size (default %(default)s)")
    parser.add_argument("--disk", type=Path, help="disk tier folder (default: a temporary one)")
    parser.add_argument("--threads", type=int, default=8, help="forwards at once (default %(default)s)")
    parser.add_argument("--context", type=int, help="tokens a request may have (default: each model's own)")
    parser.add_argument("--wait", type=float, default=30.0, help="seconds a request may wait for room")
    args = parser.parse_args(argv)
    names = [n for n, _ in args.models]
    if len(set(names)) != len(names):
        parser.error(f"a model name is given twice: {' '.join(names)}")
    return args


def main(argv: list[str] | None = None) -> None:
    from aiohttp import web

    args = parse_args(argv)
    spill = Path(tempfile.mkdtemp(prefix="memplan-serve-")) if args.disk is None else args.disk
    allocator = gpu_allocator(args.gpu)
    tiers = [
        get_tier("gpu", args.gpu, allocator=allocator),
        get_tier("host", args.host_tier),
        get_tier("disk", spill),
    ]
    rm = ResidencyManager(tiers).start()
    workload = Workload(context=args.context) if args.context else None
    for name, path in args.models:
        rm.add_model(name, path, workload=workload)
    server = Server(rm, [n for n, _ in args.models], threads=args.threads, wait_s=args.wait,
                    context=args.context)  # fmt: skip
    gpu = tiers[0]
    line = (
        f"serving {len(args.models)} models at http://{args.host}:{args.port} "
        f"(gpu {gpu.device} {memplan.format_size(gpu.capacity)}"
        f"{' simulated' if allocator.simulated else ''}, host {args.host_tier}, disk {spill})"
    )
    try:
        web.run_app(
            build_app(server), host=args.host, port=args.port, print=lambda _: print(line, flush=True)
        )
    finally:
        if args.disk is None:
            shutil.rmtree(spill, ignore_errors=True)


if __name__ == "__main__":
    main()
