"""Covariance scores and the exact, layout-invariant selection of the tokens Clip-Cov / KL-Cov treat specially.

The reference implementation selects per micro-batch per GPU, so its selected set changes with micro-batch
size and GPU count (DESIGN.md section 3). Here ``scope: batch`` selects over every valid token of an optimizer
step, on every rank of the token-holding group, and the result is *bit-identical* whatever the layout:

1. **Exact means.** Means of log-prob and advantage are computed from fixed-point int64 sums (values rounded to
   multiples of 2**-20, so the mean is exact to ~1e-6 and, above all, independent of summation order). One
   all-reduce of ``[count, sum l, sum A, sum pA]`` over the token group. A floating-point all-reduce would give
   different last bits for different layouts and could flip a near-tie in the top-k.
2. **Scores** are then elementwise functions of per-token values and those shared means: identical everywhere.
3. **Exact distributed top-k** under a total order (priority descending, token uid ascending): each rank offers
   its local top-k (padded to exactly k), one all-gather, every rank derives the same k-th element and keeps
   its tokens at or above it. Communication is O(world x k), never O(N); no per-token data reaches the host.
4. **Clip-Cov's random subset** is "the candidates with the smallest hash keys", keys a counter-based hash of
   ``(seed, step, token_uid)``: no RNG state, the same on TP/CP replicas, reproducible after a resume, and a
   uniformly random subset of the candidates.

Every rank of the group must call these functions (even with zero valid tokens): they issue their collectives
unconditionally, and every data-dependent branch is taken on globally agreed values.
"""

from __future__ import annotations

from typing import Optional

import torch

from .config import LossConfig
from .parallel import GroupsLike, ParallelGroups, as_groups

__all__ = [
    "covariance_scores",
    "select_tokens",
    "select_tokens_with_scores",
    "select_top_covariance",
    "select_clip_cov",
    "selection_quota",
    "hash_keys",
    "token_uids_for",
    "global_token_stats",
    "validate_token_inputs",
]

# Fixed-point scale of the exact sums: resolution 2**-20 ~ 1e-6 of a log-prob or advantage. The int64 sums
# stay exact while sum(|x|) over the whole batch < 2**43 (e.g. 1e9 tokens with |x| < 8000).
_FIXED_POINT_BITS = 20
_INT64_MAX = torch.iinfo(torch.int64).max
_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------- validation
def _as_bool_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    if mask.dtype == torch.bool:
        return mask
    if mask.dtype.is_floating_point or mask.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must hold only 0 and 1 (or be bool); it has other values")
        return mask != 0
    raise TypeError(f"{name} must be bool or 0/1 numeric, got dtype {mask.dtype}")


def _non_finite_error(name: str, tensor: torch.Tensor, mask: torch.Tensor) -> ValueError:
    count = int(((~torch.isfinite(tensor.detach())) & mask).sum())
    return ValueError(f"{name} has {count} non-finite (NaN or inf) values on valid (unmasked) tokens")


def validate_token_inputs(mask: torch.Tensor, *, check_finite: bool = True,
                          **tensors: Optional[torch.Tensor]) -> torch.Tensor:
    """Check per-token tensors against ``mask`` and return the mask as bool.

    Every tensor must have the mask's shape and device; float tensors must be finite on valid tokens
    (masked positions may hold anything, e.g. -inf log-probs of padding); ``token_uids`` must be int64.
    ``check_finite=False`` leaves the finiteness check to the caller (the exact sums do it for free).
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    bool_mask = _as_bool_mask(mask)
    for name, tensor in tensors.items():
        if tensor is None:
            continue
        if not isinstance(tensor, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.shape != mask.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)} but mask has shape {tuple(mask.shape)}; "
                             f"per-token tensors must all be [batch, length]")
        if tensor.device != mask.device:
            raise ValueError(f"{name} is on {tensor.device} but mask is on {mask.device}")
        if name == "token_uids":
            if tensor.dtype != torch.int64:
                raise TypeError(f"token_uids must be int64, got {tensor.dtype}")
            continue
        if not tensor.dtype.is_floating_point:
            raise TypeError(f"{name} must be a floating-point tensor (fp32, bf16, fp16 or fp64), got {tensor.dtype}")
        if check_finite and not bool(torch.isfinite(tensor.detach()).logical_or_(~bool_mask).all()):
            raise _non_finite_error(name, tensor, bool_mask)
    return bool_mask


# ----------------------------------------------------------------------------------------------- exact sums
def _fixed_point_sum(values: torch.Tensor, mask: Optional[torch.Tensor], world_size: int) -> tuple[torch.Tensor, int]:
    """Exact int64 sum of ``values`` over valid tokens, each rounded to a multiple of 2**-20, and a problem code
    (0 fine, 1 NaN/inf on a valid token, 2 too large for exact sums).

    Problems are *returned*, not raised: the caller folds them into the all-reduce so that every rank raises
    together instead of one rank raising while the others wait in the collective.
    Scaling by a power of two and rounding to an integer are exact in the input's own float format, so fp32
    inputs never need an fp64 copy.
    """
    work_dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    if mask is None:  # already compacted to valid tokens
        masked = values.detach().to(work_dtype)
    else:
        masked = torch.where(mask, values.detach().to(work_dtype), torch.zeros((), dtype=work_dtype,
                                                                                device=values.device))
    zero = torch.zeros((), dtype=torch.int64, device=values.device)
    if masked.numel() == 0:
        return zero, 0
    max_abs = float(masked.abs().max())  # NaN and inf propagate to the max
    if not max_abs < float("inf"):
        return zero, 1
    # Overflow guard (no per-token host copy): the group's sum of |q| must stay below 2**62.
    if max_abs * float(masked.numel()) * float(1 << _FIXED_POINT_BITS) * world_size >= 2.0**62:
        return zero, 2
    return torch.round(masked * float(1 << _FIXED_POINT_BITS)).to(torch.int64).sum(), 0


def global_token_stats(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor],
    groups: GroupsLike = None,
    *,
    form: str = "natural",
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(N, mean l, mean X)`` over the valid tokens of the whole token group, with one int64 all-reduce.

    ``mask=None``: the tensors hold valid tokens only (already compacted).

    ``X`` is the advantage (``form="natural"``) or ``p * A`` with ``p = exp(l)`` (``form="vanilla"``).
    The means are float64 scalars identical on every rank, whatever the layout. Bad values on any rank (NaN or
    inf on a valid token, magnitudes too large for exact sums) make *every* rank raise, after the all-reduce.
    """
    g = as_groups(groups)
    mask = None if mask is None else _as_bool_mask(mask)
    x = advantages if form == "natural" else torch.exp(logprobs.detach().float()) * advantages.detach().float()
    world = g.token_world_size
    count = mask.sum() if mask is not None else torch.tensor(logprobs.numel(), device=logprobs.device)
    sum_l, problem_l = _fixed_point_sum(logprobs, mask, world)
    sum_x, problem_x = _fixed_point_sum(x, mask, world)
    # Problem flags ride in the same all-reduce as bit masks over ranks (rank r sets bit r; up to 62 ranks
    # are named, beyond that the count is still exact-or-flagged).
    bit = 1 << min(g.token_rank, 61)
    flags = [bit if problem_l == 1 else 0, bit if problem_x == 1 else 0, bit if 2 in (problem_l, problem_x) else 0]
    local = torch.stack([count.to(torch.int64), sum_l, sum_x,
                         *[torch.tensor(f, dtype=torch.int64, device=sum_l.device) for f in flags]])
    total = g.token_all_reduce_sum(local)
    names = ("logprobs have NaN or inf on valid (unmasked) tokens",
             ("advantages" if form == "natural" else "advantages (or exp(logprobs) * advantages)")
             + " have NaN or inf on valid (unmasked) tokens",
             "log-probs or advantages are too large for the exact fixed-point sums "
             "(max |value| x tokens x world must stay below 2**42)")
    for flag, message in zip(total[3:].tolist(), names):
        if flag:
            ranks = [r for r in range(62) if flag >> r & 1]
            raise ValueError(f"{message} (token-group ranks {ranks})")
    n = int(total[0])
    denom = float(max(n, 1) * (1 << _FIXED_POINT_BITS))
    return n, total[1].double() / denom, total[2].double() / denom


def covariance_scores(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    groups: GroupsLike = None,
    form: str = "natural",
) -> torch.Tensor:
    """Per-token covariance scores (fp32, shape of ``mask``; 0 on masked tokens).

    ``natural``: ``c_i = (l_i - mean l) (A_i - mean A)``; ``vanilla``: ``c_i = (l_i - mean l)(p_i A_i - mean pA)``.
    Means are over the valid tokens of the whole token group (``groups``), exact and layout invariant.
    """
    if form not in ("natural", "vanilla"):
        raise ValueError(f"form={form!r} is invalid: allowed 'natural' or 'vanilla'")
    bool_mask = validate_token_inputs(mask, logprobs=logprobs, advantages=advantages)
    _, mean_l, mean_x = global_token_stats(logprobs, advantages, bool_mask, groups, form=form)
    return _scores_from_means(logprobs, advantages, bool_mask, mean_l, mean_x, form)


def _scores_from_means(logprobs, advantages, mask, mean_l, mean_x, form):
    # fp32 elementwise math on identical inputs and identical (exact) means: bit-identical on every rank.
    l = logprobs.detach().float()
    a = advantages.detach().float()
    x = a if form == "natural" else torch.exp(l) * a
    scores = (l - mean_l.float()) * (x - mean_x.float())
    return torch.where(mask, scores, torch.zeros((), dtype=scores.dtype))


# ----------------------------------------------------------------------------------------------- hash keys
def _splitmix64_int(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _signed(x: int) -> int:
    return x - (1 << 64) if x >= (1 << 63) else x


def _lshr(x: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _splitmix64(x: torch.Tensor) -> torch.Tensor:
    # int64 arithmetic wraps modulo 2**64, which is what splitmix64 needs.
    x = x + _signed(0x9E3779B97F4A7C15)
    x = (x ^ _lshr(x, 30)) * _signed(0xBF58476D1CE4E5B9)
    x = (x ^ _lshr(x, 27)) * _signed(0x94D049BB133111EB)
    return x ^ _lshr(x, 31)


def hash_keys(token_uids: torch.Tensor, *, seed: int, step: int) -> torch.Tensor:
    """53-bit non-negative int64 keys, a counter-based hash of ``(seed, step, token_uid)``.

    Pure function of its arguments: the same on every rank and after a resume. 53 bits so that the keys
    convert to float64 exactly.
    """
    if token_uids.dtype != torch.int64:
        raise TypeError(f"token_uids must be int64, got {token_uids.dtype}")
    salt = _signed(_splitmix64_int(_splitmix64_int(int(seed) & _MASK64) ^ (int(step) & _MASK64)))
    return _lshr(_splitmix64(_splitmix64(token_uids ^ salt)), 11)


def token_uids_for(sample_ids: torch.Tensor, seq_len: int, positions: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Layout-independent token uids: ``sample_id * seq_len + position`` as an int64 ``[batch, length]`` tensor.

    ``sample_ids`` ([batch]) must identify each sample within the optimizer step (e.g. its index in the rollout
    batch), not its position on this rank.
    """
    sample_ids = sample_ids.to(torch.int64).reshape(-1, 1)
    if positions is None:
        positions = torch.arange(seq_len, dtype=torch.int64, device=sample_ids.device).reshape(1, -1)
    return sample_ids * int(seq_len) + positions.to(torch.int64)


# ----------------------------------------------------------------------------------------------- top-k
def _lexicographic_top(priority: torch.Tensor, uids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` entries of 1-D tensors under (priority descending, uid ascending)."""
    by_uid = torch.argsort(uids)
    priority, uids = priority[by_uid], uids[by_uid]
    by_priority = torch.argsort(priority, descending=True, stable=True)
    return priority[by_priority][:k], uids[by_priority][:k]


def _local_offer(priority: torch.Tensor, uids: torch.Tensor, eligible: torch.Tensor, k: int):
    """This rank's first ``k`` eligible entries under the total order, padded to exactly ``k`` with
    ``(-inf, INT64_MAX)``, as float64 priorities and int64 uids."""
    flat_p = priority.reshape(-1).masked_fill(~eligible.reshape(-1), float("-inf"))
    flat_u = uids.reshape(-1)
    if flat_p.numel() > k:
        # Cut to the entries that can matter (>= the k-th largest priority, ties included) before sorting;
        # a top-k over the dense tensor avoids compacting all N tokens first.
        kth = torch.topk(flat_p, k, sorted=False).values.min()
        keep = (flat_p >= kth) & eligible.reshape(-1) if bool(kth > float("-inf")) else eligible.reshape(-1)
    else:
        keep = eligible.reshape(-1)
    top_p, top_u = _lexicographic_top(flat_p[keep].to(torch.float64), flat_u[keep], k)
    pad = k - top_p.numel()
    if pad:
        top_p = torch.cat([top_p, torch.full((pad,), float("-inf"), dtype=torch.float64, device=top_p.device)])
        top_u = torch.cat([top_u, torch.full((pad,), _INT64_MAX, dtype=torch.int64, device=top_u.device)])
    return top_p, top_u


def _distributed_top_k(
    priority: torch.Tensor, uids: torch.Tensor, eligible: torch.Tensor, k: int, g: ParallelGroups
) -> torch.Tensor:
    """Mask of the ``k`` eligible tokens of the whole token group ranked first by (priority desc, uid asc).

    All of them if fewer than ``k`` are eligible. ``k`` must be the same on every rank.
    """
    top_p, top_u = _local_offer(priority, uids, eligible, k)
    if g.token_world_size > 1:
        # One all-gather of the k (priority, uid) pairs of every rank, both as int64 bit patterns.
        packed = torch.stack([top_p.view(torch.int64), top_u]).reshape(1, 2, k)
        gathered = g.token_all_gather(packed)
        top_p, top_u = _lexicographic_top(gathered[:, 0, :].reshape(-1).view(torch.float64),
                                          gathered[:, 1, :].reshape(-1), k)
    # Priorities came from this dtype exactly, so comparing in it is exact.
    threshold_p, threshold_u = top_p[k - 1].to(priority.dtype), top_u[k - 1]
    above = (priority > threshold_p) | ((priority == threshold_p) & (uids <= threshold_u))
    return eligible & above


def selection_quota(ratio: float, num_valid_tokens: int) -> int:
    """``max(1, int(N * ratio))``: the reference's quota (same expression, same float rounding)."""
    return max(1, int(num_valid_tokens * ratio))


def select_top_covariance(
    scores: torch.Tensor, eligible: torch.Tensor, token_uids: torch.Tensor, k: int, groups: GroupsLike = None
) -> torch.Tensor:
    """The ``k`` eligible tokens with the largest scores over the token group; ties broken by smaller uid."""
    return _distributed_top_k(scores, token_uids, eligible, k, as_groups(groups))


def select_clip_cov(
    candidates: torch.Tensor, token_uids: torch.Tensor, k: int, *, seed: int, step: int, groups: GroupsLike = None
) -> torch.Tensor:
    """A uniformly random subset of ``k`` candidates (all if fewer): those with the smallest hash keys."""
    keys = hash_keys(token_uids, seed=seed, step=step)
    return _distributed_top_k(-keys.to(torch.float64), token_uids, candidates, k, as_groups(groups))


def select_tokens(
    config: LossConfig,
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    token_uids: torch.Tensor,
    step: int,
    groups: GroupsLike = None,
) -> torch.Tensor:
    """Bool mask of the tokens Clip-Cov / KL-Cov treat specially (all False for ``method: ppo``).

    Pass the log-probs of the policy that generated the data (``prev_logprobs``) for the *whole* optimizer
    step on every rank of the token group (``groups``). ``token_uids`` ([batch, length] int64) identify each
    token independently of where it lives and must be unique over the group; ``step`` is the optimizer step
    (Clip-Cov's hash keys use it, with ``config.seed``).

    * KL-Cov: the ``max(1, floor(kl_cov_ratio * N))`` valid tokens with the largest covariance score
      (ties: smaller uid first).
    * Clip-Cov: among valid tokens with ``clip_cov_lb < c < clip_cov_ub``, ``max(1, floor(clip_cov_ratio * N))``
      chosen uniformly at random (fewer if fewer exist). The reference also drops tokens the PPO clip
      already clipped; at the scoring policy the ratio is exactly 1, so none is clipped there.

    ``N`` is the number of valid tokens over the whole group. The mask is bit-identical for any split of
    the same tokens over ranks and micro-batches.
    """
    if config.method == "ppo":  # nothing to select: no statistics, no collective (every rank agrees)
        return torch.zeros_like(validate_token_inputs(mask, check_finite=False, logprobs=logprobs,
                                                      advantages=advantages, token_uids=token_uids))
    return _select(config, logprobs, advantages, mask, token_uids, step, groups, with_scores=False)[0]


def select_tokens_with_scores(
    config: LossConfig,
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    token_uids: torch.Tensor,
    step: int,
    groups: GroupsLike = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(select_tokens(...), covariance_scores(...))`` from one pass: one compaction, one all-reduce.

    The scores are bit-identical to :func:`covariance_scores` (same exact means, same elementwise math);
    callers that log covariance metrics next to the selection (the engine, the NeMo-RL driver wrapper) need
    both. For ``method: ppo`` the mask is all False and the scores are still computed.
    """
    return _select(config, logprobs, advantages, mask, token_uids, step, groups, with_scores=True)


def _select(config, logprobs, advantages, mask, token_uids, step, groups, *, with_scores):
    bool_mask = validate_token_inputs(mask, check_finite=False, logprobs=logprobs, advantages=advantages,
                                      token_uids=token_uids)
    g = as_groups(groups)
    # Work on the valid tokens only (one nonzero, three gathers), scatter the answers back at the end.
    valid = bool_mask.reshape(-1).nonzero().squeeze(1)
    lp, adv, uids = (t.reshape(-1).index_select(0, valid) for t in (logprobs, advantages, token_uids))
    n, mean_l, mean_x = global_token_stats(lp, adv, None, g, form=config.cov_form)
    chosen = torch.zeros_like(bool_mask)
    full_scores = torch.zeros(bool_mask.shape, dtype=torch.float32, device=bool_mask.device) if with_scores else None
    if n == 0:  # agreed by every rank: nobody enters the all-gather
        return chosen, full_scores
    everything = torch.ones_like(uids, dtype=torch.bool)
    scores = _scores_from_means(lp, adv, everything, mean_l, mean_x, config.cov_form)
    if with_scores:
        full_scores.view(-1)[valid] = scores
    if config.method == "ppo":
        return chosen, full_scores
    k = selection_quota(config.selection_ratio, n)
    if config.method == "kl_cov":
        picked = _distributed_top_k(scores, uids, everything, k, g)
    else:
        candidates = (scores > config.clip_cov_lb) & (scores < config.clip_cov_ub)
        picked = select_clip_cov(candidates, uids, k, seed=config.seed, step=step, groups=g)
    chosen.view(-1)[valid[picked]] = True
    return chosen, full_scores
