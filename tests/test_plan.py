"""The per-step plan (nemo_entropy.plan) and the review's correctness fixes of issue 10.

* The micro-batch loss with a plan issues no collective; the plan issues exactly one all-reduce plus one
  all-gather per top-k, counted on wrapped process-group calls (2 gloo processes).
* Masked positions holding -inf log-probs or NaN advantages give the same loss and gradient as clean padding.
* A rank with bad inputs makes every rank raise, in ``covariance_scores`` too (no rank left in a collective).
* Default token uids are unique over the group: Clip-Cov never exceeds its quota.
* Problem flags are counts: 8 failing ranks among 64..71 of a simulated 72-rank group are reported.
* The plan rides through NeMo-RL's batch keys and comes back bit-identical per micro-batch.
* Controls: the registry, composition rules and stateful controls' state round trip.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

from nemo_entropy.config import loss_config
from nemo_entropy.controls import REGISTRY, ControlSet
from nemo_entropy.losses import policy_loss
from nemo_entropy.parallel import ParallelGroups
from nemo_entropy.integrations.batch_keys import plan_from_batch, plan_to_batch
from nemo_entropy.plan import StepInputs, build_step_plan, default_token_uids
from nemo_entropy.exact import covariance_scores, exact_group_sums, selection_quota, token_uids_for

from .support.distributed import run_distributed_many

KL_COV = {"method": "kl_cov", "kl_cov_ratio": 0.05}
KL_COV_SHARED = {"method": "kl_cov", "kl_cov_ratio": 0.01}  # k within the diagnostics' top 2%: no own all-gather
CLIP_COV = {"method": "clip_cov", "clip_cov_ratio": 2e-4, "clip_cov_lb": -100.0, "clip_cov_ub": 100.0}


def _batch(seed=0, batch=8, length=24):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=gen) * 3
    cur = old + 0.1 * torch.randn(batch, length, generator=gen)
    adv = torch.randn(batch, 1, generator=gen).expand(batch, length).contiguous()
    mask = torch.rand(batch, length, generator=gen) > 0.3
    return cur, old, adv, mask, token_uids_for(torch.arange(batch), length)


# ----------------------------------------------------------------------------------------------- no collective
_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce_scatter", "barrier",
                "all_gather_object", "broadcast_object_list")


def _count_collectives(rank, world_size, cfg_dict):
    """Collective calls while planning one step, and while running its micro-batch losses."""
    calls = {"n": 0}
    originals = {name: getattr(dist, name) for name in _COLLECTIVES}

    def counting(fn):
        def wrapper(*args, **kwargs):
            calls["n"] += 1
            return fn(*args, **kwargs)
        return wrapper

    cur, old, adv, mask, uids = _batch(seed=3, batch=8)
    mine = slice(rank * 4, rank * 4 + 4)
    cfg = loss_config(cfg_dict)
    groups = ParallelGroups.from_groups(dist.group.WORLD)
    for name, fn in originals.items():
        setattr(dist, name, counting(fn))
    try:
        plan = build_step_plan(cfg, StepInputs(old[mine], adv[mine], mask[mine], uids[mine]), step=2, groups=groups)
        planning = calls["n"]
        x = cur[mine].clone().requires_grad_(True)
        for rows in (slice(0, 2), slice(2, 4)):
            loss, _ = policy_loss(cfg, x[rows], old[mine][rows], adv[mine][rows], mask[mine][rows],
                                  plan=plan.rows(rows), groups=groups, token_uids=uids[mine][rows])
            loss.backward()
        in_loss = calls["n"] - planning
    finally:
        for name, fn in originals.items():
            setattr(dist, name, fn)
    return planning, in_loss, plan.selected, dict(plan.values["diagnostics"])


def _nan_in_covariance_scores(rank, world_size):
    """Rank 1 holds a NaN advantage on a valid token: both ranks must raise, none may wait in the all-reduce."""
    _, old, adv, mask, _ = _batch(seed=4, batch=8)
    mine = slice(rank * 4, rank * 4 + 4)
    adv = adv.clone()
    if rank == 1:
        adv[4, int(mask[4].nonzero()[0, 0])] = float("nan")
    try:
        covariance_scores(old[mine], adv[mine], mask[mine], groups=dist.group.WORLD)
    except ValueError as err:
        return str(err)
    return None


def _default_uids_scenario(rank, world_size):
    """2 ranks x 2,000 valid tokens, Clip-Cov at 2e-4: quota max(1, floor(0.8)) = 1 over the group."""
    gen = torch.Generator().manual_seed(rank)
    old = -torch.rand(20, 100, generator=gen)
    adv = torch.randn(20, 1, generator=gen).expand(20, 100).contiguous()
    mask = torch.ones(20, 100, dtype=torch.bool)
    cfg = loss_config(CLIP_COV)
    cur = old.clone().requires_grad_(True)
    _, metrics = policy_loss(cfg, cur, old, adv, mask, groups=dist.group.WORLD)
    uids = default_token_uids(mask, dist.group.WORLD)
    return metrics["selected_fraction"] * 4000, uids


def _bad_shape_rank(rank, world_size):
    """policy_loss planning over its call (plan=None): token uids of the wrong shape on rank 0 only; both raise,
    none hangs."""
    cur, old, adv, mask, uids = _batch(seed=5, batch=8)
    mine = slice(rank * 4, rank * 4 + 4)
    uids = uids[mine] if rank else uids[mine][:, :-1]
    try:
        policy_loss(loss_config(KL_COV), cur[mine], old[mine], adv[mine], mask[mine], token_uids=uids,
                    groups=dist.group.WORLD)
    except ValueError as err:
        return str(err)
    return None


def test_distributed_plan_properties():
    results = run_distributed_many(2, [
        (_count_collectives, (KL_COV,)),
        (_count_collectives, (CLIP_COV,)),
        (_count_collectives, ({"method": "ppo"},)),
        (_count_collectives, (KL_COV_SHARED,)),
        (_nan_in_covariance_scores, ()),
        (_default_uids_scenario, ()),
        (_bad_shape_rank, ()),
    ])
    cur, old, adv, mask, uids = _batch(seed=3, batch=8)
    # one all-reduce, one all-gather for the covariance diagnostics, one all-gather per other top-k (KL-Cov's
    # top-k within the diagnostics' top 2% is read from theirs)
    expected = {0: 3, 1: 3, 2: 2, 3: 2}
    for index, cfg in enumerate((KL_COV, CLIP_COV, {"method": "ppo"}, KL_COV_SHARED)):
        job = results[index]
        for planning, in_loss, _, _ in job:
            assert in_loss == 0, f"{cfg}: the micro-batch loss issued {in_loss} collectives"
            assert planning == expected[index], f"{cfg}: {planning} collectives to plan the step"
        # and the 2-rank plan selects what one process selects, with the same diagnostics, bit for bit
        whole = build_step_plan(loss_config(cfg), StepInputs(old, adv, mask, uids), step=2)
        assert torch.equal(torch.cat([job[0][2], job[1][2]]), whole.selected)
        assert job[0][3] == job[1][3] == whole.values["diagnostics"]
        # and the diagnostics do not change the selection
        plain = build_step_plan(loss_config({**cfg, "covariance_diagnostics": False}),
                                StepInputs(old, adv, mask, uids), step=2)
        assert torch.equal(plain.selected, whole.selected) and "diagnostics" not in plain.values
    assert int(results[3][0][2].sum() + results[3][1][2].sum()) >= 1
    for message in results[4]:
        assert message is not None and "NaN or inf" in message and "rank(s) [1]" in message
    (count0, uids0), (count1, uids1) = results[5]
    assert round(count0 + count1) == selection_quota(2e-4, 4000) == 1
    assert not set(uids0.reshape(-1).tolist()) & set(uids1.reshape(-1).tolist())
    assert "token_uids has shape (4, 23) but mask has shape (4, 24)" in results[6][0]
    assert "rank(s) [0] rejected their inputs" in results[6][1]


# ----------------------------------------------------------------------------------------------- diagnostics
def test_covariance_diagnostics_match_float64_and_a_brute_force_sort():
    gen = torch.Generator().manual_seed(9)
    old = -torch.empty(16, 300).exponential_(1 / 0.3, generator=gen)  # heavy-tailed log-probs
    adv = torch.randn(16, 1, generator=gen).expand(16, 300).contiguous()
    mask = torch.rand(16, 300, generator=gen) > 0.25
    entropy = torch.rand(16, 300, generator=gen) * 1.5          # the old policy's per-token H and Cov(log pi, pi)
    cov = torch.rand(16, 300, generator=gen) * 0.2
    plan = build_step_plan(loss_config({"method": "ppo"}), StepInputs(old, adv, mask, old_entropy=entropy,
                                                                       old_prob_logprob_cov=cov), step=0)
    diag = plan.values["diagnostics"]
    without = build_step_plan(loss_config({"method": "ppo"}), StepInputs(old, adv, mask), step=0).values["diagnostics"]
    assert "entropy_change_predicted" not in without      # no H and c: Theorem 1's sampled form is not defined
    assert {k: v for k, v in diag.items() if k != "entropy_change_predicted"} == without
    values = sorted(plan.scores[mask].double().tolist(), reverse=True)  # brute force: a full sort, exact sums
    total = math.fsum(values)
    for fraction, tag in ((0.0002, "0.02pct"), (0.002, "0.2pct"), (0.02, "2pct")):
        k = max(1, int(len(values) * fraction))
        assert diag[f"cov_top_{tag}_share"] == pytest.approx(math.fsum(values[:k]) / total, rel=1e-5, abs=1e-7)
        assert diag[f"cov_top_{tag}_mean"] == pytest.approx(math.fsum(values[:k]) / k, rel=1e-5, abs=1e-7)
    assert diag["cov_overall_mean"] == pytest.approx(total / len(values), rel=1e-5, abs=1e-7)
    l, a = old[mask].double(), adv[mask].double()
    cov_natural = ((l - l.mean()) * (a - a.mean())).mean()
    assert diag["cov_overall_mean"] == pytest.approx(float(cov_natural), rel=1e-5, abs=1e-9)
    # Theorem 1 for the sampled tokens: -mean A (p (l + H) - c)
    h, c = entropy[mask].double(), cov[mask].double()
    assert diag["entropy_change_predicted"] == pytest.approx(-float((a * (l.exp() * (l + h) - c)).mean()),
                                                             rel=1e-5, abs=1e-9)
    # In the loss's metrics they are token shares: micro-batches sum to the step's value.
    cur = old.clone().requires_grad_(True)
    summed = {}
    for rows in (slice(0, 5), slice(5, 16)):
        _, metrics = policy_loss(loss_config({"method": "ppo"}), cur[rows], old[rows], adv[rows], mask[rows],
                                 plan=plan.rows(rows))
        for key in diag:
            summed[key] = summed.get(key, 0.0) + metrics[key]
    assert summed == pytest.approx(diag, rel=1e-5)


# ----------------------------------------------------------------------------------------------- large groups
class _SimulatedGroups(ParallelGroups):
    """This rank is rank 70 of 72; ranks 64..71 contribute exactly what this rank does, the others zeros."""

    failing = range(64, 72)

    @property
    def token_world_size(self):
        return 72

    @property
    def token_rank(self):
        return 70

    def token_all_reduce_sum(self, tensor):
        return tensor * len(self.failing)

    def token_all_gather(self, tensor):
        rows = [tensor if r in self.failing else torch.zeros_like(tensor) for r in range(72)]
        return torch.cat(rows)


def test_problem_flags_are_counts_that_cannot_wrap_in_a_large_group():
    adv = torch.ones(2, 3)
    adv[0, 0] = float("nan")
    mask = torch.ones(2, 3, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"NaN or inf on valid \(unmasked\) tokens on token-group rank\(s\) "
                                         r"\[64, 65, 66, 67, 68, 69, 70, 71\]"):
        exact_group_sums([mask.sum()], [("advantages", adv)], mask, _SimulatedGroups())


# ----------------------------------------------------------------------------------------------- masked inputs
@pytest.mark.parametrize("cfg", [KL_COV, CLIP_COV, {"method": "ppo", "reference_policy_kl_penalty": 0.1,
                                                    "use_importance_sampling_correction": True}])
def test_garbage_on_masked_positions_changes_nothing(cfg):
    cur, old, adv, mask, uids = _batch(seed=6)
    cfg = loss_config(cfg)
    plan = build_step_plan(cfg, StepInputs(old, adv, mask, uids), step=1)
    extra = dict(reference_logprobs=old - 0.1, generation_logprobs=old + 0.05)
    clean = cur.clone().requires_grad_(True)
    loss, metrics = policy_loss(cfg, clean, old, adv, mask, plan=plan, token_uids=uids, **extra)
    loss.backward()
    garbage = lambda t, value: torch.where(mask, t, torch.full_like(t, value))  # noqa: E731
    dirty = garbage(cur, float("-inf")).requires_grad_(True)
    dirty_plan = build_step_plan(cfg, StepInputs(garbage(old, float("-inf")), garbage(adv, float("nan")), mask, uids),
                                 step=1)
    loss2, metrics2 = policy_loss(cfg, dirty, garbage(old, float("-inf")), garbage(adv, float("nan")), mask,
                                  plan=dirty_plan, token_uids=uids,
                                  reference_logprobs=garbage(extra["reference_logprobs"], float("nan")),
                                  generation_logprobs=garbage(extra["generation_logprobs"], float("-inf")))
    loss2.backward()
    assert torch.isfinite(loss2) and float(loss2) == float(loss)
    assert torch.equal(dirty.grad, clean.grad) and torch.equal(dirty_plan.selected, plan.selected)
    assert metrics2 == metrics


# ----------------------------------------------------------------------------------------------- batch keys
def test_plan_rides_through_nemo_rl_batch_keys_bit_for_bit():
    cur, old, adv, mask, uids = _batch(seed=7, batch=8, length=10)
    cfg = loss_config(KL_COV)
    pad = lambda t: torch.cat([torch.zeros(t.shape[0], 1, dtype=t.dtype), t], 1)  # noqa: E731
    plans = []
    for j, rows in enumerate((slice(0, 4), slice(4, 8))):
        plans.append((rows, build_step_plan(cfg, StepInputs(old[rows], adv[rows], mask[rows], uids[rows]), step=5 + j)))
    keys = plan_to_batch(plans, 8, 11)
    for rows, plan in plans:
        for sub in (slice(0, 2), slice(2, 4)):
            data = {k: v[rows][sub] for k, v in keys.items()}
            back = plan_from_batch(data, global_valid_tokens=plan.global_valid_tokens,
                                   global_valid_seqs=plan.global_valid_seqs)
            want = plan.rows(sub)
            assert back.step == plan.step and torch.equal(back.scores, want.scores)
            assert torch.equal(back.selected, want.selected)
            assert back.global_selected_tokens == plan.global_selected_tokens
    assert plan_from_batch({"token_mask": pad(mask.float())}, global_valid_tokens=1, global_valid_seqs=1) is None


# ----------------------------------------------------------------------------------------------- controls
def test_registry_composition_and_the_keys_each_control_owns():
    assert {"ppo", "clip_cov", "kl_cov"} <= set(REGISTRY)
    owners = {}
    for name, cls in REGISTRY.items():
        for key in cls.config_class().keys():
            assert key not in owners, f"{key} of {name} already belongs to {owners[key]}"
            owners[key] = name
    with pytest.raises(ValueError, match="'kl_cov' and 'clip_cov' cannot be combined"):
        loss_config({"method": "kl_cov", "controls": ["clip_cov"]})
    with pytest.raises(ValueError, match="loss_fn.controls='nope' is invalid"):
        loss_config({"controls": ["nope"]})
    cfg = loss_config({"method": "clip_cov", "controls": []})
    assert [c.name for c in ControlSet(cfg)] == ["clip_cov"] and cfg.to_dict()["clip_cov_ratio"] == 2e-4
    assert loss_config(cfg.to_dict()) == cfg  # flat keys round trip


def test_stateless_controls_refuse_foreign_state():
    controls = ControlSet(loss_config(KL_COV))
    assert controls.state_dict() == {}
    with pytest.raises(ValueError, match="does not run"):
        controls.load_state_dict({"adaptive_entropy": {"coef": 0.1}})
