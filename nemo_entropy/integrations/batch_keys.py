"""Names of the per-sample tensors the driver attaches to NeMo-RL's ``train_data`` for the entropy controls.

They are [batch, length] tensors aligned with ``token_mask`` (position t describes token t, so the loss
reads them shifted by one like every other per-token tensor), or [batch] tensors. NeMo-RL moves every
per-sample tensor of the batch through DP sharding, sequence packing, dynamic batching and
micro-batching, so the loss finds each token's entry next to the token.
"""

from __future__ import annotations

SELECTED = "entropy_selected"
"""float 0/1 [B, S]: the token is in the Clip-Cov / KL-Cov selected set of its optimizer step."""
TOKEN_UIDS = "entropy_token_uids"
"""int64 [B, S]: layout-independent token id (sample index in the rollout batch x S + position)."""
COV_SCORES = "entropy_cov_scores"
"""float32 [B, S]: the covariance score of the token over its optimizer step (0 on invalid tokens)."""
STEP = "entropy_step"
"""int64 [B]: the global optimizer step the sample is trained in (Clip-Cov's hash keys use it)."""
STEP_SELECTED = "entropy_step_selected"
"""float32 [B]: number of selected tokens in the sample's optimizer step (normalises ``cov_selected_mean``)."""

ALL = (SELECTED, TOKEN_UIDS, COV_SCORES, STEP, STEP_SELECTED)
