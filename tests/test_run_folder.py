"""Issue 17: runs never lose or mix data (cases 1, 2, 3, 5, 6, 7).

The folder of a run (``logger.log_dir``) has one live writer, remembers the config that produced it, holds
checksummed checkpoints that resume only when intact, is rewritten only by write-new-then-rename, reports disk
errors in one line, and Ctrl-C checkpoints at the step boundary. Every assertion is about files, exit codes,
messages and step lists, never about one machine's trajectory values; processes started here are bounded in time
and killed by pid at the end.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nemo_entropy import train
from nemo_entropy.engine import run_local
from nemo_entropy.engine.checkpoint import step_dir
from nemo_entropy.engine.metrics import MetricsLog, read_metrics
from nemo_entropy.engine.preemption import Interrupted
from nemo_entropy.engine.run_folder import RunFolderLock
from nemo_entropy.train import compose_config

TIMING_KEYS = {"rollout_time", "train_time", "val_time", "step_time", "pass_at_k_time"}
CONFIG = "local_grpo"


def overrides(log_dir, cache_dir, *, steps=4, extra=()):
    """A small, fast run (addition, 8 prompts x 4 samples, 2 optimizer steps per rollout, checkpoint every 2)."""
    return [
        "engine=tiny", f"logger.log_dir={log_dir}", f"engine.warm_start.cache_dir={cache_dir}",
        f"grpo.max_num_steps={steps}", "grpo.num_prompts_per_step=8", "grpo.num_generations_per_prompt=4",
        "grpo.val_period=2", "policy.train_global_batch_size=16", "policy.train_micro_batch_size=8",
        "policy.generation_batch_size=32", "engine.warm_start.steps=50", "engine.num_val_problems=16",
        "engine.pass_at_k.num_problems=0", "engine.progress_bar=false", "engine.plot=false",
        "checkpointing.save_period=2", *extra,
    ]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    """The warm start, trained once for the module (so runs under a file-size limit only read it)."""
    cache = tmp_path_factory.mktemp("warm")
    run_local(compose_config(CONFIG, overrides(tmp_path_factory.mktemp("warmup"), cache, steps=1)))
    return cache


def steps_of(folder):
    return [r["step"] for r in read_metrics(os.path.join(folder, "metrics.jsonl"))]


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def snapshot(folder):
    """Every file under ``folder`` with its bytes: a refused run must leave all of them as they were."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def main(capsys, args):
    code = train.main(["--config-name", CONFIG, *args])
    return code, capsys.readouterr().err.strip().splitlines()


def start_cli(args, log):
    """``python -m nemo_entropy.train`` in a subprocess (its own process group, so that a cleanup can reach it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NEMO_ENTROPY_PROGRESS": "off"}
    return subprocess.Popen([sys.executable, "-m", "nemo_entropy.train", "--config-name", CONFIG, *args],
                            stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait_for(condition, seconds, what):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {seconds} s waiting for {what}")


def alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (dead, not yet reaped) counts as gone once its last thread has exited
        with open(f"/proc/{pid}/stat") as fh:
            zombie = fh.read().split(")")[-1].split()[0] == "Z"
        return not zombie or len(os.listdir(f"/proc/{pid}/task")) > 1
    except OSError:
        return True


def kill(pids):
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


# ----------------------------------------------------------------------------------------------- case 1: one writer
def test_a_second_run_into_a_live_run_folder_is_refused_naming_the_holder(tmp_path, cache_dir, capsys):
    folder = tmp_path / "run"
    with open(tmp_path / "first.log", "w") as log:
        first = start_cli(overrides(folder, cache_dir, steps=400), log)
    try:
        wait_for(lambda: len(steps_of(folder)) >= 3, 120, "the first run's third metrics line")
        code, err = main(capsys, overrides(folder, cache_dir, steps=3, extra=["loss_fn.kl_cov_coef=5"]))
        assert code == 2 and len(err) == 1, err
        assert f"run folder {folder} is in use by another run" in err[0]
        assert f"pid {first.pid} on host {socket.gethostname()}, started 20" in err[0]
        assert first.poll() is None
    finally:
        kill([first.pid])
        first.wait(timeout=30)
    steps = steps_of(folder)
    assert steps == list(range(len(steps)))  # the first run's lines only, none lost, none repeated


def test_spawned_workers_never_outlive_their_launcher(tmp_path, cache_dir):
    folder = tmp_path / "run"
    with open(tmp_path / "launcher.log", "w") as log:
        launcher = start_cli(overrides(folder, cache_dir, steps=400, extra=["engine.nproc=2"]), log)
    workers = []
    try:
        wait_for(lambda: len(steps_of(folder)) >= 2, 180, "the 2-process run's second metrics line")
        workers = [r["pid"] for r in json.loads((folder / "run_info.json").read_text())["ranks"]]
        assert len(workers) == 2 and launcher.pid not in workers and all(alive(p) for p in workers)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=30)
        wait_for(lambda: not any(alive(p) for p in workers), 30, f"the workers {workers} to end with their launcher")
    finally:
        kill([launcher.pid, *workers])
    RunFolderLock(str(folder)).acquire().release()  # and the folder is free again


def test_compare_refuses_a_config_listed_twice(tmp_path, capsys):
    from nemo_entropy.engine.compare import main as compare

    code = compare(["--out", str(tmp_path / "cmp"), "--configs", "local_grpo,local_grpo", "--seeds", "1,",
                    "--steps", "1", *overrides("x", tmp_path / "warm", steps=1)[:1], "engine.warm_start.steps=5",
                    "engine.progress_bar=false", "engine.plot=false", "engine.pass_at_k.num_problems=0"])
    err = capsys.readouterr().err
    assert code == 2 and "names local_grpo more than once" in err
    assert not (tmp_path / "cmp" / "local_grpo").exists()


# ----------------------------------------------------------------------------------------------- case 2: the config
def test_resuming_with_another_config_is_refused_and_writes_nothing(tmp_path, cache_dir, capsys):
    folder = tmp_path / "run"
    assert main(capsys, overrides(folder, cache_dir, steps=2))[0] == 0
    before = snapshot(folder)

    code, err = main(capsys, overrides(folder, cache_dir, steps=2, extra=["loss_fn.kl_cov_ratio=0.5"]))
    assert code == 2 and len(err) == 1
    assert "loss_fn.kl_cov_ratio: 0.002 in the folder, 0.5 now" in err[0] and str(folder) in err[0]

    code, err = train.main(["--config-name", "local_clip_cov", *overrides(folder, cache_dir, steps=4)]), \
        capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert "loss_fn.method: 'ppo' in the folder, 'clip_cov' now" in err[0]
    assert "grpo.max_num_steps: 2 in the folder, 4 now" in err[0]
    assert snapshot(folder) == before  # nothing of a refused run was written

    # More steps is a safe change, allowed when asked for: the run continues where it stopped.
    code, err = main(capsys, overrides(folder, cache_dir, steps=4))
    assert code == 2 and "add engine.resume_allow_changes=[grpo.max_num_steps]" in err[0]
    assert snapshot(folder) == before
    code, _ = main(capsys, overrides(folder, cache_dir, steps=4, extra=["engine.resume_allow_changes=[grpo.max_num_steps]"]))
    assert code == 0 and steps_of(folder) == [0, 1, 2, 3, 4]
    assert json.loads((folder / "run_config.json").read_text())["grpo"]["max_num_steps"] == 4


def test_only_safe_keys_may_be_allowed_to_change(tmp_path, cache_dir, capsys):
    code, err = main(capsys, overrides(tmp_path / "run", cache_dir, extra=["engine.resume_allow_changes=[loss_fn.method]"]))
    assert code == 2 and "engine.resume_allow_changes=['loss_fn.method'] is invalid" in err[0]


# ----------------------------------------------------------------------------------------------- case 3: checkpoints
def _flip(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 400] = bytes(b ^ 0xFF for b in data[middle:middle + 400])
    path.write_bytes(bytes(data))


DAMAGE = {
    "flipped": _flip,
    "truncated": lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3]),
    "empty": lambda p: p.write_bytes(b""),
    "missing": lambda p: p.unlink(),
    "bad_meta": lambda p: (p.parent / "meta.json").write_text("{not json"),
}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cache_dir):
    """An uninterrupted 4-step run: checkpoints at steps 2 and 4."""
    folder = tmp_path_factory.mktemp("reference") / "run"
    run_local(compose_config(CONFIG, overrides(folder, cache_dir, steps=4)))
    return folder


def copy_run(source, folder):
    """A copy of a finished run that remembers its own folder (the config names logger.log_dir)."""
    import shutil

    shutil.copytree(source, folder)
    remembered = folder / "run_config.json"
    if remembered.exists():
        remembered.write_text(remembered.read_text().replace(str(source), str(folder)))
    return folder


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_a_damaged_newest_checkpoint_is_skipped_for_the_newest_intact_one(damage, reference, tmp_path, cache_dir,
                                                                          capfd):
    folder = copy_run(reference, tmp_path / "run")
    newest = Path(step_dir(str(folder / "checkpoints"), 4)) / "rank_00000.pt"
    DAMAGE[damage](newest)
    capfd.readouterr()
    result = run_local(compose_config(CONFIG, overrides(folder, cache_dir, steps=4)))
    out = capfd.readouterr().out
    assert result["resumed_from"] == 2
    notes = [line for line in out.splitlines() if "checkpoint damaged" in line]
    shown = newest.parent / "meta.json" if damage == "bad_meta" else newest
    assert len(notes) == 1 and str(shown) in notes[0] and f"step 2 ({step_dir(str(folder / 'checkpoints'), 2)})" in notes[0]
    assert without_timing(read_metrics(folder / "metrics.jsonl")) == without_timing(
        read_metrics(reference / "metrics.jsonl"))


def test_no_intact_checkpoint_stops_naming_the_files_and_the_remedy(reference, tmp_path, cache_dir, capsys):
    folder = copy_run(reference, tmp_path / "run")
    for step in (2, 4):
        _flip(Path(step_dir(str(folder / "checkpoints"), step)) / "rank_00000.pt")
    metrics = (folder / "metrics.jsonl").read_bytes()
    code, err = main(capsys, overrides(folder, cache_dir, steps=4))
    assert code == 1 and len(err) == 1
    for step in (2, 4):
        assert f"{step_dir(str(folder / 'checkpoints'), step)}/rank_00000.pt" in err[0]
    assert "checksum mismatch" in err[0] and "Restore these files" in err[0]
    assert (folder / "metrics.jsonl").read_bytes() == metrics


# ----------------------------------------------------------------------------------------------- case 5: disk errors
def test_a_log_dir_that_cannot_be_created_is_one_line(tmp_path, cache_dir, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, err = main(capsys, overrides(blocker / "run", cache_dir))
    assert code == 1 and len(err) == 1
    assert str(blocker / "run") in err[0] and "logger.log_dir" in err[0] and "Not a directory" in err[0]


def test_a_full_disk_while_checkpointing_is_one_line_and_leaves_no_tmp(tmp_path, cache_dir):
    """A file-size limit stands in for a full disk: the checkpoint write fails with the OS's reason."""
    folder = tmp_path / "run"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
        resource.setrlimit(resource.RLIMIT_FSIZE, (64_000, 64_000))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "NEMO_ENTROPY_PROGRESS": "off"}
    proc = subprocess.run([sys.executable, "-m", "nemo_entropy.train", "--config-name", CONFIG,
                           *overrides(folder, cache_dir, steps=2)], capture_output=True, text=True, env=env,
                          preexec_fn=limit, timeout=300)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert err[-1].startswith(f"nemo-entropy train: cannot write {step_dir(str(folder / 'checkpoints'), 2)}/")
    assert "File too large (EFBIG)" in err[-1] and "checkpointing.checkpoint_dir" in err[-1]
    assert "Traceback" not in proc.stderr
    assert not [p for p in folder.rglob("*") if ".tmp" in p.name]
    assert steps_of(folder) == [0, 1, 2]


# ----------------------------------------------------------------------------------------------- case 6: Ctrl-C
def test_ctrl_c_checkpoints_at_the_step_boundary_and_exits_130(tmp_path, cache_dir):
    folder = tmp_path / "run"
    with open(tmp_path / "run.log", "w") as log:
        proc = start_cli(overrides(folder, cache_dir, steps=400, extra=["checkpointing.save_period=1000"]), log)
    try:
        wait_for(lambda: len(steps_of(folder)) >= 2, 120, "the run's second metrics line")
        os.kill(proc.pid, signal.SIGINT)
        assert proc.wait(timeout=120) == 130
    finally:
        kill([proc.pid])
    lines = (tmp_path / "run.log").read_text().strip().splitlines()
    last = steps_of(folder)[-1]
    assert lines[-1] == (f"nemo-entropy train: interrupted (Ctrl-C): checkpoint of step {last} saved in "
                         f"{step_dir(str(folder / 'checkpoints'), last)}; run the same command to resume")
    assert "Traceback" not in "\n".join(lines)
    assert os.path.exists(os.path.join(step_dir(str(folder / "checkpoints"), last), "COMPLETE"))


def test_ctrl_c_resumes_identically_and_a_second_ctrl_c_stops_at_once(tmp_path, cache_dir, reference):
    folder = tmp_path / "run"
    cfg = compose_config(CONFIG, overrides(folder, cache_dir, steps=4, extra=["checkpointing.save_period=1000"]))

    def ctrl_c(step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(Interrupted) as exc:
        run_local(cfg, _after_step=ctrl_c)
    assert exc.value.exit_code == 130 and steps_of(folder) == [0, 1]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    assert run_local(cfg)["resumed_from"] == 1
    assert without_timing(read_metrics(folder / "metrics.jsonl")) == without_timing(
        read_metrics(reference / "metrics.jsonl"))

    def ctrl_c_twice(step):
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    other = compose_config(CONFIG, overrides(tmp_path / "twice", cache_dir, steps=4))
    with pytest.raises(KeyboardInterrupt):
        run_local(other, _after_step=ctrl_c_twice)
    assert steps_of(tmp_path / "twice") == [0, 1]


# ----------------------------------------------------------------------------------------------- case 7: atomic rewrites
def test_a_crash_while_metrics_are_rewritten_on_resume_keeps_the_old_file(tmp_path, monkeypatch):
    from nemo_entropy.engine import metrics as metrics_mod

    log = MetricsLog(str(tmp_path), enabled=True, tensorboard=False, resume_step=None)
    for step in range(6):
        log.write(step, {"reward_mean": step / 10})
    log.close()
    before = (tmp_path / "metrics.jsonl").read_bytes()
    real = json.dumps

    def crash_on_step_2(obj, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("step") == 2:
            raise OSError("killed while writing")
        return real(obj, *args, **kwargs)

    monkeypatch.setattr(metrics_mod.json, "dumps", crash_on_step_2)
    with pytest.raises(OSError):
        MetricsLog(str(tmp_path), enabled=True, tensorboard=False, resume_step=3)
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_bytes() == before
    MetricsLog(str(tmp_path), enabled=True, tensorboard=False, resume_step=3).close()
    assert [r["step"] for r in read_metrics(str(tmp_path / "metrics.jsonl"))] == [0, 1, 2, 3]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
