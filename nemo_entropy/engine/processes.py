"""The engine's processes: start-up and tear-down of the default group, and the object-level exchanges of its
bookkeeping (metrics, run info, pre-emption flags, checkpoint barriers).

The entropy controls' own collectives go through :mod:`nemo_entropy.parallel` (tensors, by rank role); this
module and that one are the only ones that import ``torch.distributed``.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from nemo_entropy.parallel import ProcessGroup

__all__ = [
    "distributed_env_present",
    "init_process_group_from_env",
    "world_rank_and_size",
    "world_group",
    "barrier",
    "destroy_process_group",
    "group_all_reduce",
    "all_reduce_flag",
    "all_gather_objects",
    "broadcast_object",
]


def distributed_env_present() -> bool:
    """Whether this process was started by a distributed launcher (torchrun/srun set RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init_process_group_from_env(backend: str = "gloo", timeout_seconds: float = 1800.0) -> tuple[int, int]:
    """Initialise the default group from the launcher's environment (idempotent); returns (rank, world)."""
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_seconds))
    return dist.get_rank(), dist.get_world_size()


def world_rank_and_size() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) without an initialised default group."""
    if not dist.is_available() or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(), dist.get_world_size()


def world_group() -> Optional[ProcessGroup]:
    """The default group, or ``None`` (this process alone) when not distributed or of size 1."""
    rank, world = world_rank_and_size()
    return dist.group.WORLD if world > 1 else None


def barrier(group: Optional[ProcessGroup] = None) -> None:
    """Barrier over ``group`` (``None``: the world, if distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier(group=group)


def destroy_process_group() -> None:
    """Barrier, then tear down the default group (gloo runs can abort without the barrier)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def group_all_reduce(tensor: torch.Tensor, group: Optional[ProcessGroup], op: str = "sum") -> torch.Tensor:
    """In-place all-reduce over ``group`` (identity for ``None``); ``op`` is ``sum``, ``max`` or ``min``."""
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
    if op not in ops:
        raise ValueError(f"group_all_reduce: op must be one of {sorted(ops)}, got {op!r}")
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=ops[op], group=group)
    return tensor


def all_reduce_flag(flag: bool, group: Optional[ProcessGroup]) -> bool:
    """Logical OR of a flag over ``group``: every member learns whether any member raised it."""
    value = torch.tensor([1 if flag else 0], dtype=torch.int64)
    return bool(group_all_reduce(value, group, "max").item())


def all_gather_objects(obj, group: Optional[ProcessGroup]) -> list:
    """Picklable objects of every member of ``group``, in group-rank order (``[obj]`` for ``None``)."""
    if group is None:
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def broadcast_object(obj, src: int, group: Optional[ProcessGroup]):
    """The object of global rank ``src`` on every member of ``group`` (``obj`` itself for ``None``)."""
    if group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]
