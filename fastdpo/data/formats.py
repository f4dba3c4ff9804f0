"""Preference datasets in the shapes people bring, normalized to ``prompt``/``chosen``/``rejected``.

``prepare_preferences`` takes a dataset (or anything ``load_data`` takes) and returns a ``datasets.Dataset`` with:

- ``columns={"prompt": "input"}`` applied first (our name → the dataset's name), and the rating columns real
  datasets use (``score_chosen``, ``chosen_rating``, ``chosen-rating`` …) renamed to ``chosen_score`` /
  ``rejected_score``;
- the format detected from the first row, or forced with ``format="standard" | "conversational"``: every row
  must then match it (one DataError at the first row that does not);
- an implicit prompt extracted when there is no ``prompt`` column, exactly as TRL 1.16's ``extract_prompt``
  does: the longest common prefix of chosen and rejected (whole messages for conversations, characters for
  strings). For strings this can end inside a word; such rows get ``prompt_split_mid_word = True``;
- UltraFeedback-style rows (a string ``prompt`` next to whole conversations that begin with the user): the
  prompt is taken from the conversations, as above; a string prompt next to completions that begin with the
  assistant becomes one user message; a prompt of messages that whole conversations begin with is taken out of
  them (the turns once, in the prompt);
- ``system`` (ours; TRL ignores the column): a system message put first in a conversational prompt that has
  none, or ``system_template`` (default ``"{system}\\n\\n{prompt}"``) for strings; empty systems change nothing;
- ``input``/``context`` (instruction datasets): joined to the prompt with ``input_template`` (default
  ``"{prompt}\\n\\n{input}"``; for conversations, appended to the last user message), ``input`` then ``context``
  where a row has both; empty ones change nothing;
- every other column (``tools``, ``chat_template_kwargs``, metadata) kept as it came.
"""

from __future__ import annotations

import logging
from typing import Any

import datasets

from fastdpo.data.load import load_data, text_columns
from fastdpo.data.schema import (
    SCORE_ALIASES,
    TEXT_DTYPES,
    apply_renames,
    column_renames,
    described,
    is_message_list,
    missing_answer,
    source_version,
    template_inputs_problem,
    value_format,
)
from fastdpo.data.written import said, warn_written_messages
from fastdpo.errors import ConfigError, DataError, unknown_choice

logger = logging.getLogger(__name__)

FORMATS = ("auto", "standard", "conversational")
KNOWN_TARGETS = (
    "prompt", "chosen", "rejected", "system", "input", "context", "chosen_score", "rejected_score", "status",
    "tools", "chat_template_kwargs",
)  # fmt: skip
DEFAULT_SYSTEM_TEMPLATE = "{system}\n\n{prompt}"
DEFAULT_INPUT_TEMPLATE = "{prompt}\n\n{input}"
_VERSION = source_version(__file__)


def extract_prompt(chosen, rejected) -> tuple[Any, Any, Any]:
    """(prompt, chosen, rejected): TRL 1.16's implicit-prompt rule, reproduced exactly.

    The prompt ends at the first position where chosen and rejected differ, moved back by one when the character
    before it is a space (so the space starts the completions). As in TRL, when one is a prefix of the other the
    scan stops at the last compared position, so the last shared element goes to the completions.
    """
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


def prepare_preferences(
    data,
    *,
    columns: dict[str, str] | None = None,
    format: str = "auto",
    system_template: str = DEFAULT_SYSTEM_TEMPLATE,
    input_template: str = DEFAULT_INPUT_TEMPLATE,
    split: str = "train",
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Normalize a preference dataset (see the module docstring); returns a ``datasets.Dataset``."""
    dataset = load_data(data, split=split, text=text_columns(columns))
    if format not in FORMATS:
        raise unknown_choice("format", format, FORMATS)
    check_template("system_template", system_template, ("system", "prompt"))
    check_template("input_template", input_template, ("prompt", "input"))
    if len(dataset) == 0:  # (before its columns: an empty list's dataset has none to name)
        raise DataError("the dataset has no rows", fix="check the file or the split you loaded")
    dataset, _ = rename_preference_columns(dataset, columns or {})
    require_answers(dataset)
    warn_preference_labels(dataset, columns or {})
    kind = _detect_format(dataset, format)
    _check_rows(dataset, kind)
    fn_kwargs = {
        "kind": kind,
        "system_template": system_template,
        "input_template": input_template,
        "version": _VERSION,
    }
    has_prompt = "prompt" in dataset.column_names
    warn_of_rows(dataset, kind)
    return dataset.map(
        normalize_row,
        fn_kwargs={**fn_kwargs, "has_prompt": has_prompt},
        remove_columns=[c for c in ("system", "input", "context") if c in dataset.column_names],
        num_proc=num_proc,
        desc="Normalizing preference rows",
    )


_LABELS = ("labels", "label", "preference", "preferred", "choice")  # a column that may say which answer won


def warn_preference_labels(dataset: datasets.Dataset, columns: dict) -> None:
    """A counted warning where the column map names chosen and rejected beside a 0/1 column that may say which of
    the two won (Stanford SHP's ``labels``: 1 where ``human_ref_A`` is preferred): mapped as they are, its rows of
    the other value train their pair reversed, without a word."""
    label = next((name for name in _LABELS if name in dataset.column_names), None)
    if said() or label is None or not {"chosen", "rejected"} <= columns.keys():
        return
    values = dataset[label]
    if not all(isinstance(value, int) and value in (0, 1) for value in values) or len(set(values)) < 2:  # (bools too)
        return
    ones = sum(1 for value in values if value)
    logger.warning("the column %r (0 or 1: %d rows of %d are 1) sits beside chosen %r and rejected %r, which the "
                   "column map takes as they are in every row: if it says which answer is preferred (Stanford SHP's "
                   "labels: 1 where human_ref_A is), the rows of its other value train their pair reversed; swap "
                   "their answers first (e.g. Dataset.map)", label, ones, len(values), columns["chosen"],
                   columns["rejected"])  # fmt: skip


def warn_of_rows(dataset: datasets.Dataset, kind: str) -> None:
    """The counted warnings of rows kept as they are (message lists written as text, prompts both completions
    repeat) and of a text column left unread beside no prompt column, for standard rows (``dataset`` renamed)."""
    if kind != "standard":
        return
    names = [name for name in ("prompt", "chosen", "rejected", "system") if name in dataset.column_names]
    columns = dataset.with_format(None).select_columns(names).to_dict()  # (read once, for the row warnings)
    warn_written_messages({name: values for name, values in columns.items() if name != "system"})
    if "prompt" in columns:
        _warn_repeated_prompts(columns)
        _warn_system_alone(columns)
    else:  # (whole conversations carry their prompt: no column is missing)
        _warn_unused_text(dataset)


def _warn_system_alone(columns: dict[str, list]) -> None:
    """One counted warning for string rows whose prompt is blank beside a system text: the system text alone is
    their prompt (Orca's rows of an empty question), where a blank prompt without one is the quality check's
    ``empty``. Kept: a system-only prompt may be meant."""
    if said() or "system" not in columns:
        return

    def text(value) -> bool:
        return isinstance(value, str) and bool(value.strip())

    pairs = enumerate(zip(columns["prompt"], columns["system"], strict=True))
    rows = [row for row, (prompt, system) in pairs if isinstance(prompt, str) and not text(prompt) and text(system)]
    if rows:
        logger.warning("%d of %d rows have a blank prompt beside a system text, which alone is their prompt (rows "
                       "%s); if the prompt is in another column, map it (columns={'prompt': ...}), or drop the rows",
                       len(rows), len(columns["prompt"]), rows[:5])  # fmt: skip


def _warn_repeated_prompts(columns: dict[str, list]) -> None:
    """One counted warning for string rows whose chosen and rejected both begin with their prompt (whole
    transcripts, HH-RLHF's, next to a prompt column): the model would read the prompt twice. They are kept as they
    are: a completion may repeat its prompt on purpose. ``columns``: prompt, chosen and rejected, read whole."""
    if said():  # (given already, for the whole set: see row_warnings_said)
        return
    together = zip(columns["prompt"], columns["chosen"], columns["rejected"], strict=True)
    rows = [row for row, values in enumerate(together) if repeats_prompt(*values)]
    if rows:
        logger.warning("%d of %d rows have a chosen and a rejected that both begin with their prompt (rows %s): the "
                       "model reads the prompt twice. If they are whole transcripts, drop the prompt column (the "
                       "shared text becomes the prompt) or cut it from them", len(rows), len(columns["chosen"]),
                       rows[:5])  # fmt: skip


def repeats_prompt(prompt, chosen, rejected) -> bool:
    """Whether a string row's chosen and rejected both begin with its (non-blank) prompt."""
    return (isinstance(prompt, str) and bool(prompt.strip()) and isinstance(chosen, str) and isinstance(rejected, str)
            and chosen.startswith(prompt) and rejected.startswith(prompt))  # fmt: skip


REPEATED_PROMPT_WHY = "chosen and rejected both begin with the prompt: the model reads it twice"
# columns of ours besides prompt/chosen/rejected, and those a dataset carries that are not a prompt
_NOT_A_PROMPT = ("system", "input", "context", "tools", "chat_template_kwargs", "status", "chosen_score",
                 "rejected_score", "id", "source", "messages", "dataset", "prompt_id", "chosen_model",
                 "rejected_model", "model", "split", "language", "category")  # fmt: skip


# the names a prompt column goes by in datasets (suggested first where one of them is present)
_PROMPT_NAMES = ("instruction", "question", "query", "problem", "user", "human", "input", "context")


def _warn_unused_text(dataset: datasets.Dataset) -> None:
    """A warning where, without a prompt column, the dataset has another text column, e.g. ``question``: the prompt is
    then what chosen and rejected begin with alike (TRL's implicit prompt), often nothing, and that column is not
    read (the quality check then drops the pairs as empty, or trains on them with an empty prompt); or an ``input``
    or ``context`` column, joined after that prompt as its context, where it often holds the question itself
    (distilabel's Orca pairs). The map suggested: a column named as prompts are, else the first unread one."""
    if said():  # (given already, for the whole set: see row_warnings_said)
        return
    features = dataset.features
    strings = [name for name, feature in features.items() if name not in ("chosen", "rejected")
               and getattr(feature, "dtype", None) in TEXT_DTYPES]  # fmt: skip
    text = [name for name in strings if name not in _NOT_A_PROMPT]
    joined = [name for name in ("input", "context") if name in strings]
    if not text and not joined:
        return
    guess = next((name for name in _PROMPT_NAMES if name in text or name in joined), (text or joined)[0])
    unread = (f", the text column{'s' if len(text) > 1 else ''} {', '.join(map(repr, text))} "
              f"{'are' if len(text) > 1 else 'is'} not read") if text else ""  # fmt: skip
    context = f", {' and '.join(map(repr, joined))} joined after it as context" if joined else ""
    logger.warning("no prompt column: the prompt is taken from what chosen and rejected begin with alike (TRL's "
                   "implicit prompt)%s%s; if %r holds the prompt, map it: columns={'prompt': %r} (a run's "
                   "dataset_columns; fastdpo data's --columns)", unread, context, guess, guess)  # fmt: skip


def rename_preference_columns(dataset, columns: dict[str, str], present: list[str] | None = None):
    """``columns`` applied, then the score aliases; ``present``: the column names, for a stream that does not know
    them (``IterableDataset.column_names`` is None without features), read from its first row."""
    renames, present = preference_renames(columns, list(dataset.column_names if present is None else present))
    return apply_renames(dataset, renames), present


def preference_renames(columns: dict[str, str], present: list[str]) -> tuple[dict[str, str], list[str]]:
    """The ``{the dataset's name: ours}`` renames of ``columns`` then of the score aliases, composed into one
    (an alias the column map produced is renamed from its source), and the column names after them."""
    renames = column_renames(columns, KNOWN_TARGETS, present)
    present = [renames.get(name, name) for name in present]
    for ours, aliases in SCORE_ALIASES.items():
        found = [a for a in aliases if a in present]
        if ours not in present and found:  # the first alias in our order wins; others stay as they are
            source = next((theirs for theirs, target in renames.items() if target == found[0]), found[0])
            renames[source] = ours
            present[present.index(found[0])] = ours
    return renames, present


def _detect_format(dataset: datasets.Dataset, format: str) -> str:
    """``format``, or the format of the first row whose chosen (else rejected) is text or messages: a first row
    without one (null, missing, empty) is that row's problem, refused or dropped as any other row's (it stopped the
    whole dataset, "fix the value" the only way on); a DataError at row 0 where no row has one."""
    if format != "auto":
        return format
    answers = dataset.select_columns([name for name in ("chosen", "rejected") if name in dataset.column_names])
    for row in answers:
        kind = value_format(row.get("chosen")) or value_format(row.get("rejected"))
        if kind is not None:
            return kind
    first = dataset[0]["chosen"]
    numbers = isinstance(first, (int, float)) and not isinstance(first, bool)
    raise DataError(
        f"expected a string or a list of {{'role', 'content'}} messages, got {described(first)}",
        row=0,
        column="chosen",
        fix="fix the value, or run fastdpo.data.check_preferences to list every such row"
        + (
            "; a CSV or spreadsheet reader may read answers like 4 as numbers: read those columns as text "
            "(fastdpo.data.load_data does)"
            if numbers
            else ""
        ),
    )


def require_answers(dataset: datasets.Dataset) -> None:
    """A DataError naming the chosen or rejected column ``dataset`` (under fastdpo's names) lacks."""
    for name in ("chosen", "rejected"):
        if name not in dataset.column_names:
            raise missing_answer(name, dataset.column_names)


def _check_rows(dataset: datasets.Dataset, kind: str) -> None:
    """One DataError at the first row whose chosen/rejected (or conversational prompt) is not in ``kind``."""
    names = ["chosen", "rejected"] + (["prompt"] if "prompt" in dataset.column_names else [])
    for name in names:
        for row, value in enumerate(dataset[name]):
            _raise_if(value_problem(name, value, kind), row, name)
    for name in ("system", "input", "context"):  # joined into the prompt as text: an int or a list would not fit
        if name not in dataset.column_names:
            continue
        for row, value in enumerate(dataset[name]):
            _raise_if(_text_problem(value), row, name)
    optional = [c for c in ("tools", "chat_template_kwargs") if c in dataset.column_names]
    if kind == "conversational" and optional:  # given to apply_chat_template with the messages (TRL: only then)
        values = {c: dataset[c] for c in optional}
        for row in range(len(dataset)):
            problem = template_inputs_problem({c: values[c][row] for c in optional})
            if problem is not None:
                column, message, fix = problem
                raise DataError(message, row=row, column=column, fix=fix)


def check_row(example: dict, row: int, kind: str) -> None:
    """The checks of ``_check_rows`` on one row (of a stream, read one row at a time): DataError at its first
    problem, ``row`` naming it."""
    for name in ("chosen", "rejected"):  # a row of a stream without features may lack one: None, refused
        _raise_if(value_problem(name, example.get(name), kind), row, name)
    if "prompt" in example:
        _raise_if(value_problem("prompt", example["prompt"], kind), row, "prompt")
    for name in ("system", "input", "context"):
        if name in example:
            _raise_if(_text_problem(example[name]), row, name)
    if kind == "conversational":
        problem = template_inputs_problem(example)
        if problem is not None:
            column, message, fix = problem
            raise DataError(message, row=row, column=column, fix=fix)


def value_problem(name: str, value, kind: str) -> tuple[str, str] | None:
    """(message, fix) when a ``chosen``/``rejected``/``prompt`` value does not fit ``kind`` (a string prompt fits
    both formats), or a completion is an empty string; None when it fits."""
    got = value_format(value)
    ok = got == kind or (name == "prompt" and got == "standard")
    if ok and isinstance(value, str) and not value.strip() and name != "prompt":
        return "is empty", "drop the row (fastdpo.data.check_preferences lists them all)"
    if ok:
        return None
    what = got or described(value)
    return (
        f"expected {'a string' if kind == 'standard' else 'a list of messages'} as the data's answers are, got {what}",
        "fix or drop the row (fastdpo.data.check_preferences lists every such row), or pass format=",
    )


def _text_problem(value) -> tuple[str, str] | None:
    if value is None or isinstance(value, str):
        return None
    return f"expected a string (or null), got {type(value).__name__}", "make it a string, or drop the row or the column"


def _raise_if(problem: tuple[str, str] | None, row: int, column: str) -> None:
    if problem is not None:
        raise DataError(problem[0], row=row, column=column, fix=problem[1])


def normalize_row(example: dict, *, kind, has_prompt, system_template, input_template, version):
    """One row in our columns: the implicit prompt extracted, ``input``/``context`` and ``system`` joined in
    (``version``: ``source_version``, for ``Dataset.map``'s cache)."""
    chosen, rejected = example["chosen"], example["rejected"]
    out: dict[str, Any] = {}
    prompt = example.get("prompt") if has_prompt else None
    if kind == "conversational" and isinstance(prompt, str):
        # UltraFeedback-style: whole conversations (starting with the user) next to a string copy of the prompt:
        # the prompt is taken from the conversations. Completions that start with the assistant get it as a turn.
        whole = chosen[0].get("role") != "assistant" and rejected[0].get("role") != "assistant"
        prompt = None if whole else [{"role": "user", "content": prompt}]
    elif kind == "conversational" and prompt and _starts_with(chosen, prompt) and _starts_with(rejected, prompt):
        # whole conversations next to their own first turns as the prompt: the turns once, in the prompt
        chosen, rejected = chosen[len(prompt) :], rejected[len(prompt) :]
    if prompt is None:
        prompt, chosen, rejected = extract_prompt(chosen, rejected)
        if kind == "standard":
            out["prompt_split_mid_word"] = bool(prompt and chosen and prompt[-1].isalnum() and chosen[0].isalnum())
    out.update(prompt=with_extras(prompt, example, system_template, input_template), chosen=chosen, rejected=rejected)
    return out


def with_extras(prompt, row: dict, system_template: str = DEFAULT_SYSTEM_TEMPLATE,
                input_template: str = DEFAULT_INPUT_TEMPLATE):  # fmt: skip
    """``prompt`` with ``row``'s ``input`` and ``context`` (both, in that order) and then its ``system`` joined in;
    empty ones change nothing."""
    for extra in (row.get(c) for c in ("input", "context")):
        if extra:
            prompt = _join_input(prompt, extra, input_template)
    if row.get("system"):
        prompt = _add_system(prompt, row["system"], system_template)
    return prompt


def _starts_with(messages: list, turns: list) -> bool:
    """Whether ``messages`` go on past ``turns`` after beginning with them (role and content)."""
    same = [(m.get("role"), m.get("content")) for m in messages[: len(turns)]]
    return len(messages) > len(turns) and same == [(t.get("role"), t.get("content")) for t in turns]


def _join_input(prompt, extra: str, template: str):
    if isinstance(prompt, str):
        return template.format(prompt=prompt, input=extra)
    messages = [dict(m) for m in prompt]
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user is None:
        messages.append({"role": "user", "content": extra})
    elif isinstance(messages[last_user]["content"], list):  # text parts: the template's text around them, as parts
        before, after = (text.format(input=extra) for text in template.partition("{prompt}")[::2])
        parts = [[{"type": "text", "text": text}] if text else [] for text in (before, after)]
        messages[last_user]["content"] = [*parts[0], *messages[last_user]["content"], *parts[1]]
    else:
        messages[last_user]["content"] = template.format(prompt=messages[last_user]["content"], input=extra)
    return messages


def _add_system(prompt, system: str, template: str):
    if isinstance(prompt, str):
        return template.format(system=system, prompt=prompt)
    if prompt and prompt[0].get("role") == "system":
        return prompt  # the conversation brings its own system message: it wins
    return [{"role": "system", "content": system}, *prompt]


def check_template(name: str, template: str, fields: tuple[str, ...]) -> None:
    """ConfigError unless ``template`` formats with exactly ``fields``."""
    try:
        template.format(**dict.fromkeys(fields, ""))
    except (KeyError, IndexError, ValueError) as error:
        raise ConfigError(
            f"cannot format {template!r} ({error})", column=name, fix=f"use the fields {', '.join(fields)}"
        ) from None


def is_conversational_dataset(dataset: datasets.Dataset) -> bool:
    """Whether a normalized dataset holds conversations."""
    return len(dataset) > 0 and is_message_list(dataset[0]["chosen"])
