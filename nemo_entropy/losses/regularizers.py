"""NeMo-RL's extra loss terms and diagnostics, as pure-torch functions of [batch, length] tensors.

``ClippedPGLossFn`` carries, besides the clipped surrogate, an importance-sampling correction for the
generation/training mismatch, a KL penalty to a reference policy, a positive-example NLL term (VAPO) and
a set of diagnostic metrics. This module computes each of them with the meaning of NeMo-RL's config keys
(main at 7ea279ab), so that ``policy_loss`` can add them when the keys are active and a NeMo-RL
``loss_fn:`` section behaves the same under our loss.

Normalisation follows NeMo-RL's rule (DESIGN.md, ANCHORS.md): every returned scalar and every metric is
``sum(values * mask) / global_count`` where ``global_count`` is the number of valid tokens (or sequences)
of the whole optimizer step over every DP rank. Summing the values of all micro-batches and ranks then
gives the batch mean, and the result stays linear in ``1 / global_count`` (the split-API path calls with
count 1 and rescales). Metrics ending in ``_min``/``_max`` and those listed with ``"none"`` in
:func:`metric_normalizations` are not pre-divided.

Config access is by attribute (a :class:`nemo_entropy.config.LossConfig`) or by key (a plain mapping), so
these functions can be tested and reused without the rest of the core.

Deliberate differences from NeMo-RL, each documented where it happens:

* ``truncated_importance_sampling_ratio`` without a ``truncated_importance_sampling_type`` means ``tis``
  (NeMo-RL <= v0.5's only behaviour; newer NeMo-RL raises at call time).
* ``sampling_importance_ratio`` with ``sequence_level_importance_ratios`` is the mean weight over valid
  sequences. NeMo-RL multiplies a [B, 1] weight by a [B] mask there, which broadcasts to [B, B] and
  reports ``sum(w) * sum(sample_mask) / global_valid_seqs``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Union

import torch

__all__ = [
    "kl_estimate",
    "importance_weights",
    "reference_kl_penalty",
    "positive_example_nll",
    "generation_mismatch_metrics",
    "approx_entropy",
    "metric_normalizations",
]

Count = Union[torch.Tensor, float, int]

_DEFAULTS: dict[str, Any] = {
    "token_level_loss": True,
    "sequence_level_importance_ratios": False,
    "reference_policy_kl_penalty": 0.01,
    "reference_policy_kl_type": "k3",
    "kl_input_clamp_value": 20.0,
    "kl_output_clamp_value": 10.0,
    "use_kl_in_reward": False,
    "use_on_policy_kl_approximation": False,
    "use_importance_sampling_correction": False,
    "truncated_importance_sampling_type": None,
    "truncated_importance_sampling_ratio": None,
    "truncated_importance_sampling_ratio_min": None,
    "positive_example_nll_weight": 0.0,
}


def _key(config: Any, name: str) -> Any:
    """A config value by attribute (LossConfig) or key (mapping), with NeMo-RL's default."""
    if isinstance(config, Mapping):
        return config.get(name, _DEFAULTS[name])
    return getattr(config, name, _DEFAULTS[name])


def _count(count: Optional[Count], fallback: torch.Tensor) -> torch.Tensor:
    """The global denominator; an empty batch divides by 1 (its numerator is 0) instead of giving NaN."""
    value = fallback if count is None else torch.as_tensor(count, dtype=fallback.dtype, device=fallback.device)
    return torch.where(value > 0, value, torch.ones_like(value))


def _token_sum_over(values: torch.Tensor, mask: torch.Tensor, count: Optional[Count]) -> torch.Tensor:
    """sum(values * mask) / count (count defaults to this call's own number of valid tokens)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / _count(count, mask.sum())


def _sequence_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence mean over its valid tokens, [B]; a sequence without valid tokens has mean 0."""
    mask = mask.to(values.dtype)
    per_seq = mask.sum(dim=-1)
    return (values * mask).sum(dim=-1) / torch.where(per_seq > 0, per_seq, torch.ones_like(per_seq))


def _valid_samples(mask: torch.Tensor, sample_mask: Optional[torch.Tensor]) -> torch.Tensor:
    if sample_mask is not None:
        return sample_mask.to(mask.dtype if mask.is_floating_point() else torch.float32)
    return mask.any(dim=-1).to(torch.float32)


def _loss_type_reduce(
    config: Any,
    per_token: torch.Tensor,
    mask: torch.Tensor,
    sample_mask: Optional[torch.Tensor],
    global_valid_tokens: Optional[Count],
    global_valid_seqs: Optional[Count],
) -> torch.Tensor:
    """NeMo-RL's loss reduction: token mean over the step, or mean over sequences of per-sequence means."""
    if _key(config, "token_level_loss"):
        return _token_sum_over(per_token, mask, global_valid_tokens)
    samples = _valid_samples(mask, sample_mask).to(per_token.dtype)
    return (_sequence_means(per_token, mask) * samples).sum() / _count(global_valid_seqs, samples.sum())


# ----------------------------------------------------------------------------------------------- KL


def kl_estimate(
    logprobs: torch.Tensor,
    reference_logprobs: torch.Tensor,
    kl_type: str = "k3",
    *,
    input_clamp: Optional[float] = None,
    output_clamp: Optional[float] = None,
    weights: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-token Monte-Carlo estimate of KL(pi || pi_ref) from sampled-token log-probs (Schulman's k1/k2/k3).

    With ``x = log pi_ref - log pi``: k1 = -x, k2 = x^2 / 2, k3 = exp(x) - 1 - x.
    ``input_clamp`` clamps ``x`` to [-v, v]; where it clamps, ``weights`` are detached as well, so a clamped
    token passes no gradient through its sampling weight either. ``weights`` multiply the estimate before
    ``output_clamp`` clamps the product to [-v, v].
    """
    log_ratio = reference_logprobs - logprobs
    if input_clamp is not None:
        clamped = log_ratio.clamp(min=-input_clamp, max=input_clamp)
        if weights is not None:
            weights = torch.where(log_ratio == clamped, weights, weights.detach())
        log_ratio = clamped
    if kl_type == "k1":
        kl = -log_ratio
    elif kl_type == "k2":
        kl = 0.5 * log_ratio.square()
    elif kl_type == "k3":
        kl = torch.expm1(log_ratio) - log_ratio
    else:
        raise ValueError(f"loss_fn.reference_policy_kl_type={kl_type!r} is invalid: allowed one of ('k1', 'k2', 'k3')")
    if weights is not None:
        kl = weights * kl
    if output_clamp is not None:
        kl = kl.clamp(min=-output_clamp, max=output_clamp)
    return kl


def reference_kl_penalty(
    config: Any,
    logprobs: torch.Tensor,
    reference_logprobs: Optional[torch.Tensor],
    generation_logprobs: Optional[torch.Tensor],
    mask: torch.Tensor,
    *,
    global_valid_tokens: Optional[Count] = None,
    global_valid_seqs: Optional[Count] = None,
    sample_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The reference-policy KL term of the loss: ``reference_policy_kl_penalty * KL``, reduced like the loss.

    Keys: ``reference_policy_kl_penalty`` (coefficient; 0 disables), ``reference_policy_kl_type``
    (k1/k2/k3), ``kl_input_clamp_value`` / ``kl_output_clamp_value`` (None: no clamp),
    ``use_kl_in_reward`` (the KL is folded into the reward upstream, so the loss carries none),
    ``use_on_policy_kl_approximation`` and ``token_level_loss``.

    ``logprobs`` are the current policy's (pass NeMo-RL's ``curr_logprobs_unfiltered`` when top-k/top-p
    filtering is on). The estimate is weighted by ``exp(logprobs - generation_logprobs)`` with
    ``use_on_policy_kl_approximation`` (the samples come from the generation policy), otherwise by
    ``exp(logprobs - sg(logprobs))``: value 1, but the gradient keeps the score-function term of a KL whose
    samples come from the optimised policy (NeMo-RL >= v0.7 semantics).

    Returns ``(kl_term, {"kl_penalty": kl_term / coefficient})``; the term is 0 (and needs no reference
    log-probs) when the coefficient is 0 or ``use_kl_in_reward`` is set.
    """
    coefficient = 0.0 if _key(config, "use_kl_in_reward") else float(_key(config, "reference_policy_kl_penalty"))
    if coefficient == 0.0:
        return logprobs.new_zeros(()), {"kl_penalty": 0.0}
    if reference_logprobs is None:
        raise ValueError(
            f"loss_fn.reference_policy_kl_penalty={coefficient} needs reference_policy_logprobs in the batch "
            "(set the penalty to 0 or enable the reference model)"
        )
    if _key(config, "use_on_policy_kl_approximation"):
        if generation_logprobs is None:
            raise ValueError("loss_fn.use_on_policy_kl_approximation=True needs generation_logprobs in the batch")
        weights = torch.exp(logprobs - generation_logprobs)
    else:
        weights = torch.exp(logprobs - logprobs.detach())
    weights = torch.nan_to_num(weights, nan=0.0, posinf=0.0, neginf=0.0)
    per_token = coefficient * kl_estimate(
        logprobs,
        reference_logprobs,
        _key(config, "reference_policy_kl_type"),
        input_clamp=_key(config, "kl_input_clamp_value"),
        output_clamp=_key(config, "kl_output_clamp_value"),
        weights=weights,
    )
    kl_term = _loss_type_reduce(config, per_token, mask, sample_mask, global_valid_tokens, global_valid_seqs)
    return kl_term, {"kl_penalty": kl_term.item() / coefficient}


# ------------------------------------------------------------------------------ importance sampling


def importance_weights(
    config: Any,
    old_logprobs: torch.Tensor,
    generation_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    global_valid_tokens: Optional[Count] = None,
    global_valid_seqs: Optional[Count] = None,
    sample_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Off-policy correction of the actor loss for the generation/training mismatch (vLLM vs the trainer).

    ``w = pi_old / pi_gen`` per token, or per sequence ``exp(sum_t (log pi_old - log pi_gen))`` with
    ``sequence_level_importance_ratios`` (GSPO); non-finite weights become 0. Truncation
    (``truncated_importance_sampling_type`` with ``_ratio`` = max and ``_ratio_min`` = min):

    * ``tis``: clamp w to [min (default 0), max];
    * ``icepop``: w = 0 for tokens with w outside [min, max];
    * ``seq-mask-tis``: w = 0 for whole sequences whose geometric-mean ratio is outside [min, max]; kept
      sequences keep their untruncated token weights.

    Returns ``(weights, metrics)``. ``weights`` broadcast against [B, S] and are all ones unless
    ``use_importance_sampling_correction`` is set; the metrics describe the (truncated) weights either way:
    ``sampling_importance_ratio`` (token mean, or sequence mean for sequence-level ratios) and, when
    truncating, ``is_oob_ratio`` (fraction of tokens, or of sequences for ``seq-mask-tis``, out of bounds).
    """
    mask_f = mask.to(old_logprobs.dtype)
    samples = _valid_samples(mask, sample_mask).to(old_logprobs.dtype)
    log_is = old_logprobs - generation_logprobs
    sequence_level = bool(_key(config, "sequence_level_importance_ratios"))
    if sequence_level:
        raw = torch.exp((log_is * mask_f).sum(dim=-1, keepdim=True)).detach()
    else:
        raw = torch.exp(log_is)
    weights = torch.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)

    metrics: dict[str, float] = {}
    kind = _key(config, "truncated_importance_sampling_type")
    upper = _key(config, "truncated_importance_sampling_ratio")
    lower = _key(config, "truncated_importance_sampling_ratio_min")
    if upper is not None:
        kind = kind or "tis"  # NeMo-RL <= v0.5 had only this kind and no type key
        if kind == "tis":
            lower_bound = 0.0 if lower is None else float(lower)
            out_of_bounds = (weights > upper) | (weights < lower_bound)
            metrics["is_oob_ratio"] = _token_sum_over(
                out_of_bounds.to(mask_f.dtype).expand_as(mask_f), mask_f, global_valid_tokens
            ).item()
            weights = weights.clamp(min=lower_bound, max=float(upper))
        elif kind == "icepop":
            if lower is None:
                raise ValueError("loss_fn.truncated_importance_sampling_ratio_min=None: icepop needs a lower bound")
            kept = (weights >= lower) & (weights <= upper)
            metrics["is_oob_ratio"] = _token_sum_over(
                (~kept).to(mask_f.dtype).expand_as(mask_f), mask_f, global_valid_tokens
            ).item()
            weights = torch.where(kept, weights, torch.zeros_like(weights))
        elif kind == "seq-mask-tis":
            if lower is None:
                raise ValueError("loss_fn.truncated_importance_sampling_ratio_min=None: seq-mask-tis needs a lower bound")
            if sequence_level:
                raise ValueError(
                    "loss_fn.truncated_importance_sampling_type='seq-mask-tis' is incompatible with "
                    "loss_fn.sequence_level_importance_ratios=True"
                )
            finite_log_is = torch.nan_to_num(log_is, nan=0.0, posinf=0.0, neginf=0.0)
            geometric_mean = torch.exp(_sequence_means(finite_log_is, mask_f)).detach()
            kept = ((geometric_mean >= lower) & (geometric_mean <= upper)).to(mask_f.dtype)
            metrics["is_oob_ratio"] = (
                ((1.0 - kept) * samples).sum() / _count(global_valid_seqs, samples.sum())
            ).item()
            weights = weights * kept.unsqueeze(-1)
        else:
            raise ValueError(
                f"loss_fn.truncated_importance_sampling_type={kind!r} is invalid: "
                "allowed one of ('tis', 'icepop', 'seq-mask-tis') or null"
            )

    if sequence_level:
        metrics["sampling_importance_ratio"] = (
            (weights.squeeze(-1) * samples).sum() / _count(global_valid_seqs, samples.sum())
        ).item()
    else:
        metrics["sampling_importance_ratio"] = _token_sum_over(weights, mask_f, global_valid_tokens).item()

    if not _key(config, "use_importance_sampling_correction"):
        weights = torch.ones_like(old_logprobs)
    return weights, metrics


# ------------------------------------------------------------------------------------ positive NLL


def positive_example_nll(
    config: Any,
    logprobs: torch.Tensor,
    rewards: Optional[torch.Tensor],
    mask: torch.Tensor,
    *,
    global_positive_tokens: Optional[Count] = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """VAPO's positive-example NLL (arXiv 2504.05118 eq. 10): ``weight * mean(-log pi)`` over correct samples.

    A sample is correct when its reward is > 0 (``rewards`` is [B]). As in NeMo-RL, the mean is over the
    valid tokens of the correct samples *of this call* (a per-micro-batch mean, metric normalisation
    "none"); pass ``global_positive_tokens`` (the count over the whole step and every DP rank) for a mean
    that sums exactly over micro-batches instead.

    Returns ``(weight * nll, {"positive_nll_loss": nll})``; zero when ``positive_example_nll_weight`` is 0,
    when no rewards are given, or when no valid token belongs to a correct sample.
    """
    weight = float(_key(config, "positive_example_nll_weight"))
    zero = logprobs.new_zeros(())
    if weight <= 0.0 or rewards is None:
        return zero, {"positive_nll_loss": 0.0}
    if rewards.dim() != 1 or rewards.shape[0] != logprobs.shape[0]:
        raise ValueError(
            f"rewards must have shape [batch]={logprobs.shape[0]} for positive_example_nll_weight, "
            f"got {tuple(rewards.shape)}"
        )
    positive_mask = mask.to(logprobs.dtype) * (rewards > 0).to(logprobs.dtype).unsqueeze(-1)
    local_count = positive_mask.sum()
    if global_positive_tokens is None and local_count.item() == 0:
        return zero, {"positive_nll_loss": 0.0}
    nll = (-logprobs * positive_mask).sum() / _count(global_positive_tokens, local_count)
    return weight * nll, {"positive_nll_loss": nll.item()}


# ------------------------------------------------------------------------------------- diagnostics


@torch.no_grad()
def generation_mismatch_metrics(
    config: Any,
    old_logprobs: torch.Tensor,
    generation_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    global_valid_tokens: Optional[Count] = None,
) -> dict[str, float]:
    """How far the trainer's log-probs of the rollout (``old``) are from the generator's (``generation``).

    Token means, pre-divided by ``global_valid_tokens``:

    * ``token_mult_prob_error``: mean of ``exp(|log pi_gen - log pi_old|)`` (1 means identical);
    * ``gen_kl_error``: KL(pi_gen || pi_old) estimate, ``policy_kl_error``: KL(pi_old || pi_gen) estimate,
      both with ``reference_policy_kl_type`` and no clamping;
    * ``js_divergence_error``: per-token Jensen-Shannon divergence between the two sampled-token
      probabilities, each half a k3 estimate against the mixture.
    """
    kl_type = _key(config, "reference_policy_kl_type")
    mask_f = mask.to(old_logprobs.dtype)
    # The mask inside the exp makes padded positions exp(0) = 1 rather than exp(garbage) = inf.
    mult_error = torch.exp((generation_logprobs - old_logprobs).abs() * mask_f)
    log_mixture = torch.logaddexp(old_logprobs, generation_logprobs) - torch.log(
        torch.tensor(2.0, dtype=old_logprobs.dtype, device=old_logprobs.device)
    )
    # k3 with x = log p - log m is p/m - 1 - log(p/m): the f-divergence term of KL(p || m) per token.
    js = 0.5 * kl_estimate(log_mixture, old_logprobs, "k3") + 0.5 * kl_estimate(log_mixture, generation_logprobs, "k3")
    return {
        "token_mult_prob_error": _token_sum_over(mult_error, mask_f, global_valid_tokens).item(),
        "gen_kl_error": _token_sum_over(
            kl_estimate(generation_logprobs, old_logprobs, kl_type), mask_f, global_valid_tokens
        ).item(),
        "policy_kl_error": _token_sum_over(
            kl_estimate(old_logprobs, generation_logprobs, kl_type), mask_f, global_valid_tokens
        ).item(),
        "js_divergence_error": _token_sum_over(js, mask_f, global_valid_tokens).item(),
    }


@torch.no_grad()
def approx_entropy(
    logprobs: torch.Tensor,
    generation_logprobs: torch.Tensor,
    mask: torch.Tensor,
    *,
    global_valid_tokens: Optional[Count] = None,
) -> dict[str, float]:
    """NeMo-RL's ``approx_entropy``: ``E_{y ~ pi_gen}[-(pi / pi_gen) log pi(y)]`` from the sampled tokens only.

    A cheap, biased proxy; the full-vocabulary entropy (``nemo_entropy.entropy``) is logged next to it when
    logits are available.
    """
    estimate = -torch.exp(logprobs - generation_logprobs) * logprobs
    return {"approx_entropy": _token_sum_over(estimate, mask, global_valid_tokens).item()}


def metric_normalizations(config: Any) -> dict[str, str]:
    """Which global count each NeMo-RL metric of this module was divided by: ``tokens``, ``sequences``, ``none``.

    The values are the ``.value`` strings of NeMo-RL's ``MetricNormalizer``; the adapter converts them.
    """
    loss_norm = "tokens" if _key(config, "token_level_loss") else "sequences"
    names = {
        "kl_penalty": loss_norm,
        "token_mult_prob_error": "tokens",
        "gen_kl_error": "tokens",
        "policy_kl_error": "tokens",
        "js_divergence_error": "tokens",
        "approx_entropy": "tokens",
        "sampling_importance_ratio": "sequences" if _key(config, "sequence_level_importance_ratios") else "tokens",
        "positive_nll_loss": "none",
    }
    kind = _key(config, "truncated_importance_sampling_type")
    if _key(config, "truncated_importance_sampling_ratio") is not None:
        names["is_oob_ratio"] = "sequences" if kind == "seq-mask-tis" else "tokens"
    return names
