"""Local data files: which ``datasets`` builder reads a file by its suffix (``.jsonl``, ``.json``, ``.ndjson``,
``.parquet``, ``.csv``, ``.tsv``), each of them compressed too (``.gz``, ``.bz2``, ``.xz``: HH-RLHF ships
``train.jsonl.gz``), and a CSV or TSV file's header and reader options.

A compressed file is read from a decompressed copy in the ``datasets`` cache (``HF_DATASETS_CACHE``), made once
per version of the file (its path, size and modification time), so its lines are checked as a plain file's are;
errors name the compressed file, and its lines are those of the decompressed text.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from fastdpo.errors import DataError

DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet", ".csv": "csv",
                 ".tsv": "csv"}  # fmt: skip
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}  # suffix → the standard library's module
SAID_SUFFIXES = ".jsonl, .json, .parquet, .csv or .tsv (each may end in .gz, .bz2 or .xz)"

try:  # what pandas reads as missing in the other columns (its default)
    from pandas._libs.parsers import STR_NA_VALUES as _PANDAS_MISSING
except ImportError:  # (a private name: pandas' documented list)
    _PANDAS_MISSING = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}  # fmt: skip


def data_suffix(path: Path) -> str | None:
    """A data file's suffix, lowercased, past one compression suffix (``train.jsonl.gz``: ``.jsonl``); None where
    the name has none of ours."""
    suffixes = [suffix.lower() for suffix in Path(path).suffixes[-2:]]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes.pop()
    return suffixes[-1] if suffixes and suffixes[-1] in DATA_SUFFIXES else None


def builder_of(path: Path) -> str | None:
    """The ``datasets`` builder (``json``, ``parquet``, ``csv``) that reads ``path``, by its suffix; None for none."""
    return DATA_SUFFIXES.get(data_suffix(path) or "")


def local_kind(path: Path) -> str:
    """The builder of a local file; a DataError when there is no such file or its suffix is none of ours."""
    if not path.is_file():
        raise DataError(f"{path}: no such file", fix="check the path (relative paths start from the current folder)")
    kind = builder_of(path)
    if kind is None:
        raise DataError(f"{path}: unknown file type {''.join(path.suffixes[-2:]) or '(no suffix)'!r}",
                        fix=f"use {SAID_SUFFIXES}")  # fmt: skip
    return kind


def is_compressed(path: Path) -> bool:
    return Path(path).suffix.lower() in COMPRESSIONS and data_suffix(path) is not None


def decompressed(path: Path) -> Path:
    """The decompressed copy of the compressed data file ``path`` (``train.jsonl.gz``: ``.../train.jsonl``), made
    in the ``datasets`` cache where this version of the file has none yet; a DataError where the file is not the
    compression its suffix names, or is cut short."""
    import importlib

    import datasets

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:20]
    copy = Path(datasets.config.HF_DATASETS_CACHE) / "fastdpo_decompressed" / key / path.with_suffix("").name
    if copy.is_file():
        return copy
    copy.parent.mkdir(parents=True, exist_ok=True)
    partial = copy.with_name(f".{copy.name}.{os.getpid()}.partial")
    module = importlib.import_module(COMPRESSIONS[path.suffix.lower()])
    try:
        with module.open(path, "rb") as source, open(partial, "wb") as target:
            while block := source.read(1 << 20):
                target.write(block)
    except (OSError, EOFError, ValueError) as error:  # (gzip's BadGzipFile is an OSError; lzma's LZMAError too)
        partial.unlink(missing_ok=True)
        raise DataError(f"{path}: cannot decompress it as {path.suffix} ({type(error).__name__}: {error})",
                        fix="download the file again, or give it the suffix of its compression") from None  # fmt: skip
    os.replace(partial, copy)  # (whole or not at all: a run stopped midway leaves no half copy to be read later)
    return copy


def renamed(error: DataError, copy: Path, path: Path) -> DataError:
    """``error``, which names the decompressed ``copy``, naming ``path`` (the file the user gave) instead."""
    if copy == path:
        return error
    message, fix = (text.replace(str(copy), str(path)) if text else text for text in (error.message, error.fix))
    return DataError(message, row=error.row, column=error.column, fix=fix)


@contextlib.contextmanager
def named_as(copy: Path, path: Path) -> Iterator[None]:
    """DataErrors raised within naming ``path`` where they name its decompressed ``copy``."""
    try:
        yield
    except DataError as error:
        if copy == path:
            raise
        raise renamed(error, copy, path) from None


def readable(path: Path) -> Path:
    """``path``, or its decompressed copy where it is compressed."""
    return decompressed(path) if is_compressed(path) else path


def csv_header(path: Path) -> list[str]:
    """The column names of a CSV (TSV) file: its first line that is not blank, as pandas reads it."""
    with open(readable(path), newline="", encoding="utf-8-sig", errors="replace") as file:
        rows = csv.reader(file, delimiter=_delimiter(path))
        return next((row for row in rows if "".join(row).strip()), [])


def _delimiter(path: Path) -> str:
    return "\t" if data_suffix(path) == ".tsv" else ","


def refuse_repeated_names(path: Path) -> None:
    """A DataError for a CSV header that names a column twice: pandas read the second as "<name>.1", silently (the
    first trained on). Blank names are not names: pandas reads each as its own "Unnamed: <i>" (a spreadsheet's empty
    trailing columns)."""
    from fastdpo.data.json_check import _repeated

    twice = _repeated([name for name in csv_header(path) if name.strip()])
    if twice is not None:
        raise DataError(f"{path}: the header names {twice!r} twice", column=twice,
                        fix="rename or remove one of the two columns")  # fmt: skip


def csv_options(path: Path, kind: str, text: Iterable[str]) -> dict:
    """The reader options that read a CSV file's ``text`` columns as text (an empty cell as missing) and its others
    as pandas does, split at tabs in a TSV file; none for other kinds."""
    if kind != "csv":
        return {}
    header = csv_header(path)
    text = set(text)
    return {
        "sep": _delimiter(path),
        "converters": {name: str for name in header if name in text},
        "keep_default_na": False,
        "na_values": {name: [""] if name in text else sorted(_PANDAS_MISSING) for name in header},
    }


def rowless(path: Path, kind: str) -> str | None:
    """What a CSV file of no rows has instead (its header alone, blank lines aside as pandas skips them; blank lines
    alone), or that a Parquet file holds no row (on the error path only); None where it has rows."""
    if kind == "csv":
        with open(path, encoding="utf-8-sig", errors="replace") as file:  # (a BOM alone is no header)
            filled = (line for line in file if line.strip())
            if next(filled, None) is None:
                return "has only blank lines"
            return "has columns but no rows" if next(filled, None) is None else None
    if kind == "parquet":
        import pyarrow.parquet as pq

        try:
            return "has columns but no rows" if pq.ParquetFile(path).metadata.num_rows == 0 else None
        except (OSError, ValueError):  # (not Parquet at all: the reader's error says so)
            return None
    return None
