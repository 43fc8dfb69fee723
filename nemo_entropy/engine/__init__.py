"""The embedded local engine: a small, real GRPO trainer on CPU with the same loss, selection and entropy
code as the NeMo-RL path (tiny transformers Qwen2 policy, generated arithmetic task, DP x vocab-parallel TP
over gloo, checkpoints, resume, pre-emption, metrics and plots).

Public entry points: :func:`run_local` (what ``nemo-entropy train`` calls for ``backend: local``),
:func:`validate_engine_config`, :data:`REQUEUE_EXIT_CODE`. Heavy imports (transformers) happen lazily.
"""

from .preemption import REQUEUE_EXIT_CODE

__all__ = ["run_local", "validate_engine_config", "REQUEUE_EXIT_CODE"]


def run_local(cfg, **kwargs):
    """See :func:`nemo_entropy.engine.launch.run_local`."""
    from .launch import run_local as _run_local

    return _run_local(cfg, **kwargs)


def validate_engine_config(cfg):
    """See :func:`nemo_entropy.engine.settings.validate_engine_config`."""
    from .settings import validate_engine_config as _validate

    return _validate(cfg)
