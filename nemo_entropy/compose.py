"""Composing a run config: ``conf/NAME.yaml`` with Hydra's compose API and plain Hydra overrides, on top of every
``loss_fn`` default.

The ``loss_fn`` defaults live in one place, the config dataclasses (:class:`nemo_entropy.config.LossConfig` and each
control's section); the yaml files hold only what they change. :func:`compose_config` composes the named config
on top of a node holding every ``loss_fn`` key with its default, so the composed config (what ``--dry-run`` prints,
``run_config.json`` and the NeMo-RL merged config) is complete, and a plain override such as
``loss_fn.kl_cov_coef=0.5`` works on every config whether or not its yaml names the key.

Used by the run entry (:mod:`nemo_entropy.train`), the engine's comparisons and the Slurm launcher; it imports only
the config below it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Optional, Sequence

from .config import loss_config

__all__ = ["compose_config", "default_config_dir", "loss_fn_defaults"]

_RUN = "_nemo_entropy_run"
_LOSS_DEFAULTS = "_nemo_entropy_loss_fn_defaults"


def default_config_dir() -> Path:
    """``$NEMO_ENTROPY_CONF_DIR``, else the ``conf/`` folder next to the package (a source checkout)."""
    env = os.environ.get("NEMO_ENTROPY_CONF_DIR")
    return Path(env) if env else Path(__file__).resolve().parent.parent / "conf"


def loss_fn_defaults() -> dict[str, Any]:
    """Every ``loss_fn`` key with its default, from the config dataclasses, as plain YAML-able values."""
    return {key: list(value) if isinstance(value, tuple) else value
            for key, value in loss_config().to_dict().items()}


def _store_defaults(config_name: str) -> None:
    """Register the defaults node and the run node composing ``config_name`` on top of it (Hydra's ConfigStore)."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    store.store(name=_LOSS_DEFAULTS, node={"loss_fn": loss_fn_defaults()})
    # The named config comes after the defaults, so its keys win; `+group=option` overrides append after it.
    store.store(name=_RUN, node={"defaults": [_LOSS_DEFAULTS, config_name, "_self_"]})


def compose_config(config_name: str, overrides: Sequence[str] = (), config_dir: Optional[os.PathLike] = None):
    """Compose ``config_name`` from ``config_dir`` with Hydra overrides, on top of every ``loss_fn`` default;
    returns an OmegaConf ``DictConfig``.

    Raises ``ValueError`` naming the config, the override or the key when Hydra rejects them.
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    directory = Path(config_dir) if config_dir is not None else default_config_dir()
    if not directory.is_dir():
        raise ValueError(f"--config-dir {str(directory)!r} is not a directory (set NEMO_ENTROPY_CONF_DIR or pass it)")
    if not (directory / f"{config_name}.yaml").is_file():
        names = sorted(p.stem for p in directory.glob("*.yaml"))
        raise ValueError(f"--config-name {config_name!r}: no {config_name}.yaml in {directory}; available: {names}")
    GlobalHydra.instance().clear()
    _store_defaults(config_name)
    try:
        with initialize_config_dir(config_dir=str(directory.resolve()), version_base=None):
            return compose(config_name=_RUN, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ValueError(f"config {config_name!r} with overrides {list(overrides)}: {err}") from err
    finally:
        GlobalHydra.instance().clear()
