"""Driver-side and in-worker batch selection give identical masks (gloo, DP 2 x TP 2 x PP 2 = 8 processes).

The driver selects over each optimizer step of the whole rollout batch in one process. The workers get
NeMo-RL's shards (``shard_by_batch_size``: each step's chunk of ``train_global_batch_size`` samples split
over DP ranks, here also shuffled within the rank as packing / dynamic batching may do) and select over the
token group: the DP ranks of the last pipeline stage (Megatron rank order: TP fastest, then DP, then PP).
TP replicas must agree, first-stage ranks must stay out of the collectives, and the union over DP ranks must
be bit-identical to the driver's mask. The adapter's in-worker mode (no mask attached, one micro-batch per
optimizer step per rank) must give the same loss as the driver mode.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from nemo_entropy.config import loss_config
from nemo_entropy.integrations import EntropyControlLossFn, attach_step_plans, plan_in_worker
from nemo_entropy.parallel import ParallelGroups
from nemo_entropy.integrations.batch_keys import plan_from_batch
from tests.support.distributed import run_distributed

TP, DP, PP = 2, 2, 2
BATCH, LENGTH, GBS = 16, 24, 8  # 2 optimizer steps of 8 samples; each DP rank holds 4 samples per step
CONFIGS = {
    "kl_cov": {"method": "kl_cov", "kl_cov_ratio": 0.03, "reference_policy_kl_penalty": 0.0},
    "clip_cov": {"method": "clip_cov", "clip_cov_ratio": 0.05, "clip_cov_lb": 0.0, "clip_cov_ub": 5.0,
                 "reference_policy_kl_penalty": 0.0, "seed": 3},
}


def _rollout_batch() -> dict:
    gen = torch.Generator().manual_seed(11)
    lengths = torch.randint(4, LENGTH + 1, (BATCH,), generator=gen)
    token_mask = (torch.arange(LENGTH)[None] < lengths[:, None]).float()
    token_mask[:, :2] = 0  # prompt
    sample_mask = torch.ones(BATCH)
    sample_mask[5] = 0
    adv = torch.randn(BATCH, 1, generator=gen).expand(BATCH, LENGTH).clone()
    prev = -torch.rand(BATCH, LENGTH, generator=gen) * 4
    # exact ties in the scores (same log-prob and advantage) exercise the uid tie-break across ranks
    prev[3, 4:8] = prev[3, 4]
    return {"token_mask": token_mask, "sample_mask": sample_mask, "advantages": adv, "prev_logprobs": prev,
            "generation_logprobs": prev.clone()}


def _worker_rows(step: int, dp_rank: int) -> torch.Tensor:
    """NeMo-RL's shard of optimizer step ``step`` on DP rank ``dp_rank``, shuffled within the rank."""
    per_rank = GBS // DP
    rows = torch.arange(step * GBS + dp_rank * per_rank, step * GBS + (dp_rank + 1) * per_rank)
    return rows[torch.randperm(per_rank, generator=torch.Generator().manual_seed(step * 10 + dp_rank))]


def _stand_in_groups(rank: int) -> ParallelGroups:
    """Megatron's order: rank = tp + TP * (dp + DP * pp). Every rank creates every group, in order."""
    def rank_of(tp, dp, pp):
        return tp + TP * (dp + DP * pp)

    tp_r, dp_r, pp_r = rank % TP, (rank // TP) % DP, rank // (TP * DP)
    groups = {}
    for pp in range(PP):
        for dp in range(DP):
            groups[("tp", dp, pp)] = dist.new_group([rank_of(t, dp, pp) for t in range(TP)])
        for tp in range(TP):
            groups[("dp", tp, pp)] = dist.new_group([rank_of(tp, d, pp) for d in range(DP)])
    for dp in range(DP):
        for tp in range(TP):
            groups[("pp", tp, dp)] = dist.new_group([rank_of(tp, dp, p) for p in range(PP)])
    return ParallelGroups.from_groups(groups[("dp", tp_r, pp_r)], groups[("tp", dp_r, pp_r)],
                                      is_last_pp_stage=pp_r == PP - 1, pp_group=groups[("pp", tp_r, dp_r)])


def _in_worker_scenario(rank: int, world_size: int) -> dict:
    groups = _stand_in_groups(rank)
    dp_rank = (rank // TP) % DP
    out = {"last_stage": groups.is_last_pp_stage, "masks": {}, "losses": {}}
    for name, cfg in CONFIGS.items():
        config = loss_config(cfg)
        data = _rollout_batch()
        # worker mode on the driver: only uids and steps travel with the data
        attach_step_plans(data, config, train_global_batch_size=GBS, first_step=100, attach_plans=False)
        adapter = EntropyControlLossFn(cfg, groups=groups, plan="worker")
        for step in range(BATCH // GBS):
            rows = _worker_rows(step, dp_rank)
            local = {k: v[rows] for k, v in data.items()}
            plan = plan_in_worker(config, local, groups=groups)
            if plan is None:
                assert not groups.is_last_pp_stage
                continue
            selected = plan.selected
            out["masks"][(name, step)] = (rows, selected)
            # The adapter's own in-worker mode: one call holds this rank's whole share of the step.
            mask = local["token_mask"][:, 1:] * local["sample_mask"][:, None]
            gvt = groups.token_all_reduce_sum(mask.sum().reshape(1))[0]
            gvs = groups.token_all_reduce_sum(local["sample_mask"].sum().reshape(1))[0]
            curr = local["prev_logprobs"][:, 1:] + 0.1
            loss, _ = adapter(data=local, global_valid_seqs=gvs, global_valid_toks=gvt, next_token_logprobs=curr)
            out["losses"][(name, step)] = float(loss)
    return out


def test_driver_and_in_worker_selection_are_identical():
    results = run_distributed(TP * DP * PP, _in_worker_scenario)
    assert [r["last_stage"] for r in results] == [False] * 4 + [True] * 4
    for name, cfg in CONFIGS.items():
        config = loss_config(cfg)
        driver = _rollout_batch()
        attach_step_plans(driver, config, train_global_batch_size=GBS, first_step=100)
        driver_mask = plan_from_batch(driver, global_valid_tokens=1, global_valid_seqs=1).selected
        assert driver_mask.sum() >= 4, "the test needs a non-trivial selection"
        for step in range(BATCH // GBS):
            rebuilt = torch.zeros(GBS, LENGTH - 1, dtype=torch.bool)
            for rank in range(4, 8):  # the last stage
                rows, mask = results[rank]["masks"][(name, step)]
                replica = results[rank ^ 1]["masks"][(name, step)]  # the TP partner
                assert torch.equal(replica[1], mask) and torch.equal(replica[0], rows)
                rebuilt[rows - step * GBS] = mask
            assert torch.equal(rebuilt, driver_mask[step * GBS:(step + 1) * GBS]), (name, step)
            # The adapter in driver mode (mask attached) on the same shards gives the same loss.
            adapter = EntropyControlLossFn(cfg)
            mask_all = driver["token_mask"][:, 1:] * driver["sample_mask"][:, None]
            rows_step = slice(step * GBS, (step + 1) * GBS)
            gvt = mask_all[rows_step].sum()
            gvs = driver["sample_mask"][rows_step].sum()
            for dp_rank in range(DP):
                rows = _worker_rows(step, dp_rank)
                local = {k: v[rows] for k, v in driver.items()}
                loss, _ = adapter(data=local, global_valid_seqs=gvs, global_valid_toks=gvt,
                                  next_token_logprobs=local["prev_logprobs"][:, 1:] + 0.1)
                worker_rank = 4 + TP * dp_rank
                assert float(loss) == results[worker_rank]["losses"][(name, step)], (name, step, dp_rank)
