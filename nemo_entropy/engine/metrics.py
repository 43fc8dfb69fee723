"""Per-step metrics of the local engine: JSON lines, TensorBoard events, and run_info.json.

Only rank 0 writes. ``metrics.jsonl`` holds one object per RL step with ``step`` first; after a resume
from step N every line after N is dropped first (and TensorBoard purges its events from N + 1), so no step
is lost or repeated.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Optional

import torch

from .disk import atomic_write_text, disk_errors

LOG_KEY = "logger.log_dir"
METRICS_FILE = "metrics.jsonl"
RUN_INFO_FILE = "run_info.json"
ENTROPY_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)


def read_metrics(path: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file (skipping a torn last line of a killed run)."""
    records = []
    if not os.path.exists(path):
        return records
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    return records


def entropy_summary(entropy: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    """Mean and quantiles of the per-token entropy over valid tokens (inputs already gathered over DP)."""
    values = entropy[mask.bool()].double()
    if values.numel() == 0:
        return {"entropy_mean": float("nan"), **{f"entropy_p{int(q * 100)}": float("nan") for q in ENTROPY_QUANTILES}}
    out = {"entropy_mean": float(values.mean())}
    qs = torch.quantile(values, torch.tensor(ENTROPY_QUANTILES, dtype=torch.float64))
    out.update({f"entropy_p{int(q * 100)}": float(v) for q, v in zip(ENTROPY_QUANTILES, qs)})
    return out


def _finite_or_none(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class MetricsLog:
    """Writer of metrics.jsonl and TensorBoard events (a no-op on ranks other than 0)."""

    def __init__(self, log_dir: str, *, enabled: bool, tensorboard: bool, resume_step: Optional[int]):
        self.enabled = enabled
        self.path = os.path.join(log_dir, METRICS_FILE)
        self.writer = None
        if not enabled:
            return
        # Write-new-then-rename: a crash while the kept lines are written leaves the old file, never a part of it.
        kept = [] if resume_step is None else [r for r in read_metrics(self.path) if r.get("step", -1) <= resume_step]
        atomic_write_text(self.path, "".join(json.dumps(record) + "\n" for record in kept), key=LOG_KEY)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self.writer = SummaryWriter(os.path.join(log_dir, "tb"), purge_step=purge)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Append one record (``step`` first) and its scalars to TensorBoard."""
        if not self.enabled:
            return
        record = {"step": step, **{k: _finite_or_none(v) for k, v in metrics.items() if k != "step"}}
        with disk_errors(self.path, LOG_KEY), open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(_tb_tag(key), value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def _tb_tag(key: str) -> str:
    if key.startswith("val_"):
        return f"val/{key[4:]}"
    if key.startswith("entropy"):
        return f"entropy/{key}"
    if key.startswith("pass@"):
        return f"val/{key}"
    if key in ("step_time", "rollout_time", "train_time", "val_time", "pass_at_k_time"):
        return f"time/{key}"
    return f"train/{key}"


def write_run_info(log_dir: str, info: dict[str, Any], ranks: Iterable[dict[str, Any]]) -> str:
    """run_info.json: world/dp/tp sizes and, per rank, its rank, node name and pid."""
    path = os.path.join(log_dir, RUN_INFO_FILE)
    atomic_write_text(path, json.dumps({**info, "ranks": list(ranks)}, indent=2), key=LOG_KEY)
    return path


def update_run_info(log_dir: str, info: dict[str, Any]) -> str:
    """Add (or replace) top-level entries of run_info.json, e.g. the end-of-run pass@k."""
    path = os.path.join(log_dir, RUN_INFO_FILE)
    current: dict[str, Any] = {}
    if os.path.exists(path):
        with open(path) as fh:
            current = json.load(fh)
    current.update(info)
    atomic_write_text(path, json.dumps(current, indent=2), key=LOG_KEY)
    return path
