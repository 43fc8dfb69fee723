"""``adaptive_entropy``: the entropy bonus with a coefficient that steers the entropy toward a target, the rule of
Skywork-OR1 (arXiv 2505.22312, section 3, "adaptive entropy control") as TRL implements it
(``use_adaptive_entropy``).

The coefficient ``c_t`` is control state. In optimizer step ``t``, with ``H_t`` the step's entropy:

    loss_i += -a_t H_i,      a_t = c_t if H_t <= entropy_target else 0            (the bonus, gated)
    c_{t+1} = clip(c_t + entropy_coef_delta,  entropy_coef_min, entropy_coef_max)  if H_t <= entropy_target
              clip(c_t - entropy_coef_delta,  entropy_coef_min, entropy_coef_max)  otherwise

The update is once per rollout by default (``controller_update: rollout``, Skywork-OR1's cadence: ``H`` is then the
rollout's mean old entropy over the tokens of all its optimizer steps, and every step of the rollout uses ``c_t``,
gated by its own step's entropy) or after every optimizer step (``optimizer_step``, TRL's cadence).
``c_0`` is ``entropy_coef`` (the bonus's key: TRL's initial coefficient; Skywork-OR1 starts at 0). The gate is
Skywork-OR1's ``1{e_k <= tgt-ent}`` and TRL's: the bonus acts only while the entropy is at or below the target, so
it never inflates an entropy that is already high, while the coefficient it will need keeps being learned. The per
token term, its normalisation and its metrics are the bonus's (:class:`~.entropy_bonus.EntropyBonusTerm`).

``H_t`` is the **exact mean of the old policy's full-vocabulary entropy over every valid token of the step**
(``needs`` ``old_entropy``; one sum in the plan's single all-reduce, in exact fixed point, so every rank and every
layout gets the same bits and so the same coefficient). TRL measures the current policy's entropy over the
gradient-accumulation window and applies the update from the *next* step on (its gate uses the previous step's
entropy); with the old policy's entropy known before the step's first micro-batch, step ``t``'s gate and update use
step ``t``'s own entropy, and the coefficient of step ``t``'s loss is in step ``t``'s plan (so it reaches NeMo-RL's
workers with the batch). ``update(records)`` advances ``c`` from the recorded plans alone: identical on every
rank, checkpointed, and a resumed run continues exactly. A step without valid tokens leaves ``c`` unchanged.

Metrics: the bonus's ``entropy_loss`` and ``entropy_coef`` (the coefficient applied in this step's loss, after the
gate), and ``entropy_target``, next to the engine's ``entropy_mean`` in ``metrics.jsonl``.

NeMo-RL: needs ``nemo_rl.input_type: logit`` (the bonus's gradient) and the driver's old-entropy pass (one
eval-mode forward over the step's samples, ``integrations/entropy_probe.py``); state on the driver (needs
``nemo_rl.plan: driver``), saved in every NeMo-RL checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from .base import ControlConfig, bad_value, token_weighted_mean
from .entropy_bonus import EntropyBonusTerm

__all__ = ["AdaptiveEntropyConfig", "AdaptiveEntropy", "next_adaptive_coef"]


@dataclass(frozen=True)
class AdaptiveEntropyConfig(ControlConfig):
    entropy_target: float = 0.2
    """Target of the step's mean entropy in nats (TRL ``entropy_target``, Skywork-OR1 ``tgt-ent``: 0.2)."""
    entropy_coef_min: float = 0.0
    """Lower bound of the coefficient (TRL ``entropy_coef_min``)."""
    entropy_coef_max: float = 1.0
    """Upper bound of the coefficient (TRL ``entropy_coef_max``)."""
    entropy_coef_delta: float = 0.005
    """Change of the coefficient per update (per rollout, or per optimizer step with ``controller_update:
    optimizer_step``; TRL ``entropy_coef_delta``, Skywork-OR1's Delta: 0.005)."""

    def validate(self) -> None:
        if self.entropy_target < 0:
            raise bad_value("entropy_target", self.entropy_target, ">= 0 (nats)")
        if self.entropy_coef_min < 0:
            raise bad_value("entropy_coef_min", self.entropy_coef_min, ">= 0")
        if self.entropy_coef_max < self.entropy_coef_min:
            raise bad_value("entropy_coef_max", self.entropy_coef_max,
                            f">= loss_fn.entropy_coef_min={self.entropy_coef_min!r}")
        if self.entropy_coef_delta < 0:
            raise bad_value("entropy_coef_delta", self.entropy_coef_delta, ">= 0")


def next_adaptive_coef(coef: float, entropy: float, config: AdaptiveEntropyConfig) -> float:
    """One step of the rule: ``coef +/- delta`` toward keeping ``entropy`` at the target, clipped to the bounds."""
    step = config.entropy_coef_delta if entropy <= config.entropy_target else -config.entropy_coef_delta
    return min(max(coef + step, config.entropy_coef_min), config.entropy_coef_max)


class AdaptiveEntropy(EntropyBonusTerm):
    name = "adaptive_entropy"
    config_class = AdaptiveEntropyConfig
    exclusive: ClassVar[tuple[str, ...]] = ("entropy_bonus", "entropy_controller")
    needs: ClassVar[frozenset[str]] = frozenset({"entropy", "old_entropy"})
    stateful = True

    def __init__(self, config):
        super().__init__(config)
        self.coef = float(config.entropy_coef)  # c_0: the bonus's key, TRL's initial coefficient

    # ------------------------------------------------------------------ per optimizer step
    def plan(self, ctx) -> dict[str, Any]:
        entropy = float(ctx.entropy_mean)
        gate = entropy <= self.config.entropy_target
        return {"coef": self.coef if gate else 0.0, "coef_state": self.coef, "entropy_mean": entropy}

    def update(self, records) -> None:
        coef = float(records[0].values["coef_state"])  # every record was planned with the same state
        entropy = token_weighted_mean(records, "entropy_mean")
        if entropy is not None:  # steps without tokens measured nothing
            coef = next_adaptive_coef(coef, entropy, self.config)
        self.coef = coef

    # ------------------------------------------------------------------ per micro-batch
    def coefficient(self, values: Mapping[str, Any]) -> float:
        return float(values["coef"])

    def metrics(self, tokens, values) -> dict[str, float]:
        return {**super().metrics(tokens, values), "entropy_target": tokens.step_constant(self.config.entropy_target)}

    def metric_normalizations(self) -> dict[str, str]:
        return {**super().metric_normalizations(), "entropy_target": "tokens"}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"entropy_coef": self.coef}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:  # a checkpoint of a run without this control: start from c_0
            return
        if set(state) != {"entropy_coef"}:
            raise ValueError(f"control 'adaptive_entropy' expects state {{'entropy_coef': float}}, got {dict(state)}")
        self.coef = float(state["entropy_coef"])
