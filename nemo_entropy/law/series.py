"""What a reader returns (every scalar of a run, per step) and the paired series the law is fitted on.

A run logs many scalars, not all at every step: our engine logs ``val_accuracy`` every ``val_period`` steps,
NeMo-RL logs ``validation/accuracy`` on its own schedule. Pairing keeps the steps where *both* chosen values
are present and finite, and counts every step it drops (by cause), so no caller can drop data silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


class LawInputError(ValueError):
    """A run cannot be read or fitted as asked: the message names the file, the key or flag, and what is allowed."""


@dataclass(frozen=True)
class RunScalars:
    """Every numeric scalar of one run: ``values[key][step] = value``.

    ``steps`` is every step at which the source logged anything (JSON lines: a record; TensorBoard: any
    scalar tag; CSV: a row), the universe against which dropped steps are counted. ``notes`` are facts the
    reader met on the way (a torn last line, a step logged twice) that the user should see.
    """

    path: str
    source: str  # "jsonl" | "tensorboard" | "csv"
    values: dict[str, dict[int, float]]
    steps: frozenset[int]
    notes: tuple[str, ...] = ()
    rejected: dict[str, str] = field(default_factory=dict)  # key -> why it is not numeric (CSV columns)

    def keys(self) -> list[str]:
        return sorted(self.values)

    def column(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(every step of the run, sorted; ``key``'s value there or NaN where it was not logged)."""
        steps = np.asarray(sorted(self.steps), dtype=np.int64)
        series = self.values[key]
        return steps, np.asarray([series.get(int(s), math.nan) for s in steps], dtype=np.float64)

    def why_missing(self, key: str) -> str:
        """`` (its reason)`` if ``key`` exists but was rejected as non-numeric, else empty."""
        return f" ({self.rejected[key]})" if key in self.rejected else ""


@dataclass(frozen=True)
class RunSeries:
    """Two scalars of one run paired on step: ``x`` (the entropy) and ``y`` (performance or a prediction).

    Arrays are float64, sorted by step, finite. ``n_dropped`` steps of the run had at least one of the two
    missing or non-finite; ``n_missing_x`` / ``n_missing_y`` count each cause (a step missing both counts in
    both).
    """

    path: str
    source: str
    x_key: str
    y_key: str
    steps: np.ndarray
    x: np.ndarray
    y: np.ndarray
    n_steps: int
    n_missing_x: int
    n_missing_y: int
    notes: tuple[str, ...] = field(default=())

    @property
    def n_points(self) -> int:
        return int(self.steps.size)

    @property
    def n_dropped(self) -> int:
        return self.n_steps - self.n_points

    def dropped_summary(self, x_role: str = "entropy", y_role: str = "performance") -> str:
        """One line saying how many steps were dropped and why."""
        if self.n_dropped == 0:
            return f"kept all {self.n_points} steps"
        return (f"kept {self.n_points} of {self.n_steps} steps; dropped {self.n_dropped} "
                f"({x_role} {self.x_key!r} missing or non-finite at {self.n_missing_x} steps, "
                f"{y_role} {self.y_key!r} at {self.n_missing_y})")


def _present(value) -> bool:
    return value is not None and math.isfinite(value)


def pair_series(scalars: RunScalars, x_key: str, y_key: str) -> RunSeries:
    """Pair two keys of a run on step, keeping only steps where both values are present and finite."""
    for key in (x_key, y_key):
        if key not in scalars.values:
            raise LawInputError(f"{scalars.path}: no key {key!r}{scalars.why_missing(key)}; "
                                f"available: {format_available(scalars.keys())}")
    xs, ys = scalars.values[x_key], scalars.values[y_key]
    kept, missing_x, missing_y = [], 0, 0
    for step in sorted(scalars.steps):
        has_x, has_y = _present(xs.get(step)), _present(ys.get(step))
        missing_x += not has_x
        missing_y += not has_y
        if has_x and has_y:
            kept.append(step)
    return RunSeries(
        path=scalars.path, source=scalars.source, x_key=x_key, y_key=y_key,
        steps=np.asarray(kept, dtype=np.int64),
        x=np.asarray([xs[s] for s in kept], dtype=np.float64),
        y=np.asarray([ys[s] for s in kept], dtype=np.float64),
        n_steps=len(scalars.steps), n_missing_x=missing_x, n_missing_y=missing_y, notes=scalars.notes,
    )


def format_available(keys, limit: int = 40) -> str:
    """A bounded, readable list of key names for error messages."""
    keys = list(keys)
    if not keys:
        return "(none)"
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown if len(keys) <= limit else f"{shown} ... and {len(keys) - limit} more"
