"""How the plugin is put into NeMo-RL's own GRPO entry: one function, :func:`install`, used by the run entry
(``python -m nemo_entropy.train``), by the real-NeMo-RL harness and by users' own scripts.

NeMo-RL has no loss registry: ``grpo.setup()`` builds ``ClippedPGLossFn(master_config.loss_fn, ...)`` from its
module globals, and ``examples/run_grpo.py`` dispatches to a training entry (``grpo_train``, or
``async_grpo_train`` with ``grpo.async_grpo.enabled``, or ``grpo_sync.grpo_train_sync`` with
``data_plane.enabled``). :func:`install` therefore

1. puts :class:`~nemo_entropy.integrations.nemo_rl.EntropyControlLossFn` where ``setup()`` looks for
   ``ClippedPGLossFn``;
2. wraps every training entry that calls ``policy.train(train_data, loss_fn)`` on the driver so that the policy it
   receives is a :class:`~nemo_entropy.integrations.step_plan.StepPlanPolicy` whose optimizer-step
   counter continues from the save state (``total_steps`` for ``grpo_train``; ``current_step`` for
   ``async_grpo_train``, which never advances ``total_steps``), and whose controls' state is saved into every
   NeMo-RL checkpoint and restored from the one NeMo-RL resumes from;
3. checks, before any GPU work, the configurations the plugin cannot serve and refuses them by name
   (:func:`check_nemo_rl_run_config`): the data plane (``grpo_train_sync`` never shows the driver the batch),
   in-worker planning with packing or dynamic batching, LOGIT input with fused linear log-probs or top-k/top-p,
   controls that read an entropy or logits without them (LOGPROB input, context parallelism > 1).

NeMo-RL's interfaces come in two generations, both handled here: ``MasterConfig`` a ``TypedDict`` (<= v0.6, read
by key) or a pydantic model (v0.7, main; read by attribute), ``GRPOSaveState`` a ``TypedDict`` (<= v0.7) or a
dataclass (main). Nothing here imports NeMo-RL: the module objects are passed in.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
import re
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

from ..config import LossConfig, to_plain
from ..controls import ControlSet
from .megatron import parallel_layout
from .nemo_rl import EntropyControlLossFn, loss_config_from_nemo_rl
from .nemo_rl_options import NemoRLOptions
from .step_plan import StepPlanPolicy

__all__ = [
    "NemoRLOptions",
    "TRAINING_ENTRIES",
    "install",
    "nemo_rl_options",
    "config_section",
    "save_state_counter",
    "steps_per_rollout",
    "check_nemo_rl_run_config",
    "wrap_policy_for_step",
    "OUR_SECTIONS",
    "NemoRLRunConfig",
    "merge_onto_nemo_rl",
]

TRAINING_ENTRIES: dict[str, str] = {
    "grpo_train": "total_steps",
    "async_grpo_train": "current_step",
}
"""NeMo-RL training entries that call ``policy.train`` on the driver -> the save-state field that counts their
GRPO steps through a whole run (``current_step`` of ``grpo_train`` restarts at every epoch)."""

REQUIRED_ENTRY_PARAMETERS = ("policy", "loss_fn", "grpo_save_state", "master_config")

_WRAPPED = "__nemo_entropy_wrapped__"

OUR_SECTIONS = ("backend", "engine", "nemo_rl")
"""Sections of our run config that NeMo-RL never sees (everything else is merged onto its base config)."""


# ----------------------------------------------------------------------------------------------- config access
def config_section(master_config: Any, name: str, default: Any = None) -> Any:
    """Section ``name`` of NeMo-RL's master config as a plain dict: by key (``TypedDict``/dict, <= v0.6) or by
    attribute (pydantic ``MasterConfig``, v0.7 and main)."""
    if isinstance(master_config, Mapping):
        value = master_config.get(name, default)
    else:
        value = getattr(master_config, name, default)
    return default if value is None else to_plain(value)


def save_state_counter(state: Any, field: str) -> int:
    """``field`` of NeMo-RL's ``GRPOSaveState``: a dataclass (main) or a ``TypedDict`` (<= v0.7); 0 when there is
    no state (a fresh run)."""
    if state is None:
        return 0
    present = field in state if isinstance(state, Mapping) else hasattr(state, field)
    if not present:
        raise TypeError(f"NeMo-RL's grpo_save_state ({type(state).__name__}) has no field {field!r}: this NeMo-RL is "
                        "not supported (run `nemo-entropy check-nemo-rl`)")
    value = state[field] if isinstance(state, Mapping) else getattr(state, field)
    return int(value or 0)


def steps_per_rollout(grpo_cfg: Mapping[str, Any], policy_cfg: Mapping[str, Any]) -> int:
    """Optimizer steps per GRPO step: ``num_prompts_per_step x num_generations_per_prompt /
    train_global_batch_size``; raises naming the keys when it is not a whole number."""
    total = int(grpo_cfg["num_prompts_per_step"]) * int(grpo_cfg["num_generations_per_prompt"])
    gbs = int(policy_cfg["train_global_batch_size"])
    if gbs <= 0 or total % gbs:
        raise ValueError(
            f"grpo.num_prompts_per_step x grpo.num_generations_per_prompt = {total} is not a multiple of "
            f"policy.train_global_batch_size={gbs}: NeMo-RL could not split a rollout into whole optimizer steps"
        )
    return total // gbs


def nemo_rl_options(options: Optional[Mapping[str, Any]] = None) -> dict[str, Any]:
    """Our ``nemo_rl:`` section with defaults filled in, validated (:class:`NemoRLOptions`), as a plain dict."""
    return NemoRLOptions.from_section(options).as_dict()


# ----------------------------------------------------------------------------------------------- refusals
def _get(cfg: Mapping[str, Any], dotted: str, default: Any = None) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or node.get(part) is None:
            return default
        node = node[part]
    return node


def check_nemo_rl_run_config(config: Mapping[str, Any], options: Optional[Mapping[str, Any]] = None,
                             *, data_parallel_size: Optional[int] = None) -> None:
    """Refuse, naming the keys, the NeMo-RL configurations the plugin cannot serve correctly.

    ``config`` is NeMo-RL's (merged) master config as plain nested mappings; ``options`` our ``nemo_rl:`` section.
    Run by the entry on our config and on the merged one, and by the wrapped training entries on the
    ``master_config`` they receive, so a user's own script is checked too.
    """
    options = NemoRLOptions.from_section(options)
    _check_controls_inputs(config, options)
    if _get(config, "data_plane.enabled", False):
        raise ValueError(
            "data_plane.enabled=true (NeMo-RL's grpo_train_sync over TransferQueue) is not supported: that trainer "
            "calls policy.train_from_meta and the driver never holds the step's batch, so the exact per-step "
            "selection cannot be built; set data_plane.enabled=false"
        )
    if options.plan == "worker":
        if isinstance(config.get("loss_fn"), Mapping):
            controls = ControlSet(loss_config_from_nemo_rl(config["loss_fn"]))
            driver_only = [c.name for c in controls if c.stateful or "old_entropy" in c.needs]
            if driver_only:
                raise ValueError(
                    f"nemo_rl.plan='worker' is incompatible with loss_fn controls {driver_only}: their per-step "
                    "values come from state kept on the driver or from the whole step's old entropy; use "
                    "nemo_rl.plan='driver'")
        for key in ("policy.sequence_packing.enabled", "policy.dynamic_batching.enabled"):
            if _get(config, key, False):
                raise ValueError(
                    f"nemo_rl.plan='worker' is incompatible with {key}=true: NeMo-RL then calls the loss once "
                    "per packed sequence or dynamic micro-batch, and the bins differ between DP ranks, so the "
                    "selection's collectives would not pair up (a hang). Use nemo_rl.plan='driver' (exact, no "
                    f"collective in the loss) or set {key}=false"
                )
        if not _get(config, "policy.megatron_cfg.enabled", False):
            raise ValueError(
                "nemo_rl.plan='worker' needs the Megatron backend (policy.megatron_cfg.enabled=true): the loss "
                "finds its DP group in megatron-core's parallel_state, and NeMo-RL's DTensor path gives it none, so "
                "each rank would select over its own share only; use nemo_rl.plan='driver'")
        gbs, mbs = _get(config, "policy.train_global_batch_size"), _get(config, "policy.train_micro_batch_size")
        if data_parallel_size is not None and gbs is not None and mbs is not None and mbs * data_parallel_size != gbs:
            raise ValueError(
                f"nemo_rl.plan='worker' selects over each loss call across DP, which is the whole optimizer step "
                f"only when policy.train_micro_batch_size x DP == policy.train_global_batch_size ({mbs} x "
                f"{data_parallel_size} != {gbs}); use nemo_rl.plan='driver' (exact for any micro-batch size)"
            )
    if options.input_type == "logit":
        if _get(config, "policy.megatron_cfg.enabled", False) and _get(config, "policy.megatron_cfg.use_fused_linear_logprobs", False):
            raise ValueError(
                "nemo_rl.input_type='logit' is incompatible with policy.megatron_cfg.use_fused_linear_logprobs=true: "
                "the fused model returns 2-D log-probs, not logits; use nemo_rl.input_type='logprob'"
            )
        top_k, top_p = _get(config, "policy.generation.top_k"), _get(config, "policy.generation.top_p", 1.0)
        if top_k is not None or (top_p is not None and float(top_p) < 1.0):
            raise ValueError(
                f"nemo_rl.input_type='logit' is incompatible with policy.generation.top_k={top_k!r} / "
                f"policy.generation.top_p={top_p!r}: NeMo-RL filters top-k/top-p only on the LOGPROB path, so the "
                "ratio would mix filtered old log-probs with unfiltered current ones; use nemo_rl.input_type='logprob'"
            )


def _check_controls_inputs(config: Mapping[str, Any], options: NemoRLOptions) -> None:
    """Controls that read the current logits (an entropy with its gradient, AEnt's clamped entropy) need NeMo-RL's
    LOGIT input; controls that read any entropy need whole sequences on each rank. Refused naming the keys."""
    if not isinstance(config.get("loss_fn"), Mapping):
        return
    loss = loss_config_from_nemo_rl(config["loss_fn"])
    controls = list(ControlSet(loss))
    current = [c.name for c in controls if c.needs & {"entropy", "logits"}]
    if current and options.input_type != "logit":
        raise ValueError(
            f"loss_fn.method={loss.method!r} / loss_fn.controls={list(loss.controls)}: controls {current} need the "
            "current full-vocabulary entropy (with its gradient) or values computed from the logits, but "
            f"nemo_rl.input_type={options.input_type!r} hands the loss log-probs only: set nemo_rl.input_type=logit")
    any_entropy = [c.name for c in controls if c.needs & {"entropy", "old_entropy", "logits"}]
    if any_entropy and _get(config, "policy.dtensor_cfg.enabled", False) and _get(
            config, "policy.sequence_packing.enabled", False):
        # NeMo-RL's DTensor path hands a loss packed sequences with a seq_index and only its own CP-aware log-probs
        # helper reads them (nemo_rl.logprobs_from_logits delegates): no entropy, in the loss or the old-entropy pass.
        raise ValueError(
            f"loss_fn controls {any_entropy} need the full-vocabulary entropy, which NeMo-RL's DTensor backend does not "
            "give a loss with packed sequences: policy.dtensor_cfg.enabled=true with policy.sequence_packing.enabled="
            "true is not supported with them (set policy.sequence_packing.enabled=false, or use the Megatron backend)")
    for backend in ("megatron_cfg", "dtensor_cfg"):
        cp = _get(config, f"policy.{backend}.context_parallel_size", 1)
        if any_entropy and _get(config, f"policy.{backend}.enabled", False) and int(cp) > 1:
            raise ValueError(
                f"loss_fn controls {any_entropy} need the full-vocabulary entropy, computed from whole sequences on "
                f"each rank: policy.{backend}.context_parallel_size={cp} is not supported with them (use 1)")


# ----------------------------------------------------------------------------------------------- the merged config
@dataclasses.dataclass(frozen=True)
class NemoRLRunConfig:
    """What the run entry hands NeMo-RL: its base config with ours merged on top, resolved and validated."""

    script: Path          # the checkout's examples/run_grpo.py
    plain: dict           # the merged config, resolved, as plain containers (validated as MasterConfig; what
                          # nemo_rl_config.yaml holds)
    options: dict         # our nemo_rl: section


def _nemo_rl_root(section: Mapping[str, Any], nemo_rl_module: Any) -> Path:
    root = section.get("root") or os.environ.get("NEMO_RL_ROOT")
    if not root and nemo_rl_module is not None:
        root = str(Path(nemo_rl_module.__file__).resolve().parent.parent)
    if not root:
        raise ValueError("nemo_rl.root is not set (and neither is $NEMO_RL_ROOT): point it at the NeMo-RL checkout")
    return Path(root)


def _resolver_problem(err: Exception, registered: bool) -> Optional[str]:
    match = re.search(r"Unsupported interpolation type (\w+)", str(err))
    if match is None:
        return None
    how = ("nemo_rl.utils.config.register_omegaconf_resolvers() does not register it" if registered else
           "this NeMo-RL has no nemo_rl.utils.config.register_omegaconf_resolvers (examples/run_grpo.py registers "
           "its resolvers there)")
    return f"the config uses the resolver ${{{match.group(1)}:...}} and {how}"


def merge_onto_nemo_rl(plain: Mapping[str, Any], nemo_rl_module: Any, grpo_module: Any) -> NemoRLRunConfig:
    """Our validated run config (``plain``, with a filled-in ``nemo_rl`` section) merged onto NeMo-RL's base config
    exactly as ``examples/run_grpo.py`` will read it: NeMo-RL's ``load_config`` (``defaults:`` inheritance), its
    OmegaConf resolvers registered first (its base configs use ``${mul:...}``), resolved, checked for the
    combinations the plugin refuses, and validated as NeMo-RL's ``MasterConfig``.

    The run entry and ``nemo-entropy check-nemo-rl --config-name`` both call this one function, so the preflight
    checks the very config the run will use. Errors are ``ValueError`` naming the key or the missing interface.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    section = dict(plain["nemo_rl"])
    root = _nemo_rl_root(section, nemo_rl_module)
    script, base = root / "examples" / "run_grpo.py", root / section["base_config"]
    for path, key in ((script, "nemo_rl.root"), (base, "nemo_rl.base_config")):
        if not path.is_file():
            raise ValueError(f"{key}: {path} does not exist in the NeMo-RL checkout")
    try:
        from nemo_rl.utils import config as config_utils  # type: ignore
    except ImportError as err:
        raise ValueError(f"cannot import nemo_rl.utils.config (NeMo-RL's config loader): {err}") from err
    load_config = getattr(config_utils, "load_config", None)
    if load_config is None:
        raise ValueError("this NeMo-RL has no nemo_rl.utils.config.load_config: the run entry loads the base config "
                         "with it, as examples/run_grpo.py does")
    register = getattr(config_utils, "register_omegaconf_resolvers", None)
    if register is not None:
        register()
    ours = {k: v for k, v in plain.items() if k not in OUR_SECTIONS}
    try:
        merged = OmegaConf.merge(load_config(str(base)), OmegaConf.create(ours))
        merged_plain = OmegaConf.to_container(merged, resolve=True)
    except OmegaConfBaseException as err:
        problem = _resolver_problem(err, register is not None)
        detail = problem or str(err).strip().replace("\n", "; ")
        raise ValueError(f"NeMo-RL's {section['base_config']} merged with this config does not resolve: {detail}"
                         ) from err
    # NeMo-RL's base config may turn on what ours left out (packing, the data plane, top-k): check the merge too,
    # before Ray starts and any model is loaded.
    check_nemo_rl_run_config(merged_plain, section,
                             data_parallel_size=parallel_layout({**merged_plain, "backend": "nemo_rl"}).dp)
    master_config = getattr(grpo_module, "MasterConfig", None)
    if master_config is not None and hasattr(master_config, "model_validate"):
        try:  # as examples/run_grpo.py: MasterConfig(**config) after resolving
            master_config(**merged_plain)
        except Exception as err:  # pydantic's ValidationError: name every field it rejects
            raise ValueError(f"NeMo-RL's MasterConfig rejects the merged config: {err}") from err
    return NemoRLRunConfig(script=script, plain=merged_plain, options=section)


# ----------------------------------------------------------------------------------------------- wrapping
def wrap_policy_for_step(policy: Any, loss_fn: Any, master_config: Any, grpo_save_state: Any, *,
                         counter_field: str = "total_steps", plan: str = NemoRLOptions.plan) -> Any:
    """The policy a NeMo-RL training entry should train: ``policy`` wrapped in a :class:`StepPlanPolicy`
    whose optimizer-step counter continues from ``grpo_save_state.<counter_field>``.

    ``loss_fn`` must be our :class:`EntropyControlLossFn` (its validated config drives the selection); any other
    loss gets ``policy`` back unchanged. Use this in your own script if you call NeMo-RL's training entry yourself
    without :func:`install`.
    """
    config = getattr(loss_fn, "config", None)
    if not isinstance(config, LossConfig) or isinstance(policy, StepPlanPolicy):
        return policy
    grpo_cfg = config_section(master_config, "grpo", {})
    policy_cfg = config_section(master_config, "policy", {})
    per_rollout = steps_per_rollout(grpo_cfg, policy_cfg)
    first = save_state_counter(grpo_save_state, counter_field) * per_rollout
    return StepPlanPolicy(policy, config, train_global_batch_size=int(policy_cfg["train_global_batch_size"]),
                          plan=plan, first_step=first)


class _CheckpointerSavingControls:
    """NeMo-RL's ``CheckpointManager`` that also writes the driver-side controls' state into every checkpoint it
    starts (``init_tmp_checkpoint`` returns the directory NeMo-RL then fills and renames); everything else is the
    manager's own."""

    def __init__(self, checkpointer: Any, policy: StepPlanPolicy):
        self._checkpointer = checkpointer
        self._policy = policy

    def init_tmp_checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        path = self._checkpointer.init_tmp_checkpoint(*args, **kwargs)
        self._policy.save_state(str(path))
        return path

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_checkpointer"], name)


def _checkpointer_saving(checkpointer: Any, policy: StepPlanPolicy) -> _CheckpointerSavingControls:
    """Restore the controls' state from the checkpoint NeMo-RL's ``setup()`` resumed from (its latest), and save
    it into every new one."""
    latest = getattr(checkpointer, "get_latest_checkpoint_path", lambda: None)()
    if latest:
        policy.load_state(str(latest))
    return _CheckpointerSavingControls(checkpointer, policy)


def _wrap_entry(original: Callable, name: str, counter_field: str, options: NemoRLOptions) -> Callable:
    signature = inspect.signature(original)
    missing = [p for p in REQUIRED_ENTRY_PARAMETERS if p not in signature.parameters]
    if missing:
        raise TypeError(f"NeMo-RL's {name} has no parameter(s) {missing}: this NeMo-RL is not supported "
                        "(run `nemo-entropy check-nemo-rl`)")

    @functools.wraps(original)
    def entry(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind(*args, **kwargs)
        master_config = bound.arguments["master_config"]
        check_nemo_rl_run_config(
            {key: config_section(master_config, key) for key in ("policy", "data_plane", "grpo", "loss_fn")}, options)
        policy = wrap_policy_for_step(
            bound.arguments["policy"], bound.arguments["loss_fn"], master_config,
            bound.arguments.get("grpo_save_state"), counter_field=counter_field, plan=options.plan)
        bound.arguments["policy"] = policy
        checkpointer = bound.arguments.get("checkpointer")
        if isinstance(policy, StepPlanPolicy) and checkpointer is not None:
            bound.arguments["checkpointer"] = _checkpointer_saving(checkpointer, policy)
        return original(*bound.args, **bound.kwargs)

    setattr(entry, _WRAPPED, True)
    return entry


def install(grpo_module: Any, options: Optional[Mapping[str, Any]] = None) -> list[str]:
    """Put the plugin into NeMo-RL's GRPO module (``nemo_rl.algorithms.grpo``); idempotent.

    After it, ``grpo_module.setup()`` builds :class:`EntropyControlLossFn` (with ``options``' ``input_type`` and
    ``log_entropy``) and every training entry of :data:`TRAINING_ENTRIES` present in the module wraps its policy
    for the exact per-step selection and checks the master config first. Call it before anything imports the
    entries by name (``examples/run_grpo.py`` does so when it runs, so install first, then run it).

    Returns the names of the entries it wrapped.
    """
    options = NemoRLOptions.from_section(options)
    if not hasattr(grpo_module, "setup") or not hasattr(grpo_module, "grpo_train"):
        raise TypeError(f"{getattr(grpo_module, '__name__', grpo_module)!r} is not NeMo-RL's GRPO module "
                        "(no setup / grpo_train)")
    grpo_module.ClippedPGLossFn = functools.partial(EntropyControlLossFn, input_type=options.input_type,
                                                    log_entropy=options.log_entropy, plan=options.plan)
    wrapped = []
    for name, counter_field in TRAINING_ENTRIES.items():
        original = getattr(grpo_module, name, None)
        if original is None:
            continue
        if not getattr(original, _WRAPPED, False):
            setattr(grpo_module, name, _wrap_entry(original, name, counter_field, options))
        wrapped.append(name)
    return wrapped
