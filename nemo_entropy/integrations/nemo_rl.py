"""The NeMo-RL loss adapter: Clip-Cov / KL-Cov / PPO with ``ClippedPGLossFn``'s interface, keys and metrics.

One class, :class:`EntropyControlLossFn`, answers both generations of NeMo-RL's loss interface
(docs/nemo_rl.md):

* **<= v0.5**: ``loss_fn(next_token_logits, data, global_valid_seqs, global_valid_toks,
  vocab_parallel_rank=None, vocab_parallel_group=None, context_parallel_group=None)``. Megatron passes its
  TP/CP groups and TP-sharded (and CP-sharded) logits; the DTensor backend passes a TP-sharded DTensor.
* **>= v0.6**: ``loss_fn(data=..., global_valid_seqs=..., global_valid_toks=..., **loss_input)`` where
  ``loss_input`` is ``next_token_logprobs`` [B, S-1] for ``input_type == LOGPROB`` (already TP-reduced and
  CP-gathered) or ``logits`` for ``LOGIT``; with logits the loss finds its groups itself (the DTensor's
  device mesh, or megatron-core's ``parallel_state``).

With logits we compute the log-probs *and* the full-vocabulary entropy in one pass and log the entropy
(``entropy`` metric); with log-probs only NeMo-RL's sampled-token ``approx_entropy`` is available.

Masking, normalisation and metrics follow ``ClippedPGLossFn``: ``mask = token_mask[:, 1:] *
sample_mask[:, None]``, the loss of a micro-batch is ``sum(loss * mask) / global_valid_toks`` (or the
per-sequence means over ``global_valid_seqs``), metrics are pre-divided so that NeMo-RL's sum over
micro-batches and DP ranks gives the batch value, extrema are ``probs_ratio_min``-style names with
``inf`` sentinels, and ``metric_normalizations`` tells a split-API trainer which count each metric used.

The step plan (``scope: batch``): the driver-side wrapper (:mod:`nemo_entropy.integrations.step_plan`)
builds each optimizer step's plan (:mod:`nemo_entropy.plan`: the covariance selection, the controls' coefficients)
and attaches it to the batch; the loss reads it back (:func:`~nemo_entropy.integrations.batch_keys.plan_from_batch`)
and issues no collective at all. ``plan='worker'`` instead builds the plan over this call's tokens across the token group
(DP of the last pipeline stage, from megatron-core); the run entry allows it only where one call holds a rank's
whole share of the step. In driver mode a batch without the plan is an error when the config needs one.

NeMo-RL is imported lazily and only for its enums; without NeMo-RL, stand-in enums with the same values
are used, so the adapter can be tested on CPU with plain tensors.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, replace
from typing import Any, Mapping, Optional

import torch

from ..config import NEMO_RL_DEFAULTS, LossConfig, loss_config, to_plain
from ..controls import ControlSet
from ..covariance_diagnostics import diagnostic_metric_names
from ..entropy import vocab_parallel_entropy_and_logprobs
from ..losses import diagnostics, nemo_rl_terms, policy_loss
from ..normalization import zero_masked
from ..parallel import ParallelGroups, group_world_size, is_dtensor, world_size
from . import batch_keys
from .nemo_rl_options import NemoRLOptions

__all__ = ["EntropyControlLossFn", "nemo_rl_enums", "loss_config_from_nemo_rl"]


# ----------------------------------------------------------------------------------------------- enums
class _LossType(enum.Enum):
    TOKEN_LEVEL = "token_level"
    SEQUENCE_LEVEL = "sequence_level"


class _LossInputType(enum.Enum):
    LOGIT = "logit"
    LOGPROB = "logprob"


class _MetricNormalizer(enum.Enum):
    TOKENS = "tokens"
    SEQUENCES = "sequences"
    NONE = "none"


def nemo_rl_enums() -> tuple[type, type, type]:
    """``(LossType, LossInputType, MetricNormalizer)``: NeMo-RL's own enums when it is importable.

    NeMo-RL compares ``loss_fn.input_type == LossInputType.LOGIT``, so the attributes must be *its* enum
    members; outside NeMo-RL, stand-ins with the same values keep the adapter usable.
    """
    loss_type, input_type, normalizer = _LossType, _LossInputType, _MetricNormalizer
    try:  # >= v0.6
        from nemo_rl.algorithms.loss import interfaces as nrl  # type: ignore

        loss_type = nrl.LossType
        input_type = getattr(nrl, "LossInputType", _LossInputType)
        normalizer = getattr(nrl, "MetricNormalizer", _MetricNormalizer)
    except ImportError:
        try:  # <= v0.5
            from nemo_rl.algorithms import interfaces as nrl  # type: ignore

            loss_type = nrl.LossType
        except ImportError:
            pass
    return loss_type, input_type, normalizer


def loss_config_from_nemo_rl(cfg: Any) -> LossConfig:
    """Validate NeMo-RL's ``loss_fn`` section (with our keys) into a :class:`LossConfig`.

    Keys left out take NeMo-RL's defaults (``reference_policy_kl_penalty`` 0.01, not LossConfig's 0.0).
    ``truncated_importance_sampling_ratio`` without a type means ``tis`` (NeMo-RL <= v0.5 had no type key).
    """
    if isinstance(cfg, LossConfig):
        return cfg
    values = to_plain(cfg)
    if not isinstance(values, Mapping):
        raise TypeError(f"loss config must be a mapping, a pydantic model or a LossConfig, got {type(cfg).__name__}")
    # The adapter *is* NeMo-RL's loss: a key the section leaves out takes NeMo-RL's default.
    for key, default in NEMO_RL_DEFAULTS.items():
        values.setdefault(key, default)
    if values.get("truncated_importance_sampling_ratio") is not None and \
            values.get("truncated_importance_sampling_type") is None:
        values["truncated_importance_sampling_type"] = "tis"
    return loss_config(values)


# ----------------------------------------------------------------------------------------------- logits
def _entropy_and_logprobs(
    logits_local: torch.Tensor,
    targets: torch.Tensor,
    tp_group: Optional[Any],
    vocab_start: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token (entropy, log-prob of target) from a (TP-sharded) logits block [B, T, V_local], differentiable."""
    return vocab_parallel_entropy_and_logprobs(logits_local, targets, groups=tp_group, vocab_start=vocab_start)


def _megatron_groups() -> Optional[tuple[Any, int, Any]]:
    """``(tp_group, tp_rank, cp_group or None)`` from megatron-core, if it is initialised.

    The TP group is returned even at TP = 1, as NeMo-RL's own Megatron worker passes it: NeMo-RL's
    ``get_next_token_logprobs_from_logits`` takes its CP-aware branch only when it gets a vocab-parallel group.
    """
    try:
        from megatron.core import parallel_state as ps
    except ImportError:
        return None
    if not ps.model_parallel_is_initialized():
        return None
    cp = ps.get_context_parallel_group() if ps.get_context_parallel_world_size() > 1 else None
    return ps.get_tensor_model_parallel_group(), ps.get_tensor_model_parallel_rank(), cp


@dataclass
class _LossCall:
    """The arguments of one loss call, from any NeMo-RL calling convention (see the module doc)."""

    data: Any
    global_valid_seqs: Any
    global_valid_toks: Any
    logits: Optional[torch.Tensor] = None
    logprobs: Optional[torch.Tensor] = None
    tp_rank: Optional[int] = None
    tp_group: Any = None
    cp_group: Any = None

    @classmethod
    def parse(cls, who: str, args: tuple, kwargs: dict) -> "_LossCall":
        kwargs = dict(kwargs)
        logits = kwargs.pop("logits", None)
        logprobs = kwargs.pop("next_token_logprobs", None)
        positional = list(args)
        if positional and isinstance(positional[0], torch.Tensor):
            logits = positional.pop(0)  # <= v0.5: next_token_logits first
        for name in ("data", "global_valid_seqs", "global_valid_toks"):
            if name not in kwargs and positional:
                kwargs[name] = positional.pop(0)
        if positional:
            raise TypeError(f"{who} got {len(positional)} unexpected positional arguments")
        data = kwargs.pop("data", None)
        if data is None:
            raise TypeError(f"{who} needs `data` (NeMo-RL's BatchedDataDict of the micro-batch)")
        call = cls(data=data, global_valid_seqs=kwargs.pop("global_valid_seqs", None),
                   global_valid_toks=kwargs.pop("global_valid_toks", None), logits=logits, logprobs=logprobs,
                   tp_rank=kwargs.pop("vocab_parallel_rank", None), tp_group=kwargs.pop("vocab_parallel_group", None),
                   cp_group=kwargs.pop("context_parallel_group", None))
        if kwargs:
            raise TypeError(f"{who} got unexpected keyword arguments: {sorted(kwargs)}")
        if logprobs is None and logits is None:
            raise TypeError(f"{who} needs next_token_logprobs (LOGPROB input) or logits")
        if logprobs is None and logits.dim() == 2:
            raise ValueError(f"{who} got 2-D logits (NeMo-RL's fused linear log-probs?): the LOGIT input needs "
                             "[batch, length, vocab] logits; use nemo_rl.input_type=logprob")
        return call


def logprobs_from_logits(logits, data, tp_rank, tp_group, cp_group, *, find_megatron_groups: bool,
                         logit_values=None):
    """``(next-token log-probs, full-vocabulary entropy or None)`` per token from NeMo-RL's logits, differentiable.

    TP-sharded logits (a DTensor's ``tp`` mesh, Megatron's groups passed or found in ``parallel_state``) go through
    the vocab-parallel kernel. Context-parallel logits (load-balanced chunks) go to NeMo-RL's own CP-aware helper,
    which gives the log-probs only: the entropy is None in that layout.

    With ``logit_values`` (``ControlSet.logit_values``) it returns a third item: what that function computes from the
    same ``[B, S-1, V_local]`` shard (None in the context-parallel layout).
    """
    extra = () if logit_values is None else (None,)
    input_ids = data["input_ids"]
    if is_dtensor(logits):
        mesh = logits.device_mesh
        names = mesh.mesh_dim_names or ()
        if "cp" in names and mesh["cp"].size() > 1 or data.get("seq_index") is not None:
            return (_delegate_to_nemo_rl(logits, data, None, None, None), None, *extra)
        tp = mesh.get_group("tp") if "tp" in names and mesh["tp"].size() > 1 else None
        local = logits.to_local()
        vocab_start = (0 if tp is None else tp.rank()) * local.shape[-1]
        tp_group = tp
    else:
        if tp_group is None and cp_group is None and find_megatron_groups:
            found = _megatron_groups()
            if found is not None:
                tp_group, tp_rank, cp_group = found
        if group_world_size(cp_group) > 1:
            return (_delegate_to_nemo_rl(logits, data, tp_rank, tp_group, cp_group), None, *extra)
        local = logits
        vocab_start = (tp_rank or 0) * local.shape[-1] if tp_group is not None else 0
    length = input_ids.shape[1]
    # Logits at position t predict token t + 1; CP/TP padding beyond the sequence is cut off.
    block = local[:, : length - 1]
    targets = input_ids[:, 1:].to(block.device)
    entropy, logprobs = _entropy_and_logprobs(block, targets, tp_group, vocab_start)
    if logit_values is None:
        return logprobs, entropy
    return logprobs, entropy, logit_values(block, tp_group=tp_group, vocab_start=vocab_start,
                                           vocab_size=block.shape[-1] * group_world_size(tp_group))


def _delegate_to_nemo_rl(logits, data, tp_rank, tp_group, cp_group):
    from nemo_rl.distributed.model_utils import get_next_token_logprobs_from_logits  # type: ignore

    return get_next_token_logprobs_from_logits(
        input_ids=data["input_ids"], next_token_logits=logits, seq_index=data.get("seq_index", None),
        vocab_parallel_rank=tp_rank, vocab_parallel_group=tp_group, context_parallel_group=cp_group,
    )


# ----------------------------------------------------------------------------------------------- the loss
class EntropyControlLossFn:
    """NeMo-RL loss: every entropy control of ``nemo_entropy.controls.REGISTRY`` (``loss_fn.method`` /
    ``controls``) on top of every ``ClippedPGLossFn`` key, for NeMo-RL v0.5 and later.

    Args:
        cfg: NeMo-RL's ``loss_fn`` section (dict, pydantic model, OmegaConf node) or a LossConfig: every
            ``ClippedPGLossFn`` key with its meaning, plus ours (``method``, ``scope``, ``kl_cov_*``, ...).
        use_fused_linear_logprobs: NeMo-RL's flag, kept as an attribute for its input preparation.
        input_type: ``"logprob"`` (default, NeMo-RL >= v0.6 hands over log-probs) or ``"logit"`` (NeMo-RL
            hands over logits; the full-vocabulary entropy is then logged). NeMo-RL <= v0.5 always passes
            logits, whatever this says.
        log_entropy: compute the full-vocabulary entropy metric when logits are available.
        plan: ``"driver"`` (the step plan comes attached to the batch; default) or ``"worker"`` (the loss plans
            over its own call across the token group; see the module doc).
        groups: explicit :class:`ParallelGroups` for in-worker planning (tests, custom launchers); by
            default they come from megatron-core's ``parallel_state`` when it is initialised.
    """

    def __init__(
        self,
        cfg: Any,
        use_fused_linear_logprobs: bool = False,
        *,
        input_type: str = NemoRLOptions.input_type,
        log_entropy: bool = NemoRLOptions.log_entropy,
        plan: str = NemoRLOptions.plan,
        groups: Optional[ParallelGroups] = None,
    ):
        NemoRLOptions(input_type=input_type, log_entropy=log_entropy, plan=plan)  # the one check of the options
        if input_type == "logit" and use_fused_linear_logprobs:
            raise ValueError(
                "nemo_rl.input_type='logit' is incompatible with policy.megatron_cfg.use_fused_linear_logprobs=true: "
                "the fused model returns 2-D log-probs, not logits; use nemo_rl.input_type='logprob'"
            )
        self.config = loss_config_from_nemo_rl(cfg)
        self.controls = ControlSet(self.config)  # stateless here: the plan carries the values of stateful ones
        needs_logits = [c.name for c in self.controls if c.needs & {"entropy", "logits"}]
        if needs_logits and input_type != "logit":
            raise ValueError(f"loss_fn controls {needs_logits} need the current logits (the full-vocabulary entropy "
                             "with its gradient, or values computed from the logits): set nemo_rl.input_type=logit")
        self.plan_on = plan
        loss_type, input_enum, normalizer = nemo_rl_enums()
        self.loss_type = loss_type.TOKEN_LEVEL if self.config.token_level_loss else loss_type.SEQUENCE_LEVEL
        self.input_type = input_enum.LOGIT if input_type == "logit" else input_enum.LOGPROB
        self.use_fused_linear_logprobs = bool(use_fused_linear_logprobs)
        self.log_entropy = log_entropy
        self._groups = groups
        # NeMo-RL's prepare_loss_input reads this to decide whether it needs unfiltered log-probs.
        self.reference_policy_kl_penalty = (
            0.0 if self.config.use_kl_in_reward else self.config.reference_policy_kl_penalty
        )
        by_name = {"tokens": normalizer.TOKENS, "sequences": normalizer.SEQUENCES, "none": normalizer.NONE}
        loss_norm = "tokens" if self.config.token_level_loss else "sequences"
        names = {
            "loss": loss_norm,
            "probs_ratio": "tokens", "probs_ratio_clamped": "tokens",
            "probs_ratio_min": "none", "probs_ratio_max": "none",
            "probs_ratio_clamped_min": "none", "probs_ratio_clamped_max": "none",
            "num_valid_samples": "none", "num_valid_tokens": "none",
            "entropy": "tokens", "clip_fraction": "tokens", "selected_fraction": "tokens",
            "kl_to_old": "tokens", "cov_mean": "tokens", "entropy_proxy": "tokens",
            "cov_selected_mean": "none",
            **diagnostics.metric_normalizations(self.config),
        }
        names.update({name: "tokens" for name in diagnostic_metric_names()})
        for control in self.controls:
            names.update(control.metric_normalizations())
        self.metric_normalizations = {k: by_name[v] for k, v in names.items()}

    # ------------------------------------------------------------------ call
    def __call__(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss and metrics of one micro-batch; accepts every NeMo-RL calling convention (see module doc)."""
        call = _LossCall.parse(type(self).__name__, args, kwargs)
        entropy, logprobs, values = None, call.logprobs, None
        wants_logits = "logits" in self.controls.needs
        if logprobs is None:
            logprobs, entropy, *values = logprobs_from_logits(
                call.logits, call.data, call.tp_rank, call.tp_group, call.cp_group,
                find_megatron_groups=self.input_type.value == "logit",
                logit_values=self.controls.logit_values if wants_logits else None)
            values = values[0] if values else None
            if not (self.log_entropy or "entropy" in self.controls.needs):
                entropy = None
        if wants_logits and values is None:
            raise RuntimeError(
                f"loss_fn controls {[c.name for c in self.controls if 'logits' in c.needs]} compute values from the "
                "logits shard, which this call did not provide: they need nemo_rl.input_type=logit and whole sequences "
                "on each rank (context parallelism > 1 is not supported)")
        return self._loss(logprobs.float(), entropy, call.data, call.global_valid_seqs, call.global_valid_toks,
                          logit_values=values)

    # ------------------------------------------------------------------ the loss proper
    def _loss(self, curr, entropy, data, global_valid_seqs, global_valid_toks, logit_values=None):
        cfg = self.config
        sample_mask = data["sample_mask"]
        mask = batch_keys.valid_token_mask(data, device=curr.device)
        if curr.shape != mask.shape:
            raise ValueError(
                f"next-token log-probs have shape {tuple(curr.shape)} but token_mask[:, 1:] has {tuple(mask.shape)}"
            )
        # Padding may hold anything (-inf log-probs, NaN advantages): masked where it enters.
        per_token = lambda key: zero_masked(data[key][:, 1:].to(curr.device), mask)  # noqa: E731
        advantages = per_token("advantages")
        # NeMo-RL: with force_on_policy_ratio no prev_logprobs are needed, the ratio is exactly 1.
        prev = curr.detach() if cfg.force_on_policy_ratio else per_token("prev_logprobs")
        generation = per_token("generation_logprobs") if "generation_logprobs" in data else prev
        reference = per_token("reference_policy_logprobs") if self.reference_policy_kl_penalty != 0 else None
        uids = data[batch_keys.TOKEN_UIDS][:, 1:].to(torch.int64) if batch_keys.TOKEN_UIDS in data else None
        gvt = global_valid_toks if global_valid_toks is not None else mask.sum()
        gvs = global_valid_seqs if global_valid_seqs is not None else sample_mask.sum()
        plan = batch_keys.plan_from_batch(data, global_valid_tokens=float(gvt), global_valid_seqs=float(gvs), device=curr.device)
        groups, step = None, 0
        if plan is None and self.controls.needs_step_plan:
            if self.plan_on == "driver":
                raise RuntimeError(
                    f"loss_fn {list(cfg.active_controls)} needs the step plan attached on the driver (keys "
                    f"{batch_keys.PLAN_PREFIX}.*), and this batch has none: NeMo-RL's training entry was not wrapped "
                    "(run through `nemo-entropy train`, call nemo_entropy.integrations.nemo_rl_run.install() before "
                    "setup(), or wrap the policy with wrap_policy_for_step())")
            groups = self._groups if self._groups is not None else self._worker_groups()
            step = int(data[batch_keys.STEP].reshape(-1)[0]) if batch_keys.STEP in data else 0
        loss, metrics = policy_loss(
            cfg, curr, prev, advantages, mask, plan=plan, entropy=entropy, logit_values=logit_values,
            controls=self.controls,
            global_valid_tokens=gvt, global_valid_seqs=gvs, groups=groups, token_uids=uids, step=step,
            reference_logprobs=reference, generation_logprobs=generation,
            rewards=data.get("rewards") if cfg.positive_example_nll_weight > 0 else None,
        )
        return loss, self._nemo_rl_metrics(metrics, curr.detach(), prev, generation, mask, sample_mask, entropy,
                                           gvt, gvs)

    @staticmethod
    def _worker_groups() -> ParallelGroups:
        """The token group inside a worker: DP of the last PP stage (CP ranks hold full sequences here), from
        megatron-core's ``parallel_state``. Without it, only a single process can plan over its own call."""
        try:
            from megatron.core import parallel_state as ps

            if ps.model_parallel_is_initialized():
                return ParallelGroups.from_megatron(cp_holds_full_sequences=True)
        except ImportError:  # megatron-core is optional
            pass
        if world_size() > 1:
            raise RuntimeError("nemo_rl.plan='worker' needs megatron-core's parallel_state for the DP group (the "
                               "Megatron backend); this worker has none, so its plan would cover its own share "
                               "of the step only: use nemo_rl.plan='driver'")
        return ParallelGroups.single()

    # ------------------------------------------------------------------ metrics
    _NEMO_RL_NAMES = {"ratio_mean": "probs_ratio", "ratio_clamped_mean": "probs_ratio_clamped",
                      "ratio_min": "probs_ratio_min", "ratio_max": "probs_ratio_max",
                      "ratio_clamped_min": "probs_ratio_clamped_min", "ratio_clamped_max": "probs_ratio_clamped_max"}

    def _nemo_rl_metrics(self, ours, curr, prev, generation, mask, sample_mask, entropy, gvt, gvs):
        """``ClippedPGLossFn``'s metric names and sentinels (inf for the extrema of an empty micro-batch), plus ours."""
        cfg = self.config
        metrics = {self._NEMO_RL_NAMES.get(k, k): v for k, v in ours.items()}
        if not bool(mask.any()):  # NeMo-RL's sentinels, skipped by its aggregation
            metrics.update(probs_ratio_min=math.inf, probs_ratio_max=-math.inf,
                           probs_ratio_clamped_min=math.inf, probs_ratio_clamped_max=-math.inf)
        with torch.no_grad():
            counts = dict(global_valid_tokens=gvt)
            metrics.update(diagnostics.generation_mismatch_metrics(cfg, prev, generation, mask, **counts))
            metrics.update(diagnostics.approx_entropy(curr, generation, mask, **counts))
            if "sampling_importance_ratio" not in metrics:
                _, is_metrics = nemo_rl_terms.importance_weights(
                    replace(cfg, use_importance_sampling_correction=False), prev, generation, mask,
                    global_valid_tokens=gvt, global_valid_seqs=gvs, sample_mask=sample_mask.to(curr.device))
                metrics.update(is_metrics)
            metrics.setdefault("kl_penalty", 0.0)
            metrics.setdefault("positive_nll_loss", 0.0)
            metrics["num_valid_samples"] = float(sample_mask.sum())
            if entropy is not None and self.log_entropy:
                maskf = mask.float()
                metrics["entropy"] = float((entropy.detach().float() * maskf).sum()
                                           / torch.as_tensor(gvt, dtype=torch.float32).clamp(min=1))
        return metrics
