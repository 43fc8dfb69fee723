"""The run entry and the configs in conf/: every config composes, validates and dry-runs, with and without
overrides; wrong keys and values fail with errors naming them; a missing NeMo-RL gives one clear error. The
NeMo-RL backend's wiring is tested in test_nemo_rl_entry.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from nemo_entropy import train

CONF = Path(__file__).resolve().parent.parent / "conf"
OURS = ["grpo_7b_kl_cov", "grpo_7b_clip_cov", "grpo_32b_kl_cov", "grpo_32b_clip_cov", "grpo_32b_baseline"]
LOCAL = sorted(p.stem for p in CONF.glob("local_*.yaml"))  # the engine engineer's, when present
PAPER = {  # the paper's recipes (arXiv 2505.22617)
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
    (["nemo_rl.plan=gpu"], "nemo_rl.plan='gpu'"),
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


@pytest.mark.skipif(not (CONF / "preset" / "local_tiny.yaml").is_file(), reason="the engine's preset has not landed")
def test_preset_local_tiny_turns_a_32b_config_into_a_local_run(capsys):
    assert train.main(["--config-name", "grpo_32b_kl_cov", "+preset=local_tiny", "--dry-run"]) == 0
    assert "# layout: local:" in capsys.readouterr().out


@pytest.mark.parametrize("base", ["local_base", "grpo_base"])
def test_the_bases_hold_only_deviations_and_the_composed_loss_fn_is_complete(base):
    """Every loss_fn default lives in the config dataclasses: a base restates none of them (``method``, the base's
    choice of control, excepted), and composing fills in every key with its default."""
    import yaml

    from nemo_entropy.compose import loss_fn_defaults

    defaults = loss_fn_defaults()
    written = yaml.safe_load((CONF / f"{base}.yaml").read_text())["loss_fn"]
    restated = sorted(k for k, v in written.items() if k != "method" and k in defaults and v == defaults[k])
    assert not restated, f"conf/{base}.yaml restates the defaults of {restated}"
    plain, loss, _ = _validated(base)
    assert set(plain["loss_fn"]) == set(defaults)
    for key, value in defaults.items():
        assert plain["loss_fn"][key] == written.get(key, value), key


def test_a_plain_override_reaches_a_loss_key_no_yaml_names():
    plain, loss, _ = _validated("grpo_7b_kl_cov", ["loss_fn.entropy_coef=0.25", "loss_fn.log_ratio_clamp=10"])
    assert plain["loss_fn"]["entropy_coef"] == 0.25 and loss.entropy_coef == 0.25 and loss.log_ratio_clamp == 10.0
