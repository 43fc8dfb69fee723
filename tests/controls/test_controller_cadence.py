"""The controllers' cadence (``loss_fn.controller_update``): with ``rollout`` (the default, the cadence of Skywork-OR1,
AReaL's AEnt and EntroPIC) every optimizer step of a rollout is planned with the state of the rollout's start and the
state moves once, from the rollout's mean old entropy over all its valid tokens; with ``optimizer_step`` it moves after
every step from that step's mean. Both against the papers' update rules written out in float64."""

from __future__ import annotations

import pytest
import torch

from nemo_entropy.config import loss_config
from nemo_entropy.controls import ControlSet

from ..support.entropy_controls import plan_step, step_batch

D = torch.float64
TARGET = 1.2
CONFIGS = {
    "adaptive_entropy": {"method": "adaptive_entropy", "entropy_coef": 0.25, "entropy_target": TARGET,
                         "entropy_coef_delta": 0.05},
    "aent": {"method": "aent", "aent_coef": 5e-3, "aent_entropy_low": 1.3, "aent_entropy_high": 1.5,
             "aent_coef_lr": 2e-3, "aent_coef_box_low": 1e-5, "aent_coef_box_high": 1e-2},
    "entropy_pi": {"method": "entropy_pi", "entropy_pi_target": TARGET, "entropy_pi_kp": 1.0, "entropy_pi_ki": 0.3},
}


def _rollouts(count: int, steps: int):
    """``count`` rollouts of ``steps`` optimizer steps each; uneven masks, so the steps' token counts differ and a
    plain mean of the steps' means is not the rollout's mean."""
    out = []
    for r in range(count):
        rollout = []
        for j in range(steps):
            data = step_batch(seed=700 + 10 * r + j, scale=1.5 + j + r % 2)
            data["mask"][: 1 + 3 * j] = False  # fewer valid tokens in later steps
            rollout.append(data)
        out.append(rollout)
    return out


def _h(datas) -> float:
    """The exact mean old entropy over every valid token of ``datas`` (float64)."""
    num = sum(float((d["old_entropy"] * d["mask"].to(D)).sum()) for d in datas)
    return num / sum(float(d["mask"].sum()) for d in datas)


def _reference(name: str, rollouts, per_rollout: bool):
    """Per step: the value the step's loss uses (coefficient or control signal); and the final state. From the rules:
    Skywork-OR1 (c +/- delta, gated by H <= target), AEnt (c - lr * signed distance from the band, in the box),
    EntroPIC (u = clip(Kp e + Ki I), I += e)."""
    cfg = CONFIGS[name]
    state = {"adaptive_entropy": 0.25, "aent": 5e-3, "entropy_pi": 0.0}[name]
    used = []

    def moved(state, h):
        if name == "adaptive_entropy":
            return min(max(state + (0.05 if h <= TARGET else -0.05), 0.0), 1.0)
        if name == "aent":
            distance = min(0.0, h - 1.3) + max(0.0, h - 1.5)
            return min(max(state - 2e-3 * distance, 1e-5), 1e-2)
        return state + (TARGET - h)

    for rollout in rollouts:
        for data in rollout:
            h = _h([data])
            if name == "adaptive_entropy":
                used.append(state if h <= TARGET else 0.0)
            elif name == "aent":
                used.append(state)
            else:
                used.append(min(max(cfg["entropy_pi_kp"] * (TARGET - h) + cfg["entropy_pi_ki"] * state, -1.0), 1.0))
            if not per_rollout:
                state = moved(state, h)
        if per_rollout:
            state = moved(state, _h(rollout))
    return used, state


USED = {"adaptive_entropy": "coef", "aent": "coef", "entropy_pi": "control"}
STATE = {"adaptive_entropy": "entropy_coef", "aent": "aent_coef", "entropy_pi": "integral"}


@pytest.mark.parametrize("update", ["rollout", "optimizer_step"])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_two_optimizer_steps_per_rollout_follow_the_float64_rule(name, update):
    cfg = loss_config({**CONFIGS[name], "controller_update": update})
    rollouts = _rollouts(3, 2)
    controls, used, step = ControlSet(cfg), [], 0
    for rollout in rollouts:
        for data in rollout:
            plan = plan_step(cfg, data, step=step, controls=controls)
            used.append(plan.values[name][USED[name]])
            controls.update(plan)
            step += 1
        controls.end_rollout()
    expected_used, expected_state = _reference(name, rollouts, per_rollout=update == "rollout")
    assert used == pytest.approx(expected_used, rel=1e-6, abs=1e-7)
    assert controls.state_dict()[name][STATE[name]] == pytest.approx(expected_state, rel=1e-6, abs=1e-7)
    # The two cadences differ on this data (the test would not tell them apart otherwise).
    other, other_state = _reference(name, rollouts, per_rollout=update != "rollout")
    assert other_state != pytest.approx(expected_state, rel=1e-4, abs=1e-6)


def test_the_rollout_mean_weighs_the_steps_by_their_tokens():
    """EntroPIC's integral after one rollout of two steps is ``target - H_rollout``, the mean over all the rollout's
    tokens, not the mean of the two steps' means."""
    cfg = loss_config(CONFIGS["entropy_pi"])
    (rollout,) = _rollouts(1, 2)
    controls = ControlSet(cfg)
    for step, data in enumerate(rollout):
        controls.update(plan_step(cfg, data, step=step, controls=controls))
    with pytest.raises(RuntimeError, match="end_rollout"):  # no checkpoint with steps not yet applied
        controls.state_dict()
    controls.end_rollout()
    integral = controls.state_dict()["entropy_pi"]["integral"]
    assert integral == pytest.approx(TARGET - _h(rollout), rel=1e-6)
    plain = TARGET - (_h(rollout[:1]) + _h(rollout[1:])) / 2
    assert abs(integral - plain) > 1e-3


def test_controller_update_is_validated():
    with pytest.raises(ValueError, match=r"loss_fn.controller_update='epoch' is invalid: allowed one of"):
        loss_config({"method": "entropy_pi", "controller_update": "epoch"})
