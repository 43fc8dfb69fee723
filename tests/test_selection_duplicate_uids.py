"""Issue 17, case 10: repeated token uids (e.g. sample ids that restart at 0 on every rank) never break a quota.

Uids are documented as unique over the token group; when they are not, the selection must still hold exactly
``k = max(1, floor(ratio * N))`` tokens (fewer only when fewer are eligible), in one process and over ranks.
"""

from __future__ import annotations

import pytest
import torch

from nemo_entropy.config import loss_config
from nemo_entropy.exact import distributed_top_k, selection_quota
from nemo_entropy.selection import select_tokens

from .support.distributed import run_distributed

CLIP_COV = {"method": "clip_cov", "clip_cov_ratio": 0.05, "clip_cov_lb": -100, "clip_cov_ub": 100}
KL_COV = {"method": "kl_cov", "kl_cov_ratio": 0.05}


def _batch(seed: int, rows: int = 4, length: int = 16):
    gen = torch.Generator().manual_seed(seed)
    # Two log-prob values only: many tokens share a covariance score, so KL-Cov's top-k meets ties too.
    old = -torch.randint(1, 3, (rows, length), generator=gen).float()
    adv = torch.randn(rows, 1, generator=gen).expand(rows, length).contiguous()
    mask = torch.ones(rows, length, dtype=torch.bool)
    return old, adv, mask


@pytest.mark.parametrize("section", [CLIP_COV, KL_COV], ids=["clip_cov", "kl_cov"])
@pytest.mark.parametrize("uids", ["zeros", "per_row_restart", "two_values"])
def test_repeated_uids_select_exactly_the_quota(section, uids):
    old, adv, mask = _batch(0)
    rows, length = mask.shape
    token_uids = {
        "zeros": torch.zeros(rows, length, dtype=torch.long),
        "per_row_restart": torch.arange(length).repeat(rows, 1),
        "two_values": (torch.arange(rows * length) % 2).reshape(rows, length),
    }[uids]
    selected = select_tokens(loss_config(section), old, adv, mask, token_uids=token_uids, step=1)
    assert int(selected.sum()) == selection_quota(0.05, rows * length) == 3


def test_top_k_with_one_uid_everywhere_takes_the_first_k_positions_in_order():
    priority = torch.zeros(3, 5)
    uids = torch.zeros(3, 5, dtype=torch.long)
    eligible = torch.ones(3, 5, dtype=torch.bool)
    eligible[0, 1] = False
    mask, count = distributed_top_k(priority, uids, eligible, 4)
    assert count == 4
    assert mask.reshape(-1).nonzero().reshape(-1).tolist() == [0, 2, 3, 4]


def _restarting_uids(rank, world_size, section):
    old, adv, mask = _batch(100 + rank)
    rows, length = mask.shape
    token_uids = torch.arange(rows * length).reshape(rows, length)  # restarts at 0 on every rank
    selected = select_tokens(loss_config(section), old, adv, mask, token_uids=token_uids, step=3,
                             groups=torch.distributed.group.WORLD)
    return int(selected.sum())


def test_uids_restarting_on_every_rank_keep_the_global_quota():
    # Equal uids on both ranks give equal Clip-Cov hash keys: the tied pairs straddle an odd quota.
    counts = run_distributed(2, _restarting_uids, {**CLIP_COV, "clip_cov_ratio": 0.04})
    assert sum(counts) == selection_quota(0.04, 2 * 4 * 16) == 5
