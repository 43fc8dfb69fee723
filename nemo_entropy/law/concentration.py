"""Covariance concentration: how much of a step's covariance a few tokens hold.

The paper's observation behind Clip-Cov and KL-Cov: the per-token covariance scores
``c_i = (l_i - mean l)(A_i - mean A)`` are heavy-tailed; the top 0.02% of tokens average 5.654 against 0.003
over all tokens, so acting on a tiny fraction of tokens acts on most of the entropy-reducing covariance.
For each fraction ``f`` this reports, over the ``k = max(1, floor(f N))`` tokens with the largest scores
(the quota rule of :func:`nemo_entropy.exact.selection_quota`, the same ``k`` the controls select):

- ``share``: their sum over the sum of all N scores (the share of the total covariance they hold; it can
  exceed 1, or be negative, since scores of either sign add up to the total, and it is NaN when the
  total is exactly 0);
- ``top_mean``: their mean, to set against ``overall_mean``, the mean of all N scores.

Pure and local: the input is every valid token's score of one step on this process (in a DP setting,
gather the scores or use the exact distributed top-k of :mod:`nemo_entropy.exact` first). Sums are in
float64; the result does not depend on how ties at the k-th score are broken.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ..covariance_diagnostics import CONCENTRATION_FRACTIONS as DEFAULT_FRACTIONS
from ..covariance_diagnostics import concentration_sums, fraction_tag
from ..exact import selection_quota

__all__ = ["DEFAULT_FRACTIONS", "ConcentrationLevel", "covariance_concentration", "covariance_concentration_metrics",
           "fraction_tag"]


@dataclass(frozen=True)
class ConcentrationLevel:
    """The top ``fraction`` (``k`` of ``n`` tokens) by covariance score."""

    fraction: float
    k: int
    n: int
    share: float
    top_mean: float
    overall_mean: float


def covariance_concentration(scores, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> list[ConcentrationLevel]:
    """Concentration of a 1-D tensor of per-token covariance scores at each fraction (see the module doc).

    Raises ValueError naming ``scores`` (not 1-D, empty, non-finite) or the fraction (outside (0, 1]).
    """
    scores = torch.as_tensor(scores)
    if scores.dim() != 1:
        raise ValueError(f"scores must be a 1-D tensor of per-token covariance scores; got shape "
                         f"{tuple(scores.shape)}")
    n = scores.numel()
    if n == 0:
        raise ValueError("scores is empty: no valid token")
    if not scores.is_floating_point():
        scores = scores.to(torch.float64)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError(f"scores has {int((~torch.isfinite(scores)).sum())} non-finite values of {n}")
    for f in fractions:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not 0.0 < f <= 1.0:
            raise ValueError(f"concentration fraction {f!r} must be in (0, 1]")
    scores = scores.detach().to(torch.float64)
    # One sort of the largest max(k) scores serves every fraction: their running sums are the top-k sums.
    top = torch.topk(scores, max(selection_quota(f, n) for f in fractions), sorted=True).values
    total = float(scores.sum())
    overall_mean = total / n
    levels = []
    for f, k, top_sum in concentration_sums(top, n, fractions):
        share = top_sum / total if total != 0.0 else math.nan
        levels.append(ConcentrationLevel(fraction=float(f), k=k, n=n, share=share, top_mean=top_sum / k,
                                         overall_mean=overall_mean))
    return levels


def covariance_concentration_metrics(scores, fractions: Sequence[float] = DEFAULT_FRACTIONS) -> dict[str, float]:
    """The same as flat metrics: ``cov_top_<p>pct_share``, ``cov_top_<p>pct_mean`` per fraction and
    ``cov_overall_mean`` (e.g. ``cov_top_0.02pct_share`` for 0.0002)."""
    levels = covariance_concentration(scores, fractions)
    metrics = {}
    for level in levels:
        tag = fraction_tag(level.fraction)
        metrics[f"cov_top_{tag}_share"] = level.share
        metrics[f"cov_top_{tag}_mean"] = level.top_mean
    metrics["cov_overall_mean"] = levels[0].overall_mean
    return metrics
