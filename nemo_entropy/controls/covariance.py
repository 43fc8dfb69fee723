"""What Clip-Cov and KL-Cov share: a quota of the step's valid tokens chosen by their covariance score
``c_i = (l_i - mean l)(A_i - mean A)`` (arXiv 2505.22617, Theorem 2), exact over the whole optimizer step.

The quota is ``k = max(1, floor(ratio * N))`` with ``N`` the valid tokens of the whole step over every rank (the
reference's expression, so a per-call selection reproduces it exactly). RATIOS ARE FRACTIONS, NOT PERCENTS:
``2e-3`` is 0.2% of the tokens (the paper repository's ``k_percent: 0.2`` meant 2e-3).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..exact import selection_quota
from .base import Control, bad_value


def check_ratio(key: str, value: float) -> None:
    if not 0.0 < value <= 1.0:
        raise bad_value(key, value, "a fraction in (0, 1] (a fraction, not a percent: 2e-3 means 0.2% of tokens)")


class CovarianceSelection(Control):
    """Base of the covariance selections: a ``selected`` per-token mask in the plan, chosen by :meth:`choose`."""

    exclusive: ClassVar[tuple[str, ...]] = ("covariance_selection",)
    needs_ppo_ratio = True
    selects_tokens = True
    ratio_key: ClassVar[str]

    @property
    def ratio(self) -> float:
        return getattr(self.config, self.ratio_key)

    def plan(self, ctx) -> dict[str, Any]:
        if ctx.num_valid_tokens == 0:  # agreed by every rank: nobody enters the top-k's all-gather
            return {"selected": torch.zeros_like(ctx.mask), "num_selected": 0}
        selected, count = self.choose(ctx, selection_quota(self.ratio, ctx.num_valid_tokens))
        return {"selected": selected, "num_selected": count}

    def choose(self, ctx, k: int) -> tuple[torch.Tensor, int]:
        """``(selected mask, count over the step)`` of a quota of ``k`` tokens."""
        raise NotImplementedError
