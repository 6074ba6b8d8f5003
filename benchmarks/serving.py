"""Many models under one memory budget: memplan's residency manager against the model caches of
two serving systems, on the same request trace, in the same run.

12 random-init transformers models of three families (GPT-2, OPT, Llama), 40 to 300 MiB each,
about 2 GiB in all, written once under ``--model-dir``. A simulated accelerator of 512 MiB (its
budget enforced, the bytes in host memory), a 1.5 GiB host tier and a disk tier. A Zipf (s = 1.1)
trace of 2,000 requests, popularity independent of size, each a 16-token forward, sent by 4
client threads in a closed loop (each sends its next request when its last is answered).

- memplan: ``ResidencyManager.add_model`` + leases, as examples/serve_many_models.py serves
  (``use(name, wait_s=...)``): a model is loaded once, at its first request; under pressure it is
  demoted to host memory, then disk, and promoted back when asked for. A model whose way up is held by
  models in use runs from the host tier (``use`` leases it where it is). Here the simulated GPU
  computes on the CPU, as the host does, so such a forward costs what a GPU one costs; on a real
  GPU it would run on the CPU. The ``on host`` column gives their share; ``--gpu-only`` makes
  every memplan forward wait for the GPU tier instead.
- count-LRU: Ray Serve's model multiplexing default: 3 models a replica
  (``max_num_models_per_replica``), least recently used evicted and destroyed, reloaded from its
  checkpoint (``memplan.load``) when asked again. Ray counts models, not bytes: where 3 of these
  models exceed 512 MiB a real replica runs out of memory; here it evicts further until the
  load fits, so its figures are better than Ray's would be.
- keep-alive: Ollama's: a model stays loaded 5 minutes after its last request
  (``OLLAMA_KEEP_ALIVE``), and a model that does not fit unloads the least recently used idle
  ones. The keep-alive runs on the wall clock; a replay lasts well under 5 minutes, so no model
  expires (the ``expired`` column says so) and it acts as an LRU bounded by memory alone.
  Ollama's default also caps loaded models at 3 a GPU (``OLLAMA_MAX_LOADED_MODELS``);
  ``--ollama-max-loaded 3`` applies it, and then it is the count-LRU row.

Both peers load one model at a time (as Ollama's scheduler does), planned for the accelerator's
free room (``memplan.plan``, before any byte is read) and whole, in their own dtype, as memplan
loads them; forwards of loaded models go on meanwhile. Per policy: latency p50/p99 (a request
from send to answer, waits and loads included), requests/s, bytes read from checkpoints (load
reports' ``bytes_read``; memplan reads each checkpoint once), loads, promotions (memplan's moves
up a tier) and bytes moved between tiers, the accelerator's peak use (the simulated budget's
high-water mark; for the peers taken after each load, since ``memplan.load`` resets it), and
ratios memplan / count-LRU. Each run replays the trace under every policy in turn (the order
rotated run to run, the page cache dropped before each); ``--runs`` (default 3) prints medians. Every
request's logits are hashed: the three policies must compute the same, or the script fails.

    python benchmarks/serving.py              # writes ~2 GiB of models once, under /tmp
    python benchmarks/serving.py --quick      # 4 small models, 100 requests (CI smoke run)
"""

from __future__ import annotations

import argparse
import collections
import itertools
import random
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import xxhash

sys.path.insert(0, str(Path(__file__).parent))
from _common import drop_page_cache, make_checkpoint, mib

import memplan
from memplan import Allocator, Device, DeviceMemory, Inventory, ResidencyManager, RetentionPolicy, get_tier
from memplan.gpu import parse_simulation
from memplan.planner import Overheads

GPU, CPU = Device("cuda", 0), Device("cpu")
TOKENS = 16
WORKLOAD = memplan.Workload(batch=1, context=TOKENS)
# Loaded whole in their own dtype, as the manager loads a model it was given by name: the process's
# runtimes (CUDA context, interpreter) are paid once, not by each model.
WHOLE = memplan.Policy(
    order=("full",),
    overheads=Overheads(cuda_context=0, mps_runtime=0, host_runtime=0, bnb_runtime=0, load_runtime=0,
                        cpu_4bit_repack=0),
)  # fmt: skip


@dataclass(frozen=True)
class Scale:
    sizes_mib: tuple[int, ...]  # one model a size
    hidden: int
    vocab: int
    gpu: str
    host: str
    requests: int


FULL = Scale((40, 60, 85, 110, 135, 160, 185, 210, 235, 260, 280, 300), 768, 8192, "512MiB", "1.5GiB", 2000)
QUICK = Scale((2, 3, 4, 6), 128, 1024, "8MiB", "8MiB", 100)
FAMILIES = ("gpt2", "opt", "llama")  # the smallest sizes go to the tied-embedding families


# -- the models and the trace ----------------------------------------------------------------
def _config(family: str, hidden: int, vocab: int, layers: int) -> tuple[str, Any]:
    import transformers as tf

    heads = hidden // 64
    if family == "gpt2":
        config = tf.GPT2Config(
            n_embd=hidden, n_layer=layers, n_head=heads, vocab_size=vocab, n_positions=512,
            bos_token_id=vocab - 1, eos_token_id=vocab - 1,
        )  # fmt: skip
        return "GPT2LMHeadModel", config
    if family == "opt":
        return "OPTForCausalLM", tf.OPTConfig(
            hidden_size=hidden, ffn_dim=4 * hidden, num_hidden_layers=layers, num_attention_heads=heads,
            vocab_size=vocab, max_position_embeddings=512, word_embed_proj_dim=hidden,
        )  # fmt: skip
    return "LlamaForCausalLM", tf.LlamaConfig(
        hidden_size=hidden, intermediate_size=8 * hidden // 3, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=max(1, heads // 4), vocab_size=vocab,
        max_position_embeddings=512,
    )  # fmt: skip


def _bytes(family: str, hidden: int, vocab: int, layers: int) -> int:
    """bf16 bytes of the family's model with ``layers`` layers (tied weights once), on meta."""
    import transformers

    cls, config = _config(family, hidden, vocab, layers)
    with torch.device("meta"):
        model = getattr(transformers, cls)(config)
    tied = set(model.all_tied_weights_keys)
    return sum(2 * t.numel() for k, t in model.state_dict().items() if k not in tied)


def write_models(root: Path, sizes_mib: tuple[int, ...], hidden: int, vocab: int) -> dict[str, Path]:
    """One model a size, families in turn, the layers that come nearest the size; reused when
    already written with the same config."""
    paths = {}
    for i, target in enumerate(sizes_mib):
        family = FAMILIES[i % len(FAMILIES)]
        one, two = _bytes(family, hidden, vocab, 1), _bytes(family, hidden, vocab, 2)
        layers = max(1, round((target * 2**20 - (2 * one - two)) / (two - one)))
        cls, config = _config(family, hidden, vocab, layers)
        name = f"{family}-{target}m"
        paths[name] = make_checkpoint(root / name, cls, config)
    return paths


def zipf_trace(names: list[str], requests: int, seed: int) -> list[str]:
    rnd = random.Random(seed)
    ranked = list(names)
    rnd.shuffle(ranked)  # popularity independent of size
    weights = [1 / (rank + 1) ** 1.1 for rank in range(len(ranked))]
    return rnd.choices(ranked, weights=weights, k=requests)


# -- the three policies ------------------------------------------------------------------------
class Managed:
    """memplan: the models added to a residency manager, each request a lease. ``gpu_only``: a
    forward runs only once its model is on the accelerator (a lease that finds it lower, since
    every model there is in use, lets go and tries again)."""

    label = "memplan"

    def __init__(
        self, paths: dict[str, Path], gpu: str, host: str, spill: Path, *, gpu_only: bool, drop: bool,
        admission: bool,
    ) -> None:  # fmt: skip
        self.allocator = Allocator(parse_simulation(f"cuda:0={gpu}"))
        tiers = [get_tier("gpu", allocator=self.allocator), get_tier("host", host), get_tier("disk", spill)]
        self.rm = ResidencyManager(tiers, admission=admission and not gpu_only)
        for name, path in paths.items():
            self.rm.add_model(name, path, workload=WORKLOAD, policy=RetentionPolicy(drop=drop))
        self.gpu_only = gpu_only
        self.on_host = 0  # forwards run from the host tier
        self.lock = threading.Lock()

    def forward(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        while True:
            with self.rm.use(name, wait_s=600) as model, torch.no_grad():
                on_gpu = self.rm.tier_of(name).name == "gpu"
                if on_gpu or not self.gpu_only:
                    with self.lock:
                        self.on_host += not on_gpu
                    return model(ids).logits  # type: ignore[no-any-return]
            time.sleep(0.002)

    def figures(self) -> dict[str, float]:
        stats = self.rm.stats()
        return {
            "loads": stats.loads, "read": stats.bytes_loaded,
            "promotions": stats.promotions, "moved": stats.bytes_moved,
            "peak": self.allocator.usage(GPU).peak, "expired": 0, "on_host": self.on_host,
        }  # fmt: skip

    def close(self) -> None:
        self.rm.close()


class _Slot:
    def __init__(self) -> None:
        self.model: Any = None  # None while it loads
        self.busy = 1
        self.last_use = time.monotonic()


class Cache:
    """A serving system's model cache: models whole on the accelerator, least recently used
    evicted (destroyed: its budget given back) when ``max_models`` are loaded or a load does not
    fit, and idle ones after ``keep_alive_s``; an evicted model is loaded again when asked."""

    def __init__(self, label: str, checkpoints: dict[str, Any], gpu: str, *, max_models: int | None,
                 keep_alive_s: float | None) -> None:  # fmt: skip
        self.label, self.checkpoints = label, checkpoints
        self.max_models, self.keep_alive_s = max_models, keep_alive_s
        self.allocator = Allocator(parse_simulation(f"cuda:0={gpu}"))
        self.slots: collections.OrderedDict[str, _Slot] = collections.OrderedDict()  # LRU first
        self.cond = threading.Condition()
        self.loading = threading.Lock()  # one load at a time
        self.counts = collections.Counter[str]()

    def forward(self, name: str, ids: torch.Tensor) -> torch.Tensor:
        model = self._acquire(name)
        try:
            with torch.no_grad():
                return model(ids).logits  # type: ignore[no-any-return]
        finally:
            with self.cond:
                slot = self.slots[name]
                slot.busy -= 1
                slot.last_use = time.monotonic()
                self.cond.notify_all()

    def _acquire(self, name: str) -> Any:
        with self.cond:
            self._expire()
            while (slot := self.slots.get(name)) is not None and slot.model is None:
                self.cond.wait()  # another request is loading it
            if slot is not None:
                slot.busy += 1
                self.slots.move_to_end(name)
                return slot.model
            slot = self.slots[name] = _Slot()
        try:
            model = self._load(name)
        except BaseException:
            with self.cond:
                del self.slots[name]
                self.cond.notify_all()
            raise
        with self.cond:
            slot.model = model
            self.cond.notify_all()
        return model

    def _load(self, name: str) -> Any:
        with self.loading:
            while True:
                with self.cond:
                    while self.max_models and len(self._loaded(name)) >= self.max_models:
                        self._evict_or_wait(name)
                try:
                    plan = memplan.plan(self.checkpoints[name], self._free_room(), WORKLOAD, WHOLE)
                    break
                except memplan.DoesNotFit:
                    with self.cond:
                        self._evict_or_wait(name)
            model: Any = memplan.load(
                self.checkpoints[name].path, plan=plan, allocator=self.allocator, progress=False
            )
        self.counts["loads"] += 1
        self.counts["read"] += model.memplan.report.bytes_read
        # Its high-water mark, taken right after each load (memplan.load resets the allocator's peak).
        self.counts["peak"] = max(self.counts["peak"], self.allocator.usage(GPU).used)
        return model

    def _loaded(self, keep: str) -> list[str]:
        """Models loaded (not those waiting for their load: they hold nothing yet), LRU first."""
        return [n for n, s in self.slots.items() if n != keep and s.model is not None]

    def _evict_or_wait(self, keep: str) -> None:
        """Destroy the least recently used idle model (not ``keep``), or wait for one to go idle.
        Requests waiting for their own model's load hold no memory and are not waited for."""
        loaded = self._loaded(keep)
        idle = [n for n in loaded if not self.slots[n].busy]
        if idle:
            self._destroy(idle[0])
        elif not loaded:
            raise memplan.DoesNotFit(0, 0, GPU, f"{keep} does not fit the accelerator alone")
        else:
            self.cond.wait(0.05)

    def _expire(self) -> None:
        now = time.monotonic()
        for name, slot in list(self.slots.items()):
            idle = slot.model is not None and not slot.busy
            if self.keep_alive_s and idle and now - slot.last_use >= self.keep_alive_s:
                self._destroy(name)
                self.counts["expired"] += 1

    def _destroy(self, name: str) -> None:
        self.slots.pop(name).model.memplan.close()  # gives its budget back; the tensors go with it

    def _free_room(self) -> Inventory:
        free = self.allocator.available(GPU)
        host = DeviceMemory(CPU, 64 << 30, 64 << 30, "simulated")
        return Inventory((DeviceMemory(GPU, free, free, "simulated"), host), simulated=True)

    def figures(self) -> dict[str, float]:
        return {
            "loads": self.counts["loads"], "read": self.counts["read"], "promotions": 0, "moved": 0,
            "peak": self.counts["peak"], "expired": self.counts["expired"], "on_host": 0,
        }  # fmt: skip

    def close(self) -> None:
        for name in list(self.slots):
            self._destroy(name)


# -- replaying the trace -----------------------------------------------------------------------
def replay(server: Any, trace: list[str], inputs: list[torch.Tensor], clients: int) -> dict[str, Any]:
    """The trace sent by ``clients`` threads, each taking the next request when its last is answered."""
    latency, digests = [0.0] * len(trace), [""] * len(trace)
    following = itertools.count()
    failures: list[BaseException] = []

    def client() -> None:
        try:
            while (i := next(following)) < len(trace):
                start = time.perf_counter()
                logits = server.forward(trace[i], inputs[i])
                latency[i] = time.perf_counter() - start
                digests[i] = xxhash.xxh3_64_hexdigest(logits.contiguous().view(torch.int16).numpy().tobytes())
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failures:
        raise failures[0]
    cuts = statistics.quantiles(latency, n=100)
    return {
        "p50": cuts[49],
        "p99": cuts[98],
        "rps": len(trace) / wall,
        **server.figures(),
        "digests": digests,
    }


def one_run(policy: str, paths: dict[str, Path], checkpoints: dict[str, Any], size: Scale,
            trace: list[str], inputs: list[torch.Tensor], args: argparse.Namespace) -> dict[str, Any]:  # fmt: skip
    for path in paths.values():
        drop_page_cache(path)
    with tempfile.TemporaryDirectory(prefix="memplan-bench-spill-") as spill:
        server: Any
        if policy == "memplan":
            server = Managed(
                paths,
                size.gpu,
                size.host,
                Path(spill),
                gpu_only=args.gpu_only,
                drop=args.drop,
                admission=not args.no_admission,
            )
        elif policy == "count-LRU":
            server = Cache(policy, checkpoints, size.gpu, max_models=3, keep_alive_s=None)
        else:
            max_loaded = args.ollama_max_loaded or None
            server = Cache(policy, checkpoints, size.gpu, max_models=max_loaded, keep_alive_s=300.0)
        try:
            return replay(server, trace, inputs, args.clients)
        finally:
            server.close()


# -- the table ---------------------------------------------------------------------------------
POLICIES = ("memplan", "count-LRU", "keep-alive")
COLUMNS = ("p50", "p99", "rps", "read", "loads", "promotions", "moved", "peak", "expired", "on_host")


def table(results: dict[str, list[dict[str, Any]]], requests: int) -> None:
    med = {p: {c: statistics.median(r[c] for r in runs) for c in COLUMNS} for p, runs in results.items()}
    print(f"\n{'policy':11} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>7} {'read':>9} {'loads':>6} "
          f"{'promoted':>8} {'tier moves':>10} {'peak accel':>10} {'expired':>7} {'on host':>7}")  # fmt: skip
    for p, m in med.items():
        print(f"{p:11} {m['p50'] * 1e3:8.1f} {m['p99'] * 1e3:8.1f} {m['rps']:7.1f} {mib(m['read']):>9} "
              f"{m['loads']:6.0f} {m['promotions']:8.0f} {mib(m['moved']):>10} {mib(m['peak']):>10} "
              f"{m['expired']:7.0f} {m['on_host'] / requests:7.0%}")  # fmt: skip
    if "memplan" not in med or "count-LRU" not in med:
        return
    ours, peer = med["memplan"], med["count-LRU"]

    def ratio(c: str) -> str:
        return f"{ours[c] / peer[c]:.2f}x" if peer[c] else "n/a"

    print(f"\nmemplan / count-LRU: p50 {ratio('p50')}, p99 {ratio('p99')}, req/s {ratio('rps')}, "
          f"bytes read {ratio('read')}, loads {ratio('loads')}, peak accelerator {ratio('peak')}")  # fmt: skip
    if ours["on_host"]:
        print(f"memplan ran {ours['on_host'] / requests:.0%} of the forwards from the host tier (the GPU held "
              "models in use): here the simulated GPU computes on the CPU as the host does, so those cost "
              "what a GPU forward costs; on a real GPU they would run on the CPU. --gpu-only waits for the GPU.")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="4 small models, 100 requests (smoke run)")
    parser.add_argument(
        "--model-dir", type=Path, default=Path(tempfile.gettempdir()) / "memplan-bench-serving"
    )
    parser.add_argument(
        "--runs", type=int, default=3, help="runs of the three policies, interleaved (medians)"
    )
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=0, help="trace length (0: the scale's, 2,000)")
    parser.add_argument(
        "--no-admission",
        action="store_true",
        help="memplan promotes on every use (the manager's default; here admission=True)",
    )
    parser.add_argument(
        "--drop",
        action="store_true",
        help="memplan may drop a model rather than demote it (RetentionPolicy.drop)",
    )
    parser.add_argument(
        "--policies",
        default=",".join(POLICIES),
        help="which to replay (comma-separated; ratios need the first two)",
    )
    parser.add_argument("--gpu-only", action="store_true", help="memplan runs every forward on the GPU tier")
    parser.add_argument("--ollama-max-loaded", type=int, default=0, help="keep-alive's model cap (0: none)")
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    runs = 1 if args.quick else args.runs
    root = args.model_dir.with_name(args.model_dir.name + ("-quick" if args.quick else ""))
    paths = write_models(root, size.sizes_mib, size.hidden, size.vocab)
    checkpoints = {n: memplan.with_computed_buffers(memplan.inspect(p)) for n, p in paths.items()}
    total = sum(c.nbytes for c in checkpoints.values())
    trace = zipf_trace(list(paths), args.requests or size.requests, seed=1)
    generator = torch.Generator().manual_seed(0)
    inputs = [torch.randint(0, size.vocab, (1, TOKENS), generator=generator) for _ in trace]
    print(f"models: {len(paths)} in {root}, {mib(min(c.nbytes for c in checkpoints.values()))} to "
          f"{mib(max(c.nbytes for c in checkpoints.values()))}, {total / 2**30:.2f} GiB in all")  # fmt: skip
    print(f"tiers: gpu {size.gpu} (simulated), host {size.host}, disk; trace: {len(trace)} requests "
          f"(Zipf s=1.1) of {TOKENS} tokens from {args.clients} clients; medians of {runs} run(s), interleaved")  # fmt: skip
    chosen = tuple(p for p in POLICIES if p in args.policies.split(","))
    results: dict[str, list[dict[str, Any]]] = {p: [] for p in chosen}
    for run in range(runs):
        for policy in chosen[run % len(chosen) :] + chosen[: run % len(chosen)]:
            results[policy].append(one_run(policy, paths, checkpoints, size, trace, inputs, args))
    digests = {p: r[-1]["digests"] for p, r in results.items()}
    if len({tuple(d) for d in digests.values()}) != 1:
        raise SystemExit("the policies computed different logits for the same requests")
    table(results, len(trace))
    print("every request's logits identical under the three policies: yes")


if __name__ == "__main__":
    main()
