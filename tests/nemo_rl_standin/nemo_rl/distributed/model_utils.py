"""``get_next_token_logprobs_from_logits`` with NeMo-RL's branch rule: the CP-aware path is taken only when a
vocab-parallel group is passed; without one, the logits are taken as whole sequences (a CP-sharded block then
fails with a size mismatch, as in NeMo-RL). The stand-in's CP layout is contiguous chunks (NeMo-RL's is
load-balanced); TP > 1 is not modelled."""

import torch
import torch.distributed as dist


def get_next_token_logprobs_from_logits(input_ids, next_token_logits, seq_index=None, vocab_parallel_rank=None,
                                        vocab_parallel_group=None, context_parallel_group=None,
                                        sampling_params=None, chunk_size=None):
    logits = next_token_logits.float()
    if vocab_parallel_group is not None:
        if dist.get_world_size(vocab_parallel_group) > 1:
            raise NotImplementedError("stand-in: vocab-parallel logits (TP > 1) are not modelled")
        cp = 1 if context_parallel_group is None else dist.get_world_size(context_parallel_group)
        cp_rank = 0 if context_parallel_group is None else dist.get_rank(context_parallel_group)
        chunk = logits.shape[1]
        start = cp_rank * chunk
        padded = torch.nn.functional.pad(input_ids, (0, cp * chunk + 1 - input_ids.shape[1]))
        targets = padded[:, start + 1 : start + chunk + 1]
        local = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        if cp > 1:
            parts = [torch.empty_like(local) for _ in range(cp)]
            dist.all_gather(parts, local.contiguous(), group=context_parallel_group)
            parts[cp_rank] = local  # keep this rank's piece in the autograd graph
            local = torch.cat(parts, 1)
        return local[:, : input_ids.shape[1] - 1]
    logprobs = torch.log_softmax(logits[:, :-1], -1)
    return logprobs.gather(-1, input_ids[:, 1:].unsqueeze(-1)).squeeze(-1)
