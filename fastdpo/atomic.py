"""Atomic file writes: a reader sees the old file or the complete new one, never a partial write.

Everything in fastdpo that writes a file (caches, configs, reports, checkpoints' side files) goes through here.
"""

from __future__ import annotations

import contextlib
import logging
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


_NO_MATPLOTLIB: set[str] = set()  # what was said to be drawn without matplotlib (one warning each)


def pyplot_or_none(what: str):
    """``matplotlib.pyplot`` on the Agg backend, or None with one warning per ``what`` (e.g. "plots/") where
    matplotlib is not installed (it is in the ``dev`` extra only): the charts are skipped, nothing else."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        from matplotlib import pyplot
    except ImportError:
        if what not in _NO_MATPLOTLIB:
            _NO_MATPLOTLIB.add(what)
            logging.getLogger("fastdpo").warning("%s not drawn: matplotlib is not installed (pip install matplotlib)",
                                                 what)  # fmt: skip
        return None
    return pyplot


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


# the variables launchers set for a process's rank (torchrun, accelerate, MPI, MVAPICH), as accelerate reads them
_RANKS = ("RANK", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")


@contextlib.contextmanager
def run_lock(out: Path, column: str = "output_dir") -> Iterator[None]:
    """Held while a run uses the run directory ``out``: an exclusive ``flock`` on ``.<name>.fastdpo-lock`` beside
    it (which names the holder's process and host); a second run into ``out`` meanwhile gets a ``ConfigError``. The
    kernel lets the lock go with its process, however it ends (a killed run leaves no lock behind). The other
    processes of a distributed run (rank > 0) take none: their main process holds it. ``out``'s parent folder is made
    where missing (``runs/`` of ``runs/a``: two runs started together into a new one took no lock). None on a system
    without ``flock``, or where the parent cannot be written."""
    from fastdpo.errors import ConfigError

    try:
        import fcntl
    except ImportError:  # (Windows)
        fcntl = None
    out = Path(os.path.abspath(out))  # ("." and its absolute path: one directory, one lock)
    if fcntl is None or any(os.environ.get(name, "0") != "0" for name in _RANKS):
        yield
        return
    lock = out.parent / f".{out.name}.fastdpo-lock"
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        handle = open(lock, "a+")  # noqa: SIM115 - held open for the run: the flock lives with it
    except OSError:  # a read-only parent: no other run can write there either
        yield
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise ConfigError(f"another run is using {out} (process {holder}; {lock})", column=column,
                              fix=f"wait for it, or set another {column}") from None  # fmt: skip
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()} on {socket.gethostname()}")
        handle.flush()
        try:
            yield
        finally:
            lock.unlink(missing_ok=True)  # (still held: no run can have taken it meanwhile)
