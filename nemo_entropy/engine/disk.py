"""Writes of the run's files: write-new-then-rename, and disk errors as one line naming the path, the config key
that sets it and the OS reason (a full disk, a read-only or missing folder), with no temporary file left behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import os
from typing import Any, Iterator

import torch

from .errors import EngineExit


class DiskError(EngineExit):
    """A run file could not be written or read; the message names path, key and reason."""

    exit_code = 1


def _reason(err: OSError) -> str:
    code = errno.errorcode.get(err.errno, "") if err.errno else ""
    text = err.strerror or str(err)
    return f"{text} ({code})" if code else text


@contextlib.contextmanager
def disk_errors(path: str, key: str) -> Iterator[None]:
    """Turn an ``OSError`` inside the block into a :class:`DiskError` about ``path`` (set by config ``key``)."""
    try:
        yield
    except OSError as err:
        where = err.filename if isinstance(err.filename, str) else path
        raise DiskError(f"cannot write {where}: {_reason(err)}; {key} sets this location: free space there or point "
                        f"{key} at a writable folder") from None


def atomic_write_bytes(path: str, data: bytes, *, key: str) -> None:
    """Write ``data`` to ``path`` through ``path.tmp.<pid>`` (flushed to disk, then renamed over ``path``): a
    reader sees the old file or the new one, never a part. On failure the temporary file is removed."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with disk_errors(path, key):
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(tmp, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.remove(tmp)
            raise


def atomic_write_text(path: str, text: str, *, key: str) -> None:
    """:func:`atomic_write_bytes` of UTF-8 text."""
    atomic_write_bytes(path, text.encode(), key=key)


def torch_bytes(obj: Any) -> bytes:
    """``torch.save`` of ``obj`` into memory (written with :func:`atomic_write_bytes`, hashed with :func:`sha256`)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
