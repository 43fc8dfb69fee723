"""The policy loss of one micro-batch: surrogate, the active controls' per-token changes, NeMo-RL's extra terms,
global normalisation, metrics.

Per token, with the ratio of :func:`~nemo_entropy.surrogate.importance_ratio`:

1. each active control may reshape the advantages (``Control.shape_advantages``);
2. the surrogate is PPO's clipped one (:func:`~nemo_entropy.surrogate.clipped_surrogate`, with every
   NeMo-RL option) unless one active control owns it (KL-Cov's ``-A r``);
3. each control may weight it per token (Clip-Cov: 0 on its selected tokens) and add a per-token term (KL-Cov:
   ``beta |log r|`` on its selected tokens);
4. NeMo-RL's importance-sampling weight multiplies the result; the reference KL and the positive-example NLL add.

Whole-step quantities (counts, the covariance selection, coefficients) come from the step's plan
(:mod:`nemo_entropy.plan`); with a plan the loss issues no collective.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..config import LossConfig, loss_config
from ..controls import ControlSet, TokenBatch
from ..parallel import GroupsLike, as_groups
from ..covariance_diagnostics import DIAGNOSTICS
from ..plan import StepInputs, StepPlan, build_step_plan, reference_selection
from ..exact import exact_group_sums, validate_token_inputs
from . import nemo_rl_terms
from ..normalization import global_token_sum, reduce_per_token, safe_count, zero_masked
from ..surrogate import clipped_surrogate, importance_ratio

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
    weight, extra = None, None
    for control in controls:
        w, e = control.adjust(tokens, plan.values.get(control.name, {}), loss)
        if w is not None:
            weight = w if weight is None else weight * w
        if e is not None:
            extra = e if extra is None else extra + e
    if weight is not None:
        loss = loss * weight
    if extra is not None:
        loss = loss + extra
    return loss, clip_active


def _call_plan(config, logprobs, old_logprobs, advantages, mask, *, controls, groups, token_uids, step,
               selected, scores, global_valid_tokens, global_valid_seqs, global_selected_tokens) -> StepPlan:
    """The plan when the caller gives none (the convenience path): the pieces the caller passed, the rest computed
    over this call's tokens across ``groups``. Collectives happen here only for missing pieces, and every rank
    agrees on the validity of its inputs within the first of them."""
    g = as_groups(groups)
    selection = controls.selection
    micro = config.scope == "microbatch" and selection is not None
    caller_error = None
    if selected is not None and (not isinstance(selected, torch.Tensor) or selected.dtype != torch.bool
                                 or selected.shape != mask.shape):
        # Not raised yet: it rides the first collective, so the other ranks raise too instead of waiting in it.
        caller_error = ValueError(f"selected must be a bool tensor of shape {tuple(mask.shape)}, got "
                                  f"{getattr(selected, 'dtype', type(selected).__name__)} "
                                  f"{tuple(getattr(selected, 'shape', ()))}")
    given = {"global_valid_tokens": global_valid_tokens, "global_valid_seqs": global_valid_seqs}
    if selection is not None and not micro and selected is None:
        # Select over this call across the group: exact only when one call holds the whole step.
        plan = build_step_plan(config, StepInputs(old_logprobs, advantages, mask, token_uids), step=step, groups=g,
                               controls=controls)
        values = {name: dict(vals) for name, vals in plan.values.items()}
        if global_selected_tokens is not None:
            values[selection.name]["num_selected"] = float(global_selected_tokens)
        return StepPlan(step, _given(global_valid_tokens, plan.global_valid_tokens),
                        _given(global_valid_seqs, plan.global_valid_seqs),
                        plan.scores if scores is None else scores, values)
    if scores is None and not micro:
        plan = build_step_plan(config, StepInputs(old_logprobs, advantages, mask, token_uids), step=step, groups=g,
                               controls=ControlSet(loss_config(config, method="ppo", controls=())),
                               local_error=caller_error)
        scores, counted, caller_error = plan.scores, (plan.global_valid_tokens, plan.global_valid_seqs), None
    else:
        counted = None
    values = {}
    if selection is not None and selected is not None and caller_error is None:
        values[selection.name] = {"selected": selected & mask.bool(), "num_selected": global_selected_tokens}
    missing = [k for k, v in given.items() if v is None] + (
        ["selected"] if selection is not None and selected is not None and global_selected_tokens is None else [])
    if (missing and counted is None) or "selected" in missing or caller_error is not None:
        try:
            bool_mask, local_error = validate_token_inputs(mask, check_finite=False, old_logprobs=old_logprobs,
                                                           advantages=advantages), None
        except (TypeError, ValueError) as err:
            bool_mask, local_error = torch.zeros(mask.shape, dtype=torch.bool), err
        local_error = caller_error or local_error
        group = g if missing else None
        chosen = values[selection.name]["selected"] if "selected" in missing and local_error is None else bool_mask
        (n_tokens, n_seqs, n_selected), _ = exact_group_sums(
            [bool_mask.sum(), bool_mask.any(-1).sum(), chosen.sum() if "selected" in missing else torch.tensor(0)],
            [], bool_mask, group, local_error=local_error)
        counted = (n_tokens, n_seqs)
        if "selected" in missing:
            values[selection.name]["num_selected"] = float(n_selected)
    return StepPlan(step, _given(global_valid_tokens, counted[0] if counted else None),
                    _given(global_valid_seqs, counted[1] if counted else None), scores, values)


def _given(value, fallback) -> float:
    return float(value if value is not None else fallback)


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
    selected: Optional[torch.Tensor] = None,
    scores: Optional[torch.Tensor] = None,
    global_valid_tokens: Optional[torch.Tensor | float] = None,
    global_valid_seqs: Optional[torch.Tensor | float] = None,
    global_selected_tokens: Optional[torch.Tensor | float] = None,
    groups: GroupsLike = None,
    token_uids: Optional[torch.Tensor] = None,
    step: int = 0,
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
            collective**, and ``selected`` / ``scores`` / ``global_*`` / ``groups`` are not used.
        entropy: the current full-vocabulary entropy per token, with its gradient, for controls that need it
            (``entropy`` in their ``needs``).
        logit_values: for controls that need ``logits``: ``controls.logit_values(logits_shard, ...)`` of this
            micro-batch's current logits (``{control: {name: [batch, length] tensor}}``, with their gradient).
        controls: the stateful controls of the run (their state feeds the plan); default: fresh ones.

    Without a plan (a convenience path for one process and for callers that pass ``groups``), the plan is made
    from the pieces passed, the rest computed over this call's tokens across ``groups`` (collectives):
        selected: ``scope: batch``: the mask from :func:`~nemo_entropy.selection.select_tokens` over the whole
            optimizer step. If omitted, the selection is made over *this call's* tokens across ``groups`` (exact
            only when one call holds the whole step). With ``scope: microbatch`` it must be omitted: the
            reference's per-call selection is reproduced.
        scores: covariance scores for the metrics; computed over this call when omitted.
        global_valid_tokens / global_valid_seqs: valid tokens / sequences of the whole optimizer step over all
            DP ranks. Default: this call's counts summed over ``groups``.
        global_selected_tokens: selected tokens of the whole step (for ``cov_selected_mean``); default: this
            call's count summed over ``groups``.
        groups: ``None`` (one process), the token-group ``ProcessGroup``, or ``ParallelGroups``.
        token_uids: int64 [batch, length] layout-independent token ids (Clip-Cov's hash keys; default: unique
            over the group but layout dependent, see ``plan.default_token_uids``).
        step: optimizer step (Clip-Cov's hash keys).

    Always:
        reference_logprobs / generation_logprobs: for NeMo-RL's reference KL and importance-sampling keys.
        rewards: per-sample rewards [batch], for ``positive_example_nll_weight`` (VAPO).

    Returns:
        ``(loss, metrics)``; every metric is pre-divided by the global count so that summing over
        micro-batches and DP ranks gives the batch value, except ``*_min`` / ``*_max``.
    """
    config = config if isinstance(config, LossConfig) else loss_config(config)
    controls = controls if controls is not None else ControlSet(config)
    if selected is not None and config.scope == "microbatch" and controls.selection is not None:
        raise ValueError("loss_fn.scope='microbatch' selects per call: do not pass `selected` "
                         "(use scope='batch' for a precomputed selection)")
    if plan is None:
        plan = _call_plan(config, logprobs, old_logprobs, advantages, mask, controls=controls, groups=groups,
                          token_uids=token_uids, step=step, selected=selected, scores=scores,
                          global_valid_tokens=global_valid_tokens, global_valid_seqs=global_valid_seqs,
                          global_selected_tokens=global_selected_tokens)
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
