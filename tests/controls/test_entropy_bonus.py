"""``entropy_bonus``: the loss ``reduce(surrogate - c H)`` and its gradient with respect to the logits (through the
entropy's own gradient) against autograd of a hand-written float64 objective, at the token and the sequence level,
for several micro-batch sizes; its metrics; its config errors."""

from __future__ import annotations

import pytest
import torch

from nemo_entropy.config import loss_config
from nemo_entropy.controls import ControlSet

from ..support.entropy_controls import entropy64, normalise64, our_loss, plan_step, reference_loss, step_batch


@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("micro_batch", [1, 3, 8])
def test_loss_and_logit_gradient_match_float64(token_level, micro_batch):
    data = step_batch(seed=11)
    coef = 0.3  # large, so that a wrong entropy gradient cannot hide under the surrogate's
    cfg = loss_config({"method": "entropy_bonus", "entropy_coef": coef, "token_level_loss": token_level})
    controls = ControlSet(cfg)
    plan = plan_step(cfg, data, step=0, controls=controls)
    loss, grad, metrics = our_loss(cfg, data, plan, controls, micro_batch=micro_batch)
    ref, ref_grad = reference_loss(data, lambda t: -coef * entropy64(t["logits"]), token_level=token_level)
    assert loss == pytest.approx(float(ref), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    # The entropy's gradient is really in there: without the term the gradient fails a 100x looser tolerance.
    _, ppo_grad = reference_loss(data, lambda t: None, token_level=token_level)
    assert not torch.allclose(ppo_grad, ref_grad, rtol=1e-2, atol=1e-4)
    # Metrics: the term's share of the loss (normalised like it) and the coefficient as token shares.
    mask = data["mask"]
    assert metrics["entropy_loss"] == pytest.approx(float(normalise64(-coef * entropy64(data["logits"]), mask,
                                                                      token_level)), rel=1e-5)
    assert metrics["entropy_coef"] == pytest.approx(coef, rel=1e-6)


def test_zero_coefficient_logs_the_term_and_leaves_the_loss_alone():
    data = step_batch(seed=12)
    cfg = loss_config({"method": "entropy_bonus"})  # entropy_coef defaults to 0, as in TRL and verl
    controls = ControlSet(cfg)
    loss, grad, metrics = our_loss(cfg, data, plan_step(cfg, data, step=0, controls=controls), controls, micro_batch=4)
    ref, ref_grad = reference_loss(data, lambda t: None)
    assert loss == pytest.approx(float(ref), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert metrics["entropy_loss"] == 0.0 and metrics["entropy_coef"] == 0.0


def test_the_loss_refuses_to_run_without_the_entropy():
    data = step_batch(seed=13)
    cfg = loss_config({"method": "entropy_bonus", "entropy_coef": 0.1})
    x = data["logits"].float().log_softmax(-1).gather(-1, data["targets"][..., None]).squeeze(-1)
    from nemo_entropy.losses import policy_loss

    with pytest.raises(ValueError, match=r"\['entropy_bonus'\] need the current full-vocabulary entropy"):
        policy_loss(cfg, x, data["old_logprobs"].float(), data["adv"].float(), data["mask"])


@pytest.mark.parametrize("values,message", [
    ({"entropy_coef": -0.1}, "loss_fn.entropy_coef=-0.1 is invalid: allowed >= 0"),
    ({"entropy_coef": "a"}, "loss_fn.entropy_coef='a' is invalid"),
    ({"controls": ["entropy_bonus"]}, "controls distinct from each other and from method='entropy_bonus'"),
])
def test_config_errors_name_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        loss_config({"method": "entropy_bonus", **values})
