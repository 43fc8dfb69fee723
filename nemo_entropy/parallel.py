"""Process groups by rank role, and the one place the entropy controls' collectives go through.

Three roles matter to the entropy controls (README, "Selection scope"):

* the **token group** (DP, or DP x CP when context-parallel ranks hold different chunks of the same
  sequences): ranks that hold *different tokens*. Covariance statistics, global token counts and the
  exact top-k are reduced over it.
* the **TP group** (vocab-parallel): ranks that hold *the same tokens* and different vocabulary shards.
  Softmax statistics (max, sum of exp, sum of p*z, target logit) are reduced over it. Covariance
  statistics never are: that would count every token TP times.
* the **pipeline role**: the loss exists only on the last PP stage, so collectives run over that stage's
  token group; other stages never enter them (a collective over WORLD inside the loss hangs with PP > 1).

Every collective is issued unconditionally by every member of the group, whatever its data (a rank with
zero valid tokens still takes part with zero-sized contributions padded to the agreed size), so no
data-dependent hang is possible. ``None`` for a group means "this process alone". The per-step plan
(``nemo_entropy.plan``) is the only caller on the loss side; the embedded engine's process management lives in
``nemo_entropy.engine.processes``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.distributed as dist

ProcessGroup = dist.ProcessGroup

__all__ = ["ParallelGroups", "as_groups", "as_tp_group"]


def group_world_size(group: Optional[ProcessGroup]) -> int:
    """Members of ``group`` (1 for ``None``: this process alone)."""
    return 1 if group is None else dist.get_world_size(group)


_world = group_world_size


def world_size() -> int:
    """Processes of the default group (1 when torch.distributed is not initialised)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_dtensor(x) -> bool:
    """Whether ``x`` is a ``torch.distributed.tensor.DTensor``, without importing that module (about a second) when
    nothing has: a DTensor cannot exist before its module is loaded."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def _rank(group: Optional[ProcessGroup]) -> int:
    return 0 if group is None else dist.get_rank(group)


@dataclass(frozen=True)
class ParallelGroups:
    """The groups of one rank, by role.

    Attributes:
        token_group: ranks holding different tokens (DP, or DP x CP). ``None``: this process alone.
        tp_group: ranks holding the same tokens, different vocabulary shards. ``None``: unsharded.
        is_last_pp_stage: whether this rank computes the loss (the last pipeline stage).
        pp_group: the pipeline group, used only to broadcast metrics from the last stage.
    """

    token_group: Optional[ProcessGroup] = None
    tp_group: Optional[ProcessGroup] = None
    is_last_pp_stage: bool = True
    pp_group: Optional[ProcessGroup] = None

    # ------------------------------------------------------------------ constructors
    @classmethod
    def single(cls) -> "ParallelGroups":
        """One process: every collective is the identity."""
        return cls()

    @classmethod
    def from_groups(
        cls,
        token_group: Optional[ProcessGroup] = None,
        tp_group: Optional[ProcessGroup] = None,
        *,
        is_last_pp_stage: bool = True,
        pp_group: Optional[ProcessGroup] = None,
    ) -> "ParallelGroups":
        """Explicit groups (tests, custom launchers, the local engine)."""
        return cls(token_group, tp_group, is_last_pp_stage, pp_group)

    @classmethod
    def from_megatron(cls, *, cp_holds_full_sequences: bool = False) -> "ParallelGroups":
        """Groups of this rank from megatron-core's ``parallel_state`` (must be initialised).

        Args:
            cp_holds_full_sequences: set when the framework already gathered full sequences on every CP
                rank before the loss (NeMo-RL's LOGPROB input does this). CP ranks then hold the *same*
                tokens and the token group is DP alone; otherwise it is DP x CP.
        """
        try:
            from megatron.core import parallel_state as ps
        except ImportError as err:  # pragma: no cover - depends on the environment
            raise ImportError(
                "ParallelGroups.from_megatron needs megatron-core: pip install 'nemo-entropy[megatron]'"
            ) from err
        if not ps.model_parallel_is_initialized():
            raise RuntimeError(
                "megatron-core parallel_state is not initialised: call "
                "parallel_state.initialize_model_parallel(...) before ParallelGroups.from_megatron()"
            )
        cp_size = ps.get_context_parallel_world_size()
        if cp_size > 1 and not cp_holds_full_sequences:
            token_group = ps.get_data_parallel_group(with_context_parallel=True)
        else:
            token_group = ps.get_data_parallel_group()
        tp_group = ps.get_tensor_model_parallel_group()
        return cls(
            token_group=token_group if dist.get_world_size(token_group) > 1 else None,
            tp_group=tp_group if dist.get_world_size(tp_group) > 1 else None,
            is_last_pp_stage=ps.is_pipeline_last_stage(ignore_virtual=True),
            pp_group=ps.get_pipeline_model_parallel_group()
            if ps.get_pipeline_model_parallel_world_size() > 1
            else None,
        )

    # ------------------------------------------------------------------ sizes
    @property
    def token_world_size(self) -> int:
        return _world(self.token_group)

    @property
    def token_rank(self) -> int:
        return _rank(self.token_group)

    @property
    def tp_world_size(self) -> int:
        return _world(self.tp_group)

    @property
    def tp_rank(self) -> int:
        return _rank(self.tp_group)

    # ------------------------------------------------------------------ token-group collectives
    def token_all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over ranks holding different tokens (in place on a copy; returns the result)."""
        out = tensor.clone()
        if self.token_group is not None:
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.token_group)
        return out

    def token_all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate equally-shaped tensors of every token-group rank along dim 0, in rank order.

        Callers pad to an agreed size first: all ranks must pass the same shape.
        """
        if self.token_group is None:
            return tensor.clone()
        parts = [torch.empty_like(tensor) for _ in range(self.token_world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.token_group)
        return torch.cat(parts, dim=0)

    # ------------------------------------------------------------------ TP collectives
    def tp_all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In-place all-reduce over the vocab-parallel group; ``op`` is ``"sum"`` or ``"max"``."""
        return tp_all_reduce(self.tp_group, tensor, op)

    # ------------------------------------------------------------------ pipeline
    def broadcast_from_last_stage(self, tensor: torch.Tensor) -> torch.Tensor:
        """Broadcast a tensor (e.g. packed metrics) from the last pipeline stage to every stage."""
        if self.pp_group is None:
            return tensor
        ranks = dist.get_process_group_ranks(self.pp_group)
        dist.broadcast(tensor, src=ranks[-1], group=self.pp_group)
        return tensor


def tp_all_reduce(group: Optional[ProcessGroup], tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over a vocab-parallel group (identity for ``None``)."""
    if op not in ("sum", "max"):
        raise ValueError(f"tp_all_reduce: op must be 'sum' or 'max', got {op!r}")
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)
    return tensor


GroupsLike = Union[None, ProcessGroup, ParallelGroups]


def as_groups(groups: GroupsLike) -> ParallelGroups:
    """Normalise the ``groups`` argument of the public API.

    ``None`` is one process; a ``ProcessGroup`` is shorthand for the token-holding group; a
    ``ParallelGroups`` is taken as is.
    """
    if groups is None:
        return ParallelGroups.single()
    if isinstance(groups, ParallelGroups):
        return groups
    if isinstance(groups, ProcessGroup):
        return ParallelGroups(token_group=groups)
    raise TypeError(
        f"groups must be None, a torch.distributed.ProcessGroup or nemo_entropy.parallel.ParallelGroups, "
        f"got {type(groups).__name__}"
    )


def as_tp_group(groups: GroupsLike) -> Optional[ProcessGroup]:
    """The vocab-parallel group from the ``groups`` argument of the entropy API.

    There a bare ``ProcessGroup`` means the TP group (the entropy functions reduce only over TP).
    """
    if groups is None:
        return None
    if isinstance(groups, ParallelGroups):
        return groups.tp_group
    if isinstance(groups, ProcessGroup):
        return groups
    raise TypeError(
        f"groups must be None, a torch.distributed.ProcessGroup (the TP group) or "
        f"nemo_entropy.parallel.ParallelGroups, got {type(groups).__name__}"
    )


def new_subgroups(rank_lists: Sequence[Sequence[int]]) -> list[ProcessGroup]:
    """Create one group per rank list (every rank must call this with the same lists, in order)."""
    return [dist.new_group(list(ranks)) for ranks in rank_lists]


# ---------------------------------------------------------------------------------------------------------
# Model-parallel autograd functions (Megatron's copy-to / gather-from TP region), used by the engine's
# vocab-parallel LM head.


class _CopyToTPRegion(torch.autograd.Function):
    """Identity forward; backward sums the gradient over TP (every vocab shard's head reads the same input)."""

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        return tensor.view_as(tensor)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        return tp_all_reduce(ctx.group, grad, "sum"), None


def copy_to_tp_region(tensor: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Enter a vocab-parallel layer: identity forward, all-reduce-sum of the gradient over ``group``."""
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    return _CopyToTPRegion.apply(tensor, group)


class _GatherFromTPRegion(torch.autograd.Function):
    """All-gather along the last dim forward; backward keeps this rank's slice.

    Every TP rank computes the same function of the gathered tensor, so the gradient of this rank's own
    slice is exactly the slice of its local gradient (no sum: that would count it TP times).
    """

    @staticmethod
    def forward(ctx, tensor, group):
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        ctx.width = tensor.shape[-1]
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        start = ctx.rank * ctx.width
        return grad[..., start : start + ctx.width].contiguous(), None


def gather_from_tp_region(tensor: torch.Tensor, group: Optional[ProcessGroup]) -> torch.Tensor:
    """Concatenate the TP shards of ``tensor`` along its last dim (differentiable; identity for ``None``)."""
    if group is None or dist.get_world_size(group) == 1:
        return tensor
    return _GatherFromTPRegion.apply(tensor, group)
