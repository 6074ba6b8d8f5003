"""``model.memplan``: the one object :func:`memplan.load` hangs on the model it returns."""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from memplan.loaders._hooks import Hooks
from memplan.loaders._placement import Placement
from memplan.loaders._streaming import ARENA
from memplan.loaders.report import LoadReport

if TYPE_CHECKING:
    from torch import nn

    from memplan.loaders._streaming import ModuleStreamer

__all__ = ["HANDLE_ATTRIBUTE", "ModelHandle", "handle_of", "remove_hooks"]

HANDLE_ATTRIBUTE = "memplan"  # the model attribute the handle is found under
# Names earlier releases set on the model, kept for one release: read them through the handle.
_DEPRECATED_ALIASES = {
    "memplan_report": "report",
    "memplan_placement": "placement",
    "memplan_hooks": "hooks",
    "memplan_streamer": "streamer",
}


@dataclass(eq=False)
class ModelHandle:
    """What a load did and holds for one model: ``model.memplan``.

    ``report`` says what was chosen and measured; ``placement`` holds the model's charges on the
    allocator; ``hooks`` are the hooks the load installed, ``streamer`` the one moving streamed or
    offloaded layers (None when nothing streams; a residency manager that registers the model
    takes charge of the weights it keeps in memory too). :meth:`close` gives it all back.
    """

    report: LoadReport
    placement: Placement
    hooks: Hooks
    _unload: weakref.finalize = field(repr=False)  # type: ignore[type-arg]

    @property
    def streamer(self) -> ModuleStreamer | None:
        return self.hooks.streamer

    def hand_over(self) -> None:
        """Give back the charges of the model's weights, which a residency manager that took
        the model in now charges on its tiers; the streaming arena the model's streamed or
        offloaded layers run through stays charged until :meth:`close`."""
        self.placement.release(keep=frozenset({ARENA}))

    def close(self) -> None:
        """Take the load's hooks off, stop its streamer and give its memory budget back.
        Idempotent; also runs when the model is garbage collected. Streamed layers no longer
        run afterwards (their placeholders stay)."""
        self._unload()

    def attach(self, model: nn.Module) -> None:
        """Hang this handle on ``model`` (and the deprecated names, for one release)."""
        setattr(model, HANDLE_ATTRIBUTE, self)
        for alias, name in _DEPRECATED_ALIASES.items():
            setattr(model, alias, getattr(self, name))


def handle_of(model: object) -> ModelHandle | None:
    """The handle :func:`memplan.load` hung on ``model``, or None for a model it did not load."""
    found = getattr(model, HANDLE_ATTRIBUTE, None)
    return found if isinstance(found, ModelHandle) else None


def remove_hooks(model: nn.Module) -> None:
    """Take off every hook :func:`memplan.load` put on ``model`` and stop its prefetch thread.

    Like accelerate's ``remove_hook_from_module``: a sharded model keeps its weights where they
    are; streamed layers keep the placeholders they hold between forwards, so they no longer run.
    The model's memory stays charged until :meth:`ModelHandle.close` or its collection.
    """
    handle = handle_of(model)
    if handle is not None:
        handle.hooks.remove()
