"""Layout invariance: the same global batch over 1, 2 and 4 gloo processes, micro-batch sizes 1, 2 and 8, TP
replicas, and a rank with no valid token gives bit-identical selections and the same losses and gradients.

All layouts run inside ONE spawn of 4 processes (spawning costs seconds): sub-groups carve out the 2-rank
layouts, and the single-process result is computed in the parent.
"""

import torch
import torch.distributed as dist

from nemo_entropy.config import loss_config
from nemo_entropy.losses import policy_loss
from nemo_entropy.parallel import ParallelGroups
from nemo_entropy.plan import StepInputs, build_step_plan
from nemo_entropy.selection import select_tokens, token_uids_for

from .support.distributed import run_distributed

BATCH, LENGTH = 16, 48
CONFIGS = [
    dict(method="kl_cov", kl_cov_ratio=2e-3),  # k = 1: the case the reference gets most wrong
    dict(method="kl_cov", kl_cov_ratio=0.05),
    dict(method="clip_cov", clip_cov_ratio=0.02, clip_cov_lb=0.0, clip_cov_ub=5.0),
    dict(method="clip_cov", clip_cov_ratio=0.3, clip_cov_lb=-0.2, clip_cov_ub=5.0),  # more quota than candidates
]
MICRO_BATCH_SIZES = (1, 2, 8)
STEP = 17


def global_batch(empty_samples=()):
    gen = torch.Generator().manual_seed(2024)
    old = -torch.rand(BATCH, LENGTH, generator=gen) * 4
    cur = old + 0.2 * torch.randn(BATCH, LENGTH, generator=gen)
    adv = torch.randn(BATCH, 1, generator=gen).expand(BATCH, LENGTH).contiguous()
    # Ties on purpose: several samples share the same advantage and log-probs on some positions.
    adv[5] = adv[4]
    old[5, :10] = old[4, :10]
    mask = torch.rand(BATCH, LENGTH, generator=gen) > 0.2
    for s in empty_samples:
        mask[s] = False
    uids = token_uids_for(torch.arange(BATCH), LENGTH)
    return cur, old, adv, mask, uids


def run_layout(cur, old, adv, mask, uids, samples, groups, cfg_dict):
    """What one rank computes for its samples: the selection over the step, then micro-batched losses."""
    cfg = loss_config(cfg_dict)
    idx = torch.tensor(samples, dtype=torch.long)
    c, o, a, m, u = (t[idx] for t in (cur, old, adv, mask, uids))
    selected = select_tokens(cfg, o, a, m, token_uids=u, step=STEP, groups=groups)
    plan = build_step_plan(cfg, StepInputs(o, a, m, u), step=STEP, groups=groups)
    out = {"samples": samples, "selected": selected}
    for mbs in MICRO_BATCH_SIZES:
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


def _layouts(rank, world_size):
    """Every layout, as (name, samples of this rank, groups). Every rank creates every group, in order."""
    assert world_size == 4
    pair_a, pair_b = dist.new_group([0, 1]), dist.new_group([2, 3])
    tp_token_0, tp_token_1 = dist.new_group([0, 2]), dist.new_group([1, 3])
    strided = list(range(rank, BATCH, 4))  # DP=4, interleaved samples
    dp2_pairs = list(range(rank % 2 * 8, rank % 2 * 8 + 8))  # DP=2 inside {0,1} and {2,3}: replicas of each other
    dp2_tp2 = list(range(rank // 2 * 8, rank // 2 * 8 + 8))  # token groups {0,2},{1,3}; ranks 0,1 are TP replicas
    return [
        ("dp4", strided, ParallelGroups.from_groups(dist.group.WORLD)),
        ("dp2", dp2_pairs, ParallelGroups.from_groups(pair_a if rank < 2 else pair_b)),
        ("dp2xtp2", dp2_tp2, ParallelGroups.from_groups(tp_token_0 if rank % 2 == 0 else tp_token_1)),
        # Rank 3 holds only samples whose tokens are all masked: it must still take part.
        ("dp4_empty_rank", [0, 4, 8, 12] if rank == 3 else [s for s in range(BATCH) if s % 4 != 0][rank::3],
         ParallelGroups.from_groups(dist.group.WORLD)),
    ]


def _scenario(rank, world_size):
    torch.set_num_threads(1)
    results = {}
    for name, samples, groups in _layouts(rank, world_size):
        data = global_batch(empty_samples=(0, 4, 8, 12) if name == "dp4_empty_rank" else ())
        for i, cfg in enumerate(CONFIGS):
            results[(name, i)] = run_layout(*data, samples, groups, cfg)
    # A NaN advantage on one rank: every rank raises together (no rank left waiting in a collective).
    cur, old, adv, mask, uids = global_batch()
    mine = list(range(rank, BATCH, 4))
    adv = adv.clone()
    if rank == 2:
        adv[mine[1], mask[mine[1]].nonzero()[0, 0]] = float("nan")
    try:
        select_tokens(loss_config(CONFIGS[0]), old[mine], adv[mine], mask[mine], token_uids=uids[mine], step=0,
                      groups=dist.group.WORLD)
        results["nan"] = None
    except ValueError as err:
        results["nan"] = str(err)
    # The same in policy_loss when it has to compute counts and the selection itself: all ranks raise.
    try:
        policy_loss(loss_config(CONFIGS[0]), cur[mine], old[mine], adv[mine], mask[mine], token_uids=uids[mine],
                    groups=dist.group.WORLD)
        results["nan_loss"] = None
    except ValueError as err:
        results["nan_loss"] = str(err)
    return results


def _reference(empty_samples, cfg):
    data = global_batch(empty_samples)
    return run_layout(*data, list(range(BATCH)), ParallelGroups.single(), cfg)


def _assemble(per_rank, ranks):
    """Scatter the per-rank tensors of one replica set back to global sample order."""
    selected = torch.zeros(BATCH, LENGTH, dtype=torch.bool)
    grads = {mbs: torch.zeros(BATCH, LENGTH) for mbs in MICRO_BATCH_SIZES}
    losses = {mbs: 0.0 for mbs in MICRO_BATCH_SIZES}
    for r in ranks:
        out = per_rank[r]
        idx = torch.tensor(out["samples"], dtype=torch.long)
        selected[idx] = out["selected"]
        for mbs in MICRO_BATCH_SIZES:
            grads[mbs][idx] = out[f"grad_mbs{mbs}"]
            losses[mbs] += out[f"loss_mbs{mbs}"]
    return selected, grads, losses


def test_selection_and_loss_do_not_depend_on_the_layout():
    per_rank = run_distributed(4, _scenario)
    replica_sets = {"dp4": [[0, 1, 2, 3]], "dp2": [[0, 1], [2, 3]], "dp2xtp2": [[0, 2], [1, 3]],
                    "dp4_empty_rank": [[0, 1, 2, 3]]}
    checked = 0
    for name, sets in replica_sets.items():
        empty = (0, 4, 8, 12) if name == "dp4_empty_rank" else ()
        for i, cfg in enumerate(CONFIGS):
            ref = _reference(empty, cfg)
            ref_grad = {mbs: ref[f"grad_mbs{mbs}"] for mbs in MICRO_BATCH_SIZES}
            assert int(ref["selected"].sum()) > 0
            for ranks in sets:
                selected, grads, losses = _assemble([r[(name, i)] for r in per_rank], ranks)
                assert torch.equal(selected, ref["selected"]), f"{name} {cfg}: selection differs from 1 process"
                for mbs in MICRO_BATCH_SIZES:
                    assert abs(losses[mbs] - ref[f"loss_mbs{mbs}"]) <= 1e-5 * max(1.0, abs(ref[f"loss_mbs{mbs}"]))
                    torch.testing.assert_close(grads[mbs], ref_grad[mbs], rtol=1e-5, atol=1e-7)
                    checked += 1
    assert checked == sum(len(s) for s in replica_sets.values()) * len(CONFIGS) * len(MICRO_BATCH_SIZES)
    for out in per_rank:  # every rank raises the same error, naming the rank with the NaN
        for key in ("nan", "nan_loss"):
            assert out[key] is not None and "advantages have NaN or inf" in out[key] and "rank(s) [2]" in out[key]
    # TP replicas (ranks 0 and 1 in dp2xtp2) hold the same tokens and must agree bit for bit.
    for i in range(len(CONFIGS)):
        assert torch.equal(per_rank[0][("dp2xtp2", i)]["selected"], per_rank[1][("dp2xtp2", i)]["selected"])
