"""Rated multi-response rows (UltraFeedback-style raw data) → preference pairs.

A row holds a ``prompt``, several ``completions`` (strings or message lists) and one score per completion,
either in a parallel ``scores`` column or inside each completion when completions are dicts
(``response_key="response", score_key="overall_score"``). Rows of one response each (HelpSteer2's layout: a prompt,
a response and its ratings per row) are grouped by prompt first with ``group_by_prompt=True``: the rows whose
prompts are equal (the same text, or the same messages) make one group, in the order of its first row, whose
completions are the rows' responses in row order (KTO's unpaired rows pair so, ``completions="completion",
scores="label"``: a desirable completion against an undesirable one of its prompt); each pair then names its two
rows (``chosen_row``, ``rejected_row``), a column equal within every group is carried as it is, and any other one
once per side (``chosen_<name>``, ``rejected_<name>``); a row whose score or response is bad is dropped alone
(``bad_scores``, ``bad_completions``), its prompt's other rows grouped without it; a group is read as a row is below
(its draws seeded by its place), and its drops count each of its rows. Higher is better, unless
``lower_is_better`` (ranks, 1 the best). ``build_pairs`` turns each row into pairs:

- ``best_vs_worst``: one pair, the highest score against the lowest;
- ``best_vs_random_lower``: one pair, the highest score against a completion drawn uniformly among those scored
  more than ``margin`` below it (seeded per row, so the draw does not depend on the other rows);
- ``all_above_margin``: every pair (i, j) with ``score_i - score_j > margin``, chosen = i, in (i, j) row order.

The best (and the worst) is the first such completion in row order when several share the score. A completion that
is blank (the quality check's ``empty``: blank text, or messages with no text and no tool call) or that repeats an
earlier completion of its row (whitespace aside) is no candidate: a pair of it would be dropped later as empty or
identical. Such completions are counted in ``excluded`` (``blank``, ``repeated``) with their rows in
``excluded_rows``; the first occurrence of a repeated completion keeps its score. A row that yields no pair is
dropped and counted, with its index, under one reason:

- ``bad_prompt``: a prompt that is None, blank, or neither a string nor a list of messages;
- ``too_few_completions``: fewer than 2 completions (candidates, after the exclusions);
- ``bad_scores``: a score that is None, NaN, infinite or not a number (text that reads as one, "7.9", is one; a
  boolean is 1 or 0), or not one score per completion;
- ``bad_completions``: a completion that is neither a string nor a list of messages (e.g. None), or completions
  of both formats (strings and message lists), or strings under a prompt of messages;
- ``ties``: every score is equal, so no completion is better than another;
- ``below_margin``: scores differ, but never by more than ``margin``.

A row is counted under the first problem found: its completions and scores are read first (fewer than 2
completions given, then ``bad_scores``, then a completion of no known type), then its prompt, the completions'
formats against it and the candidates left after the exclusions, then ``ties`` and ``below_margin``. In the plain
torch-free terms of one row with ``margin = 0``::

    best = max(range(n), key=scores.__getitem__)       # first of the best
    worst = min(range(n), key=scores.__getitem__)      # first of the worst
    pair = (best, worst) if scores[best] > scores[worst] else None   # None → counted under "ties"
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import random
import warnings
from dataclasses import dataclass, field
from typing import Any

import datasets

from fastdpo.data.quality import at_margin, is_empty, squeezed
from fastdpo.data.schema import data_columns, value_format
from fastdpo.errors import ConfigError, DataError, close_match, unknown_choice

STRATEGIES = ("best_vs_worst", "best_vs_random_lower", "all_above_margin")
DROP_REASONS = ("bad_prompt", "too_few_completions", "bad_scores", "bad_completions", "ties", "below_margin")
EXCLUDED = ("blank", "repeated")
PAIR_COLUMNS = ("prompt", "chosen", "rejected", "chosen_score", "rejected_score", "source_row")
GROUPED_COLUMNS = (*PAIR_COLUMNS[:-1], "chosen_row", "rejected_row")  # (group_by_prompt: a pair of two rows)


@dataclass
class PairsResult:
    """The pairs and what was dropped: ``dropped[reason]`` rows, whose indices are ``dropped_rows[reason]``; and
    the completions that were no candidates, ``excluded[reason]`` of them, in rows ``excluded_rows[reason]``."""

    dataset: datasets.Dataset | list[dict[str, Any]]
    dropped: dict[str, int] = field(default_factory=dict)
    dropped_rows: dict[str, list[int]] = field(default_factory=dict)
    strategy: str = "best_vs_worst"
    num_rows: int = 0  # input rows
    excluded: dict[str, int] = field(default_factory=dict)
    excluded_rows: dict[str, list[int]] = field(default_factory=dict)

    def summary(self) -> str:
        """One line, e.g. ``best_vs_worst: 8 pairs from 10 rows; dropped 2 rows (ties 1, bad_scores 1)``."""
        counts = [f"{reason} {count}" for reason, count in self.dropped.items() if count]
        total = sum(self.dropped.values())
        dropped = f"dropped {_plural(total, 'row')} ({', '.join(counts)})" if total else "dropped none"
        excluded = [f"{reason} {count}" for reason, count in self.excluded.items() if count]
        skipped = f"; not candidates: {_plural(sum(self.excluded.values()), 'completion')} ({', '.join(excluded)})"
        pairs = f"{self.strategy}: {_plural(len(self.dataset), 'pair')} from {_plural(self.num_rows, 'row')}"
        return f"{pairs}; {dropped}{skipped if excluded else ''}"


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def build_pairs(
    dataset: datasets.Dataset | list[dict[str, Any]],
    *,
    strategy: str = "best_vs_worst",
    prompt: str = "prompt",
    completions: str = "completions",
    scores: str = "scores",
    response_key: str | None = None,
    score_key: str | None = None,
    margin: float = 0.0,
    seed: int = 0,
    lower_is_better: bool = False,
    group_by_prompt: bool = False,
    group_key: str | None = None,
) -> PairsResult:
    """Preference pairs from rows with several scored completions (see the module docstring for the rules).

    Args:
        dataset: a ``datasets.Dataset`` or a list of dicts; the result's ``.dataset`` is of the same kind.
        strategy: ``"best_vs_worst"``, ``"best_vs_random_lower"`` or ``"all_above_margin"``.
        prompt, completions, scores: the input columns. ``scores`` is not read when ``score_key`` is given
            (a column of that name is then carried over like any other).
        response_key, score_key: for completions that are dicts, the keys of the response and of its score.
        margin: a pair needs ``chosen_score - rejected_score > margin`` (≥ 0).
        seed: for ``best_vs_random_lower``; row ``i`` draws from its own generator seeded by (seed, i).
        lower_is_better: the scores are ranks (1 the best, as Nectar's): the lowest is chosen. A score column or key
            named like a rank without it gets a warning.
        group_by_prompt: each row holds one response (``completions``) and its score (``scores``); the rows of one
            prompt are grouped into one (see the module docstring). Not with ``response_key``/``score_key``.
        group_key: with ``group_by_prompt``, the column whose equal values make a group instead of the prompt's
            (``build_tree_pairs``: the message replied to; two with the same text are two groups).

    Returns:
        ``PairsResult``: rows ``prompt, chosen, rejected, chosen_score, rejected_score, source_row`` (float scores,
        the input row index; ``chosen_row, rejected_row`` when grouped) then every other input column, and the
        dropped counts and row indices (of the input's rows).
    """
    _check_options(strategy, margin, seed)
    if group_by_prompt and (response_key is not None or score_key is not None):
        raise ConfigError("grouped by prompt (group_by_prompt=True), each row gives one response and one score, "
                          "from columns",
                          column="response_key" if response_key is not None else "score_key",
                          fix="leave response_key= and score_key= out; name the columns with completions= and "
                          "scores=")  # fmt: skip
    if group_key is not None and not group_by_prompt:
        raise ConfigError("groups rows of one response each, with group_by_prompt=True", column="group_key",
                          fix="pass group_by_prompt=True too, or leave group_key out")  # fmt: skip
    if group_key is not None and group_key not in table_columns(dataset):
        raise missing_column("group_key", group_key, table_columns(dataset))
    score_name = score_key if score_key is not None else scores
    if "rank" in str(score_name).lower() and not lower_is_better:
        warnings.warn(f"scores from {score_name!r}: the highest is chosen; if 1 is the best rank, pass "
                      "lower_is_better=True (fastdpo data pairs --lower-is-better)", stacklevel=2)  # fmt: skip
    columns = {"prompt": prompt, "completions": completions}
    if score_key is None:
        columns["scores"] = scores
    carried = _carried_columns(dataset, columns, GROUPED_COLUMNS if group_by_prompt else PAIR_COLUMNS)
    prompts = column_values(dataset, prompt)
    all_items = column_values(dataset, completions)
    all_scores = column_values(dataset, scores) if score_key is None else [None] * len(all_items)
    dropped_rows: dict[str, list[int]] = {reason: [] for reason in DROP_REASONS}
    if group_by_prompt:
        keys = prompts if group_key is None else column_values(dataset, group_key)
        groups = _groups(keys, all_items, all_scores, completions, dropped_rows)
        if group_key is not None:
            _refuse_mixed_prompts(groups, prompts, group_key, prompt)
        prompts = [prompts[rows[0]] for rows in groups]
        all_items = [[all_items[row] for row in rows] for rows in groups]
        all_scores = [[all_scores[row] for row in rows] for rows in groups]
    else:
        groups = [[row] for row in range(len(all_items))]
    names = GROUPED_COLUMNS if group_by_prompt else PAIR_COLUMNS
    out: dict[str, list[Any]] = {name: [] for name in names}
    excluded_rows: dict[str, list[int]] = {reason: [] for reason in EXCLUDED}
    for unit, (items, row_scores, rows) in enumerate(zip(all_items, all_scores, groups, strict=True)):
        parsed = _parse_row(rows[0], items, row_scores, completions, response_key, score_key)
        if not isinstance(parsed, str):
            item_rows = rows if group_by_prompt else rows * len(parsed[0])
            parsed = _candidates(prompts[unit], *parsed, item_rows, excluded_rows)
        if not isinstance(parsed, str):
            responses, values, item_rows = parsed
            parsed = _pick_pairs(strategy, [-v for v in values] if lower_is_better else values, margin, seed, unit)
        if isinstance(parsed, str):
            dropped_rows[parsed].extend(rows)
            continue
        prompt_value = prompts[unit]
        if isinstance(prompt_value, str) and value_format(responses[0]) == "conversational":  # the user's turn, as
            prompt_value = [{"role": "user", "content": prompt_value}]  # prepare_preferences reads it: checks clean
        for i, j in parsed:
            where = (item_rows[i], item_rows[j]) if group_by_prompt else (unit,)
            pair = (prompt_value, responses[i], responses[j], values[i], values[j], *where)
            for name, value in zip(names, pair, strict=True):
                out[name].append(value)

    if group_by_prompt:
        result = {**out, **_carry_sides(dataset, carried, groups, out["chosen_row"], out["rejected_row"])}
    else:
        result = {**out, **_carry(dataset, carried, out["source_row"])}
    dropped = {reason: len(rows) for reason, rows in dropped_rows.items()}
    if isinstance(dataset, datasets.Dataset):
        features = _pair_features(dataset.features, prompt, completions, response_key, result, group_by_prompt)
        pairs_data = datasets.Dataset.from_dict(result, features=features)
    else:
        pairs_data = [dict(zip(result, values, strict=True)) for values in zip(*result.values(), strict=True)]
    excluded = {reason: len(rows) for reason, rows in excluded_rows.items()}
    return PairsResult(pairs_data, dropped, {reason: sorted(rows) for reason, rows in dropped_rows.items()},
                       strategy=strategy, num_rows=len(dataset), excluded=excluded,
                       excluded_rows={reason: sorted(set(rows)) for reason, rows in excluded_rows.items()})  # fmt: skip


def _groups(prompts: list, items: list, scores: list, completions: str, dropped_rows: dict) -> list[list[int]]:
    """The rows of each prompt (equal text, or equal messages; or of equal ``group_key`` values, passed as
    ``prompts``), groups in the order of their first rows, without the
    rows whose score or response is bad (in ``dropped_rows``, each alone: it dropped its prompt's other rows with it
    before); a DataError for a row whose response is a list of responses (one response per row here)."""
    groups: dict[Any, list[int]] = {}
    for row, (prompt_value, item, score) in enumerate(zip(prompts, items, scores, strict=True)):
        if isinstance(item, dict):
            raise DataError(
                f"grouped by prompt (group_by_prompt=True), a row's response is text or messages, got a dict (keys: "
                f"{', '.join(map(str, item))})", row=row, column=completions,
                fix="name the column that holds the response's text with completions=",
            )  # fmt: skip
        if isinstance(item, (list, tuple)) and value_format(item) != "conversational" and item:
            raise DataError(
                f"grouped by prompt (group_by_prompt=True), a row holds one response; this one holds a list of "
                f"{len(item)}", row=row, column=completions,
                fix="rows that list their responses make pairs as they are: without group_by_prompt=True",
            )  # fmt: skip
        bad = "bad_scores" if _as_score(score) is None else "bad_completions" if value_format(item) is None else None
        if bad is not None:
            dropped_rows[bad].append(row)
            continue
        key = prompt_value if isinstance(prompt_value, str) else json.dumps(prompt_value, sort_keys=True, default=str)
        groups.setdefault((isinstance(prompt_value, str), key), []).append(row)
    return list(groups.values())


def _refuse_mixed_prompts(groups: list[list[int]], prompts: list, group_key: str, prompt: str) -> None:
    """A DataError at the first row of a ``group_key`` group whose prompt is not its group's: its response would be
    paired under another prompt."""
    for rows in groups:
        first = json.dumps(prompts[rows[0]], sort_keys=True, default=str)
        other = next((row for row in rows if json.dumps(prompts[row], sort_keys=True, default=str) != first), None)
        if other is not None:
            raise DataError(f"its prompt is not that of row {rows[0]}, of the same {group_key!r}: its response would "
                            "be paired under another prompt", row=other, column=prompt,
                            fix=f"give the rows of one {group_key!r} one prompt, or group by the prompt (leave "
                            "group_key out)")  # fmt: skip


def _candidates(prompt, responses: list, values: list[float], rows: list[int], excluded_rows: dict[str, list[int]]):
    """(responses, scores, rows) that can make a pair, without blank and repeated completions (each noted under its
    row, ``rows[i]`` for completion i, in ``excluded_rows``), or the reason the row is dropped."""
    if value_format(prompt) is None or is_empty(prompt):
        return "bad_prompt"
    formats = {value_format(response) for response in responses}
    # one format; a string prompt may go with messages (it becomes the user's turn), not messages with strings
    if len(formats) > 1 or (value_format(prompt) == "conversational" and formats != {"conversational"}):
        return "bad_completions"
    kept, seen = [], set()
    for response, value, row in zip(responses, values, rows, strict=True):
        text = squeezed(response)  # (whitespace aside, as the quality check's 'identical')
        reason = "blank" if is_empty(response) else "repeated" if text in seen else None
        if reason is not None:
            excluded_rows[reason].append(row)
            continue
        seen.add(text)
        kept.append((response, value, row))
    if len(kept) < 2:
        return "too_few_completions"
    return [list(column) for column in zip(*kept, strict=True)]


def _check_options(strategy: str, margin: float, seed: int) -> None:
    if strategy not in STRATEGIES:
        raise unknown_choice("strategy", strategy, STRATEGIES)
    if isinstance(margin, bool) or not isinstance(margin, numbers.Real) or not margin >= 0 or math.isinf(margin):
        raise ConfigError(f"must be a finite number ≥ 0, got {margin!r}", column="margin", fix="use e.g. margin=0.5")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise ConfigError(f"must be an integer, got {seed!r}", column="seed")


def _carried_columns(dataset, columns: dict[str, str], outputs: tuple[str, ...]) -> list[str]:
    """The input columns to carry over, after checking the dataset has rows and the ``columns`` (option → name)."""
    present = table_columns(dataset)
    if not len(dataset):
        raise DataError("the dataset has no rows", fix="check the file or the split you loaded")
    for option, name in columns.items():
        if name not in present:  # (completions guessed among list columns: a rating's name may be nearer)
            raise missing_column(option, name, present, guesses=_lists(dataset, present) if option == "completions"
                                 else None)  # fmt: skip
    carried = [name for name in present if name not in columns.values()]
    for name in carried:
        if name in outputs:
            raise DataError(
                "the dataset already has this output column", column=name, fix="drop or rename it before build_pairs"
            )
    return carried


def _lists(dataset, present: list[str]) -> list[str]:
    """The columns of ``present`` that hold lists (all of them where the dataset does not say its features)."""
    features = getattr(dataset, "features", None)
    if not features:
        return present
    return [name for name in present if isinstance(features.get(name), list)
            or type(features.get(name)).__name__ in ("List", "LargeList", "Sequence")]  # fmt: skip


def _parse_row(row, items, row_scores, completions, response_key, score_key) -> tuple[list, list[float]] | str:
    """(responses, scores) of one row, or the reason it is dropped; a DataError when the shape is plainly wrong."""
    if items is None:
        items = []
    if not isinstance(items, list):
        one = (
            " (rows of one response each and its score, as HelpSteer2's, are grouped by prompt with "
            "group_by_prompt=True; an oasst message tree's with fastdpo.data.build_tree_pairs)"
            if isinstance(items, str)
            else ""
        )
        raise DataError(
            f"expected a list of completions, got {type(items).__name__}", row=row, column=completions,
            fix=f"pass the column that holds one list of responses per row as completions={one}",
        )  # fmt: skip
    if len(items) < 2:
        return "too_few_completions"
    if response_key is not None:
        responses = [_get_key(row, item, response_key, completions, "response_key") for item in items]
    elif any(isinstance(item, dict) for item in items):
        keys = next(item for item in items if isinstance(item, dict)).keys()
        raise DataError(
            "completions are dicts", row=row, column=completions,
            fix=f"pass response_key= (and score_key=) naming the fields; keys present: {', '.join(map(str, keys))}",
        )  # fmt: skip
    else:
        responses = items
    if response_key is not None and any(item is None for item in items):  # (no score either: a completion's fault)
        return "bad_completions"
    if score_key is not None:
        row_scores = [_get_key(row, item, score_key, completions, "score_key") for item in items]
    if not isinstance(row_scores, list) or len(row_scores) != len(responses):
        return "bad_scores"
    values = [_as_score(value) for value in row_scores]
    if any(value is None for value in values):
        return "bad_scores"
    if any(value_format(response) is None for response in responses):
        return "bad_completions"
    return responses, values


def _get_key(row: int, item: Any, key: str, completions: str, option: str) -> Any:
    """``item[key]``; None for a None item (the row is then dropped), a DataError when the key is wrong."""
    if item is None:
        return None
    if isinstance(item, dict) and key in item:
        return item[key]
    if not isinstance(item, dict):
        raise DataError(
            f"{option}={key!r} needs dict completions, got {type(item).__name__}", row=row, column=completions,
            fix=f"leave {option}= out for completions that are strings or message lists",
        )  # fmt: skip
    guess = close_match(key, [str(k) for k in item])
    hint = f"did you mean {option}={guess!r}? " if guess else ""
    raise DataError(
        f"a completion has no key {key!r}", row=row, column=completions,
        fix=f"{hint}keys present: {', '.join(map(str, item))}",
    )  # fmt: skip


def _as_score(value: Any) -> float | None:
    """The score as a float, or None when it is missing, not a number, NaN or infinite. Text that is a number
    ("7.9") is one: the loader reads it so in a column that also holds numbers, and a file of such text only
    dropped every row; a boolean is 1 or 0 (KTO's ``label``)."""
    if isinstance(value, str):
        try:
            value = float(value.strip())
        except ValueError:
            return None
    if not isinstance(value, numbers.Real):  # (a boolean is 1 or 0: KTO's label, true for a desirable completion)
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def above_margin(difference: float, margin: float) -> bool:
    """``difference > margin``, one equal to it but for float rounding not above it (``at_margin``)."""
    return difference > margin and not at_margin(difference, margin)


def _pick_pairs(strategy: str, scores: list[float], margin: float, seed: int, row: int) -> list[tuple[int, int]] | str:
    """(chosen, rejected) index pairs of one row, or the reason there are none ("ties" or "below_margin")."""
    n = len(scores)
    best = max(range(n), key=scores.__getitem__)  # max/min return the first of equal candidates
    worst = min(range(n), key=scores.__getitem__)
    if scores[best] == scores[worst]:
        return "ties"
    if strategy == "best_vs_worst":
        return [(best, worst)] if above_margin(scores[best] - scores[worst], margin) else "below_margin"
    if strategy == "best_vs_random_lower":
        eligible = [j for j in range(n) if above_margin(scores[best] - scores[j], margin)]
        return [(best, row_rng(seed, row).choice(eligible))] if eligible else "below_margin"
    pairs = [(i, j) for i in range(n) for j in range(n) if above_margin(scores[i] - scores[j], margin)]
    return pairs or "below_margin"


def row_rng(seed: int, row: int) -> random.Random:
    """A generator for one row that depends only on (seed, row): stable across runs, processes and row order."""
    digest = hashlib.blake2b(f"{seed}:{row}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))


def _carry(dataset, carried: list[str], source_rows: list[int]) -> dict[str, list[Any]]:
    """The other input columns, repeated for each pair taken from a row."""
    columns = {}
    for name in carried:
        values = column_values(dataset, name)
        columns[name] = [values[row] for row in source_rows]
    return columns


def _carry_sides(dataset, carried: list[str], groups: list[list[int]], chosen: list[int], rejected: list[int]):
    """The other input columns of grouped rows: one equal within every group as it is, any other once per side of
    each pair (``chosen_<name>``, ``rejected_<name>``); a DataError where such a name is already a column."""
    columns = {}
    for name in carried:
        values = column_values(dataset, name)
        if all(all(_same(values[row], values[group[0]]) for row in group) for group in groups):
            columns[name] = [values[row] for row in chosen]
            continue
        for side, rows in (("chosen", chosen), ("rejected", rejected)):
            if f"{side}_{name}" in carried or f"{side}_{name}" in GROUPED_COLUMNS:
                raise DataError(
                    f"the column {name!r} differs between rows of one prompt, so it is carried as {side}_{name}, "
                    "which is already a column", column=f"{side}_{name}", fix="drop or rename one before build_pairs",
                )  # fmt: skip
            columns[f"{side}_{name}"] = [values[row] for row in rows]
    return columns


def _same(a: Any, b: Any) -> bool:
    """``a == b``, NaN equal to NaN (a column NaN in every row of a prompt is carried whole, as one None is)."""
    nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return nan or a == b


def _pair_features(features: datasets.Features, prompt, completions, response_key, result: dict[str, list],
                   grouped: bool) -> datasets.Features | None:  # fmt: skip
    """The output features, from the input's (so an empty result keeps its types); None to let datasets infer."""
    item = features[completions] if grouped else getattr(features[completions], "feature", None)
    if response_key is not None:
        item = item.get(response_key) if isinstance(item, dict) else None
    if item is None:
        return None
    score, index = datasets.Value("float64"), datasets.Value("int64")
    if features[prompt] == datasets.Value("string") and isinstance(item, (list, datasets.Sequence, datasets.List)):
        return None  # a string prompt over messages comes out as a user's turn: its type is inferred
    new = {"prompt": features[prompt], "chosen": item, "rejected": item, "chosen_score": score, "rejected_score": score}
    rows = {"chosen_row": index, "rejected_row": index} if grouped else {"source_row": index}
    carried = {name: features[name if name in features else name.split("_", 1)[1]] for name in result
               if name not in new and name not in rows}  # fmt: skip
    return datasets.Features({**new, **rows, **carried})


def table_columns(data: datasets.Dataset | list[dict[str, Any]]) -> list[str]:
    """Column names of a Dataset, or of a list of dicts (every key of any row, in order of first appearance)."""
    if isinstance(data, datasets.Dataset):
        return list(data.column_names)
    if not isinstance(data, list) or not all(isinstance(row, dict) for row in data):
        raise DataError(
            f"expected a datasets.Dataset or a list of dicts, got {type(data).__name__}",
            fix="load it first, e.g. with fastdpo.data.load_data",
        )
    return list(dict.fromkeys(key for row in data for key in row))


def column_values(data: datasets.Dataset | list[dict[str, Any]], name: str) -> list[Any]:
    """One column as a Python list (None where a dict row lacks the key), whatever format the Dataset has."""
    if isinstance(data, datasets.Dataset):
        return data.with_format(None)[name][:]
    return [row.get(name) for row in data]


def missing_column(option: str, name: str, present: list[str], cli: str | None = None,
                   guesses: list[str] | None = None) -> DataError:  # fmt: skip
    """A DataError for column ``name`` (given as ``option=``) not in ``present``, suggesting the closest one (of
    ``guesses``, where given); ``cli``: how ``fastdpo data`` takes it (default: ``--option <the guess or your
    column>``)."""
    present = data_columns(present)
    guess = close_match(name, data_columns(guesses) if guesses is not None else present)
    hint = f"did you mean {guess!r}? pass {option}={guess!r}" if guess else f"pass {option}='<your column>'"
    cli = cli or f"--{option.replace('_', '-')} {guess or '<your column>'}"
    return DataError("column not found", column=name,
                     fix=f"{hint}; fastdpo data: {cli} (columns present: {', '.join(present)})")  # fmt: skip
