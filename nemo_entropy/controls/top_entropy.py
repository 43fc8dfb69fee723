"""``top_entropy``: policy gradient only on the step's highest-entropy tokens ("Beyond the 80/20 Rule:
High-Entropy Minority Tokens Drive Effective Reinforcement Learning for LLM Reasoning", Wang et al., arXiv
2506.01939; TRL ``top_entropy_quantile``).

Per token, with ``H_i`` the full-vocabulary entropy of the policy that generated the data (NeMo-RL's
``prev_logprobs`` policy) at token ``i``::

    loss_i = 1[i in K] * surrogate_i          K = the k valid tokens of the optimizer step with the largest H
    k      = ceil(top_entropy_quantile * N)   N = the step's valid tokens over every DP (x CP) rank

The other tokens' surrogate is weighted 0: they get no policy gradient but still count in the denominator (the
paper's objective is normalised by all response tokens). Paper and default: ``top_entropy_quantile = 0.2``.

``K`` is exact over the whole optimizer step, on every layout: one distributed top-k (:meth:`StepContext.top_k`)
ranks the tokens by (old entropy descending, token uid ascending), so ties at the threshold are broken by the
smaller uid and exactly ``k`` tokens are kept (TRL keeps every token ``>=`` a per-process quantile, so its kept
set, and its count under ties, depends on the micro-batch and the process). Rounding: ``k = ceil(q * N)``
computed on the decimal value of ``q`` (``0.55 * 100`` keeps 55 tokens, not the 56 of a float product), so
any ``N >= 1`` keeps at least one token and ``q = 1`` keeps all. The entropy is the old policy's, known for the
whole step before its first micro-batch (the plan needs no logits).

NeMo-RL: LOGPROB input is enough for the loss (the kept set travels with the batch from the driver), but the
old entropy is not in NeMo-RL's batch: the driver computes it with one extra eval-mode pass of NeMo-RL's training
loop per ``policy.train`` call (:mod:`nemo_entropy.integrations.entropy_probe`): a forward pass over the step's
samples with logits and no backward (about a third of a training step's compute, like ``get_logprobs``), plus one
fp32 and one int64 per valid token through Ray. It needs whole sequences per rank (context parallelism 1) and
``nemo_rl.plan: driver``. The local engine already has the rollout's entropy: no extra cost there.

Metrics: ``top_entropy_threshold`` (the lowest kept entropy, nats) and ``top_entropy_kept_fraction`` (``k / N``),
both per-step values reported as token shares.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, ClassVar, Mapping

import torch

from .base import Control, ControlConfig, bad_value


@dataclass(frozen=True)
class TopEntropyConfig(ControlConfig):
    top_entropy_quantile: float = 0.2
    """Fraction (not percent) of the step's valid tokens that keep their policy gradient: the ones with the
    highest old-policy entropy, k = ceil(quantile * N). The paper's 0.2 (TRL ``top_entropy_quantile``; 1.0 keeps
    every token)."""

    def validate(self) -> None:
        if not 0.0 < self.top_entropy_quantile <= 1.0:
            raise bad_value("top_entropy_quantile", self.top_entropy_quantile,
                            "a fraction in (0, 1] (0.2 keeps the top 20% of tokens by entropy)")


def kept_count(quantile: float, num_valid_tokens: int) -> int:
    """``ceil(quantile * N)`` on the decimal value of ``quantile`` (no float rounding of the product)."""
    return math.ceil(Fraction(repr(float(quantile))) * int(num_valid_tokens))


class TopEntropy(Control):
    name = "top_entropy"
    config_class = TopEntropyConfig
    needs: ClassVar[frozenset[str]] = frozenset({"old_entropy"})

    def plan(self, ctx) -> dict[str, Any]:
        if ctx.num_valid_tokens == 0:  # agreed by every rank: nobody enters the top-k's all-gather
            return {"kept": torch.zeros_like(ctx.mask), "num_kept": 0, "threshold": 0.0}
        k = kept_count(self.config.top_entropy_quantile, ctx.num_valid_tokens)
        kept, count, threshold = ctx.top_k(ctx.old_entropy, ctx.mask, k, with_threshold=True)
        return {"kept": kept, "num_kept": count, "threshold": threshold}

    @staticmethod
    def _kept(values: Mapping[str, Any]) -> torch.Tensor:
        if "kept" not in values:
            raise ValueError("loss_fn.method/controls 'top_entropy' needs the step plan (its kept tokens come from the "
                             "whole step's old entropy): build it with nemo_entropy.plan.build_step_plan(..., "
                             "StepInputs(..., old_entropy=...)) and pass plan=plan.rows(rows)")
        return values["kept"]

    def adjust(self, tokens, values, surrogate):
        return self._kept(values).to(surrogate.dtype), None

    def metrics(self, tokens, values) -> dict[str, Any]:
        kept = self._kept(values)
        threshold = torch.full(kept.shape, float(values.get("threshold") or 0.0), device=kept.device)
        return {"top_entropy_threshold": float(tokens.token_sum(threshold)),
                "top_entropy_kept_fraction": float(tokens.token_sum(kept.float()))}

    def metric_normalizations(self) -> dict[str, str]:
        return {"top_entropy_threshold": "tokens", "top_entropy_kept_fraction": "tokens"}
