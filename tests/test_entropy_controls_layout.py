"""Layout invariance of the entropy-driven controls (entropy_bonus, adaptive_entropy, aent, entropy_pi): the same
two optimizer steps over 1 process and over 4 gloo processes (DP 4, DP 2 replicas, DP 2 x TP 2 with the logits'
vocabulary sharded, DP 4 with a rank holding no valid token), micro-batch sizes 1, 2 and 8, give bit-identical
whole-step quantities (the step's mean old entropy, the coefficients and control signals in the plan, the state
after every step) and the same losses and logit gradients (the entropy's and the clamped entropy's gradients
included) to fp32 rounding.

One spawn of 4 processes runs every layout and control (sub-groups carve out the 2-rank layouts); the
single-process reference runs in the parent.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nemo_entropy.config import loss_config
from nemo_entropy.controls import ControlSet
from nemo_entropy.parallel import ParallelGroups

from .distributed import run_distributed
from .entropy_controls import our_loss, plan_step, step_batch

BATCH, LENGTH, VOCAB, WIDTH = 16, 8, 11, 12  # VOCAB padded to WIDTH for TP 2 (shards of 6; the last column is pad)
STEPS = 2  # the second plan depends on the state the first step left
MICRO_BATCH_SIZES = (1, 2, 8)
EMPTY = (0, 4, 8, 12)  # samples without a valid token (rank 3 holds exactly these in dp4_empty_rank)
CONFIGS = {
    "entropy_bonus": {"method": "entropy_bonus", "entropy_coef": 0.3},
    "adaptive_entropy": {"method": "adaptive_entropy", "entropy_coef": 0.2, "entropy_target": 1.2,
                         "entropy_coef_delta": 0.05},
    "aent": {"method": "aent", "aent_coef": 0.2, "aent_clamp": 0.3, "aent_entropy_low": 1.1, "aent_entropy_high": 1.3,
             "aent_coef_lr": 0.1, "aent_coef_box_high": 0.5},
    "entropy_pi": {"method": "entropy_pi", "entropy_pi_target": 1.2, "entropy_pi_ki": 0.5,
                   "entropy_pi_prob_threshold": 0.3},
}


def step_data(t):
    data = step_batch(seed=700 + t, batch=BATCH, length=LENGTH, vocab=VOCAB, scale=2.0 + t)  # entropy falls
    data["mask"][list(EMPTY)] = False
    return data


def run_layout(cfg_dict, samples, groups, tp_group=None, tp_rank=0):
    """The optimizer steps of one rank: plan over the step across the token group, micro-batched losses for
    every micro-batch size (same plan), one update per step."""
    cfg = loss_config(cfg_dict)
    controls = ControlSet(cfg)
    rows = torch.tensor(samples, dtype=torch.long)
    tp = tp_group is not None
    shard = slice(tp_rank * (WIDTH // 2), (tp_rank + 1) * (WIDTH // 2)) if tp else slice(None)
    out = {"samples": samples, "steps": []}
    for t in range(STEPS):
        data = step_data(t)
        if tp:  # pad the vocabulary as Megatron does; the padding must not count
            pad = torch.full((BATCH, LENGTH, WIDTH - VOCAB), 30.0, dtype=data["logits"].dtype)
            data["logits"] = torch.cat([data["logits"], pad], -1)
        plan = plan_step(cfg, data, step=t, controls=controls, groups=groups, rows=rows)
        record = {"plan": {name: {k: v for k, v in vals.items() if not isinstance(v, torch.Tensor)}
                           for name, vals in plan.values.items()}}
        for mbs in MICRO_BATCH_SIZES:
            loss, grad, _ = our_loss(cfg, data, plan, controls, micro_batch=mbs, rows=rows, tp_group=tp_group,
                                     vocab_start=shard.start or 0, vocab_size=VOCAB, shard=shard)
            record[mbs] = (loss, grad)
        controls.update(plan)
        controls.end_rollout()
        record["state"] = controls.state_dict()
        out["steps"].append(record)
    return out


def _layouts(rank):
    """(name, samples of this rank, token groups, TP group, TP rank); every rank creates every group, in order."""
    pair_a, pair_b = dist.new_group([0, 1]), dist.new_group([2, 3])
    tokens_0, tokens_1 = dist.new_group([0, 2]), dist.new_group([1, 3])
    world = ParallelGroups.from_groups(dist.group.WORLD)
    pair = pair_a if rank < 2 else pair_b
    dp_rank, tp_rank = rank // 2, rank % 2  # DP 2 x TP 2: ranks {0, 1} and {2, 3} are TP pairs
    others = [s for s in range(BATCH) if s not in EMPTY]
    return [
        ("dp4", list(range(rank, BATCH, 4)), world, None, 0),
        ("dp2", list(range(rank % 2 * 8, rank % 2 * 8 + 8)), ParallelGroups.from_groups(pair), None, 0),
        ("dp2xtp2", list(range(dp_rank * 8, dp_rank * 8 + 8)),
         ParallelGroups.from_groups(tokens_0 if tp_rank == 0 else tokens_1), pair, tp_rank),
        ("dp4_empty_rank", list(EMPTY) if rank == 3 else others[rank::3], world, None, 0),
    ]


def _scenario(rank, world_size):
    torch.set_num_threads(1)
    return {(layout, name): run_layout(cfg, samples, groups, tp_group, tp_rank)
            for layout, samples, groups, tp_group, tp_rank in _layouts(rank) for name, cfg in CONFIGS.items()}


REPLICA_SETS = {  # the ranks whose samples together form the batch once (and their vocabulary shards)
    "dp4": [[0, 1, 2, 3]], "dp2": [[0, 1], [2, 3]], "dp2xtp2": [[0, 2], [1, 3]], "dp4_empty_rank": [[0, 1, 2, 3]],
}


def test_entropy_controls_do_not_depend_on_the_layout():
    per_rank = run_distributed(4, _scenario)
    assert per_rank[3][("dp4_empty_rank", "aent")]["samples"] == list(EMPTY)
    checked = 0
    for name, cfg in CONFIGS.items():
        ref = run_layout(cfg, list(range(BATCH)), None)
        assert ref["steps"][-1]["state"] or name == "entropy_bonus"
        if name != "entropy_bonus":  # the controllers must move between steps for the test to mean anything
            assert len({str(s["plan"][name]) for s in ref["steps"]}) == STEPS
        for layout, sets in REPLICA_SETS.items():
            for rank in range(4):  # whole-step quantities and states: bit for bit on every rank
                mine = per_rank[rank][(layout, name)]
                for t in range(STEPS):
                    assert mine["steps"][t]["plan"] == ref["steps"][t]["plan"], (layout, name, rank, t)
                    assert mine["steps"][t]["state"] == ref["steps"][t]["state"], (layout, name, rank, t)
            for ranks in sets:  # losses and gradients: summed / assembled over the replica set
                for t in range(STEPS):
                    for mbs in MICRO_BATCH_SIZES:
                        ref_loss, ref_grad = ref["steps"][t][mbs]
                        loss, grad = 0.0, torch.zeros(BATCH, LENGTH, WIDTH, dtype=torch.float64)
                        for r in ranks:
                            out = per_rank[r][(layout, name)]
                            part_loss, part_grad = out["steps"][t][mbs]
                            loss += part_loss
                            idx = torch.tensor(out["samples"], dtype=torch.long)
                            if layout == "dp2xtp2":  # rank r holds vocabulary half r % 2; its TP pair the other
                                half = WIDTH // 2
                                partner = per_rank[r ^ 1][(layout, name)]["steps"][t][mbs]
                                assert partner[0] == part_loss  # TP replicas compute the same loss
                                grad[idx, :, (r % 2) * half:(r % 2 + 1) * half] = part_grad
                                grad[idx, :, (1 - r % 2) * half:(2 - r % 2) * half] = partner[1]
                            else:
                                grad[idx, :, :VOCAB] = part_grad
                        assert abs(loss - ref_loss) <= 1e-5 * max(1.0, abs(ref_loss)), (layout, name, t, mbs)
                        torch.testing.assert_close(grad[..., :VOCAB], ref_grad, rtol=1e-4, atol=1e-7)
                        assert bool((grad[..., VOCAB:] == 0).all())
                        checked += 1
    assert checked == len(CONFIGS) * sum(len(s) for s in REPLICA_SETS.values()) * STEPS * len(MICRO_BATCH_SIZES)
