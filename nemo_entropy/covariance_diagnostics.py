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
                      empty: torch.Tensor, theorem_inputs=None) -> list[tuple[str, Any]]:
    """The extra exact sums of the diagnostics, for the plan's one all-reduce: ``sum l X`` (the total covariance)
    and, with ``theorem_inputs`` = the old policy's per-token ``(H, c)`` (entropy and ``Cov_pi(log pi, pi)``),
    Theorem 1's ``sum l p A``, ``sum H p A`` and ``sum c A`` (``empty`` tensors when this rank's inputs are bad).
    Products are passed as pairs of factors: :func:`~nemo_entropy.exact.exact_group_sums` multiplies them in its
    work tensor instead of a fresh step-sized one."""
    names = ["logprobs x covariance input"] + ([] if theorem_inputs is None else [
        "logprobs x exp(logprobs) x advantages", "old entropy x exp(logprobs) x advantages",
        "old Cov(log pi, pi) x advantages"])
    if not ok:
        return [(name, empty) for name in names]
    l = old_logprobs.detach().float()
    factors: list[Any] = [(l, x.detach().float())]
    if theorem_inputs is not None:
        entropy, cov = (t.detach().float() for t in theorem_inputs)
        pa = torch.exp(l).mul_(advantages.detach().float())
        factors += [(l, pa), (entropy, pa), (cov, advantages.detach().float())]
    return list(zip(names, factors))


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
    * ``entropy_change_predicted`` (when the plan has the old policy's per-token entropy ``H_t`` and
      ``c_t = Cov_{a~pi}(log pi(a), pi(a))``): the paper's Theorem 1 (Lemma 1 with the logit change of a tabular
      softmax policy-gradient step) for the step's own sampled tokens, per unit step size: the step moves the
      logits of token t's state by ``A_t (1[a = a_t] - pi(a))``, so
      ``dH ~= -mean_t A_t Cov_{a~pi}(log pi(a), 1[a = a_t] - pi(a)) = -mean_t A_t (p_t (l_t + H_t) - c_t)``.
      Its expectation over the sampled token is the theorem's ``-Cov(log pi, pi A)`` only when the advantage has
      mean 0 in every state; GRPO's sequence-level advantage does not (every token of a wrong answer has
      ``A < 0``), and the ``c_t`` term is what corrects for it (docs/engine.md, "Theorem 1, checked").
      Positive means entropy is predicted to rise.
    """
    if top is None:
        return {}
    sum_lx = float(sums[0])
    n = float(n_tokens)
    total = sum_lx - n * float(mean_l) * float(mean_x)
    out = {"cov_overall_mean": total / n}
    for fraction, k, top_sum in concentration_sums(top.priority, n_tokens):
        tag = fraction_tag(fraction)
        out[f"cov_top_{tag}_share"] = top_sum / total if total != 0.0 else 0.0
        out[f"cov_top_{tag}_mean"] = top_sum / k
    if len(sums) == 4:
        sum_lpa, sum_hpa, sum_ca = (float(t) for t in sums[1:])
        out["entropy_change_predicted"] = -(sum_lpa + sum_hpa - sum_ca) / n
    return out


def diagnostic_metric_names() -> list[str]:
    """The metric names :func:`covariance_diagnostics` produces (token shares in the loss's metrics)."""
    names = ["cov_overall_mean", "entropy_change_predicted"]
    for fraction in CONCENTRATION_FRACTIONS:
        names += [f"cov_top_{fraction_tag(fraction)}_share", f"cov_top_{fraction_tag(fraction)}_mean"]
    return names
