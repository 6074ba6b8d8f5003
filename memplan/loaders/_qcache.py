"""Quantized weights kept for the next load: no bf16 read, no quantization the second time.

The first quantized load of a checkpoint writes each bitsandbytes layer's state as transformers
serialises it (``weight`` with ``SCB``, or the packed ``weight`` with its ``absmax``/``quant_map``
/nested states) to a :class:`~memplan.residency.tiers.disk.DiskTier`, so every file is written
to a temporary name, fsynced, renamed, and checksummed on read. A repeat load builds the layers
from those states, exactly as a pre-quantized checkpoint is loaded.

One folder per (checkpoint content, method, double quant, compute dtype, bitsandbytes version)
under ``<spill dir>/quantized``; folders not used for longest are removed when the cache grows past
its cap. ``MEMPLAN_QUANT_CACHE=0`` (or ``memplan.load(quant_cache=False)``) turns it off.

The content is what the checkpoint's files hold (:func:`~memplan._fileio.content_key`: each file's
device, inode, size, mtime and ctime, and a Hugging Face blob's sha256 name), never its shape
fingerprint: a fine-tune, another revision or another seed of one shape has other weights. The
files are looked at again when the load ends; if they changed meanwhile, the load fails (a
reading load) or leaves nothing behind (a writing one).
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections import deque
from concurrent.futures import Future
from pathlib import Path
from typing import TYPE_CHECKING

from memplan._bnb import import_bitsandbytes
from memplan._bnb_state import quantized_state
from memplan._fileio import content_identity, content_key
from memplan._io import Serial, Window, executor
from memplan._threads import settle
from memplan.errors import CheckpointError, TierError
from memplan.planner import READ_AHEAD_BYTES, Quantized

if TYPE_CHECKING:
    import torch
    from torch import nn

    from memplan.planner import Checkpoint
    from memplan.residency.tiers.disk import DiskTier

__all__ = ["QuantCache", "open_quant_cache"]

DEFAULT_CAP = 64 << 30
_MAX_PENDING = 16  # layers waiting to be written
_COMPLETE = "complete"  # a marker: every layer of the load was written
_CHANGED = "changed on disk during the load (rewritten or replaced): load the model again"


def _enabled() -> bool:
    return os.environ.get("MEMPLAN_QUANT_CACHE", "1").strip().lower() not in {"0", "false", "no", "off"}


def _root() -> Path:
    from memplan.gpu import default_spill_dir

    return default_spill_dir() / "quantized"


def open_quant_cache(
    checkpoint: Checkpoint, strategy: Quantized, dtype: str, *, window: Window, enabled: bool = True
) -> QuantCache | None:
    """The cache for this checkpoint's content and quantization, or None when caching is off or
    impossible; it reads ahead within ``window``, the checkpoint reader's."""
    if not enabled or not _enabled() or strategy.prequantized:
        return None
    bitsandbytes = import_bitsandbytes()
    files = checkpoint.files
    try:
        keys = [content_key(f) for f in files]
    except OSError as exc:
        raise CheckpointError(files[0], f"cannot stat: {exc.strerror}") from exc
    content = content_identity(keys)
    key = f"{content}/{strategy.method}/{strategy.double_quant}/{dtype}/{bitsandbytes.__version__}"
    folder = _root() / hashlib.sha256(key.encode()).hexdigest()[:24]
    try:
        return QuantCache(folder, window=window, files=dict(zip(files, keys, strict=True)))
    except TierError:  # an unwritable cache costs speed, never the load
        return None


class QuantCache:
    """The quantized states of one checkpoint's layers, by weight name."""

    def __init__(
        self, folder: Path, cap: int = DEFAULT_CAP, *, window: Window | int = READ_AHEAD_BYTES,
        files: dict[Path, str] | None = None,
    ) -> None:  # fmt: skip
        from memplan.residency.tiers.disk import DiskTier

        self.folder = folder
        self.files = files or {}  # the checkpoint's files and their content keys, as the load began
        self.complete = (folder / _COMPLETE).is_file()
        # Each file is fsynced by the background writer, where the wait overlaps the quantization
        # of later layers; one os.sync() before the marker left the load waiting for the disk to
        # write everything back (about 2 s of an 8 s int8 load of a 1B Llama).
        self.tier: DiskTier = DiskTier(folder)
        self.writes = 0  # layers written by this load
        self.failed = False
        self._writer = Serial()  # writes overlap the quantization of later layers, one at a time
        self._pending: deque[Future[None]] = deque()
        # Reads ahead run as jobs of the process's executor (a few layers at once), within the
        # checkpoint reader's window.
        self.window = window if isinstance(window, Window) else Window(window)
        self._stored: dict[str, list[str]] = {}  # weight -> its state's names, as found at start
        for key in self.tier.keys():  # noqa: SIM118 - a tier is not iterable
            weight, _, name = key.partition("/")
            self._stored.setdefault(weight, []).append(name)
        _evict(folder.parent, cap, keep=folder)

    def read_ahead(self, weights: list[str]) -> None:
        """Start reading the stored states of ``weights`` (the order :meth:`get` will ask for
        them), several layers in flight, within the window shared with the checkpoint reader: a
        repeat load that read one layer at a time left a cold disk at a third of its speed."""
        self.window.extend(self, (w for w in weights if self.has(w)), self._start, self._stored_bytes)

    def _start(self, weight: str) -> Future[dict[str, torch.Tensor] | None]:
        return executor().submit(self._read, weight)

    def _stored_bytes(self, weight: str) -> int:
        try:
            return sum(self.tier.size_of(f"{weight}/{name}") for name in self._stored[weight])
        except TierError:  # gone since start: get() will say so
            return 0

    def get(self, weight: str) -> dict[str, torch.Tensor] | None:
        """The stored state of ``weight``'s layer (names relative to the layer), or None."""
        if not self.has(weight):
            return None
        return self.window.take(self, weight, self._read)

    def _read(self, weight: str) -> dict[str, torch.Tensor] | None:
        try:
            return {name: self.tier.get(f"{weight}/{name}") for name in self._stored[weight]}
        except TierError:  # damaged: this layer is quantized again
            return None

    def has(self, weight: str) -> bool:
        return self.complete and "weight" in self._stored.get(weight, ())

    def put(self, weight: str, layer: nn.Module) -> None:
        """Keep ``layer``'s quantized state (as it serialises) under ``weight``, in the background."""
        if self.complete:
            return
        state = {name: t.detach().cpu() for name, t in quantized_state(layer).items()}
        while len(self._pending) >= _MAX_PENDING:  # bounds the host copies of GPU states in the queue
            self._pending.popleft().result()
        self._pending.append(self._writer.submit(lambda: self._write(weight, state)))

    def _write(self, weight: str, state: dict[str, torch.Tensor]) -> None:
        for name, tensor in state.items():
            key = f"{weight}/{name}"
            try:
                if key in self.tier:
                    self.tier.drop(key)
                self.tier.put(key, tensor)
            except TierError:
                self.failed = True  # the disk is full or read-only: this load just goes uncached
                return
        self.writes += 1

    def finish(self) -> None:
        """Mark the cache whole once every layer of a load that succeeded is written and fsynced:
        a load that failed or crashed part way leaves it unused, to be written again. A
        checkpoint that changed during the load is a :class:`CheckpointError`, and what this
        load wrote under its old content is removed."""
        self._drain()
        changed = self._changed_file()
        if changed is not None:
            if not self.complete:
                shutil.rmtree(self.folder, ignore_errors=True)
            raise CheckpointError(changed, _CHANGED)
        if not self.complete and self.writes and not self.failed:
            (self.folder / _COMPLETE).touch()
        os.utime(self.folder)  # recently used: evicted last

    def _changed_file(self) -> Path | None:
        for file, key in self.files.items():
            try:
                if content_key(file) == key:
                    continue
            except OSError:
                pass
            return file
        return None

    def _drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def close(self) -> None:
        """Drop the reads ahead and the writes not started; return once those under way have
        finished, before the tier closes. A load's own thread runs this, never a finalizer."""
        settle([*self.window.drop(self), *self._pending])
        self._pending.clear()
        self.tier.close()


def _evict(root: Path, cap: int, *, keep: Path) -> None:
    """Remove the least recently used folders until the cache is within ``cap`` bytes."""
    folders = [p for p in root.iterdir() if p.is_dir() and p != keep] if root.is_dir() else []
    sizes = {p: sum(f.stat().st_size for f in p.iterdir() if f.is_file()) for p in folders}
    total = sum(sizes.values()) + sum(f.stat().st_size for f in keep.iterdir() if f.is_file())
    for folder in sorted(folders, key=lambda p: p.stat().st_mtime):
        if total <= cap:
            return
        shutil.rmtree(folder, ignore_errors=True)
        total -= sizes[folder]
