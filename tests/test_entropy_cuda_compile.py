"""The CUDA kernels compile for sm_80 and sm_90 (compile only: a CPU torch cannot link a CUDA extension).

* every ``kernels/*.cu`` with ``nvcc -c`` for both architectures, against torch's include dirs
  (nemo_entropy.entropy.build.nvcc_compile_check, also ``nemo-entropy build-kernels --nvcc-check``);
* the torch binding ``kernels/entropy_cuda_binding.cpp`` with the host compiler in syntax-only mode,
  against torch's headers and the CUDA toolkit's. A CPU torch wheel lacks the one generated header
  ``c10/cuda/impl/cuda_cmake_macros.h``; the test supplies it (it only defines
  ``C10_CUDA_BUILD_SHARED_LIBS``, as a CUDA wheel's does).

Skipped, with the reason, where nvcc is absent. The kernels have never *run* here (no GPU).
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig

import pytest

from nemo_entropy.entropy import build


def _nvcc():
    nvcc = build.nvcc_path()
    if nvcc is None:
        pytest.skip("nvcc not found on PATH or in $CUDA_HOME/bin: CUDA kernels not compiled")
    return nvcc


def test_cu_files_compile_for_sm80_and_sm90(tmp_path):
    _nvcc()
    objects = build.nvcc_compile_check(tmp_path)
    sources = sorted(build.kernel_source_dir().glob("*.cu"))
    assert sources and len(objects) == len(sources)
    for obj in objects:
        assert obj.stat().st_size > 0
        # Both architectures' SASS are embedded: the fatbinary records the ptxas options of each cubin.
        data = obj.read_bytes()
        for arch in build.CUDA_ARCHS:
            assert f"-arch sm_{arch} ".encode() in data, f"{obj.name} has no sm_{arch} code"


def test_cuda_binding_compiles_against_torch_headers(tmp_path):
    _nvcc()
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.skip("no host C++ compiler")
    root = build.cuda_toolkit_root()
    if root is None:
        pytest.skip("CUDA toolkit headers (cuda_runtime_api.h) not found: set CUDA_HOME")
    cuda_include = root / "include"
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl"
    stub.mkdir(parents=True)
    (stub / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [str(tmp_path), *include_paths(), sysconfig.get_paths()["include"], str(cuda_include)]
    cmd = [cxx, "-std=c++20", "-fsyntax-only", "-DTORCH_EXTENSION_NAME=nemo_entropy_cuda_kernels"]
    cmd += [f"-I{p}" for p in includes]
    cmd.append(str(build.kernel_source_dir() / "entropy_cuda_binding.cpp"))
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-5000:]
