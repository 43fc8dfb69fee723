"""Typed, validated configuration of the policy loss.

``loss_config(mapping)`` turns a dict or an OmegaConf node (the ``loss_fn:`` section of a run config) into a
frozen :class:`LossConfig`. Every key is checked; an unknown key or a value out of range raises one
``ValueError`` that names the key, the value and what is allowed.

RATIOS ARE FRACTIONS, NOT PERCENTS. ``kl_cov_ratio: 2e-3`` selects 0.2% of the valid tokens. The paper's own
repository called this knob ``k_percent`` and some of its configs wrote ``k_percent: 0.2`` meaning 2e-3;
copying that number here would select 20% of all tokens. We reject nothing in (0, 1], so check your units:
the paper's recipes are ``kl_cov_ratio`` 2e-3 (7B) / 2e-4 (32B) and ``clip_cov_ratio`` 2e-4.

Two families of keys:

* ours (entropy control): ``method``, ``scope``, ``cov_form``, ``clip_cov_*``, ``kl_cov_*``, ``seed``;
* NeMo-RL's ``ClippedPGLossFn`` keys, with NeMo-RL's meaning and default (one exception:
  ``reference_policy_kl_penalty`` defaults to 0.0, the paper's recipes, where NeMo-RL says 0.01), so a
  NeMo-RL ``loss_fn:`` section can be used unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Optional

__all__ = ["LossConfig", "loss_config", "PAPER_RECIPES"]

METHODS = ("ppo", "clip_cov", "kl_cov")
SCOPES = ("batch", "microbatch")
COV_FORMS = ("natural", "vanilla")
KL_TYPES = ("k1", "k2", "k3")
TIS_TYPES = ("tis", "icepop", "seq-mask-tis")


@dataclass(frozen=True)
class LossConfig:
    """The policy loss. Field docs double as the config reference (see README)."""

    # ---- entropy control (ours) ----------------------------------------------------------------
    method: str = "kl_cov"
    """``ppo`` (clipped surrogate), ``clip_cov`` (detach the gradient of a random subset of
    high-covariance tokens) or ``kl_cov`` (|log-ratio| penalty on the top-covariance tokens)."""
    scope: str = "batch"
    """``batch``: one exact selection over every valid token of the optimizer step, across micro-batches
    and DP/CP ranks, scored with the old log-probs (layout invariant). ``microbatch``: the reference's
    per-call selection on current detached log-probs (for comparison runs)."""
    cov_form: str = "natural"
    """``natural``: c = (l - mean l)(A - mean A) (Theorem 2, what the reference uses). ``vanilla``:
    c = (l - mean l)(p A - mean(p A)), p = exp(l) (Theorem 1)."""
    clip_cov_ratio: float = 2e-4
    """Fraction (not percent) of valid tokens Clip-Cov detaches: k = max(1, floor(ratio * N))."""
    clip_cov_lb: float = 1.0
    """Clip-Cov candidates have lb < c < ub."""
    clip_cov_ub: float = 5.0
    kl_cov_ratio: float = 2e-3
    """Fraction (not percent) of valid tokens KL-Cov penalises: k = max(1, floor(ratio * N)).
    Paper: 2e-3 for 7B, 2e-4 for 32B."""
    kl_cov_coef: float = 1.0
    """beta of KL-Cov's beta * |log r| penalty (the reference's code default and recipes use 1; one of its
    YAML files says 0.1)."""
    kl_cov_ppo_clip: bool = False
    """KL-Cov on top of the PPO clipped surrogate. The reference applies no clip in KL-Cov (False)."""
    seed: int = 0
    """Seed of Clip-Cov's counter-based hash keys (with the step and each token's uid)."""

    # ---- NeMo-RL ClippedPGLossFn keys (same meaning and default as NeMo-RL) --------------------
    ratio_clip_min: float = 0.2
    """PPO clip: the ratio is clamped to [1 - ratio_clip_min, 1 + ratio_clip_max]."""
    ratio_clip_max: float = 0.2
    ratio_clip_c: Optional[float] = None
    """Dual clip (> 1) for negative advantages; None disables."""
    token_level_loss: bool = True
    """True: mean over all valid tokens of the step. False: mean over sequences of each sequence's mean."""
    disable_ppo_ratio: bool = False
    """REINFORCE-style: the surrogate uses the log-prob itself instead of the ratio."""
    force_on_policy_ratio: bool = False
    """Ratio forced to 1 (gradient still flows): exactly one update per rollout."""
    sequence_level_importance_ratios: bool = False
    """GSPO: one ratio per sequence (geometric mean); needs token_level_loss=False."""
    use_cispo: bool = False
    """CISPO: -A * sg(clamp(r)) * log pi."""
    reference_policy_kl_penalty: float = 0.0
    """Coefficient of the KL to the reference policy. NOTE: NeMo-RL's default is 0.01; ours is 0.0, the
    paper's recipes (no reference model needed). Set it explicitly to match a NeMo-RL run."""
    reference_policy_kl_type: str = "k3"
    kl_input_clamp_value: Optional[float] = 20.0
    kl_output_clamp_value: Optional[float] = 10.0
    use_kl_in_reward: bool = False
    """The reference KL goes into the reward upstream; the loss then carries no KL term."""
    use_on_policy_kl_approximation: bool = False
    use_importance_sampling_correction: bool = False
    truncated_importance_sampling_type: Optional[str] = None
    truncated_importance_sampling_ratio: Optional[float] = None
    truncated_importance_sampling_ratio_min: Optional[float] = None
    positive_example_nll_weight: float = 0.0

    # ---- numerics --------------------------------------------------------------------------------
    log_ratio_clamp: float = 20.0
    """log r is clamped to [-v, v] before exp so one stale token cannot overflow the loss."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def selection_ratio(self) -> float:
        """The quota fraction of the configured method (0 for ``ppo``)."""
        return {"clip_cov": self.clip_cov_ratio, "kl_cov": self.kl_cov_ratio}.get(self.method, 0.0)

    def __post_init__(self) -> None:
        _validate(self)


# The paper's recipes (ANCHORS.md), as overrides on top of the defaults.
PAPER_RECIPES: dict[str, dict[str, Any]] = {
    "7b_kl_cov": dict(method="kl_cov", kl_cov_ratio=2e-3, kl_cov_coef=1.0, ratio_clip_min=0.2, ratio_clip_max=0.2,
                      reference_policy_kl_penalty=0.0),
    "7b_clip_cov": dict(method="clip_cov", clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0,
                        ratio_clip_min=1.0, ratio_clip_max=1.0, reference_policy_kl_penalty=0.0),
    "32b_kl_cov": dict(method="kl_cov", kl_cov_ratio=2e-4, kl_cov_coef=1.0, ratio_clip_min=0.2, ratio_clip_max=0.2,
                       reference_policy_kl_penalty=0.0),
    "32b_clip_cov": dict(method="clip_cov", clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0,
                         ratio_clip_min=1.0, ratio_clip_max=1.0, reference_policy_kl_penalty=0.0),
}

_OPTIONAL_FLOATS = {
    "ratio_clip_c", "kl_input_clamp_value", "kl_output_clamp_value",
    "truncated_importance_sampling_ratio", "truncated_importance_sampling_ratio_min",
}


def _bad(key: str, value: Any, allowed: str) -> ValueError:
    return ValueError(f"loss_fn.{key}={value!r} is invalid: allowed {allowed}")


def _check_types(cfg: LossConfig) -> None:
    for f in fields(cfg):
        value = getattr(cfg, f.name)
        default = f.default
        if f.name in _OPTIONAL_FLOATS:
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise _bad(f.name, value, "a number or null")
            if value is not None and not math.isfinite(value):
                raise _bad(f.name, value, "a finite number or null")
        elif f.name == "truncated_importance_sampling_type":
            if value is not None and value not in TIS_TYPES:
                raise _bad(f.name, value, f"one of {TIS_TYPES} or null")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise _bad(f.name, value, "true or false")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise _bad(f.name, value, "an integer")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise _bad(f.name, value, "a finite number")
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise _bad(f.name, value, "a string")


def _validate(cfg: LossConfig) -> None:
    _check_types(cfg)
    for key, allowed in (("method", METHODS), ("scope", SCOPES), ("cov_form", COV_FORMS),
                         ("reference_policy_kl_type", KL_TYPES)):
        if getattr(cfg, key) not in allowed:
            raise _bad(key, getattr(cfg, key), f"one of {allowed}")
    for key in ("clip_cov_ratio", "kl_cov_ratio"):
        value = getattr(cfg, key)
        if not 0.0 < value <= 1.0:
            raise _bad(key, value, "a fraction in (0, 1] (a fraction, not a percent: 2e-3 means 0.2% of tokens)")
    if cfg.clip_cov_lb >= cfg.clip_cov_ub:
        raise ValueError(
            f"loss_fn.clip_cov_lb={cfg.clip_cov_lb!r} must be < loss_fn.clip_cov_ub={cfg.clip_cov_ub!r}"
        )
    for key in ("kl_cov_coef", "ratio_clip_min", "ratio_clip_max", "reference_policy_kl_penalty",
                "positive_example_nll_weight"):
        if getattr(cfg, key) < 0:
            raise _bad(key, getattr(cfg, key), ">= 0")
    if cfg.ratio_clip_min > 1.0:
        raise _bad("ratio_clip_min", cfg.ratio_clip_min, "in [0, 1] (the lower clip bound is 1 - ratio_clip_min >= 0)")
    if cfg.ratio_clip_c is not None and cfg.ratio_clip_c <= 1.0:
        raise _bad("ratio_clip_c", cfg.ratio_clip_c, "> 1 (dual clip) or null")
    for key in ("kl_input_clamp_value", "kl_output_clamp_value"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            raise _bad(key, value, "> 0 or null")
    if cfg.log_ratio_clamp <= 0:
        raise _bad("log_ratio_clamp", cfg.log_ratio_clamp, "> 0")
    if cfg.seed < 0:
        raise _bad("seed", cfg.seed, "an integer >= 0")
    # Combinations NeMo-RL rejects; same rules, named keys.
    if cfg.sequence_level_importance_ratios and cfg.token_level_loss:
        raise ValueError("loss_fn.sequence_level_importance_ratios=True needs loss_fn.token_level_loss=False")
    if cfg.use_cispo:
        for key, bad_value in (("disable_ppo_ratio", True), ("force_on_policy_ratio", True),
                               ("sequence_level_importance_ratios", True), ("token_level_loss", False)):
            if getattr(cfg, key) == bad_value:
                raise ValueError(f"loss_fn.use_cispo=True is incompatible with loss_fn.{key}={bad_value}")
        if cfg.ratio_clip_c is not None:
            raise ValueError("loss_fn.use_cispo=True is incompatible with dual clip: set loss_fn.ratio_clip_c=null")
    if cfg.method != "ppo" and (cfg.disable_ppo_ratio or cfg.use_cispo):
        raise ValueError(
            f"loss_fn.method={cfg.method!r} needs the PPO ratio: it is incompatible with "
            f"disable_ppo_ratio={cfg.disable_ppo_ratio} / use_cispo={cfg.use_cispo}"
        )
    if cfg.truncated_importance_sampling_type is None and (
            cfg.truncated_importance_sampling_ratio is not None or cfg.truncated_importance_sampling_ratio_min is not None):
        # A ratio with no type would do nothing here; NeMo-RL <= v0.5 had no type key and meant 'tis'.
        raise ValueError(
            f"loss_fn.truncated_importance_sampling_ratio={cfg.truncated_importance_sampling_ratio!r} is set but "
            f"loss_fn.truncated_importance_sampling_type is null: set it to one of {TIS_TYPES} "
            "('tis' is what NeMo-RL <= v0.5 did)"
        )
    if cfg.truncated_importance_sampling_type is not None:
        if not cfg.use_importance_sampling_correction:
            raise ValueError(
                "loss_fn.truncated_importance_sampling_type is set but loss_fn.use_importance_sampling_correction "
                "is False: truncation only applies to the importance-sampling correction"
            )
        ratio = cfg.truncated_importance_sampling_ratio
        if ratio is None or ratio <= 0:
            raise _bad("truncated_importance_sampling_ratio", ratio, "> 0 when truncated_importance_sampling_type is set")
        ratio_min = cfg.truncated_importance_sampling_ratio_min
        if ratio_min is not None and ratio_min > ratio:
            raise _bad("truncated_importance_sampling_ratio_min", ratio_min,
                       f"<= truncated_importance_sampling_ratio ({ratio})")
        if cfg.truncated_importance_sampling_type in ("icepop", "seq-mask-tis") and ratio_min is None:
            raise _bad("truncated_importance_sampling_ratio_min", None,
                       f"a number when truncated_importance_sampling_type={cfg.truncated_importance_sampling_type!r}")


_FIELD_NAMES = frozenset(f.name for f in fields(LossConfig))


def loss_config(mapping: Any = None, **overrides: Any) -> LossConfig:
    """Validate a ``loss_fn`` mapping (dict or OmegaConf node) into a :class:`LossConfig`.

    Raises ``ValueError`` naming the first offending key, its value and the allowed values. A
    :class:`LossConfig` passes through (with ``overrides`` applied).
    """
    if isinstance(mapping, LossConfig):
        values = mapping.to_dict()
    elif mapping is None:
        values = {}
    else:
        try:
            from omegaconf import DictConfig, OmegaConf

            if isinstance(mapping, DictConfig):
                mapping = OmegaConf.to_container(mapping, resolve=True)
        except ImportError:  # pragma: no cover - omegaconf is a core dependency
            pass
        if not isinstance(mapping, Mapping):
            raise TypeError(f"loss_config expects a mapping (dict or OmegaConf node), got {type(mapping).__name__}")
        values = dict(mapping)
    values.update(overrides)
    unknown = sorted(k for k in values if k not in _FIELD_NAMES)
    if unknown:
        key = unknown[0]
        hint = " (the paper repo's k_percent is kl_cov_ratio here, as a FRACTION)" if "percent" in key else ""
        raise ValueError(
            f"loss_fn.{key}={values[key]!r} is not a known key{hint}; known keys: {', '.join(sorted(_FIELD_NAMES))}"
        )
    # YAML writes 1 for 1.0: accept ints where floats are expected.
    for f in fields(LossConfig):
        if f.name in values and isinstance(f.default, float) and isinstance(values[f.name], int) \
                and not isinstance(values[f.name], bool):
            values[f.name] = float(values[f.name])
    return LossConfig(**values)
