"""What the GPU tests run on: CUDA with the CUDA kernel, compiled Triton and NCCL; or, when rehearsing on a
CPU machine (``NEMO_ENTROPY_GPU_TESTS=cpu``, see tests/conftest.py), their stand-ins: the CPU build of the
same kernel code, the PyTorch reference and gloo. Test ids name the roles, messages the real backend."""

from __future__ import annotations

import os

from tests.conftest import GPU_TESTS_ENV

REHEARSAL = os.environ.get(GPU_TESTS_ENV, "").strip().lower() == "cpu"
DEVICE = "cpu" if REHEARSAL else "cuda"
DIST_BACKEND = "gloo" if REHEARSAL else "nccl"
# role -> backend name: the CUDA extension (kernels/entropy_cuda.cu) and the Triton kernel
BACKENDS = {"cuda_kernel": "cpu", "triton": "reference"} if REHEARSAL else {"cuda_kernel": "cuda", "triton": "triton"}
ROLES = tuple(BACKENDS)
