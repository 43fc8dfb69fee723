"""``prepare_loss_input``: what the workers hand the loss, by ``loss_fn.input_type``."""

from nemo_rl.algorithms.loss.interfaces import LossInputType
from nemo_rl.distributed.model_utils import get_next_token_logprobs_from_logits


def prepare_loss_input(logits, data, loss_fn, vocab_parallel_rank=None, vocab_parallel_group=None,
                       context_parallel_group=None, sampling_params=None, d2t=None, chunk_size=None):
    if loss_fn.input_type == LossInputType.LOGIT:
        return {"logits": logits}, data
    logprobs = get_next_token_logprobs_from_logits(
        input_ids=data["input_ids"], next_token_logits=logits, seq_index=data.get("seq_index"),
        vocab_parallel_rank=vocab_parallel_rank, vocab_parallel_group=vocab_parallel_group,
        context_parallel_group=context_parallel_group)
    return {"next_token_logprobs": logprobs}, data
