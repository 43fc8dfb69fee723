"""The user's command on the shipped cluster configs, against NeMo-RL's real code.

For every cluster config in ``conf/`` this runs, in a fresh process,

    python -m nemo_entropy.train --config-name NAME nemo_rl.root=$NEMO_RL_ROOT <HARNESS_OVERRIDES>

which composes our config, merges it onto NeMo-RL's shipped ``examples/configs/grpo_math_1B.yaml``, resolves it
with NeMo-RL's resolvers, validates it as NeMo-RL's ``MasterConfig``, installs the plugin and runs NeMo-RL's own
``examples/run_grpo.py`` ``main()``: ``init_ray`` (attached to the CPU Ray started here), ``get_tokenizer``,
``configure_generation_config``, the trainer dispatch and ``grpo_train``. The overrides replace only what needs
GPUs or downloads (docs/nemo_rl.md, "The CLI harness"); ``cli_setup.py`` says which two NeMo-RL functions are
replaced on CPU and why. Each run must complete two GRPO steps (four optimizer steps) with our loss in the loop.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from . import tiny
from .cli_setup import ENV

REPO = Path(__file__).resolve().parents[2]
CLUSTER_CONFIGS = ("grpo_7b_kl_cov", "grpo_7b_clip_cov", "grpo_32b_kl_cov", "grpo_32b_clip_cov", "grpo_32b_baseline")
STEPS = 2


def harness_overrides(model_dir: Path, run_dir: Path) -> list[str]:
    """Every place where the harness's run differs from a real one (each documented in docs/nemo_rl.md)."""
    return [
        # the model: a local tiny Qwen2 folder (its tokenizer; weights from the warm start) instead of the hub's
        f"policy.model_name={model_dir}",
        # the cluster size: one CPU "GPU", so TP = PP = CP = 1 and vLLM TP 1
        "cluster.num_nodes=1", "cluster.gpus_per_node=1",
        "policy.megatron_cfg.tensor_model_parallel_size=1", "policy.megatron_cfg.pipeline_model_parallel_size=1",
        "policy.megatron_cfg.context_parallel_size=1", "policy.megatron_cfg.sequence_parallel=false",
        "policy.generation.vllm_cfg.tensor_parallel_size=1",
        # the number of steps and the size of a step: 4 prompts x 4 samples, 2 optimizer steps per GRPO step
        f"grpo.max_num_steps={STEPS}", "grpo.num_prompts_per_step=4", "grpo.num_generations_per_prompt=4",
        "policy.train_global_batch_size=8", "policy.train_micro_batch_size=2", "policy.logprob_batch_size=4",
        # the tiny task's lengths (prompt 5 + answer <= 3 tokens) instead of 2048 + 8192
        "policy.max_total_sequence_length=16", f"policy.generation.max_new_tokens={tiny.TASK.max_response_length}",
        # where: the test's folder; no GPU monitoring without GPUs
        f"logger.log_dir={run_dir / 'logs'}", f"checkpointing.checkpoint_dir={run_dir / 'checkpoints'}",
        "logger.monitor_gpus=false",
    ]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def cli_env(nemo_rl_root, tmp_path_factory):
    """The environment of the command's process: a CPU Ray head it attaches to (as a Slurm job's driver attaches
    to the Ray that ``ray.sub`` started), the tiny model folder and the harness settings."""
    work = tmp_path_factory.mktemp("cli")
    model_dir = work / "tiny-qwen2"
    tiny.build_tokenizer().save_pretrained(model_dir)
    pretrained = tiny.warm_start(work / "pretrained.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_MODE"] = "disabled"  # a loopback-only test cluster
    port = _free_port()
    ray = str(Path(sys.executable).with_name("ray"))
    subprocess.run([ray, "start", "--head", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
                    "--include-dashboard=false", "--disable-usage-stats"], env=env, check=True,
                   capture_output=True, timeout=120)
    env.update({
        "RAY_ADDRESS": f"127.0.0.1:{port}",
        "PYTHONPATH": os.pathsep.join([str(Path(__file__).with_name("cli_site")), str(REPO), str(nemo_rl_root)]),
        ENV: json.dumps({"pretrained": str(pretrained), "prompts": 48, "seed": 7}),
        "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
    })
    yield env, model_dir, work
    subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (tensorboard,) = log_dir.rglob("tensorboard")  # <log_dir>/exp_001/tensorboard (NeMo-RL's experiment folder)
    acc = EventAccumulator(str(tensorboard), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_the_cli_runs_the_shipped_config_through_nemo_rl_grpo_train(name, cli_env, nemo_rl_root):
    env, model_dir, work = cli_env
    run_dir = work / name
    command = [sys.executable, "-m", "nemo_entropy.train", "--config-name", name, f"nemo_rl.root={nemo_rl_root}",
               *harness_overrides(model_dir, run_dir)]
    done = subprocess.run(command, env=env, cwd=work, capture_output=True, text=True, timeout=900)
    log = done.stdout + done.stderr
    (run_dir / "command.log").parent.mkdir(parents=True, exist_ok=True)
    (run_dir / "command.log").write_text(log)
    assert done.returncode == 0, log[-6000:]

    # the merged config NeMo-RL ran: resolved (NeMo-RL's ${mul:...} included), our keys in its loss_fn section
    merged = (run_dir / "logs" / "nemo_rl_config.yaml").read_text()
    assert "${" not in merged and "train_mb_tokens: 32" in merged        # 16 tokens x micro-batch 2
    assert "Running synchronous GRPO training (legacy)" in log           # run_grpo.py's dispatch to grpo_train
    assert "[harness] CPU setup" in log and "loss EntropyControlLossFn" in log

    scalars = _scalars(run_dir / "logs")
    method = {"grpo_32b_baseline": "ppo"}.get(name, name.split("_", 2)[2])
    # NeMo-RL logged both GRPO steps' training metrics, and our loss's metrics among them
    assert sorted(scalars["train/loss"]) == [1, 2]
    assert sorted(scalars["train/num_valid_tokens"]) == [1, 2]
    selected = scalars["train/selected_fraction"]
    assert sorted(selected) == [1, 2]
    if method == "ppo":
        assert all(v == 0.0 for v in selected.values())
    else:
        assert all(v > 0.0 for v in selected.values()), selected
    # two optimizer steps per GRPO step: the plugin's state in NeMo-RL's last checkpoint counts 4 plan steps
    state = json.loads((run_dir / "checkpoints" / f"step_{STEPS}" / "nemo_entropy_controls.json").read_text())
    assert state["optimizer_step"] == 2 * STEPS
