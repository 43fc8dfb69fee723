"""Vocab-parallel entropy and log-prob of the sampled token, with gradients (docs/kernels.md).

Public API::

    entropy, logprobs = vocab_parallel_entropy_and_logprobs(logits_shard, targets, groups=tp_group)
    clamped = vocab_parallel_clamped_entropy(logits_shard, 0.2, groups=tp_group)   # AEnt's clamped entropy

Importing this package is cheap: it needs torch only. Triton, megatron-core and the compiled kernels
are imported on first use of a backend that needs them (see :mod:`nemo_entropy.entropy.dispatch`).
Build the compiled kernels with ``nemo-entropy build-kernels``.
"""

from .clamped import vocab_parallel_clamped_entropy
from .vocab_parallel import (
    ShardStats,
    VocabParallelEntropyAndLogprobs,
    VocabParallelEntropyMath,
    vocab_parallel_entropy,
    vocab_parallel_entropy_and_logprobs,
    vocab_parallel_logprobs,
)

__all__ = [
    "ShardStats",
    "VocabParallelEntropyAndLogprobs",
    "VocabParallelEntropyMath",
    "vocab_parallel_entropy",
    "vocab_parallel_entropy_and_logprobs",
    "vocab_parallel_logprobs",
    "vocab_parallel_clamped_entropy",
]
