"""Pre-emption: a signal or a file asks the run to checkpoint and exit for a requeue (contract 4).

torchrun does not forward SIGUSR1 to its workers, so besides SIGUSR1/SIGTERM received by the process the
engine also watches a file (env ``NEMO_ENTROPY_PREEMPT_FILE``, default ``<checkpoint_dir>/PREEMPT``). All
ranks agree at each step boundary with one all-reduce, so they checkpoint the same step and exit together
with :data:`REQUEUE_EXIT_CODE`, which the Slurm launcher turns into ``scontrol requeue``.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Optional

import torch

from nemo_entropy.parallel import ProcessGroup

from .processes import group_all_reduce
from .run_folder import EngineExit

REQUEUE_EXIT_CODE = 3
PREEMPT_FILE_ENV = "NEMO_ENTROPY_PREEMPT_FILE"
_SIGNALS = tuple(s for s in (getattr(signal, "SIGUSR1", None), signal.SIGTERM) if s is not None)


def preempt_file_path(checkpoint_dir: str) -> str:
    """The file whose existence requests pre-emption."""
    return os.environ.get(PREEMPT_FILE_ENV) or os.path.join(checkpoint_dir, "PREEMPT")


INTERRUPT_EXIT_CODE = 130  # 128 + SIGINT, what a shell reports for a job stopped by Ctrl-C
PREEMPTED, INTERRUPTED = 1, 2


class Interrupted(EngineExit):
    """Ctrl-C (SIGINT): the checkpoint of the step boundary is saved, the run exits with code 130."""

    exit_code = INTERRUPT_EXIT_CODE


class PreemptionWatcher:
    """Records SIGUSR1/SIGTERM and SIGINT and checks the pre-emption file; use as a context manager.

    SIGINT asks for the same stop at the next step boundary as SIGTERM, then exit 130 instead of the requeue
    code; a second SIGINT stops at once (``KeyboardInterrupt``)."""

    def __init__(self, checkpoint_dir: str):
        self.path = preempt_file_path(checkpoint_dir)
        self.signalled: Optional[int] = None
        self.interrupted = False
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "PreemptionWatcher":
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._on_interrupt)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        self.signalled = signum

    def _on_interrupt(self, signum, frame) -> None:
        if self.interrupted:
            raise KeyboardInterrupt
        self.interrupted = True

    def requested(self, world_group: Optional[ProcessGroup]) -> int:
        """0, :data:`PREEMPTED` or :data:`INTERRUPTED` (Ctrl-C wins), agreed by every rank: a collective, every
        rank calls it each step."""
        local = INTERRUPTED if self.interrupted else PREEMPTED if (
            self.signalled is not None or os.path.exists(self.path)) else 0
        return int(group_all_reduce(torch.tensor([local], dtype=torch.int64), world_group, "max").item())

    def clear(self) -> None:
        """Remove the pre-emption file (rank 0, after the checkpoint) so the requeued run does not stop at once."""
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
