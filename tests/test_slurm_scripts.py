"""The Slurm scripts without a Slurm: lint, dry-run commands, config reading, torchrun exit codes.

The real cluster runs are in test_slurm_cluster.py; these take seconds and run everywhere.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parents[1]
SLURM = REPO / "slurm"
SBATCH_SCRIPTS = sorted(SLURM.glob("*.sbatch"))
SHELL_SCRIPTS = SBATCH_SCRIPTS + sorted(SLURM.rglob("*.sh")) + sorted((REPO / "tests" / "slurm").glob("*.sh"))
EXPECTED_SBATCH = {
    "32b_kl_cov": "grpo_32b_kl_cov",
    "32b_clip_cov": "grpo_32b_clip_cov",
    "32b_grpo": "grpo_32b_baseline",
    "7b_kl_cov": "grpo_7b_kl_cov",
    "7b_clip_cov": "grpo_7b_clip_cov",
}


def load_module(name: str):
    """Import slurm/<name>.py (slurm/ is a folder of scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"slurm_{name}", SLURM / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment minus anything that would make the launcher think it is in a job."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    for key in ("CONTAINER", "MOUNTS", "NEMO_ENTROPY_PYTHON", "NEMO_ENTROPY_CONF_DIR", "HF_HOME", "DRY_RUN"):
        env.pop(key, None)
    env.update(extra)
    return env


def dry_run(script: str, *overrides: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`DRY_RUN=1 bash slurm/<script>.sbatch overrides...` on a "login node" (no allocation)."""
    return subprocess.run(
        ["bash", str(SLURM / f"{script}.sbatch"), *overrides],
        cwd=cwd, env=clean_env(DRY_RUN="1", **env), capture_output=True, text=True, timeout=120,
    )


def planned(output: str) -> list[str]:
    """The commands a dry run printed (lines starting with '+ ')."""
    return [line[2:] for line in output.splitlines() if line.startswith("+ ")]


# ------------------------------------------------------------------------------------------- scripts
def test_every_script_is_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed: run slurm/ci/install_slurm.sh (CI does)")
    assert len(SBATCH_SCRIPTS) == 5
    result = subprocess.run(["shellcheck", "-x", *map(str, SHELL_SCRIPTS)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("script,config", sorted(EXPECTED_SBATCH.items()))
def test_sbatch_header_matches_its_config(script, config):
    """Each header asks for what its config's cluster section needs, with the pre-emption setup."""
    text = (SLURM / f"{script}.sbatch").read_text()
    header = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.M))
    assert f'launch.sh" {config} "$@"' in text
    cfg = load_module("read_config").compose(str(REPO / "conf"), config, [])
    assert int(header["nodes"]) == cfg.cluster.num_nodes
    assert int(header["gpus-per-node"]) == cfg.cluster.gpus_per_node
    assert header["ntasks-per-node"] == "1"
    assert "exclusive" in header and "requeue" in header
    signal, seconds = header["signal"].split("@")
    assert signal == "B:USR1" and int(seconds) >= 60
    assert header["open-mode"] == "append"  # a requeued run appends to the same output file


# ------------------------------------------------------------------------------------------- dry run
def test_dry_run_local_prints_one_torchrun_agent_per_node(tmp_path):
    result = dry_run("32b_kl_cov", "+preset=local_tiny", "cluster.num_nodes=2", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    commands = planned(result.stdout)
    (step,) = [c for c in commands if c.startswith("srun ")]
    assert "--nodes=2 --ntasks=2 --ntasks-per-node=1" in step
    assert f"{SLURM}/torchrun_node.py --head-node node1 --" in step
    assert "--nnodes=2 --nproc-per-node=1 --rdzv-backend=c10d --rdzv-endpoint=node1:" in step
    assert step.endswith(
        f"-m nemo_entropy.train --config-dir {REPO}/conf --config-name grpo_32b_kl_cov "
        f"+preset=local_tiny cluster.num_nodes=2 logger.log_dir={tmp_path}/logs/dryrun &"
    )
    assert "scontrol requeue" in commands[-1]
    assert not (tmp_path / "logs").exists(), "a dry run must not create anything"


def test_dry_run_nemo_rl_prints_ray_head_workers_and_driver(tmp_path):
    # The dry run composes the config with a host Python and leaves path checks to the job.
    image = "nvcr.io#nvidia/nemo-rl:v0.4.0"
    result = dry_run("32b_kl_cov", cwd=tmp_path, CONTAINER=image, MOUNTS=f"{tmp_path}:/data")
    assert result.returncode == 0, result.stdout + result.stderr
    sruns = [c for c in planned(result.stdout) if c.startswith("srun ")]
    preflight, head, workers, driver = sruns  # the preflight runs before Ray starts
    assert "--nodes=1 --ntasks=1 --nodelist=node1" in preflight
    # the preflight checks this job's config: the driver's config name and overrides, composed the same way
    train_args = driver.split("python -m nemo_entropy.train ", 1)[1].removesuffix(" &")
    assert preflight.endswith(f"python -m nemo_entropy.cli check-nemo-rl {train_args}")
    assert "--config-name grpo_32b_kl_cov" in train_args and "logger.log_dir=" in train_args
    for step in sruns:
        assert f"'--container-image={image}'" in step
        assert f"--container-mounts={tmp_path}:/data,{REPO}:{REPO}" in step
    assert "--nodes=1 --ntasks=1 --nodelist=node1" in head and "ray start --head" in head
    assert "--nodes=3 --ntasks=3 --ntasks-per-node=1 --exclude=node1" in workers
    assert "ray start --address=node1:6379" in workers
    # Head and workers never share a service port (two "nodes" may share one host).
    head_ports = set(re.findall(r"-port=(\d+)", head))
    worker_ports = set(re.findall(r"-port=(\d+)", workers)) - {"6379"}
    assert head_ports and worker_ports and not head_ports & worker_ports
    assert "--nodelist=node1" in driver
    assert "ray_wait.py --address node1:6379 --nodes 4 --timeout 600 -- python -m nemo_entropy.train" in driver


def test_dry_run_names_a_missing_model_path(tmp_path):
    result = dry_run("7b_kl_cov", "policy.model_name=/no/such/Qwen2.5-7B", cwd=tmp_path, HF_HOME=str(tmp_path))
    assert result.returncode == 2
    assert "policy.model_name=/no/such/Qwen2.5-7B: model path does not exist" in result.stdout
    assert not [c for c in planned(result.stdout) if c.startswith("srun ")]


def test_launch_outside_slurm_refuses_without_dry_run(tmp_path):
    result = subprocess.run(["bash", str(SLURM / "32b_kl_cov.sbatch")], cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "not inside a Slurm allocation" in result.stdout


# ------------------------------------------------------------------------------------------- read_config
def run_read_config(*overrides: str, config: str = "grpo_32b_kl_cov", cwd: Path, **env: str):
    return subprocess.run(
        [sys.executable, str(SLURM / "read_config.py"), "--config-dir", str(REPO / "conf"), "--config-name", config,
         "--check-paths", "--", *overrides],
        cwd=cwd, env=clean_env(**env), capture_output=True, text=True, timeout=120,
    )


def shell_facts(stdout: str) -> dict[str, str]:
    """Evaluate read_config's assignments with bash and read them back."""
    script = stdout + 'printf "%s\\n" "BACKEND=$NE_BACKEND" "NODES=$NE_NUM_NODES" "CKPT=$NE_CHECKPOINT_DIR" ' \
                      '"${NE_PROBLEMS[@]/#/PROBLEM=}"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True).stdout
    facts: dict[str, list[str]] = {}
    for line in out.splitlines():
        key, _, value = line.partition("=")
        facts.setdefault(key, []).append(value)
    return facts


def test_read_config_reports_the_composed_cluster_and_paths(tmp_path):
    result = run_read_config("+preset=local_tiny", "cluster.num_nodes=3", "logger.log_dir=run", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    facts = shell_facts(result.stdout)
    assert facts["BACKEND"] == ["local"] and facts["NODES"] == ["3"]
    # checkpoint_dir interpolates logger.log_dir in the preset; relative paths are made absolute.
    assert facts["CKPT"] == [str(tmp_path / "run" / "checkpoints")]
    assert "PROBLEM" not in facts


def test_read_config_names_hub_cache_problems(tmp_path, monkeypatch):
    model_problems = load_module("read_config").model_problems
    for var in ("HF_HOME", "HF_HUB_CACHE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    (problem,) = model_problems("policy.model_name", "Qwen/Qwen2.5-32B", needs_hf_home=True)
    assert problem.startswith("policy.model_name=Qwen/Qwen2.5-32B is a hub id but HF_HOME is not set")
    assert model_problems("engine.model_path", "Qwen/Qwen2.5-32B", needs_hf_home=False) == []
    hf_home = tmp_path / "hf"
    hf_home.mkdir()
    monkeypatch.setenv("HF_HOME", str(hf_home))
    assert model_problems("policy.model_name", "Qwen/Qwen2.5-32B", needs_hf_home=True) == []
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (problem,) = model_problems("policy.model_name", "Qwen/Qwen2.5-32B", needs_hf_home=True)
    assert "offline mode" in problem and str(hf_home / "hub" / "models--Qwen--Qwen2.5-32B") in problem
    (hf_home / "hub" / "models--Qwen--Qwen2.5-32B").mkdir(parents=True)
    assert model_problems("policy.model_name", "Qwen/Qwen2.5-32B", needs_hf_home=True) == []
    (problem,) = model_problems("policy.model_name", str(tmp_path / "weights"), needs_hf_home=True)
    assert problem.startswith(f"policy.model_name={tmp_path / 'weights'}: model path does not exist")
    (tmp_path / "weights").mkdir()
    assert model_problems("policy.model_name", str(tmp_path / "weights"), needs_hf_home=True) == []


def test_read_config_names_missing_data_and_bad_values(tmp_path):
    result = run_read_config("++data.train.data_path=/no/such/train.jsonl", "loss_fn.kl_cov_ratio=-1", cwd=tmp_path)
    problems = shell_facts(result.stdout)["PROBLEM"]
    assert any(p.startswith("data.train.data_path=/no/such/train.jsonl: data path does not exist") for p in problems)
    assert any("invalid config" in p and "kl_cov_ratio" in p for p in problems)


def test_read_config_fails_on_an_override_that_does_not_compose(tmp_path):
    result = run_read_config("cluster.no_such_key=1", cwd=tmp_path)
    assert result.returncode == 2
    assert "no_such_key" in result.stderr


# ------------------------------------------------------------------------------------------- torchrun_node
def test_torchrun_node_marks_only_the_head_as_rendezvous_host():
    torchrun_node = load_module("torchrun_node")
    argv = ["--nnodes=2", "-m", "nemo_entropy.train", "x=1"]
    assert torchrun_node.with_is_host(argv, True) == ["--rdzv-conf=is_host=1", *argv]
    assert torchrun_node.with_is_host(["--rdzv-conf=timeout=9", *argv], False)[0] == "--rdzv-conf=timeout=9,is_host=0"
    failure = lambda code: SimpleNamespace(exitcode=code)  # noqa: E731
    assert torchrun_node.requeue_requested({0: failure(3), 1: failure(3)})
    assert not torchrun_node.requeue_requested({0: failure(3), 1: failure(1)})
    assert not torchrun_node.requeue_requested({})


@pytest.mark.parametrize("worker_code,expected", [(3, 3), (1, 1)])
def test_torchrun_node_keeps_the_requeue_exit_code(tmp_path, worker_code, expected):
    """A real torchrun: plain torchrun would turn a worker's exit 3 into 1."""
    script = tmp_path / "worker.py"
    script.write_text(f"import sys\nsys.exit({worker_code})\n")
    result = subprocess.run(
        [sys.executable, str(SLURM / "torchrun_node.py"), "--head-node", "n1", "--",
         "--nnodes=1", "--nproc-per-node=1", "--standalone", str(script)],
        env=clean_env(SLURMD_NODENAME="n1", OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == expected, result.stdout + result.stderr


def test_ray_wait_needs_a_command():
    ray_wait = load_module("ray_wait")
    with pytest.raises(SystemExit):
        ray_wait.parse_args(["--address", "h:1", "--nodes", "2"])
    args, command = ray_wait.parse_args(["--address", "h:1", "--nodes", "2", "--", "python", "-V"])
    assert (args.address, args.nodes, command) == ("h:1", 2, ["python", "-V"])
