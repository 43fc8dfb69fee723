"""The wrapped ``grpo_train`` refuses, by name and before anything runs, the configurations the plugin cannot serve,
reading NeMo-RL's real pydantic ``MasterConfig`` (built from NeMo-RL's own base config, as ``run_grpo.py`` does)."""

from __future__ import annotations

import pytest

from .harness import RunSpec, nemo_rl_config


class _Untouchable:
    """Stands for every other argument: any use means the entry went past its checks."""

    def __getattr__(self, name):
        raise AssertionError(f"grpo_train ran (touched .{name}) instead of refusing the configuration")


CASES = [
    ({"plan": "driver"}, {"data_plane": {"enabled": True}}, ("data_plane.enabled",)),
    ({"plan": "worker"}, {"policy": {"sequence_packing": {"enabled": True}}},
     ("nemo_rl.plan='worker'", "policy.sequence_packing.enabled")),
    ({"plan": "driver", "input_type": "logit"}, {"policy": {"generation": {"top_k": 8}}},
     ("nemo_rl.input_type='logit'", "policy.generation.top_k")),
]


@pytest.mark.parametrize("options, override, names", CASES, ids=["data-plane", "worker-selection-packing",
                                                                  "logit-top-k"])
def test_wrapped_grpo_train_refuses_by_name(installer, nemo_rl_root, tmp_path, options, override, names):
    from omegaconf import OmegaConf

    grpo = installer.grpo
    installer.install(options)
    plain = nemo_rl_config(nemo_rl_root, RunSpec("kl_cov", False, 1), tmp_path, tmp_path / "checkpoints")
    config = grpo.MasterConfig(**OmegaConf.to_container(OmegaConf.merge(plain, override)))
    loss_fn = grpo.ClippedPGLossFn(config.loss_fn, use_fused_linear_logprobs=False)
    other = _Untouchable()
    with pytest.raises(ValueError) as err:
        grpo.grpo_train(other, other, other, None, other, loss_fn, {}, None, other, other,
                        grpo._get_grpo_save_state(None), config)
    for name in names:
        assert name in str(err.value), str(err.value)
