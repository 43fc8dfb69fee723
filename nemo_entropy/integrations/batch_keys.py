"""Names of the per-sample tensors the driver attaches to NeMo-RL's ``train_data`` for the entropy controls, and
the step plan written into a batch (:func:`plan_to_batch`) and read back per micro-batch (:func:`plan_from_batch`).

They are [batch, length] tensors aligned with ``token_mask`` (position t describes token t, so the loss reads
them shifted by one like every other per-token tensor), or [batch] tensors. NeMo-RL moves every per-sample tensor
of the batch through DP sharding, sequence packing, dynamic batching and micro-batching, so the loss finds each
token's entry next to the token.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ..plan import StepPlan

__all__ = ["PLAN_PREFIX", "TOKEN_UIDS", "STEP", "OLD_ENTROPY", "PLAN", "valid_token_mask", "plan_to_batch",
           "plan_from_batch"]

PLAN_PREFIX = "entropy_plan"
"""The prefix of the step plan's keys (:data:`PLAN`)."""
TOKEN_UIDS = "entropy_token_uids"
"""int64 [B, S]: layout-independent token id (sample index in the rollout batch x S + position)."""
STEP = "entropy_step"
"""int64 [B]: the global optimizer step the sample is trained in (Clip-Cov's hash keys use it)."""
OLD_ENTROPY = "entropy_old"
"""float32 [B, S]: the old policy's full-vocabulary entropy of each token's distribution (controls that need it;
computed on the driver by :mod:`nemo_entropy.integrations.entropy_probe` unless the batch already has it)."""
PLAN = f"{PLAN_PREFIX}.*"
"""Every key of the step plan (:func:`plan_to_batch`): ``entropy_plan.scores`` (float32 [B, S],
the exact covariance scores), ``entropy_plan.<control>.<value>`` (per-token [B, S], ``:bool`` suffix for masks, or
per-step [B]), e.g. ``entropy_plan.kl_cov.selected:bool``."""


def valid_token_mask(data: Mapping[str, Any], rows: Any = slice(None), device: Optional[torch.device] = None):
    """NeMo-RL's valid next-token positions of ``rows``, as ``ClippedPGLossFn`` computes them: bool
    ``token_mask[rows, 1:] * sample_mask[rows, None] != 0`` ([rows, S - 1]), on ``device`` if given."""
    mask = (data["token_mask"][rows, 1:] * data["sample_mask"][rows].unsqueeze(-1)) != 0
    return mask if device is None else mask.to(device)


def plan_to_batch(plans: list[tuple[slice, StepPlan]], batch_size: int, length: int,
                  device: Optional[torch.device] = None) -> dict[str, torch.Tensor]:
    """Per-sample tensors that carry the step plans of a batch through NeMo-RL's sharding, packing and
    micro-batching: ``[B, S]`` per-token values (position ``t`` describes token ``t``, so the loss reads them
    shifted by one, like every per-token tensor of NeMo-RL) and ``[B]`` per-step scalars. ``plans`` pairs each
    optimizer step's sample rows with its plan (built on ``[rows, 1:]``).
    """
    out: dict[str, torch.Tensor] = {}

    def put(key, rows, value):
        if isinstance(value, torch.Tensor):
            dtype = torch.float32 if value.dtype == torch.bool else value.dtype
            name = f"{key}:bool" if value.dtype == torch.bool else key
            buf = out.setdefault(name, torch.zeros(batch_size, length, dtype=dtype, device=device))
            buf[rows, 1:] = value.to(dtype)
        elif value is not None:
            buf = out.setdefault(key, torch.zeros(batch_size, dtype=torch.float64, device=device))
            buf[rows] = float(value)

    for rows, plan in plans:
        put(f"{PLAN_PREFIX}.step", rows, plan.step)
        put(f"{PLAN_PREFIX}.scores", rows, plan.scores)
        for name, vals in plan.values.items():
            for key, value in vals.items():
                put(f"{PLAN_PREFIX}.{name}.{key}", rows, value)
    return out


def plan_from_batch(data: Mapping[str, Any], *, global_valid_tokens: float, global_valid_seqs: float,
                    device: Optional[torch.device] = None) -> Optional[StepPlan]:
    """The plan of a micro-batch from the keys :func:`plan_to_batch` attached (None when there are none).

    Per-token tensors come back shifted (``[:, 1:]``) to align with NeMo-RL's next-token log-probs; per-step
    scalars are read from the first sample (every sample of an optimizer step carries the same value).
    """
    step_key = f"{PLAN_PREFIX}.step"
    if step_key not in data:
        return None
    first = lambda t: t.reshape(-1)[0].item() if t.numel() else 0.0  # noqa: E731
    values: dict[str, dict[str, Any]] = {}
    scores = None
    for key, tensor in data.items():
        if not key.startswith(PLAN_PREFIX + "."):
            continue
        name = key[len(PLAN_PREFIX) + 1:]
        is_bool = name.endswith(":bool")
        name = name[:-5] if is_bool else name
        if tensor.dim() >= 2:
            value = tensor[:, 1:].to(device) if device is not None else tensor[:, 1:]
            value = value != 0 if is_bool else value
        else:
            value = first(tensor)
        if name == "step":
            continue
        if name == "scores":
            scores = value.float()
        else:
            control, _, key_name = name.partition(".")
            values.setdefault(control, {})[key_name] = value
    if scores is None:
        raise KeyError(f"{PLAN_PREFIX}.scores is missing from the batch next to {step_key}")
    return StepPlan(step=int(first(data[step_key])), global_valid_tokens=float(global_valid_tokens),
                    global_valid_seqs=float(global_valid_seqs), scores=scores, values=values)
