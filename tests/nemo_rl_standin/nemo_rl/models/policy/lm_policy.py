"""A policy with NeMo-RL's ``train`` contract, simulating DP ranks in one process.

``train(data, loss_fn, eval_mode=False, gbs=None, mbs=None, timer=None)`` shards the batch as NeMo-RL does
(``shard_by_batch_size``), then for every optimizer step and DP rank calls the loss on micro-batches with the
step's global counts, through ``prepare_loss_input`` as NeMo-RL's workers do: a LOGIT-input loss gets the logits
of a fixed bigram "model" (:func:`bigram_logits`), a LOGPROB-input loss "current" log-probs that are the old
ones moved by a fixed amount. Every call is recorded in :data:`CALLS` for the tests.
"""

import torch

from nemo_rl.algorithms.loss.interfaces import LossInputType
from nemo_rl.algorithms.loss.utils import prepare_loss_input

VOCAB = 50


def bigram_logits(input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, S, VOCAB] of a fixed bigram model: row ``input_ids[b, t]`` of a seeded table."""
    table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(77))
    return table[input_ids]

CALLS: list[dict] = []
"""One entry per loss call: ``{"step": optimizer step within the train call, "rank", "data", "metrics"}``."""


class Policy:
    def __init__(self, cfg, dp_size: int = 2):
        self.cfg = cfg
        self.dp_size = dp_size

    def train(self, data, loss_fn, eval_mode=False, gbs=None, mbs=None, timer=None):
        gbs = gbs or self.cfg["train_global_batch_size"]
        mbs = mbs or self.cfg["train_micro_batch_size"]
        shards = data.shard_by_batch_size(self.dp_size, batch_size=gbs)
        local = gbs // self.dp_size
        metrics: dict[str, list] = {}
        for step in range(data.size // gbs):
            pieces = [s.slice(step * local, (step + 1) * local) for s in shards]
            masks = [p["token_mask"][:, 1:] * p["sample_mask"][:, None] for p in pieces]
            gvt = sum(m.sum() for m in masks)  # NeMo-RL all-reduces these over DP once per step
            gvs = sum(p["sample_mask"].sum() for p in pieces)
            for rank, piece in enumerate(pieces):
                for start in range(0, local, mbs):
                    mb = piece.slice(start, start + mbs)
                    if loss_fn.input_type == LossInputType.LOGIT:
                        loss_input, mb = prepare_loss_input(bigram_logits(mb["input_ids"]), mb, loss_fn)
                    else:
                        drift = 0.05 * torch.cos(torch.arange(mb["prev_logprobs"].numel()).float()).reshape(
                            mb["prev_logprobs"].shape)
                        current = (mb["prev_logprobs"] + drift)[:, 1:].clone().requires_grad_(True)
                        loss_input = {"next_token_logprobs": current}
                    loss, mb_metrics = loss_fn(data=mb, global_valid_seqs=gvs, global_valid_toks=gvt,
                                               **loss_input)
                    if not eval_mode and loss.requires_grad:
                        loss.backward()
                    CALLS.append({"step": step, "rank": rank, "data": dict(mb), "metrics": mb_metrics})
                    for key, value in mb_metrics.items():  # NeMo-RL divides by the number of global batches
                        value = value if "_min" in key or "_max" in key else value / (data.size // gbs)
                        metrics.setdefault(key, []).append(value)
        return {"loss": torch.tensor(0.0), "grad_norm": torch.tensor(0.0), "all_mb_metrics": metrics}

    def train_from_meta(self, *args, **kwargs):  # the data-plane trainer's path: no batch on the driver
        CALLS.append({"train_from_meta": True})
        return {}
