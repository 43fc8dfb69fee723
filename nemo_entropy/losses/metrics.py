"""How loss metrics combine over micro-batches and ranks (the convention of ``policy_loss`` and NeMo-RL).

Every metric is pre-divided by a global count, so the batch value is the *sum* over micro-batches and ranks;
the exceptions are extrema, named ``*_min`` / ``*_max``, which combine with min / max.
"""

from __future__ import annotations

__all__ = ["metric_reduction", "accumulate_metrics"]


def metric_reduction(name: str) -> str:
    """``"min"``, ``"max"`` or ``"sum"``: how metric ``name`` combines across micro-batches and ranks."""
    if name.endswith("_min"):
        return "min"
    if name.endswith("_max"):
        return "max"
    return "sum"


def accumulate_metrics(into: dict[str, float], metrics: dict[str, float], *, divisor: float = 1.0) -> None:
    """Fold ``metrics`` into ``into`` in place: summed metrics add ``value / divisor`` (e.g. the optimizer
    steps per rollout, for a per-step mean); extrema take min / max and are never divided."""
    for key, value in metrics.items():
        kind = metric_reduction(key)
        if kind == "min":
            into[key] = min(into.get(key, float("inf")), value)
        elif kind == "max":
            into[key] = max(into.get(key, float("-inf")), value)
        else:
            into[key] = into.get(key, 0.0) + value / divisor
