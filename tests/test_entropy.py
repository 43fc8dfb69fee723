"""nemo_entropy.entropy on one process: values and gradients against float64, extremes, errors, dispatch.

Backends under test here: the chunked PyTorch reference and the CPU extension (built by
``nemo-entropy build-kernels``, which ``make test`` runs first; its tests skip if it is not built).
Triton: tests/test_entropy_triton.py. TP over gloo and megatron-core: tests/test_entropy_distributed.py.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from nemo_entropy.entropy import (
    vocab_parallel_entropy,
    vocab_parallel_entropy_and_logprobs,
    vocab_parallel_logprobs,
)
from nemo_entropy.entropy import build, dispatch
from nemo_entropy.entropy.reference import ReferenceBackend
from nemo_entropy.entropy.vocab_parallel import ShardStats
from tests.support.entropy_oracle import GRAD_TOL, VALUE_ATOL, VALUE_RTOL, assert_close, oracle

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _cpu_extension():
    return build.load_cpu_extension(build_if_missing=False)


def _backends():
    params = [pytest.param("reference", id="reference")]
    marks = [] if _cpu_extension() is not None else [pytest.mark.skip(reason="CPU extension not built: run `nemo-entropy build-kernels`")]
    params.append(pytest.param("cpu", id="cpu", marks=marks))
    return params


BACKENDS = _backends()


def _run(logits, targets, backend, g_entropy, g_logprob, **kwargs):
    x = logits.clone().requires_grad_(True)
    entropy, logprob = vocab_parallel_entropy_and_logprobs(x, targets, backend=backend, **kwargs)
    (entropy * g_entropy + logprob * g_logprob).sum().backward()
    return entropy, logprob, x.grad


def _check(logits, targets, backend, vocab_size=None, *, seed=0, what=""):
    """Run ours, compare entropy, log-prob and the gradient of a random combination with the oracle."""
    rows = logits.reshape(-1, logits.shape[-1]).shape[0]
    gen = torch.Generator().manual_seed(seed)
    g_entropy, g_logprob = torch.randn(rows, generator=gen), torch.randn(rows, generator=gen)
    vocab = logits.shape[-1] if vocab_size is None else vocab_size
    entropy, logprob, grad = _run(
        logits, targets, backend, g_entropy.reshape(targets.shape), g_logprob.reshape(targets.shape), vocab_size=vocab_size
    )
    assert entropy.dtype == torch.float32 and logprob.dtype == torch.float32
    assert entropy.shape == targets.shape and logprob.shape == targets.shape
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    ref_h, ref_lp, ref_g = oracle(logits.reshape(rows, -1), targets.reshape(-1), vocab, g_entropy, g_logprob)
    tag = f"{what} {backend} {logits.dtype} {tuple(logits.shape)}"
    assert_close(entropy.reshape(-1), ref_h, VALUE_RTOL, VALUE_ATOL, f"entropy [{tag}]")
    assert_close(logprob.reshape(-1), ref_lp, VALUE_RTOL, VALUE_ATOL, f"logprob [{tag}]")
    rtol, atol = GRAD_TOL[logits.dtype]
    assert_close(grad.reshape(rows, -1), ref_g, rtol, atol, f"grad [{tag}]")


# Shape sweep: size extremes, widths that are not multiples of any block or vector size (odd primes,
# 152064 / 8 = 19008), not a cartesian product (2 CPU cores).
SHAPES = [
    (1, 1),
    (3, 2),
    (5, 7),
    (64, 4099),
    (4096, 31),
    (16, 19008),
    (2, 50021),
    (1, 50000),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rows,width", SHAPES)
def test_matches_float64(backend, dtype, rows, width):
    gen = torch.Generator().manual_seed(rows * 7919 + width)
    logits = (torch.randn(rows, width, generator=gen) * 3).to(dtype)
    targets = torch.randint(0, width, (rows,), generator=gen)
    _check(logits, targets, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_shape_and_noncontiguous_input(backend):
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(2, 5, 300, generator=gen).bfloat16()
    targets = torch.randint(0, 300, (2, 5), generator=gen)
    _check(base, targets, backend, what="[B,S,V]")
    # A transposed view: rows are not contiguous in memory, the last dimension is.
    strided = torch.randn(300, 2, 5, generator=gen).permute(1, 2, 0)
    _check(strided, targets, backend, what="strided")
    # Last dimension not contiguous: made contiguous in its own dtype.
    t_last = torch.randn(2, 300, 5, generator=gen).transpose(1, 2)
    _check(t_last, targets, backend, what="non-contiguous last dim")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_extreme_logits(backend, dtype):
    gen = torch.Generator().manual_seed(11)
    rows, width = 6, 1031
    base = torch.randn(rows, width, generator=gen)
    very_negative = (base - (6e4 if dtype == torch.float16 else 1e4)).to(dtype)
    huge = base.clone()
    huge[:, 17] = 6e4 if dtype == torch.float16 else 1e4  # one logit dominates: H ~ 0, logp(17) ~ 0
    big_offset = (base * 8 + (3e4 if dtype == torch.float16 else 5e4)).to(dtype)  # |M| large, H ~ O(1)
    targets = torch.randint(0, width, (rows,), generator=gen)
    targets[0] = 17
    for what, logits in [("all very negative", very_negative), ("one huge", huge.to(dtype)), ("large offset", big_offset)]:
        _check(logits, targets, backend, what=what)
    # Shift invariance on the exactly representable case: both oracle and ours see the same values.
    h1, lp1 = vocab_parallel_entropy_and_logprobs(huge.to(dtype), targets, backend=backend)
    assert h1[0].item() < 1e-3 and abs(lp1[0].item()) < 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_minus_inf_logits_are_masked_tokens(backend, dtype):
    gen = torch.Generator().manual_seed(5)
    rows, width = 5, 2053
    logits = torch.randn(rows, width, generator=gen).to(dtype)
    logits[0, ::3] = float("-inf")  # a third of the vocabulary masked
    logits[1, :2000] = float("-inf")  # whole leading blocks masked: the running max starts at -inf
    logits[2, :] = float("-inf")
    logits[2, 1234] = 0.5  # a single allowed token: H = 0, logp = 0
    targets = torch.tensor([1, 2010, 1234, 7, 0])
    _check(logits, targets, backend, what="-inf")
    h, lp = vocab_parallel_entropy_and_logprobs(logits, targets, backend=backend)
    assert h[2].item() == pytest.approx(0.0, abs=1e-6) and lp[2].item() == pytest.approx(0.0, abs=1e-6)
    # Target on a masked token: log-prob -inf, entropy finite.
    logits[3, 7] = float("-inf")
    h, lp = vocab_parallel_entropy_and_logprobs(logits, targets, backend=backend)
    assert lp[3].item() == float("-inf") and torch.isfinite(h[3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_and_plus_inf_poison_only_their_row(backend):
    logits = torch.randn(4, 3001)
    logits[1, 2999] = float("nan")  # in the tail: no block/vector may drop it
    logits[2, 5] = float("inf")
    logits[3, :] = float("-inf")  # no token allowed: undefined distribution
    targets = torch.zeros(4, dtype=torch.int64)
    h, lp = vocab_parallel_entropy_and_logprobs(logits, targets, backend=backend)
    assert torch.isfinite(h[0]) and torch.isfinite(lp[0])
    for row in (1, 2, 3):
        assert torch.isnan(h[row]), f"row {row}: entropy {h[row].item()} should be NaN"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_padded_vocabulary_is_excluded(backend, dtype):
    # Megatron pads 152064 + 3 tokens to a multiple of the TP size; padded columns may hold anything.
    gen = torch.Generator().manual_seed(9)
    rows, width, vocab_size = 7, 4101, 4096
    logits = torch.randn(rows, width, generator=gen)
    logits[:, vocab_size:] = 50.0  # would dominate if counted
    logits = logits.to(dtype)
    targets = torch.randint(0, vocab_size, (rows,), generator=gen)
    _check(logits, targets, backend, vocab_size=vocab_size, what="padded")


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_output_gradients_and_wrappers(backend):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(9, 777, generator=gen)
    targets = torch.randint(0, 777, (9,), generator=gen)
    ones = torch.ones(9)
    _, _, ref_entropy_grad = oracle(logits, targets, 777, g_entropy=ones)
    _, _, ref_logprob_grad = oracle(logits, targets, 777, g_logprob=ones)
    x = logits.clone().requires_grad_(True)
    vocab_parallel_entropy(x, backend=backend).sum().backward()  # targets not needed for the entropy
    assert_close(x.grad, ref_entropy_grad, *GRAD_TOL[torch.float32], "entropy-only grad")
    x = logits.clone().requires_grad_(True)
    vocab_parallel_logprobs(x, targets, backend=backend).sum().backward()
    assert_close(x.grad, ref_logprob_grad, *GRAD_TOL[torch.float32], "logprob-only grad")


@pytest.mark.parametrize("backend", BACKENDS)
def test_saved_state_is_the_input_plus_o_rows(backend):
    """Backward keeps the caller's logits (no copy) and O(rows) numbers: no softmax, no fp32 shard."""
    rows, width = 32, 5000
    logits = torch.randn(rows, width).bfloat16().requires_grad_(True)
    targets = torch.randint(0, width, (rows,))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        h, lp = vocab_parallel_entropy_and_logprobs(logits, targets, backend=backend)
    big = [t for t in saved if t.numel() >= width]
    assert len(big) == 1 and big[0].data_ptr() == logits.data_ptr(), [tuple(t.shape) for t in big]
    small_bytes = sum(t.numel() * t.element_size() for t in saved if t.numel() < width)
    assert small_bytes <= 32 * rows, small_bytes


def test_input_errors_name_the_offender():
    logits = torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"targets must be token ids in \[0, vocab_size=10\), got 10"):
        vocab_parallel_entropy_and_logprobs(logits, torch.tensor([0, 10, 2]))
    with pytest.raises(ValueError, match=r"got -1"):
        vocab_parallel_entropy_and_logprobs(logits, torch.tensor([0, -1, 2]))
    with pytest.raises(ValueError, match=r"vocab_size=8\), got 9"):
        vocab_parallel_entropy_and_logprobs(logits, torch.tensor([0, 9, 2]), vocab_size=8)
    with pytest.raises(ValueError, match="targets shape"):
        vocab_parallel_entropy_and_logprobs(logits, torch.tensor([0, 1]))
    # A vocabulary wider than shard x TP would give targets past the shard a logit of 0: refused.
    with pytest.raises(ValueError, match=r"vocab_size must be in \[1, 10\] \(shard width 10 x TP size 1\), got 12"):
        vocab_parallel_entropy_and_logprobs(logits, torch.tensor([0, 11, 2]), vocab_size=12)
    with pytest.raises(TypeError, match="logits_shard must be a float32, bfloat16 or float16"):
        vocab_parallel_entropy_and_logprobs(logits.double(), torch.tensor([0, 1, 2]))
    with pytest.raises(TypeError, match="targets must be an integer tensor"):
        vocab_parallel_entropy_and_logprobs(logits, torch.tensor([0.0, 1.0, 2.0]))
    with pytest.raises(ValueError, match="backend must be one of"):
        vocab_parallel_entropy_and_logprobs(logits, torch.tensor([0, 1, 2]), backend="fast")
    with pytest.raises(ValueError, match="vocab_start must be in"):
        vocab_parallel_entropy_and_logprobs(logits, torch.tensor([0, 1, 2]), vocab_start=10)
    with pytest.raises(ValueError, match="backend='cuda' needs CUDA tensors"):
        vocab_parallel_entropy_and_logprobs(logits, torch.tensor([0, 1, 2]), backend="cuda")
    with pytest.raises(TypeError, match="groups must be None"):
        vocab_parallel_entropy_and_logprobs(logits, torch.tensor([0, 1, 2]), groups="tp")


@pytest.mark.skipif(_cpu_extension() is None, reason="CPU extension not built: run `nemo-entropy build-kernels`")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_per_thread_code_path_on_cpu(dtype):
    """The CUDA kernel's per-thread loop (accumulate_chunk over 16-byte vectors, rescaling the running
    max) is compiled into the CPU build too; run it here on the shapes where it matters."""
    ext = _cpu_extension()
    gen = torch.Generator().manual_seed(2)
    logits = (torch.randn(6, 4099, generator=gen) * 5).to(dtype)
    logits[1, :3000] = float("-inf")
    logits[2, ::2] = float("-inf")
    logits[3] = torch.arange(4099, dtype=torch.float32).to(dtype) / 100  # max rises at every chunk
    local_targets = torch.tensor([0, 4098, 3, -1, 100, 2000])
    valid = 4000
    ref = ReferenceBackend().shard_stats(logits, local_targets, valid)
    for chunk in (1, 8, 16 // logits.element_size()):
        ours = ShardStats(*ext.shard_stats(logits, local_targets, valid, chunk))
        # Compare at a common reference max: the global summary that the TP combine would produce.
        assert torch.equal(ours.local_max, ref.local_max)
        assert torch.equal(ours.target_logit, ref.target_logit)
        assert_close(ours.sum_exp, ref.sum_exp, 1e-5, 0.0, f"sum_exp chunk={chunk}")
        assert_close(ours.sum_exp_shifted, ref.sum_exp_shifted, 1e-5, 1e-5, f"sum_exp_shifted chunk={chunk}")


class _WrongBackend:
    """A backend whose statistics are off by 1%: the self-check must reject it."""

    name = "wrong"

    def shard_stats(self, logits, local_targets, valid_width):
        s = ReferenceBackend().shard_stats(logits, local_targets, valid_width)
        return ShardStats(s.local_max, s.sum_exp * 1.01, s.sum_exp_shifted, s.target_logit)

    def shard_grad(self, *args):
        return ReferenceBackend().shard_grad(*args)


def test_self_check_rejects_a_wrong_backend_and_falls_back():
    assert dispatch.self_check(ReferenceBackend(chunk_elements=512), torch.device("cpu"))
    assert not dispatch.self_check(_WrongBackend(), torch.device("cpu"))
    dispatch._self_checked.pop(("wrong", "cpu"), None)
    with pytest.warns(RuntimeWarning, match="wrong entropy backend disagrees"):
        chosen = dispatch._checked(_WrongBackend(), torch.device("cpu"))
    assert chosen.name == "reference"


def test_auto_backend_on_cpu_uses_the_built_extension_else_the_reference(caplog):
    dispatch.reset_backend_cache()
    with caplog.at_level("INFO", logger="nemo_entropy.entropy"):
        impl = dispatch.resolve_backend("auto", torch.device("cpu"))
        dispatch.resolve_backend("auto", torch.device("cpu"))
    expected = "cpu" if _cpu_extension() is not None else "reference"
    assert impl.name == expected
    assert sum("entropy backend for cpu" in r.getMessage() for r in caplog.records) == 1  # logged once


def test_import_is_cheap():
    code = (
        "import sys, nemo_entropy.entropy as e\n"
        "heavy = [m for m in ('triton', 'megatron', 'megatron.core', 'nemo_entropy_cpu_kernels', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
