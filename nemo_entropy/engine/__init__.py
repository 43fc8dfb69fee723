"""The embedded local engine: a small, real GRPO trainer on CPU with the same loss, selection and entropy
code as the NeMo-RL path (tiny transformers Qwen2 policy, generated arithmetic task, DP x vocab-parallel TP
over gloo, checkpoints, resume, pre-emption, metrics and plots).

Public entry points: :func:`run_local` (what ``nemo-entropy train`` calls for ``backend: local``),
:func:`validate_engine_config`, :data:`REQUEUE_EXIT_CODE`. Heavy imports (transformers, matplotlib) happen where they are used.
"""

from .launch import run_local
from .preemption import REQUEUE_EXIT_CODE
from .settings import validate_engine_config

__all__ = ["run_local", "validate_engine_config", "REQUEUE_EXIT_CODE"]
