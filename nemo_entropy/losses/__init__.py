"""The policy loss shared by every entropy control: surrogate, normalisation, NeMo-RL's terms, metrics.

The one subtle thing, as in NeMo-RL: every call returns ``sum(per_token_loss * mask) / global_valid_tokens``
(or the per-sequence means summed over ``global_valid_seqs``), where the global counts cover the whole
optimizer step on every DP rank. Summing the returned losses over micro-batches and DP ranks (what gradient
accumulation and DDP do) therefore gives exactly the batch mean, and the loss stays linear in 1/count (a
split-API trainer can pass count 1 and rescale later). Metrics follow the same rule: each is pre-divided by the
global count so that *summing* over micro-batches and ranks yields the batch value; extrema are named
``*_min`` / ``*_max`` and are combined with min / max instead.
"""

from .metrics import accumulate_metrics, metric_reduction
from ..normalization import reduce_per_token
from .policy import per_token_policy_loss, policy_loss

__all__ = ["policy_loss", "per_token_policy_loss", "reduce_per_token", "accumulate_metrics", "metric_reduction"]
