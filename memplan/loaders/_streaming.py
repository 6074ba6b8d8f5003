"""Streamed execution: modules whose weights live elsewhere visit the compute device for their forward.

A :class:`ModuleStreamer` owns an arena of ``depth + 1`` reusable slots on the compute device,
each as large as the largest streamed module. A forward pre-hook binds module *i* to its slot
(waiting for it if the prefetch thread is not done) and starts filling slots for the next
modules; a forward post-hook gives module *i*'s slot back. So at most ``depth + 1`` modules'
weights are on the compute device at once, and reads overlap compute.

On CUDA the host side is pinned and copies run on a side stream; on the host (and on simulated
accelerators, whose data lives on the host) the thread reads or copies straight into the slot.

Between forwards the streamed modules hold meta placeholders and the streamer keeps their weights
(source "host") or reads them from the checkpoint's files (source "disk"). A residency manager
that registers the model takes charge of the kept ones (:meth:`ModuleStreamer.kept_weights`) and
hands the streamer the copies its tiers hold, or meta tensors while they are away
(:meth:`ModuleStreamer.keep`).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from memplan._threads import after_all
from memplan.gpu import Device
from memplan.loaders._materialize import Binding, Materializer, set_tensor
from memplan.loaders._placement import Placement
from memplan.planner import SLOT_ALIGN

if TYPE_CHECKING:
    import torch
    from torch import nn

ARENA = "streaming arena"  # the charge a streamer keeps for as long as it runs

__all__ = ["ModuleStreamer", "StreamStats"]


@dataclass
class StreamStats:
    """What streaming did: modules brought in, bytes moved, and how much of it the forward waited for."""

    fetches: int = 0
    bytes_moved: int = 0
    fetch_seconds: float = 0.0
    wait_seconds: float = 0.0

    @property
    def hidden_fraction(self) -> float:
        """Share of fetch time that overlapped compute (1.0: the forward never waited)."""
        if self.fetch_seconds <= 0:
            return 1.0
        return max(0.0, 1.0 - self.wait_seconds / self.fetch_seconds)


@dataclass
class _Streamed:
    module: nn.Module
    bindings: list[Binding]
    offsets: list[int]
    nbytes: int
    meta: list[torch.Tensor]  # what each binding holds while the module is away
    dtypes: list[torch.dtype]  # each binding's dtype in the slot
    file_dtypes: list[torch.dtype]
    host: dict[str, torch.Tensor] = field(default_factory=dict)  # source="host": the weights, in dtype


def _weight_owners(item: _Streamed) -> list[nn.Module]:
    """The modules inside ``item``'s module that own its weights (not the module itself)."""
    owners = {id(module): module for b in item.bindings for module, _ in b.owners}
    owners.pop(id(item.module), None)
    return list(owners.values())


def _layout(bindings: list[Binding], dtypes: list[torch.dtype]) -> list[int]:
    """Each binding's offset in a slot (aligned), and last the slot size the module needs."""
    offsets, at = [], 0
    for b, dtype in zip(bindings, dtypes, strict=True):
        offsets.append(at)
        size = dtype.itemsize * math.prod(b.shape)
        at += -(-size // SLOT_ALIGN) * SLOT_ALIGN
    offsets.append(at)
    return offsets


class ModuleStreamer:
    """Streams ``modules`` (in execution order) through ``device`` with ``depth`` fetches in flight."""

    def __init__(
        self,
        modules: list[tuple[nn.Module, list[Binding]]],
        materializer: Materializer,
        placement: Placement,
        device: Device,
        *,
        depth: int,
        source: str,
    ) -> None:
        import torch

        self.materializer, self.device, self.depth, self.source = materializer, device, depth, source
        self.stats = StreamStats()
        self._items = []
        for module, binds in modules:
            files = [self._file_dtype(b.source) for b in binds]
            # Floating weights run in the compute dtype, integer tensors keep the file's, buffers their own.
            dtypes = [
                b.dtype or (materializer.dtype if d.is_floating_point else d)
                for b, d in zip(binds, files, strict=True)
            ]
            offsets = _layout(binds, dtypes)
            meta = [getattr(b.owners[0][0], b.owners[0][1]) for b in binds]
            self._items.append(_Streamed(module, binds, offsets[:-1], offsets[-1], meta, dtypes, files))
        self._index = {id(item.module): i for i, item in enumerate(self._items)}
        self._by_name = {b.name: i for i, item in enumerate(self._items) for b in item.bindings}
        slot_bytes = max((item.nbytes for item in self._items), default=0)
        where = placement.torch_device(device)
        self._cuda = where.startswith("cuda")
        slots = depth + 1
        placement.charge(device, slots * slot_bytes, ARENA)
        self._slots = [torch.empty(slot_bytes, dtype=torch.uint8, device=where) for _ in range(slots)]
        self._free: deque[int] = deque(range(slots))
        self._inflight: dict[int, tuple[int, Future[float]]] = {}
        self._fills: set[Future[float]] = set()  # every fill not yet done, taken or not
        self._fills_lock = threading.Lock()
        self._bound: dict[int, int] = {}
        self._released: dict[int, Any] = {}  # slot -> CUDA event recorded when its module finished
        self._lock = threading.Lock()
        self._forward_lock = threading.Lock()
        self._forward_owner: int | None = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="memplan-prefetch")
        self._stream = torch.cuda.Stream(device=where) if self._cuda else None  # type: ignore[no-untyped-call]
        if source == "host":
            self._load_host_copies(placement)
        # always_call: a forward that raises still gives its slot back (see _enter for Ctrl-C).
        self._handles = [
            h
            for item in self._items
            for h in (
                item.module.register_forward_pre_hook(self._pre_hook),
                item.module.register_forward_hook(self._post_hook, always_call=True),
            )
        ]
        self._handles += [
            part.register_forward_pre_hook(self._part_pre_hook(index))
            for index, item in enumerate(self._items)
            for part in _weight_owners(item)
        ]

    # --- set-up ---------------------------------------------------------------------------

    def _file_dtype(self, name: str) -> torch.dtype:
        from memplan.loaders._reader import torch_dtype

        info = self.materializer.reader.info(name)
        return torch_dtype(info.dtype, tensor=name, file=info.file)

    def _load_host_copies(self, placement: Placement) -> None:
        """source="host": every streamed weight read once into host RAM (pinned on CUDA), charged there."""
        cpu = Device("cpu")
        for item in self._items:
            for b in item.bindings:
                tensor = self.materializer.host_tensor(b)
                placement.charge(cpu, tensor.numel() * tensor.element_size(), b.name)
                item.host[b.name] = tensor.pin_memory() if self._cuda else tensor

    def begin_forward(self, model: nn.Module, args: Any) -> None:
        """One forward through the model at a time: forwards on two threads would bind one slot
        each other's modules (a forward pre-hook of the model). A forward this thread left by a
        BaseException (Ctrl-C: torch runs always_call hooks for an Exception only) still holds it."""
        me = threading.get_ident()
        if self._forward_owner != me:
            self._forward_lock.acquire()
            self._forward_owner = me

    def end_forward(self, model: nn.Module, args: Any, output: Any) -> None:
        if self._forward_owner == threading.get_ident():
            self._forward_owner = None
            self._forward_lock.release()

    @property
    def slot_bytes(self) -> int:
        return self._slots[0].numel() if self._slots else 0

    def fill_state_dict(self, model: nn.Module, state: dict[str, Any], prefix: str, metadata: Any) -> None:
        """Between forwards a streamed module holds placeholders: give ``state_dict`` its real
        weights from the source (host copies or the checkpoint), as a full load would hold them."""
        names = {id(module): name for name, module in model.named_modules()}
        for item in self._items:
            for b, dtype in zip(item.bindings, item.dtypes, strict=True):
                for module, attr in b.owners:
                    owner = names.get(id(module))
                    key = prefix + (f"{owner}.{attr}" if owner else attr)
                    if owner is not None and key in state and state[key].is_meta:
                        source = (
                            item.host[b.name] if self.source == "host" else self.materializer.host_tensor(b)
                        )
                        state[key] = source.to(dtype)

    # --- the weights it keeps (a residency manager may take charge of them) -------------------

    def kept_weights(self) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """Each streamed weight by the model's name for it: the placeholder its module holds
        between forwards, and the weight kept for it in memory (source "host"), or None where
        forwards read it from the checkpoint's files (source "disk"). Between forwards, so a
        module its parts brought in (see :meth:`_part_pre_hook`) gives its slot back first."""
        self._settle()
        return {
            b.name: (placeholder, item.host.get(b.name))
            for item in self._items
            for b, placeholder in zip(item.bindings, item.meta, strict=True)
        }

    def keep(self, weights: Mapping[str, torch.Tensor]) -> None:
        """Keep ``weights`` (by name; each one :meth:`kept_weights` gave a tensor for) instead of
        the ones kept so far: forwards copy them in from here on (meta tensors: no forward runs
        until the next call). Waits for the fills under way: none reads a weight let go of."""
        with self._fills_lock:
            fills = list(self._fills)
        wait(fills)
        for name, tensor in weights.items():
            item = self._items[self._by_name[name]]
            if name not in item.host:
                raise KeyError(f"{name!r} is read from the checkpoint's files, not kept in memory")
            item.host[name] = tensor

    def _settle(self) -> None:
        """Unbind what is bound outside a forward: modules brought in by their parts. A forward
        under way on another thread keeps its own (this thread's is one a Ctrl-C left)."""
        ours = self._forward_owner == threading.get_ident()
        if not ours and not self._forward_lock.acquire(blocking=False):
            return
        try:
            with self._lock:
                bound = list(self._bound)
            for index in bound:
                self._unbind(index)
        finally:
            if not ours:
                self._forward_lock.release()

    # --- filling slots (prefetch thread) -----------------------------------------------------

    def _views(self, item: _Streamed, slot: int) -> list[torch.Tensor]:
        flat, views = self._slots[slot], []
        for b, offset, dtype in zip(item.bindings, item.offsets, item.dtypes, strict=True):
            size = math.prod(b.shape) * dtype.itemsize
            views.append(flat[offset : offset + size].view(dtype).view(b.shape))
        return views

    def _fill(self, index: int, slot: int) -> float:
        import torch

        start = time.perf_counter()
        item = self._items[index]
        event = self._released.pop(slot, None)
        if event is not None:
            event.synchronize()  # the compute stream is done reading this slot's previous module
        # Reads land in the slot behind autograd's back: a graph that kept the views of the slot's
        # last module would compute its backward with these weights. Bumped before the first byte
        # lands and after the last, it raises instead.
        torch.autograd.graph.increment_version(self._slots[slot])
        direct = []
        for b, view, file_dtype in zip(item.bindings, self._views(item, slot), item.file_dtypes, strict=True):
            if self._reads_straight_in(b, view, file_dtype):
                direct.append((self.materializer.reader.info(b.source), view))
            else:
                self._copy_in(item, b, view)
        self.materializer.reader.read_all_into(direct)
        if self._stream is not None:
            self._stream.synchronize()
        torch.autograd.graph.increment_version(self._slots[slot])
        seconds = time.perf_counter() - start
        with self._lock:
            self.stats.fetches += 1
            self.stats.bytes_moved += item.nbytes
            self.stats.fetch_seconds += seconds
        return seconds

    @property
    def reads_files(self) -> bool:
        """Whether forwards read the checkpoint's files (source "disk"); from "host" they copy
        the host copies made at load, and the files are not needed after it."""
        return self.source == "disk"

    def _reads_straight_in(self, b: Binding, view: torch.Tensor, file_dtype: torch.dtype) -> bool:
        """The file's bytes are the slot's: read from disk into the slot, no copy on the way."""
        return self.source == "disk" and not self._cuda and view.dtype == file_dtype and b.conversion is None

    def _copy_in(self, item: _Streamed, b: Binding, view: torch.Tensor) -> None:
        import torch

        src = item.host[b.name] if self.source == "host" else self.materializer.host_tensor(b)
        if self._stream is None:
            view.copy_(src)
            return
        with torch.cuda.stream(self._stream):
            view.copy_(src, non_blocking=True)

    # --- hooks (compute thread) ---------------------------------------------------------------

    def _schedule(self, index: int) -> None:
        """Start fetching ``index`` into a free slot; caller holds the lock."""
        if index in self._inflight or index in self._bound or not self._free:
            return
        slot = self._free.popleft()
        future = self._pool.submit(self._fill, index, slot)
        self._inflight[index] = (slot, future)
        with self._fills_lock:
            self._fills.add(future)  # until done, whoever took it or gave its slot up
        future.add_done_callback(self._filled)

    def _prefetch(self, index: int) -> None:
        """Start fetching module ``index`` ahead of its use; caller holds the lock. Past the last
        module that is the next forward's first: not while autograd records this one, since a
        backward would read slots a fill overwrites behind its back (a refill within the forward
        bumps the slot's version first, and the backward raises)."""
        import torch

        if index >= len(self._items) and torch.is_grad_enabled():
            return
        self._schedule(index % len(self._items))

    def _filled(self, future: Future[float]) -> None:
        with self._fills_lock:  # not self._lock: this may run in _schedule, which holds it
            self._fills.discard(future)

    def _take(self, index: int) -> int:
        """The slot ``index`` is (being) filled into, bound to it; waits for the fill."""
        with self._lock:
            if index not in self._inflight and not self._free:
                # Used out of order: the oldest prefetch gives its slot up. Fills run one at a
                # time on one thread, so the fill queued into that slot starts after this one.
                slot, _ = self._inflight.pop(next(iter(self._inflight)))
                self._free.append(slot)
            self._schedule(index)
            slot, future = self._inflight.pop(index)
            self._bound[index] = slot  # from here on, whatever interrupts us, a later forward reclaims it
        start = time.perf_counter()
        future.result()
        with self._lock:
            self.stats.wait_seconds += time.perf_counter() - start
        return slot

    def _pre_hook(self, module: nn.Module, args: Any) -> None:
        self._enter(self._index[id(module)])

    def _part_pre_hook(self, index: int) -> Callable[[nn.Module, Any], None]:
        """For a module inside streamed module ``index``: a model may run the streamed module's
        ``forward`` without calling it (SqueezeBERT calls ``layer.forward(...)``), so its own hooks
        never run; its parts are still called, and bring its weights in. They stay until the next
        streamed module comes in."""

        def hook(part: nn.Module, args: Any) -> None:
            if index not in self._bound:
                self._enter(index)

        return hook

    def _enter(self, index: int) -> None:
        """Bind module ``index`` to its slot and start the next fetches."""
        with self._lock:
            stale = [left for left in self._bound if left != index]
        # Streamed modules do not nest, so anything else bound now was left by a forward that raised
        # a BaseException (Ctrl-C: torch runs always_call hooks for an Exception only), or was
        # brought in by its parts (see _part_pre_hook).
        for left in stale:
            self._unbind(left)
        if index in self._bound:
            return
        slot = self._take(index)
        item = self._items[index]
        # requires_grad as from_pretrained leaves it: it picks matmul's kernel even under no_grad.
        for b, view in zip(item.bindings, self._views(item, slot), strict=True):
            set_tensor(b, view, trainable=self.materializer.trainable)
        with self._lock:
            for step in range(1, self.depth + 1):
                self._prefetch(index + step)

    def _post_hook(self, module: nn.Module, args: Any, output: Any) -> None:
        self._unbind(self._index[id(module)])

    def _unbind(self, index: int) -> None:
        """Give module ``index``'s weights back their placeholders and its slot to the free list."""
        import torch

        item = self._items[index]
        for b, placeholder in zip(item.bindings, item.meta, strict=True):
            set_tensor(b, placeholder)
        with self._lock:
            slot = self._bound.pop(index, None)
            if slot is None:
                return
            if self._cuda:
                event = torch.cuda.Event()  # type: ignore[no-untyped-call]
                event.record(torch.cuda.current_stream(self._slots[slot].device))
                self._released[slot] = event
            self._free.append(slot)
            self._prefetch(index + self.depth)

    def close(self) -> None:
        """Remove the hooks and stop the prefetch thread; once the fills under way are done,
        close the checkpoint's descriptors (the arena goes with the placement). Waits for
        nothing: a garbage collection unloading the model may run this on the prefetch thread."""
        for handle in self._handles:
            handle.remove()
        self._pool.shutdown(wait=False, cancel_futures=True)
        with self._fills_lock:
            fills = list(self._fills)
        running = [future for future in fills if not future.cancel()]  # cancel() runs _filled
        # The streamer owns the load's reader: it closes once the fills under way are done.
        after_all(running, self.materializer.reader.close)
