"""Progress reports of the engine (nemo_entropy.engine.progress): a bar on a terminal, bounded plain lines in
logs, and the engine's warm start and GRPO loop using them (no carriage returns in a log)."""

from __future__ import annotations

import io

import pytest

from nemo_entropy.engine import progress as progress_mod
from nemo_entropy.engine import run_local
from nemo_entropy.engine.progress import Progress, resolve_mode
from nemo_entropy.train import compose_config


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(progress_mod.time, "monotonic", fake)
    return fake


class Terminal(io.StringIO):
    def isatty(self):
        return True


def _lines(stream):
    return stream.getvalue().splitlines()


@pytest.fixture(autouse=True)
def no_progress_env(monkeypatch):
    for name in (progress_mod.MODE_ENV, progress_mod.STEPS_ENV, progress_mod.SECONDS_ENV):
        monkeypatch.delenv(name, raising=False)


def test_lines_every_tenth_by_default_plus_start_and_end(clock):
    out = io.StringIO()
    with Progress(95, "GRPO [kl_cov]", stream=out) as bar:
        for _ in range(95):
            clock.now += 0.5
            bar.update(1, H=0.25, reward=0.5, val="-")
    lines = _lines(out)
    assert "\r" not in out.getvalue()
    # start, every 9 steps (95 // 10) -> 10 lines at 9, 18, ..., 90, and the final 95
    assert len(lines) == 1 + 10 + 1, lines
    assert lines[0] == "[nemo-entropy] GRPO [kl_cov]: 0/95 steps (0%), starting"
    assert lines[1] == ("[nemo-entropy] GRPO [kl_cov]: 9/95 steps (9%), 4.5 s, 2.00 step/s, ~43 s left "
                        "| H=0.250 reward=0.500 val=-")
    assert lines[-1].startswith("[nemo-entropy] GRPO [kl_cov]: 95/95 steps (100%), 48 s, 2.00 step/s |")


def test_lines_every_n_seconds_when_steps_are_slow(clock):
    out = io.StringIO()
    bar = Progress(1000, "GRPO [ppo]", stream=out, every_seconds=60)
    for step in range(1, 11):
        clock.now += 25.0  # a 32B step: minutes apart, far fewer than 100 steps between lines
        bar.update(1)
    bar.close()
    counts = [line.split(": ")[1].split("/")[0] for line in _lines(out)]
    # start; then once 60 s have passed since the last line: after steps 3, 6, 9; then the close at 10
    assert counts == ["0", "3", "6", "9", "10"], counts
    assert _lines(out)[1] == "[nemo-entropy] GRPO [ppo]: 3/1000 steps (0%), 75 s, 25.0 s/step, ~6.9 h left"


def test_environment_sets_the_cadence_and_the_mode(clock, monkeypatch):
    monkeypatch.setenv(progress_mod.STEPS_ENV, "25")
    out = io.StringIO()
    with Progress(100, "warm start", stream=out) as bar:
        for _ in range(100):
            bar.update(1)
    assert len(_lines(out)) == 1 + 4
    monkeypatch.setenv(progress_mod.MODE_ENV, "off")
    out = io.StringIO()
    with Progress(100, "warm start", stream=out) as bar:
        bar.update(100)
    assert out.getvalue() == ""
    monkeypatch.setenv(progress_mod.MODE_ENV, "lines")
    assert resolve_mode(Terminal()) == "lines"


def test_bad_environment_values_name_the_variable(monkeypatch):
    monkeypatch.setenv(progress_mod.MODE_ENV, "fancy")
    with pytest.raises(ValueError, match=r"NEMO_ENTROPY_PROGRESS must be one of .*got 'fancy'"):
        Progress(10, "x", stream=io.StringIO())
    monkeypatch.delenv(progress_mod.MODE_ENV)
    monkeypatch.setenv(progress_mod.STEPS_ENV, "0")
    with pytest.raises(ValueError, match=r"NEMO_ENTROPY_PROGRESS_STEPS must be a number >= 1, got '0'"):
        Progress(10, "x", stream=io.StringIO())
    monkeypatch.setenv(progress_mod.STEPS_ENV, "5")
    monkeypatch.setenv(progress_mod.SECONDS_ENV, "soon")
    with pytest.raises(ValueError, match=r"NEMO_ENTROPY_PROGRESS_SECONDS must be a number >= 0, got 'soon'"):
        Progress(10, "x", stream=io.StringIO())


def test_a_terminal_gets_a_bar_and_a_pipe_gets_lines():
    assert resolve_mode(Terminal()) == "bar"
    assert resolve_mode(io.StringIO()) == "lines"
    tty = Terminal()
    with Progress(50, "GRPO [clip_cov]", stream=tty) as bar:
        for _ in range(50):
            bar.update(1, H=0.1)
    assert "\r" in tty.getvalue() and "GRPO [clip_cov]" in tty.getvalue()  # tqdm redraws in place
    assert "[nemo-entropy]" not in tty.getvalue()


def test_disabled_and_resumed():
    out = io.StringIO()
    with Progress(10, "x", stream=out, enabled=False) as bar:
        bar.update(10)
    assert out.getvalue() == ""
    with Progress(10, "GRPO [ppo]", stream=out, initial=8, every_steps=5) as bar:
        bar.update(2)
    assert _lines(out)[0] == "[nemo-entropy] GRPO [ppo]: 8/10 steps (80%), starting"
    assert _lines(out)[-1].startswith("[nemo-entropy] GRPO [ppo]: 10/10 steps (100%)")


def test_engine_run_writes_a_few_plain_lines_to_a_log(tmp_path, capfd, monkeypatch):
    """A run whose output is not a terminal (this capture, Slurm, CI) prints bounded lines, no redraws."""
    monkeypatch.setenv(progress_mod.SECONDS_ENV, "1e9")  # count lines by steps only, however loaded the machine
    cfg = compose_config("local_kl_cov", [
        f"logger.log_dir={tmp_path / 'run'}", f"engine.warm_start.cache_dir={tmp_path / 'warm'}",
        "grpo.max_num_steps=20", "grpo.num_prompts_per_step=4", "grpo.num_generations_per_prompt=4",
        "grpo.val_period=10", "policy.train_global_batch_size=16", "policy.train_micro_batch_size=8",
        "policy.generation_batch_size=16", "engine.warm_start.steps=30", "engine.num_val_problems=16",
        "engine.plot=false", "engine.progress_bar=true", "checkpointing.enabled=false",
    ])
    run_local(cfg)
    captured = capfd.readouterr()
    text = captured.out + captured.err
    assert "\r" not in text
    progress = [line for line in text.splitlines() if ": " in line and ("warm start" in line or "GRPO [" in line)]
    warm = [line for line in progress if "warm start" in line]
    grpo = [line for line in progress if "GRPO [kl_cov]" in line]
    assert len(warm) == 1 + 10 and warm[-1].startswith("[nemo-entropy] warm start: 30/30 steps (100%)")
    assert len(grpo) == 1 + 10 and grpo[-1].startswith("[nemo-entropy] GRPO [kl_cov]: 20/20 steps (100%)")
    assert "reward=" in grpo[-1] and "H=" in grpo[-1] and "val=" in grpo[-1]
    assert max(len(line) for line in text.splitlines()) < 500


def test_compare_reports_one_line_per_run_in_a_log(tmp_path, capfd):
    from nemo_entropy.engine.compare import main

    assert main([
        "--out", str(tmp_path / "cmp"), "--steps", "2", "--configs", "local_grpo,local_kl_cov", "--seeds", "42,",
        "engine=tiny", "grpo.num_prompts_per_step=4", "grpo.num_generations_per_prompt=4", "grpo.val_period=0",
        "policy.train_global_batch_size=16", "policy.train_micro_batch_size=8", "policy.generation_batch_size=16",
        "engine.warm_start.steps=10", "engine.num_val_problems=16", "engine.progress_bar=false",
    ]) == 0
    captured = capfd.readouterr()
    text = captured.out + captured.err
    assert "\r" not in text
    lines = [line for line in text.splitlines() if line.startswith("[nemo-entropy] compare: ")]
    assert [line.split(": ")[1].split(",")[0] for line in lines] == ["0/2 runs (0%)", "1/2 runs (50%)", "2/2 runs (100%)"]
    assert lines[1].endswith("| last=local_grpo/seed_42") and lines[2].endswith("| last=local_kl_cov/seed_42")
