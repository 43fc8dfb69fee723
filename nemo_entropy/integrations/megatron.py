"""Megatron-side helpers: the parallel layout of a run, and the step plan built inside Megatron workers.

Layout: a Megatron job of ``world = num_nodes x gpus_per_node`` GPUs is split ``world = TP x PP x CP x DP``.
:func:`parallel_layout` derives DP and checks every divisibility the run relies on, with errors that name
the config key.

In-worker planning (``nemo_rl.plan: worker``): instead of planning on the driver, each worker can plan over the
token group, the DP ranks of the last pipeline stage (CP ranks hold full sequences after NeMo-RL's log-prob gather;
TP ranks are replicas and compute the same plan). :func:`plan_in_worker` builds it on one rank's share of one
optimizer step; its selection is bit-identical to the driver's over the whole step (tests prove it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

import torch

from ..config import LossConfig
from ..parallel import ParallelGroups
from ..plan import StepInputs, StepPlan, build_step_plan
from . import batch_keys

__all__ = ["ParallelLayout", "parallel_layout", "plan_in_worker"]


@dataclass(frozen=True)
class ParallelLayout:
    """How the GPUs of a run are split. ``world == tp * pp * cp * dp``."""

    world: int
    tp: int
    pp: int
    cp: int
    dp: int
    backend: str
    """``megatron``, ``dtensor`` or ``local`` (the embedded engine)."""

    def describe(self) -> str:
        """One line for the run log."""
        return (f"{self.backend}: world {self.world} = TP {self.tp} x PP {self.pp} x CP {self.cp} x DP {self.dp}")


def _positive_int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{key}={value!r} is invalid: allowed an integer >= 1")
    return value


def parallel_layout(cfg: Mapping[str, Any]) -> ParallelLayout:
    """The TP/PP/CP/DP layout of a run config (plain nested mappings), checked.

    ``backend: nemo_rl``: world = ``cluster.num_nodes * cluster.gpus_per_node``; TP/PP/CP from
    ``policy.megatron_cfg`` when it is enabled, else from ``policy.dtensor_cfg`` (PP 1). ``backend: local``:
    world = ``engine.nproc`` (default 1), TP = ``engine.tp_size`` (default 1).
    Also checks that each optimizer step splits evenly over DP ranks and micro-batches.
    """
    backend = cfg.get("backend", "nemo_rl")
    policy = cfg.get("policy") or {}
    if backend == "local":
        engine = cfg.get("engine") or {}
        world = _positive_int(engine.get("nproc", 1), "engine.nproc")
        tp, pp, cp, kind = _positive_int(engine.get("tp_size", 1), "engine.tp_size"), 1, 1, "local"
        tp_key = "engine.tp_size"
        world_desc = f"engine.nproc={world}"
    else:
        cluster = cfg.get("cluster") or {}
        nodes = _positive_int(cluster.get("num_nodes"), "cluster.num_nodes")
        per_node = _positive_int(cluster.get("gpus_per_node"), "cluster.gpus_per_node")
        world = nodes * per_node
        world_desc = f"cluster.num_nodes * cluster.gpus_per_node = {nodes} * {per_node} = {world}"
        megatron = policy.get("megatron_cfg") or {}
        dtensor = policy.get("dtensor_cfg") or {}
        if megatron.get("enabled", False):
            kind = "megatron"
            tp = _positive_int(megatron.get("tensor_model_parallel_size", 1), "policy.megatron_cfg.tensor_model_parallel_size")
            pp = _positive_int(megatron.get("pipeline_model_parallel_size", 1), "policy.megatron_cfg.pipeline_model_parallel_size")
            cp = _positive_int(megatron.get("context_parallel_size", 1), "policy.megatron_cfg.context_parallel_size")
            tp_key = "policy.megatron_cfg.tensor_model_parallel_size"
            if megatron.get("sequence_parallel", False) and tp == 1:
                raise ValueError("policy.megatron_cfg.sequence_parallel=true needs tensor_model_parallel_size > 1")
        else:
            kind = "dtensor"
            tp = _positive_int(dtensor.get("tensor_parallel_size", 1), "policy.dtensor_cfg.tensor_parallel_size")
            cp = _positive_int(dtensor.get("context_parallel_size", 1), "policy.dtensor_cfg.context_parallel_size")
            pp = 1
            tp_key = "policy.dtensor_cfg.tensor_parallel_size"
        if backend == "nemo_rl" and kind == "megatron" and tp > per_node:
            raise ValueError(f"{tp_key}={tp} exceeds cluster.gpus_per_node={per_node}: keep TP inside a node (NVLink)")
    model_parallel = tp * pp * cp
    if world % model_parallel != 0:
        raise ValueError(
            f"TP x PP x CP = {tp} x {pp} x {cp} = {model_parallel} does not divide the world size ({world_desc}); "
            f"change {tp_key} / pipeline / context parallel sizes or the number of nodes"
        )
    dp = world // model_parallel
    gbs = policy.get("train_global_batch_size")
    mbs = policy.get("train_micro_batch_size")
    if gbs is not None and mbs is not None:
        gbs = _positive_int(gbs, "policy.train_global_batch_size")
        mbs = _positive_int(mbs, "policy.train_micro_batch_size")
        if gbs % (dp * mbs) != 0:
            raise ValueError(
                f"policy.train_global_batch_size={gbs} is not a multiple of DP x policy.train_micro_batch_size = "
                f"{dp} x {mbs}: an optimizer step must split evenly over the data-parallel ranks"
            )
    grpo = cfg.get("grpo") or {}
    if gbs is not None and grpo.get("num_prompts_per_step") is not None:
        rollout = int(grpo["num_prompts_per_step"]) * int(grpo.get("num_generations_per_prompt", 1))
        if rollout % gbs != 0:
            raise ValueError(
                f"grpo.num_prompts_per_step x grpo.num_generations_per_prompt = {rollout} is not a multiple of "
                f"policy.train_global_batch_size={gbs}: a rollout must be a whole number of optimizer steps"
            )
    return ParallelLayout(world=world, tp=tp, pp=pp, cp=cp, dp=dp, backend=kind)


def plan_in_worker(
    config: LossConfig,
    local_batch: Mapping[str, torch.Tensor],
    *,
    groups: Optional[ParallelGroups] = None,
    step: Optional[int] = None,
) -> Optional[StepPlan]:
    """The plan of this rank's share of one optimizer step, over the token group.

    ``local_batch``: the samples of one optimizer step held by this DP rank, NeMo-RL layout ([B, S] tensors
    ``token_mask``, ``prev_logprobs``, ``advantages``, [B] ``sample_mask``, and the driver's
    ``entropy_token_uids`` / ``entropy_step``). ``groups``: default from megatron-core's ``parallel_state``
    (token group = DP; CP ranks hold full sequences). Returns the plan (its tensors [B, S - 1], shifted like the
    log-probs; ``plan.selected`` is the selection), or None on ranks that are not on the last pipeline stage (they compute no loss and must not
    enter the token-group collectives).
    """
    if groups is None:
        groups = ParallelGroups.from_megatron(cp_holds_full_sequences=True)
    if not groups.is_last_pp_stage:
        return None
    if batch_keys.TOKEN_UIDS not in local_batch:
        raise KeyError(
            f"{batch_keys.TOKEN_UIDS!r} is missing from the batch: attach it on the driver "
            "(StepPlanPolicy with plan='worker') so that every token has a layout-independent id"
        )
    mask = batch_keys.valid_token_mask(local_batch)
    old = torch.where(mask, local_batch["prev_logprobs"][:, 1:].float(), torch.zeros(()))
    adv = torch.where(mask, local_batch["advantages"][:, 1:].float(), torch.zeros(()))
    if step is None:
        step = int(local_batch[batch_keys.STEP].reshape(-1)[0]) if batch_keys.STEP in local_batch else 0
    uids = local_batch[batch_keys.TOKEN_UIDS][:, 1:].to(torch.int64).contiguous()
    return build_step_plan(config, StepInputs(old, adv, mask, uids), step=step, groups=groups)
