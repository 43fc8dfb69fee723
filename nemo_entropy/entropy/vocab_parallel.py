"""Vocab-parallel entropy and log-prob: the math, the TP all-reduces, and the public functions.

Under tensor parallelism each rank holds a shard ``z[:, vocab_start : vocab_start + V_local]`` of every
token's logits. Per token we need, over the *full* vocabulary,

    H    = logsumexp(z) - sum_v softmax(z)_v z_v        (entropy)
    logp = z_target - logsumexp(z)                       (log-prob of the sampled token)

Following Megatron-core's ``VocabParallelCrossEntropy`` layout (``megatron/core/tensor_parallel/cross_entropy.py``),
the math lives in one class of small static methods (:class:`~nemo_entropy.entropy.shard.VocabParallelEntropyMath`) and the collectives sit between them in one
autograd Function (:class:`VocabParallelEntropyAndLogprobs`), shared by every backend:

1. a backend computes per-row partial statistics of its shard: local max ``m_r``,
   ``S_r = sum exp(z - m_r)``, ``T_r = sum exp(z - m_r) (z - m_r)`` and the target logit if the target
   falls in this shard (else 0);
2. all-reduce MAX of ``m_r`` -> global max ``M``; rescale ``S_r, T_r`` to ``M``;
3. one all-reduce SUM of the stacked ``(S, T, target logit)``;
4. ``H = log S - T / S``, ``logp = (z_target - M) - log S`` (that is ``z_target - lse``).

Backward needs no collective: ``dlogp/dz_v = [v = target] - p_v`` and ``dH/dz_v = -p_v (z_v - E_p z)``
depend only on the local logits and the saved per-row ``(M, log S, H)``, with
``p_v = exp((z_v - M) - log S)`` and ``z_v - E_p z = (z_v - M) - log S + H``. Saved state is O(N): the
logits shard itself (the caller's tensor, not a copy), the targets and three fp32 numbers per row. Entries at or past the true vocabulary size (Megatron pads the vocabulary to a
multiple of the TP size) are excluded: they behave as -inf logits and get zero gradient.

``T`` is accumulated relative to the max (``z - m`` rather than ``z``) because ``H = lse - E[z]`` loses
every digit to cancellation when logits are large; ``H = log S - T / S`` does not.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..parallel import GroupsLike, ParallelGroups, ProcessGroup, as_tp_group, tp_all_reduce
from .dispatch import resolve_backend
from .shard import ShardStats, VocabParallelEntropyMath

__all__ = [
    "ShardStats",
    "VocabParallelEntropyMath",
    "VocabParallelEntropyAndLogprobs",
    "vocab_parallel_entropy_and_logprobs",
    "vocab_parallel_entropy",
    "vocab_parallel_logprobs",
]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class VocabParallelEntropyAndLogprobs(torch.autograd.Function):
    """``(H, logp)`` of a ``[rows, V_local]`` logits shard; every TP collective of the feature is here."""

    @staticmethod
    def forward(ctx, logits, local_targets, valid_width, tp_group, backend):
        stats = backend.shard_stats(logits, local_targets, valid_width)

        global_max = stats.local_max.clone()
        tp_all_reduce(tp_group, global_max, "max")  # (1) TP all-reduce MAX
        sum_exp, shifted = VocabParallelEntropyMath.rescale_to_global_max(stats, global_max)
        sums = torch.stack([sum_exp, shifted, stats.target_logit])
        tp_all_reduce(tp_group, sums, "sum")  # (2) TP all-reduce SUM of (S, T, target logit)

        entropy, logprobs, log_sum = VocabParallelEntropyMath.entropy_logprobs(global_max, *sums.unbind(0))
        ctx.save_for_backward(logits, local_targets, global_max, log_sum, entropy)
        ctx.valid_width = valid_width
        ctx.backend = backend
        return entropy, logprobs

    @staticmethod
    def backward(ctx, grad_entropy, grad_logprobs):
        logits, local_targets, global_max, log_sum, entropy = ctx.saved_tensors
        grad_logits = ctx.backend.shard_grad(
            logits,
            local_targets,
            ctx.valid_width,
            global_max,
            log_sum,
            entropy,
            grad_entropy.float().contiguous(),
            grad_logprobs.float().contiguous(),
        )
        return grad_logits, None, None, None, None


def _check_inputs(logits_shard: torch.Tensor, targets: torch.Tensor) -> None:
    if not isinstance(logits_shard, torch.Tensor) or logits_shard.dtype not in SUPPORTED_DTYPES:
        got = logits_shard.dtype if isinstance(logits_shard, torch.Tensor) else type(logits_shard).__name__
        raise TypeError(f"logits_shard must be a float32, bfloat16 or float16 tensor, got {got}")
    if logits_shard.dim() < 1 or logits_shard.shape[-1] == 0:
        raise ValueError(f"logits_shard must have shape [..., V_local] with V_local >= 1, got {tuple(logits_shard.shape)}")
    if not isinstance(targets, torch.Tensor) or targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool:
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise TypeError(f"targets must be an integer tensor of token ids, got {got}")
    if tuple(targets.shape) != tuple(logits_shard.shape[:-1]):
        raise ValueError(
            f"targets shape {tuple(targets.shape)} must equal logits_shard.shape[:-1] = {tuple(logits_shard.shape[:-1])}"
        )
    if targets.device != logits_shard.device:
        raise ValueError(f"targets are on {targets.device} but logits_shard on {logits_shard.device}")


def _shard_geometry(
    v_local: int, tp_group: Optional[ProcessGroup], vocab_start: Optional[int], vocab_size: Optional[int]
) -> Tuple[int, int, int]:
    tp = ParallelGroups(tp_group=tp_group)
    if vocab_start is None:
        vocab_start = tp.tp_rank * v_local
    if vocab_size is None:
        vocab_size = v_local * tp.tp_world_size
    vocab_start, vocab_size = int(vocab_start), int(vocab_size)
    if not 1 <= vocab_size <= v_local * tp.tp_world_size:
        # Larger would give the targets past the last shard a logit of 0 instead of an error.
        raise ValueError(f"vocab_size must be in [1, {v_local * tp.tp_world_size}] (shard width {v_local} x TP size "
                         f"{tp.tp_world_size}), got {vocab_size}")
    if not 0 <= vocab_start < v_local * tp.tp_world_size:
        raise ValueError(
            f"vocab_start must be in [0, {v_local * tp.tp_world_size}) (shard width {v_local} x TP size "
            f"{tp.tp_world_size}), got {vocab_start}"
        )
    valid_width = max(0, min(v_local, vocab_size - vocab_start))
    return vocab_start, vocab_size, valid_width


def _check_target_range(targets: torch.Tensor, vocab_size: int) -> None:
    if targets.numel() == 0:
        return
    # One host sync; a silent out-of-range target would give a wrong log-prob with no error anywhere.
    lo, hi = int(targets.min()), int(targets.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"targets must be token ids in [0, vocab_size={vocab_size}), got {bad}")


def vocab_parallel_entropy_and_logprobs(
    logits_shard: torch.Tensor,
    targets: torch.Tensor,
    *,
    groups: GroupsLike = None,
    vocab_start: Optional[int] = None,
    vocab_size: Optional[int] = None,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Full-vocabulary entropy and target log-prob per token from a vocab-parallel logits shard.

    Args:
        logits_shard: ``[..., V_local]`` float32, bfloat16 or float16 logits of this rank's vocabulary
            shard. Read, never copied to fp32 (a non-contiguous last dimension is made contiguous in its
            own dtype).
        targets: integer token ids of shape ``logits_shard.shape[:-1]``, global ids in ``[0, vocab_size)``.
        groups: ``None`` (unsharded), the TP ``ProcessGroup``, or a
            :class:`~nemo_entropy.parallel.ParallelGroups` (its ``tp_group`` is used).
        vocab_start: global id of this shard's first column (default: TP rank x ``V_local``).
        vocab_size: true vocabulary size (default: ``V_local`` x TP size); columns at or past it are
            padding and excluded.
        backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"`` (see
            :mod:`nemo_entropy.entropy.dispatch`).

    Returns:
        ``(entropy, logprobs)``, float32, shape of ``targets``, both differentiable with respect to
        ``logits_shard``. Rows whose logits are all -inf (or contain NaN or +inf) give NaN.

    Raises:
        ValueError: targets outside ``[0, vocab_size)``, bad shapes or shard geometry.
        TypeError: unsupported dtypes.
    """
    _check_inputs(logits_shard, targets)
    tp_group = as_tp_group(groups)
    v_local = logits_shard.shape[-1]
    vocab_start, vocab_size, valid_width = _shard_geometry(v_local, tp_group, vocab_start, vocab_size)
    _check_target_range(targets, vocab_size)

    impl = resolve_backend(backend, logits_shard.device)
    logits2d = logits_shard.reshape(-1, v_local)
    if logits2d.shape[0] > 0 and logits2d.stride(-1) != 1:
        logits2d = logits2d.contiguous()
    local_targets = VocabParallelEntropyMath.local_targets(targets, vocab_start, valid_width)
    entropy, logprobs = VocabParallelEntropyAndLogprobs.apply(logits2d, local_targets, valid_width, tp_group, impl)
    return entropy.reshape(targets.shape), logprobs.reshape(targets.shape)


def vocab_parallel_entropy(logits_shard: torch.Tensor, targets: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
    """Full-vocabulary entropy per token (see :func:`vocab_parallel_entropy_and_logprobs`).

    ``targets`` may be omitted: the entropy does not depend on them (token 0 is used internally).
    """
    if targets is None:
        targets = torch.zeros(logits_shard.shape[:-1], dtype=torch.int64, device=logits_shard.device)
    return vocab_parallel_entropy_and_logprobs(logits_shard, targets, **kwargs)[0]


def vocab_parallel_logprobs(logits_shard: torch.Tensor, targets: torch.Tensor, **kwargs) -> torch.Tensor:
    """Log-prob of each target token over the full vocabulary (see :func:`vocab_parallel_entropy_and_logprobs`)."""
    return vocab_parallel_entropy_and_logprobs(logits_shard, targets, **kwargs)[1]
