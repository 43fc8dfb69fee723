"""The clip presets (conf/preset/clip_higher.yaml, clip_low.yaml) compose with any run config, local or NeMo-RL, set
their key over the config's own value and leave the other bound alone, and compose with each other and local_tiny."""

from __future__ import annotations

import pytest

from nemo_entropy import train

CONFIGS = {  # config -> its own (ratio_clip_min, ratio_clip_max)
    "local_grpo": (0.2, 0.2),
    "local_gppo": (0.2, 0.2),
    "grpo_32b_baseline": (0.2, 0.2),
    "grpo_7b_clip_cov": (1.0, 1.0),  # the Clip-Cov recipe's wide clip: the presets set values, they do not add
}
PRESETS = {"clip_higher": (None, 0.28), "clip_low": (0.1, None), "[clip_higher,clip_low]": (0.1, 0.28)}


def _clip(name, overrides=()):
    plain, loss, _ = train.validate_run_config(train.compose_config(name, list(overrides)))
    return plain, (loss.ratio_clip_min, loss.ratio_clip_max)


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_preset_sets_its_bound_on_any_config(name, preset):
    plain, clip = _clip(name, [f"+preset={preset}"])
    own = CONFIGS[name]
    assert _clip(name)[1] == own
    want = tuple(own[i] if PRESETS[preset][i] is None else PRESETS[preset][i] for i in (0, 1))
    assert clip == want
    assert plain["backend"] == ("local" if name.startswith("local_") else "nemo_rl")


def test_clip_higher_turns_a_32b_config_into_a_local_run_with_local_tiny(capsys):
    plain, clip = _clip("grpo_32b_baseline", ["+preset=[local_tiny,clip_higher]"])
    assert plain["backend"] == "local" and clip == (0.2, 0.28)
    assert train.main(["--config-name", "grpo_32b_kl_cov", "--dry-run", "+preset=clip_low"]) == 0
    assert "eps=(0.1, 0.2)" in capsys.readouterr().out
