"""Backends backed by the compiled extensions built from ``kernels/`` (CPU and CUDA).

Both extensions expose the same two functions, with the contract of the reference backend:
``shard_stats(logits, local_targets, valid_width) -> [local_max, sum_exp, sum_exp_shifted, target_logit]``
and ``shard_grad(logits, local_targets, valid_width, row_max, log_sum, entropy, grad_entropy, grad_logprobs)``.
"""

from __future__ import annotations

from types import ModuleType

import torch

from .shard import ShardStats


class ExtensionBackend:
    """A compiled extension seen as a backend (``name`` is ``"cpu"`` or ``"cuda"``)."""

    def __init__(self, name: str, module: ModuleType):
        self.name = name
        self.module = module

    def shard_stats(self, logits: torch.Tensor, local_targets: torch.Tensor, valid_width: int) -> ShardStats:
        """Per-row partial statistics of a ``[rows, V_local]`` shard (one read of the logits)."""
        return ShardStats(*self.module.shard_stats(logits, local_targets, int(valid_width)))

    def shard_grad(
        self, logits, local_targets, valid_width, row_max, log_sum, entropy, grad_entropy, grad_logprobs
    ) -> torch.Tensor:
        """Gradient of the shard in its dtype (one read of the logits, one write of the gradient)."""
        return self.module.shard_grad(
            logits, local_targets, int(valid_width), row_max.contiguous(), log_sum.contiguous(),
            entropy.contiguous(), grad_entropy, grad_logprobs,
        )
