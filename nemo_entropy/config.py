"""Typed, validated configuration of the policy loss, and the one source of every default.

``loss_config(mapping)`` turns a dict or an OmegaConf node (the ``loss_fn:`` section of a run config) into a
frozen :class:`LossConfig`. Every key is checked; an unknown key or a value out of range raises one
``ValueError`` that names the key, the value and what is allowed.

RATIOS ARE FRACTIONS, NOT PERCENTS. ``kl_cov_ratio: 2e-3`` selects 0.2% of the valid tokens. The paper's own
repository called this knob ``k_percent`` and some of its configs wrote ``k_percent: 0.2`` meaning 2e-3;
copying that number here would select 20% of all tokens. Check your units: the paper's recipes are
``kl_cov_ratio`` 2e-3 (7B) / 2e-4 (32B) and ``clip_cov_ratio`` 2e-4.

Three families of keys, all flat in ``loss_fn:`` (so a verl recipe translates key for key):

* which controls run: ``method`` (the main one) and ``controls`` (more controls composed with it), plus
  ``scope``, ``cov_form`` and ``seed``, shared by the controls;
* each control's own section (``nemo_entropy.controls``: ``kl_cov_*``, ``clip_cov_*``, ...), with the names
  verl and TRL use; every registered control's keys are accepted (and checked) whether or not it runs;
* NeMo-RL's ``ClippedPGLossFn`` keys, with NeMo-RL's meaning and default, except one: ``reference_policy_kl_penalty``
  defaults to 0.0 here (the paper's recipes) and 0.01 in NeMo-RL (:data:`NEMO_RL_DEFAULTS`, applied by the
  NeMo-RL adapter to a NeMo-RL section that leaves the key out).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any, Mapping, Optional

from .controls import REGISTRY
from .controls.base import ControlConfig, bad_value

__all__ = ["LossConfig", "loss_config", "NEMO_RL_DEFAULTS", "to_plain"]

SCOPES = ("batch", "microbatch")
COV_FORMS = ("natural", "vanilla")
CONTROLLER_UPDATES = ("rollout", "optimizer_step")
KL_TYPES = ("k1", "k2", "k3")
TIS_TYPES = ("tis", "icepop", "seq-mask-tis")


@dataclass(frozen=True)
class LossConfig:
    """The policy loss. Field docs double as the config reference (see README)."""

    # ---- which controls run (ours) ----------------------------------------------------------------
    method: str = "ppo"
    """The main entropy control (the one default, here): ``ppo`` (none: the clipped surrogate, so a NeMo-RL
    ``loss_fn:`` section without ``method`` is NeMo-RL's ``ClippedPGLossFn``), ``clip_cov`` (detach the gradient of a
    random subset of high-covariance tokens), ``kl_cov`` (|log-ratio| penalty on the top-covariance tokens), or
    any other name of ``nemo_entropy.controls.REGISTRY``."""
    controls: tuple[str, ...] = ()
    """More controls composed with ``method`` (e.g. ``[entropy_bonus]`` next to ``method: kl_cov``). Controls of
    one exclusive group (two covariance selections, two owners of the surrogate, ...) are rejected by name."""
    scope: str = "batch"
    """``batch``: every whole-step quantity (selection, quantiles, counts) is computed once over every valid token
    of the optimizer step, across micro-batches and DP/CP ranks, from the old log-probs (layout invariant).
    ``microbatch``: the reference's per-call selection on current detached log-probs (for comparison runs)."""
    cov_form: str = "natural"
    """``natural``: c = (l - mean l)(A - mean A) (Theorem 2, what the reference uses). ``vanilla``:
    c = (l - mean l)(p A - mean(p A)), p = exp(l) (Theorem 1)."""
    controller_update: str = "rollout"
    """When the controllers (``adaptive_entropy``, ``aent``, ``entropy_pi``) move their state: ``rollout`` (once per
    rollout, from the rollout's token-weighted mean old entropy over its optimizer steps: Skywork-OR1, AReaL's AEnt
    and EntroPIC's cadence, independent of the optimizer steps per rollout) or ``optimizer_step`` (after every
    optimizer step, from that step's entropy)."""
    seed: int = 0
    """Seed of the controls' counter-based hash keys (Clip-Cov's random subset, with the step and token uid)."""
    covariance_diagnostics: bool = True
    """Log the paper's diagnostics of every optimizer step, exact over the step: covariance concentration (the
    share of the total covariance held by the top 0.02% / 0.2% / 2% of tokens, their mean against the overall
    mean) and the Theorem-1 prediction of the entropy change (``entropy_change_predicted`` = -Cov(log pi, pi A),
    per unit step size). Costs one more all-gather per step in the plan (of 2% of the tokens)."""

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

    sections: Mapping[str, ControlConfig] = field(default_factory=lambda: _default_sections(), repr=False,
                                                  hash=False)
    """Every registered control's config section (not a ``loss_fn`` key: built by :func:`loss_config`)."""

    def section(self, name: str) -> ControlConfig:
        """The config section of control ``name``."""
        return self.sections[name]

    def __getattr__(self, name: str) -> Any:
        # Control keys read flat, as written in loss_fn: config.kl_cov_ratio is config.section("kl_cov").kl_cov_ratio.
        if name.startswith("__") or name == "sections":
            raise AttributeError(name)
        for section in self.__dict__.get("sections", {}).values():
            if hasattr(section, name):
                return getattr(section, name)
        raise AttributeError(f"LossConfig has no key {name!r}")

    @property
    def active_controls(self) -> tuple[str, ...]:
        """``method`` and then ``controls``."""
        return (self.method, *self.controls)

    @property
    def selection_ratio(self) -> float:
        """The quota fraction of the active covariance selection (0 when none runs)."""
        for name in self.active_controls:
            ratio_key = getattr(REGISTRY[name], "ratio_key", None)
            if ratio_key is not None:
                return getattr(self, ratio_key)
        return 0.0

    def to_dict(self) -> dict[str, Any]:
        """Every ``loss_fn`` key, flat (what :func:`loss_config` accepts back)."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "sections"}
        out["controls"] = list(self.controls)
        for section in self.sections.values():
            out.update(section.keys())
        return out

    def __post_init__(self) -> None:
        _validate(self)


def to_plain(value: Any) -> Any:
    """Plain Python containers from an OmegaConf node (resolved), a pydantic model (NeMo-RL's configs) or a
    mapping (copied); anything else is returned as is."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if hasattr(value, "model_dump"):
        return value.model_dump()
    if isinstance(value, Mapping):
        return dict(value)
    return value


NEMO_RL_DEFAULTS: Mapping[str, Any] = MappingProxyType({"reference_policy_kl_penalty": 0.01})
"""NeMo-RL's defaults where they differ from ours: a NeMo-RL ``loss_fn`` section that leaves these keys out means
these values (the NeMo-RL adapter applies them). Every other default is :class:`LossConfig`'s."""

_OPTIONAL_FLOATS = {
    "ratio_clip_c", "kl_input_clamp_value", "kl_output_clamp_value",
    "truncated_importance_sampling_ratio", "truncated_importance_sampling_ratio_min",
}
_OPTIONAL_STRINGS = {"truncated_importance_sampling_type": TIS_TYPES}


def _check_field_types(obj: Any) -> None:
    """Type checks of a config dataclass's fields against their defaults (the same rules for every section)."""
    for f in fields(obj):
        if f.name == "sections":
            continue
        value, default = getattr(obj, f.name), f.default
        if f.name in _OPTIONAL_FLOATS:
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise bad_value(f.name, value, "a number or null")
            if value is not None and not math.isfinite(value):
                raise bad_value(f.name, value, "a finite number or null")
        elif f.name in _OPTIONAL_STRINGS:
            if value is not None and value not in _OPTIONAL_STRINGS[f.name]:
                raise bad_value(f.name, value, f"one of {_OPTIONAL_STRINGS[f.name]} or null")
        elif f.name == "controls":
            if not isinstance(value, tuple) or not all(isinstance(v, str) for v in value):
                raise bad_value(f.name, value, "a list of control names")
        elif isinstance(default, bool):
            if not isinstance(value, bool):
                raise bad_value(f.name, value, "true or false")
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise bad_value(f.name, value, "an integer")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise bad_value(f.name, value, "a finite number")
        elif isinstance(default, str):
            if not isinstance(value, str):
                raise bad_value(f.name, value, "a string")


def _validate_section(section: ControlConfig) -> None:
    _check_field_types(section)
    section.validate()


def _default_sections() -> Mapping[str, ControlConfig]:
    return {name: cls.config_class() for name, cls in REGISTRY.items()}


def _validate_composition(cfg: LossConfig) -> None:
    """Known controls, no duplicates, no two of one exclusive group, none that needs the PPO ratio without it."""
    for key, names in (("method", (cfg.method,)), ("controls", cfg.controls)):
        for name in names:
            if name not in REGISTRY:
                raise bad_value(key, name, f"one of {tuple(REGISTRY)}")
    active = cfg.active_controls
    key_of = {name: "method" if i == 0 else "controls" for i, name in enumerate(active)}
    if len(set(active)) != len(active):
        raise bad_value("controls", list(cfg.controls), f"controls distinct from each other and from method={cfg.method!r}")
    owner: dict[str, str] = {}
    for name in active:
        for group in REGISTRY[name].exclusive:
            if group in owner:
                raise ValueError(f"loss_fn: controls {owner[group]!r} and {name!r} cannot be combined (both are "
                                 f"a {group.replace('_', ' ')}); keep one of them in loss_fn.method / loss_fn.controls")
            owner[group] = name
        if REGISTRY[name].needs_ppo_ratio and (cfg.disable_ppo_ratio or cfg.use_cispo):
            raise ValueError(f"loss_fn.{key_of[name]}: control {name!r} needs the PPO ratio: it is incompatible with "
                             f"disable_ppo_ratio={cfg.disable_ppo_ratio} / use_cispo={cfg.use_cispo}")


def _validate(cfg: LossConfig) -> None:
    _check_field_types(cfg)
    for section in cfg.sections.values():
        _validate_section(section)
    for key, allowed in (("scope", SCOPES), ("cov_form", COV_FORMS), ("controller_update", CONTROLLER_UPDATES),
                         ("reference_policy_kl_type", KL_TYPES)):
        if getattr(cfg, key) not in allowed:
            raise bad_value(key, getattr(cfg, key), f"one of {allowed}")
    _validate_composition(cfg)
    for key in ("ratio_clip_min", "ratio_clip_max", "reference_policy_kl_penalty", "positive_example_nll_weight"):
        if getattr(cfg, key) < 0:
            raise bad_value(key, getattr(cfg, key), ">= 0")
    if cfg.ratio_clip_min > 1.0:
        raise bad_value("ratio_clip_min", cfg.ratio_clip_min, "in [0, 1] (the lower clip bound is 1 - ratio_clip_min >= 0)")
    if cfg.ratio_clip_c is not None and cfg.ratio_clip_c <= 1.0:
        raise bad_value("ratio_clip_c", cfg.ratio_clip_c, "> 1 (dual clip) or null")
    for key in ("kl_input_clamp_value", "kl_output_clamp_value"):
        value = getattr(cfg, key)
        if value is not None and value <= 0:
            raise bad_value(key, value, "> 0 or null")
    if cfg.log_ratio_clamp <= 0:
        raise bad_value("log_ratio_clamp", cfg.log_ratio_clamp, "> 0")
    if cfg.seed < 0:
        raise bad_value("seed", cfg.seed, "an integer >= 0")
    # Combinations NeMo-RL rejects; same rules, named keys.
    if cfg.sequence_level_importance_ratios and cfg.token_level_loss:
        raise ValueError("loss_fn.sequence_level_importance_ratios=True needs loss_fn.token_level_loss=False")
    if cfg.use_cispo:
        for key, bad_setting in (("disable_ppo_ratio", True), ("force_on_policy_ratio", True),
                                 ("sequence_level_importance_ratios", True), ("token_level_loss", False)):
            if getattr(cfg, key) == bad_setting:
                raise ValueError(f"loss_fn.use_cispo=True is incompatible with loss_fn.{key}={bad_setting}")
        if cfg.ratio_clip_c is not None:
            raise ValueError("loss_fn.use_cispo=True is incompatible with dual clip: set loss_fn.ratio_clip_c=null")
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
            raise bad_value("truncated_importance_sampling_ratio", ratio, "> 0 when truncated_importance_sampling_type is set")
        ratio_min = cfg.truncated_importance_sampling_ratio_min
        if ratio_min is not None and ratio_min > ratio:
            raise bad_value("truncated_importance_sampling_ratio_min", ratio_min,
                            f"<= truncated_importance_sampling_ratio ({ratio})")
        if cfg.truncated_importance_sampling_type in ("icepop", "seq-mask-tis") and ratio_min is None:
            raise bad_value("truncated_importance_sampling_ratio_min", None,
                            f"a number when truncated_importance_sampling_type={cfg.truncated_importance_sampling_type!r}")


_CORE_KEYS = frozenset(f.name for f in fields(LossConfig)) - {"sections"}


def _section_keys() -> dict[str, str]:
    """Every control key -> the control whose section holds it (checked unique across controls)."""
    owners: dict[str, str] = {}
    for name, cls in REGISTRY.items():
        for f in fields(cls.config_class):
            if f.name in owners or f.name in _CORE_KEYS:
                raise RuntimeError(f"control {name!r} declares key {f.name!r}, already a key of "
                                   f"{owners.get(f.name, 'LossConfig')!r}")
            owners[f.name] = name
    return owners


def _as_float(f, value):
    # YAML writes 1 for 1.0: accept ints where floats are expected.
    if isinstance(f.default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


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
        mapping = to_plain(mapping)
        if not isinstance(mapping, Mapping):
            raise TypeError(f"loss_config expects a mapping (dict or OmegaConf node), got {type(mapping).__name__}")
        values = dict(mapping)
    values.update(overrides)
    owners = _section_keys()
    unknown = sorted(k for k in values if k not in _CORE_KEYS and k not in owners)
    if unknown:
        key = unknown[0]
        hint = " (the paper repo's k_percent is kl_cov_ratio here, as a FRACTION)" if "percent" in key else ""
        raise ValueError(f"loss_fn.{key}={values[key]!r} is not a known key{hint}; known keys: "
                         f"{', '.join(sorted(_CORE_KEYS | set(owners)))}")
    controls = to_plain(values.get("controls", ()))
    if isinstance(controls, str):
        controls = [controls]
    if controls is None:
        controls = ()
    if isinstance(controls, (list, tuple)):
        values["controls"] = tuple(controls)
    core_fields = {f.name: f for f in fields(LossConfig)}
    core = {k: _as_float(core_fields[k], v) for k, v in values.items() if k in _CORE_KEYS}
    sections = {}
    for name, cls in REGISTRY.items():
        section_fields = {f.name: f for f in fields(cls.config_class)}
        keys = {k: _as_float(section_fields[k], v) for k, v in values.items() if owners.get(k) == name}
        section = cls.config_class(**keys)
        _validate_section(section)
        sections[name] = section
    return LossConfig(**core, sections=sections)
