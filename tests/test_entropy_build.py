"""Finding, loading and advertising the compiled entropy kernels (nemo_entropy.entropy.build / dispatch / check).

* the kernel sources are found in an installed package (``nemo_entropy/kernels``) before the checkout;
* an extension prebuilt at install time is loaded only when its manifest digest matches this torch, Python,
  CPU and sources, and is then preferred to the kernel cache;
* ``backend="auto"`` falling back to the reference while the CPU kernel could be built warns once, with the
  exact command; it stays silent when no build is possible;
* ``nemo-entropy check-kernels`` reports the backend and fails on ``--require`` mismatches.

The wheel itself (package data, install-time build, a fresh virtual environment) is exercised by
``.ci/wheel_check.sh``, which CI runs.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys

import pytest
import torch

from nemo_entropy.entropy import build, check, dispatch
from nemo_entropy.entropy.reference import ReferenceBackend
from nemo_entropy.entropy.vocab_parallel import ShardStats

CPU_BUILT = build.load_cpu_extension() is not None
needs_cpu_extension = pytest.mark.skipif(not CPU_BUILT, reason="CPU extension not built: run `nemo-entropy build-kernels`")


@pytest.fixture
def fresh_loader(monkeypatch):
    """Forget loaded extensions and resolved backends for one test; restore them afterwards."""
    monkeypatch.setattr(build, "_loaded", {})
    monkeypatch.setattr(build, "_origin", {})
    monkeypatch.setattr(dispatch, "_advised", set())
    dispatch.reset_backend_cache()
    yield
    dispatch.reset_backend_cache()


def test_kernel_sources_of_an_installed_package_come_first(tmp_path, monkeypatch):
    assert build.kernel_source_dir() == build._checkout_kernel_dir()  # tests run from the checkout
    packaged = tmp_path / "nemo_entropy" / "kernels"
    packaged.mkdir(parents=True)
    for name in build.CPU_SOURCES + build.CUDA_SOURCES + build.HEADERS:
        shutil.copy(build._checkout_kernel_dir() / name, packaged / name)
    monkeypatch.setattr(build, "_package_kernel_dir", lambda: packaged)
    monkeypatch.delenv(build.CACHE_ENV, raising=False)
    assert build.kernel_source_dir() == packaged
    # An installed package never writes into site-packages: its cache is the user's.
    assert build.cache_root() == build.Path.home() / ".cache" / "nemo_entropy" / "kernels"
    # Same sources, same digest: an install-time build and a just-in-time build are interchangeable.
    assert build.build_digest(build.CPU_MODULE) == build.build_digest(build.CPU_MODULE, build._checkout_kernel_dir())
    (packaged / build.HEADERS[0]).write_text("// edited\n")
    assert build.build_digest(build.CPU_MODULE) != build.build_digest(build.CPU_MODULE, build._checkout_kernel_dir())


def test_digest_names_torch_python_and_cpu(monkeypatch):
    base = build.build_digest(build.CPU_MODULE)
    monkeypatch.setattr(build, "_host_cpu", lambda: "flags: another cpu")
    assert build.build_digest(build.CPU_MODULE) != base
    cuda = build.build_digest(build.CUDA_MODULE)
    assert build.build_digest(build.CUDA_MODULE) == cuda  # the CUDA build is not -march=native: no host term
    monkeypatch.setattr(build, "_host_cpu", lambda: "flags: yet another cpu")
    assert build.build_digest(build.CUDA_MODULE) == cuda
    monkeypatch.setattr(torch, "__version__", "9.9.9")
    assert build.build_digest(build.CUDA_MODULE) != cuda


def _install_prebuilt(tmp_path, monkeypatch, digest):
    """Put a copy of the built CPU extension in a fake package folder with a manifest naming ``digest``."""
    source = build.load_cpu_extension().__file__
    build._loaded.clear()  # the next load looks again (prebuilt first)
    build._origin.clear()
    name = f"{build.CPU_MODULE}.cpython-test.so"
    shutil.copy(source, tmp_path / name)
    (tmp_path / build.PREBUILT_MANIFEST).write_text(json.dumps({build.CPU_MODULE: {"file": name, "digest": digest}}))
    monkeypatch.setattr(build, "prebuilt_dir", lambda: tmp_path)
    return tmp_path / name


@needs_cpu_extension
def test_prebuilt_extension_is_used_when_its_digest_matches(tmp_path, monkeypatch, fresh_loader):
    path = _install_prebuilt(tmp_path, monkeypatch, build.build_digest(build.CPU_MODULE))
    mod = build.load_cpu_extension()
    assert build.extension_origin(build.CPU_MODULE) == ("prebuilt", str(path))
    # It is the real kernel: same statistics as the reference on a padded, masked shard.
    logits = torch.randn(4, 1031)
    logits[1, :500] = float("-inf")
    targets = torch.tensor([3, 999, -1, 0])
    ours = ShardStats(*mod.shard_stats(logits, targets, 1000))
    ref = ReferenceBackend().shard_stats(logits, targets, 1000)
    torch.testing.assert_close(ours.sum_exp, ref.sum_exp, rtol=1e-5, atol=0)
    assert dispatch.resolve_backend("auto", torch.device("cpu")).name == "cpu"


@needs_cpu_extension
def test_prebuilt_extension_for_another_build_is_ignored(tmp_path, monkeypatch, fresh_loader, caplog):
    _install_prebuilt(tmp_path, monkeypatch, "0" * 64)  # e.g. built for another torch or CPU
    with caplog.at_level(logging.INFO, logger="nemo_entropy.entropy"):
        mod = build.load_cpu_extension()
    assert mod is not None and build.extension_origin(build.CPU_MODULE)[0] == "cache"
    assert any("ignoring the prebuilt" in r.getMessage() for r in caplog.records)


def test_cpu_build_needs_a_compiler(monkeypatch):
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert "no-such-compiler-xyz" in build.cpu_build_unavailable_reason()
    monkeypatch.setenv("CXX", sys.executable)  # any executable on PATH stands for a compiler here
    assert build.cpu_build_unavailable_reason() is None


def test_build_command_is_exact_and_installs_ninja_when_missing(monkeypatch):
    monkeypatch.setattr(build, "ninja_available", lambda: True)
    assert build.build_command() == f"{sys.executable} -m nemo_entropy.cli build-kernels"
    monkeypatch.setattr(build, "ninja_available", lambda: False)
    assert build.build_command() == (
        f"{sys.executable} -m pip install ninja && {sys.executable} -m nemo_entropy.cli build-kernels"
    )


def _advice(records):
    return [r.getMessage() for r in records if r.levelno == logging.WARNING and "is not built" in r.getMessage()]


def test_auto_fallback_advises_the_build_command_once(monkeypatch, fresh_loader, caplog):
    monkeypatch.setattr(build, "load_cpu_extension", lambda build_if_missing=False, verbose=False: None)
    monkeypatch.setattr(build, "cpu_build_unavailable_reason", lambda: None)
    monkeypatch.setattr(build, "ninja_available", lambda: True)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with caplog.at_level(logging.INFO, logger="nemo_entropy.entropy"):
        for _ in range(3):
            assert dispatch.resolve_backend("auto", torch.device("cpu")).name == "reference"
            dispatch.reset_backend_cache()  # even after a reset: once per process
    advice = _advice(caplog.records)
    assert len(advice) == 1, advice
    assert f"{sys.executable} -m nemo_entropy.cli build-kernels" in advice[0]
    assert build.BUILD_ENV in advice[0]


def test_auto_fallback_is_silent_when_no_build_is_possible(monkeypatch, fresh_loader, caplog):
    monkeypatch.setattr(build, "load_cpu_extension", lambda build_if_missing=False, verbose=False: None)
    monkeypatch.setattr(build, "cpu_build_unavailable_reason", lambda: "no C++ compiler ('c++' is not on PATH)")
    with caplog.at_level(logging.INFO, logger="nemo_entropy.entropy"):
        assert dispatch.resolve_backend("auto", torch.device("cpu")).name == "reference"
    assert not _advice(caplog.records)
    assert any("cannot be built here: no C++ compiler" in r.getMessage() for r in caplog.records)


def test_auto_fallback_advice_only_on_the_first_local_rank(monkeypatch, fresh_loader, caplog):
    monkeypatch.setattr(build, "load_cpu_extension", lambda build_if_missing=False, verbose=False: None)
    monkeypatch.setattr(build, "cpu_build_unavailable_reason", lambda: None)
    monkeypatch.setenv("LOCAL_RANK", "1")
    with caplog.at_level(logging.INFO, logger="nemo_entropy.entropy"):
        dispatch.resolve_backend("auto", torch.device("cpu"))
    assert not _advice(caplog.records)


def test_check_kernels_reports_and_enforces_the_backend(capsys, fresh_loader):
    expected = "cpu" if CPU_BUILT else "reference"
    other = "reference" if CPU_BUILT else "cpu"
    assert check.main(["--device", "cpu", "--require", expected]) == 0
    out = capsys.readouterr().out
    assert f"backend='auto' on cpu -> {expected}" in out and out.rstrip().endswith("check-kernels: OK")
    assert out.count("within the stated tolerances") == len(check.CASES) * len(check.DTYPES)
    assert check.main(["--device", "cpu", "--require", other]) == 1
    assert f"--require {other}, but backend='auto' uses {expected}" in capsys.readouterr().err
    if CPU_BUILT:
        assert check.main(["--device", "cpu", "--require-origin", "prebuilt"]) == 1  # this checkout: the cache


def test_check_kernels_fails_on_a_wrong_kernel(monkeypatch, capsys, fresh_loader):
    class OffByOnePercent(ReferenceBackend):
        name = "reference"

        def shard_stats(self, logits, local_targets, valid_width):
            s = super().shard_stats(logits, local_targets, valid_width)
            return ShardStats(s.local_max, s.sum_exp * 1.01, s.sum_exp_shifted, s.target_logit)

    monkeypatch.setattr(dispatch, "_REFERENCE", OffByOnePercent())
    monkeypatch.setattr(build, "load_cpu_extension", lambda build_if_missing=False, verbose=False: None)
    assert check.main(["--device", "cpu"]) == 1
    assert "FAILED against float64" in capsys.readouterr().err
