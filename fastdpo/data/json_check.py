"""JSON and JSON Lines files as ``load_data`` checks them: every row read with Python's ``json`` (``json_rows``,
one line at a time), the first problem named by line (or a document's row) and column, and what ``datasets``'
reader would change restored or refused (strings of mixed-kind columns, blocks cast past its first 10 MiB,
date strings read as timestamps)."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import datasets

from fastdpo.data.json_layout import refuse_one_object
from fastdpo.data.local_files import open_data, read_data
from fastdpo.data.schema import TEXT_DTYPES
from fastdpo.errors import DataError

STREAM_COLUMNS_FROM = 10 << 20  # bytes: a JSON Lines stream's columns, those of its rows in its first 10 MiB


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
                    named = _field_name(field)
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


class _TwiceDict(dict):
    """An object that held ``key`` twice (``_mark_twice``)."""

    key = ""


def _mark_twice(items: list[tuple[str, object]]) -> dict:
    """``object_pairs_hook`` marking an object that holds a key twice as a ``_TwiceDict``."""
    key = _repeated([key for key, _ in items])
    if key is None:
        return dict(items)
    found = _TwiceDict(items)
    found.key = key
    return found


def _held_twice(value) -> _TwiceDict | None:
    """The first ``_TwiceDict`` in ``value`` (nested lists and dicts too)."""
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return value if isinstance(value, _TwiceDict) else next(filter(None, map(_held_twice, children)), None)


def _twice_in(row) -> tuple[str, str] | None:
    """(column, key) of a parsed row (``_mark_twice``) that holds a key twice: itself (the column is the key), or an
    object nested in a column."""
    if isinstance(row, _TwiceDict):
        return row.key, row.key
    for column, value in row.items() if isinstance(row, dict) else ():
        inner = _held_twice(value)
        if inner is not None:
            return column, inner.key
    return None


def _first_repeated_key(path: Path) -> tuple[int, str, str] | None:
    """(line, column, key) of the first JSON Lines object of ``path`` that holds a key twice: a row (the column is
    the key), or an object nested in a row's column."""
    with open_data(path) as handle:  # (split at \n only, as the rows are counted)
        for number, raw in enumerate(handle, start=1):
            line = raw.decode("utf-8-sig" if number == 1 else "utf-8", errors="replace")
            try:
                row = json.loads(line, object_pairs_hook=_mark_twice) if line.strip() else None
            except ValueError:
                continue
            found = _twice_in(row)
            if found is not None:
                return number, *found
    return None


def repeated_key(path: Path, found: tuple[int, str, str], where: str = "line") -> DataError:
    """DataError for ``_first_repeated_key``'s (line, column, key); ``where="row"``: a document's row."""
    number, column, key = found
    inside = "" if key == column else f" inside the column {column!r}"
    refuses = ", datasets refuses it" if where == "line" else ""
    return DataError(f"{path}: {where} {number}: the key {key!r} is written twice in one object{inside} (Python's "
                     f"json would keep the last{refuses})", column=column, fix="keep one of them")  # fmt: skip


def unholdable(value) -> str | None:
    """What in ``value`` (nested lists and dicts too) Arrow cannot hold: a lone surrogate, an integer over 64 bits."""
    if isinstance(value, str):
        bad = _SURROGATE.search(value)
        return None if bad is None else f"a lone surrogate {bad.group()!r} at character {bad.start()}"
    if isinstance(value, int) and not isinstance(value, bool):
        return None if -(2**63) <= value < 2**63 else f"the integer {value} does not fit in 64 bits"
    children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return next(filter(None, map(unholdable, children)), None)


Kinds = dict[tuple, dict[str, tuple[str, int]]]  # field (a column, then keys; None: a list's items) → kind → where


def _check_json(path: Path, text: Iterable[str] = ()) -> tuple[Kinds, set[str]]:
    """DataError naming the first line (of a JSON document: line and column) that is not valid JSON, or the layout
    of one object on one line holding the rows (``{"data": [...]}``, columns), which would load as one row, or the
    first row whose ``text`` column mixes strings with numbers or booleans: ``datasets`` reads such a column as a
    ``Json`` one, which gives back a string that reads as JSON (``"42"``, ``"true"``) as that value, and where the
    kinds first mix past its first block of rows (10 MiB), it casts that block to the first's strings, JSON-quoting
    every string there (``"fine"`` became ``'"fine"'``): either way the valid rows would change too. Returns, for each
    column and (in JSON Lines over one block) each field inside the text and conversation columns' lists and dicts (a
    message's content), where its first value of each kind is: kind → (``line``/``row``, its number); and the columns
    holding a string (theirs, or there their messages') that reads as a date (``_DATE``)."""
    where, rows = json_rows(path)
    first, second = next(rows, None), next(rows, None)
    if first is None:  # datasets would fail with "Instruction 'train' corresponds to no data"
        raise DataError(f"{path}: the file has only blank lines", fix="point to a file with at least one row")
    if second is None and where == "line":
        refuse_one_object(path, first[1], one_line=True)
    kinds: Kinds = {}
    strings: dict[str, int] = {}  # column → the first row holding a string there
    dates: set[str] = set()
    seen: dict[str, dict[str, int]] = {name: {} for name in text}  # text column → kind → its first row
    # the columns whose messages the trainers read, where a later block can be cast (one block's kinds are its own)
    later = where == "line" and path.stat().st_size > STREAM_COLUMNS_FROM
    nested = {*text, *_CONVERSATION_COLUMNS} if later else set()
    for number, row in itertools.chain((first,), () if second is None else (second,), rows):
        for name, value in row.items():  # (every other line read, and checked)
            if type(value) is str:
                if name not in strings:
                    strings[name] = number
                if value[:4].isdigit() and name not in dates and _DATE.match(value):
                    dates.add(name)
                if name in seen and "string" not in seen[name]:
                    _text_kind(path, where, number, name, "string", seen[name])
            elif value is not None:
                kind = _kind(value)
                kinds.setdefault((name,), {}).setdefault(kind, (where, number))
                if name in seen and kind not in seen[name]:
                    _text_kind(path, where, number, name, kind, seen[name])
                if name in nested and kind in ("list", "dict"):
                    _note_nested(value, (name,), (where, number), kinds, dates)
    for name, number in strings.items():
        kinds.setdefault((name,), {})["string"] = (where, number)
    return kinds, dates


def _note_nested(value, steps: tuple, at: tuple[str, int], kinds: Kinds, dates: set[str]) -> None:
    """Note in ``kinds`` where each field inside ``value`` (steps: keys; None for a list's items) first holds each
    kind of value (null not counted), and in ``dates`` the column when one of its strings reads as a date."""
    if type(value) is dict:
        for key, inner in value.items():
            if inner is not None:
                _note_field(inner, (*steps, key), at, kinds, dates)
    else:
        field = (*steps, None)
        for inner in value:
            if inner is not None:
                _note_field(inner, field, at, kinds, dates)


_JSON_KINDS = {str: "string", int: "number", float: "number", bool: "boolean", list: "list", dict: "dict"}


def _note_field(value, field: tuple, at: tuple[str, int], kinds: Kinds, dates: set[str]) -> None:
    kind = _JSON_KINDS[type(value)]  # (a value Python's json read)
    found = kinds.get(field)
    if found is None:
        kinds[field] = {kind: at}
    elif kind not in found:
        found[kind] = at
    if kind == "string":
        if value[:4].isdigit() and field[0] not in dates and _DATE.match(value):
            dates.add(field[0])
    elif kind == "list" or kind == "dict":
        _note_nested(value, field, at, kinds, dates)


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
    """``loaded`` with the file's own strings in ``columns`` (whose strings, or those of their messages, some read as
    dates) where they came back otherwise. Arrow's JSON reader read a block whose field held only such strings as
    timestamps (``"2024-05-01T12:00:00Z"`` came back as ``datetime(2024, 5, 1, 12, 0)``, its zone lost; a prompt
    or an answer's content ``"2024-01-01"`` as a datetime), and a later such block (past the first 10 MiB) of a
    field of strings as the timestamp's text (``"2024-05-01 12:00:00"``): such a column is compared with the file,
    one row at a time. (A column holding timestamps is restored too: JSON has none.)"""
    features = {name: _dates_as_strings(feature) for name, feature in loaded.features.items()}
    columns = [name for name, feature in loaded.features.items() if name in columns or features[name] != feature]
    same = [name for name in columns if features[name] == loaded.features[name]]
    if same and path.stat().st_size > STREAM_COLUMNS_FROM:  # (one block: its strings are as written)
        values = loaded.select_columns(same).with_format("arrow").iter(batch_size=4096)
        read = (row for batch in values for row in batch.to_pylist())
        written = (row for _, row in json_rows(path)[1])
        changed = {name for ours, theirs in zip(read, written, strict=False) for name in same
                   if ours[name] != theirs.get(name)}  # fmt: skip
        same = [name for name in same if name not in changed]
    columns = [name for name in columns if name not in same]
    if not columns:
        return loaded
    values: dict[str, list] = {name: [] for name in columns}
    for _, row in json_rows(path)[1]:
        for name in columns:
            values[name].append(row.get(name))
    written = datasets.Dataset.from_dict(values, features=datasets.Features({name: features[name] for name in columns}))
    order = loaded.column_names
    return datasets.concatenate_datasets([loaded.remove_columns(columns), written], axis=1).select_columns(order)


def _dates_as_strings(feature):
    """``feature`` with each timestamp or date value in it (nested too) a string."""
    kind = type(feature).__name__
    if kind == "Value":
        return datasets.Value("string") if feature.dtype.startswith(("timestamp", "date")) else feature
    if isinstance(feature, dict):
        return {key: _dates_as_strings(inner) for key, inner in feature.items()}
    if kind == "List":
        return datasets.List(_dates_as_strings(feature.feature), length=feature.length)
    if kind == "LargeList":
        return datasets.LargeList(_dates_as_strings(feature.feature))
    return feature


_CAST_SAYS = {
    "strings": ", as JSON text (its strings came back quoted: '\"text\"')",
    "numbers": ' (a string "0042" came back as 42)',
    "booleans": ' (a string "true" came back as True)',
}


def _refuse_cast_blocks(path: Path, loaded: datasets.Dataset, kinds: Kinds) -> None:
    """One DataError where ``datasets`` cast a column (or a field inside one: a message's content) to a kind the file
    does not hold there in every row. It reads JSON Lines in blocks (10 MiB) and casts each to the first block's
    kinds: a later block whose field mixes kinds was turned into JSON text, strings and all (``"fine"`` became
    ``'"fine"'``, a list its JSON), and a later block's number strings into numbers (``"0042"`` became 42)."""
    for field, found in kinds.items():
        dtype = str(getattr(_feature_at(loaded.features, field), "dtype", ""))
        if dtype in TEXT_DTYPES:
            odd = [(at, kind) for kind, at in found.items() if kind != "string"]
            before = "strings"
        elif dtype.startswith(("int", "uint", "float", "bool")) and "string" in found:
            odd, before = [(found["string"], "string")], "numbers" if dtype != "bool" else "booleans"
        else:
            continue
        if odd:
            (where, number), kind = min(odd, key=lambda item: item[0][1])
            named = _field_name(field)
            raise DataError(f"{path}: {where} {number}: {'' if len(field) == 1 else named + ' '}is a {kind} where the "
                            f"rows before it have {before}: datasets cast the block of rows around it to {before}"
                            + _CAST_SAYS[before],
                            column=field[0], fix=f"give {named} one kind of value in every row (or put rows of "
                            "different kinds in different files)")  # fmt: skip


def _feature_at(features, field: tuple):
    """The feature of ``features`` (a dataset's) at ``field`` (a column, then keys; None for a list's items), or
    None where there is none."""
    feature = features
    for step in field:
        if step is None:
            listed = type(feature).__name__ in ("List", "LargeList", "Sequence")
            feature = feature.feature if listed else None
        else:
            feature = feature.get(step) if isinstance(feature, dict) else None
        if feature is None:
            return None
    return feature


def _field_name(field: tuple) -> str:
    """``("prompt", None, "content")`` as ``prompt[].content``."""
    return field[0] + "".join("[]" if step is None else f".{step}" for step in field[1:])


def _block_kind(value) -> str | None:
    """A value's kind as Arrow's JSON reader types a block's column: a date string and an integer apart."""
    if value is None:
        return None
    if type(value) is str:
        return "date string" if value[:4].isdigit() and _DATE.match(value) else "string"
    return {int: "integer", float: "decimal number"}.get(type(value)) or _kind(value)


# a kind a column of the first block's kind takes as it is (a float column an integer, a string column a date)
_TAKES = {"integer": "decimal number", "date string": "string"}


def first_new_kind(path: Path) -> tuple[int, str, str, list[str]] | None:
    """(line, column, kind, the kinds its rows in the first block have) of the first value of a JSON Lines file past
    ``datasets``' first block (10 MiB) whose kind that block does not hold in its column (one kind only there: two
    make a ``Json`` column, which takes any); None where every value fits. ``datasets`` casts each block to the
    first's kinds: a string where that block's column held only nulls, or only dates (read as timestamps), a
    fraction where it held integers, fail there."""
    kinds: dict[str, set[str]] = {}
    read = 0
    with open_data(path) as handle:
        for number, raw in enumerate(handle, start=1):
            first, read = read < STREAM_COLUMNS_FROM, read + len(raw)  # (the line across the 10 MiB is the first's)
            try:
                row = json.loads(raw) if raw.strip() else {}
            except ValueError:
                return None
            for name, value in row.items() if isinstance(row, dict) else ():
                kind = _block_kind(value)
                held = kinds.setdefault(name, set())
                if kind is None:
                    continue
                if first:
                    held.add(kind)
                elif len(held) < 2 and kind not in held and _TAKES.get(kind) not in held:
                    return number, name, kind, sorted(held)
    return None


def json_rows(path: Path, *, one_key: bool = False) -> tuple[str, Iterator[tuple[int, dict]]]:
    """How the rows of a local JSON file are counted (``line`` of JSON Lines, ``row`` of a document) and
    (number, row) for each, as Python's ``json`` reads them; DataError at the first line that is not UTF-8, not
    JSON or not an object (a document's whole text checked first).

    JSON Lines are read one line at a time, split at ``\\n`` only, as ``datasets`` reads them: the file is never
    held whole (three copies of it were: bytes, text, lines), and a raw U+2028 or U+0085 inside a string, valid
    JSON, does not end a line (``str.splitlines`` would split there).
    """
    if _is_document(path):  # one JSON document (a list of rows)
        return "row", enumerate(_check_json_document(path))
    return "line", _json_lines(path, one_key)


def _one_of_each(items: list[tuple[str, object]]) -> dict:
    """An object's pairs as a dict; ``_Twice`` where one of its keys is written twice."""
    key = _repeated([key for key, _ in items])
    if key is not None:
        raise _Twice(key)
    return dict(items)


def _repeated(keys: list[str]) -> str | None:
    """The first of ``keys`` written a second time; None where each is there once."""
    if len(set(keys)) == len(keys):
        return None
    return next(key for i, key in enumerate(keys) if key in keys[:i])


class _Twice(Exception):
    pass


def _json_lines(path: Path, one_key: bool = False) -> Iterator[tuple[int, dict]]:
    """``json_rows``' rows of JSON Lines; ``one_key``: a DataError at a line with a key written twice in an object
    (as ``datasets`` refuses it; Python's json keeps the last)."""
    hook = _one_of_each if one_key else None
    read = False
    with open_data(path) as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8-sig" if number == 1 else "utf-8")  # (a byte-order mark, as datasets reads)
            except UnicodeDecodeError:
                raise DataError(f"{path}: line {number}: not valid UTF-8", fix="re-encode the file as UTF-8") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line, object_pairs_hook=hook)
            except _Twice as twice:
                found = _first_repeated_key(path) or (number, str(twice), str(twice))
                raise repeated_key(path, found) from None
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
    with open_data(path) as handle:
        first = b""
        while not first and (chunk := handle.read(1 << 16)):
            first = chunk.lstrip().removeprefix(_BOM).lstrip()[:1]
    return first == b"["


def not_utf8(path: Path, raw: bytes | None = None) -> DataError | None:
    """DataError naming the line and byte of the first bytes of ``path`` (its ``raw`` bytes) that are not UTF-8;
    None where all are."""
    raw = read_data(path) if raw is None else raw
    try:
        raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        return DataError(f"{path}: line {line}: not valid UTF-8 (byte 0x{raw[error.start]:02x})",
                         fix="re-encode the file as UTF-8")  # fmt: skip
    return None


def _check_json_document(path: Path) -> list[dict]:
    raw = read_data(path)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise not_utf8(path, raw) from None
    try:
        rows = json.loads(text, object_pairs_hook=_mark_twice)
    except json.JSONDecodeError as error:
        raise DataError(
            f"{path}: line {error.lineno}, column {error.colno}: invalid JSON ({error.msg})",
            fix="fix the file, or write one JSON object per line (.jsonl)",
        ) from None
    for number, row in enumerate(rows if isinstance(rows, list) else ()):  # (Python's json kept the last, silently)
        found = _twice_in(row)
        if found is not None:
            raise repeated_key(path, (number, *found), where="row")
    if not rows:
        raise DataError(f"{path}: the file holds an empty list", fix="point to a file with at least one row")
    for number, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(
                f"{path}: row {number}: expected a JSON object per row, got {type(row).__name__}",
                fix='write each row as an object such as {"prompt": ..., "chosen": ..., "rejected": ...}',
            )
    return rows
