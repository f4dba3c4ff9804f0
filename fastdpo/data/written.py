"""Message lists written as text: a conversation saved where only text fits (a CSV cell, pandas' ``str`` of a list, a
JSON string) reads back as one string, is checked as fine text and is trained on as that text, brackets and all.
Preference and SFT preparation warn of such values once, counted; a stream counts them as it reads them. SFT
preparation also warns of KTO's undesirable completions, which it would train as targets."""

from __future__ import annotations

import ast
import contextlib
import contextvars
import json
import logging
import re

from fastdpo.data.schema import TEXT_DTYPES

logger = logging.getLogger(__name__)
_SAID = contextvars.ContextVar("fastdpo_row_warnings_said", default=False)


@contextlib.contextmanager
def row_warnings_said():
    """Within: the data warnings of preparation (message lists written as text, prompts both completions repeat, a
    text column left unread beside no prompt column) are left out: a run gave them for the whole data set as its
    file numbers the rows, and its later preparations (the held-out split's parts, the quality report's, the
    trainer's) gave them again by their own."""
    token = _SAID.set(True)
    try:
        yield
    finally:
        _SAID.reset(token)


def said() -> bool:
    """Whether the row warnings are left out here (``row_warnings_said``)."""
    return _SAID.get()


WRITTEN_MESSAGES_WHY = ("a message list written as text, trained on as that text: decode it into a list (json.loads, "
                        "or ast.literal_eval for Python's writing)")  # fmt: skip


def warn_written_messages(columns: dict[str, list]) -> None:
    """One counted warning for string values that are message lists written as text (JSON, or Python's ``str`` of
    a list, as pandas writes a column of lists to CSV): they would be trained on as that text, brackets and all.
    ``columns``: the text columns of the rows, read whole (a column of lists: no string written)."""
    if said():
        return
    found = {name: [row for row, value in enumerate(values) if written_messages(value)]
             for name, values in columns.items()}  # fmt: skip
    rows = sorted({row for found_rows in found.values() for row in found_rows})
    if rows:
        where = ", ".join(f"{name} ({len(found_rows)})" for name, found_rows in found.items() if found_rows)
        logger.warning("%d of %d rows hold message lists written as text in %s (rows %s): they are trained on as that "
                       "text. Decode them into lists (dataset.map with json.loads, or ast.literal_eval for Python's "
                       "writing), or keep conversations in JSONL or Parquet, which hold lists", len(rows),
                       len(next(iter(columns.values()))), where, rows[:5])  # fmt: skip


def warn_written_text(dataset, names) -> None:
    """``warn_written_messages`` over the string columns of ``dataset`` among ``names``."""
    text = [name for name in names if getattr(dataset.features.get(name), "dtype", None) in TEXT_DTYPES]
    if text:
        warn_written_messages(dataset.with_format(None).select_columns(text).to_dict())


_WRITTEN_LIST = re.compile(r"\s*\[\s*\{")
_NUMPY_ITEMS = re.compile(r"\}\s+\{")  # a NumPy array of dicts prints its items without commas between them


def written_messages(value) -> bool:
    """A message list written as text: JSON (pretty-printed too), Python's ``str`` of a list, or of a NumPy array
    (``Dataset.to_pandas()`` then ``to_csv``); ShareGPT's ``from``/``value`` messages too."""
    if not isinstance(value, str) or not _WRITTEN_LIST.match(value):
        return False
    for read in (json.loads, ast.literal_eval, lambda text: ast.literal_eval(_NUMPY_ITEMS.sub("}, {", text))):
        try:
            items = read(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        first = items[0] if isinstance(items, list) and items else None
        return isinstance(first, dict) and ("role" in first or {"from", "value"} <= first.keys())
    return False


def warn_undesirable_completions(dataset, refused=None) -> None:
    """One counted warning for SFT rows in KTO's unpaired layout (``prompt``, ``completion`` and a boolean ``label``)
    where some are labelled false: SFT trains every completion as a target, the undesirable ones too (as TRL's
    SFTTrainer does, without a word). The ``refused`` rows are not trained: not counted."""
    if said() or not {"prompt", "completion", "label"} <= set(dataset.column_names):
        return
    labels = dataset.with_format(None)["label"][:]
    if not all(isinstance(label, bool) for label in labels):
        return
    false = [row for row, label in enumerate(labels) if not label and row not in (refused or ())]
    if false:
        logger.warning("%d of %d rows are labelled false (KTO's undesirable completions; rows %s): SFT trains every "
                       "completion as a target, these too. Keep the desirable ones (fastdpo data filter FILE OUT "
                       "--where 'label == true', or Dataset.filter), or pair them for DPO (fastdpo data pairs FILE OUT "
                       "--group-by-prompt --completions completion --scores label)", len(false),
                       len(labels) - len(refused or ()), false[:5])  # fmt: skip
