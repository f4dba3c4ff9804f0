"""Atomic file writes: a reader sees the old file or the complete new one, never a partial write.

Everything in fastdpo that writes a file (caches, configs, reports, checkpoints' side files) goes through here.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import stat
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
    os.chmod(tmp, _mode_for(path))  # (mkstemp's is 0600: the file gets the mode a plain open would give it)
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


def save_figure(figure, path: str | os.PathLike, **kwargs) -> None:
    """``figure.savefig(path, **kwargs)`` (matplotlib), written atomically; the format from the file's suffix."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, format=Path(path).suffix.lstrip(".") or "png", **kwargs)
    atomic_write(path, buffer.getvalue())


def _mode_for(path: Path) -> int:
    """The permissions ``path`` has, else those a new file gets (0666 less the umask)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask: read from /proc where there is one (setting it to read it back would, for that instant,
    give files other threads create no mask)."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status", encoding="ascii") as status:
        return int(next(line for line in status if line.startswith("Umask:")).split()[1], 8)
    umask = os.umask(0o077)  # (elsewhere: the briefest window, with the strictest mask)
    os.umask(umask)
    return umask


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
    from fastdpo.errors import ConfigError

    if path.exists() and not path.is_dir():
        raise ConfigError(f"{what}{path} is a file, not a folder", column=column,
                          fix=f"move the file, or set {column} to another path")  # fmt: skip
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise ConfigError(f"{what}{path} exists and is not empty", column=column, fix=fix)


def check_output_dir(path: str | os.PathLike, *, needed_bytes: int = 0, column: str = "output_dir") -> None:
    """``ConfigError`` when ``path`` cannot take a run's files: a file is in the way, the folder cannot be written
    (probed with a temporary file in the deepest folder that exists; nothing is created), or its disk has less than
    ``needed_bytes`` free."""
    from fastdpo.errors import ConfigError

    existing = Path(path).absolute()
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{existing} is a file, so {path} cannot be a folder", column=column,
                          fix=f"move the file, or set {column} to another path")  # fmt: skip
    try:
        fd, probe = tempfile.mkstemp(prefix=".fastdpo-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as error:
        raise ConfigError(f"cannot write into {existing} ({error.strerror})", column=column,
                          fix=f"fix the folder's permissions, or set {column} to a folder you can write to"
                          ) from None  # fmt: skip
    free = shutil.disk_usage(existing).free
    if free < needed_bytes:
        raise ConfigError(
            f"{existing} has {free / 2**30:.2f} GiB free and one checkpoint needs about {needed_bytes / 2**30:.2f} GiB",
            column=column,
            fix=f"free some space, set {column} on another disk, or save less (save_only_model, save_strategy='no')",
        )


@contextlib.contextmanager
def run_lock(out: Path, column: str = "output_dir") -> Iterator[None]:
    """Held while a run uses the run directory ``out``: ``.<name>.fastdpo-lock`` beside it, made exclusively, holds
    the process id and host; a second run into ``out`` meanwhile gets a ``ConfigError``. A lock left by a process
    that is gone (on this host) is taken over. The other processes of a distributed run (``RANK`` > 0) take none:
    their main process holds it. No lock where ``out``'s parent folder does not exist yet."""
    from fastdpo.errors import ConfigError

    if os.environ.get("RANK", "0") != "0" or not out.parent.is_dir():
        yield
        return
    lock = out.parent / f".{out.name}.fastdpo-lock"
    mine = f"{os.getpid()} {socket.gethostname()}"
    for _ in range(2):
        try:
            descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = lock.read_text(errors="replace").split() if lock.exists() else []
            if len(holder) == 2 and holder[1] == socket.gethostname() and not _alive(int(holder[0])):
                lock.unlink(missing_ok=True)  # (its run was killed: no one holds it)
                continue
            raise ConfigError(f"another run is using {out} (process {' on '.join(holder) or 'unknown'}: {lock})",
                              column=column, fix=f"wait for it, or set another {column}; if no run is using it, "
                              f"remove {lock}") from None  # fmt: skip
        except OSError:  # a read-only parent: nothing else can write there either
            yield
            return
        with os.fdopen(descriptor, "w") as handle:
            handle.write(mine)
        break
    else:  # (taken over twice, and made again by another run each time)
        raise ConfigError(f"another run is using {out} ({lock})", column=column, fix=f"set another {column}")
    try:
        yield
    finally:
        lock.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # (someone else's process)
        return True
    return True
