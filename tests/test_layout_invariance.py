"""Layout invariance of every registered control: the same global batch over 1 process and over 4 gloo processes
(DP 4 with samples interleaved, DP 2 replicas, DP 2 x TP 2, DP 4 with a rank holding only samples without a valid
token), at several micro-batch sizes, gives bit-identical whole-step quantities and the same losses, gradients and
metrics as one process with one micro-batch.

One harness: ONE spawn of 4 processes (spawning costs seconds) runs every case of every control in the layouts of
its kind, sub-groups carving out the 2-rank layouts; the single-process references run in the parent. The cases
are keyed by registry name (:data:`CASES`), and ``test_every_registered_control_has_layout_cases`` fails when a
control is registered without them. Three kinds of case, by what the control's plan holds:

* ``covariance`` (Clip-Cov, KL-Cov): bit-identical selections over every layout, micro-batch sizes 1, 2 and 8;
  ties on purpose (several samples share advantages and log-probs); a NaN advantage on one rank raises on every
  rank, naming that rank.
* ``weighting`` (PPO, top-entropy, W-REINFORCE, GPPO, entropy advantage): bit-identical per-step values (the
  top-entropy set, its threshold and count), summed losses, gradients and metrics as NeMo-RL reduces them,
  micro-batch sizes 1, 3 and 8. The old entropy sits on a 0.25 grid, so many tokens tie across ranks and only the
  global (entropy, uid) order can pick the same set everywhere.
* ``entropy`` (the entropy-driven controls): two optimizer steps (the second plan depends on the state the first
  left), DP 2 x TP 2 with the logits' vocabulary sharded and padded; the step's mean old entropy, the coefficients
  and control signals in the plan and the state after every step bit for bit on every rank; losses and logit
  gradients (the entropy's and the clamped entropy's included) to fp32 rounding, micro-batch sizes 1, 2 and 8.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.distributed as dist

from nemo_entropy.config import loss_config
from nemo_entropy.controls import REGISTRY, ControlSet
from nemo_entropy.losses import accumulate_metrics, metric_reduction, policy_loss
from nemo_entropy.parallel import ParallelGroups
from nemo_entropy.plan import StepInputs, build_step_plan
from nemo_entropy.selection import select_tokens, token_uids_for

from .support import controls_oracle, entropy_controls
from .support.distributed import run_distributed

CASES: dict[str, tuple[str, dict[str, dict]]] = {
    # registry name: (kind of case, {case: loss_fn config})
    "ppo": ("weighting", {"ppo": {"method": "ppo"}}),
    "clip_cov": ("covariance", {
        "clip_cov_0.02": {"method": "clip_cov", "clip_cov_ratio": 0.02, "clip_cov_lb": 0.0, "clip_cov_ub": 5.0},
        # more quota than candidates
        "clip_cov_0.3": {"method": "clip_cov", "clip_cov_ratio": 0.3, "clip_cov_lb": -0.2, "clip_cov_ub": 5.0},
    }),
    "kl_cov": ("covariance", {
        "kl_cov_2e-3": {"method": "kl_cov", "kl_cov_ratio": 2e-3},  # k = 1: the case the reference gets most wrong
        "kl_cov_0.05": {"method": "kl_cov", "kl_cov_ratio": 0.05},
    }),
    "top_entropy": ("weighting", {
        "top_entropy_0.2": {"method": "top_entropy", "top_entropy_quantile": 0.2},
        "top_entropy_0.55_dual_clip": {"method": "top_entropy", "top_entropy_quantile": 0.55, "ratio_clip_c": 3.0},
    }),
    "w_reinforce": ("weighting", {"w_reinforce_token": {"method": "w_reinforce", "w_reinforce_level": "token"}}),
    "gppo": ("weighting", {
        "gppo_clip_higher": {"method": "gppo", "ratio_clip_max": 0.28},
        "all_four": {"method": "gppo", "controls": ["top_entropy", "w_reinforce", "entropy_advantage"],
                     "top_entropy_quantile": 0.3},
    }),
    "entropy_advantage": ("weighting", {"entropy_advantage": {"method": "entropy_advantage"}}),
    "entropy_bonus": ("entropy", {"entropy_bonus": {"method": "entropy_bonus", "entropy_coef": 0.3}}),
    "adaptive_entropy": ("entropy", {"adaptive_entropy": {
        "method": "adaptive_entropy", "entropy_coef": 0.2, "entropy_target": 1.2, "entropy_coef_delta": 0.05}}),
    "aent": ("entropy", {"aent": {
        "method": "aent", "aent_coef": 0.2, "aent_clamp": 0.3, "aent_entropy_low": 1.1, "aent_entropy_high": 1.3,
        "aent_coef_lr": 0.1, "aent_coef_box_high": 0.5}}),
    "entropy_pi": ("entropy", {"entropy_pi": {
        "method": "entropy_pi", "entropy_pi_target": 1.2, "entropy_pi_ki": 0.5, "entropy_pi_prob_threshold": 0.3}}),
}

# ---- The layouts: every kind of case shares them ---------------------------------------------------------------

BATCH = 16
EMPTY = (0, 4, 8, 12)  # the samples rank 3 holds in the "dp4_empty_rank" layout: all of their tokens masked
REPLICA_SETS = {  # the ranks whose samples together form the batch once (and their vocabulary shards)
    "dp4": [[0, 1, 2, 3]], "dp2": [[0, 1], [2, 3]], "dp2xtp2": [[0, 2], [1, 3]], "dp4_empty_rank": [[0, 1, 2, 3]],
}


@dataclass(frozen=True)
class Layout:
    """What one rank holds: its samples, the token group of the step's plan, the TP group sharding the logits."""

    samples: list[int]
    groups: Any
    tp_group: Any = None
    tp_rank: int = 0



def _layouts(rank: int, world_size: int) -> dict[str, Layout]:
    """Every layout of this rank by name. Every rank creates every group, in order, once per spawn."""
    assert world_size == 4
    pair_a, pair_b = dist.new_group([0, 1]), dist.new_group([2, 3])
    tokens_0, tokens_1 = dist.new_group([0, 2]), dist.new_group([1, 3])
    world = ParallelGroups.from_groups(dist.group.WORLD)
    pair = pair_a if rank < 2 else pair_b
    dp_rank, tp_rank = rank // 2, rank % 2  # DP 2 x TP 2: ranks {0, 1} and {2, 3} are TP pairs (replicas of tokens)
    others = [s for s in range(BATCH) if s not in EMPTY]
    return {
        "dp4": Layout(list(range(rank, BATCH, 4)), world),  # DP 4, interleaved samples
        "dp2": Layout(list(range(rank % 2 * 8, rank % 2 * 8 + 8)), ParallelGroups.from_groups(pair)),
        "dp2xtp2": Layout(list(range(dp_rank * 8, dp_rank * 8 + 8)),
                          ParallelGroups.from_groups(tokens_0 if tp_rank == 0 else tokens_1), pair, tp_rank),
        # Rank 3 holds only samples whose tokens are all masked: it must still take part.
        "dp4_empty_rank": Layout(list(EMPTY) if rank == 3 else others[rank::3], world),
    }


# ---- covariance: Clip-Cov and KL-Cov ---------------------------------------------------------------------------

COV_LENGTH, COV_STEP, COV_MICRO_BATCH_SIZES = 48, 17, (1, 2, 8)


def covariance_batch(empty_samples=()):
    gen = torch.Generator().manual_seed(2024)
    old = -torch.rand(BATCH, COV_LENGTH, generator=gen) * 4
    cur = old + 0.2 * torch.randn(BATCH, COV_LENGTH, generator=gen)
    adv = torch.randn(BATCH, 1, generator=gen).expand(BATCH, COV_LENGTH).contiguous()
    # Ties on purpose: several samples share the same advantage and log-probs on some positions.
    adv[5] = adv[4]
    old[5, :10] = old[4, :10]
    mask = torch.rand(BATCH, COV_LENGTH, generator=gen) > 0.2
    for s in empty_samples:
        mask[s] = False
    uids = token_uids_for(torch.arange(BATCH), COV_LENGTH)
    return cur, old, adv, mask, uids


def run_covariance(cfg_dict, layout_name, samples, groups, tp_group=None, tp_rank=0):
    """What one rank computes for its samples: the selection over the step, then micro-batched losses."""
    cur, old, adv, mask, uids = covariance_batch(EMPTY if layout_name == "dp4_empty_rank" else ())
    cfg = loss_config(cfg_dict)
    idx = torch.tensor(samples, dtype=torch.long)
    c, o, a, m, u = (t[idx] for t in (cur, old, adv, mask, uids))
    selected = select_tokens(cfg, o, a, m, token_uids=u, step=COV_STEP, groups=groups)
    plan = build_step_plan(cfg, StepInputs(o, a, m, u), step=COV_STEP, groups=groups)
    out = {"samples": samples, "selected": selected}
    for mbs in COV_MICRO_BATCH_SIZES:
        x = c.clone().requires_grad_()
        total = 0.0
        for lo in range(0, len(samples), mbs):
            part = slice(lo, lo + mbs)
            loss, _ = policy_loss(cfg, x[part], o[part], a[part], m[part], plan=plan.rows(part), token_uids=u[part])
            loss.backward()
            total += float(loss.detach())
        out[f"loss_mbs{mbs}"] = total
        out[f"grad_mbs{mbs}"] = x.grad
    return out


def _assemble_covariance(per_rank, ranks):
    """Scatter the per-rank tensors of one replica set back to global sample order."""
    selected = torch.zeros(BATCH, COV_LENGTH, dtype=torch.bool)
    grads = {mbs: torch.zeros(BATCH, COV_LENGTH) for mbs in COV_MICRO_BATCH_SIZES}
    losses = {mbs: 0.0 for mbs in COV_MICRO_BATCH_SIZES}
    for r in ranks:
        out = per_rank[r]
        idx = torch.tensor(out["samples"], dtype=torch.long)
        selected[idx] = out["selected"]
        for mbs in COV_MICRO_BATCH_SIZES:
            grads[mbs][idx] = out[f"grad_mbs{mbs}"]
            losses[mbs] += out[f"loss_mbs{mbs}"]
    return selected, grads, losses


def check_covariance(case, cfg, results):
    """``results[layout][rank]``: the selection bit for bit, losses and gradients to fp32 rounding."""
    checked = 0
    for layout, sets in REPLICA_SETS.items():
        ref = run_covariance(cfg, layout, list(range(BATCH)), ParallelGroups.single())
        ref_grad = {mbs: ref[f"grad_mbs{mbs}"] for mbs in COV_MICRO_BATCH_SIZES}
        assert int(ref["selected"].sum()) > 0
        for ranks in sets:
            selected, grads, losses = _assemble_covariance(results[layout], ranks)
            assert torch.equal(selected, ref["selected"]), f"{layout} {cfg}: selection differs from 1 process"
            for mbs in COV_MICRO_BATCH_SIZES:
                assert abs(losses[mbs] - ref[f"loss_mbs{mbs}"]) <= 1e-5 * max(1.0, abs(ref[f"loss_mbs{mbs}"]))
                torch.testing.assert_close(grads[mbs], ref_grad[mbs], rtol=1e-5, atol=1e-7)
                checked += 1
    assert checked == sum(len(s) for s in REPLICA_SETS.values()) * len(COV_MICRO_BATCH_SIZES)
    # TP replicas (ranks 0 and 1 in dp2xtp2) hold the same tokens and must agree bit for bit.
    assert torch.equal(results["dp2xtp2"][0]["selected"], results["dp2xtp2"][1]["selected"])


def _nan_advantage(rank):
    """A NaN advantage on rank 2: every rank raises together (no rank left waiting in a collective)."""
    cfg = loss_config(CASES["kl_cov"][1]["kl_cov_2e-3"])
    cur, old, adv, mask, uids = covariance_batch()
    mine = list(range(rank, BATCH, 4))
    adv = adv.clone()
    if rank == 2:
        adv[mine[1], mask[mine[1]].nonzero()[0, 0]] = float("nan")
    results = {}
    try:
        select_tokens(cfg, old[mine], adv[mine], mask[mine], token_uids=uids[mine], step=0, groups=dist.group.WORLD)
        results["nan"] = None
    except ValueError as err:
        results["nan"] = str(err)
    # The same in policy_loss when it has to compute counts and the selection itself: all ranks raise.
    try:
        policy_loss(cfg, cur[mine], old[mine], adv[mine], mask[mine], token_uids=uids[mine], groups=dist.group.WORLD)
        results["nan_loss"] = None
    except ValueError as err:
        results["nan_loss"] = str(err)
    return results


# ---- weighting: PPO, top-entropy, W-REINFORCE, GPPO, entropy advantage ------------------------------------------

W_LENGTH, W_STEP, W_MICRO_BATCH_SIZES = 24, 9, (1, 3, 8)


def weighting_batch(empty: bool):
    s = controls_oracle.step_batch(seed=2025, batch=BATCH, length=W_LENGTH, ties=True)
    mask = s.mask.clone()
    if empty:
        mask[list(EMPTY)] = False
    return [t.float() for t in (s.cur, s.old, s.adv)] + [mask, s.uids, s.old_entropy.float(), s.entropy.float()]


def run_weighting(cfg_dict, layout_name, samples, groups, tp_group=None, tp_rank=0, sizes=W_MICRO_BATCH_SIZES):
    """One rank: the step's plan over the group, then the losses of its micro-batches (no collective)."""
    data = weighting_batch(layout_name == "dp4_empty_rank")
    cfg = loss_config(cfg_dict)
    controls = ControlSet(cfg)
    idx = torch.tensor(samples, dtype=torch.long)
    cur, old, adv, mask, uids, old_entropy, entropy = (t[idx] for t in data)
    plan = build_step_plan(cfg, StepInputs(old, adv, mask, uids, old_entropy=old_entropy), step=W_STEP,
                           groups=groups, controls=controls)
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


def _combine_weighting(per_rank):
    """Scatter per-token values and gradients back to sample order; sum losses; reduce metrics as NeMo-RL does."""
    values, grads, losses, metrics = {}, {}, {}, {}
    for out in per_rank:
        idx = torch.tensor(out["samples"], dtype=torch.long)
        for name, vals in out["values"].items():
            for key, value in vals.items():
                if isinstance(value, torch.Tensor):
                    values.setdefault((name, key), torch.zeros(BATCH, W_LENGTH, dtype=value.dtype))[idx] = value
                else:
                    values.setdefault((name, key), set()).add(value)
        for mbs in W_MICRO_BATCH_SIZES:
            total, grad, m = out[mbs]
            losses[mbs] = losses.get(mbs, 0.0) + total
            grads.setdefault(mbs, torch.zeros(BATCH, W_LENGTH))[idx] = grad
            for key, value in m.items():
                how = metric_reduction(key)
                old = metrics.setdefault(mbs, {}).get(key)
                metrics[mbs][key] = value if old is None else (old + value if how == "sum" else
                                                                (min if how == "min" else max)(old, value))
    return values, grads, losses, metrics


def check_weighting(case, cfg, results):
    """Per-step values bit for bit; summed losses, gradients and metrics to fp32 rounding."""
    for layout in WEIGHTING_LAYOUTS:
        ref = run_weighting(cfg, layout, list(range(BATCH)), None, sizes=(BATCH,))  # 1 process, 1 micro-batch
        ref_loss, ref_grad, ref_metrics = ref[BATCH]
        values, grads, losses, metrics = _combine_weighting(results[layout])
        for control, vals in ref["values"].items():
            for key, want in vals.items():
                got = values[(control, key)]
                if isinstance(want, torch.Tensor):
                    assert torch.equal(got, want), f"{case} {layout}: {control}.{key} differs from 1 process"
                else:
                    assert got == {want}, f"{case} {layout}: {control}.{key} = {got} on the ranks, {want} alone"
        for mbs in W_MICRO_BATCH_SIZES:
            assert abs(losses[mbs] - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss)), (case, layout, mbs)
            torch.testing.assert_close(grads[mbs], ref_grad, rtol=1e-5, atol=1e-7)
            assert set(metrics[mbs]) == set(ref_metrics)
            for key, want in ref_metrics.items():
                assert abs(metrics[mbs][key] - want) <= 1e-5 * max(1.0, abs(want)), (case, layout, mbs, key)
        if "top_entropy" in ref["values"]:
            mask = weighting_batch(layout == "dp4_empty_rank")[3]
            assert 0 < ref["values"]["top_entropy"]["num_kept"] < int(mask.sum())


WEIGHTING_LAYOUTS = ("dp4", "dp4_empty_rank")

# ---- entropy: the entropy-driven controls ----------------------------------------------------------------------

E_LENGTH, VOCAB, WIDTH = 8, 11, 12  # VOCAB padded to WIDTH for TP 2 (shards of 6; the last column is pad)
E_STEPS = 2  # the second plan depends on the state the first step left
E_MICRO_BATCH_SIZES = (1, 2, 8)


def entropy_step_data(t):
    data = entropy_controls.step_batch(seed=700 + t, batch=BATCH, length=E_LENGTH, vocab=VOCAB,
                                       scale=2.0 + t)  # entropy falls
    data["mask"][list(EMPTY)] = False
    return data


def run_entropy(cfg_dict, layout_name, samples, groups, tp_group=None, tp_rank=0):
    """The optimizer steps of one rank: plan over the step across the token group, micro-batched losses for
    every micro-batch size (same plan), one update per step."""
    cfg = loss_config(cfg_dict)
    controls = ControlSet(cfg)
    rows = torch.tensor(samples, dtype=torch.long)
    tp = tp_group is not None
    shard = slice(tp_rank * (WIDTH // 2), (tp_rank + 1) * (WIDTH // 2)) if tp else slice(None)
    out = {"samples": samples, "steps": []}
    for t in range(E_STEPS):
        data = entropy_step_data(t)
        if tp:  # pad the vocabulary as Megatron does; the padding must not count
            pad = torch.full((BATCH, E_LENGTH, WIDTH - VOCAB), 30.0, dtype=data["logits"].dtype)
            data["logits"] = torch.cat([data["logits"], pad], -1)
        plan = entropy_controls.plan_step(cfg, data, step=t, controls=controls, groups=groups, rows=rows)
        record = {"plan": {name: {k: v for k, v in vals.items() if not isinstance(v, torch.Tensor)}
                           for name, vals in plan.values.items()}}
        for mbs in E_MICRO_BATCH_SIZES:
            loss, grad, _ = entropy_controls.our_loss(cfg, data, plan, controls, micro_batch=mbs, rows=rows,
                                                      tp_group=tp_group, vocab_start=shard.start or 0,
                                                      vocab_size=VOCAB, shard=shard)
            record[mbs] = (loss, grad)
        controls.update(plan)
        controls.end_rollout()
        record["state"] = controls.state_dict()
        out["steps"].append(record)
    return out


def check_entropy(name, cfg, results):
    """Plans and states bit for bit on every rank; losses and logit gradients over each replica set."""
    control = next(iter(loss_config(cfg).active_controls))
    ref = run_entropy(cfg, "reference", list(range(BATCH)), None)
    assert ref["steps"][-1]["state"] or control == "entropy_bonus"
    if control != "entropy_bonus":  # the controllers must move between steps for the test to mean anything
        assert len({str(s["plan"][control]) for s in ref["steps"]}) == E_STEPS
    assert results["dp4_empty_rank"][3]["samples"] == list(EMPTY)
    checked = 0
    for layout, sets in REPLICA_SETS.items():
        for rank in range(4):  # whole-step quantities and states: bit for bit on every rank
            mine = results[layout][rank]
            for t in range(E_STEPS):
                assert mine["steps"][t]["plan"] == ref["steps"][t]["plan"], (layout, name, rank, t)
                assert mine["steps"][t]["state"] == ref["steps"][t]["state"], (layout, name, rank, t)
        for ranks in sets:  # losses and gradients: summed / assembled over the replica set
            for t in range(E_STEPS):
                for mbs in E_MICRO_BATCH_SIZES:
                    ref_loss, ref_grad = ref["steps"][t][mbs]
                    loss, grad = 0.0, torch.zeros(BATCH, E_LENGTH, WIDTH, dtype=torch.float64)
                    for r in ranks:
                        out = results[layout][r]
                        part_loss, part_grad = out["steps"][t][mbs]
                        loss += part_loss
                        idx = torch.tensor(out["samples"], dtype=torch.long)
                        if layout == "dp2xtp2":  # rank r holds vocabulary half r % 2; its TP pair the other
                            half = WIDTH // 2
                            partner = results[layout][r ^ 1]["steps"][t][mbs]
                            assert partner[0] == part_loss  # TP replicas compute the same loss
                            grad[idx, :, (r % 2) * half:(r % 2 + 1) * half] = part_grad
                            grad[idx, :, (1 - r % 2) * half:(2 - r % 2) * half] = partner[1]
                        else:
                            grad[idx, :, :VOCAB] = part_grad
                    assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss)), (layout, name, t, mbs)
                    torch.testing.assert_close(grad[..., :VOCAB], ref_grad, rtol=1e-4, atol=1e-7)
                    assert bool((grad[..., VOCAB:] == 0).all())
                    checked += 1
    assert checked == sum(len(s) for s in REPLICA_SETS.values()) * E_STEPS * len(E_MICRO_BATCH_SIZES)


# ---- the harness: one spawn, every case ------------------------------------------------------------------------

KINDS = {  # kind of case: (runner on one rank, the layouts it runs in, the check against one process)
    "covariance": (run_covariance, tuple(REPLICA_SETS), check_covariance),
    "weighting": (run_weighting, WEIGHTING_LAYOUTS, check_weighting),
    "entropy": (run_entropy, tuple(REPLICA_SETS), check_entropy),
}


def _scenario(rank, world_size):
    """Every case of every control in every layout of its kind, on this rank, plus the NaN check."""
    torch.set_num_threads(1)
    layouts = _layouts(rank, world_size)
    results = {}
    for control, (kind, cases) in CASES.items():
        run, layout_names, _ = KINDS[kind]
        for case, cfg in cases.items():
            for name in layout_names:
                lay = layouts[name]
                results[(control, case, name)] = run(cfg, name, lay.samples, lay.groups, lay.tp_group, lay.tp_rank)
    results["nan"] = _nan_advantage(rank)
    return results


@pytest.fixture(scope="module")
def per_rank():
    return run_distributed(4, _scenario)


def test_every_registered_control_has_layout_cases():
    assert set(CASES) == set(REGISTRY), "every registered control needs its layout cases here (and only those)"
    for control, (kind, cases) in CASES.items():
        assert kind in KINDS and cases, control
        for cfg in cases.values():
            assert control in loss_config(cfg).active_controls, (control, cfg)


@pytest.mark.parametrize("control", list(REGISTRY))
def test_control_does_not_depend_on_the_layout(control, per_rank):
    kind, cases = CASES[control]
    _, layout_names, check = KINDS[kind]
    for case, cfg in cases.items():
        check(case, cfg, {name: [r[(control, case, name)] for r in per_rank] for name in layout_names})


def test_a_nan_advantage_on_one_rank_raises_on_every_rank(per_rank):
    for out in per_rank:  # every rank raises the same error, naming the rank with the NaN
        for key in ("nan", "nan_loss"):
            message = out["nan"][key]
            assert message is not None and "advantages have NaN or inf" in message and "rank(s) [2]" in message
