"""The tokens Clip-Cov / KL-Cov treat specially, and the covariance scores: thin readers of the step's plan.

The selection is the plan's (:func:`nemo_entropy.plan.build_step_plan`, exact and layout invariant over the token
group: README, "Selection scope"); its primitives (exact sums, covariance scores, the distributed top-k, hash
keys, token uids) are :mod:`nemo_entropy.exact`.
"""

from __future__ import annotations

import torch

from .config import LossConfig
from .exact import covariance_scores, token_uids_for
from .parallel import GroupsLike
from .plan import StepInputs, build_step_plan

__all__ = ["select_tokens", "select_tokens_with_scores", "covariance_scores", "token_uids_for"]


def select_tokens(
    config: LossConfig,
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    token_uids: torch.Tensor,
    step: int,
    groups: GroupsLike = None,
) -> torch.Tensor:
    """Bool mask of the tokens Clip-Cov / KL-Cov treat specially (all False without a covariance selection).

    Pass the log-probs of the policy that generated the data (``prev_logprobs``) for the *whole* optimizer
    step on every rank of the token group (``groups``). ``token_uids`` ([batch, length] int64) identify each
    token independently of where it lives and must be unique over the group; ``step`` is the optimizer step
    (Clip-Cov's hash keys use it, with ``config.seed``). Repeated uids (sample ids that restart at 0 on every
    rank) never change the count: the selection still holds exactly the quota, tokens equal in (score, uid)
    ranked by rank and position, but it then depends on the layout.

    * KL-Cov: the ``max(1, floor(kl_cov_ratio * N))`` valid tokens with the largest covariance score
      (ties: smaller uid first).
    * Clip-Cov: among valid tokens with ``clip_cov_lb < c < clip_cov_ub``, ``max(1, floor(clip_cov_ratio * N))``
      chosen uniformly at random (fewer if fewer exist). The reference also drops tokens the PPO clip
      already clipped; at the scoring policy the ratio is exactly 1, so none is clipped there.

    ``N`` is the number of valid tokens over the whole group. The mask is bit-identical for any split of
    the same tokens over ranks and micro-batches. It is the ``selected`` mask of the step's plan
    (:func:`nemo_entropy.plan.build_step_plan`).
    """
    return select_tokens_with_scores(config, logprobs, advantages, mask, token_uids=token_uids, step=step,
                                     groups=groups)[0]


def select_tokens_with_scores(
    config: LossConfig,
    logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    token_uids: torch.Tensor,
    step: int,
    groups: GroupsLike = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(select_tokens(...), covariance_scores(...))`` from one pass: one all-reduce (plus the top-k's gather).

    The scores are bit-identical to :func:`covariance_scores` (same exact means, same elementwise math).
    Without a covariance selection the mask is all False and the scores are still computed.
    """
    plan = build_step_plan(config, StepInputs(logprobs, advantages, mask, token_uids), step=step, groups=groups)
    return plan.selected, plan.scores
