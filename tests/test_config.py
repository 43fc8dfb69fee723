"""nemo_entropy.config: defaults of the paper, and one clear error per bad key."""

import pytest
from omegaconf import OmegaConf

from nemo_entropy import train
from nemo_entropy.config import LossConfig, loss_config


def test_defaults_are_the_papers():
    cfg = loss_config({})
    assert (cfg.method, cfg.scope, cfg.cov_form, cfg.controller_update) == ("ppo", "batch", "natural", "rollout")
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


def _doc_value(text: str):
    """A default as docs/config_reference.md writes it, as Python: true/false, null, [], numbers, else the word."""
    text = text.strip().strip("`")
    words = {"true": True, "false": False, "null": None, "[]": ()}
    if text in words:
        return words[text]
    try:
        return int(text) if text.lstrip("-").isdigit() else float(text)
    except ValueError:
        return text


def _documented_defaults() -> dict:
    """``{key: default}`` from every ``| key | base | ... |`` table of the ``loss_fn`` section (a row naming n keys
    gives n comma-separated values, or one value shared by all)."""
    import pathlib
    import re

    text = (pathlib.Path(__file__).resolve().parents[1] / "docs" / "config_reference.md").read_text()
    section = text.split("## `loss_fn`", 1)[1].split("\n## ", 1)[0]
    found, in_table = {}, False
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")] if line.startswith("|") else []
        if cells[:2] == ["key", "base"]:
            in_table = True
            continue
        if not cells:
            in_table = False
            continue
        if not in_table or set(cells[0]) <= {"-", " "}:
            continue
        keys = re.findall(r"`([a-z_0-9]+)`", cells[0])
        values = [cells[1]] * len(keys) if len(keys) > 1 and "," not in cells[1] else cells[1].split(",")
        assert len(values) == len(keys), f"row {line!r}: {len(keys)} keys, {len(values)} defaults"
        for key, value in zip(keys, values):
            found[key] = _doc_value(value)
    return found


def test_the_config_reference_states_the_codes_default_for_every_key():
    documented = _documented_defaults()
    actual = LossConfig().to_dict()
    actual["controls"] = tuple(actual["controls"])
    assert sorted(set(actual) - set(documented)) == [], "keys without a documented default"
    assert sorted(set(documented) - set(actual)) == [], "documented keys the config does not have"
    wrong = {k: (documented[k], actual[k]) for k in actual if documented[k] != actual[k]}
    assert wrong == {}, "documented default != code default: {key: (doc, code)}"
