"""The paper's covariance diagnostics of an optimizer step, exact over the token group (``covariance_diagnostics``).

The plan (:func:`nemo_entropy.plan.build_step_plan`) adds three exact sums to its one all-reduce
(:func:`diagnostic_inputs`) and one all-gather of the top 2% of the covariance scores (:func:`concentration_top_k`);
:func:`covariance_diagnostics` turns them into the step's values, which the loss reports as token shares under
the plan's :data:`DIAGNOSTICS` entry. ``nemo_entropy.law.concentration`` reads runs with the same quota rule.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional

import torch

from .exact import Offer, masked_offer, merge_offers, selection_quota

__all__ = ["DIAGNOSTICS", "CONCENTRATION_FRACTIONS", "ScoreTop", "diagnostic_inputs", "concentration_top_k", "fraction_tag",
           "concentration_sums", "covariance_diagnostics", "diagnostic_metric_names"]

DIAGNOSTICS = "diagnostics"
"""The plan values' name for the step's diagnostics (not a control name)."""
CONCENTRATION_FRACTIONS = (0.0002, 0.002, 0.02)
"""The fractions of the covariance-concentration diagnostics (the paper's 0.02%, and 0.2%, 2%)."""


def diagnostic_inputs(old_logprobs: torch.Tensor, advantages: torch.Tensor, x: torch.Tensor, ok: bool,
                      empty: torch.Tensor) -> list[tuple[str, Any]]:
    """The extra exact sums of the diagnostics, for the plan's one all-reduce: ``sum l X`` (the total covariance)
    and, for Theorem 1's form, ``sum p A`` and ``sum l p A`` (``empty`` tensors when this rank's inputs are bad).
    Products are passed as pairs of factors: :func:`~nemo_entropy.exact.exact_group_sums` multiplies them in its
    work tensor instead of a fresh step-sized one."""
    if not ok:
        return [("logprobs x covariance input", empty), ("exp(logprobs) x advantages", empty),
                ("logprobs x exp(logprobs) x advantages", empty)]
    l = old_logprobs.detach().float()
    pa = torch.exp(l).mul_(advantages.detach().float())
    return [("logprobs x covariance input", (l, x.detach().float())), ("exp(logprobs) x advantages", pa),
            ("logprobs x exp(logprobs) x advantages", (l, pa))]


class ScoreTop(NamedTuple):
    """The top 2% of the step's covariance scores: this rank's offer and the group's merged answer."""

    offer: Offer
    priority: torch.Tensor
    """float64, descending (padded with -inf when the step has fewer tokens)."""
    uids: torch.Tensor
    mine: torch.Tensor
    """bool: the merged entries this rank offered (ties of repeated uids are split by rank)."""


def concentration_top_k(scores: torch.Tensor, mask: torch.Tensor, uids: torch.Tensor, n_tokens: int,
                        n_local: Optional[int], groups) -> Optional[ScoreTop]:
    """The top 2% of the step's covariance scores over its valid tokens (``n_tokens`` over the group, ``n_local``
    here; one all-gather), or None when the step has no valid token (agreed by every rank: nobody enters the
    all-gather)."""
    if n_tokens == 0:
        return None
    k = selection_quota(max(CONCENTRATION_FRACTIONS), n_tokens)
    offer = masked_offer(scores, mask, uids, k, n_local)
    return ScoreTop(offer, *merge_offers(offer, k, groups))


def fraction_tag(fraction: float) -> str:
    """``0.0002 -> "0.02pct"``: the fraction as a percent, for metric names."""
    return f"{fraction * 100:g}pct"


def concentration_sums(top: torch.Tensor, n: int, fractions=CONCENTRATION_FRACTIONS) -> list[tuple[float, int, float]]:
    """Per fraction ``f``: ``(f, k, sum of the k largest scores)`` with ``k = max(1, floor(f n))`` (the controls'
    quota, :func:`selection_quota`), from ``top``, the largest scores of ``n`` in descending order (at least the
    ``max(k)`` largest; -inf padding is dropped, and ``k`` is cut to what is left)."""
    running = torch.cumsum(top[torch.isfinite(top)].to(torch.float64), 0)
    out = []
    for fraction in fractions:
        k = min(selection_quota(fraction, n), int(running.numel()))
        out.append((float(fraction), k, float(running[k - 1])))
    return out


def covariance_diagnostics(top, n_tokens, mean_l, mean_x, sums) -> dict[str, float]:
    """The paper's diagnostics of one step, exact over the token group, from the plan's sums and ``top``, the
    merged top 2% of the scores (:func:`concentration_top_k`).

    * ``cov_top_<p>pct_share`` / ``_mean``: the share of the step's total covariance ``sum c_i`` held by the top
      ``max(1, floor(f N))`` tokens by score (f = 0.02%, 0.2%, 2%; 0 when the total is 0), and their mean;
      ``cov_overall_mean`` the mean of all scores (the paper: 5.654 against 0.003 for the top 0.02%).
    * ``entropy_change_predicted``: Theorem 1's ``-Cov(log pi, pi A)`` over the step's tokens, the predicted
      entropy change per unit step size (its sign and correlation with the observed change are what the paper
      reads; ``nemo-entropy law diagnose`` reports the correlation over a run).
    """
    if top is None:
        return {}
    sum_lx, sum_pa, sum_lpa = (float(t) for t in sums)
    n = float(n_tokens)
    total = sum_lx - n * float(mean_l) * float(mean_x)
    out = {"cov_overall_mean": total / n}
    for fraction, k, top_sum in concentration_sums(top.priority, n_tokens):
        tag = fraction_tag(fraction)
        out[f"cov_top_{tag}_share"] = top_sum / total if total != 0.0 else 0.0
        out[f"cov_top_{tag}_mean"] = top_sum / k
    out["entropy_change_predicted"] = -(sum_lpa / n - float(mean_l) * sum_pa / n)
    return out


def diagnostic_metric_names() -> list[str]:
    """The metric names :func:`covariance_diagnostics` produces (token shares in the loss's metrics)."""
    names = ["cov_overall_mean", "entropy_change_predicted"]
    for fraction in CONCENTRATION_FRACTIONS:
        names += [f"cov_top_{fraction_tag(fraction)}_share", f"cov_top_{fraction_tag(fraction)}_mean"]
    return names
