"""Shared pieces of the entropy-driven controls' tests (entropy_bonus, adaptive_entropy, aent, entropy_pi).

* :func:`step_batch`: one optimizer step's data from logits: the old policy's logits (its log-probs and entropy are
  the step's data) and the current logits (the ones the loss differentiates), with a fully masked sample.
* float64 references written from the formulas, independently of the package: the entropy, AEnt's clamped entropy
  (by sorting), the PPO clipped surrogate, the global normalisation; :func:`reference_loss` is the objective whose
  autograd gradient with respect to the *logits* the tests compare against.
* :func:`our_loss`: the package's path from logits (vocab-parallel entropy and log-probs, the controls' logit
  values, the plan, ``policy_loss`` per micro-batch), returning the summed loss, the logits' gradient and the summed
  metrics.
"""

from __future__ import annotations

import json
import math

import torch

from nemo_entropy.controls import ControlSet
from nemo_entropy.entropy import vocab_parallel_entropy_and_logprobs
from nemo_entropy.losses import accumulate_metrics, policy_loss
from nemo_entropy.plan import StepInputs, build_step_plan
from nemo_entropy.selection import token_uids_for

D = torch.float64


def step_batch(seed: int, batch: int = 8, length: int = 10, vocab: int = 11, spread: float = 0.3,
               scale: float = 2.5) -> dict:
    """One optimizer step: float64 old / current logits ``[B, L, V]``, targets, per-sample advantages, a mask with a
    fully masked sample (row 2) and uneven lengths, token uids, and the old policy's float64 log-probs and entropy."""
    gen = torch.Generator().manual_seed(seed)
    old_logits = torch.randn(batch, length, vocab, generator=gen, dtype=D) * scale
    logits = old_logits + spread * torch.randn(batch, length, vocab, generator=gen, dtype=D)
    targets = torch.randint(0, vocab, (batch, length), generator=gen)
    adv = torch.randn(batch, 1, generator=gen, dtype=D).expand(batch, length).contiguous()
    lengths = torch.randint(2, length + 1, (batch,), generator=gen)
    mask = torch.arange(length)[None] < lengths[:, None]
    mask[min(2, batch - 1)] = False
    old_lp = torch.log_softmax(old_logits, -1).gather(-1, targets[..., None]).squeeze(-1)
    return {"old_logits": old_logits, "logits": logits, "targets": targets, "adv": adv, "mask": mask,
            "uids": token_uids_for(torch.arange(batch), length), "old_logprobs": old_lp,
            "old_entropy": entropy64(old_logits)}


# ----------------------------------------------------------------------------------------------- float64 math
def entropy64(logits: torch.Tensor) -> torch.Tensor:
    logp = torch.log_softmax(logits, -1)
    return -(logp.exp() * logp).sum(-1)


def clamped_entropy64(logits: torch.Tensor, clamp: float) -> torch.Tensor:
    """AEnt's clamped entropy by brute force: sort each row, keep every logit >= the (V - floor(clamp V))-th largest,
    entropy of the renormalised kept part. The kept set carries no gradient (as in AEnt's reference)."""
    vocab = logits.shape[-1]
    keep = vocab - int(math.floor(clamp * vocab))
    threshold = logits.detach().sort(-1, descending=True).values[..., keep - 1:keep]
    kept = logits.detach() >= threshold
    log_q = logits - torch.logsumexp(logits.masked_fill(~kept, float("-inf")), -1, keepdim=True)
    q = torch.where(kept, log_q.exp(), torch.zeros_like(log_q))
    return -(q * torch.where(kept, log_q, torch.zeros_like(log_q))).sum(-1)


def clipped_surrogate64(logp, old_logp, adv, eps_low=0.2, eps_high=0.2):
    r = torch.exp(torch.clamp(logp - old_logp, -20.0, 20.0))
    return torch.maximum(-adv * r, -adv * torch.clamp(r, 1 - eps_low, 1 + eps_high)), r


def normalise64(per_token, mask, token_level=True):
    m = mask.to(D)
    if token_level:
        return (per_token * m).sum() / m.sum()
    per_seq = (per_token * m).sum(-1) / m.sum(-1).clamp(min=1)
    return per_seq.sum() / (m.sum(-1) > 0).sum()


def reference_loss(data: dict, extra_term, *, token_level: bool = True):
    """``(loss, d loss / d logits)`` of ``normalise(clipped surrogate + extra_term(ctx))`` in float64, where
    ``extra_term`` gets ``dict(logits, logp, ratio, adv, mask)`` and returns a per-token tensor (or None)."""
    logits = data["logits"].clone().requires_grad_(True)
    logp = torch.log_softmax(logits, -1).gather(-1, data["targets"][..., None]).squeeze(-1)
    surrogate, ratio = clipped_surrogate64(logp, data["old_logprobs"], data["adv"])
    term = extra_term(dict(logits=logits, logp=logp, ratio=ratio, adv=data["adv"], mask=data["mask"]))
    per_token = surrogate if term is None else surrogate + term
    loss = normalise64(per_token, data["mask"], token_level)
    loss.backward()
    return loss.detach(), logits.grad


# ----------------------------------------------------------------------------------------------- our path
def plan_step(cfg, data: dict, *, step: int, controls: ControlSet, groups=None, rows=None):
    """The step's plan from the data's old log-probs, advantages, mask, uids and old entropy (float32, as a
    framework hands them over), over ``rows`` of the batch (default: all) across ``groups``."""
    rows = slice(None) if rows is None else rows
    inputs = StepInputs(data["old_logprobs"][rows].float(), data["adv"][rows].float(), data["mask"][rows],
                        data["uids"][rows], old_entropy=data["old_entropy"][rows].float())
    return build_step_plan(cfg, inputs, step=step, groups=groups, controls=controls)


def our_loss(cfg, data: dict, plan, controls: ControlSet, *, micro_batch: int, rows=None, tp_group=None,
             vocab_start: int = 0, vocab_size=None, shard=slice(None)):
    """Sum of the micro-batch losses of ``rows`` (fp32 logits, or this rank's vocabulary ``shard`` of them), the
    gradient of that sum with respect to the fp32 logits (this shard's columns), and the summed metrics."""
    rows = torch.arange(data["logits"].shape[0]) if rows is None else torch.as_tensor(rows)
    leaf = data["logits"][rows][..., shard].float().clone().requires_grad_(True)
    if vocab_size is None:
        vocab_size = data["logits"].shape[-1]
    needs = controls.needs
    total, metrics = 0.0, {}
    for lo in range(0, len(rows), micro_batch):
        part = slice(lo, lo + micro_batch)
        idx = rows[part]
        x = leaf[part]
        entropy, logprobs = vocab_parallel_entropy_and_logprobs(
            x, data["targets"][idx], groups=tp_group, vocab_start=vocab_start, vocab_size=vocab_size)
        values = controls.logit_values(x, tp_group=tp_group, vocab_start=vocab_start, vocab_size=vocab_size) \
            if "logits" in needs else None
        loss, m = policy_loss(cfg, logprobs, data["old_logprobs"][idx].float(), data["adv"][idx].float(),
                              data["mask"][idx], plan=plan.rows(part), entropy=entropy if "entropy" in needs else None,
                              logit_values=values, controls=controls, token_uids=data["uids"][idx])
        loss.backward()
        total += float(loss.detach())
        accumulate_metrics(metrics, m)
    return total, leaf.grad.double(), metrics



def mean_old_entropy(data: dict) -> float:
    """The step's mean old-policy entropy over its valid tokens, in float64."""
    m = data["mask"].to(torch.float64)
    return float((data["old_entropy"] * m).sum() / m.sum())


def run_stateful(cfg, name: str, steps: int, *, seed: int, controls: ControlSet = None, first: int = 0):
    """Plan, record and update ``steps`` optimizer steps of the stateful control ``name`` (step t uses batch seed
    ``seed + t``, entropy scales cycling so that the mean entropy moves): ``(controls, [(plan values, mean old
    entropy)] per step)``."""
    controls = controls if controls is not None else ControlSet(cfg)
    seen = []
    for t in range(first, first + steps):
        data = step_batch(seed=seed + t, scale=2.0 + (t % 3))
        plan = plan_step(cfg, data, step=t, controls=controls)
        seen.append((dict(plan.values[name]), mean_old_entropy(data)))
        controls.update(plan)
        controls.end_rollout()  # one optimizer step per rollout: either controller_update moves the state here
    return controls, seen


def check_resume_continues_exactly(cfg, run, total: int, split: int) -> ControlSet:
    """A run stopped after ``split`` of ``total`` steps, its state saved through JSON (as NeMo-RL's driver writes
    it) and loaded into a fresh set, continues bit for bit like the uninterrupted run; returns the uninterrupted
    run's controls. ``run(cfg, steps, controls=None, first=0)`` is :func:`run_stateful` bound to a control."""
    whole, seen_whole = run(cfg, total)
    first, seen_first = run(cfg, split)
    saved = json.loads(json.dumps(first.state_dict()))
    assert saved != ControlSet(cfg).state_dict(), "the state must have moved for the test to mean anything"
    resumed = ControlSet(cfg)
    resumed.load_state_dict(saved)
    resumed, seen_rest = run(cfg, total - split, controls=resumed, first=split)
    assert seen_first + seen_rest == seen_whole  # bit for bit
    assert resumed.state_dict() == whole.state_dict()
    return whole
