"""``w_reinforce``: a weight ``lambda`` on the policy gradient of positive samples or positive-advantage tokens.

Two papers, one mechanism:

* W-REINFORCE ("The Surprising Effectiveness of Negative Reinforcement in LLM Reasoning", Zhu et al., arXiv
  2506.01347): ``L = lambda * L_PSR + L_NSR``, the positive-sample term down-weighted by ``lambda = 0.1``, which
  keeps entropy and pass@k high (negative samples push probability mass away from wrong answers, spreading it).
* Positive-Advantage Reweighting ("Revisiting Entropy in Reinforcement Learning for Large Reasoning Models", arXiv
  2511.05993): entropy collapse comes mostly from positive-advantage tokens; a weight on their loss regulates it.

Per token: ``loss_i = w_i * surrogate_i`` with ``w_i = w_reinforce_lambda`` when the token is "positive" and 1
otherwise; negative and zero-advantage tokens are untouched. The weight multiplies the policy gradient (the
surrogate and EntroPIC's re-weighting term), not a regulariser (a KL-Cov penalty, an entropy bonus): the composition
rule of docs/controls.md. "Positive" is read from what every path has, the advantages (NeMo-RL's ``train_data`` carries
advantages, not rewards): ``w_reinforce_level: sample`` (default) takes the sign of the sample's summed advantage
over its valid tokens, ``token`` the sign of each token's own advantage. With group-relative advantages (GRPO,
RLOO: one value per sample) the two select the same tokens. For binary rewards in a group with mixed outcomes,
advantage > 0 is exactly reward = 1: a correct sample's baseline (the group mean, or the leave-one-out mean, which
includes at least one wrong sample) is below 1 and a wrong sample's is above 0, and dividing by the group's std
keeps the sign. A group whose rewards are all equal has advantage 0 and no gradient at all, whereas the paper's
REINFORCE with rewards +-1 and no baseline still trains on it; its magnitudes are +-1 where ours are the
advantages' (the surrogate, clipping and normalisation stay the run's). Positively homogeneous surrogates (PPO's clipped one with dual clip,
KL-Cov's ``-A r``, GPPO, REINFORCE with ``disable_ppo_ratio``, CISPO) make the weight identical to scaling the
positive advantages by ``lambda``.

Defaults: ``lambda = 0.1`` (W-REINFORCE). ``lambda = 1`` is the plain objective, ``0`` negative-sample
reinforcement only (NSR). No whole-step quantity: no plan, no collective.

NeMo-RL: LOGPROB input (no logits, no extra pass); cost one comparison and one multiply per token.

Metric: ``w_reinforce_positive_fraction``, the share of the step's valid tokens that were weighted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .base import Control, ControlConfig, bad_value

LEVELS = ("sample", "token")


@dataclass(frozen=True)
class WReinforceConfig(ControlConfig):
    w_reinforce_lambda: float = 0.1
    """Weight of the positive samples' (or tokens') policy-gradient term; W-REINFORCE's lambda = 0.1. 1 is plain
    RL, 0 keeps only the negative samples (NSR)."""
    w_reinforce_level: str = "sample"
    """What is "positive": ``sample`` (the sign of the sample's summed advantage over its valid tokens, W-REINFORCE's
    positive samples) or ``token`` (each token's advantage sign, Positive-Advantage Reweighting). Identical when
    advantages are one value per sample (GRPO, RLOO)."""

    def validate(self) -> None:
        if self.w_reinforce_lambda < 0:
            raise bad_value("w_reinforce_lambda", self.w_reinforce_lambda, ">= 0 (0.1 in W-REINFORCE; 1 disables)")
        if self.w_reinforce_level not in LEVELS:
            raise bad_value("w_reinforce_level", self.w_reinforce_level, f"one of {LEVELS}")


class WReinforce(Control):
    name = "w_reinforce"
    config_class = WReinforceConfig

    def positive(self, tokens) -> torch.Tensor:
        """Valid tokens counted as positive (per sample or per token), from the batch's own advantages (not another
        control's shaping of them)."""
        adv = tokens.input_advantages.detach()
        if self.config.w_reinforce_level == "token":
            return (adv > 0) & tokens.mask
        per_sample = torch.where(tokens.mask, adv, torch.zeros_like(adv)).sum(-1, keepdim=True) > 0
        return per_sample & tokens.mask

    def adjust(self, tokens, values, surrogate):
        weight = torch.where(self.positive(tokens), self.config.w_reinforce_lambda, 1.0)
        return weight.to(surrogate.dtype), None

    def metrics(self, tokens, values) -> dict[str, Any]:
        return {"w_reinforce_positive_fraction": float(tokens.token_sum(self.positive(tokens).float()))}

    def metric_normalizations(self) -> dict[str, str]:
        return {"w_reinforce_positive_fraction": "tokens"}
