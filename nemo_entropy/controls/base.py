"""What an entropy control is: one unit with a typed config section, a per-step plan, a per-token change of the
surrogate, metrics and (optionally) state.

The life of a control over one optimizer step (the data flow of the README's architecture section):

1. **plan** (:meth:`Control.plan`), once per optimizer step on every rank of the token group, before the first
   micro-batch: from the step's whole-batch quantities in a :class:`~nemo_entropy.plan.StepContext` (global token
   count, exact covariance scores, the old policy's entropy, an exact distributed top-k) it returns its per-step
   values: per-token tensors shaped like the step's mask (a selected set, a weight) and scalars (a coefficient).
   Collectives happen only through the context, inside :func:`nemo_entropy.plan.build_step_plan`.
2. **per micro-batch**, no collective: :meth:`shape_advantages` (before the surrogate), :meth:`surrogate` (at
   most one active control owns the surrogate; PPO's clipped surrogate otherwise), :meth:`adjust` (a per-token
   weight on the surrogate and/or an additive per-token term), :meth:`metrics` (values pre-divided by the global
   count, so they sum over micro-batches and ranks; ``*_min`` / ``*_max`` combine with min / max).
3. **after the step** (:meth:`update`): a stateful control updates its state from the step's plan, whose values
   are globally reduced, so every rank holds the same state; :meth:`state_dict` / :meth:`load_state_dict` are
   checkpointed by the engine and, on the NeMo-RL path, by the driver.

A control's config section is a frozen dataclass of flat ``loss_fn`` keys (named as verl / TRL name them) with
their defaults and docstrings; :func:`nemo_entropy.config.loss_config` validates it (types generically, ranges
in :meth:`ControlConfig.validate`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Optional

import torch

if TYPE_CHECKING:  # imported for annotations only: the plan imports the controls
    from ..config import LossConfig
    from ..plan import StepContext, StepPlan

__all__ = ["ControlConfig", "Control", "TokenBatch", "bad_value"]


def bad_value(key: str, value: Any, allowed: str) -> ValueError:
    """The one error shape for a bad config value: ``loss_fn.<key>=<value> is invalid: allowed <range>``."""
    return ValueError(f"loss_fn.{key}={value!r} is invalid: allowed {allowed}")


@dataclass(frozen=True)
class ControlConfig:
    """Base of a control's config section. Subclasses add fields (flat ``loss_fn`` keys) and range checks."""

    def validate(self) -> None:
        """Range checks of the section's values (types are checked generically); raise :func:`bad_value`."""

    def keys(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class TokenBatch:
    """One micro-batch's per-token quantities, as the loss computes them, for the controls' per-token hooks.

    Every tensor is ``[batch, length]`` fp32 with zeros on masked positions. ``logprobs`` and (when the input
    type provides it) ``entropy`` carry the gradient; everything else is detached.
    """

    config: "LossConfig"
    logprobs: torch.Tensor
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    log_ratio: torch.Tensor
    ratio: torch.Tensor
    clamped_ratio: torch.Tensor
    global_valid_tokens: torch.Tensor
    global_valid_seqs: torch.Tensor
    scores: Optional[torch.Tensor] = None
    """The step's exact covariance scores of these tokens (from the plan)."""
    entropy: Optional[torch.Tensor] = None
    sample_rewards: Optional[torch.Tensor] = None
    input_advantages: Optional[torch.Tensor] = None
    """The advantages as the batch carried them, before any control's :meth:`Control.shape_advantages` replaced
    ``advantages`` (a sign or a metric that must not depend on another control's shaping); defaults to them."""

    def __post_init__(self) -> None:
        if self.input_advantages is None:
            self.input_advantages = self.advantages

    def token_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``sum(values * mask) / global_valid_tokens``: a summable per-token mean (metrics, extra terms)."""
        from ..losses.normalization import global_token_sum

        return global_token_sum(values, self.mask, self.global_valid_tokens)


class Control:
    """An entropy control. Subclasses set the class attributes and override the hooks they need."""

    name: ClassVar[str]
    """Registry name (``loss_fn.method`` / ``loss_fn.controls``)."""
    config_class: ClassVar[type[ControlConfig]] = ControlConfig
    exclusive: ClassVar[tuple[str, ...]] = ()
    """Exclusive groups: two active controls sharing one cannot be composed (two covariance selections, two
    owners of the surrogate, two entropy bonuses); the config rejects the pair by name."""
    needs: ClassVar[frozenset[str]] = frozenset()
    """What the control reads: ``old_entropy`` (per-token entropy of the generating policy, in the plan) and/or
    ``entropy`` (the current full-vocabulary entropy with its gradient, per micro-batch: NeMo-RL LOGIT input)."""
    needs_ppo_ratio: ClassVar[bool] = False
    """True when the control is defined on the PPO ratio (incompatible with ``disable_ppo_ratio`` / CISPO)."""
    selects_tokens: ClassVar[bool] = False
    """True for a covariance selection (Clip-Cov, KL-Cov): its plan has ``selected``, and ``scope: microbatch``
    re-plans it per call the way the reference does."""
    stateful: ClassVar[bool] = False

    def __init__(self, config: "LossConfig"):
        self.loss_config = config
        self.config = config.section(self.name)

    def needs_step_plan(self) -> bool:
        """Whether this control's per-step values must come from the whole step (a batch-scope selection, a
        quantile, state, the old entropy), so that a loss call cannot plan over its own tokens."""
        return self.stateful or "old_entropy" in self.needs or (
            self.selects_tokens and self.loss_config.scope == "batch")

    # ------------------------------------------------------------------ per optimizer step
    def plan(self, ctx: "StepContext") -> dict[str, Any]:
        """Per-step values: per-token tensors shaped like ``ctx.mask`` and Python scalars."""
        return {}

    def update(self, plan: "StepPlan") -> None:
        """After the step, from its (globally agreed) plan: same input on every rank, same new state."""

    # ------------------------------------------------------------------ per micro-batch (no collective)
    def shape_advantages(self, tokens: TokenBatch, values: Mapping[str, Any]) -> Optional[torch.Tensor]:
        """New per-token advantages before the surrogate, or None."""
        return None

    def surrogate(self, tokens: TokenBatch, values: Mapping[str, Any]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(per-token surrogate loss, clip_active)`` replacing PPO's clipped surrogate, or None."""
        return None

    def adjust(self, tokens: TokenBatch, values: Mapping[str, Any],
               surrogate: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(weight on the surrogate, additive per-token term)``, each per token or None."""
        return None, None

    def metrics(self, tokens: TokenBatch, values: Mapping[str, Any]) -> dict[str, float]:
        """Metrics of this micro-batch, pre-divided so that they sum over micro-batches and ranks.

        A per-step constant ``c`` (a threshold, a coefficient) is reported as the token share
        ``tokens.token_sum(c * ones)``: each micro-batch contributes ``c`` times its share of the step's valid tokens,
        so the sum over micro-batches and ranks is ``c`` (0 for a step without valid tokens)."""
        return {}

    def metric_normalizations(self) -> dict[str, str]:
        """NeMo-RL's ``MetricNormalizer`` value (``tokens``, ``sequences`` or ``none``) of each metric."""
        return {}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state:
            raise ValueError(f"control {self.name!r} is stateless but got state {dict(state)}")
