"""The CPU policy worker: one DP rank, a Ray actor created by NeMo-RL's own worker group.

``CpuPolicyWorker`` is created by NeMo-RL's ``RayVirtualCluster(use_gpus=False)`` / ``RayWorkerBuilder`` /
``RayWorkerGroup``, which give it ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``; it joins a gloo group
and a CPU ``DeviceMesh``. Its ``train`` and ``get_logprobs`` follow ``dtensor_policy_worker_v2.py`` step by step
and call NeMo-RL's own functions for everything that runs on a CPU: ``check_sequence_dim``,
``process_global_batch``, ``get_microbatch_iterator``, ``automodel_forward_backward`` with ``LossPostProcessor``
(which wraps the loss in ``SequencePackingLossWrapper`` when packing is on) and ``LogprobsPostProcessor``,
``forward_with_post_processing_fn``, ``aggregate_training_statistics``. The model is a transformers
``Qwen2ForCausalLM`` built in code, data-parallel through ``DistributedDataParallel`` over gloo (the DTensor worker
uses FSDP2, which averages gradients the same way; NeMo-RL's ``loss * dp_size`` turns the average into the sum).

A thin recording wrapper around the loss (:class:`LossRecorder`) keeps, for every loss call, what reached the
loss: the attached step plan's selection, uids and steps, the masks, the harness's own row tag, the current
log-probs and the returned metrics. The driver collects them after each ``policy.train`` (``pop_loss_records``).

This module imports no NeMo-RL code at import time (the actor processes import only what they call).
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Optional

import ray
import torch

from nemo_entropy.integrations import batch_keys
from nemo_entropy.integrations.batch_keys import PLAN_PREFIX

from . import tiny
from .cuda_on_cpu import cuda_on_cpu

WORKER_FQN = "tests.nemo_rl_real.cpu_worker.CpuPolicyWorker"
ROW_TAG = "harness_row"
"""The harness's own per-sample tag (row index in ``train_data``), added before NeMo-RL shards the batch."""


# ----------------------------------------------------------------------------------------------- the loss recorder
class LossRecorder:
    """Calls the loss and keeps what reached it. Attributes NeMo-RL reads from the loss (``loss_type``,
    ``input_type``, ``use_fused_linear_logprobs``, ...) are the wrapped loss's."""

    def __init__(self, loss_fn: Any):
        self.loss_fn = loss_fn
        self.records: list[dict[str, Any]] = []
        self.global_batch = 0
        self.microbatch = 0
        self.valid_microbatches = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["loss_fn"], name)

    def on_microbatch_start(self, index: int) -> None:
        self.microbatch = index

    @staticmethod
    def _from_logits(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-prob of each next token, full-vocabulary entropy) from raw logits, by plain log-softmax."""
        length = input_ids.shape[1]
        logp = torch.log_softmax(logits.detach().float()[:, : length - 1], dim=-1)
        chosen = logp.gather(-1, input_ids[:, 1:].unsqueeze(-1).to(logp.device)).squeeze(-1)
        return chosen, -(logp.exp() * logp).sum(-1)

    def __call__(self, *args: Any, **kwargs: Any):
        loss, metrics = self.loss_fn(*args, **kwargs)
        data = kwargs["data"]
        if type(self.loss_fn).__name__ == "OldEntropyProbe":  # the driver's eval-mode entropy pass: no loss
            return loss, metrics
        if "next_token_logprobs" in kwargs:  # LogprobInput: log-probs computed by NeMo-RL's prepare_loss_input
            curr, entropy = kwargs["next_token_logprobs"].detach().float(), None
        else:  # LOGIT input: the loss got raw logits
            curr, entropy = self._from_logits(kwargs["logits"], data["input_ids"])
        opt = lambda key, cut=True: (None if key not in data else  # noqa: E731
                                     (data[key][:, 1:] if cut else data[key]).detach().clone().cpu())
        self.records.append({
            "global_batch": self.global_batch,
            "microbatch": self.microbatch,
            "dummy": self.microbatch >= self.valid_microbatches,
            "rows": data[ROW_TAG].detach().clone().cpu().to(torch.int64),
            "mask": ((data["token_mask"][:, 1:] * data["sample_mask"].unsqueeze(-1)) != 0).cpu(),
            "curr": curr.cpu(),
            "entropy": None if entropy is None else entropy.cpu(),
            "prev": opt("prev_logprobs"),
            "adv": opt("advantages"),
            # the covariance selection of the attached step plan: entropy_plan.<control>.selected:bool
            "selected": next((opt(k) for k in data if k.startswith(f"{PLAN_PREFIX}.")
                              and k.endswith(".selected:bool")), None),
            "uids": opt(batch_keys.TOKEN_UIDS),
            "step": opt(batch_keys.STEP, cut=False),
            "plan_step": opt(f"{PLAN_PREFIX}.step", cut=False),
            "old_entropy": opt(batch_keys.OLD_ENTROPY),
            "kept": opt(f"{PLAN_PREFIX}.top_entropy.kept:bool"),
            "gvt": float(kwargs["global_valid_toks"]),
            "gvs": float(kwargs["global_valid_seqs"]),
            "metrics": {k: float(v) for k, v in metrics.items()},
            "loss": float(loss.detach()),
        })
        return loss, metrics


# ----------------------------------------------------------------------------------------------- the worker
def _build_optimizer_and_scheduler(model: torch.nn.Module, cfg: dict[str, Any]):
    """``policy.optimizer`` / ``policy.scheduler`` as NeMo-RL configs describe them (class path + kwargs; a list of
    schedulers with ``milestones`` is a ``SequentialLR``). A Megatron config (``policy.optimizer: null``,
    ``policy.megatron_cfg.optimizer``) gets torch's Adam with its lr, betas, eps and weight decay in place of
    Megatron's distributed Adam, and a constant schedule (the paper's recipes: constant lr, no warm-up)."""
    from hydra.utils import get_class

    if cfg.get("optimizer") is None and (cfg.get("megatron_cfg") or {}).get("enabled"):
        mopt = cfg["megatron_cfg"]["optimizer"]
        if mopt["optimizer"] != "adam":
            raise ValueError(f"the CPU worker stands in for Megatron's adam only, not {mopt['optimizer']!r}")
        optimizer = torch.optim.AdamW(model.parameters(), lr=mopt["lr"], weight_decay=mopt["weight_decay"],
                                      betas=(mopt["adam_beta1"], mopt["adam_beta2"]), eps=mopt["adam_eps"])
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda _: 1.0)
    optimizer = get_class(cfg["optimizer"]["name"])(model.parameters(), **dict(cfg["optimizer"]["kwargs"]))
    spec = cfg.get("scheduler")
    if isinstance(spec, dict):
        return optimizer, get_class(spec["name"])(optimizer, **spec["kwargs"])
    if not spec:
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda=lambda _: 1.0)
    parts = [get_class(s["name"])(optimizer, **s["kwargs"]) for s in spec if "name" in s]
    milestones = [m for s in spec if "milestones" in s for m in s["milestones"]]
    return optimizer, torch.optim.lr_scheduler.SequentialLR(optimizer, parts, milestones)


@ray.remote
class CpuPolicyWorker:
    """One DP rank of the CPU policy (see the module doc). Persistent: ``init_run`` rebuilds the model, the
    optimizer and the scheduler for each GRPO run, from the pretrained (warm-start) state or a checkpoint."""

    def __init__(self, pretrained_path: str, seed: int = 0, **_: Any):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        torch.set_num_threads(1)
        if not dist.is_initialized():
            dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from RayWorkerGroup
        self.rank, self.dp_size = dist.get_rank(), dist.get_world_size()
        self.device_mesh = init_device_mesh("cpu", (self.dp_size,), mesh_dim_names=("dp",))
        self.dp_mesh = self.device_mesh["dp"]
        self.pretrained_path = pretrained_path
        self.seed = seed
        self.tokenizer = tiny.build_tokenizer()
        self.recorder: Optional[LossRecorder] = None
        self.pending_records: list[dict[str, Any]] = []

    # ------------------------------------------------------------------ run set-up
    def init_run(self, config: dict[str, Any], weights_path: Optional[str] = None,
                 optimizer_path: Optional[str] = None) -> int:
        from nemo_rl.algorithms.logits_sampling_utils import TrainingSamplingParams

        self.cfg = config
        self.enable_seq_packing = bool(config["sequence_packing"]["enabled"])
        self.max_grad_norm = config["max_grad_norm"]
        generation = config["generation"]
        self.sampling_params = TrainingSamplingParams(top_k=generation["top_k"], top_p=generation["top_p"],
                                                      temperature=generation["temperature"])
        module = tiny.build_model(self.seed)
        state = Path(weights_path) / "model.pt" if weights_path else Path(self.pretrained_path)
        module.load_state_dict(torch.load(state, weights_only=True))
        self.module = module
        self.model = (torch.nn.parallel.DistributedDataParallel(module, broadcast_buffers=False)
                      if self.dp_size > 1 else module)
        self.optimizer, self.scheduler = _build_optimizer_and_scheduler(module, config)
        if optimizer_path:
            saved = torch.load(Path(optimizer_path) / "optim.pt", weights_only=False)
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scheduler.load_state_dict(saved["scheduler"])
        self.pending_records = []
        return self.rank

    # ------------------------------------------------------------------ training (dtensor_policy_worker_v2.train)
    def train(self, data, loss_fn, eval_mode: bool = False, gbs: Optional[int] = None, mbs: Optional[int] = None,
              check_dim_skip_keys=None) -> dict[str, Any]:
        from nemo_rl.models.automodel.data import check_sequence_dim, get_microbatch_iterator, process_global_batch
        from nemo_rl.models.automodel.train import (
            LossPostProcessor,
            aggregate_training_statistics,
            automodel_forward_backward,
        )

        gbs = gbs or self.cfg["train_global_batch_size"]
        mbs = mbs or self.cfg["train_micro_batch_size"]
        local_gbs = gbs // self.dp_size
        recorder = LossRecorder(loss_fn)
        with cuda_on_cpu():
            total_dataset_size = torch.tensor(data.size, device="cuda")
            torch.distributed.all_reduce(total_dataset_size, op=torch.distributed.ReduceOp.SUM,
                                         group=self.dp_mesh.get_group())
            num_global_batches = int(total_dataset_size.item()) // gbs
            sequence_dim, _ = check_sequence_dim(data, skip_keys=check_dim_skip_keys)
            if eval_mode:
                ctx = torch.no_grad()
                self.model.eval()
            else:
                ctx = nullcontext()
                self.model.train()
            loss_post_processor = LossPostProcessor(
                loss_fn=recorder, cfg=self.cfg, device_mesh=self.device_mesh, cp_mesh=None, tp_mesh=None,
                cp_size=1, dp_size=self.dp_size, enable_seq_packing=self.enable_seq_packing,
                sampling_params=self.sampling_params,
            )
            with ctx:
                data = data.to("cuda")
                losses, all_mb_metrics = [], []
                grad_norm = None
                for gb_idx in range(num_global_batches):
                    gb_result = process_global_batch(data, recorder, self.dp_mesh.get_group(), batch_idx=gb_idx,
                                                     batch_size=local_gbs)
                    batch = gb_result["batch"]
                    global_valid_seqs = gb_result["global_valid_seqs"]
                    global_valid_toks = gb_result["global_valid_toks"]
                    self.optimizer.zero_grad()
                    processed_iterator, iterator_len = get_microbatch_iterator(
                        batch, self.cfg, mbs, self.dp_mesh, tokenizer=self.tokenizer, cp_size=1)
                    recorder.global_batch, recorder.valid_microbatches = gb_idx, iterator_len
                    mb_results = automodel_forward_backward(
                        model=self.model, data_iterator=processed_iterator, post_processing_fn=loss_post_processor,
                        forward_only=eval_mode, is_reward_model=False, allow_flash_attn_args=True,
                        global_valid_seqs=global_valid_seqs, global_valid_toks=global_valid_toks,
                        sampling_params=self.sampling_params, sequence_dim=sequence_dim, dp_size=self.dp_size,
                        cp_size=1, num_global_batches=num_global_batches, train_context_fn=None,
                        num_valid_microbatches=iterator_len, on_microbatch_start=recorder.on_microbatch_start,
                    )
                    mb_losses = []
                    for mb_idx, (loss, loss_metrics) in enumerate(mb_results):
                        if mb_idx < iterator_len:
                            num_valid_samples = loss_metrics["num_valid_samples"]
                            loss_metrics["lr"] = self.optimizer.param_groups[0]["lr"]
                            loss_metrics["global_valid_seqs"] = global_valid_seqs.item()
                            loss_metrics["global_valid_toks"] = global_valid_toks.item()
                            if num_valid_samples > 0:
                                mb_losses.append(loss.item())
                                all_mb_metrics.append(loss_metrics)
                    if not eval_mode:
                        # The DTensor worker uses nemo_automodel's scale_grads_and_clip_grad_norm (FSDP2-aware);
                        # with DDP-reduced plain tensors this is torch's clip_grad_norm_.
                        grad_norm = torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.max_grad_norm)
                        grad_norm = torch.tensor(float(grad_norm), dtype=torch.float32)
                        self.optimizer.step()
                    losses.append(torch.tensor(mb_losses).sum().item())
                self.optimizer.zero_grad()
                if not eval_mode:
                    self.scheduler.step()
                metrics = aggregate_training_statistics(
                    losses=losses, all_mb_metrics=all_mb_metrics, grad_norm=grad_norm,
                    dp_group=self.dp_mesh.get_group(), dtype=torch.float32,
                )
        self.pending_records.extend(recorder.records)
        return metrics

    def pop_loss_records(self) -> list[dict[str, Any]]:
        records, self.pending_records = self.pending_records, []
        return [{**r, "dp_rank": self.rank} for r in records]

    # ------------------------------------------------------------------ log-probs (dtensor_policy_worker_v2)
    def get_logprobs(self, data, micro_batch_size: Optional[int] = None):
        from nemo_rl.distributed.batched_data_dict import BatchedDataDict
        from nemo_rl.models.automodel.data import check_sequence_dim, get_microbatch_iterator
        from nemo_rl.models.automodel.train import LogprobsPostProcessor, forward_with_post_processing_fn

        logprob_batch_size = micro_batch_size if micro_batch_size is not None else self.cfg["logprob_batch_size"]
        with cuda_on_cpu():
            sequence_dim, seq_dim_size = check_sequence_dim(data)
            self.module.eval()
            post = LogprobsPostProcessor(cfg=self.cfg, device_mesh=self.device_mesh, cp_mesh=None, tp_mesh=None,
                                         cp_size=1, enable_seq_packing=self.enable_seq_packing,
                                         sampling_params=self.sampling_params)
            all_log_probs = []
            with torch.no_grad():
                data.to("cuda")
                iterator, iterator_len = get_microbatch_iterator(data, self.cfg, logprob_batch_size, self.dp_mesh,
                                                                 tokenizer=self.tokenizer, cp_size=1)
                for batch_idx, processed_mb in enumerate(iterator):
                    token_logprobs, _, _ = forward_with_post_processing_fn(
                        model=self.module, post_processing_fn=post, processed_mb=processed_mb,
                        is_reward_model=False, allow_flash_attn_args=True, sampling_params=self.sampling_params,
                        sequence_dim=sequence_dim,
                    )
                    if batch_idx >= iterator_len:
                        continue
                    all_log_probs.append(token_logprobs)
            padded = [torch.nn.functional.pad(lp, (0, seq_dim_size - lp.shape[1])) if lp.shape[1] < seq_dim_size
                      else lp for lp in all_log_probs]
            out = BatchedDataDict()
            out["logprobs"] = torch.cat(padded, dim=0).cpu()
        return out

    # ------------------------------------------------------------------ state, checkpoints, phases
    def get_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def save_checkpoint(self, weights_path: str, optimizer_path: Optional[str] = None,
                        tokenizer_path: Optional[str] = None, checkpointing_cfg: Any = None) -> None:
        """Rank 0 writes the model (``weights/model.pt``), optimizer + scheduler (``optimizer/optim.pt``) and the
        tokenizer into NeMo-RL's checkpoint layout (``tmp_step_N/policy/...``)."""
        if self.rank == 0:
            Path(weights_path).mkdir(parents=True, exist_ok=True)
            torch.save(self.module.state_dict(), Path(weights_path) / "model.pt")
            if optimizer_path:
                Path(optimizer_path).mkdir(parents=True, exist_ok=True)
                torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                           Path(optimizer_path) / "optim.pt")
            if tokenizer_path:
                self.tokenizer.save_pretrained(tokenizer_path)
        torch.distributed.barrier()

    def finalize_async_save(self) -> None:
        return None

    def prepare_for_training(self, *args: Any, **kwargs: Any) -> None:
        self.model.train()

    def prepare_for_lp_inference(self, keep_train_buffers: bool = False) -> None:
        self.model.eval()

    def offload_before_refit(self) -> None:
        return None  # nothing lives on a GPU

    def offload_after_refit(self) -> None:
        return None

    def shutdown(self) -> bool:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
        return True
