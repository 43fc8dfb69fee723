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

from nemo_entropy.parallel import ProcessGroup

from .processes import all_reduce_flag

REQUEUE_EXIT_CODE = 3
PREEMPT_FILE_ENV = "NEMO_ENTROPY_PREEMPT_FILE"
_SIGNALS = tuple(s for s in (getattr(signal, "SIGUSR1", None), signal.SIGTERM) if s is not None)


def preempt_file_path(checkpoint_dir: str) -> str:
    """The file whose existence requests pre-emption."""
    return os.environ.get(PREEMPT_FILE_ENV) or os.path.join(checkpoint_dir, "PREEMPT")


class PreemptionWatcher:
    """Records SIGUSR1/SIGTERM and checks the pre-emption file; use as a context manager."""

    def __init__(self, checkpoint_dir: str):
        self.path = preempt_file_path(checkpoint_dir)
        self.signalled: Optional[int] = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "PreemptionWatcher":
        if threading.current_thread() is threading.main_thread():
            for sig in _SIGNALS:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _on_signal(self, signum, frame) -> None:
        self.signalled = signum

    def requested(self, world_group: Optional[ProcessGroup]) -> bool:
        """Whether any rank saw a signal or the file (a collective: every rank calls it each step)."""
        local = self.signalled is not None or os.path.exists(self.path)
        return all_reduce_flag(local, world_group)

    def clear(self) -> None:
        """Remove the pre-emption file (rank 0, after the checkpoint) so the requeued run does not stop at once."""
        try:
            os.remove(self.path)
        except FileNotFoundError:
            pass
