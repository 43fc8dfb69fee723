"""Integrations with the frameworks we plug into: NeMo-RL (loss adapter, driver-side selection) and Megatron.

Nothing here imports NeMo-RL at module import time: NeMo-RL is imported lazily inside the functions that
need it, so the package stays importable (and testable) without it.
"""

from .driver_selection import BatchSelectionPolicy, attach_batch_selection, optimizer_step_slices
from .megatron import ParallelLayout, parallel_layout, select_in_worker
from .nemo_rl import EntropyControlLossFn, loss_config_from_nemo_rl

__all__ = [
    "EntropyControlLossFn",
    "loss_config_from_nemo_rl",
    "BatchSelectionPolicy",
    "attach_batch_selection",
    "optimizer_step_slices",
    "ParallelLayout",
    "parallel_layout",
    "select_in_worker",
]
