"""Package layout and the optional install-time build of the entropy kernels (metadata: pyproject.toml).

Layout: the kernel sources stay in the top-level ``kernels/`` folder of the repository (apart from the
Python that calls them) and are mapped into the package as ``nemo_entropy/kernels/`` package data, so
that an installed package (wheel, ``pip install .``) can build them just in time with
``nemo-entropy build-kernels``.

Install-time build, with torch's ``BuildExtension``, when the build can see torch, i.e. without build
isolation (``pip install --no-build-isolation .``; torch is deliberately *not* a build requirement: an
isolated build environment would download a multi-GB CUDA torch and compile against the wrong one):

* ``NEMO_ENTROPY_BUILD_CPU``: unset = build the CPU kernel when a C++ compiler is found, ``1`` = required
  (the install fails if it cannot be built), ``0`` = skip;
* ``NEMO_ENTROPY_BUILD_CUDA``: unset = build the CUDA kernel when torch is a CUDA build and nvcc is found,
  ``1`` = required, ``0`` = skip.

The built extensions land next to ``nemo_entropy/entropy/build.py`` with a manifest
(``prebuilt_kernels.json``) holding the digest that the loader recomputes at run time: a prebuilt kernel is
used only with the torch, Python, CPU and sources it was built for, else the kernel cache (or the
reference backend) serves, as after a pure-Python install.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
KERNEL_PATTERNS = ["*.h", "*.cpp", "*.cu"]


def _flag(name: str) -> str:
    """``auto``, ``on`` or ``off`` from an environment variable; other values are an error naming it."""
    value = os.environ.get(name, "").strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in ("1", "true", "yes", "on"):
        return "on"
    if value in ("0", "false", "no", "off"):
        return "off"
    raise SystemExit(f"setup.py: {name} must be 1, 0 or unset (auto), got {os.environ[name]!r}")


def _note(message: str) -> None:
    print(f"nemo-entropy setup: {message}", file=sys.stderr)


def _kernel_build():
    """The build module of the package, loaded by path (it imports torch and nothing of the package)."""
    spec = importlib.util.spec_from_file_location("_nemo_entropy_kernel_build", ROOT / "nemo_entropy" / "entropy" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _extensions():
    """``(ext_modules, cmdclass)`` for the kernels this environment can build (none without torch)."""
    want_cpu, want_cuda = _flag("NEMO_ENTROPY_BUILD_CPU"), _flag("NEMO_ENTROPY_BUILD_CUDA")
    if want_cpu == "off" and want_cuda == "off":
        return [], {}
    try:
        import torch  # noqa: F401
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        if "on" in (want_cpu, want_cuda):
            raise SystemExit(
                "setup.py: NEMO_ENTROPY_BUILD_CPU/NEMO_ENTROPY_BUILD_CUDA=1 need torch in the build environment: "
                "install torch first, then pip install --no-build-isolation ."
            )
        _note("torch is not importable here (build isolation?): no kernels prebuilt; build them later with "
              "`nemo-entropy build-kernels`, or install with --no-build-isolation")
        return [], {}
    build = _kernel_build()
    src = build.kernel_source_dir()
    include = [str(src)]
    ext_modules = []

    if want_cpu != "off":
        reason = build.cpu_build_unavailable_reason()
        if reason is None:
            ext_modules.append(CppExtension(
                f"nemo_entropy.entropy.{build.CPU_MODULE}",
                [str((src / s).relative_to(ROOT)) for s in build.CPU_SOURCES],
                include_dirs=include,
                # -g0: Python's own CFLAGS carry -g, which makes the module 30x larger (11 MB).
                extra_compile_args={"cxx": list(build.CPU_CFLAGS) + ["-g0"]},
            ))
        elif want_cpu == "on":
            raise SystemExit(f"setup.py: NEMO_ENTROPY_BUILD_CPU=1 but the CPU kernel cannot be built: {reason}")
        else:
            _note(f"CPU kernel not prebuilt: {reason}")

    if want_cuda != "off":
        reason = build.cuda_build_unavailable_reason()
        if reason is None and CUDA_HOME is not None and shutil.which("nvcc") is None:
            if not (Path(CUDA_HOME) / "bin" / "nvcc").is_file():
                reason = f"no nvcc in {CUDA_HOME}/bin"
        if reason is None:
            ext_modules.append(CUDAExtension(
                f"nemo_entropy.entropy.{build.CUDA_MODULE}",
                [str((src / s).relative_to(ROOT)) for s in build.CUDA_SOURCES],
                include_dirs=include,
                extra_compile_args={"cxx": ["-O3", "-g0"], "nvcc": list(build.CUDA_CFLAGS)},
            ))
        elif want_cuda == "on":
            raise SystemExit(f"setup.py: NEMO_ENTROPY_BUILD_CUDA=1 but the CUDA kernel cannot be built: {reason}")
        elif torch.version.cuda is not None:
            _note(f"CUDA kernel not prebuilt: {reason}")

    if not ext_modules:
        return [], {}

    class BuildKernels(BuildExtension):
        """torch's BuildExtension, plus the manifest that lets the loader recognise these builds."""

        def run(self):
            super().run()
            manifest = {}
            target_dir = None
            for ext in self.extensions:
                path = Path(self.get_ext_fullpath(ext.name))
                module = ext.name.rsplit(".", 1)[-1]
                target_dir = path.parent
                manifest[module] = {
                    "file": path.name,
                    "digest": build.build_digest(module),
                    "torch": torch.__version__,
                    "python": ".".join(map(str, sys.version_info[:3])),
                }
            if target_dir is not None:
                target_dir.mkdir(parents=True, exist_ok=True)
                (target_dir / build.PREBUILT_MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
                _note(f"prebuilt {', '.join(manifest)} for torch {torch.__version__}")

    return ext_modules, {"build_ext": BuildKernels}


ext_modules, cmdclass = _extensions()

setup(
    packages=find_packages(include=["nemo_entropy", "nemo_entropy.*"]) + ["nemo_entropy.kernels"],
    package_dir={"nemo_entropy.kernels": "kernels"},
    package_data={"nemo_entropy.kernels": KERNEL_PATTERNS},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
