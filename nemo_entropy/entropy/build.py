"""Building and loading the compiled entropy kernels, and the ``nemo-entropy build-kernels`` command.

Two torch extensions are built from ``kernels/`` with ``torch.utils.cpp_extension`` (ninja, no build
isolation, so the installed torch is the one compiled against):

* ``nemo_entropy_cpu_kernels`` from ``entropy_cpu.cpp`` (any machine with a C++ compiler);
* ``nemo_entropy_cuda_kernels`` from ``entropy_cuda.cu`` + ``entropy_cuda_binding.cpp`` for sm_80 and sm_90
  (needs a CUDA torch and a CUDA toolkit; a CPU torch cannot link it, see :func:`nvcc_compile_check`).

Each build lands in a cache directory named by a hash of the sources, the flags, torch, Python and (for
the CPU build, compiled with ``-march=native``) the host CPU, so later imports load the built module
without a compiler, and a source change or another machine gets a fresh build. The cache is
``$NEMO_ENTROPY_KERNEL_CACHE`` if set, else ``build/kernels`` in a source checkout, else
``~/.cache/nemo_entropy/kernels``.

Nothing here runs at import time of :mod:`nemo_entropy.entropy`: the ``auto`` backend only *loads* a
build that already exists (or builds when ``NEMO_ENTROPY_BUILD_KERNELS=1``), never compiles silently.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import importlib.util
import logging
import os
import platform
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Optional, Sequence

import torch

logger = logging.getLogger("nemo_entropy.entropy")

CPU_MODULE = "nemo_entropy_cpu_kernels"
CUDA_MODULE = "nemo_entropy_cuda_kernels"
CPU_SOURCES = ("entropy_cpu.cpp",)
CUDA_SOURCES = ("entropy_cuda_binding.cpp", "entropy_cuda.cu")
HEADERS = ("entropy_row.h",)
CPU_CFLAGS = ("-O3", "-march=native")
CUDA_ARCHS = ("80", "90")
CUDA_CFLAGS = ("-O3",) + tuple(
    f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS
)
BUILD_ENV = "NEMO_ENTROPY_BUILD_KERNELS"

_loaded: dict[str, Optional[ModuleType]] = {}


def kernel_source_dir() -> Path:
    """The ``kernels/`` directory of the source checkout this package was installed from."""
    return Path(__file__).resolve().parents[2] / "kernels"


def cache_root() -> Path:
    """Where built extensions are kept (see the module docstring)."""
    env = os.environ.get("NEMO_ENTROPY_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    repo = kernel_source_dir().parent
    if (repo / "pyproject.toml").is_file() and os.access(repo, os.W_OK):
        return repo / "build" / "kernels"
    return Path.home() / ".cache" / "nemo_entropy" / "kernels"


def _host_cpu() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build_dir(module: str, sources: Sequence[str], flags: Sequence[str]) -> Path:
    digest = hashlib.sha256()
    src_dir = kernel_source_dir()
    for name in tuple(sources) + HEADERS:
        digest.update(name.encode())
        digest.update((src_dir / name).read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(f"{torch.__version__}|{sys.version_info[:2]}|{platform.machine()}".encode())
    if module == CPU_MODULE:
        digest.update(_host_cpu().encode())
    return cache_root() / f"{module}-{digest.hexdigest()[:16]}"


def _import_built(module: str, build_dir: Path) -> Optional[ModuleType]:
    suffix = importlib.machinery.EXTENSION_SUFFIXES
    candidates = [build_dir / f"{module}.so"] + [build_dir / f"{module}{s}" for s in suffix]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return None
    spec = importlib.util.spec_from_file_location(module, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _sources_present(sources: Sequence[str]) -> bool:
    return all((kernel_source_dir() / s).is_file() for s in tuple(sources) + HEADERS)


def load_cpu_extension(build_if_missing: bool = False, verbose: bool = False) -> Optional[ModuleType]:
    """The CPU extension module, or ``None`` if it is not built (and ``build_if_missing`` is false).

    Raises whatever the compiler raises when a build is requested and fails.
    """
    if CPU_MODULE in _loaded and (_loaded[CPU_MODULE] is not None or not build_if_missing):
        return _loaded[CPU_MODULE]
    if not _sources_present(CPU_SOURCES):
        _loaded[CPU_MODULE] = None
        if build_if_missing:
            raise FileNotFoundError(
                f"kernel sources not found in {kernel_source_dir()}: the compiled kernels need a source "
                f"checkout (pip install -e .)"
            )
        return None
    build_dir = _build_dir(CPU_MODULE, CPU_SOURCES, CPU_CFLAGS)
    mod = _import_built(CPU_MODULE, build_dir)
    if mod is None and build_if_missing:
        mod = _build(CPU_MODULE, CPU_SOURCES, build_dir, extra_cflags=list(CPU_CFLAGS), verbose=verbose)
    _loaded[CPU_MODULE] = mod
    return mod


def load_cuda_extension(build_if_missing: bool = False, verbose: bool = False) -> Optional[ModuleType]:
    """The CUDA extension module, or ``None`` if it is not built or cannot be (CPU torch, no toolkit)."""
    if CUDA_MODULE in _loaded and (_loaded[CUDA_MODULE] is not None or not build_if_missing):
        return _loaded[CUDA_MODULE]
    reason = cuda_build_unavailable_reason()
    if reason is not None:
        _loaded[CUDA_MODULE] = None
        if build_if_missing:
            raise RuntimeError(f"cannot build the CUDA extension: {reason}")
        return None
    build_dir = _build_dir(CUDA_MODULE, CUDA_SOURCES, CUDA_CFLAGS)
    mod = _import_built(CUDA_MODULE, build_dir)
    if mod is None and build_if_missing:
        mod = _build(CUDA_MODULE, CUDA_SOURCES, build_dir, extra_cuda_cflags=list(CUDA_CFLAGS),
                     extra_cflags=["-O3"], verbose=verbose)
    _loaded[CUDA_MODULE] = mod
    return mod


def cuda_build_unavailable_reason() -> Optional[str]:
    """Why the CUDA extension cannot be built here, or ``None`` if it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU build (it has no c10_cuda to link against)"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME or put nvcc on PATH)"
    if not _sources_present(CUDA_SOURCES):
        return f"kernel sources not found in {kernel_source_dir()}"
    return None


def _build(module: str, sources: Sequence[str], build_dir: Path, *, verbose: bool, **flags) -> ModuleType:
    from torch.utils.cpp_extension import load

    build_dir.mkdir(parents=True, exist_ok=True)
    src_dir = kernel_source_dir()
    logger.warning("building %s in %s (this takes about a minute)", module, build_dir)
    started = time.perf_counter()
    env_arch = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if module == CUDA_MODULE:
        # The -gencode flags name the targets; an inherited arch list would add others.
        os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a[0]}.{a[1]}" for a in CUDA_ARCHS)
    try:
        mod = load(
            name=module,
            sources=[str(src_dir / s) for s in sources],
            extra_include_paths=[str(src_dir)],
            build_directory=str(build_dir),
            verbose=verbose,
            **flags,
        )
    finally:
        if module == CUDA_MODULE:
            if env_arch is None:
                os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
            else:
                os.environ["TORCH_CUDA_ARCH_LIST"] = env_arch
    logger.warning("built %s in %.0f s", module, time.perf_counter() - started)
    return mod


def build_requested_by_env() -> bool:
    """Whether ``NEMO_ENTROPY_BUILD_KERNELS=1`` allows the auto backend to compile on first use."""
    return os.environ.get(BUILD_ENV, "").strip().lower() in ("1", "true", "yes")


def nvcc_path() -> Optional[str]:
    """The ``nvcc`` on PATH (or in ``$CUDA_HOME/bin``), if any."""
    found = shutil.which("nvcc")
    if found:
        return found
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and (Path(home) / "bin" / "nvcc").is_file():
        return str(Path(home) / "bin" / "nvcc")
    return None


def cuda_toolkit_root() -> Optional[Path]:
    """The CUDA toolkit directory (with ``include/cuda_runtime_api.h``), if one can be found."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = nvcc_path()
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_runtime_api.h").is_file():
            return Path(root)
    return None


def nvcc_compile_check(out_dir: Optional[Path] = None, archs: Sequence[str] = CUDA_ARCHS) -> list[Path]:
    """Compile every ``kernels/*.cu`` with ``nvcc -c`` for ``archs`` against torch's headers.

    Compile only: a CPU torch has no CUDA libraries to link an extension against, but this proves the
    device code builds for every target. One nvcc call per ``.cu`` file (all architectures at once).
    Returns the object files; raises ``RuntimeError`` with nvcc's output on failure and
    ``FileNotFoundError`` when there is no nvcc.
    """
    nvcc = nvcc_path()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found on PATH or in $CUDA_HOME/bin")
    from torch.utils.cpp_extension import include_paths

    src_dir = kernel_source_dir()
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="nemo_entropy_nvcc_"))
    out.mkdir(parents=True, exist_ok=True)
    includes = [str(src_dir), *include_paths(), sysconfig.get_paths()["include"]]
    objects = []
    for cu in sorted(src_dir.glob("*.cu")):
        obj = out / (cu.stem + ".o")
        cmd = [nvcc, "-c", str(cu), "-o", str(obj), "-std=c++17", "-O3", "-Xcompiler", "-fPIC"]
        cmd += [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
        cmd += [f"-I{p}" for p in includes]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on {cu.name}:\n$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
        objects.append(obj)
    return objects


def main(argv: Sequence[str]) -> int:
    """``nemo-entropy build-kernels``: build the CPU extension (and the CUDA one where possible)."""
    parser = argparse.ArgumentParser(
        prog="nemo-entropy build-kernels",
        description="Build the compiled entropy kernels (CPU extension; CUDA extension with a CUDA torch and "
        "toolkit) into the kernel cache, so that backend='auto' uses them.",
    )
    parser.add_argument("--quiet", action="store_true", help="print only failures and one summary line")
    parser.add_argument("--cpu-only", action="store_true", help="do not try the CUDA extension")
    parser.add_argument("--nvcc-check", action="store_true",
                        help="also compile kernels/*.cu with nvcc -c for sm_80 and sm_90 (compile only)")
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    status = 0

    try:
        started = time.perf_counter()
        mod = load_cpu_extension(build_if_missing=True, verbose=not args.quiet)
        print(f"build-kernels: CPU extension ready ({mod.__file__}, {time.perf_counter() - started:.0f} s)")
    except Exception as err:  # the compiler's error is the message the user needs
        print(f"build-kernels: CPU extension NOT built: {type(err).__name__}: {err}\n"
              f"  (needs a C++ compiler and ninja; the package falls back to the PyTorch reference)",
              file=sys.stderr)
        status = 1

    if not args.cpu_only:
        reason = cuda_build_unavailable_reason()
        if reason is None:
            try:
                mod = load_cuda_extension(build_if_missing=True, verbose=not args.quiet)
                print(f"build-kernels: CUDA extension ready ({mod.__file__})")
            except Exception as err:
                print(f"build-kernels: CUDA extension NOT built: {type(err).__name__}: {err}", file=sys.stderr)
                status = 1
        elif not args.quiet:
            print(f"build-kernels: CUDA extension skipped: {reason}")

    if args.nvcc_check:
        try:
            objs = nvcc_compile_check()
            print(f"build-kernels: nvcc compiled {len(objs)} .cu file(s) for sm_{', sm_'.join(CUDA_ARCHS)}")
        except FileNotFoundError as err:
            print(f"build-kernels: nvcc check skipped: {err}")
        except RuntimeError as err:
            print(f"build-kernels: {err}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
