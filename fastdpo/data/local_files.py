"""Local data files: which ``datasets`` builder reads a file by its suffix (``.jsonl``, ``.json``, ``.ndjson``,
``.parquet``, ``.csv``, ``.tsv``), each of them compressed too (``.gz``, ``.bz2``, ``.xz``: HH-RLHF ships
``train.jsonl.gz``), and a CSV or TSV file's header and reader options.

A compressed file is read from a decompressed copy in the ``datasets`` cache (``HF_DATASETS_CACHE``), made once
per version of the file (its path, size and modification time), so its lines are checked as a plain file's are;
errors name the compressed file, and its lines are those of the decompressed text. A stream of a compressed JSON
file decompresses it as it reads (``open_data``), without a copy.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from fastdpo.errors import DataError

DATA_SUFFIXES = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet", ".csv": "csv",
                 ".tsv": "csv"}  # fmt: skip
COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".xz": "lzma"}  # suffix → the standard library's module
ALL_SUFFIXES = (*DATA_SUFFIXES, *(data + packed for data in DATA_SUFFIXES for packed in COMPRESSIONS))
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
        packed = [f"{path}{suffix}" for suffix in COMPRESSIONS if Path(f"{path}{suffix}").is_file()]
        raise DataError(f"{path}: no such file", fix=f"did you mean {packed[0]}?" if packed else "check the path "
                        "(relative paths start from the current folder)")  # fmt: skip
    kind = builder_of(path)
    if kind is None:
        raise DataError(f"{path}: unknown file type {''.join(path.suffixes[-2:]) or '(no suffix)'!r}",
                        fix=f"use {SAID_SUFFIXES}")  # fmt: skip
    return kind


def is_compressed(path: Path) -> bool:
    return Path(path).suffix.lower() in COMPRESSIONS and data_suffix(path) is not None


def open_data(path: Path):
    """``path`` opened for reading bytes, decompressed as it is read where its suffix names a compression."""
    if Path(path).suffix.lower() not in COMPRESSIONS:
        return open(path, "rb")
    import importlib

    return importlib.import_module(COMPRESSIONS[Path(path).suffix.lower()]).open(path, "rb")


def read_data(path: Path) -> bytes:
    """The bytes of ``path``, decompressed (``open_data``)."""
    with open_data(path) as handle:
        return handle.read()


def not_decompressed(path: Path, error: Exception) -> DataError:
    """The DataError of a compressed file whose bytes are not the compression its suffix names, or are cut short."""
    return DataError(f"{path}: cannot decompress it as {Path(path).suffix} ({type(error).__name__}: {error})",
                     fix="download the file again, or give it the suffix of its compression")  # fmt: skip


def decompress_errors() -> tuple[type[Exception], ...]:
    """What reading a broken compressed file raises: gzip's BadGzipFile (an OSError), EOFError where it is cut
    short, lzma's LZMAError."""
    try:
        from lzma import LZMAError
    except ImportError:  # (a Python built without liblzma)
        return OSError, EOFError
    return OSError, EOFError, LZMAError


def decompressed(path: Path) -> Path:
    """The decompressed copy of the compressed data file ``path`` (``train.jsonl.gz``: ``.../train.jsonl``), made
    in the ``datasets`` cache where this version of the file has none yet; a DataError where the file is not the
    compression its suffix names, or is cut short."""
    import datasets

    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:20]
    copy = Path(datasets.config.HF_DATASETS_CACHE) / "fastdpo_decompressed" / key / path.with_suffix("").name
    if copy.is_file():
        return copy
    partial = copy.with_name(f".{copy.name}.{os.getpid()}.partial")
    try:
        _decompress_to(path, partial)
    except (_Unreadable, OSError) as error:
        with contextlib.suppress(OSError):  # (no half copy left to be read later)
            partial.unlink(missing_ok=True)
        if isinstance(error, _Unreadable):
            raise not_decompressed(path, error.__cause__) from None
        raise _cache_error(path, copy, error) from None  # (a full disk, a quota: the cache's, not the file's)
    os.replace(partial, copy)  # (whole or not at all: a run stopped midway leaves no half copy to be read later)
    return copy


class _Unreadable(Exception):
    """Reading the compressed file failed (its bytes), told apart from writing the copy (the cache's)."""


def _decompress_to(path: Path, partial: Path) -> None:
    partial.parent.mkdir(parents=True, exist_ok=True)
    with open(partial, "wb") as target:
        try:
            source = open_data(path)
        except OSError as error:
            raise _Unreadable(error) from error
        with source:
            while True:
                try:
                    block = source.read(1 << 20)
                except decompress_errors() as error:
                    raise _Unreadable(error) from error
                if not block:
                    return
                target.write(block)


def _cache_error(path: Path, copy: Path, error: OSError) -> DataError:
    return DataError(f"{path}: cannot write its decompressed copy in {copy.parent.parent} ({type(error).__name__}: "
                     f"{error})", fix="free space there, or point HF_DATASETS_CACHE to a folder with room for the "
                     "decompressed file")  # fmt: skip


def renamed(error: DataError, copy: Path, path: Path) -> DataError:
    """``error``, which names the decompressed ``copy``, naming ``path`` (the file the user gave) instead."""
    if copy == path:
        return error
    message, fix = (text.replace(str(copy), str(path)) if text else text for text in (error.message, error.fix))
    return error.but(message=message, fix=fix)


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


def check_csv_cells(path: Path) -> None:
    """A DataError at the first record of a CSV (TSV) file that pandas would read otherwise than written, without a
    word, named by its first line: a quoted cell that goes on past its closing quote (``"Hi," she said``, as a writer
    that quotes nothing writes it), read as ``Hi, she said``; more cells than the header names, not all empty
    (pandas took the first ones of every row as an index, the others shifted under the wrong names; ``csv_options``
    keeps it from that, dropping the extra cells: a trailing delimiter's empty ones are no loss)."""
    for _ in checked_csv_records(path):
        pass


def checked_csv_records(path: Path) -> Iterator[None]:
    """``check_csv_cells`` record by record: one step per record after the header that is not a blank line (a row,
    as pandas reads them), each checked before it is yielded (a stream checks its rows as it reads them)."""
    with open(readable(path), newline="", encoding="utf-8-sig", errors="replace") as file:
        rows = csv.reader(file, delimiter=_delimiter(path), strict=True)
        header = None
        while True:
            start = rows.line_num + 1  # the first line of the record being read
            with _wide_cells():  # (a cell over the csv module's 128 KiB ended the check: pandas reads it)
                try:
                    row = next(rows, None)
                except csv.Error as error:
                    if "expected after" not in str(error):  # (an unclosed quote: pandas refuses it itself)
                        return
                    raise DataError(f"{path}: line {start}: a cell that starts with a quote goes on past its "
                                    "closing quote, and would be read without its quotes",
                                    fix='quote the whole cell, with each quote in it doubled ("""Hi,"" she said"), '
                                    "or write the file with a writer that quotes its cells (csv, pandas' to_csv)"
                                    ) from None  # fmt: skip
            if row is None:
                return
            if header is None:
                header = row if "".join(row).strip() else None  # (as csv_header finds it)
                continue
            if len(row) > len(header) and any(cell.strip() for cell in row[len(header) :]):
                raise DataError(f"{path}: line {start}: {len(row)} fields where the header has {len(header)}",
                                fix=extra_fields_fix(path))  # fmt: skip
            if row:  # (pandas skips a blank line)
                yield


@contextlib.contextmanager
def _wide_cells() -> Iterator[None]:
    limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        yield
    finally:
        csv.field_size_limit(limit)


class _Unsaid(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return False


_UNSAID = _Unsaid()


@contextlib.contextmanager
def quiet_reader() -> Iterator[None]:
    """Within, left unsaid: datasets' JSON and CSV readers' logs of a failure (they name a compressed file's copy;
    fastdpo's DataError says the failure). A filter, not a level: cheap enough around each row a stream reads (a
    level's change clears every logger's cache), and no level left changed by streams read in turns."""
    loggers = [logging.getLogger(f"datasets.packaged_modules.{kind}.{kind}") for kind in ("json", "csv")]
    for logger in loggers:
        logger.addFilter(_UNSAID)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeFilter(_UNSAID)


def extra_fields_fix(path: Path) -> str:
    held = "a tab" if data_suffix(path) == ".tsv" else 'a comma ("a, b")'
    return f"quote a field that holds {held}, or remove the extra ones"


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
        "index_col": False,  # (pandas' default takes a row's cells past the header's as an index: see check_csv_cells)
        "usecols": list(range(len(header))),  # (a row's cells past the header's: refused, or empty; dropped unsaid)
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
