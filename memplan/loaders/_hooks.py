"""The forward hooks a load puts on its model, kept so that they can all be taken off again."""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.hooks import RemovableHandle

    from memplan.loaders._streaming import ModuleStreamer

__all__ = ["Hooks"]


class Hooks:
    """The handles of one load's hooks, and the streamer that owns the rest."""

    def __init__(self) -> None:
        self.handles: list[RemovableHandle] = []
        self.streamer: ModuleStreamer | None = None

    def add_streamer(self, model: nn.Module, streamer: ModuleStreamer) -> None:
        """Own ``streamer``; ``model.state_dict()`` (and so ``save_pretrained``) then reads the
        streamed modules' weights from their source instead of their placeholders."""
        self.streamer = streamer
        # torch marks the hook it is given, which a bound method cannot take: a partial can
        hook = functools.partial(type(streamer).fill_state_dict, streamer)
        self.handles.append(model.register_state_dict_post_hook(hook))  # type: ignore[no-untyped-call]
        self.handles.append(model.register_forward_pre_hook(streamer.begin_forward))
        self.handles.append(model.register_forward_hook(streamer.end_forward, always_call=True))

    def remove(self) -> None:
        """Take every hook off and stop the streamer's prefetch thread. Idempotent."""
        handles, self.handles = self.handles, []
        for handle in handles:
            handle.remove()
        if self.streamer is not None:
            self.streamer.close()
