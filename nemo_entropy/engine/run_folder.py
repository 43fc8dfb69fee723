"""The run folder (``logger.log_dir``): one live writer, and the config that produced it.

* **Lock.** The process that starts a run (the single process, the parent of spawned workers, or rank 0 under
  torchrun) holds an exclusive ``flock`` on ``run.lock`` for the run's life and writes its pid, host and start time
  into it; every other process of the run holds a shared lock on ``run.workers.lock``. A second run into the folder
  is refused at once, naming the holder, while any of them lives (orphaned workers included). The kernel drops the
  locks of a killed process: a stale lock never blocks a restart.
* **Remembered config.** ``run_config.json`` holds the resolved config of the run. Resuming with another config is
  refused, naming every differing key with both values, before anything is written; the keys of
  :data:`SAFE_RESUME_CHANGES` may change when ``engine.resume_allow_changes`` lists them (e.g. more steps).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
from typing import Any, Iterable, Optional

from .disk import atomic_write_text, disk_errors
from .errors import EngineExit

LOCK_FILE = "run.lock"
WORKERS_LOCK_FILE = "run.workers.lock"
CONFIG_FILE = "run_config.json"
# Keys that only change how a run is shown: never compared.
DISPLAY_KEYS = frozenset({"engine.progress_bar", "engine.plot", "engine.resume_allow_changes"})
# Keys a resume may change when engine.resume_allow_changes lists them: they change neither the data, the model nor
# the optimisation of the steps already taken.
SAFE_RESUME_CHANGES = frozenset({
    "grpo.max_num_steps", "grpo.val_period", "grpo.val_at_end", "checkpointing.save_period",
    "checkpointing.keep_top_k", "engine.threads_per_process", "engine.warm_start.cache_dir",
    "engine.pass_at_k.num_problems", "engine.pass_at_k.num_samples", "engine.pass_at_k.temperature",
})


class RunRefused(EngineExit):
    """The run folder is busy or holds a run of another config: nothing was written."""

    exit_code = 2


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")


def _holder(path: str) -> str:
    try:
        with open(path) as fh:
            info = json.load(fh)
        return f"pid {info['pid']} on host {info['host']}, started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not yet written its pid"


def _try_flock(path: str, mode: int) -> Optional[int]:
    """An fd of ``path`` holding ``mode`` (LOCK_EX / LOCK_SH, non-blocking), or None when another holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except OSError as err:
        os.close(fd)
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


class RunFolderLock:
    """The launcher's hold on a run folder (see the module docstring); release with :meth:`release`."""

    def __init__(self, folder: str):
        self.folder = os.path.abspath(folder)
        self.path = os.path.join(self.folder, LOCK_FILE)
        self._fds: list[int] = []

    def acquire(self) -> "RunFolderLock":
        with disk_errors(self.folder, "logger.log_dir"):
            os.makedirs(self.folder, exist_ok=True)
            fd = _try_flock(self.path, fcntl.LOCK_EX)
            if fd is None:
                raise RunRefused(f"run folder {self.folder} is in use by another run ({_holder(self.path)}; lock "
                                 f"{self.path}): wait for it to end or stop it, or set logger.log_dir to another "
                                 f"folder")
            self._fds.append(fd)
            workers = _try_flock(os.path.join(self.folder, WORKERS_LOCK_FILE), fcntl.LOCK_EX)
            if workers is None:
                self.release()
                raise RunRefused(f"run folder {self.folder}: processes of an earlier run (started by "
                                 f"{_holder(self.path)}) still write into it; wait for them to end or stop them, or "
                                 f"set logger.log_dir to another folder")
            fcntl.flock(workers, fcntl.LOCK_SH)  # our own workers join with shared locks
            self._fds.append(workers)
        return self

    def write_holder(self) -> None:
        """Write this process's pid, host and start time into the lock file (in place: a rename would drop the
        lock)."""
        info = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _now()}).encode()
        fd = self._fds[0]
        os.ftruncate(fd, 0)
        os.pwrite(fd, info + b"\n", 0)
        os.fsync(fd)

    def release(self) -> None:
        while self._fds:
            os.close(self._fds.pop())


def join_as_worker(folder: str) -> int:
    """A shared hold on the folder's workers lock for a process of a run whose launcher holds the folder."""
    fd = os.open(os.path.join(os.path.abspath(folder), WORKERS_LOCK_FILE), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_SH)
    return fd


# ----------------------------------------------------------------------------------------------- remembered config
def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """``{"a.b": value}`` of every leaf of nested mappings (an empty mapping is a leaf)."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def config_differences(remembered: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """``{key: (remembered, current)}`` of the keys whose values differ (a missing key reads as ``<absent>``)."""
    old, new = (flatten(json.loads(json.dumps(c, default=str))) for c in (remembered, current))
    absent = "<absent>"
    return {k: (old.get(k, absent), new.get(k, absent)) for k in sorted(set(old) | set(new))
            if k not in DISPLAY_KEYS and old.get(k, absent) != new.get(k, absent)}


def check_resume_config(folder: str, current: dict, allowed: Iterable[str]) -> bool:
    """Refuse (:class:`RunRefused`) a config that differs from the one the folder remembers, except in the
    ``allowed`` safe keys; returns whether the remembered config must be rewritten (none yet, or allowed changes)."""
    path = os.path.join(folder, CONFIG_FILE)
    if not os.path.exists(path):
        return True
    try:
        with open(path) as fh:
            remembered = json.load(fh)
    except (OSError, ValueError) as err:
        raise RunRefused(f"{path} (the config this run folder remembers) cannot be read ({err}): restore it, or set "
                         f"logger.log_dir to another folder") from err
    differences = config_differences(remembered, current)
    refused = {k: v for k, v in differences.items() if k not in set(allowed)}
    if refused:
        listed = "; ".join(f"{k}: {old!r} in the folder, {new!r} now" for k, (old, new) in refused.items())
        safe = sorted(set(refused) & SAFE_RESUME_CHANGES)
        remedy = (f"; to continue with {safe} changed, add engine.resume_allow_changes=[{','.join(safe)}]"
                  if safe else "")
        raise RunRefused(f"run folder {folder} holds a run of another config ({listed}): resume with the folder's "
                         f"config, or set logger.log_dir to another folder{remedy}")
    return bool(differences)


def remember_config(folder: str, config: dict) -> str:
    """Write ``run_config.json`` (write-new-then-rename)."""
    path = os.path.join(folder, CONFIG_FILE)
    atomic_write_text(path, json.dumps(config, indent=2, default=str, sort_keys=True) + "\n", key="logger.log_dir")
    return path
