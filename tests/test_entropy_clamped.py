"""AEnt's clamped entropy (nemo_entropy.entropy.clamped): values and gradients against a float64 brute force
(sort each row, keep the logits at or above the (V - floor(p V))-th largest), ties at the threshold, vocabulary
padding, low-precision inputs, the monotone float keys, and TP = 2 over gloo equal to the unsharded result (one
spawn of 2 processes for the module)."""

from __future__ import annotations

import pytest
import torch

from nemo_entropy.entropy import vocab_parallel_clamped_entropy, vocab_parallel_entropy
from nemo_entropy.entropy.clamped import float_keys, kept_count

from .support.distributed import run_distributed_many
from .support.entropy_controls import clamped_entropy64


def _reference(logits, clamp, vocab_size, g):
    """float64 ``(H_clamp, d sum(g H_clamp) / d logits)`` over the first ``vocab_size`` columns."""
    z = logits.detach()[..., :vocab_size].double().requires_grad_(True)
    h = clamped_entropy64(z, clamp)
    (grad,) = torch.autograd.grad((h * g.double()).sum(), z)
    full = torch.zeros(logits.shape, dtype=torch.float64)
    full[..., :vocab_size] = grad
    return h.detach(), full


CASES = [  # (rows, vocab, padded width, clamp, dtype, scale)
    (7, 50, 50, 0.2, torch.float32, 3.0),
    (7, 50, 50, 0.0, torch.float32, 3.0),  # nothing removed: the full entropy
    (5, 37, 40, 0.3, torch.float32, 1.0),  # padded vocabulary: columns 37..39 are not tokens
    (6, 64, 64, 0.95, torch.float32, 2.0),  # keeps 4 of 64
    (6, 64, 64, 0.3, torch.bfloat16, 3.0),  # bf16 logits: many ties
]


@pytest.mark.parametrize("rows,vocab,width,clamp,dtype,scale", CASES)
def test_values_and_gradients_match_float64(rows, vocab, width, clamp, dtype, scale):
    gen = torch.Generator().manual_seed(rows * vocab + int(clamp * 100))
    logits = (torch.randn(rows, 3, width, generator=gen) * scale).to(dtype)
    logits[..., vocab:] = 50.0  # padding that would dominate if it were counted
    g = torch.randn(rows, 3, generator=gen)
    x = logits.clone().requires_grad_(True)
    h = vocab_parallel_clamped_entropy(x, clamp, vocab_size=vocab)
    (h * g).sum().backward()
    ref_h, ref_grad = _reference(logits, clamp, vocab, g)
    assert h.dtype == torch.float32 and h.shape == (rows, 3)
    torch.testing.assert_close(h.double(), ref_h, rtol=1e-5, atol=2e-6)
    rtol = 1e-5 if dtype == torch.float32 else 2.0 ** -8
    torch.testing.assert_close(x.grad.double(), ref_grad, rtol=rtol, atol=2e-6)
    assert bool((x.grad[..., vocab:] == 0).all())
    if clamp == 0.0:
        torch.testing.assert_close(h, vocab_parallel_entropy(logits, vocab_size=vocab), rtol=1e-6, atol=1e-6)
    else:
        assert bool((h < vocab_parallel_entropy(logits, vocab_size=vocab) + 1e-6).any())


def test_ties_at_the_threshold_are_all_kept():
    # V = 10, clamp 0.3: keep the top 7. Logits 5, 4, then six 3s, 0, -1: the 7th largest is a 3, and all six 3s
    # stay (8 tokens, where AEnt's topk would drop one 3 chosen by position), whatever the vocabulary's order.
    base = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 0.0, -1.0])
    kept = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 3.0, 3.0, 3.0])
    q = torch.softmax(kept.double(), -1)
    expected = float(-(q * q.log()).sum())
    for perm in (torch.arange(10), torch.randperm(10, generator=torch.Generator().manual_seed(3))):
        assert float(vocab_parallel_clamped_entropy(base[perm][None], 0.3)) == pytest.approx(expected, rel=1e-6)
    assert kept_count(10, 0.3) == 7 and kept_count(152064, 0.2) == 152064 - 30412


def test_float_keys_order_like_the_floats():
    values = torch.tensor([float("-inf"), -3.5, -1e-30, -0.0, 0.0, 1e-30, 2.0, 7.5e3, float("inf")])
    keys = float_keys(values)
    assert bool((keys[1:] >= keys[:-1]).all()) and int(keys[3]) == int(keys[4])
    assert bool((keys[1:3] < keys[2:4]).all()) and bool((keys[4:-1] < keys[5:]).all())
    rand = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 100
    assert torch.equal(torch.argsort(float_keys(rand), stable=True), torch.argsort(rand, stable=True))


@pytest.mark.parametrize("clamp", [-0.1, 1.0, True])
def test_bad_clamp_is_refused_naming_the_value(clamp):
    with pytest.raises(ValueError, match=rf"clamp={clamp!r} is invalid: allowed a fraction of the vocabulary"):
        vocab_parallel_clamped_entropy(torch.zeros(2, 5), clamp)


# ----------------------------------------------------------------------------------------------- TP = 2
TP_CASES = [(0.2, 37, torch.float32), (0.5, 64, torch.bfloat16), (0.0, 20, torch.float32)]


def _tp_data(index, vocab):
    gen = torch.Generator().manual_seed(500 + index)
    width = -(-vocab // 2) * 2
    logits = torch.randn(6, 4, width, generator=gen) * 3
    logits[..., vocab:] = 40.0
    logits[0, 0, : width // 2] = -30.0  # rank 0's half of one row holds none of the kept tokens
    return logits, torch.randn(6, 4, generator=gen), width


def _tp_scenario(rank, world_size):
    import torch.distributed as dist

    out = []
    for index, (clamp, vocab, dtype) in enumerate(TP_CASES):
        logits, g, width = _tp_data(index, vocab)
        half = width // 2
        x = logits[..., rank * half:(rank + 1) * half].to(dtype).clone().requires_grad_(True)
        h = vocab_parallel_clamped_entropy(x, clamp, groups=dist.group.WORLD, vocab_start=rank * half,
                                           vocab_size=vocab)
        (h * g).sum().backward()
        out.append((h.detach(), x.grad.float()))
    return out


def test_tensor_parallel_shards_give_the_unsharded_result():
    per_rank = run_distributed_many(2, [(_tp_scenario, ())])[0]
    for index, (clamp, vocab, dtype) in enumerate(TP_CASES):
        logits, g, width = _tp_data(index, vocab)
        x = logits.to(dtype).clone().requires_grad_(True)
        h = vocab_parallel_clamped_entropy(x, clamp, vocab_size=vocab)
        (h * g).sum().backward()
        ref_h, ref_grad = _reference(logits.to(dtype), clamp, vocab, g)
        (h0, g0), (h1, g1) = per_rank[0][index], per_rank[1][index]
        assert torch.equal(h0, h1), "both TP ranks must hold the same entropy"
        torch.testing.assert_close(h0, h.detach(), rtol=2e-6, atol=2e-6)
        torch.testing.assert_close(h0.double(), ref_h, rtol=1e-5, atol=2e-6)
        grad = torch.cat([g0, g1], dim=-1)
        torch.testing.assert_close(grad, x.grad.float(), rtol=1e-5, atol=1e-6)
        rtol = 1e-5 if dtype == torch.float32 else 2.0 ** -8
        torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=2e-6)
