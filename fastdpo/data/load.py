"""Load a dataset from wherever a user keeps it: a ``datasets`` object, a list of row dicts, a local file, or a hub
name.

Local JSON Lines and JSON files are checked line by line first, so a broken line is reported by its number
instead of as a parser traceback from deep inside ``datasets``; so is a value Arrow cannot hold (a lone surrogate,
an integer beyond 64 bits), when ``datasets`` fails on one. A CSV file's text columns are read as text: pandas
would read an answer ``4`` as a number, ``007`` as 7 and ``NA`` as missing. Where a JSON field's kinds differ
between rows, ``datasets`` reads a string there that is itself JSON (``"4"``) back changed (4): ``load_data`` names
such a string, and a stream of a local JSON file is read with Python's ``json``, which changes nothing.
"""

from __future__ import annotations

import csv
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets
import pyarrow
from datasets.exceptions import DatasetGenerationError

from fastdpo.data.json_layout import refuse_one_object
from fastdpo.data.pairs import table_columns
from fastdpo.errors import DataError

LOCAL_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}

# fastdpo's text fields: a CSV file's columns of these names (or of the names a column map gives them) are read as
# text, an empty cell as missing
TEXT_COLUMNS = ("prompt", "chosen", "rejected", "completion", "text", "system", "input", "context")
try:  # what pandas reads as missing in the other columns (its default)
    from pandas._libs.parsers import STR_NA_VALUES as _PANDAS_MISSING
except ImportError:  # (a private name: pandas' documented list)
    _PANDAS_MISSING = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                       "<NA>", "N/A", "NA", "NULL", "NaN", "None", "n/a", "nan", "null"}  # fmt: skip


def text_columns(columns) -> tuple[str, ...]:
    """The columns a file's text is read from: ours (``TEXT_COLUMNS``) and the dataset's names that ``columns``
    (our name → the dataset's) gives our text fields and conversations (``messages`` under another name, whose
    strings a JSON file's check reads as it reads ours)."""
    mapped = columns.items() if isinstance(columns, dict) else ()
    ours = (*TEXT_COLUMNS, *_CONVERSATION_COLUMNS)
    return TEXT_COLUMNS + tuple(theirs for name, theirs in mapped if name in ours and isinstance(theirs, str))


def load_data(
    source, *, split: str | None = "train", text: Iterable[str] = TEXT_COLUMNS
) -> datasets.Dataset | datasets.DatasetDict:
    """A ``datasets.Dataset`` (or ``DatasetDict`` with ``split=None``) from ``source``.

    Args:
        source: a ``Dataset``/``DatasetDict``; a list of dicts, one per row; a local ``.jsonl``, ``.json``,
            ``.parquet`` or ``.csv`` file, or a folder of one per split (``split_files``); or a hub name, passed to
            ``datasets.load_dataset``.
        split: which split of a ``DatasetDict`` or hub dataset; None keeps them all.
        text: a CSV file's columns to read as text (see ``text_columns``).
    """
    if isinstance(source, datasets.DatasetDict):
        return source if split is None else _pick_split(source, split, str(split))
    if isinstance(source, (datasets.Dataset, list)):
        return as_dataset(source)
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(
            f"cannot load a dataset from {type(source).__name__}",
            fix="pass a datasets.Dataset, a list of row dicts, a path to a .jsonl/.json/.parquet/.csv file, or a hub "
            "name",
        )
    path = Path(source)
    if saved_to_disk(path):
        return load_data(_saved(path, split), split=split)
    if path.is_dir():  # one file per split, as datasets finds them (train.jsonl, data/test-00000-of-00001.parquet)
        files = split_files(path)
        if split is None:
            return datasets.DatasetDict({name: _load_shards(shards, text) for name, shards in files.items()})
        return _load_shards(_split_file(path, files, split), text)
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        return _load_local(path, split, text)
    loaded = datasets.load_dataset(str(source), split=split)
    return loaded


def _saved(path: Path, split: str | None):
    """What ``save_to_disk`` wrote at ``path``; a DataError for a split other than train of one saved Dataset (its
    rows were returned for any split: a held-out split evaluated on the training rows, silently)."""
    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.Dataset) and split not in (None, "train"):
        raise DataError(f"{path} is one saved Dataset, whose one split is 'train': there is no split {split!r}",
                        column="split", fix="save a DatasetDict with that split (DatasetDict({'train': ..., "
                        f"{split!r}: ...}}).save_to_disk), or hold rows out of it (eval_fraction)")  # fmt: skip
    return saved


def saved_to_disk(path: Path) -> bool:
    """Whether ``path`` is a folder ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` wrote."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


_EVAL_SPLITS = ("test", "validation", "valid", "dev", "eval")


_SHARD = re.compile(r"^(.+?)-(\d{5})-of-(\d{5})(\.|$)")  # train_sft-00001-of-00003.parquet: shard 1 of 3


def split_files(folder: Path) -> dict[str, list[Path]]:
    """A local dataset folder's data files by split, in the folder or its ``data/``: the split is the file's name
    before its suffixes and any shard number (``train.jsonl``; ``train_prefs-00000-of-00001.parquet``: train_prefs);
    a split's shards (``train_sft-00000-of-00003.parquet`` ...) are its files in their order, as ``datasets`` reads
    them; a lone file named after no evaluation split is ``train``, as ``datasets`` reads it. fastdpo's own
    ``*.dropped.json`` summaries are not data. A DataError for a split of several files that are not its shards
    (merge them, or give one file), a shard missing, or a folder with none."""
    files: dict[str, list[Path]] = {}
    shards: dict[str, tuple[int, str]] = {}  # split → (its shard count, its files' suffix)
    for file in sorted([*folder.glob("*"), *folder.glob("data/*")]):
        if file.is_file() and file.suffix.lower() in LOCAL_SUFFIXES and not file.name.endswith(".dropped.json"):
            shard = _SHARD.match(file.name)
            name = shard[1] if shard else file.name.split(".", 1)[0].split("-", 1)[0]
            count = (int(shard[3]), file.suffix.lower()) if shard else None
            if name in files and (count is None or shards.get(name) != count):
                raise DataError(f"{folder}: split {name!r} has several files ({files[name][0].name}, {file.name})",
                                fix="merge them into one file, or give the file you mean")  # fmt: skip
            files.setdefault(name, []).append(file)
            if count is not None:
                shards[name] = count
    for name, (count, _) in shards.items():
        numbers = sorted(int(_SHARD.match(file.name)[2]) for file in files[name])
        if numbers != list(range(count)):
            missing = sorted(set(range(count)) - set(numbers))
            raise DataError(f"{folder}: split {name!r} has {len(numbers)} of its {count} shards"
                            + (f" (shard {missing[0]:05d} is missing)" if missing else ""),
                            fix="download the missing shards, or give the files you mean")  # fmt: skip
        files[name].sort(key=lambda file: int(_SHARD.match(file.name)[2]))
    if not files:
        raise DataError(f"{folder}: a folder with no .jsonl, .json, .parquet or .csv file",
                        fix="give a data file, or a folder of one per split (train.jsonl, test.jsonl)")  # fmt: skip
    if len(files) == 1 and next(iter(files)) not in _EVAL_SPLITS:
        return {"train": next(iter(files.values()))}
    return files


def _split_file(folder: Path, files: dict[str, list[Path]], split: str) -> list[Path]:
    if split not in files:
        raise DataError(f"{folder} has no file for split {split!r} (its splits: {', '.join(files)})", column="split",
                        fix=f"name it {split}.jsonl (or .json, .parquet, .csv), or pick one of its splits")  # fmt: skip
    return files[split]


def _load_shards(files: list[Path], text: Iterable[str], stream: bool = False):
    """A split's files (its shards, in order) as one dataset (a stream: ``stream``); a DataError where their columns
    differ."""
    parts = [load_stream(file, text=text) if stream else _load_local(file, "train", text) for file in files]
    if len(parts) == 1:
        return parts[0]
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as error:
        raise DataError(f"{files[0].parent}: the shards {files[0].name} ... {files[-1].name} do not have the same "
                        f"columns ({str(error)[:200]})", fix="give each shard the same columns") from None  # fmt: skip


def load_stream(source, *, split: str = "train", text: Iterable[str] = TEXT_COLUMNS) -> datasets.IterableDataset:
    """``source`` as a ``datasets.IterableDataset``, read as it is iterated: a stream as it is, a Dataset through
    ``to_iterable_dataset``, a local ``.jsonl``/``.json``/``.parquet``/``.csv`` file or a hub name with
    ``load_dataset(..., streaming=True)``. A local file is not read ahead (a broken line fails where it is read),
    but for the first ``STREAM_COLUMNS_FROM`` bytes of a JSON Lines file, whose rows' keys are its columns;
    ``text``: as for ``load_data``."""
    if isinstance(source, datasets.IterableDataset):
        return source
    if isinstance(source, datasets.IterableDatasetDict):  # (load_dataset(..., streaming=True) of every split)
        return _pick_split(source, split, "the streamed dataset")
    if isinstance(source, (datasets.Dataset, datasets.DatasetDict)):
        return load_data(source, split=split).to_iterable_dataset()
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"cannot stream a dataset from {type(source).__name__}",
                        fix="pass a datasets.IterableDataset or Dataset, a local file or a hub name")  # fmt: skip
    path = Path(source)
    if saved_to_disk(path):  # (on disk already)
        return load_data(path, split=split).to_iterable_dataset()
    if path.is_dir():
        return _load_shards(_split_file(path, split_files(path), split), text, stream=True)
    if path.suffix.lower() in LOCAL_SUFFIXES or path.exists():
        kind = _local_kind(path)
        _one_split(path, split)
        if kind == "json":  # (as Python reads it: datasets' reader changes strings where a field's kinds differ)
            return datasets.IterableDataset.from_generator(_streamed_json, gen_kwargs={"path": str(path.resolve())})
        return datasets.load_dataset(
            kind, data_files={split: str(path)}, split=split, streaming=True, **_csv_options(path, kind, text)
        )
    return datasets.load_dataset(str(source), split=split, streaming=True)


STREAM_COLUMNS_FROM = 10 << 20  # bytes: a JSON Lines stream's columns, those of its rows in its first 10 MiB


def _streamed_json(path: str) -> Iterator[dict]:
    """The rows of a local JSON file for a stream, read one line at a time (a document whole, as ``datasets`` reads
    one), each value as Python's ``json`` reads it. Every row has the columns of the rows in the file's first
    ``STREAM_COLUMNS_FROM`` bytes (all of a document's), as ``datasets``' reader takes them from its first block (None
    where a row lacks one, as Arrow fills them); DataError at the line of a later row with another column, or of a
    value ``load_data`` could not hold (a lone surrogate, an integer over 64 bits)."""
    where, rows = json_rows(Path(path))
    if where == "row":  # a document, held whole: every row's keys
        rows = list(rows)
        ordered = table_columns([row for _, row in rows])
    else:
        ordered = list(_first_columns(Path(path)))
        head = list(itertools.islice(rows, 2))
        if len(head) == 1:  # (one line: rows under a key, or columns, refused as load_data refuses them)
            refuse_one_object(Path(path), head[0][1], one_line=True)
        rows = itertools.chain(head, rows)
    columns, size = set(ordered), STREAM_COLUMNS_FROM
    window = f"{size >> 20} MiB" if size >= 1 << 20 else f"{size:,} bytes"
    for number, row in rows:
        for name, value in row.items():
            if name not in columns:
                raise DataError(f"{path}: {where} {number}: a column that none of the rows in the file's first "
                                f"{window} has (a stream takes its columns from them)", column=name,
                                fix=f"give the first row {name!r} too (null where it has none)")  # fmt: skip
            problem = unholdable(value)
            if problem:
                raise DataError(f"{path}: {where} {number}: {problem}", column=name, fix=_UNHOLDABLE_FIX)
        yield {name: row.get(name) for name in ordered}


def _first_columns(path: Path) -> dict[str, None]:
    """The keys of the JSON Lines rows in the first ``STREAM_COLUMNS_FROM`` bytes of ``path``, in order (a line that
    does not parse ends the scan: the rows' own pass names it)."""
    keys: dict[str, None] = {}
    read = 0
    with open(path, "rb") as handle:
        for raw in handle:
            read += len(raw)
            try:
                row = json.loads(raw) if raw.strip() else {}
            except ValueError:
                break
            keys.update(dict.fromkeys(row if isinstance(row, dict) else ()))
            if read >= STREAM_COLUMNS_FROM:
                break
    return keys


def as_dataset(data) -> datasets.Dataset:
    """``data`` as a ``datasets.Dataset``: a Dataset as it is, a list of dicts (one per row) as a new one, with a
    column for every key of any row (None where a row lacks it)."""
    if isinstance(data, datasets.Dataset):
        return data
    if not isinstance(data, list):
        raise DataError(f"expected a datasets.Dataset or a list of row dicts, got {type(data).__name__}",
                        fix="load it first, e.g. with fastdpo.data.load_data (files, hub names)")  # fmt: skip
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            fix = "pass one dict per row, e.g. {'prompt': ..., 'chosen': ..., 'rejected': ...}"
            raise DataError(f"is a {type(row).__name__}, not a dict of column values", row=index, fix=fix)
    columns = table_columns(data)  # every row's keys (Dataset.from_list would keep the first row's only)
    try:
        return datasets.Dataset.from_dict({name: [row.get(name) for row in data] for name in columns})
    except (pyarrow.lib.ArrowException, TypeError, ValueError) as error:
        fix = "give each column values of one type in every row (all strings, or all message lists), or None where " \
              "a row has none"  # fmt: skip
        clash = _first_type_clash(data, columns)
        if clash is not None:
            row, column, kind, first, first_kind = clash
            raise DataError(f"is a {kind} where row {first} has a {first_kind}", row=row, column=column,
                            fix=fix) from None  # fmt: skip
        for column in columns:  # the clash is deeper (inside message lists): the first row that cannot join the rows
            row = _first_row_that_fails(data, column)  # before it
            if row is not None:
                raise DataError(f"its value's structure differs from the rows before ({error})", row=row,
                                column=column, fix=fix) from None  # fmt: skip
        raise DataError(f"the rows do not form one table: {error}", fix=fix) from None


def _first_row_that_fails(rows: list[dict], column: str) -> int | None:
    """The first row whose ``column`` value cannot join the earlier rows' in one Arrow column (a binary search over
    prefixes: a failing prefix stays failing as it grows); None when the whole column converts."""

    def converts(count: int) -> bool:
        try:
            datasets.Dataset.from_dict({column: [row.get(column) for row in rows[:count]]})
        except (pyarrow.lib.ArrowException, TypeError, ValueError):
            return False
        return True

    if converts(len(rows)):
        return None
    if not converts(1):  # (a value Arrow cannot hold at all)
        return 0
    low, high = 1, len(rows)  # converts(low) holds, converts(high) does not
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if converts(middle) else (low, middle)
    return high - 1


def _first_type_clash(rows: list[dict], columns: list[str]) -> tuple[int, str, str, int, str] | None:
    """(row, column, its kind, the first row with a value there, that value's kind) of the first value whose kind
    (string, number, list, ...) differs from the column's first non-None value; None when the kinds agree (the
    clash is deeper, e.g. inside message lists)."""
    for column in columns:
        first, joins = None, None
        for index, row in enumerate(rows):
            value = row.get(column)
            if value is None:
                continue
            kind = _kind(value)
            if first is None:
                first = (index, kind)
            elif kind != first[1]:
                if joins is None:  # (Arrow joins some kinds, ints and floats: then the clash is elsewhere)
                    joins = _first_row_that_fails(rows, column) is None
                if not joins:
                    return index, column, kind, first[0], first[1]
                break
    return None


def _kind(value) -> str:
    """What a value is, in words: numpy's scalars and arrays are numbers and lists as Python's are."""
    import numbers

    import numpy

    if isinstance(value, (bool, numpy.bool_)):
        return "boolean"
    for types, kind in ((str, "string"), (numbers.Number, "number"), ((list, tuple, numpy.ndarray), "list"),
                        (dict, "dict"), (bytes, "bytes")):  # fmt: skip
        if isinstance(value, types):
            return kind
    return type(value).__name__


def _pick_split(data, split: str, name: str):
    if split not in data:
        raise DataError(f"{name} has no split {split!r}", fix=f"choose one of {', '.join(repr(s) for s in data)}")
    return data[split]


def _local_kind(path: Path) -> str:
    """The ``datasets`` builder of a local file (``json``, ``parquet``, ``csv``); DataError when there is no such
    file or its suffix is none of ours."""
    if not path.is_file():
        raise DataError(f"{path}: no such file", fix="check the path (relative paths start from the current folder)")
    kind = LOCAL_SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise DataError(f"{path}: unknown file type {path.suffix!r}", fix="use .jsonl, .json, .parquet or .csv")
    return kind


def _one_split(path: Path, split: str | None) -> None:
    """A local file is one split, ``train`` (as ``datasets`` names it): another name is a mistake, not that split."""
    if split not in (None, "train"):
        raise DataError(f"{path} is one file, whose one split is 'train': there is no split {split!r}", column="split",
                        fix="give a folder with one file per split (train.jsonl, test.jsonl: fastdpo data split "
                            "writes them), or hold rows out with eval_fraction (not on a stream)")  # fmt: skip


def csv_header(path: Path) -> list[str]:
    """The column names of a CSV file (its first line that is not blank, as pandas reads it)."""
    with open(path, newline="", encoding="utf-8-sig", errors="replace") as file:
        return next((row for row in csv.reader(file) if "".join(row).strip()), [])


def _csv_options(path: Path, kind: str, text: Iterable[str]) -> dict:
    """The reader options that read a CSV file's ``text`` columns as text (an empty cell as missing) and its others
    as pandas does; none for other kinds."""
    if kind != "csv":
        return {}
    header = csv_header(path)
    text = set(text)
    return {
        "converters": {name: str for name in header if name in text},
        "keep_default_na": False,
        "na_values": {name: [""] if name in text else sorted(_PANDAS_MISSING) for name in header},
    }


def _load_local(path: Path, split: str | None, text: Iterable[str] = TEXT_COLUMNS):
    kind = _local_kind(path)
    _one_split(path, split)
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty", fix="point to a file with at least one row")
    not_strings, dates = _check_json(path, text) if kind == "json" else ({}, set())
    try:
        loaded = datasets.load_dataset(
            kind, data_files={"train": str(path)}, split="train", **_csv_options(path, kind, text)
        )
    except (DatasetGenerationError, ValueError) as error:  # Arrow or pandas refused a value
        raise _unreadable(path, kind, error) from None
    if kind == "json":
        _refuse_cast_blocks(path, loaded, not_strings)
        _refuse_changed_strings(path, loaded, text)
        loaded = _restore_date_strings(path, loaded, dates - set(not_strings))
    return datasets.DatasetDict({"train": loaded}) if split is None else loaded


# the kinds a Json column cannot hold beside a kind without changing a string ("42" read back as 42)
_JSON_CHANGES = {"number": ("string",), "boolean": ("string",), "string": ("number", "boolean")}


# columns whose nested values the trainers read as they are, besides the text columns: conversations (not tools:
# a tools string is read as JSON anyway)
_CONVERSATION_COLUMNS = ("messages", "conversations")


def _refuse_changed_strings(path: Path, loaded: datasets.Dataset, text: Iterable[str]) -> None:
    """One DataError at the first string that ``datasets`` gives back changed. Where a field's kinds differ between
    rows (a message's content a string in one, a list of parts in another), it holds every value there as JSON text,
    and a string that is itself JSON (``"4"``, ``"\\"yes\\""``, ``"null"``) comes back as that value (4, yes, None)."""
    names = [name for name in loaded.features if name in set(text) or name in _CONVERSATION_COLUMNS]
    fields = [(name, *steps) for name in names for steps in _json_fields(loaded.features[name])]
    if not fields:
        return
    where, rows = json_rows(path)
    for number, row in rows:
        for field in fields:
            for value in _values_at(row, field):
                read = _read_as_json(value) if isinstance(value, str) else None
                if read is not None:
                    named = field[0] + "".join("[]" if step is None else f".{step}" for step in field[1:])
                    raise DataError(
                        f"{path}: {where} {number}: the string {value[:60]!r} in {named} would be read "
                        f"back as {read[0]!r}: datasets holds {named} as JSON, its kinds differing "
                        "between rows",
                        column=field[0],
                        fix=f"give {named} one kind of value in every row (all strings, or all lists)",
                    )


def _json_fields(feature, steps: tuple = ()) -> list[tuple]:
    """The steps (a key; None for each item of a list) to each ``Json`` value inside ``feature``."""
    kind = type(feature).__name__
    if kind == "Json":
        return [steps]
    if isinstance(feature, dict):
        return [found for key, inner in feature.items() for found in _json_fields(inner, (*steps, key))]
    if kind in ("List", "LargeList", "Sequence"):
        return _json_fields(feature.feature, (*steps, None))
    return []


def _values_at(value, steps: tuple):
    if not steps:
        yield value
    elif steps[0] is None and isinstance(value, list):
        for item in value:
            yield from _values_at(item, steps[1:])
    elif isinstance(value, dict) and steps[0] in value:
        yield from _values_at(value[steps[0]], steps[1:])


def _read_as_json(value: str) -> tuple[object] | None:
    """(what ``datasets``' Json feature reads ``value`` back as,) when it reads it as JSON; None when it does not."""
    try:
        from datasets.utils.json import ujson_loads as loads  # (the reader datasets uses: 'NaN' is None there)
    except ImportError:
        loads = json.loads
    try:
        return (loads(value),)
    except ValueError:
        return None


_UNHOLDABLE_FIX = "fix or remove the value: Arrow holds no lone surrogate (\\ud800-\\udfff), no integer over 64 bits"
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_BOM = b"\xef\xbb\xbf"  # UTF-8's byte-order mark, which some editors write first


def stream_failure(source, error: Exception) -> Exception:
    """What a stream of the local file ``source`` failed on, as ``load_data`` says it (a broken line, a value Arrow
    cannot hold, by line), found by reading the file now; ``error`` itself for other sources."""
    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    if path is None or not path.is_file() or isinstance(error, DataError):  # (a JSON stream's rows say theirs)
        return error
    kind = _local_kind(path)
    if kind == "json":
        _check_json(path)  # (a DataError naming the broken line)
    return _unreadable(path, kind, error)


def _unreadable(path: Path, kind: str, error: Exception) -> DataError:
    """DataError for a file ``datasets`` failed on: the first JSON value Arrow cannot hold, by line (a document's: by
    row) and column (found only now, on the error path), else the reader's own message."""
    where, rows = json_rows(path) if kind == "json" else ("", ())
    first = _first_columns(path) if where == "line" else None
    late = "column names don't match" in str(error.__cause__ or error)
    for number, row in rows:
        for column, value in row.items():
            problem = unholdable(value)
            if problem:
                return DataError(f"{path}: {where} {number}: {problem}", column=column, fix=_UNHOLDABLE_FIX)
            if late and first is not None and column not in first:
                return DataError(f"{path}: line {number}: a column that none of the rows in the file's first "
                                 f"{STREAM_COLUMNS_FROM >> 20} MiB has (datasets reads JSON Lines in blocks, and "
                                 "takes the columns from the first)", column=column,
                                 fix=f"give the first row {column!r} too (null where it has none)")  # fmt: skip
    cause = error.__cause__ or error
    if where == "line" and "was specified twice" in str(cause):
        found = _first_repeated_key(path)
        if found is not None:
            return DataError(f"{path}: line {found[0]}: the key {found[1]!r} is written twice in one object (Python's "
                             "json would keep the last, datasets refuses it)", column=found[1],
                             fix="keep one of them")  # fmt: skip
    return DataError(f"{path}: datasets cannot read it ({type(cause).__name__}: {str(cause)[:200]})",
                     fix="check the file there (each column should hold one kind of value)")  # fmt: skip


def _first_repeated_key(path: Path) -> tuple[int, str] | None:
    """(line, key) of the first JSON Lines object of ``path`` (nested ones too) that holds a key twice."""

    class Repeated(Exception):
        pass

    def pairs(items: list[tuple[str, object]]) -> dict:
        keys = [key for key, _ in items]
        if len(set(keys)) < len(keys):
            raise Repeated(next(key for i, key in enumerate(keys) if key in keys[:i]))
        return dict(items)

    with open(path, "rb") as handle:  # (split at \n only, as the rows are counted)
        for number, raw in enumerate(handle, start=1):
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8", errors="replace")
            try:
                json.loads(line, object_pairs_hook=pairs) if line.strip() else None
            except Repeated as repeated:
                return number, str(repeated)
            except ValueError:
                continue
    return None


def unholdable(value) -> str | None:
    """What in ``value`` (nested lists and dicts too) Arrow cannot hold: a lone surrogate, an integer over 64 bits."""
    if isinstance(value, str):
        bad = _SURROGATE.search(value)
        return None if bad is None else f"a lone surrogate {bad.group()!r} at character {bad.start()}"
    if isinstance(value, int) and not isinstance(value, bool):
        return None if -(2**63) <= value < 2**63 else f"the integer {value} does not fit in 64 bits"
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next(filter(None, map(unholdable, children)), None)


def _check_json(path: Path, text: Iterable[str] = ()) -> tuple[dict[str, tuple[str, int, str]], set[str]]:
    """DataError naming the first line (of a JSON document: line and column) that is not valid JSON, or the layout
    of one object on one line holding the rows (``{"data": [...]}``, columns), which would load as one row, or the
    first row whose ``text`` column mixes strings with numbers or booleans: ``datasets`` reads such a column as a
    ``Json`` one, which gives back a string that reads as JSON (``"42"``, ``"true"``) as that value, and where the
    kinds first mix past its first block of rows (10 MiB), it casts that block to the first's strings, JSON-quoting
    every string there (``"fine"`` became ``'"fine"'``): either way the valid rows would change too. Returns, for each
    column, where its first value that is not a string (nor null) is: (``line``/``row``, its number, its kind); and
    the columns holding a string that reads as a date (``_DATE``)."""
    where, rows = json_rows(path)
    first, second = next(rows, None), next(rows, None)
    if first is None:  # datasets would fail with "Instruction 'train' corresponds to no data"
        raise DataError(f"{path}: the file has only blank lines", fix="point to a file with at least one row")
    if second is None and where == "line":
        refuse_one_object(path, first[1], one_line=True)
    not_strings: dict[str, tuple[str, int, str]] = {}
    dates: set[str] = set()
    seen: dict[str, dict[str, int]] = {name: {} for name in text}  # text column → kind → its first row
    for number, row in itertools.chain((first,), () if second is None else (second,), rows):
        for name, value in row.items():  # (every other line read, and checked)
            if type(value) is str:
                if value[:4].isdigit() and name not in dates and _DATE.match(value):
                    dates.add(name)
                if name in seen and "string" not in seen[name]:
                    _text_kind(path, where, number, name, "string", seen[name])
            elif value is not None:
                kind = _kind(value)
                if name not in not_strings:
                    not_strings[name] = (where, number, kind)
                if name in seen and kind not in seen[name]:
                    _text_kind(path, where, number, name, kind, seen[name])
    return not_strings, dates


def _text_kind(path: Path, where: str, number: int, name: str, kind: str, kinds: dict[str, int]) -> None:
    """Note ``kind`` (of row ``number`` of the text column ``name``) in ``kinds`` (kind → its first row); a DataError
    where it clashes with a kind seen before (``_JSON_CHANGES``)."""
    kinds.setdefault(kind, number)
    other = next((k for k in _JSON_CHANGES.get(kind, ()) if k in kinds), None)
    if other is not None:
        raise DataError(
            f"{path}: {where} {number}: is a {kind} where {where} {kinds[other]} has a {other}",
            column=name,
            fix='give the column one kind of value in every row (quote a number answer: "4")',
        )


# a string Arrow's JSON reader reads as a timestamp (ISO 8601) where a block's column holds only such strings
_DATE = re.compile(r"\d{4}-\d{2}-\d{2}([T ]\d{2}(:\d{2}(:\d{2}([.,]\d+)?)?)?)?\s*(Z|[+-]\d{2}(:?\d{2})?)?\s*$")


def _restore_date_strings(path: Path, loaded: datasets.Dataset, columns: set[str]) -> datasets.Dataset:
    """``loaded`` with the file's own strings in ``columns`` (strings only, some reading as dates) where they came
    back otherwise. Arrow's JSON reader read a block whose column held only such strings as timestamps
    (``"2024-05-01T12:00:00Z"`` came back as ``datetime(2024, 5, 1, 12, 0)``, its zone lost; a prompt
    ``"2024-01-01"`` as a datetime), and a later such block (past the first 10 MiB) of a column of strings as the
    timestamp's text (``"2024-05-01 12:00:00"``): such a column is compared with the file, one row at a time."""
    import pyarrow as pa

    columns = [name for name in loaded.column_names if name in columns]
    strings = [name for name in columns if getattr(loaded.features[name], "dtype", None) in ("string", "large_string")]
    if strings and path.stat().st_size > STREAM_COLUMNS_FROM:  # (one block: its strings are as written)
        values = loaded.select_columns(strings).with_format("arrow").iter(batch_size=4096)
        read = (row for batch in values for row in batch.to_pylist())
        written = (row for _, row in json_rows(path)[1])
        changed = {name for ours, theirs in zip(read, written, strict=False) for name in strings
                   if ours[name] != theirs.get(name)}  # fmt: skip
        strings = [name for name in strings if name not in changed]
    columns = [name for name in columns if name not in strings]
    if not columns:
        return loaded
    values: dict[str, list] = {name: [] for name in columns}
    for _, row in json_rows(path)[1]:
        for name in columns:
            values[name].append(row.get(name))
    order = loaded.column_names
    loaded = loaded.remove_columns(columns)
    for name in columns:
        loaded = loaded.add_column(name, pa.array(values.pop(name), pa.string()), feature=datasets.Value("string"))
    return loaded.select_columns(order)


def _refuse_cast_blocks(path: Path, loaded: datasets.Dataset, not_strings: dict[str, tuple[str, int, str]]) -> None:
    """One DataError where ``datasets`` made a column of strings from a file whose column holds other values too.
    It reads JSON Lines in blocks (10 MiB) and casts each to the first block's columns: a later block whose column
    mixes kinds was turned into JSON text, strings and all (``"fine"`` became ``'"fine"'``, a list its JSON)."""
    for name, feature in loaded.features.items():
        if name in not_strings and getattr(feature, "dtype", None) in ("string", "large_string"):
            where, number, kind = not_strings[name]
            raise DataError(f"{path}: {where} {number}: is a {kind} where the rows before it have strings: datasets "
                            "turned the block of rows around it into strings, as JSON text (its strings came back "
                            "quoted: '\"text\"')",
                            column=name, fix="give the column one kind of value in every row (or put rows of "
                            "different kinds in different files)")  # fmt: skip


def json_rows(path: Path) -> tuple[str, Iterator[tuple[int, dict]]]:
    """How the rows of a local JSON file are counted (``line`` of JSON Lines, ``row`` of a document) and
    (number, row) for each, as Python's ``json`` reads them; DataError at the first line that is not UTF-8, not
    JSON or not an object (a document's whole text checked first).

    JSON Lines are read one line at a time, split at ``\\n`` only, as ``datasets`` reads them: the file is never
    held whole (three copies of it were: bytes, text, lines), and a raw U+2028 or U+0085 inside a string, valid
    JSON, does not end a line (``str.splitlines`` would split there).
    """
    if _is_document(path):  # one JSON document (a list of rows)
        return "row", enumerate(_check_json_document(path))
    return "line", _json_lines(path)


def _json_lines(path: Path) -> Iterator[tuple[int, dict]]:
    read = False
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # (a byte-order mark, as datasets reads)
            except UnicodeDecodeError:
                raise DataError(f"{path}: line {number}: not valid UTF-8", fix="re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as error:
                if not read and line.lstrip().startswith("{"):
                    refuse_one_object(path)  # (the whole file one JSON object over several lines: not JSON Lines)
                raise DataError(
                    f"{path}: line {number}: invalid JSON ({error.msg.removesuffix(' at')} at character {error.colno})",
                    fix="fix or remove that line",
                ) from None
            if not isinstance(value, dict):
                raise DataError(
                    f"{path}: line {number}: expected a JSON object per line, got {type(value).__name__}",
                    fix='write each row as an object such as {"prompt": ..., "chosen": ..., "rejected": ...}',
                )
            read = True
            yield number, value


def _is_document(path: Path) -> bool:
    """Whether a JSON file is one document (a list of rows, ``[`` first) rather than JSON Lines."""
    with open(path, "rb") as handle:
        first = b""
        while not first and (chunk := handle.read(1 << 16)):
            first = chunk.lstrip().removeprefix(_BOM).lstrip()[:1]
    return first == b"["


def _check_json_document(path: Path) -> list[dict]:
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DataError(f"{path}: line {line}: not valid UTF-8", fix="re-encode the file as UTF-8") from None
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}: line {error.lineno}, column {error.colno}: invalid JSON ({error.msg})",
            fix="fix the file, or write one JSON object per line (.jsonl)",
        ) from None
    if not rows:
        raise DataError(f"{path}: the file holds an empty list", fix="point to a file with at least one row")
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(
                f"{path}: row {number}: expected a JSON object per row, got {type(row).__name__}",
                fix='write each row as an object such as {"prompt": ..., "chosen": ..., "rejected": ...}',
            )
    return rows
