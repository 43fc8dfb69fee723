"""The Triton backend, executed on CPU under TRITON_INTERPRET=1, against the float64 oracle.

TRITON_INTERPRET must be set before triton is first imported (megatron-core imports it too), so the
checks run in a fresh interpreter: ``python -m tests.test_entropy_triton`` with the variable set. Shapes
are tiny (the interpreter executes the kernel block by block in numpy) but cover widths that are not
multiples of the block (4096 and 8192), padding, masked logits and all three dtypes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# (rows, width, vocab_size or None, block)
CASES = [
    (3, 1, None, 4096),
    (4, 4099, None, 4096),  # one full block + a 3-column masked tail
    (2, 9001, 8999, 8192),  # padded vocabulary, second block almost empty
    (2, 19008, None, 8192),  # 152064 / 8
]


def _grad_tol(dtype):
    from tests.support.entropy_oracle import GRAD_TOL

    rtol, atol = GRAD_TOL[dtype]
    # The interpreter casts fp32 -> bfloat16 by truncation (triton/runtime/interpreter.py, cast_impl with
    # no rounding mode); compiled Triton rounds to nearest even. Truncation errs by up to one bf16 ulp,
    # 2^-7 relative, instead of half of one.
    return (2.0**-7, atol) if dtype == torch.bfloat16 else (rtol, atol)


def _check_all() -> None:
    """Runs inside the interpreted subprocess."""
    assert os.environ.get("TRITON_INTERPRET") == "1", "must run with TRITON_INTERPRET=1"
    from nemo_entropy.entropy import dispatch, vocab_parallel_entropy_and_logprobs
    from nemo_entropy.entropy.triton_kernels import TritonBackend
    from tests.support.entropy_oracle import VALUE_ATOL, VALUE_RTOL, assert_close, oracle

    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for rows, width, vocab_size, block in CASES:
            gen = torch.Generator().manual_seed(rows * 31 + width)
            logits = torch.randn(rows, width, generator=gen) * 3
            if width > 100:
                logits[0, : width // 2] = float("-inf")  # leading blocks fully masked
                logits[-1, 5] = 40.0  # a dominant token
            logits = logits.to(dtype)
            vocab = vocab_size or width
            targets = torch.randint(0, vocab, (rows,), generator=gen)
            g_entropy, g_logprob = torch.randn(rows, generator=gen), torch.randn(rows, generator=gen)
            # Pin the block size under test (the dispatch cache holds one TritonBackend per device).
            dispatch._resolved[("triton", "cpu")] = TritonBackend(block=block)
            x = logits.clone().requires_grad_(True)
            entropy, logprob = vocab_parallel_entropy_and_logprobs(x, targets, vocab_size=vocab_size, backend="triton")
            (entropy * g_entropy + logprob * g_logprob).sum().backward()
            ref_h, ref_lp, ref_g = oracle(logits, targets, vocab, g_entropy, g_logprob)
            tag = f"triton {dtype} rows={rows} width={width} vocab={vocab} block={block}"
            assert_close(entropy, ref_h, VALUE_RTOL, VALUE_ATOL, f"entropy [{tag}]")
            assert_close(logprob, ref_lp, VALUE_RTOL, VALUE_ATOL, f"logprob [{tag}]")
            assert_close(x.grad, ref_g, *_grad_tol(dtype), f"grad [{tag}]")

    # NaN and +inf poison their row only.
    logits = torch.randn(3, 5000)
    logits[1, 4999] = float("nan")
    logits[2, 3] = float("inf")
    h, _ = vocab_parallel_entropy_and_logprobs(logits, torch.zeros(3, dtype=torch.int64), backend="triton")
    assert torch.isfinite(h[0]) and torch.isnan(h[1]) and torch.isnan(h[2]), h
    # The self-check of the dispatcher accepts the interpreted kernel.
    assert dispatch.self_check(TritonBackend(), torch.device("cpu"))
    print("triton-interpret-ok")


def test_triton_kernels_under_the_interpreter():
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tests.test_entropy_triton"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and "triton-interpret-ok" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-5000:]


if __name__ == "__main__":
    _check_all()
