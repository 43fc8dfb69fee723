"""Collection rules shared by the whole suite.

``tests/gpu/`` holds the tests that need a CUDA GPU (marker ``cuda``). They are not even collected unless
torch sees a GPU, so the CPU run has nothing to skip. ``NEMO_ENTROPY_GPU_TESTS`` overrides the detection:

* ``1``: collect (and run) them as on a GPU machine, e.g. ``pytest --collect-only tests/gpu`` on a CPU
  machine to check that they import and parametrize;
* ``cpu``: rehearse them on the CPU: the same tests and oracle comparisons, with the CPU kernel standing in
  for the CUDA kernel, the PyTorch reference for Triton and gloo for NCCL (``benchmarks/gpu_check.sh
  --dry-run`` does this, so the GPU tests' own logic is exercised before they ever meet a GPU);
* ``0``: never collect them.

``tests/nemo_rl_real/`` runs NeMo-RL's own code from a checkout (``make test-nemo-rl NEMO_RL_ROOT=<checkout>``). CI
has no checkout, so without ``NEMO_RL_ROOT`` that folder is not collected at all (not skipped).
"""

from __future__ import annotations

import os

GPU_TESTS_ENV = "NEMO_ENTROPY_GPU_TESTS"


def _collect_gpu_tests() -> bool:
    mode = os.environ.get(GPU_TESTS_ENV, "").strip().lower()
    if mode in ("1", "cpu"):
        return True
    if mode == "0":
        return False
    if mode:
        raise ValueError(f"{GPU_TESTS_ENV} must be 1, cpu, 0 or unset, got {mode!r}")
    import torch

    return torch.cuda.is_available()


collect_ignore = [] if _collect_gpu_tests() else ["gpu"]
if not os.environ.get("NEMO_RL_ROOT"):
    collect_ignore.append("nemo_rl_real")
