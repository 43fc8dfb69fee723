"""The NeMo-RL loss adapter: Clip-Cov / KL-Cov / PPO with ``ClippedPGLossFn``'s interface, keys and metrics.

One class, :class:`EntropyControlLossFn`, answers both generations of NeMo-RL's loss interface
(shared/ANCHORS.md, NeMo-RL section):

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

Selection (``scope: batch``): the driver-side wrapper (:mod:`nemo_entropy.integrations.driver_selection`)
attaches the selected-token mask of each optimizer step to the batch; the loss uses it and issues no
collective at all. Without it, the loss selects over the tokens of *this call* across the token group
(DP of the last pipeline stage, from megatron-core); that equals the batch selection only when each rank's
call holds its whole share of the optimizer step (one micro-batch per step), see docs/nemo_rl.md.

NeMo-RL is imported lazily and only for its enums; without NeMo-RL, stand-in enums with the same values
are used, so the adapter can be tested on CPU with plain tensors.
"""

from __future__ import annotations

import enum
import math
import warnings
from dataclasses import replace
from typing import Any, Mapping, Optional

import torch

from ..config import LossConfig, loss_config
from ..losses import policy_loss
from ..losses import regularizers
from ..parallel import ParallelGroups
from . import batch_keys

__all__ = ["EntropyControlLossFn", "nemo_rl_enums", "loss_config_from_nemo_rl"]

NEMO_RL_DEFAULT_KL_PENALTY = 0.01  # ClippedPGLossConfig.reference_policy_kl_penalty


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


def _plain_mapping(cfg: Any) -> dict[str, Any]:
    """A dict from NeMo-RL's loss config: a TypedDict/dict (<= v0.6), a pydantic model (>= v0.7), OmegaConf."""
    if isinstance(cfg, LossConfig):
        return cfg.to_dict()
    if hasattr(cfg, "model_dump"):
        return dict(cfg.model_dump())
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return dict(OmegaConf.to_container(cfg, resolve=True))
    except ImportError:  # pragma: no cover - omegaconf is a core dependency
        pass
    if isinstance(cfg, Mapping):
        return dict(cfg)
    raise TypeError(f"loss config must be a mapping, a pydantic model or a LossConfig, got {type(cfg).__name__}")


def loss_config_from_nemo_rl(cfg: Any) -> LossConfig:
    """Validate NeMo-RL's ``loss_fn`` section (with our keys) into a :class:`LossConfig`.

    Keys left out take NeMo-RL's defaults (``reference_policy_kl_penalty`` 0.01, not LossConfig's 0.0).
    ``truncated_importance_sampling_ratio`` without a type means ``tis`` (NeMo-RL <= v0.5 had no type key).
    """
    values = _plain_mapping(cfg)
    # The adapter *is* NeMo-RL's loss: a key the section leaves out takes NeMo-RL's default, which differs
    # from LossConfig's (0.0, the paper's recipes) only here.
    values.setdefault("reference_policy_kl_penalty", NEMO_RL_DEFAULT_KL_PENALTY)
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
    """Per-token (entropy, log-prob of target) from a (TP-sharded) logits block [B, T, V_local]."""
    try:
        from ..entropy import vocab_parallel_entropy_and_logprobs
    except ImportError:
        vocab_parallel_entropy_and_logprobs = None
    if vocab_parallel_entropy_and_logprobs is not None:
        return vocab_parallel_entropy_and_logprobs(
            logits_local, targets, groups=tp_group, vocab_start=vocab_start,
        )
    if tp_group is not None:
        raise RuntimeError(
            "vocab-parallel logits need nemo_entropy.entropy.vocab_parallel_entropy_and_logprobs, which is not "
            "available in this installation; use the LOGPROB input (nemo_rl.input_type: logprob)"
        )
    # Unsharded: plain log-softmax (fp32), the reference the kernels are tested against.
    log_probs = torch.log_softmax(logits_local.float(), dim=-1)
    entropy = -(log_probs.exp() * log_probs).sum(-1)
    return entropy, log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def _is_dtensor(x: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - old torch
        return False
    return isinstance(x, DTensor)


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


# ----------------------------------------------------------------------------------------------- the loss
class EntropyControlLossFn:
    """NeMo-RL loss: PPO / Clip-Cov / KL-Cov with every ``ClippedPGLossFn`` key, for NeMo-RL v0.5 and later.

    Args:
        cfg: NeMo-RL's ``loss_fn`` section (dict, pydantic model, OmegaConf node) or a LossConfig: every
            ``ClippedPGLossFn`` key with its meaning, plus ours (``method``, ``scope``, ``kl_cov_*``, ...).
        use_fused_linear_logprobs: NeMo-RL's flag, kept as an attribute for its input preparation.
        input_type: ``"logprob"`` (default, NeMo-RL >= v0.6 hands over log-probs) or ``"logit"`` (NeMo-RL
            hands over logits; the full-vocabulary entropy is then logged). NeMo-RL <= v0.5 always passes
            logits, whatever this says.
        log_entropy: compute the full-vocabulary entropy metric when logits are available.
        groups: explicit :class:`ParallelGroups` for in-worker selection (tests, custom launchers); by
            default they come from megatron-core's ``parallel_state`` when it is initialised.
    """

    def __init__(
        self,
        cfg: Any,
        use_fused_linear_logprobs: bool = False,
        *,
        input_type: str = "logprob",
        log_entropy: bool = True,
        groups: Optional[ParallelGroups] = None,
    ):
        if input_type not in ("logprob", "logit"):
            raise ValueError(f"nemo_rl.input_type={input_type!r} is invalid: allowed 'logprob' or 'logit'")
        if input_type == "logit" and use_fused_linear_logprobs:
            raise ValueError(
                "nemo_rl.input_type='logit' is incompatible with policy.megatron_cfg.use_fused_linear_logprobs=true: "
                "the fused model returns 2-D log-probs, not logits; use nemo_rl.input_type='logprob'"
            )
        self.config = loss_config_from_nemo_rl(cfg)
        loss_type, input_enum, normalizer = nemo_rl_enums()
        self.loss_type = loss_type.TOKEN_LEVEL if self.config.token_level_loss else loss_type.SEQUENCE_LEVEL
        self.input_type = input_enum.LOGIT if input_type == "logit" else input_enum.LOGPROB
        self.use_fused_linear_logprobs = bool(use_fused_linear_logprobs)
        self.log_entropy = log_entropy
        self._groups = groups
        self._warned_in_worker = False
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
            "kl_to_old": "tokens", "ratio_mean": "tokens", "cov_mean": "tokens", "entropy_proxy": "tokens",
            "cov_selected_mean": "none",
            **regularizers.metric_normalizations(self.config),
        }
        self.metric_normalizations = {k: by_name[v] for k, v in names.items()}

    # ------------------------------------------------------------------ call
    def __call__(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """Loss and metrics of one micro-batch; accepts every NeMo-RL calling convention (see module doc)."""
        logits = kwargs.pop("logits", None)
        logprobs = kwargs.pop("next_token_logprobs", None)
        positional = list(args)
        if positional and isinstance(positional[0], torch.Tensor):
            logits = positional.pop(0)  # <= v0.5: next_token_logits first
        for name in ("data", "global_valid_seqs", "global_valid_toks"):
            if name not in kwargs and positional:
                kwargs[name] = positional.pop(0)
        if positional:
            raise TypeError(f"EntropyControlLossFn got {len(positional)} unexpected positional arguments")
        data = kwargs.pop("data", None)
        if data is None:
            raise TypeError("EntropyControlLossFn needs `data` (NeMo-RL's BatchedDataDict of the micro-batch)")
        global_valid_seqs = kwargs.pop("global_valid_seqs", None)
        global_valid_toks = kwargs.pop("global_valid_toks", None)
        vocab_parallel_rank = kwargs.pop("vocab_parallel_rank", None)
        vocab_parallel_group = kwargs.pop("vocab_parallel_group", None)
        context_parallel_group = kwargs.pop("context_parallel_group", None)
        if kwargs:
            raise TypeError(f"EntropyControlLossFn got unexpected keyword arguments: {sorted(kwargs)}")
        if logprobs is None and logits is None:
            raise TypeError("EntropyControlLossFn needs next_token_logprobs (LOGPROB input) or logits")

        entropy = None
        if logprobs is None:
            logprobs, entropy = self._logprobs_from_logits(
                logits, data, vocab_parallel_rank, vocab_parallel_group, context_parallel_group
            )
        return self._loss(logprobs.float(), entropy, data, global_valid_seqs, global_valid_toks)

    # ------------------------------------------------------------------ logits -> log-probs (+ entropy)
    def _logprobs_from_logits(self, logits, data, tp_rank, tp_group, cp_group):
        input_ids = data["input_ids"]
        if _is_dtensor(logits):
            mesh = logits.device_mesh
            names = mesh.mesh_dim_names or ()
            if "cp" in names and mesh["cp"].size() > 1 or data.get("seq_index") is not None:
                return self._delegate_to_nemo_rl(logits, data, None, None, None), None
            tp = mesh.get_group("tp") if "tp" in names and mesh["tp"].size() > 1 else None
            local = logits.to_local()
            vocab_start = (0 if tp is None else tp.rank()) * local.shape[-1]
            tp_group = tp
        else:
            if tp_group is None and cp_group is None:
                found = _megatron_groups() if self.input_type.value == "logit" else None
                if found is not None:
                    tp_group, tp_rank, cp_group = found
            if cp_group is not None and torch.distributed.get_world_size(cp_group) > 1:
                # Megatron shards the sequence over CP in load-balanced chunks; NeMo-RL's own helper maps
                # the targets and gathers the log-probs. The entropy metric is skipped in this layout.
                return self._delegate_to_nemo_rl(logits, data, tp_rank, tp_group, cp_group), None
            local = logits
            vocab_start = (tp_rank or 0) * local.shape[-1] if tp_group is not None else 0
        length = input_ids.shape[1]
        # Logits at position t predict token t + 1; CP/TP padding beyond the sequence is cut off.
        block = local[:, : length - 1]
        targets = input_ids[:, 1:].to(block.device)
        entropy, logprobs = _entropy_and_logprobs(block, targets, tp_group, vocab_start)
        return logprobs, (entropy.detach() if self.log_entropy else None)

    @staticmethod
    def _delegate_to_nemo_rl(logits, data, tp_rank, tp_group, cp_group):
        from nemo_rl.distributed.model_utils import get_next_token_logprobs_from_logits  # type: ignore

        return get_next_token_logprobs_from_logits(
            input_ids=data["input_ids"], next_token_logits=logits, seq_index=data.get("seq_index", None),
            vocab_parallel_rank=tp_rank, vocab_parallel_group=tp_group, context_parallel_group=cp_group,
        )

    # ------------------------------------------------------------------ the loss proper
    def _loss(self, curr, entropy, data, global_valid_seqs, global_valid_toks):
        cfg = self.config
        token_mask = data["token_mask"][:, 1:]
        sample_mask = data["sample_mask"]
        mask = (token_mask * sample_mask.unsqueeze(-1)).to(curr.device) != 0
        if curr.shape != mask.shape:
            raise ValueError(
                f"next-token log-probs have shape {tuple(curr.shape)} but token_mask[:, 1:] has {tuple(mask.shape)}"
            )
        advantages = data["advantages"][:, 1:].float()
        if cfg.force_on_policy_ratio:
            prev = curr.detach()  # NeMo-RL: no prev_logprobs needed, ratio exactly 1
        else:
            prev = data["prev_logprobs"][:, 1:].float()
        generation = data["generation_logprobs"][:, 1:].float() if "generation_logprobs" in data else prev
        reference = None
        if self.reference_policy_kl_penalty != 0:
            reference = data["reference_policy_logprobs"][:, 1:].float()
        # Padding and masked positions may hold anything (even -inf): zero them so that nothing non-finite
        # reaches a product with a 0 mask.
        zero = lambda t: None if t is None else torch.where(mask, t, torch.zeros_like(t))  # noqa: E731
        prev, generation, reference, advantages = zero(prev), zero(generation), zero(reference), zero(advantages)
        curr_for_loss = torch.where(mask, curr, torch.zeros_like(curr))

        selection = self._attached_selection(data, mask)
        groups = None
        if selection is None and cfg.method != "ppo" and cfg.scope == "batch":
            groups = self._groups if self._groups is not None else self._worker_groups()
            if not self._warned_in_worker:
                warnings.warn(
                    "EntropyControlLossFn: no driver-side selection in the batch (key "
                    f"{batch_keys.SELECTED!r}); selecting over this call's tokens across the token group. This "
                    "equals scope=batch only when each rank's call holds its whole share of the optimizer step. "
                    "Wrap the policy with nemo_entropy.integrations.BatchSelectionPolicy for the exact selection.",
                    stacklevel=3,
                )
                self._warned_in_worker = True
        selected, scores, uids, step, step_selected = selection or (None, None, None, 0, None)
        if uids is None and batch_keys.TOKEN_UIDS in data:
            uids = data[batch_keys.TOKEN_UIDS][:, 1:].to(torch.int64)
        if batch_keys.STEP in data:
            step = int(data[batch_keys.STEP].reshape(-1)[0])

        loss, metrics = policy_loss(
            cfg, curr_for_loss, prev, advantages, mask,
            selected=selected, scores=scores,
            global_valid_tokens=global_valid_toks, global_valid_seqs=global_valid_seqs,
            global_selected_tokens=step_selected, groups=groups, token_uids=uids, step=step,
            reference_logprobs=reference, generation_logprobs=generation,
            rewards=data.get("rewards") if cfg.positive_example_nll_weight > 0 else None,
        )
        metrics = self._nemo_rl_metrics(metrics, curr.detach(), prev, generation, mask, token_mask, sample_mask,
                                        entropy, global_valid_toks, global_valid_seqs)
        return loss, metrics

    def _attached_selection(self, data, mask):
        """``(selected, scores, uids, step, step_selected)`` from the driver, or None when not attached."""
        if batch_keys.SELECTED not in data or self.config.scope != "batch":
            return None
        # For ppo the mask is all False; the attached scores still give exact covariance diagnostics.
        selected = (data[batch_keys.SELECTED][:, 1:] != 0).to(mask.device) & mask
        scores = data[batch_keys.COV_SCORES][:, 1:].float() if batch_keys.COV_SCORES in data else None
        uids = data[batch_keys.TOKEN_UIDS][:, 1:].to(torch.int64) if batch_keys.TOKEN_UIDS in data else None
        step = int(data[batch_keys.STEP].reshape(-1)[0]) if batch_keys.STEP in data else 0
        step_selected = None
        if batch_keys.STEP_SELECTED in data:
            # One optimizer step per micro-batch: every sample carries the same count.
            step_selected = data[batch_keys.STEP_SELECTED].reshape(-1)[0].float()
        return selected, scores, uids, step, step_selected

    @staticmethod
    def _worker_groups() -> ParallelGroups:
        """The token group inside a worker: DP of the last PP stage (CP ranks hold full sequences here)."""
        try:
            from megatron.core import parallel_state as ps

            if ps.model_parallel_is_initialized():
                return ParallelGroups.from_megatron(cp_holds_full_sequences=True)
        except ImportError:
            pass
        return ParallelGroups.single()

    # ------------------------------------------------------------------ metrics
    def _nemo_rl_metrics(self, ours, curr, prev, generation, mask, token_mask, sample_mask, entropy,
                         global_valid_toks, global_valid_seqs):
        cfg = self.config
        metrics = {k: v for k, v in ours.items() if k not in ("ratio_min", "ratio_max")}
        counts = dict(global_valid_tokens=global_valid_toks)
        maskf = mask.float()
        gvt = _as_count(global_valid_toks, maskf.sum())
        with torch.no_grad():
            ratios, clamped = _nemo_rl_ratios(cfg, curr, prev, token_mask.float().to(curr.device))
            metrics["probs_ratio"] = float((ratios * maskf).sum() / gvt)
            metrics["probs_ratio_clamped"] = float((clamped * maskf).sum() / gvt)
            if bool(mask.any()):
                metrics["probs_ratio_min"] = float(ratios[mask].min())
                metrics["probs_ratio_max"] = float(ratios[mask].max())
                metrics["probs_ratio_clamped_min"] = float(clamped[mask].min())
                metrics["probs_ratio_clamped_max"] = float(clamped[mask].max())
            else:  # NeMo-RL's sentinels, skipped by its aggregation
                metrics.update(probs_ratio_min=math.inf, probs_ratio_max=-math.inf,
                               probs_ratio_clamped_min=math.inf, probs_ratio_clamped_max=-math.inf)
            metrics.update(regularizers.generation_mismatch_metrics(cfg, prev, generation, mask, **counts))
            metrics.update(regularizers.approx_entropy(curr, generation, mask, **counts))
            if "sampling_importance_ratio" not in metrics:
                _, is_metrics = regularizers.importance_weights(
                    replace(cfg, use_importance_sampling_correction=False), prev, generation, mask,
                    global_valid_tokens=global_valid_toks, global_valid_seqs=global_valid_seqs,
                    sample_mask=sample_mask.to(curr.device),
                )
                metrics.update(is_metrics)
            metrics.setdefault("kl_penalty", 0.0)
            metrics.setdefault("positive_nll_loss", 0.0)
            metrics["num_valid_samples"] = float(sample_mask.sum())
            if entropy is not None:
                metrics["entropy"] = float((entropy.float() * maskf).sum() / gvt)
        return metrics


def _as_count(count: Any, fallback: torch.Tensor) -> torch.Tensor:
    value = fallback if count is None else torch.as_tensor(count, dtype=torch.float32).to(fallback.device)
    return torch.where(value > 0, value, torch.ones_like(value))


def _nemo_rl_ratios(cfg: LossConfig, curr, prev, token_mask):
    """The ratios ``ClippedPGLossFn`` reports as ``probs_ratio`` (no grad; NeMo-RL's definitions)."""
    if cfg.force_on_policy_ratio:
        ones = torch.ones_like(curr)
        return ones, ones
    if cfg.disable_ppo_ratio:
        return curr, curr
    log_ratio = curr - prev
    if cfg.sequence_level_importance_ratios:
        per_seq = token_mask.sum(-1, keepdim=True)
        mean = (log_ratio * token_mask).sum(-1, keepdim=True) / torch.where(per_seq > 0, per_seq, torch.ones_like(per_seq))
        ratios = mean.exp().expand_as(curr)
    else:
        ratios = log_ratio.exp()
    return ratios, ratios.clamp(1.0 - cfg.ratio_clip_min, 1.0 + cfg.ratio_clip_max)
