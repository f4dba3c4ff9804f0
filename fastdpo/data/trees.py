"""Message trees (OpenAssistant's oasst1/oasst2 layout) → preference pairs of sibling replies.

A tree dataset holds one message per row: its ``message_id``, its ``parent_id`` (None at a tree's root, the first
user turn), its ``text``, its ``role`` (``prompter`` or ``user``; ``assistant``) and, among the replies its parent
got, its ``rank`` (0 the best; None where the replies were not ranked). ``build_tree_pairs`` gives each assistant
message whose ancestors are all there a row: the conversation from the root to its parent as the ``prompt``
(messages), the message as its ``completion`` (an assistant turn) and its rank; the replies to one message share
that prompt, and ``build_pairs(group_by_prompt=True, lower_is_better=True)`` pairs them, grouped by the message they
reply to (two messages of the same text, two trees that open with "Hello", are two groups; a pair's ``chosen_row`` and
``rejected_row`` are the two messages' rows in the tree data; the message's other columns, ``lang`` say, carried as
``build_pairs`` carries them). User turns are context only: no pair has one as an answer.

An assistant message is left out, counted by its row under the first of these reasons (``TREE_REASONS``), where it
or a message before it in its conversation:

- ``deleted``: is marked deleted (a ``deleted`` column's true);
- ``missing_parent``: names a parent that no row holds (a tree cut by a filter), or a parent chain that loops;
- ``bad_message``: has no text (None, blank, not a string) or a role of neither kind;
- ``roles_out_of_order``: is a reply to an assistant message, or a conversation starts with the assistant;
- ``duplicate_id``: shares its ``message_id`` with an earlier row (the later row is left out);

then ``build_pairs``' own reasons (an unranked reply: ``bad_scores``; a message with one ranked reply:
``too_few_completions``; ...).
"""

from __future__ import annotations

from typing import Any

import datasets

from fastdpo.data.pairs import PairsResult, build_pairs, column_values, missing_column, table_columns
from fastdpo.errors import DataError

ROLES = {"prompter": "user", "user": "user", "assistant": "assistant"}
TREE_REASONS = ("deleted", "missing_parent", "bad_message", "roles_out_of_order", "duplicate_id")
_TREE_ROW, _PARENT = "_tree_row", "_parent_row"  # (bookkeeping columns: a reply's row, its parent's row)


def build_tree_pairs(
    dataset: datasets.Dataset | list[dict[str, Any]],
    *,
    strategy: str = "best_vs_worst",
    margin: float = 0.0,
    seed: int = 0,
    message_id: str = "message_id",
    parent_id: str = "parent_id",
    text: str = "text",
    role: str = "role",
    rank: str = "rank",
) -> PairsResult:
    """Preference pairs of the ranked replies to each message of a message tree (see the module docstring):
    ``build_pairs``' result, its rows (``chosen_row``, ``rejected_row``, ``dropped_rows``) the tree data's."""
    present = table_columns(dataset)
    names = {"message_id": message_id, "parent_id": parent_id, "text": text, "role": role, "rank": rank}
    for option, name in names.items():
        if name not in present:
            cli = {"text": "--completions", "rank": "--scores"}.get(option)
            raise missing_column(option, name, present, cli=f"{cli} <your column>" if cli else "the tree's "
                                 "columns are oasst's: message_id, parent_id, text, role, rank")  # fmt: skip
    reserved = sorted({_TREE_ROW, _PARENT} & set(present))
    if reserved:  # (overwritten by the bookkeeping, then left out: lost without a word)
        raise DataError(f"the column name {reserved[0]!r} is build_tree_pairs' own", column=reserved[0],
                        fix="rename that column first (Dataset.rename_column)")  # fmt: skip
    columns = {name: column_values(dataset, name) for name in present}
    rows = [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    replies, dropped = _replies(rows, names)
    if not replies:
        raise DataError(f"no assistant message of the {len(rows)} rows has its conversation whole (left out: "
                        f"{ {reason: len(found) for reason, found in dropped.items() if found} })", column=role,
                        fix="give the tree whole: its user and assistant messages, linked by parent_id")  # fmt: skip
    result = build_pairs(replies, strategy=strategy, margin=margin, seed=seed, completions="completion",
                         scores="rank", lower_is_better=True, group_by_prompt=True, group_key=_PARENT)  # fmt: skip
    source = [reply[_TREE_ROW] for reply in replies]
    pairs = [_in_tree_rows(pair, source) for pair in result.dataset]
    for reason, found in result.dropped_rows.items():
        dropped[reason] = sorted(source[row] for row in found)
    excluded_rows = {reason: sorted(source[row] for row in found) for reason, found in result.excluded_rows.items()}
    return PairsResult(
        datasets.Dataset.from_list(pairs) if isinstance(dataset, datasets.Dataset) else pairs,
        {reason: len(found) for reason, found in dropped.items()}, dropped, strategy=strategy, num_rows=len(rows),
        excluded=result.excluded, excluded_rows=excluded_rows,
    )  # fmt: skip


def _in_tree_rows(pair: dict, source: list[int]) -> dict:
    """A grouped pair of the reply rows, its rows the tree data's (the bookkeeping columns out: by their exact names,
    a user's column ending alike stays)."""
    bookkeeping = {_PARENT, f"chosen_{_TREE_ROW}", f"rejected_{_TREE_ROW}"}
    pair = {key: value for key, value in pair.items() if key not in bookkeeping}
    return {**pair, "chosen_row": source[pair["chosen_row"]], "rejected_row": source[pair["rejected_row"]]}


def _replies(rows: list[dict], names: dict[str, str]) -> tuple[list[dict], dict[str, list[int]]]:
    """One row per assistant message whose conversation is whole (``prompt``, ``completion``, ``rank``, its other
    columns, its tree row), and the rows of those left out, by reason."""
    dropped: dict[str, list[int]] = {reason: [] for reason in TREE_REASONS}
    where: dict[Any, int] = {}
    for row, message in enumerate(rows):
        if message[names["message_id"]] in where:
            dropped["duplicate_id"].append(row)
        else:
            where[message[names["message_id"]]] = row
    replies, duplicates = [], set(dropped["duplicate_id"])
    for row, message in enumerate(rows):
        if ROLES.get(message[names["role"]]) != "assistant" or row in duplicates:
            continue
        chain = _conversation(rows, row, where, names)
        if isinstance(chain, str):
            dropped[chain].append(row)
            continue
        turns = [{"role": ROLES[rows[i][names["role"]]], "content": rows[i][names["text"]]} for i in chain]
        others = {key: value for key, value in message.items() if key not in names.values()}
        replies.append({**others, "prompt": turns[:-1], "completion": turns[-1:], "rank": message[names["rank"]],
                        "message_id": message[names["message_id"]], _TREE_ROW: row, _PARENT: chain[-2]})  # fmt: skip
    return replies, dropped


def _conversation(rows: list[dict], row: int, where: dict, names: dict[str, str]) -> list[int] | str:
    """The rows from the tree's root to ``row``, or the reason the conversation is not whole."""
    chain, seen = [row], {row}
    while (parent := rows[chain[-1]][names["parent_id"]]) is not None:
        if parent not in where or where[parent] in seen:
            return "missing_parent"
        chain.append(where[parent])
        seen.add(chain[-1])
    chain.reverse()
    for place, i in enumerate(chain):
        message = rows[i]
        if message.get("deleted") is True:
            return "deleted"
        text, kind = message[names["text"]], ROLES.get(message[names["role"]])
        if kind is None or not isinstance(text, str) or not text.strip():
            return "bad_message"
        if kind == "assistant" and (place == 0 or ROLES[rows[chain[place - 1]][names["role"]]] == "assistant"):
            return "roles_out_of_order"
    return chain
