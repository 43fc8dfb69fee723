"""The per-step plan: one call per optimizer step builds everything the step's controls need from the whole step.

:func:`build_step_plan` runs on every rank of the token group, once per optimizer step, before the first
micro-batch, over this rank's share of the step (old log-probs, advantages, mask, token uids, and the old policy's
entropy when a control needs it). It issues **every collective of the step, here and only here**, always in the
same order on every rank:

1. one all-reduce (int64) of the step's counts and exact fixed-point sums: valid tokens, valid sequences, the
   tokens and sequences of the subsets a control counts (EntroPIC's high-probability gate),
   ``sum l`` and ``sum A`` (or ``sum p A``) for the covariance means, ``sum H`` when a control needs the step's
   mean entropy, and the count of ranks whose inputs are bad (so every rank raises together after it);
2. with ``covariance_diagnostics``, one all-gather of the top 2% of covariance scores for the concentration
   diagnostics, with each rank's exact sums of the scores and of Theorem 1's terms
   (:mod:`nemo_entropy.covariance_diagnostics`);
3. one all-gather per exact top-k a control asks for (:meth:`StepContext.top_k`), in registry order:
   KL-Cov's top covariance, Clip-Cov's random subset, a top-entropy quantile, ... A top-k of the covariance
   scores over every valid token of at most the diagnostics' 2% (KL-Cov at its ratios) is read from the
   diagnostics' answer instead: no second top-k, no second all-gather.

The result, a :class:`StepPlan`, holds the global counts, the exact covariance scores and each control's values
(per-token tensors shaped like the step's mask, and scalars). The micro-batch loss takes ``plan.rows(...)`` and
issues no collective. The engine calls this per optimizer step with its DP group; NeMo-RL's driver calls it with
no group over the whole step (it holds every sample) and attaches the plan to the batch
(:mod:`nemo_entropy.integrations.batch_keys`), so it rides with its tokens through sharding, packing and
micro-batching.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any, Mapping, Optional

import torch

from .config import LossConfig
from .controls import ControlSet
from .covariance_diagnostics import (
    DIAGNOSTICS,
    ScoreTop,
    concentration_top_k,
    covariance_diagnostics,
    scores_and_diagnostic_sums,
)
from .exact import (
    chosen_from_offer,
    covariance_inputs,
    distributed_top_k,
    exact_group_sums,
    masked_offer,
    rows_with_tokens,
    merge_offers,
    scores_from_means,
    validate_token_inputs,
)
from .parallel import GroupsLike, as_groups

__all__ = ["StepInputs", "StepContext", "StepPlan", "build_step_plan", "reference_selection", "default_token_uids"]


@dataclass
class StepInputs:
    """This rank's share of one optimizer step: ``[batch, length]`` tensors aligned with ``mask``.

    ``old_logprobs`` are the log-probs of the policy that generated the data (NeMo-RL's ``prev_logprobs``);
    masked positions may hold anything (even -inf or NaN). ``token_uids`` identify tokens independently of the
    layout (``selection.token_uids_for``); ``old_entropy`` is the generating policy's full-vocabulary entropy,
    needed by controls that declare ``old_entropy``; with ``old_prob_logprob_cov``, the generating policy's
    ``Cov_{a~pi}(log pi(a), pi(a)) = sum_a pi(a)^2 (log pi(a) + H)`` per token, the two give the diagnostics'
    Theorem-1 prediction (:func:`~nemo_entropy.covariance_diagnostics.covariance_diagnostics`).
    """

    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    token_uids: Optional[torch.Tensor] = None
    old_entropy: Optional[torch.Tensor] = None
    old_prob_logprob_cov: Optional[torch.Tensor] = None


def default_token_uids(mask: torch.Tensor, groups: GroupsLike = None) -> torch.Tensor:
    """Token uids unique over the token group without communication: ``flat index x world + rank``.

    They depend on the layout (pass :func:`~nemo_entropy.exact.token_uids_for` uids for layout-independent
    random draws), but never coincide across ranks, so a quota is never exceeded.
    """
    g = as_groups(groups)
    flat = torch.arange(mask.numel(), dtype=torch.int64, device=mask.device).reshape(mask.shape)
    return flat * g.token_world_size + g.token_rank


class StepContext:
    """What a control's :meth:`~nemo_entropy.controls.Control.plan` sees: the step's local tensors (zeros on masked
    positions), the global counts and means, the exact covariance scores, and the one collective a control may
    ask for, :meth:`top_k`."""

    def __init__(self, config: LossConfig, inputs: StepInputs, mask: torch.Tensor, *, token_uids: torch.Tensor,
                 step: int, groups, num_valid_tokens: int, num_valid_seqs: int, scores: torch.Tensor,
                 entropy_mean: Optional[float], clip_active: Optional[torch.Tensor],
                 score_top: Optional[ScoreTop] = None, num_local_tokens: Optional[int] = None):
        self.config = config
        self.mask = mask
        self._inputs = inputs
        self.token_uids = token_uids
        self.step = step
        self.num_valid_tokens = num_valid_tokens
        self.num_valid_seqs = num_valid_seqs
        self.scores = scores
        self.entropy_mean = entropy_mean
        """Mean old-policy entropy over the step's valid tokens (exact, every rank), when a control needs it."""
        self.clip_active = clip_active
        """``scope: microbatch`` only: tokens the PPO clip already clipped (the reference skips them)."""
        self.counts: dict[str, dict[str, tuple[int, int]]] = {}
        """Per control, per subset it asked for (:meth:`~nemo_entropy.controls.Control.counted_tokens`): its
        ``(valid tokens, sequences with one)`` over the whole step, exact, from the plan's one all-reduce."""
        self._groups = groups
        self._score_top = score_top
        self._num_local_tokens = num_local_tokens

    def _masked(self, tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if tensor is None:
            return None
        return torch.where(self.mask, tensor.detach().float(), torch.zeros((), dtype=torch.float32))

    # Step-shaped fp32 copies with zeros on masked positions, made only for a control that reads them.
    @cached_property
    def old_logprobs(self) -> torch.Tensor:
        return self._masked(self._inputs.old_logprobs)

    @cached_property
    def advantages(self) -> torch.Tensor:
        return self._masked(self._inputs.advantages)

    @cached_property
    def old_entropy(self) -> Optional[torch.Tensor]:
        return self._masked(self._inputs.old_entropy)

    def top_k(self, priority: torch.Tensor, eligible: torch.Tensor, k: int, *, with_threshold: bool = False):
        """The ``k`` eligible tokens of the whole step ranked first by (priority desc, token uid asc), and how many
        that is over the step (fewer than ``k`` when fewer are eligible): one all-gather. Every rank must ask for
        the same ``k`` in the same order (controls derive ``k`` from the global counts). ``with_threshold`` adds
        the lowest chosen priority, identical on every rank (a quantile's value, for a metric).

        The covariance scores over every valid token (``priority is scores``, ``eligible is mask``): one cut of the
        step and an offer of the few tokens above it, the answer written at their positions; with ``k`` no larger
        than the diagnostics' merged top-k already held by the plan, read from it, no collective."""
        if priority is self.scores and eligible is self.mask:
            top = self._score_top
            if top is None or k > top.priority.numel():
                offer = masked_offer(self.scores, self.mask, self.token_uids, k, self._num_local_tokens)
                top = ScoreTop(offer, *merge_offers(offer, k, self._groups))
            return chosen_from_offer(top.offer, top.priority, top.uids, top.mine, k, self.mask.shape,
                                     with_threshold=with_threshold)
        return distributed_top_k(priority, self.token_uids, eligible & self.mask, k, self._groups,
                                 with_threshold=with_threshold)


@dataclass(frozen=True)
class StepPlan:
    """Everything one optimizer step's micro-batches need, computed once (:func:`build_step_plan`).

    Per-token tensors are shaped like the step's (or, after :meth:`rows`, the micro-batch's) mask.
    """

    step: int
    global_valid_tokens: float
    global_valid_seqs: float
    scores: torch.Tensor
    """Exact covariance scores over the step (0 on masked tokens), for the selections and the diagnostics."""
    values: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """Per active control: its per-step values (per-token tensors and scalars)."""

    def rows(self, rows: Any) -> "StepPlan":
        """The plan of a micro-batch: every per-token tensor restricted to ``rows`` (a slice or index tensor)."""
        def cut(value):
            return value[rows] if isinstance(value, torch.Tensor) and value.dim() >= 1 else value

        return replace(self, scores=cut(self.scores),
                       values={name: {k: cut(v) for k, v in vals.items()} for name, vals in self.values.items()})

    @property
    def global_selected_tokens(self) -> Optional[float]:
        """Tokens the covariance selection chose over the whole step (None when no selection runs, or when it
        selects per call: ``scope: microbatch``)."""
        for vals in self.values.values():
            if vals.get("num_selected") is not None:
                return float(vals["num_selected"])
        return None

    @property
    def selected(self) -> torch.Tensor:
        """The covariance selection's mask (all False when no selection runs)."""
        for vals in self.values.values():
            if "selected" in vals:
                return vals["selected"]
        return torch.zeros(self.scores.shape, dtype=torch.bool, device=self.scores.device)


def _reference_scores(logprobs, advantages, mask, form) -> torch.Tensor:
    """``scope: microbatch``: the reference's scores, with plain float means over one call's valid tokens (its
    arithmetic, so its per-call selection is reproduced exactly, near-ties included)."""
    if not bool(mask.any()):
        return torch.zeros_like(logprobs)
    x = advantages if form == "natural" else torch.exp(logprobs) * advantages
    scores = (logprobs - logprobs[mask].mean()) * (x - x[mask].mean())
    return torch.where(mask, scores, torch.zeros_like(scores))


def _zero_masked(tensor: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached, fp64 or fp32 (as the exact sums work), 0 where masked."""
    dtype = torch.float64 if tensor.dtype == torch.float64 else torch.float32
    return torch.where(mask, tensor.detach().to(dtype), torch.zeros((), dtype=dtype, device=tensor.device))


def _local_inputs(inputs: StepInputs, needs: frozenset[str], groups) -> tuple[Optional[torch.Tensor], Optional[Exception]]:
    """This rank's mask and its input error (never raised here: it rides the all-reduce)."""
    try:
        if "old_entropy" in needs and inputs.old_entropy is None:
            raise ValueError("a control of this loss needs the old policy's per-token entropy (StepInputs.old_entropy)")
        mask = validate_token_inputs(inputs.mask, check_finite=False, old_logprobs=inputs.old_logprobs,
                                     advantages=inputs.advantages, token_uids=inputs.token_uids,
                                     old_entropy=inputs.old_entropy,
                                     old_prob_logprob_cov=inputs.old_prob_logprob_cov)
        return mask, None
    except (TypeError, ValueError) as err:
        return None, err


def build_step_plan(
    config: LossConfig,
    inputs: StepInputs,
    *,
    step: int,
    groups: GroupsLike = None,
    controls: Optional[ControlSet] = None,
    clip_active: Optional[torch.Tensor] = None,
    local_error: Optional[Exception] = None,
) -> StepPlan:
    """The plan of one optimizer step, on every rank of the token group (``groups``; ``None``: one process holds
    the whole step). ``controls`` carries stateful controls' state (default: the config's controls, fresh).
    ``clip_active`` marks ``scope: microbatch`` re-planning inside a loss call (no group then): the reference's
    selection over one call, with its float means, skipping the tokens the PPO clip already clipped.

    Collectives, in this order on every rank: one all-reduce; with the diagnostics, one all-gather of the top 2% of
    the scores; one all-gather per other top-k a control asks for (module docstring).
    Bad inputs on any rank (or a ``local_error`` the caller found) make every rank raise after the all-reduce.
    """
    controls = controls if controls is not None else ControlSet(config)
    needs = controls.needs
    mask, input_error = _local_inputs(inputs, needs, groups)
    local_error = local_error or input_error
    ok = local_error is None
    empty = torch.zeros(0)
    old, adv = inputs.old_logprobs, inputs.advantages  # padding may hold anything: masked where it is read
    counts = [torch.count_nonzero(mask), rows_with_tokens(mask)] if ok else [torch.tensor(0), torch.tensor(0)]
    # The controls' own token subsets (EntroPIC's gate): their token and sequence counts ride in the same all-reduce.
    subsets = [(control.name, key, subset) for control in controls
               for key, subset in (control.counted_tokens(old, mask).items() if ok else control.counted_keys())]
    counts += [c for _, _, subset in subsets
               for c in ((torch.count_nonzero(subset), rows_with_tokens(subset)) if ok
                         else (torch.tensor(0), torch.tensor(0)))]
    values = covariance_inputs(old, adv, config.cov_form) if ok else [("logprobs", empty), ("advantages", empty)]
    if "old_entropy" in needs:
        values.append(("old_entropy", inputs.old_entropy if ok else empty))
    diagnose = config.covariance_diagnostics and clip_active is None
    (n_tokens, n_seqs, *subset_counts), sums = exact_group_sums(counts, values, mask, groups, local_error=local_error)
    denom = float(max(n_tokens, 1))
    mean_l, mean_x = sums[0] / denom, sums[1] / denom
    entropy_mean = float(sums[2] / denom) if "old_entropy" in needs else None
    uids = inputs.token_uids if inputs.token_uids is not None else default_token_uids(mask, groups)
    score_top = None
    if clip_active is None:
        if diagnose and n_tokens:
            # what the diagnostics sum after the means (the scores, Theorem 1's terms when the plan has their
            # inputs) is summed in the scores' pass, and rides the diagnostics' all-gather
            theorem = (inputs.old_entropy, inputs.old_prob_logprob_cov)
            scores, local_sums = scores_and_diagnostic_sums(
                old, adv, mask, mean_l, mean_x, config.cov_form, as_groups(groups).token_world_size,
                theorem_inputs=theorem if None not in theorem else None)
            score_top = concentration_top_k(scores, mask, uids, n_tokens, int(counts[0]), groups, local_sums)
        else:
            scores = scores_from_means(old, adv, mask, mean_l, mean_x, config.cov_form)
    else:
        scores = _reference_scores(_zero_masked(old, mask).float(), _zero_masked(adv, mask).float(), mask,
                                   config.cov_form)
    ctx = StepContext(config, inputs, mask, token_uids=uids, step=step, groups=groups, num_valid_tokens=n_tokens,
                      num_valid_seqs=n_seqs, scores=scores, entropy_mean=entropy_mean, clip_active=clip_active,
                      score_top=score_top, num_local_tokens=int(counts[0]))
    for index, (name, key, _) in enumerate(subsets):
        ctx.counts.setdefault(name, {})[key] = (subset_counts[2 * index], subset_counts[2 * index + 1])
    plan_values = {control.name: control.plan(ctx) for control in controls}
    if diagnose:
        plan_values[DIAGNOSTICS] = covariance_diagnostics(score_top, n_tokens,
                                                          theorem=None not in (inputs.old_entropy,
                                                                               inputs.old_prob_logprob_cov))
    return StepPlan(step=step, global_valid_tokens=float(n_tokens), global_valid_seqs=float(n_seqs), scores=scores,
                    values=plan_values)


def reference_selection(config: LossConfig, logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                        *, token_uids: Optional[torch.Tensor], step: int, clip_active: torch.Tensor,
                        controls: Optional[ControlSet] = None) -> StepPlan:
    """``scope: microbatch``: the reference's per-call selection (verl, the paper's repository), as a plan of one
    call: current detached log-probs, plain float means over the call's valid tokens, quota from the call's own
    count, tokens the PPO clip already clipped (``clip_active``) skipped. No communication."""
    return build_step_plan(config, StepInputs(logprobs.detach(), advantages, mask, token_uids), step=step,
                           controls=controls, clip_active=clip_active)
