"""Runs NeMo-RL's own ``grpo_train`` with the plugin installed the way the run entry installs it.

:func:`run_grpo` does what ``examples/run_grpo.py`` + ``grpo.setup()`` do, minus what needs GPUs:

* the config is NeMo-RL's own ``examples/configs/grpo_math_1B.yaml`` (``load_config``) with our overrides merged
  on top, resolved and validated as ``MasterConfig(**config)`` (pydantic), as ``run_grpo.py`` does;
* the tokenizer's generation settings come from NeMo-RL's ``configure_generation_config``;
* ``nemo_entropy.integrations.nemo_rl_run.install(nemo_rl.algorithms.grpo, spec.options)`` is called by the caller
  before each run (on the pristine module, as a fresh run-entry process would; see conftest), and the loss is
  built as ``setup()`` builds it:
  ``grpo.ClippedPGLossFn(master_config.loss_fn, use_fused_linear_logprobs=False)``;
* logger, checkpointing, save state and data loader are NeMo-RL's, built as ``setup()`` builds them: ``Logger``
  (tensorboard on; wandb, mlflow, swanlab, GPU monitoring off), ``CheckpointManager``, its latest checkpoint's
  ``load_training_info`` through ``grpo._get_grpo_save_state``, ``StatefulDataLoader`` with ``rl_collate_fn`` and
  ``load_dataloader_state`` on resume, ``get_resume_paths`` for the policy's weights and optimizer;
* the policy is NeMo-RL's ``Policy`` over CPU worker actors (:mod:`.cpu_policy`), the generation a CPU
  ``GenerationInterface``, the environment a Ray actor implementing ``EnvironmentInterface``;
* then ``grpo.grpo_train(...)`` (the wrapped one) runs NeMo-RL's loop: rollout (``run_multi_turn_rollout``),
  rewards, ``batched_message_log_to_flat_message``, ``get_logprobs``, the GRPO advantage estimator,
  ``policy.train``, metrics, checkpoints, logging.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

from . import tiny

BASE_CONFIG = "examples/configs/grpo_math_1B.yaml"
PROMPTS_PER_STEP = 4
GENERATIONS_PER_PROMPT = 4
TRAIN_GLOBAL_BATCH = 8  # 16 samples per GRPO step -> 2 optimizer steps per step
TRAIN_MICRO_BATCH = 2
MAX_SEQ_LEN = 16
STEPS = 6
PROMPTS = 8  # 2 GRPO steps per epoch: 6 steps cross two epoch boundaries, and step 3 is inside an epoch
EPOCHS = 3
SEED = 7

LOSS_SECTIONS: dict[str, dict[str, Any]] = {
    # Quotas large enough that a step of ~20 valid tokens selects several (the paper's 2e-3 would select 1).
    "kl_cov": {"method": "kl_cov", "kl_cov_ratio": 0.25, "kl_cov_coef": 1.0},
    # lb = 0 makes roughly half of the tokens candidates, so the random subset is a real draw (seeded, per step).
    "clip_cov": {"method": "clip_cov", "clip_cov_ratio": 0.2, "clip_cov_lb": 0.0, "clip_cov_ub": 5.0, "seed": 11},
    # needs the old policy's entropy: the driver's eval-mode pass through NeMo-RL's training loop
    "top_entropy": {"method": "top_entropy", "top_entropy_quantile": 0.2},
}
NEMO_RL_OPTIONS = {"plan": "driver", "input_type": "logprob"}
"""Our ``nemo_rl:`` section (defaults of a run), as the run entry passes it to ``install``."""


@dataclass(frozen=True)
class RunSpec:
    method: str
    packing: bool
    dp: int
    max_steps: int = STEPS
    input_type: str = "logprob"
    selection: str = "driver"
    micro_batch: int = TRAIN_MICRO_BATCH

    @property
    def name(self) -> str:
        suffix = "" if self.input_type == "logprob" else f"-{self.input_type}"
        if self.selection != "driver":
            suffix += f"-{self.selection}"
        if self.micro_batch != TRAIN_MICRO_BATCH:
            suffix += f"-mbs{self.micro_batch}"
        return f"{self.method}-{'pack' if self.packing else 'nopack'}-dp{self.dp}{suffix}"

    @property
    def options(self) -> dict[str, Any]:
        """The run's ``nemo_rl:`` section."""
        return {**NEMO_RL_OPTIONS, "input_type": self.input_type, "plan": self.selection}


def nemo_rl_config(root: Path, spec: RunSpec, run_dir: Path, checkpoint_dir: Path) -> dict[str, Any]:
    """NeMo-RL's base GRPO config with the tiny-run overrides, resolved to plain containers."""
    from nemo_rl.utils.config import load_config, register_omegaconf_resolvers
    from omegaconf import OmegaConf

    register_omegaconf_resolvers()
    base = load_config(str(root / BASE_CONFIG))
    ours = {
        "grpo": {
            "num_prompts_per_step": PROMPTS_PER_STEP, "num_generations_per_prompt": GENERATIONS_PER_PROMPT,
            "max_num_steps": spec.max_steps, "max_num_epochs": EPOCHS, "max_rollout_turns": 1, "val_period": 0,
            "val_at_start": False, "val_at_end": False, "seed": SEED,
            # setup() turns this on itself when reference_policy_kl_penalty == 0 (no reference model loaded)
            "skip_reference_policy_logprobs_calculation": True,
        },
        "loss_fn": {"reference_policy_kl_penalty": 0.0, **LOSS_SECTIONS[spec.method]},
        "policy": {
            "model_name": tiny.MODEL_NAME, "tokenizer": {"name": tiny.MODEL_NAME},
            "train_global_batch_size": TRAIN_GLOBAL_BATCH, "train_micro_batch_size": spec.micro_batch,
            "logprob_batch_size": 4, "max_total_sequence_length": MAX_SEQ_LEN, "precision": "float32",
            "make_sequence_length_divisible_by": 1, "max_grad_norm": 1.0,
            "sequence_packing": {"enabled": spec.packing},
            "dynamic_batching": {"enabled": False},
            "optimizer": {"name": "torch.optim.AdamW",
                          "kwargs": {"lr": 2e-4, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8}},
            "generation": {
                "max_new_tokens": tiny.TASK.max_response_length, "temperature": 1.0, "top_p": 1.0, "top_k": None,
                "vllm_cfg": {"async_engine": False, "enable_vllm_metrics_logger": False},
            },
        },
        "data": {"shuffle": True, "num_workers": 0, "use_multiple_dataloader": False},
        "env": {tiny.TASK_NAME: {}},
        "logger": {
            "log_dir": str(run_dir / "logs"), "tensorboard_enabled": True, "wandb_enabled": False,
            "mlflow_enabled": False, "swanlab_enabled": False, "monitor_gpus": False,
        },
        "checkpointing": {
            "enabled": True, "checkpoint_dir": str(checkpoint_dir), "metric_name": None, "keep_top_k": 100,
            "save_period": 3, "checkpoint_must_save_by": None,
        },
        "cluster": {"gpus_per_node": spec.dp, "num_nodes": 1},
    }
    merged = OmegaConf.merge(base, OmegaConf.create(ours))
    return OmegaConf.to_container(merged, resolve=True)


@dataclass
class RunResult:
    spec: RunSpec
    master_config: Any
    log_dir: Path
    checkpoint_dir: Path
    train_calls: list = field(default_factory=list)
    start_save_state: Any = None
    final_save_state: Any = None
    generation_syncs: int = 0

    # ------------------------------------------------------------------ NeMo-RL's own records of the run
    def logged_train_data(self, step: int) -> dict[str, torch.Tensor]:
        """``train_data_step{step}.jsonl``, which ``grpo_train`` writes through ``Logger.log_batched_dict_as_jsonl``,
        as [B, S] tensors (float32 values round-trip exactly through JSON)."""
        rows = [json.loads(line) for line in (self.log_dir / f"train_data_step{step}.jsonl").read_text().splitlines()]
        rows.sort(key=lambda r: r["idx"])
        out = {}
        for key, dtype in (("token_ids", torch.long), ("token_loss_mask", torch.float32),
                           ("advantages", torch.float32), ("prev_logprobs", torch.float32),
                           ("generation_logprobs", torch.float32)):
            out[key] = torch.tensor([r[key] for r in rows], dtype=dtype).reshape(len(rows), -1)  # rows are [1, S]
        out["sample_loss_mask"] = torch.tensor([r["sample_loss_mask"] for r in rows], dtype=torch.float32).reshape(-1)
        return out

    def tensorboard_scalars(self) -> dict[str, dict[int, float]]:
        """Every scalar NeMo-RL's ``Logger`` wrote to its tensorboard backend: ``{tag: {step: value}}``."""
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        acc = EventAccumulator(str(self.log_dir / "tensorboard"), size_guidance={"scalars": 0})
        acc.Reload()
        return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def run_grpo(root: Path, spec: RunSpec, worker_group, run_dir: Path, *, checkpoint_dir: Optional[Path] = None,
             pretrained_path: Path, env_actor) -> RunResult:
    """One ``grpo_train`` call (fresh, or resumed from ``checkpoint_dir``'s latest checkpoint)."""
    from nemo_rl.algorithms import grpo
    from nemo_rl.models.generation import configure_generation_config

    from .cli_setup import setup_on_cpu

    checkpoint_dir = checkpoint_dir or run_dir / "checkpoints"
    config = grpo.MasterConfig(**nemo_rl_config(root, spec, run_dir, checkpoint_dir))  # as examples/run_grpo.py
    tokenizer = tiny.build_tokenizer()
    config.policy["generation"] = configure_generation_config(config.policy["generation"], tokenizer)

    # --- what grpo.setup() does, minus the GPU cluster, vLLM and the DTensor workers
    (policy, generation, _, _, dataloader, _, loss_fn, logger, checkpointer, grpo_save_state, _, _, _) = setup_on_cpu(
        config, tiny.AdditionPrompts(PROMPTS, seed=SEED), None, worker_group)

    result = RunResult(spec, config, Path(config.logger["log_dir"]), checkpoint_dir,
                       start_save_state=dataclasses.replace(grpo_save_state))
    try:
        with checkpointer:  # as examples/run_grpo.py: flushes checkpoint finalisation on exit
            grpo.grpo_train(
                policy, generation, dataloader, None, tokenizer, loss_fn, {tiny.TASK_NAME: env_actor}, None, logger,
                checkpointer, grpo_save_state, config,
            )
    finally:
        for backend in logger.loggers:
            writer = getattr(backend, "writer", None)
            if writer is not None:
                writer.close()
    result.train_calls = policy.train_calls
    result.final_save_state = grpo_save_state
    result.generation_syncs = generation.weight_synchronizer.syncs
    return result
