"""How a local run stops with one line for the user and an exit code (below the run folder and the disk helpers,
which both raise it)."""

from __future__ import annotations

__all__ = ["EngineExit"]


class EngineExit(RuntimeError):
    """A run that stops with one line for the user and an exit code (refused, interrupted, disk error)."""

    exit_code = 1
