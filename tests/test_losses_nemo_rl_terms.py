"""NeMo-RL's extra loss terms and diagnostics (nemo_entropy.losses.nemo_rl_terms / diagnostics) against
independent float64 math.

References used: exact expectations over small categorical distributions (k1/k3 are unbiased KL
estimators), closed forms written with probabilities instead of log-probs, autograd of a hand-written
objective, and the micro-batch summation property of global normalisation.
"""

from __future__ import annotations

import math

import pytest
import torch

from nemo_entropy.config import loss_config
from nemo_entropy.losses import diagnostics, nemo_rl_terms

D = torch.float64


def _batch(seed: int = 0, batch: int = 6, length: int = 9):
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=gen, dtype=D) * 3 - 0.05
    generation = old + 0.3 * torch.randn(batch, length, generator=gen, dtype=D)
    generation = generation.clamp(max=-1e-3)
    current = old + 0.2 * torch.randn(batch, length, generator=gen, dtype=D)
    reference = old + 0.5 * torch.randn(batch, length, generator=gen, dtype=D)
    lengths = torch.randint(1, length + 1, (batch,), generator=gen)
    token_mask = (torch.arange(length)[None, :] < lengths[:, None]).double()
    sample_mask = torch.ones(batch, dtype=D)
    sample_mask[-1] = 0.0
    mask = token_mask * sample_mask[:, None]
    return dict(old=old, gen=generation, cur=current, ref=reference, mask=mask, sample_mask=sample_mask)


def test_kl_estimators_are_unbiased_on_exact_expectations():
    gen = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(7, generator=gen, dtype=D), 0)
    q = torch.softmax(torch.randn(7, generator=gen, dtype=D), 0)
    true_kl = float((p * (p.log() - q.log())).sum())
    for kind in ("k1", "k3"):
        per_outcome = nemo_rl_terms.kl_estimate(p.log(), q.log(), kind)
        assert float((p * per_outcome).sum()) == pytest.approx(true_kl, rel=1e-12)
    # k2 is 0.5 * E[(log p - log q)^2]
    k2 = float((p * nemo_rl_terms.kl_estimate(p.log(), q.log(), "k2")).sum())
    assert k2 == pytest.approx(0.5 * float((p * (p.log() - q.log()) ** 2).sum()), rel=1e-12)
    with pytest.raises(ValueError, match="reference_policy_kl_type='k4'"):
        nemo_rl_terms.kl_estimate(p.log(), q.log(), "k4")


def test_kl_clamps_bound_input_and_output():
    logprobs = torch.tensor([-0.1, -30.0, -0.2, -0.1], dtype=D)
    reference = torch.tensor([-40.0, -0.1, -0.2, -2.1], dtype=D)
    only_input = nemo_rl_terms.kl_estimate(logprobs, reference, "k3", input_clamp=5.0)
    # x = ref - logprob is clamped to [-5, 5] before k3 = exp(x) - 1 - x
    assert float(only_input[0]) == pytest.approx(math.exp(-5.0) - 1 + 5.0, rel=1e-12)
    assert float(only_input[1]) == pytest.approx(math.exp(5.0) - 1 - 5.0, rel=1e-12)
    both = nemo_rl_terms.kl_estimate(logprobs, reference, "k3", input_clamp=5.0, output_clamp=3.0)
    assert both.tolist()[:3] == [3.0, 3.0, 0.0]
    assert float(both[3]) == pytest.approx(math.exp(-2.0) - 1 + 2.0, rel=1e-12)


def test_reference_kl_value_gradient_and_microbatch_sum():
    b = _batch()
    cfg = loss_config(dict(reference_policy_kl_penalty=0.3, reference_policy_kl_type="k3",
                           kl_input_clamp_value=None, kl_output_clamp_value=None))
    n = b["mask"].sum()
    cur = b["cur"].clone().requires_grad_(True)
    term, metrics = nemo_rl_terms.reference_kl_penalty(cfg, cur, b["ref"], b["gen"], b["mask"], global_valid_tokens=n)
    x = b["ref"] - b["cur"]
    k3 = torch.exp(x) - 1 - x
    expected = 0.3 * (k3 * b["mask"]).sum() / n
    assert float(term.detach()) == pytest.approx(float(expected), rel=1e-12)
    assert metrics["kl_penalty"] == pytest.approx(float(expected) / 0.3, rel=1e-12)
    term.backward()
    # d/dl [sg-weight 1 with score term] = kl + dk3/dl = k3 - (exp(x) - 1)
    grad = 0.3 * (k3 - (torch.exp(x) - 1)) * b["mask"] / n
    torch.testing.assert_close(cur.grad, grad, rtol=1e-12, atol=1e-14)
    # micro-batches sum to the batch value
    parts = sum(
        float(nemo_rl_terms.reference_kl_penalty(cfg, b["cur"][i:i + 2], b["ref"][i:i + 2], None, b["mask"][i:i + 2],
                                       global_valid_tokens=n)[0])
        for i in range(0, 6, 2)
    )
    assert parts == pytest.approx(float(expected), rel=1e-12)


def test_reference_kl_on_policy_approximation_and_sequence_level():
    b = _batch(2)
    cfg = loss_config(dict(reference_policy_kl_penalty=1.0, reference_policy_kl_type="k1",
                           use_on_policy_kl_approximation=True, kl_input_clamp_value=None, kl_output_clamp_value=None,
                           token_level_loss=False))
    seqs = b["sample_mask"].sum()
    term, _ = nemo_rl_terms.reference_kl_penalty(cfg, b["cur"], b["ref"], b["gen"], b["mask"], global_valid_seqs=seqs)
    per_token = torch.exp(b["cur"] - b["gen"]) * (b["cur"] - b["ref"])
    expected = 0.0
    for i in range(6):
        if b["sample_mask"][i] and b["mask"][i].sum() > 0:
            expected += float((per_token[i] * b["mask"][i]).sum() / b["mask"][i].sum())
    assert float(term) == pytest.approx(expected / float(seqs), rel=1e-12)


def test_reference_kl_disabled_by_zero_penalty_or_kl_in_reward():
    b = _batch()
    for cfg in (loss_config(dict(reference_policy_kl_penalty=0.0)),
                loss_config(dict(reference_policy_kl_penalty=0.5, use_kl_in_reward=True))):
        term, metrics = nemo_rl_terms.reference_kl_penalty(cfg, b["cur"], None, None, b["mask"], global_valid_tokens=10)
        assert float(term) == 0.0 and metrics["kl_penalty"] == 0.0
    with pytest.raises(ValueError, match="reference_policy_kl_penalty=0.5"):
        nemo_rl_terms.reference_kl_penalty(loss_config(dict(reference_policy_kl_penalty=0.5)), b["cur"], None, None, b["mask"])


@pytest.mark.parametrize("kind", ["tis", "icepop", "seq-mask-tis", None])
def test_importance_weights_truncation(kind):
    b = _batch(3)
    n, seqs = b["mask"].sum(), b["sample_mask"].sum()
    cfg = loss_config(dict(use_importance_sampling_correction=True, truncated_importance_sampling_type=kind,
                           truncated_importance_sampling_ratio=None if kind is None else 1.1,
                           truncated_importance_sampling_ratio_min=None if kind in (None, "tis") else 0.9))
    weights, metrics = nemo_rl_terms.importance_weights(cfg, b["old"], b["gen"], b["mask"], global_valid_tokens=n,
                                              global_valid_seqs=seqs, sample_mask=b["sample_mask"])
    p_old, p_gen = b["old"].exp(), b["gen"].exp()
    raw = p_old / p_gen
    if kind is None:
        expected = raw
    elif kind == "tis":
        expected = raw.clamp(0.0, 1.1)
        oob = ((raw > 1.1).double() * b["mask"]).sum() / n
        assert metrics["is_oob_ratio"] == pytest.approx(float(oob), rel=1e-12)
    elif kind == "icepop":
        kept = (raw >= 0.9) & (raw <= 1.1)
        expected = torch.where(kept, raw, 0.0)
        assert metrics["is_oob_ratio"] == pytest.approx(float(((~kept).double() * b["mask"]).sum() / n), rel=1e-12)
    else:
        geo = []
        for i in range(6):
            valid = b["mask"][i].bool()
            geo.append(float(raw[i][valid].log().mean().exp()) if valid.any() else 1.0)
        kept = torch.tensor([0.9 <= g <= 1.1 for g in geo], dtype=torch.float64)
        expected = raw * kept[:, None]
        assert metrics["is_oob_ratio"] == pytest.approx(float(((1 - kept) * b["sample_mask"]).sum() / seqs), rel=1e-12)
    masked = b["mask"].bool()
    torch.testing.assert_close(weights[masked], expected[masked], rtol=1e-12, atol=0)
    assert metrics["sampling_importance_ratio"] == pytest.approx(float((expected * b["mask"]).sum() / n), rel=1e-12)


def test_importance_weights_off_are_ones_but_still_reported():
    b = _batch(4)
    weights, metrics = nemo_rl_terms.importance_weights(loss_config({}), b["old"], b["gen"], b["mask"], global_valid_tokens=b["mask"].sum())
    assert torch.equal(weights, torch.ones_like(b["old"]))
    ratio = (b["old"].exp() / b["gen"].exp() * b["mask"]).sum() / b["mask"].sum()
    assert metrics["sampling_importance_ratio"] == pytest.approx(float(ratio), rel=1e-12)


def test_sequence_level_importance_weights_are_products_of_token_ratios():
    b = _batch(5)
    cfg = loss_config(dict(use_importance_sampling_correction=True, sequence_level_importance_ratios=True,
                           token_level_loss=False))
    seqs = b["sample_mask"].sum()
    weights, metrics = nemo_rl_terms.importance_weights(cfg, b["old"], b["gen"], b["mask"], global_valid_seqs=seqs,
                                              sample_mask=b["sample_mask"])
    ratio = b["old"].exp() / b["gen"].exp()
    product = torch.where(b["mask"].bool(), ratio, torch.ones_like(ratio)).prod(dim=-1)
    torch.testing.assert_close(weights.squeeze(-1), product, rtol=1e-10, atol=0)
    assert metrics["sampling_importance_ratio"] == pytest.approx(float((product * b["sample_mask"]).sum() / seqs),
                                                                 rel=1e-10)


def test_positive_example_nll():
    b = _batch(6)
    rewards = torch.tensor([1.0, 0.0, 1.0, -1.0, 1.0, 1.0], dtype=D)
    term, metrics = nemo_rl_terms.positive_example_nll(loss_config(dict(positive_example_nll_weight=0.5)), b["cur"], rewards, b["mask"])
    rows = [i for i in range(6) if rewards[i] > 0]
    tokens = torch.cat([b["cur"][i][b["mask"][i].bool()] for i in rows])
    assert metrics["positive_nll_loss"] == pytest.approx(float(-tokens.mean()), rel=1e-12)
    assert float(term) == pytest.approx(0.5 * float(-tokens.mean()), rel=1e-12)
    zero, m0 = nemo_rl_terms.positive_example_nll(loss_config(dict(positive_example_nll_weight=0.5)), b["cur"], -rewards.abs(), b["mask"])
    assert float(zero) == 0.0 and m0["positive_nll_loss"] == 0.0
    with pytest.raises(ValueError, match="rewards must have shape"):
        nemo_rl_terms.positive_example_nll(loss_config(dict(positive_example_nll_weight=0.5)), b["cur"], rewards[:3], b["mask"])


def test_generation_mismatch_metrics_from_probabilities():
    b = _batch(7)
    n = b["mask"].sum()
    metrics = diagnostics.generation_mismatch_metrics(loss_config({}), b["old"], b["gen"], b["mask"], global_valid_tokens=n)
    p, q = b["old"].exp(), b["gen"].exp()
    m = 0.5 * (p + q)
    js = 0.5 * (p / m - 1 - torch.log(p / m)) + 0.5 * (q / m - 1 - torch.log(q / m))
    mean = lambda t: float((t * b["mask"]).sum() / n)  # noqa: E731
    assert metrics["js_divergence_error"] == pytest.approx(mean(js), rel=1e-10)
    assert metrics["token_mult_prob_error"] == pytest.approx(mean(torch.maximum(p / q, q / p)), rel=1e-12)
    # k3 with x = log(p_old / p_gen): KL(gen || old) estimate
    assert metrics["gen_kl_error"] == pytest.approx(mean(p / q - 1 - torch.log(p / q)), rel=1e-12)
    assert metrics["policy_kl_error"] == pytest.approx(mean(q / p - 1 - torch.log(q / p)), rel=1e-12)
    same = diagnostics.generation_mismatch_metrics(loss_config({}), b["old"], b["old"], b["mask"], global_valid_tokens=n)
    assert same["js_divergence_error"] == pytest.approx(0.0, abs=1e-14)
    assert same["token_mult_prob_error"] == pytest.approx(1.0, rel=1e-12)


def test_metric_normalizations_follow_the_flags():
    assert diagnostics.metric_normalizations(loss_config({}))["kl_penalty"] == "tokens"
    seq = diagnostics.metric_normalizations(loss_config(dict(token_level_loss=False, sequence_level_importance_ratios=True)))
    assert seq["kl_penalty"] == "sequences" and seq["sampling_importance_ratio"] == "sequences"
    tis = diagnostics.metric_normalizations(loss_config(dict(
        use_importance_sampling_correction=True, truncated_importance_sampling_type="seq-mask-tis",
        truncated_importance_sampling_ratio=2.0, truncated_importance_sampling_ratio_min=0.5)))
    assert tis["is_oob_ratio"] == "sequences"
