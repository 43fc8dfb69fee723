"""What the local engine reads from a run config, validated once with errors that name the key.

The engine accepts any config of the project (local_*.yaml, or a cluster config such as grpo_32b_kl_cov
turned into a tiny run by ``+preset=local_tiny``): it reads the NeMo-RL keys it needs (``grpo``, ``policy``,
``loss_fn``, ``logger``, ``checkpointing``) and its own ``engine`` section, and ignores the rest.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from nemo_entropy.config import LossConfig, loss_config, to_plain

from .run_folder import SAFE_RESUME_CHANGES
from .task import build_task, task_settings

# NeMo-RL's loss_fn section may carry keys our loss does not take (e.g. added by newer NeMo-RL releases);
# the engine hands loss_config only what it knows, and says which keys it dropped.
ENGINE_KEYS = {
    "nproc", "tp_size", "threads_per_process", "model", "task", "warm_start", "progress_bar", "plot",
    "num_val_problems", "log_examples", "pass_at_k", "resume_allow_changes", "ppo_epochs", "step_diagnostics",
    "entropy_change_check",
}
MODEL_KEYS = {
    "arch", "hidden_size", "intermediate_size", "num_layers", "num_attention_heads", "num_key_value_heads",
    "attn_implementation", "init_std",
}
WARM_START_KEYS = {"steps", "batch_size", "lr", "cache_dir"}
PASS_AT_K_KEYS = {"num_problems", "num_samples", "temperature"}


def _select(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node or node[part] is None:
            return default
        node = node[part]
    return node


def _bad(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"{key}={value!r} is invalid: {allowed}")


def _positive_int(cfg, key: str, default: int) -> int:
    value = _select(cfg, key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(key, value, "expected an integer >= 1")
    return value


def _non_negative_int(cfg, key: str, default: int) -> int:
    value = _select(cfg, key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(key, value, "expected an integer >= 0")
    return value


def _positive_float(cfg, key: str, default: float) -> float:
    value = _select(cfg, key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise _bad(key, value, "expected a finite number > 0")
    return float(value)


@dataclass(frozen=True)
class EngineSettings:
    """Everything the local engine needs, resolved and validated (see :meth:`from_config`)."""

    seed: int
    max_num_steps: int
    num_prompts_per_step: int
    num_generations_per_prompt: int
    val_period: int
    val_at_start: bool
    val_at_end: bool
    normalize_rewards: bool
    leave_one_out_baseline: bool
    train_global_batch_size: int
    train_micro_batch_size: int
    generation_batch_size: int
    max_total_sequence_length: int
    temperature: float
    lr: float
    weight_decay: float
    betas: tuple[float, float]
    eps: float
    max_grad_norm: Optional[float]
    loss_fn: dict[str, Any]
    dropped_loss_keys: tuple[str, ...]
    log_dir: str
    tensorboard: bool
    checkpointing: bool
    checkpoint_dir: str
    save_period: int
    keep_checkpoints: int
    nproc: int
    tp_size: int
    threads_per_process: int
    model: dict[str, Any]
    task: dict[str, Any]
    warm_start: dict[str, Any]
    num_val_problems: int
    pass_at_k_problems: int
    pass_at_k_samples: int
    pass_at_k_temperature: float
    progress_bar: bool
    plot: bool
    resume_allow_changes: tuple[str, ...] = ()
    optimizer: str = "adamw"
    """``adamw`` (``torch.optim.AdamW`` / ``Adam``) or ``sgd`` (``torch.optim.SGD``: plain SGD, no momentum, the
    first-order setting of the paper's Theorem 1, for ``entropy_change_check``)."""
    ppo_epochs: int = 1
    """Passes over each rollout (verl's ``actor.ppo_epochs``; NeMo-RL makes one): every pass runs the rollout's
    mini-batches in the same order against the same old log-probs, each optimizer step with its own plan."""
    use_dynamic_sampling: bool = False
    """NeMo-RL's ``grpo.use_dynamic_sampling`` (DAPO): groups whose rewards are all equal are dropped, and more
    generation batches are drawn until ``num_prompts_per_step`` groups with signal are collected."""
    dynamic_sampling_max_gen_batches: int = 10
    batch_multiplier: float = 1.0
    """NeMo-RL's ``grpo.batch_multiplier``: with dynamic sampling, each generation batch has
    ``int(num_prompts_per_step * batch_multiplier)`` prompts."""
    step_diagnostics: int = 10
    """Per-pass diagnostics of the covariance selection (docs/engine.md): every RL step, the selected tokens'
    ``log r < 0`` fraction and the fraction of optimizer steps whose penalty gradient is exactly 0; every
    ``step_diagnostics``-th RL step also their share of the policy-gradient norm (two more backward passes per
    micro-batch). 0 turns them off."""
    entropy_change_check: bool = False
    """After every optimizer step, re-score its mini-batch: the observed entropy change on the same tokens and
    Lemma 1's first-order prediction from the measured logit change (one more forward per step)."""
    raw: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def dp_size(self) -> int:
        return self.nproc // self.tp_size

    @property
    def samples_per_step(self) -> int:
        return self.num_prompts_per_step * self.num_generations_per_prompt

    @property
    def minibatches_per_rollout(self) -> int:
        return self.samples_per_step // self.train_global_batch_size

    @property
    def optimizer_steps_per_rollout(self) -> int:
        return self.minibatches_per_rollout * self.ppo_epochs

    @property
    def prompts_per_generation_batch(self) -> int:
        """Prompts of one generation batch (``num_prompts_per_step``; times ``batch_multiplier`` with dynamic
        sampling, as NeMo-RL's ``setup`` computes it)."""
        if not self.use_dynamic_sampling:
            return self.num_prompts_per_step
        return int(self.num_prompts_per_step * self.batch_multiplier)

    @classmethod
    def from_config(cls, cfg: Any, *, world_size: Optional[int] = None) -> "EngineSettings":
        """Resolve and validate; ``world_size`` (inside a launch) overrides ``engine.nproc``."""
        raw = to_plain(cfg)
        if not isinstance(raw, Mapping):
            raise TypeError(f"the run config must be a mapping, got {type(cfg).__name__}")
        backend = _select(raw, "backend", "local")
        if backend != "local":
            raise _bad("backend", backend, "the local engine runs only configs with backend=local")
        engine = _select(raw, "engine", None)
        if not isinstance(engine, Mapping):
            raise ValueError("engine section missing: add `- engine: tiny` to the config's defaults list")
        for section, allowed, prefix in (
            (engine, ENGINE_KEYS, "engine"),
            (_select(raw, "engine.model", {}), MODEL_KEYS, "engine.model"),
            (_select(raw, "engine.warm_start", {}), WARM_START_KEYS, "engine.warm_start"),
            (_select(raw, "engine.pass_at_k", {}), PASS_AT_K_KEYS, "engine.pass_at_k"),
        ):
            unknown = sorted(set(section) - allowed)
            if unknown:
                close = difflib.get_close_matches(unknown[0], allowed, n=1, cutoff=0.75)
                hint = f" (did you mean {prefix}.{close[0]}?)" if close else ""
                raise ValueError(f"unknown key(s) {', '.join(prefix + '.' + k for k in unknown)}{hint}: "
                                 f"allowed {sorted(allowed)}")

        nproc = world_size if world_size is not None else _positive_int(raw, "engine.nproc", 1)
        tp_size = _positive_int(raw, "engine.tp_size", 1)
        if nproc % tp_size:
            raise _bad("engine.tp_size", tp_size, f"must divide the number of processes ({nproc})")
        dp = nproc // tp_size

        prompts = _positive_int(raw, "grpo.num_prompts_per_step", 16)
        generations = _positive_int(raw, "grpo.num_generations_per_prompt", 8)
        samples = prompts * generations
        gbs = _positive_int(raw, "policy.train_global_batch_size", samples)
        if samples % gbs:
            raise _bad("policy.train_global_batch_size", gbs,
                       f"must divide num_prompts_per_step * num_generations_per_prompt = {samples}")
        if gbs % dp:
            raise _bad("policy.train_global_batch_size", gbs, f"must be a multiple of the data-parallel size {dp}")
        mbs = _positive_int(raw, "policy.train_micro_batch_size", gbs // dp)
        gen_bs = _positive_int(raw, "policy.generation_batch_size", max(1, samples // dp))

        task = task_settings(_select(raw, "engine.task", {"name": "addition", "digits": 2}))
        if task["name"] == "addition":
            digits = task["digits"]
            if isinstance(digits, bool) or not isinstance(digits, int) or not 1 <= digits <= 6:
                raise _bad("engine.task.digits", digits, "expected an integer in [1, 6]")
        built = build_task(task)  # validates the countdown keys (errors name the key)
        needed = built.prompt_length + built.max_response_length
        max_len = _positive_int(raw, "policy.max_total_sequence_length", needed)
        if max_len < needed:
            raise _bad("policy.max_total_sequence_length", max_len,
                       f"the task needs prompt + response = {needed} tokens")

        temperature = _positive_float(raw, "policy.generation.temperature", 1.0)
        top_p = _select(raw, "policy.generation.top_p", 1.0)
        if top_p != 1.0:
            raise _bad("policy.generation.top_p", top_p, "the local engine samples the full distribution (1.0)")
        top_k = _select(raw, "policy.generation.top_k", None)
        if top_k not in (None, -1, 0):
            raise _bad("policy.generation.top_k", top_k, "the local engine samples the full distribution (null)")

        kwargs = _select(raw, "policy.optimizer.kwargs", {}) or {}
        opt_name = _select(raw, "policy.optimizer.name", "torch.optim.AdamW")
        if opt_name not in ("torch.optim.AdamW", "torch.optim.Adam", "adamw", "adam", "torch.optim.SGD", "sgd"):
            raise _bad("policy.optimizer.name", opt_name, "the local engine supports torch.optim.AdamW / Adam / SGD")
        optimizer = "sgd" if opt_name in ("torch.optim.SGD", "sgd") else "adamw"
        if optimizer == "sgd" and kwargs.get("momentum", 0.0) not in (0, 0.0):
            raise _bad("policy.optimizer.kwargs.momentum", kwargs.get("momentum"),
                       "the local engine's SGD is plain SGD (0): the first-order check needs the step to be -lr x grad")
        dynamic = _select(raw, "grpo.use_dynamic_sampling", False)
        if not isinstance(dynamic, bool):
            raise _bad("grpo.use_dynamic_sampling", dynamic, "expected true or false")
        max_gen_batches = _positive_int(raw, "grpo.dynamic_sampling_max_gen_batches", 10)
        multiplier = _select(raw, "grpo.batch_multiplier", 1.0)
        if isinstance(multiplier, bool) or not isinstance(multiplier, (int, float)) or not multiplier >= 1.0:
            raise _bad("grpo.batch_multiplier", multiplier, "expected a number >= 1")
        if multiplier != 1.0 and not dynamic:
            raise _bad("grpo.batch_multiplier", multiplier,
                       "batch_multiplier > 1 needs grpo.use_dynamic_sampling=true (as in NeMo-RL)")
        check = _select(raw, "engine.entropy_change_check", None)
        if check is not None and not isinstance(check, bool):
            raise _bad("engine.entropy_change_check", check, "expected true or false")
        lr = _positive_float({"lr": kwargs.get("lr", 1e-3)}, "lr", 1e-3)
        betas = tuple(float(b) for b in kwargs.get("betas", (0.9, 0.999)))
        max_grad_norm = _select(raw, "policy.max_grad_norm", 1.0)
        if max_grad_norm is not None and (not isinstance(max_grad_norm, (int, float)) or max_grad_norm <= 0):
            raise _bad("policy.max_grad_norm", max_grad_norm, "expected a number > 0 or null")

        loss_section = dict(_select(raw, "loss_fn", {}) or {})
        known = set(LossConfig().to_dict())  # the core keys and every control's section (kl_cov_ratio, ...)
        dropped = tuple(sorted(k for k in loss_section if k not in known))
        loss_cfg = loss_config({k: v for k, v in loss_section.items() if k in known})

        log_dir = str(_select(raw, "logger.log_dir", "runs/local"))
        ckpt_dir = str(_select(raw, "checkpointing.checkpoint_dir", f"{log_dir}/checkpoints"))
        warm = dict(_select(raw, "engine.warm_start", {}) or {})
        model = dict(_select(raw, "engine.model", {}) or {})
        hidden = model.get("hidden_size", 64)
        heads = model.get("num_attention_heads", 4)
        kv = model.get("num_key_value_heads", 2)
        if hidden % heads or heads % kv:
            raise _bad("engine.model.num_attention_heads", heads,
                       f"must divide hidden_size={hidden} and be a multiple of num_key_value_heads={kv}")
        return cls(
            seed=int(_select(raw, "grpo.seed", 42)),
            max_num_steps=_positive_int(raw, "grpo.max_num_steps", 100),
            num_prompts_per_step=prompts,
            num_generations_per_prompt=generations,
            val_period=int(_select(raw, "grpo.val_period", 10)),
            val_at_start=bool(_select(raw, "grpo.val_at_start", True)),
            val_at_end=bool(_select(raw, "grpo.val_at_end", True)),
            normalize_rewards=bool(_select(raw, "grpo.normalize_rewards", True)),
            leave_one_out_baseline=bool(_select(raw, "grpo.use_leave_one_out_baseline", False)),
            train_global_batch_size=gbs,
            train_micro_batch_size=mbs,
            generation_batch_size=gen_bs,
            max_total_sequence_length=max_len,
            temperature=temperature,
            lr=lr,
            weight_decay=float(kwargs.get("weight_decay", 0.0)),
            betas=(betas[0], betas[1]),
            eps=float(kwargs.get("eps", 1e-8)),
            max_grad_norm=None if max_grad_norm is None else float(max_grad_norm),
            loss_fn=loss_cfg.to_dict(),
            dropped_loss_keys=dropped,
            log_dir=log_dir,
            tensorboard=bool(_select(raw, "logger.tensorboard_enabled", True)),
            checkpointing=bool(_select(raw, "checkpointing.enabled", True)),
            checkpoint_dir=ckpt_dir,
            save_period=_positive_int(raw, "checkpointing.save_period", 10),
            keep_checkpoints=_positive_int(raw, "checkpointing.keep_top_k", 2),
            nproc=nproc,
            tp_size=tp_size,
            threads_per_process=_positive_int(raw, "engine.threads_per_process", 1),
            model=model,
            task=task,
            warm_start=warm,
            num_val_problems=_positive_int(raw, "engine.num_val_problems", 256),
            pass_at_k_problems=_non_negative_int(raw, "engine.pass_at_k.num_problems", 0),
            pass_at_k_samples=_positive_int(raw, "engine.pass_at_k.num_samples", 64),
            pass_at_k_temperature=_positive_float(raw, "engine.pass_at_k.temperature", 1.0),
            progress_bar=bool(_select(raw, "engine.progress_bar", True)),
            plot=bool(_select(raw, "engine.plot", True)),
            resume_allow_changes=_resume_allow_changes(_select(raw, "engine.resume_allow_changes", [])),
            optimizer=optimizer,
            ppo_epochs=_positive_int(raw, "engine.ppo_epochs", 1),
            use_dynamic_sampling=dynamic,
            dynamic_sampling_max_gen_batches=max_gen_batches,
            batch_multiplier=float(multiplier),
            step_diagnostics=_non_negative_int(raw, "engine.step_diagnostics", 10),
            entropy_change_check=bool(_select(raw, "engine.entropy_change_check", False)),
            raw=dict(raw),
        )


def _resume_allow_changes(value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple)) or any(
            k not in SAFE_RESUME_CHANGES for k in value):
        raise _bad("engine.resume_allow_changes", value,
                   f"expected a list of keys a resume may change, from {sorted(SAFE_RESUME_CHANGES)}")
    return tuple(value)


def validate_engine_config(cfg: Any) -> EngineSettings:
    """Validate a run config for ``backend: local``; raises ValueError naming the offending key.

    Returns the resolved :class:`EngineSettings` (the run entry may print them).
    """
    return EngineSettings.from_config(cfg)
