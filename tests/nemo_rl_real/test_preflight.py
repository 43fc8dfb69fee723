"""(d) ``nemo-entropy check-nemo-rl`` against the NeMo-RL checkout, and against copies of it where one interface
the run entry relies on was changed by hand: the preflight must fail and name that interface."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _preflight(nemo_rl_root: Path, cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(nemo_rl_root)]), "OMP_NUM_THREADS": "1"}
    env.pop("NEMO_RL_ROOT", None)  # the checkout is found from the imported nemo_rl, as in the container
    return subprocess.run([sys.executable, "-m", "nemo_entropy.cli", "check-nemo-rl", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


def _copy_checkout(root: Path, dest: Path) -> Path:
    """The parts of the checkout the preflight imports or reads (``nemo_rl/``, ``examples/``)."""
    for part in ("nemo_rl", "examples"):
        shutil.copytree(root / part, dest / part, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def _rename_save_state_parameter(text: str) -> str:
    """``grpo_train(..., grpo_save_state, ...)`` -> ``grpo_train(..., save_state, ...)`` (signature only)."""
    start = text.index("def grpo_train(")
    end = text.index(") -> None:", start)
    signature = text[start:end]
    assert "    grpo_save_state: GRPOSaveState," in signature
    renamed = signature.replace("    grpo_save_state: GRPOSaveState,", "    save_state: GRPOSaveState,")
    return text[:start] + renamed + text[end:]


def _drop_total_steps(text: str) -> str:
    """``GRPOSaveState`` without its ``total_steps`` field."""
    start = text.index("class GRPOSaveState:")
    end = text.index("\n\n\n", start)
    body = text[start:end]
    assert "\n    total_steps: int\n" in body
    return text[:start] + body.replace("\n    total_steps: int\n", "\n") + text[end:]


def test_preflight_passes_on_the_checkout(nemo_rl_root, tmp_path):
    out = _preflight(nemo_rl_root, tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "check-nemo-rl: compatible" in out.stdout
    assert str(nemo_rl_root) in out.stdout  # it checked this checkout
    assert re.search(r"ok\s+loss parity", out.stdout)


@pytest.mark.parametrize("mutation, names", [
    (_rename_save_state_parameter, ("training entries", "grpo_train", "grpo_save_state")),
    (_drop_total_steps, ("save state", "GRPOSaveState", "total_steps")),
], ids=["grpo_train-without-grpo_save_state", "GRPOSaveState-without-total_steps"])
def test_preflight_names_a_hand_changed_interface(nemo_rl_root, tmp_path, mutation, names):
    copy = _copy_checkout(nemo_rl_root, tmp_path / "nemo-rl-changed")
    grpo_py = copy / "nemo_rl" / "algorithms" / "grpo.py"
    grpo_py.write_text(mutation(grpo_py.read_text()))
    out = _preflight(copy, tmp_path)
    assert out.returncode == 1, out.stdout + out.stderr
    assert str(copy) in out.stdout, "the preflight did not import the changed copy"
    failure = [line for line in out.stderr.splitlines() if "INCOMPATIBLE" in line]
    assert failure, out.stderr
    check, *words = names
    assert f"INCOMPATIBLE ({check})" in failure[0]
    for word in words:
        assert word in failure[0], failure[0]


def test_preflight_on_the_users_config_passes_on_the_checkout(nemo_rl_root, tmp_path):
    out = _preflight(nemo_rl_root, tmp_path, "--config-name", "grpo_32b_kl_cov")
    assert out.returncode == 0, out.stdout + out.stderr
    line = next(x for x in out.stdout.splitlines() if x.startswith("ok    run config"))
    assert "grpo_32b_kl_cov merged onto examples/configs/grpo_math_1B.yaml, resolved, MasterConfig valid" in line
    assert "TP 8 x PP 1 x CP 1 x DP 4" in line


def _drop_resolver_registration(text: str) -> str:
    """``nemo_rl/utils/config.py`` whose ``register_omegaconf_resolvers`` no longer registers ``mul``."""
    old = 'OmegaConf.register_new_resolver("mul", lambda a, b: a * b)'
    assert old in text
    return text.replace(old, "pass")


def test_preflight_on_the_users_config_names_a_missing_resolver(nemo_rl_root, tmp_path):
    copy = _copy_checkout(nemo_rl_root, tmp_path / "nemo-rl-changed")
    config_py = copy / "nemo_rl" / "utils" / "config.py"
    config_py.write_text(_drop_resolver_registration(config_py.read_text()))
    out = _preflight(copy, tmp_path, "--config-name", "grpo_32b_kl_cov")
    assert out.returncode == 1, out.stdout + out.stderr
    (failure,) = [line for line in out.stderr.splitlines() if "INCOMPATIBLE" in line]
    assert "INCOMPATIBLE (run config)" in failure and "${mul:...}" in failure, failure
    assert "register_omegaconf_resolvers() does not register it" in failure, failure


def test_preflight_on_the_users_config_names_a_dataset_nemo_rl_does_not_know(nemo_rl_root, tmp_path):
    out = _preflight(nemo_rl_root, tmp_path, "--config-name", "grpo_7b_clip_cov", "data.validation.dataset_name=AIME24")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "data.validation.dataset_name='AIME24' is not in NeMo-RL's DATASET_REGISTRY" in out.stderr
