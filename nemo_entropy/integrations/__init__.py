"""Integrations with the frameworks we plug into: NeMo-RL (loss adapter, the step plan built on the driver, its options) and Megatron.

Nothing here imports NeMo-RL at module import time: NeMo-RL is imported lazily inside the functions that
need it, so the package stays importable (and testable) without it.
"""

from .megatron import ParallelLayout, parallel_layout, plan_in_worker
from .nemo_rl import EntropyControlLossFn, loss_config_from_nemo_rl
from .nemo_rl_options import NemoRLOptions
from .step_plan import StepPlanPolicy, attach_step_plans, optimizer_step_slices

__all__ = [
    "EntropyControlLossFn",
    "loss_config_from_nemo_rl",
    "NemoRLOptions",
    "StepPlanPolicy",
    "attach_step_plans",
    "optimizer_step_slices",
    "ParallelLayout",
    "parallel_layout",
    "plan_in_worker",
]
