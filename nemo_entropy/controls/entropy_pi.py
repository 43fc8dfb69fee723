"""``entropy_pi``: EntroPIC, a proportional-integral controller of the entropy that re-weights positive- against
negative-advantage tokens (Yang et al., *EntroPIC: Towards Stable Long-Term Training of LLMs via Entropy
Stabilization with Proportional-Integral Control*, Tencent Hunyuan, arXiv 2511.15248; Kp = 1, Ki = 0.01).

Why it works: reinforcing a high-probability token with a positive advantage sharpens its distribution (entropy
falls), pushing down a high-probability token with a negative advantage flattens it (entropy rises). EntroPIC
turns that into an actuator. With ``H_t`` the measured entropy and ``I_t`` the integral (control state):

    e_t = entropy_pi_target - H_t                                   the error
    u_t = clip(Kp e_t + Ki I_t,  -entropy_pi_max_control, +entropy_pi_max_control)      the control signal
    I   += e                                                         (once per rollout: ``controller_update``)

The *gated* tokens, valid tokens whose probability exceeds ``entropy_pi_prob_threshold``, get the additive term
``u_t r_i |A_i|`` (``r`` the PPO ratio), **normalised by the gated tokens** (``entropy_pi_normalization:
gated_tokens``, the default): the loss gets ``u_t sum_gated(r |A|) / N_gated`` next to the surrogate's
``sum_valid(...) / N`` (with ``token_level_loss: false``: the mean over the sequences with a gated token of each
one's mean over its gated tokens). Within the clip range the surrogate of a gated token is ``-A r``, so its total
weight is ``1 -/+ u_t N / N_gated`` for ``A >/< 0``. ``entropy_pi_normalization: all_tokens`` (this project's earlier
variant, not the published one) divides the term by all valid tokens instead: weight ``1 -/+ u_t``, a lever weaker
by the gated fraction ``N_gated / N``.

What the authors' code (``yk7333/EntroPIC``, a verl fork: ``core_algos.py`` ``compute_policy_loss_entropic``, the
control signal in ``dp_actor.py`` ``update_policy``) does, and where this differs, each for exactness across layouts:

* Same: the gains (``entropy_control_p`` 1, ``entropy_control_i`` 0.01), the clip of the signal to [-1, 1], the gate
  ``p > 0.95``, the additive unclipped term ``control_alpha * agg_loss(-r |A|, response_mask * gate)`` (its
  ``control_alpha`` is ``-u``: the error there is ``H - target``) normalised over the gated tokens, on top of the
  clipped surrogate; the integral of past errors only (the signal is computed before the error is added).
* ``H_t`` is the exact mean of the *old* policy's full-vocabulary entropy over the step's valid tokens (``needs``
  ``old_entropy``, exact fixed-point sums in the plan's one all-reduce); the reference uses the current policy's
  entropy of each micro-batch on each GPU (in its published recipe, one optimizer step per rollout, on-policy, the
  two policies are the same). Here the signal is one number per optimizer step, the same on every rank.
* The gate reads the *old* policy's probability, and ``N_gated`` is the gated tokens of the whole optimizer step over
  every rank (a count in the plan's all-reduce, :meth:`counted_tokens`); the reference gates on the current
  probability and divides by each micro-batch's own gated count on each GPU, so its scale varies with the
  micro-batch size. On its published recipe (on-policy, one optimizer step per rollout) the old and the current
  probability are equal.
* The integral moves once per rollout by the rollout's mean error over all its valid tokens (the reference adds each
  micro-batch's error weighted by its share of the mini-batch: per optimizer step, which is per rollout in its
  recipe, where the mini-batch is the whole rollout). ``controller_update: optimizer_step`` moves it per step.
* A step without valid tokens measures nothing and leaves the integral unchanged.

The integral is not bounded (as in the reference); the clip bounds the signal.

Composition (docs/controls.md): the term is a policy-gradient term, so another control's weight on the policy
gradient (Clip-Cov's detached tokens, the top-entropy mask, W-REINFORCE's lambda) multiplies it like the surrogate.

Keys: ``entropy_pi_target`` (reference ``target_entropy``, which has no default there: < 0 disables it),
``entropy_pi_kp`` / ``entropy_pi_ki`` (``entropy_control_p`` / ``entropy_control_i``), ``entropy_pi_prob_threshold``
(its ``high_prob_thresh``, 0.95), ``entropy_pi_max_control`` (its clip, 1), ``entropy_pi_normalization``. Metrics:
``entropy_target`` (next to the engine's ``entropy_mean``), ``entropy_pi_control`` (``u_t``), ``entropy_pi_integral``
(``I_t``), ``entropy_pi_gated_fraction`` (``N_gated / N``).

NeMo-RL: works with either input type (it needs the log-probs and the old entropy, not the current one): the
driver computes the old entropy by one eval-mode forward over the step's samples (``integrations/entropy_probe.py``;
about a third of a training step's compute); state on the driver (``nemo_rl.plan: driver``), saved in every
NeMo-RL checkpoint. Per micro-batch it costs a few elementwise operations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from .base import Control, ControlConfig, bad_value, token_weighted_mean

__all__ = ["EntropyPIConfig", "EntropyPI", "pi_control"]

NORMALIZATIONS = ("gated_tokens", "all_tokens")


@dataclass(frozen=True)
class EntropyPIConfig(ControlConfig):
    entropy_pi_target: float = 0.2
    """Target of the step's mean entropy in nats (EntroPIC ``target_entropy``; no published default, 0.2 as
    Skywork-OR1 / TRL's ``entropy_target``)."""
    entropy_pi_kp: float = 1.0
    """Proportional gain Kp (EntroPIC ``entropy_control_p``: 1)."""
    entropy_pi_ki: float = 0.01
    """Integral gain Ki (EntroPIC ``entropy_control_i``: 0.01)."""
    entropy_pi_prob_threshold: float = 0.95
    """Only tokens whose current probability exceeds this are re-weighted (EntroPIC ``high_prob_thresh``: 0.95)."""
    entropy_pi_max_control: float = 1.0
    """The control signal is clipped to [-v, v] (EntroPIC: 1)."""
    entropy_pi_normalization: str = "gated_tokens"
    """What the re-weighting term is divided by: ``gated_tokens`` (the step's gated tokens, as EntroPIC's code) or
    ``all_tokens`` (all the step's valid tokens, like the surrogate: a weaker lever, this project's earlier variant)."""

    def validate(self) -> None:
        if self.entropy_pi_target < 0:
            raise bad_value("entropy_pi_target", self.entropy_pi_target, ">= 0 (nats)")
        for key in ("entropy_pi_kp", "entropy_pi_ki"):
            if getattr(self, key) < 0:
                raise bad_value(key, getattr(self, key), ">= 0")
        if not 0.0 <= self.entropy_pi_prob_threshold < 1.0:
            raise bad_value("entropy_pi_prob_threshold", self.entropy_pi_prob_threshold, "a probability in [0, 1)")
        if not 0.0 < self.entropy_pi_max_control <= 1.0:
            raise bad_value("entropy_pi_max_control", self.entropy_pi_max_control, "in (0, 1]")
        if self.entropy_pi_normalization not in NORMALIZATIONS:
            raise bad_value("entropy_pi_normalization", self.entropy_pi_normalization, f"one of {NORMALIZATIONS}")


def pi_control(error: float, integral: float, config: EntropyPIConfig) -> float:
    """``clip(Kp e + Ki I, -max, max)``."""
    bound = config.entropy_pi_max_control
    return min(max(config.entropy_pi_kp * error + config.entropy_pi_ki * integral, -bound), bound)


class EntropyPI(Control):
    name = "entropy_pi"
    config_class = EntropyPIConfig
    exclusive: ClassVar[tuple[str, ...]] = ("entropy_controller",)
    term_kind: ClassVar[str] = "policy_gradient"
    needs: ClassVar[frozenset[str]] = frozenset({"old_entropy"})
    needs_ppo_ratio = True
    stateful = True

    def __init__(self, config):
        super().__init__(config)
        self.integral = 0.0

    # ------------------------------------------------------------------ per optimizer step
    def gated(self, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Valid tokens whose old-policy probability exceeds the threshold (compared in fp32, as the loss sees them)."""
        threshold = self.config.entropy_pi_prob_threshold
        cut = math.log(threshold) if threshold > 0 else -math.inf
        return mask & (old_logprobs.detach().float() > cut)

    def counted_keys(self) -> dict[str, None]:
        return {"gated": None}

    def counted_tokens(self, old_logprobs, mask):
        return {"gated": self.gated(old_logprobs, mask)}

    def plan(self, ctx) -> dict[str, Any]:
        error = self.config.entropy_pi_target - float(ctx.entropy_mean) if ctx.num_valid_tokens > 0 else 0.0
        gated_tokens, gated_seqs = ctx.counts[self.name]["gated"]
        return {"control": pi_control(error, self.integral, self.config), "error": error, "integral": self.integral,
                "gated_tokens": float(gated_tokens), "gated_seqs": float(gated_seqs)}

    def update(self, records) -> None:
        error = token_weighted_mean(records, "error")  # target - the recorded steps' exact mean entropy
        # every record was planned with the same integral; steps without tokens measured nothing
        self.integral = float(records[0].values["integral"]) + (error if error is not None else 0.0)

    # ------------------------------------------------------------------ per micro-batch
    def adjust(self, tokens, values, surrogate):
        gated = self.gated(tokens.old_logprobs, tokens.mask)
        term = float(values["control"]) * tokens.ratio * tokens.advantages.abs()
        if self.config.entropy_pi_normalization == "gated_tokens":
            term = term * self._gated_scale(tokens, gated, values)
        return None, torch.where(gated, term, torch.zeros_like(term))

    @staticmethod
    def _gated_scale(tokens, gated, values) -> torch.Tensor | float:
        """The factor that turns the loss's normalisation (all valid tokens, or per-sequence means over all sequences)
        into EntroPIC's over the gated tokens (or the gated tokens of each sequence, over the sequences with one)."""
        if float(values["gated_tokens"]) <= 0:
            return 0.0
        if tokens.config.token_level_loss:
            return float(tokens.global_valid_tokens) / float(values["gated_tokens"])
        per_row = tokens.mask.sum(-1, keepdim=True).float() / gated.sum(-1, keepdim=True).clamp(min=1).float()
        return per_row * (float(tokens.global_valid_seqs) / float(values["gated_seqs"]))

    def metrics(self, tokens, values) -> dict[str, float]:
        return {"entropy_target": tokens.step_constant(self.config.entropy_pi_target),
                "entropy_pi_control": tokens.step_constant(float(values["control"])),
                "entropy_pi_integral": tokens.step_constant(float(values["integral"])),
                "entropy_pi_gated_fraction": float(tokens.token_sum(self.gated(tokens.old_logprobs,
                                                                                tokens.mask).float()))}

    def metric_normalizations(self) -> dict[str, str]:
        return {k: "tokens" for k in ("entropy_target", "entropy_pi_control", "entropy_pi_integral",
                                      "entropy_pi_gated_fraction")}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"integral": self.integral}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:  # a checkpoint of a run without this control: start from 0
            return
        if set(state) != {"integral"}:
            raise ValueError(f"control 'entropy_pi' expects state {{'integral': float}}, got {dict(state)}")
        self.integral = float(state["integral"])
