"""Triton backend: the same online-softmax math as ``kernels/entropy_row.h``, one program per row.

The second compiled path for GPU users (the form the field's fused kernels take). CI runs it on CPU
tensors under ``TRITON_INTERPRET=1``, which must be set before triton is first imported; this module is
imported only when the triton backend is requested, never by ``import nemo_entropy.entropy``.

Each program walks its row in blocks of ``BLOCK`` columns (masked loads, so any width works: the pitfall
of fused kernels that assumed the vocabulary is a multiple of the block size), keeping the running
``(max, sum exp, sum exp * shift)`` of the row in fp32 registers. The backward recomputes ``p`` from
the saved ``(max, log S, H)`` and writes the gradient in the logits' dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .shard import EXP_UNDERFLOW, SHIFT_FLOOR, ShardStats

# Block of columns per step. 4096 fp32 registers per program spread over num_warps warps; a row of
# 152064 / 8 = 19008 columns takes 5 steps, the last one masked.
DEFAULT_BLOCK = 4096
# jit functions may read globals only as constexpr.
_SHIFT_FLOOR = tl.constexpr(SHIFT_FLOOR)
_EXP_UNDERFLOW = tl.constexpr(EXP_UNDERFLOW)


@triton.jit
def _floor_shift(d):
    return tl.where(d < _SHIFT_FLOOR, _SHIFT_FLOOR, d)


@triton.jit
def _exp_nonpositive(d):
    return tl.where(d < _EXP_UNDERFLOW, 0.0, tl.exp(d))


@triton.jit
def _shard_stats_kernel(
    logits_ptr,
    row_stride,
    targets_ptr,
    valid_width,
    max_ptr,
    sum_exp_ptr,
    shifted_ptr,
    target_logit_ptr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    run_max = tl.full((), float("-inf"), tl.float32)
    run_sum = tl.zeros((), tl.float32)
    run_shifted = tl.zeros((), tl.float32)
    for start in range(0, valid_width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(base + cols, mask=cols < valid_width, other=float("-inf")).to(tl.float32)
        new_max = tl.maximum(run_max, tl.max(z, axis=0), propagate_nan=tl.PropagateNan.ALL)
        # Shifts are taken from 0 while the row has seen only -inf, so -inf - -inf never happens.
        ref = tl.where(new_max == float("-inf"), 0.0, new_max)
        delta = _floor_shift(run_max - ref)
        scale = _exp_nonpositive(delta)
        empty = run_sum == 0.0
        run_shifted = tl.where(empty, 0.0, scale * (run_shifted + delta * run_sum))
        run_sum = tl.where(empty, 0.0, run_sum * scale)
        d = _floor_shift(z - ref)
        # A NaN logit must poison the row (tl.max may drop it): d NaN -> e NaN -> sums NaN.
        d = tl.where(z != z, z, d)
        e = _exp_nonpositive(d)
        e = tl.where(d != d, d, e)
        run_sum += tl.sum(e, axis=0)
        run_shifted += tl.sum(e * d, axis=0)
        run_max = new_max
    target = tl.load(targets_ptr + row)
    in_shard = (target >= 0) & (target < valid_width)
    z_target = tl.load(base + tl.where(in_shard, target, 0), mask=in_shard, other=0.0).to(tl.float32)
    tl.store(max_ptr + row, run_max)
    tl.store(sum_exp_ptr + row, run_sum)
    tl.store(shifted_ptr + row, run_shifted)
    tl.store(target_logit_ptr + row, tl.where(in_shard, z_target, 0.0))


@triton.jit
def _shard_grad_kernel(
    logits_ptr,
    row_stride,
    grad_ptr,
    targets_ptr,
    valid_width,
    total_width,
    max_ptr,
    log_sum_ptr,
    entropy_ptr,
    grad_entropy_ptr,
    grad_logprobs_ptr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * row_stride
    out = grad_ptr + row * total_width
    target = tl.load(targets_ptr + row)
    row_max = tl.load(max_ptr + row)
    log_sum = tl.load(log_sum_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    g_entropy = tl.load(grad_entropy_ptr + row)
    g_logprob = tl.load(grad_logprobs_ptr + row)
    for start in range(0, total_width, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        valid = cols < valid_width
        z = tl.load(base + cols, mask=valid, other=float("-inf")).to(tl.float32)
        d = _floor_shift((z - row_max) - log_sum)
        p = _exp_nonpositive(d)
        p = tl.where(d != d, d, p)
        g = -p * (g_logprob + g_entropy * (d + entropy))
        g = tl.where(cols == target, g + g_logprob, g)
        g = tl.where(valid, g, 0.0)  # padded vocabulary entries: zero gradient
        tl.store(out + cols, g.to(grad_ptr.dtype.element_ty), mask=cols < total_width)


class TritonBackend:
    """Per-shard statistics and gradients with the Triton kernels above (CUDA, or CPU when interpreted)."""

    name = "triton"

    def __init__(self, block: int = DEFAULT_BLOCK, num_warps: int = 8):
        if block & (block - 1):
            raise ValueError(f"block must be a power of two, got {block}")
        self.block = int(block)
        self.num_warps = int(num_warps)

    def shard_stats(self, logits: torch.Tensor, local_targets: torch.Tensor, valid_width: int) -> ShardStats:
        """Per-row partial statistics of a ``[rows, V_local]`` shard (one read of the logits)."""
        rows = logits.shape[0]
        out = torch.empty(4, rows, dtype=torch.float32, device=logits.device)
        if rows:
            _shard_stats_kernel[(rows,)](
                logits, logits.stride(0), local_targets, int(valid_width),
                out[0], out[1], out[2], out[3],
                BLOCK=self.block, num_warps=self.num_warps,
            )
        return ShardStats(*out.unbind(0))

    def shard_grad(
        self, logits, local_targets, valid_width, row_max, log_sum, entropy, grad_entropy, grad_logprobs
    ) -> torch.Tensor:
        """Gradient of the shard in its dtype (one read of the logits, one write of the gradient)."""
        rows, width = logits.shape
        grad = torch.empty((rows, width), dtype=logits.dtype, device=logits.device)
        if rows:
            _shard_grad_kernel[(rows,)](
                logits, logits.stride(0), grad, local_targets, int(valid_width), width,
                row_max.contiguous(), log_sum.contiguous(), entropy.contiguous(), grad_entropy, grad_logprobs,
                BLOCK=self.block, num_warps=self.num_warps,
            )
        return grad
