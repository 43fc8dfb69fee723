"""The step plans on the NeMo-RL driver (``nemo_rl.plan: driver``), built before the batch is sharded over workers.

In ``grpo_train`` the driver holds the whole rollout batch (``prev_logprobs``, ``advantages``, masks) before
it calls ``policy.train(train_data, loss_fn)``. NeMo-RL then cuts the batch into optimizer steps of
``train_global_batch_size`` consecutive samples (``shard_by_batch_size`` chunks first, then splits each chunk
over DP ranks), so optimizer step ``j`` trains on samples ``[j * gbs, (j + 1) * gbs)``. We build each step's plan
here (:func:`nemo_entropy.plan.build_step_plan` over the whole step, in one process: no collective) and attach it
to the batch (:func:`nemo_entropy.integrations.batch_keys.plan_to_batch`); it travels with its tokens through
sharding, packing and micro-batching, and the loss reads it back.

:class:`StepPlanPolicy` wraps NeMo-RL's policy so that this happens on every ``policy.train`` call without
touching NeMo-RL's training loop. When a control needs the old policy's per-token entropy, one eval-mode pass of
NeMo-RL's own training loop computes it first (:mod:`nemo_entropy.integrations.entropy_probe`). Stateful controls
(an adaptive coefficient, a PI controller) live here, on the driver: every optimizer step of one ``policy.train`` call
(one rollout) is planned here before the workers train, so with ``controller_update: rollout`` (the default) each of
them uses the state at the rollout's start, and the state moves once, after the last step is planned, from the
rollout's token-weighted mean old entropy; with ``optimizer_step`` it moves after each step's plan. It is saved next
to NeMo-RL's own checkpoint (:data:`STATE_FILE`) and restored on resume.
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch

from ..config import LossConfig
from ..controls import ControlSet
from ..plan import StepInputs, build_step_plan
from ..exact import token_uids_for
from . import batch_keys
from .entropy_probe import old_entropy_of
from .nemo_rl_options import NemoRLOptions

__all__ = ["attach_step_plans", "StepPlanPolicy", "optimizer_step_slices", "STATE_FILE"]

STATE_FILE = "nemo_entropy_controls.json"
"""Saved inside each NeMo-RL checkpoint directory: the driver-side controls' state and the optimizer step."""


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


def attach_step_plans(
    train_data: Any,
    config: LossConfig,
    *,
    train_global_batch_size: int,
    first_step: int,
    attach_plans: bool = True,
    controls: Optional[ControlSet] = None,
) -> int:
    """Build the plan of every optimizer step of ``train_data`` and attach it (in place).

    ``train_data`` is NeMo-RL's BatchedDataDict (any mutable mapping of tensors works) with ``token_mask``,
    ``sample_mask``, ``prev_logprobs`` and ``advantages`` ([B, S]; per-token tensors are used shifted by one).
    Always attached: token uids (sample index in the batch x S + position) and the step index per sample. With
    ``attach_plans`` (``nemo_rl.plan: driver``) also each step's plan (selection, scores, the controls' values), built
    with ``controls`` (their state advances by one update per step); without it (``worker``) the workers plan
    over their own calls from the same uids and steps.

    Returns the number of optimizer steps in the batch (the caller advances its step counter by it).
    """
    controls = controls if controls is not None else ControlSet(config)
    token_mask, valid = train_data["token_mask"], batch_keys.valid_token_mask(train_data)
    old_entropy = train_data.get(batch_keys.OLD_ENTROPY) if hasattr(train_data, "get") else None
    if attach_plans and "old_entropy" in controls.needs and old_entropy is None:
        raise KeyError(f"loss_fn controls {[c.name for c in controls if 'old_entropy' in c.needs]} need the old "
                       f"policy's entropy: {batch_keys.OLD_ENTROPY!r} is missing from the batch")
    batch, length = token_mask.shape
    device = token_mask.device
    uids = token_uids_for(torch.arange(batch, device=device), length)
    slices = optimizer_step_slices(batch, train_global_batch_size)
    steps = torch.empty(batch, dtype=torch.int64, device=device)
    plans = []
    for j, rows in enumerate(slices):
        step = first_step + j
        steps[rows] = step
        if not attach_plans:
            continue
        inputs = StepInputs(train_data["prev_logprobs"][rows, 1:], train_data["advantages"][rows, 1:], valid[rows],
                            uids[rows, 1:].contiguous(),
                            old_entropy=None if old_entropy is None else old_entropy[rows, 1:])
        plan = build_step_plan(config, inputs, step=step, controls=controls)
        controls.update(plan)
        plans.append((rows, plan))
    if attach_plans:
        controls.end_rollout()  # one policy.train call is one rollout: the controllers' cadence (controller_update)
    train_data[batch_keys.TOKEN_UIDS] = uids
    train_data[batch_keys.STEP] = steps
    if attach_plans:
        train_data.update(batch_keys.plan_to_batch(plans, batch, length, device=device))
    return len(slices)


class StepPlanPolicy:
    """Wraps NeMo-RL's policy: ``train(data, loss_fn, ...)`` first attaches the step plans of the batch.

    Every other attribute and method is the wrapped policy's. The optimizer-step counter (Clip-Cov's hash
    keys use it) starts at ``first_step`` (NeMo-RL's save state's step x steps per rollout when resuming)
    and advances by the number of optimizer steps of each ``train`` call.

    Args:
        policy: NeMo-RL's ``Policy`` (or anything with ``train(data, loss_fn, ...)``).
        config: the validated loss config.
        train_global_batch_size: ``policy.train_global_batch_size`` (samples per optimizer step).
        plan: ``"driver"`` (plan here, attach it) or ``"worker"`` (attach only uids and steps; the loss plans
            inside the workers over the token group).
        first_step: optimizer step of the first ``train`` call.
    """

    def __init__(self, policy: Any, config: LossConfig, *, train_global_batch_size: int,
                 plan: str = NemoRLOptions.plan, first_step: int = 0):
        NemoRLOptions(plan=plan)  # the one check of the option
        self._policy = policy
        self._config = config
        self._gbs = int(train_global_batch_size)
        self._plan_on_driver = plan == "driver"
        self.optimizer_step = int(first_step)
        self.controls = ControlSet(config)

    @property
    def wrapped_policy(self) -> Any:
        """The NeMo-RL policy object inside."""
        return self._policy

    def train(self, data: Any, loss_fn: Any, *args: Any, **kwargs: Any) -> Any:
        """Attach the plan of every optimizer step of ``data``, then call the policy's ``train``."""
        eval_mode = kwargs.get("eval_mode", args[0] if args else False)
        gbs = kwargs.get("gbs") or (args[1] if len(args) > 1 and args[1] else self._gbs)
        if not eval_mode:  # also for ppo: the plan's scores give exact covariance diagnostics of the baseline
            if self._plan_on_driver and "old_entropy" in self.controls.needs and batch_keys.OLD_ENTROPY not in data:
                batch, length = data["token_mask"].shape
                data[batch_keys.TOKEN_UIDS] = token_uids_for(torch.arange(batch), length)
                data[batch_keys.OLD_ENTROPY] = old_entropy_of(self._policy, data, train_global_batch_size=int(gbs))
            steps = attach_step_plans(data, self._config, train_global_batch_size=int(gbs),
                                      first_step=self.optimizer_step, attach_plans=self._plan_on_driver,
                                      controls=self.controls)
            self.optimizer_step += steps
        return self._policy.train(data, loss_fn, *args, **kwargs)

    # ------------------------------------------------------------------ checkpointed state
    def state_dict(self) -> dict[str, Any]:
        return {"optimizer_step": self.optimizer_step, "controls": self.controls.state_dict()}

    def save_state(self, checkpoint_dir: str) -> None:
        """Write the driver-side state into a NeMo-RL checkpoint directory (:data:`STATE_FILE`)."""
        with open(os.path.join(checkpoint_dir, STATE_FILE), "w") as f:
            json.dump(self.state_dict(), f)

    def load_state(self, checkpoint_dir: str) -> bool:
        """Restore the controls' state from a NeMo-RL checkpoint directory; False when it holds none."""
        path = os.path.join(checkpoint_dir, STATE_FILE)
        if not os.path.isfile(path):
            return False
        with open(path) as f:
            state = json.load(f)
        self.controls.load_state_dict(state.get("controls", {}))
        return True

    def __getattr__(self, name: str) -> Any:
        # Only called for attributes not found on the wrapper: everything else is the policy's.
        return getattr(self.__dict__["_policy"], name)
