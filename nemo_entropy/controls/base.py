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
   weight on the surrogate and/or an additive per-token term, normalised like the surrogate: token mean over the
   step, or mean of sequence means with ``token_level_loss: false``), :meth:`metrics` (values pre-divided by the
   global count, so they sum over micro-batches and ranks; ``*_min`` / ``*_max`` combine with min / max).
   A control that needs more than the entropy from the current logits (``needs`` ``logits``) computes it in
   :meth:`logit_values` from the logits shard, where the caller (the engine's scoring pass, the NeMo-RL adapter's
   LOGIT input) has it; the loss hands the result back in :attr:`TokenBatch.logit_values`.
3. **after the step** (:meth:`ControlSet.update <nemo_entropy.controls.ControlSet.update>`): a stateful control
   records the step's plan (its scalars, globally reduced, so every rank holds the same record); its state moves in
   :meth:`update` from the records of the steps since its last update: at the end of each rollout
   (``controller_update: rollout``, the default: the papers' cadence, :meth:`ControlSet.end_rollout`) or after each
   optimizer step (``optimizer_step``). Until then every plan of the rollout uses the same state. :meth:`state_dict`
   / :meth:`load_state_dict` are checkpointed by the engine and, on the NeMo-RL path, by the driver.

**Per-step constants in metrics.** Metrics are *summed* over micro-batches and ranks (NeMo-RL and the engine both
do), so a per-step constant ``c`` (a coefficient, a target) is reported as its token share
:meth:`TokenBatch.step_constant` = ``c x (this micro-batch's valid tokens) / (the step's valid tokens)`` (what
``tokens.token_sum(torch.full_like(tokens.logprobs, c))`` gives, in float64): the shares add up to ``c`` over the
step whatever the layout (0 for a step without valid tokens), and NeMo-RL's normaliser for it is ``tokens``.

A control's config section is a frozen dataclass of flat ``loss_fn`` keys (named as verl / TRL name them) with
their defaults and docstrings; :func:`nemo_entropy.config.loss_config` validates it (types generically, ranges
in :meth:`ControlConfig.validate`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping, Optional, Sequence

import torch

from ..normalization import global_token_sum, reduce_per_token

__all__ = ["ControlConfig", "Control", "TokenBatch", "StepRecord", "token_weighted_mean", "bad_value"]


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


@dataclass(frozen=True)
class StepRecord:
    """What a stateful control's :meth:`Control.update` reads of one optimizer step: the step's index, its valid
    tokens over every rank, and the control's own per-step scalars from the step's plan (identical on every rank)."""

    step: int
    valid_tokens: float
    values: Mapping[str, Any]


def token_weighted_mean(records: Sequence[StepRecord], key: str) -> Optional[float]:
    """``sum_j values_j[key] N_j / sum_j N_j`` over the records (float64, in step order), or None when no step had a
    valid token. For a per-step mean over the step's valid tokens (the old entropy) this is the exact mean over every
    valid token of the recorded steps (the rollout's), whatever the layout: each term is identical on every rank."""
    total = sum(r.valid_tokens for r in records)
    if total <= 0:
        return None
    return sum(float(r.values[key]) * r.valid_tokens for r in records if r.valid_tokens > 0) / total


@dataclass
class TokenBatch:
    """One micro-batch's per-token quantities, as the loss computes them, for the controls' per-token hooks.

    Every tensor is ``[batch, length]`` fp32 with zeros on masked positions. ``logprobs`` and (when the input
    type provides it) ``entropy`` carry the gradient; everything else is detached.
    """

    config: Any
    """The loss's :class:`~nemo_entropy.config.LossConfig` (the config and the plan stand above the controls, so
    the controls name their types in words only)."""
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
    logit_values: Mapping[str, Mapping[str, torch.Tensor]] = dataclasses.field(default_factory=dict)
    """Per control that needs ``logits``: the per-token tensors its :meth:`Control.logit_values` computed from the
    current logits (with their gradient), zero on masked positions."""

    def __post_init__(self) -> None:
        if self.input_advantages is None:
            self.input_advantages = self.advantages

    def token_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``sum(values * mask) / global_valid_tokens``: a summable per-token mean (metrics, extra terms, and
        per-step constants as token shares, see the module doc)."""
        return global_token_sum(values, self.mask, self.global_valid_tokens)

    def step_constant(self, value: float) -> float:
        """A per-step constant as this micro-batch's token share (module doc): ``value x n / N`` in float64, so
        the shares of the step's micro-batches and ranks sum to ``value`` up to float64 rounding."""
        total = float(self.global_valid_tokens)
        return float(value) * float(self.mask.sum()) / (total if total > 0 else 1.0)

    def loss_sum(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` normalised exactly like the loss (token mean over the step, or the sum of per-sequence means
        over the step's sequences with ``token_level_loss: false``): the share of an additive per-token term in
        this micro-batch's loss, summable over micro-batches and ranks."""
        return reduce_per_token(values, self.mask, token_level=self.config.token_level_loss,
                                global_valid_tokens=self.global_valid_tokens,
                                global_valid_seqs=self.global_valid_seqs)


class Control:
    """An entropy control. Subclasses set the class attributes and override the hooks they need."""

    name: ClassVar[str]
    """Registry name (``loss_fn.method`` / ``loss_fn.controls``)."""
    config_class: ClassVar[type[ControlConfig]] = ControlConfig
    exclusive: ClassVar[tuple[str, ...]] = ()
    """Exclusive groups: two active controls sharing one cannot be composed (two covariance selections, two
    owners of the surrogate, two entropy bonuses); the config rejects the pair by name."""
    term_kind: ClassVar[str] = "regulariser"
    """What the additive term of :meth:`adjust` is (the composition rule, docs/controls.md): ``regulariser`` (a
    penalty or bonus on the distribution: KL-Cov's ``beta |log r|``, the entropy bonuses), added after every weight,
    or ``policy_gradient`` (a re-weighting of the policy gradient: EntroPIC's ``u r |A|``), added to the surrogate
    before the other controls' weights multiply it, so it follows their masks and weights like the surrogate."""
    needs: ClassVar[frozenset[str]] = frozenset()
    """What the control reads: ``old_entropy`` (per-token entropy of the generating policy, in the plan),
    ``entropy`` (the current full-vocabulary entropy with its gradient, per micro-batch: NeMo-RL LOGIT input) and/or
    ``logits`` (per-token values the control computes from the current logits shard in :meth:`logit_values`, with
    their gradient: NeMo-RL LOGIT input)."""
    needs_ppo_ratio: ClassVar[bool] = False
    """True when the control is defined on the PPO ratio (incompatible with ``disable_ppo_ratio`` / CISPO)."""
    selects_tokens: ClassVar[bool] = False
    """True for a covariance selection (Clip-Cov, KL-Cov): its plan has ``selected``, and ``scope: microbatch``
    re-plans it per call the way the reference does."""
    stateful: ClassVar[bool] = False

    def __init__(self, config: Any):
        """``config``: the loss's :class:`~nemo_entropy.config.LossConfig`; this control's section is
        ``config.section(self.name)``."""
        self.loss_config = config
        self.config = config.section(self.name)

    def needs_step_plan(self) -> bool:
        """Whether this control's per-step values must come from the whole step (a batch-scope selection, a
        quantile, state, the old entropy), so that a loss call cannot plan over its own tokens."""
        return self.stateful or "old_entropy" in self.needs or (
            self.selects_tokens and self.loss_config.scope == "batch")

    # ------------------------------------------------------------------ per optimizer step
    def counted_keys(self) -> dict[str, None]:
        """The names of the subsets :meth:`counted_tokens` returns (for a rank whose inputs are bad, which still
        joins the all-reduce with zeros)."""
        return {}

    def counted_tokens(self, old_logprobs: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """Subsets of this rank's valid tokens (bool ``[batch, length]``, within ``mask``) whose exact counts over the
        whole step the plan needs: they ride in the plan's one all-reduce and reach :meth:`plan` as
        ``ctx.counts[name][key] = (tokens, sequences with one)``. ``old_logprobs``: the step's, as given (masked
        positions may hold anything)."""
        return {}

    def plan(self, ctx) -> dict[str, Any]:
        """Per-step values from ``ctx``, the step's :class:`~nemo_entropy.plan.StepContext`: per-token tensors
        shaped like ``ctx.mask`` and Python scalars."""
        return {}

    def update(self, records: Sequence[StepRecord]) -> None:
        """Move the state once, from the :class:`StepRecord` of every optimizer step since the last update (the
        rollout's steps, or one step with ``controller_update: optimizer_step``), all planned with the current
        state: same records on every rank, same new state."""

    # ------------------------------------------------------------------ per micro-batch (no collective)
    def logit_values(self, logits_shard: torch.Tensor, *, tp_group, vocab_start: int,
                     vocab_size: int) -> dict[str, torch.Tensor]:
        """Per-token tensors (shape ``logits_shard.shape[:-1]``, differentiable) computed from the current logits:
        ``logits_shard`` is this rank's ``[..., V_local]`` vocabulary shard (already divided by the sampling
        temperature) starting at global id ``vocab_start``, ``vocab_size`` the unpadded vocabulary, ``tp_group``
        the vocab-parallel group (TP collectives only, never a token-group one). Called only when ``logits`` is in
        :attr:`needs`."""
        return {}

    def shape_advantages(self, tokens: TokenBatch, values: Mapping[str, Any]) -> Optional[torch.Tensor]:
        """New per-token advantages before the surrogate, or None."""
        return None

    def surrogate(self, tokens: TokenBatch, values: Mapping[str, Any]) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """``(per-token surrogate loss, clip_active)`` replacing PPO's clipped surrogate, or None."""
        return None

    def adjust(self, tokens: TokenBatch, values: Mapping[str, Any],
               surrogate: torch.Tensor) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
        """``(weight on the policy gradient, additive per-token term)``, each per token or None: the weight multiplies
        the surrogate and every ``policy_gradient`` term; the term is of this control's :attr:`term_kind`."""
        return None, None

    def metrics(self, tokens: TokenBatch, values: Mapping[str, Any]) -> dict[str, float]:
        """Metrics of this micro-batch, pre-divided so that they sum over micro-batches and ranks; a per-step
        constant (a threshold, a coefficient) as :meth:`TokenBatch.step_constant` (module doc)."""
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
