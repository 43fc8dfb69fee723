"""nemo_entropy.selection on one process: against brute force, uniformity of Clip-Cov, input errors."""

import math

import pytest
import torch

from nemo_entropy.config import loss_config
from nemo_entropy.exact import hash_keys
from nemo_entropy.selection import covariance_scores, select_tokens, token_uids_for


def _batch(seed=0, batch=12, length=40, masked_rows=(3,)):
    gen = torch.Generator().manual_seed(seed)
    logprobs = -torch.rand(batch, length, generator=gen) * 4
    advantages = torch.randn(batch, 1, generator=gen).expand(batch, length).contiguous()
    mask = torch.rand(batch, length, generator=gen) > 0.25
    for row in masked_rows:
        mask[row] = False
    uids = token_uids_for(torch.arange(batch), length)
    return logprobs, advantages, mask, uids


def _brute_force_scores(logprobs, advantages, mask, form="natural"):
    l, a = logprobs.double()[mask], advantages.double()[mask]
    x = a if form == "natural" else torch.exp(l) * a
    return (l - l.mean()) * (x - x.mean())


@pytest.mark.parametrize("form", ["natural", "vanilla"])
def test_covariance_scores_match_float64(form):
    lp, adv, mask, _ = _batch()
    scores = covariance_scores(lp, adv, mask, form=form)
    assert scores.dtype == torch.float32
    torch.testing.assert_close(scores[mask].double(), _brute_force_scores(lp, adv, mask, form), rtol=1e-5, atol=1e-5)
    assert bool((scores[~mask] == 0).all())


@pytest.mark.parametrize("ratio", [1e-3, 0.05, 0.3])
def test_kl_cov_selects_the_brute_force_top_k(ratio):
    lp, adv, mask, uids = _batch(seed=1)
    cfg = loss_config({"method": "kl_cov", "kl_cov_ratio": ratio})
    chosen = select_tokens(cfg, lp, adv, mask, token_uids=uids, step=0)
    n = int(mask.sum())
    k = max(1, int(n * ratio))
    expected = torch.zeros(n, dtype=torch.bool)
    expected[torch.topk(_brute_force_scores(lp, adv, mask), k).indices] = True
    assert int(chosen.sum()) == k
    assert torch.equal(chosen[mask], expected)
    assert not bool((chosen & ~mask).any())


def test_kl_cov_ties_break_by_smaller_uid():
    # All advantages equal except two samples: many exactly tied scores.
    lp = torch.full((6, 5), -1.0)
    lp[0, 0] = -0.5
    adv = torch.zeros(6, 5)
    adv[0] = 1.0
    adv[1] = 1.0
    mask = torch.ones(6, 5, dtype=torch.bool)
    uids = token_uids_for(torch.tensor([5, 4, 3, 2, 1, 0]), 5)  # uids not in row order
    cfg = loss_config({"method": "kl_cov", "kl_cov_ratio": 0.2})  # k = 6 of 30 tokens
    chosen = select_tokens(cfg, lp, adv, mask, token_uids=uids, step=0)
    scores = covariance_scores(lp, adv, mask).double()
    order = sorted(range(30), key=lambda i: (-scores.flatten()[i].item(), uids.flatten()[i].item()))
    expected = torch.zeros(30, dtype=torch.bool)
    expected[order[:6]] = True
    assert torch.equal(chosen.flatten(), expected)


def test_clip_cov_picks_k_candidates_in_bounds():
    lp, adv, mask, uids = _batch(seed=2, batch=32, length=64)
    cfg = loss_config({"method": "clip_cov", "clip_cov_ratio": 0.01, "clip_cov_lb": 0.1, "clip_cov_ub": 2.0})
    chosen = select_tokens(cfg, lp, adv, mask, token_uids=uids, step=7)
    scores = covariance_scores(lp, adv, mask)
    candidates = mask & (scores > 0.1) & (scores < 2.0)
    k = max(1, int(int(mask.sum()) * 0.01))
    assert int(chosen.sum()) == min(k, int(candidates.sum()))
    assert not bool((chosen & ~candidates).any())
    # Reproducible for the same (seed, step); a different step draws another subset.
    again = select_tokens(cfg, lp, adv, mask, token_uids=uids, step=7)
    other = select_tokens(cfg, lp, adv, mask, token_uids=uids, step=8)
    assert torch.equal(chosen, again) and not torch.equal(chosen, other)


def test_clip_cov_takes_all_candidates_when_fewer_than_k():
    lp, adv, mask, uids = _batch(seed=3)
    cfg = loss_config({"method": "clip_cov", "clip_cov_ratio": 1.0, "clip_cov_lb": 0.5, "clip_cov_ub": 5.0})
    chosen = select_tokens(cfg, lp, adv, mask, token_uids=uids, step=0)
    scores = covariance_scores(lp, adv, mask)
    assert torch.equal(chosen, mask & (scores > 0.5) & (scores < 5.0))


def test_clip_cov_choice_is_uniform_over_candidates():
    """Chi-square over 3000 draws of 5 of 50 candidates: each is expected 300 times.

    With 49 degrees of freedom the statistic exceeds 85.35 with probability 0.001 under uniformity.
    Pairs are checked too: P(both of two fixed candidates) = (5*4)/(50*49).
    """
    n_cand, k, draws = 50, 5, 3000
    uids = torch.arange(n_cand, dtype=torch.int64) * 977 + 13
    counts = torch.zeros(n_cand)
    pair = 0
    for step in range(draws):
        keys = hash_keys(uids, seed=123, step=step)
        picked = torch.topk(-keys.double(), k).indices
        counts[picked] += 1
        pair += int(bool((picked == 0).any()) and bool((picked == 1).any()))
    expected = draws * k / n_cand
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 85.35, f"chi-square {chi2:.1f} over 49 dof: not uniform"
    p_pair = k * (k - 1) / (n_cand * (n_cand - 1))
    sd = math.sqrt(draws * p_pair * (1 - p_pair))
    assert abs(pair - draws * p_pair) < 4.5 * sd


def test_select_tokens_through_the_api_is_uniform_across_seeds():
    """The full select_tokens path (not just the keys): selection frequency per candidate is flat."""
    lp, adv, mask, uids = _batch(seed=4, batch=4, length=16, masked_rows=())
    cfg0 = dict(method="clip_cov", clip_cov_ratio=0.05, clip_cov_lb=-100.0, clip_cov_ub=100.0)  # all candidates
    counts = torch.zeros_like(lp)
    draws = 600
    for seed in range(draws):
        counts += select_tokens(loss_config(cfg0, seed=seed), lp, adv, mask, token_uids=uids, step=0).float()
    k = max(1, int(int(mask.sum()) * 0.05))
    expected = draws * k / int(mask.sum())
    chi2 = float((((counts[mask] - expected) ** 2) / expected).sum())
    dof = int(mask.sum()) - 1
    assert chi2 < dof + 5 * math.sqrt(2 * dof), f"chi-square {chi2:.1f} over {dof} dof"


def test_ppo_selects_nothing_and_empty_batch_is_fine():
    lp, adv, mask, uids = _batch()
    assert not bool(select_tokens(loss_config({"method": "ppo"}), lp, adv, mask, token_uids=uids, step=0).any())
    empty = torch.zeros_like(mask)
    assert not bool(select_tokens(loss_config({}), lp, adv, empty, token_uids=uids, step=0).any())


def test_hash_keys_are_53_bit_and_pure():
    uids = torch.arange(10_000, dtype=torch.int64)
    keys = hash_keys(uids, seed=1, step=2)
    assert int(keys.min()) >= 0 and int(keys.max()) < 2**53
    assert torch.equal(keys, hash_keys(uids.clone(), seed=1, step=2))
    assert keys.unique().numel() == keys.numel()
    assert not torch.equal(keys, hash_keys(uids, seed=2, step=2))


@pytest.mark.parametrize(
    "mutate, error, fragment",
    [
        (lambda t: t.update(logprobs=t["logprobs"][:, :-1]), ValueError, "logprobs has shape"),
        (lambda t: t["advantages"].__setitem__((0, 0), float("nan")), ValueError, "advantages have NaN or inf"),
        (lambda t: t["logprobs"].__setitem__((1, 1), float("inf")), ValueError, "logprobs have NaN or inf"),
        (lambda t: t.update(logprobs=t["logprobs"].long()), TypeError, "logprobs must be a floating-point"),
        (lambda t: t.update(token_uids=t["token_uids"].int()), TypeError, "token_uids must be int64"),
        (lambda t: t.update(mask=t["mask"].float() * 2), ValueError, "only 0 and 1"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, error, fragment):
    lp, adv, mask, uids = _batch(masked_rows=())
    tensors = dict(logprobs=lp.clone(), advantages=adv.clone(), mask=mask.clone(), token_uids=uids)
    tensors["mask"][:] = True
    mutate(tensors)
    with pytest.raises(error, match=fragment):
        select_tokens(loss_config({}), tensors["logprobs"], tensors["advantages"], tensors["mask"],
                      token_uids=tensors["token_uids"], step=0)


def test_non_finite_values_on_masked_tokens_are_allowed():
    lp, adv, mask, uids = _batch()
    lp = lp.masked_fill(~mask, float("-inf"))
    chosen = select_tokens(loss_config({"method": "kl_cov"}), lp, adv, mask, token_uids=uids, step=0)
    assert int(chosen.sum()) == max(1, int(int(mask.sum()) * 2e-3))


@pytest.mark.parametrize("method", ["ppo", "kl_cov", "clip_cov"])
@pytest.mark.parametrize("form", ["natural", "vanilla"])
def test_select_tokens_with_scores_equals_the_two_separate_calls(method, form):
    from nemo_entropy.selection import select_tokens_with_scores

    lp, adv, mask, uids = _batch(seed=9)
    cfg = loss_config({"method": method, "cov_form": form, "kl_cov_ratio": 0.05, "clip_cov_ratio": 0.05,
                       "clip_cov_lb": 0.0})
    chosen, scores = select_tokens_with_scores(cfg, lp, adv, mask, token_uids=uids, step=4)
    assert torch.equal(chosen, select_tokens(cfg, lp, adv, mask, token_uids=uids, step=4))
    assert torch.equal(scores, covariance_scores(lp, adv, mask, form=form))  # bit for bit


@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k_threshold_is_the_lowest_chosen_priority(k):
    """``with_threshold`` adds the k-th priority of the (priority desc, uid asc) order, or the last one when fewer are
    eligible; None when nothing is."""
    from nemo_entropy.exact import distributed_top_k

    gen = torch.Generator().manual_seed(k)
    priority = torch.round(torch.rand(4, 6, generator=gen) * 8) / 8  # ties on purpose
    uids = token_uids_for(torch.arange(4), 6)
    eligible = torch.rand(4, 6, generator=gen) > 0.3
    mask, count, threshold = distributed_top_k(priority, uids, eligible, k, with_threshold=True)
    order = sorted((-float(priority[i, j]), int(uids[i, j])) for i, j in eligible.nonzero().tolist())[:k]
    assert count == len(order) == int(mask.sum()) and threshold == -order[-1][0]
    assert torch.equal(mask, distributed_top_k(priority, uids, eligible, k)[0])
    assert distributed_top_k(priority, uids, torch.zeros_like(eligible), k, with_threshold=True)[1:] == (0, None)
