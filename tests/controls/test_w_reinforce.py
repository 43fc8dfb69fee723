"""``w_reinforce`` (nemo_entropy/controls/w_reinforce.py) against float64 objectives written here, and the documented
equivalence "advantage > 0 <=> reward = 1" for binary rewards in mixed groups."""

from __future__ import annotations

import pytest
import torch

from nemo_entropy.config import loss_config
from nemo_entropy.integrations import EntropyControlLossFn, attach_step_plans
from nemo_entropy.losses import policy_loss

from ..support.controls_oracle import D, nemo_rl_batch, nemo_rl_mask, ppo_clipped, run_adapter, step_batch, token_mean


def token_level_advantages(seed: int):
    """A step whose advantages vary inside samples (signs included), so sample and token level differ."""
    s = step_batch(seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    s.adv = (s.adv + 0.8 * torch.randn(s.adv.shape, generator=gen, dtype=D)).float().double()
    return s


def positive(adv, mask, level):
    if level == "token":
        return (adv > 0) & mask
    return ((adv * mask).sum(-1, keepdim=True) > 0) & mask


@pytest.mark.parametrize("level", ["sample", "token"])
@pytest.mark.parametrize("extra", [{}, {"ratio_clip_c": 2.0, "ratio_clip_max": 0.28}, {"disable_ppo_ratio": True}],
                         ids=["ppo", "dual_clip_higher", "reinforce"])
def test_loss_and_gradient_match_float64(level, extra):
    s = token_level_advantages(seed=7)
    lam = 0.1
    cfg = loss_config({"method": "w_reinforce", "w_reinforce_lambda": lam, "w_reinforce_level": level, **extra})
    x = s.f32("cur").requires_grad_(True)
    loss, metrics = policy_loss(cfg, x, s.f32("old"), s.f32("adv"), s.mask)
    loss.backward()

    x64 = s.cur.clone().requires_grad_(True)
    pos = positive(s.adv, s.mask, level)
    weight = torch.where(pos, lam, 1.0).to(D)
    if extra.get("disable_ppo_ratio"):
        per = -s.adv * x64  # REINFORCE: W-REINFORCE's own objective, lambda on the positive part
    else:
        per = ppo_clipped(s.adv, x64, s.old, 0.2, extra.get("ratio_clip_max", 0.2), extra.get("ratio_clip_c"))
    expected = token_mean(weight * per, s.mask)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)
    assert metrics["w_reinforce_positive_fraction"] == pytest.approx(float(pos.sum() / s.mask.sum()), rel=1e-6)


def test_sample_and_token_level_differ_only_when_advantages_vary_inside_a_sample():
    varying, constant = token_level_advantages(seed=8), step_batch(seed=8)
    assert not torch.equal(positive(varying.adv, varying.mask, "sample"), positive(varying.adv, varying.mask, "token"))
    grads = {}
    for level in ("sample", "token"):
        x = constant.f32("cur").requires_grad_(True)
        policy_loss(loss_config({"method": "w_reinforce", "w_reinforce_level": level}), x, constant.f32("old"),
                    constant.f32("adv"), constant.mask)[0].backward()
        grads[level] = x.grad
    assert torch.equal(grads["sample"], grads["token"])


@pytest.mark.parametrize("leave_one_out", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
def test_positive_advantage_is_reward_one_in_mixed_groups(leave_one_out, normalize):
    """Binary rewards, groups of 8 (one all-correct, one all-wrong): with group-relative advantages the weighted
    samples are exactly the correct ones of mixed groups, and uniform groups get no gradient at all."""
    groups, size, length = 6, 8, 5
    gen = torch.Generator().manual_seed(3)
    rewards = (torch.rand(groups, size, generator=gen) > 0.5).to(D)
    rewards[0], rewards[1] = 1.0, 0.0
    rewards[2, 0], rewards[2, 1:] = 1.0, 0.0  # a single correct sample: its leave-one-out baseline is 0
    base = (rewards.sum(1, keepdim=True) - rewards) / (size - 1) if leave_one_out else rewards.mean(1, keepdim=True)
    adv = rewards - base
    if normalize:
        adv = adv / (rewards.std(1, keepdim=True) + 1e-6)
    adv = adv.reshape(-1, 1).expand(-1, length).float()
    old = -torch.rand(groups * size, length, generator=gen)
    cur = old + 0.1 * torch.randn(old.shape, generator=gen)
    mask = torch.ones(groups * size, length, dtype=torch.bool)
    grads = {}
    for lam in (0.1, 1.0):
        x = cur.clone().requires_grad_(True)
        _, metrics = policy_loss(loss_config({"method": "w_reinforce", "w_reinforce_lambda": lam}), x, old, adv, mask)
        x.grad = None
        policy_loss(loss_config({"method": "w_reinforce", "w_reinforce_lambda": lam}), x, old, adv, mask)[0].backward()
        grads[lam] = x.grad.reshape(groups, size, length)
    correct = (rewards == 1).reshape(groups, size)
    mixed = ~((rewards == rewards[:, :1]).all(1))
    want_positive = correct & mixed[:, None]
    assert metrics["w_reinforce_positive_fraction"] == pytest.approx(float(want_positive.double().mean()), abs=1e-7)
    torch.testing.assert_close(grads[0.1][want_positive], 0.1 * grads[1.0][want_positive], rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(grads[0.1][~want_positive], grads[1.0][~want_positive])
    assert bool((grads[1.0][~mixed] == 0).all()) and bool((grads[1.0][mixed] != 0).all())


def test_lambda_one_is_the_plain_objective_and_zero_keeps_only_negative_samples():
    s = step_batch(seed=9, spread=0.05)  # inside the clip range: every token has a gradient under PPO
    args = (s.f32("old"), s.f32("adv"), s.mask)
    plain = policy_loss(loss_config({"method": "ppo"}), s.f32("cur"), *args)[0]
    assert float(policy_loss(loss_config({"method": "w_reinforce", "w_reinforce_lambda": 1.0}), s.f32("cur"), *args)[0]) \
        == float(plain)
    x = s.f32("cur").requires_grad_(True)
    policy_loss(loss_config({"method": "w_reinforce", "w_reinforce_lambda": 0.0}), x, *args)[0].backward()
    assert bool((x.grad[(s.adv > 0) & s.mask] == 0).all()) and bool((x.grad[(s.adv < 0) & s.mask] != 0).all())


@pytest.mark.parametrize("key,value,allowed", [("w_reinforce_lambda", -0.1, ">= 0"),
                                               ("w_reinforce_level", "group", "one of ('sample', 'token')")])
def test_bad_values_are_refused_naming_the_key(key, value, allowed):
    with pytest.raises(ValueError, match=rf"loss_fn.{key}={value!r} is invalid: allowed {allowed}".replace("(", r"\(")
                       .replace(")", r"\)")):
        loss_config({"method": "w_reinforce", key: value})


def test_nemo_rl_adapter_sums_to_the_reference():
    """LOGPROB input; NeMo-RL's micro-batches and optimizer steps; every metric has a normalisation."""
    _, lp, data = nemo_rl_batch(seed=12)
    cfg = {"method": "w_reinforce", "w_reinforce_lambda": 0.25, "reference_policy_kl_penalty": 0.0}
    attach_step_plans(data, loss_config(cfg), train_global_batch_size=4, first_step=0)
    fn = EntropyControlLossFn(cfg)
    curr = (lp + 0.15 * torch.cos(torch.arange(lp.numel(), dtype=D)).reshape(lp.shape)).float().requires_grad_(True)
    losses, metrics = run_adapter(fn, data, curr, gbs=4, mbs=2)
    leaf = curr.detach().double().requires_grad_(True)
    mask = nemo_rl_mask(data)
    adv = data["advantages"][:, 1:]
    for j, rows in enumerate((slice(0, 4), slice(4, 8))):
        weight = torch.where(adv[rows] > 0, 0.25, 1.0).to(D)
        expected = token_mean(weight * ppo_clipped(adv[rows], leaf[rows], data["prev_logprobs"][rows, 1:]), mask[rows])
        expected.backward()
        assert losses[j] == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-7)
        share = float(((adv[rows] > 0) & mask[rows]).sum() / mask[rows].sum())
        assert metrics[j]["w_reinforce_positive_fraction"] == pytest.approx(share, rel=1e-5)
    torch.testing.assert_close(curr.grad.double(), leaf.grad, rtol=1e-4, atol=1e-7)
