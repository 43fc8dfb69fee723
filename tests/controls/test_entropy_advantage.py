"""``entropy_advantage`` (nemo_entropy/controls/entropy_advantage.py): ``A' = A + min(alpha sg(H), |A| / kappa)`` against
float64 objectives written here (log-prob and logit inputs), composed with the other weighting controls."""

from __future__ import annotations

import pytest
import torch

from nemo_entropy.config import loss_config
from nemo_entropy.integrations import EntropyControlLossFn, attach_step_plans
from nemo_entropy.losses import policy_loss
from nemo_entropy.plan import StepInputs, build_step_plan

from ..support.controls_oracle import D, nemo_rl_batch, nemo_rl_mask, ppo_clipped, run_adapter, step_batch, token_mean


def shaped(adv, entropy, alpha, kappa):
    return adv + torch.minimum(alpha * entropy, adv.abs() / kappa)


@pytest.mark.parametrize("alpha,kappa", [(0.4, 2.0), (0.1, 1.0), (3.0, 2.0)])
def test_loss_gradient_and_metrics_match_float64(alpha, kappa):
    s = step_batch(seed=21)
    cfg = loss_config({"method": "entropy_advantage", "entropy_advantage_alpha": alpha,
                       "entropy_advantage_kappa": kappa})
    x = s.f32("cur").requires_grad_(True)
    h = s.f32("entropy").requires_grad_(True)  # the engine's entropy carries a gradient: it must not be used
    loss, metrics = policy_loss(cfg, x, s.f32("old"), s.f32("adv"), s.mask, entropy=h)
    loss.backward()
    assert h.grad is None or bool((h.grad == 0).all())

    a2 = shaped(s.adv, s.entropy, alpha, kappa)
    x64 = s.cur.clone().requires_grad_(True)
    expected = token_mean(ppo_clipped(a2, x64, s.old), s.mask)
    expected.backward()
    torch.testing.assert_close(loss.double(), expected.detach(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-7)
    psi, cap = a2 - s.adv, s.adv.abs() / kappa
    assert metrics["entropy_advantage_mean"] == pytest.approx(float(token_mean(psi, s.mask)), rel=1e-5)
    capped = (cap < alpha * s.entropy) & s.mask
    assert metrics["entropy_advantage_capped_fraction"] == pytest.approx(float(capped.sum() / s.mask.sum()), abs=1e-7)
    valid = s.mask
    assert bool((torch.sign(a2[valid & (s.adv > 0)]) > 0).all()) and bool((a2[valid & (s.adv < 0)] <= 0).all())
    assert bool((a2[valid & (s.adv == 0)] == 0).all())


def test_composed_with_top_entropy_w_reinforce_and_gppo():
    """One step through four controls: GPPO's surrogate of the shaped advantages, weighted 0 off the top-entropy set
    and lambda on positive tokens, the sign read from the batch's own advantages."""
    s = step_batch(seed=22, spread=0.6, ties=True)
    cfg = loss_config({"method": "gppo", "controls": ["top_entropy", "w_reinforce", "entropy_advantage"],
                       "top_entropy_quantile": 0.5, "w_reinforce_level": "token", "w_reinforce_lambda": 0.3,
                       "entropy_advantage_kappa": 1.0, "entropy_advantage_alpha": 1.0})
    plan = build_step_plan(cfg, StepInputs(s.f32("old"), s.f32("adv"), s.mask, s.uids, old_entropy=s.f32("old_entropy")),
                           step=1)
    kept = plan.values["top_entropy"]["kept"]
    x = s.f32("cur").requires_grad_(True)
    loss, _ = policy_loss(cfg, x, s.f32("old"), s.f32("adv"), s.mask, plan=plan, entropy=s.f32("entropy"))
    loss.backward()

    a2 = shaped(s.adv, s.entropy, 1.0, 1.0)
    assert bool(((s.adv < 0) & (a2 == 0) & s.mask).any())  # kappa = 1 brings some negative advantages to 0
    x64 = s.cur.clone().requires_grad_(True)
    r = torch.exp(x64 - s.old)
    sg = r.detach()
    low, high = (a2 < 0) & (sg < 0.8), (a2 > 0) & (sg > 1.2)
    obj = torch.where(low, 0.75 * 0.8 / sg * r * a2, torch.where(high, 1.0 * 1.2 / sg * r * a2, r * a2))
    weight = kept.to(D) * torch.where(s.adv > 0, 0.3, 1.0).to(D)
    (-token_mean(weight * obj, s.mask)).backward()
    value = token_mean(weight * ppo_clipped(a2, s.cur, s.old), s.mask)
    torch.testing.assert_close(loss.double().detach(), value, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("key,value,allowed", [("entropy_advantage_alpha", -0.1, ">= 0"),
                                               ("entropy_advantage_kappa", 0.5, ">= 1")])
def test_bad_values_are_refused_naming_the_key(key, value, allowed):
    with pytest.raises(ValueError, match=rf"loss_fn.{key}={value!r} is invalid: allowed {allowed}"):
        loss_config({"method": "entropy_advantage", key: value})


def test_without_the_current_entropy_the_error_names_the_input():
    s = step_batch(seed=23)
    with pytest.raises(ValueError, match="need the current full-vocabulary entropy"):
        policy_loss(loss_config({"method": "entropy_advantage"}), s.f32("cur"), s.f32("old"), s.f32("adv"), s.mask)
    with pytest.raises(ValueError, match="nemo_rl.input_type=logit"):
        EntropyControlLossFn({"method": "entropy_advantage"})


def test_nemo_rl_adapter_with_logit_input():
    """LOGIT input: the adapter takes log-probs and entropy from the logits in one pass; the gradient reaches the
    logits only through the log-probs (float64 reference by autograd over the logits)."""
    logits, _, data = nemo_rl_batch(seed=24)
    cfg = {"method": "entropy_advantage", "reference_policy_kl_penalty": 0.0}
    attach_step_plans(data, loss_config(cfg), train_global_batch_size=4, first_step=0)
    fn = EntropyControlLossFn(cfg, input_type="logit")
    leaf = logits.float().requires_grad_(True)
    losses, metrics = run_adapter(fn, data, leaf, gbs=4, mbs=2, key="logits")

    ref = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(ref, -1)[:, :-1]
    lp = logp.gather(-1, data["input_ids"][:, 1:, None]).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1).detach()
    mask = nemo_rl_mask(data)
    adv, old = data["advantages"][:, 1:], data["prev_logprobs"][:, 1:]
    for j, rows in enumerate((slice(0, 4), slice(4, 8))):
        a2 = shaped(adv[rows], entropy[rows], 0.4, 2.0)
        expected = token_mean(ppo_clipped(a2, lp[rows], old[rows]), mask[rows])
        expected.backward(retain_graph=True)
        assert losses[j] == pytest.approx(float(expected.detach()), rel=1e-5, abs=1e-7)
        psi = token_mean(a2 - adv[rows], mask[rows])
        assert metrics[j]["entropy_advantage_mean"] == pytest.approx(float(psi), rel=1e-4)
    torch.testing.assert_close(leaf.grad.double(), ref.grad, rtol=1e-4, atol=1e-7)
