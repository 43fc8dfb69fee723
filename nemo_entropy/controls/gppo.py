"""``gppo``: gradient-preserving clipping. Tokens outside the PPO clip range keep a bounded gradient instead of none
(GPPO, "Klear-Reasoner", Su et al., arXiv 2508.07629; CE-GPPO, "Coordinating Entropy via Gradient-Preserving
Clipping Policy Optimization", arXiv 2509.20712).

PPO's clipped surrogate ``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))`` gives no gradient to two kinds of
tokens: *low*, ``A < 0`` and ``r < 1 - eps_low`` (a bad token already pushed down: CE-GPPO's NA&LP), and *high*,
``A > 0`` and ``r > 1 + eps_high`` (a good token already pushed up: PA&LP). CE-GPPO writes their term as
``beta * (1 +- eps) / sg(r) * r * A``: the value is ``beta (1 +- eps) A`` and the gradient ``beta (1 +- eps) A
grad log pi``, i.e. ``beta (1 +- eps) / r`` times the unclipped term's gradient ``A r grad log pi`` (GPPO is
``beta_low = beta_high = 1``). What this control computes, per token (``eps`` = ``ratio_clip_min`` /
``ratio_clip_max``, ``sg`` = stop-gradient, ``r`` NeMo-RL's ratio)::

    value:    loss_i = PPO's clipped surrogate, dual clip included (every token; what `loss` logs)
    gradient: low  tokens: -gppo_beta_low  * (1 - eps_low)  * A_i * grad log pi_i
              high tokens: -gppo_beta_high * (1 + eps_high) * A_i * grad log pi_i
              other tokens: PPO's gradient (the dual-clipped ones, A < 0 and r > ratio_clip_c, keep none)

implemented as ``PPO + beta (1 +- eps) / sg(r) * (-A) * (r - sg(r))`` on low/high tokens (the added term is 0 in
value). The one difference from the papers: their forward value on clipped tokens is ``beta (1 +- eps) A``, ours
PPO's ``(1 +- eps) A``, so with beta != 1 our logged loss stays comparable with PPO's; gradients are identical.

Entropy: reintroducing the high tokens' gradient (low-probability tokens with positive advantage) raises entropy,
the low tokens' (pushing down tokens that are already unlikely, concentrating mass on the likely ones) lowers it;
``beta_low < beta_high`` tilts the balance toward exploration. CE-GPPO's setting, our default: ``beta_low = 0.75``,
``beta_high = 1``.

It owns the surrogate (exclusive group ``surrogate``: not with KL-Cov's ``-A r``) and needs the PPO ratio (not with
``disable_ppo_ratio`` / ``use_cispo``). NeMo-RL: LOGPROB input; no extra pass, a few elementwise operations per
token. Metrics: ``clip_ratio/low`` and ``clip_ratio/high``, the shares of the step's valid tokens in each region
(TRL's names; their sum is ``clip_fraction`` without dual clip).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..surrogate import clipped_surrogate
from .base import Control, ControlConfig, bad_value


@dataclass(frozen=True)
class GPPOConfig(ControlConfig):
    gppo_beta_low: float = 0.75
    """Scale of the gradient kept by tokens below the clip range with a negative advantage (CE-GPPO's beta_1;
    GPPO 1, PPO 0)."""
    gppo_beta_high: float = 1.0
    """Scale of the gradient kept by tokens above the clip range with a positive advantage (CE-GPPO's beta_2;
    GPPO 1, PPO 0)."""

    def validate(self) -> None:
        for key in ("gppo_beta_low", "gppo_beta_high"):
            if getattr(self, key) < 0:
                raise bad_value(key, getattr(self, key), ">= 0 (CE-GPPO: 0.75 low, 1.0 high; 0 is PPO's hard clip)")


class GPPO(Control):
    name = "gppo"
    config_class = GPPOConfig
    exclusive: ClassVar[tuple[str, ...]] = ("surrogate",)
    needs_ppo_ratio = True

    def regions(self, tokens) -> tuple[torch.Tensor, torch.Tensor]:
        """``(low, high)``: valid tokens PPO's clip leaves without gradient, by side."""
        cfg = self.loss_config
        r, adv = tokens.ratio.detach(), tokens.advantages.detach()
        low = tokens.mask & (adv < 0) & (r < 1.0 - cfg.ratio_clip_min)
        high = tokens.mask & (adv > 0) & (r > 1.0 + cfg.ratio_clip_max)
        return low, high

    def surrogate(self, tokens, values):
        cfg = self.loss_config
        ppo, clip_active = clipped_surrogate(cfg, tokens.advantages, tokens.ratio, tokens.clamped_ratio, tokens.logprobs)
        low, high = self.regions(tokens)
        scale = torch.where(low, self.config.gppo_beta_low * (1.0 - cfg.ratio_clip_min),
                            torch.where(high, self.config.gppo_beta_high * (1.0 + cfg.ratio_clip_max), 0.0))
        r = tokens.ratio
        sg = r.detach()
        # 0 in value; its gradient is scale * (-A) * grad r / r = -scale * A * grad log pi.
        preserved = scale / sg * (-tokens.advantages) * (r - sg)
        return ppo + torch.where(low | high, preserved, torch.zeros_like(preserved)), clip_active

    def metrics(self, tokens, values) -> dict[str, Any]:
        low, high = self.regions(tokens)
        return {"clip_ratio/low": float(tokens.token_sum(low.float())),
                "clip_ratio/high": float(tokens.token_sum(high.float()))}

    def metric_normalizations(self) -> dict[str, str]:
        return {"clip_ratio/low": "tokens", "clip_ratio/high": "tokens"}
