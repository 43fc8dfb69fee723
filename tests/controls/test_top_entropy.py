"""``top_entropy`` (nemo_entropy/controls/top_entropy.py) against a brute-force sort and a float64 loss written here.

Layout invariance (1 vs 4 gloo processes, a rank without valid tokens, micro-batch sizes) is in
tests/test_layout_invariance.py; the local-config and NeMo-RL dry-runs in tests/controls/test_runs_weighting.py.
"""

from __future__ import annotations

from decimal import Decimal

import pytest
import torch

from nemo_entropy.config import loss_config
from nemo_entropy.controls.top_entropy import kept_count
from nemo_entropy.integrations import EntropyControlLossFn, attach_step_plans
from nemo_entropy.losses import policy_loss
from nemo_entropy.plan import StepInputs, build_step_plan

from ..support.controls_oracle import D, nemo_rl_batch, nemo_rl_mask, ppo_clipped, run_adapter, step_batch, token_mean


def brute_force_kept(entropy: torch.Tensor, mask: torch.Tensor, uids: torch.Tensor, quantile: str) -> torch.Tensor:
    """Sort every valid token by (entropy desc, uid asc) and keep the first ceil(q N), q read as a decimal."""
    order = sorted((-float(entropy[i, j]), int(uids[i, j]), i, j) for i, j in mask.nonzero().tolist())
    num, den = Decimal(quantile).as_integer_ratio()
    k = -(-num * len(order) // den)
    kept = torch.zeros_like(mask)
    for _, _, i, j in order[:k]:
        kept[i, j] = True
    return kept


@pytest.mark.parametrize("quantile,n,k", [("0.2", 10, 2), ("0.55", 100, 55), ("0.07", 100, 7), ("0.3", 7, 3),
                                          ("0.2", 1, 1), ("1.0", 13, 13), ("0.0001", 5, 1), ("0.25", 110, 28)])
def test_kept_count_is_the_ceiling_on_the_decimal_value(quantile, n, k):
    # 0.55 * 100 and 0.07 * 100 are 55.00000000000001 and 7.000000000000001 in floats: a float ceil keeps one more.
    assert kept_count(float(quantile), n) == k
    num, den = Decimal(quantile).as_integer_ratio()
    assert k == -(-num * n // den)


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("quantile", ["0.2", "0.55"])
def test_loss_gradient_and_metrics_match_float64_and_a_brute_force_sort(ties, quantile):
    s = step_batch(seed=3 + ties, ties=ties)
    cfg = loss_config({"method": "top_entropy", "top_entropy_quantile": float(quantile)})
    plan = build_step_plan(cfg, StepInputs(s.f32("old"), s.f32("adv"), s.mask, s.uids,
                                           old_entropy=s.f32("old_entropy")), step=4)
    kept = brute_force_kept(s.old_entropy, s.mask, s.uids, quantile)
    assert torch.equal(plan.values["top_entropy"]["kept"], kept)
    assert int(kept.sum()) == plan.values["top_entropy"]["num_kept"] == kept_count(float(quantile), int(s.mask.sum()))

    x = s.f32("cur").requires_grad_(True)
    loss, metrics = policy_loss(cfg, x, s.f32("old"), s.f32("adv"), s.mask, plan=plan, token_uids=s.uids)
    loss.backward()
    x64 = s.cur.clone().requires_grad_(True)
    expected = token_mean(kept.to(D) * ppo_clipped(s.adv, x64, s.old), s.mask)  # the others count in the denominator
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)
    assert bool((x.grad[s.mask & ~kept] == 0).all()) and bool((x.grad[kept & (s.adv != 0)] != 0).any())
    assert metrics["top_entropy_threshold"] == pytest.approx(float(s.old_entropy[kept].min()), rel=1e-5)
    assert metrics["top_entropy_kept_fraction"] == pytest.approx(float(kept.sum() / s.mask.sum()), rel=1e-6)
    assert metrics["selected_fraction"] == 0.0  # the kept set is not a covariance selection


def test_a_step_without_valid_tokens_keeps_nothing_and_logs_zeros():
    s = step_batch(seed=5)
    mask = torch.zeros_like(s.mask)
    cfg = loss_config({"method": "top_entropy"})
    plan = build_step_plan(cfg, StepInputs(s.f32("old"), s.f32("adv"), mask, s.uids, old_entropy=s.f32("old_entropy")),
                           step=0)
    loss, metrics = policy_loss(cfg, s.f32("cur").requires_grad_(True), s.f32("old"), s.f32("adv"), mask, plan=plan)
    assert float(loss.detach()) == 0.0 and metrics["top_entropy_threshold"] == 0.0 and metrics["top_entropy_kept_fraction"] == 0


@pytest.mark.parametrize("value", [0.0, -0.2, 1.5, 20])
def test_a_quantile_out_of_range_is_refused_naming_the_key(value):
    with pytest.raises(ValueError, match=rf"loss_fn.top_entropy_quantile={float(value)!r} is invalid: allowed a fraction in"):
        loss_config({"method": "top_entropy", "top_entropy_quantile": value})


def test_without_a_plan_or_the_old_entropy_the_error_says_what_is_missing():
    s = step_batch(seed=6)
    cfg = loss_config({"method": "top_entropy"})
    with pytest.raises(ValueError, match="top_entropy' needs the step plan"):
        policy_loss(cfg, s.f32("cur"), s.f32("old"), s.f32("adv"), s.mask)
    with pytest.raises(ValueError, match="needs the old policy's per-token entropy"):
        build_step_plan(cfg, StepInputs(s.f32("old"), s.f32("adv"), s.mask, s.uids), step=0)


def test_nemo_rl_adapter_with_the_plan_attached_on_the_driver():
    """Two optimizer steps of 4 samples, micro-batches of 2 (NeMo-RL's chunking): each step keeps the top of *its*
    tokens by the attached old entropy, and the summed micro-batch losses, gradients and metrics are the step's."""
    _, lp, data = nemo_rl_batch(seed=11)
    cfg = {"method": "top_entropy", "top_entropy_quantile": 0.3, "reference_policy_kl_penalty": 0.0}
    attach_step_plans(data, loss_config(cfg), train_global_batch_size=4, first_step=0)
    fn = EntropyControlLossFn(cfg)
    curr = (lp + 0.1 * torch.sin(torch.arange(lp.numel(), dtype=D)).reshape(lp.shape)).float().requires_grad_(True)
    losses, metrics = run_adapter(fn, data, curr, gbs=4, mbs=2)

    leaf = curr.detach().double().requires_grad_(True)
    mask = nemo_rl_mask(data)
    uids = data["entropy_token_uids"][:, 1:]
    for j, rows in enumerate((slice(0, 4), slice(4, 8))):
        kept = brute_force_kept(data["entropy_old"][rows, 1:].double(), mask[rows], uids[rows], "0.3")
        per = ppo_clipped(data["advantages"][rows, 1:], leaf[rows], data["prev_logprobs"][rows, 1:])
        expected = token_mean(kept.to(D) * per, mask[rows])
        expected.backward()
        assert losses[j] == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-7)
        assert metrics[j]["top_entropy_kept_fraction"] == pytest.approx(float(kept.sum() / mask[rows].sum()), rel=1e-5)
        assert metrics[j]["top_entropy_threshold"] == pytest.approx(
            float(data["entropy_old"][rows, 1:][kept].min()), rel=1e-5)
    torch.testing.assert_close(curr.grad.double(), leaf.grad, rtol=1e-4, atol=1e-7)
    missing = dict(data)
    missing.pop("entropy_old")
    with pytest.raises(KeyError, match="entropy_old"):
        attach_step_plans(missing, loss_config(cfg), train_global_batch_size=4, first_step=0)
