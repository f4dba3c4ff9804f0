"""Iterable (streaming) preference and SFT datasets, prepared lazily, row by row as training reads them.

A ``datasets.IterableDataset`` (``load_dataset(..., streaming=True)``, ``Dataset.to_iterable_dataset()``) has no
length and is read, not held: ``prepare_stream`` chains lazy maps onto it that give each row what
``prepare_preferences`` then ``tokenize_preferences`` give a map-style dataset (the same ids, TRL's):

- the format and the columns are read from the first row (``columns=``, the score aliases and ``format=`` as for
  ``prepare_preferences``); the tokenizer is checked against it;
- each row is checked when it is read, with the map-style checks: the first bad value raises one ``DataError``
  naming its row, counted from 0 over the stream as the trainer reads it (after any ``shuffle``; per DataLoader
  worker when there are several); with ``bad_rows="drop"`` a row refused for a reason the quality check drops
  (``empty``, ``not_text``, ``bad_message``, ...: what ``data_filter: drop`` drops of a map-style dataset) is
  dropped and counted under that reason instead, and a refused SFT row under ``refused_<column>``;
- rows TRL drops (the prompt alone fills ``max_length`` under ``keep_start``) are dropped, and rows whose roles
  are out of order, string rows holding message lists written as text or whose chosen and rejected both repeat
  the prompt are trained on as they are (TRL's behaviour); each kind is logged at the first such row and
  counted, with their rows, in ``dropped_rows`` / ``flagged_rows``, which fill as the stream is read (in this
  process: DataLoader workers count in their own copies, and write them back to ``workers`` where
  ``share_with_workers`` was called, as the trainers do) — ``summary()`` says what they hold.

``prepare_sft_stream`` does the same for SFT rows: ``prepare_sft`` then ``tokenize_sft``'s ``input_ids`` and
``labels`` (ShareGPT conversations converted as TRL converts them; a stream that is already tokenized labelled
from its mask columns), the rows left without a label by ``max_length`` dropped and counted.

What needs the whole dataset before the first step does not apply to a stream: the reference cache, token-budget
batches and balancing ranks by tokens (the trainer refuses or skips them, and says so).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import shutil
import tempfile
import weakref
from collections import Counter
from dataclasses import dataclass, field

import datasets
import torch.utils.data

from fastdpo.data.formats import (
    DEFAULT_INPUT_TEMPLATE,
    DEFAULT_SYSTEM_TEMPLATE,
    FORMATS,
    REPEATED_PROMPT_WHY,
    check_row,
    check_template,
    normalize_row,
    preference_renames,
    repeats_prompt,
)
from fastdpo.data.render import PROMPT_CUT, prompt_cut_why
from fastdpo.data.schema import missing_answer, rename_columns, renamed_row, value_format
from fastdpo.data.sft import (
    SFT_COLUMNS,
    chatml_row,
    cut_to_window,
    is_sharegpt,
    label_masks,
    labels_from_masks,
    learned_messages,
    messages_problem,
    no_assistant_error,
    resolve_options,
    sft_layout,
    sft_row_problem,
    tokenize_sft_row,
    truncation_window,
    with_text_field,
)
from fastdpo.data.tokenize import (
    SAME,
    check_lengths,
    check_tokenizer,
    clip_lengths,
    conversation_fits,
    prompt_fills,
    tokenize_preference_batch,
)
from fastdpo.data.written import WRITTEN_MESSAGES_WHY, written_messages
from fastdpo.errors import ConfigError, DataError, unknown_choice

logger = logging.getLogger(__name__)

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
STREAM_BATCH = 64  # rows tokenized together
BAD_ROWS = ("raise", "drop")  # a row preparation refuses: one DataError, or dropped and counted
LOOK_AHEAD = 100  # rows read to settle a stream's format where its first row may not (a refused row, dropped)
_ROW, _DROPPED = "_row", "_dropped"  # (the normalizing map's: each row's number in the stream; refused and dropped)
DROP_HINT = "or drop such rows as they are read: bad_rows='drop' (the trainers' stream_bad_rows, data_filter: drop)"


@dataclass
class PreparedStream:
    """A prepared stream, and what reading it has dropped or flagged so far (reason → stream rows); with
    ``share_with_workers``, what DataLoader workers dropped or flagged too (``workers``: worker → kind → reason → the
    rows of the shards it reads), read back by ``collect_workers``."""

    dataset: datasets.IterableDataset
    name: str = "train"
    dropped_rows: dict[str, list[int]] = field(default_factory=dict)
    flagged_rows: dict[str, list[int]] = field(default_factory=dict)
    spool: str | None = None  # the folder workers write their notes to (share_with_workers)
    workers: dict[int, dict[str, dict[str, list[int]]]] = field(default_factory=dict)

    def note(self, kind: str, reason: str, row: int, why: str) -> None:
        """Count ``row`` under ``reason`` (``kind``: "dropped" or "flagged"), logging the first of each reason."""
        rows = (self.dropped_rows if kind == "dropped" else self.flagged_rows).setdefault(reason, [])
        rows.append(row)
        worker = torch.utils.data.get_worker_info()
        if worker is not None and self.spool is not None:  # (a copy of this object in a worker's process)
            try:
                with open(os.path.join(self.spool, f"worker-{worker.id}.jsonl"), "a", encoding="utf-8") as notes:
                    notes.write(json.dumps([kind, reason, row]) + "\n")
            except OSError as error:  # (the folder removed by a cleaner of /tmp, a full disk: counted here only)
                logger.warning("dataloader worker %d: %s stream: its dropped and flagged rows cannot be written back "
                               "to the trainer any more (%s); counted in this worker only", worker.id, self.name,
                               error)  # fmt: skip
                self.spool = None
        if len(rows) > 1:
            return
        what = "dropped" if kind == "dropped" else "trained on as it is"
        if worker is None:
            logger.warning("%s stream: row %d %s (%s: %s); further such rows are counted in dropped_rows/"
                           "flagged_rows and summed up when training ends", self.name, row, what, reason,
                           why)  # fmt: skip
        else:  # a copy of this object in a dataloader worker's process: its counts reach the trainer by the spool
            seen = ("the trainer collects them after each evaluation and when training ends" if self.spool else
                    "this worker counts further such rows, the trainer's dropped_rows does not see them")  # fmt: skip
            logger.warning("dataloader worker %d: %s stream: row %d of the shards it reads %s (%s: %s); %s",
                           worker.id, self.name, row, what, reason, why, seen)  # fmt: skip

    def share_with_workers(self) -> None:
        """Have DataLoader workers (which read copies of this object in their own processes) write what they drop
        and flag to a temporary folder, removed with this object; ``collect_workers`` reads it. Called before the
        stream is first read."""
        if self.spool is None:
            self.spool = tempfile.mkdtemp(prefix="fastdpo-stream-")
            weakref.finalize(self, _remove_spool, self.spool, os.getpid())

    def collect_workers(self) -> dict[int, dict[str, dict[str, list[int]]]]:
        """What the workers wrote so far (each pass over the stream appends), into ``workers``."""
        found: dict[int, dict[str, dict[str, list[int]]]] = {}
        try:
            names = sorted(os.listdir(self.spool)) if self.spool else []
        except OSError:  # (removed: what was read before stands)
            return self.workers
        for file in names:
            number = file.removeprefix("worker-").removesuffix(".jsonl")
            if not (file.startswith("worker-") and file.endswith(".jsonl") and number.isdigit()):
                continue  # (not a worker's: an NFS placeholder, a file someone put there)
            worker = int(number)
            try:
                with open(os.path.join(self.spool, file), encoding="utf-8") as notes:
                    lines = notes.readlines()
            except OSError:
                continue
            for line in lines:
                try:  # (a line being written is read next time; one a killed worker cut short, never)
                    kind, reason, row = json.loads(line) if line.endswith("\n") else (None, None, None)
                except ValueError:
                    continue
                if kind is not None:
                    found.setdefault(worker, {}).setdefault(kind, {}).setdefault(reason, []).append(row)
        self.workers = found
        return found

    def summary(self) -> str | None:
        """One line of what was dropped and flagged, None when nothing was (a worker's rows: of the shards it
        reads)."""
        parts = _parts(self.dropped_rows, self.flagged_rows, "rows")
        for worker, kinds in sorted(self.workers.items()):
            found = _parts(kinds.get("dropped", {}), kinds.get("flagged", {}), "its rows")
            parts += [f"dataloader worker {worker}: {', '.join(found)}"] if found else []
        listed = [*self.dropped_rows.values(), *self.flagged_rows.values()]
        listed += [rows for kinds in self.workers.values() for reasons in kinds.values() for rows in reasons.values()]
        again = (
            " (each pass over the stream counts its rows again)" if any(len(set(r)) < len(r) for r in listed) else ""
        )
        return f"{self.name} stream: {'; '.join(parts)}{again}" if parts else None


def gather_worker_drops(streams: list[PreparedStream], dropped_rows: dict) -> None:
    """The rows the streams' dataloader workers dropped so far, into a trainer's ``dropped_rows`` (split → reason
    → rows): a split each, ``<stream> (dataloader worker <N>)``, numbered among the rows that worker reads."""
    for stream in streams:
        for worker, kinds in stream.collect_workers().items():
            if kinds.get("dropped"):
                dropped_rows[f"{stream.name} (dataloader worker {worker})"] = kinds["dropped"]


def _remove_spool(spool: str, owner: int) -> None:
    if os.getpid() == owner:  # (not a forked worker's copy as it is collected: the trainer reads the folder after)
        shutil.rmtree(spool, ignore_errors=True)


def _parts(dropped: dict[str, list[int]], flagged: dict[str, list[int]], rows: str) -> list[str]:
    return [f"{len(found)} dropped as {reason} ({rows} {_first(found)})" for reason, found in dropped.items()] + [
        f"{len(found)} flagged as {reason}, trained on ({rows} {_first(found)})" for reason, found in flagged.items()
    ]


def _first(rows: list[int], limit: int = 5) -> str:
    return ", ".join(map(str, rows[:limit])) + (", ..." if len(rows) > limit else "")


def _ahead(dataset: datasets.IterableDataset, name: str, given=bool) -> list:
    """The values of column ``name`` that are ``given`` (default: not None nor empty) in the stream's first
    ``LOOK_AHEAD`` rows."""
    return [row.get(name) for row in itertools.islice(dataset, LOOK_AHEAD) if given(row.get(name))]


def first_row(dataset: datasets.IterableDataset, name: str = "train") -> dict:
    """The stream's first row (read once, as TRL reads it to detect the format); DataError when it has none."""
    try:
        return next(iter(dataset))
    except StopIteration:
        fix = "check the files or the split you stream, and any filter applied to it"
        raise DataError(f"the {name} stream has no rows", option=f"{name}_dataset", fix=fix) from None


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
    bad_rows: str = "raise",
) -> PreparedStream:
    """The stream with ``prompt_ids``, ``chosen_ids`` and ``rejected_ids`` on every row it keeps (see the module
    docstring); nothing is read but its first row until the result is iterated."""
    if not isinstance(dataset, datasets.IterableDataset):
        raise DataError(f"expected a datasets.IterableDataset, got {type(dataset).__name__}",
                        fix="use prepare_preferences and tokenize_preferences for a map-style dataset")  # fmt: skip
    if format not in FORMATS:
        raise unknown_choice("format", format, FORMATS)
    if bad_rows not in BAD_ROWS:
        raise unknown_choice("bad_rows", bad_rows, BAD_ROWS)
    check_template("system_template", system_template, ("system", "prompt"))
    check_template("input_template", input_template, ("prompt", "input"))
    check_lengths(truncation_mode, max_length, max_prompt_length, max_completion_length)
    first = first_row(dataset, name)
    # the renames are applied row by row in the normalizing map (a row without a renamed column gets None there)
    renames, present = preference_renames(columns or {}, list(dataset.column_names or first))
    for needed in ("chosen", "rejected"):
        if needed not in present:
            raise missing_answer(needed, present)
    chosen = (columns or {}).get("chosen", "chosen")
    first_chosen = first.get(chosen)
    kind = format if format != "auto" else value_format(first_chosen)
    if format == "auto" and bad_rows == "drop":  # the most common format of the first rows, as the quality check
        # keeps the most common (a first row of the other format, to be dropped, set it: every other row dropped)
        answers = _ahead(dataset, chosen, value_format)
        kind = Counter(map(value_format, answers)).most_common(1)[0][0] if answers else kind
        first_chosen = next((answer for answer in answers if value_format(answer) == kind), first_chosen)
    if kind is None:
        fix = "fix the value, or run fastdpo.data.check_preferences on a sample to list such rows"
        got = type(first_chosen).__name__
        raise DataError(f"expected a string or a list of {{'role', 'content'}} messages, got {got}", row=0,
                        column="chosen", fix=fix)  # fmt: skip
    check_tokenizer(tokenizer, first_chosen)
    prepared = PreparedStream(dataset, name=name)
    normalize = {"renames": renames, "kind": kind, "has_prompt": "prompt" in present,
                 "system_template": system_template, "input_template": input_template,
                 "prepared": prepared, "drop": bad_rows == "drop"}  # fmt: skip
    tokenize = {"kind": kind, "tokenizer": tokenizer, "max_length": max_length, "truncation_mode": truncation_mode,
                "clip": (max_prompt_length, max_completion_length), "prepared": prepared,
                "drop": bad_rows == "drop"}  # fmt: skip
    # row by row first: a batched map over an interleaved stream whose sources differ in columns fails in datasets
    # (it joins their Arrow tables), and a row-wise map hands the batched one plain rows. Then small batches: the
    # first pairs reach training after 64 rows are tokenized, not 1000 (the default). The rows dropped as refused
    # leave between the two maps; the second numbers the rest by the first's count (_ROW)
    normalized = dataset.map(_normalized_row, with_indices=True, fn_kwargs=normalize, remove_columns=list(renames))
    if bad_rows == "drop":
        normalized = normalized.filter(_not_dropped, input_columns=_DROPPED)
    mapped = normalized.map(_tokenized_batch, batched=True, batch_size=STREAM_BATCH, fn_kwargs=tokenize)
    kept = mapped.filter(_kept_flag, input_columns="_keep")
    prepared.dataset = kept.remove_columns(["_keep", _ROW, _DROPPED])
    return prepared


# The maps' and filters' functions are the module's (a lambda or a closure cannot be pickled: DataLoader workers
# started by spawn or forkserver, macOS's default and Python 3.14's on Linux, receive the stream pickled)


def _not_dropped(dropped: bool) -> bool:
    return not dropped


def _kept_flag(keep: bool) -> bool:
    return keep


def _kept_tokenized(row: dict, index: int, *, max_length, truncation_mode, prepared: PreparedStream) -> bool:
    return _kept(len(row["prompt_ids"]), index, max_length, truncation_mode, prepared)


def _formatted(example: dict, *, formatting_func) -> dict:
    return {"text": formatting_func(example)}


def _normalized_row(row: dict, index: int, *, renames, kind, has_prompt, system_template, input_template,
                    prepared: PreparedStream, drop: bool) -> dict:  # fmt: skip
    """One stream row renamed, checked and normalized (``index``: its row in the stream): what ``prepare_preferences``
    gives it (the system and input columns joined into the prompt stay in the row, unread); a refused row, under
    ``drop``, marked dropped (``_DROPPED``) and counted."""
    row = {**{k: v for k, v in row.items() if k not in renames}, **renamed_row(row, renames=renames)}
    try:
        check_row(row, index, kind)
        out = _normalized(row, index, kind=kind, has_prompt=has_prompt, system_template=system_template,
                          input_template=input_template, prepared=prepared)  # fmt: skip
    except DataError as error:
        _refused(row, index, kind, error, prepared, drop)
        return {**row, _ROW: index, _DROPPED: True}
    return {**out, _ROW: index, _DROPPED: False}


def _refused(row: dict, index: int, kind: str, error: DataError, prepared: PreparedStream, drop: bool,
             tokenizer=None) -> None:  # fmt: skip
    """A row preparation refuses (``error``): under ``drop``, counted under the quality check's reason; else, or where
    the check has none, its error raised, located (a shuffled stream's row number alone does not find the row: its
    text does), its fix saying how such rows are dropped where ``drop`` would drop it."""
    reason = _drop_reason(row, kind, error, tokenizer)
    if not drop or reason is None:
        raise _located(error, row, prepared.name, hint=not drop and reason is not None) from None
    prepared.note("dropped", reason, index, f"column {error.column!r}: {error.message}")


def _drop_reason(row: dict, kind: str, error: DataError, tokenizer=None) -> str | None:
    """The reason the quality check drops a row preparation refused (``error``) for: its first, as ``data_filter:
    drop`` counts it (``tokenizer``: its chat template checked too); ``mixed_format`` for an answer of the other
    format than the stream's (the check of one row alone sees none); None where the check would keep the row (its
    error stands)."""
    from fastdpo.data.quality import check_preferences

    if error.row is None:  # (the whole stream's problem, not this row's)
        return None
    row = {"chosen": None, "rejected": None, **row}  # (a features-less stream's row may lack one: missing_field)
    try:
        reasons = check_preferences([row], tokenizer).dropped_rows([row])
    except (DataError, ConfigError):  # (what the check cannot read: the row's own error stands)
        return None
    if reasons:
        return next(iter(reasons))
    value = row.get(error.column) if error.column in ("prompt", "chosen", "rejected") else None
    return "mixed_format" if value_format(value) not in (None, kind) else None


def _normalized(row: dict, index: int, *, kind, has_prompt, system_template, input_template,
                prepared: PreparedStream) -> dict:  # fmt: skip
    """``row`` (checked) normalized, the rows trained on as they are counted."""
    if kind == "standard":  # (counted, trained on as they are: as prepare_preferences warns of such rows)
        if any(written_messages(row.get(name)) for name in ("prompt", "chosen", "rejected")):
            prepared.note("flagged", "messages_written_as_text", index, WRITTEN_MESSAGES_WHY)
        if has_prompt and repeats_prompt(row.get("prompt"), row["chosen"], row["rejected"]):
            prepared.note("flagged", "prompt_repeated_in_completions", index, REPEATED_PROMPT_WHY)
    fields = normalize_row(row, kind=kind, has_prompt=has_prompt, system_template=system_template,
                           input_template=input_template, version="")  # fmt: skip
    fields.pop("prompt_split_mid_word", None)
    out = {**row, **fields}
    if kind == "conversational":
        fits = [conversation_fits(out[c], index, c) for c in ("prompt", "chosen", "rejected")]
        if not all(fits):
            prepared.note("flagged", "roles_out_of_order", index,
                          "a prompt not ending with a user or tool turn, or a completion not starting with the "
                          "assistant")  # fmt: skip
    return out


def _tokenized_batch(batch: dict, *, kind, tokenizer, max_length, truncation_mode, clip, prepared: PreparedStream,
                     drop: bool) -> dict:  # fmt: skip
    """Tokenize one batch of normalized stream rows (numbered in ``_ROW``); mark the rows TRL drops (``_keep``), and
    under ``drop`` those the chat template refuses."""
    indices, refused = batch[_ROW], set()
    eos = tokenizer.eos_token if kind == "standard" else None
    try:
        tokens = tokenize_preference_batch(batch, indices, tokenizer, eos, "")
    except DataError as error:
        if error.row not in indices:
            raise
        if not drop:  # (raises)
            row = {name: values[indices.index(error.row)] for name, values in batch.items()}
            _refused(row, error.row, kind, error, prepared, drop, tokenizer)
        tokens, refused = _tokens_row_by_row(batch, indices, kind, tokenizer, eos, prepared)
    for same, cut, index in zip(tokens.pop(SAME), tokens.pop(PROMPT_CUT), indices, strict=True):
        if index in refused:
            continue
        _note_prompt_cut(cut, index, tokenizer, prepared)
        if same:  # (counted, trained on as it is: as tokenize_preferences warns of such rows)
            prepared.note("flagged", "identical_tokens", index, "chosen and rejected of the same tokens: no "
                          "preference to learn")  # fmt: skip
    if clip != (None, None):
        for i in range(len(indices)):
            example = {name: tokens[name][i] for name in TOKEN_COLUMNS}
            for name, value in clip_lengths(example, max_prompt=clip[0], max_completion=clip[1], version="").items():
                tokens[name][i] = value
    tokens["_keep"] = [index not in refused and _kept(len(prompt_ids), index, max_length, truncation_mode, prepared)
                       for prompt_ids, index in zip(tokens["prompt_ids"], indices, strict=True)]  # fmt: skip
    return tokens


def _tokens_row_by_row(batch: dict, indices: list[int], kind: str, tokenizer, eos, prepared: PreparedStream):
    """``(ids, refused)``: the batch tokenized a row at a time, a row the chat template refuses (or that leaves no
    prompt to render) dropped under the quality check's reason (``refused``, its ids empty); another error raised."""
    out: dict[str, list] = {}
    refused = set()
    for i, index in enumerate(indices):
        row = {name: values[i : i + 1] for name, values in batch.items()}
        try:
            tokens = tokenize_preference_batch(row, [index], tokenizer, eos, "")
        except DataError as error:
            _refused({name: values[0] for name, values in row.items()}, index, kind, error, prepared, True, tokenizer)
            tokens = {**{name: [[]] for name in (*TOKEN_COLUMNS, PROMPT_CUT)}, SAME: [False]}
            refused.add(index)
        for name, values in tokens.items():
            out.setdefault(name, []).extend(values)
    return out, refused


def _note_prompt_cut(cut: list[int], index: int, tokenizer, prepared: PreparedStream) -> None:
    if cut:  # (counted, trained on as it is: as tokenize_preferences and tokenize_sft warn of such rows)
        prepared.note("flagged", "prompt_not_prefix", index, prompt_cut_why(tokenizer, cut))


def _kept(prompt_length: int, index: int, max_length, truncation_mode: str, prepared: PreparedStream) -> bool:
    """False (and counted) for a row whose prompt fills ``max_length`` (``prompt_fills``)."""
    if not prompt_fills(prompt_length, max_length, truncation_mode):
        return True
    prepared.note("dropped", "prompt_fills_max_length", index,
                  f"the prompt alone fills max_length={max_length} under keep_start")  # fmt: skip
    return False


def prepare_tokenized_stream(dataset: datasets.IterableDataset, *, max_length: int | None,
                             truncation_mode: str = "keep_start", name: str = "train") -> PreparedStream:  # fmt: skip
    """A stream whose rows hold the token columns already (a prepared stream given again): the rows whose prompt
    fills ``max_length`` dropped and counted, as ``prepare_stream`` drops them."""
    prepared = PreparedStream(dataset, name=name)
    if max_length is not None and truncation_mode == "keep_start":
        options = {"max_length": max_length, "truncation_mode": truncation_mode, "prepared": prepared}
        prepared.dataset = dataset.filter(_kept_tokenized, with_indices=True, fn_kwargs=options)
    return prepared


def _located(error: DataError, row: dict, name: str, *, hint: bool = False) -> DataError:
    """``error`` with the stream named and the start of the row's text, to find the row by; ``hint``: its fix says
    how such rows are dropped instead."""
    text = next((row[c] for c in ("prompt", "text", "messages") if row.get(c) is not None), None)
    if isinstance(text, list) and text and isinstance(text[-1], dict):
        text = text[-1].get("content")
    where = f" (the {name} stream's row, counted as read" + (f"; its text begins {text[:60]!r})"
                                                              if isinstance(text, str) else ")")  # fmt: skip
    fix = f"{error.fix}; {DROP_HINT}" if hint and error.fix else DROP_HINT if hint else error.fix
    return error.but(message=error.message + where, fix=fix)


# ------------------------------------------------------------------------------------------------------------- SFT


def prepare_sft_stream(
    dataset: datasets.IterableDataset,
    tokenizer,
    *,
    columns: dict[str, str] | None = None,
    text_field: str = "text",
    max_length: int | None = 1024,
    truncation_mode: str = "keep_start",
    completion_only_loss: bool | None = None,
    assistant_only_loss: bool = False,
    chat_template: str | None = None,
    formatting_func=None,
    name: str = "train",
    bad_rows: str = "raise",
) -> PreparedStream:
    """An SFT stream with ``input_ids`` and ``labels`` on every row it keeps, as ``prepare_sft`` then
    ``tokenize_sft`` give them (``formatting_func`` first, as TRL applies it), lazily; rows left without a label
    by ``max_length`` are dropped and counted. A stream that is already tokenized (``input_ids``) gets TRL's labels
    from its mask columns (``completion_mask`` under ``completion_only_loss``, ``assistant_masks``) and is cut the
    same way."""
    if not isinstance(dataset, datasets.IterableDataset):
        raise DataError(f"expected a datasets.IterableDataset, got {type(dataset).__name__}",
                        fix="use prepare_sft and tokenize_sft for a map-style dataset")  # fmt: skip
    if bad_rows not in BAD_ROWS:
        raise unknown_choice("bad_rows", bad_rows, BAD_ROWS)
    check_lengths(truncation_mode, max_length, None, None)  # (SFT's truncation modes are the preference ones)
    window = None if max_length is None else truncation_window(max_length, truncation_mode)
    first = first_row(dataset, name)
    present = list(dataset.column_names or first)
    prepared = PreparedStream(dataset, name=name)
    if "input_ids" in present:  # tokenized: TRL's labels from the masks, then the cut
        masks = None if "labels" in present else label_masks(present, bool(completion_only_loss))
        options = {"masks": masks, "window": window, "prepared": prepared}
        mapped = dataset.map(_tokenized_sft_row, with_indices=True, fn_kwargs=options)
    else:
        if formatting_func is not None:
            dataset = dataset.map(_formatted, fn_kwargs={"formatting_func": formatting_func})
            first, present = {**first, "text": formatting_func(first)}, [*present, "text"]
        columns = with_text_field(dict(columns or {}), text_field, present)
        dataset = rename_columns(dataset, columns, SFT_COLUMNS, present=present)
        renamed = {theirs: ours for ours, theirs in columns.items()}
        first = {renamed.get(key, key): value for key, value in first.items()}
        present = [renamed.get(key, key) for key in present]
        source = "messages" if "messages" in present else "conversations" if "conversations" in present else None
        value = first.get(source) if source else None
        if source and not value:  # (a refused first row: the first conversation given, as prepare_sft reads it)
            value = next(iter(_ahead(dataset, source)), value)
        sharegpt = is_sharegpt(value)
        if source == "conversations":
            present = ["messages" if key == "conversations" else key for key in present]
            first = {**first, "messages": value}
        layout = sft_layout(present)
        completion = first.get("completion")
        if layout == "prompt_completion" and value_format(completion) is None:  # (as prepare_sft: the first read)
            completion = next(iter(_ahead(dataset, "completion", value_format)), completion)
        conversational = layout == "messages" or (
            layout == "prompt_completion" and value_format(completion) == "conversational"
        )
        completion_only_loss = resolve_options(present, tokenizer, layout, conversational, completion_only_loss,
                                               assistant_only_loss, chat_template)  # fmt: skip
        tokenize = {
            "layout": layout, "conversational": conversational, "tokenizer": tokenizer,
            "eos_token": tokenizer.eos_token, "chat_template": chat_template,
            "completion_only_loss": completion_only_loss, "assistant_only_loss": assistant_only_loss,
            "window": window, "version": "",
        }  # fmt: skip
        options = {"source": source, "sharegpt": sharegpt, "tokenize": tokenize, "prepared": prepared,
                   "drop": bad_rows == "drop"}  # fmt: skip
        mapped = dataset.map(_raw_sft_row, with_indices=True, fn_kwargs=options)
    prepared.dataset = mapped.filter(_kept_flag, input_columns="_keep").remove_columns("_keep")
    return prepared


def _raw_sft_row(example: dict, index: int, *, source: str | None, sharegpt: bool, tokenize: dict,
                 prepared: PreparedStream, drop: bool) -> dict:  # fmt: skip
    """One raw SFT row checked and tokenized; a refused row, under ``drop``, counted as ``refused_<column>`` and
    marked not kept."""
    layout, conversational = tokenize["layout"], tokenize["conversational"]
    needed = {"text": ("text",), "messages": (source or "messages",)}.get(layout, ("prompt", "completion"))
    if any(column not in example for column in needed):  # a features-less stream's row without it: None, as a
        example = {**dict.fromkeys(needed), **example}  # map-style dataset has it there, and checked as such
    problem = None
    if sharegpt and example[source] is not None and not isinstance(example[source], list):
        problem = messages_problem(example[source], source)
    elif sharegpt:  # ShareGPT from/value → role/content (TRL's conversion), conversations → messages
        example = {**example, **chatml_row(example, source=source, version="")}
    elif source == "conversations":
        example = {**example, "messages": example["conversations"]}
    problem = problem or sft_row_problem(example, layout, conversational)
    if problem is not None:
        column, message, fix = problem
        if not drop:
            raise _located(DataError(message, row=index, column=column, fix=fix), example, prepared.name, hint=True)
        prepared.note("dropped", f"refused_{column}", index, message)
        return {"input_ids": [], "labels": [], "_keep": False}
    if layout != "messages" and any(written_messages(example.get(name)) for name in needed):  # (as prepare_sft)
        prepared.note("flagged", "messages_written_as_text", index, WRITTEN_MESSAGES_WHY)
    out = tokenize_sft_row(example, index, **tokenize)
    _note_prompt_cut(out.pop(PROMPT_CUT), index, tokenize["tokenizer"], prepared)
    if tokenize["assistant_only_loss"] and not out.pop("_has_assistant"):
        raise no_assistant_error(learned_messages(example, layout), index, layout)
    return _keep_if_labelled(out, index, tokenize["window"], prepared)


def _tokenized_sft_row(example: dict, index: int, *, masks: list[str] | None, window,
                       prepared: PreparedStream) -> dict:  # fmt: skip
    """``masks`` None: the row's own ``labels`` (every token where a row has none); else TRL's, from those mask
    columns."""
    labels = example.get("labels") if masks is None else None
    labels = labels if labels is not None else labels_from_masks(example, masks or [])
    out = {"input_ids": example["input_ids"], "labels": labels}
    if window is not None:
        out = cut_to_window(out, window=window)
    return _keep_if_labelled(out, index, window, prepared)


def _keep_if_labelled(out: dict, index: int, window, prepared: PreparedStream) -> dict:
    keep = out.pop("_has_labels", True)
    if not keep:
        prepared.note("dropped", "no_labels_after_truncation", index,
                      f"no completion token is left in the {'first' if window[0] is None else 'last'} "
                      f"{window[1] or -window[0]} tokens")  # fmt: skip
    out["_keep"] = keep
    return out
