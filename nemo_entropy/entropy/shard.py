"""One vocabulary shard's statistics, and the math of vocab-parallel entropy / log-prob between the collectives.

Every backend (:mod:`nemo_entropy.entropy.dispatch`) returns :class:`ShardStats`; :class:`VocabParallelEntropyMath`
combines them (no communication here: the collectives sit between its steps in
:class:`nemo_entropy.entropy.vocab_parallel.VocabParallelEntropyAndLogprobs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import torch

__all__ = ["EXP_UNDERFLOW", "SHIFT_FLOOR", "ShardStats", "exp_nonpositive", "floor_shift", "VocabParallelEntropyMath"]

# Mirrors kExpUnderflow / kShiftFloor of kernels/entropy_row.h (see there for why).
EXP_UNDERFLOW = -87.0
SHIFT_FLOOR = -100.0


@dataclass(frozen=True)
class ShardStats:
    """Per-row partial statistics of one vocabulary shard (each float32 ``[rows]``).

    Attributes:
        local_max: max of the row's valid logits on this shard (-inf if it has none).
        sum_exp: ``sum exp(z - local_max)`` over the valid logits.
        sum_exp_shifted: ``sum exp(z - local_max) * (z - local_max)``.
        target_logit: the target's logit if the target lies in this shard, else 0.
    """

    local_max: torch.Tensor
    sum_exp: torch.Tensor
    sum_exp_shifted: torch.Tensor
    target_logit: torch.Tensor


def exp_nonpositive(d: torch.Tensor) -> torch.Tensor:
    """``exp`` of shifts from a maximum, exactly 0 below the fp32 underflow (as the kernels do)."""
    return torch.where(d < EXP_UNDERFLOW, torch.zeros_like(d), torch.exp(d))


def floor_shift(d: torch.Tensor) -> torch.Tensor:
    """Floor shifts at ``SHIFT_FLOOR`` so that a zero weight times a shift is 0, not NaN; NaN passes."""
    return torch.where(d < SHIFT_FLOOR, torch.full_like(d, SHIFT_FLOOR), d)


class VocabParallelEntropyMath:
    """The math of vocab-parallel entropy / log-prob, between the collectives (no communication here)."""

    @staticmethod
    def local_targets(targets: torch.Tensor, vocab_start: int, valid_width: int) -> torch.Tensor:
        """Target ids relative to this shard, ``-1`` where the target is not one of its valid columns."""
        local = targets.reshape(-1).to(torch.int64) - vocab_start
        outside = (local < 0) | (local >= valid_width)
        return torch.where(outside, torch.full_like(local, -1), local).contiguous()

    @staticmethod
    def rescale_to_global_max(stats: ShardStats, global_max: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(S, T)`` of this shard re-expressed at the global max.

        ``S' = S e^(m - M)``, ``T' = e^(m - M) (T + (m - M) S)``; a shard with no valid logit in a row
        (``S = 0``) contributes exactly 0.
        """
        empty = stats.sum_exp == 0
        delta = floor_shift(stats.local_max - global_max)
        scale = exp_nonpositive(delta)
        sum_exp = torch.where(empty, torch.zeros_like(scale), stats.sum_exp * scale)
        shifted = torch.where(empty, torch.zeros_like(scale), scale * (stats.sum_exp_shifted + delta * stats.sum_exp))
        return sum_exp, shifted

    @staticmethod
    def entropy_logprobs(
        global_max: torch.Tensor, sum_exp: torch.Tensor, sum_exp_shifted: torch.Tensor, target_logit: torch.Tensor
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(H, logp, log S)`` per row from the global statistics (all at the global max ``M``).

        ``lse = M + log S`` is never formed: rounded to fp32 it would carry ``ulp(|M|)`` of absolute
        error (5e-4 at ``|M| ~ 1e4``) into the log-prob and every ``p`` of the backward, whereas
        ``(z_target - M) - log S`` is exact up to the rounding of ``log S``.
        """
        log_sum = torch.log(sum_exp)
        entropy = log_sum - sum_exp_shifted / sum_exp
        logprobs = (target_logit - global_max) - log_sum
        return entropy, logprobs, log_sum
