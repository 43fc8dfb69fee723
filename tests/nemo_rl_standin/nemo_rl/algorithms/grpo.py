"""Stand-in of ``nemo_rl.algorithms.grpo``: the config and save-state types of each generation, ``setup()`` and
the training entries with NeMo-RL's step counters (README.md)."""

import dataclasses
import json
import os
from pathlib import Path
from typing import Optional, TypedDict

import torch

import nemo_rl
from nemo_rl.algorithms.loss.loss_functions import ClippedPGLossConfig, ClippedPGLossFn
from nemo_rl.distributed.batched_data_dict import BatchedDataDict
from nemo_rl.models.policy.lm_policy import Policy

MAIN = nemo_rl.GENERATION == "main"

if MAIN:
    from pydantic import BaseModel, Field

    class GRPOConfig(BaseModel, extra="allow"):
        num_prompts_per_step: int = 32
        num_generations_per_prompt: int = 16
        max_num_steps: int = 1000
        max_num_epochs: int = 1
        async_grpo: dict = Field(default_factory=lambda: {"enabled": False})

    class MasterConfig(BaseModel, extra="allow"):
        policy: dict
        loss_fn: ClippedPGLossConfig
        grpo: GRPOConfig
        data: dict
        checkpointing: dict
        cluster: dict
        data_plane: Optional[dict] = None

    @dataclasses.dataclass
    class GRPOSaveState:
        consumed_samples: int
        current_step: int
        current_epoch: int
        total_steps: int
        total_valid_tokens: int
        val_reward: float
        sampler_name: Optional[str] = None

    def _initial_state():
        return GRPOSaveState(0, 0, 0, 0, 0, -1.0)

    def _state_from(values):
        return GRPOSaveState(**values)

    def _state_dict(state):
        return dataclasses.asdict(state)

    def _grpo(cfg, key):
        return getattr(cfg.grpo, key)

    def _section(cfg, key):
        return getattr(cfg, key)
else:
    class MasterConfig(TypedDict):
        policy: dict
        loss_fn: ClippedPGLossConfig
        grpo: dict
        data: dict
        checkpointing: dict
        cluster: dict

    class GRPOSaveState(TypedDict):
        consumed_samples: int
        current_step: int
        current_epoch: int
        total_steps: int
        total_valid_tokens: int

    def _initial_state():
        return GRPOSaveState(consumed_samples=0, current_step=0, current_epoch=0, total_steps=0, total_valid_tokens=0)

    def _state_from(values):
        return GRPOSaveState(**{k: values[k] for k in GRPOSaveState.__annotations__})

    def _state_dict(state):
        return dict(state)

    def _grpo(cfg, key):
        return cfg["grpo"].get(key, {"max_num_epochs": 1, "async_grpo": {"enabled": False}}.get(key))

    def _section(cfg, key):
        return cfg.get(key)


def _set(state, key, value):
    if MAIN:
        setattr(state, key, value)
    else:
        state[key] = value


def _read(state, key):
    return getattr(state, key) if MAIN else state[key]


def _latest_checkpoint(directory) -> Optional[Path]:
    steps = sorted(Path(directory).glob("step_*/state.json"), key=lambda p: int(p.parent.name[5:]))
    return steps[-1] if steps else None


def setup(master_config, tokenizer=None, dataset=None, val_dataset=None, processor=None, policy_factory=None):
    """What the run script unpacks (NeMo-RL main's 13 values); the loss is built from the module global."""
    checkpointing = _section(master_config, "checkpointing")
    latest = _latest_checkpoint(checkpointing["checkpoint_dir"]) if checkpointing.get("enabled") else None
    state = _state_from(json.loads(latest.read_text())) if latest else _initial_state()
    loss_fn = ClippedPGLossFn(_section(master_config, "loss_fn"), use_fused_linear_logprobs=False)
    policy = Policy(_section(master_config, "policy"), dp_size=int(os.environ.get("NEMO_RL_STANDIN_DP", "2")))
    return (policy, None, None, None, None, None, loss_fn, None, None, state, master_config, None, None)


def rollout_batch(step: int, master_config) -> BatchedDataDict:
    """The training batch of GRPO step ``step`` (deterministic): what grpo_train hands ``policy.train``."""
    size = _grpo(master_config, "num_prompts_per_step") * _grpo(master_config, "num_generations_per_prompt")
    length = int(_section(master_config, "data").get("sequence_length", 12))
    gen = torch.Generator().manual_seed(1000 + step)
    lengths = torch.randint(4, length + 1, (size,), generator=gen)
    token_mask = (torch.arange(length)[None] < lengths[:, None]).float()
    token_mask[:, :2] = 0
    sample_mask = torch.ones(size)
    sample_mask[::7] = 0
    prev = -torch.rand(size, length, generator=gen) * 3
    return BatchedDataDict({
        "input_ids": torch.randint(0, 50, (size, length), generator=gen),
        "input_lengths": lengths,
        "token_mask": token_mask,
        "sample_mask": sample_mask,
        "advantages": torch.randn(size, 1, generator=gen).expand(size, length).clone(),
        "prev_logprobs": prev,
        "generation_logprobs": prev + 0.01 * torch.randn(size, length, generator=gen),
        "reference_policy_logprobs": prev.clone(),
    })


def _save(master_config, state, step):
    checkpointing = _section(master_config, "checkpointing")
    if not checkpointing.get("enabled") or step % int(checkpointing.get("save_period", 1)):
        return
    path = Path(checkpointing["checkpoint_dir"]) / f"step_{step}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "state.json").write_text(json.dumps(_state_dict(state)))


def grpo_train(policy, policy_generation, wrapped_dataloader, val_dataloader, tokenizer, loss_fn, task_to_env,
               val_task_to_env, logger, checkpointer, grpo_save_state, master_config, processor=None):
    """``current_step`` counts within an epoch of ``data.num_steps_per_epoch`` steps, ``total_steps`` over the run."""
    per_epoch = int(_section(master_config, "data").get("num_steps_per_epoch", 2))
    current_step, total_steps = _read(grpo_save_state, "current_step"), _read(grpo_save_state, "total_steps")
    epoch = _read(grpo_save_state, "current_epoch")
    while epoch < _grpo(master_config, "max_num_epochs") and total_steps < _grpo(master_config, "max_num_steps"):
        while current_step < per_epoch and total_steps < _grpo(master_config, "max_num_steps"):
            policy.train(rollout_batch(total_steps, master_config), loss_fn, timer=None)
            current_step, total_steps = current_step + 1, total_steps + 1
            _set(grpo_save_state, "current_step", current_step)
            _set(grpo_save_state, "total_steps", total_steps)
            _set(grpo_save_state, "current_epoch", epoch)
            _save(master_config, grpo_save_state, total_steps)
        if current_step >= per_epoch:
            epoch, current_step = epoch + 1, 0


def async_grpo_train(policy, policy_generation, dataloader, val_dataloader, tokenizer, loss_fn, task_to_env,
                     val_task_to_env, logger, checkpointer, grpo_save_state, master_config,
                     max_trajectory_age_steps=1, teacher_worker_groups=None, alias_to_group_alias=None,
                     processor=None):
    """The async trainer's global step is ``current_step``; it never advances ``total_steps`` (NeMo-RL main)."""
    step = _read(grpo_save_state, "current_step")
    while step < _grpo(master_config, "max_num_steps"):
        policy.train(rollout_batch(step, master_config), loss_fn, timer=None)
        step += 1
        _set(grpo_save_state, "current_step", step)
        _save(master_config, grpo_save_state, step)
