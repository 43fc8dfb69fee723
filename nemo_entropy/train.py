"""The run entry: ``python -m nemo_entropy.train`` / ``nemo-entropy train``.

    python -m nemo_entropy.train [--config-name NAME] [--config-dir DIR] [--dry-run] [hydra overrides...]

1. Composes ``conf/NAME.yaml`` with Hydra's compose API and plain Hydra overrides
   (``loss_fn.kl_cov_ratio=0.002 cluster.num_nodes=8``; ``+new.key=v`` / ``++key=v`` add keys), on top of every
   ``loss_fn`` default from the config dataclasses (:mod:`nemo_entropy.compose`).
2. Validates it: ``loss_fn`` through :func:`nemo_entropy.config.loss_config`, the parallel layout
   (``world = TP x PP x CP x DP``, batch divisibility), the ``nemo_rl`` section, and for ``backend: local``
   the engine section (``nemo_entropy.engine.validate_engine_config``). Errors name the key and value.
3. Prints the resolved config and the layout, then runs ``backend: local`` (the embedded engine,
   ``nemo_entropy.engine.run_local``) or ``backend: nemo_rl`` (NeMo-RL's GRPO loop with our loss and the
   driver-side selection; needs the NeMo-RL container). ``--dry-run`` stops after printing, with the
   command that would run.
"""

from __future__ import annotations

import argparse
import os
import runpy
import shlex
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from .compose import compose_config, default_config_dir
from .engine import run_local, validate_engine_config
from .engine.run_folder import EngineExit
from .engine.schema import check_added_keys, check_config_file, config_file_error
from .integrations.megatron import parallel_layout
from .integrations.nemo_rl import loss_config_from_nemo_rl
from .integrations.nemo_rl_run import check_nemo_rl_run_config, install, merge_onto_nemo_rl, nemo_rl_options

__all__ = ["main", "compose_config", "load_run_config", "validate_run_config", "default_config_dir", "NemoRLUnavailable"]

DEFAULT_CONFIG_NAME = "local_kl_cov"
BACKENDS = ("local", "nemo_rl")
REQUIRED_SECTIONS = ("grpo", "loss_fn", "policy", "logger", "checkpointing", "cluster")


class NemoRLUnavailable(RuntimeError):
    """NeMo-RL cannot be imported in this environment."""


NEMO_RL_MISSING = (
    "backend=nemo_rl needs NeMo-RL, which is not importable here ({error}). NeMo-RL is not on PyPI: run inside "
    "the NeMo-RL container (or a NeMo-RL checkout's venv) with this plugin on PYTHONPATH, e.g.\n"
    "  export PYTHONPATH=/path/to/nemo-entropy:$PYTHONPATH   # forwarded by Ray to the policy workers\n"
    "  export NEMO_RL_ROOT=/opt/nemo-rl                       # the NeMo-RL checkout (examples/, configs)\n"
    "  python -m nemo_entropy.train --config-name {name} ...\n"
    "On Slurm, NeMo-RL's ray.sub runs that command on the Ray head (see docs/nemo_rl.md). To try the controls "
    "without NeMo-RL, add +preset=local_tiny (the embedded CPU engine)."
)


# ----------------------------------------------------------------------------------------------- validate
def _require_positive_int(section: dict, key: str, prefix: str) -> int:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{prefix}.{key}={value!r} is invalid: allowed an integer >= 1")
    return value


def validate_run_config(cfg: Any) -> tuple[dict, Any, Any]:
    """Check a composed run config; returns ``(resolved plain dict, LossConfig, ParallelLayout)``.

    Every error is a ``ValueError`` naming the key, its value and what is allowed.
    """
    from omegaconf import DictConfig, OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        plain = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    except OmegaConfBaseException as err:
        raise ValueError(f"config does not resolve: {err}") from err
    backend = plain.get("backend")
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is invalid: allowed one of {BACKENDS}")
    for section in REQUIRED_SECTIONS:
        if not isinstance(plain.get(section), dict):
            raise ValueError(f"config section {section!r} is missing (every run config has {REQUIRED_SECTIONS})")
    loss = loss_config_from_nemo_rl(plain["loss_fn"])
    grpo = plain["grpo"]
    for key in ("num_prompts_per_step", "num_generations_per_prompt", "max_num_steps"):
        _require_positive_int(grpo, key, "grpo")
    layout = parallel_layout(plain)
    policy = plain["policy"]
    if loss.force_on_policy_ratio:
        rollout = grpo["num_prompts_per_step"] * grpo["num_generations_per_prompt"]
        if policy.get("train_global_batch_size") != rollout:
            raise ValueError(
                f"loss_fn.force_on_policy_ratio=true needs one optimizer step per rollout: "
                f"policy.train_global_batch_size={policy.get('train_global_batch_size')} must equal "
                f"grpo.num_prompts_per_step x num_generations_per_prompt = {rollout}"
            )
    if backend == "nemo_rl":
        plain["nemo_rl"] = nemo_rl_options(plain.get("nemo_rl"))
        check_nemo_rl_run_config(plain, plain["nemo_rl"], data_parallel_size=layout.dp)
    else:
        validate_engine_config(cfg)
    return plain, loss, layout


def load_run_config(config_name: str, overrides: Sequence[str] = (), config_dir: Optional[os.PathLike] = None):
    """Everything ``nemo-entropy train`` does with a config before it runs: compose it, refuse an empty config
    file and keys added by ``+``/``++`` that nothing reads, validate it. Returns ``(cfg, plain, loss, layout)``
    (see :func:`validate_run_config`). ``nemo-entropy check-nemo-rl --config-name`` calls this too.

    Raises ``ValueError`` with one line naming the key, or ``file:line:column`` of a YAML error.
    """
    from omegaconf import OmegaConf

    def plain_config(some_overrides):
        return OmegaConf.to_container(compose_config(config_name, some_overrides, config_dir), resolve=True)

    try:
        directory = Path(config_dir) if config_dir else default_config_dir()
        cfg = compose_config(config_name, overrides, config_dir)
        check_config_file(directory, config_name)
        plain, loss, layout = validate_run_config(cfg)
        check_added_keys(plain, overrides, directory, plain_config)
    except Exception as err:  # a YAML error (raised as is, or inside Hydra's): one line, file:line:column
        problem = config_file_error(err)
        if problem is None:
            raise
        raise problem from err
    return cfg, plain, loss, layout


# ----------------------------------------------------------------------------------------------- NeMo-RL
def _import_nemo_rl(config_name: str):
    try:
        import nemo_rl  # type: ignore
        from nemo_rl.algorithms import grpo  # type: ignore
    except ImportError as err:
        raise NemoRLUnavailable(NEMO_RL_MISSING.format(error=err, name=config_name)) from err
    return nemo_rl, grpo


def prepare_nemo_rl_run(plain: dict, config_name: str):
    """NeMo-RL's base config with ours merged on top, resolved and validated (a
    :class:`~nemo_entropy.integrations.nemo_rl_run.NemoRLRunConfig`): the one path the run entry and
    ``nemo-entropy check-nemo-rl --config-name`` share. Raises :class:`NemoRLUnavailable` or ``ValueError``."""
    nemo_rl_module, grpo = _import_nemo_rl(config_name)
    return merge_onto_nemo_rl(plain, nemo_rl_module, grpo)


def run_nemo_rl(run, plain: dict) -> int:
    """Run NeMo-RL's own GRPO example (``run``: from :func:`prepare_nemo_rl_run`) on the merged config, with our loss
    (built by its ``setup()``) and the per-step selection wrapper on every training entry
    (:func:`nemo_entropy.integrations.nemo_rl_run.install`)."""
    from nemo_rl.algorithms import grpo  # type: ignore  # imported by prepare_nemo_rl_run already
    from omegaconf import OmegaConf

    out_dir = Path(plain["logger"]["log_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    merged_path = out_dir / "nemo_rl_config.yaml"
    OmegaConf.save(OmegaConf.create(run.plain), merged_path)
    install(grpo, run.options)
    print(f"[nemo-entropy] running {run.script} --config {merged_path}", flush=True)
    argv = sys.argv
    sys.argv = [str(run.script), "--config", str(merged_path)]
    try:
        runpy.run_path(str(run.script), run_name="__main__")
    finally:
        sys.argv = argv
    return 0


# ----------------------------------------------------------------------------------------------- main
def _command(args: argparse.Namespace, overrides: Sequence[str]) -> str:
    parts = ["python", "-m", "nemo_entropy.train", "--config-name", args.config_name]
    if args.config_dir:
        parts += ["--config-dir", args.config_dir]
    return shlex.join(parts + list(overrides))


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nemo-entropy train",
        description="Run GRPO with an entropy control (Clip-Cov / KL-Cov) on the local engine or NeMo-RL.",
        epilog="Overrides use Hydra's syntax: loss_fn.kl_cov_ratio=0.002 cluster.num_nodes=8 +preset=local_tiny",
    )
    parser.add_argument("--config-name", default=DEFAULT_CONFIG_NAME, help="config in conf/ (default %(default)s)")
    parser.add_argument("--config-dir", default=None, help="config folder (default: the repository's conf/)")
    parser.add_argument("--dry-run", action="store_true", help="resolve, validate and print; do not train")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry of ``python -m nemo_entropy.train`` and ``nemo-entropy train``; returns the exit code."""
    args, overrides = _parser().parse_known_args(list(sys.argv[1:] if argv is None else argv))
    unknown_flags = [o for o in overrides if o.startswith("-")]
    if unknown_flags:
        print(f"nemo-entropy train: unknown option {unknown_flags[0]!r} (overrides are key=value)", file=sys.stderr)
        return 2
    from omegaconf import OmegaConf

    try:
        cfg, plain, loss, layout = load_run_config(args.config_name, overrides, args.config_dir)
    except ValueError as err:
        print(f"nemo-entropy train: invalid config: {err}", file=sys.stderr)
        return 2
    print(f"# config {args.config_name} (resolved)")
    print(OmegaConf.to_yaml(OmegaConf.create(plain)), end="")
    print(f"# layout: {layout.describe()}")
    print(f"# loss: method={loss.method} scope={loss.scope} "
          f"selection_ratio={loss.selection_ratio} eps=({loss.ratio_clip_min}, {loss.ratio_clip_max})")
    command = _command(args, overrides)
    if args.dry_run:
        if plain["backend"] == "nemo_rl":
            section = plain["nemo_rl"]
            print(f"# would run (inside the NeMo-RL container, on the Ray head): {command}")
            print(f"#   -> NeMo-RL examples/run_grpo.py on {section['base_config']} + this config, loss "
                  f"EntropyControlLossFn(input_type={section['input_type']}), the plan on the {section['plan']}")
        else:
            print(f"# would run: {command}  (nemo_entropy.engine.run_local)")
        return 0
    if plain["backend"] == "local":
        try:
            result = run_local(cfg) or {}
        except EngineExit as err:  # refused, interrupted, a disk error: one line, its exit code
            print(f"nemo-entropy train: {err}", file=sys.stderr)
            return err.exit_code
        except KeyboardInterrupt:
            print("nemo-entropy train: stopped at once by Ctrl-C (a second one, or during set-up); run the same "
                  "command to resume from the newest checkpoint", file=sys.stderr)
            return 130
        # run_local already printed where everything is; one summary line for logs and scripts.
        print(f"# done: {result.get('steps', '?')} steps, outputs in {result.get('log_dir', '?')}")
        return 0
    try:
        run = prepare_nemo_rl_run(plain, args.config_name)
    except NemoRLUnavailable as err:
        print(f"nemo-entropy train: {err}", file=sys.stderr)
        return 1
    except ValueError as err:
        print(f"nemo-entropy train: invalid config: {err}", file=sys.stderr)
        return 2
    # Errors raised inside NeMo-RL's run are NeMo-RL's: they propagate with their traceback, never reported as
    # a config error of ours.
    return run_nemo_rl(run, plain)


if __name__ == "__main__":
    sys.exit(main())
