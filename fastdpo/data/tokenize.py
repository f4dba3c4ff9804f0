"""Tokenize normalized preference rows exactly as TRL 1.16's DPO trainer does, and truncate as its collator does.

Per row (``TRL: DPOTrainer._prepare_dataset``):

- strings: the EOS *string* is appended to ``chosen``/``rejected`` that do not end with it; then
  ``tokenizer(prompt)``, ``tokenizer(prompt + chosen)``, ``tokenizer(prompt + rejected)`` (the tokenizer's own
  special tokens, e.g. BOS);
- conversations: ``apply_chat_template(prompt, add_generation_prompt=True)`` and ``apply_chat_template(prompt +
  chosen)`` (and rejected), with the row's ``tools`` (a list or a JSON string) and ``chat_template_kwargs``; no
  EOS is added;
- the completion starts where the prompt's ids and both prompt+completion ids stop agreeing (usually the end of
  the prompt): ``prompt_ids``, ``chosen_ids``, ``rejected_ids``.

``max_length`` and ``truncation_mode`` are then applied per sequence, as TRL's ``DataCollatorForPreference`` does
(``truncate``): ``keep_start`` keeps the first ``max_length`` tokens of prompt+completion, ``keep_end`` the last.
Under ``keep_start`` a row whose prompt alone fills ``max_length`` has nothing left to learn from: TRL drops it
silently; here it is dropped and counted. ``max_prompt_length`` (keep the prompt's end) and
``max_completion_length`` (keep the completion's start) are fastdpo's own, applied before ``max_length``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import datasets

from fastdpo.data.load import as_dataset
from fastdpo.data.quality import ROLES, message_problem
from fastdpo.data.render import (  # (truncate, prompt_fills: here for those that import them from here)
    PROMPT_CUT,
    TRUNCATION_MODES,
    TemplateFailure,
    conversation_ids,
    describe_error,
    prompt_fills,
    split_pair,
    string_ids,
    truncate,  # noqa: F401 (imported from here by fastdpo.data, packing, compare)
    warn_prompt_cuts,
)
from fastdpo.data.schema import is_message_list, source_version
from fastdpo.errors import ConfigError, DataError, unknown_choice

logger = logging.getLogger(__name__)

_VERSION = source_version(__file__)


@dataclass
class TokenizedPreferences:
    """The tokenized dataset, and every row dropped on the way (reason → row ids in the input)."""

    dataset: datasets.Dataset
    dropped_rows: dict[str, list[int]] = field(default_factory=dict)

    @property
    def dropped(self) -> dict[str, int]:
        return {reason: len(rows) for reason, rows in self.dropped_rows.items()}

    # its rows, as the dataset's (``pack_pairs(tokenized, ...)`` raised "not iterable"; ``.dataset`` was needed)
    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        return self.dataset[index]

    def __iter__(self):
        return iter(self.dataset)


def _rendered_ids(example: dict, row: int, tokenizer) -> tuple[list[int], list[int], list[int]]:
    """``conversation_ids``, with a chat template that refuses the row (e.g. "roles must alternate") reported there,
    in the column whose conversation it refused."""
    if not example["prompt"]:  # (apply_chat_template's ValueError "empty conversation", deep inside Dataset.map)
        raise DataError("the prompt is an empty conversation: chosen and rejected share no first message to take it "
                        "from (a first user turn that differs, even by a space?)", row=row, column="prompt",
                        fix="give the row a prompt, or drop such rows with fastdpo.data.check_preferences(dataset)"
                        ".filter(dataset) (empty)")  # fmt: skip
    try:
        return conversation_ids(example, tokenizer)
    except TemplateFailure as failure:
        which = "the prompt" if failure.column == "prompt" else f"the prompt + {failure.column}"
        raise DataError(f"the chat template failed on {which}: {describe_error(failure.error)}", row=row,
                        column=failure.column,
                        fix="fix the row's messages, or drop such rows with fastdpo.data.check_preferences(dataset, "
                        "tokenizer).filter(dataset) (chat_template_error)") from None  # fmt: skip


def tokenize_preference_batch(batch: dict, indices: list[int], tokenizer, eos_token: str | None, version: str) -> dict:
    """TRL's per-row rule on a batch: strings go through the fast tokenizer in one call per column."""
    prompts, chosen, rejected = batch["prompt"], batch["chosen"], batch["rejected"]
    if chosen and is_message_list(chosen[0]):
        rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
        encoded = [_rendered_ids(row, index, tokenizer) for row, index in zip(rows, indices, strict=True)]
    else:
        encoded = zip(*string_ids(prompts, chosen, rejected, tokenizer, eos_token), strict=True)
    out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": []}
    cuts = []
    for ids in encoded:
        for column, part in zip(out, split_pair(*ids), strict=True):
            out[column].append(part)
        cuts.append(ids[0][len(out["prompt_ids"][-1]) :])
    out[PROMPT_CUT] = cuts
    out[SAME] = [chosen == rejected for chosen, rejected in zip(out["chosen_ids"], out["rejected_ids"], strict=True)]
    return out


SAME = "_same_ids"  # tokenize_preference_batch's flag: chosen and rejected of the same ids (counted, then removed)


def tokenize_preferences(
    dataset: datasets.Dataset | list[dict],
    tokenizer,
    *,
    max_length: int | None = 1024,
    truncation_mode: str = "keep_start",
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    num_proc: int | None = None,
) -> TokenizedPreferences:
    """Add ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` (untruncated, as TRL's prepared dataset holds them).

    The rows TRL drops (prompt ≥ ``max_length`` under ``keep_start``) are dropped here too, and counted in
    ``dropped_rows``; no other row is dropped (the quality report flags the rest). Truncation itself happens per
    sequence when batches are built (``truncate``); ``max_prompt_length``/``max_completion_length``, when set,
    are applied here.
    """
    dataset = as_dataset(dataset)
    check_lengths(truncation_mode, max_length, max_prompt_length, max_completion_length)
    if len(dataset) == 0:  # e.g. report.filter dropped every row; a Dataset.map over no rows adds no columns
        fix = "check the file or the split you loaded, and the quality report if you filtered"
        raise DataError("the dataset has no rows", fix=fix)
    check_tokenizer(tokenizer, dataset[0]["chosen"])
    if is_message_list(dataset[0]["chosen"]):
        _check_conversations(dataset)
    tokenized = dataset.map(
        tokenize_preference_batch,
        batched=True,
        with_indices=True,
        fn_kwargs={"tokenizer": tokenizer, "eos_token": tokenizer.eos_token, "version": _VERSION},
        num_proc=num_proc,
        desc="Tokenizing preference rows",
    )
    if max_prompt_length is not None or max_completion_length is not None:
        tokenized = tokenized.map(
            clip_lengths,
            fn_kwargs={"max_prompt": max_prompt_length, "max_completion": max_completion_length, "version": _VERSION},
            num_proc=num_proc,
            desc="Clipping prompts and completions",
        )
    same = [row for row, flag in enumerate(tokenized[SAME]) if flag]  # (a column of bools: the ids are not read)
    warn_prompt_cuts(tokenized[PROMPT_CUT], tokenizer, "preference")
    tokenized = tokenized.remove_columns([SAME, PROMPT_CUT])
    if same:
        logger.warning("%d of %d rows have chosen and rejected of the same tokens (e.g. a chat template that drops "
                       "the reasoning they differ in), rows %s: no preference to learn, trained on as TRL does; "
                       "fastdpo.data.check_preferences(dataset, tokenizer).filter drops them (identical_tokens)",
                       len(same), len(tokenized), _some(same))  # fmt: skip
    return drop_filling_prompts(tokenized, max_length, truncation_mode)


def drop_filling_prompts(tokenized: datasets.Dataset, max_length: int | None,
                         truncation_mode: str) -> TokenizedPreferences:  # fmt: skip
    """``tokenized`` (with ``prompt_ids``) without the rows whose prompt fills ``max_length`` (``prompt_fills``),
    counted as ``prompt_fills_max_length``."""
    if max_length is None or truncation_mode != "keep_start":
        return TokenizedPreferences(tokenized, {})
    rows = [i for i, ids in enumerate(tokenized["prompt_ids"]) if prompt_fills(len(ids), max_length, truncation_mode)]
    if not rows:
        return TokenizedPreferences(tokenized, {})
    gone = set(rows)
    kept = tokenized.select([i for i in range(len(tokenized)) if i not in gone])
    return TokenizedPreferences(kept, {"prompt_fills_max_length": rows})


def check_lengths(truncation_mode: str, max_length, max_prompt_length, max_completion_length) -> None:
    """ConfigError for an unknown ``truncation_mode`` or a length that is not a positive integer (or None)."""
    if truncation_mode not in TRUNCATION_MODES:
        raise unknown_choice("truncation_mode", truncation_mode, TRUNCATION_MODES)
    for name, value in (("max_length", max_length), ("max_prompt_length", max_prompt_length),
                        ("max_completion_length", max_completion_length)):  # fmt: skip
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f"must be a positive integer or None, got {value!r}", column=name)


def check_tokenizer(tokenizer, first_chosen) -> None:
    """DataError when the tokenizer cannot tokenize rows like the first: a chat template for conversations, an EOS
    token (appended to every completion) for strings."""
    if is_message_list(first_chosen) and getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "the dataset is conversational but the tokenizer has no chat template",
            column="chosen",
            fix="use a tokenizer with a chat template, or set tokenizer.chat_template",
        )
    if getattr(tokenizer, "eos_token", None) is None and isinstance(first_chosen, str):
        raise DataError(
            "the tokenizer has no EOS token, which TRL appends to every completion",
            fix="set tokenizer.eos_token (e.g. to the token your model ends answers with)",
        )


def _check_conversations(dataset: datasets.Dataset, *, batch_size: int = 2048) -> None:
    """DataError at the first message a chat template cannot render (no role, no content); one counted warning
    for the rows whose roles are out of order (TRL trains on them as they are, and so does fastdpo)."""
    out_of_order: set[int] = set()
    columns = [c for c in ("prompt", "chosen", "rejected") if c in dataset.column_names]
    batches = dataset.select_columns(columns).iter(batch_size)
    for start, batch in zip(range(0, len(dataset), batch_size), batches, strict=True):
        for column in columns:
            for offset, messages in enumerate(batch[column]):
                if not conversation_fits(messages, start + offset, column):
                    out_of_order.add(start + offset)
    if out_of_order:
        logger.warning("%d of %d rows have their roles out of order (a prompt not ending with a user or tool turn, or "
                       "a completion not starting with the assistant), rows %s: trained on as they are; "
                       "fastdpo.data.check_preferences(...).filter drops them", len(out_of_order), len(dataset),
                       _some(sorted(out_of_order)))  # fmt: skip


def conversation_fits(messages, row: int, column: str) -> bool:
    """DataError where ``messages`` are not a list of messages fastdpo takes (a known role, text content);
    False when their roles are out of order (trained on as they are, but worth a warning); True otherwise."""
    if not isinstance(messages, list):
        raise DataError(f"expected a list of messages, got {type(messages).__name__}", row=row, column=column,
                        fix=_DROP_FIX)  # fmt: skip
    reason, note = message_problem(messages, column, check_roles=True)
    if reason == "bad_message":
        raise DataError(f"{note}: not a message fastdpo takes (roles {', '.join(ROLES)}; a content string or "
                        "text parts)", row=row, column=column, fix="rename other roles (dataset.map: 'human' to "
                        "'user', 'gpt' or 'model' to 'assistant'), fix the row, or drop such rows with "
                        "fastdpo.data.check_preferences(dataset).filter(dataset)")  # fmt: skip
    return reason != "roles_out_of_order"


_DROP_FIX = "fix the row, or drop such rows with fastdpo.data.check_preferences(dataset).filter(dataset)"


def _some(rows: list[int], limit: int = 10) -> str:
    return ", ".join(map(str, rows[:limit])) + (f" and {len(rows) - limit} more" if len(rows) > limit else "")


def clip_lengths(example: dict, *, max_prompt: int | None, max_completion: int | None, version: str) -> dict:
    """``max_prompt_length`` (the prompt's end kept) and ``max_completion_length`` (the start kept) on one row."""
    out = {}
    if max_prompt is not None:
        out["prompt_ids"] = example["prompt_ids"][-max_prompt:]
    if max_completion is not None:
        out["chosen_ids"] = example["chosen_ids"][:max_completion]
        out["rejected_ids"] = example["rejected_ids"][:max_completion]
    return out
