"""pass@k at the end of a local run: ``n`` samples per validation problem, the unbiased estimator.

For a problem with ``c`` correct responses among ``n`` samples, ``pass@k = 1 - C(n - c, k) / C(n, k)`` is the
probability that a uniformly chosen subset of ``k`` of the ``n`` samples holds at least one correct response
(an unbiased estimate of the chance that ``k`` fresh samples solve it); the reported value is its mean over
problems. Samples use the engine's Gumbel-max sampling with one generator per (problem, sample), seeded from
the run seed, so the counts do not depend on the parallel layout or on the batch size.
"""

from __future__ import annotations

from math import comb
from typing import Sequence

import torch

from .rollout import generate, gumbel_noise

# The noise stream of pass@k samples: RL steps are numbered from 1, so this "step" never collides with them.
PASS_AT_K_STREAM = -1


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator ``1 - C(n - c, k) / C(n, k)`` for ``c`` correct of ``n`` samples (``1 <= k <= n``)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: correct count c={c} must be in [0, n={n}]")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k={k} must be in [1, n={n}]")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def default_ks(num_samples: int) -> list[int]:
    """``1, 2, 4, ...`` up to ``num_samples``."""
    ks, k = [], 1
    while k <= num_samples:
        ks.append(k)
        k *= 2
    return ks


def pass_at_k_metrics(correct_counts: Sequence[int], num_samples: int, ks: Sequence[int] | None = None) -> dict[str, float]:
    """``{"pass@k": mean over problems}`` for every ``k`` of ``ks`` (default :func:`default_ks`)."""
    counts = [int(c) for c in correct_counts]
    if not counts:
        return {}
    return {f"pass@{k}": sum(pass_at_k(num_samples, c, k) for c in counts) / len(counts)
            for k in (ks if ks is not None else default_ks(num_samples))}


@torch.no_grad()
def correct_counts(
    policy,
    task,
    operands: torch.Tensor,
    problem_ids: Sequence[int],
    *,
    num_samples: int,
    seed: int,
    temperature: float,
    batch_size: int,
) -> torch.Tensor:
    """Number of correct responses among ``num_samples`` samples of each problem ([len(problem_ids)], long).

    ``problem_ids`` are the problems' global indices (they seed the samples' noise).
    """
    ids = [int(p) * num_samples + j for p in problem_ids for j in range(num_samples)]
    repeated = operands.repeat_interleave(num_samples, dim=0)
    rewards = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        noise = gumbel_noise(chunk, seed=seed, step=PASS_AT_K_STREAM, length=task.max_response_length,
                             vocab_size=policy.vocab_size)
        problems = repeated[start : start + len(chunk)]
        responses = generate(policy, task.prompts(problems), max_new_tokens=task.max_response_length,
                             temperature=temperature, noise=noise)
        rewards.append(task.rewards(problems, responses))
    if not rewards:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat(rewards).view(len(problem_ids), num_samples).sum(1).round().long()
