"""Errors a user can cause, each with where it happened and how to fix it.

    DataError: row 17, column 'chosen': is empty — drop the row or run 'fastdpo data filter'
    ConfigError: option 'loss_type': unknown value 'sigmod' — did you mean 'sigmoid'?

Both subclass ``ValueError`` so code that already catches ``ValueError`` keeps working.
"""

from __future__ import annotations

import collections
import difflib
from collections.abc import Iterable


class _UserError(ValueError):
    """An error in the user's data or settings: a message, and optionally the row, the column (a ConfigError's: the
    option) and a fix."""

    _place = "column"  # (what ``column`` names, as the message says it)

    def __init__(
        self,
        message: str,
        *,
        row: int | None = None,
        column: str | None = None,
        fix: str | None = None,
        option: str | None = None,
    ) -> None:
        if option is not None:  # (a data problem found under a setting: said as "option 'data_filter'")
            column, self._place = option, "option"
        if message.startswith("Caught ") and "\nOriginal Traceback" in message and row is column is fix is None:
            # torch re-raising it from a DataLoader worker with the worker's traceback as its message: its own line
            message = message.rstrip("\n").rsplit("\n", 1)[-1].split(": ", 1)[-1]
        self.message = message
        self.row = row
        self.column = column
        self.fix = fix
        super().__init__(self._render())

    def _render(self) -> str:
        where = []
        if self.row is not None:
            where.append(f"row {self.row}")
        if self.column is not None:
            where.append(f"{self._place} '{self.column}'")
        text = f"{', '.join(where)}: {self.message}" if where else self.message
        if self.fix:
            text = f"{text} — {self.fix}"
        return text

    @property
    def option(self) -> str | None:
        """The setting the error is said under ("option 'X'"), or None."""
        return self.column if self._place == "option" else None

    def _fields(self) -> dict:
        """The keyword arguments that make this error again (a DataError under an option: ``option``)."""
        place = "option" if self._place != type(self)._place else "column"
        return {"row": self.row, place: self.column, "fix": self.fix}

    def but(self, message: str | None = None, **changes) -> _UserError:
        """This error with ``changes`` (``row``, ``column``, ``fix``) and its ``message``, of its type and said at
        the same kind of place (a DataError under an option stays one)."""
        fields = self._fields()
        if "option" in fields and "column" in changes:
            changes["option"] = changes.pop("column")
        return type(self)(self.message if message is None else message, **{**fields, **changes})

    def __reduce__(self):
        # Keep the fields when the error crosses a process boundary (dataloader workers, multiprocessing)
        return (_rebuild, (type(self), self.message, self._fields()))


def _rebuild(cls, message, fields):
    return cls(message, **fields)


class DataError(_UserError):
    """Something is wrong with a dataset: a row, a column, a file (``option``: found under a setting, said so)."""


class ConfigError(_UserError):
    """Something is wrong with a setting: ``column`` names the option (said as ``option 'beta'``)."""

    _place = "option"


def close_match(name: str, choices: Iterable[str]) -> str | None:
    """The most similar of ``choices`` to ``name`` (for 'did you mean' hints), or None when none is close."""
    matches = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return matches[0] if matches else None


def unknown_choice(option: str, value: str, choices: Iterable[str]) -> ConfigError:
    """A ConfigError for ``option=value`` not among ``choices``, suggesting the closest one."""
    choices = list(choices)
    guess = close_match(value, choices)
    fix = f"did you mean '{guess}'?" if guess else f"use one of {', '.join(repr(c) for c in choices)}"
    return ConfigError(f"unknown value {value!r}", column=option, fix=fix)


def every_row_refused(refused: dict[int, DataError]) -> DataError:
    """The error of data whose every row was refused (row → its error): the first row's, saying that none is left."""
    first = next(iter(refused.values()))
    if len(refused) == 1:
        return first
    counts = dict(collections.Counter(error.column or "row" for error in refused.values()))
    return DataError(
        f"{first.message}, and no row is left: all {len(refused)} are refused ({counts})",
        row=first.row,
        column=first.column,
        fix=f"check the data and its column map (the first row's fix: {first.fix})",
    )


_UNREACHABLE = ("couldn't connect", "couldn't reach", "name or service not known", "temporary failure in name "
                "resolution", "max retries exceeded", "connection refused", "network is unreachable")  # fmt: skip


def offline_hint(error: BaseException) -> str:
    """``", or, without network, ..."`` where ``error`` (or what caused it) says the hub could not be reached and
    offline mode is off: huggingface_hub retried for 25-50 s before that error; ``HF_HUB_OFFLINE=1`` reads its
    cache at once. Else ``""``."""
    import os

    if any(os.environ.get(name, "").lower() in ("1", "true", "yes", "on") for name in (
            "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")):  # fmt: skip
        return ""
    said, seen = [], error
    while seen is not None and len(said) < 8:
        said.append(f"{type(seen).__name__}: {seen}".lower())
        seen = seen.__cause__ or seen.__context__
    if not any(word in text for text in said for word in (*_UNREACHABLE, "localentrynotfounderror")):
        return ""
    return ", or, without network, set HF_HUB_OFFLINE=1 to read the local cache only (no retries of the hub)"
