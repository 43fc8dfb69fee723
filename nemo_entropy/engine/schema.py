"""What a user types, checked before anything runs: config files that do not parse, and override keys that the
chosen backend does not read.

Hydra refuses ``grpo.max_num_stpes=6`` (the key is not in the config), but ``+key=v`` / ``++key=v`` add any key,
and a run would ignore a mistyped one (``++grpo.max_num_stpes=6`` trains the default 300 steps). So a key added
by an override must be one the local engine reads (:data:`LOCAL_KEYS`, the ``engine`` and ``loss_fn`` sections,
whose own validators refuse unknown keys) or already be in the config; otherwise the run is refused with the
nearest known keys ("did you mean"). A YAML error becomes one line ``file:line:column: problem``.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import yaml

# Keys the local engine reads outside its own ``engine`` section and ``loss_fn`` (nemo_entropy.engine.settings).
LOCAL_KEYS = frozenset({
    "backend",
    "grpo.seed", "grpo.max_num_steps", "grpo.num_prompts_per_step", "grpo.num_generations_per_prompt",
    "grpo.val_period", "grpo.val_at_start", "grpo.val_at_end", "grpo.normalize_rewards",
    "grpo.use_leave_one_out_baseline", "grpo.use_dynamic_sampling", "grpo.dynamic_sampling_max_gen_batches",
    "grpo.batch_multiplier",
    "policy.train_global_batch_size", "policy.train_micro_batch_size", "policy.generation_batch_size",
    "policy.max_total_sequence_length", "policy.max_grad_norm", "policy.optimizer.name",
    "policy.optimizer.kwargs.lr", "policy.optimizer.kwargs.betas", "policy.optimizer.kwargs.weight_decay",
    "policy.optimizer.kwargs.eps", "policy.optimizer.kwargs.momentum", "policy.generation.temperature", "policy.generation.top_p",
    "policy.generation.top_k",
    "logger.log_dir", "logger.tensorboard_enabled",
    "checkpointing.enabled", "checkpointing.checkpoint_dir", "checkpointing.save_period", "checkpointing.keep_top_k",
})
# Sections whose keys are checked by their own validators (unknown keys refused there, with the allowed list).
VALIDATED_SECTIONS = ("engine", "loss_fn")


class ConfigFileError(ValueError):
    """A config file does not parse (or is empty): one line naming the file, line and column."""


def config_file_error(err: BaseException) -> Optional[ConfigFileError]:
    """One line ``file:line:column: problem`` for a YAML error anywhere in ``err``'s cause chain, else None."""
    seen = err
    while seen is not None:
        if isinstance(seen, yaml.MarkedYAMLError):
            mark = seen.problem_mark or seen.context_mark
            problem = ": ".join(str(p) for p in (seen.context, seen.problem) if p)
            where = f"{mark.name}:{mark.line + 1}:{mark.column + 1}" if mark is not None else "config file"
            return ConfigFileError(f"{where}: YAML error: {problem}")
        if isinstance(seen, yaml.YAMLError):
            return ConfigFileError(f"config file: YAML error: {seen}")
        seen = seen.__cause__ or seen.__context__
    return None


def check_config_file(directory: Path, config_name: str) -> None:
    """Refuse an empty (or comments-only) primary config file, which would otherwise read as ``backend=None``."""
    path = Path(directory) / f"{config_name}.yaml"
    try:
        content = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise config_file_error(err) from err
    if content is None:
        raise ConfigFileError(f"{path}:1:1: the config file is empty: a run config names its `defaults` (e.g. "
                              f"`- local_base`) or its sections (backend, grpo, loss_fn, policy, ...)")
    if not isinstance(content, dict):
        raise ConfigFileError(f"{path}:1:1: the config file holds a {type(content).__name__}, not a mapping of "
                              f"sections")


def _keys(node: Any, prefix: str = "") -> Iterable[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            yield dotted
            yield from _keys(value, dotted + ".")


def _has_key(plain: dict, dotted: str) -> bool:
    node: Any = plain
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def added_keys(overrides: Sequence[str], config_dir: Path) -> list[tuple[str, str]]:
    """``(override, dotted key)`` of every ``+key=v`` / ``++key=v`` override that sets a key, not a config group."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for text, override in zip(overrides, OverridesParser.create().parse_overrides(list(overrides))):
        if not (override.is_add() or override.is_force_add()) or override.package is not None:
            continue
        if (Path(config_dir) / override.key_or_group.replace(".", "/")).is_dir():
            continue  # a config group (+preset=local_tiny)
        out.append((text, override.key_or_group))
    return out


def check_added_keys(plain: dict, overrides: Sequence[str], config_dir: Path,
                     compose_without: Callable[[Sequence[str]], dict]) -> None:
    """Refuse a key added by ``+``/``++`` that the local engine does not read and the config did not hold.

    ``compose_without(overrides)`` composes the config with the given overrides (the others dropped); it is
    called only when a key is added, to learn which keys the config holds without the user's additions.
    """
    if plain.get("backend") != "local":
        return
    added = [(text, key) for text, key in added_keys(overrides, config_dir)
             if key.split(".")[0] not in VALIDATED_SECTIONS and key not in LOCAL_KEYS]
    if not added:
        return
    adding = {text for text, _ in added}
    base = compose_without([o for o in overrides if o not in adding])
    known = sorted(set(LOCAL_KEYS) | set(_keys(base)))
    for text, key in added:
        if _has_key(base, key):
            continue
        close = difflib.get_close_matches(key, known, n=3, cutoff=0.75)
        section = key.rsplit(".", 1)[0] + "." if "." in key else ""
        siblings = sorted(k for k in known if k.startswith(section) and "." not in k[len(section):])
        hint = f"did you mean {' or '.join(close)}?" if close else f"allowed {section or 'top-level '}keys: {siblings}"
        raise ValueError(f"{text}: {key} is not a key of this config nor one the local engine reads; {hint}")
