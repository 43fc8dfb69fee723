"""The policy loss of one micro-batch: surrogate, entropy control, global normalisation, metrics.

Per token, with ``r = exp(l - l_old)`` (log-ratio clamped to ``+-log_ratio_clamp`` before ``exp``):

* ``ppo``:      ``max(-A r, -A clamp(r, 1 - eps_low, 1 + eps_high))``, then dual clip ``min(., -c A)`` for A < 0.
* ``kl_cov``:   ``-A r`` (the reference applies no PPO clip; ``kl_cov_ppo_clip`` puts the clipped surrogate
                under it) plus ``beta |log r|`` on the selected tokens.
* ``clip_cov``: the clipped surrogate, multiplied by 0 on the selected tokens (their gradient is detached;
                they still count in the denominator, as in the reference).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..config import LossConfig, loss_config
from ..parallel import GroupsLike, as_groups
from ..selection import (
    covariance_scores,
    select_clip_cov,
    select_tokens_with_scores,
    select_top_covariance,
    selection_quota,
    validate_token_inputs,
)

__all__ = ["policy_loss", "per_token_policy_loss", "reduce_per_token"]


def _ratios(config: LossConfig, logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor):
    """``(log_ratio, ratio, clamped_ratio)`` per NeMo-RL's ratio options."""
    if config.force_on_policy_ratio:
        # ratio == 1 in value, gradient of log pi still flows.
        log_ratio = logprobs - logprobs.detach()
        ratio = torch.exp(log_ratio)
        return log_ratio, ratio, ratio
    if config.disable_ppo_ratio:
        # REINFORCE: the surrogate is -A * log pi.
        return torch.zeros_like(logprobs), logprobs, logprobs
    log_ratio = torch.clamp(logprobs - old_logprobs, -config.log_ratio_clamp, config.log_ratio_clamp)
    if config.sequence_level_importance_ratios:
        # GSPO: one ratio per sequence, the geometric mean of its token ratios.
        maskf = mask.to(log_ratio.dtype)
        seq = (log_ratio * maskf).sum(-1, keepdim=True) / maskf.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = seq.expand_as(log_ratio)
    ratio = torch.exp(log_ratio)
    return log_ratio, ratio, ratio.clamp(1.0 - config.ratio_clip_min, 1.0 + config.ratio_clip_max)


def _clipped_surrogate(config: LossConfig, advantages, ratio, clamped, logprobs):
    """PPO's pessimistic surrogate (or CISPO's), with dual clip; returns ``(loss, clip_active)``."""
    if config.use_cispo:
        loss = -advantages * clamped.detach() * logprobs
        active = clamped.detach() != ratio.detach()
    else:
        unclipped, clipped = -advantages * ratio, -advantages * clamped
        loss = torch.maximum(unclipped, clipped)
        active = clipped.detach() > unclipped.detach()
    if config.ratio_clip_c is not None:
        dual = -advantages * config.ratio_clip_c
        dual_active = (advantages < 0) & (dual < loss.detach())
        loss = torch.where(advantages < 0, torch.minimum(loss, dual), loss)
        active = active | dual_active
    return loss, active


def per_token_policy_loss(
    config: LossConfig,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    selected: torch.Tensor,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-token loss (fp32, unmasked) and per-token diagnostics, given the selected set."""
    lp, old, adv = logprobs.float(), old_logprobs.float().detach(), advantages.float().detach()
    log_ratio, ratio, clamped = _ratios(config, lp, old, mask)
    if config.method == "kl_cov" and not config.kl_cov_ppo_clip:
        loss = -adv * ratio
        clip_active = torch.zeros_like(mask)
    else:
        loss, clip_active = _clipped_surrogate(config, adv, ratio, clamped, lp)
    if config.method == "kl_cov":
        loss = loss + torch.where(selected, config.kl_cov_coef * log_ratio.abs(), torch.zeros_like(loss))
    elif config.method == "clip_cov":
        loss = loss * (~selected).to(loss.dtype)
    return loss, {"log_ratio": log_ratio.detach(), "ratio": ratio.detach(), "clip_active": clip_active}


def reduce_per_token(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    token_level: bool,
    global_valid_tokens: torch.Tensor | float,
    global_valid_seqs: torch.Tensor | float,
) -> torch.Tensor:
    """NeMo-RL's global normalisation: ``sum(v * mask) / global_valid_tokens`` (token level) or the sum of
    per-sequence masked means over ``global_valid_seqs`` (sequence level)."""
    maskf = mask.to(values.dtype)
    if token_level:
        return (values * maskf).sum() / global_valid_tokens
    per_seq = (values * maskf).sum(-1) / maskf.sum(-1).clamp(min=1)
    return per_seq.sum() / global_valid_seqs


def _per_call_selection(config, logprobs, advantages, mask, clip_active, token_uids, step):
    """``scope: microbatch``: the reference's selection on this call's tokens alone (current detached
    log-probs, per-call means, no communication). Returns ``(selected, scores)``."""
    lp, adv = logprobs.detach().float(), advantages.detach().float()
    if not bool(mask.any()):
        return torch.zeros_like(mask), torch.zeros_like(lp)
    x = adv if config.cov_form == "natural" else torch.exp(lp) * adv
    scores = (lp - lp[mask].mean()) * (x - x[mask].mean())
    scores = torch.where(mask, scores, torch.zeros_like(scores))
    k = selection_quota(config.selection_ratio, int(mask.sum()))
    if config.method == "kl_cov":
        return select_top_covariance(scores, mask, token_uids, k), scores
    # The reference drops tokens the PPO clip already clipped before drawing the random subset.
    candidates = mask & ~clip_active & (scores > config.clip_cov_lb) & (scores < config.clip_cov_ub)
    return select_clip_cov(candidates, token_uids, k, seed=config.seed, step=step), scores


def _regularizers(config, logprobs, old_logprobs, mask, reference_logprobs, generation_logprobs, rewards,
                  global_valid_tokens, global_valid_seqs):
    """NeMo-RL's extras (importance-sampling correction, reference KL, positive-example NLL).

    Returns ``(per_token_weights or None, extra_loss scalar or None, metrics)``.
    """
    want_is = config.use_importance_sampling_correction
    want_kl = config.reference_policy_kl_penalty != 0 and not config.use_kl_in_reward
    want_nll = config.positive_example_nll_weight > 0
    if not (want_is or want_kl or want_nll):
        return None, None, {}
    from . import regularizers  # NeMo-RL-compatible extras, kept apart from the entropy controls

    counts = dict(global_valid_tokens=global_valid_tokens, global_valid_seqs=global_valid_seqs)
    weights, extra, metrics = None, None, {}
    if want_is:
        if generation_logprobs is None:
            raise ValueError("loss_fn.use_importance_sampling_correction=True needs generation_logprobs")
        weights, m = regularizers.importance_weights(config, old_logprobs, generation_logprobs, mask, **counts)
        metrics.update(m)
    if want_kl:
        if reference_logprobs is None:
            raise ValueError(
                f"loss_fn.reference_policy_kl_penalty={config.reference_policy_kl_penalty} needs reference_logprobs "
                "(or set it to 0, as the paper's recipes do)"
            )
        kl, m = regularizers.reference_kl_penalty(config, logprobs, reference_logprobs, generation_logprobs, mask,
                                                  **counts)
        extra = kl if extra is None else extra + kl
        metrics.update(m)
    if want_nll:
        if rewards is None:
            raise ValueError(f"loss_fn.positive_example_nll_weight={config.positive_example_nll_weight} needs the "
                             "per-sample rewards ([batch]) to find the correct samples")
        nll, m = regularizers.positive_example_nll(config, logprobs, rewards, mask)
        extra = nll if extra is None else extra + nll
        metrics.update(m)
    return weights, extra, metrics


def policy_loss(
    config: LossConfig | Any,
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
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
        mask: valid tokens (bool or 0/1): NeMo-RL's ``token_mask[:, 1:] * sample_mask[:, None]``.
        selected: ``scope: batch``: the mask from :func:`~nemo_entropy.selection.select_tokens` over the
            whole optimizer step. If omitted with ``scope: batch``, the selection is made over *this call's*
            tokens across ``groups`` (exact only when one call holds the whole step). Ignored for ``ppo``.
            With ``scope: microbatch`` it must be omitted: the reference's per-call selection is reproduced.
        scores: covariance scores for the metrics (``covariance_scores`` over the step); computed over this
            call when omitted.
        global_valid_tokens / global_valid_seqs: valid tokens / sequences of the whole optimizer step over all
            DP ranks. Default: this call's counts summed over ``groups``.
        global_selected_tokens: selected tokens of the whole step (for ``cov_selected_mean``); default: this
            call's count summed over ``groups``.
        groups: ``None`` (one process), the token-group ``ProcessGroup``, or ``ParallelGroups``.
        token_uids: int64 [batch, length] layout-independent token ids (Clip-Cov's hash keys; default: the
            flat position in this call).
        step: optimizer step (Clip-Cov's hash keys).
        reference_logprobs / generation_logprobs: for NeMo-RL's reference KL and importance-sampling keys.
        rewards: per-sample rewards [batch], for ``positive_example_nll_weight`` (VAPO).

    Returns:
        ``(loss, metrics)``; every metric is pre-divided by the global count so that summing over
        micro-batches and DP ranks gives the batch value, except ``*_min`` / ``*_max``.
    """
    config = config if isinstance(config, LossConfig) else loss_config(config)
    g = as_groups(groups)
    # Collectives happen here only when the caller leaves counts, scores or the batch selection to us. Then
    # every rank must agree that the inputs are valid before entering them, or one rank's error would leave
    # the others waiting in a collective.
    issues_collectives = g.token_world_size > 1 and (
        global_valid_tokens is None or global_valid_seqs is None or global_selected_tokens is None
        or scores is None or (config.method != "ppo" and config.scope == "batch" and selected is None))
    try:
        bool_mask = validate_token_inputs(
            mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, token_uids=token_uids,
            reference_logprobs=reference_logprobs, generation_logprobs=generation_logprobs,
        )
        local_error = None
    except (TypeError, ValueError) as err:
        if not issues_collectives:
            raise
        local_error = err
    if issues_collectives:
        failed = g.token_all_reduce_sum(torch.tensor([0 if local_error is None else 1], dtype=torch.int64))
        if local_error is not None:
            raise local_error
        if int(failed[0]):
            raise ValueError(f"{int(failed[0])} other rank(s) of the token group rejected their loss inputs "
                             "(their error says why); stopping here instead of waiting in a collective")
    if selected is not None:
        if selected.shape != bool_mask.shape or selected.dtype != torch.bool:
            raise ValueError(f"selected must be a bool tensor of shape {tuple(bool_mask.shape)}, "
                             f"got {selected.dtype} {tuple(selected.shape)}")
        if config.scope == "microbatch" and config.method != "ppo":
            raise ValueError("loss_fn.scope='microbatch' selects per call: do not pass `selected` "
                             "(use scope='batch' for a precomputed selection)")
    if token_uids is None:
        token_uids = torch.arange(bool_mask.numel(), device=bool_mask.device).reshape(bool_mask.shape)

    seq_valid = bool_mask.any(-1) if bool_mask.dim() > 1 else bool_mask.any().reshape(1)
    lp = logprobs.float()
    if config.method == "ppo":
        chosen = torch.zeros_like(bool_mask)
    elif config.scope == "microbatch":
        # The reference's Clip-Cov skips tokens the PPO clip already clipped: their status comes first.
        _, ratio, clamped = _ratios(config, lp.detach(), old_logprobs.float().detach(), bool_mask)
        _, clip_active_pre = _clipped_surrogate(config, advantages.float().detach(), ratio, clamped, lp.detach())
        chosen, per_call_scores = _per_call_selection(config, logprobs, advantages, bool_mask, clip_active_pre,
                                                      token_uids, step)
        scores = per_call_scores if scores is None else scores
    elif selected is None:
        chosen, step_scores = select_tokens_with_scores(config, old_logprobs, advantages, bool_mask,
                                                        token_uids=token_uids, step=step, groups=g)
        scores = step_scores if scores is None else scores
    else:
        chosen = selected & bool_mask
    if scores is None:
        scores = covariance_scores(old_logprobs, advantages, bool_mask, groups=g, form=config.cov_form)

    counts = torch.stack([bool_mask.sum(), seq_valid.sum(), chosen.sum()]).to(torch.float64)
    if global_valid_tokens is None or global_valid_seqs is None or global_selected_tokens is None:
        counts = g.token_all_reduce_sum(counts)
    gvt = counts[0].float() if global_valid_tokens is None else global_valid_tokens
    gvs = counts[1].float() if global_valid_seqs is None else global_valid_seqs
    gsel = counts[2].float() if global_selected_tokens is None else global_selected_tokens
    gvt_t = torch.as_tensor(gvt, dtype=torch.float32)
    gvs_t = torch.as_tensor(gvs, dtype=torch.float32)
    gsel_t = torch.as_tensor(gsel, dtype=torch.float32)

    per_token, aux = per_token_policy_loss(config, logprobs, old_logprobs, advantages, bool_mask, chosen)
    weights, extra_loss, extra_metrics = _regularizers(
        config, lp, old_logprobs.float(), bool_mask, reference_logprobs, generation_logprobs, rewards,
        gvt_t, gvs_t,
    )
    if weights is not None:
        per_token = per_token * weights
    # Guard the division for a rank or micro-batch with no valid token at all (loss 0, gradient 0).
    safe = lambda c: torch.where(c > 0, c, torch.ones_like(c))  # noqa: E731
    loss = reduce_per_token(per_token, bool_mask, token_level=config.token_level_loss,
                            global_valid_tokens=safe(gvt_t), global_valid_seqs=safe(gvs_t))
    if extra_loss is not None:
        loss = loss + extra_loss

    maskf = bool_mask.float()
    r, lr = aux["ratio"], aux["log_ratio"]
    tok = lambda x: (x.float() * maskf).sum() / safe(gvt_t)  # noqa: E731
    big = torch.finfo(torch.float32).max
    summed = torch.stack([
        loss.detach(),
        tok(aux["clip_active"]),
        tok(chosen),
        tok(torch.expm1(lr) - lr),  # k3 estimate of KL(old || current), >= 0
        tok(r),
        tok(scores),
        (scores.float() * chosen.float()).sum() / safe(gsel_t),
        tok(-lp.detach()),
        torch.where(bool_mask, r, torch.full_like(r, big)).min() if bool_mask.any() else torch.tensor(big),
        torch.where(bool_mask, r, torch.full_like(r, -big)).max() if bool_mask.any() else torch.tensor(-big),
        bool_mask.sum().float(),
    ]).tolist()
    names = ["loss", "clip_fraction", "selected_fraction", "kl_to_old", "ratio_mean", "cov_mean",
             "cov_selected_mean", "entropy_proxy", "ratio_min", "ratio_max", "num_valid_tokens"]
    metrics = dict(zip(names, summed))
    metrics.update({k: (float(v) if torch.is_tensor(v) else v) for k, v in extra_metrics.items()})
    return loss, metrics
