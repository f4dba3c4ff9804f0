"""Atomic file writes: a reader sees the old file or the complete new one, never a partial write.

Everything in fastdpo that writes a file (caches, configs, reports, checkpoints' side files) goes through here.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "w", *, encoding: str | None = None) -> Iterator[IO]:
    """Open a temporary file next to ``path``; on a clean exit flush, fsync and rename it over ``path``.

    On an exception the temporary file is removed and ``path`` is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode: atomic_open writes whole files, so mode must be 'w' or 'wb', not {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    if encoding is None and mode == "w":
        encoding = "utf-8"
    try:
        with os.fdopen(fd, mode, encoding=encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` atomically."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as handle:
        handle.write(data)


def _fsync_dir(directory: Path) -> None:
    # Makes the rename itself durable; not every filesystem lets a directory be opened for this
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def refuse_non_empty(path: Path, *, overwrite: bool, column: str, fix: str, what: str = "") -> None:
    """``ConfigError`` when ``path`` is a non-empty folder and ``overwrite`` was not given: nothing a user wrote is
    replaced without asking. ``what`` names the folder in the message (e.g. "the run directory ")."""
    if path.exists() and any(path.iterdir()) and not overwrite:
        from fastdpo.errors import ConfigError

        raise ConfigError(f"{what}{path} exists and is not empty", column=column, fix=fix)
