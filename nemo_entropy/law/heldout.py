"""Fit the law on the first part of a run and predict the rest from the rest's entropy.

The paper fits ``a, b`` on the first 36 steps of a run and predicts later performance from later entropy
alone; the error of that prediction (``rmse_heldout``, in the units of the performance metric: 0.02 is two
points of accuracy) is what tells whether the law describes the run.

The split, over the points that have both values (sorted by step):

- ``fit_steps=N``: fit on the points logged at step <= N (steps as the run logged them; ours and NeMo-RL's
  count RL steps from 1);
- ``fit_fraction=F`` (default 1/3), ``0 < F <= 1``: fit on the first ``floor(F n)`` points;
- the held-out points are every later point, or with ``heldout_fraction=G`` (``0 < G < 1``) only the last
  ``floor(G n)`` (so "fit on the first third, predict the last third" is ``F = G = 1/3``).

``F = 1`` fits the whole run: nothing is held out and ``rmse_heldout`` is None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, Optional, Union

import numpy as np

from .fit import MIN_POINTS, LawFit, LawIntervals, bootstrap_law, fit_law, rmse
from .series import LawInputError, RunSeries

DEFAULT_FIT_FRACTION = Fraction(1, 3)
DEFAULT_BOOTSTRAP = 1000
MIN_BOOTSTRAP = 100  # fewer draws make the 2.5% / 97.5% percentiles rest on a handful of values

Number = Union[int, float, Fraction]


def as_fraction(value: Number, name: str) -> Fraction:
    """``value`` as an exact fraction; floats are read as the nearest fraction with a small denominator,
    so ``1/3`` written as a float gives ``floor(n / 3)`` points, not one fewer."""
    if isinstance(value, bool) or not isinstance(value, (int, float, Fraction)):
        raise LawInputError(f"{name} must be a number; got {value!r}")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise LawInputError(f"{name} must be finite; got {value}")
        return Fraction(value).limit_denominator(1_000_000)
    return Fraction(value)


@dataclass(frozen=True)
class Split:
    """Boolean masks over a run's points: the ones fitted and the ones predicted."""

    fit: np.ndarray
    heldout: np.ndarray
    rule: str  # how the split was chosen, for the report


def check_split_options(
    *, fit_steps: Optional[int] = None, fit_fraction: Optional[Number] = None,
    heldout_fraction: Optional[Number] = None,
) -> tuple[Optional[int], Fraction, Optional[Fraction]]:
    """Validate the split options on their own (before any run is read): ``(fit_steps, fit_fraction,
    heldout_fraction)`` with the fractions exact and the default fit fraction filled in."""
    if fit_steps is not None and fit_fraction is not None:
        raise LawInputError("--fit-steps and --fit-fraction are mutually exclusive")
    if fit_steps is not None and (isinstance(fit_steps, bool) or not isinstance(fit_steps, (int, np.integer))
                                  or fit_steps < 1):
        raise LawInputError(f"--fit-steps must be an integer >= 1; got {fit_steps!r}")
    fit_frac = as_fraction(DEFAULT_FIT_FRACTION if fit_fraction is None else fit_fraction, "--fit-fraction")
    if not 0 < fit_frac <= 1:
        raise LawInputError(f"--fit-fraction must be in (0, 1]; got {float(fit_frac):g}")
    held_frac = None
    if heldout_fraction is not None:
        held_frac = as_fraction(heldout_fraction, "--heldout-fraction")
        if not 0 < held_frac < 1:
            raise LawInputError(f"--heldout-fraction must be in (0, 1); got {float(held_frac):g}")
    return fit_steps, fit_frac, held_frac


def check_bootstrap(bootstrap: int) -> int:
    """``bootstrap`` if it is 0 (no intervals) or at least :data:`MIN_BOOTSTRAP`."""
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, (int, np.integer)) or \
            (bootstrap != 0 and bootstrap < MIN_BOOTSTRAP):
        raise LawInputError(f"--bootstrap must be 0 (no intervals) or >= {MIN_BOOTSTRAP}; got {bootstrap!r}")
    return int(bootstrap)


def split_points(steps, *, fit_steps: Optional[int] = None, fit_fraction: Optional[Number] = None,
                 heldout_fraction: Optional[Number] = None) -> Split:
    """The fit / held-out split of a run's points (see the module docstring). Errors name the argument."""
    fit_steps, fit_frac, held_frac = check_split_options(fit_steps=fit_steps, fit_fraction=fit_fraction,
                                                         heldout_fraction=heldout_fraction)
    steps = np.asarray(steps, dtype=np.int64)
    n = steps.size
    if fit_steps is not None:
        fit = steps <= fit_steps
        rule = f"steps <= {fit_steps}"
    else:
        fit = np.arange(n) < math.floor(fit_frac * n)
        rule = "all the points" if fit_frac == 1 else f"the first {fit_frac} of the points"
    n_fit = int(fit.sum())
    if n_fit < MIN_POINTS:
        raise LawInputError(f"the fit part ({rule}) holds {n_fit} of the run's {n} points; the law needs at least "
                            f"{MIN_POINTS} (raise --fit-steps / --fit-fraction)")
    heldout = ~fit
    if held_frac is not None:
        n_held = math.floor(held_frac * n)
        if n_held < 1:
            raise LawInputError(f"--heldout-fraction {held_frac} of {n} points holds no point")
        if n_fit + n_held > n:
            raise LawInputError(f"the fit part ({n_fit} points) and --heldout-fraction {held_frac} "
                                f"({n_held} points) overlap in a run of {n} points")
        heldout = np.arange(n) >= n - n_held
        rule += f"; predict the last {held_frac}"
    return Split(fit=fit, heldout=heldout, rule=rule)


@dataclass(frozen=True)
class RunLaw:
    """The law of one run: the fit on its first part, intervals, and the prediction of the held-out part."""

    series: RunSeries
    split: Split
    fit: LawFit
    intervals: Optional[LawIntervals]
    rmse_heldout: Optional[float]

    @property
    def n_fit(self) -> int:
        return int(self.split.fit.sum())

    @property
    def n_heldout(self) -> int:
        return int(self.split.heldout.sum())

    def to_json(self) -> dict[str, Any]:
        """The JSON object of ``nemo-entropy law fit --json`` for this run (schema in docs/law.md)."""
        s, iv = self.series, self.intervals

        def step_range(mask):
            chosen = s.steps[mask]
            return [int(chosen[0]), int(chosen[-1])] if chosen.size else None

        return {
            "a": self.fit.a,
            "b": self.fit.b,
            "ceiling": self.fit.ceiling,
            "rmse_heldout": self.rmse_heldout,
            "n_fit": self.n_fit,
            "n_heldout": self.n_heldout,
            "rmse_fit": self.fit.rmse,
            "a_interval": list(iv.a) if iv else None,
            "b_interval": list(iv.b) if iv else None,
            "ceiling_interval": list(iv.ceiling) if iv else None,
            "interval_level": iv.level if iv else None,
            "bootstrap": iv.resamples if iv else 0,
            "bootstrap_degenerate": iv.degenerate if iv else 0,
            "seed": iv.seed if iv else None,
            "run": s.path,
            "source": s.source,
            "entropy_key": s.x_key,
            "performance_key": s.y_key,
            "split": self.split.rule,
            "fit_step_range": step_range(self.split.fit),
            "heldout_step_range": step_range(self.split.heldout),
            "n_points": s.n_points,
            "n_steps": s.n_steps,
            "n_dropped": s.n_dropped,
            "n_missing_entropy": s.n_missing_x,
            "n_missing_performance": s.n_missing_y,
            "notes": list(s.notes),
        }


def fit_run(series: RunSeries, *, fit_steps: Optional[int] = None, fit_fraction: Optional[Number] = None,
            heldout_fraction: Optional[Number] = None, bootstrap: int = DEFAULT_BOOTSTRAP,
            seed: int = 0) -> RunLaw:
    """Fit the law on the first part of ``series`` (entropy = ``x``, performance = ``y``), bootstrap its
    intervals (``bootstrap`` resamples; 0 = none) and predict the held-out part from its entropy."""
    bootstrap = check_bootstrap(bootstrap)
    check_split_options(fit_steps=fit_steps, fit_fraction=fit_fraction, heldout_fraction=heldout_fraction)
    try:
        split = split_points(series.steps, fit_steps=fit_steps, fit_fraction=fit_fraction,
                             heldout_fraction=heldout_fraction)
        h, r = series.x[split.fit], series.y[split.fit]
        fit = fit_law(h, r)
        intervals = bootstrap_law(h, r, resamples=bootstrap, seed=seed) if bootstrap else None
    except LawInputError as exc:
        raise LawInputError(f"{series.path}: {exc} [entropy {series.x_key!r}, performance {series.y_key!r}; "
                            f"{series.dropped_summary()}]") from None
    held = split.heldout
    rmse_heldout = rmse(fit.predict(series.x[held]), series.y[held]) if held.any() else None
    return RunLaw(series=series, split=split, fit=fit, intervals=intervals, rmse_heldout=rmse_heldout)
