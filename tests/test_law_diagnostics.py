"""nemo_entropy.law.concentration and .entropy_change: against a brute-force sort and hand-built pairs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nemo_entropy.law import LawInputError, entropy_change_correlation
from nemo_entropy.law.concentration import covariance_concentration, covariance_concentration_metrics


def brute_force(scores, fraction):
    """Sort every score in Python, sum the first k = max(1, floor(f N))."""
    values = sorted((float(v) for v in scores), reverse=True)
    n = len(values)
    k = max(1, math.floor(fraction * n))
    top = math.fsum(values[:k])
    total = math.fsum(values)
    return k, top / total, top / k, total / n


@pytest.mark.parametrize("n,seed", [(12_345, 0), (50_000, 1), (37, 2)])
def test_concentration_matches_a_brute_force_sort(n, seed):
    gen = torch.Generator().manual_seed(seed)
    # heavy-tailed like the paper's scores: a product of centred log-prob and advantage deviations
    scores = torch.randn(n, generator=gen) * torch.randn(n, generator=gen).exp() + 0.01
    levels = covariance_concentration(scores.to(torch.float32))
    assert [lv.fraction for lv in levels] == [0.0002, 0.002, 0.02]
    for level in levels:
        k, share, top_mean, mean = brute_force(scores.to(torch.float32), level.fraction)
        assert (level.k, level.n) == (k, n)
        assert level.share == pytest.approx(share, rel=1e-9)
        assert level.top_mean == pytest.approx(top_mean, rel=1e-9)
        assert level.overall_mean == pytest.approx(mean, rel=1e-9, abs=1e-12)


def test_concentration_of_a_known_batch():
    # 10,000 tokens: 2 carry 5.0 each, the rest 0.001: the top 0.02% (k = 2) hold 10 / (10 + 9.998)
    scores = torch.full((10_000,), 0.001, dtype=torch.float64)
    scores[[17, 4242]] = 5.0
    top, middle, wide = covariance_concentration(scores)
    assert top.k == 2 and top.top_mean == pytest.approx(5.0) and top.share == pytest.approx(10 / 19.998)
    assert middle.k == 20 and middle.top_mean == pytest.approx((10 + 18 * 0.001) / 20)
    assert wide.k == 200 and wide.overall_mean == pytest.approx(19.998 / 10_000)
    # k never drops below one token, and the whole batch holds the whole covariance
    tiny = covariance_concentration(torch.tensor([3.0, 1.0, -2.0]), fractions=(0.0002, 1.0))
    assert tiny[0].k == 1 and tiny[0].share == pytest.approx(3.0 / 2.0)
    assert tiny[1].k == 3 and tiny[1].share == pytest.approx(1.0)


def test_concentration_ties_and_inputs():
    # many ties at the threshold: any tie-break gives the same sum
    scores = torch.tensor([1.0] * 50 + [0.5] * 50)
    (level,) = covariance_concentration(scores, fractions=(0.3,))
    assert level.k == 30 and level.top_mean == 1.0 and level.share == pytest.approx(30 / 75)
    # integer and numpy inputs are accepted as scores
    assert covariance_concentration(np.arange(10), fractions=(0.2,))[0].top_mean == pytest.approx(8.5)
    # a zero total has no share
    assert math.isnan(covariance_concentration(torch.tensor([1.0, -1.0]), fractions=(0.5,))[0].share)


@pytest.mark.parametrize("scores,fractions,match", [
    (torch.zeros(2, 3), (0.1,), r"1-D tensor .* shape \(2, 3\)"),
    (torch.zeros(0), (0.1,), "empty"),
    (torch.tensor([1.0, float("nan"), 2.0]), (0.1,), "1 non-finite values of 3"),
    (torch.ones(4), (0.0,), r"fraction 0.0 must be in \(0, 1\]"),
    (torch.ones(4), (2e-4, 1.5), r"fraction 1.5 must be in \(0, 1\]"),
])
def test_concentration_rejects_bad_inputs_by_name(scores, fractions, match):
    with pytest.raises(ValueError, match=match):
        covariance_concentration(scores, fractions)


def test_concentration_metric_names():
    metrics = covariance_concentration_metrics(torch.linspace(-1, 1, 20_000, dtype=torch.float64))
    assert set(metrics) == {"cov_top_0.02pct_share", "cov_top_0.02pct_mean", "cov_top_0.2pct_share",
                            "cov_top_0.2pct_mean", "cov_top_2pct_share", "cov_top_2pct_mean", "cov_overall_mean"}
    k = 400  # 2% of 20,000
    top = torch.linspace(-1, 1, 20_000, dtype=torch.float64)[-k:]
    assert metrics["cov_top_2pct_mean"] == pytest.approx(float(top.mean()))


def test_entropy_change_correlation_pairs_consecutive_steps():
    steps = [1, 2, 3, 4, 5, 7, 8, 9]  # step 6 not logged: no pair (5, 6) nor (6, 7)
    entropy = [0.50, 0.47, 0.46, 0.40, 0.39, 0.30, 0.31, 0.25]
    predicted = [-0.02, -0.01, -0.05, -0.012, -0.04, 0.015, -0.05, -0.01]
    result = entropy_change_correlation(steps, entropy, predicted)
    # by hand: pairs at t = 1, 2, 3, 4, 7, 8; t = 5 (next step 6 missing) and t = 9 (last) are unpaired
    observed = [0.47 - 0.50, 0.46 - 0.47, 0.40 - 0.46, 0.39 - 0.40, 0.31 - 0.30, 0.25 - 0.31]
    pred = [-0.02, -0.01, -0.05, -0.012, 0.015, -0.05]
    assert result.n == 6 and result.n_unpaired == 2
    assert result.correlation == pytest.approx(np.corrcoef(observed, pred)[0, 1], rel=1e-12)
    assert result.slope == pytest.approx(np.polyfit(pred, observed, 1)[0], rel=1e-10)


def test_entropy_change_correlation_order_and_missing_values():
    # unsorted input and NaN (not logged) give the same pairs as sorted, complete ones
    steps = [3, 1, 2, 4, 5]
    entropy = [0.40, 0.50, 0.45, 0.38, float("nan")]
    predicted = [-0.03, -0.04, -0.06, float("nan"), -0.01]
    result = entropy_change_correlation(steps, entropy, predicted)
    assert result.n == 3  # t = 1, 2, 3; t = 4 has no prediction, t = 5 no entropy
    assert result.correlation == pytest.approx(np.corrcoef([-0.05, -0.05, -0.02], [-0.04, -0.06, -0.03])[0, 1])


@pytest.mark.parametrize("steps,entropy,predicted,match", [
    ([1, 2, 3], [0.5, 0.4, 0.3], [-0.1, -0.1, -0.1], "at least 3"),
    ([1, 2, 3, 4], [0.5, 0.4, 0.3, 0.2], [-0.1, -0.2, -0.3, 0.0], "observed change is constant"),
    ([1, 2, 3, 4], [0.5, 0.4, 0.35, 0.2], [-0.1, -0.1, -0.1, 0.0], "predicted change is constant"),
    ([1, 2, 2], [0.5, 0.4, 0.3], [0.1, 0.2, 0.3], "must not repeat"),
    ([1, 2], [0.5, 0.4, 0.3], [0.1, 0.2, 0.3], "equal length"),
    ([1.0, 2.0, 3.0], [0.5, 0.4, 0.3], [0.1, 0.2, 0.3], "integers"),
])
def test_entropy_change_correlation_errors(steps, entropy, predicted, match):
    with pytest.raises(LawInputError, match=match):
        entropy_change_correlation(steps, entropy, predicted)
