"""Iterable (streaming) preference datasets, prepared lazily, row by row as training reads them.

A ``datasets.IterableDataset`` (``load_dataset(..., streaming=True)``, ``Dataset.to_iterable_dataset()``) has no
length and is read, not held: ``prepare_stream`` chains lazy maps onto it that give each row what
``prepare_preferences`` then ``tokenize_preferences`` give a map-style dataset (the same ids, TRL's):

- the format and the columns are read from the first row (``columns=``, the score aliases and ``format=`` as for
  ``prepare_preferences``); the tokenizer is checked against it;
- each row is checked when it is read, with the map-style checks: the first bad value raises one ``DataError``
  naming its row, counted from 0 over the stream as the trainer reads it (after any ``shuffle``; per DataLoader
  worker when there are several);
- rows TRL drops (the prompt alone fills ``max_length`` under ``keep_start``) are dropped, and rows whose roles
  are out of order are trained on as they are (TRL's behaviour); both are logged at the first such row and
  counted, with their rows, in ``dropped_rows`` / ``flagged_rows``, which fill as the stream is read (in this
  process: DataLoader workers count in their own copies) — ``summary()`` says what they hold.

What needs the whole dataset before the first step does not apply to a stream: the reference cache, token-budget
batches and balancing ranks by tokens (the trainer refuses or skips them, and says so).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import datasets

from fastdpo.data.formats import (
    DEFAULT_INPUT_TEMPLATE,
    DEFAULT_SYSTEM_TEMPLATE,
    FORMATS,
    _normalize_row,
    _rename,
    check_row,
    check_template,
)
from fastdpo.data.schema import missing_column, value_format
from fastdpo.data.tokenize import _clip_lengths, _tokenize_batch, check_lengths, check_tokenizer, conversation_fits
from fastdpo.errors import DataError, unknown_choice

logger = logging.getLogger(__name__)

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


@dataclass
class StreamedPreferences:
    """A prepared stream, and what reading it has dropped or flagged so far (reason → stream rows)."""

    dataset: datasets.IterableDataset
    name: str = "train"
    dropped_rows: dict[str, list[int]] = field(default_factory=dict)
    flagged_rows: dict[str, list[int]] = field(default_factory=dict)

    def note(self, kind: str, reason: str, row: int, why: str) -> None:
        """Count ``row`` under ``reason`` (``kind``: "dropped" or "flagged"), logging the first of each reason."""
        rows = (self.dropped_rows if kind == "dropped" else self.flagged_rows).setdefault(reason, [])
        rows.append(row)
        if len(rows) == 1:
            what = "dropped" if kind == "dropped" else "trained on as it is"
            logger.warning("%s stream: row %d %s (%s: %s); further such rows are counted in dropped_rows/flagged_rows "
                           "and summed up when training ends", self.name, row, what, reason, why)  # fmt: skip

    def summary(self) -> str | None:
        """One line of what was dropped and flagged, None when nothing was."""
        parts = [f"{len(rows)} dropped as {reason} (rows {_first(rows)})" for reason, rows in self.dropped_rows.items()]
        parts += [f"{len(rows)} flagged as {reason}, trained on (rows {_first(rows)})"
                  for reason, rows in self.flagged_rows.items()]  # fmt: skip
        return f"{self.name} stream: {'; '.join(parts)}" if parts else None


def _first(rows: list[int], limit: int = 5) -> str:
    return ", ".join(map(str, rows[:limit])) + (", ..." if len(rows) > limit else "")


def first_row(dataset: datasets.IterableDataset, name: str = "train") -> dict:
    """The stream's first row (read once, as TRL reads it to detect the format); DataError when it has none."""
    try:
        return next(iter(dataset))
    except StopIteration:
        fix = "check the files or the split you stream, and any filter applied to it"
        raise DataError(f"the {name} stream has no rows", column=f"{name}_dataset", fix=fix) from None


def is_tokenized(row: dict) -> bool:
    """Whether a row already holds TRL's token columns (a prepared dataset given again)."""
    return all(name in row for name in TOKEN_COLUMNS)


def prepare_stream(
    dataset: datasets.IterableDataset,
    tokenizer,
    *,
    columns: dict[str, str] | None = None,
    format: str = "auto",
    system_template: str = DEFAULT_SYSTEM_TEMPLATE,
    input_template: str = DEFAULT_INPUT_TEMPLATE,
    max_length: int | None = 1024,
    truncation_mode: str = "keep_start",
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    name: str = "train",
) -> StreamedPreferences:
    """The stream with ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` on every row it keeps (see the module
    docstring); nothing is read but its first row until the result is iterated."""
    if not isinstance(dataset, datasets.IterableDataset):
        raise DataError(f"expected a datasets.IterableDataset, got {type(dataset).__name__}",
                        fix="use prepare_preferences and tokenize_preferences for a map-style dataset")  # fmt: skip
    if format not in FORMATS:
        raise unknown_choice("format", format, FORMATS)
    check_template("system_template", system_template, ("system", "prompt"))
    check_template("input_template", input_template, ("prompt", "input"))
    check_lengths(truncation_mode, max_length, max_prompt_length, max_completion_length)
    first = first_row(dataset, name)
    dataset, present = _rename(dataset, columns or {}, present=dataset.column_names or list(first))
    for needed in ("chosen", "rejected"):
        if needed not in present:
            raise missing_column(needed, present)
    first_chosen = first.get((columns or {}).get("chosen", "chosen"))
    kind = format if format != "auto" else value_format(first_chosen)
    if kind is None:
        fix = "fix the value, or run fastdpo.data.check_preferences on a sample to list such rows"
        got = type(first_chosen).__name__
        raise DataError(f"expected a string or a list of {{'role', 'content'}} messages, got {got}", row=0,
                        column="chosen", fix=fix)  # fmt: skip
    check_tokenizer(tokenizer, first_chosen)
    prepared = StreamedPreferences(dataset, name=name)
    options = {
        "kind": kind, "has_prompt": "prompt" in present, "system_template": system_template,
        "input_template": input_template, "tokenizer": tokenizer, "max_length": max_length,
        "truncation_mode": truncation_mode, "clip": (max_prompt_length, max_completion_length), "prepared": prepared,
    }  # fmt: skip
    mapped = dataset.map(_prepare_batch, batched=True, with_indices=True, fn_kwargs=options)
    prepared.dataset = mapped.filter(lambda keep: keep, input_columns="_keep").remove_columns("_keep")
    return prepared


def _prepare_batch(batch: dict, indices: list[int], *, kind, has_prompt, system_template, input_template, tokenizer,
                   max_length, truncation_mode, clip, prepared: StreamedPreferences) -> dict:  # fmt: skip
    """Check, normalize and tokenize one batch of stream rows (``indices``: their rows in the stream)."""
    rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
    normalized: dict[str, list] = {}
    for row, index in zip(rows, indices, strict=True):
        try:
            check_row(row, index, kind)
        except DataError as error:  # a shuffled stream's row number alone does not find the row: its prompt does
            raise _located(error, row, prepared.name) from None
        fields = _normalize_row(row, kind=kind, has_prompt=has_prompt, system_template=system_template,
                                input_template=input_template, version="")  # fmt: skip
        fields.pop("prompt_split_mid_word", None)
        out = {**{k: v for k, v in row.items() if k not in ("system", "input", "context")}, **fields}
        if kind == "conversational":
            try:
                fits = [conversation_fits(out[c], index, c) for c in ("prompt", "chosen", "rejected")]
            except DataError as error:
                raise _located(error, row, prepared.name) from None
            if not all(fits):
                prepared.note("flagged", "roles_out_of_order", index,
                              "a prompt not ending with a user or tool turn, or a completion not starting with the "
                              "assistant")  # fmt: skip
        for key, value in out.items():
            normalized.setdefault(key, []).append(value)
    eos = tokenizer.eos_token if kind == "standard" else None
    tokens = _tokenize_batch(normalized, indices, tokenizer, eos, "")
    if clip != (None, None):
        for i in range(len(indices)):
            example = {name: tokens[name][i] for name in TOKEN_COLUMNS}
            for name, value in _clip_lengths(example, max_prompt=clip[0], max_completion=clip[1], version="").items():
                tokens[name][i] = value
    tokens["_keep"] = []
    for prompt_ids, index in zip(tokens["prompt_ids"], indices, strict=True):
        keep = max_length is None or truncation_mode != "keep_start" or len(prompt_ids) < max_length
        if not keep:
            prepared.note("dropped", "prompt_fills_max_length", index,
                          f"the prompt alone fills max_length={max_length} under keep_start")  # fmt: skip
        tokens["_keep"].append(keep)
    return tokens


def _located(error: DataError, row: dict, name: str) -> DataError:
    """``error`` with the stream named and the start of the row's prompt, to find the row by."""
    prompt = row.get("prompt")
    if isinstance(prompt, list) and prompt and isinstance(prompt[-1], dict):
        prompt = prompt[-1].get("content")
    where = f" (the {name} stream's row, counted as read" + (f"; its prompt begins {prompt[:60]!r})"
                                                              if isinstance(prompt, str) else ")")  # fmt: skip
    return DataError(error.message + where, row=error.row, column=error.column, fix=error.fix)
