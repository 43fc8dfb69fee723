"""nemo_entropy.config: defaults of the paper, and one clear error per bad key."""

import pytest
from omegaconf import OmegaConf

from nemo_entropy import train
from nemo_entropy.config import LossConfig, loss_config


def test_defaults_are_the_papers():
    cfg = loss_config({})
    assert (cfg.method, cfg.scope, cfg.cov_form) == ("kl_cov", "batch", "natural")
    assert (cfg.clip_cov_ratio, cfg.clip_cov_lb, cfg.clip_cov_ub) == (2e-4, 1.0, 5.0)
    assert (cfg.kl_cov_ratio, cfg.kl_cov_coef) == (2e-3, 1.0)
    assert (cfg.ratio_clip_min, cfg.ratio_clip_max, cfg.ratio_clip_c) == (0.2, 0.2, None)
    assert cfg.token_level_loss is True


def test_omegaconf_node_and_yaml_ints_are_accepted():
    node = OmegaConf.create({"method": "clip_cov", "clip_cov_lb": 1, "clip_cov_ub": 5, "ratio_clip_max": 1})
    cfg = loss_config(node)
    assert cfg.method == "clip_cov" and isinstance(cfg.clip_cov_ub, float) and cfg.ratio_clip_max == 1.0
    assert loss_config(cfg.to_dict()) == cfg


# The paper's recipes (arXiv 2505.22617, section 5 and its repository); they live in conf/grpo_<size>_<method>.yaml.
PAPER_RECIPES = {
    "grpo_7b_kl_cov": dict(method="kl_cov", kl_cov_ratio=2e-3, kl_cov_coef=1.0, ratio_clip_min=0.2,
                           ratio_clip_max=0.2, reference_policy_kl_penalty=0.0),
    "grpo_7b_clip_cov": dict(method="clip_cov", clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0,
                             ratio_clip_min=1.0, ratio_clip_max=1.0, reference_policy_kl_penalty=0.0),
    "grpo_32b_kl_cov": dict(method="kl_cov", kl_cov_ratio=2e-4, kl_cov_coef=1.0, ratio_clip_min=0.2,
                            ratio_clip_max=0.2, reference_policy_kl_penalty=0.0),
    "grpo_32b_clip_cov": dict(method="clip_cov", clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0,
                              ratio_clip_min=1.0, ratio_clip_max=1.0, reference_policy_kl_penalty=0.0),
}


@pytest.mark.parametrize("name", sorted(PAPER_RECIPES))
def test_paper_recipes_validate(name):
    _, cfg, _ = train.validate_run_config(train.compose_config(name))
    assert cfg.selection_ratio in (2e-3, 2e-4)
    assert {key: getattr(cfg, key) for key in PAPER_RECIPES[name]} == PAPER_RECIPES[name]


@pytest.mark.parametrize(
    "mapping, key, fragment",
    [
        ({"k_percent": 0.2}, "k_percent", "FRACTION"),
        ({"kl_cov_ratoi": 0.1}, "kl_cov_ratoi", "not a known key"),
        ({"kl_cov_ratio": 0.0}, "kl_cov_ratio", "(0, 1]"),
        ({"kl_cov_ratio": 20.0}, "kl_cov_ratio", "not a percent"),
        ({"clip_cov_ratio": -1e-4}, "clip_cov_ratio", "(0, 1]"),
        ({"clip_cov_lb": 5.0, "clip_cov_ub": 5.0}, "clip_cov_lb", "must be <"),
        ({"kl_cov_coef": -1.0}, "kl_cov_coef", ">= 0"),
        ({"reference_policy_kl_penalty": -0.1}, "reference_policy_kl_penalty", ">= 0"),
        ({"ratio_clip_c": 0.5}, "ratio_clip_c", "> 1"),
        ({"method": "clipcov"}, "method", "one of"),
        ({"scope": "global"}, "scope", "one of"),
        ({"cov_form": "exact"}, "cov_form", "one of"),
        ({"reference_policy_kl_type": "k4"}, "reference_policy_kl_type", "one of"),
        ({"token_level_loss": "yes"}, "token_level_loss", "true or false"),
        ({"seed": 1.5}, "seed", "integer"),
        ({"kl_cov_ratio": float("nan")}, "kl_cov_ratio", "finite"),
        ({"sequence_level_importance_ratios": True}, "sequence_level_importance_ratios", "token_level_loss"),
        ({"truncated_importance_sampling_type": "tis", "truncated_importance_sampling_ratio": 2.0},
         "truncated_importance_sampling_type", "use_importance_sampling_correction"),
        ({"method": "kl_cov", "disable_ppo_ratio": True}, "method", "needs the PPO ratio"),
        ({"use_importance_sampling_correction": True, "truncated_importance_sampling_ratio": 2.0},
         "truncated_importance_sampling_ratio", "type is null"),
    ],
)
def test_bad_values_raise_one_error_naming_the_key(mapping, key, fragment):
    with pytest.raises(ValueError) as info:
        loss_config(mapping)
    message = str(info.value)
    assert f"loss_fn.{key}" in message and fragment in message


def test_config_is_frozen_and_checked_on_direct_construction():
    from nemo_entropy.controls.clip_cov import ClipCovConfig

    with pytest.raises(ValueError, match="loss_fn.scope"):
        LossConfig(scope="global")
    with pytest.raises(ValueError, match="loss_fn.clip_cov_ratio"):
        LossConfig(sections={**LossConfig().sections, "clip_cov": ClipCovConfig(clip_cov_ratio=2.0)})
    cfg = LossConfig()
    with pytest.raises(Exception):
        cfg.method = "ppo"  # type: ignore[misc]


def test_every_loss_key_is_in_the_config_reference():
    """docs/config_reference.md documents every key ``loss_config`` accepts (LossConfig's fields and every control's
    section), each by its full name in backticks."""
    import dataclasses
    import pathlib

    from nemo_entropy.controls import REGISTRY

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "config_reference.md").read_text()
    keys = {f.name for f in dataclasses.fields(LossConfig) if f.name != "sections"}  # sections: the parsed controls
    for control in REGISTRY.values():
        keys |= {f.name for f in dataclasses.fields(control.config_class)}
    assert len(keys) > 40
    assert sorted(k for k in keys if f"`{k}`" not in text) == []
