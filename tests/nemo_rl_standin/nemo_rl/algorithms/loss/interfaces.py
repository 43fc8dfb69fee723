"""The loss interface of NeMo-RL >= v0.6: ``loss_fn(data, global_valid_seqs, global_valid_toks, **loss_input)``
with ``loss_type`` and ``input_type``; ``MetricNormalizer`` exists from v0.7 on (the ``main`` generation here)."""

import enum

import nemo_rl


class LossType(enum.Enum):
    TOKEN_LEVEL = "token_level"
    SEQUENCE_LEVEL = "sequence_level"


class LossInputType(enum.Enum):
    LOGIT = "logit"
    LOGPROB = "logprob"
    DISTILLATION = "distillation"


if nemo_rl.GENERATION == "main":
    class MetricNormalizer(enum.Enum):
        TOKENS = "tokens"
        SEQUENCES = "sequences"
        NONE = "none"
