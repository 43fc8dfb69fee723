"""nemo_entropy.law.fit and .heldout: the closed form against numpy's least squares, recovery of a known law
with noise (close to the truth, inside the bootstrap intervals, intervals calibrated over many data sets),
the held-out RMSE against a hand computation, the split rules and the degenerate inputs."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from nemo_entropy.law import LawInputError, bootstrap_law, fit_law, fit_run, split_points
from nemo_entropy.law.series import RunSeries

A_TRUE, B_TRUE = 0.6, 0.95


def draw_law(n, *, a=A_TRUE, b=B_TRUE, noise=0.01, seed=0, h_range=(0.05, 1.2)):
    rng = np.random.default_rng(seed)
    h = np.sort(rng.uniform(*h_range, size=n))[::-1]  # entropy falls over a run
    r = -a * np.exp(h) + b + rng.normal(0.0, noise, size=n)
    return h, r


def make_series(h, r, steps=None):
    steps = np.arange(1, len(h) + 1) if steps is None else np.asarray(steps)
    return RunSeries(path="synthetic", source="test", x_key="H", y_key="R", steps=np.asarray(steps, dtype=np.int64),
                     x=np.asarray(h, dtype=np.float64), y=np.asarray(r, dtype=np.float64), n_steps=len(h),
                     n_missing_x=0, n_missing_y=0)


def lstsq_reference(h, r):
    """Ordinary least squares on the design [-exp(H), 1] with numpy's SVD solver."""
    design = np.stack([-np.exp(np.asarray(h, dtype=np.float64)), np.ones(len(h))], axis=1)
    (a, b), *_ = np.linalg.lstsq(design, np.asarray(r, dtype=np.float64), rcond=None)
    return a, b


@pytest.mark.parametrize("seed,h_range", [(0, (0.05, 1.2)), (1, (0.0, 3.0)), (2, (2.9, 3.0)), (3, (0.001, 0.002))])
def test_closed_form_equals_numpy_lstsq(seed, h_range):
    # (2.9, 3.0): exp(H) ~ 19 with 5% spread; (0.001, 0.002): exp(H) ~ 1 with 0.1% spread: the
    # normal equations in their uncentred form lose digits there, the centred closed form must not.
    h, r = draw_law(50, seed=seed, h_range=h_range)
    fit = fit_law(h, r)
    a_ref, b_ref = lstsq_reference(h, r)
    assert fit.a == pytest.approx(a_ref, rel=1e-9, abs=1e-12)
    assert fit.b == pytest.approx(b_ref, rel=1e-9, abs=1e-12)
    assert fit.ceiling == pytest.approx(b_ref - a_ref, rel=1e-9, abs=1e-12)
    residual = r - (-a_ref * np.exp(h) + b_ref)
    assert fit.rmse == pytest.approx(math.sqrt(sum(e * e for e in residual) / len(r)), rel=1e-9)


def test_noise_free_law_is_recovered_exactly():
    h = np.linspace(0.05, 1.0, 7)
    fit = fit_law(h, -0.3 * np.exp(h) + 0.8)
    assert fit.a == pytest.approx(0.3, abs=1e-13)
    assert fit.b == pytest.approx(0.8, abs=1e-13)
    assert fit.ceiling == pytest.approx(0.5, abs=1e-13)
    assert fit.rmse < 1e-14


def test_known_law_with_noise_is_recovered_within_intervals_and_close():
    h, r = draw_law(200, noise=0.02, seed=7)
    fit = fit_law(h, r)
    iv = bootstrap_law(h, r, resamples=2000, seed=3)
    # OLS standard errors from the true noise: independent of the code under test.
    x = np.exp(h)
    sxx = np.sum((x - x.mean()) ** 2)
    se_a = 0.02 / math.sqrt(sxx)
    se_b = 0.02 * math.sqrt(1 / len(x) + x.mean() ** 2 / sxx)
    assert abs(fit.a - A_TRUE) < 4 * se_a
    assert abs(fit.b - B_TRUE) < 4 * se_b
    assert iv.a[0] < A_TRUE < iv.a[1]
    assert iv.b[0] < B_TRUE < iv.b[1]
    assert iv.ceiling[0] < B_TRUE - A_TRUE < iv.ceiling[1]
    # the intervals are about +-1.96 standard errors wide, not a degenerate point or the whole line
    assert 2 * 1.96 * se_a * 0.7 < iv.a[1] - iv.a[0] < 2 * 1.96 * se_a * 1.4
    assert iv.a[0] < fit.a < iv.a[1]


def test_bootstrap_intervals_are_calibrated():
    # Over 60 independent data sets a 95% interval should hold the truth about 57 times; a wrong
    # percentile (e.g. 25/75) or a resampling bug holds it far less often.
    covered_a = covered_b = 0
    trials = 60
    for seed in range(trials):
        h, r = draw_law(60, noise=0.03, seed=100 + seed)
        iv = bootstrap_law(h, r, resamples=400, seed=seed)
        covered_a += iv.a[0] <= A_TRUE <= iv.a[1]
        covered_b += iv.b[0] <= B_TRUE <= iv.b[1]
    assert covered_a >= 0.85 * trials and covered_b >= 0.85 * trials
    assert covered_a < trials or covered_b < trials  # not trivially wide: some misses at 95%


def test_bootstrap_is_seeded():
    h, r = draw_law(40, seed=1)
    assert bootstrap_law(h, r, resamples=300, seed=5) == bootstrap_law(h, r, resamples=300, seed=5)
    assert bootstrap_law(h, r, resamples=300, seed=5).a != bootstrap_law(h, r, resamples=300, seed=6).a


def test_bootstrap_skips_and_counts_single_entropy_resamples():
    # Three points, two with the same entropy: a resample is single-valued when it draws only the first two
    # points ((2/3)^3) or only the third ((1/3)^3): probability 1/3.
    h = np.array([0.2, 0.2, 0.6])
    r = np.array([0.50, 0.52, 0.30])
    iv = bootstrap_law(h, r, resamples=3000, seed=0)
    assert abs(iv.degenerate - 1000) < 5 * math.sqrt(3000 * (1 / 3) * (2 / 3))
    assert np.isfinite(iv.a).all() and np.isfinite(iv.b).all()


@pytest.mark.parametrize("h,r,match", [
    ([0.1, 0.2], [0.5, 0.4], "at least 3 points"),
    ([], [], "at least 3 points"),
    ([0.3, 0.3, 0.3, 0.3], [0.1, 0.2, 0.3, 0.4], "entropy is constant"),
    ([0.1, float("nan"), 0.3], [0.1, 0.2, 0.3], "finite"),
    ([0.1, 0.2, 0.3], [0.1, 0.2], "equal length"),
])
def test_degenerate_inputs_raise_named_errors(h, r, match):
    with pytest.raises(LawInputError, match=match):
        fit_law(h, r)
    if len(h) == len(r):
        with pytest.raises(LawInputError, match=match):
            bootstrap_law(h, r, resamples=100)


def test_heldout_rmse_equals_hand_computation():
    h = [0.90, 0.80, 0.70, 0.62, 0.55, 0.50, 0.41, 0.35, 0.30]
    r = [0.20, 0.29, 0.33, 0.41, 0.47, 0.49, 0.55, 0.60, 0.61]
    law = fit_run(make_series(h, r), fit_fraction=Fraction(1, 3), bootstrap=0)
    # by hand: a line through (exp(H), R) of the first 3 points, then the error on the other 6
    slope, intercept = np.polyfit(np.exp(h[:3]), r[:3], 1)
    assert law.fit.a == pytest.approx(-slope, rel=1e-10)
    assert law.fit.b == pytest.approx(intercept, rel=1e-10)
    errors = [(-law.fit.a * math.exp(hh) + law.fit.b) - rr for hh, rr in zip(h[3:], r[3:])]
    assert law.rmse_heldout == pytest.approx(math.sqrt(sum(e * e for e in errors) / 6), rel=1e-12)
    assert (law.n_fit, law.n_heldout) == (3, 6)
    in_sample = [(-law.fit.a * math.exp(hh) + law.fit.b) - rr for hh, rr in zip(h[:3], r[:3])]
    assert law.fit.rmse == pytest.approx(math.sqrt(sum(e * e for e in in_sample) / 3), rel=1e-9, abs=1e-15)

    # predicting only the last third: the last 3 points
    law3 = fit_run(make_series(h, r), fit_fraction=Fraction(1, 3), heldout_fraction=Fraction(1, 3), bootstrap=0)
    errors3 = errors[3:]
    assert law3.rmse_heldout == pytest.approx(math.sqrt(sum(e * e for e in errors3) / 3), rel=1e-12)
    assert (law3.n_fit, law3.n_heldout) == (3, 3)


def test_heldout_prediction_of_a_true_law_is_at_noise_level():
    h, r = draw_law(300, noise=0.01, seed=11)
    law = fit_run(make_series(h, r), fit_fraction=0.5, bootstrap=0)
    assert 0.007 < law.rmse_heldout < 0.02  # noise 0.01 plus a small extrapolation error
    # and a law fitted on the wrong curve predicts badly: the check can tell the two apart
    bent = make_series(h, np.where(np.arange(300) < 150, r, r - 0.1))
    assert fit_run(bent, fit_fraction=0.5, bootstrap=0).rmse_heldout > 0.09


def test_split_by_steps_uses_the_logged_step_numbers():
    steps = [10, 20, 30, 40, 50, 60]
    split = split_points(steps, fit_steps=35)
    assert split.fit.tolist() == [True, True, True, False, False, False]
    assert split.heldout.tolist() == [False, False, False, True, True, True]


@pytest.mark.parametrize("fraction", [1 / 3, Fraction(1, 3), "1/3"])
def test_split_fraction_is_exact_for_thirds(fraction):
    # floor(0.333...3 * 120) would be 39 in floating point; one third of 120 points is 40.
    if isinstance(fraction, str):
        fraction = Fraction(fraction)
    split = split_points(np.arange(1, 121), fit_fraction=fraction)
    assert int(split.fit.sum()) == 40 and int(split.heldout.sum()) == 80
    # and the count rounds down: a third of 10 points is 3
    split = split_points(np.arange(1, 11), fit_fraction=fraction)
    assert split.fit.tolist() == [True] * 3 + [False] * 7 and split.heldout.tolist() == [False] * 3 + [True] * 7


def test_fit_fraction_one_holds_nothing_out():
    h, r = draw_law(10, seed=2)
    law = fit_run(make_series(h, r), fit_fraction=1, bootstrap=0)
    assert law.n_heldout == 0 and law.rmse_heldout is None and law.n_fit == 10
    assert law.to_json()["heldout_step_range"] is None


@pytest.mark.parametrize("kwargs,match", [
    (dict(fit_steps=0), r"--fit-steps must be an integer >= 1; got 0"),
    (dict(fit_steps=2.5), r"--fit-steps must be an integer"),
    (dict(fit_fraction=0), r"--fit-fraction must be in \(0, 1\]; got 0"),
    (dict(fit_fraction=1.5), r"--fit-fraction must be in \(0, 1\]; got 1.5"),
    (dict(fit_fraction=0.5, fit_steps=3), "mutually exclusive"),
    (dict(heldout_fraction=1), r"--heldout-fraction must be in \(0, 1\); got 1"),
    (dict(fit_fraction=0.8, heldout_fraction=0.5), "overlap"),
    (dict(fit_fraction=0.1), r"holds 2 of the run's 20 points; the law needs at least 3"),
    (dict(fit_steps=2), r"holds 2 of the run's 20 points"),
])
def test_bad_split_options_are_named(kwargs, match):
    with pytest.raises(LawInputError, match=match):
        split_points(np.arange(1, 21), **kwargs)


@pytest.mark.parametrize("bootstrap", [5, 99, -1, True, 2.0])
def test_bad_bootstrap_counts_are_named(bootstrap):
    h, r = draw_law(20, seed=0)
    with pytest.raises(LawInputError, match=r"--bootstrap must be 0 \(no intervals\) or >= 100"):
        fit_run(make_series(h, r), bootstrap=bootstrap)


def test_fit_run_reports_the_contract_keys_consistently():
    h, r = draw_law(90, seed=4)
    law = fit_run(make_series(h, r), fit_steps=30, bootstrap=200, seed=1)
    out = law.to_json()
    assert {"a", "b", "ceiling", "rmse_heldout", "n_fit", "n_heldout"} <= set(out)
    assert out["ceiling"] == pytest.approx(out["b"] - out["a"])
    assert (out["n_fit"], out["n_heldout"]) == (30, 60)
    assert out["fit_step_range"] == [1, 30] and out["heldout_step_range"] == [31, 90]
    assert out["a_interval"][0] < out["a"] < out["a_interval"][1]
