"""What the tests of the controls (tests/controls/) share: a step's worth of synthetic tokens, NeMo-RL-shaped
batches, PPO's clipped surrogate in float64 written from its formula (independent of nemo_entropy.losses), and the
adapter driven the way NeMo-RL's training loop drives it (optimizer steps x micro-batches, summed)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nemo_entropy.selection import token_uids_for

D = torch.float64


@dataclass
class Step:
    """One optimizer step's tokens, float64 ``[batch, length]``."""

    cur: torch.Tensor
    old: torch.Tensor
    adv: torch.Tensor
    mask: torch.Tensor
    old_entropy: torch.Tensor
    entropy: torch.Tensor
    uids: torch.Tensor

    def f32(self, name: str) -> torch.Tensor:
        return getattr(self, name).float()


def step_batch(seed: int = 0, batch: int = 12, length: int = 20, spread: float = 0.4, ties: bool = False) -> Step:
    """Per-sample advantages (one group of equal rewards has 0), a fully masked row, ratios on both sides of the clip
    range, old and current entropies (``ties``: old entropy on a 0.25 grid, so many tokens tie across samples)."""
    gen = torch.Generator().manual_seed(seed)
    old = -torch.rand(batch, length, generator=gen, dtype=D) * 3
    cur = old + spread * torch.randn(batch, length, generator=gen, dtype=D)
    adv = torch.randn(batch, 1, generator=gen, dtype=D).expand(batch, length).contiguous()
    adv[0] = 0.0
    mask = torch.rand(batch, length, generator=gen) > 0.25
    mask[2] = False
    old_entropy = torch.rand(batch, length, generator=gen, dtype=D) * 2
    if ties:
        old_entropy = torch.round(old_entropy * 4) / 4
    entropy = (old_entropy + 0.2 * torch.randn(batch, length, generator=gen, dtype=D)).clamp(min=0)
    # The loss sees float32 inputs: the oracle uses the same values.
    rounded = [t.float().double() for t in (cur, old, adv, old_entropy, entropy)]
    return Step(*rounded[:3], mask, *rounded[3:], token_uids_for(torch.arange(batch), length))


def ppo_clipped(adv, cur, old, eps_low=0.2, eps_high=0.2, dual=None):
    """``max(-A r, -A clip(r, 1 - eps_low, 1 + eps_high))``, then ``min(., -c A)`` for ``A < 0`` (float64)."""
    r = torch.exp(cur - old)
    loss = torch.maximum(-adv * r, -adv * torch.clamp(r, 1 - eps_low, 1 + eps_high))
    if dual is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -adv * dual), loss)
    return loss


def token_mean(per_token: torch.Tensor, mask: torch.Tensor, count=None) -> torch.Tensor:
    m = mask.to(per_token.dtype)
    return (per_token * m).sum() / (m.sum() if count is None else count)


# ----------------------------------------------------------------------------------------------- NeMo-RL batches
def nemo_rl_batch(seed: int = 0, batch: int = 8, length: int = 12, vocab: int = 17):
    """``(logits [B, S, V] f64, next-token log-probs [B, S-1] f64, data)``: NeMo-RL's per-sample tensors, position 0
    the prompt, one sample masked out, ``entropy_old`` the old policy's entropy aligned with ``token_mask``."""
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, length, vocab, generator=gen, dtype=D) * 2
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    lp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    pad = lambda t: torch.cat([torch.zeros(batch, 1, dtype=t.dtype), t], 1)  # noqa: E731
    lengths = torch.randint(3, length + 1, (batch,), generator=gen)
    token_mask = (torch.arange(length)[None] < lengths[:, None]).to(D)
    token_mask[:, 0] = 0
    sample_mask = torch.ones(batch, dtype=D)
    sample_mask[1] = 0
    adv = torch.randn(batch, 1, generator=gen, dtype=D).expand(batch, length).clone()
    old_logits = logits + 0.3 * torch.randn(logits.shape, generator=gen, dtype=D)
    old_logp = torch.log_softmax(old_logits, -1)[:, :-1]
    old_entropy = -(old_logp.exp() * old_logp).sum(-1)
    data = {
        "input_ids": ids,
        "token_mask": token_mask,
        "sample_mask": sample_mask,
        "advantages": adv,
        "prev_logprobs": pad(old_logp.gather(-1, ids[:, 1:, None]).squeeze(-1)),
        "entropy_old": pad(old_entropy).float(),
    }
    return logits, lp, data


def nemo_rl_mask(data) -> torch.Tensor:
    return (data["token_mask"][:, 1:] * data["sample_mask"][:, None]) != 0


def run_adapter(fn, data, inputs: torch.Tensor, *, gbs: int, mbs: int, key: str = "next_token_logprobs"):
    """NeMo-RL's loop over one ``policy.train`` call in one process: optimizer steps of ``gbs`` samples, micro-batches of
    ``mbs``, the step's global counts. ``inputs`` (log-probs or logits, a leaf) collects the gradient.

    Returns ``(per-step summed losses, summed metrics per step)``; extrema combine with min / max, ``none``-normalised
    metrics other than counts are left out."""
    losses, metrics = [], []
    batch = data["token_mask"].shape[0]
    for start in range(0, batch, gbs):
        step = slice(start, start + gbs)
        mask = nemo_rl_mask({k: v[step] for k, v in data.items()})
        gvt, gvs = mask.sum().to(D), data["sample_mask"][step].sum()
        total, summed = 0.0, {}
        for lo in range(start, start + gbs, mbs):
            rows = slice(lo, lo + mbs)
            loss, m = fn(data={k: v[rows] for k, v in data.items()}, global_valid_seqs=gvs, global_valid_toks=gvt,
                         **{key: inputs[rows]})
            loss.backward()
            total += float(loss.detach())
            for name, value in m.items():
                if name.endswith("_min"):
                    summed[name] = min(summed.get(name, math.inf), value)
                elif name.endswith("_max"):
                    summed[name] = max(summed.get(name, -math.inf), value)
                elif fn.metric_normalizations[name].value != "none" or name.startswith("num_"):
                    summed[name] = summed.get(name, 0.0) + value
        losses.append(total)
        metrics.append(summed)
    return losses, metrics
