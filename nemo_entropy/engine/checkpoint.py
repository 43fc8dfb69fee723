"""Checkpoints of the local engine: one directory per step, one file per rank, checksums, a marker when complete.

A run can be killed at any instant: every rank writes its file to a temporary name and renames it, rank 0 then
writes ``meta.json`` (the layout and each rank file's size and SHA-256) and ``COMPLETE`` the same way, only after
every rank has finished. Resume takes the newest complete checkpoint whose files match their checksums; a damaged
one (flipped bits, truncated, emptied or missing files, a bad ``meta.json``) is reported by path and skipped for
the newest intact one, and when none is intact the run stops naming the files and the remedy.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
from typing import Any, Optional

import torch

from nemo_entropy.parallel import ProcessGroup

from .disk import DiskError, atomic_write_bytes, atomic_write_text, disk_errors, sha256, torch_bytes
from .processes import all_gather_objects, barrier

_STEP_DIR = re.compile(r"^step_(\d+)$")
COMPLETE_MARKER = "COMPLETE"
META_FILE = "meta.json"
KEY = "checkpointing.checkpoint_dir"


class NoIntactCheckpoint(DiskError):
    """Checkpoints exist but none is intact: the run stops rather than start afresh over them."""


def step_dir(checkpoint_dir: str, step: int) -> str:
    """Directory of the checkpoint taken after RL step ``step``."""
    return os.path.join(checkpoint_dir, f"step_{step:07d}")


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def _complete_steps(checkpoint_dir: str) -> list[tuple[int, str]]:
    """(step, path) of every directory with the COMPLETE marker, oldest first."""
    if not os.path.isdir(checkpoint_dir):
        return []
    found = []
    for name in os.listdir(checkpoint_dir):
        match = _STEP_DIR.match(name)
        path = os.path.join(checkpoint_dir, name)
        if match and os.path.exists(os.path.join(path, COMPLETE_MARKER)):
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_complete_checkpoint(checkpoint_dir: str) -> Optional[tuple[int, str]]:
    """(step, path) of the newest complete checkpoint under ``checkpoint_dir`` (intact or not), or None."""
    found = _complete_steps(checkpoint_dir)
    return found[-1] if found else None


def _read_meta(path: str) -> dict[str, Any]:
    with open(os.path.join(path, META_FILE)) as fh:
        meta = json.load(fh)
    if not isinstance(meta, dict) or not isinstance(meta.get("files"), dict) or not meta["files"]:
        raise ValueError(f"{META_FILE} lists no rank files with checksums")
    return meta


def checkpoint_problem(path: str) -> Optional[str]:
    """Why the checkpoint at ``path`` cannot be loaded (a damaged or missing file, a bad checksum), or None."""
    try:
        meta = _read_meta(path)
    except (OSError, ValueError) as err:
        return f"{os.path.join(path, META_FILE)}: {err}"
    for name, entry in sorted(meta["files"].items()):
        file = os.path.join(path, name)
        try:
            with open(file, "rb") as fh:
                data = fh.read()
        except OSError as err:
            return f"{file}: {err.strerror or err}"
        if len(data) != entry.get("bytes") or sha256(data) != entry.get("sha256"):
            return f"{file}: {len(data)} bytes, checksum mismatch (written: {entry.get('bytes')} bytes)"
    return None


def latest_intact_checkpoint(checkpoint_dir: str, report=print) -> Optional[tuple[int, str]]:
    """(step, path) of the newest complete checkpoint whose files match their checksums, or None when there is no
    checkpoint. Each damaged newer one is reported in one line; :class:`NoIntactCheckpoint` when none is intact."""
    found = _complete_steps(checkpoint_dir)
    problems = []
    for step, path in reversed(found):
        problem = checkpoint_problem(path)
        if problem is None:
            for damaged in problems:
                report(f"[nemo-entropy] checkpoint damaged, skipped: {damaged}; resuming from the newest intact one, "
                       f"step {step} ({path})")
            return step, path
        problems.append(problem)
    if problems:
        raise NoIntactCheckpoint(
            f"no intact checkpoint in {checkpoint_dir}: {'; '.join(problems)}. Restore these files, or move the "
            f"damaged step_* folders away to start the run afresh (or set {KEY} to another folder)")
    return None


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
    data = torch_bytes(state)
    entry = {"bytes": len(data), "sha256": sha256(data)}
    atomic_write_bytes(os.path.join(path, rank_file(rank)), data, key=KEY)
    entries = all_gather_objects((rank_file(rank), entry), world_group)  # also the barrier: every file is written
    if rank == 0:
        meta = {"step": step, **layout, "files": dict(entries)}
        atomic_write_text(os.path.join(path, META_FILE), json.dumps(meta, indent=1), key=KEY)
        atomic_write_text(os.path.join(path, COMPLETE_MARKER), "ok\n", key=KEY)
        with disk_errors(checkpoint_dir, KEY):
            _prune(checkpoint_dir, step, keep)
    barrier(world_group)
    return path


def _prune(checkpoint_dir: str, step: int, keep: int) -> None:
    """Keep the newest ``keep`` complete checkpoints up to ``step``; drop those after it (left by a run that
    resumed from an older, intact checkpoint: they belong to steps now taken again)."""
    complete = [s for s, _ in _complete_steps(checkpoint_dir)]
    stale = [s for s in complete if s > step]
    for old in sorted(s for s in complete if s <= step)[:-keep] + stale:
        shutil.rmtree(step_dir(checkpoint_dir, old), ignore_errors=True)


def load_checkpoint(path: str, *, rank: int, layout: dict[str, int]) -> dict[str, Any]:
    """This rank's state from checkpoint ``path``, verified against its checksum; the layout must be the one that
    wrote it."""
    meta = _read_meta(path)
    saved = {k: meta.get(k) for k in layout}
    if saved != layout:
        raise ValueError(
            f"checkpoint {path} was written with layout {saved}, this run has {layout}: resume with the same "
            f"engine.nproc / engine.tp_size, or point checkpointing.checkpoint_dir elsewhere to start afresh"
        )
    file = os.path.join(path, rank_file(rank))
    with disk_errors(file, KEY):
        with open(file, "rb") as fh:
            data = fh.read()
    entry = meta["files"].get(rank_file(rank), {})
    if sha256(data) != entry.get("sha256"):
        raise NoIntactCheckpoint(f"{file}: checksum mismatch since it was verified; restore it or move {path} away")
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=False)
