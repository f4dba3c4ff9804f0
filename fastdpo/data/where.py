"""Row filters as text, ``"<column> <op> <value>"`` (``QualityReport.filter(where=...)``, ``fastdpo data filter
--where``): ``parse_where`` reads one, ``where_mask`` applies it (or a callable) to rows."""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import datasets

from fastdpo.errors import DataError, close_match

_WHERE = re.compile(r"^\s*([^\s<>=!]+)\s*(>=|<=|==|!=|>|<)\s*(.*?)\s*$")
_NUMBER = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")
_OPS = {">=": operator.ge, "<=": operator.le, ">": operator.gt, "<": operator.lt, "==": operator.eq, "!=": operator.ne}


def parse_where(text: str, columns: Iterable[str]) -> tuple[str, Callable[[Any], bool]]:
    """``"<column> <op> <value>"`` → (column, test of one value). None, NaN, and values that cannot be compared
    with a number fail the test, but for ``!=``, which they pass (they are not the value: ``status != tie`` keeps a
    row without a status); a string value is compared with the column's value as a string. An unquoted ``None`` or
    ``null`` is the missing value: ``status == null`` holds where it is None or NaN, ``status != null`` elsewhere;
    an unquoted ``true`` or ``false`` (any case) is that boolean to a boolean value (``label == true``)."""
    match = _WHERE.match(text)
    if match is None or not match[3]:
        raise DataError(
            f"cannot read where={text!r}",
            column="where",
            fix="write '<column> <op> <value>' with op one of >=, <=, >, <, ==, != (e.g. 'chosen_score >= 8')",
        )
    column, op, raw = match[1], _OPS[match[2]], match[3]
    if raw[0] in "<>=!":  # '>>= 8', '=< 8': not an operator this reads
        raise DataError(f"cannot read where={text!r}: {match[2] + raw.split()[0]!r} is not an operator", column="where",
                        fix="use one of >=, <=, >, <, ==, !=")  # fmt: skip
    quoted = len(raw) >= 2 and raw[0] == raw[-1] and raw[0] in "'\""
    if match[2] in (">=", "<=", ">", "<") and not quoted and not _NUMBER.match(raw):
        raise DataError(f"cannot read where={text!r}: {raw!r} is not a number, and {match[2]} compares numbers",
                        column="where", fix=f"write a number (8.5, not 8,5), or quote text: '{column} {match[2]} "
                        f'"{raw}"\'')  # fmt: skip
    columns = list(columns)
    if column not in columns:
        guess = close_match(column, columns)
        hint = f"did you mean {guess!r}? " if guess else ""
        raise DataError("unknown column in where", column=column, fix=f"{hint}columns: {', '.join(columns)}")
    if not quoted and raw.lower() in ("none", "null"):  # (== or !=: an ordering was refused above, not a number)
        wants_missing = match[2] == "=="

        def missing(value: Any) -> bool:
            return (value is None or (isinstance(value, float) and math.isnan(value))) == wants_missing

        return column, missing
    if quoted:
        target: float | str = raw[1:-1]
    else:
        target = float(raw) if _NUMBER.match(raw) else raw

    incomparable = match[2] == "!="  # (what a value that cannot be compared gives)
    truth = {"true": True, "false": False}.get(raw.lower()) if not quoted else None  # (JSON's and YAML's spelling)

    def test(value: Any) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return incomparable
        if isinstance(value, bool) and truth is not None:  # (KTO's label == true: it was "True" == "true")
            return op(value, truth)
        if isinstance(target, float):
            try:
                value = float(value)
            except (TypeError, ValueError):
                return incomparable
            return incomparable if math.isnan(value) else op(value, target)
        return op(value if isinstance(value, str) else str(value), target)

    return column, test


def where_mask(dataset, names: list[str], where, rows: list[int]) -> list[bool]:
    """Whether each of ``rows`` passes ``where``."""
    if isinstance(where, str):
        column, test = parse_where(where, names)
        if isinstance(dataset, datasets.Dataset):
            values = dataset.with_format(None).select_columns([column]).to_dict()[column]
        else:
            values = [r.get(column) if isinstance(r, Mapping) else None for r in dataset]
        return [test(values[i]) for i in rows]
    if not callable(where):
        raise DataError(f"where must be a string or a callable, got {type(where).__name__}", column="where")
    if isinstance(dataset, datasets.Dataset):
        return [bool(where(row)) for row in dataset.with_format(None).select(rows)]
    return [bool(where(dataset[i])) for i in rows]
