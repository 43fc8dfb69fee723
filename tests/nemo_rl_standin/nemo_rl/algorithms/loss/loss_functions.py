"""``ClippedPGLossFn`` as NeMo-RL documents it (token-level PPO clip, dual clip, k3 reference KL weighted by
``exp(logp - sg(logp))``), re-derived for the stand-in; only the options the preflight exercises."""

from typing import Optional, TypedDict

import torch

import nemo_rl
from nemo_rl.algorithms.loss.interfaces import LossInputType, LossType

if nemo_rl.GENERATION == "main":
    from pydantic import BaseModel

    class ClippedPGLossConfig(BaseModel, extra="allow"):
        ratio_clip_min: float = 0.2
        ratio_clip_max: float = 0.2
        ratio_clip_c: Optional[float] = None
        reference_policy_kl_penalty: float = 0.01
        reference_policy_kl_type: str = "k3"
        kl_input_clamp_value: Optional[float] = 20.0
        kl_output_clamp_value: Optional[float] = 10.0
        token_level_loss: bool = True
        disable_ppo_ratio: bool = False

    def _get(cfg, key):
        return getattr(cfg, key)
else:
    class ClippedPGLossConfig(TypedDict, total=False):
        ratio_clip_min: float
        ratio_clip_max: float
        ratio_clip_c: Optional[float]
        reference_policy_kl_penalty: float

    _DEFAULTS = dict(ratio_clip_min=0.2, ratio_clip_max=0.2, ratio_clip_c=None, reference_policy_kl_penalty=0.01,
                     kl_input_clamp_value=20.0, kl_output_clamp_value=10.0)

    def _get(cfg, key):
        return cfg.get(key, _DEFAULTS.get(key))


class ClippedPGLossFn:
    loss_type = LossType.TOKEN_LEVEL
    input_type = LossInputType.LOGPROB

    def __init__(self, cfg, use_fused_linear_logprobs: bool = False):
        self.cfg = cfg
        self.use_fused_linear_logprobs = use_fused_linear_logprobs
        self.reference_policy_kl_penalty = _get(cfg, "reference_policy_kl_penalty")

    def __call__(self, data, global_valid_seqs, global_valid_toks, next_token_logprobs=None, **_):
        cfg, lp = self.cfg, next_token_logprobs
        mask = data["token_mask"][:, 1:] * data["sample_mask"][:, None]
        adv = data["advantages"][:, 1:]
        ratio = torch.exp(lp - data["prev_logprobs"][:, 1:])
        clamped = ratio.clamp(1 - _get(cfg, "ratio_clip_min"), 1 + _get(cfg, "ratio_clip_max"))
        per_token = torch.maximum(-adv * ratio, -adv * clamped)
        if _get(cfg, "ratio_clip_c") is not None:
            per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * _get(cfg, "ratio_clip_c")), per_token)
        loss = (per_token * mask).sum() / global_valid_toks
        beta = self.reference_policy_kl_penalty
        if beta:
            x = (data["reference_policy_logprobs"][:, 1:] - lp).clamp(-_get(cfg, "kl_input_clamp_value"),
                                                                       _get(cfg, "kl_input_clamp_value"))
            k3 = (torch.exp(lp - lp.detach()) * (torch.exp(x) - 1 - x)).clamp(-_get(cfg, "kl_output_clamp_value"),
                                                                             _get(cfg, "kl_output_clamp_value"))
            loss = loss + beta * (k3 * mask).sum() / global_valid_toks
        return loss, {"loss": float(loss.detach()), "num_valid_samples": float(data["sample_mask"].sum())}
