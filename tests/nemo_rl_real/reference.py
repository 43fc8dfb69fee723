"""Independent references for the harness checks.

* The data of each GRPO step is read back from what NeMo-RL itself logged (``train_data_step{N}.jsonl``), not from
  the plugin; the selection is recomputed with the public ``nemo_entropy.selection.select_tokens`` over each
  optimizer step (NeMo-RL trains step ``j`` of a rollout on samples ``[j * gbs, (j + 1) * gbs)``); token uids are
  ``row * S + position`` as documented, computed here.
* What reached the loss is reassembled from the loss recorder's calls (every DP rank, every micro-batch or
  packed sequence, dummy micro-batches excluded) through the harness's own row tag.
* Expected metric values follow the paper's formulas (DESIGN.md section 2) and NeMo-RL's documented reductions:
  the worker divides every metric except ``*_min`` / ``*_max`` by the number of optimizer steps of the rollout,
  the driver sums over micro-batches and DP ranks, and takes min / max of ``probs_ratio(_clamped)_min/_max``
  (skipping ``inf`` sentinels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from nemo_entropy.config import loss_config
from nemo_entropy.selection import select_tokens

from .harness import LOSS_SECTIONS, TRAIN_GLOBAL_BATCH


def selection_config(method: str):
    return loss_config({"reference_policy_kl_penalty": 0.0, **LOSS_SECTIONS[method]})


@dataclass
class StepData:
    """One GRPO step as NeMo-RL logged it: next-token tensors [B, S-1] (position t describes token t + 1)."""

    mask: torch.Tensor
    prev: torch.Tensor
    adv: torch.Tensor
    uids: torch.Tensor

    @property
    def optimizer_steps(self) -> int:
        return self.mask.shape[0] // TRAIN_GLOBAL_BATCH

    def rows(self, j: int) -> slice:
        return slice(j * TRAIN_GLOBAL_BATCH, (j + 1) * TRAIN_GLOBAL_BATCH)


def step_data(logged: dict[str, torch.Tensor]) -> StepData:
    batch, length = logged["token_ids"].shape
    mask = (logged["token_loss_mask"][:, 1:] * logged["sample_loss_mask"][:, None]) != 0
    uids = torch.arange(batch)[:, None] * length + torch.arange(length)[None, :]
    return StepData(mask=mask, prev=logged["prev_logprobs"][:, 1:], adv=logged["advantages"][:, 1:],
                    uids=uids[:, 1:].contiguous())


def expected_selection(data: StepData, method: str, first_step: int) -> tuple[torch.Tensor, list[int]]:
    """``select_tokens`` over each optimizer step of the rollout: ([B, S-1] bool, [step index per opt. step])."""
    config = selection_config(method)
    out = torch.zeros_like(data.mask)
    steps = []
    for j in range(data.optimizer_steps):
        rows = data.rows(j)
        out[rows] = select_tokens(config, data.prev[rows], data.adv[rows], data.mask[rows],
                                  token_uids=data.uids[rows], step=first_step + j)
        steps.append(first_step + j)
    return out, steps


@dataclass
class Reached:
    """What the loss calls of one ``policy.train`` saw, reassembled to [B, S-1] by the harness's row tag."""

    coverage: torch.Tensor  # how many non-dummy loss calls held each token as valid
    selected: torch.Tensor  # the attached selection, as the loss received it
    uids: torch.Tensor
    step: torch.Tensor  # [B] attached optimizer step
    calls: list[dict[str, Any]]


def reached(records: list[dict[str, Any]], shape: tuple[int, int]) -> Reached:
    batch, width = shape
    coverage = torch.zeros(shape, dtype=torch.int64)
    selected = torch.zeros(shape, dtype=torch.bool)
    uids = torch.full(shape, -1, dtype=torch.int64)
    step = torch.full((batch,), -1, dtype=torch.int64)
    calls = [r for r in records if not r["dummy"]]
    for r in calls:
        if r["selected"] is None or r["plan_step"] is None:
            raise AssertionError("a loss call received no attached step plan (entropy_plan.* keys missing)")
        if not torch.equal(r["plan_step"].to(torch.int64), r["step"]):
            raise AssertionError(f"entropy_plan.step {r['plan_step'].tolist()} != entropy_step {r['step'].tolist()}")
        for i, row in enumerate(r["rows"].tolist()):
            n = r["mask"].shape[1]
            valid = r["mask"][i]
            coverage[row, :n] += valid.long()
            selected[row, :n] |= (r["selected"][i] != 0) & valid
            uids[row, :n] = torch.where(valid, r["uids"][i], uids[row, :n])
            step[row] = int(r["step"][i])
    return Reached(coverage, selected, uids, step, calls)


# ----------------------------------------------------------------------------------------------- metrics
def _per_token_loss(method: str, curr, prev, adv, selected) -> torch.Tensor:
    cfg = selection_config(method)
    log_ratio = curr - prev
    ratio = log_ratio.exp()
    if method == "kl_cov":  # -A r + beta |log r| on the selected tokens, no PPO clip (the reference's default)
        return -adv * ratio + cfg.kl_cov_coef * log_ratio.abs() * selected
    clipped = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - cfg.ratio_clip_min, 1 + cfg.ratio_clip_max))
    return clipped * (~selected)  # Clip-Cov: the selected tokens' terms are detached (contribute 0)


def step_covariance(data: StepData) -> torch.Tensor:
    """``c_i = (l_i - mean l)(A_i - mean A)`` over each optimizer step's valid tokens (0 elsewhere), in fp64."""
    cov = torch.zeros(data.mask.shape, dtype=torch.float64)
    for j in range(data.optimizer_steps):
        rows = data.rows(j)
        m = data.mask[rows]
        lp, a = data.prev[rows].double(), data.adv[rows].double()
        c = (lp - lp[m].mean()) * (a - a[m].mean())
        cov[rows] = torch.where(m, c, torch.zeros_like(c))
    return cov


def expected_metrics(method: str, calls: list[dict[str, Any]], data: StepData,
                     selection: torch.Tensor | None = None) -> dict[str, float]:
    """The logged value of each loss metric NeMo-RL should show for this GRPO step, from the loss calls' inputs.

    The selected tokens are the ones attached to each call, or ``selection`` ([B, S-1], e.g. the whole-step
    ``select_tokens``) when given (in-worker selection attaches none)."""
    cfg = selection_config(method)
    steps = data.optimizer_steps
    cov = step_covariance(data)
    sums = {k: 0.0 for k in ("loss", "probs_ratio", "probs_ratio_clamped", "selected_fraction", "kl_to_old",
                             "num_valid_tokens", "num_valid_samples", "cov_mean", "cov_selected_mean")}
    extrema = {"probs_ratio_min": math.inf, "probs_ratio_max": -math.inf,
               "probs_ratio_clamped_min": math.inf, "probs_ratio_clamped_max": -math.inf}

    def chosen(r):
        if selection is None:
            return (r["selected"] != 0) & r["mask"]
        return selection[r["rows"], : r["mask"].shape[1]] & r["mask"]

    selected_in_step: dict[int, int] = {}
    for r in calls:
        selected_in_step[r["global_batch"]] = selected_in_step.get(r["global_batch"], 0) + int(chosen(r).sum())
    for r in calls:
        m = r["mask"]
        curr, prev, adv = r["curr"].double(), r["prev"].double(), r["adv"].double()
        sel = chosen(r)
        gvt = r["gvt"]
        ratio = (curr - prev).exp()
        clamped = ratio.clamp(1 - cfg.ratio_clip_min, 1 + cfg.ratio_clip_max)
        tok = lambda x: float((x * m).sum()) / gvt / steps  # noqa: E731
        sums["loss"] += tok(_per_token_loss(method, curr, prev, adv, sel))
        sums["probs_ratio"] += tok(ratio)
        sums["probs_ratio_clamped"] += tok(clamped)
        sums["selected_fraction"] += tok(sel.double())
        sums["kl_to_old"] += tok(torch.expm1(curr - prev) - (curr - prev))
        sums["num_valid_tokens"] += float(m.sum()) / steps
        sums["num_valid_samples"] += float(len(r["rows"])) / steps
        rows = r["rows"]
        sums["cov_mean"] += tok(cov[rows, : m.shape[1]])
        sums["cov_selected_mean"] += float((cov[rows, : m.shape[1]] * sel).sum()) / max(
            selected_in_step[r["global_batch"]], 1) / steps
        if r["entropy"] is not None:  # LOGIT input: the full-vocabulary entropy is logged
            sums["entropy"] = sums.get("entropy", 0.0) + tok(r["entropy"].double())
        if bool(m.any()):
            extrema["probs_ratio_min"] = min(extrema["probs_ratio_min"], float(ratio[m].min()))
            extrema["probs_ratio_max"] = max(extrema["probs_ratio_max"], float(ratio[m].max()))
            extrema["probs_ratio_clamped_min"] = min(extrema["probs_ratio_clamped_min"], float(clamped[m].min()))
            extrema["probs_ratio_clamped_max"] = max(extrema["probs_ratio_clamped_max"], float(clamped[m].max()))
    return {**sums, **extrema}


def nemo_rl_reduction(name: str, values: list[float], steps: int) -> float:
    """How NeMo-RL turns the per-call values of loss metric ``name`` into the logged scalar (worker division by
    the optimizer steps for non-extrema, then the driver's sum, or min / max without ``inf`` sentinels)."""
    if "_min" in name or "_max" in name:
        finite = [v for v in values if not math.isinf(v)]
        if not finite:
            return -1.0
        return min(finite) if name.endswith("_min") else max(finite)
    return sum(v / steps for v in values)
