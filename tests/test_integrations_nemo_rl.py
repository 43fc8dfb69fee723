"""Contract tests of the NeMo-RL loss adapter (nemo_entropy.integrations.nemo_rl.EntropyControlLossFn).

* It is called exactly as each NeMo-RL generation calls a loss (v0.5 Megatron / DTensor, v0.6+ LOGPROB and
  LOGIT), with plain CPU tensors [B, S] used shifted by one, and returns a scalar and NeMo-RL's metrics.
* ``method: ppo`` equals an independent float64 re-implementation of ClippedPGLossFn (written below from its
  documented formula, not from its code): asymmetric and dual clip, reference KL k3, IS correction, GSPO,
  REINFORCE, forced on-policy ratio, CISPO; value and gradient.
* Losses, gradients and metrics of micro-batches on simulated DP ranks sum to the full-batch values.
"""

from __future__ import annotations

import math

import pytest
import torch

from nemo_entropy.config import loss_config
from nemo_entropy.integrations import EntropyControlLossFn, attach_step_plans
from nemo_entropy.integrations.batch_keys import plan_from_batch

D = torch.float64
B, S, V = 8, 12, 17


def _batch(seed=0, batch=B, length=S, vocab=V):
    """A NeMo-RL-shaped micro-batch: per-token tensors [B, S], position 0 is the prompt's first token."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=gen, dtype=D) * 2
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    lp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    pad = lambda t: torch.cat([torch.zeros(batch, 1, dtype=D), t], 1)  # noqa: E731
    lengths = torch.randint(3, length + 1, (batch,), generator=gen)
    token_mask = (torch.arange(length)[None] < lengths[:, None]).to(D)
    token_mask[:, 0] = 0  # the prompt token
    sample_mask = torch.ones(batch, dtype=D)
    sample_mask[1] = 0
    adv = torch.randn(batch, 1, generator=gen, dtype=D).expand(batch, length).clone()
    data = {
        "input_ids": ids,
        "token_mask": token_mask,
        "sample_mask": sample_mask,
        "advantages": adv,
        "prev_logprobs": pad(lp + 0.3 * torch.randn(batch, length - 1, generator=gen, dtype=D)),
        "generation_logprobs": pad(lp + 0.3 * torch.randn(batch, length - 1, generator=gen, dtype=D)),
        "reference_policy_logprobs": pad(lp + 0.5 * torch.randn(batch, length - 1, generator=gen, dtype=D)),
        "rewards": (adv[:, 0] > 0).to(D),
    }
    return logits, lp, data


def _counts(data):
    mask = data["token_mask"][:, 1:] * data["sample_mask"][:, None]
    return data["sample_mask"].sum(), mask.sum()


def _slice(data, rows):
    return {k: v[rows] for k, v in data.items()}


# ------------------------------------------------------------------------------------ reference (float64)
def reference_clipped_pg(cfg: dict, curr, data, gvs, gvt):
    """ClippedPGLossFn's documented loss, re-derived in float64: returns (loss, metrics)."""
    c = dict(ratio_clip_min=0.2, ratio_clip_max=0.2, ratio_clip_c=None, reference_policy_kl_penalty=0.01,
             kl_input_clamp_value=20.0, kl_output_clamp_value=10.0, token_level_loss=True,
             use_importance_sampling_correction=False, truncated_importance_sampling_ratio=None,
             sequence_level_importance_ratios=False, disable_ppo_ratio=False, force_on_policy_ratio=False,
             use_cispo=False)
    c.update(cfg)
    tmask = data["token_mask"][:, 1:]
    smask = data["sample_mask"]
    m = tmask * smask[:, None]
    A = data["advantages"][:, 1:]
    gen = data["generation_logprobs"][:, 1:]
    old = curr.detach() if c["force_on_policy_ratio"] else data["prev_logprobs"][:, 1:]

    def token_mean(x):
        return (x * m).sum() / gvt

    def seq_mean(x):
        per_seq = (x * tmask).sum(-1) / tmask.sum(-1).clamp(min=1)
        return (per_seq * smask).sum() / gvs

    reduce = token_mean if c["token_level_loss"] else seq_mean
    if c["force_on_policy_ratio"]:
        r = torch.exp(curr - curr.detach())
        rc = r
    elif c["disable_ppo_ratio"]:
        r, rc = curr, curr
    else:
        lr = curr - old
        if c["sequence_level_importance_ratios"]:
            lr = ((lr * tmask).sum(-1, keepdim=True) / tmask.sum(-1, keepdim=True)).expand_as(lr)
        r = torch.exp(lr)
        rc = torch.clamp(r, 1 - c["ratio_clip_min"], 1 + c["ratio_clip_max"])
    if c["use_cispo"]:
        per_token = -A * rc.detach() * curr
    else:
        per_token = torch.maximum(-A * r, -A * rc)
    if c["ratio_clip_c"] is not None:
        per_token = torch.where(A < 0, torch.minimum(per_token, -A * c["ratio_clip_c"]), per_token)
    if c["sequence_level_importance_ratios"]:
        w = torch.exp(((old - gen) * m).sum(-1, keepdim=True))
    else:
        w = torch.exp(old - gen)
    if c["truncated_importance_sampling_ratio"] is not None:
        w = w.clamp(0, c["truncated_importance_sampling_ratio"])
    actor = reduce((w if c["use_importance_sampling_correction"] else 1.0) * per_token)
    beta = c["reference_policy_kl_penalty"]
    kl_value = torch.zeros((), dtype=D)
    if beta:
        x = (data["reference_policy_logprobs"][:, 1:] - curr).clamp(-c["kl_input_clamp_value"],
                                                                    c["kl_input_clamp_value"])
        k3 = (torch.exp(curr - curr.detach()) * (torch.exp(x) - 1 - x)).clamp(max=c["kl_output_clamp_value"])
        kl_value = reduce(beta * k3)
    loss = actor + kl_value
    valid = m.bool()
    metrics = {
        "probs_ratio": float(token_mean(r.detach())),
        "probs_ratio_clamped": float(token_mean(rc.detach())),
        "probs_ratio_min": float(r.detach()[valid].min()),
        "probs_ratio_max": float(r.detach()[valid].max()),
        "kl_penalty": float(kl_value) / beta if beta else 0.0,
        "token_mult_prob_error": float(token_mean(torch.exp((gen - old).abs()))),
        "approx_entropy": float(token_mean(-torch.exp(curr.detach() - gen) * curr.detach())),
        "num_valid_samples": float(smask.sum()),
    }
    if not c["sequence_level_importance_ratios"]:
        metrics["sampling_importance_ratio"] = float(token_mean(w))
    return loss, metrics


PPO_CASES = {
    "grpo_default_with_k3_kl": dict(),
    "asymmetric_clip": dict(ratio_clip_min=0.2, ratio_clip_max=0.28, reference_policy_kl_penalty=0.0),
    "dual_clip": dict(ratio_clip_c=3.0, ratio_clip_min=0.1, ratio_clip_max=0.1, reference_policy_kl_penalty=0.05),
    "importance_sampling_tis": dict(use_importance_sampling_correction=True, truncated_importance_sampling_type="tis",
                                    truncated_importance_sampling_ratio=1.2),
    "gspo": dict(sequence_level_importance_ratios=True, token_level_loss=False, reference_policy_kl_penalty=0.02),
    "reinforce": dict(disable_ppo_ratio=True),
    "forced_on_policy": dict(force_on_policy_ratio=True, reference_policy_kl_penalty=0.0),
    "cispo": dict(use_cispo=True, ratio_clip_max=0.28),
}


@pytest.mark.parametrize("case", sorted(PPO_CASES))
def test_method_ppo_equals_clipped_pg_reference(case):
    cfg = PPO_CASES[case]
    _, lp, data = _batch(seed=1)
    gvs, gvt = _counts(data)
    ours_curr = lp.clone().requires_grad_(True)
    fn = EntropyControlLossFn({"method": "ppo", **cfg})
    loss, metrics = fn(data=data, global_valid_seqs=gvs, global_valid_toks=gvt, next_token_logprobs=ours_curr)
    ref_curr = lp.clone().requires_grad_(True)
    ref_loss, ref_metrics = reference_clipped_pg(cfg, ref_curr, data, gvs, gvt)
    assert loss.dim() == 0
    assert float(loss.detach()) == pytest.approx(float(ref_loss), rel=1e-5, abs=1e-7)
    loss.backward()
    ref_loss.backward()
    torch.testing.assert_close(ours_curr.grad.double(), ref_curr.grad, rtol=1e-4, atol=1e-7)
    for key, value in ref_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


# ------------------------------------------------------------------------------------ calling conventions
def test_every_nemo_rl_calling_convention_gives_the_same_loss():
    logits, lp, data = _batch(seed=2)
    gvs, gvt = _counts(data)
    cfg = {"method": "kl_cov", "kl_cov_ratio": 0.1, "reference_policy_kl_penalty": 0.0}
    attach_step_plans(data, loss_config(cfg), train_global_batch_size=B, first_step=0)
    logits32 = logits.float()

    def run(call):
        leaf = logits32.clone().requires_grad_(True)
        loss, metrics = call(EntropyControlLossFn(cfg), leaf)
        loss.backward()
        return float(loss), leaf.grad, metrics

    lp32 = lambda x: torch.log_softmax(x, -1)[:, :-1].gather(-1, data["input_ids"][:, 1:, None]).squeeze(-1)  # noqa: E731
    results = {
        # <= v0.5, Megatron: logits first, the rest as keywords with TP/CP groups (None: TP 1, CP 1)
        "v05_megatron": run(lambda f, x: f(x, data=data, global_valid_seqs=gvs, global_valid_toks=gvt,
                                           vocab_parallel_rank=0, vocab_parallel_group=None,
                                           context_parallel_group=None)),
        # <= v0.5, DTensor worker: all positional
        "v05_dtensor": run(lambda f, x: f(x, data, gvs, gvt)),
        # >= v0.6, LOGPROB input: next_token_logprobs [B, S-1]
        "v06_logprob": run(lambda f, x: f(data=data, global_valid_seqs=gvs, global_valid_toks=gvt,
                                          next_token_logprobs=lp32(x))),
        # >= v0.6, LOGIT input
        "v06_logit": run(lambda f, x: f(data=data, global_valid_seqs=gvs, global_valid_toks=gvt, logits=x)),
    }
    base_loss, base_grad, _ = results["v06_logprob"]
    for name, (loss, grad, metrics) in results.items():
        assert loss == pytest.approx(base_loss, rel=1e-5, abs=1e-7), name
        torch.testing.assert_close(grad, base_grad, rtol=1e-4, atol=1e-7)
    # Full-vocabulary entropy is logged when logits are available, pre-divided by the global token count.
    mask = data["token_mask"][:, 1:] * data["sample_mask"][:, None]
    p = torch.softmax(logits[:, :-1], -1)
    entropy = -(p * torch.log(p)).sum(-1)
    expected = float((entropy * mask).sum() / gvt)
    for name in ("v05_megatron", "v05_dtensor", "v06_logit"):
        assert results[name][2]["entropy"] == pytest.approx(expected, rel=1e-5), name
    assert "entropy" not in results["v06_logprob"][2]


def test_interface_attributes_and_metric_normalizations():
    fn = EntropyControlLossFn({"method": "clip_cov", "truncated_importance_sampling_ratio": 2.0,
                               "use_importance_sampling_correction": True}, plan="worker")
    assert fn.loss_type.value == "token_level" and fn.input_type.value == "logprob"
    assert fn.config.truncated_importance_sampling_type == "tis"  # NeMo-RL <= v0.5 meaning
    assert EntropyControlLossFn({"token_level_loss": False}, input_type="logit").loss_type.value == "sequence_level"
    assert EntropyControlLossFn({}, input_type="logit").input_type.value == "logit"
    _, lp, data = _batch(seed=3)
    gvs, gvt = _counts(data)
    _, metrics = fn(data=data, global_valid_seqs=gvs, global_valid_toks=gvt, next_token_logprobs=lp)
    missing = sorted(set(metrics) - set(fn.metric_normalizations))
    assert not missing, f"metrics without a normalisation: {missing}"
    assert fn.metric_normalizations["probs_ratio_min"].value == "none"
    assert fn.metric_normalizations["is_oob_ratio"].value == "tokens"
    with pytest.raises(ValueError, match="loss_fn.kl_cov_percent"):
        EntropyControlLossFn({"kl_cov_percent": 0.2})
    with pytest.raises(ValueError, match="nemo_rl.input_type='logits'"):
        EntropyControlLossFn({}, input_type="logits")


def test_driver_mode_without_the_attached_plan_is_an_error_naming_the_fix():
    """A batch that bypassed the driver-side wrapper must not silently select per call."""
    _, lp, data = _batch(seed=3)
    gvs, gvt = _counts(data)
    with pytest.raises(RuntimeError, match="install"):
        EntropyControlLossFn({"method": "kl_cov"})(data=data, global_valid_seqs=gvs, global_valid_toks=gvt,
                                                   next_token_logprobs=lp)
    # ppo, or scope: microbatch, needs no step plan
    for cfg in ({"method": "ppo"}, {"method": "kl_cov", "scope": "microbatch"}):
        EntropyControlLossFn(cfg)(data=data, global_valid_seqs=gvs, global_valid_toks=gvt, next_token_logprobs=lp)


def test_empty_micro_batch_gives_zero_loss_and_inf_sentinels():
    _, lp, data = _batch(seed=4)
    data["sample_mask"] = torch.zeros(B, dtype=D)
    fn = EntropyControlLossFn({"method": "ppo"})
    loss, metrics = fn(data=data, global_valid_seqs=torch.tensor(5.0), global_valid_toks=torch.tensor(50.0),
                       next_token_logprobs=lp)
    assert float(loss) == 0.0
    assert metrics["probs_ratio_min"] == math.inf and metrics["probs_ratio_max"] == -math.inf


# ------------------------------------------------------------------------------------ global normalisation
@pytest.mark.parametrize("method", ["ppo", "kl_cov", "clip_cov"])
def test_micro_batches_and_dp_ranks_sum_to_the_full_batch(method):
    """Two simulated DP ranks x two micro-batches each (NeMo-RL's sharding of one optimizer step)."""
    _, lp, data = _batch(seed=5)
    cfg = {"method": method, "kl_cov_ratio": 0.1, "clip_cov_ratio": 0.1, "clip_cov_lb": -1.0,
           "use_importance_sampling_correction": True, "reference_policy_kl_penalty": 0.1}
    attach_step_plans(data, loss_config(cfg), train_global_batch_size=B, first_step=7)
    if method != "ppo":
        assert plan_from_batch(data, global_valid_tokens=1, global_valid_seqs=1).selected.sum() > 0
    gvs, gvt = _counts(data)
    fn = EntropyControlLossFn(cfg)
    full_curr = lp.clone().requires_grad_(True)
    full_loss, full_metrics = fn(data=data, global_valid_seqs=gvs, global_valid_toks=gvt,
                                 next_token_logprobs=full_curr)
    full_loss.backward()
    # shard_by_batch_size: rank d holds rows [4d, 4d + 4); each rank runs 2 micro-batches of 2 samples
    part_curr = lp.clone().requires_grad_(True)
    total, summed = 0.0, {}
    for rows in (slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)):
        loss, metrics = fn(data=_slice(data, rows), global_valid_seqs=gvs, global_valid_toks=gvt,
                           next_token_logprobs=part_curr[rows])
        loss.backward()
        total += float(loss)
        for k, v in metrics.items():
            if k.endswith("_min"):
                summed[k] = min(summed.get(k, math.inf), v)
            elif k.endswith("_max"):
                summed[k] = max(summed.get(k, -math.inf), v)
            elif fn.metric_normalizations[k].value != "none" or k.startswith("num_"):
                summed[k] = summed.get(k, 0.0) + v
    assert total == pytest.approx(float(full_loss), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(part_curr.grad, full_curr.grad, rtol=1e-5, atol=1e-8)
    for k, v in summed.items():
        assert v == pytest.approx(full_metrics[k], rel=1e-4, abs=1e-6), k


def test_attached_selection_is_used_as_is():
    """The loss applies exactly the driver's mask: KL-Cov's penalty appears only on attached tokens."""
    _, lp, data = _batch(seed=6)
    cfg = {"method": "kl_cov", "kl_cov_ratio": 0.05, "reference_policy_kl_penalty": 0.0}
    attach_step_plans(data, loss_config(cfg), train_global_batch_size=B, first_step=0)
    gvs, gvt = _counts(data)
    chosen = plan_from_batch(data, global_valid_tokens=1, global_valid_seqs=1).selected
    curr = (data["prev_logprobs"][:, 1:] + 0.2).clone().requires_grad_(True)
    loss, _ = EntropyControlLossFn(cfg)(data=data, global_valid_seqs=gvs, global_valid_toks=gvt,
                                        next_token_logprobs=curr)
    loss.backward()
    mask = (data["token_mask"][:, 1:] * data["sample_mask"][:, None]).bool()
    A = data["advantages"][:, 1:]
    r = torch.exp(torch.tensor(0.2, dtype=D))
    # d/dl of -A r + [chosen] * |l - l_old| (l - l_old = 0.2 > 0): (-A r + [chosen]) / N
    expected = torch.where(mask, (-A * r + chosen.to(D)) / gvt, torch.zeros_like(A))
    torch.testing.assert_close(curr.grad, expected, rtol=1e-5, atol=1e-7)
