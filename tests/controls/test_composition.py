"""The composition rule of docs/controls.md: its pair table is what the config accepts and refuses (parsed from the
doc, so the two cannot drift), refused pairs fail naming both controls and the reason, and every allowed pair's loss
and logit gradient equal a float64 oracle built from each paper's per-token formula and the stated rule

    loss_i = (surrogate_i + policy-gradient terms_i) x policy-gradient weights_i + regularisers_i

(normalised over the step's valid tokens). The oracle takes from the plan only what each control's own tests check
against its paper (the covariance selections, the top-entropy set, the controllers' coefficients and signal); how
the per-token changes combine is written here, not read from nemo_entropy.losses."""

from __future__ import annotations

import itertools
import math
import pathlib
import re

import pytest
import torch

from nemo_entropy.config import loss_config
from nemo_entropy.controls import REGISTRY, ControlSet

from ..support.entropy_controls import D, clamped_entropy64, entropy64, our_loss, plan_step, step_batch

DOC = pathlib.Path(__file__).resolve().parents[2] / "docs" / "controls.md"


def _pair_table() -> dict[tuple[str, str], str]:
    """``{(a, b): verdict}`` from the pair table of docs/controls.md."""
    rows = {}
    for line in DOC.read_text().splitlines():
        match = re.match(r"\| `([a-z_]+)` \+ `([a-z_]+)` \| (allowed|refused: [a-z ]+) \|", line)
        if match:
            pair = (match.group(1), match.group(2))
            assert pair not in rows, f"pair {pair} twice in docs/controls.md"
            rows[pair] = match.group(3)
    return rows


TABLE = _pair_table()


def test_the_table_has_every_pair_of_registered_controls_once():
    expected = set(itertools.combinations(REGISTRY, 2))
    assert set(TABLE) == expected and len(TABLE) == 55


@pytest.mark.parametrize("pair", sorted(TABLE), ids="+".join)
def test_the_config_accepts_and_refuses_as_the_table_says(pair):
    a, b = pair
    verdict = TABLE[pair]
    for method, other in ((a, b), (b, a)):  # either may be the method
        if verdict == "allowed":
            cfg = loss_config({"method": method, "controls": [other]})
            assert set(cfg.active_controls) == {a, b}
        else:
            reason = verdict.removeprefix("refused: ")
            with pytest.raises(ValueError, match=rf"controls '({a}|{b})' and '({a}|{b})' cannot be combined \(both are "
                                                 rf"a {reason}\)"):
                loss_config({"method": method, "controls": [other]})


def test_a_larger_set_is_refused_when_one_of_its_pairs_is():
    loss_config({"method": "clip_cov", "controls": ["top_entropy", "w_reinforce", "entropy_advantage", "entropy_pi",
                                                    "entropy_bonus"]})
    with pytest.raises(ValueError, match="'adaptive_entropy' and 'entropy_pi' cannot be combined"):
        loss_config({"method": "clip_cov", "controls": ["top_entropy", "adaptive_entropy", "entropy_pi"]})


# ----------------------------------------------------------------------------------------------- the float64 oracle
EPS = 0.1
KEYS = {
    "clip_cov": {"clip_cov_ratio": 0.2, "clip_cov_lb": 0.0, "clip_cov_ub": 50.0},
    "kl_cov": {"kl_cov_ratio": 0.1, "kl_cov_coef": 0.7},
    "top_entropy": {"top_entropy_quantile": 0.4},
    "w_reinforce": {"w_reinforce_lambda": 0.1},
    "gppo": {"gppo_beta_low": 0.75, "gppo_beta_high": 1.0},
    "entropy_advantage": {"entropy_advantage_alpha": 0.4, "entropy_advantage_kappa": 2.0},
    "entropy_bonus": {"entropy_coef": 0.3},
    "adaptive_entropy": {"entropy_coef": 0.2, "entropy_target": 10.0},
    "aent": {"aent_coef": 0.2, "aent_clamp": 0.3, "aent_coef_box_high": 0.5},
    "entropy_pi": {"entropy_pi_target": 3.0, "entropy_pi_prob_threshold": 0.3, "entropy_pi_ki": 0.0},
}
OWNS_SURROGATE = {"kl_cov", "gppo"}


def _data():
    """A step with many high-probability targets (the greedy token in half the rows: EntroPIC's gate) and ratios
    outside the clip range on both sides (GPPO's regions)."""
    data = step_batch(seed=81, batch=10, length=9, spread=0.6, scale=3.0)
    greedy = data["old_logits"].argmax(-1)
    data["targets"][::2] = greedy[::2]
    data["old_logprobs"] = torch.log_softmax(data["old_logits"], -1).gather(-1, data["targets"][..., None]).squeeze(-1)
    return data


def oracle(names: set, data: dict, values: dict):
    """``(loss, d loss / d logits)`` in float64 of the controls ``names`` composed by the rule."""
    logits = data["logits"].clone().requires_grad_(True)
    logp = torch.log_softmax(logits, -1).gather(-1, data["targets"][..., None]).squeeze(-1)
    mask = data["mask"]
    m = mask.to(D)
    adv0 = data["adv"]
    r = torch.exp(logp - data["old_logprobs"])
    entropy = entropy64(logits)
    adv = adv0
    if "entropy_advantage" in names:  # Cheng et al.: A + min(alpha sg(H), |A| / kappa), before everything else
        adv = adv0 + torch.minimum(0.4 * entropy.detach(), adv0.abs() / 2.0)
    # the surrogate
    ppo = torch.maximum(-adv * r, -adv * torch.clamp(r, 1 - EPS, 1 + EPS))
    if "kl_cov" in names:  # the entropy-mechanism paper's KL-Cov: -A r, no clip
        surrogate = -adv * r
    elif "gppo" in names:  # CE-GPPO: clipped tokens keep beta (1 -+ eps) A r / sg(r); the value stays PPO's
        low = mask & (adv < 0) & (r.detach() < 1 - EPS)
        high = mask & (adv > 0) & (r.detach() > 1 + EPS)
        scale = torch.where(low, 0.75 * (1 - EPS), 1.0 * (1 + EPS))
        kept = -scale * adv * r / r.detach()
        surrogate = torch.where(low | high, kept - kept.detach() + ppo.detach(), ppo)
    else:
        surrogate = ppo
    # policy-gradient terms
    pg_terms = torch.zeros_like(logp)
    if "entropy_pi" in names:  # EntroPIC: u r |A| on the gated tokens, a mean over them
        gated = mask & (data["old_logprobs"] > math.log(0.3))
        n, n_gated = float(m.sum()), float(gated.sum())
        pg_terms = pg_terms + torch.where(gated, values["entropy_pi"]["control"] * r * adv.abs() * n / n_gated,
                                          torch.zeros_like(r))
    # policy-gradient weights
    weight = torch.ones_like(logp)
    if "clip_cov" in names:
        weight = weight * (~values["clip_cov"]["selected"]).to(D)
    if "top_entropy" in names:
        weight = weight * values["top_entropy"]["kept"].to(D)
    if "w_reinforce" in names:  # W-REINFORCE: lambda on positive samples (sign of the batch's own advantages)
        positive = ((adv0 * m).sum(-1, keepdim=True) > 0).expand_as(logp)
        weight = weight * torch.where(positive, 0.1, 1.0).to(D)
    # regularisers
    regularisers = torch.zeros_like(logp)
    if "kl_cov" in names:
        regularisers = regularisers + torch.where(values["kl_cov"]["selected"], 0.7 * (logp - data["old_logprobs"]).abs(),
                                                  torch.zeros_like(logp))
    if "entropy_bonus" in names:
        regularisers = regularisers - 0.3 * entropy
    if "adaptive_entropy" in names:
        regularisers = regularisers - values["adaptive_entropy"]["coef"] * entropy
    if "aent" in names:
        regularisers = regularisers - values["aent"]["coef"] * clamped_entropy64(logits, 0.3)
    per_token = (surrogate + pg_terms) * weight + regularisers
    loss = (per_token * m).sum() / m.sum()
    loss.backward()
    return float(loss.detach()), logits.grad


def _config(names):
    first, *rest = names
    keys = {k: v for name in names for k, v in KEYS.get(name, {}).items()}
    return loss_config({"method": first, "controls": rest, "ratio_clip_min": EPS, "ratio_clip_max": EPS, **keys})


def _ours_and_oracle(names):
    data = _data()
    cfg = _config(names)
    controls = ControlSet(cfg)
    plan = plan_step(cfg, data, step=3, controls=controls)
    loss, grad, _ = our_loss(cfg, data, plan, controls, micro_batch=3)
    return data, plan, loss, grad


ALLOWED = sorted(pair for pair, verdict in TABLE.items() if verdict == "allowed")


@pytest.mark.parametrize("pair", ALLOWED, ids="+".join)
def test_every_allowed_pair_matches_the_float64_oracle(pair):
    data, plan, loss, grad = _ours_and_oracle(pair)
    ref, ref_grad = oracle(set(pair), data, plan.values)
    assert loss == pytest.approx(ref, rel=1e-5, abs=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_the_data_exercises_every_interaction():
    """The oracle test would not tell a wrong composition apart if the masks did not overlap: check they do."""
    data = _data()
    cfg = _config(("clip_cov", "top_entropy", "w_reinforce", "entropy_pi"))
    plan = plan_step(cfg, data, step=3, controls=ControlSet(cfg))
    gated = data["mask"] & (data["old_logprobs"] > math.log(0.3))
    positive = data["mask"] & (data["adv"] > 0)
    assert bool((gated & plan.values["clip_cov"]["selected"]).any())
    assert bool((gated & ~plan.values["top_entropy"]["kept"] & data["mask"]).any())
    assert bool((gated & positive).any()) and plan.values["entropy_pi"]["control"] != 0
    r = torch.exp(torch.log_softmax(data["logits"], -1).gather(-1, data["targets"][..., None]).squeeze(-1)
                  - data["old_logprobs"])
    assert bool((data["mask"] & (r < 1 - EPS)).any()) and bool((data["mask"] & (r > 1 + EPS)).any())


@pytest.mark.parametrize("weight", ["clip_cov", "top_entropy", "w_reinforce"])
def test_entropic_follows_the_policy_gradient_weights(weight):
    """The pairs the rule exists for: EntroPIC's term multiplied by the other control's weight (the oracle), not added
    after it (the earlier composition, which gave a correct sample's gated token the weight ``lambda - u``)."""
    data, plan, loss, grad = _ours_and_oracle((weight, "entropy_pi"))
    ref, ref_grad = oracle({weight, "entropy_pi"}, data, plan.values)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    # The earlier composition: the term added after the weight.
    _, weight_only = oracle({weight}, data, plan.values)
    _, pi_only = oracle({"entropy_pi"}, data, plan.values)
    _, ppo_only = oracle(set(), data, plan.values)
    unweighted = weight_only + (pi_only - ppo_only)
    assert not torch.allclose(unweighted, ref_grad, rtol=1e-3, atol=1e-6)
