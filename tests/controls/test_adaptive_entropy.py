"""``adaptive_entropy`` (Skywork-OR1 / TRL): the gated bonus's loss and logit gradient against float64, the
coefficient's trajectory against the rule written out by hand, and its state: a run restored from ``state_dict``
(through JSON, as NeMo-RL's driver saves it) continues exactly like the uninterrupted one."""

from __future__ import annotations

import pytest
import torch

from nemo_entropy.config import loss_config
from nemo_entropy.controls import ControlSet

from ..support.entropy_controls import (check_resume_continues_exactly, entropy64, our_loss, plan_step, reference_loss,
                              run_stateful, step_batch)

BASE = {"method": "adaptive_entropy", "entropy_coef": 0.25, "entropy_coef_delta": 0.05, "entropy_coef_min": 0.1,
        "entropy_coef_max": 0.35}


@pytest.mark.parametrize("target,open_gate", [(50.0, True), (0.0, False)])
def test_gated_bonus_loss_and_logit_gradient_match_float64(target, open_gate):
    data = step_batch(seed=21)
    cfg = loss_config({**BASE, "entropy_target": target})
    controls = ControlSet(cfg)
    plan = plan_step(cfg, data, step=0, controls=controls)
    coef = 0.25 if open_gate else 0.0
    assert plan.values["adaptive_entropy"]["coef"] == coef
    loss, grad, metrics = our_loss(cfg, data, plan, controls, micro_batch=3)
    ref, ref_grad = reference_loss(data, lambda t: -coef * entropy64(t["logits"]) if coef else None)
    assert loss == pytest.approx(float(ref), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert metrics["entropy_coef"] == pytest.approx(coef, abs=1e-7)
    assert metrics["entropy_target"] == pytest.approx(target, rel=1e-6)


def _run(cfg, steps, controls=None, first=0):
    """``steps`` optimizer steps from batch seed 100 (entropies on both sides of the target)."""
    return run_stateful(cfg, "adaptive_entropy", steps, seed=100, controls=controls, first=first)


def test_coefficient_follows_the_rule_written_out_by_hand():
    cfg = loss_config({**BASE, "entropy_target": 1.2})
    controls, seen = _run(cfg, 10)
    coef, trajectory, moved = 0.25, [], set()
    for values, mean_h in seen:  # the rule, independently: gate, then +/- delta, clipped
        assert values["entropy_mean"] == pytest.approx(mean_h, abs=1e-6)  # the step's exact mean old entropy
        assert values["coef"] == (coef if mean_h <= 1.2 else 0.0)
        assert values["coef_state"] == pytest.approx(coef, abs=1e-12)
        moved.add(mean_h <= 1.2)
        coef = min(max(coef + (0.05 if mean_h <= 1.2 else -0.05), 0.1), 0.35)
        trajectory.append(coef)
    assert moved == {True, False}, "the batches must put the entropy on both sides of the target"
    assert trajectory.count(0.35) >= 2, "the upper bound must be exercised (0.35 + 0.05 clipped to 0.35)"
    assert controls.state_dict() == {"adaptive_entropy": {"entropy_coef": pytest.approx(coef, abs=1e-12)}}


def test_a_restored_state_continues_exactly_like_the_uninterrupted_run():
    cfg = loss_config({**BASE, "entropy_target": 1.2})
    whole = check_resume_continues_exactly(cfg, _run, total=8, split=3)
    # update() is a function of the plan alone: a second set fed the same plans ends in the same state.
    twin = ControlSet(cfg)
    for t in range(8):
        twin.update(plan_step(cfg, step_batch(seed=100 + t, scale=2.0 + (t % 3)), step=t, controls=twin))
        twin.end_rollout()
    assert twin.state_dict() == whole.state_dict()
    with pytest.raises(ValueError, match="expects state"):
        ControlSet(cfg).load_state_dict({"adaptive_entropy": {"coef": 0.1}})


def test_a_step_without_valid_tokens_leaves_the_coefficient_alone():
    cfg = loss_config({**BASE, "entropy_target": 1.2})
    data = step_batch(seed=5)
    data["mask"][:] = False
    controls = ControlSet(cfg)
    controls.update(plan_step(cfg, data, step=0, controls=controls))
    controls.end_rollout()
    assert controls.state_dict()["adaptive_entropy"]["entropy_coef"] == 0.25


@pytest.mark.parametrize("values,message", [
    ({"entropy_target": -0.1}, "loss_fn.entropy_target=-0.1 is invalid: allowed >= 0"),
    ({"entropy_coef_min": 0.5, "entropy_coef_max": 0.2}, "loss_fn.entropy_coef_max=0.2 is invalid: allowed >= "
                                                         "loss_fn.entropy_coef_min=0.5"),
    ({"entropy_coef_delta": -1}, "loss_fn.entropy_coef_delta=-1.0 is invalid"),
    ({"controls": ["entropy_bonus"]}, "'adaptive_entropy' and 'entropy_bonus' cannot be combined"),
])
def test_config_errors_name_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        loss_config({"method": "adaptive_entropy", **values})
