"""Diagnostics of a batch that NeMo-RL's ``ClippedPGLossFn`` reports next to its loss (no gradient): how far the
trainer's log-probs of the rollout are from the generator's, and the sampled-token entropy estimate.

Every value is this micro-batch's share of the step's token mean (:mod:`nemo_entropy.normalization`);
:func:`metric_normalizations` tells a split-API trainer which count each NeMo-RL metric of the loss was divided by.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from .nemo_rl_terms import kl_estimate
from ..normalization import Count, global_token_sum

__all__ = ["generation_mismatch_metrics", "approx_entropy", "metric_normalizations"]


def _token_share(values: torch.Tensor, mask: torch.Tensor, count: Optional[Count]) -> torch.Tensor:
    mask = mask.to(values.dtype)
    return global_token_sum(values, mask, mask.sum() if count is None else count)


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
    kl_type = config.reference_policy_kl_type
    mask_f = mask.to(old_logprobs.dtype)
    # The mask inside the exp makes padded positions exp(0) = 1 rather than exp(garbage) = inf.
    mult_error = torch.exp((generation_logprobs - old_logprobs).abs() * mask_f)
    log_mixture = torch.logaddexp(old_logprobs, generation_logprobs) - torch.log(
        torch.tensor(2.0, dtype=old_logprobs.dtype, device=old_logprobs.device)
    )
    # k3 with x = log p - log m is p/m - 1 - log(p/m): the f-divergence term of KL(p || m) per token.
    js = 0.5 * kl_estimate(log_mixture, old_logprobs, "k3") + 0.5 * kl_estimate(log_mixture, generation_logprobs, "k3")
    return {
        "token_mult_prob_error": _token_share(mult_error, mask_f, global_valid_tokens).item(),
        "gen_kl_error": _token_share(
            kl_estimate(generation_logprobs, old_logprobs, kl_type), mask_f, global_valid_tokens
        ).item(),
        "policy_kl_error": _token_share(
            kl_estimate(old_logprobs, generation_logprobs, kl_type), mask_f, global_valid_tokens
        ).item(),
        "js_divergence_error": _token_share(js, mask_f, global_valid_tokens).item(),
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
    return {"approx_entropy": _token_share(estimate, mask, global_valid_tokens).item()}


def metric_normalizations(config: Any) -> dict[str, str]:
    """Which global count each NeMo-RL metric of this module was divided by: ``tokens``, ``sequences``, ``none``.

    The values are the ``.value`` strings of NeMo-RL's ``MetricNormalizer``; the adapter converts them.
    """
    loss_norm = "tokens" if config.token_level_loss else "sequences"
    names = {
        "kl_penalty": loss_norm,
        "token_mult_prob_error": "tokens",
        "gen_kl_error": "tokens",
        "policy_kl_error": "tokens",
        "js_divergence_error": "tokens",
        "approx_entropy": "tokens",
        "sampling_importance_ratio": "sequences" if config.sequence_level_importance_ratios else "tokens",
        "positive_nll_loss": "none",
    }
    kind = config.truncated_importance_sampling_type
    if config.truncated_importance_sampling_ratio is not None:
        names["is_oob_ratio"] = "sequences" if kind == "seq-mask-tis" else "tokens"
    return names
