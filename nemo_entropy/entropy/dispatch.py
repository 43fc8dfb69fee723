"""Choosing the backend that computes per-shard statistics and gradients.

``backend="auto"`` picks, for CUDA tensors, the CUDA extension if it is built, else the Triton kernel
(if triton imports), else the reference; for CPU tensors, the CPU extension if it is built (or
``NEMO_ENTROPY_BUILD_KERNELS=1`` allows building it now), else the reference. It never starts a
compile silently. The choice is logged once per device.

On first use on a device, a compiled backend checks itself against the reference on a small random
input (including padding, masked logits and out-of-shard targets); on a mismatch it is dropped with a
warning and the reference is used instead. Explicitly named backends are built or loaded on demand
and raise if they cannot exist here.

When ``auto`` settles for less than a compiled extension that *could* be built here (sources and a
compiler present, just not built), it says so once per process (on the first local rank), with the exact
command that builds it: a silent 5x slowdown is the failure this guards against.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Dict, Optional, Tuple

import torch

from . import build
from .compiled import ExtensionBackend
from .reference import ReferenceBackend

logger = logging.getLogger("nemo_entropy.entropy")

BACKENDS = ("auto", "reference", "cpu", "cuda", "triton")
# Self-check tolerances: fp32 inputs, same math, different summation order.
SELF_CHECK_RTOL = 1e-4
SELF_CHECK_ATOL = 1e-5

_REFERENCE = ReferenceBackend()
_resolved: Dict[Tuple[str, str], object] = {}
_self_checked: Dict[Tuple[str, str], bool] = {}
# Device types ("cpu", "cuda") whose build advice was given; once per process, not reset with the cache.
_advised: set = set()


def _device_key(device: torch.device) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}"
    return device.type


def _make(name: str, device: torch.device, *, explicit: bool):
    """Instantiate backend ``name`` for ``device``; ``None`` if unavailable (raises when ``explicit``)."""
    if name == "reference":
        return _REFERENCE
    if name in ("cpu", "cuda"):  # the two builds of kernels/entropy_row.h
        if device.type != name:
            raise ValueError(f"backend={name!r} needs {name.upper()} tensors, got logits on {device}")
        loader = build.load_cpu_extension if name == "cpu" else build.load_cuda_extension
        module = loader(build_if_missing=explicit or build.build_requested_by_env())
        if module is None:
            return None
        return ExtensionBackend(name, module)
    if name == "triton":
        interpret = os.environ.get("TRITON_INTERPRET", "") == "1"
        if device.type != "cuda" and not interpret:
            if explicit:
                raise ValueError(
                    f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device}"
                )
            return None
        try:
            from .triton_kernels import TritonBackend
        except ImportError as err:
            if explicit:
                raise ImportError(f"backend='triton' needs triton: {err}") from err
            return None
        return TritonBackend()
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


def self_check(impl, device: torch.device) -> bool:
    """Compare ``impl`` with the reference on a small random shard on ``device``; True if they agree."""
    gen = torch.Generator().manual_seed(1234)
    rows, width, valid = 5, 1031, 1000  # odd width, padded tail, more than one vector per row
    logits = (torch.randn(rows, width, generator=gen) * 4).to(device)
    logits[1, 7] = float("-inf")
    logits[2, : width // 2] = float("-inf")
    local_targets = torch.tensor([3, 999, 600, -1, 0], dtype=torch.int64, device=device)
    grads = torch.randn(2, rows, generator=gen).to(device)
    try:
        ours = impl.shard_stats(logits, local_targets, valid)
        ref = _REFERENCE.shard_stats(logits, local_targets, valid)
        pairs = [
            (ours.local_max, ref.local_max),
            (ours.sum_exp, ref.sum_exp),
            (ours.sum_exp_shifted, ref.sum_exp_shifted),
            (ours.target_logit, ref.target_logit),
        ]
        log_sum = torch.log(ref.sum_exp)
        entropy = log_sum - ref.sum_exp_shifted / ref.sum_exp
        args = (ref.local_max.contiguous(), log_sum.contiguous(), entropy.contiguous(), grads[0].contiguous(),
                grads[1].contiguous())
        pairs.append(
            (
                impl.shard_grad(logits, local_targets, valid, *args),
                _REFERENCE.shard_grad(logits, local_targets, valid, *args),
            )
        )
        return all(torch.allclose(a, b, rtol=SELF_CHECK_RTOL, atol=SELF_CHECK_ATOL) for a, b in pairs)
    except Exception as err:  # a crashing kernel is a failed check, reported by the caller
        logger.warning("entropy backend %s raised during its self-check on %s: %r", impl.name, device, err)
        return False


def _checked(impl, device: torch.device):
    if impl is _REFERENCE:
        return impl
    key = (impl.name, _device_key(device))
    if key not in _self_checked:
        _self_checked[key] = self_check(impl, device)
        if not _self_checked[key]:
            warnings.warn(
                f"nemo_entropy: the {impl.name} entropy backend disagrees with the PyTorch reference on "
                f"{key[1]}; falling back to the reference backend",
                RuntimeWarning,
                stacklevel=4,
            )
    return impl if _self_checked[key] else _REFERENCE


def resolve_backend(name: str, device: torch.device):
    """The backend object for a requested name and the device of the logits (cached per device)."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    device = torch.device(device)
    key = (name, _device_key(device))
    if key in _resolved:
        return _resolved[key]
    if name == "auto":
        order = ("cuda", "triton") if device.type == "cuda" else ("cpu",) if device.type == "cpu" else ()
        impl = _REFERENCE
        for candidate in order:
            made = _make(candidate, device, explicit=False)
            if made is not None:
                impl = _checked(made, device)
                if impl is not _REFERENCE:
                    break
        if impl.name in ("cpu", "cuda"):
            origin = build.extension_origin(build.CPU_MODULE if impl.name == "cpu" else build.CUDA_MODULE)
            reason = "compiled backend, self-check passed" + (f"; {origin[0]}: {origin[1]}" if origin else "")
        else:
            reason = _advise_build(device, impl.name) or "no compiled backend available"
        logger.info("nemo_entropy: entropy backend for %s: %s (%s)", key[1], impl.name, reason)
    else:
        made = _make(name, device, explicit=True)
        impl = _checked(made, device)
    _resolved[key] = impl
    return impl


def _advise_build(device: torch.device, used: str) -> Optional[str]:
    """Why ``auto`` did not get the compiled extension for ``device``; warns once if it could be built.

    ``used`` is the backend ``auto`` settled for. Returns the reason for the backend log line, or ``None``
    when no extension applies to the device.
    """
    if device.type == "cpu":
        module, unavailable = build.CPU_MODULE, build.cpu_build_unavailable_reason
        loaded = build.load_cpu_extension(build_if_missing=False)
    elif device.type == "cuda":
        module, unavailable = build.CUDA_MODULE, build.cuda_build_unavailable_reason
        loaded = build.load_cuda_extension(build_if_missing=False)
    else:
        return None
    if loaded is not None:
        return f"{module} failed its self-check"
    reason = unavailable()
    if reason is not None:
        return f"{module} cannot be built here: {reason}"
    command = build.build_command()
    if device.type not in _advised and os.environ.get("LOCAL_RANK", "0") in ("", "0"):
        _advised.add(device.type)
        slower = " (10-20x slower for forward + backward, docs/kernels.md)" if used == "reference" and device.type == "cpu" else ""
        logger.warning(
            "nemo_entropy: the compiled %s entropy kernel is not built, so %s tensors use the %s backend%s. "
            "Build it once (about a minute) with:\n    %s\nor set %s=1 to build it on first use.",
            device.type.upper(), device.type.upper(), used, slower, command, build.BUILD_ENV,
        )
    return f"{module} not built (build it with: {command})"


def reset_backend_cache() -> None:
    """Forget resolved backends and self-check results (tests, or after building the extensions)."""
    _resolved.clear()
    _self_checked.clear()
