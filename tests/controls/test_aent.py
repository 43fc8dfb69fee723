"""``aent`` (AEnt, arXiv 2509.03493): the clamped-entropy bonus's loss and logit gradient against a float64
objective (the clamped entropy by sorting), the coefficient's trajectory against the rule written out by hand
(band, box, warm-up), and its state across a restore."""

from __future__ import annotations

import pytest
import torch

from nemo_entropy.config import loss_config
from nemo_entropy.controls import ControlSet

from ..support.entropy_controls import (check_resume_continues_exactly, clamped_entropy64, entropy64, normalise64, our_loss,
                              plan_step, reference_loss, run_stateful, step_batch)

BASE = {"method": "aent", "aent_coef": 0.2, "aent_clamp": 0.3, "aent_entropy_low": 0.9, "aent_entropy_high": 1.2,
        "aent_coef_lr": 0.1, "aent_coef_box_low": 0.05, "aent_coef_box_high": 0.25, "aent_warmup_steps": 2}


@pytest.mark.parametrize("adaptive", [True, False])
@pytest.mark.parametrize("token_level,micro_batch", [(True, 3), (False, 1), (True, 8)])
def test_clamped_bonus_loss_and_logit_gradient_match_float64(adaptive, token_level, micro_batch):
    data = step_batch(seed=31, vocab=13, scale=1.0)  # flat enough that the removed tail matters
    cfg = loss_config({**BASE, "aent_adaptive_coef": adaptive, "token_level_loss": token_level})
    controls = ControlSet(cfg)
    assert controls.needs == ({"logits", "old_entropy"} if adaptive else {"logits"})
    plan = plan_step(cfg, data, step=0, controls=controls)
    loss, grad, metrics = our_loss(cfg, data, plan, controls, micro_batch=micro_batch)
    term = lambda t: -0.2 * clamped_entropy64(t["logits"], 0.3)  # noqa: E731
    ref, ref_grad = reference_loss(data, term, token_level=token_level)
    assert loss == pytest.approx(float(ref), rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    # The clamp matters here: the full-entropy bonus's gradient fails a 100x looser tolerance than ours passes.
    _, full_grad = reference_loss(data, lambda t: -0.2 * entropy64(t["logits"]), token_level=token_level)
    assert not torch.allclose(full_grad, ref_grad, rtol=1e-2, atol=1e-4)
    mask = data["mask"]
    assert metrics["entropy_clamped"] == pytest.approx(float(normalise64(clamped_entropy64(data["logits"], 0.3),
                                                                         mask)), rel=1e-5)
    assert metrics["entropy_coef"] == pytest.approx(0.2, rel=1e-6)
    if adaptive:
        assert metrics["entropy_target"] == pytest.approx(1.05, rel=1e-6)
        assert (metrics["entropy_target_low"], metrics["entropy_target_high"]) == (pytest.approx(0.9),
                                                                                   pytest.approx(1.2))
    else:
        assert "entropy_target" not in metrics


def _run(cfg, steps, controls=None, first=0):
    """``steps`` optimizer steps from batch seed 300 (mean old entropy about 1.4, 1.0, 0.8 in turn)."""
    return run_stateful(cfg, "aent", steps, seed=300, controls=controls, first=first)


def test_coefficient_follows_the_rule_written_out_by_hand():
    cfg = loss_config(BASE)
    controls, seen = _run(cfg, 12)
    coef, sides = 0.2, set()
    for t, (values, h) in enumerate(seen):
        assert values["entropy_mean"] == pytest.approx(h, abs=1e-6)
        assert values["coef"] == pytest.approx(coef, abs=1e-12)
        if t >= 2:  # warm-up: the first two optimizer steps leave it alone
            h = values["entropy_mean"]  # checked against float64 above; the rule is then exact in float arithmetic
            distance = min(0.0, h - 0.9) + max(0.0, h - 1.2)
            sides.add((distance > 0) - (distance < 0))
            coef = min(max(coef - 0.1 * distance, 0.05), 0.25)
    assert sides == {-1, 0, 1}, "the batches must put the entropy below, inside and above the band"
    assert controls.state_dict() == {"aent": {"aent_coef": pytest.approx(coef, abs=1e-12)}}
    assert seen[0][0]["coef"] == seen[1][0]["coef"] == seen[2][0]["coef"] == 0.2


def test_a_restored_state_continues_exactly_like_the_uninterrupted_run():
    cfg = loss_config(BASE)
    check_resume_continues_exactly(cfg, _run, total=9, split=5)
    constant = loss_config({**BASE, "aent_adaptive_coef": False})
    assert ControlSet(constant).state_dict() == {}
    with pytest.raises(ValueError, match="cannot load state"):
        ControlSet(constant).load_state_dict({"aent": {"aent_coef": 0.1}})


@pytest.mark.parametrize("values,message", [
    ({"aent_clamp": 1.0}, r"loss_fn.aent_clamp=1.0 is invalid: allowed a fraction of the vocabulary in \[0, 1\)"),
    ({"aent_coef": 0.5}, r"loss_fn.aent_coef=0.5 is invalid: allowed inside the box \[loss_fn.aent_coef_box_low"),
    ({"aent_entropy_low": 0.6, "aent_entropy_high": 0.5}, "loss_fn.aent_entropy_low=0.6 is invalid"),
    ({"aent_coef_box_low": 0.02, "aent_coef_box_high": 0.01, "aent_coef": 0.01}, "loss_fn.aent_coef_box_low=0.02"),
    ({"aent_warmup_steps": -1}, "loss_fn.aent_warmup_steps=-1 is invalid"),
])
def test_config_errors_name_the_key(values, message):
    with pytest.raises(ValueError, match=message):
        loss_config({"method": "aent", **values})
    # a constant coefficient has no box to be in
    loss_config({"method": "aent", "aent_adaptive_coef": False, "aent_coef": 0.5})
