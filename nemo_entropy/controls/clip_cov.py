"""``clip_cov``: detach the gradient of a few high-covariance tokens (arXiv 2505.22617, section 4).

Candidates are the step's valid tokens with ``clip_cov_lb < c < clip_cov_ub``; ``max(1, floor(clip_cov_ratio *
N))`` of them (all if fewer) are drawn uniformly at random and their surrogate is multiplied by 0 (they still
count in the denominator, as in the reference). Every other token gets the PPO clipped surrogate; the paper's
recipes set ``ratio_clip_min = ratio_clip_max = 1``.

The random draw is "the candidates with the smallest 53-bit hash keys of ``(seed, step, token uid)``": no RNG
state, the same on every rank and TP/CP replica, reproducible after a resume. The reference also drops tokens
the PPO clip already clipped; at the policy that scores the batch the ratio is exactly 1, so in ``scope: batch``
none is, and ``scope: microbatch`` (the reference's per-call selection on current log-probs) drops them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..exact import hash_keys
from .base import ControlConfig
from .covariance import CovarianceSelection, check_ratio


@dataclass(frozen=True)
class ClipCovConfig(ControlConfig):
    clip_cov_ratio: float = 2e-4
    """Fraction (not percent) of the step's valid tokens Clip-Cov detaches: k = max(1, floor(ratio * N))
    (verl ``clip_cov_ratio``)."""
    clip_cov_lb: float = 1.0
    """Clip-Cov candidates have lb < c < ub (verl ``clip_cov_lb``)."""
    clip_cov_ub: float = 5.0
    """Upper bound of the candidates' covariance score (verl ``clip_cov_ub``)."""

    def validate(self) -> None:
        check_ratio("clip_cov_ratio", self.clip_cov_ratio)
        if self.clip_cov_lb >= self.clip_cov_ub:
            raise ValueError(f"loss_fn.clip_cov_lb={self.clip_cov_lb!r} must be < "
                             f"loss_fn.clip_cov_ub={self.clip_cov_ub!r}")


class ClipCov(CovarianceSelection):
    name = "clip_cov"
    config_class = ClipCovConfig
    ratio_key = "clip_cov_ratio"

    def choose(self, ctx, k: int) -> tuple[torch.Tensor, int]:
        candidates = ctx.mask & (ctx.scores > self.config.clip_cov_lb) & (ctx.scores < self.config.clip_cov_ub)
        if ctx.clip_active is not None:  # scope: microbatch, as the reference
            candidates = candidates & ~ctx.clip_active
        keys = hash_keys(ctx.token_uids, seed=self.loss_config.seed, step=ctx.step)
        return ctx.top_k(-keys.to(torch.float64), candidates, k)

    def adjust(self, tokens, values, surrogate):
        return (~values["selected"]).to(surrogate.dtype), None
