"""Names of the per-sample tensors the driver attaches to NeMo-RL's ``train_data`` for the entropy controls.

They are [batch, length] tensors aligned with ``token_mask`` (position t describes token t, so the loss reads
them shifted by one like every other per-token tensor), or [batch] tensors. NeMo-RL moves every per-sample tensor
of the batch through DP sharding, sequence packing, dynamic batching and micro-batching, so the loss finds each
token's entry next to the token.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch

from ..plan import PREFIX as PLAN_PREFIX

TOKEN_UIDS = "entropy_token_uids"
"""int64 [B, S]: layout-independent token id (sample index in the rollout batch x S + position)."""
STEP = "entropy_step"
"""int64 [B]: the global optimizer step the sample is trained in (Clip-Cov's hash keys use it)."""
OLD_ENTROPY = "entropy_old"
"""float32 [B, S]: the old policy's full-vocabulary entropy of each token's distribution (controls that need it;
computed on the driver by :mod:`nemo_entropy.integrations.entropy_probe` unless the batch already has it)."""
PLAN = f"{PLAN_PREFIX}.*"
"""Every key of the step plan (:func:`nemo_entropy.plan.plan_to_batch`): ``entropy_plan.scores`` (float32 [B, S],
the exact covariance scores), ``entropy_plan.<control>.<value>`` (per-token [B, S], ``:bool`` suffix for masks, or
per-step [B]), e.g. ``entropy_plan.kl_cov.selected:bool``."""



def valid_token_mask(data: Mapping[str, Any], rows: Any = slice(None), device: Optional[torch.device] = None):
    """NeMo-RL's valid next-token positions of ``rows``, as ``ClippedPGLossFn`` computes them: bool
    ``token_mask[rows, 1:] * sample_mask[rows, None] != 0`` ([rows, S - 1]), on ``device`` if given."""
    mask = (data["token_mask"][rows, 1:] * data["sample_mask"][rows].unsqueeze(-1)) != 0
    return mask if device is None else mask.to(device)


__all__ = ["PLAN_PREFIX", "TOKEN_UIDS", "STEP", "OLD_ENTROPY", "PLAN", "valid_token_mask"]
