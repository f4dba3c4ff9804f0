"""TRL's dataset mixtures (``DatasetMixtureConfig``, the ``datasets:`` list of a ``trl dpo|sft`` config): several
datasets, each with its own configuration (``name``), split, files (``data_dir``, ``data_files``), columns kept and,
optionally, share of the mixture (``fraction``), concatenated into one set of rows as TRL's ``get_dataset`` does.

Each part is read as ``load_data`` reads a file, folder or hub name (a generic builder's local files, ``path: json``
with ``data_files``, file by file; other ``data_files``/``data_dir`` parts by ``datasets.load_dataset``), and every
problem names the part: ``datasets[1].columns``, ``datasets[0].name``. A column's type is made one across parts
where it can be (``datasets.concatenate_datasets`` said "features can't be aligned"), a column some parts lack is
None in their rows (as datasets fills it), and other differences are refused naming both parts."""

from __future__ import annotations

import dataclasses
import difflib
import glob
import logging
import math
import re
import sys
from pathlib import Path

from fastdpo.data.hub_config import hub_config
from fastdpo.data.schema import TEXT_DTYPES
from fastdpo.errors import ConfigError, DataError, offline_hint

logger = logging.getLogger("fastdpo")
PART_KEYS = ("path", "name", "data_dir", "data_files", "split", "columns", "fraction")
BUILDERS = ("json", "csv", "parquet")  # datasets' generic builders (path: json, with data_files)
_EXAMPLE = "e.g. datasets: [{path: pairs.jsonl}, {path: org/name, name: en, split: train_prefs, columns: [prompt, "
_EXAMPLE += "chosen, rejected]}]"


@dataclasses.dataclass(frozen=True)
class Part:
    """One dataset of a mixture, as TRL's ``DatasetConfig`` names its keys; ``index``: its place in the list."""

    index: int
    path: str
    name: str | None = None
    data_dir: str | None = None
    data_files: str | list | dict | None = None
    split: str = "train"
    columns: list | None = None
    fraction: float | None = None

    @property
    def where(self) -> str:
        return f"datasets[{self.index}]"

    @property
    def label(self) -> str:
        files = self.data_files if self.path in BUILDERS else None  # (path: json names no file: its data_files do)
        files = files if isinstance(files, str) or files is None else str(files).replace("'", "")
        shown = self.path if files is None else f"{self.path} {files if len(files) < 60 else files[:57] + '...'}"
        named = [f"name {self.name}"] if self.name else []
        split = [] if self.split == "train" else [f"split {self.split}"]
        return f"{self.where} ({', '.join([shown, *named, *split])})"


def parts_of(value) -> list[Part]:
    """The mixture's parts from the config's ``datasets`` value, each key checked; a ConfigError naming the part and
    key otherwise (TRL took a misspelt key as a TypeError from its dataclass, naming no part)."""
    if not isinstance(value, list) or not value:
        raise ConfigError(f"must be a list of datasets, got {value!r}", column="datasets", fix=_EXAMPLE)
    parts = [_part(index, item) for index, item in enumerate(value)]
    given = [part.fraction is not None for part in parts]
    if any(given) and not all(given):
        part = parts[given.index(False)]
        raise ConfigError("has no fraction where other datasets of the mixture have one", column=f"{part.where}",
                          fix="give every dataset a fraction (their shares of the mixture), or none")  # fmt: skip
    if all(given) and not sum(part.fraction for part in parts) > 0:
        raise ConfigError("every dataset's fraction is 0: the mixture would have no rows", column="datasets",
                          fix="give at least one dataset a share above 0")  # fmt: skip
    return parts


def _part(index: int, item) -> Part:
    where = f"datasets[{index}]"
    if not isinstance(item, dict):
        keys = ", ".join(PART_KEYS)
        raise ConfigError(f"is a {type(item).__name__} ({item!r}), not a mapping of keys", column=where,
                          fix=f"write each dataset as {{path: ..., split: ...}}; keys: {keys}")  # fmt: skip
    for key in item:
        if key not in PART_KEYS:
            close = difflib.get_close_matches(str(key), PART_KEYS, n=1)
            fix = f"did you mean {close[0]!r}?" if close else f"its keys: {', '.join(PART_KEYS)}"
            raise ConfigError(f"unknown key {key!r} of a mixture's dataset", column=f"{where}.{key}", fix=fix)
    values = dict(item)
    for key in ("path", "name", "data_dir", "split"):  # (path always; split where given; the others unless null)
        value = values.get(key)
        if key != "path" and (key not in values or (value is None and key != "split")):
            continue
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"must be a name, got {value!r}", column=f"{where}.{key}",
                              fix="a file, folder or hub name" if key == "path" else None)  # fmt: skip
    values["data_files"] = _files_value(values.get("data_files"), f"{where}.data_files")
    columns = values.get("columns")
    if isinstance(columns, str):  # (one column, as a list field's flag takes one item)
        columns = [columns]
    names = isinstance(columns, list) and columns and all(isinstance(c, str) for c in columns)
    if columns is not None and (not names or len(set(columns)) < len(columns)):
        raise ConfigError(f"must be a list of distinct column names, got {values.get('columns')!r}",
                          column=f"{where}.columns", fix="e.g. columns: [prompt, chosen, rejected]")  # fmt: skip
    values["columns"] = columns
    fraction = values.get("fraction")
    if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, (int, float))
                                 or not math.isfinite(fraction) or fraction < 0):  # fmt: skip
        raise ConfigError(f"must be a number ≥ 0 (the dataset's share of the mixture), got {fraction!r}",
                          column=f"{where}.fraction")  # fmt: skip
    return Part(index=index, **values)


def _files_value(value, column: str):
    """``data_files`` as ``datasets.load_dataset`` takes it: a file, a list of them, or split → file(s)."""

    def files(item) -> bool:
        return isinstance(item, str) or (isinstance(item, list) and item and all(isinstance(f, str) for f in item))

    mapping = isinstance(value, dict) and value and all(isinstance(k, str) and files(v) for k, v in value.items())
    if value is None or files(value) or mapping:
        return value
    raise ConfigError(f"must be a file, a list of files, or a mapping of split to file(s), got {value!r}",
                      column=column, fix="e.g. data_files: {train: data/train.jsonl}")  # fmt: skip


def load_mixture(parts: list[Part], *, text: tuple[str, ...] = (), streaming: bool = False):
    """``(rows, sizes)``: the parts read (``load_stream``'s streams with ``streaming``), their ``columns`` kept, cut
    to their ``fraction`` shares as TRL's ``get_dataset`` cuts them (the first ``round(share × N)`` rows of each, N
    the largest mixture no part is too short for), and concatenated; ``sizes``: each part's number of rows (None
    for a stream). ``text``: a CSV file's text columns."""
    loaded = [_concatenated(_load_part(part, text, streaming)) for part in parts]
    if parts[0].fraction is not None:
        if streaming:
            raise ConfigError("is a share of the mixture's rows, which a stream does not know before it is read",
                              column=f"{parts[0].where}.fraction", fix="leave fraction out, or streaming")  # fmt: skip
        total = sum(part.fraction for part in parts)
        shares = [part.fraction / total for part in parts]
        size = min(len(data) / share for data, share in zip(loaded, shares, strict=True) if share > 0)
        loaded = [data.select(range(round(share * size))) for data, share in zip(loaded, shares, strict=True)]
    sizes = [None if streaming else len(data) for data in loaded]
    if not streaming and not sum(sizes):
        raise DataError("the mixture has no rows", option="datasets", fix="check each dataset's path and split")
    return _concatenated([(part.label, part.where, data) for part, data in zip(parts, loaded, strict=True)]), sizes


def _kept(part: Part, label: str, column: str, data) -> tuple:
    """A piece of ``part`` (one of its files, or all of it) with the part's ``columns`` alone; a stream whose
    columns are not known before it is read (a JSON file's: its rows as Python reads them) has them picked row by
    row, a row without one a DataError naming the piece and row."""
    if part.columns is None:
        return label, column, data
    if data.column_names is None:
        import datasets

        named = {"label": label, "column": f"{part.where}.columns", "columns": tuple(part.columns)}  # (a list: shards)
        return label, column, datasets.IterableDataset.from_generator(_picked, gen_kwargs={"stream": data, **named})
    have = list(data.column_names)
    missing = [name for name in part.columns if name not in have]
    if missing:
        raise ConfigError(f"{label} has no column {missing[0]!r} (its columns: {', '.join(have)})",
                          column=f"{part.where}.columns", fix="keep columns it has, or leave columns out to keep "
                          "them all")  # fmt: skip
    return label, column, data.select_columns(part.columns)


def _picked(stream, label: str, column: str, columns: tuple):
    fix = "keep columns it has, or leave columns out to keep them all"
    for number, row in enumerate(stream):
        missing = [name for name in columns if name not in row]
        if missing:
            raise DataError(f"{label} has no column {missing[0]!r} (its columns: {', '.join(row)})", row=number,
                            column=column, fix=fix)  # fmt: skip
        yield {name: row[name] for name in columns}


def _load_part(part: Part, text: tuple[str, ...], streaming: bool) -> list[tuple]:
    """One part's rows as pieces ``(label, column, rows)``, its ``columns`` kept: of each split its ``split`` joins
    (``train+test``; datasets joins a hub dataset's), each cut to its slice (``train[:50%]``; datasets cuts a hub
    split itself)."""
    from fastdpo.data.load import is_local

    path = str(Path(part.path).expanduser()) if part.path.startswith("~") else part.path
    local = path in BUILDERS or is_local(Path(path))
    pieces = []
    for split in re.split(r"\s*\+\s*", part.split) if local else [part.split]:
        name, cut = _sliced(split)
        if cut is not None and streaming:
            raise ConfigError(f"{split!r} is a slice of the rows, which a stream does not know before it is read",
                              column=f"{part.where}.split", fix=f"split: {name}, or leave streaming out")  # fmt: skip
        read = _read_split(part, path, name if local else split, text, streaming)
        whole = _concatenated([_kept(part, *piece) for piece in read])
        pieces.append((part.label, part.where, _cut(whole, cut, part, split)))
    if not streaming and "[" in part.split and not sum(len(data) for _, _, data in pieces):
        raise ConfigError(
            f"{part.split!r} holds no row of {part.label}",
            column=f"{part.where}.split",
            fix="widen the slice, or leave the dataset out",
        )  # (datasets: "corresponds to no data")
    return pieces


def _read_split(part: Part, path: str, split: str, text: tuple[str, ...], streaming: bool) -> list[tuple]:
    """One split of a part as pieces ``(label, column, rows)``: ``load_data``/``load_stream``'s of a file, folder or
    hub name, a builder's local files one by one; ``datasets.load_dataset``'s for a hub dataset's
    ``data_dir``/``data_files``. Errors name the part."""
    from fastdpo.data.load import load_data, load_stream

    read = load_stream if streaming else load_data
    try:
        with hub_config(part.name, f"{part.where}.name"):
            if part.data_files is None and part.data_dir is None:
                return [(part.label, part.where, read(path, split=split, text=text))]
            if part.data_files is None and Path(path).is_dir():  # a local folder's data_dir: a folder of splits
                return [(part.label, part.where, read(str(Path(path) / part.data_dir), split=split, text=text))]
            files = _local_files(part, path, split)
            if files is not None:
                return [(f"{part.where}'s {file}", f"{part.where}.data_files", read(file, text=text))
                        for file in files]  # fmt: skip
            return [(part.label, part.where, _from_builder(part, path, streaming))]
    except (ConfigError, DataError) as error:
        if error.message.startswith(part.where) or str(error.column or "").startswith(part.where):
            raise
        column = {"split": f"{part.where}.split"}.get(error.column, error.column)  # (as the mixture names it)
        fix = (error.fix or "").replace("eval_fraction", "test_split_size") or None
        said = f"{part.label}: {error.message}"
        raise error.but(message=said, column=column, fix=fix) from None


_SLICE = re.compile(r"(?P<name>[^\[\]+]+)\[(?P<start>-?[\d_]+)?(?P<start_pct>%)?:(?P<stop>-?[\d_]+)?(?P<stop_pct>%)?\]"
                    r"(\((?P<rounding>closest|pct1_dropremainder)\))?")  # fmt: skip


def _sliced(split: str) -> tuple[str, tuple | None]:
    """``(name, cut)`` of a split as datasets writes its slices: ``train[:50%]``, ``train[10:-5]``,
    ``train[:10%](pct1_dropremainder)``; cut None where the split is a name alone."""
    found = _SLICE.fullmatch(split)
    if found is None:
        return split, None
    percent = bool(found["start_pct"] or found["stop_pct"])  # (one % makes both percentages, as datasets reads them)
    return found["name"], (found["start"], found["stop"], percent, found["rounding"] or "closest")


def _cut(data, cut: tuple | None, part: Part, split: str):
    """``data``'s rows in the slice ``cut``, as datasets cuts a split: percentages (at most 100) rounded to the
    closest row, or by whole hundredths (``pct1_dropremainder``, of 100 rows or more), negative bounds from the
    end."""
    if cut is None:
        return data
    size, (start, stop, percent, rounding) = len(data), cut
    if percent and rounding != "closest" and size < 100:
        raise ConfigError(f"{split!r}: pct1_dropremainder of {size} rows (fewer than 100) is always empty",
                          column=f"{part.where}.split", fix="drop (pct1_dropremainder)")  # fmt: skip

    def bound(text: str | None, default: int) -> int:
        if text is None:
            return default
        value = int(text.replace("_", ""))
        if percent and abs(value) > 100:
            raise ConfigError(f"{split!r}: a percentage is at most 100", column=f"{part.where}.split")
        if percent:
            value = round(value * size / 100.0) if rounding == "closest" else value * math.trunc(size / 100)
        return min(max(size + value, 0) if value < 0 else value, size)

    first, last = bound(start, 0), bound(stop, size)
    return data.select(range(first, last) if first < last else [])  # (an empty range at the end: datasets' IndexError)


def _local_files(part: Part, path: str, split: str) -> list[str] | None:
    """A generic builder's (``path: json``, ``csv``, ``parquet``) local ``data_files`` of ``split`` (a file or list
    of them: the split ``train``, as datasets names it), globs expanded; None where the files are not all local
    files of the builder's suffixes (datasets reads them)."""
    if path not in BUILDERS or part.data_dir is not None:
        return None
    from fastdpo.data.local_files import builder_of

    files = part.data_files
    if not isinstance(files, dict) and split != "train":  # (it read every file as split 'test', said nothing)
        raise ConfigError(f"{part.label}: data_files as a file or a list is one split, train: {split!r} names none "
                          "of it", column=f"{part.where}.split", fix="split: train (or a slice, train[:50%]), or "
                          "data_files: {SPLIT: FILES}")  # fmt: skip
    if isinstance(files, dict):
        if split not in files:
            raise ConfigError(f"data_files has no split {split!r} (its splits: {', '.join(files)})",
                              column=f"{part.where}.split", fix="name one of data_files' splits")  # fmt: skip
        files = files[split]
    found = []
    for pattern in [files] if isinstance(files, str) else files:
        pattern = str(Path(pattern).expanduser())
        matched = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matched:
            raise ConfigError(f"{pattern} matches no file", column=f"{part.where}.data_files",
                              fix="check the pattern (relative paths are read from the current directory)")  # fmt: skip
        found += matched
    if not all(builder_of(Path(file)) == path for file in found):
        return None
    return found


def _from_builder(part: Part, path: str, streaming: bool):
    import datasets

    try:
        return datasets.load_dataset(path, name=part.name, data_dir=part.data_dir, data_files=part.data_files,
                                     split=part.split, streaming=streaming)  # fmt: skip
    except (OSError, ValueError, ImportError, ConnectionError) as error:  # (datasets' and the hub's errors)
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        fix = f"check its path, data_dir, data_files and split{offline_hint(error)}"
        raise ConfigError(f"cannot load {part.label} ({first})", column=part.where, fix=fix) from None


def _concatenated(pieces: list[tuple]):
    """The rows of ``pieces`` (``(label, column, rows)``) one after another, a column's type made one where it can
    be (whole numbers in one piece, decimals in another: decimals); a column some pieces lack is None in their rows,
    as TRL's ``get_dataset`` fills it, said in a warning; a ConfigError naming both pieces where a column's kind
    differs (plain text in one, messages in another)."""
    import datasets

    if len(pieces) == 1:
        return pieces[0][2]
    if isinstance(pieces[0][2], datasets.IterableDataset):  # (rows as read, one stream after another: datasets'
        # concatenation types a JSON stream by its first 5 rows and changed later ones, 0.25 to 0, a name dropped)
        firsts = [next(iter(data), {}) for _, _, data in pieces]  # (the columns of each: its first row's)
        columns = tuple(dict.fromkeys(name for row in firsts for name in row))
        _say_lacking([label for label, _, _ in pieces], [set(row) for row in firsts], columns)
        return datasets.IterableDataset.from_generator(_one_after_another, gen_kwargs={
            "streams": [data for _, _, data in pieces], "columns": columns})  # fmt: skip
    first_label, _, first = pieces[0]
    out, target = [first], first.features
    origin = dict.fromkeys(target, first_label)  # (the piece each column's type came from, as errors name it)
    for label, column, data in pieces[1:]:
        if data.features != target:
            merged, unlike = _merged(target, data.features)
            if unlike is not None:
                raise _unlike(label, column, origin.get(unlike, first_label), data.features, target, unlike)
            origin.update({name: label for name in merged if name not in target or target[name] != merged[name]})
            try:
                out = [earlier.cast(_only(merged, earlier)) for earlier in out]
                data, target = data.cast(_only(merged, data)), merged
            except (ValueError, TypeError, OverflowError) as error:  # (Arrow's: -1 into uint8, 2**60+1 into float64)
                said = " ".join(str(error).split())[:200]
                raise ConfigError(f"{label} and the datasets before it cannot be read as one set of rows ({said})",
                                  column=column, fix="give each column one type in every dataset, or leave it out "
                                  "with columns: [...]") from None  # fmt: skip
        out.append(data)
    _say_lacking([label for label, _, _ in pieces], [set(data.column_names) for data in out], target)
    return datasets.concatenate_datasets(out)


def _say_lacking(labels: list[str], columns: list[set], names) -> None:
    """A warning naming the pieces (``labels``, their ``columns``) that lack one of ``names``."""
    lacking = {name: [label for label, have in zip(labels, columns, strict=True) if name not in have] for name in names}
    said = [f"{', '.join(found)} {'has' if len(found) == 1 else 'have'} no column {name!r}"
            for name, found in lacking.items() if found]  # fmt: skip
    if said:
        logger.warning("%s: their rows get None there, as TRL's get_dataset fills them (columns: [...] keeps the "
                       "shared ones)", "; ".join(said))  # fmt: skip


def _one_after_another(streams: list, columns: tuple):
    for stream in streams:
        for row in stream:
            yield {**dict.fromkeys(columns), **row}  # (a column one dataset lacks: None, as in loaded rows)


def _only(features, data):
    """``features`` of ``data``'s own columns (a cast takes no column the rows lack)."""
    import datasets

    return datasets.Features({name: feature for name, feature in features.items() if name in data.features})


_NUMBERS = ("bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float16", "float32",
            "float64")  # fmt: skip


def _merged(ours, theirs) -> tuple:
    """``(features, None)``: one type per column for two pieces (``_one_type``), or ``(None, column)``: the first
    column whose kinds differ otherwise."""
    import datasets

    merged = {}
    for name in {**ours, **theirs}:
        mine, other = ours.get(name, theirs.get(name)), theirs.get(name, ours.get(name))  # (one piece's alone: its own)
        merged[name] = _one_type(mine, other)
        if merged[name] is None:
            return None, name
    return datasets.Features(merged), None


def _one_type(mine, other):
    """A type both features cast to, or None: a column of nulls takes the other's type, whole numbers and decimals
    the wider, messages with other keys in one dataset (``name``, ``tool_calls``) every key (absent ones None, which
    the preparation leaves out, as it does within one file)."""
    import datasets

    if mine == other:
        return mine
    for null, kept in ((mine, other), (other, mine)):  # (a column, or a list, that held no value in one dataset)
        if isinstance(null, datasets.Value) and null.dtype == "null":
            return kept
    if isinstance(mine, datasets.Value) and isinstance(other, datasets.Value):
        if mine.dtype in _NUMBERS and other.dtype in _NUMBERS:  # (decimals where either has them, else int64: wide)
            return datasets.Value("float64" if "float" in mine.dtype + other.dtype else "int64")
        if {mine.dtype, other.dtype} == set(TEXT_DTYPES):  # (JSON's text and CSV's, Parquet's from pandas)
            return datasets.Value("large_string")
        return None
    if isinstance(mine, dict) and isinstance(other, dict):
        both = {key: _one_type(mine[key], other[key]) if key in mine and key in other else mine.get(key, other.get(key))
                for key in {**mine, **other}}  # fmt: skip
        return None if None in both.values() else both
    if isinstance(mine, list) and isinstance(other, list) and len(mine) == len(other) == 1:
        inner = _one_type(mine[0], other[0])
        return None if inner is None else [inner]
    if type(mine) is type(other) and dataclasses.is_dataclass(mine) and hasattr(mine, "feature"):  # List, Sequence
        inner = _one_type(mine.feature, other.feature)
        same = getattr(mine, "length", -1) == getattr(other, "length", -1)
        return None if inner is None or not same else dataclasses.replace(mine, feature=inner)
    return None


def _unlike(label: str, column: str, first_label: str, features, target, name: str) -> ConfigError:
    kinds = [_kind(features[name]), _kind(target[name])]
    if kinds[0] == kinds[1]:  # (messages with other keys in one: the features themselves)
        kinds = [f"{kind}: {str(feature)[:160]}" for kind, feature in zip(kinds, (features[name], target[name]),
                                                                          strict=True)]  # fmt: skip
    formats = "text" in kinds and any(kind.startswith("a list") for kind in kinds)
    fix = ("mix datasets of one format: all plain text, or all conversational messages" if formats else
           f"give {name!r} one type in every dataset, or leave it out with columns: [...]")  # fmt: skip
    return ConfigError(f"column {name!r} of {label} is {kinds[0]}, of {first_label} {kinds[1]}", column=column, fix=fix)


def _kind(feature) -> str:
    import datasets

    if isinstance(feature, datasets.Value):
        return "text" if feature.dtype in TEXT_DTYPES else f"{feature.dtype} values"
    if isinstance(feature, (list, dict)) or type(feature).__name__ in ("Sequence", "List", "LargeList"):
        return "a list or mapping (messages, or values)"
    return type(feature).__name__


def describe(parts: list[Part], sizes: list) -> str:
    """The mixture's rows by part, as errors and the quality report number them (rows 0–99: datasets[0] ...)."""
    if any(size is None for size in sizes):
        return "; ".join(part.label for part in parts)
    ranges, start = [], 0
    for part, size in zip(parts, sizes, strict=True):
        span = f"row {start}" if size == 1 else f"rows {start}–{start + size - 1}"
        ranges.append(f"{span}: {part.label}" if size else f"no rows: {part.label}")
        start += size
    return "; ".join(ranges)


def say(parts: list[Part], sizes: list) -> None:
    what = "1 dataset" if len(parts) == 1 else f"{len(parts)} datasets"
    print(f"fastdpo: a mixture of {what}, {describe(parts, sizes)}", file=sys.stderr)
