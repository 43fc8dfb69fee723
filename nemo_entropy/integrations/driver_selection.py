"""Batch-scope selection on the NeMo-RL driver, before the batch is sharded over workers.

In ``grpo_train`` the driver holds the whole rollout batch (``prev_logprobs``, ``advantages``, masks) before
it calls ``policy.train(train_data, loss_fn)``. NeMo-RL then cuts the batch into optimizer steps of
``train_global_batch_size`` consecutive samples (``shard_by_batch_size`` chunks first, then splits each chunk
over DP ranks), so optimizer step ``j`` trains on samples ``[j * gbs, (j + 1) * gbs)``. We run the exact
selection over each such chunk here, in one process (no collective), and attach per-token results to the
batch (:mod:`~nemo_entropy.integrations.batch_keys`); they travel with their tokens through sharding,
packing and micro-batching, and the loss reads them.

:class:`BatchSelectionPolicy` wraps NeMo-RL's policy object so that this happens on every
``policy.train`` call, without touching NeMo-RL's training loop.
"""

from __future__ import annotations

from typing import Any

import torch

from ..config import LossConfig
from ..selection import select_tokens_with_scores, token_uids_for
from . import batch_keys

__all__ = ["attach_batch_selection", "BatchSelectionPolicy", "optimizer_step_slices"]


def optimizer_step_slices(batch_size: int, train_global_batch_size: int) -> list[slice]:
    """The sample ranges of the optimizer steps of one ``policy.train`` call (NeMo-RL's chunking)."""
    if train_global_batch_size <= 0:
        raise ValueError(f"policy.train_global_batch_size={train_global_batch_size} must be > 0")
    if batch_size % train_global_batch_size != 0:
        raise ValueError(
            f"the training batch has {batch_size} samples, not a multiple of policy.train_global_batch_size="
            f"{train_global_batch_size}: NeMo-RL could not split it into whole optimizer steps"
        )
    return [slice(s, s + train_global_batch_size) for s in range(0, batch_size, train_global_batch_size)]


def attach_batch_selection(
    train_data: Any,
    config: LossConfig,
    *,
    train_global_batch_size: int,
    first_step: int,
    attach_mask: bool = True,
) -> int:
    """Compute the selection of every optimizer step of ``train_data`` and attach it (in place).

    ``train_data`` is NeMo-RL's BatchedDataDict (any mutable mapping of tensors works) with ``token_mask``,
    ``sample_mask``, ``prev_logprobs`` and ``advantages`` ([B, S]; per-token tensors are used shifted by one).
    Always attached: token uids (sample index in the batch x S + position) and the step index per sample.
    With ``attach_mask`` (driver mode) also the selected mask, the covariance scores and the selected count of
    each step; without it (in-worker mode) the workers select themselves from the same uids and steps.

    Returns the number of optimizer steps in the batch (the caller advances its step counter by it).
    """
    token_mask, sample_mask = train_data["token_mask"], train_data["sample_mask"]
    batch, length = token_mask.shape
    device = token_mask.device
    uids = token_uids_for(torch.arange(batch, device=device), length)
    slices = optimizer_step_slices(batch, train_global_batch_size)
    steps = torch.empty(batch, dtype=torch.int64, device=device)
    selected_full = torch.zeros(batch, length, dtype=torch.float32, device=device)
    scores_full = torch.zeros(batch, length, dtype=torch.float32, device=device)
    selected_count = torch.zeros(batch, dtype=torch.float32, device=device)
    for j, rows in enumerate(slices):
        step = first_step + j
        steps[rows] = step
        if not attach_mask:
            continue
        mask = (token_mask[rows, 1:] * sample_mask[rows].unsqueeze(-1)) != 0
        old = torch.where(mask, train_data["prev_logprobs"][rows, 1:].float(), torch.zeros(()))
        adv = torch.where(mask, train_data["advantages"][rows, 1:].float(), torch.zeros(()))
        selected, scores = select_tokens_with_scores(config, old, adv, mask, token_uids=uids[rows, 1:].contiguous(),
                                                     step=step)
        selected_full[rows, 1:] = selected.float()
        scores_full[rows, 1:] = scores.float()
        selected_count[rows] = float(selected.sum())
    train_data[batch_keys.TOKEN_UIDS] = uids
    train_data[batch_keys.STEP] = steps
    if attach_mask:
        train_data[batch_keys.SELECTED] = selected_full
        train_data[batch_keys.COV_SCORES] = scores_full
        train_data[batch_keys.STEP_SELECTED] = selected_count
    return len(slices)


class BatchSelectionPolicy:
    """Wraps NeMo-RL's policy: ``train(data, loss_fn, ...)`` first attaches the batch-scope selection.

    Every other attribute and method is the wrapped policy's. The optimizer-step counter (Clip-Cov's hash
    keys use it) starts at ``first_step`` (pass ``grpo_save_state`` step x steps per rollout when resuming)
    and advances by the number of optimizer steps of each ``train`` call.

    Args:
        policy: NeMo-RL's ``Policy`` (or anything with ``train(data, loss_fn, ...)``).
        config: the validated loss config.
        train_global_batch_size: ``policy.train_global_batch_size`` (samples per optimizer step).
        mode: ``"driver"`` (select here, attach the mask) or ``"worker"`` (attach only uids and steps; the loss
            selects inside the workers over the token group).
        first_step: optimizer step of the first ``train`` call.
    """

    def __init__(self, policy: Any, config: LossConfig, *, train_global_batch_size: int, mode: str = "driver",
                 first_step: int = 0):
        if mode not in ("driver", "worker"):
            raise ValueError(f"nemo_rl.selection={mode!r} is invalid: allowed 'driver' or 'worker'")
        self._policy = policy
        self._config = config
        self._gbs = int(train_global_batch_size)
        self._mode = mode
        self.optimizer_step = int(first_step)

    @property
    def wrapped_policy(self) -> Any:
        """The NeMo-RL policy object inside."""
        return self._policy

    def train(self, data: Any, loss_fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Attach the selection of every optimizer step of ``data``, then call the policy's ``train``."""
        eval_mode = kwargs.get("eval_mode", args[0] if args else False)
        gbs = kwargs.get("gbs") or (args[1] if len(args) > 1 and args[1] else self._gbs)
        if not eval_mode:  # also for ppo: the scores give exact covariance diagnostics of the baseline
            steps = attach_batch_selection(data, self._config, train_global_batch_size=int(gbs),
                                           first_step=self.optimizer_step, attach_mask=self._mode == "driver")
            self.optimizer_step += steps
        return self._policy.train(data, loss_fn, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found on the wrapper: everything else is the policy's.
        return getattr(self.__dict__["_policy"], name)
