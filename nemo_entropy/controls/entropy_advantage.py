"""``entropy_advantage``: entropy-shaped advantages ("Reasoning with Exploration: An Entropy Perspective", Cheng et al.,
arXiv 2506.14758).

Per token, before the surrogate::

    A'_i = A_i + psi_i,    psi_i = min(entropy_advantage_alpha * sg(H_i), |A_i| / entropy_advantage_kappa)

``H_i`` is the current policy's full-vocabulary entropy at token ``i``, detached (``sg``): the paper's ``H_t^detach``
of ``pi_theta``, computed in the update's own forward pass as its public implementations do (on the first
micro-batch of an on-policy step it equals the generating policy's entropy). The term is a per-token offset, not
an entropy gradient: it strengthens the update of high-entropy tokens of positive samples and weakens that of
negative ones. The ``|A| / kappa`` cap keeps the offset below the advantage's own magnitude, so with ``kappa >= 1``
it never reverses the sign (``kappa = 1`` can bring a negative advantage to 0); zero-advantage tokens stay at 0.
Paper: ``alpha = 0.4`` with GRPO (0.1 with PPO), ``kappa = 2``; defaults 0.4 and 2.

NeMo-RL: LOGIT input (``nemo_rl.input_type: logit``): the loss receives logits and computes log-probs and entropy in
one pass with the vocab-parallel kernel (no extra forward; no entropy backward, the entropy is detached). The LOGIT
input rules out fused linear log-probs, top-k/top-p generation filtering and context parallelism > 1. No
whole-step quantity: no plan, no collective.

Metrics: ``entropy_advantage_mean`` (mean ``psi`` over the step's valid tokens) and
``entropy_advantage_capped_fraction`` (share of tokens where the ``|A| / kappa`` cap binds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from .base import Control, ControlConfig, bad_value


@dataclass(frozen=True)
class EntropyAdvantageConfig(ControlConfig):
    entropy_advantage_alpha: float = 0.4
    """alpha of ``min(alpha * H, |A| / kappa)``: entropy (nats) to advantage. Paper: 0.4 with GRPO, 0.1 with PPO."""
    entropy_advantage_kappa: float = 2.0
    """kappa of the cap ``|A| / kappa`` (paper: 2). >= 1, so the shaped advantage keeps the sign of A."""

    def validate(self) -> None:
        if self.entropy_advantage_alpha < 0:
            raise bad_value("entropy_advantage_alpha", self.entropy_advantage_alpha, ">= 0 (paper: 0.4 with GRPO)")
        if self.entropy_advantage_kappa < 1:
            raise bad_value("entropy_advantage_kappa", self.entropy_advantage_kappa,
                            ">= 1 (paper: 2; below 1 the term could reverse a negative advantage)")


class EntropyAdvantage(Control):
    name = "entropy_advantage"
    config_class = EntropyAdvantageConfig
    needs: ClassVar[frozenset[str]] = frozenset({"entropy"})

    def _terms(self, tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """``(psi, capped)`` per token (0 / False on masked tokens)."""
        bonus = self.config.entropy_advantage_alpha * tokens.entropy.detach().float()
        cap = tokens.input_advantages.detach().abs() / self.config.entropy_advantage_kappa
        psi = torch.where(tokens.mask, torch.minimum(bonus, cap), torch.zeros_like(bonus))
        return psi, tokens.mask & (cap < bonus)

    def shape_advantages(self, tokens, values):
        return tokens.advantages + self._terms(tokens)[0]  # on top of any earlier control's shaping

    def metrics(self, tokens, values) -> dict[str, Any]:
        psi, capped = self._terms(tokens)
        return {"entropy_advantage_mean": float(tokens.token_sum(psi)),
                "entropy_advantage_capped_fraction": float(tokens.token_sum(capped.float()))}

    def metric_normalizations(self) -> dict[str, str]:
        return {"entropy_advantage_mean": "tokens", "entropy_advantage_capped_fraction": "tokens"}
