"""The supervised warm start: a short, deterministic cross-entropy phase on correct answers.

RL from a random policy would see only zero rewards. A few hundred teacher-forced steps give the policy
partial accuracy and non-trivial entropy, the regime the paper's curves start from. The warm start runs
in one process on the full (unsharded) model, so its result is bit-identical for every layout; it is
cached on disk under a key of everything it depends on, so resumes and comparison runs reuse it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from typing import Any, Callable, Mapping, Optional

import torch

from .disk import atomic_write_bytes, torch_bytes
from .model import TinyPolicy
from .progress import Progress
from .task import Task, response_mask, stream_seed


def warm_start_key(model_cfg: Mapping[str, Any], task_cfg: Mapping[str, Any], warm_cfg: Mapping[str, Any], seed: int) -> str:
    """A short hash of everything the warm-started weights depend on."""
    relevant = {k: v for k, v in dict(warm_cfg).items() if k != "cache_dir"}
    payload = json.dumps([dict(model_cfg), dict(task_cfg), relevant, seed, torch.__version__], sort_keys=True, default=str)
    return hashlib.blake2b(payload.encode(), digest_size=6).hexdigest()


def supervised_warm_start(
    policy: TinyPolicy,
    task: Task,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    progress: Optional[Callable[[int, float], None]] = None,
) -> list[float]:
    """Train ``policy`` (unsharded) with teacher-forced cross-entropy on the answers; returns the losses."""
    if policy.tp_size != 1:
        raise ValueError("supervised_warm_start runs on the unsharded model (tp_size=1)")
    optimizer = torch.optim.AdamW(policy.parameters(), lr=lr, weight_decay=0.0)
    losses = []
    for step in range(steps):
        operands = task.sample_operands(batch_size, stream_seed(seed, "warm_start", step))
        prompts, answers = task.prompts(operands), task.answers(operands)
        inputs = torch.cat([prompts, answers[:, :-1]], dim=1)
        hidden = policy.hidden_states(inputs)[:, prompts.shape[1] - 1 :]
        logits = policy.full_logits(hidden).float()
        mask = response_mask(answers)
        token_loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), answers, reduction="none")
        loss = (token_loss * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
        if progress is not None:
            progress(step, losses[-1])
    return losses


def load_or_run_warm_start(
    cache_path: str,
    build_full_policy: Callable[[], TinyPolicy],
    task: Task,
    warm_cfg: Mapping[str, Any],
    *,
    seed: int,
    show_progress: bool = True,
) -> dict[str, Any]:
    """The warm-started full state dict, from ``cache_path`` or trained now and saved there atomically.

    Returns ``{"state": full_state_dict, "losses": [...], "seconds": float, "cached": bool}``.
    """
    if os.path.exists(cache_path):
        blob = torch.load(cache_path, map_location="cpu", weights_only=False)
        blob["cached"] = True
        return blob
    policy = build_full_policy()
    steps = int(warm_cfg.get("steps", 300))
    bar = Progress(steps, "warm start", leave=False, enabled=show_progress and steps > 0)

    def _progress(step: int, loss: float) -> None:
        bar.update(1, loss=loss)

    start = time.perf_counter()
    losses = supervised_warm_start(
        policy,
        task,
        steps=steps,
        batch_size=int(warm_cfg.get("batch_size", 64)),
        lr=float(warm_cfg.get("lr", 3e-3)),
        seed=seed,
        progress=_progress,
    )
    bar.close()
    blob = {"state": policy.full_state_dict(), "losses": losses, "seconds": time.perf_counter() - start}
    atomic_write_bytes(os.path.abspath(cache_path), torch_bytes(blob),
                       key="engine.warm_start.cache_dir (default: checkpointing.checkpoint_dir)")
    blob["cached"] = False
    return blob
