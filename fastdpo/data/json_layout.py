"""A local JSON file that is one object rather than rows (``fastdpo.data.load``): its layout named, with the fix."""

from __future__ import annotations

import json
from pathlib import Path

from fastdpo.data.local_files import read_data
from fastdpo.errors import DataError


def refuse_one_object(path: Path, whole: dict | None = None, *, one_line: bool = False) -> None:
    """DataError naming the layout when the whole file is one JSON object (``one_line``: ``whole``, unless
    ``_a_row``), not rows: columns (each key a list of values), or rows under one key (``{"data": [...]}``)."""
    if whole is None:
        try:
            whole = json.loads(read_data(path).decode("utf-8-sig"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return
    if not isinstance(whole, dict) or not whole:
        return
    lists = {key: value for key, value in whole.items() if isinstance(value, list)}
    if one_line and _a_row(whole, lists):
        return
    under = [key for key, value in lists.items() if value and all(isinstance(row, dict) for row in value)]
    if len(under) == 1 and (len(whole) == 1 or len(lists) < len(whole)):
        raise DataError(f"{path}: one JSON object whose {under[0]!r} holds the rows, not a row per line",
                        fix=f"write those rows one per line (.jsonl), or pass datasets.load_dataset('json', "
                            f"data_files=..., field={under[0]!r}, split='train')")  # fmt: skip
    if len(lists) == len(whole) and len({len(value) for value in lists.values()}) == 1:
        raise DataError(f"{path}: one JSON object of columns (each key a list of values), not a row per line",
                        fix="write one object per row, e.g. pandas.read_json(path).to_json(out, orient='records', "
                            "lines=True) for a .jsonl file")  # fmt: skip
    if one_line:  # (one row whose values happen to be lists)
        return
    raise DataError(
        f"{path}: one JSON object over several lines, not a row per line",
        fix="write each row as one object on one line (.jsonl), or a list of row objects (.json)",
    )


def _a_row(whole: dict, lists: dict) -> bool:
    """Whether a file's one object is a row: messages in it, or neither rows under a key nor all columns of text
    (lists of ids, ``input_ids`` and ``labels``, are a tokenized row's)."""
    items = [item for value in lists.values() for item in value]
    if any(isinstance(item, dict) and "role" in item for item in items):
        return True
    rows = any(value and all(isinstance(r, dict) and not _ROW_KEYS.isdisjoint(r) for r in value)
               for value in lists.values())  # fmt: skip
    columns = len(lists) == len(whole) and any(isinstance(item, str) for item in items)
    return not (rows or columns)


_ROW_KEYS = {"prompt", "chosen", "rejected", "text", "messages", "completion", "conversations"}
