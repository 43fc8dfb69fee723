"""``nemo-entropy check-nemo-rl``: does the installed NeMo-RL fit this plugin? Answered in seconds, before any GPU.

The run entry relies on a handful of NeMo-RL interfaces (docs/nemo_rl.md lists them). On a cluster a mismatch
would surface only after the allocation, the Ray start-up and the model loading; this check imports NeMo-RL,
inspects each interface, runs ``method: ppo`` of our loss against NeMo-RL's own ``ClippedPGLossFn`` on a tiny CPU
batch, and exits non-zero naming the first incompatibility. The Slurm launcher runs it inside the container on
the head node before Ray starts.

Each check is a function returning a one-line description of what it found, or raising
:class:`Incompatible` with what is wrong.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import importlib
import inspect
import subprocess
import sys
import time
import typing
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from ..train import NemoRLUnavailable, load_run_config, prepare_nemo_rl_run
from . import batch_keys
from .nemo_rl import EntropyControlLossFn
from .nemo_rl_run import REQUIRED_ENTRY_PARAMETERS, TRAINING_ENTRIES, install

__all__ = ["Incompatible", "CHECKS", "run_checks", "main"]


class Incompatible(Exception):
    """The installed NeMo-RL lacks an interface the plugin relies on."""


def _import(name: str) -> Any:
    try:
        return importlib.import_module(name)
    except Exception as err:  # an import error deep inside NeMo-RL is an incompatibility too
        raise Incompatible(f"cannot import {name}: {type(err).__name__}: {err}") from err


def _parameters(func: Callable, name: str, required: Sequence[str]) -> list[str]:
    params = list(inspect.signature(func).parameters)
    missing = [p for p in required if p not in params]
    if missing:
        raise Incompatible(f"{name}{inspect.signature(func)} has no parameter(s) {missing}")
    return params


def _field_names(cls: Any) -> tuple[str, set[str]]:
    """``(form, field names)`` of a dataclass, a pydantic model or a TypedDict."""
    if dataclasses.is_dataclass(cls):
        return "dataclass", {f.name for f in dataclasses.fields(cls)}
    if hasattr(cls, "model_fields"):
        return "pydantic model", set(cls.model_fields)
    if typing.is_typeddict(cls):
        return "TypedDict", set(typing.get_type_hints(cls))
    raise Incompatible(f"{getattr(cls, '__name__', cls)} is neither a dataclass, a pydantic model nor a TypedDict")


# ----------------------------------------------------------------------------------------------- the checks
def check_version(ctx: dict) -> str:
    nemo_rl = _import("nemo_rl")
    root = Path(nemo_rl.__file__).resolve().parent.parent
    ctx["root"] = root
    version = getattr(nemo_rl, "__version__", "unknown")
    commit = "not a git checkout"
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=10", "HEAD"], capture_output=True,
                             text=True, timeout=5)
        if out.returncode == 0:
            commit = out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return f"NeMo-RL {version} ({commit}) at {root}"


def check_grpo_module(ctx: dict) -> str:
    grpo = _import("nemo_rl.algorithms.grpo")
    missing = [a for a in ("setup", "grpo_train", "ClippedPGLossFn", "MasterConfig", "GRPOSaveState")
               if not hasattr(grpo, a)]
    if missing:
        raise Incompatible(f"nemo_rl.algorithms.grpo has no {missing} (the entry replaces ClippedPGLossFn there "
                           "and wraps the training entries)")
    ctx["grpo"] = grpo
    return "setup, grpo_train, ClippedPGLossFn, MasterConfig, GRPOSaveState present"


def check_training_entries(ctx: dict) -> str:
    grpo, found = ctx["grpo"], []
    for name in TRAINING_ENTRIES:
        entry = getattr(grpo, name, None)
        if entry is None:
            if name == "grpo_train":
                raise Incompatible("nemo_rl.algorithms.grpo.grpo_train is missing")
            continue
        _parameters(entry, f"nemo_rl.algorithms.grpo.{name}", REQUIRED_ENTRY_PARAMETERS)
        found.append(name)
    return f"{', '.join(found)} take {', '.join(REQUIRED_ENTRY_PARAMETERS)}"


def check_save_state(ctx: dict) -> str:
    form, names = _field_names(ctx["grpo"].GRPOSaveState)
    needed = sorted(set(TRAINING_ENTRIES.values()))
    missing = [n for n in needed if n not in names]
    if missing:
        raise Incompatible(f"GRPOSaveState ({form}) has no field(s) {missing}: the optimizer-step counter of a "
                           "resumed run is read from them")
    return f"GRPOSaveState is a {form} with {', '.join(needed)}"


def check_master_config(ctx: dict) -> str:
    form, names = _field_names(ctx["grpo"].MasterConfig)
    missing = [n for n in ("policy", "loss_fn", "grpo") if n not in names]
    if missing:
        raise Incompatible(f"MasterConfig ({form}) has no section(s) {missing}")
    access = "attribute" if form == "pydantic model" else "key"
    return f"MasterConfig is a {form} (read by {access})"


def check_loss_interfaces(ctx: dict) -> str:
    interfaces = _import("nemo_rl.algorithms.loss.interfaces")
    wanted = {"LossType": ("TOKEN_LEVEL", "SEQUENCE_LEVEL"), "LossInputType": ("LOGIT", "LOGPROB")}
    for enum_name, members in wanted.items():
        enum_cls = getattr(interfaces, enum_name, None)
        if enum_cls is None or any(not hasattr(enum_cls, m) for m in members):
            raise Incompatible(f"nemo_rl.algorithms.loss.interfaces.{enum_name} lacks {members} (NeMo-RL >= v0.6)")
    normalizer = getattr(interfaces, "MetricNormalizer", None)
    if normalizer is not None and any(not hasattr(normalizer, m) for m in ("TOKENS", "SEQUENCES", "NONE")):
        raise Incompatible("nemo_rl.algorithms.loss.interfaces.MetricNormalizer lacks TOKENS / SEQUENCES / NONE")
    ctx["interfaces"] = interfaces
    return ("LossType, LossInputType" + (", MetricNormalizer" if normalizer is not None else
                                         " (no MetricNormalizer: older than v0.7, metric_normalizations unused)"))


def check_loss_call_sites(ctx: dict) -> str:
    utils = _import("nemo_rl.algorithms.loss.utils")
    model_utils = _import("nemo_rl.distributed.model_utils")
    _parameters(utils.prepare_loss_input, "nemo_rl.algorithms.loss.utils.prepare_loss_input",
                ("logits", "data", "loss_fn"))
    _parameters(model_utils.get_next_token_logprobs_from_logits,
                "nemo_rl.distributed.model_utils.get_next_token_logprobs_from_logits",
                ("input_ids", "next_token_logits", "seq_index", "vocab_parallel_rank", "vocab_parallel_group",
                 "context_parallel_group"))
    return "prepare_loss_input(logits, data, loss_fn), get_next_token_logprobs_from_logits(... groups)"


def check_batched_data_dict(ctx: dict) -> str:
    module = _import("nemo_rl.distributed.batched_data_dict")
    data = module.BatchedDataDict({
        "input_ids": torch.zeros(4, 3, dtype=torch.long), "sample_mask": torch.ones(4),
        batch_keys.TOKEN_UIDS: torch.arange(12, dtype=torch.int64).reshape(4, 3),
    })
    try:
        shards = data.shard_by_batch_size(2, batch_size=4)
    except Exception as err:
        raise Incompatible(f"BatchedDataDict.shard_by_batch_size(2, batch_size=4) failed: {err}") from err
    rows = torch.cat([s[batch_keys.TOKEN_UIDS] for s in shards]) if all(batch_keys.TOKEN_UIDS in s for s in shards) \
        else None
    if rows is None or sorted(rows[:, 0].tolist()) != [0, 3, 6, 9]:
        raise Incompatible("BatchedDataDict.shard_by_batch_size drops or mixes an extra per-sample key: the "
                           "selection attached on the driver would not reach its tokens")
    return "extra per-sample keys ride through shard_by_batch_size"


def check_run_script(ctx: dict) -> str:
    script = Path(ctx["root"]) / "examples" / "run_grpo.py"
    if not script.is_file():
        raise Incompatible(f"{script} does not exist (the run entry runs NeMo-RL's own example)")
    text = script.read_text()
    for needle in ("--config", "setup(", "grpo_train"):
        if needle not in text:
            raise Incompatible(f"{script} no longer contains {needle!r}: the run entry's way of driving it is stale")
    return f"{script.relative_to(ctx['root'])} takes --config and calls setup() / grpo_train"


def _tiny_batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    batch, length, vocab = 6, 10, 11
    logits = torch.randn(batch, length, vocab, generator=gen)
    ids = torch.randint(0, vocab, (batch, length), generator=gen)
    lp = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    pad = lambda t: torch.cat([torch.zeros(batch, 1), t], 1)  # noqa: E731
    token_mask = (torch.arange(length)[None] < torch.randint(3, length + 1, (batch,), generator=gen)[:, None]).float()
    token_mask[:, 0] = 0
    sample_mask = torch.ones(batch)
    sample_mask[1] = 0
    data = {
        "input_ids": ids, "token_mask": token_mask, "sample_mask": sample_mask,
        "advantages": torch.randn(batch, 1, generator=gen).expand(batch, length).clone(),
        "prev_logprobs": pad(lp + 0.2 * torch.randn(batch, length - 1, generator=gen)),
        "generation_logprobs": pad(lp + 0.2 * torch.randn(batch, length - 1, generator=gen)),
        "reference_policy_logprobs": pad(lp + 0.3 * torch.randn(batch, length - 1, generator=gen)),
    }
    return lp, data


def check_loss_parity(ctx: dict) -> str:
    """``method: ppo`` of our adapter against NeMo-RL's ``ClippedPGLossFn`` on a tiny CPU batch."""
    grpo = ctx["grpo"]
    loss_module = _import("nemo_rl.algorithms.loss.loss_functions")
    config_cls = getattr(loss_module, "ClippedPGLossConfig", None)
    cfg = {"ratio_clip_min": 0.2, "ratio_clip_max": 0.28, "ratio_clip_c": 3.0, "reference_policy_kl_penalty": 0.01,
           "reference_policy_kl_type": "k3", "kl_input_clamp_value": 20.0, "kl_output_clamp_value": 10.0,
           "disable_ppo_ratio": False, "token_level_loss": True, "use_on_policy_kl_approximation": False,
           "use_importance_sampling_correction": False, "truncated_importance_sampling_ratio": None}
    theirs_cfg = config_cls(**cfg) if hasattr(config_cls, "model_fields") else cfg
    lp, data = _tiny_batch()
    batched = _import("nemo_rl.distributed.batched_data_dict").BatchedDataDict(data)
    mask = data["token_mask"][:, 1:] * data["sample_mask"][:, None]
    counts = dict(global_valid_seqs=data["sample_mask"].sum(), global_valid_toks=mask.sum())
    results = []
    for fn in (grpo.ClippedPGLossFn(theirs_cfg), EntropyControlLossFn({**cfg, "method": "ppo"})):
        logprobs = lp.clone().requires_grad_(True)
        try:
            loss, metrics = fn(data=batched, next_token_logprobs=logprobs, **counts)
        except Exception as err:
            raise Incompatible(f"{type(fn).__name__}(data=, global_valid_seqs=, global_valid_toks=, "
                               f"next_token_logprobs=) failed: {type(err).__name__}: {err}") from err
        (grad,) = torch.autograd.grad(loss, logprobs)
        results.append((float(loss.detach()), grad, metrics))
    (theirs, grad_theirs, m_theirs), (ours, grad_ours, m_ours) = results
    if abs(theirs - ours) > 1e-5 * max(1.0, abs(theirs)) or not torch.allclose(grad_theirs, grad_ours, atol=1e-6):
        raise Incompatible(f"method=ppo loss {ours:.7g} != ClippedPGLossFn's {theirs:.7g} (or gradients differ): "
                           "NeMo-RL's loss changed meaning")
    missing = sorted(k for k in m_theirs if k not in m_ours)
    return f"ppo loss {ours:.6f} == ClippedPGLossFn {theirs:.6f}, gradients equal" + (
        f" (metrics only NeMo-RL reports: {missing})" if missing else "")


def check_install(ctx: dict) -> str:
    grpo = ctx["grpo"]
    saved = {name: getattr(grpo, name) for name in ("ClippedPGLossFn", "grpo_train", "async_grpo_train")
             if hasattr(grpo, name)}
    try:
        wrapped = install(grpo)
        built = grpo.ClippedPGLossFn({"method": "ppo"}, use_fused_linear_logprobs=False)
        if type(built).__name__ != "EntropyControlLossFn":
            raise Incompatible("after install, grpo.ClippedPGLossFn does not build EntropyControlLossFn")
    finally:
        for name, value in saved.items():
            setattr(grpo, name, value)
    return f"install() puts EntropyControlLossFn into setup() and wraps {', '.join(wrapped)}"


CHECKS: list[tuple[str, Callable[[dict], str]]] = [
    ("version", check_version),
    ("grpo module", check_grpo_module),
    ("training entries", check_training_entries),
    ("save state", check_save_state),
    ("master config", check_master_config),
    ("loss interfaces", check_loss_interfaces),
    ("loss call sites", check_loss_call_sites),
    ("batched data", check_batched_data_dict),
    ("run script", check_run_script),
    ("loss parity", check_loss_parity),
    ("install", check_install),
]


def _check_dataset_names(config_name: str, merged: dict) -> None:
    """``data.<split>.dataset_name`` must be a dataset NeMo-RL knows (its ``DATASET_REGISTRY``) or a dotted class
    path: NeMo-RL's ``setup_response_data`` would otherwise stop only after Ray has started."""
    registry = getattr(_import("nemo_rl.data.datasets.response_datasets"), "DATASET_REGISTRY", None)
    if registry is None:
        return  # an older NeMo-RL without the registry: nothing to check against
    for split in ("train", "validation"):
        section = (merged.get("data") or {}).get(split)
        dataset = section.get("dataset_name") if isinstance(section, dict) else None
        if dataset is not None and dataset not in registry and "." not in str(dataset):
            close = difflib.get_close_matches(str(dataset), list(registry), n=3)
            raise Incompatible(f"config {config_name!r}: data.{split}.dataset_name={dataset!r} is not in NeMo-RL's "
                               f"DATASET_REGISTRY" + (f" (close: {close})" if close else ""))


def check_run_config(ctx: dict) -> str:
    """The user's run config, composed, merged onto NeMo-RL's base config and resolved by the very function the run
    entry uses (:func:`nemo_entropy.train.prepare_nemo_rl_run`), then validated as NeMo-RL's ``MasterConfig``."""
    name = ctx["config_name"]
    try:
        _, plain, loss, layout = load_run_config(name, ctx["overrides"], ctx.get("config_dir"))
        if plain["backend"] != "nemo_rl":
            raise Incompatible(f"config {name!r} has backend={plain['backend']!r}: only backend=nemo_rl runs NeMo-RL")
        run = prepare_nemo_rl_run(plain, name)
    except (ValueError, NemoRLUnavailable) as err:
        raise Incompatible(f"config {name!r}: {err}") from err
    _check_dataset_names(name, run.plain)
    return (f"{name} merged onto {run.options['base_config']}, resolved, MasterConfig valid: {layout.describe()}, "
            f"loss {loss.method}")


def run_checks(report: Callable[[str], None] = print, *, config_name: Optional[str] = None,
               overrides: Sequence[str] = (), config_dir: Optional[str] = None) -> Optional[tuple[str, str]]:
    """Run every check in order, reporting each; returns ``(check, problem)`` of the first failure, or None.

    With ``config_name`` the last check composes that run config with ``overrides`` exactly as the run entry will
    (``check_run_config``)."""
    ctx: dict = {"config_name": config_name, "overrides": list(overrides), "config_dir": config_dir}
    checks = CHECKS + ([("run config", check_run_config)] if config_name else [])
    for name, check in checks:
        try:
            report(f"ok    {name:<17} {check(ctx)}")
        except Incompatible as err:
            report(f"FAIL  {name:<17} {err}")
            return name, str(err)
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="nemo-entropy check-nemo-rl",
        description="Check that the installed NeMo-RL has every interface nemo-entropy's run entry and loss adapter "
                    "rely on; exits 1 naming the first incompatibility. Put the NeMo-RL checkout on PYTHONPATH.",
    )
    parser.add_argument("--config-name", default=None,
                        help="also compose this run config (conf/NAME.yaml) with the overrides, merge it onto NeMo-RL's "
                             "base config and resolve and validate it exactly as `python -m nemo_entropy.train` will")
    parser.add_argument("--config-dir", default=None, help="config folder (default: the repository's conf/)")
    args, overrides = parser.parse_known_args(list(sys.argv[1:] if argv is None else argv))
    flags = [o for o in overrides if o.startswith("-")]
    if flags or (overrides and args.config_name is None):
        parser.error(f"unrecognized arguments: {' '.join(flags or overrides)} (Hydra overrides need --config-name)")
    started = time.perf_counter()
    failure = run_checks(config_name=args.config_name, overrides=overrides, config_dir=args.config_dir)
    seconds = time.perf_counter() - started
    if failure is not None:
        print(f"check-nemo-rl: INCOMPATIBLE ({failure[0]}): {failure[1]}  [{seconds:.1f} s]", file=sys.stderr)
        return 1
    count = len(CHECKS) + (args.config_name is not None)
    print(f"check-nemo-rl: compatible, {count} checks passed in {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
