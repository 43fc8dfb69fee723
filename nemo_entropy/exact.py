"""The exact, layout-invariant primitives of the step plan: fixed-point sums, covariance scores, the distributed
top-k, hash keys and token uids (pure tensor math and the two collectives, through ``nemo_entropy.parallel``).

The reference implementation selects per micro-batch per GPU, so its selected set changes with micro-batch
size and GPU count (README, "Selection scope"). Here ``scope: batch`` selects over every valid token of an optimizer
step, on every rank of the token-holding group, and the result is *bit-identical* whatever the layout:

1. **Exact means.** Means of log-prob and advantage are computed from fixed-point int64 sums (values rounded to
   multiples of 2**-20, so the mean is exact to ~1e-6 and, above all, independent of summation order). One
   all-reduce of ``[count, sum l, sum A]`` over the token group. A floating-point all-reduce would give
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

import math
from typing import NamedTuple, Optional

import torch

from .parallel import GroupsLike, as_groups

__all__ = [
    "covariance_scores",
    "distributed_top_k",
    "Offer",
    "local_offer",
    "masked_offer",
    "merge_offers",
    "merged_top_k",
    "chosen_from_offer",
    "chosen_from_merged",
    "exact_group_sums",
    "fixed_point_sum",
    "fixed_point_sums",
    "FixedPointAccumulator",
    "as_rows",
    "row_chunks",
    "mask_bits",
    "keep_valid",
    "flat_nonzero",
    "FIXED_POINT_BITS",
    "too_large_message",
    "scores_from_means",
    "selection_quota",
    "hash_keys",
    "token_uids_for",
    "global_token_stats",
    "validate_token_inputs",
    "rows_with_tokens",
]

# Fixed-point scale of the exact sums: 2**-20 (~1e-6 of a log-prob or advantage). The int64 sums stay exact while
# max |x| x tokens x world < 2**42 (checked, on every rank together).
FIXED_POINT_BITS = 20
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


def rows_with_tokens(mask: torch.Tensor) -> torch.Tensor:
    """How many rows (sequences) of a bool ``[batch, length]`` mask hold a valid token (an int64 scalar)."""
    if mask.shape[-1] == 0:
        return torch.zeros((), dtype=torch.int64, device=mask.device)
    return torch.count_nonzero(mask.view(torch.uint8).amax(-1))  # a max over bytes: faster than any() here


# ----------------------------------------------------------------------------------------------- exact sums
def fixed_point_sum(values, mask: Optional[torch.Tensor], world_size: int) -> tuple[torch.Tensor, int]:
    """The exact int64 sum of ``values`` over valid tokens, each value rounded to a multiple of 2**-20 (an int64
    scalar in units of 2**-20), and a problem code (0 fine, 1 NaN/inf on a valid token, 2 too large for exact sums).
    ``values``: a tensor, or a pair of tensors whose product is summed (formed in the work tensor).

    Problems are *returned*, not raised: the caller folds them into a collective so that every rank raises
    together instead of one rank raising while the others wait in the collective.
    Scaling by a power of two and rounding to an integer are exact in the input's own float format, so fp32
    inputs never need an fp64 copy. The work happens in place in one tensor (the plan's own sums run chunk by
    chunk instead: :func:`fixed_point_sums`).
    """
    factors = [t.detach() for t in (values if isinstance(values, tuple) else (values,))]
    source = factors[0]
    work_dtype = torch.float64 if all(t.dtype == torch.float64 for t in factors) else torch.float32
    zero = torch.zeros((), dtype=torch.int64, device=source.device)
    if source.numel() == 0:
        return zero, 0
    scale = float(1 << FIXED_POINT_BITS)
    q = torch.empty(source.shape, dtype=work_dtype, device=source.device)
    if len(factors) == 2:  # a product, formed in the work tensor (same rounding as a fresh one)
        torch.mul(factors[0].to(work_dtype), factors[1].to(work_dtype), out=q)
        q.mul_(scale)
    else:
        torch.mul(source.to(work_dtype), scale, out=q)
    if mask is not None:  # else already compacted (or zero) where masked; padding may hold NaN or -inf
        torch.where(mask, q, torch.zeros((), dtype=work_dtype, device=q.device), out=q)
    q.round_()
    low, high = torch.aminmax(q)
    max_abs = float(torch.maximum(-low, high))  # NaN and inf propagate
    if not max_abs < float("inf"):
        return zero, 1
    # Overflow guard (no per-token host copy): the group's sum of |values| must stay below 2**62.
    bound = max_abs * float(q.numel()) * world_size
    if bound >= 2.0**62:
        return zero, 2
    if bound < 2.0**53:
        # Every partial sum is an integer below 2**53, which float64 adds exactly in any order: the int64 sum,
        # without an int64 copy of the tokens.
        return q.sum(dtype=torch.float64).to(torch.int64), 0
    return q.to(torch.int64).sum(), 0


# Fused passes: the per-token work runs over row chunks of about 2**18 tokens, every pass of a chunk while it is in
# cache, so no step-sized temporary is made (an fp64 cast of the step, or a fresh step-sized work tensor, costs more
# in page faults than the arithmetic). Elementwise the same operations as on the whole step: the same bits.
_CHUNK_TOKENS = 1 << 18


def as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` as ``[rows, length]`` (a view where the strides allow)."""
    return tensor.reshape(-1, tensor.shape[-1]) if tensor.dim() >= 2 else tensor.reshape(1, -1)


def row_chunks(shape) -> list[slice]:
    """Slices of the rows of ``as_rows`` of a tensor of ``shape``, about ``_CHUNK_TOKENS`` tokens each."""
    length = int(shape[-1]) if len(shape) else 1
    rows = math.prod(shape) // length if length else 0
    step = max(1, _CHUNK_TOKENS // max(length, 1))
    return [slice(lo, min(lo + step, rows)) for lo in range(0, rows, step)]


def mask_bits(mask_rows: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``mask_rows`` as int32 0 / -1 (all bits set) in ``out``: ``bitwise_and`` of a float32's bits with it is the
    float where valid and +0.0 where masked (NaN and inf included), as ``torch.where(mask, x, 0)`` gives, without
    its per-element branch (several times faster on the CPU)."""
    return out.copy_(mask_rows).neg_()


def keep_valid(values: torch.Tensor, bits: torch.Tensor) -> torch.Tensor:
    """``torch.where(mask, values, 0)`` in place, for float32 ``values`` and ``bits = mask_bits(mask)``."""
    as_int = values.view(torch.int32)
    torch.bitwise_and(as_int, bits, out=as_int)
    return values


class FixedPointAccumulator:
    """Exact fixed-point sums of ``count`` per-token values, chunk by chunk (:func:`fixed_point_sums`): each chunk
    adds its rounded values ``[count, ...]`` (zeros where masked); :meth:`finish` gives what
    :func:`fixed_point_sum` gives for each value, the same integers."""

    def __init__(self, count: int, numel: int, world_size: int):
        self.count, self.numel, self.world_size = count, numel, world_size
        self._sums: list[torch.Tensor] = []
        self._maxes: list[torch.Tensor] = []
        self._chunk = 0

    def add(self, rounded: torch.Tensor) -> None:
        # value by value: reductions over a dim, or with a broadcast operand, are many times slower on the CPU
        for index in range(self.count):
            low, high = torch.aminmax(rounded[index])
            self._maxes.append(torch.maximum(-low, high))  # NaN and inf propagate
            self._sums.append(rounded[index].sum(dtype=torch.float64))
        self._chunk = max(self._chunk, rounded[0].numel())

    def finish(self) -> list[Optional[tuple[torch.Tensor, int]]]:
        """Per value ``(int64 sum, problem)`` as :func:`fixed_point_sum`; None where a chunk's float64 sum might
        not be exact (values of 2**53 / chunk or more, far beyond log-probs and advantages: the caller sums those
        the unchunked way)."""
        zero = torch.zeros((), dtype=torch.int64)
        if not self._sums:
            return [(zero, 0)] * self.count
        zero = zero.to(self._sums[0].device)
        maxes = torch.stack(self._maxes).reshape(-1, self.count).amax(0).tolist()
        # exact: every chunk's sum is an exact integer (checked below), and int64 adds them in any order
        totals = torch.stack(self._sums).reshape(-1, self.count).to(torch.int64).sum(0)
        out: list[Optional[tuple[torch.Tensor, int]]] = []
        for index, max_abs in enumerate(maxes):
            if not max_abs < float("inf"):
                out.append((zero, 1))
            elif max_abs * float(self.numel) * self.world_size >= 2.0**62:
                out.append((zero, 2))
            elif max_abs * float(self._chunk) >= 2.0**53:
                out.append(None)
            else:
                out.append((totals[index], 0))
        return out


def fixed_point_sums(values: list, mask: Optional[torch.Tensor], world_size: int) -> list[tuple[torch.Tensor, int]]:
    """:func:`fixed_point_sum` of each of ``values`` (tensors, or pairs whose product is summed, all of ``mask``'s
    shape), the same integers and problem codes, in one fused pass over row chunks (no step-sized temporary)."""
    factors = [tuple(t.detach() for t in (v if isinstance(v, tuple) else (v,))) for v in values]
    if not factors:
        return []
    source = factors[0][0]
    if any(t.dtype == torch.float64 for f in factors for t in f) or any(t.shape != source.shape for f in factors
                                                                         for t in f) or source.dim() == 0:
        return [fixed_point_sum(v, mask, world_size) for v in values]  # fp64 or odd shapes: the unchunked way
    if source.numel() == 0:
        return [(torch.zeros((), dtype=torch.int64, device=source.device), 0)] * len(values)
    scale = float(1 << FIXED_POINT_BITS)
    rows = [tuple(as_rows(t) for t in f) for f in factors]
    mask_rows = as_rows(mask) if mask is not None else None
    chunks = row_chunks(source.shape)
    work = torch.empty((len(values), chunks[0].stop - chunks[0].start, rows[0][0].shape[1]), dtype=torch.float32,
                       device=source.device)
    bits_work = torch.empty(work.shape[1:], dtype=torch.int32, device=source.device)
    acc = FixedPointAccumulator(len(values), source.numel(), world_size)
    for chunk in chunks:
        w = work[:, :chunk.stop - chunk.start]
        bits = mask_bits(mask_rows[chunk], bits_work[:chunk.stop - chunk.start]) if mask_rows is not None else None
        for index, f in enumerate(rows):
            # x * 2**20 (or the product a * b, then * 2**20: fixed_point_sum's rounding), 0 where masked
            if len(f) == 2:
                torch.mul(f[0][chunk].float(), f[1][chunk].float(), out=w[index])
                if bits is not None:
                    keep_valid(w[index], bits)
                w[index].mul_(scale)
            elif bits is not None:
                torch.bitwise_and(f[0][chunk].float().view(torch.int32), bits, out=w[index].view(torch.int32))
                w[index].mul_(scale)
            else:
                torch.mul(f[0][chunk].float(), scale, out=w[index])
            w[index].round_()
        acc.add(w)
    return [done if done is not None else fixed_point_sum(values[index], mask, world_size)
            for index, done in enumerate(acc.finish())]


def too_large_message(ranks) -> str:
    return ("per-token values are too large for the exact fixed-point sums (max |value| x tokens x world must stay "
            f"below 2**42) on token-group rank(s) {ranks}")


def exact_group_sums(
    counts: list[torch.Tensor],
    values: list[tuple[str, torch.Tensor]],
    mask: Optional[torch.Tensor],
    groups: GroupsLike = None,
    *,
    local_error: Optional[Exception] = None,
) -> tuple[list[int], list[torch.Tensor]]:
    """Integer ``counts`` and exact fixed-point sums of ``values`` over the whole token group, in ONE all-reduce.

    ``values`` are ``(name, tensor)`` pairs summed over the valid tokens (``mask``; ``None``: already compacted); a
    ``(name, (a, b))`` pair sums the product ``a * b``.
    Every problem is folded into the same all-reduce as a count of ranks, so that all ranks raise together after
    it and none is left waiting in a collective: a ``local_error`` this rank found while checking its inputs
    (the rank then contributes zeros), NaN or inf on a valid token, magnitudes too large for exact sums.
    Counts of ranks cannot wrap, whatever the group size.

    Returns ``(counts, sums)``: Python ints, and float64 scalars (the exact sums, identical on every rank).
    The sums run in one fused pass over row chunks (:func:`fixed_point_sums`): no step-sized temporary.
    """
    g = as_groups(groups)
    world = g.token_world_size
    device = mask.device if mask is not None else torch.device("cpu")
    if mask is None and values:
        first = values[0][1]
        device = (first[0] if isinstance(first, tuple) else first).device
    zero = torch.zeros((), dtype=torch.int64, device=device)
    local_counts = [zero if local_error is not None else c.to(torch.int64).reshape(()) for c in counts]
    sums, non_finite, overflow = [], [], 0
    fused = ([(zero, 0)] * len(values) if local_error is not None
             else fixed_point_sums([tensor for _, tensor in values], mask, world))
    for total, problem in fused:
        sums.append(total)
        non_finite.append(int(problem == 1))
        overflow = max(overflow, int(problem == 2))
    flags = [int(local_error is not None), *non_finite, overflow]
    local = torch.cat([torch.stack(local_counts + sums) if local_counts or sums
                       else torch.zeros(0, dtype=torch.int64, device=device),
                       torch.tensor(flags, dtype=torch.int64, device=device)])
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
        raise ValueError(too_large_message(ranks(len(problems) - 1)))
    scale = float(1 << FIXED_POINT_BITS)
    return ([int(c) for c in total[:n_counts].tolist()],
            list(total[n_counts:n_counts + n_values].double() / scale))


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


def scores_from_means(logprobs, advantages, mask, mean_l, mean_x, form, out: Optional[torch.Tensor] = None,
                      on_chunk=None):
    """The covariance scores from the exact means, 0 on masked tokens (written into ``out`` if given).

    ``on_chunk(rows, scores, bits)``: called after each row chunk (:func:`row_chunks` of :func:`as_rows`) with its
    slice, its scores and its :func:`mask_bits`, while they are in cache (the diagnostics' sums ride this pass)."""
    # fp32 elementwise math on identical inputs and identical (exact) means: bit-identical on every rank, whatever
    # the chunks (every value is computed by the same operations on the same operands).
    ml, mx = mean_l.float(), mean_x.float()
    if out is None or not out.is_contiguous():
        out = torch.empty(mask.shape, dtype=torch.float32, device=mask.device)
    if out.numel() == 0:
        return out
    l_rows, a_rows = as_rows(logprobs.detach()), as_rows(advantages.detach())
    m_rows, s_rows = as_rows(mask), as_rows(out)
    chunks = row_chunks(mask.shape)
    x_work = torch.empty((chunks[0].stop - chunks[0].start, s_rows.shape[1]), dtype=torch.float32, device=out.device)
    bits_work = torch.empty(x_work.shape, dtype=torch.int32, device=out.device)
    for chunk in chunks:
        l, a, scores = l_rows[chunk].float(), a_rows[chunk].float(), s_rows[chunk]
        x = x_work[:chunk.stop - chunk.start]
        torch.sub(l, ml, out=scores)
        if form == "natural":
            torch.sub(a, mx, out=x)
        else:
            torch.exp(l, out=x).mul_(a).sub_(mx)
        scores.mul_(x)
        bits = mask_bits(m_rows[chunk], bits_work[:chunk.stop - chunk.start])
        keep_valid(scores, bits)
        if on_chunk is not None:
            on_chunk(chunk, scores, bits)
    return out


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
class Offer(NamedTuple):
    """This rank's first ``k`` candidates under the total order (priority desc, uid asc), padded to exactly ``k``
    with ``(-inf, INT64_MAX, -1)``: what it offers to the all-gather, and where those tokens are."""

    priority: torch.Tensor
    """float64 ``[k]`` (exact copies of the candidates' priorities)."""
    uids: torch.Tensor
    """int64 ``[k]``."""
    positions: torch.Tensor
    """int64 ``[k]``: flat positions of the tokens in the step's ``[batch, length]`` tensors (-1 on padding)."""


def _lexicographic_order(priority: torch.Tensor, uids: torch.Tensor) -> torch.Tensor:
    """The permutation that sorts 1-D tensors by (priority descending, uid ascending, position ascending).

    Both sorts are stable, so entries equal in (priority, uid) (repeated uids) keep their input order: the order is
    total whatever the uids, and a quota can never be exceeded by ties."""
    by_uid = torch.argsort(uids, stable=True)
    return by_uid[torch.argsort(_descending_key(priority).index_select(0, by_uid), stable=True)]


def _descending_key(priority: torch.Tensor) -> torch.Tensor:
    """int64 keys in the ascending order of ``priority``'s descending order, equal where the priorities are equal
    (-0.0 and 0.0 included; the priorities are not NaN): an integer sort is a radix sort on the CPU, many times
    faster than a float sort, and sorts the same."""
    bits = (priority.to(torch.float64) + 0.0).view(torch.int64)  # + 0.0: -0.0 becomes 0.0
    return torch.bitwise_not(bits ^ ((bits >> 63) & _INT64_MAX))  # ascending with the float, then reversed


def flat_nonzero(flags: torch.Tensor) -> torch.Tensor:
    """``flags.nonzero().squeeze(1)`` of a 1-D bool tensor with few True (ascending int64 positions), faster: the
    scan runs over 8-byte words first, then only over the words that hold a True (a CPU nonzero costs per entry
    scanned, and a step has millions)."""
    n = flags.numel()
    whole = n - n % 8
    if flags.device.type != "cpu" or whole < 1024 or not flags.is_contiguous() or flags.storage_offset() % 8:
        return flags.nonzero().squeeze(1)
    head = flags[:whole]
    words = head.view(torch.uint8).view(-1, 8)
    hit = words.view(torch.int64).reshape(-1).ne(0).nonzero().squeeze(1)
    inner = words.index_select(0, hit).nonzero()
    positions = hit.index_select(0, inner[:, 0]).mul_(8).add_(inner[:, 1])
    if whole == n:
        return positions
    return torch.cat([positions, flags[whole:].nonzero().squeeze(1).add_(whole)])


# A top-k of a long vector is cut first to the entries at or above a threshold read off a strided sample (a few
# passes instead of a full top-k); the cut is checked to leave at least k entries, else a full top-k decides.
_SAMPLE = 16384


def _sampled_cut(priority: torch.Tensor, eligible: Optional[torch.Tensor], k: int,
                 num_eligible: int, check: bool = True) -> Optional[torch.Tensor]:
    """The (eligible) entries of 1-D ``priority`` at or above a threshold read off a strided sample, as a bool
    mask, when they are at least ``k``; None when the vector is short (a top-k is cheaper) or the cut leaves fewer
    (``check=False``: not counted here; the caller checks that the cut leaves at least ``k``)."""
    n = priority.numel()
    if n <= 16 * k or n <= 4 * _SAMPLE:
        return None
    stride = n // _SAMPLE
    sample = priority[::stride] if eligible is None else priority[::stride][eligible[::stride]]
    expected = k * sample.numel() / max(num_eligible, 1)  # the sample's share of the top k
    # 10% and four standard deviations above the expected share: the cut rarely leaves fewer than k entries
    rank = int(1.1 * expected + 4.0 * math.sqrt(expected) + 8)
    if not 0 < rank <= sample.numel():
        return None
    above = priority >= torch.topk(sample, rank, sorted=False).values.min()
    if eligible is not None:
        above.logical_and_(eligible)
    return above if not check or int(torch.count_nonzero(above)) >= k else None


def local_offer(priority: torch.Tensor, positions: torch.Tensor, uids: torch.Tensor, k: int) -> Offer:
    """The :class:`Offer` of this rank's candidates: ``priority`` and ``positions`` (1-D) of its eligible tokens
    only (padding is often half of a step, and a top-k over it is wasted work); ``uids`` the step's token uids,
    flat, read only at the candidates that can matter."""
    if priority.numel() > 2 * k:  # only the entries that can matter (ties at the cut included); up to 2k, the exact
        # sort (integer keys: a radix sort, linear) takes them all, cheaper than a top-k first
        above = _sampled_cut(priority, None, k, priority.numel())
        if above is None:
            above = priority >= torch.topk(priority, k, sorted=False).values.min()
        keep = above.nonzero().squeeze(1)
        priority, positions = priority.index_select(0, keep), positions.index_select(0, keep)
    uids = uids.index_select(0, positions)
    order = _lexicographic_order(priority.to(torch.float64), uids)[:k]
    top_p = priority.to(torch.float64).index_select(0, order)
    top_u, top_pos = uids.index_select(0, order), positions.index_select(0, order)
    pad = k - top_p.numel()
    if pad:
        full = lambda value, dtype: torch.full((pad,), value, dtype=dtype, device=top_p.device)  # noqa: E731
        top_p = torch.cat([top_p, full(float("-inf"), torch.float64)])
        top_u = torch.cat([top_u, full(_INT64_MAX, torch.int64)])
        top_pos = torch.cat([top_pos, full(-1, torch.int64)])
    return Offer(top_p, top_u, top_pos)


def masked_offer(priority: torch.Tensor, eligible: torch.Tensor, uids: torch.Tensor, k: int,
                 num_eligible: Optional[int] = None) -> Offer:
    """The :class:`Offer` of step-shaped ``priority`` (finite on ``eligible`` tokens) without compacting the step:
    a cut read off a sample of the eligible tokens, then the few candidates at or above it (listing every valid
    token, or a step-sized copy, costs more than the passes this takes). ``num_eligible``: their count, if known."""
    flat, ok = priority.reshape(-1), eligible.reshape(-1)
    if num_eligible is None:
        num_eligible = int(torch.count_nonzero(ok))
    above = _sampled_cut(flat, ok, k, num_eligible, check=False)
    keep = None if above is None else flat_nonzero(above)
    if keep is None or keep.numel() < k:  # the listed cut counts itself
        keep = flat_nonzero(ok)
    return local_offer(flat.index_select(0, keep), keep, uids.reshape(-1), k)


def merge_offers(offer: Offer, k: int, groups: GroupsLike = None,
                 extra: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``k`` entries of the whole token group, on every rank, from each rank's :class:`Offer`: one
    all-gather of ``k`` (priority, uid) pairs per rank (none in one process). Returns ``(priorities, uids, mine)``;
    ``mine`` (bool) marks the entries this rank offered. ``extra``: a few int64 values of this rank that ride the
    same all-gather; then the answer has a fourth entry, every rank's ``extra`` (``[world, len(extra)]``, in rank
    order), e.g. for exact sums that need the means the one all-reduce gave.

    Entries equal in (priority, uid), possible only when uids repeat, are ordered by token-group rank, then by flat
    position on their rank: the order stays total, so the readers below take exactly ``k``."""
    g = as_groups(groups)
    if g.token_world_size == 1:
        mine = torch.ones(k, dtype=torch.bool, device=offer.priority.device)
        return (offer.priority, offer.uids, mine) + (() if extra is None else (extra.reshape(1, -1),))
    # Both as int64 bit patterns, in one tensor, the extra values after them.
    parts = [offer.priority.view(torch.int64), offer.uids] + ([] if extra is None else [extra.reshape(-1)])
    gathered = g.token_all_gather(torch.cat(parts).reshape(1, -1))
    top_p, top_u = gathered[:, :k].reshape(-1).view(torch.float64), gathered[:, k:2 * k].reshape(-1)
    order = _lexicographic_order(top_p, top_u)[:k]  # gathered in rank order; stable sorts keep it in ties
    merged = (top_p[order], top_u[order], order // k == g.token_rank)
    return merged if extra is None else merged + (gathered[:, 2 * k:],)


def merged_top_k(
    priority: torch.Tensor, uids: torch.Tensor, eligible: torch.Tensor, k: int, groups: GroupsLike = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``k`` eligible entries of the whole token group under (priority desc, uid asc), on every rank:
    ``(priorities as float64, uids, mine)`` (:func:`merge_offers`), padded with ``(-inf, INT64_MAX)`` when fewer
    are eligible. One all-gather of ``k`` (priority, uid) pairs per rank; ``k`` must be the same on every rank."""
    index = eligible.reshape(-1).nonzero().squeeze(1)
    offer = local_offer(priority.reshape(-1).index_select(0, index), index, uids.reshape(-1), k)
    return merge_offers(offer, k, groups)


def _tied_share(top_p: torch.Tensor, top_u: torch.Tensor, top_mine: torch.Tensor) -> int:
    """How many of the merged first ``k`` (already cut) equal the ``k``-th in (priority, uid) and are this rank's:
    one at most with unique uids; with repeated uids this rank takes that many of its tied tokens."""
    last_p, last_u = top_p[-1], top_u[-1]
    return int((top_mine & (top_p == last_p) & (top_u == last_u) & (top_p > float("-inf"))).sum())


def chosen_from_offer(offer: Offer, top_p: torch.Tensor, top_u: torch.Tensor, top_mine: torch.Tensor, k: int, shape,
                      *, with_threshold: bool = False):
    """:func:`distributed_top_k`'s answer from this rank's :class:`Offer` and the merged top-``K`` (``K >= k``,
    the offer of at least ``k``): the tokens of this rank among the group's first ``k`` are among its own first
    ``k``, so the offer holds them, and the mask is written at their positions (O(k), not O(tokens))."""
    top_p, top_u, top_mine = top_p[:k], top_u[:k], top_mine[:k]
    chosen = int((top_p > float("-inf")).sum())  # padding entries are -inf
    threshold_p, threshold_u = top_p[k - 1], top_u[k - 1]
    at = (offer.priority == threshold_p) & (offer.uids == threshold_u) & (offer.positions >= 0)
    at &= at.cumsum(0) <= _tied_share(top_p, top_u, top_mine)  # the offer lists ties in flat order
    pick = (offer.priority > threshold_p) | ((offer.priority == threshold_p) & (offer.uids < threshold_u)) | at
    pick &= offer.positions >= 0
    mask = torch.zeros(shape, dtype=torch.bool, device=offer.priority.device)
    mask.view(-1)[offer.positions[pick]] = True
    if with_threshold:
        return mask, chosen, float(top_p[chosen - 1]) if chosen else None
    return mask, chosen


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
    top = merged_top_k(priority, uids, eligible, k, groups)
    return chosen_from_merged(priority, uids, eligible, *top, k, with_threshold=with_threshold)


def chosen_from_merged(
    priority: torch.Tensor, uids: torch.Tensor, eligible: torch.Tensor, top_p: torch.Tensor, top_u: torch.Tensor,
    top_mine: torch.Tensor, k: int, *, with_threshold: bool = False,
):
    """:func:`distributed_top_k` from a :func:`merged_top_k` answer of at least ``k`` entries: the first ``k`` of a
    merged top-``K`` (``K >= k``) are the merged top-``k`` (one total order), so a longer answer serves a shorter
    question without another collective."""
    top_p, top_u, top_mine = top_p[:k], top_u[:k], top_mine[:k]
    chosen = int((top_p > float("-inf")).sum())  # padding entries are -inf
    # Priorities came from this dtype exactly, so comparing in it is exact.
    threshold_p, threshold_u = top_p[k - 1].to(priority.dtype), top_u[k - 1]
    above = (priority > threshold_p) | ((priority == threshold_p) & (uids < threshold_u))
    at = eligible & (priority == threshold_p) & (uids == threshold_u)
    at = at & (at.reshape(-1).cumsum(0) <= _tied_share(top_p, top_u, top_mine)).reshape(at.shape)
    if with_threshold:
        return eligible & (above | at), chosen, float(top_p[chosen - 1]) if chosen else None
    return eligible & (above | at), chosen


def selection_quota(ratio: float, num_valid_tokens: int) -> int:
    """``max(1, int(N * ratio))``: the reference's quota (same expression, same float rounding)."""
    return max(1, int(num_valid_tokens * ratio))
