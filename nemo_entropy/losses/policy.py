"""The policy loss of one micro-batch: surrogate, the active controls' per-token changes, NeMo-RL's extra terms,
global normalisation, metrics.

Per token, with the ratio of :func:`~nemo_entropy.surrogate.importance_ratio`:

1. each active control may reshape the advantages (``Control.shape_advantages``);
2. the surrogate is PPO's clipped one (:func:`~nemo_entropy.surrogate.clipped_surrogate`, with every
   NeMo-RL option) unless one active control owns it (KL-Cov's ``-A r``);
3. the controls' per-token changes compose by one rule (docs/controls.md): ``(surrogate + policy-gradient terms)
   x policy-gradient weights + regularisers``: weights such as Clip-Cov's 0 on its selected tokens multiply the
   surrogate and every ``policy_gradient`` term (EntroPIC's), never a regulariser (KL-Cov's ``beta |log r|``, an
   entropy bonus);
4. NeMo-RL's importance-sampling weight multiplies the result; the reference KL and the positive-example NLL add.

Whole-step quantities (counts, the covariance selection, coefficients) come from the step's plan
(:mod:`nemo_entropy.plan`); with a plan the loss issues no collective.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import torch

from ..config import LossConfig, loss_config
from ..controls import ControlSet, TokenBatch
from ..covariance_diagnostics import DIAGNOSTICS
from ..exact import validate_token_inputs
from ..normalization import global_token_sum, reduce_per_token, safe_count, zero_masked
from ..parallel import GroupsLike
from ..plan import StepInputs, StepPlan, build_step_plan, reference_selection
from ..surrogate import clipped_surrogate, importance_ratio
from . import nemo_rl_terms

__all__ = ["policy_loss", "per_token_policy_loss", "reduce_per_token"]

_BIG = torch.finfo(torch.float32).max


def per_token_policy_loss(
    config: LossConfig,
    tokens: TokenBatch,
    plan: StepPlan,
    controls: ControlSet,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(per-token loss, clip_active)`` of a micro-batch (fp32, 0 on masked tokens), the controls applied."""
    for control in controls:
        shaped = control.shape_advantages(tokens, plan.values.get(control.name, {}))
        if shaped is not None:
            tokens.advantages = shaped
    owned = [s for c in controls if (s := c.surrogate(tokens, plan.values.get(c.name, {}))) is not None]
    if owned:
        loss, clip_active = owned[0]
    else:
        loss, clip_active = clipped_surrogate(config, tokens.advantages, tokens.ratio, tokens.clamped_ratio,
                                              tokens.logprobs)
    # The composition rule (docs/controls.md): (surrogate + policy-gradient terms) x weights + regularisers.
    weight, terms = None, {"policy_gradient": None, "regulariser": None}
    for control in controls:
        w, e = control.adjust(tokens, plan.values.get(control.name, {}), loss)
        if w is not None:
            weight = w if weight is None else weight * w
        if e is not None:
            kind = control.term_kind
            terms[kind] = e if terms[kind] is None else terms[kind] + e
    if terms["policy_gradient"] is not None:
        loss = loss + terms["policy_gradient"]
    if weight is not None:
        loss = loss * weight
    if terms["regulariser"] is not None:
        loss = loss + terms["regulariser"]
    return loss, clip_active


def _call_plan(config, old_logprobs, advantages, mask, *, controls, groups, token_uids, step,
               global_valid_tokens, global_valid_seqs) -> StepPlan:
    """``plan=None``: the plan over this call's tokens across ``groups`` (:func:`build_step_plan` itself), its counts
    replaced by the caller's step counts when given. A call that is part of a larger step has no diagnostics: those
    of its own tokens are not the step's."""
    whole_step = [c.name for c in controls if "old_entropy" in c.needs]
    if whole_step:
        raise ValueError(f"loss_fn.method/controls {', '.join(map(repr, whole_step))} needs the step plan (its values "
                         "come from the whole step's old entropy, which a loss call does not have): build it with "
                         "nemo_entropy.plan.build_step_plan(..., StepInputs(..., old_entropy=...)) and pass "
                         "plan=plan.rows(rows)")
    plan = build_step_plan(config, StepInputs(old_logprobs, advantages, mask, token_uids), step=step, groups=groups,
                           controls=controls)
    if global_valid_tokens is None and global_valid_seqs is None:
        return plan
    values = {name: vals for name, vals in plan.values.items() if name != DIAGNOSTICS}
    return replace(plan, values=values,
                   global_valid_tokens=float(plan.global_valid_tokens if global_valid_tokens is None
                                             else global_valid_tokens),
                   global_valid_seqs=float(plan.global_valid_seqs if global_valid_seqs is None else global_valid_seqs))


def policy_loss(
    config: LossConfig | Any,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    plan: Optional[StepPlan] = None,
    entropy: Optional[torch.Tensor] = None,
    logit_values: Optional[dict] = None,
    controls: Optional[ControlSet] = None,
    groups: GroupsLike = None,
    token_uids: Optional[torch.Tensor] = None,
    step: int = 0,
    global_valid_tokens: Optional[torch.Tensor | float] = None,
    global_valid_seqs: Optional[torch.Tensor | float] = None,
    reference_logprobs: Optional[torch.Tensor] = None,
    generation_logprobs: Optional[torch.Tensor] = None,
    rewards: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss of one micro-batch (scalar, differentiable w.r.t. ``logprobs``) and its metrics.

    Args:
        config: a :class:`LossConfig` (or a mapping, validated with ``loss_config``).
        logprobs: current log-probs of the sampled tokens, [batch, length], fp32 or bf16, requires grad.
        old_logprobs: log-probs of the policy that generated the data (NeMo-RL's ``prev_logprobs``).
        advantages: per-token advantages, [batch, length].
        mask: valid tokens (bool or 0/1): NeMo-RL's ``token_mask[:, 1:] * sample_mask[:, None]``. Masked positions
            of every tensor may hold anything (-inf log-probs, NaN advantages on padding).
        plan: the step's plan restricted to this micro-batch (``build_step_plan(...).rows(...)``): counts,
            covariance scores, the controls' selections and coefficients. With a plan the loss issues **no
            collective**. ``None``: the plan over *this call's* tokens across ``groups``
            (:func:`~nemo_entropy.plan.build_step_plan` on ``old_logprobs``, exact for the step only when the call
            holds the whole step, e.g. one process).
        entropy: the current full-vocabulary entropy per token, with its gradient, for controls that need it
            (``entropy`` in their ``needs``).
        logit_values: for controls that need ``logits``: ``controls.logit_values(logits_shard, ...)`` of this
            micro-batch's current logits (``{control: {name: [batch, length] tensor}}``, with their gradient).
        controls: the stateful controls of the run (their state feeds the plan); default: fresh ones.

    Without a plan only (what :func:`build_step_plan` takes, for the plan over this call):
        groups: ``None`` (one process), the token-group ``ProcessGroup``, or ``ParallelGroups``.
        token_uids: int64 [batch, length] layout-independent token ids (Clip-Cov's hash keys, here and in
            ``scope: microbatch``'s per-call selection; default: unique over the group but layout dependent, see
            ``plan.default_token_uids``).
        step: optimizer step (Clip-Cov's hash keys).
        global_valid_tokens / global_valid_seqs: the step's counts when this call is a part of it (NeMo-RL passes
            them to every loss call): they normalise the loss instead of the call's own counts.

    Always:
        reference_logprobs / generation_logprobs: for NeMo-RL's reference KL and importance-sampling keys.
        rewards: per-sample rewards [batch], for ``positive_example_nll_weight`` (VAPO).

    Returns:
        ``(loss, metrics)``; every metric is pre-divided by the global count so that summing over
        micro-batches and DP ranks gives the batch value, except ``*_min`` / ``*_max``.
    """
    config = config if isinstance(config, LossConfig) else loss_config(config)
    controls = controls if controls is not None else ControlSet(config)
    if plan is None:
        plan = _call_plan(config, old_logprobs, advantages, mask, controls=controls, groups=groups,
                          token_uids=token_uids, step=step, global_valid_tokens=global_valid_tokens,
                          global_valid_seqs=global_valid_seqs)
    bool_mask = validate_token_inputs(
        mask, check_finite=False, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages,
        token_uids=token_uids, reference_logprobs=reference_logprobs, generation_logprobs=generation_logprobs,
        entropy=entropy)
    if plan.scores is not None and plan.scores.shape != bool_mask.shape:
        raise ValueError(f"the plan's tensors have shape {tuple(plan.scores.shape)} but this micro-batch's mask has "
                         f"{tuple(bool_mask.shape)}: pass plan.rows(<this micro-batch's rows>)")
    if "entropy" in controls.needs and entropy is None:
        raise ValueError(f"loss_fn controls {[c.name for c in controls if 'entropy' in c.needs]} need the current "
                         "full-vocabulary entropy (`entropy=`; with NeMo-RL: nemo_rl.input_type=logit)")
    logit_values = _checked_logit_values(controls, logit_values, bool_mask)
    lp = zero_masked(logprobs, bool_mask)
    old = zero_masked(old_logprobs.detach(), bool_mask)
    adv = zero_masked(advantages.detach(), bool_mask)
    for name, tensor in (("logprobs", lp), ("old_logprobs", old), ("advantages", adv)):
        if not bool(torch.isfinite(tensor.detach()).all()):
            raise ValueError(f"{name} has NaN or inf on valid (unmasked) tokens")
    gvt = torch.as_tensor(plan.global_valid_tokens, dtype=torch.float32)
    gvs = torch.as_tensor(plan.global_valid_seqs, dtype=torch.float32)
    log_ratio, ratio, clamped = importance_ratio(config, lp, old, bool_mask)

    if config.scope == "microbatch" and controls.selection is not None:
        # The reference: select over this call alone, from current detached log-probs, skipping the tokens the
        # PPO clip already clipped. No communication; the step's counts still normalise.
        _, clip_active_pre = clipped_surrogate(config, adv, ratio.detach(), clamped.detach(), lp.detach())
        call = reference_selection(config, lp, adv, bool_mask, token_uids=token_uids, step=plan.step,
                                   clip_active=clip_active_pre & bool_mask, controls=controls)
        values = dict(plan.values)
        # The quota is per call: the step's selected count is unknown here (no cov_selected_mean in this scope).
        values[controls.selection.name] = {**call.values[controls.selection.name], "num_selected": None}
        plan = StepPlan(plan.step, plan.global_valid_tokens, plan.global_valid_seqs,
                        call.scores if plan.scores is None else plan.scores, values)

    tokens = TokenBatch(config=config, logprobs=lp, old_logprobs=old, advantages=adv, mask=bool_mask,
                        log_ratio=log_ratio, ratio=ratio, clamped_ratio=clamped, global_valid_tokens=gvt,
                        global_valid_seqs=gvs, scores=plan.scores, entropy=zero_masked(entropy, bool_mask),
                        sample_rewards=rewards, logit_values=logit_values)
    per_token, clip_active = per_token_policy_loss(config, tokens, plan, controls)

    extra_metrics: dict[str, float] = {}
    weights, extra_loss = _nemo_rl_terms(config, lp, old, bool_mask, zero_masked(reference_logprobs, bool_mask),
                                         zero_masked(generation_logprobs, bool_mask), rewards, gvt, gvs, extra_metrics)
    if weights is not None:
        per_token = per_token * weights
    loss = reduce_per_token(per_token, bool_mask, token_level=config.token_level_loss,
                            global_valid_tokens=gvt, global_valid_seqs=gvs)
    if extra_loss is not None:
        loss = loss + extra_loss
    return loss, _metrics(config, plan, controls, tokens, loss, clip_active, extra_metrics)


def _checked_logit_values(controls: ControlSet, values: Optional[dict], mask: torch.Tensor) -> dict:
    """The per-token values of the controls that need ``logits``, checked and zeroed on masked positions."""
    wanted = [c.name for c in controls if "logits" in c.needs]
    missing = [name for name in wanted if name not in (values or {})]
    if missing:
        raise ValueError(f"loss_fn controls {missing} need values computed from the current logits (`logit_values="
                         "controls.logit_values(logits_shard, ...)`; with NeMo-RL: nemo_rl.input_type=logit)")
    out = {}
    for name in wanted:
        out[name] = {}
        for key, tensor in values[name].items():
            if not isinstance(tensor, torch.Tensor) or tuple(tensor.shape) != tuple(mask.shape):
                raise ValueError(f"logit_values[{name!r}][{key!r}] must be a tensor of shape {tuple(mask.shape)}, got "
                                 f"{tuple(getattr(tensor, 'shape', ())) or type(tensor).__name__}")
            out[name][key] = zero_masked(tensor, mask)
    return out


def _nemo_rl_terms(config, lp, old, mask, reference, generation, rewards, gvt, gvs, metrics):
    """NeMo-RL's extras: ``(importance-sampling weights or None, extra loss or None)``; metrics added in place."""
    counts = dict(global_valid_tokens=gvt, global_valid_seqs=gvs)
    weights, extra = None, None
    if config.use_importance_sampling_correction:
        if generation is None:
            raise ValueError("loss_fn.use_importance_sampling_correction=True needs generation_logprobs")
        weights, m = nemo_rl_terms.importance_weights(config, old, generation, mask, **counts)
        metrics.update(m)
    if config.reference_policy_kl_penalty != 0 and not config.use_kl_in_reward:
        if reference is None:
            raise ValueError(
                f"loss_fn.reference_policy_kl_penalty={config.reference_policy_kl_penalty} needs reference_logprobs "
                "(or set it to 0, as the paper's recipes do)")
        extra, m = nemo_rl_terms.reference_kl_penalty(config, lp, reference, generation, mask, **counts)
        metrics.update(m)
    if config.positive_example_nll_weight > 0:
        if rewards is None:
            raise ValueError(f"loss_fn.positive_example_nll_weight={config.positive_example_nll_weight} needs the "
                             "per-sample rewards ([batch]) to find the correct samples")
        nll, m = nemo_rl_terms.positive_example_nll(config, lp, rewards, mask)
        extra = nll if extra is None else extra + nll
        metrics.update(m)
    return weights, extra


def _metrics(config, plan, controls, tokens, loss, clip_active, extra) -> dict[str, float]:
    """One dict: the loss's metrics (summable shares of the step's means; ``*_min`` / ``*_max`` extrema), then each
    control's, then NeMo-RL's extras."""
    mask = tokens.mask
    share = lambda x: float(global_token_sum(x.float(), mask, tokens.global_valid_tokens))  # noqa: E731
    selected = plan.selected & mask
    r, rc, lr = tokens.ratio.detach(), tokens.clamped_ratio.detach(), tokens.log_ratio.detach()
    low = lambda x: float(torch.where(mask, x, torch.full_like(x, _BIG)).min()) if any_valid else _BIG  # noqa: E731
    high = lambda x: float(torch.where(mask, x, torch.full_like(x, -_BIG)).max()) if any_valid else -_BIG  # noqa: E731
    any_valid = bool(mask.any())
    metrics = {
        "loss": float(loss.detach()),
        "clip_fraction": share(clip_active),
        "selected_fraction": share(selected),
        "kl_to_old": share(torch.expm1(lr) - lr),  # k3 estimate of KL(old || current), >= 0
        "ratio_mean": share(r),
        "ratio_clamped_mean": share(rc),
        "cov_mean": share(plan.scores),
        "entropy_proxy": share(-tokens.logprobs.detach()),
        "ratio_min": low(r),
        "ratio_max": high(r),
        "ratio_clamped_min": low(rc),
        "ratio_clamped_max": high(rc),
        "num_valid_tokens": float(mask.sum()),
    }
    if plan.global_selected_tokens is not None:
        metrics["cov_selected_mean"] = float((plan.scores.float() * selected.float()).sum()
                                             / safe_count(plan.global_selected_tokens, plan.scores.float()))
    # The step's diagnostics are per-step values: reported as this micro-batch's token share, they sum to the value.
    for key, value in plan.values.get(DIAGNOSTICS, {}).items():
        metrics[key] = tokens.step_constant(value)
    for control in controls:
        metrics.update(control.metrics(tokens, plan.values.get(control.name, {})))
    metrics.update(extra)
    return metrics
