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

import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets
import pyarrow
from datasets.exceptions import DatasetGenerationError

from fastdpo.data.hub import from_hub
from fastdpo.data.hub_config import refuse_config_of_local
from fastdpo.data.json_check import (
    _CONVERSATION_COLUMNS,
    _UNHOLDABLE_FIX,
    STREAM_COLUMNS_FROM,
    _check_json,
    _first_repeated_key,
    _kind,
    _refuse_cast_blocks,
    _refuse_changed_strings,
    _restore_date_strings,
    first_new_kind,
    json_rows,
    not_utf8,
    repeated_key,
    unholdable,
)
from fastdpo.data.json_layout import refuse_one_object
from fastdpo.data.local_files import (
    SAID_SUFFIXES,
    builder_of,
    check_csv_cells,
    checked_csv_records,
    csv_options,
    decompress_errors,
    extra_fields_fix,
    is_compressed,
    local_kind,
    named_as,
    not_decompressed,
    open_data,
    quiet_reader,
    readable,
    refuse_repeated_names,
    renamed,
    rowless,
)
from fastdpo.data.pairs import table_columns
from fastdpo.errors import DataError

# fastdpo's text fields: a CSV file's columns of these names (or of the names a column map gives them) are read as
# text, an empty cell as missing
TEXT_COLUMNS = ("prompt", "chosen", "rejected", "completion", "text", "system", "input", "context")


def text_columns(columns) -> tuple[str, ...]:
    """The columns a file's text is read from: ours (``TEXT_COLUMNS``) and the dataset's names that ``columns``
    (our name → the dataset's) gives our text fields and conversations (``messages`` under another name, whose
    strings a JSON file's check reads as it reads ours)."""
    mapped = columns.items() if isinstance(columns, dict) else ()
    ours = (*TEXT_COLUMNS, *_CONVERSATION_COLUMNS)
    return TEXT_COLUMNS + tuple(theirs for name, theirs in mapped if name in ours and isinstance(theirs, str))


def is_local(path: Path) -> bool:
    """A local file or folder, there or not (a data file's suffix names one), not a hub name."""
    return path.exists() or builder_of(path) is not None


def load_data(
    source, *, split: str | None = "train", text: Iterable[str] = TEXT_COLUMNS
) -> datasets.Dataset | datasets.DatasetDict:
    """A ``datasets.Dataset`` (or ``DatasetDict`` with ``split=None``) from ``source``.

    Args:
        source: a ``Dataset``/``DatasetDict``; a list of dicts, one per row; a local ``.jsonl``, ``.json``,
            ``.parquet``, ``.csv`` or ``.tsv`` file (compressed too: ``.jsonl.gz``), or a folder of one per split
            (``split_files``); or a hub name, passed to ``datasets.load_dataset``.
        split: which split of a ``DatasetDict`` or hub dataset; None keeps them all.
        text: a CSV file's columns to read as text (see ``text_columns``).
    """
    if isinstance(source, datasets.DatasetDict):
        return source if split is None else _pick_split(source, split, str(split))
    if isinstance(source, (datasets.Dataset, list)):
        return as_dataset(source)
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(f"cannot load a dataset from {type(source).__name__}", fix="pass a datasets.Dataset, a list "
                        f"of row dicts, a path to a {SAID_SUFFIXES} file, or a hub name")  # fmt: skip
    path = Path(source)
    refuse_config_of_local(path, local := is_local(path))
    if saved_to_disk(path):
        return load_data(_saved(path, split), split=split)
    if path.is_dir():  # one file per split, as datasets finds them (train.jsonl, data/test-00000-of-00001.parquet)
        files = split_files(path)
        if split is None:
            return datasets.DatasetDict({name: _load_shards(shards, text) for name, shards in files.items()})
        return _load_shards(_split_file(path, files, split), text)
    if local:
        return _load_local(path, split, text)
    return from_hub(source, split=split)


def _saved(path: Path, split: str | None):
    """What ``save_to_disk`` wrote at ``path``; a DataError for a split other than train of one saved Dataset (its
    rows were returned for any split: a held-out split evaluated on the training rows, silently)."""
    saved = datasets.load_from_disk(str(path))
    if isinstance(saved, datasets.Dataset) and split not in (None, "train"):
        raise DataError(f"{path} is one saved Dataset, whose one split is 'train': there is no split {split!r}",
                        option="split", fix="save a DatasetDict with that split (DatasetDict({'train': ..., "
                        f"{split!r}: ...}}).save_to_disk), or hold rows out of it (eval_fraction)")  # fmt: skip
    return saved


def folder_splits(path: Path) -> list[str] | None:
    """The split names of a local dataset folder (its files', or what ``save_to_disk`` saved); None for anything
    else (a file, a hub name: loading reads those)."""
    if not path.is_dir():
        return None
    if saved_to_disk(path):
        listed = path / "dataset_dict.json"
        return json.loads(listed.read_text()).get("splits", []) if listed.is_file() else ["train"]
    return list(split_files(path))


def saved_to_disk(path: Path) -> bool:
    """Whether ``path`` is a folder ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` wrote."""
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


_EVAL_SPLITS = ("test", "validation", "valid", "dev", "eval")


# train_sft-00001-of-00003.parquet: shard 1 of 3 (the hub's names may add a hash: -00003-a3ecf92756993583.parquet)
_SHARD = re.compile(r"^(.+?)-(\d{5})-of-(\d{5})(-[^.]+)?(\.|$)")


def split_files(folder: Path) -> dict[str, list[Path]]:
    """A local dataset folder's data files by split, in the folder or its ``data/``: the split is the file's name
    before its suffixes and any shard number (``train.jsonl``; ``train_prefs-00000-of-00001.parquet``: train_prefs);
    a split's shards (``train_sft-00000-of-00003.parquet`` ...) are its files in their order, as ``datasets`` reads
    them; a lone file named after no evaluation split is ``train``, as ``datasets`` reads it. fastdpo's own
    ``*.dropped.json`` summaries are not data. A DataError for a split of several files that are not its shards
    (merge them, or give one file), a shard missing, or a folder with none."""
    files: dict[str, list[Path]] = {}
    shards: dict[str, tuple[int, str]] = {}  # split → (its shard count, its files' suffix)
    numbers: dict[Path, int] = {}  # a shard → its number
    for file in sorted([*folder.glob("*"), *folder.glob("data/*")]):
        if (file.is_file() and builder_of(file) and not file.name.endswith(".dropped.json")
                and not file.name.startswith(".")):  # (hidden files: not data, as datasets reads a folder)  # fmt: skip
            shard = _SHARD.match(file.name)
            name = shard[1] if shard else file.name.split(".", 1)[0].split("-", 1)[0]
            count = (int(shard[3]), "".join(file.suffixes[-2:]).lower()) if shard else None
            if name in files and (count is None or shards.get(name) != count):
                known = shards.get(name)
                if count is not None and known is not None and known[0] == count[0]:  # (one set, two suffixes)
                    raise DataError(f"{folder}: split {name!r} has shards of two kinds ({files[name][0].name}, "
                                    f"{file.name})", fix="give a split's shards one suffix (compress all of them, or "
                                    "none), or move the other kind's files out of the folder")  # fmt: skip
                raise DataError(f"{folder}: split {name!r} has several files ({files[name][0].name}, {file.name})",
                                fix="merge them into one file, or give the file you mean")  # fmt: skip
            files.setdefault(name, []).append(file)
            if count is not None:
                shards[name], numbers[file] = count, int(shard[2])
    for name, (count, _) in shards.items():
        found = sorted(numbers[file] for file in files[name])
        twice = [file for file in files[name] if found.count(numbers[file]) > 1]
        if twice:
            raise DataError(f"{folder}: split {name!r} has shard {numbers[twice[0]]:05d} twice ("
                            + ", ".join(str(file.relative_to(folder)) for file in twice[:2]) + ")",
                            fix="keep one copy of each shard (in the folder or in its data/)")  # fmt: skip
        if found != list(range(count)):
            missing = sorted(set(range(count)) - set(found))
            raise DataError(f"{folder}: split {name!r} has {len(found)} of its {count} shards"
                            + (f" (shard {missing[0]:05d} is missing)" if missing else ""),
                            fix="download the missing shards, or give the files you mean")  # fmt: skip
        files[name].sort(key=numbers.__getitem__)
    if not files:
        raise DataError(f"{folder}: a folder with no {SAID_SUFFIXES.replace(' (', ' file (')}",
                        fix="give a data file, or a folder of one per split (train.jsonl, test.jsonl)")  # fmt: skip
    if len(files) == 1 and next(iter(files)) not in _EVAL_SPLITS:
        return {"train": next(iter(files.values()))}
    return files


def _split_file(folder: Path, files: dict[str, list[Path]], split: str) -> list[Path]:
    if split not in files:
        raise DataError(f"{folder} has no file for split {split!r} (its splits: {', '.join(files)})",
                        option="split", fix=f"name it {split}.jsonl (or .json, .parquet, .csv, .tsv), or pick one "
                        "of its splits")  # fmt: skip
    return files[split]


def _load_shards(files: list[Path], text: Iterable[str], stream: bool = False):
    """A split's files (its shards, in order) as one dataset (a stream: ``stream``); a DataError where their columns
    differ."""
    parts = [load_stream(file, text=text) if stream else _load_local(file, "train", text) for file in files]
    if len(parts) == 1:
        return parts[0]
    parts = _shared_kinds(parts, files)
    try:
        return datasets.concatenate_datasets(parts)
    except ValueError as error:
        raise DataError(f"{files[0].parent}: the shards {files[0].name} ... {files[-1].name} do not have the same "
                        f"columns ({str(error)[:200]})", fix="give each shard the same columns") from None  # fmt: skip


_NUMBERS = ("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32", "float64")


def _shared_kinds(parts: list, files: list[Path]) -> list:
    """A split's shards with a column of whole numbers in one and of fractions in another as fractions in every
    one, as ``datasets`` reads several files of one split; a DataError naming the column and two shards where its
    kinds differ otherwise (a number in one, text in another; a shard where the column holds nulls alone takes any)."""
    seen: dict[str, tuple[object, Path]] = {}  # column → its feature, the first shard with a value there
    wider: dict[str, object] = {}
    if any(part.features is None for part in parts):  # streams: their first rows' (as concatenating reads them)
        parts = [part._resolve_features() if part.features is None else part for part in parts]
    for part, file in zip(parts, files, strict=True):
        for name, feature in (part.features or {}).items():
            if getattr(feature, "dtype", None) == "null":  # (a column with no value in this shard takes any kind)
                continue
            first = seen.setdefault(name, (feature, file))
            if first[0] == feature:
                continue
            kinds = {getattr(first[0], "dtype", None), getattr(feature, "dtype", None)}
            if kinds <= set(_NUMBERS):
                wider[name] = datasets.Value("float64")
                continue
            said = [str(getattr(f, "dtype", None) or type(f).__name__) for f in (first[0], feature)]
            raise DataError(f"{files[0].parent}: column {name!r} holds {said[0]} in the shard {first[1].name} and "
                            f"{said[1]} in {file.name}", column=name,
                            fix="give the column one kind of value in every shard")  # fmt: skip
    if not wider:
        return parts
    return [part.cast(datasets.Features({**part.features, **{k: v for k, v in wider.items() if k in part.features}}))
            for part in parts]  # fmt: skip


def load_stream(source, *, split: str = "train", text: Iterable[str] = TEXT_COLUMNS) -> datasets.IterableDataset:
    """``source`` as a ``datasets.IterableDataset``, read as it is iterated: a stream as it is, a Dataset through
    ``to_iterable_dataset``, a local data file (``local_files``' suffixes) or a hub name with
    ``load_dataset(..., streaming=True)``. A local file is not read ahead (a broken line fails where it is read),
    but for the first ``STREAM_COLUMNS_FROM`` bytes of a JSON Lines file, whose rows' keys are its columns (a
    compressed JSON file is decompressed as it is read; a compressed CSV or Parquet file whole, first, into the
    cache); ``text``: as for ``load_data``."""
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
    refuse_config_of_local(path, local := is_local(path))
    if saved_to_disk(path):  # (on disk already)
        return load_data(path, split=split).to_iterable_dataset()
    if path.is_dir():
        return _load_shards(_split_file(path, split_files(path), split), text, stream=True)
    if local:
        kind = local_kind(path)
        _one_split(path, split)
        if kind == "json":  # (as Python reads it: datasets' reader changes strings where a field's kinds differ; a
            # compressed file decompressed as it is read)
            return datasets.IterableDataset.from_generator(_streamed_json, gen_kwargs={"path": str(path.resolve()),
                                                                                       "shown": str(path)})  # fmt: skip
        copy = readable(path)  # (a compressed CSV or Parquet file's decompressed copy: errors name the file)
        shown = {"path": str(copy.resolve()), "shown": str(path)}
        with named_as(copy, path):
            if kind == "csv":
                refuse_repeated_names(path)
            try:  # (a Parquet file's schema is read here)
                stream = datasets.load_dataset(
                    kind, data_files={split: str(copy)}, split=split, streaming=True, **csv_options(path, kind, text)
                )
            except (DatasetGenerationError, ValueError) as error:
                raise _unreadable(copy, kind, error) from None
        # (pandas' ParserError, Arrow's on a broken Parquet file, raised where it is read, name no file)
        return datasets.IterableDataset.from_generator(_named_failures, features=stream.features,
                                                       gen_kwargs={"stream": stream, **shown})  # fmt: skip
    return from_hub(source, split=split, streaming=True)


def _named_failures(stream, path: str, shown: str) -> Iterator[dict]:
    """The rows of ``stream`` (of the local file ``path``, which the user gave as ``shown``: its decompressed copy,
    or itself); a failure to read one as ``load_data`` names it. A CSV file's records are checked as ``load_data``
    checks them ahead (``check_csv_cells``), each before its row is given."""
    copy = Path(path)
    kind = builder_of(copy)
    checked = checked_csv_records(copy) if kind == "csv" else None
    rows, end = iter(stream), object()
    try:
        while True:
            with quiet_reader():  # (around each read, not across the yield: a failure is said by the DataError below)
                row = next(rows, end)
            if row is end:
                break
            if checked is not None and next(checked, True) is True:  # (its records checked: the file's end)
                checked = None
            yield row
    except DataError as error:  # (the check's)
        raise renamed(error, copy, Path(shown)) from None
    except (DatasetGenerationError, ValueError) as error:  # (pandas' ParserError is a ValueError)
        raise renamed(_unreadable(copy, kind, error), copy, Path(shown)) from None
    with named_as(copy, Path(shown)):
        for _ in checked or ():  # (records pandas did not read as rows)
            pass


def _streamed_json(path: str, shown: str) -> Iterator[dict]:
    """``_json_stream``'s rows of ``path``, its errors naming ``shown`` (the file the user gave, which ``path``
    decompresses, or ``path`` itself)."""
    with named_as(Path(path), Path(shown)):
        try:
            yield from _json_stream(path)
        except decompress_errors() as error:  # (a compressed file cut short, or not of its suffix's compression)
            if not is_compressed(Path(shown)):
                raise
            raise not_decompressed(Path(shown), error) from None


def _json_stream(path: str) -> Iterator[dict]:
    """The rows of a local JSON file for a stream, read one line at a time (a document whole, as ``datasets`` reads
    one), each value as Python's ``json`` reads it. Every row has the columns of the rows in the file's first
    ``STREAM_COLUMNS_FROM`` bytes (all of a document's), as ``datasets``' reader takes them from its first block (None
    where a row lacks one, as Arrow fills them); DataError at the line of a later row with another column, or of a
    value ``load_data`` could not hold (a lone surrogate, an integer over 64 bits)."""
    where, rows = json_rows(Path(path), one_key=True)  # (a key written twice: refused, as load_data refuses it)
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
    with open_data(path) as handle:
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


def _pick_split(data, split: str, name: str):
    if split not in data:
        raise DataError(f"{name} has no split {split!r}", fix=f"choose one of {', '.join(repr(s) for s in data)}")
    return data[split]


def _one_split(path: Path, split: str | None) -> None:
    """A local file is one split, ``train`` (as ``datasets`` names it): another name is a mistake, not that split."""
    if split not in (None, "train"):
        raise DataError(f"{path} is one file, whose one split is 'train': there is no split {split!r}", option="split",
                        fix="give a folder with one file per split (train.jsonl, test.jsonl: fastdpo data split "
                            "writes them), or hold rows out with eval_fraction (not on a stream)")  # fmt: skip


_HOLDING_STRINGS = {"string", "list", "dict"}  # a column's kinds whose dates are restored (strings, or messages')


def _load_local(path: Path, split: str | None, text: Iterable[str] = TEXT_COLUMNS):
    kind = local_kind(path)
    _one_split(path, split)
    copy = readable(path)  # (a compressed file's decompressed copy: errors name the file)
    with named_as(copy, path):
        loaded = _load_file(copy, kind, text)
    return datasets.DatasetDict({"train": loaded}) if split is None else loaded


def _load_file(path: Path, kind: str, text: Iterable[str]) -> datasets.Dataset:
    if path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty", fix="point to a file with at least one row")
    kinds, dates = _check_json(path, text) if kind == "json" else ({}, set())
    if kind == "csv":
        refuse_repeated_names(path)
        check_csv_cells(path)
    try:
        with quiet_reader():
            loaded = datasets.load_dataset(
                kind, data_files={"train": str(path)}, split="train", **csv_options(path, kind, text)
            )
    except (DatasetGenerationError, ValueError) as error:  # Arrow or pandas refused a value
        loaded = _without_blank_lines(path, kind, error)
    if kind == "json":
        _refuse_cast_blocks(path, loaded, kinds)
        _refuse_changed_strings(path, loaded, text)
        mixed = {field[0] for field, found in kinds.items() if len(field) == 1 and {*found} - _HOLDING_STRINGS}
        loaded = _restore_date_strings(path, loaded, dates - mixed)
    return loaded


def stream_failure(source, error: Exception) -> Exception:
    """What a stream of the local file ``source`` failed on, as ``load_data`` says it (a broken line, a value Arrow
    cannot hold, by line), found by reading the file now; ``error`` itself for other sources."""
    path = Path(source) if isinstance(source, (str, os.PathLike)) else None
    if path is None or not path.is_file() or isinstance(error, DataError):  # (a JSON stream's rows say theirs)
        return error
    kind, copy = local_kind(path), readable(path)
    with named_as(copy, path):
        if kind == "json":
            _check_json(copy)  # (a DataError naming the broken line)
        return renamed(_unreadable(copy, kind, error), copy, path)


def _without_blank_lines(path: Path, kind: str, error: Exception) -> datasets.Dataset:
    """JSON Lines with blank lines, which datasets' reader failed on where a column holds mixed kinds (its fallback
    parses every line, blank ones too: "Expected object or value", naming no line), read from a copy without them
    (the same rows); any other failure, as ``_unreadable`` says it."""
    import tempfile

    if kind != "json":
        raise _unreadable(path, kind, error) from None
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    kept = [line for line in lines if line.strip()]
    if raw.lstrip()[:1] == b"[" or len(kept) == len(lines) - (lines[-1] == b""):  # (a document; no blank line)
        raise _unreadable(path, kind, error) from None
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / path.name
        copy.write_bytes(b"\n".join(kept) + b"\n")
        try:  # (in memory, its cache in the copy's folder: a copy's path is new each time, its cache never reused)
            return datasets.load_dataset("json", data_files={"train": str(copy)}, split="train", cache_dir=folder,
                                         keep_in_memory=True)  # fmt: skip
        except (DatasetGenerationError, ValueError) as again:
            raise _unreadable(path, kind, again) from None


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
            return repeated_key(path, found)
    if isinstance(cause, UnicodeDecodeError) and (found := not_utf8(path)):  # (its position is in a block: the
        return found  # file's first is found here)
    fields = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(cause))
    if kind == "csv" and fields:  # (pandas counts the header as line 1, as an editor does)
        return DataError(
            f"{path}: line {fields[2]}: {fields[3]} fields where the header has {fields[1]}", fix=extra_fields_fix(path)
        )
    found = first_new_kind(path) if where == "line" else None
    if found is not None:
        number, column, odd, held = found
        held = " or ".join(k + "s" for k in held) or "only nulls"
        return DataError(f"{path}: line {number}: is a {odd} where the rows in the file's first "
                         f"{STREAM_COLUMNS_FROM >> 20} MiB have {held} "
                         "(datasets reads JSON Lines in blocks, and casts each to the first's kinds)", column=column,
                         fix=f"give {column!r} one kind of value in every row, or move a row with a {odd} there to "
                         "the top of the file")  # fmt: skip
    empty = rowless(path, kind)  # (datasets': "corresponds to no data!", "BatchSize must be greater than 0")
    if empty:
        return DataError(f"{path}: the file {empty}", fix="point to a file with at least one row")
    fix = ("write the file again, or download it again: it is not Parquet datasets can read" if kind == "parquet"
           else "check the file there (each column should hold one kind of value)")  # fmt: skip
    return DataError(f"{path}: datasets cannot read it ({type(cause).__name__}: {str(cause)[:200]})", fix=fix)
