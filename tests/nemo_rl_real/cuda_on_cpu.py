"""Stub: NeMo-RL's CUDA-only calls, redirected to the CPU.

NeMo-RL's DTensor worker path hard-codes the GPU: ``input_ids.cuda()`` (``automodel/data.py::process_microbatch``),
``torch.tensor(..., device="cuda")`` / ``.cuda()`` before its all-reduces (``get_microbatch_iterator``,
``process_global_batch``, ``aggregate_training_statistics``), ``data.to("cuda")`` in the worker, and
``torch.cuda.get_device_name()`` in ``aggregate_training_statistics``. This machine has no GPU, so inside
:func:`cuda_on_cpu` every such request is served by the CPU: a ``TorchFunctionMode`` rewrites a CUDA device
argument of any torch call (factories, ``Tensor.to``) to ``cpu`` and makes ``Tensor.cuda()`` the identity;
``torch.cuda.get_device_name`` answers ``"cpu"``. Nothing else changes: the values are the same tensors the
GPU path would hold. Listed in docs/nemo_rl.md ("The real-NeMo-RL harness").
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["cuda_on_cpu", "CudaToCpuMode"]

_CPU = torch.device("cpu")


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.split(":")[0] == "cuda"
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare ordinal means a CUDA device in torch's API
    return False


class CudaToCpuMode(TorchFunctionMode):
    """Serves every CUDA device request of a torch call from the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU, *args[2:])
        return func(*args, **kwargs)


@contextlib.contextmanager
def cuda_on_cpu() -> Iterator[None]:
    """Run NeMo-RL code that asks for CUDA on the CPU (see the module doc)."""
    saved = torch.cuda.get_device_name
    torch.cuda.get_device_name = lambda *args, **kwargs: "cpu"  # type: ignore[assignment]
    try:
        with CudaToCpuMode():
            yield
    finally:
        torch.cuda.get_device_name = saved  # type: ignore[assignment]
