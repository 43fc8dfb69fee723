"""Layout invariance of the weighting controls: one step's batch over 1 process and over 4 gloo processes (samples
interleaved, or one rank holding only samples without a valid token), micro-batch sizes 1, 3 and 8, gives
bit-identical per-step values (the top-entropy set, its threshold and count) and the same summed losses, gradients
and metrics.

Every control runs inside ONE spawn of 4 processes (spawning costs seconds); the single-process reference is
computed in the parent. The old entropy sits on a 0.25 grid, so many tokens tie across ranks and only the global
(entropy, uid) order can pick the same set everywhere.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nemo_entropy.config import loss_config
from nemo_entropy.controls import ControlSet
from nemo_entropy.losses import accumulate_metrics, metric_reduction, policy_loss
from nemo_entropy.parallel import ParallelGroups
from nemo_entropy.plan import StepInputs, build_step_plan

from .support.controls_oracle import step_batch
from .support.distributed import run_distributed

BATCH, LENGTH, STEP = 16, 24, 9
MICRO_BATCH_SIZES = (1, 3, 8)
EMPTY = (0, 4, 8, 12)  # the samples rank 3 holds in the "empty rank" layout: all of their tokens masked
CASES = {
    "top_entropy_0.2": {"method": "top_entropy", "top_entropy_quantile": 0.2},
    "top_entropy_0.55_dual_clip": {"method": "top_entropy", "top_entropy_quantile": 0.55, "ratio_clip_c": 3.0},
    "w_reinforce_token": {"method": "w_reinforce", "w_reinforce_level": "token"},
    "gppo_clip_higher": {"method": "gppo", "ratio_clip_max": 0.28},
    "entropy_advantage": {"method": "entropy_advantage"},
    "all_four": {"method": "gppo", "controls": ["top_entropy", "w_reinforce", "entropy_advantage"],
                 "top_entropy_quantile": 0.3},
}


def global_batch(empty: bool):
    s = step_batch(seed=2025, batch=BATCH, length=LENGTH, ties=True)
    mask = s.mask.clone()
    if empty:
        mask[list(EMPTY)] = False
    return [t.float() for t in (s.cur, s.old, s.adv)] + [mask, s.uids, s.old_entropy.float(), s.entropy.float()]


def run_rank(data, samples, groups, cfg_dict, sizes=MICRO_BATCH_SIZES):
    """One rank: the step's plan over the group, then the losses of its micro-batches (no collective)."""
    cfg = loss_config(cfg_dict)
    controls = ControlSet(cfg)
    idx = torch.tensor(samples, dtype=torch.long)
    cur, old, adv, mask, uids, old_entropy, entropy = (t[idx] for t in data)
    plan = build_step_plan(cfg, StepInputs(old, adv, mask, uids, old_entropy=old_entropy), step=STEP, groups=groups,
                           controls=controls)
    out = {"samples": samples, "values": {n: dict(v) for n, v in plan.values.items()}}
    for mbs in sizes:
        x = cur.clone().requires_grad_(True)
        total, metrics = 0.0, {}
        for lo in range(0, len(samples), mbs):
            part = slice(lo, lo + mbs)
            loss, m = policy_loss(cfg, x[part], old[part], adv[part], mask[part], plan=plan.rows(part),
                                  entropy=entropy[part] if "entropy" in controls.needs else None, controls=controls,
                                  token_uids=uids[part])
            loss.backward()
            total += float(loss.detach())
            accumulate_metrics(metrics, m)
        out[mbs] = (total, x.grad, metrics)
    return out


def _scenario(rank, world_size):
    torch.set_num_threads(1)
    group = ParallelGroups.from_groups(dist.group.WORLD)
    results = {}
    for name, cfg in CASES.items():
        results[(name, "dp4")] = run_rank(global_batch(False), list(range(rank, BATCH, 4)), group, cfg)
        holders = list(EMPTY) if rank == 3 else [s for s in range(BATCH) if s not in EMPTY][rank::3]
        results[(name, "dp4_empty_rank")] = run_rank(global_batch(True), holders, group, cfg)
    return results


def _combine(per_rank):
    """Scatter per-token values and gradients back to sample order; sum losses; reduce metrics as NeMo-RL does."""
    values, grads, losses, metrics = {}, {}, {}, {}
    for out in per_rank:
        idx = torch.tensor(out["samples"], dtype=torch.long)
        for name, vals in out["values"].items():
            for key, value in vals.items():
                if isinstance(value, torch.Tensor):
                    values.setdefault((name, key), torch.zeros(BATCH, LENGTH, dtype=value.dtype))[idx] = value
                else:
                    values.setdefault((name, key), set()).add(value)
        for mbs in MICRO_BATCH_SIZES:
            total, grad, m = out[mbs]
            losses[mbs] = losses.get(mbs, 0.0) + total
            grads.setdefault(mbs, torch.zeros(BATCH, LENGTH))[idx] = grad
            for key, value in m.items():
                how = metric_reduction(key)
                old = metrics.setdefault(mbs, {}).get(key)
                metrics[mbs][key] = value if old is None else (old + value if how == "sum" else
                                                                (min if how == "min" else max)(old, value))
    return values, grads, losses, metrics


def test_per_step_values_losses_gradients_and_metrics_do_not_depend_on_the_layout():
    per_rank = run_distributed(4, _scenario)
    for name, cfg in CASES.items():
        for layout in ("dp4", "dp4_empty_rank"):
            data = global_batch(layout == "dp4_empty_rank")
            ref = run_rank(data, list(range(BATCH)), None, cfg, sizes=(BATCH,))  # 1 process, 1 micro-batch
            ref_loss, ref_grad, ref_metrics = ref[BATCH]
            values, grads, losses, metrics = _combine([r[(name, layout)] for r in per_rank])
            for control, vals in ref["values"].items():
                for key, want in vals.items():
                    got = values[(control, key)]
                    if isinstance(want, torch.Tensor):
                        assert torch.equal(got, want), f"{name} {layout}: {control}.{key} differs from 1 process"
                    else:
                        assert got == {want}, f"{name} {layout}: {control}.{key} = {got} on the ranks, {want} alone"
            for mbs in MICRO_BATCH_SIZES:
                assert abs(losses[mbs] - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss)), (name, layout, mbs)
                torch.testing.assert_close(grads[mbs], ref_grad, rtol=1e-5, atol=1e-7)
                assert set(metrics[mbs]) == set(ref_metrics)
                for key, want in ref_metrics.items():
                    assert abs(metrics[mbs][key] - want) <= 1e-5 * max(1.0, abs(want)), (name, layout, mbs, key)
            if "top_entropy" in ref["values"]:
                assert 0 < ref["values"]["top_entropy"]["num_kept"] < int(data[3].sum())
