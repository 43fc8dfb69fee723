"""``entropy_pi`` (EntroPIC, arXiv 2511.15248): the re-weighting term's loss and logit gradient against a float64
objective, the direction of the re-weighting, the PI controller's trajectory against the rule written out by hand,
and its state (the integral) across a restore."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_entropy.config import loss_config
from nemo_entropy.controls import ControlSet

from ..support.entropy_controls import (D, check_resume_continues_exactly, clipped_surrogate64, mean_old_entropy,
                                       our_loss, plan_step, run_stateful, step_batch)

BASE = {"method": "entropy_pi", "entropy_pi_target": 1.2, "entropy_pi_kp": 1.0, "entropy_pi_ki": 0.01}


def _peaked_batch(seed):
    """Targets are the old policy's argmax in half the rows, so that many tokens are above the probability gate."""
    data = step_batch(seed=seed, scale=4.0)
    greedy = data["old_logits"].argmax(-1)
    data["targets"][::2] = greedy[::2]
    data["old_logprobs"] = torch.log_softmax(data["old_logits"], -1).gather(-1, data["targets"][..., None]).squeeze(-1)
    return data


def entropic_reference(data, u, threshold, *, token_level=True, normalization="gated_tokens"):
    """``(loss, d loss / d logits)`` in float64 of EntroPIC's policy loss as its authors' code writes it
    (``yk7333/EntroPIC``, ``core_algos.py``, ``compute_policy_loss_entropic``): the clipped surrogate aggregated over
    the valid tokens, plus ``control_alpha * agg_loss(-ratio * |A|, response_mask * prob_high)`` with ``control_alpha
    = -u`` (``dp_actor.py`` ``update_policy``: its error is ``H - target``) and ``prob_high`` the tokens above the
    probability threshold, aggregated over the gated tokens only (``token-mean``: their mean; ``seq-mean-token-mean``:
    the mean over sequences with a gated token of each one's gated mean). The gate reads the old policy's
    probability (equal to the current one in the authors' on-policy recipe). ``normalization="all_tokens"``: the
    earlier variant, the term aggregated over all valid tokens."""
    logits = data["logits"].clone().requires_grad_(True)
    logp = torch.log_softmax(logits, -1).gather(-1, data["targets"][..., None]).squeeze(-1)
    surrogate, ratio = clipped_surrogate64(logp, data["old_logprobs"], data["adv"])
    mask = data["mask"].to(D)
    gate = mask * (data["old_logprobs"] > math.log(threshold)).to(D)
    adjust_mask = gate if normalization == "gated_tokens" else mask
    adjust = torch.where(gate > 0, -ratio * data["adv"].abs(), torch.zeros_like(ratio))

    def agg(values, m):
        if token_level:
            return (values * m).sum() / m.sum()
        per_seq = (values * m).sum(-1) / (m.sum(-1) + 1e-30)
        return per_seq.sum() / (m.sum(-1) > 0).sum()

    loss = agg(surrogate, mask) + (-u) * agg(adjust, adjust_mask)
    loss.backward()
    return loss.detach(), logits.grad


@pytest.mark.parametrize("integral,threshold,micro_batch,token_level,normalization", [
    (0.0, 0.95, 3, True, "gated_tokens"), (30.0, 0.6, 1, True, "gated_tokens"), (-500.0, 0.6, 8, True, "gated_tokens"),
    (30.0, 0.6, 3, False, "gated_tokens"), (30.0, 0.6, 3, True, "all_tokens"), (-40.0, 0.6, 2, False, "all_tokens")])
def test_reweighting_loss_and_logit_gradient_match_the_authors_formula(integral, threshold, micro_batch, token_level,
                                                                        normalization):
    data = _peaked_batch(seed=41)
    cfg = loss_config({**BASE, "entropy_pi_prob_threshold": threshold, "token_level_loss": token_level,
                       "entropy_pi_normalization": normalization})
    controls = ControlSet(cfg)
    controls.load_state_dict({"entropy_pi": {"integral": integral}})
    plan = plan_step(cfg, data, step=0, controls=controls)
    u = min(max(1.0 * (1.2 - mean_old_entropy(data)) + 0.01 * integral, -1.0), 1.0)  # PI signal, clipped
    assert plan.values["entropy_pi"]["control"] == pytest.approx(u, abs=1e-6)
    loss, grad, metrics = our_loss(cfg, data, plan, controls, micro_batch=micro_batch)
    ref, ref_grad = entropic_reference(data, u, threshold, token_level=token_level, normalization=normalization)
    assert loss == pytest.approx(float(ref), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    gated = data["mask"] & (data["old_logprobs"] > math.log(threshold))
    fraction = float(gated.sum() / data["mask"].sum())
    assert 0.05 < fraction < 0.95 and metrics["entropy_pi_gated_fraction"] == pytest.approx(fraction)
    assert plan.values["entropy_pi"]["gated_tokens"] == int(gated.sum())
    assert metrics["entropy_pi_control"] == pytest.approx(u, abs=1e-6)
    assert metrics["entropy_pi_integral"] == pytest.approx(integral, rel=1e-6, abs=1e-9)
    assert metrics["entropy_target"] == pytest.approx(1.2, rel=1e-6)
    other = "all_tokens" if normalization == "gated_tokens" else "gated_tokens"
    _, other_grad = entropic_reference(data, u, threshold, token_level=token_level, normalization=other)
    assert not torch.allclose(other_grad, ref_grad, rtol=1e-2, atol=1e-4)  # the two normalisations differ here


def test_the_gated_count_is_the_whole_steps_over_micro_batches_and_ranks():
    """The plan counts the step's gated tokens; each micro-batch's term is scaled by the step's count, not its own,
    so the summed loss is the step's gated mean whatever the micro-batch size (across ranks, the plan's values and
    the losses are compared layout against layout in tests/test_entropy_controls_layout.py)."""
    data = _peaked_batch(seed=43)
    cfg = loss_config({**BASE, "entropy_pi_prob_threshold": 0.6})
    whole = plan_step(cfg, data, step=0, controls=ControlSet(cfg))
    gated = int((data["mask"] & (data["old_logprobs"] > math.log(0.6))).sum())
    assert whole.values["entropy_pi"]["gated_tokens"] == gated > 0
    u = whole.values["entropy_pi"]["control"]
    for micro_batch in (1, 5):
        loss, _, _ = our_loss(cfg, data, whole, ControlSet(cfg), micro_batch=micro_batch)
        assert loss == pytest.approx(float(entropic_reference(data, u, 0.6)[0]), rel=1e-5, abs=1e-6)


def test_below_the_target_positive_tokens_lose_weight_and_negative_tokens_gain_it():
    """On-policy (ratio 1), a gated token's gradient with respect to its log-prob is ``-A (1 - u N / N_gated)`` for
    A > 0 and ``-A (1 + u N / N_gated)`` for A < 0 per valid token of the step (EntroPIC's scale); with
    ``entropy_pi_normalization: all_tokens``, ``-A (1 -/+ u)``."""
    data = _peaked_batch(seed=42)
    data["logits"] = data["old_logits"].clone()
    from nemo_entropy.losses import policy_loss

    for normalization in ("gated_tokens", "all_tokens"):
        cfg = loss_config({**BASE, "entropy_pi_target": 5.0, "entropy_pi_normalization": normalization})
        controls = ControlSet(cfg)  # target far above the batch's entropy: u is clipped to 1
        plan = plan_step(cfg, data, step=0, controls=controls)
        u = plan.values["entropy_pi"]["control"]
        assert u == 1.0
        lp = data["old_logprobs"].float().clone().requires_grad_(True)
        loss, _ = policy_loss(cfg, lp, data["old_logprobs"].float(), data["adv"].float(), data["mask"], plan=plan,
                              controls=controls)
        loss.backward()
        n = float(data["mask"].sum())
        gated = data["mask"] & (data["old_logprobs"] > math.log(0.95))
        scale = n / float(gated.sum()) if normalization == "gated_tokens" else 1.0
        adv = data["adv"]
        expected = torch.where(gated, -adv * (1 - u * scale * adv.sign()), -adv) * data["mask"] / n
        torch.testing.assert_close(lp.grad.double(), expected, rtol=1e-5, atol=1e-7)
        positive = gated & (adv > 0)
        assert bool(positive.any())
        if normalization == "all_tokens":
            assert bool((lp.grad[positive] == 0).all())
        else:  # the published scale over-shoots: N / N_gated > 1, so a saturated signal reverses these tokens
            assert scale > 1 and bool((lp.grad[positive] > 0).all())


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
    ({"entropy_pi_normalization": "tokens"}, r"loss_fn.entropy_pi_normalization='tokens' is invalid: allowed one of"),
    ({"disable_ppo_ratio": True}, "needs the PPO ratio"),
])
def test_config_errors_name_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        loss_config({"method": "entropy_pi", **values})
