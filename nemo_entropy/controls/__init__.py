"""The entropy controls, one module each, and their registry.

Adding a control: one module here (its config section, plan, per-token change, metrics, state; see
``base.Control``), one line in :data:`REGISTRY`, its rows in docs/config_reference.md, and its tests. Nothing else
changes: the config, the plan builder, the loss, the engine and the NeMo-RL adapter find it through the registry.
"""

from __future__ import annotations

import torch

from ..parallel import group_world_size
from .adaptive_entropy import AdaptiveEntropy
from .aent import AEnt
from .base import Control, ControlConfig, StepRecord, TokenBatch
from .clip_cov import ClipCov
from .entropy_advantage import EntropyAdvantage
from .entropy_bonus import EntropyBonus
from .entropy_pi import EntropyPI
from .gppo import GPPO
from .kl_cov import KLCov
from .ppo import PPO
from .top_entropy import TopEntropy
from .w_reinforce import WReinforce

REGISTRY: dict[str, type[Control]] = {cls.name: cls for cls in (
    PPO,
    ClipCov,
    KLCov,
    TopEntropy,
    WReinforce,
    GPPO,
    EntropyAdvantage,
    EntropyBonus,
    AdaptiveEntropy,
    AEnt,
    EntropyPI,
)}
"""Every control by name, in the order their plans are built and their per-token changes applied."""

__all__ = ["REGISTRY", "Control", "ControlConfig", "StepRecord", "TokenBatch", "ControlSet"]


class ControlSet:
    """The active controls of one loss config, instantiated (with their state) in registry order."""

    def __init__(self, config):
        active = set(config.active_controls)
        self.controls: list[Control] = [cls(config) for name, cls in REGISTRY.items() if name in active]
        self.update_every_step = config.controller_update == "optimizer_step"
        self._records: dict[str, list[StepRecord]] = {c.name: [] for c in self.controls if c.stateful}

    def __iter__(self):
        return iter(self.controls)

    @property
    def needs(self) -> frozenset[str]:
        return frozenset().union(*(c.needs for c in self.controls))

    def logit_values(self, logits_shard, *, tp_group=None, vocab_start: int = 0, vocab_size=None) -> dict:
        """``{control name: its per-token values}`` from the current logits shard, for the controls that need
        ``logits`` (see :meth:`Control.logit_values`); pass the result to ``policy_loss(..., logit_values=...)``."""
        width = logits_shard.shape[-1]
        if vocab_size is None:
            vocab_size = width * group_world_size(tp_group)
        return {c.name: c.logit_values(logits_shard, tp_group=tp_group, vocab_start=vocab_start,
                                       vocab_size=vocab_size)
                for c in self.controls if "logits" in c.needs}

    @property
    def needs_step_plan(self) -> bool:
        """Whether a micro-batch needs the step's plan (else it can plan over its own call)."""
        return any(c.needs_step_plan() for c in self.controls)

    @property
    def selection(self):
        """The active covariance selection (Clip-Cov or KL-Cov), or None."""
        return next((c for c in self.controls if c.selects_tokens), None)

    def update(self, plan) -> None:
        """After an optimizer step, with its (globally agreed) plan: the stateful controls record it, and move their
        state now with ``controller_update: optimizer_step`` (else at :meth:`end_rollout`)."""
        for name, records in self._records.items():
            scalars = {k: v for k, v in plan.values.get(name, {}).items() if not isinstance(v, torch.Tensor)}
            records.append(StepRecord(int(plan.step), float(plan.global_valid_tokens), scalars))
        if self.update_every_step:
            self._move_state()

    def end_rollout(self) -> None:
        """After the last optimizer step of a rollout: the stateful controls move their state once, from the
        rollout's recorded steps (``controller_update: rollout``; nothing is left to do with ``optimizer_step``)."""
        self._move_state()

    def _move_state(self) -> None:
        for control in self.controls:
            records = self._records.get(control.name)
            if records:
                control.update(tuple(records))
                records.clear()

    def state_dict(self) -> dict:
        pending = [name for name, records in self._records.items() if records]
        if pending:
            raise RuntimeError(f"controls {pending} have optimizer steps not yet applied to their state: call "
                               "end_rollout() at the end of the rollout before saving")
        return {c.name: c.state_dict() for c in self.controls if c.stateful}

    def load_state_dict(self, state) -> None:
        state = dict(state or {})
        for control in self.controls:
            control.load_state_dict(state.pop(control.name, {}))
        if state:
            raise ValueError(f"checkpointed state for controls {sorted(state)} that this config does not run")
