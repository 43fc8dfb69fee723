"""A CPU policy and a CPU generation object for NeMo-RL's own ``grpo_train``.

* :class:`CpuPolicy` *is* NeMo-RL's ``lm_policy.Policy``: every method grpo_train calls (``train`` with its
  ``shard_by_batch_size`` sharding and result aggregation, ``get_logprobs``, ``prepare_for_*``, ``save_checkpoint``,
  ...) is Policy's own. Only ``__init__`` differs (Policy's builds a GPU cluster, reads the model's config from
  the Hugging Face hub and starts DTensor workers in their uv venvs); it sets the same attributes Policy's does.
* :class:`CpuGeneration` implements NeMo-RL's ``GenerationInterface`` (temperature sampling from the same tiny
  model) in place of vLLM, and :class:`CpuWeightSynchronizer` NeMo-RL's ``WeightSynchronizer`` (refit copies the
  state dict of DP rank 0) in place of CUDA-IPC / NCCL refit.
* :func:`make_worker_group` builds NeMo-RL's own CPU ``RayVirtualCluster`` and ``RayWorkerGroup`` of
  :class:`~tests.nemo_rl_real.cpu_worker.CpuPolicyWorker` actors.
"""

from __future__ import annotations

import inspect
from typing import Any

import ray
import torch

from . import tiny
from .cpu_worker import ROW_TAG, WORKER_FQN


# ----------------------------------------------------------------------------------------------- the policy
def register_worker_environment() -> None:
    """Tell NeMo-RL's actor registry that our worker runs in this interpreter (``PY_EXECUTABLES.SYSTEM``), as its
    error message asks for an actor it does not know."""
    from nemo_rl.distributed.ray_actor_environment_registry import ACTOR_ENVIRONMENT_REGISTRY
    from nemo_rl.distributed.virtual_cluster import PY_EXECUTABLES

    ACTOR_ENVIRONMENT_REGISTRY[WORKER_FQN] = PY_EXECUTABLES.SYSTEM


def make_worker_group(dp_size: int, pretrained_path: str, *, seed: int = 0, name: str = "cpu_policy"):
    """NeMo-RL's own CPU cluster and worker group of ``dp_size`` ``CpuPolicyWorker`` actors."""
    import numpy as np
    from nemo_rl.distributed.named_sharding import NamedSharding
    from nemo_rl.distributed.virtual_cluster import RayVirtualCluster
    from nemo_rl.distributed.worker_groups import RayWorkerBuilder, RayWorkerGroup

    register_worker_environment()
    cluster = RayVirtualCluster(bundle_ct_per_node_list=[dp_size], use_gpus=False, num_gpus_per_node=dp_size,
                                max_colocated_worker_groups=1, name=f"{name}_dp{dp_size}")
    sharding = NamedSharding(layout=np.arange(dp_size).reshape(1, dp_size, 1, 1),
                             names=["pipeline_parallel", "data_parallel", "context_parallel", "tensor_parallel"])
    builder = RayWorkerBuilder(WORKER_FQN, pretrained_path, seed=seed)
    group = RayWorkerGroup(cluster, builder, name_prefix=f"{name}_dp{dp_size}", sharding_annotations=sharding)
    return cluster, group


def _policy_base():
    from nemo_rl.models.policy.lm_policy import Policy

    return Policy


class TrainCall:
    """One ``policy.train`` as the policy saw it: the batch with the attached keys, the wrapper's counter, and
    every loss call on every DP rank."""

    def __init__(self, data: dict[str, Any], wrapper: Any, records: list[dict[str, Any]], results: dict[str, Any]):
        self.data = data
        self.wrapper_type = type(wrapper).__name__ if wrapper is not None else None
        self.optimizer_step_after = getattr(wrapper, "optimizer_step", None)
        self.records = records
        self.results = results


class CpuPolicy(_policy_base()):  # type: ignore[misc]
    """NeMo-RL's ``Policy`` driving :class:`CpuPolicyWorker` actors (see the module doc)."""

    def __init__(self, worker_group, config: dict[str, Any], *, weights_path=None, optimizer_path=None):
        # Policy.__init__ is not run (GPU cluster, hub config, uv venvs); these are the attributes it sets that
        # its other methods read.
        self.worker_group = worker_group
        self.sharding_annotations = worker_group.sharding_annotations
        self.cfg = config
        self.flops_tracker = None
        self.debug_payload_metrics = False
        self.use_dynamic_batches = False
        self.use_sequence_packing = bool(config["sequence_packing"]["enabled"])
        if self.use_sequence_packing:
            self.sequence_packing_args = {
                "algorithm": config["sequence_packing"]["algorithm"],
                "input_key": "input_ids",
                "input_lengths_key": "input_lengths",
                "sequence_length_pad_multiple": config["make_sequence_length_divisible_by"],
            }
            if config["sequence_packing"].get("microbatch_order") is not None:
                self.sequence_packing_args["microbatch_order"] = config["sequence_packing"]["microbatch_order"]
        self.train_calls: list[TrainCall] = []
        ray.get(worker_group.run_all_workers_single_data(
            "init_run", config=config, weights_path=None if weights_path is None else str(weights_path),
            optimizer_path=None if optimizer_path is None else str(optimizer_path)))

    def train(self, data, loss_fn, *args: Any, **kwargs: Any):
        # Who called us: grpo_train's policy must be the plugin's StepPlanPolicy wrapping this object.
        caller = inspect.currentframe().f_back.f_locals.get("self")  # type: ignore[union-attr]
        wrapper = caller if caller is not None and getattr(caller, "wrapped_policy", None) is self else None
        data[ROW_TAG] = torch.arange(data.size, dtype=torch.int64)
        snapshot = {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in data.items()}
        results = super().train(data, loss_fn, *args, **kwargs)
        records = [r for rs in ray.get(self.worker_group.run_all_workers_single_data("pop_loss_records"))
                   for r in rs]
        self.train_calls.append(TrainCall(snapshot, wrapper, records, results))
        return results

    def get_weights_state_dict(self) -> dict[str, torch.Tensor]:
        return ray.get(self.worker_group.workers[0].get_state_dict.remote())

    def shutdown(self) -> bool:
        return True  # the worker group belongs to the harness and outlives this run

    def __del__(self) -> None:
        pass


# ----------------------------------------------------------------------------------------------- generation
def _generation_base():
    from nemo_rl.models.generation.interfaces import GenerationInterface

    return GenerationInterface


class CpuGeneration(_generation_base()):  # type: ignore[misc]
    """NeMo-RL's ``GenerationInterface`` on the CPU: temperature sampling (or greedy) from the tiny model, stopping
    at ``stop_token_ids`` or ``max_new_tokens``. Sampling uses a generator seeded from the run seed and the batch
    content, so a resumed run samples what an uninterrupted one would."""

    def __init__(self, generation_config: dict[str, Any], *, seed: int = 0):
        self.cfg = generation_config
        self.seed = seed
        self.model = tiny.build_model(seed).eval()
        self.weight_synchronizer = None

    def init_collective(self, ip: str, port: int, world_size: int, *, train_world_size: int):
        return []

    def prepare_for_generation(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def finish_generation(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def shutdown(self) -> bool:
        return True

    def generate(self, data, greedy: bool = False):
        from nemo_rl.distributed.batched_data_dict import BatchedDataDict
        from nemo_entropy.engine.task import stream_seed

        input_ids, input_lengths = data["input_ids"], data["input_lengths"]
        pad = self.cfg["_pad_token_id"]
        stops = set(self.cfg.get("stop_token_ids") or [])
        max_new = int(self.cfg["max_new_tokens"])
        temperature = float(self.cfg["temperature"])
        generator = torch.Generator().manual_seed(stream_seed("generate", self.seed, input_ids.tolist()))
        batch, width = input_ids.shape[0], input_ids.shape[1] + max_new
        output_ids = torch.full((batch, width), pad, dtype=torch.long)
        logprobs = torch.zeros(batch, width, dtype=torch.float32)
        gen_lengths = torch.zeros(batch, dtype=torch.long)
        truncated = torch.zeros(batch, dtype=torch.bool)
        with torch.no_grad():
            for i in range(batch):
                n = int(input_lengths[i])
                seq = input_ids[i, :n].clone()
                stopped = False
                for _ in range(max_new):
                    logits = self.model(input_ids=seq[None]).logits[0, -1].float() / temperature
                    logp = torch.log_softmax(logits, -1)
                    token = int(logp.argmax()) if greedy else int(torch.multinomial(logp.exp(), 1, generator=generator))
                    logprobs[i, seq.numel()] = logp[token]
                    seq = torch.cat([seq, torch.tensor([token])])
                    if token in stops:
                        stopped = True
                        break
                output_ids[i, : seq.numel()] = seq
                gen_lengths[i] = seq.numel() - n
                truncated[i] = not stopped
        return BatchedDataDict({
            "output_ids": output_ids, "logprobs": logprobs, "generation_lengths": gen_lengths,
            "unpadded_sequence_lengths": input_lengths.to(torch.long) + gen_lengths, "truncated": truncated,
        })


def _synchronizer_base():
    from nemo_rl.weight_sync.interfaces import WeightSynchronizer

    return WeightSynchronizer


class CpuWeightSynchronizer(_synchronizer_base()):  # type: ignore[misc]
    """NeMo-RL's ``WeightSynchronizer``: refit copies DP rank 0's state dict into the generation model."""

    def __init__(self, policy: CpuPolicy, generation: CpuGeneration):
        self.policy = policy
        self.generation = generation
        self._stale = True
        self.syncs = 0

    def sync_weights(self, *, timer=None, kv_scales=None):
        self.generation.model.load_state_dict(self.policy.get_weights_state_dict())
        self._stale = False
        self.syncs += 1
        return {}

    @property
    def is_stale(self) -> bool:
        return self._stale

    def init_communicator(self) -> None:
        return None

    def shutdown(self) -> None:
        return None

