"""Shared by the benchmarks: random-init Llama checkpoints, cold page cache, fresh-process workers."""

from __future__ import annotations

import json
import math
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

# ~1.1B parameters: the "~1B" size. A small vocabulary keeps embeddings from dominating,
# so the streamed budget is spent on layers, as it would be for a larger model.
LLAMA_1B = dict(
    hidden_size=2048, intermediate_size=5632, num_hidden_layers=24, num_attention_heads=32,
    num_key_value_heads=4, vocab_size=8192, max_position_embeddings=2048,
)  # fmt: skip
LLAMA_100M = dict(
    hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
    num_key_value_heads=4, vocab_size=8192, max_position_embeddings=2048,
)  # fmt: skip
LLAMA_QUICK = dict(
    hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=2, vocab_size=2048, max_position_embeddings=512,
)  # fmt: skip


_WRITTEN_HERE = ".written-by-memplan-benchmarks"  # marks a folder make_checkpoint may overwrite


def make_llama(path: Path, shape: dict[str, int], *, shard_bytes: int = 512 << 20) -> Path:
    """Random bf16 weights for a Llama ``shape``: :func:`make_checkpoint`."""
    from transformers import LlamaConfig

    return make_checkpoint(path, "LlamaForCausalLM", LlamaConfig(**shape), shard_bytes=shard_bytes)


def make_checkpoint(path: Path, model_class: str, config: Any, *, shard_bytes: int = 512 << 20) -> Path:
    """Random bf16 weights for transformers' ``model_class`` with ``config``, saved as sharded
    safetensors with an index, tied weights once (as save_pretrained saves them).

    Tensors are drawn shard by shard, so writing a 1B model never holds it whole in memory.
    Used as it is if ``path`` already holds a checkpoint of this config; written only into a new
    or empty folder, or one this function wrote before: any other folder is refused, never
    overwritten (``--model-dir`` pointed at a user's own model replaced it).
    """
    import torch
    import transformers
    from safetensors.torch import save_file

    config.dtype = "bfloat16"
    config.architectures = [model_class]  # as save_pretrained writes it: the class loads with its head
    if (path / "model.safetensors.index.json").exists() and _same_config(path, config):
        return path
    if path.exists() and any(path.iterdir()) and not (path / _WRITTEN_HERE).exists():
        raise SystemExit(
            f"{path} holds files this benchmark did not write and no checkpoint of its config: "
            "point --model-dir at a new folder (it is never overwritten)"
        )
    path.mkdir(parents=True, exist_ok=True)
    (path / _WRITTEN_HERE).touch()
    for stale in path.glob("*.safetensors"):  # an earlier config's shards, written here
        stale.unlink()
    with torch.device("meta"):
        model = getattr(transformers, model_class)(config)
    tied = set(model.all_tied_weights_keys)  # saved under the name they are tied to
    names = {k: tuple(v.shape) for k, v in model.state_dict().items() if k not in tied}
    generator = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shards: list[dict[str, Any]] = [{}]
    sizes = [0]
    for name, shape_ in names.items():
        nbytes = 2 * math.prod(shape_)
        if sizes[-1] and sizes[-1] + nbytes > shard_bytes:
            shards.append({})
            sizes.append(0)
        shards[-1][name] = shape_
        sizes[-1] += nbytes
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {name: _init(name, shape_, generator) for name, shape_ in shard.items()}
        save_file(tensors, path / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file))
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    config.save_pretrained(path)
    return path


def _init(name: str, shape: tuple[int, ...], generator: Any) -> Any:
    import torch

    if "norm" in name and name.endswith(".weight"):
        return torch.ones(shape, dtype=torch.bfloat16)
    return (torch.randn(shape, generator=generator) * 0.02).to(torch.bfloat16)


def _same_config(path: Path, config: Any) -> bool:
    saved = json.loads((path / "config.json").read_text())
    wanted = json.loads(config.to_json_string())
    ignored = {"transformers_version"}
    return {k: v for k, v in saved.items() if k not in ignored} == {
        k: v for k, v in wanted.items() if k not in ignored
    }


def drop_page_cache(path: Path, pattern: str = "*.safetensors") -> None:
    """Evict ``path``'s files (``pattern``) from the page cache (no root needed), so the next
    read is cold."""
    for file in sorted(path.glob(pattern)):
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def peak_rss() -> int:
    """This process's peak resident set, in bytes: its memory's high-water mark (VmHWM).

    Not ``getrusage``'s ru_maxrss: Linux carries that over fork and exec, so a worker started by a
    parent of 735 MiB reported 735 MiB whatever it loaded.
    """
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB, on Linux without /proc


def current_rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def run_worker(script: Path, *args: str) -> dict[str, Any]:
    """Run ``script --worker ...`` in a fresh interpreter (clean peak RSS), return its JSON line."""
    out = subprocess.run(
        [sys.executable, str(script), "--worker", *args], capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"
