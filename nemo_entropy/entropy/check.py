"""``nemo-entropy check-kernels``: which entropy backend ``auto`` uses here, and whether it is right.

Resolves ``backend="auto"`` for a device exactly as the losses and the local engine do (including the
dispatcher's self-check against the PyTorch reference), reports where the compiled extension was loaded
from (``prebuilt`` at install time, or the kernel ``cache``), then runs it on shards with the traps of real
vocabularies (odd widths, Megatron's padded tail, masked logits) in float32, bfloat16 and float16 and
compares entropy, log-prob and the gradient with the float64 oracle under the tolerances the test suite
states (:mod:`nemo_entropy.entropy.oracle`).

Exit status 0 when every comparison holds and the ``--require`` conditions are met, 1 otherwise. Meant for
an installed package (CI runs it in a fresh virtual environment built from the wheel) and for a new
machine or container before a long run.
"""

from __future__ import annotations

import argparse
import logging
import platform
import sys
from typing import Optional, Sequence

import torch

from . import build, dispatch
from .oracle import GRAD_TOL, VALUE_ATOL, VALUE_RTOL, assert_close, oracle
from .vocab_parallel import vocab_parallel_entropy_and_logprobs

# (rows, padded width, vocab_size, masked): an odd prime width with a padded tail, and a row layout that
# puts whole leading blocks at -inf (the running max starts at -inf).
CASES = ((64, 4099, 4096, True), (8, 19008, 19008, False))
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _case(rows: int, width: int, vocab_size: int, masked: bool, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, width, generator=gen) * 3
    logits[:, vocab_size:] = 30.0  # padding that would dominate if it were counted
    if masked:
        logits[0, : width // 2] = float("-inf")
        logits[1, ::3] = float("-inf")
    targets = torch.randint(0, vocab_size, (rows,), generator=gen)
    g_entropy, g_logprob = torch.randn(rows, generator=gen), torch.randn(rows, generator=gen)
    return logits.to(dtype), targets, g_entropy, g_logprob


def check_against_float64(backend: str, device: torch.device) -> list[str]:
    """Run ``backend`` on every case and dtype; returns one line per comparison. Raises AssertionError."""
    lines = []
    for index, (rows, width, vocab_size, masked) in enumerate(CASES):
        for dtype in DTYPES:
            logits, targets, g_entropy, g_logprob = _case(rows, width, vocab_size, masked, dtype, seed=index)
            x = logits.to(device, copy=True).requires_grad_(True)
            entropy, logprob = vocab_parallel_entropy_and_logprobs(
                x, targets.to(device), vocab_size=vocab_size, backend=backend
            )
            (entropy * g_entropy.to(device) + logprob * g_logprob.to(device)).sum().backward()
            ref_h, ref_lp, ref_g = oracle(logits, targets, vocab_size, g_entropy, g_logprob)
            tag = f"{backend} {str(dtype).replace('torch.', '')} {rows}x{width} (vocab {vocab_size})"
            assert_close(entropy.cpu(), ref_h, VALUE_RTOL, VALUE_ATOL, f"entropy [{tag}]")
            assert_close(logprob.cpu(), ref_lp, VALUE_RTOL, VALUE_ATOL, f"logprob [{tag}]")
            assert_close(x.grad.cpu(), ref_g, *GRAD_TOL[dtype], f"grad [{tag}]")
            worst = max((entropy.cpu().double() - ref_h).abs().max().item(),
                        (logprob.cpu().double() - ref_lp).abs().max().item())
            lines.append(f"{tag}: entropy, log-prob and gradient within the stated tolerances "
                         f"(max value error {worst:.1e})")
    return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry of ``nemo-entropy check-kernels``; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="nemo-entropy check-kernels",
        description="Report the entropy backend that backend='auto' uses on a device and check it against "
        "float64 (entropy, log-prob, gradient; fp32/bf16/fp16; padded and masked vocabularies).",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="device to check (default: cuda if torch sees a GPU, else cpu)")
    parser.add_argument("--require", choices=dispatch.BACKENDS[1:], default=None,
                        help="fail unless backend='auto' resolves to this backend (e.g. cpu: the compiled kernel)")
    parser.add_argument("--require-origin", choices=("prebuilt", "cache"), default=None,
                        help="fail unless the compiled extension was loaded from here (prebuilt at install time, "
                        "or the kernel cache of nemo-entropy build-kernels)")
    args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    # The dispatcher's own log line (which backend, and why) is the first thing to read on a failure.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("nemo_entropy.entropy").setLevel(logging.INFO)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    print(f"check-kernels: torch {torch.__version__} (CUDA {torch.version.cuda}), Python {platform.python_version()}, "
          f"kernel sources {build.kernel_source_dir()}, kernel cache {build.cache_root()}")
    impl = dispatch.resolve_backend("auto", device)
    module = {"cpu": build.CPU_MODULE, "cuda": build.CUDA_MODULE}.get(impl.name)
    origin = build.extension_origin(module) if module else None
    where = f" ({origin[0]}: {origin[1]})" if origin else ""
    print(f"check-kernels: backend='auto' on {device.type} -> {impl.name}{where}")

    status = 0
    try:
        for line in check_against_float64(impl.name, device):
            print(f"check-kernels: {line}")
    except AssertionError as err:
        print(f"check-kernels: FAILED against float64: {err}", file=sys.stderr)
        status = 1
    if args.require and impl.name != args.require:
        print(f"check-kernels: FAILED: --require {args.require}, but backend='auto' uses {impl.name} "
              f"(the log line above says why)", file=sys.stderr)
        status = 1
    if args.require_origin and (origin is None or origin[0] != args.require_origin):
        got = origin[0] if origin else "no compiled extension"
        print(f"check-kernels: FAILED: --require-origin {args.require_origin}, got {got}", file=sys.stderr)
        status = 1
    print(f"check-kernels: {'OK' if status == 0 else 'FAILED'}")
    return status


if __name__ == "__main__":
    sys.exit(main())
