"""Rows named as their source numbers them. The ``fastdpo`` command hands a trainer what is left of a data file once
it dropped rows (those preparation refuses, the quality filter's, the held-out ones): within ``numbered_as``, the
trainer's warnings and errors name a dropped or faulty row by its row in the file, not by its place among the rows
the trainer was given. Outside it (the Python API) a row is the given dataset's."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

from fastdpo.errors import DataError

_SOURCE_ROWS: ContextVar[dict[str, Sequence[int]] | None] = ContextVar("fastdpo_source_rows", default=None)


@contextmanager
def numbered_as(rows: dict[str, Sequence[int] | None]) -> Iterator[None]:
    """Within: row ``i`` of a trainer's split ``name`` (``"train"``, ``"eval"``) is named ``rows[name][i]``; a split
    without an entry (None) keeps its own numbering."""
    token = _SOURCE_ROWS.set({name: known for name, known in rows.items() if known is not None})
    try:
        yield
    finally:
        _SOURCE_ROWS.reset(token)


def source_rows(split: str, rows: Sequence[int]) -> list[int]:
    """``rows`` of the trainer's split ``split`` as their source numbers them (``numbered_as``)."""
    known = (_SOURCE_ROWS.get() or {}).get(split)
    return list(rows) if known is None else [known[row] for row in rows]


def source_dropped(dropped: dict[str, dict[str, list[int]]]) -> dict[str, dict[str, list[int]]]:
    """A trainer's ``dropped_rows`` (split → reason → rows) as the source numbers the rows."""
    return {split: {reason: source_rows(split, rows) for reason, rows in reasons.items()}
            for split, reasons in dropped.items()}  # fmt: skip


@contextmanager
def rows_of(split: str) -> Iterator[None]:
    """A ``DataError`` raised within, naming a row of ``split``, names it as its source does."""
    try:
        yield
    except DataError as error:
        if error.row is None or split not in (_SOURCE_ROWS.get() or {}):
            raise
        raise error.but(row=source_rows(split, [error.row])[0]) from None
