"""The exceptions memplan raises: one tree, each with the fields a caller needs to act.

Library errors (torch OOM, OSError, botocore) are mapped to these at the boundary where they
happen, so callers catch ``memplan.MemplanError`` subclasses and read fields, never parse text.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from memplan._sizes import format_size

if TYPE_CHECKING:
    from memplan.gpu.device import Device

__all__ = [
    "AlreadyManaged",
    "CheckpointError",
    "ContextTooLong",
    "DeviceOutOfMemory",
    "DoesNotFit",
    "EntryExists",
    "EntryInUse",
    "ForwardCheckFailed",
    "InvalidAddress",
    "InvalidDevice",
    "InvalidEntry",
    "InvalidInventory",
    "InvalidOption",
    "InvalidSize",
    "ManagerClosed",
    "MemplanError",
    "MissingDependency",
    "ModelNotFound",
    "NoSuchEntry",
    "PinViolation",
    "PlanFormatError",
    "PlanMismatch",
    "RemoteTierError",
    "SimulationSpecError",
    "TierError",
    "TierFull",
    "UnsupportedQuantization",
]


class MemplanError(Exception):
    """Base of every error memplan raises on purpose."""


class InvalidSize(MemplanError):
    """A byte size that cannot be parsed: negative, NaN, unknown unit or garbage."""

    def __init__(self, value: object, reason: str) -> None:
        self.value = value
        self.reason = reason
        super().__init__(f"invalid size {value!r}: {reason}")


class InvalidDevice(MemplanError):
    """A device name or (kind, index) pair memplan does not know."""

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f"invalid device {text!r}: {reason}")


class InvalidOption(MemplanError):
    """A setting given a value it cannot take: ``option`` (as a person names it, e.g.
    ``"priority"``) must ``requirement`` (e.g. ``"be > 0"``), and ``value`` does not."""

    def __init__(self, option: str, value: object, requirement: str) -> None:
        self.option = option
        self.value = value
        self.requirement = requirement
        super().__init__(f"{option} must {requirement}, not {value!r}")


class InvalidInventory(MemplanError):
    """Memory figures that cannot describe a machine: an unknown source, a negative byte count,
    more free than total, a device listed twice. ``device`` is the device the figures are for
    (None for a figure of the whole inventory); ``reason`` says what is wrong."""

    def __init__(self, reason: str, device: Device | None = None) -> None:
        self.device = device
        self.reason = reason
        super().__init__(f"{device}: {reason}" if device is not None else reason)


class SimulationSpecError(MemplanError):
    """A malformed ``MEMPLAN_SIMULATE`` spec; ``entry`` is the offending entry."""

    def __init__(self, spec: str, entry: str, reason: str) -> None:
        self.spec = spec
        self.entry = entry
        self.reason = reason
        super().__init__(
            f"bad simulated-device spec entry {entry!r}: {reason} "
            f"(expected KIND[:INDEX]=TOTAL[@FREE], e.g. 'cuda:0=24GiB@20GiB,cpu=64GiB')"
        )


class CheckpointError(MemplanError):
    """A checkpoint file that is missing, unreadable or malformed."""

    def __init__(self, file: str | os.PathLike[str], reason: str, tensor: str | None = None) -> None:
        file = os.fspath(file)
        self.file = file
        self.tensor = tensor
        self.reason = reason
        where = f"{file}, tensor {tensor!r}" if tensor is not None else file
        super().__init__(f"{where}: {reason}")


class ModelNotFound(CheckpointError):
    """A repo id that is neither in the local cache nor downloadable now."""

    def __init__(self, repo_id: str, reason: str) -> None:
        self.repo_id = repo_id
        super().__init__(repo_id, reason)


class DoesNotFit(MemplanError):
    """No strategy fits: ``needed`` bytes on ``device`` where ``available`` are free."""

    def __init__(
        self, needed: int, available: int, device: Device | None, detail: str = "", plan: Any = None
    ) -> None:
        self.needed = needed
        self.available = available
        self.device = device
        self.detail = detail
        self.plan = plan  # the memplan.Plan with every strategy's shortfall, when the planner raised this
        if device is None and not needed:  # no strategy applied: the detail says why, not a 0 B shortfall
            super().__init__(detail or "no strategy applies")
            return
        where = str(device) if device is not None else "any device"
        msg = f"needs {format_size(needed)}, {where} has {format_size(available)} available"
        super().__init__(f"{msg}; {detail}" if detail else msg)


class DeviceOutOfMemory(MemplanError):
    """An allocation of ``requested`` bytes on ``device`` failed (real or simulated)."""

    def __init__(self, device: Device, requested: int, available: int | None = None) -> None:
        self.device = device
        self.requested = requested
        self.available = available
        room = f", {format_size(available)} left" if available is not None else ""
        super().__init__(f"{device} is out of memory: asked for {format_size(requested)}{room}")


class PinViolation(MemplanError):
    """A request that could only be met by moving a pinned entry."""

    def __init__(self, key: str, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"entry {key!r} is pinned: {reason}")


class EntryInUse(MemplanError):
    """The entry is leased, or needed by a resident entry, so it cannot be moved or removed."""

    def __init__(self, entry: str, reason: str) -> None:
        self.entry = entry
        self.reason = reason
        super().__init__(f"entry {entry!r} is in use: {reason}")


class NoSuchEntry(MemplanError):
    """A residency manager was asked about ``entry``, which is not registered with it."""

    def __init__(self, entry: str) -> None:
        self.entry = entry
        super().__init__(f"no entry named {entry!r} is registered")


class InvalidEntry(MemplanError):
    """What was registered with a residency manager cannot be an entry: ``reason`` says why."""

    def __init__(self, entry: str, reason: str) -> None:
        self.entry = entry
        self.reason = reason
        super().__init__(f"cannot register {entry!r}: {reason}")


class EntryExists(InvalidEntry):
    """A residency manager has an entry (or a model added by name) called ``entry`` already."""

    def __init__(self, entry: str) -> None:
        super().__init__(entry, "an entry of that name is already registered")


class ManagerClosed(InvalidEntry):
    """A residency manager was asked to ``what`` entry ``entry`` after :meth:`close` began."""

    def __init__(self, entry: str, what: str) -> None:
        self.what = what
        MemplanError.__init__(self, f"cannot {what} {entry!r}: the residency manager is closed")
        self.entry, self.reason = entry, "the manager is closed"


class AlreadyManaged(MemplanError):
    """A module or tensor registered while already under a residency manager's charge, as part
    of entry ``owner``: two entries moving one tensor would break each other's leases."""

    def __init__(self, entry: str, owner: str, tensor: str) -> None:
        self.entry = entry
        self.owner = owner
        self.tensor = tensor
        super().__init__(
            f"cannot register {entry!r}: {tensor!r} already belongs to entry {owner!r}; "
            "register each module once (or unregister the other first)"
        )


class TierError(MemplanError):
    """A tier operation failed; ``tier`` and ``key`` say where."""

    def __init__(self, tier: str, key: str | None, reason: str) -> None:
        self.tier = tier
        self.key = key
        self.reason = reason
        where = f"tier {tier!r}" + (f", key {key!r}" if key is not None else "")
        super().__init__(f"{where}: {reason}")


class TierFull(TierError):
    """A tier has no room for ``needed`` bytes; ``available`` were free. Nothing was stored."""

    def __init__(self, tier: str, key: str | None, needed: int, available: int) -> None:
        self.needed = needed
        self.available = available
        super().__init__(tier, key, f"needs {format_size(needed)}, {format_size(available)} free")


class MissingDependency(MemplanError):
    """An optional part was asked for whose package is not installed."""

    def __init__(self, package: str, extra: str, feature: str) -> None:
        self.package = package
        self.extra = extra
        self.feature = feature
        super().__init__(f"{feature} needs {package}: pip install 'memplan[{extra}]'")


class RemoteTierError(TierError):
    """The remote tier gave up after its retries; the data stayed where it was."""


class PlanFormatError(MemplanError):
    """Plan JSON that is malformed, of an unknown version, or not a plan memplan wrote."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"not a memplan plan: {reason}")


class InvalidAddress(MemplanError):
    """A ``HOST:PORT`` that cannot be served on: malformed, or refused by the OS (in use, privileged)."""

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(f"cannot serve at {text!r}: {reason}")


class PlanMismatch(MemplanError):
    """A plan that does not belong to this load: made for another checkpoint, or asked to carry out
    another workload or policy than it was made for. ``path`` is the checkpoint being loaded."""

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class UnsupportedQuantization(CheckpointError):
    """A checkpoint saved quantized with a method memplan cannot load (``method``: gptq, awq, ...)."""

    def __init__(self, file: str | os.PathLike[str], method: str) -> None:
        self.method = method
        super().__init__(
            file,
            f"quantized with {method}, which memplan cannot load; load it with transformers' from_pretrained",
        )


class ContextTooLong(MemplanError):
    """A workload asks for a longer context than the model's position embeddings cover."""

    def __init__(self, model: str, context: int, limit: int) -> None:
        self.model = model
        self.context = context
        self.limit = limit
        super().__init__(
            f"{model} takes at most {limit} tokens (the max positions in its config.json); a context "
            f"of {context} tokens is longer: ask for {limit} or fewer"
        )


class ForwardCheckFailed(MemplanError):
    """The test forward after a load failed or gave non-finite outputs; ``reason`` says which."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"the loaded model's test forward failed: {reason}")
