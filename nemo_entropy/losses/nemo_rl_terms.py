"""NeMo-RL's extra loss terms, as pure-torch functions of ``[batch, length]`` tensors and a :class:`LossConfig`.

``ClippedPGLossFn`` carries, besides the clipped surrogate, an importance-sampling correction for the
generation/training mismatch, a KL penalty to a reference policy and a positive-example NLL term (VAPO). This
module computes each with the meaning of NeMo-RL's config keys (main at 7ea279ab), so that ``policy_loss`` adds
them when the keys are active and a NeMo-RL ``loss_fn:`` section behaves the same under our loss. Defaults come
from :class:`~nemo_entropy.config.LossConfig` alone.

Normalisation follows NeMo-RL's rule (:mod:`nemo_entropy.normalization`): every returned scalar and
metric is this micro-batch's share of the step's mean, so sums over micro-batches and ranks give the batch value.

Deliberate differences from NeMo-RL, each documented where it happens:

* ``sampling_importance_ratio`` with ``sequence_level_importance_ratios`` is the mean weight over valid
  sequences. NeMo-RL multiplies a [B, 1] weight by a [B] mask there, which broadcasts to [B, B] and
  reports ``sum(w) * sum(sample_mask) / global_valid_seqs``.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..normalization import Count, global_sequence_sum, global_token_sum, safe_count, sequence_means

__all__ = ["kl_estimate", "importance_weights", "reference_kl_penalty", "positive_example_nll"]


def _or(count: Optional[Count], fallback: torch.Tensor) -> Count:
    return fallback if count is None else count


def _token_share(values: torch.Tensor, mask: torch.Tensor, count: Optional[Count]) -> torch.Tensor:
    """``sum(values * mask) / count``; the count defaults to this call's own valid tokens."""
    mask = mask.to(values.dtype)
    return global_token_sum(values, mask, _or(count, mask.sum()))


def _valid_samples(mask: torch.Tensor, sample_mask: Optional[torch.Tensor]) -> torch.Tensor:
    if sample_mask is not None:
        return sample_mask.to(mask.dtype if mask.is_floating_point() else torch.float32)
    return mask.any(dim=-1).to(torch.float32)


def _loss_type_reduce(config, per_token, mask, global_valid_tokens, global_valid_seqs) -> torch.Tensor:
    """NeMo-RL's loss reduction: token mean over the step, or mean over sequences of per-sequence means."""
    if config.token_level_loss:
        return global_token_sum(per_token, mask, global_valid_tokens if global_valid_tokens is not None else mask.sum())
    count = global_valid_seqs if global_valid_seqs is not None else mask.any(-1).sum()
    return global_sequence_sum(per_token, mask, count)


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
    coefficient = 0.0 if config.use_kl_in_reward else float(config.reference_policy_kl_penalty)
    if coefficient == 0.0:
        return logprobs.new_zeros(()), {"kl_penalty": 0.0}
    if reference_logprobs is None:
        raise ValueError(
            f"loss_fn.reference_policy_kl_penalty={coefficient} needs reference_policy_logprobs in the batch "
            "(set the penalty to 0 or enable the reference model)"
        )
    if config.use_on_policy_kl_approximation:
        if generation_logprobs is None:
            raise ValueError("loss_fn.use_on_policy_kl_approximation=True needs generation_logprobs in the batch")
        weights = torch.exp(logprobs - generation_logprobs)
    else:
        weights = torch.exp(logprobs - logprobs.detach())
    weights = torch.nan_to_num(weights, nan=0.0, posinf=0.0, neginf=0.0)
    per_token = coefficient * kl_estimate(
        logprobs,
        reference_logprobs,
        config.reference_policy_kl_type,
        input_clamp=config.kl_input_clamp_value,
        output_clamp=config.kl_output_clamp_value,
        weights=weights,
    )
    kl_term = _loss_type_reduce(config, per_token, mask, global_valid_tokens, global_valid_seqs)
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
    sequence_level = bool(config.sequence_level_importance_ratios)
    if sequence_level:
        raw = torch.exp((log_is * mask_f).sum(dim=-1, keepdim=True)).detach()
    else:
        raw = torch.exp(log_is)
    weights = torch.nan_to_num(raw, nan=0.0, posinf=0.0, neginf=0.0)

    metrics: dict[str, float] = {}
    kind = config.truncated_importance_sampling_type
    upper = config.truncated_importance_sampling_ratio
    lower = config.truncated_importance_sampling_ratio_min
    if upper is not None:
        if kind == "tis":
            lower_bound = 0.0 if lower is None else float(lower)
            out_of_bounds = (weights > upper) | (weights < lower_bound)
            metrics["is_oob_ratio"] = _token_share(
                out_of_bounds.to(mask_f.dtype).expand_as(mask_f), mask_f, global_valid_tokens
            ).item()
            weights = weights.clamp(min=lower_bound, max=float(upper))
        elif kind == "icepop":
            if lower is None:
                raise ValueError("loss_fn.truncated_importance_sampling_ratio_min=None: icepop needs a lower bound")
            kept = (weights >= lower) & (weights <= upper)
            metrics["is_oob_ratio"] = _token_share(
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
            geometric_mean = torch.exp(sequence_means(finite_log_is, mask_f)).detach()
            kept = ((geometric_mean >= lower) & (geometric_mean <= upper)).to(mask_f.dtype)
            metrics["is_oob_ratio"] = (
                ((1.0 - kept) * samples).sum() / safe_count(_or(global_valid_seqs, samples.sum()), samples)
            ).item()
            weights = weights * kept.unsqueeze(-1)
        else:
            raise ValueError(
                f"loss_fn.truncated_importance_sampling_type={kind!r} is invalid: "
                "allowed one of ('tis', 'icepop', 'seq-mask-tis') or null"
            )

    if sequence_level:
        metrics["sampling_importance_ratio"] = (
            (weights.squeeze(-1) * samples).sum() / safe_count(_or(global_valid_seqs, samples.sum()), samples)
        ).item()
    else:
        metrics["sampling_importance_ratio"] = _token_share(weights, mask_f, global_valid_tokens).item()

    if not config.use_importance_sampling_correction:
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
    weight = float(config.positive_example_nll_weight)
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
    nll = (-logprobs * positive_mask).sum() / safe_count(_or(global_positive_tokens, local_count), local_count)
    return weight * nll, {"positive_nll_loss": nll.item()}


