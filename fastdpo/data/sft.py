"""SFT datasets: normalized columns, then ``input_ids``/``labels`` exactly as TRL 1.16's ``SFTTrainer`` builds them.

``prepare_sft`` takes a dataset (or anything ``load_data`` takes) and returns a ``datasets.Dataset`` in one of
three layouts, every row checked (one DataError at the first bad row):

- ``text``: a non-empty string per row (language modeling);
- ``messages``: a list of ``{"role", "content"}`` messages per row. A ShareGPT ``conversations`` column becomes
  ``messages``, and ``from``/``value`` keys become ``role``/``content`` as TRL's ``maybe_convert_to_chatml`` does
  (role *values* such as ``"human"``/``"gpt"`` are kept as they are, as in TRL);
- ``prompt``/``completion``: both strings or both message lists.

``columns={"text": "body"}`` maps our names to the dataset's first; ``tools`` and ``chat_template_kwargs`` keep
their TRL meaning; every other column is kept as it came.

``tokenize_sft`` then does what ``SFTTrainer._prepare_dataset`` does without packing, per row:

- strings: the EOS *string* is appended to ``text``/``completion`` when missing, then ``tokenizer(text)``
  (with the tokenizer's own special tokens, e.g. BOS); prompt/completion: ``tokenizer(prompt)`` and
  ``tokenizer(prompt + completion)`` (one difference, warned about: TRL appends the EOS to a ``text`` column beside
  prompt/completion that lacks one, which it does not train on, and then none to the completion);
- conversations: ``apply_chat_template`` with the row's ``tools`` (a list or a JSON string) and
  ``chat_template_kwargs``; the prompt alone with ``add_generation_prompt=True``; no EOS is added;
- the completion starts where the prompt's ids and the prompt+completion ids stop agreeing;
- ``labels`` are ``input_ids`` with -100 outside the completion (``completion_only_loss``, on by default for
  prompt/completion data) and outside the chat template's assistant mask (``assistant_only_loss``);
- with ``max_length``, both are cut to ``max_length`` tokens (``keep_start``: the first; ``keep_end``, which TRL
  still accepts but deprecates: the last), and rows left with no label are dropped — silently in TRL, counted here.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import datasets

from fastdpo.data.load import as_dataset, load_data, text_columns
from fastdpo.data.render import PROMPT_CUT, common_prefix_length, describe_error, warn_prompt_cuts
from fastdpo.data.schema import (
    is_message_list,
    missing_column,
    rename_columns,
    source_version,
    template_inputs_problem,
    value_format,
    without_null_arguments,
)
from fastdpo.data.written import warn_undesirable_completions, warn_written_text
from fastdpo.errors import ConfigError, DataError, every_row_refused, unknown_choice

SFT_COLUMNS = ("text", "messages", "prompt", "completion", "tools", "chat_template_kwargs")
SFT_TRUNCATION_MODES = ("keep_start", "keep_end")
_VERSION = source_version(__file__)
_CHECK_BATCH = 1000


# --------------------------------------------------------------------------------------------------- prepare_sft


def prepare_sft(
    data,
    *,
    columns: dict[str, str] | None = None,
    text_field: str = "text",
    split: str = "train",
    num_proc: int | None = None,
    refused: dict[int, DataError] | None = None,
    read_as_trl: bool = False,
) -> datasets.Dataset:
    """Load, map columns, convert ShareGPT conversations, and check every row (see the module docstring).

    Args:
        data: a ``datasets.Dataset``/``DatasetDict``, a local file or a hub name (see ``load_data``).
        columns: our name → the dataset's column, for ``text``, ``messages``, ``prompt``, ``completion``,
            ``tools``, ``chat_template_kwargs``.
        text_field: the dataset's text column (TRL's ``dataset_text_field``); the same as ``columns={"text": ...}``.
        split: which split to load.
        num_proc: processes for the ShareGPT conversion.
        refused: where given, the rows that do not fit go there (row → its DataError) and out of the dataset,
            instead of the first stopping everything.
        read_as_trl: drop the columns TRL's SFTTrainer would not read (``as_trl_reads``), where they are refused.
    """
    dataset = load_data(data, split=split, text=(*text_columns(columns), text_field))
    if columns is not None and not isinstance(columns, dict):
        raise ConfigError(f"must map fastdpo's names to the data's columns, got {type(columns).__name__}",
                          column="columns", fix="e.g. columns={'text': 'body'}")  # fmt: skip
    columns = dict(columns or {})
    if read_as_trl:  # (the other columns under fastdpo's names first: the text column as TRL's field)
        with_text_field(dict(columns), text_field, dataset.column_names)  # (columns' text and text_field disagreeing)
        field = columns.pop("text", text_field) if text_field == "text" else text_field
        dataset = rename_columns(dataset, columns, SFT_COLUMNS)
        dataset, text_field = as_trl_reads(dataset, field, formatted=False)
        columns = {}
    columns = with_text_field(columns, text_field, dataset.column_names)
    dataset = rename_columns(dataset, columns, SFT_COLUMNS)
    if len(dataset) == 0:
        raise DataError("the dataset has no rows", fix="check the file or the split you loaded")
    dataset = _to_messages(dataset, num_proc)
    layout = sft_layout(dataset.column_names)
    _check_rows(dataset, layout, refused)
    warn_written_text(dataset, () if layout == "messages" else ("prompt", "completion", "text"))  # (counted, kept)
    warn_undesirable_completions(dataset, refused)
    if refused:
        kept = [row for row in range(len(dataset)) if row not in refused]
        if not kept:  # (the first row's error alone said "drop the row" where every row was refused)
            raise every_row_refused(refused)
        dataset = dataset.select(kept)
    return dataset


def with_text_field(columns: dict[str, str], text_field: str, names) -> dict[str, str]:
    """``columns`` with TRL's ``dataset_text_field`` as the text column, where TRL reads it: rows (columns ``names``,
    renamed by ``columns``) with prompt/completion or messages are read from those, and the field is not read (nor
    needed), as in TRL."""
    if text_field == "text":
        return columns
    if columns.get("text", text_field) != text_field:
        raise ConfigError(f"{text_field!r} disagrees with columns['text'] = {columns['text']!r}",
                          column="text_field", fix="set only one of them")  # fmt: skip
    renamed = {theirs: ours for ours, theirs in columns.items()}
    present = {renamed.get(name, name) for name in names}
    if {"prompt", "completion"} <= present or {"messages", "conversations"} & present:
        return columns
    return {**columns, "text": text_field}


def sft_layout(column_names: list[str]) -> str:
    """``"prompt_completion"``, ``"messages"`` or ``"text"``: which columns the SFT rows are read from.

    The order is TRL's: ``prompt`` with ``completion`` first, then ``messages`` (a ``text`` column beside
    ``messages`` is ignored, as in TRL). ``prompt``/``completion`` beside ``text`` or ``messages`` is refused: TRL
    would read the prompt and completion but put the EOS on the text, or tell the formats apart at random.
    """
    names = set(column_names)
    if {"prompt", "completion"} <= names:
        others = sorted(names & {"text", "messages"})
        if others:
            raise DataError(
                f"the dataset has 'prompt'/'completion' and also {others[0]!r}: it is unclear which to train on",
                column=others[0],
                fix=f"drop or rename the columns you do not want (e.g. dataset.remove_columns({others[0]!r}))",
            )
        return "prompt_completion"
    if "messages" in names:
        return "messages"
    if "text" in names:
        return "text"
    for have, missing in (("prompt", "completion"), ("completion", "prompt")):
        if have in names:
            raise missing_column(missing, column_names)
    raise DataError(
        "no SFT columns: expected 'text', 'messages' (or 'conversations'), or 'prompt' and 'completion'",
        fix=f"map yours with columns={{'text': '<your column>'}} (columns present: {', '.join(column_names)})",
    )


def _to_messages(dataset: datasets.Dataset, num_proc: int | None) -> datasets.Dataset:
    """``conversations`` → ``messages``, and ShareGPT ``from``/``value`` keys → ``role``/``content``."""
    names = dataset.column_names
    source = "messages" if "messages" in names else "conversations" if "conversations" in names else None
    if source is None:
        return dataset
    if is_sharegpt(_first_given(dataset, source)):  # (the first conversation: a refused row 0 may have none)
        for row, value in enumerate(dataset[source]):  # the conversion iterates each value: a list, or None
            if value is not None and not isinstance(value, list):
                _, message, fix = messages_problem(value, source)
                raise DataError(message, row=row, column=source, fix=fix)
        return dataset.map(
            chatml_row,
            fn_kwargs={"source": source, "version": _VERSION},
            remove_columns=[source] if source == "conversations" else None,
            num_proc=num_proc,
            desc="Converting ShareGPT conversations to messages",
        )
    return dataset.rename_column("conversations", "messages") if source == "conversations" else dataset


def is_sharegpt(first) -> bool:
    """Whether the first row's conversation is ShareGPT's: TRL converts when its first message has both ``from`` and
    ``value``, and then renames them in every message of every row."""
    return (
        bool(first) and isinstance(first, list) and isinstance(first[0], dict) and {"from", "value"} <= first[0].keys()
    )


def chatml_row(example: dict, *, source: str, version: str) -> dict:
    """``messages`` from a ShareGPT row's ``source`` column: ``from``/``value`` keys renamed ``role``/``content``."""
    messages = []
    for message in example[source] or []:
        message = dict(message) if isinstance(message, dict) else message
        if isinstance(message, dict):
            if "from" in message:
                message["role"] = message.pop("from")
            if "value" in message:
                message["content"] = message.pop("value")
        messages.append(message)
    return {"messages": messages if example[source] is not None else None}


def sft_row_problem(row: dict, layout: str, conversational: bool) -> tuple[str, str, str] | None:
    """(column, message, fix) of one row's first problem under ``layout`` (what ``_check_rows`` checks column by
    column), for rows read one at a time; None when the row is fine."""
    if layout == "text":
        return _check_string(row["text"], "text")
    if layout == "messages":
        problem = messages_problem(row["messages"], "messages")
    else:
        problem = _check_prompt_completion(row, conversational)
    return problem if problem is not None or not conversational else template_inputs_problem(row)


def _check_rows(dataset: datasets.Dataset, layout: str, refused: dict | None = None) -> None:
    """One DataError at the first row that does not fit ``layout`` (and the first row's format); ``refused``: each
    such row's DataError goes there instead."""
    if layout == "text":
        _scan(dataset, ["text"], lambda row: _check_string(row["text"], "text"), refused)
        return
    if layout == "messages":
        conversational = True
        _scan(dataset, ["messages"], lambda row: messages_problem(row["messages"], "messages"), refused)
    else:
        # the format of the first row with a completion: a refused row 0 (None, []) judged no other by its own
        first = _first_given(dataset, "completion", lambda value: value_format(value) is not None)
        conversational = value_format(first) == "conversational"
        _scan(dataset, ["prompt", "completion"], lambda row: _check_prompt_completion(row, conversational), refused)
    optional = [c for c in ("tools", "chat_template_kwargs") if c in dataset.column_names]
    if conversational and optional:  # TRL reads them for conversations only
        _scan(dataset, optional, template_inputs_problem, refused)


def _first_given(dataset: datasets.Dataset, name: str, given=bool):
    """The first value of column ``name`` that is ``given`` (default: not None nor empty), None where none is, read
    batch by batch until it comes (the column whole was read for it)."""
    values = (value for batch in dataset.select_columns([name]).iter(_CHECK_BATCH) for value in batch[name])
    return next(filter(given, values), None)


def _scan(dataset: datasets.Dataset, names: list[str], check, refused: dict | None = None) -> None:
    """Run ``check(row)`` on every row; a ``(column, message, fix)`` it returns becomes a DataError at that row
    (raised; or, with ``refused``, kept there by row: its first)."""
    start = 0
    for batch in dataset.select_columns(names).iter(batch_size=_CHECK_BATCH):
        for offset in range(len(batch[names[0]])):
            problem = check({name: batch[name][offset] for name in names})
            if problem is not None:
                column, message, fix = problem
                if refused is None:
                    raise DataError(message, row=start + offset, column=column, fix=fix)
                refused.setdefault(start + offset, DataError(message, row=start + offset, column=column, fix=fix))
        start += len(batch[names[0]])


_FIX_ROW = "fix or drop the row"


def _describe(value: Any) -> str:
    if value is None:
        return "nothing (None)"
    if isinstance(value, str):
        return "a string"
    if is_message_list(value):
        return "a list of messages"
    return type(value).__name__


def _check_string(value: Any, column: str, *, allow_empty: bool = False):
    if not isinstance(value, str):
        return column, f"expected a string like the first row, got {_describe(value)}", _FIX_ROW
    if not allow_empty and not value.strip():
        return column, "is empty", "drop the row"
    return None


def messages_problem(value: Any, column: str):
    """(column, message, fix) when ``value`` is not a non-empty list of messages with a role and content; else None."""
    if not isinstance(value, list) or not value:
        got = "an empty list" if isinstance(value, list) else _describe(value)
        fix = "parse it first (json.loads)" if isinstance(value, str) else _FIX_ROW
        return column, f"expected a list of {{'role', 'content'}} messages, got {got}", fix
    for number, message in enumerate(value):
        if not isinstance(message, dict):
            return column, f"message {number} is {_describe(message)}, not a {{'role', 'content'}} dict", _FIX_ROW
        role = message.get("role")
        if not isinstance(role, str) or not role:
            fix = "give every message a 'role' (ShareGPT 'from'/'value' is converted when the first message has both)"
            return column, f"message {number} has no 'role'", fix
        content = message.get("content")
        if content is None and not message.get("tool_calls"):
            return column, f"message {number} ({role}) has no 'content'", "give every message a 'content' string"
        if content is not None and not isinstance(content, (str, list)):
            return column, f"message {number} ({role}) has content {_describe(content)}", "make the content a string"
    return None


def _check_prompt_completion(row: dict, conversational: bool):
    if conversational:
        return messages_problem(row["completion"], "completion") or messages_problem(row["prompt"], "prompt")
    problem = _check_string(row["completion"], "completion")
    if problem is None and not isinstance(row["prompt"], str):
        problem = "prompt", f"expected a string like 'completion', got {_describe(row['prompt'])}", _FIX_ROW
    return problem  # an empty string prompt is fine: the completion is then learned from BOS alone


# -------------------------------------------------------------------------------------------------- tokenize_sft


@dataclass
class TokenizedSFT:
    """The tokenized dataset (``input_ids``, ``labels``), and every row dropped on the way (reason → row ids)."""

    dataset: datasets.Dataset
    dropped_rows: dict[str, list[int]] = field(default_factory=dict)

    @property
    def dropped(self) -> dict[str, int]:
        return {reason: len(rows) for reason, rows in self.dropped_rows.items()}


def tokenize_sft(
    dataset: datasets.Dataset | list[dict],
    tokenizer,
    *,
    max_length: int | None = 1024,
    truncation_mode: str = "keep_start",
    completion_only_loss: bool | None = None,
    assistant_only_loss: bool = False,
    chat_template: str | None = None,
    num_proc: int | None = None,
) -> TokenizedSFT:
    """Add ``input_ids`` and ``labels`` (-100 where no loss), as ``SFTTrainer._prepare_dataset`` does unpacked.

    Args:
        dataset: rows as ``prepare_sft`` returns them (a Dataset, or a list of row dicts).
        tokenizer: a ``transformers`` tokenizer; it needs an EOS token for string data and a chat template (or
            ``chat_template=``) for conversations.
        max_length: cut ``input_ids``/``labels`` to this many tokens; None keeps them whole.
        truncation_mode: ``"keep_start"`` or ``"keep_end"``.
        completion_only_loss: learn only the completion of prompt/completion rows; None means "when the data
            is prompt/completion" (TRL's rule).
        assistant_only_loss: learn only the tokens in the chat template's ``{% generation %}`` blocks.
        chat_template: used instead of the tokenizer's (TRL's trainer passes its training template here).
        num_proc: processes for ``Dataset.map``.
    """
    if truncation_mode not in SFT_TRUNCATION_MODES:
        raise unknown_choice("truncation_mode", truncation_mode, SFT_TRUNCATION_MODES)
    if max_length is not None and (not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1):
        raise ConfigError(f"must be a positive integer or None, got {max_length!r}", column="max_length")
    dataset = as_dataset(dataset)
    if len(dataset) == 0:
        raise DataError("the dataset has no rows", fix="check the file or the split you loaded")
    layout = sft_layout(dataset.column_names)
    conversational = layout == "messages" or (
        layout == "prompt_completion" and value_format(dataset[0]["completion"]) == "conversational"
    )
    completion_only_loss = resolve_options(
        dataset.column_names,
        tokenizer,
        layout,
        conversational,
        completion_only_loss,
        assistant_only_loss,
        chat_template,
    )
    fn_kwargs = {
        "layout": layout,
        "conversational": conversational,
        "tokenizer": tokenizer,
        "eos_token": tokenizer.eos_token,
        "chat_template": chat_template,
        "completion_only_loss": completion_only_loss,
        "assistant_only_loss": assistant_only_loss,
        "window": None if max_length is None else truncation_window(max_length, truncation_mode),
        "version": _VERSION,
    }
    # the first row alone first: a template without generation markers fails here, before the whole dataset
    first = tokenize_sft_row(dataset[0], 0, **fn_kwargs)
    if assistant_only_loss and not first["_has_assistant"]:
        raise no_assistant_error(learned_messages(dataset[0], layout), 0, layout)
    tokenized = dataset.map(
        tokenize_sft_row, with_indices=True, fn_kwargs=fn_kwargs, num_proc=num_proc, desc="Tokenizing SFT rows"
    )
    warn_prompt_cuts(tokenized[PROMPT_CUT], tokenizer, "SFT")  # (before any row is dropped: the input's numbering)
    if assistant_only_loss:
        missing = next((i for i, ok in enumerate(tokenized["_has_assistant"]) if not ok), None)
        if missing is not None:
            raise no_assistant_error(learned_messages(dataset[missing], layout), missing, layout)
    dropped: dict[str, list[int]] = {}
    if max_length is not None:  # TRL filters fully masked rows only when it truncates
        gone = [i for i, learns in enumerate(tokenized["_has_labels"]) if not learns]
        if gone:
            dropped["no_labels_after_truncation"] = gone
            gone_set = set(gone)
            tokenized = tokenized.select([i for i in range(len(tokenized)) if i not in gone_set])
    tokenized = tokenized.remove_columns([c for c in ("_has_assistant", "_has_labels", PROMPT_CUT)
                                          if c in tokenized.column_names])  # fmt: skip
    return TokenizedSFT(tokenized, dropped)


def resolve_options(
    column_names, tokenizer, layout, conversational, completion_only_loss, assistant_only_loss, chat_template
) -> bool:
    """Check the options against the data and the tokenizer; returns ``completion_only_loss`` resolved."""
    for name in ("input_ids", "labels"):
        if name in column_names:
            raise DataError(
                "the dataset already has this column, which tokenizing writes (TRL would skip tokenizing or keep it)",
                column=name,
                fix=f"drop it before tokenizing (dataset.remove_columns({name!r})), or use the dataset as it is",
            )
    if completion_only_loss is None:
        completion_only_loss = layout == "prompt_completion"
    elif completion_only_loss and layout != "prompt_completion":
        raise ConfigError(
            f"needs prompt/completion rows, but the data is {layout!r}",
            column="completion_only_loss",
            fix="set it to None or False (TRL then trains the whole sequence), assistant_only_loss=True to learn "
            "only the assistant's turns of messages, or give the data 'prompt' and 'completion' columns",
        )
    if assistant_only_loss and not conversational:
        raise ConfigError(
            "needs conversational rows (lists of messages), but the data is strings",
            column="assistant_only_loss",
            fix="set it to False, or use 'messages' (or conversational 'prompt'/'completion') data",
        )
    column = "messages" if layout == "messages" else "completion"
    if conversational and chat_template is None and getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "the dataset is conversational but the tokenizer has no chat template",
            column=column,
            fix="use a tokenizer with a chat template, set tokenizer.chat_template, or pass chat_template=",
        )
    if not conversational and getattr(tokenizer, "eos_token", None) is None:
        raise DataError(
            "the tokenizer has no EOS token, which TRL appends to every text or completion",
            column="text" if layout == "text" else "completion",
            fix="set tokenizer.eos_token (e.g. to the token your model ends answers with)",
        )
    return bool(completion_only_loss)


def truncation_window(max_length: int, truncation_mode: str) -> tuple[int | None, int | None]:
    """The slice bounds that keep ``max_length`` tokens: the first (``keep_start``) or the last (``keep_end``)."""
    return (None, max_length) if truncation_mode == "keep_start" else (-max_length, None)


def label_masks(column_names, completion_only_loss: bool) -> list[str]:
    """The mask columns TRL builds a tokenized row's labels from: ``assistant_masks``, and ``completion_mask``
    under ``completion_only_loss``, where present."""
    wanted = ("completion_mask", "assistant_masks") if completion_only_loss else ("assistant_masks",)
    return [c for c in wanted if c in column_names]


def labels_from_masks(example: dict, masks: list[str]) -> list[int]:
    """TRL's labels of a tokenized row: its ``input_ids``, -100 where any of the ``masks`` columns is 0."""
    bits = [example[c] for c in masks]
    return [t if all(b) else -100 for t, *b in zip(example["input_ids"], *bits, strict=False)]


def cut_to_window(example: dict, *, window: tuple[int | None, int | None]) -> dict:
    """``input_ids`` and ``labels`` cut to ``window`` (``truncation_window``), and whether a label is left."""
    cut = slice(*window)
    labels = example["labels"][cut]
    return {"input_ids": example["input_ids"][cut], "labels": labels,
            "_has_labels": any(label != -100 for label in labels)}  # fmt: skip


def tokenize_sft_row(
    example: dict,
    index: int,
    *,
    layout: str,
    conversational: bool,
    tokenizer,
    eos_token: str | None,
    chat_template: str | None,
    completion_only_loss: bool,
    assistant_only_loss: bool,
    window: tuple[int | None, int | None] | None,
    version: str,
) -> dict:
    assistant_mask = None
    completion_start, prompt_cut = 0, []
    if conversational:
        try:
            input_ids, assistant_mask, completion_start, prompt_cut = _encode_conversation(
                example, layout, tokenizer, chat_template, assistant_only_loss
            )
        except DataError:
            raise
        except Exception as error:  # a user's template raises what it likes (a TypeError from `str + list`, ...)
            raise DataError(
                f"the chat template failed: {describe_error(error)}",
                row=index,
                column="messages" if layout == "messages" else "completion",
                fix="fix the row's messages (roles, order), or use a chat template that accepts them",
            ) from None
    elif layout == "text":
        input_ids = tokenizer(_with_eos(example["text"], eos_token))["input_ids"]
    else:
        prompt_ids = tokenizer(example["prompt"])["input_ids"]
        input_ids = tokenizer(example["prompt"] + _with_eos(example["completion"], eos_token))["input_ids"]
        completion_start = common_prefix_length(prompt_ids, input_ids)
        prompt_cut = prompt_ids[completion_start:]
    labels = list(input_ids)
    if completion_only_loss:
        labels = [-100] * completion_start + labels[completion_start:]
    if assistant_mask is not None:
        labels = [token if bit else -100 for token, bit in zip(labels, assistant_mask, strict=False)]
    out: dict[str, Any] = {PROMPT_CUT: prompt_cut}
    if assistant_only_loss:
        out["_has_assistant"] = assistant_mask is not None and 1 in assistant_mask
    if window is not None:
        cut = slice(*window)
        input_ids, labels = input_ids[cut], labels[cut]
        out["_has_labels"] = any(label != -100 for label in labels)
    out.update(input_ids=list(input_ids), labels=labels)
    return out


def _with_eos(text: str, eos_token: str) -> str:
    return text if text.endswith(eos_token) else text + eos_token


def _encode_conversation(example: dict, layout: str, tokenizer, chat_template, assistant_only_loss: bool):
    """(input_ids, assistant mask or None, where the completion starts, the prompt's ids past it) of one
    conversational row."""
    tools = example.get("tools")
    tools = json.loads(tools) if isinstance(tools, str) else tools
    kwargs = {"chat_template": chat_template, "tools": tools, **(example.get("chat_template_kwargs") or {})}

    def encode(messages, **extra):
        messages = without_null_arguments(messages)
        return tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs, **extra)

    if layout == "messages":
        encoded = encode(example["messages"], return_assistant_tokens_mask=assistant_only_loss)
        completion_start, prompt_ids = 0, []
    else:
        prompt_ids = encode(example["prompt"], add_generation_prompt=True)["input_ids"]
        encoded = encode(example["prompt"] + example["completion"], return_assistant_tokens_mask=assistant_only_loss)
        completion_start = common_prefix_length(prompt_ids, encoded["input_ids"])
    assistant_mask = list(encoded["assistant_masks"]) if assistant_only_loss else None
    return list(encoded["input_ids"]), assistant_mask, completion_start, list(prompt_ids[completion_start:])


def learned_messages(row: dict, layout: str) -> list:
    """The messages a row learns from: ``messages``, or the ``completion`` of prompt/completion rows."""
    return row["messages"] if layout == "messages" else row["completion"]


def no_assistant_error(messages: list, row: int, layout: str) -> DataError:
    """DataError for a row whose ``messages`` (its completion's, for prompt/completion) leave no assistant token
    to learn under ``assistant_only_loss``."""
    column = "messages" if layout == "messages" else "completion"
    roles = {m.get("role") for m in messages if isinstance(m, dict)}
    if "assistant" not in roles:
        return DataError(
            f"has no assistant message to learn from (roles: {', '.join(sorted(map(str, roles)))})",
            row=row,
            column=column,
            fix="drop the row, or rename its roles to 'assistant' (ShareGPT 'gpt' roles are not renamed)",
        )
    return DataError(
        "has no assistant tokens in the chat template's assistant mask",
        row=row,
        column=column,
        fix="the chat template needs {% generation %} markers around assistant turns: use one with them "
        "(SFTConfig's chat_template_path, tokenize_sft's chat_template; with TRL installed, SFTTrainer takes TRL's "
        "training version of known templates), or set assistant_only_loss=False",
    )


def as_trl_reads(dataset, text_field: str, formatted: bool, names: list[str] | None = None):
    """``(dataset, text_field)`` read as TRL reads rows: prompt/completion first, then messages, then the text column
    ``dataset_text_field``. Text columns it would not read are dropped (a formatting function's is refused)."""
    names = set(dataset.column_names if names is None else names) | ({"text"} if formatted else set())  # (a
    # stream's formatting function writes its text column as it is read, after this)
    read_first = {"prompt", "completion"} <= names or bool({"messages", "conversations"} & names)
    if read_first:
        unread = [c for c in {"text", text_field} - {"prompt", "completion", "messages", "conversations"} if c in names]
    else:
        unread = ["text"] if text_field != "text" and {"text", text_field} <= names else []
    first = {}  # (a stream's first row read once more: only where the rows have these columns)
    if {"prompt", "completion"} <= names and text_field in names:
        streamed = isinstance(dataset, datasets.IterableDataset)
        first = next(iter(dataset.take(1)), {}) if streamed else dataset[0] if len(dataset) else {}
    if isinstance(first.get("completion"), str):
        logging.getLogger("fastdpo").warning(
            "the rows have prompt/completion and a %r column: fastdpo ends each completion with the EOS token; TRL "
            "1.16's SFTTrainer appends it to %r instead where that text lacks one, which it does not train on, and "
            "then none to the completion", text_field, text_field)  # fmt: skip
    if formatted and "text" in unread:  # (TRL trains on the other columns, silently)
        reads = sorted(names & {"prompt", "completion", "messages", "conversations", text_field} - {"text"})
        raise ConfigError(f"its text would not be read: the rows have {reads}, which TRL reads first",
                          column="formatting_func", fix=f"remove formatting_func, or drop {reads} from the dataset "
                          "(dataset.remove_columns) so that its text is trained on")  # fmt: skip
    unread = [name for name in unread if name in (dataset.column_names or names)]  # (not a stream's future text)
    return (dataset.remove_columns(unread) if unread else dataset), "text" if read_first else text_field
