"""The exact, layout-invariant primitives of the step plan: fixed-point sums, covariance scores, the distributed
top-k, hash keys and token uids (pure tensor math and the two collectives, through ``nemo_entropy.parallel``).

The reference implementation selects per micro-batch per GPU, so its selected set changes with micro-batch
size and GPU count (README, "Selection scope"). Here ``scope: batch`` selects over every valid token of an optimizer
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
unconditionally, and every data-dependent branch is taken on globally agreed values. Which tokens a control
selects, from these primitives, is the control's business (``nemo_entropy.controls``); the per-step plan
(``nemo_entropy.plan``) runs them once per optimizer step, and ``nemo_entropy.selection`` reads its selection.
"""

from __future__ import annotations

from typing import Optional

import torch

from .parallel import GroupsLike, as_groups

__all__ = [
    "covariance_scores",
    "distributed_top_k",
    "merged_top_k",
    "chosen_from_merged",
    "exact_group_sums",
    "scores_from_means",
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


def exact_group_sums(
    counts: list[torch.Tensor],
    values: list[tuple[str, torch.Tensor]],
    mask: Optional[torch.Tensor],
    groups: GroupsLike = None,
    *,
    local_error: Optional[Exception] = None,
) -> tuple[list[int], list[torch.Tensor]]:
    """Integer ``counts`` and exact fixed-point sums of ``values`` over the whole token group, in ONE all-reduce.

    ``values`` are ``(name, tensor)`` pairs summed over the valid tokens (``mask``; ``None``: already compacted).
    Every problem is folded into the same all-reduce as a count of ranks, so that all ranks raise together after
    it and none is left waiting in a collective: a ``local_error`` this rank found while checking its inputs
    (the rank then contributes zeros), NaN or inf on a valid token, magnitudes too large for exact sums.
    Counts of ranks cannot wrap, whatever the group size.

    Returns ``(counts, sums)``: Python ints, and float64 scalars (the exact sums, identical on every rank).
    """
    g = as_groups(groups)
    world = g.token_world_size
    device = mask.device if mask is not None else (values[0][1].device if values else torch.device("cpu"))
    zero = torch.zeros((), dtype=torch.int64, device=device)
    local_counts = [zero if local_error is not None else c.to(torch.int64).reshape(()) for c in counts]
    sums, non_finite, overflow = [], [], 0
    for _, tensor in values:
        total, problem = (zero, 0) if local_error is not None else _fixed_point_sum(tensor, mask, world)
        sums.append(total)
        non_finite.append(int(problem == 1))
        overflow = max(overflow, int(problem == 2))
    flags = [int(local_error is not None), *non_finite, overflow]
    local = torch.stack([*local_counts, *sums, *[torch.tensor(f, dtype=torch.int64, device=device) for f in flags]])
    total = g.token_all_reduce_sum(local)
    n_counts, n_values = len(counts), len(values)
    problems = total[n_counts + n_values:].tolist()
    if any(problems):
        # Every rank saw the same totals, so every rank is here: one more collective names the ranks.
        flags_all = g.token_all_gather(local[n_counts + n_values:].reshape(1, -1))
        ranks = lambda column: [r for r in range(flags_all.shape[0]) if int(flags_all[r, column])]  # noqa: E731
        if problems[0]:
            if local_error is not None:
                raise local_error
            raise ValueError(f"token-group rank(s) {ranks(0)} rejected their inputs (their error says why); "
                             "stopping here instead of waiting in a collective")
        for index, (name, _) in enumerate(values):
            if problems[1 + index]:
                raise ValueError(f"{name} have NaN or inf on valid (unmasked) tokens on token-group rank(s) "
                                 f"{ranks(1 + index)}")
        raise ValueError("per-token values are too large for the exact fixed-point sums (max |value| x tokens x "
                         f"world must stay below 2**42) on token-group rank(s) {ranks(len(problems) - 1)}")
    return ([int(c) for c in total[:n_counts].tolist()],
            [t.double() / float(1 << _FIXED_POINT_BITS) for t in total[n_counts:n_counts + n_values]])


def covariance_inputs(logprobs: torch.Tensor, advantages: torch.Tensor, form: str) -> list[tuple[str, torch.Tensor]]:
    """The per-token values whose means the covariance scores need: ``l`` and ``A`` (natural) or ``p A`` (vanilla)."""
    if form == "natural":
        return [("logprobs", logprobs), ("advantages", advantages)]
    return [("logprobs", logprobs),
            ("advantages (or exp(logprobs) * advantages)",
             torch.exp(logprobs.detach().float()) * advantages.detach().float())]


def global_token_stats(
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: Optional[torch.Tensor],
    groups: GroupsLike = None,
    *,
    form: str = "natural",
    local_error: Optional[Exception] = None,
) -> tuple[int, torch.Tensor, torch.Tensor]:
    """``(N, mean l, mean X)`` over the valid tokens of the whole token group, with one int64 all-reduce.

    ``mask=None``: the tensors hold valid tokens only (already compacted).

    ``X`` is the advantage (``form="natural"``) or ``p * A`` with ``p = exp(l)`` (``form="vanilla"``).
    The means are float64 scalars identical on every rank, whatever the layout. Bad values on any rank (NaN or
    inf on a valid token, magnitudes too large for exact sums, a ``local_error``) make *every* rank raise, after
    the all-reduce (:func:`exact_group_sums`).
    """
    mask = None if mask is None or local_error is not None else _as_bool_mask(mask)
    count = torch.tensor(0) if local_error is not None else (
        mask.sum() if mask is not None else torch.tensor(logprobs.numel(), device=logprobs.device))
    values = [] if local_error is not None else covariance_inputs(logprobs, advantages, form)
    if local_error is not None:  # same layout of the all-reduce as the ranks with good inputs
        values = [("logprobs", torch.zeros(0)), ("advantages", torch.zeros(0))]
    (n,), (sum_l, sum_x) = exact_group_sums([count], values, mask, groups, local_error=local_error)
    denom = float(max(n, 1))
    return n, sum_l / denom, sum_x / denom


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
    Means are over the valid tokens of the whole token group (``groups``), exact and layout invariant. A rank
    with bad inputs (shape, dtype, NaN on a valid token) makes every rank raise, after the one all-reduce.
    """
    if form not in ("natural", "vanilla"):
        raise ValueError(f"form={form!r} is invalid: allowed 'natural' or 'vanilla'")
    try:
        bool_mask, local_error = validate_token_inputs(mask, check_finite=False, logprobs=logprobs,
                                                       advantages=advantages), None
    except (TypeError, ValueError) as err:
        bool_mask, local_error = None, err
    _, mean_l, mean_x = global_token_stats(logprobs, advantages, bool_mask, groups, form=form, local_error=local_error)
    return scores_from_means(logprobs, advantages, bool_mask, mean_l, mean_x, form)


def scores_from_means(logprobs, advantages, mask, mean_l, mean_x, form):
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
    # The eligible entries only (padding is often half of a step's positions, and a top-k over a tensor full of
    # -inf costs twice as much), then cut to those that can matter (>= the k-th largest priority, ties included)
    # before the exact sort.
    index = eligible.reshape(-1).nonzero().squeeze(1)
    cand_p = priority.reshape(-1).index_select(0, index)
    cand_u = uids.reshape(-1).index_select(0, index)
    if cand_p.numel() > k:
        keep = cand_p >= torch.topk(cand_p, k, sorted=False).values.min()
        cand_p, cand_u = cand_p[keep], cand_u[keep]
    top_p, top_u = _lexicographic_top(cand_p.to(torch.float64), cand_u, k)
    pad = k - top_p.numel()
    if pad:
        top_p = torch.cat([top_p, torch.full((pad,), float("-inf"), dtype=torch.float64, device=top_p.device)])
        top_u = torch.cat([top_u, torch.full((pad,), _INT64_MAX, dtype=torch.int64, device=top_u.device)])
    return top_p, top_u


def merged_top_k(
    priority: torch.Tensor, uids: torch.Tensor, eligible: torch.Tensor, k: int, groups: GroupsLike = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` eligible entries of the whole token group under (priority desc, uid asc), on every rank:
    ``(priorities as float64, uids)``, padded with ``(-inf, INT64_MAX)`` when fewer are eligible. One all-gather
    of ``k`` (priority, uid) pairs per rank; ``k`` must be the same on every rank."""
    g = as_groups(groups)
    top_p, top_u = _local_offer(priority, uids, eligible, k)
    if g.token_world_size > 1:
        # One all-gather of the k (priority, uid) pairs of every rank, both as int64 bit patterns.
        packed = torch.stack([top_p.view(torch.int64), top_u]).reshape(1, 2, k)
        gathered = g.token_all_gather(packed)
        top_p, top_u = _lexicographic_top(gathered[:, 0, :].reshape(-1).view(torch.float64),
                                          gathered[:, 1, :].reshape(-1), k)
    return top_p, top_u


def distributed_top_k(
    priority: torch.Tensor, uids: torch.Tensor, eligible: torch.Tensor, k: int, groups: GroupsLike = None, *,
    with_threshold: bool = False,
):
    """The ``k`` eligible tokens of the whole token group ranked first by (priority desc, uid asc), and how many
    were chosen over the group (``k``, or fewer when fewer are eligible): ``(mask, count)``. With
    ``with_threshold``, also the lowest chosen priority (the same float on every rank; None if none was chosen):
    ``(mask, count, threshold)``, e.g. a quantile's value.

    ``k`` must be the same on every rank. One all-gather of ``k`` (priority, uid) pairs per rank.
    """
    top_p, top_u = merged_top_k(priority, uids, eligible, k, groups)
    return chosen_from_merged(priority, uids, eligible, top_p, top_u, k, with_threshold=with_threshold)


def chosen_from_merged(
    priority: torch.Tensor, uids: torch.Tensor, eligible: torch.Tensor, top_p: torch.Tensor, top_u: torch.Tensor,
    k: int, *, with_threshold: bool = False,
):
    """:func:`distributed_top_k` from a :func:`merged_top_k` answer of at least ``k`` entries: the first ``k`` of a
    merged top-``K`` (``K >= k``) are the merged top-``k`` (one total order), so a longer answer serves a shorter
    question without another collective."""
    top_p, top_u = top_p[:k], top_u[:k]
    chosen = int((top_p > float("-inf")).sum())  # padding entries are -inf
    # Priorities came from this dtype exactly, so comparing in it is exact.
    threshold_p, threshold_u = top_p[k - 1].to(priority.dtype), top_u[k - 1]
    above = (priority > threshold_p) | ((priority == threshold_p) & (uids <= threshold_u))
    if with_threshold:
        return eligible & above, chosen, float(top_p[chosen - 1]) if chosen else None
    return eligible & above, chosen


def selection_quota(ratio: float, num_valid_tokens: int) -> int:
    """``max(1, int(N * ratio))``: the reference's quota (same expression, same float rounding)."""
    return max(1, int(num_valid_tokens * ratio))
