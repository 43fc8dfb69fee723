"""``entropy_pi`` (EntroPIC, arXiv 2511.15248): the re-weighting term's loss and logit gradient against a float64
objective, the direction of the re-weighting, the PI controller's trajectory against the rule written out by hand,
and its state (the integral) across a restore."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_entropy.config import loss_config
from nemo_entropy.controls import ControlSet

from .entropy_controls import (check_resume_continues_exactly, mean_old_entropy, our_loss, plan_step, reference_loss,
                              run_stateful, step_batch)

BASE = {"method": "entropy_pi", "entropy_pi_target": 1.2, "entropy_pi_kp": 1.0, "entropy_pi_ki": 0.01}


def _peaked_batch(seed):
    """Targets are the old policy's argmax in half the rows, so that many tokens are above the probability gate."""
    data = step_batch(seed=seed, scale=4.0)
    greedy = data["old_logits"].argmax(-1)
    data["targets"][::2] = greedy[::2]
    data["old_logprobs"] = torch.log_softmax(data["old_logits"], -1).gather(-1, data["targets"][..., None]).squeeze(-1)
    return data


@pytest.mark.parametrize("integral,threshold,micro_batch", [(0.0, 0.95, 3), (30.0, 0.6, 1), (-500.0, 0.6, 8)])
def test_reweighting_loss_and_logit_gradient_match_float64(integral, threshold, micro_batch):
    data = _peaked_batch(seed=41)
    cfg = loss_config({**BASE, "entropy_pi_prob_threshold": threshold})
    controls = ControlSet(cfg)
    controls.load_state_dict({"entropy_pi": {"integral": integral}})
    plan = plan_step(cfg, data, step=0, controls=controls)
    u = min(max(1.0 * (1.2 - mean_old_entropy(data)) + 0.01 * integral, -1.0), 1.0)  # PI signal, clipped
    assert plan.values["entropy_pi"]["control"] == pytest.approx(u, abs=1e-6)
    loss, grad, metrics = our_loss(cfg, data, plan, controls, micro_batch=micro_batch)

    def term(t):
        gated = t["mask"] & (t["logp"].detach() > math.log(threshold))
        return torch.where(gated, u * t["ratio"] * t["adv"].abs(), torch.zeros_like(t["ratio"]))

    ref, ref_grad = reference_loss(data, term)
    assert loss == pytest.approx(float(ref), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    gated = (data["mask"] & (torch.log_softmax(data["logits"], -1).gather(-1, data["targets"][..., None]).squeeze(-1)
                             > math.log(threshold)))
    fraction = float(gated.sum() / data["mask"].sum())
    assert 0.05 < fraction < 0.95 and metrics["entropy_pi_gated_fraction"] == pytest.approx(fraction)
    assert metrics["entropy_pi_control"] == pytest.approx(u, abs=1e-6)
    assert metrics["entropy_pi_integral"] == pytest.approx(integral, rel=1e-6, abs=1e-9)
    assert metrics["entropy_target"] == pytest.approx(1.2, rel=1e-6)
    _, ppo_grad = reference_loss(data, lambda t: None)
    assert not torch.allclose(ppo_grad, ref_grad, rtol=1e-2, atol=1e-4)


def test_below_the_target_positive_tokens_lose_weight_and_negative_tokens_gain_it():
    """On-policy (ratio 1), a gated token's gradient with respect to its log-prob is -A (1 - u) for A > 0 and
    -A (1 + u) for A < 0, per valid token of the step."""
    data = _peaked_batch(seed=42)
    data["logits"] = data["old_logits"].clone()
    cfg = loss_config({**BASE, "entropy_pi_target": 5.0})  # far above the batch's entropy: u is clipped to 1
    controls = ControlSet(cfg)
    plan = plan_step(cfg, data, step=0, controls=controls)
    u = plan.values["entropy_pi"]["control"]
    assert u == 1.0
    from nemo_entropy.losses import policy_loss

    lp = data["old_logprobs"].float().clone().requires_grad_(True)
    loss, _ = policy_loss(cfg, lp, data["old_logprobs"].float(), data["adv"].float(), data["mask"], plan=plan,
                          controls=controls)
    loss.backward()
    n = float(data["mask"].sum())
    gated = data["mask"] & (data["old_logprobs"] > math.log(0.95))
    adv = data["adv"]
    expected = torch.where(gated, -adv * (1 - u * adv.sign()), -adv) * data["mask"] / n
    torch.testing.assert_close(lp.grad.double(), expected, rtol=1e-5, atol=1e-7)
    assert bool((lp.grad[gated & (adv > 0)] == 0).all()) and bool((adv[gated] > 0).any())


def _run(cfg, steps, controls=None, first=0):
    """``steps`` optimizer steps from batch seed 400."""
    return run_stateful(cfg, "entropy_pi", steps, seed=400, controls=controls, first=first)


def test_pi_controller_follows_the_rule_written_out_by_hand():
    cfg = loss_config({**BASE, "entropy_pi_ki": 0.5, "entropy_pi_max_control": 0.3})  # large Ki: the clip is hit
    controls, seen = _run(cfg, 10)
    integral, clipped = 0.0, 0
    for values, h in seen:
        assert values["error"] == pytest.approx(1.2 - h, abs=1e-6)
        error = values["error"]
        raw = error + 0.5 * integral
        assert values["integral"] == pytest.approx(integral, abs=1e-12)
        assert values["control"] == pytest.approx(min(max(raw, -0.3), 0.3), abs=1e-12)
        clipped += abs(raw) > 0.3
        integral += error
    assert 0 < clipped < 10
    assert controls.state_dict() == {"entropy_pi": {"integral": pytest.approx(integral, abs=1e-12)}}


def test_a_restored_state_continues_exactly_like_the_uninterrupted_run():
    cfg = loss_config(BASE)
    whole = check_resume_continues_exactly(cfg, _run, total=7, split=3)
    empty = step_batch(seed=1)
    empty["mask"][:] = False
    before = whole.state_dict()
    whole.update(plan_step(cfg, empty, step=7, controls=whole))  # a step without tokens measures nothing
    whole.end_rollout()
    assert whole.state_dict() == before


@pytest.mark.parametrize("values,message", [
    ({"entropy_pi_target": -1.0}, "loss_fn.entropy_pi_target=-1.0 is invalid: allowed >= 0"),
    ({"entropy_pi_ki": -0.01}, "loss_fn.entropy_pi_ki=-0.01 is invalid"),
    ({"entropy_pi_prob_threshold": 1.0}, r"loss_fn.entropy_pi_prob_threshold=1.0 is invalid: allowed a probability"),
    ({"entropy_pi_max_control": 1.5}, r"loss_fn.entropy_pi_max_control=1.5 is invalid: allowed in \(0, 1\]"),
    ({"disable_ppo_ratio": True}, "needs the PPO ratio"),
])
def test_config_errors_name_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        loss_config({"method": "entropy_pi", **values})
