"""nemo_entropy.parallel: groups from megatron-core's parallel_state, and argument normalisation."""

import pytest
import torch
import torch.distributed as dist

from nemo_entropy.config import loss_config
from nemo_entropy.parallel import ParallelGroups, as_groups, as_tp_group
from nemo_entropy.selection import select_tokens, token_uids_for

from .support.distributed import run_distributed_many

BATCH, LENGTH = 8, 32


def _data():
    gen = torch.Generator().manual_seed(7)
    lp = -torch.rand(BATCH, LENGTH, generator=gen) * 3
    adv = torch.randn(BATCH, 1, generator=gen).expand(BATCH, LENGTH).contiguous()
    mask = torch.rand(BATCH, LENGTH, generator=gen) > 0.3
    return lp, adv, mask, token_uids_for(torch.arange(BATCH), LENGTH)


def _megatron_scenario(rank, world_size, tp, pp):
    pytest.importorskip("megatron.core")
    from megatron.core import parallel_state as ps

    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    try:
        groups = ParallelGroups.from_megatron()
        dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        out = dict(dp_size=dp_size, token_world=groups.token_world_size, tp_world=groups.tp_world_size,
                   tp_rank=groups.tp_rank, last=groups.is_last_pp_stage, dp_rank=dp_rank)
        if groups.is_last_pp_stage:  # the loss lives on the last stage only, like Megatron's loss closure
            lp, adv, mask, uids = _data()
            mine = slice(dp_rank * BATCH // dp_size, (dp_rank + 1) * BATCH // dp_size)
            cfg = loss_config({"method": "kl_cov", "kl_cov_ratio": 0.05})
            out["selected"] = select_tokens(cfg, lp[mine], adv[mine], mask[mine], token_uids=uids[mine], step=0,
                                            groups=groups)
            out["rows"] = (mine.start, mine.stop)
        return out
    finally:
        ps.destroy_model_parallel()


LAYOUTS = [(2, 1), (1, 2)]


@pytest.fixture(scope="module")
def megatron_results():
    pytest.importorskip("megatron.core")
    # One spawn for both layouts: importing megatron-core in 4 processes costs seconds.
    return dict(zip(LAYOUTS, run_distributed_many(4, [(_megatron_scenario, layout) for layout in LAYOUTS])))


@pytest.mark.parametrize("tp, pp", LAYOUTS)
def test_groups_from_megatron_parallel_state_select_like_one_process(megatron_results, tp, pp):
    results = megatron_results[(tp, pp)]
    lp, adv, mask, uids = _data()
    cfg = loss_config({"method": "kl_cov", "kl_cov_ratio": 0.05})
    expected = select_tokens(cfg, lp, adv, mask, token_uids=uids, step=0)
    dp = 4 // (tp * pp)
    for out in results:
        assert out["dp_size"] == dp and out["token_world"] == dp and out["tp_world"] == tp
    last_stage = [out for out in results if out["last"]]
    assert len(last_stage) == 4 // pp
    for out in last_stage:
        lo, hi = out["rows"]
        assert torch.equal(out["selected"], expected[lo:hi])


def test_as_groups_and_as_tp_group_normalise_arguments():
    assert as_groups(None).token_group is None and as_groups(None).token_world_size == 1
    groups = ParallelGroups.single()
    assert as_groups(groups) is groups
    assert as_tp_group(None) is None and as_tp_group(groups) is None
    with pytest.raises(TypeError, match="groups must be None"):
        as_groups("dp")
    with pytest.raises(TypeError, match="the TP group"):
        as_tp_group(3)


def test_from_megatron_needs_initialised_state():
    pytest.importorskip("megatron.core")
    if dist.is_initialized():
        pytest.skip("a default process group exists in this process")
    with pytest.raises(RuntimeError, match="initialize_model_parallel"):
        ParallelGroups.from_megatron()
