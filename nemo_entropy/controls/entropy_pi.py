"""``entropy_pi``: EntroPIC, a proportional-integral controller of the entropy that re-weights positive- against
negative-advantage tokens (Yang et al., *EntroPIC: Towards Stable Long-Term Training of LLMs via Entropy
Stabilization with Proportional-Integral Control*, Tencent Hunyuan, arXiv 2511.15248; Kp = 1, Ki = 0.01).

Why it works: reinforcing a high-probability token with a positive advantage sharpens its distribution (entropy
falls), pushing down a high-probability token with a negative advantage flattens it (entropy rises). EntroPIC
turns that into an actuator. In optimizer step ``t``, with ``H_t`` the step's entropy and ``I_t`` the integral
(control state):

    e_t = entropy_pi_target - H_t                                   the error
    u_t = clip(Kp e_t + Ki I_t,  -entropy_pi_max_control, +entropy_pi_max_control)      the control signal
    I_{t+1} = I_t + e_t                                              (update(plan), after the step)

and every valid token whose current probability exceeds ``entropy_pi_prob_threshold`` gets the additive term
``u_t r_i |A_i|`` (``r`` the PPO ratio), normalised like the surrogate. Within the clip range the surrogate of such a
token is ``-A r``, so its total is ``-A_i r_i (1 - u_t)`` for ``A_i > 0`` and ``-A_i r_i (1 + u_t)`` for ``A_i < 0``:
when the entropy is below the target (``u > 0``) positive-advantage tokens are down-weighted and
negative-advantage ones up-weighted, and the other way round above it. Other tokens are unchanged.

Faithful to EntroPIC's released code (a verl fork: ``compute_policy_loss_entropic`` and its actor), with its
sign convention flipped to the error ``target - H`` (its ``control_alpha`` is ``-u``): the same gains (its
``entropy_control_p`` 1, ``entropy_control_i`` 0.01), the same clip of the signal to [-1, 1], the same high-probability
gate (``p > 0.95`` on the current log-probs), the same additive unclipped term ``-control_alpha * r * |A|`` on top of
the clipped surrogate, and the integral of past errors only (its signal is computed before the error is added).
Three differences, each for exactness across layouts:

* ``H_t`` is the exact mean of the *old* policy's full-vocabulary entropy over every valid token of the optimizer
  step (``needs`` ``old_entropy``, exact fixed-point sums in the plan's one all-reduce); the reference uses the
  current policy's entropy of each micro-batch on each GPU and updates its integral after every micro-batch, so its
  signal varies with the micro-batch size and the GPU count. Here the signal is one number per step, the same on
  every rank, in the step's plan (so it reaches NeMo-RL's workers with the batch).
* The term is normalised like the surrogate (token mean over all the step's valid tokens); the reference divides
  it by the micro-batch's count of gated tokens (a per-micro-batch quantity). The two agree when every token is
  gated; in general the reference's effective weight is ``1 -/+ u N / N_gated``, which can leave [0, 2].
* A step without valid tokens measures nothing and leaves the integral unchanged.

The integral is not bounded (as in the reference); the clip bounds the signal.

Keys: ``entropy_pi_target`` (reference ``target_entropy``, which has no default there: < 0 disables it),
``entropy_pi_kp`` / ``entropy_pi_ki`` (``entropy_control_p`` / ``entropy_control_i``), ``entropy_pi_prob_threshold``
(its ``high_prob_thresh``, 0.95), ``entropy_pi_max_control`` (its clip, 1). Metrics: ``entropy_target`` (next to
the engine's ``entropy_mean``), ``entropy_pi_control`` (``u_t``), ``entropy_pi_integral`` (``I_t``),
``entropy_pi_gated_fraction`` (share of valid tokens above the probability threshold).

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
    """The control signal is clipped to [-v, v] (EntroPIC: 1), keeping every weight ``1 -/+ u`` in [0, 2]."""

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


def pi_control(error: float, integral: float, config: EntropyPIConfig) -> float:
    """``clip(Kp e + Ki I, -max, max)``."""
    bound = config.entropy_pi_max_control
    return min(max(config.entropy_pi_kp * error + config.entropy_pi_ki * integral, -bound), bound)


class EntropyPI(Control):
    name = "entropy_pi"
    config_class = EntropyPIConfig
    exclusive: ClassVar[tuple[str, ...]] = ("entropy_controller",)
    needs: ClassVar[frozenset[str]] = frozenset({"old_entropy"})
    needs_ppo_ratio = True
    stateful = True

    def __init__(self, config):
        super().__init__(config)
        self.integral = 0.0

    # ------------------------------------------------------------------ per optimizer step
    def plan(self, ctx) -> dict[str, Any]:
        error = self.config.entropy_pi_target - float(ctx.entropy_mean) if ctx.num_valid_tokens > 0 else 0.0
        return {"control": pi_control(error, self.integral, self.config), "error": error, "integral": self.integral}

    def update(self, records) -> None:
        error = token_weighted_mean(records, "error")  # target - the recorded steps' exact mean entropy
        # every record was planned with the same integral; steps without tokens measured nothing
        self.integral = float(records[0].values["integral"]) + (error if error is not None else 0.0)

    # ------------------------------------------------------------------ per micro-batch
    def gated(self, tokens) -> torch.Tensor:
        """Valid tokens whose current probability exceeds the threshold (no gradient through the gate)."""
        threshold = self.config.entropy_pi_prob_threshold
        cut = math.log(threshold) if threshold > 0 else -math.inf
        return tokens.mask & (tokens.logprobs.detach() > cut)

    def adjust(self, tokens, values, surrogate):
        term = float(values["control"]) * tokens.ratio * tokens.advantages.abs()
        return None, torch.where(self.gated(tokens), term, torch.zeros_like(term))

    def metrics(self, tokens, values) -> dict[str, float]:
        return {"entropy_target": tokens.step_constant(self.config.entropy_pi_target),
                "entropy_pi_control": tokens.step_constant(float(values["control"])),
                "entropy_pi_integral": tokens.step_constant(float(values["integral"])),
                "entropy_pi_gated_fraction": float(tokens.token_sum(self.gated(tokens).float()))}

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
