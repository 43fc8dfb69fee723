"""``kl_cov``: a ``beta |log r|`` penalty on the top-covariance tokens (arXiv 2505.22617, section 4).

Per token, with ``r = exp(l - l_old)``: ``-A r`` (the reference applies no PPO clip in KL-Cov; ``kl_cov_ppo_clip``
puts the clipped surrogate under it) plus ``kl_cov_coef * |log r|`` on the ``max(1, floor(kl_cov_ratio * N))``
tokens with the largest covariance score over the optimizer step (ties: smaller token uid first). The penalty
is zero on a fully on-policy update and pulls the selected tokens' probabilities back toward the generating
policy's. Paper recipes: ratio 2e-3 (7B), 2e-4 (32B), coef 1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .base import ControlConfig, bad_value
from .covariance import CovarianceSelection, check_ratio


@dataclass(frozen=True)
class KLCovConfig(ControlConfig):
    kl_cov_ratio: float = 2e-3
    """Fraction (not percent) of the step's valid tokens KL-Cov penalises: k = max(1, floor(ratio * N)).
    Paper: 2e-3 for 7B, 2e-4 for 32B (verl ``kl_cov_ratio``)."""
    kl_cov_coef: float = 1.0
    """beta of ``beta * |log r|`` on the selected tokens (verl ``ppo_kl_coef``; the reference's code and recipes
    use 1, one of its YAML files says 0.1)."""
    kl_cov_ppo_clip: bool = False
    """Put KL-Cov on top of the PPO clipped surrogate. The reference applies no clip in KL-Cov (false)."""

    def validate(self) -> None:
        check_ratio("kl_cov_ratio", self.kl_cov_ratio)
        if self.kl_cov_coef < 0:
            raise bad_value("kl_cov_coef", self.kl_cov_coef, ">= 0")


class KLCov(CovarianceSelection):
    name = "kl_cov"
    config_class = KLCovConfig
    exclusive: ClassVar[tuple[str, ...]] = ("covariance_selection", "surrogate")
    ratio_key = "kl_cov_ratio"

    def choose(self, ctx, k: int) -> tuple[torch.Tensor, int]:
        return ctx.top_k(ctx.scores, ctx.mask, k)

    def surrogate(self, tokens, values):
        if self.config.kl_cov_ppo_clip:
            return None
        return -tokens.advantages * tokens.ratio, torch.zeros_like(tokens.mask)

    def adjust(self, tokens, values, surrogate):
        penalty = self.config.kl_cov_coef * tokens.log_ratio.abs()
        return None, torch.where(values["selected"], penalty, torch.zeros_like(penalty))

    def metrics(self, tokens, values) -> dict[str, Any]:
        penalty = self.config.kl_cov_coef * tokens.log_ratio.detach().abs() * values["selected"]
        return {"kl_cov_penalty": float(tokens.token_sum(penalty))}

    def metric_normalizations(self) -> dict[str, str]:
        return {"kl_cov_penalty": "tokens"}
