"""Building and loading the compiled entropy kernels, and the ``nemo-entropy build-kernels`` command.

Two torch extensions are built from the kernel sources (``kernels/`` of the repository, shipped in the
package as ``nemo_entropy/kernels/``) with ``torch.utils.cpp_extension`` and the installed torch (no build
isolation, so the torch that runs is the one compiled against):

* ``nemo_entropy_cpu_kernels`` from ``entropy_cpu.cpp`` (any machine with a C++ compiler);
* ``nemo_entropy_cuda_kernels`` from ``entropy_cuda.cu`` + ``entropy_cuda_binding.cpp`` for sm_80 and sm_90
  with sm_90 PTX for newer GPUs (needs a CUDA torch and a CUDA toolkit; a CPU torch cannot link it, see
  :func:`nvcc_compile_check`).

An extension is identified by a digest of its sources, the flags, torch, Python and (for the CPU build,
compiled with ``-march=native``) the host CPU. It is looked for in two places, in order:

1. **prebuilt**: built at install time by ``setup.py`` (``pip install --no-build-isolation .``) next to
   this module, listed in ``prebuilt_kernels.json`` with its digest; used only if the digest still matches
   (same torch, same CPU, same sources), so a torch upgrade or another machine never loads a stale build;
2. **the kernel cache**: ``$NEMO_ENTROPY_KERNEL_CACHE`` if set, else ``build/kernels`` in a source
   checkout, else ``~/.cache/nemo_entropy/kernels``, one folder per digest, filled by
   ``nemo-entropy build-kernels`` (just in time, from the kernel sources of the installed package).

Nothing here runs at import time of :mod:`nemo_entropy.entropy`: the ``auto`` backend only *loads* a
build that already exists (or builds when ``NEMO_ENTROPY_BUILD_KERNELS=1``), never compiles silently.
This module imports nothing of the package, so ``setup.py`` loads it by path to compute the same digests.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import importlib.util
import json
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
# SASS for each target, plus PTX of the newest one so that later GPUs (sm_100, sm_120) JIT-compile it
# instead of failing with "no kernel image is available".
CUDA_PTX_ARCH = CUDA_ARCHS[-1]
CUDA_CFLAGS = ("-O3",) + tuple(f"-gencode=arch=compute_{a},code=sm_{a}" for a in CUDA_ARCHS) + (
    f"-gencode=arch=compute_{CUDA_PTX_ARCH},code=compute_{CUDA_PTX_ARCH}",
)
# module -> (sources, flags for the digest)
MODULES = {CPU_MODULE: (CPU_SOURCES, CPU_CFLAGS), CUDA_MODULE: (CUDA_SOURCES, CUDA_CFLAGS)}
BUILD_ENV = "NEMO_ENTROPY_BUILD_KERNELS"
CACHE_ENV = "NEMO_ENTROPY_KERNEL_CACHE"
# Written by setup.py next to the extensions it builds at install time: {module: {"file", "digest", ...}}.
PREBUILT_MANIFEST = "prebuilt_kernels.json"
BUILD_COMMAND_ARGS = ("-m", "nemo_entropy.cli", "build-kernels")

_loaded: dict[str, Optional[ModuleType]] = {}
# module -> where the loaded extension came from ("prebuilt" or "cache") and its file
_origin: dict[str, tuple[str, str]] = {}


def _package_kernel_dir() -> Path:
    """``nemo_entropy/kernels``: where an installed (non-editable) package keeps the kernel sources."""
    return Path(__file__).resolve().parents[1] / "kernels"


def _checkout_kernel_dir() -> Path:
    """``kernels/`` at the top of the source checkout (editable installs, running from the repository)."""
    return Path(__file__).resolve().parents[2] / "kernels"


def kernel_source_dir() -> Path:
    """The kernel sources: the installed package's ``nemo_entropy/kernels`` if present, else the checkout's."""
    packaged = _package_kernel_dir()
    return packaged if (packaged / HEADERS[0]).is_file() else _checkout_kernel_dir()


def cache_root() -> Path:
    """Where just-in-time builds are kept (see the module docstring)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    src = kernel_source_dir()
    repo = src.parent
    if src == _checkout_kernel_dir() and (repo / "pyproject.toml").is_file() and os.access(repo, os.W_OK):
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


def build_digest(module: str, source_dir: Optional[Path] = None) -> str:
    """Hex digest naming one build of ``module``: sources, flags, torch, Python, machine (and host CPU)."""
    sources, flags = MODULES[module]
    digest = hashlib.sha256()
    src_dir = kernel_source_dir() if source_dir is None else Path(source_dir)
    for name in tuple(sources) + HEADERS:
        digest.update(name.encode())
        digest.update((src_dir / name).read_bytes())
    digest.update(" ".join(flags).encode())
    digest.update(f"{torch.__version__}|{sys.version_info[:2]}|{platform.machine()}".encode())
    if module == CPU_MODULE:
        digest.update(_host_cpu().encode())
    return digest.hexdigest()


def _build_dir(module: str) -> Path:
    return cache_root() / f"{module}-{build_digest(module)[:16]}"


def _import_file(module: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(module, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _import_built(module: str, build_dir: Path) -> Optional[ModuleType]:
    suffix = importlib.machinery.EXTENSION_SUFFIXES
    candidates = [build_dir / f"{module}.so"] + [build_dir / f"{module}{s}" for s in suffix]
    path = next((p for p in candidates if p.is_file()), None)
    if path is None:
        return None
    mod = _import_file(module, path)
    _origin[module] = ("cache", str(path))
    return mod


def prebuilt_dir() -> Path:
    """Where setup.py puts the extensions it builds at install time (this module's folder)."""
    return Path(__file__).resolve().parent


def read_prebuilt_manifest() -> dict:
    """The install-time build manifest (``{}`` when the package was installed without prebuilt kernels)."""
    path = prebuilt_dir() / PREBUILT_MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _import_prebuilt(module: str) -> Optional[ModuleType]:
    """The extension built at install time, if there is one and it was built for this torch, CPU and sources."""
    entry = read_prebuilt_manifest().get(module)
    if not entry:
        return None
    path = prebuilt_dir() / entry.get("file", "")
    if not path.is_file():
        return None
    if entry.get("digest") != build_digest(module):
        # Another torch, Python or CPU than at install time: loading it could crash (ABI) or, built with
        # -march=native, hit an illegal instruction. The kernel cache (or the reference) serves instead.
        logger.info("nemo_entropy: ignoring the prebuilt %s (built for torch %s; this is torch %s, or another "
                    "CPU or sources)", module, entry.get("torch"), torch.__version__)
        return None
    try:
        mod = _import_file(module, path)
    except ImportError as err:
        logger.warning("nemo_entropy: the prebuilt %s does not load (%s); using the kernel cache", module, err)
        return None
    _origin[module] = ("prebuilt", str(path))
    return mod


def extension_origin(module: str) -> Optional[tuple[str, str]]:
    """``("prebuilt" | "cache", file)`` of a loaded extension, ``None`` if it is not loaded."""
    return _origin.get(module) if _loaded.get(module) is not None else None


def _sources_present(sources: Sequence[str]) -> bool:
    return all((kernel_source_dir() / s).is_file() for s in tuple(sources) + HEADERS)


def _find_or_build(module: str, build_if_missing: bool, verbose: bool, unavailable, **flags) -> Optional[ModuleType]:
    mod = _import_prebuilt(module) or _import_built(module, _build_dir(module))
    if mod is None and build_if_missing:
        reason = unavailable()
        if reason is not None:
            raise RuntimeError(f"cannot build {module}: {reason}")
        mod = _build(module, MODULES[module][0], _build_dir(module), verbose=verbose, **flags)
        _origin[module] = ("cache", str(getattr(mod, "__file__", _build_dir(module))))
    _loaded[module] = mod
    return mod


def load_cpu_extension(build_if_missing: bool = False, verbose: bool = False) -> Optional[ModuleType]:
    """The CPU extension module, or ``None`` if it is not built (and ``build_if_missing`` is false).

    Raises ``FileNotFoundError`` without kernel sources, ``RuntimeError`` without a compiler, and whatever
    the compiler raises when a requested build fails.
    """
    if CPU_MODULE in _loaded and (_loaded[CPU_MODULE] is not None or not build_if_missing):
        return _loaded[CPU_MODULE]
    if not _sources_present(CPU_SOURCES):
        _loaded[CPU_MODULE] = None
        if build_if_missing:
            raise FileNotFoundError(
                f"kernel sources not found in {_checkout_kernel_dir()} nor in {_package_kernel_dir()}: "
                f"reinstall nemo-entropy (the package ships them as package data)"
            )
        return None
    return _find_or_build(CPU_MODULE, build_if_missing, verbose, cpu_build_unavailable_reason,
                          extra_cflags=list(CPU_CFLAGS))


def load_cuda_extension(build_if_missing: bool = False, verbose: bool = False) -> Optional[ModuleType]:
    """The CUDA extension module, or ``None`` if it is not built or cannot be (CPU torch, no toolkit).

    Loading a build needs a CUDA torch only; building it also needs the CUDA toolkit (``RuntimeError``).
    """
    if CUDA_MODULE in _loaded and (_loaded[CUDA_MODULE] is not None or not build_if_missing):
        return _loaded[CUDA_MODULE]
    if torch.version.cuda is None or not _sources_present(CUDA_SOURCES):
        _loaded[CUDA_MODULE] = None
        if build_if_missing:
            raise RuntimeError(f"cannot build {CUDA_MODULE}: {cuda_build_unavailable_reason()}")
        return None
    return _find_or_build(CUDA_MODULE, build_if_missing, verbose, cuda_build_unavailable_reason,
                          extra_cuda_cflags=list(CUDA_CFLAGS), extra_cflags=["-O3"])


def cpu_build_unavailable_reason() -> Optional[str]:
    """Why the CPU extension cannot be built here, or ``None`` if it can (sources and a C++ compiler)."""
    if not _sources_present(CPU_SOURCES):
        return f"kernel sources not found in {kernel_source_dir()}"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler!r} is not on PATH; set CXX)"
    return None


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


def ninja_available() -> bool:
    """Whether ninja runs (``torch.utils.cpp_extension.load`` needs it for just-in-time builds)."""
    try:
        subprocess.run(["ninja", "--version"], capture_output=True, check=True)
        return True
    except (OSError, subprocess.CalledProcessError):
        return False


def build_command() -> str:
    """The exact shell command that builds the kernels for this Python (and installs ninja if missing)."""
    python = sys.executable or "python"
    command = " ".join([python, *BUILD_COMMAND_ARGS])
    if not ninja_available():
        command = f"{python} -m pip install ninja && {command}"
    return command


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
    """Compile every ``kernels/*.cu`` with ``nvcc -c`` for ``archs`` (plus PTX of the last) against torch's headers.

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
        cmd.append(f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}")
        cmd += [f"-I{p}" for p in includes]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"nvcc failed on {cu.name}:\n$ {' '.join(cmd)}\n{proc.stdout}{proc.stderr}")
        objects.append(obj)
    return objects


def _describe(module: str, mod: ModuleType) -> str:
    kind, path = _origin.get(module, ("cache", getattr(mod, "__file__", "?")))
    return f"{'prebuilt at install' if kind == 'prebuilt' else 'kernel cache'}: {path}"


def main(argv: Sequence[str]) -> int:
    """``nemo-entropy build-kernels``: build the CPU extension (and the CUDA one where possible)."""
    parser = argparse.ArgumentParser(
        prog="nemo-entropy build-kernels",
        description="Build the compiled entropy kernels (CPU extension; CUDA extension with a CUDA torch and "
        "toolkit) from the kernel sources of this package into the kernel cache, so that backend='auto' uses "
        "them. An extension already built for this torch, Python and CPU (at install time or earlier) is reused.",
    )
    parser.add_argument("--quiet", action="store_true", help="print only failures and one summary line")
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--cpu-only", action="store_true", help="do not try the CUDA extension")
    only.add_argument("--cuda-only", action="store_true",
                      help="build only the CUDA extension (an error if it cannot be built here)")
    parser.add_argument("--nvcc-check", action="store_true",
                        help="also compile kernels/*.cu with nvcc -c for sm_80 and sm_90 (compile only)")
    args = parser.parse_args(list(argv))
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(message)s")
    status = 0

    if not args.cuda_only:
        try:
            started = time.perf_counter()
            mod = load_cpu_extension(build_if_missing=True, verbose=not args.quiet)
            print(f"build-kernels: CPU extension ready ({_describe(CPU_MODULE, mod)}; "
                  f"{time.perf_counter() - started:.0f} s)")
        except Exception as err:  # the compiler's error is the message the user needs
            print(f"build-kernels: CPU extension NOT built: {type(err).__name__}: {err}\n"
                  f"  (needs a C++ compiler and ninja; the package falls back to the PyTorch reference)",
                  file=sys.stderr)
            status = 1

    if not args.cpu_only:
        reason = cuda_build_unavailable_reason()
        if reason is None or args.cuda_only:
            try:
                started = time.perf_counter()
                mod = load_cuda_extension(build_if_missing=True, verbose=not args.quiet)
                print(f"build-kernels: CUDA extension ready ({_describe(CUDA_MODULE, mod)}; "
                      f"{time.perf_counter() - started:.0f} s)")
            except Exception as err:
                print(f"build-kernels: CUDA extension NOT built: {type(err).__name__}: {err}", file=sys.stderr)
                status = 1
        elif not args.quiet:
            print(f"build-kernels: CUDA extension skipped: {reason}")

    if args.nvcc_check:
        try:
            objs = nvcc_compile_check()
            print(f"build-kernels: nvcc compiled {len(objs)} .cu file(s) for sm_{', sm_'.join(CUDA_ARCHS)} "
                  f"(+ compute_{CUDA_PTX_ARCH} PTX)")
        except FileNotFoundError as err:
            print(f"build-kernels: nvcc check skipped: {err}")
        except RuntimeError as err:
            print(f"build-kernels: {err}", file=sys.stderr)
            status = 1
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
