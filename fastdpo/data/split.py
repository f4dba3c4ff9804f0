"""A held-out split grouped by prompt: no prompt lands in both parts.

Preference data often holds several pairs per prompt (``build_pairs`` with ``all_above_margin``, or several
annotators); a row-level split then leaks the eval prompts into training. ``split_by_prompt`` keeps each prompt's
rows together. The rule, seeded and independent of Python's hash salting and of the input's row order:

1. Rows are grouped by the prompt as a canonical string, ``json.dumps(prompt, sort_keys=True, ensure_ascii=False)``
   (so a message list is one key whatever the order of its dicts' keys), a message list's leading system (and
   developer) messages left out: a question asked under several system prompts is one group, as it is where the
   system prompt is a column of its own. A prompt taken out of chosen and rejected (TRL's implicit prompt,
   HH-RLHF's transcripts: ``prepare_preferences`` marks such rows with a ``prompt_split_mid_word`` column) runs
   into what the two answers share at their start (``...Assistant: Sure``): such prompts are cut back to their
   last line break, and one that goes on from another's at a whitespace joins its group, so that one question's
   pairs stay together. Explicit prompts are grouped as they are.
2. Groups are visited in the order of ``blake2b(f"{seed}:" + key)``.
3. A group joins eval when taking it leaves eval closer to the target (``test_size`` rows, or
   ``test_size × rows``) than leaving it out, so a group that fits under the target always joins; the others
   are skipped, and the visit stops once eval reaches the target. A group that would leave train empty is
   skipped too, and when no group was taken the smallest one (the first in visiting order) is.

So eval ends within one group (the largest) of the target, and both parts are non-empty. Rows keep their input
order in each part.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import unicodedata
from typing import Any

import datasets

from fastdpo.data.pairs import column_values, missing_column, table_columns
from fastdpo.data.quality import squeezed
from fastdpo.data.schema import missing_column as schema_missing_column
from fastdpo.data.schema import without_none
from fastdpo.errors import ConfigError, DataError


def split_by_prompt(
    dataset: datasets.Dataset | list[dict[str, Any]],
    *,
    test_size: float | int = 0.1,
    seed: int = 42,
    prompt: str = "prompt",
) -> tuple[datasets.Dataset, datasets.Dataset] | tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, eval) with no prompt in both (see the module docstring for the rule).

    Args:
        dataset: a ``datasets.Dataset`` (the parts are ``.select`` of it) or a list of dicts (lists of the same
            dict objects back).
        test_size: a fraction of the rows in (0, 1), or a number of rows, 1 ≤ test_size < rows.
        seed: picks which prompts go to eval; the same seed gives the same split (42: as a run's
            ``eval_fraction`` and ``fastdpo data split`` draw by default).
        prompt: the column to group by.
    """
    present = table_columns(dataset)
    if prompt not in present:
        raise missing_column("prompt", prompt, present, cli="""--columns '{"prompt": "<your column>"}'""")
    keys = column_values(dataset, prompt)
    implicit = prompt == "prompt" and IMPLICIT_MARK in present  # (prepare_preferences took them out of the pairs)
    return split_by_keys(dataset, implicit_keys(keys) if implicit else keys, test_size=test_size, seed=seed,
                         column=prompt, implicit=implicit)  # fmt: skip


IMPLICIT_MARK = "prompt_split_mid_word"  # the column prepare_preferences adds where it took the prompt out of the pairs


def implicit_keys(keys: list) -> list:
    """The grouping keys of prompts taken out of chosen and rejected (TRL's implicit prompt), each cut back to its
    last line break: answers that begin alike ("Sure..." / "Sorry...") carry the prompt into them ("...Assistant:
    S"); with ``split_by_keys(implicit=True)``, a key that goes on from another's at a whitespace joins its group
    (answers sharing a whole first line: "...Assistant: Sure." goes on from "...Human: Q")."""
    return [key.rsplit("\n", 1)[0] if isinstance(key, str) and "\n" in key.strip() else key for key in keys]


ROW_COLUMN = "__fastdpo_row__"  # ``fastdpo data split``'s row numbers, through a split (not the data's: never named)


def split_pairs(dataset: datasets.Dataset, *, test_size: float | int = 0.1, seed: int = 42, prepared=None):
    """``split_by_prompt`` for DPO rows as given (fastdpo's column names), as ``fastdpo data split`` and a run's
    ``eval_fraction`` split them: by the ``prompt`` column (without a ``system`` column's text, so a question asked
    under several system prompts stays on one side); without one, by the prompt the trainers take out of chosen and
    rejected (TRL's implicit prompt), keyed by ``implicit_keys``: one HH dialogue had a key per pair, and went to
    both sides. A row the preparation refuses goes with its prompt's group (without a prompt column: a group
    of its own) and counts toward no size (``split_by_keys``). ``prepared``: ``prepared_rows``' rows of ``dataset``,
    where the caller has them already."""
    from fastdpo.data.refused import prepared_rows, refused_rows

    if "prompt" in dataset.column_names:  # (the rows preparation refuses count toward no size: see split_by_keys)
        try:
            refused = refused_rows(dataset)
        except DataError:  # (the whole dataset's problem: the trainers say it)
            refused = set()
        keys = column_values(dataset, "prompt")
        return split_by_keys(dataset, keys, test_size=test_size, seed=seed, column="prompt", refused=refused)
    if prepared is None:
        prepared, _ = prepared_rows(dataset, None)
    keys = prepared["prompt"] if not isinstance(prepared, list) else [
        row.get("prompt", {"refused": row}) for row in prepared]  # fmt: skip
    keys = implicit_keys(keys)
    if not all(keys):  # pairs whose chosen and rejected begin with nothing alike: a prompt under another name?
        error = schema_missing_column("prompt", dataset.column_names)  # (the CLI words its column map for itself)
        empty = sum(not key for key in keys)
        raise DataError(f"{error.message}, and in {empty} of {len(keys)} rows chosen and rejected begin with no "
                        "shared prompt to group by", column=error.column, fix=error.fix)  # fmt: skip
    refused = {row for row, key in enumerate(keys) if isinstance(key, dict) and "refused" in key}
    return split_by_keys(dataset, keys, test_size=test_size, seed=seed, column="prompt", refused=refused,
                         implicit=True)  # fmt: skip


def split_sft_by_prompt(dataset: datasets.Dataset, *, test_size: float | int = 0.1, seed: int = 42):
    """``split_by_prompt`` for ``prepare_sft``'s rows: by their ``prompt``; a conversation (``messages``) by its
    messages before the last assistant turn; a ``text`` row by its text."""
    keys, column = _sft_keys(dataset)
    return split_by_keys(dataset, keys, test_size=test_size, seed=seed, column=column)


def split_sft_rows(dataset: datasets.Dataset, *, test_size: float | int = 0.1, seed: int = 42,
                   columns: dict[str, str] | None = None, text_field: str = "text"):  # fmt: skip
    """``split_sft_by_prompt`` for SFT rows as given (``columns`` and ``text_field``: ``prepare_sft``'s), as ``fastdpo
    data split`` and a run's ``eval_fraction`` split them: each row keyed as its prepared row is (a ShareGPT
    conversation by its messages), a row the preparation refuses a group of its own, so the two hold out the same
    rows whether or not some are refused (the run split the rows left after preparation)."""
    from fastdpo.data.sft import prepare_sft

    refused: dict[int, DataError] = {}
    prepared = prepare_sft(dataset, columns=columns, text_field=text_field, refused=refused)
    found, column = _sft_keys(prepared)
    kept = iter(found)
    names = {"prompt": "prompt", "text": text_field, **(columns or {})}  # (a refused row's own prompt, as given)
    keys = [_raw_sft_key(dataset[row], names, row) if row in refused else next(kept) for row in range(len(dataset))]
    return split_by_keys(dataset, keys, test_size=test_size, seed=seed, column=column, refused=set(refused))


def _raw_sft_key(row: dict, names: dict, number: int):
    """A refused SFT row's grouping key: its prompt (or text) as given where it has one it can be read by, so it
    stays on its question's side; else a group of its own."""
    for ours in ("prompt", "text"):
        value = row.get(names.get(ours, ours))
        if isinstance(value, str) and value.strip():
            return value
    return {"refused": number}


def _sft_keys(dataset) -> tuple[list, str]:
    """Each prepared SFT row's grouping key, and the column it is read from."""
    present = table_columns(dataset)
    if "prompt" in present or "messages" not in present:
        key = "prompt" if "prompt" in present else "text"
        if key not in present:
            raise schema_missing_column(key, present)
        return column_values(dataset, key), key

    def asked(messages: list[dict]) -> list[dict]:  # (ShareGPT's converted rows keep its roles: "gpt")
        answers = [i for i, message in enumerate(messages) if message.get("role") in _ANSWERING]
        return messages[: answers[-1]] if answers else messages

    return [asked(messages) for messages in dataset["messages"]], "messages"


_ANSWERING = frozenset({"assistant", "gpt", "model", "bot"})  # the roles of an answer (ShareGPT's too)


def split_by_keys(dataset, keys, *, test_size: float | int, seed: int, column: str, refused=frozenset(),
                  implicit: bool = False):  # fmt: skip
    """``dataset`` split as the module docstring says, each row grouped by its prompt in ``keys`` (``column``'s, or
    the prompt that preparing the row gives). ``refused``: rows the preparation refuses, which the trainers drop:
    they go with their group, count toward no size, and a group of them alone stays in train (a held-out part of
    refused rows alone was empty once prepared, and the run failed). ``implicit``: the keys are ``implicit_keys``, and
    one that goes on from another's at a whitespace joins its group (explicit prompts are grouped exactly: a bare
    "Summarize the text." would take in every prompt that begins with it)."""
    asked = [_asked(value) for value in keys]
    row_keys = [prompt_key(value) for value in asked]
    strings = {key: value for key, value in zip(row_keys, asked, strict=True) if isinstance(value, str)}
    root = _within_prompts(strings) if implicit else {}
    groups: dict[str, list[int]] = {}
    for row, key in enumerate(row_keys):
        groups.setdefault(root.get(key, key), []).append(row)
    sizes = {key: sum(row not in refused for row in rows) for key, rows in groups.items()}
    eligible = [key for key, size in sizes.items() if size]
    if len(eligible) < 2:
        raise DataError(
            f"a split grouped by prompt needs at least 2 distinct prompts, found {len(eligible)}"
            + (f" among the rows the preparation keeps ({len(refused)} refused)" if refused else ""),
            column=column,
            fix="add rows with other prompts (no prompt is in both parts of the split)",
        )
    num_rows = sum(sizes.values())
    target = _target_rows(test_size, num_rows)
    order = sorted(eligible, key=lambda key: (_seeded_digest(seed, key), key))
    eval_keys = _choose_groups([(key, sizes[key]) for key in order], target, num_rows)
    num_rows = len(dataset)
    eval_rows = sorted(row for key in eval_keys for row in groups[key])
    taken = set(eval_rows)
    train_rows = [row for row in range(num_rows) if row not in taken]
    if isinstance(dataset, datasets.Dataset):
        return dataset.select(train_rows), dataset.select(eval_rows)
    return [dataset[row] for row in train_rows], [dataset[row] for row in eval_rows]


def _within_prompts(prompts: dict[str, str]) -> dict[str, str]:
    """key → the key of its group, for string prompts (``prompts``: key → text): a prompt that begins with another
    whole prompt, followed by whitespace, goes with it (rule 1). Keys missing from the answer are their own."""
    root: dict[str, str] = {}
    chain: list[tuple[str, str]] = []  # (text, key): each a prefix of the next (sorted, a text's prefixes are here)
    for text, key in sorted((_compared_text(text), key) for key, text in prompts.items()):
        while chain and not text.startswith(chain[-1][0]):
            chain.pop()
        root[key] = next((root[shorter] for prefix, shorter in chain if _continues(text, prefix)), key)
        chain.append((text, key))
    return root


def _continues(text: str, prompt: str) -> bool:
    """``text`` is ``prompt`` and more, from a whitespace on."""
    return text.startswith(prompt) and text[len(prompt) : len(prompt) + 1].isspace()


def _asked(prompt: Any) -> Any:
    """A message list without its leading system and developer messages; any other prompt as it is."""
    if not isinstance(prompt, list):
        return prompt
    start = 0
    while (
        start < len(prompt) and isinstance(prompt[start], dict) and prompt[start].get("role") in ("system", "developer")
    ):
        start += 1
    return prompt[start:] if start < len(prompt) else prompt


def prompt_key(value: Any) -> str:
    """The grouping key of a prompt: canonical JSON of its text as the quality check compares it (``squeezed``:
    whitespace that carries no meaning left out; messages without None fields), in Unicode's NFC form. A prompt
    written with a trailing space, ``\r\n``, decomposed accents or ``Dataset.to_list()``'s None-filled message keys
    was another group, and went to both sides (a prompt without such variants keeps its key, and its side)."""
    return json.dumps(without_none(value, _compared_text), sort_keys=True, ensure_ascii=False, default=str)


def _compared_text(text: str) -> str:
    return unicodedata.normalize("NFC", squeezed(text))


def _seeded_digest(seed: int, key: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()


def _target_rows(test_size: float | int, num_rows: int) -> float:
    """How many rows eval should get: ``test_size`` rows, or that fraction of ``num_rows``."""
    if isinstance(test_size, bool) or not isinstance(test_size, numbers.Real):
        raise ConfigError(f"must be a number, got {test_size!r}", column="test_size", fix="use e.g. test_size=0.1")
    if isinstance(test_size, numbers.Integral):
        if not 1 <= test_size < num_rows:
            raise ConfigError(
                f"{test_size} rows out of {num_rows}",
                column="test_size",
                fix=f"use a number of rows from 1 to {num_rows - 1}, or a fraction in (0, 1)",
            )
        return float(test_size)
    if not 0 < test_size < 1:
        raise ConfigError(
            f"{test_size!r} is not a fraction in (0, 1)", column="test_size", fix="use e.g. 0.1, or an int row count"
        )
    return float(test_size) * num_rows


def _choose_groups(groups: list[tuple[str, int]], target: float, num_rows: int) -> list[str]:
    """Keys of the eval groups, from (key, size) in visiting order (rule 3 of the module docstring)."""
    chosen: list[str] = []
    taken = 0
    for key, size in groups:
        if taken >= target:
            break
        closer = taken + size - target < target - taken
        if closer and taken + size < num_rows:
            chosen.append(key)
            taken += size
    if not chosen:
        smallest = min(size for _, size in groups)
        chosen.append(next(key for key, size in groups if size == smallest))
    return chosen
