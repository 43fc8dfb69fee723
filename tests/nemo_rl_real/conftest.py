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
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def installed_grpo():
    """``install(nemo_rl.algorithms.grpo, options)`` exactly as ``nemo_entropy.train.run_nemo_rl`` calls it; the
    module's originals come back at the end of the session."""
    from nemo_rl.algorithms import grpo

    from nemo_entropy.integrations.nemo_rl_run import install

    from .harness import NEMO_RL_OPTIONS

    saved = {name: getattr(grpo, name) for name in ("ClippedPGLossFn", "grpo_train", "async_grpo_train")}
    wrapped = install(grpo, NEMO_RL_OPTIONS)
    yield grpo, wrapped
    for name, value in saved.items():
        setattr(grpo, name, value)


class Harness:
    """Memoised GRPO runs over NeMo-RL's real ``grpo_train`` (see harness.run_grpo)."""

    def __init__(self, root: Path, workdir: Path):
        from . import tiny

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
            self.runs[name] = run_grpo(self.root, spec, self.worker_group(spec.dp), run_dir,
                                       checkpoint_dir=checkpoint_dir, pretrained_path=self.pretrained,
                                       env_actor=self.env_actor)
        return self.runs[name]


@pytest.fixture(scope="session")
def harness(ray_cluster, installed_grpo, tmp_path_factory):
    h = Harness(ROOT, tmp_path_factory.mktemp("nemo_rl_real"))
    yield h
    h.close_group()
