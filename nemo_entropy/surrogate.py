"""The importance ratio and the clipped surrogate, written once for every control and every NeMo-RL option."""

from __future__ import annotations

import torch

__all__ = ["importance_ratio", "clipped_surrogate"]


def importance_ratio(config, logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor):
    """``(log_ratio, ratio, clamped_ratio)`` per token, with NeMo-RL's ratio options.

    ``log r = l - l_old`` is clamped to ``[-log_ratio_clamp, log_ratio_clamp]`` before ``exp`` (one stale token
    cannot overflow the loss); ``force_on_policy_ratio``: ``r = exp(l - sg(l))`` (value 1, gradient of log pi);
    ``disable_ppo_ratio``: the surrogate uses ``log pi`` itself (REINFORCE); ``sequence_level_importance_ratios``
    (GSPO): one ratio per sequence, the geometric mean of its token ratios. ``clamped_ratio`` is PPO's
    ``clamp(r, 1 - ratio_clip_min, 1 + ratio_clip_max)``.
    """
    if config.force_on_policy_ratio:
        log_ratio = logprobs - logprobs.detach()
        ratio = torch.exp(log_ratio)
        return log_ratio, ratio, ratio
    if config.disable_ppo_ratio:
        return torch.zeros_like(logprobs), logprobs, logprobs
    log_ratio = torch.clamp(logprobs - old_logprobs, -config.log_ratio_clamp, config.log_ratio_clamp)
    if config.sequence_level_importance_ratios:
        maskf = mask.to(log_ratio.dtype)
        seq = (log_ratio * maskf).sum(-1, keepdim=True) / maskf.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = seq.expand_as(log_ratio)
    ratio = torch.exp(log_ratio)
    return log_ratio, ratio, ratio.clamp(1.0 - config.ratio_clip_min, 1.0 + config.ratio_clip_max)


def clipped_surrogate(config, advantages: torch.Tensor, ratio: torch.Tensor, clamped: torch.Tensor,
                      logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's pessimistic surrogate ``max(-A r, -A clamp(r))`` (or CISPO's ``-A sg(clamp(r)) log pi``), then dual
    clip ``min(., -c A)`` for ``A < 0``; returns ``(per-token loss, clip_active)``."""
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
