"""TP = 2 over NCCL on two GPUs: the CUDA kernel and compiled Triton, each rank holding half the vocabulary,
equal the float64 oracle of the unsharded logits, and both ranks return identical values.

The same cases as tests/test_entropy_distributed.py runs over gloo on CPU: an odd vocabulary padded to a
multiple of the TP size, Qwen's 151936 tokens in Megatron's 152064-column embedding (bf16), and a row
whose half on rank 0 is all -inf (that rank contributes an empty summary to the all-reduces).
"""

from __future__ import annotations

import pytest
import torch

from tests.support.distributed import run_distributed_many
from tests.support.entropy_oracle import GRAD_TOL, VALUE_ATOL, VALUE_RTOL, assert_close, oracle
from tests.gpu.devices import BACKENDS, DEVICE, DIST_BACKEND, REHEARSAL, ROLES

pytestmark = pytest.mark.cuda

TP = 2
# (name, rows, vocab_size, padded width, dtype)
CASES = [
    ("odd vocab fp32", 6, 4099, 4100, torch.float32),
    ("qwen vocab bf16", 4, 151936, 152064, torch.bfloat16),
    ("masked half fp16", 5, 1000, 1000, torch.float16),
]


def _case_data(index):
    name, rows, vocab_size, width, dtype = CASES[index]
    gen = torch.Generator().manual_seed(300 + index)
    logits = torch.randn(rows, width, generator=gen) * 4
    logits[:, vocab_size:] = 30.0  # padding that would dominate if it were counted
    targets = torch.randint(0, vocab_size, (rows,), generator=gen)
    if name.startswith("masked"):
        logits[0, : width // 2] = float("-inf")  # rank 0 sees only -inf in row 0
        targets[0] = width - 7
        logits[1, :] = float("-inf")
        logits[1, 3] = 2.0  # a single allowed token, on rank 0
        targets[1] = 3
    g_entropy, g_logprob = torch.randn(rows, generator=gen), torch.randn(rows, generator=gen)
    return logits.to(dtype), targets, g_entropy, g_logprob


def _tp_scenario(rank, world_size):
    """Every case and backend on this rank's shard; results on the CPU."""
    import torch.distributed as dist

    from nemo_entropy.entropy import vocab_parallel_entropy_and_logprobs

    device = torch.device("cuda", rank) if DEVICE == "cuda" else torch.device("cpu")
    out = {}
    for index, (_, _, vocab_size, width, _) in enumerate(CASES):
        logits, targets, g_entropy, g_logprob = _case_data(index)
        shard_width = width // world_size
        shard = logits[:, rank * shard_width : (rank + 1) * shard_width]
        for role in ROLES:
            x = shard.to(device, copy=True).requires_grad_(True)  # a fresh leaf per backend, also on CPU
            entropy, logprob = vocab_parallel_entropy_and_logprobs(
                x, targets.to(device), groups=dist.group.WORLD, vocab_size=vocab_size, backend=BACKENDS[role]
            )
            (entropy * g_entropy.to(device) + logprob * g_logprob.to(device)).sum().backward()
            out[(index, role)] = (entropy.detach().cpu(), logprob.detach().cpu(), x.grad.cpu())
    return out


def _gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.skipif(not REHEARSAL and _gpus() < TP, reason=f"TP={TP} over NCCL needs {TP} GPUs, found {_gpus()}")
def test_tp2_equals_float64_and_ranks_agree():
    per_rank = run_distributed_many(TP, [(_tp_scenario, ())], backend=DIST_BACKEND)[0]
    for index, (name, rows, vocab_size, width, dtype) in enumerate(CASES):
        logits, targets, g_entropy, g_logprob = _case_data(index)
        ref_h, ref_lp, ref_g = oracle(logits, targets, vocab_size, g_entropy, g_logprob)
        for role in ROLES:
            tag = f"{name} TP={TP} {BACKENDS[role]} over {DIST_BACKEND}"
            (h0, lp0, g0), (h1, lp1, g1) = per_rank[0][(index, role)], per_rank[1][(index, role)]
            assert torch.equal(h0, h1) and torch.equal(lp0, lp1), f"{tag}: ranks disagree"
            grad = torch.cat([g0, g1], dim=-1)
            assert_close(h0, ref_h, VALUE_RTOL, VALUE_ATOL, f"entropy [{tag}]")
            assert_close(lp0, ref_lp, VALUE_RTOL, VALUE_ATOL, f"logprob [{tag}]")
            assert_close(grad, ref_g, *GRAD_TOL[dtype], f"grad [{tag}]")
            assert (grad[:, vocab_size:] == 0).all(), f"{tag}: padded columns got a gradient"
