"""The run entry and the configs in conf/: every config composes, validates and dry-runs, with and without
overrides; wrong keys and values fail with errors naming them; the NeMo-RL backend's wiring (our loss put
into NeMo-RL's setup, the policy wrapped for the driver-side selection) works against a stand-in package
shaped like NeMo-RL's modules, and a missing NeMo-RL gives one clear error."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest

from nemo_entropy import train
from nemo_entropy.integrations import BatchSelectionPolicy, EntropyControlLossFn

CONF = Path(__file__).resolve().parent.parent / "conf"
OURS = ["grpo_7b_kl_cov", "grpo_7b_clip_cov", "grpo_32b_kl_cov", "grpo_32b_clip_cov", "grpo_32b_baseline"]
LOCAL = sorted(p.stem for p in CONF.glob("local_*.yaml"))  # the engine engineer's, when present
PAPER = {  # ANCHORS.md, the paper's recipes
    "grpo_7b_kl_cov": dict(method="kl_cov", ratio=2e-3, eps=0.2, model="Qwen/Qwen2.5-7B", nodes=2),
    "grpo_7b_clip_cov": dict(method="clip_cov", ratio=2e-4, eps=1.0, model="Qwen/Qwen2.5-7B", nodes=2),
    "grpo_32b_kl_cov": dict(method="kl_cov", ratio=2e-4, eps=0.2, model="Qwen/Qwen2.5-32B", nodes=4),
    "grpo_32b_clip_cov": dict(method="clip_cov", ratio=2e-4, eps=1.0, model="Qwen/Qwen2.5-32B", nodes=4),
    "grpo_32b_baseline": dict(method="ppo", ratio=0.0, eps=0.2, model="Qwen/Qwen2.5-32B", nodes=4),
}


def _validated(name, overrides=()):
    return train.validate_run_config(train.compose_config(name, overrides, CONF))


@pytest.mark.parametrize("name", OURS)
def test_paper_configs_compose_validate_and_carry_the_recipe(name):
    plain, loss, layout = _validated(name)
    want = PAPER[name]
    assert plain["backend"] == "nemo_rl"
    assert loss.method == want["method"] and loss.selection_ratio == want["ratio"]
    assert loss.ratio_clip_min == loss.ratio_clip_max == want["eps"]
    assert loss.reference_policy_kl_penalty == 0.0 and loss.token_level_loss
    if loss.method == "kl_cov":
        assert loss.kl_cov_coef == 1.0
    if loss.method == "clip_cov":
        assert (loss.clip_cov_lb, loss.clip_cov_ub) == (1.0, 5.0)
    grpo, policy = plain["grpo"], plain["policy"]
    assert (grpo["num_prompts_per_step"], grpo["num_generations_per_prompt"]) == (256, 8)
    assert grpo["num_prompts_per_step"] * grpo["num_generations_per_prompt"] // policy["train_global_batch_size"] == 8
    assert policy["model_name"] == want["model"]
    assert policy["megatron_cfg"]["enabled"] and not policy["dtensor_cfg"]["enabled"]
    assert policy["megatron_cfg"]["optimizer"]["lr"] == 1e-6
    assert policy["megatron_cfg"]["optimizer"]["weight_decay"] == 0.0
    assert policy["max_grad_norm"] == 1.0 and policy["megatron_cfg"]["optimizer"]["clip_grad"] == 1.0
    assert policy["generation"]["max_new_tokens"] == 8192 and plain["data"]["max_input_seq_length"] == 2048
    assert (policy["generation"]["temperature"], policy["generation"]["top_p"]) == (1.0, 1.0)
    assert plain["data"]["train"]["dataset_name"] == "DAPOMath17K"
    assert plain["cluster"]["num_nodes"] == want["nodes"] and layout.world == 8 * want["nodes"]
    assert layout.tp * layout.pp * layout.cp * layout.dp == layout.world


@pytest.mark.parametrize("layout_name,world,dp", [("32b_4n", 32, 4), ("32b_8n", 64, 8)])
def test_32b_layouts_on_4_and_8_nodes(layout_name, world, dp):
    _, _, layout = _validated("grpo_32b_kl_cov", [f"layout={layout_name}"])
    assert (layout.world, layout.dp, layout.backend) == (world, dp, "megatron")
    assert layout.tp <= 8


@pytest.mark.parametrize("name", OURS + LOCAL)
def test_every_config_dry_runs(name, capsys):
    assert train.main(["--config-name", name, "--config-dir", str(CONF), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# layout:" in out and "# would run" in out and "loss_fn:" in out


def test_overrides_reach_the_resolved_config(capsys):
    argv = ["--config-name", "grpo_32b_kl_cov", "--dry-run", "loss_fn.kl_cov_ratio=0.002", "cluster.num_nodes=8"]
    assert train.main(argv) == 0
    out = capsys.readouterr().out
    assert "kl_cov_ratio: 0.002" in out and "world 64 = TP 8 x PP 1 x CP 1 x DP 8" in out
    assert "loss_fn.kl_cov_ratio=0.002 cluster.num_nodes=8" in out  # the command that would run
    plain, loss, _ = _validated("grpo_7b_clip_cov", ["loss_fn.clip_cov_ub=4", "++loss_fn.kl_cov_coef=0.5"])
    assert loss.clip_cov_ub == 4.0 and loss.kl_cov_coef == 0.5


@pytest.mark.parametrize("overrides,message", [
    (["loss_fn.kl_cov_ratioo=0.1"], "loss_fn.kl_cov_ratioo"),                       # unknown key (Hydra)
    (["+loss_fn.k_percent=0.2"], "loss_fn.k_percent"),                               # unknown key (ours)
    (["loss_fn.kl_cov_ratio=20"], "loss_fn.kl_cov_ratio=20"),                        # percent, not fraction
    (["loss_fn.method=kl_cv"], "loss_fn.method='kl_cv'"),
    (["cluster.num_nodes=3"], "train_global_batch_size=256"),                        # DP 12 does not divide 256
    (["policy.megatron_cfg.tensor_model_parallel_size=3"], "TP x PP x CP = 3 x 1 x 1"),
    (["policy.megatron_cfg.tensor_model_parallel_size=16", "cluster.num_nodes=4"], "exceeds cluster.gpus_per_node"),
    (["cluster.gpus_per_node=0"], "cluster.gpus_per_node=0"),
    (["grpo.num_prompts_per_step=100"], "grpo.num_prompts_per_step x grpo.num_generations_per_prompt = 800"),
    (["backend=slurm"], "backend='slurm'"),
    (["nemo_rl.selection=gpu"], "nemo_rl.selection='gpu'"),
    (["loss_fn.force_on_policy_ratio=true"], "loss_fn.force_on_policy_ratio=true"),
])
def test_wrong_keys_and_values_fail_naming_them(overrides, message, capsys):
    assert train.main(["--config-name", "grpo_7b_kl_cov", "--dry-run", *overrides]) == 2
    assert message in capsys.readouterr().err


def test_unknown_config_name_lists_the_available_ones(capsys):
    assert train.main(["--config-name", "grpo_70b", "--dry-run"]) == 2
    assert "grpo_32b_kl_cov" in capsys.readouterr().err


def test_missing_nemo_rl_gives_one_clear_error(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "nemo_rl", None)  # import nemo_rl -> ImportError
    assert train.main(["--config-name", "grpo_32b_kl_cov"]) == 1
    err = capsys.readouterr().err
    assert "NeMo-RL container" in err and "PYTHONPATH" in err


# ------------------------------------------------------------------------------------ NeMo-RL wiring
FAKE_GRPO = '''
class ClippedPGLossFn:  # what NeMo-RL's setup() builds: replaced by ours
    def __init__(self, cfg, use_fused_linear_logprobs=False):
        self.cfg = cfg

def setup(master_config):
    return "policy", ClippedPGLossFn(master_config["loss_fn"], use_fused_linear_logprobs=False)

def grpo_train(policy, policy_generation, wrapped_dataloader, val_dataloader, tokenizer, loss_fn, task_to_env,
               val_task_to_env, logger, checkpointer, grpo_save_state, master_config, processor=None):
    import nemo_rl
    nemo_rl.SEEN = dict(policy=policy, loss_fn=loss_fn, master_config=master_config)
'''
FAKE_SCRIPT = '''
import sys
from nemo_rl.algorithms.grpo import grpo_train, setup
from nemo_rl.utils.config import load_config
assert sys.argv[1] == "--config"
config = load_config(sys.argv[2])
policy, loss_fn = setup(config)
grpo_train(policy, None, None, None, None, loss_fn, {}, {}, None, None, {"current_step": 2}, config)
'''
FAKE_CONFIG = '''
def load_config(path):
    from omegaconf import OmegaConf
    return OmegaConf.load(path)
'''


def test_nemo_rl_backend_puts_our_loss_and_the_selection_wrapper_into_nemo_rl(tmp_path, monkeypatch, capsys):
    root = tmp_path / "nemo-rl"
    for package in ("nemo_rl", "nemo_rl/algorithms", "nemo_rl/utils"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "nemo_rl/algorithms/grpo.py").write_text(textwrap.dedent(FAKE_GRPO))
    (root / "nemo_rl/utils/config.py").write_text(textwrap.dedent(FAKE_CONFIG))
    (root / "examples/configs").mkdir(parents=True)
    (root / "examples/run_grpo.py").write_text(textwrap.dedent(FAKE_SCRIPT))
    (root / "examples/configs/base.yaml").write_text("loss_fn:\n  reference_policy_kl_penalty: 0.01\nnot_ours: 7\n")
    monkeypatch.syspath_prepend(str(root))
    for name in [m for m in sys.modules if m == "nemo_rl" or m.startswith("nemo_rl.")]:
        monkeypatch.delitem(sys.modules, name)
    argv = ["--config-name", "grpo_7b_kl_cov", f"nemo_rl.root={root}", "nemo_rl.base_config=examples/configs/base.yaml",
            f"logger.log_dir={tmp_path / 'logs'}"]
    try:
        assert train.main(argv) == 0
        import nemo_rl

        seen = nemo_rl.SEEN
    finally:
        for name in [m for m in sys.modules if m == "nemo_rl" or m.startswith("nemo_rl.")]:
            del sys.modules[name]
    assert isinstance(seen["loss_fn"], EntropyControlLossFn) and seen["loss_fn"].config.method == "kl_cov"
    assert seen["loss_fn"].config.reference_policy_kl_penalty == 0.0  # ours wins over NeMo-RL's base
    assert isinstance(seen["policy"], BatchSelectionPolicy) and seen["policy"].wrapped_policy == "policy"
    assert seen["policy"].optimizer_step == 2 * 8  # resumed at rollout 2, 8 optimizer steps per rollout
    assert seen["master_config"]["not_ours"] == 7 and "engine" not in seen["master_config"]
    assert (tmp_path / "logs" / "nemo_rl_config.yaml").is_file()


@pytest.mark.skipif(not (CONF / "preset" / "local_tiny.yaml").is_file(), reason="the engine's preset has not landed")
def test_preset_local_tiny_turns_a_32b_config_into_a_local_run(capsys):
    assert train.main(["--config-name", "grpo_32b_kl_cov", "+preset=local_tiny", "--dry-run"]) == 0
    assert "# layout: local:" in capsys.readouterr().out
