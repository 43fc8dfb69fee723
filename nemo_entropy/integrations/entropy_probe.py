"""The old policy's per-token entropy on the NeMo-RL driver, for controls that need it before the step's first
micro-batch (a top-entropy quantile, a controller's step entropy).

NeMo-RL's driver never sees logits: ``policy.get_logprobs`` returns log-probs only. The one pass that already sees
every token of the step with its logits is NeMo-RL's own training loop, so the driver runs it once more, in eval
mode, with :class:`OldEntropyProbe` as the "loss": a LOGIT-input function that computes each token's
full-vocabulary entropy with the vocab-parallel kernel and hands it back through NeMo-RL's metric plumbing, keyed
by token uid (:class:`TokenValues`). It runs on the same weights that just produced ``prev_logprobs`` (the policy
that generated the data, in NeMo-RL's sense), before ``policy.train``.

Cost: one forward pass over the step's samples without backward (about a third of a training step's compute,
like ``get_logprobs``), no optimizer work, plus one fp32 and one int64 per valid token through Ray. It runs only
when an active control declares ``old_entropy``. It needs whole sequences on each rank: context parallelism > 1 is
refused.
"""

from __future__ import annotations

from typing import Any

import torch

from . import batch_keys
from .nemo_rl import _LossCall, logprobs_from_logits, nemo_rl_enums

__all__ = ["TokenValues", "OldEntropyProbe", "old_entropy_of"]

METRIC = "nemo_entropy_old_entropy"
"""The metric name the probe's values travel under."""


class TokenValues:
    """Per-token values keyed by token uid, shaped to survive NeMo-RL's metric plumbing unchanged.

    NeMo-RL sums a micro-batch's metrics over packed sequences (``0 + v``, ``v + w``: here a union), divides them
    by the number of global batches (``v / n``: ignored, these are not means) and pickles them through Ray and
    Megatron's broadcast from the last pipeline stage.
    """

    def __init__(self, uids: torch.Tensor, values: torch.Tensor):
        self.uids = uids.detach().reshape(-1).to("cpu", torch.int64)
        self.values = values.detach().reshape(-1).to("cpu", torch.float32)

    def __add__(self, other: Any) -> "TokenValues":
        if isinstance(other, (int, float)) and other == 0:
            return self
        if not isinstance(other, TokenValues):
            return NotImplemented
        return TokenValues(torch.cat([self.uids, other.uids]), torch.cat([self.values, other.values]))

    __radd__ = __add__

    def __truediv__(self, divisor: Any) -> "TokenValues":
        return self

    __itruediv__ = __truediv__

    def __len__(self) -> int:
        return int(self.uids.numel())


class OldEntropyProbe:
    """A NeMo-RL LOGIT-input "loss" that returns no loss and each valid token's entropy (:class:`TokenValues`)."""

    use_fused_linear_logprobs = False
    reference_policy_kl_penalty = 0.0  # NeMo-RL's input preparation reads it

    def __init__(self):
        loss_type, input_type, _ = nemo_rl_enums()
        self.loss_type = loss_type.TOKEN_LEVEL
        self.input_type = input_type.LOGIT

    def __call__(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        call = _LossCall.parse(type(self).__name__, args, kwargs)
        if call.logits is None:
            raise TypeError("OldEntropyProbe needs logits: NeMo-RL must call it with the LOGIT input")
        _, entropy = logprobs_from_logits(call.logits, call.data, call.tp_rank, call.tp_group, call.cp_group,
                                          find_megatron_groups=True)
        if entropy is None:
            raise RuntimeError("the old-policy entropy pass needs whole sequences on each rank: context parallelism "
                               "> 1 is not supported by controls that need the old entropy")
        data = call.data
        if batch_keys.TOKEN_UIDS not in data:
            raise KeyError(f"{batch_keys.TOKEN_UIDS!r} is missing: the driver attaches it before the entropy pass")
        mask = batch_keys.valid_token_mask(data, device=entropy.device)
        uids = data[batch_keys.TOKEN_UIDS][:, 1:].to(entropy.device)
        metrics = {"num_valid_samples": float(data["sample_mask"].sum()),
                   METRIC: TokenValues(uids[mask], entropy.detach().float()[mask])}
        return torch.zeros((), device=entropy.device), metrics


def old_entropy_of(policy: Any, data: Any, *, train_global_batch_size: int) -> torch.Tensor:
    """Per-token entropy ``[B, S]`` (aligned with ``token_mask``: position t is the entropy of the distribution that
    produced token t; 0 elsewhere) of ``policy`` on ``data``, by one eval-mode ``policy.train`` pass.

    ``data`` must carry ``entropy_token_uids`` (``token_uids_for(arange(B), S)``). Raises if a valid token's
    entropy did not come back.
    """
    token_mask, sample_mask = data["token_mask"], data["sample_mask"]
    batch, length = token_mask.shape
    results = policy.train(data, OldEntropyProbe(), eval_mode=True, gbs=train_global_batch_size)
    parts = (results or {}).get("all_mb_metrics", {}).get(METRIC, [])
    out = torch.zeros(batch * length, dtype=torch.float32)
    seen = torch.zeros(batch * length, dtype=torch.bool)
    for part in parts:
        if isinstance(part, TokenValues) and len(part):
            out[part.uids] = part.values
            seen[part.uids] = True
    valid = torch.zeros(batch, length, dtype=torch.bool)
    valid[:, 1:] = (token_mask[:, 1:] * sample_mask.unsqueeze(-1)).cpu() != 0
    missing = int((valid.reshape(-1) & ~seen).sum())
    if missing:
        raise RuntimeError(f"the old-policy entropy pass returned no value for {missing} of {int(valid.sum())} valid "
                           "tokens: this NeMo-RL does not return loss metrics as the plugin expects "
                           "(run `nemo-entropy check-nemo-rl`)")
    return out.reshape(batch, length)
