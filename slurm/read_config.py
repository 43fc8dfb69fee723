"""Compose a run config the way ``python -m nemo_entropy.train`` does and report what the Slurm
launcher needs to know, as shell assignments it can ``source``.

Run by ``slurm/launch.sh`` with the same Python (venv or container) that will run the trainer,
so every path is checked as the trainer will see it::

    python slurm/read_config.py --config-dir conf --config-name grpo_32b_kl_cov -- key=value ...

Prints ``NE_BACKEND``, ``NE_NUM_NODES``, ``NE_GPUS_PER_NODE``, ``NE_CHECKPOINT_DIR``,
``NE_CHECKPOINTING_ENABLED``, ``NE_LOG_DIR``, ``NE_MODEL_NAME`` and the bash array ``NE_PROBLEMS``:
one sentence per missing thing (model path, data file, HF cache, Python package), each naming the
config key and its value. Exit code 0 when the config composed (problems or not), 2 when it did
not (bad override, unknown config): Hydra's message is printed on stderr.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shlex
import sys
from typing import Any

# A Hugging Face hub id: "org/name" (the org is optional), never an existing local path.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]*/)?[A-Za-z0-9][\w.-]*$")
_TRUE = {"1", "true", "yes", "on"}


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse ``--config-dir DIR --config-name NAME [--check-paths] [--] overrides...``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config-dir", required=True, help="directory of the Hydra configs")
    parser.add_argument("--config-name", required=True, help="config to compose, without .yaml")
    parser.add_argument(
        "--check-paths",
        action="store_true",
        help="check model, data and cache paths and the Python packages the backend needs",
    )
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as given to the trainer")
    return parser.parse_args(argv)


def compose(config_dir: str, config_name: str, overrides: list[str]) -> Any:
    """Compose ``config_name`` from ``config_dir`` exactly as the trainer will: through
    ``nemo_entropy.compose.compose_config`` when the plugin is importable, else Hydra's compose API."""
    try:
        from nemo_entropy.compose import compose_config
    except ImportError:
        compose_config = None
    if compose_config is not None:
        return compose_config(config_name, overrides, config_dir)
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=os.path.abspath(config_dir), version_base=None):
        return hydra_compose(config_name=config_name, overrides=list(overrides))


def trainer_validation_problems(cfg: Any) -> list[str]:
    """The trainer's own config validation (loss keys, layout, engine section), run now so a bad
    value fails the job in seconds instead of after the Ray cluster started."""
    try:
        from nemo_entropy.train import validate_run_config
    except ImportError:
        return []  # package_problems() reports the missing plugin
    try:
        validate_run_config(cfg)
    except ValueError as err:
        return [f"invalid config: {err}"]
    return []


def select(cfg: Any, key: str, default: Any = None) -> Any:
    """The value at dotted ``key`` (interpolations resolved), or ``default`` when absent."""
    from omegaconf import OmegaConf

    return OmegaConf.select(cfg, key, default=default)


def looks_like_local_path(value: str) -> bool:
    """True for values that can only mean a filesystem path (absolute, ./, ../, ~ or existing)."""
    return value.startswith(("/", "./", "../", "~")) or os.path.exists(value)


def hub_cache_dir(hf_home: str, hub_id: str) -> str:
    """Where ``huggingface_hub`` keeps ``hub_id`` under ``HF_HOME`` (models--org--name)."""
    hub_cache = os.environ.get("HF_HUB_CACHE") or os.path.join(hf_home, "hub")
    return os.path.join(hub_cache, "models--" + hub_id.replace("/", "--"))


def model_problems(key: str, value: Any, *, needs_hf_home: bool) -> list[str]:
    """Problems with a model reference ``value`` found at config ``key``: a local path or hub id."""
    if value is None or value == "":
        return []
    value = str(value)
    if looks_like_local_path(value):
        path = os.path.expanduser(value)
        if not os.path.exists(path):
            return [f"{key}={value}: model path does not exist (as seen by {sys.executable})"]
        return []
    if not _HUB_ID.match(value):
        return [f"{key}={value}: neither an existing path nor a Hugging Face hub id (org/name)"]
    hf_home = os.environ.get("HF_HOME", "")
    problems = []
    if needs_hf_home and not hf_home:
        problems.append(
            f"{key}={value} is a hub id but HF_HOME is not set: point it at a cache directory "
            "that every node sees (the model is downloaded there once)"
        )
    elif hf_home and not os.path.isdir(hf_home):
        problems.append(f"HF_HOME={hf_home} does not exist (needed for {key}={value})")
    offline = any(
        os.environ.get(flag, "").lower() in _TRUE for flag in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )
    if offline and hf_home and os.path.isdir(hf_home) and not os.path.isdir(hub_cache_dir(hf_home, value)):
        problems.append(
            f"{key}={value}: offline mode (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE) but the model is not in "
            f"the cache {hub_cache_dir(hf_home, value)}"
        )
    return problems


def data_problems(cfg: Any) -> list[str]:
    """Missing data files: keys under ``data`` ending in ``data_path`` (any path) or ``_file``/``_dir``
    (absolute paths only: relative prompt files are resolved by NeMo-RL against its own tree)."""
    from omegaconf import OmegaConf

    section = select(cfg, "data")
    if section is None:
        return []
    try:
        data = OmegaConf.to_container(section, resolve=True)
    except Exception:  # an interpolation only the trainer can resolve: check the literal values
        data = OmegaConf.to_container(section, resolve=False)
    problems: list[str] = []

    def walk(node: Any, prefix: str) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for name, value in items:
            key = f"{prefix}.{name}"
            if isinstance(value, (dict, list)):
                walk(value, key)
                continue
            if not isinstance(value, str) or not value or "${" in value:
                continue
            name = str(name)
            is_data_path = name.endswith("data_path")
            is_abs_file = name.endswith(("_file", "_dir")) and value.startswith("/")
            if (is_data_path or is_abs_file) and not os.path.exists(os.path.expanduser(value)):
                problems.append(f"{key}={value}: data path does not exist")

    walk(data, "data")
    return problems


def package_problems(backend: str) -> list[str]:
    """Python packages the chosen backend imports that this interpreter cannot find."""
    needed = ["nemo_entropy", "torch"]
    if backend == "nemo_rl":
        needed += ["nemo_rl", "ray"]
    hints = {
        "nemo_entropy": "install the plugin (pip install -e .) or put the repository on PYTHONPATH",
        "torch": "use the project venv (make setup) or the NeMo-RL container",
        "nemo_rl": "backend=nemo_rl runs inside the NeMo-RL container: set CONTAINER",
        "ray": "backend=nemo_rl needs Ray (it ships in the NeMo-RL container): set CONTAINER",
    }
    return [
        f"{sys.executable} cannot import {name}: {hints[name]}"
        for name in needed
        if importlib.util.find_spec(name) is None
    ]


def report(cfg: Any, check_paths: bool) -> dict[str, Any]:
    """Everything the launcher reads from the composed config, plus the list of problems."""
    backend = str(select(cfg, "backend", "nemo_rl"))
    checkpoint_dir = select(cfg, "checkpointing.checkpoint_dir")
    log_dir = select(cfg, "logger.log_dir")
    model_name = select(cfg, "policy.model_name")
    facts: dict[str, Any] = {
        "NE_BACKEND": backend,
        "NE_NUM_NODES": select(cfg, "cluster.num_nodes", ""),
        "NE_GPUS_PER_NODE": select(cfg, "cluster.gpus_per_node", ""),
        "NE_CHECKPOINTING_ENABLED": int(bool(select(cfg, "checkpointing.enabled", False))),
        "NE_CHECKPOINT_DIR": os.path.abspath(checkpoint_dir) if checkpoint_dir else "",
        "NE_LOG_DIR": os.path.abspath(log_dir) if log_dir else "",
        "NE_MODEL_NAME": model_name if model_name is not None else "",
    }
    problems: list[str] = []
    if backend not in ("local", "nemo_rl"):
        problems.append(f"backend={backend}: must be local or nemo_rl")
    if check_paths:
        problems += package_problems(backend)
        problems += trainer_validation_problems(cfg)
        if backend == "nemo_rl":
            problems += model_problems("policy.model_name", model_name, needs_hf_home=True)
            tokenizer = select(cfg, "policy.tokenizer.name")
            if tokenizer != model_name:
                problems += model_problems("policy.tokenizer.name", tokenizer, needs_hf_home=True)
            problems += data_problems(cfg)
        else:
            # The embedded engine builds its tiny model from dims unless the config names weights.
            for key in ("engine.model_path", "engine.model_name", "engine.init_from"):
                problems += model_problems(key, select(cfg, key), needs_hf_home=False)
    facts["NE_PROBLEMS"] = problems
    return facts


def to_shell(facts: dict[str, Any]) -> str:
    """Render ``facts`` as bash assignments (lists become arrays), every value shell-quoted."""
    lines = []
    for name, value in facts.items():
        if isinstance(value, list):
            lines.append(f"{name}=(" + " ".join(shlex.quote(str(v)) for v in value) + ")")
        else:
            lines.append(f"{name}={shlex.quote(str(value))}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Compose, check, print shell assignments; 2 when the config does not compose."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = compose(args.config_dir, args.config_name, args.overrides)
    except Exception as exc:  # Hydra raises several types; the launcher only needs the message
        print(f"config {args.config_name} (in {args.config_dir}) does not compose: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(to_shell(report(cfg, args.check_paths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
