"""The CUDA kernel and compiled Triton against the float64 oracle, on a GPU (benchmarks/gpu_check.sh runs this).

What only a GPU can show, and the cases that reach it: the CUDA kernel's 16-byte vector loads (row bytes a
multiple of 16) and its scalar fallback (odd widths, rows that start unaligned), a vector loop followed by a
scalar tail (valid width not a multiple of the vector), the 128 / 256 / 512-thread launches (widths below
2048, below 16384, above), blocks whose threads mostly see no column (warp-shuffle merge of empty
summaries), ``__expf`` on large and very negative logits, Megatron's padded vocabulary (Qwen's 151936 in
152064 columns), one block per row for thousands of rows, determinism (no race in the block merge), the
caller's CUDA stream; and compiled Triton, which rounds fp32 -> bf16 to nearest where the CPU interpreter
truncates. Tolerances are the stated ones of nemo_entropy/entropy/oracle.py; the oracle runs in float64 on
the CPU on the same rounded inputs.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from nemo_entropy.entropy import dispatch, vocab_parallel_entropy_and_logprobs
from tests.support.entropy_oracle import GRAD_TOL, VALUE_ATOL, VALUE_RTOL, assert_close, oracle
from tests.gpu.devices import BACKENDS, DEVICE, REHEARSAL, ROLES

pytestmark = pytest.mark.cuda

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# (rows, width, vocab_size or None) and the CUDA code path each one takes (bf16 unless said otherwise).
SHAPES = [
    (1, 1, None),  # one column: 127 of 128 threads merge empty summaries
    (3, 7, None),  # scalar path (14 bytes per row), 128 threads
    (5, 2047, None),  # scalar path, last width with 128 threads
    (64, 4096, None),  # vectorised, 256 threads
    (8, 4096, 4093),  # vectorised loop then a 5-column scalar tail; 3 padded columns
    (16, 4099, None),  # scalar path, 256 threads
    (16, 19008, None),  # Qwen 152064 / TP 8: vectorised, 512 threads
    (4, 152064, 151936),  # Qwen's vocabulary in Megatron's padded embedding, TP 1
    (4096, 128, None),  # 4096 blocks of 128 threads, one vector per thread at most
    (2, 50021, None),  # odd prime width, 512 threads, scalar path
]


def _shape_id(shape):
    rows, width, vocab = shape
    return f"{rows}x{width}" + (f"-vocab{vocab}" if vocab else "")


def _run(logits_cpu, targets_cpu, backend, g_entropy, g_logprob, **kwargs):
    """Our entropy, log-prob and gradient on DEVICE, returned on the CPU."""
    x = logits_cpu.to(DEVICE, copy=True).requires_grad_(True)  # copy: never alias the input on CPU
    entropy, logprob = vocab_parallel_entropy_and_logprobs(x, targets_cpu.to(DEVICE), backend=backend, **kwargs)
    (entropy * g_entropy.to(DEVICE) + logprob * g_logprob.to(DEVICE)).sum().backward()
    return entropy.detach().cpu(), logprob.detach().cpu(), x.grad.cpu()


def _check(logits, targets, backend, vocab_size=None, *, seed=0, what=""):
    rows = logits.shape[0]
    gen = torch.Generator().manual_seed(seed)
    g_entropy, g_logprob = torch.randn(rows, generator=gen), torch.randn(rows, generator=gen)
    vocab = logits.shape[-1] if vocab_size is None else vocab_size
    entropy, logprob, grad = _run(logits, targets, backend, g_entropy, g_logprob, vocab_size=vocab_size)
    assert entropy.dtype == torch.float32 and logprob.dtype == torch.float32
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    ref_h, ref_lp, ref_g = oracle(logits, targets, vocab, g_entropy, g_logprob)
    tag = f"{what} {backend} on {DEVICE} {logits.dtype} {tuple(logits.shape)} vocab={vocab}"
    assert_close(entropy, ref_h, VALUE_RTOL, VALUE_ATOL, f"entropy [{tag}]")
    assert_close(logprob, ref_lp, VALUE_RTOL, VALUE_ATOL, f"logprob [{tag}]")
    assert_close(grad, ref_g, *GRAD_TOL[logits.dtype], f"grad [{tag}]")
    assert (grad[:, vocab:] == 0).all(), f"padded columns got a gradient [{tag}]"


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_matches_float64(role, dtype, shape):
    rows, width, vocab_size = shape
    vocab = vocab_size or width
    gen = torch.Generator().manual_seed(rows * 7919 + width)
    logits = torch.randn(rows, width, generator=gen) * 3
    logits[:, vocab:] = 50.0  # padding that would dominate if it were counted
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    _check(logits.to(dtype), targets, BACKENDS[role], vocab_size)


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unaligned_rows_take_the_scalar_path(role, dtype):
    """A shard that starts one element into its buffer (row bytes a multiple of 16, base pointer not)."""
    rows, width = 6, 4096
    gen = torch.Generator().manual_seed(17)
    full = (torch.randn(rows, width + 1, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, width, (rows,), generator=gen)
    g_entropy, g_logprob = torch.randn(rows, generator=gen), torch.randn(rows, generator=gen)
    x = full.to(DEVICE, copy=True).requires_grad_(True)
    shard = x[:, 1:]
    assert shard.stride() == (width + 1, 1)
    entropy, logprob = vocab_parallel_entropy_and_logprobs(shard, targets.to(DEVICE), backend=BACKENDS[role])
    (entropy * g_entropy.to(DEVICE) + logprob * g_logprob.to(DEVICE)).sum().backward()
    ref_h, ref_lp, ref_g = oracle(full[:, 1:], targets, width, g_entropy, g_logprob)
    tag = f"unaligned {BACKENDS[role]} {dtype}"
    assert_close(entropy.detach().cpu(), ref_h, VALUE_RTOL, VALUE_ATOL, f"entropy [{tag}]")
    assert_close(logprob.detach().cpu(), ref_lp, VALUE_RTOL, VALUE_ATOL, f"logprob [{tag}]")
    grad = x.grad.cpu()
    assert (grad[:, 0] == 0).all()
    assert_close(grad[:, 1:], ref_g, *GRAD_TOL[dtype], f"grad [{tag}]")


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_masked_logits(role, dtype):
    gen = torch.Generator().manual_seed(5)
    rows, width = 5, 4104  # vectorised for every dtype
    logits = torch.randn(rows, width, generator=gen)
    logits[0, ::3] = float("-inf")  # a third of the vocabulary masked
    logits[1, :4000] = float("-inf")  # every thread's first vectors masked: running max starts at -inf
    logits[2, :] = float("-inf")
    logits[2, 1234] = 0.5  # a single allowed token: H = 0, logp = 0
    logits = logits.to(dtype)
    targets = torch.tensor([1, 4010, 1234, 7, 0])
    _check(logits, targets, BACKENDS[role], what="-inf")
    h, lp = vocab_parallel_entropy_and_logprobs(logits.to(DEVICE), targets.to(DEVICE), backend=BACKENDS[role])
    assert h[2].item() == pytest.approx(0.0, abs=1e-6) and lp[2].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("role", ROLES)
def test_nan_and_plus_inf_poison_only_their_row(role):
    logits = torch.randn(4, 4104)
    logits[1, 4103] = float("nan")  # the very last column: no vector or tail may drop it
    logits[2, 5] = float("inf")
    logits[3, :] = float("-inf")  # no token allowed: undefined distribution
    h, lp = vocab_parallel_entropy_and_logprobs(
        logits.to(DEVICE), torch.zeros(4, dtype=torch.int64, device=DEVICE), backend=BACKENDS[role]
    )
    h = h.cpu()
    assert torch.isfinite(h[0]) and torch.isfinite(lp[0].cpu())
    for row in (1, 2, 3):
        assert torch.isnan(h[row]), f"row {row}: entropy {h[row].item()} should be NaN"


@pytest.mark.parametrize("role", ROLES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits(role, dtype):
    """Large offsets (|max| ~ 1e4): H = lse - E[z] would cancel; __expf of very negative shifts."""
    gen = torch.Generator().manual_seed(11)
    rows, width = 6, 4096
    base = torch.randn(rows, width, generator=gen)
    half = dtype == torch.float16
    very_negative = (base - (6e4 if half else 1e4)).to(dtype)
    huge = base.clone()
    huge[:, 17] = 6e4 if half else 1e4  # one logit dominates: H ~ 0, logp(17) ~ 0
    big_offset = (base * 8 + (3e4 if half else 5e4)).to(dtype)
    targets = torch.randint(0, width, (rows,), generator=gen)
    targets[0] = 17
    for what, logits in [("all very negative", very_negative), ("one huge", huge.to(dtype)), ("large offset", big_offset)]:
        _check(logits, targets, BACKENDS[role], what=what)


@pytest.mark.parametrize("role", ROLES)
def test_deterministic_and_on_the_callers_stream(role):
    """Bit-identical on repeat (a race in the block merge would not be); correct on a side stream."""
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(256, 19008, generator=gen) * 3).bfloat16().to(DEVICE)
    targets = torch.randint(0, 19008, (256,), generator=gen).to(DEVICE)
    first = vocab_parallel_entropy_and_logprobs(logits, targets, backend=BACKENDS[role])
    for _ in range(3):
        again = vocab_parallel_entropy_and_logprobs(logits, targets, backend=BACKENDS[role])
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    if DEVICE == "cuda":
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        ctx = torch.cuda.stream(side)
    else:
        ctx = contextlib.nullcontext()
    with ctx:
        on_side = vocab_parallel_entropy_and_logprobs(logits, targets, backend=BACKENDS[role])
    if DEVICE == "cuda":
        torch.cuda.current_stream().wait_stream(side)
    assert all(torch.equal(a, b) for a, b in zip(first, on_side))


def test_auto_uses_the_built_cuda_kernel_and_it_passes_its_self_check():
    """benchmarks/gpu_check.sh builds the extension first; without it auto would settle for Triton."""
    dispatch.reset_backend_cache()
    impl = dispatch.resolve_backend("auto", torch.device(DEVICE))
    assert impl.name == BACKENDS["cuda_kernel"], (
        f"backend='auto' on {DEVICE} chose {impl.name}: build the extension first (nemo-entropy build-kernels)"
    )
    assert dispatch.self_check(impl, torch.device(DEVICE))
    if not REHEARSAL:
        assert dispatch.self_check(dispatch.resolve_backend("triton", torch.device(DEVICE)), torch.device(DEVICE))
