"""``gppo`` (nemo_entropy/controls/gppo.py): the value is PPO's clipped surrogate (float64), the gradient that of
CE-GPPO's objective ``beta (1 +- eps) / sg(r) * r * A`` on the clipped tokens (autograd of the paper's form, written
here), and, token by token, ``-beta (1 +- eps) A / N`` per unit of log-prob."""

from __future__ import annotations

import pytest
import torch

from nemo_entropy.config import loss_config
from nemo_entropy.integrations import EntropyControlLossFn, attach_step_plans
from nemo_entropy.losses import policy_loss

from ..support.controls_oracle import D, nemo_rl_batch, nemo_rl_mask, ppo_clipped, run_adapter, step_batch, token_mean


def ce_gppo_objective(adv, cur, old, eps_low, eps_high, beta_low, beta_high, dual=None):
    """CE-GPPO's per-token objective to maximise (arXiv 2509.20712), with NeMo-RL's dual clip kept hard."""
    r = torch.exp(cur - old)
    sg = r.detach()
    low = (adv < 0) & (sg < 1 - eps_low)
    high = (adv > 0) & (sg > 1 + eps_high)
    obj = torch.where(low, beta_low * (1 - eps_low) / sg * r * adv,
                      torch.where(high, beta_high * (1 + eps_high) / sg * r * adv, r * adv))
    if dual is not None:
        obj = torch.where((adv < 0) & (sg > dual), -(-adv * dual), obj)  # constant: no gradient
    return obj, low, high


CASES = {
    "ce_gppo": dict(),
    "gppo": dict(gppo_beta_low=1.0, gppo_beta_high=1.0),
    "beta_0_is_ppo": dict(gppo_beta_low=0.0, gppo_beta_high=0.0),
    "clip_higher_dual_clip": dict(ratio_clip_max=0.28, ratio_clip_c=1.5, gppo_beta_low=0.5),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_value_is_ppo_and_gradient_is_ce_gppo(case):
    extra = CASES[case]
    s = step_batch(seed=13, spread=0.6)  # many tokens outside [0.8, 1.2] on both sides
    cfg = loss_config({"method": "gppo", **extra})
    eps_low, eps_high, dual = cfg.ratio_clip_min, cfg.ratio_clip_max, cfg.ratio_clip_c
    x = s.f32("cur").requires_grad_(True)
    loss, metrics = policy_loss(cfg, x, s.f32("old"), s.f32("adv"), s.mask)
    loss.backward()

    value = token_mean(ppo_clipped(s.adv, s.cur, s.old, eps_low, eps_high, dual), s.mask)
    torch.testing.assert_close(loss.double().detach(), value, rtol=1e-5, atol=1e-7)
    x64 = s.cur.clone().requires_grad_(True)
    obj, low, high = ce_gppo_objective(s.adv, x64, s.old, eps_low, eps_high, cfg.gppo_beta_low, cfg.gppo_beta_high, dual)
    (-token_mean(obj, s.mask)).backward()
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-8)

    n = s.mask.sum()
    low, high = low & s.mask, high & s.mask
    assert int(low.sum()) > 0 and int(high.sum()) > 0
    # per clipped token: -beta (1 +- eps) A / N, whatever its ratio
    torch.testing.assert_close(x.grad.double()[low], -cfg.gppo_beta_low * (1 - eps_low) * s.adv[low] / n,
                               rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(x.grad.double()[high], -cfg.gppo_beta_high * (1 + eps_high) * s.adv[high] / n,
                               rtol=1e-4, atol=1e-9)
    assert metrics["clip_ratio/low"] == pytest.approx(float(low.sum() / n), rel=1e-6)
    assert metrics["clip_ratio/high"] == pytest.approx(float(high.sum() / n), rel=1e-6)
    if dual is None:
        assert metrics["clip_fraction"] == pytest.approx(metrics["clip_ratio/low"] + metrics["clip_ratio/high"])
    if case == "beta_0_is_ppo":
        ppo_x = s.f32("cur").requires_grad_(True)
        policy_loss(loss_config({"method": "ppo"}), ppo_x, s.f32("old"), s.f32("adv"), s.mask)[0].backward()
        torch.testing.assert_close(x.grad, ppo_x.grad, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("cfg,message", [
    ({"method": "gppo", "controls": ["kl_cov"]}, "'gppo' and 'kl_cov' cannot be combined (both are a surrogate)"),
    ({"method": "gppo", "use_cispo": True}, "control 'gppo' needs the PPO ratio"),
    ({"method": "gppo", "disable_ppo_ratio": True}, "control 'gppo' needs the PPO ratio"),
    ({"method": "gppo", "gppo_beta_low": -0.5}, "loss_fn.gppo_beta_low=-0.5 is invalid: allowed >= 0"),
    ({"method": "gppo", "gppo_beta_high": -1.0}, "loss_fn.gppo_beta_high=-1.0 is invalid: allowed >= 0"),
])
def test_refused_settings_name_the_keys(cfg, message):
    with pytest.raises(ValueError) as err:
        loss_config(cfg)
    assert message in str(err.value)


def test_nemo_rl_adapter_sums_to_the_reference():
    _, lp, data = nemo_rl_batch(seed=14)
    cfg = {"method": "gppo", "reference_policy_kl_penalty": 0.0}
    attach_step_plans(data, loss_config(cfg), train_global_batch_size=4, first_step=0)
    fn = EntropyControlLossFn(cfg)
    curr = (data["prev_logprobs"][:, 1:] + 0.5 * torch.sin(torch.arange(lp.numel(), dtype=D) * 0.7)
            .reshape(lp.shape)).float().requires_grad_(True)
    losses, metrics = run_adapter(fn, data, curr, gbs=4, mbs=2)
    leaf = curr.detach().double().requires_grad_(True)
    mask = nemo_rl_mask(data)
    adv, old = data["advantages"][:, 1:], data["prev_logprobs"][:, 1:]
    for j, rows in enumerate((slice(0, 4), slice(4, 8))):
        value = token_mean(ppo_clipped(adv[rows], leaf[rows].detach(), old[rows]), mask[rows])
        obj, low, high = ce_gppo_objective(adv[rows], leaf[rows], old[rows], 0.2, 0.2, 0.75, 1.0)
        (-token_mean(obj, mask[rows])).backward()
        assert losses[j] == pytest.approx(float(value), rel=1e-5, abs=1e-7)
        n = mask[rows].sum()
        assert metrics[j]["clip_ratio/low"] == pytest.approx(float((low & mask[rows]).sum() / n), abs=1e-7)
        assert metrics[j]["clip_ratio/high"] == pytest.approx(float((high & mask[rows]).sum() / n), abs=1e-7)
    assert sum(m["clip_ratio/low"] + m["clip_ratio/high"] for m in metrics) > 0
    torch.testing.assert_close(curr.grad.double(), leaf.grad, rtol=1e-4, atol=1e-7)
