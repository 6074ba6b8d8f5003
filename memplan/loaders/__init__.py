"""Loading: carry a plan out with low peak memory, falling back to the next strategy on OOM.

Imports torch only when a load runs.
"""

from memplan.loaders._room import load_into_room
from memplan.loaders._skeleton import with_computed_buffers
from memplan.loaders.handle import ModelHandle, handle_of, remove_hooks
from memplan.loaders.load import load
from memplan.loaders.report import Fallback, LoadReport
from memplan.residency.models import register_model_loader

__all__ = [
    "Fallback",
    "LoadReport",
    "ModelHandle",
    "handle_of",
    "load",
    "remove_hooks",
    "with_computed_buffers",
]

register_model_loader(load_into_room)  # the residency manager loads models it was given by name
