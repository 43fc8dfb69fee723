"""Do several runs follow the same law? (The paper: ``a, b`` come out the same for GRPO, RLOO and PRIME on
one model; they depend on the model and the data, not on the algorithm.)

The rule: the runs agree on a coefficient when its bootstrap intervals all share a common value, i.e.
``max(low) <= min(high)`` (for intervals on a line this is the same as every pair overlapping); they agree
on the law when they agree on both ``a`` and ``b``.

What it does and does not say: two 95% intervals that do not overlap are strong evidence of different
coefficients (roughly p < 0.006 for two normal estimates of equal spread). Overlap is the lenient direction:
wide intervals (few or noisy points) overlap easily, so "agree" means "no evidence of a difference at
this precision", and the report gives the intervals so their widths can be read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

from .heldout import RunLaw
from .series import LawInputError

RULE = ("runs agree on a coefficient when all their 95% bootstrap intervals share a common value "
        "(max of the lows <= min of the highs); they agree on the law when they agree on both a and b")


@dataclass(frozen=True)
class CoefficientAgreement:
    """One coefficient across runs: the common range if there is one, else the two runs furthest apart."""

    name: str
    agree: bool
    common: Optional[tuple[float, float]]
    highest_low_run: int  # index of the run whose interval starts highest
    lowest_high_run: int  # index of the run whose interval ends lowest

    def to_json(self) -> dict[str, Any]:
        return {"agree": self.agree, "common_interval": list(self.common) if self.common else None,
                "furthest_apart": None if self.agree else [self.lowest_high_run, self.highest_low_run]}


@dataclass(frozen=True)
class LawAgreement:
    a: CoefficientAgreement
    b: CoefficientAgreement

    @property
    def agree(self) -> bool:
        return self.a.agree and self.b.agree

    def to_json(self) -> dict[str, Any]:
        return {"agree": self.agree, "rule": RULE, "a": self.a.to_json(), "b": self.b.to_json()}


def _coefficient(name: str, intervals: Sequence[tuple[float, float]]) -> CoefficientAgreement:
    lows = [lo for lo, _ in intervals]
    highs = [hi for _, hi in intervals]
    top_low = max(range(len(lows)), key=lows.__getitem__)
    bottom_high = min(range(len(highs)), key=highs.__getitem__)
    agree = lows[top_low] <= highs[bottom_high]
    return CoefficientAgreement(name=name, agree=agree,
                                common=(lows[top_low], highs[bottom_high]) if agree else None,
                                highest_low_run=top_low, lowest_high_run=bottom_high)


def law_agreement(laws: Sequence[RunLaw]) -> LawAgreement:
    """Whether ``laws`` (two or more runs, each with bootstrap intervals) share ``a`` and ``b``."""
    if len(laws) < 2:
        raise LawInputError(f"agreement needs at least 2 runs; got {len(laws)}")
    missing = [law.series.path for law in laws if law.intervals is None]
    if missing:
        raise LawInputError(f"agreement compares bootstrap intervals, and these runs have none (--bootstrap 0): "
                            f"{missing}")
    return LawAgreement(a=_coefficient("a", [law.intervals.a for law in laws]),
                        b=_coefficient("b", [law.intervals.b for law in laws]))
