"""The paper's covariance diagnostics of an optimizer step, exact over the token group (``covariance_diagnostics``).

The plan (:func:`nemo_entropy.plan.build_step_plan`) computes them from what it already has: after its one
all-reduce (the exact means) and the covariance scores ``c_i``, each rank sums, exactly in fixed point, its ``c_i``
(whose total is the step's covariance, ``sum l X - N mean l mean X`` without that form's cancellation) and, when
the plan has the old policy's per-token entropy ``H`` and ``C = Cov_pi(log pi, pi)``, ``A_i (p_i (l_i + H_i) - C_i)``
(Theorem 1 for the step's sampled tokens), and those two sums ride the all-gather of the top 2% of the
scores (:func:`concentration_top_k`): no collective of their own, nothing added to the all-reduce.
:func:`covariance_diagnostics` turns them into the step's values, which the loss reports as token shares
under the plan's :data:`DIAGNOSTICS` entry. ``nemo_entropy.law.concentration`` reads runs with the same quota rule.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from .exact import (FIXED_POINT_BITS, FixedPointAccumulator, Offer, as_rows, fixed_point_sum, keep_valid,
                    masked_offer, merge_offers, row_chunks, scores_from_means, selection_quota, too_large_message)

__all__ = ["DIAGNOSTICS", "CONCENTRATION_FRACTIONS", "ScoreTop", "local_diagnostic_sums",
           "scores_and_diagnostic_sums", "concentration_top_k", "fraction_tag",
           "concentration_sums", "covariance_diagnostics", "diagnostic_metric_names"]

DIAGNOSTICS = "diagnostics"
"""The plan values' name for the step's diagnostics (not a control name)."""
CONCENTRATION_FRACTIONS = (0.0002, 0.002, 0.02)
"""The fractions of the covariance-concentration diagnostics (the paper's 0.02%, and 0.2%, 2%)."""


def local_diagnostic_sums(scores: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                          mask: torch.Tensor, mean_l: torch.Tensor, world_size: int,
                          theorem_inputs=None) -> torch.Tensor:
    """This rank's exact fixed-point sums ``[sum c_i, sum A_i (p_i (l_i + H_i) - C_i)]`` (int64, units of 2**-20)
    and its problem flags ``[NaN or inf, too large]``, for the all-gather of :func:`concentration_top_k`.

    ``scores`` are 0 on masked tokens. ``theorem_inputs`` are the old policy's per-token ``(H, C)`` (entropy and
    ``C = Cov_{a~pi}(log pi(a), pi(a))``); without them the second sum is 0 and Theorem 1 is not reported
    (:func:`covariance_diagnostics`). Both sums are elementwise functions of per-token values, so every layout sums
    the same integers."""
    sum_c, problem_c = fixed_point_sum(scores, None, world_size)
    l = old_logprobs.detach().float()
    if theorem_inputs is None:
        d = torch.zeros_like(l)
    else:  # A (p (l + H) - C)
        entropy, cov = (t.detach().float() for t in theorem_inputs)
        d = torch.exp(l).mul_(torch.add(l, entropy)).sub_(cov).mul_(advantages.detach().float())
    sum_d, problem_d = fixed_point_sum(d, mask, world_size)
    flags = [int(1 in (problem_c, problem_d)), int(2 in (problem_c, problem_d))]
    return torch.cat([torch.stack([sum_c, sum_d]), torch.tensor(flags, dtype=torch.int64, device=sum_c.device)])


def scores_and_diagnostic_sums(old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                               mean_l: torch.Tensor, mean_x: torch.Tensor, form: str, world_size: int,
                               theorem_inputs=None, out: Optional[torch.Tensor] = None):
    """``(scores_from_means(...), local_diagnostic_sums(scores, ...))`` in one pass over row chunks: each chunk's
    scores are summed (and Theorem 1's terms formed and summed, only when ``theorem_inputs`` are given) while they
    are in cache. The same bits as the two calls (the same operations on every value; exact sums)."""
    tensors = [old_logprobs, advantages] + list(theorem_inputs or ())
    if any(t.dtype == torch.float64 for t in tensors) or mask.dim() == 0 or mask.numel() == 0:
        scores = scores_from_means(old_logprobs, advantages, mask, mean_l, mean_x, form, out=out)
        return scores, local_diagnostic_sums(scores, old_logprobs, advantages, mask, mean_l, world_size,
                                             theorem_inputs=theorem_inputs)
    count = 1 if theorem_inputs is None else 2
    scale = float(1 << FIXED_POINT_BITS)
    l_rows, a_rows = as_rows(old_logprobs.detach()), as_rows(advantages.detach())
    h_rows, c_rows = (None, None) if theorem_inputs is None else (as_rows(t.detach()) for t in theorem_inputs)
    first = row_chunks(mask.shape)[0]
    work = torch.empty((count + 1, first.stop - first.start, l_rows.shape[1]), dtype=torch.float32,
                       device=mask.device)
    acc = FixedPointAccumulator(count, mask.numel(), world_size)

    def on_chunk(chunk, scores, bits):
        w = work[:, :chunk.stop - chunk.start]
        torch.mul(scores, scale, out=w[0])
        if theorem_inputs is not None:  # A (p (l + H) - C), as local_diagnostic_sums forms it
            l, d = l_rows[chunk].float(), w[1]
            torch.exp(l, out=d).mul_(torch.add(l, h_rows[chunk].float(), out=w[2]))
            keep_valid(d.sub_(c_rows[chunk].float()).mul_(a_rows[chunk].float()), bits).mul_(scale)
            d.round_()
        w[0].round_()
        acc.add(w)

    scores = scores_from_means(old_logprobs, advantages, mask, mean_l, mean_x, form, out=out, on_chunk=on_chunk)
    done = acc.finish()
    if None in done:  # values too large for a chunk's float64 sum: the unchunked way
        return scores, local_diagnostic_sums(scores, old_logprobs, advantages, mask, mean_l, world_size,
                                             theorem_inputs=theorem_inputs)
    (sum_c, problem_c), (sum_d, problem_d) = done[0], (done[1] if count == 2 else (torch.zeros_like(done[0][0]), 0))
    flags = [int(1 in (problem_c, problem_d)), int(2 in (problem_c, problem_d))]
    return scores, torch.cat([torch.stack([sum_c, sum_d]),
                              torch.tensor(flags, dtype=torch.int64, device=sum_c.device)])


class ScoreTop(NamedTuple):
    """The top 2% of the step's covariance scores: this rank's offer and the group's merged answer."""

    offer: Offer
    priority: torch.Tensor
    """float64, descending (padded with -inf when the step has fewer tokens)."""
    uids: torch.Tensor
    mine: torch.Tensor
    """bool: the merged entries this rank offered (ties of repeated uids are split by rank)."""
    sums: Optional[torch.Tensor] = None
    """float64 ``[sum c_i, sum (l_i - mean l) p_i A_i]`` over the token group (:func:`local_diagnostic_sums`)."""


def concentration_top_k(scores: torch.Tensor, mask: torch.Tensor, uids: torch.Tensor, n_tokens: int,
                        n_local: Optional[int], groups, local_sums: torch.Tensor) -> Optional[ScoreTop]:
    """The top 2% of the step's covariance scores over its valid tokens (``n_tokens`` over the group, ``n_local``
    here) and the group's diagnostic sums from every rank's ``local_sums`` (:func:`local_diagnostic_sums`), in one
    all-gather; None when the step has no valid token (agreed by every rank: nobody enters the all-gather).
    Problems flagged by any rank make every rank raise, after the all-gather."""
    if n_tokens == 0:
        return None
    k = selection_quota(max(CONCENTRATION_FRACTIONS), n_tokens)
    offer = masked_offer(scores, mask, uids, k, n_local)
    top_p, top_u, mine, every_rank = merge_offers(offer, k, groups, extra=local_sums)
    for column, problem in ((2, "NaN or inf"), (3, "too large")):
        ranks = every_rank[:, column].nonzero().reshape(-1).tolist()
        if ranks and problem == "NaN or inf":
            raise ValueError(f"the covariance diagnostics' per-token values have NaN or inf on token-group rank(s) "
                             f"{ranks}")
        if ranks:
            raise ValueError(too_large_message(ranks))
    sums = every_rank[:, :2].sum(0).double() / float(1 << FIXED_POINT_BITS)
    return ScoreTop(offer, top_p, top_u, mine, sums)


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


def covariance_diagnostics(top: Optional[ScoreTop], n_tokens: int, theorem: bool = True) -> dict[str, float]:
    """The paper's diagnostics of one step, exact over the token group, from ``top``, the merged top 2% of the
    scores and the group's sums (:func:`concentration_top_k`).

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
    total, theorem_1 = (float(t) for t in top.sums)
    n = float(n_tokens)
    out = {"cov_overall_mean": total / n}
    for fraction, k, top_sum in concentration_sums(top.priority, n_tokens):
        tag = fraction_tag(fraction)
        out[f"cov_top_{tag}_share"] = top_sum / total if total != 0.0 else 0.0
        out[f"cov_top_{tag}_mean"] = top_sum / k
    if theorem:
        out["entropy_change_predicted"] = -theorem_1 / n
    return out


def diagnostic_metric_names() -> list[str]:
    """The metric names :func:`covariance_diagnostics` produces (token shares in the loss's metrics)."""
    names = ["cov_overall_mean", "entropy_change_predicted"]
    for fraction in CONCENTRATION_FRACTIONS:
        names += [f"cov_top_{fraction_tag(fraction)}_share", f"cov_top_{fraction_tag(fraction)}_mean"]
    return names
