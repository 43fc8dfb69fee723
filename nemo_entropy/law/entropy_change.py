"""Does the covariance predict the entropy change? (Theorems 1 and 2 of the paper.)

For a softmax policy updated by vanilla policy gradient with step size eta, the entropy change of one update
is ``H_{k+1} - H_k ~= -eta Cov(log pi, pi A)``. The trainer logs that prediction per step (e.g.
``entropy_change_predicted``, computed on the step's batch before its update); this pairs the prediction
logged at step t with the observed change ``H(t+1) - H(t)`` of the entropy logged at steps t and t+1, and
reports their Pearson correlation over the run. Under Adam, several optimizer steps per rollout and a
network rather than a table the theorem's scale does not hold, so the correlation (not the slope) is the
quantity to read; the least-squares slope of observed on predicted is reported alongside.

Only consecutive steps form a pair: a change over a gap of several steps is not the one-step change the
prediction is about.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .series import LawInputError

MIN_PAIRS = 3
_CONSTANT_RTOL = 1e-9


@dataclass(frozen=True)
class EntropyChangeCorrelation:
    """Pearson correlation of observed ``H(t+1) - H(t)`` with the prediction logged at t, over ``n`` pairs;
    ``slope``: least-squares slope of observed on predicted; ``n_unpaired``: steps with a finite entropy and
    prediction whose next step (t + 1) has no finite entropy."""

    correlation: float
    slope: float
    n: int
    n_unpaired: int


def entropy_change_correlation(steps, entropy, predicted_change) -> EntropyChangeCorrelation:
    """Correlate the observed one-step entropy change with the predicted one.

    ``steps`` (integers), ``entropy`` and ``predicted_change`` are per-step sequences of equal length (NaN =
    not logged at that step). Raises :class:`LawInputError` (a ValueError) for mismatched lengths, repeated
    steps, fewer than 3 pairs, or a constant observed or predicted change (no correlation is defined).
    """
    steps, h, pred = _series(steps, entropy, predicted_change, "entropy")
    if steps.size and not np.issubdtype(steps.dtype, np.integer):
        raise LawInputError(f"steps must be integers; got dtype {steps.dtype}")
    if np.unique(steps).size != steps.size:
        raise LawInputError("steps must not repeat")
    entropy_at = {int(s): v for s, v in zip(steps, h) if np.isfinite(v)}
    observed, predicted, unpaired = [], [], 0
    for s, v, p in zip(steps, h, pred):
        if not (np.isfinite(v) and np.isfinite(p)):
            continue
        following = entropy_at.get(int(s) + 1)
        if following is None:
            unpaired += 1
            continue
        observed.append(following - v)
        predicted.append(p)
    if len(observed) < MIN_PAIRS:
        raise LawInputError(f"only {len(observed)} (t, t+1) pairs with entropy at both steps and a prediction "
                            f"at t; the correlation needs at least {MIN_PAIRS}")
    return _pearson(observed, predicted, unpaired)


def same_step_correlation(steps, observed_change, predicted_change) -> EntropyChangeCorrelation:
    """Correlate an observed entropy change logged at step t *on the same tokens as the prediction* (the engine's
    ``entropy_change_observed``, ``engine.entropy_change_check``) with the prediction logged at t: same-step pairs,
    so rollout-to-rollout noise in ``H(t+1) - H(t)`` (other prompts, other samples) does not enter."""
    steps, obs, pred = _series(steps, observed_change, predicted_change, "observed_change")
    both = np.isfinite(obs) & np.isfinite(pred)
    if int(both.sum()) < MIN_PAIRS:
        raise LawInputError(f"only {int(both.sum())} steps with both an observed and a predicted change; the "
                            f"correlation needs at least {MIN_PAIRS}")
    return _pearson(obs[both].tolist(), pred[both].tolist(), 0)


def _series(steps, values, predicted_change, name: str):
    """``steps``, ``values`` and ``predicted_change`` as 1-D arrays of equal length (float64 values), or a
    :class:`LawInputError` naming their shapes."""
    steps = np.asarray(steps)
    values = np.asarray(values, dtype=np.float64)
    pred = np.asarray(predicted_change, dtype=np.float64)
    if not (steps.ndim == values.ndim == pred.ndim == 1 and steps.size == values.size == pred.size):
        raise LawInputError(f"steps, {name} and predicted_change must be 1-D of equal length; got shapes "
                            f"{steps.shape}, {values.shape}, {pred.shape}")
    return steps, values, pred


def _pearson(observed, predicted, unpaired: int) -> EntropyChangeCorrelation:
    obs, prd = np.asarray(observed), np.asarray(predicted)
    for name, values in (("observed change", obs), ("predicted change", prd)):
        # Differences of equal entropies differ in the last bits, so "constant" means up to rounding.
        if np.ptp(values) <= _CONSTANT_RTOL * np.max(np.abs(values)):
            raise LawInputError(f"the {name} is constant over the {values.size} pairs: no correlation is defined")
    d_obs, d_prd = obs - obs.mean(), prd - prd.mean()
    ss_obs, ss_prd = float(d_obs @ d_obs), float(d_prd @ d_prd)
    cross = float(d_obs @ d_prd)
    return EntropyChangeCorrelation(correlation=cross / np.sqrt(ss_obs * ss_prd), slope=cross / ss_prd,
                                    n=int(obs.size), n_unpaired=unpaired)
