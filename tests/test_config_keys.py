"""Issue 17, cases 4 and 8: every key a user types is checked against what the local engine reads (with a "did
you mean"), and config files that do not parse (or are empty) give one line naming file, line and column, exit 2."""

from __future__ import annotations

import shutil

import pytest

from nemo_entropy import train
from nemo_entropy.engine import settings as settings_mod
from nemo_entropy.engine.schema import LOCAL_KEYS, VALIDATED_SECTIONS


def _run(capsys, *argv):
    code = train.main(["--dry-run", *argv])
    captured = capsys.readouterr()
    return code, captured.err.strip().splitlines()


@pytest.mark.parametrize("override, key, suggestion", [
    ("++grpo.max_num_stpes=6", "grpo.max_num_stpes", "did you mean grpo.max_num_steps?"),
    ("+checkpointing.save_perod=2", "checkpointing.save_perod", "did you mean checkpointing.save_period"),
    ("+logger.logdir=/tmp/x", "logger.logdir", "did you mean logger.log_dir?"),
    ("+foo=1", "foo", "allowed top-level keys: ['backend', 'checkpointing'"),
    ("+engine.progres_bar=false", "engine.progres_bar", "did you mean engine.progress_bar?"),
])
def test_a_mistyped_added_key_is_refused_with_a_suggestion(capsys, override, key, suggestion):
    code, err = _run(capsys, override)
    assert code == 2 and len(err) == 1
    assert key in err[0] and suggestion in err[0]


@pytest.mark.parametrize("overrides", [
    ["++grpo.max_num_steps=6"],                                  # ++ on a key the config holds: a change
    ["+preset=local_addition"],                                  # a config group, not a key
    ["--config-name", "grpo_32b_kl_cov", "+preset=local_tiny"],  # NeMo-RL keys of a cluster config stay accepted
])
def test_keys_the_config_holds_and_groups_are_accepted(capsys, overrides):
    code, err = _run(capsys, *overrides)
    assert code == 0, err


def test_local_keys_cover_every_key_the_engine_reads(monkeypatch):
    """LOCAL_KEYS must list what EngineSettings reads (else a correct ``+key=v`` would be refused)."""
    read = []
    original = settings_mod._select

    def recording(cfg, dotted, default=None):
        read.append(dotted)
        return original(cfg, dotted, default)

    monkeypatch.setattr(settings_mod, "_select", recording)
    settings_mod.validate_engine_config(train.compose_config("local_kl_cov"))
    outside = {k for k in read if k.split(".")[0] not in VALIDATED_SECTIONS}
    # policy.optimizer.kwargs is read as one mapping (its lr checked as "lr"): its keys are listed one by one.
    assert outside - {"policy.optimizer.kwargs", "lr"} <= LOCAL_KEYS
    assert {"policy.optimizer.kwargs.lr", "policy.optimizer.kwargs.betas"} <= LOCAL_KEYS


@pytest.fixture
def conf_copy(tmp_path):
    conf = tmp_path / "conf"
    shutil.copytree(train.default_config_dir(), conf)
    return conf


@pytest.mark.parametrize("text, where, problem", [
    ("defaults:\n  - local_base\n  - _self_\nloss_fn:\n  method: [ppo\n", "broken.yaml:6:1:", "expected ','"),
    ("defaults:\n  - local_base\n  - _self_\nloss_fn:\n  method: ppo\n   x: 1\n", "broken.yaml:6:5:",
     "mapping values are not allowed here"),
])
def test_a_yaml_error_is_one_line_with_file_line_and_column(capsys, conf_copy, text, where, problem):
    (conf_copy / "broken.yaml").write_text(text)
    code, err = _run(capsys, "--config-dir", str(conf_copy), "--config-name", "broken")
    assert code == 2 and len(err) == 1
    assert f"{conf_copy / where}" in err[0] and problem in err[0]


def test_a_yaml_error_in_an_included_file_names_that_file(capsys, conf_copy):
    base = conf_copy / "local_base.yaml"
    base.write_text(base.read_text() + "grpo:\n\tseed: 1\n")
    code, err = _run(capsys, "--config-dir", str(conf_copy), "--config-name", "local_grpo")
    assert code == 2 and len(err) == 1
    assert str(base) in err[0] and "YAML error" in err[0]


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n"])
def test_an_empty_config_file_says_so(capsys, conf_copy, text):
    (conf_copy / "empty.yaml").write_text(text)
    code, err = _run(capsys, "--config-dir", str(conf_copy), "--config-name", "empty")
    assert code == 2 and len(err) == 1
    assert f"{conf_copy / 'empty.yaml'}:1:1: the config file is empty" in err[0]
    assert "backend=None" not in err[0]
