"""Vocab-parallel entropy over gloo: TP = 2 and 4 equal the unsharded result; megatron-core agrees.

One spawn of 4 processes serves the whole module (spawning costs seconds): TP = 4 is the world, TP = 2
is two groups {0, 1}, {2, 3} holding the same data (so both groups must give identical results), and
megatron-core's ``vocab_parallel_cross_entropy`` runs with its own ``parallel_state`` at TP = 4 and 2.
"""

from __future__ import annotations

import os

import pytest
import torch

from nemo_entropy.entropy import build
from tests.support.distributed import run_distributed_many
from tests.support.entropy_oracle import GRAD_TOL, VALUE_ATOL, VALUE_RTOL, assert_close, oracle

WORLD = 4
# The unsharded and TP results differ only in fp32 summation order and in where the rescaling to the
# global max happens: a few fp32 ulps.
TP_VS_UNSHARDED_RTOL, TP_VS_UNSHARDED_ATOL = 2e-6, 2e-6
# (name, rows, vocab_size, dtype): vocab_size is padded up to a multiple of the TP size, Megatron-style.
CASES = [
    ("odd prime vocab", 6, 4099, torch.float32),
    ("odd prime vocab bf16", 6, 4099, torch.bfloat16),
    ("qwen vocab fp16", 2, 151936, torch.float16),  # Qwen2.5: 151936 tokens, embedding padded to 152064
    ("masked shard", 5, 1000, torch.float32),
]
PADDED = {"qwen vocab fp16": 152064}


def _backends():
    return ["reference"] + (["cpu"] if build.load_cpu_extension() is not None else [])


def _padded_width(name, vocab_size, tp):
    width = PADDED.get(name, vocab_size)
    return -(-width // tp) * tp


def _case_data(index, name, rows, vocab_size, dtype, width):
    gen = torch.Generator().manual_seed(100 + index)
    logits = torch.randn(rows, width, generator=gen) * 4
    logits[:, vocab_size:] = 30.0  # padding that would dominate if it were counted
    targets = torch.randint(0, vocab_size, (rows,), generator=gen)
    if name == "masked shard":
        logits[0, : width // 2] = float("-inf")  # rank 0 (and 1 at TP=4) sees only -inf in row 0
        targets[0] = width - 7
        logits[1, :] = float("-inf")
        logits[1, 3] = 2.0  # a single allowed token, on rank 0
        targets[1] = 3
    gen_g = torch.Generator().manual_seed(200 + index)
    g_entropy, g_logprob = torch.randn(rows, generator=gen_g), torch.randn(rows, generator=gen_g)
    return logits.to(dtype), targets, g_entropy, g_logprob


def _run(logits, targets, g_entropy, g_logprob, **kwargs):
    from nemo_entropy.entropy import vocab_parallel_entropy_and_logprobs

    x = logits.clone().requires_grad_(True)
    entropy, logprob = vocab_parallel_entropy_and_logprobs(x, targets, **kwargs)
    (entropy * g_entropy + logprob * g_logprob).sum().backward()
    return entropy.detach(), logprob.detach(), x.grad


def _tp_scenario(rank, world_size, backends):
    """Every case, backend and TP size; returns {(tp, case, backend): (entropy, logprob, grad shard)}."""
    from nemo_entropy.parallel import ParallelGroups, new_subgroups

    pairs = new_subgroups([[0, 1], [2, 3]])
    world = new_subgroups([list(range(world_size))])[0]
    out = {}
    for tp, group in ((4, world), (2, pairs[rank // 2])):
        tp_rank = rank % tp
        for index, (name, rows, vocab_size, dtype) in enumerate(CASES):
            width = _padded_width(name, vocab_size, tp)
            logits, targets, g_entropy, g_logprob = _case_data(index, name, rows, vocab_size, dtype, width)
            shard_width = width // tp
            shard = logits[:, tp_rank * shard_width : (tp_rank + 1) * shard_width]
            for backend in backends:
                # Exercise each accepted form of `groups` and of the shard geometry.
                if index % 3 == 0:
                    kwargs = dict(groups=group, vocab_size=vocab_size)
                elif index % 3 == 1:
                    kwargs = dict(groups=ParallelGroups.from_groups(tp_group=group), vocab_size=vocab_size)
                else:
                    kwargs = dict(groups=group, vocab_start=tp_rank * shard_width, vocab_size=vocab_size)
                out[(tp, index, backend)] = _run(shard, targets, g_entropy, g_logprob, backend=backend, **kwargs)
    return out


def _megatron_scenario(rank, world_size):
    """Our log-probs and their gradient against megatron-core's vocab_parallel_cross_entropy."""
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    # A few megatron-core mappings ask for the CUDA device; on CPU the answer is the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    from nemo_entropy.entropy import vocab_parallel_logprobs
    from nemo_entropy.parallel import ParallelGroups

    errors = {}
    for tp in (4, 2):
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        try:
            groups = ParallelGroups.from_megatron()
            tp_rank = parallel_state.get_tensor_model_parallel_rank()
            gen = torch.Generator().manual_seed(7)
            seq, batch, vocab = 5, 3, 4 * 1031  # Megatron's [sequence, batch, vocab] layout
            full = torch.randn(seq, batch, vocab, generator=gen) * 3
            targets = torch.randint(0, vocab, (seq, batch), generator=gen)
            width = vocab // tp
            shard = full[..., tp_rank * width : (tp_rank + 1) * width]
            theirs_in = shard.clone().requires_grad_(True)
            loss = vocab_parallel_cross_entropy(theirs_in, targets)
            loss.sum().backward()
            ours_in = shard.clone().requires_grad_(True)
            for backend in _backends():
                ours_in.grad = None
                logprob = vocab_parallel_logprobs(ours_in, targets, groups=groups, backend=backend)
                (-logprob).sum().backward()
                errors[(tp, backend)] = (
                    (logprob + loss.detach()).abs().max().item(),
                    (ours_in.grad - theirs_in.grad).abs().max().item(),
                    loss.detach().abs().max().item(),
                )
        finally:
            parallel_state.destroy_model_parallel()
    return errors


@pytest.fixture(scope="module")
def spawned():
    backends = _backends()
    results = run_distributed_many(WORLD, [(_tp_scenario, (backends,)), (_megatron_scenario, ())])
    return backends, results[0], results[1]


def test_tp2_and_tp4_equal_unsharded_and_float64(spawned):
    backends, tp_results, _ = spawned
    for index, (name, rows, vocab_size, dtype) in enumerate(CASES):
        for tp in (4, 2):
            width = _padded_width(name, vocab_size, tp)
            logits, targets, g_entropy, g_logprob = _case_data(index, name, rows, vocab_size, dtype, width)
            ref_h, ref_lp, ref_g = oracle(logits, targets, vocab_size, g_entropy, g_logprob)
            for backend in backends:
                tag = f"{name} TP={tp} {backend}"
                per_rank = [tp_results[r][(tp, index, backend)] for r in range(WORLD)]
                # Every rank of a TP group returns the same (entropy, logprob); the two TP=2 groups hold
                # the same data and must agree exactly.
                for r in range(1, WORLD):
                    assert torch.equal(per_rank[r][0], per_rank[0][0]), f"{tag}: rank {r} entropy differs"
                    assert torch.equal(per_rank[r][1], per_rank[0][1]), f"{tag}: rank {r} logprob differs"
                if tp == 2:
                    for r in (2, 3):
                        for a, b in zip(per_rank[r], per_rank[r - 2]):
                            assert torch.equal(a, b), f"{tag}: TP groups {{0,1}} and {{2,3}} differ"
                entropy, logprob = per_rank[0][0], per_rank[0][1]
                grad = torch.cat([per_rank[r][2] for r in range(tp)], dim=-1)
                unsharded = _run(logits, targets, g_entropy, g_logprob, vocab_size=vocab_size, backend=backend)
                assert_close(entropy, unsharded[0], TP_VS_UNSHARDED_RTOL, TP_VS_UNSHARDED_ATOL, f"entropy vs unsharded [{tag}]")
                assert_close(logprob, unsharded[1], TP_VS_UNSHARDED_RTOL, TP_VS_UNSHARDED_ATOL, f"logprob vs unsharded [{tag}]")
                assert_close(grad, unsharded[2], *GRAD_TOL[dtype], f"grad vs unsharded [{tag}]")
                assert_close(entropy, ref_h, VALUE_RTOL, VALUE_ATOL, f"entropy vs float64 [{tag}]")
                assert_close(logprob, ref_lp, VALUE_RTOL, VALUE_ATOL, f"logprob vs float64 [{tag}]")
                assert_close(grad, ref_g, *GRAD_TOL[dtype], f"grad vs float64 [{tag}]")
                assert (grad[:, vocab_size:] == 0).all(), f"{tag}: padded columns got a gradient"


def test_megatron_vocab_parallel_cross_entropy_agrees(spawned):
    backends, _, megatron_results = spawned
    for rank, errors in enumerate(megatron_results):
        for tp in (4, 2):
            for backend in backends:
                logprob_err, grad_err, scale = errors[(tp, backend)]
                # Megatron computes in fp32 too; log-probs of magnitude ~10 agree to a few ulps.
                assert logprob_err <= 1e-5 * max(1.0, scale), (rank, tp, backend, logprob_err)
                assert grad_err <= 1e-6, (rank, tp, backend, grad_err)
