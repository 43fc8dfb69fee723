"""slurm/32b_kl_cov.sbatch on a real Slurm: one slurmctld and two slurmd (nodes n1, n2) on this machine.

The session fixture starts the cluster with tests/slurm/cluster.sh (munge, slurmctld, `slurmd -N n1/n2`)
and stops it at the end. The jobs select `+preset=local_tiny` (backend=local: the embedded CPU engine
under torchrun, one agent per node) and `--gpus-per-node=0` (the test nodes have no GPUs).

Skips, with the reason, where Slurm cannot run: not root, or the Debian packages are missing and
slurm/ci/install_slurm.sh could not install them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CLUSTER_SH = REPO / "tests" / "slurm" / "cluster.sh"
SBATCH = REPO / "slurm" / "32b_kl_cov.sbatch"
TOOLS = ("slurmctld", "slurmd", "sbatch", "scontrol", "squeue", "scancel", "munged")
FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}
# Small and quick: a short warm start; the requeue test needs enough steps to be signalled mid-run.
TINY = ["+preset=local_tiny", "cluster.num_nodes=2", "engine.progress_bar=false", "engine.warm_start.steps=50",
        "engine.plot=false"]

pytestmark = [pytest.mark.slurm, pytest.mark.timeout(300)]


# The daemons live in /usr/sbin, which a non-login root shell (CI) may not have on PATH.
SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool, path=SEARCH_PATH) is None]


@pytest.fixture(scope="module")
def slurm_env():
    """Start the two-node cluster (idempotent) and yield the environment that reaches it."""
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("the Slurm tests need root (slurmd and munged run as root / munge)")
    if missing_tools():
        subprocess.run(["bash", str(REPO / "slurm" / "ci" / "install_slurm.sh")], capture_output=True, timeout=600)
    if missing_tools():
        pytest.skip(f"Slurm is not installed and could not be installed ({', '.join(missing_tools())} missing): "
                    "run slurm/ci/install_slurm.sh as root")
    started = subprocess.run(["bash", str(CLUSTER_SH), "start"], capture_output=True, text=True, timeout=180)
    assert started.returncode == 0, f"the test Slurm did not start:\n{started.stdout}\n{started.stderr}"
    conf = re.search(r"^SLURM_CONF=(.+)$", started.stdout, flags=re.M).group(1)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for key in ("CONTAINER", "MOUNTS", "NEMO_ENTROPY_PYTHON", "NEMO_ENTROPY_CONF_DIR", "DRY_RUN"):
        env.pop(key, None)
    env.update(SLURM_CONF=conf, OMP_NUM_THREADS="1", PATH=SEARCH_PATH)
    yield env
    subprocess.run(["bash", str(CLUSTER_SH), "stop"], capture_output=True, text=True, timeout=120)


def submit(env: dict, cwd: Path, *overrides: str, nodes: int = 2) -> str:
    """sbatch the 32B KL-Cov script from ``cwd`` on ``nodes`` CPU nodes; returns the job id."""
    result = subprocess.run(
        ["sbatch", "--parsable", f"--nodes={nodes}", "--gpus-per-node=0", str(SBATCH), *overrides],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().split(";")[0]


def job_fields(env: dict, job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for_job(env: dict, job_id: str, cwd: Path, timeout: float = 240) -> dict[str, str]:
    """Poll until the job reaches a final state (through any requeue); returns scontrol's fields."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = job_fields(env, job_id)
        if fields.get("JobState") in FINAL_STATES:
            return fields
        time.sleep(1)
    subprocess.run(["scancel", job_id], env=env)
    pytest.fail(f"job {job_id} did not finish in {timeout}s; output:\n{batch_output(cwd, job_id)}")


def batch_output(cwd: Path, job_id: str) -> str:
    files = list(cwd.glob(f"*-{job_id}.out"))
    return files[0].read_text() if files else "(no batch output file)"


def metric_steps(log_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (log_dir / "metrics.jsonl").read_text().splitlines()]


def elapsed_seconds(fields: dict[str, str]) -> float:
    start, end = (time.mktime(time.strptime(fields[k], "%Y-%m-%dT%H:%M:%S")) for k in ("StartTime", "EndTime"))
    return end - start


def test_32b_kl_cov_sbatch_runs_across_two_nodes(slurm_env, tmp_path):
    steps = 4
    job = submit(slurm_env, tmp_path, *TINY, f"grpo.max_num_steps={steps}")
    fields = wait_for_job(slurm_env, job, tmp_path)
    output = batch_output(tmp_path, job)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", output
    log_dir = tmp_path / "logs" / job
    assert f"logs in {log_dir}" in output and "trainer finished" in output
    run_info = json.loads((log_dir / "run_info.json").read_text())
    assert run_info["world_size"] == 2
    assert sorted(rank["node"] for rank in run_info["ranks"]) == ["n1", "n2"]
    recorded = metric_steps(log_dir)
    assert recorded == list(range(recorded[0], steps + 1)) and recorded[0] in (0, 1)
    # one agent per node wrote its own log; the launcher's log and the composed facts are there too
    assert {p.name for p in log_dir.glob("train-node*.log")} == {"train-node0.log", "train-node1.log"}
    assert (log_dir / "launcher.log").is_file() and "NE_BACKEND=local" in (log_dir / "config.env").read_text()


def test_preempt_signal_checkpoints_requeues_and_resumes_without_losing_a_step(slurm_env, tmp_path):
    steps = 60
    job = submit(slurm_env, tmp_path, *TINY, f"grpo.max_num_steps={steps}")
    log_dir = tmp_path / "logs" / job
    metrics = log_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):
        assert time.monotonic() < deadline, f"no metrics after 180 s:\n{batch_output(tmp_path, job)}"
        assert job_fields(slurm_env, job).get("JobState") in ("PENDING", "RUNNING"), batch_output(tmp_path, job)
        time.sleep(0.2)
    # What Slurm does --signal=B:USR1@600 before the time limit: signal the batch shell only.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=slurm_env, check=True)
    fields = wait_for_job(slurm_env, job, tmp_path)
    output = batch_output(tmp_path, job)
    assert fields["JobState"] == "COMPLETED" and fields["ExitCode"] == "0:0", output
    assert fields["Restarts"] == "1", output
    assert "received USR1" in output and f"scontrol requeue {job}" in output
    train_logs = "".join(p.read_text() for p in sorted(log_dir.glob("train-node*.log")))
    saved = re.findall(r"checkpoint of step (\d+) saved", train_logs)
    resumed = re.findall(r"resumed from step (\d+)", train_logs)
    assert saved and resumed and set(saved) == set(resumed), train_logs[-3000:]
    assert 1 <= int(resumed[0]) < steps, "the signal must land mid-run"
    recorded = metric_steps(log_dir)
    assert recorded == list(range(recorded[0], steps + 1)) and recorded[0] in (0, 1), recorded


def test_missing_model_path_and_node_mismatch_fail_fast_naming_the_cause(slurm_env, tmp_path):
    missing = "/nonexistent/models/Qwen2.5-32B"
    model_job = submit(slurm_env, tmp_path, "cluster.num_nodes=2", f"policy.model_name={missing}")
    count_job = submit(slurm_env, tmp_path, "+preset=local_tiny")  # the preset says 1 node; we got 2
    for job, cause in (
        (model_job, f"policy.model_name={missing}: model path does not exist"),
        (count_job, "node-count mismatch: cluster.num_nodes=1 but the allocation has 2 node(s)"),
    ):
        fields = wait_for_job(slurm_env, job, tmp_path, timeout=120)
        output = batch_output(tmp_path, job)
        assert fields["JobState"] == "FAILED" and fields["ExitCode"] == "2:0", output
        assert "cannot start" in output and cause in output, output
        assert elapsed_seconds(fields) <= 30, f"took {elapsed_seconds(fields)} s to fail"
        log_dir = tmp_path / "logs" / job
        # nothing was started: no trainer, no Ray
        assert not list(log_dir.glob("train-node*.log")) and not list(log_dir.glob("ray-*.log"))
