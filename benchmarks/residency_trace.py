"""Residency under a synthetic serving trace: GDSF (memplan's default) against LRU and Belady.

Many models (sizes 0.1 to 8 GiB, log-uniform) are requested with Zipf popularity. The real
ResidencyManager replays the trace over GPU / host / disk / remote tiers with realistic
capacities and bandwidths. Memory tiers stand in for the devices, with every size scaled down
by 2**20 (a GiB becomes a KiB), so the run moves real tensors yet takes seconds; bytes are
reported at full scale. Goal: GDSF moves <= 1.2x Belady's bytes and <= 0.7x LRU's.
"gdsf" is memplan's default (aging 0.5); "gdsf-classic" ages at 1.0 as in the paper.

Then the real disk tier: write and read a tensor through it (cold cache, checksum verified),
against a plain sequential write+fsync and read of the same bytes.

    python benchmarks/residency_trace.py
    python benchmarks/residency_trace.py --quick      # small trace, 64 MiB disk test (CI)
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import drop_page_cache

from memplan import Device, ResidencyManager, get_tier
from memplan.residency import GDSF, Belady, get_eviction

SCALE = 1 << 20  # full-scale bytes per simulated byte
GiB = 1 << 30
# name, capacity (GiB, full scale; None = unbounded), bandwidth into the tier above (bytes/s)
TIERS = [
    ("gpu", 24, 25e9, Device("cuda", 0)),
    ("host", 64, 10e9, Device("cpu")),
    ("disk", 128, 3e9, Device("disk")),
    ("remote", None, 0.5e9, Device("remote")),
]


def workload(models: int, requests: int, seed: int) -> tuple[dict[str, int], list[str]]:
    rnd = random.Random(seed)
    sizes = {f"m{i:03d}": int(GiB * 0.1 * (80 ** rnd.random())) for i in range(models)}
    names = list(sizes)
    rnd.shuffle(names)  # popularity independent of size
    weights = [1 / (rank + 1) for rank in range(models)]  # Zipf, s = 1
    return sizes, rnd.choices(names, weights=weights, k=requests)


def replay(policy: str, sizes: dict[str, int], trace: list[str]) -> dict[str, float]:
    tiers = [
        get_tier("memory", cap * GiB // SCALE if cap else None or 2**62, name=n, bandwidth=bw, device=d)
        for n, cap, bw, d in TIERS
    ]
    eviction = {
        "belady": lambda: Belady(trace),
        "gdsf-classic": lambda: GDSF(aging=1.0),
    }.get(policy, lambda: get_eviction(policy))()
    rm = ResidencyManager(tiers, eviction=eviction, dedup=False)
    for i, (name, nbytes) in enumerate(sizes.items()):
        rm.register(name, {"w": torch.full((nbytes // SCALE,), i % 251, dtype=torch.uint8)}, tier="remote")
    start = time.perf_counter()
    for name in trace:
        with rm.use(name):
            pass
    seconds = time.perf_counter() - start
    bandwidth = {n: bw for n, _, bw, _ in TIERS}
    moved = sum(m.nbytes for m in rm.moves) * SCALE if len(rm.moves) < rm.moves.maxlen else None
    stats = rm.stats()
    transfer_s = sum(
        nbytes * SCALE / min(bandwidth[a], bandwidth[b])
        for route, nbytes in stats.bytes_by_route.items()
        for a, b in [route.split("->")]
    )
    assert moved is None or moved == stats.bytes_moved * SCALE
    return {
        "bytes": stats.bytes_moved * SCALE,
        "transfer_s": transfer_s,
        "hit_rate": stats.hits / max(1, stats.hits + stats.misses),
        "replay_s": seconds,
    }


def trace_table(models: int, requests: int, seed: int) -> None:
    sizes, trace = workload(models, requests, seed)
    print(f"trace: {models} models, {sum(sizes.values()) / GiB:.0f} GiB in all, {requests} requests (Zipf)")
    tiers = ", ".join(f"{n} {c} GiB" if c else f"{n} unbounded" for n, c, _, _ in TIERS)
    print(f"tiers: {tiers}")
    results = {p: replay(p, sizes, trace) for p in ("gdsf", "gdsf-classic", "lru", "belady")}
    print(f"{'policy':12} {'moved':>10} {'transfer':>10} {'hit rate':>9} {'replay':>8}")
    for policy, r in results.items():
        print(
            f"{policy:12} {r['bytes'] / GiB:8.0f} GiB {r['transfer_s']:8.0f} s {r['hit_rate']:9.1%}"
            f" {r['replay_s']:6.2f} s"
        )
    gdsf, lru, belady = (results[p] for p in ("gdsf", "lru", "belady"))
    print(f"GDSF bytes / Belady: {gdsf['bytes'] / belady['bytes']:.2f}x (goal <= 1.2x)")
    print(f"GDSF bytes / LRU:    {gdsf['bytes'] / lru['bytes']:.2f}x (goal <= 0.7x)")


def timed(work: object) -> float:
    start = time.perf_counter()
    work()  # type: ignore[operator]
    return time.perf_counter() - start


def plain_write(path: Path, data: torch.Tensor) -> None:
    with open(path, "wb") as f:
        f.write(data.numpy().data)
        f.flush()
        os.fsync(f.fileno())


def plain_read(path: Path, nbytes: int) -> None:
    out = torch.empty(nbytes, dtype=torch.uint8)
    with open(path, "rb", buffering=0) as f:
        f.readinto(out.numpy().data)


def disk_once(nbytes: int, tier_first: bool) -> tuple[float, float, float, float]:
    """Seconds: tier write, plain write+fsync, tier read (cold), plain read (cold). Both files
    are written before either is read, and the reads go in the order given: the disk's speed
    drifts within a run, so the one read first is not always the same."""
    data = torch.randint(0, 256, (nbytes,), dtype=torch.uint8)
    with tempfile.TemporaryDirectory(prefix="memplan-bench-") as tmp:
        root = Path(tmp)
        tier = get_tier("disk", root / "spill")
        write_tier = timed(lambda: tier.put("t", data))
        (spill_file,) = (root / "spill").iterdir()
        plain = root / "plain.bin"
        write_plain = timed(lambda: plain_write(plain, data))
        reads = {"tier": lambda: tier.get("t"), "plain": lambda: plain_read(plain, nbytes)}
        files = {"tier": spill_file, "plain": plain}
        took = {}
        for who in ("tier", "plain") if tier_first else ("plain", "tier"):
            drop_page_cache(files[who])
            took[who] = timed(reads[who])
    return write_tier, write_plain, took["tier"], took["plain"]


def disk_table(nbytes: int, runs: int) -> None:
    """Medians of ``runs``, tier and plain file interleaved: this disk varies up to 2x run to run,
    so each ratio is the median of the ratios within a run (the two measured side by side)."""
    measured = [disk_once(nbytes, tier_first=run % 2 == 0) for run in range(runs)]
    write_tier, write_plain, read_tier, read_plain = (
        statistics.median(m[i] for m in measured) for i in range(4)
    )
    write_ratio = statistics.median(m[1] / m[0] for m in measured)
    read_ratio = statistics.median(m[3] / m[2] for m in measured)
    mb = nbytes / (1 << 20)
    print(
        f"\ndisk tier, {mb:.0f} MiB, cold cache, medians of {runs} (tier checksums on write, verifies on read):"
    )
    print(f"  write: tier {mb / write_tier:7.0f} MiB/s, plain write+fsync {mb / write_plain:7.0f} MiB/s"
          f"  -> {write_ratio:.2f}x")  # fmt: skip
    print(f"  read:  tier {mb / read_tier:7.0f} MiB/s, plain read        {mb / read_plain:7.0f} MiB/s"
          f"  -> {read_ratio:.2f}x")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small sizes for a CI smoke run")
    parser.add_argument("--only", choices=("trace", "disk"), help="run one of the two tables")
    parser.add_argument("--runs", type=int, default=3, help="disk tier runs (medians printed)")
    args = parser.parse_args()
    if args.only in (None, "trace"):
        models, requests = (30, 800) if args.quick else (120, 20_000)
        trace_table(models=models, requests=requests, seed=1)
    if args.only in (None, "disk"):
        disk_table(64 << 20 if args.quick else 1 << 30, 1 if args.quick else args.runs)


if __name__ == "__main__":
    main()
