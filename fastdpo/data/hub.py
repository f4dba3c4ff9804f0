"""Hub datasets read by name: ``datasets.load_dataset`` and the split names, their errors said as a mistyped local
path most often is (a close name in the folder, a data file of that name with its suffix)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import datasets

from fastdpo.data.hub_config import with_config
from fastdpo.data.local_files import ALL_SUFFIXES, SAID_SUFFIXES
from fastdpo.errors import DataError, offline_hint


def from_hub(source, **options):
    """``datasets.load_dataset(source, **options)``, its errors as ``_hub_errors`` says them."""
    with _hub_errors(source):
        return datasets.load_dataset(str(source), **with_config(options))


def hub_split_names(source: str) -> list[str]:
    """The split names of the hub dataset ``source`` (in the configuration ``hub_config`` sets), its errors as
    ``_hub_errors`` says them."""
    with _hub_errors(source):
        return datasets.get_dataset_split_names(source, config_name=with_config({}).get("name"))


@contextlib.contextmanager
def _hub_errors(source) -> Iterator[None]:
    """Where the hub has no dataset ``source`` (or cannot be reached) and a local data file of that name is here
    (``pairs`` beside ``pairs.jsonl``), a DataError naming the file; where none is, one naming a close name in the
    folder, or saying to check the path."""
    try:
        yield
    except (ConnectionError, FileNotFoundError, ValueError) as error:  # (DatasetNotFoundError is a FileNotFoundError)
        near = [str(Path(f"{source}{suffix}")) for suffix in ALL_SUFFIXES if Path(f"{source}{suffix}").is_file()]
        if not near and isinstance(error, (ConnectionError, FileNotFoundError)):  # (a path mistyped, most often)
            import difflib

            folder = Path(source).parent
            names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
            close = [str(folder / name) for name in difflib.get_close_matches(Path(source).name, names, n=1)]
            first = (str(error).strip().splitlines() or [""])[0][:200]
            fix = f"did you mean {close[0]}?" if close else (
                f"check the path (a data file with its suffix: {SAID_SUFFIXES}), or the hub name and "
                f"your connection{offline_hint(error)}")  # fmt: skip
            raise DataError(f"{source}: no file or folder of that name in {folder.resolve()}, and the hub gave none "
                            f"({type(error).__name__}: {first})", fix=fix) from None  # fmt: skip
        if not near:
            raise
        raise DataError(f"{source}: no file or folder of that name here, and the hub gave none "
                        f"({type(error).__name__})",
                        fix=f"give the file's whole name: {near[0]}") from None  # fmt: skip
