"""Fixtures of the real-NeMo-RL harness: a local CPU Ray, the plugin installed into NeMo-RL's GRPO module as the
run entry installs it, and memoised GRPO runs (every check reads the same runs; DP-1 runs come before DP-2 runs
so that at most one CPU worker group is alive at a time on a 2-core machine)."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _nemo_rl_root() -> Path:
    root = os.environ.get("NEMO_RL_ROOT")
    if not root:
        raise pytest.UsageError("tests/nemo_rl_real needs NEMO_RL_ROOT=<NeMo-RL checkout> (run `make test-nemo-rl`)")
    path = Path(root).resolve()
    if not (path / "nemo_rl" / "algorithms" / "grpo.py").is_file():
        raise pytest.UsageError(f"NEMO_RL_ROOT={root} is not a NeMo-RL checkout (no nemo_rl/algorithms/grpo.py)")
    return path


ROOT = _nemo_rl_root()
# Ray actors inherit this environment: our repository first (NeMo-RL's checkout has its own `tests` package).
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(REPO), str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                              if p and Path(p).resolve() not in (REPO, ROOT)])
for entry in (str(ROOT), str(REPO)):
    if entry in sys.path:
        sys.path.remove(entry)
    sys.path.insert(0, entry)
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


@pytest.fixture(scope="session")
def nemo_rl_root() -> Path:
    return ROOT


@pytest.fixture(scope="session")
def ray_cluster():
    import ray
    import torch

    torch.set_num_threads(1)
    os.environ.pop("RAY_ADDRESS", None)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # our own CPU Ray
    # NeMo-RL's MemoryTracker asks Ray for a memory summary without an address: point it at ours, or another Ray
    # running on the same machine makes it fail ("Found multiple active Ray instances").
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield
    ray.shutdown()
    os.environ.pop("RAY_ADDRESS", None)


class Installer:
    """``install(nemo_rl.algorithms.grpo, options)`` exactly as ``nemo_entropy.train.run_nemo_rl`` calls it, each time
    on the pristine module (a run-entry process installs once, with its run's options)."""

    ENTRIES = ("ClippedPGLossFn", "grpo_train", "async_grpo_train")

    def __init__(self):
        from nemo_rl.algorithms import grpo

        self.grpo = grpo
        self.originals = {name: getattr(grpo, name) for name in self.ENTRIES}

    def install(self, options) -> list[str]:
        from nemo_entropy.integrations.nemo_rl_run import install

        self.restore()
        return install(self.grpo, options)

    def restore(self) -> None:
        for name, value in self.originals.items():
            setattr(self.grpo, name, value)


@pytest.fixture(scope="session")
def installer():
    inst = Installer()
    yield inst
    inst.restore()


class Harness:
    """Memoised GRPO runs over NeMo-RL's real ``grpo_train`` (see harness.run_grpo)."""

    def __init__(self, root: Path, workdir: Path, installer: Installer):
        from . import tiny

        self.installer = installer
        self.root = root
        self.workdir = workdir
        self.pretrained = tiny.warm_start(workdir / "pretrained.pt")
        self.env_actor = tiny.make_environment_class().options(num_cpus=0).remote()
        self.runs: dict = {}
        self._group = None  # (dp, cluster, worker group)

    def worker_group(self, dp: int):
        from .cpu_policy import make_worker_group

        if self._group is not None and self._group[0] != dp:
            self.close_group()
        if self._group is None:
            cluster, group = make_worker_group(dp, str(self.pretrained))
            self._group = (dp, cluster, group)
        return self._group[2]

    def close_group(self) -> None:
        if self._group is not None:
            _, cluster, group = self._group
            group.shutdown(cleanup_method="shutdown")
            cluster.shutdown()
            self._group = None

    def run(self, spec, *, name: str | None = None, checkpoint_dir: Path | None = None):
        """``grpo_train`` for ``spec`` (memoised by name); ``checkpoint_dir`` shared between runs resumes."""
        from .harness import run_grpo

        name = name or spec.name
        if name not in self.runs:
            run_dir = self.workdir / name
            shutil.rmtree(run_dir, ignore_errors=True)
            self.installer.install(spec.options)
            self.runs[name] = run_grpo(self.root, spec, self.worker_group(spec.dp), run_dir,
                                       checkpoint_dir=checkpoint_dir, pretrained_path=self.pretrained,
                                       env_actor=self.env_actor)
        return self.runs[name]


@pytest.fixture(scope="session")
def harness(ray_cluster, installer, tmp_path_factory):
    h = Harness(ROOT, tmp_path_factory.mktemp("nemo_rl_real"), installer)
    yield h
    h.close_group()
