"""Read every numeric scalar of a run, per step, from one of three sources.

- ``jsonl``: our engine's ``metrics.jsonl`` (or a run directory holding one): one JSON object per step.
- ``tensorboard``: a directory of TensorBoard event files (or one event file), e.g. NeMo-RL's
  ``<logger.log_dir>/tensorboard`` or our ``runs/<name>/tb``; scalar summaries as written by
  ``torch.utils.tensorboard.SummaryWriter``. A directory without event files of its own is searched below
  for exactly one directory that has some.
- ``csv``: a table with a step column and one column per scalar, e.g. a W&B export.

A value logged twice for the same step (a resumed run that did not truncate its log) keeps the later one,
and says so in the notes.
"""

from __future__ import annotations

import csv
import json
import math
import os
from typing import Optional

from .keys import STEP_COLUMNS
from .series import LawInputError, RunScalars, format_available

SOURCES = ("jsonl", "tensorboard", "csv")
METRICS_FILE = "metrics.jsonl"  # the engine's file name (nemo_entropy.engine.metrics, which imports torch)
_EVENTS_PREFIX = "events.out.tfevents"


def read_run(path: str, *, source: str = "auto", step_key: Optional[str] = None) -> RunScalars:
    """Every numeric scalar of the run at ``path``; ``source`` is ``auto`` or one of :data:`SOURCES`.

    ``step_key`` names the step column of a CSV (default: the first of ``step``, ``Step``, ``_step``,
    ``global_step``) or the step field of JSON lines (default ``step``); TensorBoard has its own steps.
    """
    if source == "auto":
        source, path = detect_source(path)
    elif source not in SOURCES:
        raise LawInputError(f"source {source!r} is not one of auto, {', '.join(SOURCES)}")
    elif not os.path.exists(path):
        raise LawInputError(f"{path}: no such file or directory")
    if source == "jsonl":
        return _read_jsonl(_jsonl_file(path), step_key or "step")
    if source == "tensorboard":
        return _read_tensorboard(_event_dir(path))
    return _read_csv(path, step_key)


def detect_source(path: str) -> tuple[str, str]:
    """(source, path) for ``path``: by file name for files; for a directory, ``metrics.jsonl`` first, then events."""
    if not os.path.exists(path):
        raise LawInputError(f"{path}: no such file or directory")
    if os.path.isfile(path):
        name = os.path.basename(path)
        if name.endswith(".csv"):
            return "csv", path
        if name.endswith(".jsonl"):
            return "jsonl", path
        if name.startswith(_EVENTS_PREFIX):
            return "tensorboard", path
        raise LawInputError(f"{path}: cannot tell the source from the file name (expected *.csv, *.jsonl or "
                            f"{_EVENTS_PREFIX}.*); pass --source jsonl|tensorboard|csv")
    if os.path.isfile(os.path.join(path, METRICS_FILE)):
        return "jsonl", os.path.join(path, METRICS_FILE)
    if _event_dirs(path):
        return "tensorboard", path
    raise LawInputError(f"{path}: a directory with neither {METRICS_FILE} nor TensorBoard event files "
                        f"({_EVENTS_PREFIX}.*) in it or below it")


# ---------------------------------------------------------------------------------------------- JSON lines

def _jsonl_file(path: str) -> str:
    if os.path.isdir(path):
        inner = os.path.join(path, METRICS_FILE)
        if not os.path.isfile(inner):
            raise LawInputError(f"{path}: a directory without {METRICS_FILE}")
        return inner
    return path


def _as_step(value, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value != int(value):
        raise LawInputError(f"{where}: step {value!r} is not an integer")
    return int(value)


def _read_jsonl(path: str, step_key: str) -> RunScalars:
    with open(path) as fh:
        lines = [(n, line.strip()) for n, line in enumerate(fh, start=1)]
    lines = [(n, line) for n, line in lines if line]
    values: dict[str, dict[int, float]] = {}
    steps: set[int] = set()
    notes, repeated = [], 0
    for i, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            # A killed run can leave a torn last line (the engine's writer appends line by line); anything
            # else is a damaged file, and skipping it would drop steps silently.
            if i == len(lines) - 1:
                notes.append(f"ignored a torn last line (line {n})")
                break
            raise LawInputError(f"{path}:{n}: not a JSON object ({exc.msg})") from None
        if not isinstance(record, dict):
            raise LawInputError(f"{path}:{n}: not a JSON object")
        if step_key not in record:
            raise LawInputError(f"{path}:{n}: no step field {step_key!r}; fields: {format_available(sorted(record))}")
        step = _as_step(record[step_key], f"{path}:{n}")
        repeated += step in steps
        steps.add(step)
        for key, value in record.items():
            if key == step_key or isinstance(value, bool):
                continue
            if value is None:  # the engine writes non-finite values as null
                values.setdefault(key, {})[step] = math.nan
            elif isinstance(value, (int, float)):
                values.setdefault(key, {})[step] = float(value)
    if repeated:
        notes.append(f"{repeated} steps logged more than once: the later record kept")
    return RunScalars(path=path, source="jsonl", values=_drop_all_missing(values), steps=frozenset(steps),
                      notes=tuple(notes))


def _drop_all_missing(values: dict[str, dict[int, float]]) -> dict[str, dict[int, float]]:
    # A key that is null at every step carries no data; listing it as available would only mislead.
    return {k: v for k, v in values.items() if any(not math.isnan(x) for x in v.values())}


# -------------------------------------------------------------------------------------------- TensorBoard

def _event_dirs(root: str) -> list[str]:
    found = []
    for dirpath, _dirs, files in os.walk(root):
        if any(f.startswith(_EVENTS_PREFIX) for f in files):
            found.append(dirpath)
    return sorted(found)


def _event_dir(path: str) -> str:
    if os.path.isfile(path):
        return path
    dirs = _event_dirs(path)
    if path in dirs or os.path.normpath(path) in dirs:
        return path
    if len(dirs) == 1:
        return dirs[0]
    if not dirs:
        raise LawInputError(f"{path}: no TensorBoard event files ({_EVENTS_PREFIX}.*) in it or below it")
    raise LawInputError(f"{path}: several directories below it hold TensorBoard event files; pass one of: "
                        f"{format_available(dirs, limit=10)}")


def _read_tensorboard(path: str) -> RunScalars:
    try:
        from tensorboard.backend.event_processing import event_accumulator
    except ImportError as exc:  # the `engine` extra installs it
        raise LawInputError(f"{path}: reading TensorBoard events needs the tensorboard package "
                            f"(pip install 'nemo-entropy[engine]'): {exc}") from None
    # size_guidance 0 = keep every event; the default keeps a reservoir sample of 10,000 per tag.
    accumulator = event_accumulator.EventAccumulator(path, size_guidance={event_accumulator.SCALARS: 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    values: dict[str, dict[int, float]] = {}
    steps: set[int] = set()
    repeated = 0
    for tag in tags.get("scalars", []):
        series = values.setdefault(tag, {})
        for event in accumulator.Scalars(tag):
            repeated += event.step in series
            series[int(event.step)] = float(event.value)
            steps.add(int(event.step))
    notes = []
    if repeated:
        notes.append(f"{repeated} (tag, step) values logged more than once: the later one kept")
    if tags.get("tensors"):
        notes.append(f"{len(tags['tensors'])} tensor summaries (TF2 style) not read: only scalar summaries are")
    return RunScalars(path=path, source="tensorboard", values=values, steps=frozenset(steps), notes=tuple(notes))


# ---------------------------------------------------------------------------------------------------- CSV

def _parse_number(text: str) -> Optional[float]:
    """The float in a CSV cell, NaN for an empty cell, None if the cell is not a number."""
    text = text.strip()
    if not text:
        return math.nan
    try:
        return float(text)
    except ValueError:
        return None


def _read_csv(path: str, step_key: Optional[str]) -> RunScalars:
    with open(path, newline="", encoding="utf-8-sig") as fh:  # W&B and spreadsheets may write a BOM
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header:
            raise LawInputError(f"{path}: empty CSV (no header row)")
        header = [h.strip() for h in header]
        if step_key is not None:
            if step_key not in header:
                raise LawInputError(f"{path}: no step column {step_key!r} (--step-key); columns: "
                                    f"{format_available(header)}")
            step_col = step_key
        else:
            present = [c for c in STEP_COLUMNS if c in header]
            if not present:
                raise LawInputError(f"{path}: none of the step columns {list(STEP_COLUMNS)}; name it with "
                                    f"--step-key; columns: {format_available(header)}")
            step_col = present[0]
        step_index = header.index(step_col)
        columns = [(i, name) for i, name in enumerate(header) if i != step_index]
        values: dict[str, dict[int, float]] = {name: {} for _, name in columns}
        bad_cells: dict[str, list[tuple[int, str]]] = {}  # column -> (line, text) of each non-numeric cell
        steps: set[int] = set()
        repeated = 0
        rows = 0
        for row_number, row in enumerate(reader, start=2):
            if not any(cell.strip() for cell in row):
                continue
            if len(row) != len(header):
                raise LawInputError(f"{path}:{row_number}: {len(row)} cells, the header has {len(header)}")
            step_value = _parse_number(row[step_index])
            if step_value is None or math.isnan(step_value):
                raise LawInputError(f"{path}:{row_number}: step column {step_col!r} holds {row[step_index]!r}, "
                                    f"not an integer")
            step = _as_step(step_value, f"{path}:{row_number}")
            repeated += step in steps
            steps.add(step)
            rows += 1
            for i, name in columns:
                number = _parse_number(row[i])
                if number is None:
                    bad_cells.setdefault(name, []).append((row_number, row[i]))
                else:
                    values[name][step] = number
    if not rows:
        raise LawInputError(f"{path}: the CSV has a header ({format_available(header)}) but no data rows")
    notes = [f"{repeated} steps appear in more than one row: the later row kept"] if repeated else []
    rejected: dict[str, str] = {}
    for _, name in columns:
        numbers = [v for v in values[name].values() if not math.isnan(v)]
        cells = bad_cells.get(name, [])
        if cells and not numbers:  # a text column, not a scalar
            rejected[name] = f"non-numeric value {cells[0][1]!r} at line {cells[0][0]}"
        elif not numbers:
            rejected[name] = f"every one of its {rows} cells is empty or NaN"
        elif cells:
            listed = ", ".join(f"line {line}: {text!r}" for line, text in cells[:5])
            notes.append(f"column {name!r}: {len(cells)} non-numeric cell(s) rejected, read as missing: "
                         f"{listed}{', ...' if len(cells) > 5 else ''}")
    for name in rejected:
        values.pop(name, None)
    return RunScalars(path=path, source="csv", values=_drop_all_missing(values), steps=frozenset(steps),
                      notes=tuple(notes), rejected=rejected)
