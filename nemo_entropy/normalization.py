"""NeMo-RL's global normalisation, written once: every loss term and every metric of a micro-batch is divided by a
count of the whole optimizer step over every DP rank.

``sum(values * mask) / global_valid_tokens`` (token level) or the sum of per-sequence masked means over
``global_valid_seqs`` (sequence level). Summing the results of all micro-batches and ranks (what gradient
accumulation and DDP do) gives the batch mean; the result stays linear in ``1 / count``, so a split-API trainer
can pass count 1 and rescale. A count of 0 (a rank or micro-batch with no valid token) divides by 1: the
numerator is 0 there, and the loss and its gradient are 0 instead of NaN.
"""

from __future__ import annotations

from typing import Union

import torch

__all__ = ["Count", "zero_masked", "safe_count", "global_token_sum", "sequence_means", "global_sequence_sum", "reduce_per_token"]

Count = Union[torch.Tensor, float, int]


def zero_masked(tensor, mask: torch.Tensor, dtype=torch.float32):
    """``tensor`` as ``dtype`` with 0 on masked positions (``None`` stays ``None``). Padding may hold -inf or NaN,
    which must not reach a product with a 0 mask (0 x inf = NaN): inputs are masked where they enter."""
    if tensor is None:
        return None
    return torch.where(mask, tensor.to(dtype), torch.zeros((), dtype=dtype, device=tensor.device))


def safe_count(count: Count, like: torch.Tensor) -> torch.Tensor:
    """``count`` as a scalar tensor of ``like``'s dtype and device, with 0 replaced by 1."""
    value = torch.as_tensor(count, dtype=like.dtype).to(like.device)
    return torch.where(value > 0, value, torch.ones_like(value))


def global_token_sum(values: torch.Tensor, mask: torch.Tensor, count: Count) -> torch.Tensor:
    """``sum(values * mask) / count``: this micro-batch's share of the step's token mean."""
    maskf = mask.to(values.dtype)
    return (values * maskf).sum() / safe_count(count, values)


def sequence_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over its valid tokens, ``[batch]``; a sequence without valid tokens has mean 0."""
    maskf = mask.to(values.dtype)
    return (values * maskf).sum(-1) / maskf.sum(-1).clamp(min=1)


def global_sequence_sum(values: torch.Tensor, mask: torch.Tensor, count: Count) -> torch.Tensor:
    """Sum of per-sequence means over ``count`` sequences: this micro-batch's share of the step's sequence mean."""
    return sequence_means(values, mask).sum() / safe_count(count, values)


def reduce_per_token(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    token_level: bool,
    global_valid_tokens: Count,
    global_valid_seqs: Count,
) -> torch.Tensor:
    """NeMo-RL's loss reduction: token mean over the step (``token_level``) or mean of per-sequence means."""
    if token_level:
        return global_token_sum(values, mask, global_valid_tokens)
    return global_sequence_sum(values, mask, global_valid_seqs)
