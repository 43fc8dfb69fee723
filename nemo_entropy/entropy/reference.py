"""The chunked PyTorch backend: the fallback everywhere and the oracle the compiled backends check against.

Same per-shard contract as the kernels (``shard_stats`` / ``shard_grad``, see
:class:`~nemo_entropy.entropy.vocab_parallel.VocabParallelEntropyAndLogprobs`), computed with ordinary
tensor ops on blocks of rows so that at most ``chunk_elements`` fp32 values exist at a time (a few fp32
temporaries of that size, never the N x V shard).
"""

from __future__ import annotations

import torch

from .shard import ShardStats, exp_nonpositive, floor_shift

# 2^22 fp32 values = 16 MiB per temporary: large enough to amortise per-op overhead, small enough to
# stay far below the shard size that the memory budget is about.
DEFAULT_CHUNK_ELEMENTS = 1 << 22


def _row_blocks(rows: int, width: int, chunk_elements: int):
    step = max(1, chunk_elements // max(1, width))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


class ReferenceBackend:
    """Per-shard statistics and gradients in chunked PyTorch (any device, any dtype)."""

    name = "reference"

    def __init__(self, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        self.chunk_elements = int(chunk_elements)

    def shard_stats(self, logits: torch.Tensor, local_targets: torch.Tensor, valid_width: int) -> ShardStats:
        """Per-row ``(local max, sum exp, sum exp * shift, target logit)`` of a ``[rows, V_local]`` shard."""
        rows = logits.shape[0]
        out = torch.empty(4, rows, dtype=torch.float32, device=logits.device)
        in_shard = (local_targets >= 0) & (local_targets < valid_width)
        safe_targets = torch.where(in_shard, local_targets, torch.zeros_like(local_targets))
        if valid_width == 0:
            out[0].fill_(float("-inf"))
            out[1:].zero_()
            return ShardStats(*out.unbind(0))
        for r0, r1 in _row_blocks(rows, valid_width, self.chunk_elements):
            z = logits[r0:r1, :valid_width].float()
            # amax propagates NaN, as the kernels' max does.
            local_max = z.amax(dim=-1)
            empty = local_max == float("-inf")
            ref = torch.where(empty, torch.zeros_like(local_max), local_max)
            d = floor_shift(z - ref[:, None])
            e = exp_nonpositive(d)
            out[0, r0:r1] = local_max
            out[1, r0:r1] = e.sum(dim=-1)
            out[2, r0:r1] = (e * d).sum(dim=-1)
            picked = z.gather(1, safe_targets[r0:r1, None]).squeeze(1)
            out[3, r0:r1] = torch.where(in_shard[r0:r1], picked, torch.zeros_like(picked))
        return ShardStats(*out.unbind(0))

    def shard_grad(
        self,
        logits: torch.Tensor,
        local_targets: torch.Tensor,
        valid_width: int,
        row_max: torch.Tensor,
        log_sum: torch.Tensor,
        entropy: torch.Tensor,
        grad_entropy: torch.Tensor,
        grad_logprobs: torch.Tensor,
    ) -> torch.Tensor:
        """Gradient of ``sum(grad_logprobs * logp + grad_entropy * H)`` w.r.t. the shard, in its dtype."""
        rows, width = logits.shape
        grad = torch.zeros_like(logits, memory_format=torch.contiguous_format)
        if valid_width == 0 or rows == 0:
            return grad
        in_shard = (local_targets >= 0) & (local_targets < valid_width)
        safe_targets = torch.where(in_shard, local_targets, torch.zeros_like(local_targets))
        for r0, r1 in _row_blocks(rows, valid_width, self.chunk_elements):
            z = logits[r0:r1, :valid_width].float()
            d = floor_shift((z - row_max[r0:r1, None]) - log_sum[r0:r1, None])
            p = exp_nonpositive(d)
            gl = grad_logprobs[r0:r1, None]
            g = -p * (gl + grad_entropy[r0:r1, None] * (d + entropy[r0:r1, None]))
            bump = torch.where(in_shard[r0:r1, None], gl, torch.zeros_like(gl))
            g.scatter_add_(1, safe_targets[r0:r1, None], bump)
            grad[r0:r1, :valid_width] = g.to(logits.dtype)
        return grad
