"""``entropy_bonus``: the classic entropy regularisation, ``- entropy_coef * H`` per token.

Per valid token ``i`` the loss gets the additive term ``-c H_i`` with ``H_i`` the full-vocabulary entropy of the
current policy's distribution at that position, computed by the vocab-parallel kernel *with its gradient*
(``dH/dz_v = -p_v (z_v - E_p z)``), so the term pushes every distribution toward higher entropy. It is normalised
like the surrogate: the loss is ``reduce(surrogate_i - c H_i)``, a token mean over the step's valid tokens (or the
mean of per-sequence means with ``token_level_loss: false``), so summing the micro-batches' losses gives
``mean(surrogate) - c mean(H)`` whatever the layout. (With ``use_importance_sampling_correction`` the term is
weighted by the importance weight like every per-token term.) ``entropy_coef: 0`` computes and logs the term
without changing the loss, like OpenRLHF's ``--entropy_loss_coef 0``.

Names: TRL ``entropy_coef``, verl ``actor.entropy_coeff``, OpenRLHF ``--entropy_loss_coef``. Metrics:
``entropy_loss`` (the term's share of ``loss``: ``-c mean H``, normalised like the loss; verl's
``actor/entropy_loss`` is the mean entropy itself, logged here as ``entropy`` by the NeMo-RL adapter and
``entropy_mean`` by the engine) and ``entropy_coef`` (TRL's: the coefficient of this step's loss).

NeMo-RL: needs ``nemo_rl.input_type: logit`` (the entropy's gradient needs the logits). Cost: none beyond the LOGIT
input itself, which already computes the entropy with the log-probs in the same pass over the logits (forward
``2V + 24`` bytes per token, backward reads the shard again; docs/kernels.md).

:class:`EntropyBonusTerm` is the per-token term and its metrics, shared with the controls that move the
coefficient (``adaptive_entropy``) or change the entropy (``aent``): they differ only in
:meth:`~EntropyBonusTerm.coefficient` and :meth:`~EntropyBonusTerm.bonus_entropy`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from .base import Control, ControlConfig, TokenBatch, bad_value

__all__ = ["EntropyBonusConfig", "EntropyBonusTerm", "EntropyBonus"]


@dataclass(frozen=True)
class EntropyBonusConfig(ControlConfig):
    entropy_coef: float = 0.0
    """Coefficient ``c`` of the bonus ``-c H`` (TRL ``entropy_coef``, verl ``entropy_coeff``; both default to 0).
    Also the *initial* coefficient of ``adaptive_entropy`` (TRL's meaning with ``use_adaptive_entropy``)."""

    def validate(self) -> None:
        if self.entropy_coef < 0:
            raise bad_value("entropy_coef", self.entropy_coef, ">= 0 (a bonus: the loss gets -entropy_coef * H)")


class EntropyBonusTerm(Control):
    """The per-token bonus ``-c H_i`` and its metrics; subclasses say where ``c`` and ``H`` come from."""

    exclusive: ClassVar[tuple[str, ...]] = ("entropy_bonus",)

    def coefficient(self, values: Mapping[str, Any]) -> float:
        """The coefficient ``c`` of this step's loss."""
        raise NotImplementedError

    def bonus_entropy(self, tokens: TokenBatch) -> torch.Tensor:
        """The per-token entropy the bonus rewards, with its gradient: the full-vocabulary entropy."""
        return tokens.entropy

    def adjust(self, tokens, values, surrogate):
        return None, -self.coefficient(values) * self.bonus_entropy(tokens)

    def metrics(self, tokens, values) -> dict[str, float]:
        coef = self.coefficient(values)
        term = -coef * self.bonus_entropy(tokens).detach()
        return {"entropy_loss": float(tokens.loss_sum(term)), "entropy_coef": tokens.step_constant(coef)}

    def metric_normalizations(self) -> dict[str, str]:
        return {"entropy_loss": "tokens" if self.loss_config.token_level_loss else "sequences",
                "entropy_coef": "tokens"}


class EntropyBonus(EntropyBonusTerm):
    name = "entropy_bonus"
    config_class = EntropyBonusConfig
    needs: ClassVar[frozenset[str]] = frozenset({"entropy"})

    def coefficient(self, values) -> float:
        return self.config.entropy_coef
