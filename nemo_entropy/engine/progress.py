"""Progress of the engine's long loops (warm start, GRPO steps, ``compare`` runs): a bar on a terminal,
plain lines everywhere else.

A progress bar redraws itself with carriage returns; a log file (Slurm's ``slurm-*.out``, CI, ``make run >
log``) keeps every redraw on one endless line (``make run > log`` used to write a 200 kB line). So the
bar is drawn only when the output stream is a terminal; otherwise one self-contained line is printed when
the loop starts, then whenever ``every_steps`` steps or ``every_seconds`` seconds have passed since the last
line (whichever comes first), and once at the end::

    [nemo-entropy] GRPO [kl_cov]: 100/500 steps (20%), 18 s, 5.6 step/s, ~72 s left | H=0.212 reward=0.758 val=0.949

Environment variables (they apply to every progress report of the process and of the workers it spawns):

* ``NEMO_ENTROPY_PROGRESS``: ``auto`` (default: bar on a terminal, lines elsewhere), ``bar``, ``lines`` or
  ``off``;
* ``NEMO_ENTROPY_PROGRESS_STEPS``: a line at least every this many steps (default: a tenth of the total);
* ``NEMO_ENTROPY_PROGRESS_SECONDS``: a line at least every this many seconds (default: 60).

``engine.progress_bar: false`` turns the reports of a run off altogether.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any, Optional, TextIO

MODES = ("auto", "bar", "lines", "off")
MODE_ENV = "NEMO_ENTROPY_PROGRESS"
STEPS_ENV = "NEMO_ENTROPY_PROGRESS_STEPS"
SECONDS_ENV = "NEMO_ENTROPY_PROGRESS_SECONDS"
DEFAULT_SECONDS = 60.0
PREFIX = "[nemo-entropy]"


def _env_number(name: str, default: Optional[float], minimum: float) -> Optional[float]:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not value >= minimum:  # also rejects NaN
        raise ValueError(f"{name} must be a number >= {minimum:g}, got {raw!r}")
    return value


def resolve_mode(stream: TextIO, mode: Optional[str] = None) -> str:
    """``bar``, ``lines`` or ``off`` for ``stream``: ``mode`` (or ``$NEMO_ENTROPY_PROGRESS``), ``auto`` decided by
    whether the stream is a terminal."""
    chosen = (mode if mode is not None else os.environ.get(MODE_ENV, "auto")).strip().lower() or "auto"
    if chosen not in MODES:
        raise ValueError(f"{MODE_ENV} must be one of {MODES}, got {chosen!r}")
    if chosen == "auto":
        try:
            return "bar" if stream.isatty() else "lines"
        except (AttributeError, ValueError):  # a closed or exotic stream
            return "lines"
    return chosen


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def _format_seconds(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


class Progress:
    """Progress of a loop of ``total`` steps (see the module docstring); use as a context manager.

    Args:
        total: number of steps of the whole loop.
        desc: what is progressing (``"warm start"``, ``"GRPO [kl_cov]"``).
        initial: steps already done (a resumed run).
        unit: name of a step in the output.
        enabled: ``False`` reports nothing (non-logging ranks, ``engine.progress_bar: false``).
        leave: keep the finished bar on the terminal (lines are always kept).
        stream: where to write (default ``sys.stderr``, like a bar).
        mode, every_steps, every_seconds: override the environment variables.
    """

    def __init__(
        self,
        total: int,
        desc: str,
        *,
        initial: int = 0,
        unit: str = "step",
        enabled: bool = True,
        leave: bool = True,
        stream: Optional[TextIO] = None,
        mode: Optional[str] = None,
        every_steps: Optional[int] = None,
        every_seconds: Optional[float] = None,
    ):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.n = self._start_n = int(initial)
        self.stream = stream if stream is not None else sys.stderr
        self.mode = resolve_mode(self.stream, mode) if enabled else "off"
        steps = every_steps if every_steps is not None else _env_number(STEPS_ENV, None, 1)
        self.every_steps = int(steps) if steps is not None else max(1, self.total // 10)
        self.every_seconds = (
            float(every_seconds) if every_seconds is not None else _env_number(SECONDS_ENV, DEFAULT_SECONDS, 0)
        )
        self.postfix: dict[str, Any] = {}
        self._started = self._last_time = time.monotonic()
        self._last_n = self.n
        self._closed = False
        self._bar = None
        if self.mode == "bar":
            try:
                from tqdm.auto import tqdm
            except ImportError:  # tqdm is an optional dependency (the engine extra)
                self.mode = "lines"
            else:
                self._bar = tqdm(total=self.total, initial=self.n, desc=desc, unit=unit, leave=leave,
                                 dynamic_ncols=True, file=self.stream)
        if self.mode == "lines":
            self._write_line(starting=True)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Advance by ``n`` steps; keyword arguments replace the figures shown after the count."""
        self.n += n
        if postfix:
            self.postfix.update(postfix)
        if self.mode == "bar":
            if postfix:
                self._bar.set_postfix({k: _format_value(v) for k, v in self.postfix.items()}, refresh=False)
            self._bar.update(n)
        elif self.mode == "lines":
            now = time.monotonic()
            if self.n - self._last_n >= self.every_steps or now - self._last_time >= self.every_seconds:
                self._write_line()

    def close(self) -> None:
        """Finish: close the bar, or print the final line if the last count was not printed yet."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.mode == "lines" and self.n != self._last_n:
            self._write_line()

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def format_line(self, *, starting: bool = False) -> str:
        """The plain line for the current count (what ``lines`` mode prints)."""
        count = f"{self.n}/{self.total} {self.unit}s"
        if self.total > 0:
            count += f" ({100.0 * self.n / self.total:.0f}%)"
        if starting:
            return f"{PREFIX} {self.desc}: {count}, starting"
        elapsed = time.monotonic() - self._started
        parts = [count, _format_seconds(elapsed)]
        done = self.n - self._start_n
        if done > 0 and elapsed > 0:
            rate = done / elapsed
            if rate < 1:  # slow loops (a 32B GRPO step) read better as seconds per step
                parts.append(f"{1 / rate:.1f} s/{self.unit}")
            else:
                parts.append(f"{rate:.2f} {self.unit}/s" if rate < 10 else f"{rate:.0f} {self.unit}/s")
            if self.n < self.total:
                parts.append(f"~{_format_seconds((self.total - self.n) / rate)} left")
        line = f"{PREFIX} {self.desc}: " + ", ".join(parts)
        if self.postfix:
            line += " | " + " ".join(f"{k}={_format_value(v)}" for k, v in self.postfix.items())
        return line

    def _write_line(self, *, starting: bool = False) -> None:
        print(self.format_line(starting=starting), file=self.stream, flush=True)
        self._last_n, self._last_time = self.n, time.monotonic()
