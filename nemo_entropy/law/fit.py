"""The entropy-performance law ``R = -a exp(H) + b``: closed-form least squares and bootstrap intervals.

Given ``x = exp(H)`` the law is a straight line in ``x`` with slope ``-a`` and intercept ``b``, so the
least-squares fit is the ordinary regression line: ``a = -S_xy / S_xx`` and ``b = mean(R) + a mean(x)``, with
centred sums (the centred form avoids the cancellation of the normal equations when ``exp(H)`` varies little
around a large mean). Everything is float64. The ceiling ``b - a`` is the law's performance at ``H = 0``, a
fully deterministic policy: where the run is heading once entropy has collapsed.

Intervals: the percentile bootstrap over points (resample the n fitted points with replacement, refit,
take the 2.5% and 97.5% quantiles of ``a``, ``b`` and ``b - a``). Resamples that happen to hold a single
entropy value cannot be fitted; they are skipped and counted, never silently replaced.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .series import LawInputError

MIN_POINTS = 3  # two points fit any line exactly: no residual, nothing learned about the noise
INTERVAL_LEVEL = 0.95
# Resamples are drawn in blocks so that memory stays at a few MB whatever n and the resample count are;
# the block size is fixed, so a seed always gives the same draws.
_BLOCK_ELEMENTS = 1 << 20


@dataclass(frozen=True)
class LawFit:
    """``R = -a exp(H) + b`` fitted to ``n`` points; ``rmse`` is the in-sample root-mean-square residual."""

    a: float
    b: float
    n: int
    rmse: float

    @property
    def ceiling(self) -> float:
        """``R`` at ``H = 0``: ``b - a``."""
        return self.b - self.a

    def predict(self, entropy) -> np.ndarray:
        return predict_performance(self.a, self.b, entropy)


@dataclass(frozen=True)
class LawIntervals:
    """Percentile bootstrap intervals ``(low, high)`` at ``level`` from ``resamples`` draws, ``degenerate``
    of which held a single entropy value and were skipped."""

    a: tuple[float, float]
    b: tuple[float, float]
    ceiling: tuple[float, float]
    level: float
    resamples: int
    degenerate: int
    seed: int


def predict_performance(a: float, b: float, entropy) -> np.ndarray:
    """``-a exp(H) + b`` for each entropy value (float64)."""
    return -a * np.exp(np.asarray(entropy, dtype=np.float64)) + b


def _check_points(entropy: np.ndarray, performance: np.ndarray) -> None:
    if entropy.ndim != 1 or entropy.shape != performance.shape:
        raise LawInputError(f"entropy and performance must be 1-D and of equal length; got shapes "
                            f"{entropy.shape} and {performance.shape}")
    if entropy.size < MIN_POINTS:
        raise LawInputError(f"the law needs at least {MIN_POINTS} points with both entropy and performance; "
                            f"got {entropy.size}")
    if not (np.isfinite(entropy).all() and np.isfinite(performance).all()):
        raise LawInputError("entropy and performance must be finite (drop missing steps first)")
    if entropy.max() == entropy.min():
        raise LawInputError(f"entropy is constant (H = {entropy[0]:.6g} at all {entropy.size} points): a, the "
                            f"slope against exp(H), is not identifiable")


def fit_law(entropy, performance) -> LawFit:
    """Least-squares ``a, b`` of ``R = -a exp(H) + b`` (float64, closed form).

    Raises :class:`LawInputError` for fewer than 3 points, non-finite values or constant entropy.
    """
    h = np.asarray(entropy, dtype=np.float64)
    r = np.asarray(performance, dtype=np.float64)
    _check_points(h, r)
    x = np.exp(h)
    dx, dr = x - x.mean(), r - r.mean()
    a = -float(dx @ dr) / float(dx @ dx)
    b = float(r.mean()) + a * float(x.mean())
    return LawFit(a=a, b=b, n=int(h.size), rmse=rmse(-a * x + b, r))


def bootstrap_law(entropy, performance, *, resamples: int = 1000, seed: int = 0,
                  level: float = INTERVAL_LEVEL) -> LawIntervals:
    """Percentile bootstrap intervals of ``a``, ``b`` and the ceiling ``b - a`` (points resampled with
    replacement, ``numpy.random.default_rng(seed)``)."""
    h = np.asarray(entropy, dtype=np.float64)
    r = np.asarray(performance, dtype=np.float64)
    _check_points(h, r)
    if resamples < 1:
        raise LawInputError(f"bootstrap resamples must be >= 1; got {resamples}")
    if not 0.0 < level < 1.0:
        raise LawInputError(f"interval level must be in (0, 1); got {level}")
    x = np.exp(h)
    n = x.size
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // n)
    a_draws, b_draws = [], []
    degenerate = 0
    for start in range(0, resamples, block):
        idx = rng.integers(0, n, size=(min(block, resamples - start), n))
        xs, rs = x[idx], r[idx]
        single = xs.max(axis=1) == xs.min(axis=1)
        degenerate += int(single.sum())
        xs, rs = xs[~single], rs[~single]
        dx = xs - xs.mean(axis=1, keepdims=True)
        dr = rs - rs.mean(axis=1, keepdims=True)
        a = -np.einsum("ij,ij->i", dx, dr) / np.einsum("ij,ij->i", dx, dx)
        a_draws.append(a)
        b_draws.append(rs.mean(axis=1) + a * xs.mean(axis=1))
    a_all, b_all = np.concatenate(a_draws), np.concatenate(b_draws)
    if a_all.size == 0:
        raise LawInputError(f"every one of the {resamples} bootstrap resamples held a single entropy value")
    tail = 100.0 * (1.0 - level) / 2.0
    q = (tail, 100.0 - tail)

    def interval(values: np.ndarray) -> tuple[float, float]:
        low, high = np.percentile(values, q)
        return float(low), float(high)

    return LawIntervals(a=interval(a_all), b=interval(b_all), ceiling=interval(b_all - a_all), level=level,
                        resamples=resamples, degenerate=degenerate, seed=seed)


def rmse(predicted, observed) -> Optional[float]:
    """Root-mean-square error, or None for no points."""
    p = np.asarray(predicted, dtype=np.float64)
    o = np.asarray(observed, dtype=np.float64)
    if o.size == 0:
        return None
    return float(np.sqrt(np.mean((p - o) ** 2)))
