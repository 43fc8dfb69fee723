"""``aent``: AEnt, the clamped-entropy bonus with an adaptive coefficient kept in a box (Shen, *On Entropy Control
in LLM-RL Algorithms*, arXiv 2509.03493; the author's verl and AReaL recipes).

Per token the loss gets ``-c_t H^clamp_i``: the bonus of ``entropy_bonus`` on the **clamped entropy**, the entropy
of the distribution restricted to its top tokens and renormalised. The ``floor(aent_clamp x V)`` lowest-logit
tokens are removed (ties with the threshold are kept), so the bonus spreads probability only among plausible
tokens instead of over the huge tail of the vocabulary, which is the paper's argument why plain entropy
regularisation fails for LLMs (sparse optimality over an immense response set). Its gradient flows through the
kept logits, as in the reference (the kept set is chosen without gradient). The clamped entropy needs the logits'
top part, so it is computed from the current logits shard by
:func:`nemo_entropy.entropy.vocab_parallel_clamped_entropy` (exact under tensor parallelism: a TP-wide bisection
for the threshold, then the entropy's own two TP all-reduces; see its module doc), through this control's
:meth:`~nemo_entropy.controls.base.Control.logit_values`: the engine calls it on the scoring pass's logits shard,
the NeMo-RL adapter on the LOGIT input's shard.

The coefficient (state, with ``aent_adaptive_coef``) moves by the distance of the step's entropy ``H_t`` from the
band ``[aent_entropy_low, aent_entropy_high]`` and stays in the box ``[aent_coef_box_low, aent_coef_box_high]``:

    c_{t+1} = clip(c_t - aent_coef_lr * (min(0, H_t - low) + max(0, H_t - high)),  box_low, box_high)

(it grows while the entropy is below the band, shrinks above it, rests inside it), from optimizer step
``aent_warmup_steps`` on; ``c_0 = aent_coef``. One deliberate difference from the reference: AEnt's code measures
``H_t`` as the *current* policy's *clamped* entropy averaged over the mini-batches of one rollout and moves the
coefficient once per rollout. Here ``H_t`` is the exact mean of the *old* policy's *full-vocabulary* entropy
(``needs`` ``old_entropy``, exact fixed-point sums in the plan's one all-reduce) over every valid token of the rollout
(``controller_update: rollout``, the default and AReaL's cadence: every optimizer step of the rollout uses the same
coefficient, which moves once after the rollout) or of each optimizer step (``controller_update: optimizer_step``),
the same on every rank and layout. The full and the clamped entropy differ by
``(1 - m)(H_tail - H_top) + h(m)`` with ``m`` the kept tokens' mass (``h`` the binary entropy): negligible where the
removed tail holds little mass, which is the regime AEnt's band is meant for; set the band in full-entropy nats.

Keys map AReaL's ``actor.aent`` (``entropy_coeff, entropy_clamp, adaptive_coeff, entropy_high, entropy_low,
coeff_lr, coeff_box_high, coeff_box_low, warmup_steps``) to ``aent_coef, aent_clamp, aent_adaptive_coef,
aent_entropy_high, aent_entropy_low, aent_coef_lr, aent_coef_box_high, aent_coef_box_low, aent_warmup_steps``
(defaults AReaL's, except ``aent_adaptive_coef: true``: ``method: aent`` is the adaptive method; false keeps the
coefficient constant). Metrics: the bonus's ``entropy_loss`` / ``entropy_coef``, ``entropy_clamped`` (mean
clamped entropy of the current policy, AReaL's ``entropy``), ``entropy_target`` (the band's centre, for
tracking-error tables) with ``entropy_target_low`` / ``entropy_target_high``.

NeMo-RL: needs ``nemo_rl.input_type: logit`` (the clamped entropy is computed from the logits) and, with the
adaptive coefficient, the driver's old-entropy pass (one eval-mode forward per step, ``integrations/entropy_probe.py``)
and ``nemo_rl.plan: driver``. Cost over the LOGIT input: the clamped entropy's ~36 reads of the logits shard
per micro-batch forward and 35 small TP all-reduces of ``[tokens]`` (its module doc), PyTorch only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

from ..entropy.clamped import vocab_parallel_clamped_entropy
from .base import ControlConfig, bad_value, token_weighted_mean
from .entropy_bonus import EntropyBonusTerm

__all__ = ["AEntConfig", "AEnt", "next_aent_coef"]


@dataclass(frozen=True)
class AEntConfig(ControlConfig):
    aent_coef: float = 1e-3
    """Initial (or, without ``aent_adaptive_coef``, constant) coefficient of the clamped-entropy bonus (AReaL
    ``entropy_coeff``, 0.001; the verl recipe uses 2e-4)."""
    aent_clamp: float = 0.2
    """Fraction of the vocabulary removed from each distribution before its entropy is taken: the
    ``floor(p V)`` lowest logits (AReaL ``entropy_clamp``, 0.2; the paper's p; the verl recipe uses 0.3)."""
    aent_adaptive_coef: bool = True
    """Move the coefficient by the entropy's distance from the band (AReaL ``adaptive_coeff``, default false there;
    true here: the adaptive coefficient is AEnt's method)."""
    aent_entropy_low: float = 0.1
    """Lower edge of the entropy band in nats: below it the coefficient grows (AReaL ``entropy_low``)."""
    aent_entropy_high: float = 0.5
    """Upper edge of the band: above it the coefficient shrinks (AReaL ``entropy_high``)."""
    aent_coef_lr: float = 1e-3
    """Step size of the coefficient per update (per rollout, as AReaL's ``coeff_lr``, or per optimizer step with
    ``controller_update: optimizer_step``) and nat of distance from the band."""
    aent_coef_box_low: float = 1e-5
    """The coefficient is kept >= this (AReaL ``coeff_box_low``)."""
    aent_coef_box_high: float = 1e-2
    """The coefficient is kept <= this (AReaL ``coeff_box_high``)."""
    aent_warmup_steps: int = 0
    """The coefficient moves only in updates whose first optimizer step has at least this index (AReaL
    ``warmup_steps``, counted in rollouts there)."""

    def validate(self) -> None:
        if self.aent_coef < 0:
            raise bad_value("aent_coef", self.aent_coef, ">= 0")
        if not 0.0 <= self.aent_clamp < 1.0:
            raise bad_value("aent_clamp", self.aent_clamp, "a fraction of the vocabulary in [0, 1)")
        if self.aent_warmup_steps < 0:
            raise bad_value("aent_warmup_steps", self.aent_warmup_steps, "an integer >= 0")
        if not self.aent_adaptive_coef:
            return
        if self.aent_entropy_low > self.aent_entropy_high:
            raise bad_value("aent_entropy_low", self.aent_entropy_low,
                            f"<= loss_fn.aent_entropy_high={self.aent_entropy_high!r}")
        if self.aent_coef_lr < 0:
            raise bad_value("aent_coef_lr", self.aent_coef_lr, ">= 0")
        if not 0.0 <= self.aent_coef_box_low <= self.aent_coef_box_high:
            raise bad_value("aent_coef_box_low", self.aent_coef_box_low,
                            f"in [0, loss_fn.aent_coef_box_high={self.aent_coef_box_high!r}]")
        if not self.aent_coef_box_low <= self.aent_coef <= self.aent_coef_box_high:
            raise bad_value("aent_coef", self.aent_coef, f"inside the box [loss_fn.aent_coef_box_low, "
                            f"loss_fn.aent_coef_box_high] = [{self.aent_coef_box_low!r}, {self.aent_coef_box_high!r}]")


def next_aent_coef(coef: float, entropy: float, config: AEntConfig) -> float:
    """One step of AEnt's rule: move by ``-lr x`` (signed distance of ``entropy`` from the band), clip to the box."""
    distance = min(0.0, entropy - config.aent_entropy_low) + max(0.0, entropy - config.aent_entropy_high)
    return min(max(coef - config.aent_coef_lr * distance, config.aent_coef_box_low), config.aent_coef_box_high)


class AEnt(EntropyBonusTerm):
    name = "aent"
    config_class = AEntConfig
    exclusive: ClassVar[tuple[str, ...]] = ("entropy_bonus", "entropy_controller")
    needs: ClassVar[frozenset[str]] = frozenset({"logits", "old_entropy"})
    stateful = True

    def __init__(self, config):
        super().__init__(config)
        adaptive = self.config.aent_adaptive_coef
        # A constant coefficient needs neither the old entropy nor state (nor, on NeMo-RL, the driver's plan).
        self.stateful = adaptive
        self.needs = frozenset({"logits", "old_entropy"}) if adaptive else frozenset({"logits"})
        self.coef = float(self.config.aent_coef)

    # ------------------------------------------------------------------ per optimizer step
    def plan(self, ctx) -> dict[str, Any]:
        if not self.stateful:
            return {}
        return {"coef": self.coef, "entropy_mean": float(ctx.entropy_mean)}

    def update(self, records) -> None:
        if not self.stateful:
            return
        coef = float(records[0].values["coef"])  # every record was planned with the same state
        entropy = token_weighted_mean(records, "entropy_mean")
        if entropy is not None and records[0].step >= self.config.aent_warmup_steps:
            coef = next_aent_coef(coef, entropy, self.config)
        self.coef = coef

    # ------------------------------------------------------------------ per micro-batch
    def logit_values(self, logits_shard, *, tp_group, vocab_start, vocab_size):
        return {"clamped_entropy": vocab_parallel_clamped_entropy(
            logits_shard, self.config.aent_clamp, groups=tp_group, vocab_start=vocab_start, vocab_size=vocab_size)}

    def bonus_entropy(self, tokens):
        return tokens.logit_values[self.name]["clamped_entropy"]

    def coefficient(self, values: Mapping[str, Any]) -> float:
        return float(values["coef"]) if self.stateful else self.config.aent_coef

    def metrics(self, tokens, values) -> dict[str, float]:
        out = {**super().metrics(tokens, values),
               "entropy_clamped": float(tokens.token_sum(self.bonus_entropy(tokens).detach()))}
        if self.stateful:
            low, high = self.config.aent_entropy_low, self.config.aent_entropy_high
            out.update(entropy_target=tokens.step_constant((low + high) / 2),
                       entropy_target_low=tokens.step_constant(low), entropy_target_high=tokens.step_constant(high))
        return out

    def metric_normalizations(self) -> dict[str, str]:
        targets = ("entropy_target", "entropy_target_low", "entropy_target_high") if self.stateful else ()
        return {**super().metric_normalizations(), "entropy_clamped": "tokens", **{k: "tokens" for k in targets}}

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"aent_coef": self.coef} if self.stateful else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if not state:  # a checkpoint of a run without this control: start from c_0
            return
        if not self.stateful or set(state) != {"aent_coef"}:
            raise ValueError(f"control 'aent' (aent_adaptive_coef={self.stateful}) cannot load state {dict(state)}")
        self.coef = float(state["aent_coef"])
