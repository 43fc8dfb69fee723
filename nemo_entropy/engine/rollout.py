"""Sampling, rewards, group-normalised advantages and the scoring pass (entropy + log-probs).

Layout invariance starts here: a sample's randomness comes from its own generator seeded by
``(seed, step, global sample index)`` (Gumbel-max sampling), never from a global RNG, so the rollout of a
sample is the same whichever rank generates it and whatever else is in its batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from nemo_entropy.entropy import vocab_parallel_entropy_and_logprobs

from .model import TinyPolicy
from .task import EOS, PAD, Task, response_mask, stream_seed


def gumbel_noise(sample_ids: list[int], *, seed: int, step: int, length: int, vocab_size: int) -> torch.Tensor:
    """Per-sample Gumbel noise [len(sample_ids), length, vocab_size], each row from its own generator."""
    rows = []
    for sample_id in sample_ids:
        gen = torch.Generator().manual_seed(stream_seed(seed, "sample", step, sample_id))
        uniform = torch.rand(length, vocab_size, generator=gen).clamp_(1e-10, 1.0 - 1e-7)
        rows.append(-torch.log(-torch.log(uniform)))
    return torch.stack(rows) if rows else torch.empty(0, length, vocab_size)


@torch.no_grad()
def generate(
    policy: TinyPolicy,
    prompts: torch.Tensor,
    *,
    max_new_tokens: int,
    temperature: float,
    noise: torch.Tensor | None,
) -> torch.Tensor:
    """Responses [batch, max_new_tokens]: Gumbel-max sampling at ``temperature`` (greedy if ``noise`` is None).

    After a sample emits EOS the rest of its row is PAD; generation stops once every row has. The prefix is
    encoded once and every new token is fed through the key/value cache; each row's arithmetic is
    independent of the other rows, so a sample's tokens do not depend on its batch.
    """
    batch = prompts.shape[0]
    responses = torch.full((batch, max_new_tokens), PAD, dtype=torch.long)
    finished = torch.zeros(batch, dtype=torch.bool)
    hidden, cache = policy.hidden_states_cached(prompts)
    for t in range(max_new_tokens):
        logits = policy.full_logits(hidden[:, -1]).float()
        if noise is None:
            token = logits.argmax(-1)
        else:
            token = (logits / temperature + noise[:, t]).argmax(-1)
        token = torch.where(finished, torch.full_like(token, PAD), token)
        responses[:, t] = token
        finished |= token == EOS
        if bool(finished.all()) or t == max_new_tokens - 1:
            break
        hidden, cache = policy.hidden_states_cached(token[:, None], cache)
    return responses


def score(
    policy: TinyPolicy, prompts: torch.Tensor, responses: torch.Tensor, *, temperature: float, logit_values=None
):
    """Full-vocabulary entropy and log-probs of the response tokens, both [batch, response_length].

    Differentiable (the training forward uses it too). Logits are divided by the sampling temperature so
    the log-probs are those of the distribution the tokens were drawn from. With ``logit_values`` (a
    ``ControlSet.logit_values``-like function of the logits shard and its geometry) it also returns what that
    function computes from the same shard: ``(entropy, logprobs, values)``.
    """
    inputs = torch.cat([prompts, responses[:, :-1]], dim=1)
    hidden = policy.hidden_states(inputs)[:, prompts.shape[1] - 1 :]
    shard = policy.logits_shard(hidden)
    if temperature != 1.0:
        shard = shard / temperature
    entropy, logprobs = vocab_parallel_entropy_and_logprobs(shard, responses, groups=policy.tp_group,
                                                            vocab_start=policy.vocab_start, vocab_size=policy.vocab_size)
    if logit_values is None:
        return entropy, logprobs
    return entropy, logprobs, logit_values(shard, tp_group=policy.tp_group, vocab_start=policy.vocab_start,
                                           vocab_size=policy.vocab_size)


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, normalize: bool = True, leave_one_out: bool = False
) -> torch.Tensor:
    """GRPO advantages per sample: reward minus the group baseline, divided by the group std if ``normalize``.

    Groups are consecutive runs of ``group_size`` samples (one prompt's generations). Groups whose rewards
    are all equal get advantage 0 (their std is 0 and nothing is divided by it).
    """
    grouped = rewards.double().view(-1, group_size)
    if leave_one_out and group_size > 1:
        baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
    else:
        baseline = grouped.mean(1, keepdim=True)
    advantages = grouped - baseline
    if normalize and group_size > 1:
        std = grouped.std(1, keepdim=True)
        advantages = torch.where(std > 0, advantages / (std + 1e-6), advantages)
    return advantages.view(-1).float()


@dataclass
class Rollout:
    """One step's samples held by this rank (rows in global sample-index order).

    Attributes:
        sample_ids: global sample index of each row (prompt * generations + generation).
        prompts, responses: token ids.
        mask: valid response tokens (up to and including EOS).
        rewards, advantages: per sample.
        old_logprobs, entropy: per token, from the policy that generated the data.
        prob_logprob_cov: per token, ``Cov_{a~pi}(log pi(a), pi(a))`` of that policy (the diagnostics' Theorem 1).
    """

    sample_ids: torch.Tensor
    prompts: torch.Tensor
    responses: torch.Tensor
    mask: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    old_logprobs: torch.Tensor
    entropy: torch.Tensor
    prob_logprob_cov: Optional[torch.Tensor] = None


def generate_samples(policy: TinyPolicy, task: Task, operands: torch.Tensor, *, sample_ids, seed: int, step: int,
                     temperature: float, micro_batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(prompts, responses)`` of the problems ``operands``, sample ``i`` drawn with the noise of global sample index
    ``sample_ids[i]`` (so a sample is the same whichever rank, batch or generation batch draws it)."""
    prompts = task.prompts(operands)
    ids = [int(i) for i in sample_ids]
    if not ids:
        return prompts, torch.empty(0, task.max_response_length, dtype=torch.long)
    noise = gumbel_noise(ids, seed=seed, step=step, length=task.max_response_length, vocab_size=policy.vocab_size)
    responses = torch.cat([
        generate(policy, prompts[i : i + micro_batch_size], max_new_tokens=task.max_response_length,
                 temperature=temperature, noise=noise[i : i + micro_batch_size])
        for i in range(0, len(ids), micro_batch_size)
    ])
    return prompts, responses


def prob_logprob_cov(policy: TinyPolicy, prompts: torch.Tensor, responses: torch.Tensor, *,
                     temperature: float) -> torch.Tensor:
    """``Cov_{a~pi}(log pi(a), pi(a)) = sum_a pi(a)^2 (log pi(a) + H)`` per response token (float64 over the full
    vocabulary, no gradient): the term of the paper's Theorem 1 for a sampled token that the diagnostics need."""
    logp = full_log_softmax(policy, prompts, responses, temperature=temperature)
    p = logp.exp()
    entropy = -(p * logp).sum(-1, keepdim=True)
    return (p * p * (logp + entropy)).sum(-1).float()


@torch.no_grad()
def full_log_softmax(policy: TinyPolicy, prompts: torch.Tensor, responses: torch.Tensor, *,
                     temperature: float) -> torch.Tensor:
    """float64 log-softmax over the full vocabulary at every response position (no gradient, logits gathered over
    TP): what the Theorem-1 term and the entropy-change check read."""
    inputs = torch.cat([prompts, responses[:, :-1]], dim=1)
    hidden = policy.hidden_states(inputs)[:, prompts.shape[1] - 1:]
    return torch.log_softmax(policy.full_logits(hidden).double() / temperature, dim=-1)


def scored_rollout(policy: TinyPolicy, *, sample_ids: torch.Tensor, prompts: torch.Tensor, responses: torch.Tensor,
                   rewards: torch.Tensor, advantages: torch.Tensor, temperature: float,
                   micro_batch_size: int) -> Rollout:
    """The :class:`Rollout` of these samples: the generating policy's log-probs, full-vocabulary entropy and
    :func:`prob_logprob_cov` (no gradient) added to what generation and the verifier gave."""
    with torch.no_grad():
        parts = [
            score(policy, prompts[i : i + micro_batch_size], responses[i : i + micro_batch_size], temperature=temperature)
            + (prob_logprob_cov(policy, prompts[i : i + micro_batch_size], responses[i : i + micro_batch_size],
                                temperature=temperature),)
            for i in range(0, prompts.shape[0], micro_batch_size)
        ]
    length = responses.shape[1]
    entropy, old_logprobs, cov = (torch.cat([p[k] for p in parts]) if parts else torch.empty(0, length)
                                  for k in range(3))
    return Rollout(sample_ids=sample_ids, prompts=prompts, responses=responses, mask=response_mask(responses),
                   rewards=rewards, advantages=advantages, old_logprobs=old_logprobs.float(), entropy=entropy.float(),
                   prob_logprob_cov=cov.float())


def collect_rollout(
    policy: TinyPolicy,
    task: Task,
    *,
    sample_ids: list[int],
    operands: torch.Tensor,
    all_rewards_fn,
    group_size: int,
    seed: int,
    step: int,
    temperature: float,
    normalize_rewards: bool,
    leave_one_out: bool,
    micro_batch_size: int,
) -> Rollout:
    """Generate, reward, and score this rank's samples of one GRPO step.

    ``operands`` [len(sample_ids), 2] are the problems of this rank's rows. ``all_rewards_fn(local_rewards)``
    returns the rewards of *every* sample of the step in global order (an all-gather over DP), because a
    group's baseline needs all its members.
    """
    prompts, responses = generate_samples(policy, task, operands, sample_ids=sample_ids, seed=seed, step=step,
                                          temperature=temperature, micro_batch_size=micro_batch_size)
    rewards = task.rewards(operands, responses)
    every_reward = all_rewards_fn(rewards)
    advantages = group_advantages(every_reward, group_size, normalize=normalize_rewards, leave_one_out=leave_one_out)
    ids = torch.tensor(sample_ids, dtype=torch.long)
    return scored_rollout(policy, sample_ids=ids, prompts=prompts, responses=responses, rewards=rewards,
                          advantages=advantages[ids], temperature=temperature, micro_batch_size=micro_batch_size)


def uniform_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """Per group of ``group_size`` consecutive samples: True when all its rewards are equal (zero advantage, no
    signal: what dynamic sampling drops)."""
    grouped = rewards.view(-1, group_size)
    return (grouped == grouped[:, :1]).all(1)


@torch.no_grad()
def greedy_accuracy(policy: TinyPolicy, task: Task, operands: torch.Tensor, micro_batch_size: int) -> torch.Tensor:
    """Rewards (the task's verifier) of greedy answers to ``operands`` (validation)."""
    if operands.shape[0] == 0:
        return torch.zeros(0)
    prompts = task.prompts(operands)
    responses = torch.cat(
        [
            generate(policy, prompts[i : i + micro_batch_size], max_new_tokens=task.max_response_length, temperature=1.0, noise=None)
            for i in range(0, prompts.shape[0], micro_batch_size)
        ]
    )
    return task.rewards(operands, responses)
