"""The normalized preference row, and small predicates every data module shares.

After column mapping (``fastdpo.data.prepare_preferences``) a preference dataset has the columns ``prompt``,
``chosen`` and ``rejected``, each either a string (the *standard* format) or a list of ``{"role", "content"}``
messages (the *conversational* format), the same format in every row. Optional columns keep their meaning:
``system`` (str), ``tools`` (list or JSON string), ``chat_template_kwargs`` (dict), ``chosen_score`` /
``rejected_score`` (numbers), ``status`` (str, e.g. ``"tie"``). Every other column is kept as it came.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fastdpo.errors import ConfigError, DataError, close_match, unknown_choice

TEXT_DTYPES = ("string", "large_string")  # Arrow's text columns (JSON's; CSV's and Parquet's from pandas)

PREFERENCE_COLUMNS = ("prompt", "chosen", "rejected")

# Names real datasets use for the two ratings, mapped to ours (UltraFeedback: score_chosen; distilabel: chosen_rating)
SCORE_ALIASES: dict[str, tuple[str, ...]] = {
    "chosen_score": ("chosen_score", "score_chosen", "chosen_rating", "chosen-rating", "rating_chosen", "chosen-score"),
    "rejected_score": (
        "rejected_score", "score_rejected", "rejected_rating", "rejected-rating", "rating_rejected", "rejected-score",
    ),
}  # fmt: skip


def is_message(value: Any) -> bool:
    """A chat message: a dict with a ``role`` (TRL's test) — ``content`` is checked by the quality report."""
    return isinstance(value, dict) and "role" in value


def is_message_list(value: Any) -> bool:
    """A non-empty list whose first element is a chat message (how TRL tells conversational data apart)."""
    return isinstance(value, list) and len(value) > 0 and is_message(value[0])


def described(value: Any) -> str:
    """``value`` as an error names it: its type, and for a list that is no message list, why not."""
    if value is None or not isinstance(value, list):
        return "None" if value is None else type(value).__name__
    if not value:
        return "an empty list"
    first = value[0]
    if not isinstance(first, dict):
        return f"a list of {type(first).__name__}"
    keys = ", ".join(repr(key) for key in first)
    if "from" in first and "value" in first:  # (ShareGPT's)
        return f"a list of ShareGPT messages ({keys}: rename 'from' and 'value' to 'role' and 'content')"
    return f"a list whose first item has no 'role' ({keys})"


def value_format(value: Any) -> str | None:
    """``"standard"`` for a string, ``"conversational"`` for a message list, None for anything else."""
    if isinstance(value, str):
        return "standard"
    if is_message_list(value):
        return "conversational"
    return None


def without_none(value: Any, text: Callable[[str], str] | None = None) -> Any:
    """``value`` without None fields at any depth (Arrow gives every struct every key, None-filled); its strings
    through ``text`` when given."""
    if isinstance(value, Mapping):
        return {k: without_none(v, text) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [without_none(v, text) for v in value]
    return text(value) if text is not None and isinstance(value, str) else value


def is_text_part(part: Any) -> bool:
    """A content part that is text alone: ``{"type": "text", "text": ...}``, as multimodal chat formats write it."""
    return isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str)


def content_text(content: Any) -> str | None:
    """A message's text: its content string, or the texts of a list of text parts joined; None for anything else
    (an image part, a number)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(map(is_text_part, content)):
        return "".join(part["text"] for part in content)
    return None


def without_null_arguments(messages: list) -> list:
    """``messages`` with the None-valued keys of tool calls' ``arguments`` dicts (at any depth) left out: Arrow gives
    a struct column every key any row has, so a call that had ``{"city": "Paris"}`` comes back with the other calls'
    keys as ``None`` (``"query": null`` in the rendered call). An argument that really was null goes too."""

    def call(tool_call):
        function = tool_call.get("function") if isinstance(tool_call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("arguments"), dict):
            return tool_call
        return {**tool_call, "function": {**function, "arguments": without_none(function["arguments"])}}

    return [{**m, "tool_calls": [call(c) for c in m["tool_calls"]]} if isinstance(m, dict) and m.get("tool_calls")
            else m for m in messages]  # fmt: skip


def template_inputs_problem(row: dict) -> tuple[str, str, str] | None:
    """(column, message, fix) when a row's ``tools`` or ``chat_template_kwargs`` cannot be given to
    ``apply_chat_template``: tools must be a list of JSON schemas (dicts), or that list as a JSON string; the kwargs
    a dict. None when both are fine or absent."""
    tools = row.get("tools")
    if isinstance(tools, str):
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as error:
            return "tools", f"is not valid JSON ({error.msg})", "fix the JSON, or leave it empty (null)"
    if tools is not None and (not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools)):
        got = "a list holding a non-dict" if isinstance(tools, list) else type(tools).__name__
        return "tools", f"expected a list of tool schemas (dicts), got {got}", "fix or drop the row"
    kwargs = row.get("chat_template_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        return "chat_template_kwargs", f"expected a dict, got {type(kwargs).__name__}", "fix or drop the row"
    # Arrow gives every row every key of the column (None where a row has none): only values that are set count
    reserved = sorted(
        key for key, value in (kwargs or {}).items() if key in RESERVED_TEMPLATE_KWARGS and value is not None
    )
    if reserved:
        return "chat_template_kwargs", f"sets {', '.join(reserved)}, which tokenization sets itself", "remove it"
    return None


# apply_chat_template's own arguments, which tokenization passes: a row's chat_template_kwargs may not set them
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "tools", "documents", "tokenize", "return_dict", "return_tensors", "add_generation_prompt",
    "continue_final_message", "return_assistant_tokens_mask", "padding", "truncation", "max_length",
})  # fmt: skip


def source_version(*files: str) -> str:
    """A hash of source files, passed to ``Dataset.map`` so that its cache notices when our code changes.

    ``datasets`` fingerprints a mapped function by reference (module and name) when it can be imported, so an edit
    to the function alone would silently reuse results cached by the previous version.
    """
    digest = hashlib.sha1()
    for name in files:
        digest.update(Path(name).read_bytes())
    return digest.hexdigest()[:16]


def data_columns(present: list[str]) -> list[str]:
    """``present`` without the columns fastdpo's commands add to number the rows (``__fastdpo_*``)."""
    return [column for column in present if not column.startswith("__fastdpo")]


def column_guess(name: str, present: list[str]) -> str | None:
    """The column of ``present`` most like the missing ``name``: for a text column (``rejected``) never a rating
    (``rejected_score``, ``score_rejected``), which was suggested as the answers' column."""
    scores = {alias for aliases in SCORE_ALIASES.values() for alias in aliases}
    return close_match(name, present if name in scores else [c for c in present if c not in scores])


def missing_column(name: str, present: list[str], mapped_to: str | None = None) -> DataError:
    """DataError for a column that is not there, suggesting the close match and the ``columns=`` map."""
    present = data_columns(present)
    guess = column_guess(name, present)
    hint = f"did you mean {guess!r}? " if guess else ""
    target = mapped_to or name
    if mapped_to is not None and mapped_to in present and guess is None:  # (e.g. a file data split wrote)
        fix = f"the data has {mapped_to!r} already: drop {mapped_to!r} from the column map, or name one of its "
        fix += f"columns ({', '.join(present)})"
        return DataError(f"column not found (the column map names it for {mapped_to!r})", column=name, fix=fix)
    fix = f"{hint}map your column with columns={{{target!r}: '<your column>'}} (columns present: {', '.join(present)})"
    return DataError("column not found", column=name, fix=fix)


# the columns of SFT rows (and their usual company): a dataset of these alone holds no pairs under other names
_SFT_ROW_COLUMNS = frozenset({"text", "messages", "prompt", "completion", "system", "tools", "chat_template_kwargs",
                              "id", "source", "images"})  # fmt: skip


def missing_answer(name: str, present: list[str]) -> DataError:
    """``missing_column`` for a pair's ``chosen``/``rejected``, saying what the data holds instead where its layout
    is another trainer's: one completion per row with a label (KTO's unpaired rows; mapping a column, as the plain
    error said, only moved it to the other answer), or SFT rows (text, messages, prompt/completion)."""
    columns = set(present)
    if {"completion", "label"} <= columns:
        return DataError(f"column not found: the data holds one completion per row with a label ({', '.join(present)})"
                         ", KTO's unpaired layout, where DPO reads a chosen and a rejected answer per row", column=name,
                         fix="pair a desirable (label true) and an undesirable (label false) completion of one prompt "
                         "into a row's chosen and rejected (fastdpo data pairs FILE OUT --group-by-prompt "
                         "--completions completion --scores label [--strategy all_above_margin]), or train it with "
                         "TRL's KTOTrainer")  # fmt: skip
    if columns & {"text", "messages", "completion"} and columns <= _SFT_ROW_COLUMNS:  # (pairs under other names:
        # the plain error, with its guess)
        return DataError(f"column not found: the data holds SFT rows ({', '.join(present)}), where preference "
                         "optimization reads a chosen and a rejected answer per row", column=name,
                         fix="train on them with fastdpo sft (SFTTrainer); or, if they are pairs under other names, "
                         f"map them: columns={{{name!r}: '<your column>'}}")  # fmt: skip
    return missing_column(name, present)


def rename_columns(dataset, columns: dict[str, str], known: tuple[str, ...], *, present: list[str] | None = None):
    """Apply a ``{our name: the dataset's name}`` map; our names must be in ``known``, theirs present, no clash.
    ``present``: the dataset's column names, when it does not know them (a stream without features)."""
    present = dataset.column_names if present is None else present
    return apply_renames(dataset, column_renames(columns, known, present))


def apply_renames(dataset, renames: dict[str, str]):
    """``renames`` (``{the dataset's name: ours}``) applied to a Dataset, or to a stream row by row as it is read:
    there a row without the column gets None under our name (a map-style dataset's missing value; datasets' own
    rename raises on such a row)."""
    if not renames:
        return dataset
    import datasets

    if isinstance(dataset, datasets.IterableDataset):  # the old names removed where a row has them
        return dataset.map(renamed_row, fn_kwargs={"renames": renames}, remove_columns=list(renames))
    return dataset.rename_columns(renames)


def renamed_row(row: dict, *, renames: dict[str, str]) -> dict:
    """The renamed columns of one row (``renames``: ``{the dataset's name: ours}``), None where it lacks one."""
    return {ours: row.get(theirs) for theirs, ours in renames.items()}


def column_renames(columns: dict[str, str], known: tuple[str, ...], present: list[str]) -> dict[str, str]:
    """``columns`` (``{our name: the dataset's name}``) checked against ``known`` and ``present``, as the
    ``{the dataset's name: ours}`` renames to apply."""
    renames = {}
    for ours, theirs in columns.items():
        if not isinstance(ours, str) or not isinstance(theirs, str):  # (a TypeError from inside the close-match
            raise ConfigError(f"maps {ours!r} to {theirs!r}: both are column names", column="columns",  # search)
                              fix=f"give names as strings, e.g. {{'prompt': 'question'}} (fastdpo's: "
                                  f"{', '.join(known)})")  # fmt: skip
        if ours not in known:
            raise unknown_choice("columns", ours, known)
        if theirs not in present:
            raise missing_column(theirs, present, mapped_to=ours)
        if theirs != ours:
            renames[theirs] = ours
    clashes = [ours for ours in renames.values() if ours in present and ours not in renames]
    if clashes:
        raise DataError(
            f"the dataset already has a column {clashes[0]!r}",
            column=clashes[0],
            fix=f"drop or rename it before mapping another column to {clashes[0]!r}",
        )
    return renames
