"""The CPU stand-ins the CLI harness puts into NeMo-RL when ``python -m nemo_entropy.train --config-name NAME``
runs NeMo-RL's own ``examples/run_grpo.py`` on a shipped cluster config (``test_cli_configs.py``).

The command, the composition of our config, the merge onto NeMo-RL's base config, the resolvers, ``MasterConfig``,
``init_ray`` (attached to a CPU Ray the test started, as a Slurm job attaches to ``ray.sub``'s), ``get_tokenizer``
(of a local model folder), ``configure_generation_config``, our ``install``, the trainer dispatch and ``grpo_train``
are the real ones. Two functions are replaced, by :func:`patch` from ``cli_site/sitecustomize.py``, and only in a
process started with :data:`ENV` set:

* ``nemo_rl.data.utils.setup_response_data`` (downloads DAPO-Math-17k and starts math-verify workers) by
  :func:`setup_response_data`: the tiny addition task's prompts and its reward environment;
* ``nemo_rl.algorithms.grpo.setup`` (a GPU ``RayVirtualCluster``, Megatron workers, vLLM) by :func:`cpu_setup`:
  the same steps as ``setup()`` for logger, checkpointing, save state, data loaders (with the dynamic-sampling
  batch multiplier) and the loss (``ClippedPGLossFn`` as ``setup()`` builds it: ours, after ``install``), and
  NeMo-RL's ``Policy`` over CPU workers with a CPU generation in place of vLLM (:mod:`.cpu_policy`).
"""

from __future__ import annotations

import json
import os
from typing import Any

ENV = "NEMO_ENTROPY_HARNESS_CLI"
"""JSON settings of the harness: ``{"pretrained": <warm-start state dict>, "prompts": N, "seed": S}``."""

PATCHED_MODULES = ("nemo_rl.data.utils", "nemo_rl.algorithms.grpo")


def settings() -> dict[str, Any]:
    return json.loads(os.environ[ENV])


def setup_response_data(tokenizer, data_config, env_configs=None, is_vlm=False):
    """Stands in for ``nemo_rl.data.utils.setup_response_data``: (train, validation, task -> env, val task -> env)."""
    from . import tiny

    cfg = settings()
    env = tiny.make_environment_class().options(num_cpus=0).remote()
    train = tiny.AdditionPrompts(cfg["prompts"], seed=cfg["seed"])
    val = tiny.AdditionPrompts(4, seed=cfg["seed"] + 1)
    return train, val, {tiny.TASK_NAME: env}, {tiny.TASK_NAME: env}


def _data_parallel_size(master_config) -> int:
    from nemo_entropy.integrations.megatron import parallel_layout

    return parallel_layout({"backend": "nemo_rl", "policy": master_config.policy,
                            "cluster": master_config.cluster}).dp


def setup_on_cpu(master_config, dataset, val_dataset, worker_group):
    """What ``nemo_rl.algorithms.grpo.setup`` does, minus the GPU cluster, vLLM and the Megatron / DTensor workers:
    its 13-tuple, with NeMo-RL's ``Policy`` over ``worker_group`` (CPU workers) and a CPU generation."""
    from nemo_rl.algorithms import grpo
    from nemo_rl.data.collate_fn import rl_collate_fn
    from nemo_rl.data.utils import load_dataloader_state
    from nemo_rl.utils.checkpoint import CheckpointManager
    from nemo_rl.utils.logger import Logger
    from torchdata.stateful_dataloader import StatefulDataLoader

    from .cpu_policy import CpuGeneration, CpuPolicy, CpuWeightSynchronizer

    policy_config, grpo_config, data_config = master_config.policy, master_config.grpo, master_config.data
    # setup()'s own checks that need no GPU
    grpo._validate_multimodal_dedup_capability(master_config)
    assert grpo_config.val_num_generations_per_prompt >= 1
    grpo.set_seed(grpo_config.seed)
    logger = Logger(master_config.logger)
    logger.log_hyperparams(master_config.model_dump())
    checkpointer = CheckpointManager(master_config.checkpointing)
    last_checkpoint_path = checkpointer.get_latest_checkpoint_path()
    grpo_save_state = grpo._get_grpo_save_state(checkpointer.load_training_info(last_checkpoint_path))

    batch_size = grpo_config.num_prompts_per_step
    if grpo_config.use_dynamic_sampling:  # as setup(): draw batch_multiplier x the prompts, refill after dropping
        batch_size = int(batch_size * grpo_config.batch_multiplier)
    else:
        assert grpo_config.batch_multiplier == 1, "batch_multiplier>1 can only be used if use_dynamic_sampling=True"
    dataloader = StatefulDataLoader(dataset, batch_size=batch_size, shuffle=data_config["shuffle"],
                                    collate_fn=rl_collate_fn, drop_last=True, num_workers=data_config["num_workers"])
    if last_checkpoint_path is not None:
        load_dataloader_state(dataloader, last_checkpoint_path, data_config, "")
    val_dataloader = None
    if grpo_config.val_period > 0 or grpo_config.val_at_start or grpo_config.val_at_end:
        val_dataloader = StatefulDataLoader(val_dataset, batch_size=grpo_config.val_batch_size, shuffle=False,
                                            collate_fn=rl_collate_fn, num_workers=data_config["num_workers"])
    grpo._validate_use_kl_in_reward_compat(master_config)
    if master_config.loss_fn.reference_policy_kl_penalty == 0:  # as setup(): no reference model is loaded
        grpo_config.skip_reference_policy_logprobs_calculation = True

    megatron_cfg = policy_config.get("megatron_cfg") or {}
    use_fused = bool(megatron_cfg.get("enabled") and megatron_cfg.get("use_fused_linear_logprobs"))
    loss_fn = grpo.ClippedPGLossFn(master_config.loss_fn, use_fused_linear_logprobs=use_fused)

    weights_path, optimizer_path = checkpointer.get_resume_paths(last_checkpoint_path)
    policy = CpuPolicy(worker_group, policy_config, weights_path=weights_path, optimizer_path=optimizer_path)
    generation = CpuGeneration(policy_config["generation"], seed=grpo_config.seed)
    generation.weight_synchronizer = CpuWeightSynchronizer(policy, generation)
    generation.weight_synchronizer.init_communicator()
    return (policy, generation, None, (None, None), dataloader, val_dataloader, loss_fn, logger, checkpointer,
            grpo_save_state, master_config, {}, {})


def cpu_setup(master_config, tokenizer, dataset, val_dataset, processor=None, policy_factory=None):
    """Stands in for ``nemo_rl.algorithms.grpo.setup`` in the command's process: a CPU worker group per DP rank of
    the config's layout, then :func:`setup_on_cpu`."""
    from .cpu_policy import make_worker_group

    cluster, worker_group = make_worker_group(_data_parallel_size(master_config), settings()["pretrained"],
                                              seed=master_config.grpo.seed, name="cli")
    out = setup_on_cpu(master_config, dataset, val_dataset, worker_group)
    print(f"[harness] CPU setup: policy over {worker_group.world_size} CPU worker(s), CPU generation, "
          f"loss {type(out[6]).__name__}", flush=True)
    return out[:3] + ((cluster, cluster),) + out[4:]


def patch(module) -> None:
    """Replace the two functions in ``module`` (called right after the module is imported)."""
    if module.__name__ == "nemo_rl.data.utils":
        module.setup_response_data = setup_response_data
    elif module.__name__ == "nemo_rl.algorithms.grpo":
        module.setup = cpu_setup
