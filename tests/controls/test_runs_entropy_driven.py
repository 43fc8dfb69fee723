"""The entropy-driven controls on the local engine: each runs from its local config (conf/local_<name>.yaml, its keys
reaching the loss), logs its metrics (``entropy_target`` next to ``entropy_mean`` for the controllers), and a run of a
stateful control killed after a checkpoint and resumed equals the uninterrupted run record for record, its state
included."""

from __future__ import annotations

import math
import os

import pytest
import torch

from nemo_entropy.engine import run_local, validate_engine_config
from nemo_entropy.engine.checkpoint import latest_complete_checkpoint
from nemo_entropy.train import compose_config

from ..test_engine import _crash_at, _Killed, read, tiny_overrides, without_timing

CONTROLS = {  # name -> (a key of its local config, the metrics it logs)
    "entropy_bonus": ("entropy_coef", ("entropy_loss", "entropy_coef")),
    "adaptive_entropy": ("entropy_target", ("entropy_loss", "entropy_coef", "entropy_target")),
    "aent": ("aent_coef_lr", ("entropy_loss", "entropy_coef", "entropy_clamped", "entropy_target")),
    "entropy_pi": ("entropy_pi_target", ("entropy_target", "entropy_pi_control", "entropy_pi_integral")),
}
STATE_KEY = {"adaptive_entropy": "entropy_coef", "aent": "aent_coef", "entropy_pi": "integral"}
# A target above the tiny run's entropy (about 0.3 nats), so that the state moves within five steps whatever target the
# local config sets for the full-size task.
MOVING_STATE = {"adaptive_entropy": ["loss_fn.entropy_target=1.0"]}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("warm_start"))


@pytest.mark.parametrize("name", sorted(CONTROLS))
def test_local_config_keys_reach_the_engine(name):
    key, _ = CONTROLS[name]
    settings = validate_engine_config(compose_config(f"local_{name}", [f"loss_fn.{key}=0.123"]))
    assert settings.loss_fn["method"] == name and settings.loss_fn[key] == 0.123 and not settings.dropped_loss_keys


@pytest.mark.parametrize("name", sorted(set(CONTROLS) - set(STATE_KEY)))  # the others: the resume test below
def test_runs_from_its_local_config_and_logs_its_metrics(name, tmp_path, cache_dir):
    result = run_local(compose_config(f"local_{name}", tiny_overrides(tmp_path / "run", cache_dir, steps=3)))
    _check_records(name, read(result["metrics_path"]))


def _check_records(name, records):
    _, metrics = CONTROLS[name]
    for record in records[1:]:
        for key in ("entropy_mean", "reward_mean", "loss", *metrics):
            assert isinstance(record[key], float) and math.isfinite(record[key]), (name, record["step"], key)
    if "entropy_target" in metrics:
        keys = list(records[1])
        assert keys.index("entropy_target") > keys.index("entropy_mean")
        target = records[1]["entropy_target"]  # a per-step constant, summed as token shares: exact to float64
        assert all(r["entropy_target"] == pytest.approx(target, rel=1e-12) for r in records[1:])


@pytest.mark.parametrize("name", sorted(STATE_KEY))
def test_kill_and_resume_equals_the_uninterrupted_run(name, tmp_path, cache_dir):
    config = f"local_{name}"
    extra = ["checkpointing.save_period=2", *MOVING_STATE.get(name, [])]
    reference = run_local(compose_config(config, tiny_overrides(tmp_path / "a", cache_dir, steps=5, extra=extra)))
    records = read(reference["metrics_path"])
    _check_records(name, records)
    overrides = tiny_overrides(tmp_path / "b", cache_dir, steps=5, extra=extra)
    with pytest.raises(_Killed):  # killed after step 3 was logged; the last complete checkpoint is step 2
        run_local(compose_config(config, overrides), _after_step=_crash_at(3))
    resumed = run_local(compose_config(config, overrides))
    assert resumed["resumed_from"] == 2
    assert without_timing(read(resumed["metrics_path"])) == without_timing(records)
    states = []
    for run in ("a", "b"):
        _, path = latest_complete_checkpoint(str(tmp_path / run / "checkpoints"))
        states.append(_controls_state(path))
    assert states[0] == states[1] and set(states[0]) == {name}
    assert set(states[0][name]) == {STATE_KEY[name]}
    # The state moved during the run (the test would not see a lost update otherwise).
    assert len({r.get("entropy_coef", r.get("entropy_pi_control")) for r in records[1:]}) > 1


def _controls_state(path):
    return torch.load(os.path.join(path, "rank_00000.pt"), map_location="cpu", weights_only=False)["controls"]
