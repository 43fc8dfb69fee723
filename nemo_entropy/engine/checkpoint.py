"""Checkpoints of the local engine: one directory per step, one file per rank, a marker when complete.

A run can be killed at any instant: every rank writes its file to a temporary name and renames it, and
rank 0 writes ``COMPLETE`` only after every rank has finished (a barrier). Resume picks the newest
directory with the marker, so a half-written checkpoint is never loaded.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Optional

import torch

from nemo_entropy.parallel import ProcessGroup

from .processes import barrier

_STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE_MARKER = "COMPLETE"


def step_dir(checkpoint_dir: str, step: int) -> str:
    """Directory of the checkpoint taken after RL step ``step``."""
    return os.path.join(checkpoint_dir, f"step_{step:07d}")


def latest_complete_checkpoint(checkpoint_dir: str) -> Optional[tuple[int, str]]:
    """(step, path) of the newest complete checkpoint under ``checkpoint_dir``, or None."""
    if not os.path.isdir(checkpoint_dir):
        return None
    found = []
    for name in os.listdir(checkpoint_dir):
        match = _STEP_DIR.match(name)
        path = os.path.join(checkpoint_dir, name)
        if match and os.path.exists(os.path.join(path, COMPLETE_MARKER)):
            found.append((int(match.group(1)), path))
    return max(found) if found else None


def save_checkpoint(
    checkpoint_dir: str,
    step: int,
    state: dict[str, Any],
    *,
    rank: int,
    layout: dict[str, int],
    world_group: Optional[ProcessGroup],
    keep: int,
) -> str:
    """Every rank saves ``state``; returns the checkpoint directory (complete when this returns)."""
    path = step_dir(checkpoint_dir, step)
    os.makedirs(path, exist_ok=True)
    target = os.path.join(path, f"rank_{rank:05d}.pt")
    tmp = f"{target}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, target)
    barrier(world_group)
    if rank == 0:
        with open(os.path.join(path, "meta.json"), "w") as fh:
            json.dump({"step": step, **layout}, fh)
        with open(os.path.join(path, COMPLETE_MARKER), "w") as fh:
            fh.write("ok\n")
        _prune(checkpoint_dir, keep)
    barrier(world_group)
    return path


def _prune(checkpoint_dir: str, keep: int) -> None:
    complete = []
    for name in os.listdir(checkpoint_dir):
        match = _STEP_DIR.match(name)
        if match and os.path.exists(os.path.join(checkpoint_dir, name, COMPLETE_MARKER)):
            complete.append(int(match.group(1)))
    for old in sorted(complete)[:-keep]:
        shutil.rmtree(step_dir(checkpoint_dir, old), ignore_errors=True)


def load_checkpoint(path: str, *, rank: int, layout: dict[str, int]) -> dict[str, Any]:
    """This rank's state from checkpoint ``path``; the layout must be the one that wrote it."""
    with open(os.path.join(path, "meta.json")) as fh:
        meta = json.load(fh)
    saved = {k: meta.get(k) for k in layout}
    if saved != layout:
        raise ValueError(
            f"checkpoint {path} was written with layout {saved}, this run has {layout}: resume with the same "
            f"engine.nproc / engine.tp_size, or point checkpointing.checkpoint_dir elsewhere to start afresh"
        )
    return torch.load(os.path.join(path, f"rank_{rank:05d}.pt"), map_location="cpu", weights_only=False)
