"""Means with Student-t intervals over seeds (``nemo-entropy compare``'s table and its plot's bands)."""

from __future__ import annotations

import math
from typing import Any, Sequence

__all__ = ["t_quantile", "mean_interval"]


def _t_cdf(t: float, df: int) -> float:
    """Student-t CDF by Simpson's rule on the density over [0, |t|] (2000 panels; |error| < 1e-9 here)."""
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)

    def density(x: float) -> float:
        return math.exp(log_norm - (df + 1) / 2 * math.log1p(x * x / df))

    x = abs(t)
    panels = 2000
    h = x / panels
    total = density(0.0) + density(x)
    for i in range(1, panels):
        total += (4 if i % 2 else 2) * density(i * h)
    half = total * h / 3
    return 0.5 + half if t >= 0 else 0.5 - half


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` degrees of freedom (bisection on the CDF)."""
    if not 0.5 < p < 1 or df < 1:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df >= 1, got p={p}, df={df}")
    low, high = 0.0, 1.0
    while _t_cdf(high, df) < p:
        high *= 2
    for _ in range(60):
        mid = (low + high) / 2
        if _t_cdf(mid, df) < p:
            low = mid
        else:
            high = mid
    return (low + high) / 2


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean, sample standard deviation and the two-sided Student-t interval ``mean +- t * s / sqrt(n)``.

    ``half`` (and ``low`` / ``high``) is ``None`` with fewer than 2 values (no spread to estimate).
    """
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    n = len(xs)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "half": None, "low": None, "high": None}
    mean = sum(xs) / n
    if n < 2:
        return {"n": 1, "mean": mean, "std": None, "half": None, "low": None, "high": None}
    std = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return {"n": n, "mean": mean, "std": std, "half": half, "low": mean - half, "high": mean + half}
