"""One executor per strategy, registered by the strategy's type.

Adding a strategy is one new module here: a subclass of :class:`Executor` decorated with
:func:`register_executor`, imported below so that it registers.
"""

from memplan.loaders.executors import full, quantized, sharded, streamed
from memplan.loaders.executors.base import Build, DeviceFor, Executor, Rename, executor_for, register_executor

__all__ = ["Build", "DeviceFor", "Executor", "Rename", "executor_for", "register_executor"]

del full, quantized, sharded, streamed  # imported to register, not to be used from here
