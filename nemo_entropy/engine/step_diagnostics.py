"""Per-pass diagnostics of the covariance selection, and the first-order check of the entropy change.

:class:`StepDiagnostics` (``engine.step_diagnostics``, on by default when a covariance selection runs) answers, per
pass over the rollout (``engine.ppo_epochs``), why KL-Cov / Clip-Cov do or do not move entropy
(docs/engine.md, "Why KL-Cov needs a second pass"):

* ``selected_neg_log_ratio_fraction_pass<p>``: the fraction of the selected tokens with ``log r < 0`` when their
  step runs. KL-Cov's gradient on a selected token is ``beta sign(log r) grad log pi``: for ``log r < 0`` it raises
  the token's probability back, for ``log r > 0`` it lowers it further;
* ``penalty_zero_step_fraction_pass<p>``: the fraction of optimizer steps whose control gradient is exactly 0
  (KL-Cov: every selected token has ``log r == 0``, as on the on-policy first step of a rollout; Clip-Cov: nothing
  selected);
* ``selected_pg_grad_share_pass<p>``: ``|g_sel| / |g|``, the norm of the policy-gradient (the clipped surrogate's)
  gradient over the parameters from the selected tokens alone, against that of all tokens (mean over the pass's
  steps; two more backward passes per micro-batch, so only every ``engine.step_diagnostics``-th RL step).

:class:`EntropyChangeCheck` (``engine.entropy_change_check``) re-scores each optimizer step's mini-batch after the
step: ``entropy_change_observed`` is the mean entropy change on the same tokens, ``entropy_change_first_order``
the paper's Lemma 1 with the measured logit change ``dz``: ``-sum_a pi(a) (log pi(a) + H) dz(a)`` per token (the
within-state covariance of ``log pi`` and ``dz``), which must match the observed change to first order whatever
the optimizer. Values are exact sums over DP divided by the step's valid tokens.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from nemo_entropy.normalization import reduce_per_token
from nemo_entropy.surrogate import clipped_surrogate, importance_ratio

from .processes import group_all_reduce
from .rollout import full_log_softmax

__all__ = ["StepDiagnostics", "EntropyChangeCheck", "PASS_METRICS"]

PASS_METRICS = ("selected_neg_log_ratio_fraction", "penalty_zero_step_fraction", "selected_pg_grad_share")
"""The per-pass metric names, logged with the suffix ``_pass<p>``."""


class StepDiagnostics:
    """The diagnostics of one pass over a rollout, fed per micro-batch and per optimizer step by the trainer."""

    def __init__(self, pass_number: int, gradient_shares: bool = True):
        self.pass_number = pass_number
        self.gradient_shares = gradient_shares
        self.steps = 0
        self.zero_steps = 0
        self.selected = 0.0
        self.negative = 0.0
        self.shares: list[float] = []
        self._new_step()

    def _new_step(self) -> None:
        self.counts = torch.zeros(3, dtype=torch.float64)  # selected, log r < 0, log r != 0
        self.grad_all: Optional[torch.Tensor] = None
        self.grad_selected: Optional[torch.Tensor] = None

    def micro_batch(self, trainer, config, logprobs: torch.Tensor, old_logprobs: torch.Tensor,
                    advantages: torch.Tensor, mask: torch.Tensor, plan) -> None:
        """Count this micro-batch's selected tokens by the sign of ``log r`` and add its share of the two
        policy-gradient gradients (``logprobs`` still carries its graph; the loss's backward comes after)."""
        mask = mask.bool()
        selected = plan.selected.bool() & mask
        log_ratio = logprobs.detach() - old_logprobs
        self.counts += torch.tensor([float(selected.sum()), float((selected & (log_ratio < 0)).sum()),
                                     float((selected & (log_ratio != 0)).sum())], dtype=torch.float64)
        if not self.gradient_shares:
            return
        _, ratio, clamped = importance_ratio(config, logprobs, old_logprobs, mask)
        surrogate, _ = clipped_surrogate(config, advantages, ratio, clamped, logprobs)

        def reduced(values: torch.Tensor) -> torch.Tensor:
            return reduce_per_token(values, mask, token_level=config.token_level_loss,
                                    global_valid_tokens=plan.global_valid_tokens,
                                    global_valid_seqs=plan.global_valid_seqs)

        g_all = trainer._flat_grads(reduced(surrogate))
        g_sel = trainer._flat_grads(reduced(surrogate * selected))
        self.grad_all = g_all if self.grad_all is None else self.grad_all + g_all
        self.grad_selected = g_sel if self.grad_selected is None else self.grad_selected + g_sel

    def end_step(self, trainer, penalised: bool) -> None:
        """Close an optimizer step: reduce the counts over DP and the gradients' norms over DP and TP."""
        group_all_reduce(self.counts, trainer.layout.dp_group, "sum")
        selected, negative, moving = (float(c) for c in self.counts)
        self.steps += 1
        self.selected += selected
        self.negative += negative
        self.zero_steps += int((moving if penalised else selected) == 0)
        if self.grad_all is not None:
            norm_all = trainer._global_norm(self.grad_all)
            norm_selected = trainer._global_norm(self.grad_selected)
            if norm_all > 0:
                self.shares.append(norm_selected / norm_all)
        self._new_step()

    def metrics(self) -> dict[str, float]:
        p = self.pass_number
        out = {f"penalty_zero_step_fraction_pass{p}": self.zero_steps / max(self.steps, 1)}
        if self.selected > 0:
            out[f"selected_neg_log_ratio_fraction_pass{p}"] = self.negative / self.selected
        if self.shares:
            out[f"selected_pg_grad_share_pass{p}"] = sum(self.shares) / len(self.shares)
        return out


class EntropyChangeCheck:
    """The observed entropy change of one optimizer step's mini-batch and Lemma 1's first-order prediction."""

    def __init__(self, trainer, rollout, rows: slice):
        self.trainer = trainer
        self.prompts = rollout.prompts[rows]
        self.responses = rollout.responses[rows]
        self.mask = rollout.mask[rows].bool()
        self.before = self._log_softmax()

    def _log_softmax(self) -> torch.Tensor:
        return full_log_softmax(self.trainer.policy, self.prompts, self.responses,
                                temperature=self.trainer.s.temperature)

    def after_step(self) -> dict[str, Any]:
        after = self._log_softmax()
        p0 = self.before.exp()
        h0 = -(p0 * self.before).sum(-1)
        h1 = -(after.exp() * after).sum(-1)
        # dz up to a per-token constant (log-softmax shifts every logit of a token alike): the covariance ignores it
        dz = after - self.before
        first_order = -(p0 * (self.before + h0[..., None]) * dz).sum(-1)
        zero = torch.zeros((), dtype=torch.float64)
        sums = torch.stack([torch.where(self.mask, h1 - h0, zero).sum(), torch.where(self.mask, first_order, zero).sum(),
                            self.mask.sum().double()])
        group_all_reduce(sums, self.trainer.layout.dp_group, "sum")
        n = max(float(sums[2]), 1.0)
        return {"entropy_change_observed": float(sums[0]) / n, "entropy_change_first_order": float(sums[1]) / n}
