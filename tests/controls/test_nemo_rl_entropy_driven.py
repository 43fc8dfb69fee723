"""The entropy-driven controls on the NeMo-RL path: a cluster config dry-runs with each of them; LOGPROB input is
refused by name for the controls that need the logits; and the adapter, called as NeMo-RL >= v0.6 calls a LOGIT
loss on batches that carry the driver's plan (``attach_step_plans``, with ``entropy_old`` for the controls that
need the old entropy), gives the float64 loss and logit gradient, micro-batches summing to the full batch, with
the driver's controls advancing once per optimizer step."""

from __future__ import annotations

import math

import pytest
import torch

from nemo_entropy import train
from nemo_entropy.config import loss_config
from nemo_entropy.controls import ControlSet
from nemo_entropy.integrations import EntropyControlLossFn, attach_step_plans, batch_keys
from nemo_entropy.integrations.batch_keys import plan_from_batch

from ..support.entropy_controls import clamped_entropy64, clipped_surrogate64, entropy64
from ..test_integrations_nemo_rl import B, D, _batch, _counts, _slice

CONFIGS = {
    "entropy_bonus": {"method": "entropy_bonus", "entropy_coef": 0.3},
    "adaptive_entropy": {"method": "adaptive_entropy", "entropy_coef": 0.2, "entropy_target": 10.0},
    "aent": {"method": "aent", "aent_coef": 0.2, "aent_clamp": 0.3, "aent_coef_box_high": 0.5},
    "entropy_pi": {"method": "entropy_pi", "entropy_pi_target": 3.0, "entropy_pi_prob_threshold": 0.2},
}
NEEDS_LOGITS = ("entropy_bonus", "adaptive_entropy", "aent")


# ----------------------------------------------------------------------------------------------- run configs
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_cluster_config_dry_runs_with_the_control_and_logit_input(name, capsys):
    argv = ["--config-name", "grpo_32b_baseline", "--dry-run", f"loss_fn.method={name}", "nemo_rl.input_type=logit"]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert f"method: {name}" in out and "EntropyControlLossFn(input_type=logit)" in out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logprob_input_is_refused_naming_both_keys_for_the_controls_that_need_logits(name, capsys):
    code = train.main(["--config-name", "grpo_32b_baseline", "--dry-run", f"loss_fn.method={name}"])
    if name not in NEEDS_LOGITS:  # EntroPIC reads log-probs and the old entropy only
        assert code == 0
        return
    assert code == 2
    err = capsys.readouterr().err
    assert f"loss_fn.method='{name}'" in err and "nemo_rl.input_type='logprob'" in err and "input_type=logit" in err
    with pytest.raises(ValueError, match="set nemo_rl.input_type=logit"):
        EntropyControlLossFn(CONFIGS[name])


# ----------------------------------------------------------------------------------------------- the adapter
def _nemo_rl_batch(seed):
    """NeMo-RL's micro-batch (tests/test_integrations_nemo_rl.py) plus the old policy's entropy ``entropy_old``
    ([B, S], position t: the distribution that produced token t), from old logits near the current ones."""
    logits, _, data = _batch(seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    old_logits = logits + 0.3 * torch.randn(logits.shape, generator=gen, dtype=D)
    ids = data["input_ids"]
    old_lp = torch.log_softmax(old_logits[:, :-1], -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    data["prev_logprobs"] = torch.cat([torch.zeros(B, 1, dtype=D), old_lp], 1)
    data["generation_logprobs"] = data["prev_logprobs"].clone()
    data[batch_keys.OLD_ENTROPY] = torch.cat([torch.zeros(B, 1, dtype=D), entropy64(old_logits[:, :-1])], 1).float()
    return logits, data


def _reference(name, logits, data, rows, gvt):
    """float64 loss of ``rows`` and its gradient with respect to their logits, from the formulas and the step's
    measured old entropy (fresh controls: the first step's coefficients)."""
    m_all = (data["token_mask"][:, 1:] * data["sample_mask"][:, None]).bool()
    h_old = float((data[batch_keys.OLD_ENTROPY][:, 1:].double() * m_all).sum() / m_all.sum())
    x = logits[rows].clone().requires_grad_(True)
    lp = torch.log_softmax(x[:, :-1], -1).gather(-1, data["input_ids"][rows, 1:, None]).squeeze(-1)
    adv = data["advantages"][rows, 1:]
    surrogate, ratio = clipped_surrogate64(lp, data["prev_logprobs"][rows, 1:], adv)
    if name == "entropy_bonus":
        term = -0.3 * entropy64(x[:, :-1])
    elif name == "adaptive_entropy":
        term = -0.2 * entropy64(x[:, :-1])  # gate open: the target is far above the batch's entropy
    elif name == "aent":
        term = -0.2 * clamped_entropy64(x[:, :-1], 0.3)
    else:  # EntroPIC's term, a mean over the step's gated tokens (old probability > 0.2), as its authors' code
        u = min(max(3.0 - h_old, -1.0), 1.0)
        gated_all = m_all & (data["prev_logprobs"][:, 1:] > math.log(0.2))
        gated = gated_all[rows]
        term = torch.where(gated, u * ratio * adv.abs(), torch.zeros_like(lp)) * (gvt / float(gated_all.sum()))
    m = m_all[rows].to(D)
    loss = ((surrogate + term) * m).sum() / gvt
    loss.backward()
    return float(loss.detach()), x.grad


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_adapter_with_the_attached_plan_and_logit_input_matches_float64(name):
    logits, data = _nemo_rl_batch(seed=61)
    cfg = {**CONFIGS[name], "reference_policy_kl_penalty": 0.0}
    driver_controls = ControlSet(loss_config(cfg))
    attach_step_plans(data, loss_config(cfg), train_global_batch_size=B, first_step=0, controls=driver_controls)
    gvs, gvt = _counts(data)
    fn = EntropyControlLossFn(cfg, input_type="logit")
    full = logits.float().clone().requires_grad_(True)
    loss, metrics = fn(data=data, global_valid_seqs=gvs, global_valid_toks=gvt, logits=full)
    loss.backward()
    ref_loss, ref_grad = _reference(name, logits, data, slice(None), float(gvt))
    assert float(loss) == pytest.approx(ref_loss, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(full.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    # NeMo-RL's micro-batches (here two of four samples and one of four) sum to the full batch.
    parts = logits.float().clone().requires_grad_(True)
    total, summed = 0.0, {}
    for rows in (slice(0, 4), slice(4, 5), slice(5, 8)):
        part_loss, part_metrics = fn(data=_slice(data, rows), global_valid_seqs=gvs, global_valid_toks=gvt,
                                     logits=parts[rows])
        part_loss.backward()
        total += float(part_loss)
        for k, v in part_metrics.items():
            if fn.metric_normalizations[k].value != "none" and not k.endswith(("_min", "_max")):
                summed[k] = summed.get(k, 0.0) + v
    assert total == pytest.approx(float(loss), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(parts.grad, full.grad, rtol=1e-5, atol=1e-8)
    for key in ("entropy_coef", "entropy_target", "entropy_loss", "entropy_pi_control"):
        if key in metrics:
            assert summed[key] == pytest.approx(metrics[key], rel=1e-6, abs=1e-9), key
            assert fn.metric_normalizations[key].value in ("tokens", "sequences")


STATE_KEY = {"adaptive_entropy": "coef_state", "aent": "coef", "entropy_pi": "integral"}


@pytest.mark.parametrize("update", ["rollout", "optimizer_step"])
@pytest.mark.parametrize("name", ["adaptive_entropy", "aent", "entropy_pi"])
def test_driver_controls_advance_at_their_cadence_and_the_plan_carries_each_steps_value(name, update):
    """One policy.train call of two optimizer steps: with ``controller_update: rollout`` both plans carry the state of
    the rollout's start and the state moves once after them; with ``optimizer_step`` the second plan carries the
    state moved by the first step."""
    _, data = _nemo_rl_batch(seed=62)
    moving = {"adaptive_entropy": {"entropy_target": 0.5}, "aent": {"aent_entropy_high": 0.6}}.get(name, {})
    cfg = loss_config({**CONFIGS[name], "reference_policy_kl_penalty": 0.0, "controller_update": update,
                       **moving})  # the state must move
    driver = ControlSet(cfg)
    steps = attach_step_plans(data, cfg, train_global_batch_size=4, first_step=10, controls=driver)
    assert steps == 2
    mirror = ControlSet(cfg)  # the same two steps, planned and updated one by one
    from nemo_entropy.plan import StepInputs, build_step_plan

    states = []
    for j, rows in enumerate((slice(0, 4), slice(4, 8))):
        attached = plan_from_batch(_slice(data, rows), global_valid_tokens=1, global_valid_seqs=1)
        mask = (data["token_mask"][rows, 1:] * data["sample_mask"][rows, None]) != 0
        plan = build_step_plan(cfg, StepInputs(data["prev_logprobs"][rows, 1:], data["advantages"][rows, 1:], mask,
                                               data[batch_keys.TOKEN_UIDS][rows, 1:],
                                               old_entropy=data[batch_keys.OLD_ENTROPY][rows, 1:]),
                               step=10 + j, controls=mirror)
        assert attached.step == 10 + j
        for key, value in plan.values[name].items():
            assert attached.values[name][key] == pytest.approx(value, abs=1e-12), (j, key)
        mirror.update(plan)
        states.append(attached.values[name][STATE_KEY[name]])
    mirror.end_rollout()
    assert driver.state_dict() == mirror.state_dict() and driver.state_dict() != ControlSet(cfg).state_dict()
    assert (states[0] == states[1]) == (update == "rollout")


def test_a_control_that_needs_the_logits_refuses_a_logprob_call():
    _, data = _nemo_rl_batch(seed=63)
    attach_step_plans(data, loss_config(CONFIGS["aent"]), train_global_batch_size=B, first_step=0)
    gvs, gvt = _counts(data)
    lp = data["prev_logprobs"][:, 1:].float()
    with pytest.raises(RuntimeError, match=r"\['aent'\] compute values from the logits shard"):
        EntropyControlLossFn(CONFIGS["aent"], input_type="logit")(data=data, global_valid_seqs=gvs,
                                                                  global_valid_toks=gvt, next_token_logprobs=lp)
