"""The GRPO loop of the local engine, with exactly the loss, selection and entropy code of the NeMo-RL path.

One RL step: sample ``num_prompts_per_step`` problems (seeded by the step), ``num_generations_per_prompt``
responses each, verifier rewards (0 or 1), group-normalised advantages, the rollout policy's log-probs and
full-vocabulary entropy; then ``samples / train_global_batch_size`` optimizer steps. Each optimizer step
builds its plan once over the whole mini-batch on every DP rank (:func:`nemo_entropy.plan.build_step_plan`:
the global counts, the covariance selection, every control's per-step values), then runs
:func:`nemo_entropy.losses.policy_loss` per micro-batch on the plan's rows, sums the gradients over DP and clips
them by the global norm; stateful controls record the plan after the step and move their state at the end of the
rollout (or after each step with ``loss_fn.controller_update: optimizer_step``).

Layout invariance (1 process == DP x TP up to fp32 rounding): every sample is identified by its global
index (prompt * generations + generation); its prompt, its sampling noise and its token uids derive from
that index and the step, and each rank holds a fixed slice of every mini-batch. Sum-normalised losses
summed over DP give the single-process gradient.
"""

from __future__ import annotations

import os
import platform
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from nemo_entropy.config import loss_config
from nemo_entropy.controls import ControlSet
from nemo_entropy.losses import accumulate_metrics, metric_reduction, policy_loss
from nemo_entropy.parallel import ParallelGroups, ProcessGroup, new_subgroups, tp_all_reduce
from nemo_entropy.plan import StepInputs, build_step_plan
from nemo_entropy.exact import token_uids_for

from .checkpoint import NoIntactCheckpoint, latest_intact_checkpoint, load_checkpoint, save_checkpoint
from .metrics import MetricsLog, entropy_summary, read_metrics, update_run_info, write_run_info
from .model import TinyPolicy
from .preemption import INTERRUPTED, Interrupted, PreemptionWatcher
from .processes import (all_gather_objects, barrier, broadcast_object, group_all_reduce, world_group,
                        world_rank_and_size)
from .progress import Progress
from .passk import correct_counts, pass_at_k_metrics
from .plot import plot_run
from .rollout import (Rollout, collect_rollout, generate_samples, greedy_accuracy, group_advantages, score,
                      scored_rollout, uniform_groups)
from .settings import EngineSettings
from .step_diagnostics import EntropyChangeCheck, StepDiagnostics
from .task import build_task, stream_seed
from .warm_start import load_or_run_warm_start, warm_start_key


class Preempted(Exception):
    """Raised after the pre-emption checkpoint; the launcher turns it into exit code 3."""

    def __init__(self, step: int):
        super().__init__(f"pre-empted after step {step}")
        self.step = step


@dataclass(frozen=True)
class Layout:
    """This process's place in the DP x TP grid (ranks are TP-major: rank = dp_rank * tp_size + tp_rank)."""

    rank: int
    world_size: int
    dp_rank: int
    dp_size: int
    tp_rank: int
    tp_size: int
    world_group: Optional[ProcessGroup]
    dp_group: Optional[ProcessGroup]
    tp_group: Optional[ProcessGroup]

    @property
    def groups(self) -> ParallelGroups:
        return ParallelGroups.from_groups(token_group=self.dp_group, tp_group=self.tp_group)

    def as_dict(self) -> dict[str, int]:
        return {"world_size": self.world_size, "dp_size": self.dp_size, "tp_size": self.tp_size}


def build_layout(tp_size: int) -> Layout:
    """Create the DP and TP groups of the current default group (one process: no groups)."""
    rank, world = world_rank_and_size()
    if world % tp_size:
        raise ValueError(f"engine.tp_size={tp_size} must divide the number of processes {world}")
    dp = world // tp_size
    tp_group = dp_group = None
    if world > 1:
        tp_groups = new_subgroups([[d * tp_size + t for t in range(tp_size)] for d in range(dp)])
        dp_groups = new_subgroups([[d * tp_size + t for d in range(dp)] for t in range(tp_size)])
        tp_group = tp_groups[rank // tp_size] if tp_size > 1 else None
        dp_group = dp_groups[rank % tp_size] if dp > 1 else None
    return Layout(rank, world, rank // tp_size, dp, rank % tp_size, tp_size, world_group(), dp_group, tp_group)


class GRPOTrainer:
    """The local GRPO run of one process (all ranks construct one and call :meth:`run`)."""

    def __init__(self, settings: EngineSettings, layout: Layout, *, after_step: Optional[Callable[[int], None]] = None):
        self.s = settings
        self.layout = layout
        self.after_step = after_step
        self.task = build_task(settings.task)
        self.loss_cfg = loss_config(settings.loss_fn)
        self.controls = ControlSet(self.loss_cfg)
        self.max_positions = self.task.prompt_length + self.task.max_response_length
        self.policy = self._build_policy(layout.tp_group, layout.tp_rank, layout.tp_size)
        if settings.optimizer == "sgd":
            self.optimizer = torch.optim.SGD(self.policy.parameters(), lr=settings.lr,
                                             weight_decay=settings.weight_decay)
        else:
            self.optimizer = torch.optim.AdamW(
                self.policy.parameters(), lr=settings.lr, betas=settings.betas, eps=settings.eps,
                weight_decay=settings.weight_decay,
            )
        self.step = 0
        self.optimizer_step = 0
        self.generation_metrics: dict[str, float] = {}
        self.resumed_from: Optional[int] = None
        self.warm_start_info: dict[str, Any] = {}
        self.is_logger = layout.rank == 0
        val_operands = self.task.sample_operands(settings.num_val_problems, stream_seed(settings.seed, "validation"))
        self.val_operands = torch.tensor_split(val_operands, layout.dp_size)[layout.dp_rank]

    # ------------------------------------------------------------------ set-up
    def _build_policy(self, tp_group, tp_rank, tp_size) -> TinyPolicy:
        return TinyPolicy(
            self.s.model, vocab_size=self.task.vocab_size, max_positions=self.max_positions, seed=self.s.seed,
            tp_group=tp_group, tp_rank=tp_rank, tp_size=tp_size,
        )

    def warm_start_path(self) -> str:
        key = warm_start_key(self.s.model, self.s.task, self.s.warm_start, self.s.seed)
        directory = self.s.warm_start.get("cache_dir") or (self.s.checkpoint_dir if self.s.checkpointing else self.s.log_dir)
        return os.path.join(str(directory), f"warm_start_{key}.pt")

    def initialise(self) -> None:
        """Resume from the newest complete checkpoint, or warm-start (rank 0 trains, everyone loads)."""
        latest = self._intact_checkpoint() if self.s.checkpointing else None
        if latest is not None:
            step, path = latest
            state = load_checkpoint(path, rank=self.layout.rank, layout=self.layout.as_dict())
            self.policy.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            torch.set_rng_state(state["rng"]["torch"])
            self.step, self.optimizer_step = state["step"], state["optimizer_step"]
            self.controls.load_state_dict(state.get("controls", {}))
            self.warm_start_info = state.get("warm_start", {})
            self.resumed_from = step
            if self.is_logger:
                print(f"[nemo-entropy] resumed from step {step} ({path})", flush=True)
            return
        path = self.warm_start_path()
        if self.is_logger:
            blob = load_or_run_warm_start(
                path, lambda: self._build_policy(None, 0, 1), self.task, self.s.warm_start,
                seed=self.s.seed, show_progress=self.s.progress_bar,
            )
            self.warm_start_info = {"steps": len(blob["losses"]), "final_loss": blob["losses"][-1] if blob["losses"] else None,
                                    "seconds": round(blob["seconds"], 2), "cached": blob["cached"], "path": path}
        barrier(self.layout.world_group)
        blob = torch.load(path, map_location="cpu", weights_only=False)
        self.policy.load_full_state_dict(blob["state"])
        torch.manual_seed(stream_seed(self.s.seed, "torch"))

    def _intact_checkpoint(self) -> Optional[tuple[int, str]]:
        """Rank 0 verifies the checkpoints' checksums and every rank resumes from its choice (or stops with it)."""
        found: Any = None
        if self.is_logger:
            try:
                found = latest_intact_checkpoint(self.s.checkpoint_dir)
            except NoIntactCheckpoint as err:
                found = err
        found = broadcast_object(found, 0, self.layout.world_group)
        if isinstance(found, Exception):
            raise found
        return found

    # ------------------------------------------------------------------ one RL step
    def local_sample_ids(self) -> list[int]:
        """Global indices of this rank's samples: its slice of every mini-batch, mini-batches in order."""
        gbs, dp = self.s.train_global_batch_size, self.layout.dp_size
        per_rank = gbs // dp
        return [
            j * gbs + self.layout.dp_rank * per_rank + i
            for j in range(self.s.minibatches_per_rollout)
            for i in range(per_rank)
        ]

    def _gather_dp(self, tensor: torch.Tensor) -> torch.Tensor:
        return self.layout.groups.token_all_gather(tensor)

    def rollout(self, step: int) -> Rollout:
        """This rank's rows of the step's rollout; with dynamic sampling, of the groups with signal
        (:meth:`_dynamic_rollout`). What the generation saw is in :attr:`generation_metrics`."""
        if self.s.use_dynamic_sampling:
            return self._dynamic_rollout(step)
        operands = self.task.sample_operands(self.s.num_prompts_per_step, stream_seed(self.s.seed, "train", step))
        operands = operands.repeat_interleave(self.s.num_generations_per_prompt, dim=0)
        ids = self.local_sample_ids()
        all_ids = self._gather_dp(torch.tensor(ids, dtype=torch.long))

        def every_reward(local: torch.Tensor) -> torch.Tensor:
            out = torch.empty(self.s.samples_per_step)
            out[all_ids] = self._gather_dp(local)
            return out

        self.generation_metrics = {}
        return collect_rollout(
            self.policy, self.task, sample_ids=ids, operands=operands[ids], all_rewards_fn=every_reward,
            group_size=self.s.num_generations_per_prompt, seed=self.s.seed, step=step,
            temperature=self.s.temperature, normalize_rewards=self.s.normalize_rewards,
            leave_one_out=self.s.leave_one_out_baseline, micro_batch_size=self.s.generation_batch_size,
        )

    def _dynamic_rollout(self, step: int) -> Rollout:
        """NeMo-RL's dynamic sampling (``grpo.use_dynamic_sampling``, DAPO): draw generation batches of
        ``prompts_per_generation_batch`` prompts, keep the groups whose rewards are not all equal, until
        ``num_prompts_per_step`` such groups are collected; the first ones in generation order are trained on, the
        rest are discarded. As NeMo-RL, more than ``dynamic_sampling_max_gen_batches`` batches is an error.

        Layout invariance: each generation batch is split over the DP ranks by global sample index (a sample's
        problem and noise derive from ``(seed, step, batch)`` and its index), the responses and rewards are
        all-gathered, and every rank then takes its slice of the kept samples exactly as without dynamic sampling.
        """
        s, g = self.s, self.s.num_generations_per_prompt
        per_batch = s.prompts_per_generation_batch * g
        need = s.samples_per_step
        operands, responses, rewards, gen_ids, generated = [], [], [], [], []
        kept = batches = 0
        while kept < need:
            if batches > s.dynamic_sampling_max_gen_batches:
                raise RuntimeError(
                    f"dynamic sampling drew {batches} generation batches (grpo.dynamic_sampling_max_gen_batches="
                    f"{s.dynamic_sampling_max_gen_batches}) and found {kept // g} of the {s.num_prompts_per_step} groups "
                    f"with unequal rewards it needs at step {step}: raise grpo.dynamic_sampling_max_gen_batches or "
                    f"grpo.batch_multiplier, or lower grpo.num_prompts_per_step")
            batches += 1
            stream = stream_seed(s.seed, "train", step) if batches == 1 else stream_seed(
                s.seed, "train", step, "dynamic_sampling", batches)
            batch_ops = self.task.sample_operands(s.prompts_per_generation_batch, stream).repeat_interleave(g, dim=0)
            ids = torch.arange(per_batch) + (batches - 1) * per_batch
            mine = torch.tensor_split(torch.arange(per_batch), self.layout.dp_size)[self.layout.dp_rank]
            _, local = generate_samples(self.policy, self.task, batch_ops[mine], sample_ids=ids[mine], seed=s.seed,
                                        step=step, temperature=s.temperature, micro_batch_size=s.generation_batch_size)
            local_rewards = self.task.rewards(batch_ops[mine], local)
            parts = all_gather_objects((local, local_rewards), self.layout.dp_group)
            batch_responses = torch.cat([p[0] for p in parts])
            batch_rewards = torch.cat([p[1] for p in parts])
            generated.append(batch_rewards)
            keep = (~uniform_groups(batch_rewards, g)).repeat_interleave(g)
            operands.append(batch_ops[keep])
            responses.append(batch_responses[keep])
            rewards.append(batch_rewards[keep])
            gen_ids.append(ids[keep])
            kept += int(keep.sum())
        every = torch.cat(generated)
        self.generation_metrics = {
            "reward_mean_generated": float(every.double().mean()),
            "zero_advantage_group_fraction_generated": float(uniform_groups(every, g).double().mean()),
            "dynamic_sampling_num_gen_batches": float(batches),
            "dynamic_sampling_num_discarded_valid_samples": float(kept - need),
        }
        rewards_kept = torch.cat(rewards)[:need]
        advantages = group_advantages(rewards_kept, g, normalize=s.normalize_rewards,
                                      leave_one_out=s.leave_one_out_baseline)
        rows = torch.tensor(self.local_sample_ids(), dtype=torch.long)
        ops = torch.cat(operands)[:need][rows]
        return scored_rollout(self.policy, sample_ids=torch.cat(gen_ids)[:need][rows], prompts=self.task.prompts(ops),
                              responses=torch.cat(responses)[:need][rows], rewards=rewards_kept[rows],
                              advantages=advantages[rows], temperature=s.temperature,
                              micro_batch_size=s.generation_batch_size)

    def _all_reduce_grads(self) -> float:
        """Sum gradients over DP, clip by the global norm; returns the norm before clipping."""
        params = [p for p in self.policy.parameters()]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if self.layout.dp_group is not None:
            flat = torch.cat([p.grad.reshape(-1) for p in params])
            group_all_reduce(flat, self.layout.dp_group, "sum")
            offset = 0
            for p in params:
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                offset += p.numel()
        replicated = sum(float(p.grad.double().pow(2).sum()) for p in self.policy.replicated_parameters())
        sharded = torch.tensor([sum(float(p.grad.double().pow(2).sum()) for p in self.policy.sharded_parameters())],
                               dtype=torch.float64)
        tp_all_reduce(self.layout.tp_group, sharded, "sum")
        norm = (replicated + float(sharded)) ** 0.5
        if self.s.max_grad_norm is not None:
            coef = self.s.max_grad_norm / (norm + 1e-6)
            if coef < 1.0:
                for p in params:
                    p.grad.mul_(coef)
        return norm

    def train_on(self, rollout: Rollout) -> dict[str, float]:
        """The optimizer steps of one rollout (``ppo_epochs`` passes over its mini-batches); returns loss metrics
        averaged over optimizer steps, and the per-pass diagnostics (:class:`StepDiagnostics`)."""
        cfg, groups = self.loss_cfg, self.layout.groups
        per_rank = self.s.train_global_batch_size // self.layout.dp_size
        length = rollout.responses.shape[1]
        wants_entropy = "entropy" in self.controls.needs
        # Controls that compute their own per-token values from the logits (AEnt's clamped entropy) get the shard.
        logit_values = self.controls.logit_values if "logits" in self.controls.needs else None
        diagnose = self.s.step_diagnostics > 0 and any(c.selects_tokens for c in self.controls)
        gradient_shares = diagnose and (self.step + 1) % self.s.step_diagnostics == 0
        penalised = any(c.name == "kl_cov" for c in self.controls)
        totals: dict[str, float] = {}
        grad_norms = []
        selected_counts = []
        for epoch in range(self.s.ppo_epochs):
            passed = StepDiagnostics(epoch + 1, gradient_shares) if diagnose else None
            for j in range(self.s.minibatches_per_rollout):
                rows = slice(j * per_rank, (j + 1) * per_rank)
                old, mask = rollout.old_logprobs[rows], rollout.mask[rows]
                adv = rollout.advantages[rows, None].expand(-1, length).contiguous()
                uids = token_uids_for(rollout.sample_ids[rows], length)
                # Every collective of the step's controls happens here, once (nemo_entropy.plan).
                cov = rollout.prob_logprob_cov
                plan = build_step_plan(cfg, StepInputs(old, adv, mask, uids, old_entropy=rollout.entropy[rows],
                                                       old_prob_logprob_cov=None if cov is None else cov[rows]),
                                       step=self.optimizer_step, groups=groups, controls=self.controls)
                self.optimizer.zero_grad(set_to_none=True)
                check = EntropyChangeCheck(self, rollout, rows) if self.s.entropy_change_check else None
                step_metrics: dict[str, float] = {}
                for start in range(0, per_rank, self.s.train_micro_batch_size):
                    local = slice(start, min(per_rank, start + self.s.train_micro_batch_size))
                    mb = slice(j * per_rank + local.start, j * per_rank + local.stop)
                    entropy, logprobs, *values = self._score(rollout.prompts[mb], rollout.responses[mb],
                                                             logit_values=logit_values)
                    mb_plan = plan.rows(local)
                    loss, metrics = policy_loss(cfg, logprobs, old[local], adv[local], mask[local], plan=mb_plan,
                                                entropy=entropy if wants_entropy else None, controls=self.controls,
                                                token_uids=uids[local], logit_values=values[0] if values else None)
                    if passed is not None:
                        passed.micro_batch(self, cfg, logprobs, old[local], adv[local], mask[local], mb_plan)
                    loss.backward()
                    accumulate_metrics(step_metrics, metrics)
                grad_norms.append(self._all_reduce_grads())
                self.optimizer.step()
                self.optimizer_step += 1
                self.controls.update(plan)  # recorded; the controllers move at end_rollout()
                step_metrics = self._reduce_over_dp(step_metrics)
                step_metrics.pop("num_valid_tokens", None)
                if check is not None:
                    step_metrics.update(check.after_step())
                if passed is not None:
                    passed.end_step(self, penalised)
                selected = plan.global_selected_tokens
                selected_counts.append(selected if selected is not None
                                       else step_metrics.get("selected_fraction", 0.0) * plan.global_valid_tokens)
                accumulate_metrics(totals, step_metrics, divisor=self.s.optimizer_steps_per_rollout)
            if passed is not None:
                totals.update(passed.metrics())
        self.controls.end_rollout()  # controllers move once per rollout (loss_fn.controller_update: rollout)
        totals["grad_norm"] = sum(grad_norms) / len(grad_norms)
        totals["selected_tokens"] = sum(selected_counts)
        totals["optimizer_steps"] = float(self.s.optimizer_steps_per_rollout)
        return totals

    def _flat_grads(self, loss: torch.Tensor) -> torch.Tensor:
        """The gradient of ``loss`` over the policy's parameters, flattened (replicated parameters first)."""
        params = list(self.policy.replicated_parameters()) + list(self.policy.sharded_parameters())
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1).double()
                          for g, p in zip(grads, params)])

    def _global_norm(self, flat: torch.Tensor) -> float:
        """The norm of a gradient built by :meth:`_flat_grads` and summed over micro-batches: summed over DP, the
        sharded part's square summed over TP (as :meth:`_all_reduce_grads`)."""
        if self.layout.dp_group is not None:
            group_all_reduce(flat, self.layout.dp_group, "sum")
        n_rep = sum(p.numel() for p in self.policy.replicated_parameters())
        sharded = flat[n_rep:].pow(2).sum().reshape(1)
        tp_all_reduce(self.layout.tp_group, sharded, "sum")
        return float(flat[:n_rep].pow(2).sum() + sharded) ** 0.5

    def _score(self, prompts, responses, logit_values=None):
        return score(self.policy, prompts, responses, temperature=self.s.temperature, logit_values=logit_values)

    def _reduce_over_dp(self, metrics: dict[str, float]) -> dict[str, float]:
        if self.layout.dp_group is None:
            return metrics
        keys = sorted(metrics)
        out = {}
        for kind in ("sum", "min", "max"):
            chosen = [k for k in keys if metric_reduction(k) == kind]
            if not chosen:
                continue
            values = torch.tensor([metrics[k] for k in chosen], dtype=torch.float64)
            group_all_reduce(values, self.layout.dp_group, kind)
            out.update(zip(chosen, values.tolist()))
        return out

    def rollout_metrics(self, rollout: Rollout) -> dict[str, float]:
        rewards = self._gather_dp(rollout.rewards)
        entropy = self._gather_dp(rollout.entropy)
        mask = self._gather_dp(rollout.mask)
        lengths = mask.sum(1).double()
        uniform = uniform_groups(rewards, self.s.num_generations_per_prompt).double().mean()
        truncated = ~(self._gather_dp(rollout.responses) == 2).any(1)
        out = {
            "reward_mean": float(rewards.double().mean()),
            "zero_advantage_group_fraction": float(uniform),
            "response_length_mean": float(lengths.mean()),
            "valid_tokens_per_optimizer_step": float(lengths.sum()) / self.s.minibatches_per_rollout,  # one mini-batch each
            "truncated_fraction": float(truncated.double().mean()),
        }
        out.update(entropy_summary(entropy, mask))
        if self.s.use_dynamic_sampling:
            # reward_mean and the zero-advantage fraction stay those of every sample the policy generated (what a
            # run without dynamic sampling logs, and the law's performance); the trained groups' own mean is apart
            out["reward_mean_trained"] = out["reward_mean"]
            gen = self.generation_metrics
            out["reward_mean"] = gen["reward_mean_generated"]
            out["zero_advantage_group_fraction"] = gen["zero_advantage_group_fraction_generated"]
            out["dynamic_sampling_num_gen_batches"] = gen["dynamic_sampling_num_gen_batches"]
            out["dynamic_sampling_num_discarded_valid_samples"] = gen["dynamic_sampling_num_discarded_valid_samples"]
        return out

    def validate(self) -> float:
        correct = greedy_accuracy(self.policy, self.task, self.val_operands, self.s.generation_batch_size)
        total = torch.tensor([float(correct.sum()), float(correct.numel())], dtype=torch.float64)
        group_all_reduce(total, self.layout.dp_group, "sum")
        return float(total[0] / total[1])

    def evaluate_pass_at_k(self) -> dict[str, float]:
        """pass@1, 2, 4, ... over the first ``engine.pass_at_k.num_problems`` validation problems, each with
        ``num_samples`` samples; problems are split over DP ranks and the counts summed."""
        n = self.s.pass_at_k_samples
        problems = self.task.sample_operands(self.s.pass_at_k_problems, stream_seed(self.s.seed, "validation"))
        ids = torch.tensor_split(torch.arange(problems.shape[0]), self.layout.dp_size)[self.layout.dp_rank]
        local = correct_counts(self.policy, self.task, problems[ids], ids.tolist(), num_samples=n, seed=self.s.seed,
                               temperature=self.s.pass_at_k_temperature, batch_size=self.s.generation_batch_size)
        counts = torch.zeros(problems.shape[0], dtype=torch.float64)
        counts[ids] = local.double()
        group_all_reduce(counts, self.layout.dp_group, "sum")
        return pass_at_k_metrics(counts.round().long().tolist(), n)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "model": self.policy.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {"torch": torch.get_rng_state()},
            "step": self.step,
            "optimizer_step": self.optimizer_step,
            # Prompts and sampling noise are pure functions of (seed, step, index): the data position is the step.
            "data_position": {"next_step": self.step + 1},
            # Stateful controls (coefficients, integrals), identical on every rank.
            "controls": self.controls.state_dict(),
            "warm_start": self.warm_start_info,
            "loss_fn": self.loss_cfg.to_dict(),
        }

    def save(self) -> str:
        return save_checkpoint(
            self.s.checkpoint_dir, self.step, self.checkpoint_state(), rank=self.layout.rank,
            layout=self.layout.as_dict(), world_group=self.layout.world_group, keep=self.s.keep_checkpoints,
        )

    # ------------------------------------------------------------------ the run
    def write_run_info(self) -> None:
        node = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
        ranks = all_gather_objects({"rank": self.layout.rank, "node": node, "pid": os.getpid(),
                                    "dp_rank": self.layout.dp_rank, "tp_rank": self.layout.tp_rank},
                                   self.layout.world_group)
        if self.is_logger:
            write_run_info(self.s.log_dir, {
                **self.layout.as_dict(), "python": platform.python_version(), "torch": torch.__version__,
                "loss_fn": self.loss_cfg.to_dict(), "resumed_from": self.resumed_from,
                "warm_start": self.warm_start_info,
            }, ranks)

    def run(self) -> dict[str, Any]:
        """Train until ``grpo.max_num_steps``; returns the final metrics and where the outputs are."""
        started = time.perf_counter()
        self.initialise()
        self.write_run_info()
        log = MetricsLog(self.s.log_dir, enabled=self.is_logger, tensorboard=self.s.tensorboard,
                         resume_step=self.resumed_from)
        bar = Progress(self.s.max_num_steps, f"GRPO [{self.loss_cfg.method}]", initial=self.step,
                       enabled=self.is_logger and self.s.progress_bar)
        last: dict[str, Any] = {}
        last_val: Optional[float] = None
        try:
            with PreemptionWatcher(self.s.checkpoint_dir) as watcher:
                if self.step == 0 and self.s.val_at_start:
                    last_val = self.validate()
                    log.write(0, {"val_accuracy": last_val, "warm_start_loss": self.warm_start_info.get("final_loss")})
                while self.step < self.s.max_num_steps:
                    step = self.step + 1
                    t0 = time.perf_counter()
                    rollout = self.rollout(step)
                    t1 = time.perf_counter()
                    metrics = self.rollout_metrics(rollout)
                    metrics.update(self.train_on(rollout))
                    t2 = time.perf_counter()
                    self.step = step
                    if (self.s.val_period > 0 and step % self.s.val_period == 0) or (
                        self.s.val_at_end and step == self.s.max_num_steps
                    ):
                        last_val = self.validate()
                        metrics["val_accuracy"] = last_val
                    t3 = time.perf_counter()
                    metrics.update({"lr": self.s.lr, "rollout_time": t1 - t0, "train_time": t2 - t1,
                                    "val_time": t3 - t2, "step_time": t3 - t0})
                    if self.s.pass_at_k_problems and step == self.s.max_num_steps:
                        metrics.update(self.evaluate_pass_at_k())
                        metrics["pass_at_k_time"] = time.perf_counter() - t3
                    log.write(step, metrics)
                    last = {"step": step, **metrics}
                    saved = False
                    if self.s.checkpointing and (step % self.s.save_period == 0 or step == self.s.max_num_steps):
                        step_dir_saved = self.save()
                        saved = True
                    bar.update(1, H=metrics["entropy_mean"], reward=metrics["reward_mean"],
                               val=last_val if last_val is not None else "-")
                    if self.after_step is not None:
                        self.after_step(step)
                    reason = watcher.requested(self.layout.world_group)
                    if reason == INTERRUPTED:
                        if not self.s.checkpointing:
                            raise Interrupted(f"interrupted (Ctrl-C) after step {step}; checkpointing.enabled is "
                                              f"false: nothing saved")
                        path = step_dir_saved if saved else self.save()
                        raise Interrupted(f"interrupted (Ctrl-C): checkpoint of step {step} saved in {path}; run "
                                          f"the same command to resume")
                    if reason:
                        if not saved:
                            if not self.s.checkpointing:
                                raise RuntimeError("pre-emption requested but checkpointing.enabled is false")
                            self.save()
                        if self.is_logger:
                            watcher.clear()
                            print(f"[nemo-entropy] pre-empted: checkpoint of step {step} saved, exiting for requeue",
                                  flush=True)
                        raise Preempted(step)
        finally:
            bar.close()
            log.close()
        # pass@k of the last step (read back when a finished run was resumed and trained no further).
        pass_at_k: dict[str, float] = {}
        if self.is_logger:
            final = last or (read_metrics(log.path)[-1:] or [{}])[0]
            pass_at_k = {k: v for k, v in final.items() if k.startswith("pass@")}
            if pass_at_k:
                update_run_info(self.s.log_dir, {"pass_at_k": pass_at_k})
        plot_path = None
        if self.is_logger and self.s.plot:
            plot_path = plot_run(log.path, os.path.join(self.s.log_dir, "entropy_accuracy.png"),
                                 title=f"local GRPO, loss_fn.method={self.loss_cfg.method}")
        return {
            "log_dir": os.path.abspath(self.s.log_dir),
            "metrics_path": os.path.abspath(log.path),
            "plot_path": os.path.abspath(plot_path) if plot_path else None,
            "tensorboard_dir": os.path.abspath(os.path.join(self.s.log_dir, "tb")) if self.s.tensorboard else None,
            "checkpoint_dir": os.path.abspath(self.s.checkpoint_dir) if self.s.checkpointing else None,
            "steps": self.step,
            "resumed_from": self.resumed_from,
            "final": last,
            "val_accuracy": last_val,
            "pass_at_k": pass_at_k,
            "seconds": time.perf_counter() - started,
            "layout": self.layout.as_dict(),
        }
