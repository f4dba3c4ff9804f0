"""What is wrong with a preference dataset, row by row, before a single step is trained on it.

    report = check_preferences(dataset, tokenizer, max_length=1024, min_score_margin=1.0)
    print(report.to_markdown())
    kept, dropped = report.filter(dataset, where="chosen_score >= 8")  # dropped: reason → count, none silently

The dataset is a ``datasets.Dataset`` or a list of dicts whose columns already have our names (``prompt``,
``chosen``, ``rejected`` and the optional ``status``, ``chosen_score``, ``rejected_score``, ``tools``,
``chat_template_kwargs``); its values are not trusted. Bad values are reported, never raised; only an unusable
input as a whole (no ``chosen`` or ``rejected`` column) raises ``DataError``.

Precedence: each problem is reported once per row, and never one that only follows from an earlier one.

1. Values, per column (prompt, chosen, rejected): the first failing check of ``missing_field``, ``not_text``,
   ``bad_message``, ``empty``, ``invalid_text``, ``roles_out_of_order``; a row may get one per column.
2. The pair, for rows whose values all passed: ``mixed_format``, else ``identical``.
3. Between rows, for rows that passed 1-2: ``duplicate``. The first copy is kept and carries every other finding;
   later copies get ``duplicate`` and nothing else (exact copies are never ``contradictory``).
4. The *valid pairs* (rows that passed 1-3) only: ``chat_template_error``, else ``identical_tokens``, else
   ``prompt_fills_max_length`` (``keep_start`` only), else ``will_be_truncated``; ``prompt_not_prefix``;
   ``contradictory``; ``length_ratio``; the length
   statistics and the length bias.

``bad_score``, ``tie``, else ``small_score_margin``, look only at ``status`` and the scores: all rows but later copies.

Token counts (with a tokenizer) are those ``tokenize_preferences`` builds (``fastdpo.data.quality_lengths``):
each valid pair's ``prompt_ids``, ``chosen_ids`` and ``rejected_ids``, the chat template rendering the prompt, the
prompt + chosen and the prompt + rejected (``chat_template_error`` names the one it failed on), so
``prompt_fills_max_length`` and ``will_be_truncated`` are exact.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import datasets

from fastdpo.data.quality_lengths import ABSENT, check_lengths
from fastdpo.data.render import TRUNCATION_MODES
from fastdpo.data.schema import PREFERENCE_COLUMNS, column_guess, content_text, is_text_part, without_none
from fastdpo.data.where import where_mask
from fastdpo.errors import ConfigError, DataError, close_match, unknown_choice

DROP, WARN = "drop", "warn"
# Row reasons in precedence order (filter() counts a row under the first of its reasons in this order)
REASONS: dict[str, tuple[str, str]] = {
    "missing_field": (DROP, "prompt, chosen or rejected absent, None or NaN"),
    "not_text": (DROP, "neither a string nor a list of messages"),
    "bad_message": (DROP, "a message without a known role or a string content"),
    "empty": (DROP, "empty or whitespace only"),
    "invalid_text": (DROP, "lone surrogates or control characters"),
    "roles_out_of_order": (DROP, "prompt not ending with a user/tool turn, or completion not starting with assistant"),
    "mixed_format": (DROP, "strings and message lists in one row, or against the dataset's format"),
    "identical": (DROP, "chosen == rejected (whitespace aside)"),
    "duplicate": (DROP, "same prompt, chosen and rejected as an earlier row"),
    "chat_template_error": (DROP, "the chat template failed on the prompt, or on the prompt + a completion"),
    "identical_tokens": (
        DROP,
        "chosen and rejected are the same tokens (a template renders them alike, or cut to max_length)",
    ),
    "prompt_fills_max_length": (DROP, "the prompt alone has >= max_length tokens"),
    "will_be_truncated": (WARN, "prompt + a completion longer than max_length"),
    "prompt_not_prefix": (WARN, "the prompt's tokens are not how prompt + completion begin: its end is cut"),
    "contradictory": (WARN, "another row prefers the other completion for the same prompt"),
    "bad_score": (WARN, "chosen_score or rejected_score present but not a finite number (NaN, inf, text)"),
    "tie": (WARN, "status 'tie', or equal scores"),
    "small_score_margin": (WARN, "chosen_score - rejected_score < min_score_margin"),
    "length_ratio": (WARN, "one completion much longer than the other"),
}
DATASET_REASONS: dict[str, tuple[str, str]] = {
    "empty_dataset": (WARN, "the dataset has no rows"),
    "no_prompt_column": (WARN, "no prompt column: prompt checks skipped"),
    "length_bias": (WARN, "chosen is mostly longer (or shorter) than rejected"),
    "vision_data": (WARN, "an image column: the trainers do not read images"),
}
# the roles chat templates render: OpenAI's developer, Llama-3.1's ipython (a tool's result), the older function
ROLES = ("system", "developer", "user", "assistant", "tool", "ipython", "function")
_TURN_ENDS = ("user", "tool", "ipython", "function")  # what a prompt may end with: the model answers next
META_COLUMNS = ("status", "chosen_score", "rejected_score", "tools", "chat_template_kwargs")
# C0 and C1 control characters except \t \n \r, and lone surrogates (not encodable as UTF-8)
_INVALID_TEXT = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ud800-\udfff]")


@dataclass
class QualityReport:
    """Every problem found, by reason (``rows``, ``counts``) and by row (``details``), and the length statistics.

    ``severity`` maps every reason (row and dataset level) to ``"drop"`` or ``"warn"``; ``counts``/``rows`` hold
    only the reasons found. ``length_stats`` and ``length_bias`` describe the valid pairs (see the module doc).
    """

    num_rows: int
    counts: dict[str, int]
    rows: dict[str, list[int]]
    severity: dict[str, str]
    details: dict[int, list[str]]
    length_stats: dict[str, Any]
    dataset_warnings: list[str]
    format: str | None = None
    length_bias: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["details"] = {str(row): notes for row, notes in self.details.items()}
        return out

    def to_json(self, *, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    def to_markdown(self, *, examples: int = 5) -> str:
        """A table (reason | severity | rows | example row ids), the length statistics, the dataset warnings."""
        lines = [f"# Preference data quality: {self.num_rows:,} rows ({self.format or 'no format'})", ""]
        header = ["| reason | severity | rows | example row ids | meaning |", "|---|---|---|---|---|"]
        lines += header if self.counts else ["No row has a problem."]
        for reason, count in self.counts.items():
            shown = ", ".join(map(str, self.rows[reason][:examples])) + (" …" if count > examples else "")
            lines.append(f"| {reason} | {self.severity[reason]} | {count:,} | {shown} | {REASONS[reason][1]} |")
        dropped = set(self.drop_rows())
        warned = {row for reason, rows in self.rows.items() for row in rows} - dropped
        lines += ["", f"{len(dropped):,} rows would be dropped; {len(warned):,} kept rows have warnings.", ""]
        lines += [f"## Lengths ({self.length_stats.get('pairs', 0):,} valid pairs)", ""]
        lines += length_table(self.length_stats)
        lines += ["", "## Dataset warnings", ""] + ([f"- {w}" for w in self.dataset_warnings] or ["None."])
        return "\n".join(lines) + "\n"

    def drop_rows(self, reasons: Iterable[str] | str | None = None) -> list[int]:
        """Sorted row ids with a ``"drop"`` reason, or with any of ``reasons`` (warnings included)."""
        wanted = self._reasons(reasons)
        return sorted({row for reason in wanted for row in self.rows.get(reason, ())})

    def filter(
        self, dataset, reasons: Iterable[str] | str | None = None, *, where: str | Callable[[Any], bool] | None = None
    ) -> tuple[Any, dict[str, int]]:
        """``(kept, dropped)``: ``dataset`` without the rows of ``drop_rows(reasons)`` and those failing ``where``.

        ``dropped`` counts each removed row once, under its first reason in ``REASONS`` order, or ``"where"``
        (``dropped_rows`` gives the rows themselves). ``where``: a callable on a row (dict), or
        ``"<column> <op> <value>"`` (``fastdpo.data.where.parse_where``), e.g. ``"chosen_score >= 8"``,
        ``"status != tie"``. A ``Dataset`` stays a ``Dataset``, a list a list.
        """
        kept, removed = self._plan(dataset, reasons, where)
        dropped = {reason: len(rows) for reason, rows in removed.items()}
        if isinstance(dataset, datasets.Dataset):
            return dataset.select(kept), dropped
        return [dataset[i] for i in kept], dropped

    def dropped_rows(
        self, dataset, reasons: Iterable[str] | str | None = None, *, where: str | Callable[[Any], bool] | None = None
    ) -> dict[str, list[int]]:
        """The rows ``filter`` with the same arguments removes, by the reason it counts each under."""
        return self._plan(dataset, reasons, where)[1]

    def _plan(self, dataset, reasons, where) -> tuple[list[int], dict[str, list[int]]]:
        """(the rows kept, the rows removed by reason)."""
        num_rows, names = _size_and_columns(dataset)
        if num_rows != self.num_rows:
            fix = "filter the dataset the report was made from"
            raise DataError(f"the report is for {self.num_rows} rows, this dataset has {num_rows}", fix=fix)
        first_reason: dict[int, str] = {}
        wanted = self._reasons(reasons)
        for reason in wanted:
            for row in self.rows.get(reason, ()):
                first_reason.setdefault(row, reason)
        removed = {reason: sorted(r for r, first in first_reason.items() if first == reason) for reason in wanted}
        removed = {reason: rows for reason, rows in removed.items() if rows}
        kept = [i for i in range(num_rows) if i not in first_reason]
        if where is not None:
            passing = where_mask(dataset, names, where, kept)
            removed["where"] = [i for i, ok in zip(kept, passing, strict=True) if not ok]
            kept = [i for i, ok in zip(kept, passing, strict=True) if ok]
        return kept, removed

    def _reasons(self, reasons: Iterable[str] | str | None) -> list[str]:
        if reasons is None:
            return [r for r, (severity, _) in REASONS.items() if severity == DROP]
        wanted = [reasons] if isinstance(reasons, str) else list(reasons)
        for name in wanted:
            if name in DATASET_REASONS:
                raise DataError(f"{name!r} is about the whole dataset, not rows", fix="pass row reasons only")
            if name not in REASONS:
                hint = _did_you_mean(name, REASONS)
                raise DataError(f"unknown reason {name!r}", fix=f"{hint}reasons are: {', '.join(REASONS)}")
        return [r for r in REASONS if r in wanted]


def length_table(stats: dict[str, Any]) -> list[str]:
    """``length_stats`` as markdown lines: a row per column and unit (characters; tokens with a tokenizer)."""
    if not stats.get("pairs"):
        return ["No valid pair to measure."]
    lines = ["| column | unit | min | mean | median | max |", "|---|---|---|---|---|---|"]
    for unit in ("chars", "tokens"):
        for c, s in (stats.get(unit) or {}).items():
            lines.append(f"| {c} | {unit} | {s['min']:,} | {s['mean']:,.1f} | {s['median']:,.1f} | {s['max']:,} |")
    return lines


class _Findings:
    """Reason → rows, and row → notes, filled check by check."""

    def __init__(self, row_ids=None) -> None:
        self.rows: dict[str, set[int]] = {}
        self.details: dict[int, list[str]] = {}
        self.row_ids = row_ids  # how a note names another row (None: by its place)

    def named(self, row: int) -> int:
        return row if self.row_ids is None else self.row_ids[row]

    def add(self, row: int, reason: str, note: str = "", column: str | None = None) -> None:
        self.rows.setdefault(reason, set()).add(row)
        text = f"column '{column}': {reason}" if column else reason
        self.details.setdefault(row, []).append(f"{text} ({note})" if note else text)


def check_preferences(
    dataset,
    tokenizer=None,
    *,
    max_length: int | None = None,
    min_score_margin: float | None = None,
    length_ratio_warn: float | None = 3.0,
    truncation_mode: str = "keep_start",
    row_ids=None,
) -> QualityReport:
    """Check every row of a preference dataset (see the module docstring for the reasons and their precedence).

    Args:
        dataset: a ``datasets.Dataset`` or a list of dicts, columns named ``prompt``/``chosen``/``rejected``.
        tokenizer: enables token statistics, and with ``max_length`` the truncation checks.
        max_length: the training ``max_length`` (prompt + completion tokens).
        truncation_mode: the training's (``keep_start``: a prompt that fills ``max_length`` drops the row, as TRL
            drops it; ``keep_end`` keeps the sequence's end: no row is dropped for it).
        min_score_margin: warn when ``chosen_score - rejected_score`` is below it.
        length_ratio_warn: warn when one completion has more than this many times the other's characters (None: off).
        row_ids: how the notes name other rows (``details``: "duplicate (of row 5)"), by place: the data file's rows
            of a dataset that lost some before the check (the report's keys stay places; None: places).
    """
    for name, value, least in (("max_length", max_length, 1), ("min_score_margin", min_score_margin, -math.inf)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= least):
            floor = f" ≥ {least}" if least > -math.inf else ""
            raise ConfigError(f"must be a number{floor} or None, got {value!r}", column=name)
    if truncation_mode not in TRUNCATION_MODES:
        raise unknown_choice("truncation_mode", truncation_mode, TRUNCATION_MODES)
    num_rows, names, columns = _read_columns(dataset)
    found = _Findings(row_ids)
    warnings: list[str] = []
    has_prompt = "prompt" in names
    text_columns = [c for c in PREFERENCE_COLUMNS if c in names or c != "prompt"]
    if num_rows == 0:
        warnings.append("empty_dataset: the dataset has no rows")
    elif not has_prompt:
        warnings.append("no_prompt_column: prompt checks skipped (prepare_preferences extracts the implicit prompt)")
    images = [name for name in ("image", "images") if name in names]
    if images:  # (its rows' image parts read as bad messages below: the cause said once)
        warnings.append(f"vision_data: the column {images[0]!r} holds images, which fastdpo's trainers do not read "
                        "(a run refuses the dataset; TRL's trainers take vision-language data)")  # fmt: skip
    formats = {c: _check_values(columns[c], c, has_prompt, found) for c in text_columns}
    majority = _majority_format(formats["chosen"])
    valid, keys = _check_pairs(num_rows, columns, formats, majority, found)
    pairs = _check_duplicates(valid, keys, found)
    _check_metadata(num_rows, columns, found, min_score_margin, skip=found.rows.get("duplicate", set()))
    length_stats, bias = check_lengths(
        pairs, columns, text_columns, majority, found,
        tokenizer=tokenizer, max_length=max_length, length_ratio_warn=length_ratio_warn,
        truncation_mode=truncation_mode,
    )  # fmt: skip
    fraction = bias["chosen_longer_fraction"] if bias else None
    if fraction is not None and not 0.3 <= fraction <= 0.7 and _beyond_chance(fraction, bias["pairs_differing"]):
        warnings.append(
            f"length_bias: chosen is longer than rejected in {fraction:.0%} of the {bias['pairs_differing']:,} valid "
            f"pairs whose lengths differ (mean {bias['mean_chosen_chars']:,.0f} vs {bias['mean_rejected_chars']:,.0f} "
            f"characters): DPO learns to prefer {'longer' if fraction > 0.5 else 'shorter'} answers"
        )
    order = [r for r in REASONS if r in found.rows]
    return QualityReport(
        num_rows=num_rows,
        counts={r: len(found.rows[r]) for r in order},
        rows={r: sorted(found.rows[r]) for r in order},
        severity={r: severity for r, (severity, _) in {**REASONS, **DATASET_REASONS}.items()},
        details={row: found.details[row] for row in sorted(found.details)},
        length_stats=length_stats,
        dataset_warnings=warnings,
        format=majority,
        length_bias=bias,
    )


# ------------------------------------------------------------------------------------------------ reading input


def _size_and_columns(dataset) -> tuple[int, list[str]]:
    if isinstance(dataset, datasets.Dataset):
        return len(dataset), list(dataset.column_names)
    if isinstance(dataset, (list, tuple)):
        return len(dataset), list(dict.fromkeys(k for row in dataset if isinstance(row, Mapping) for k in row))
    fix = "pass a datasets.Dataset or a list of dicts (prepare_preferences returns a Dataset)"
    raise DataError(f"cannot check a {type(dataset).__name__}", fix=fix)


def _read_columns(dataset) -> tuple[int, list[str], dict[str, list]]:
    """Row count, column names, and the columns we look at as Python lists (column-wise: fast on Arrow)."""
    num_rows, names = _size_and_columns(dataset)
    missing = [c for c in ("chosen", "rejected") if c not in names]
    if missing and (names or num_rows):  # an empty list has no columns: that is an empty dataset, not an error
        guess = column_guess(missing[0], names)
        hint = f"did you mean {guess!r}? " if guess else ""
        fix = (f"{hint}map your column with columns={{{missing[0]!r}: '<your column>'}} in prepare_preferences "
               f"(columns present: {', '.join(names) or 'none'})")  # fmt: skip
        raise DataError("column not found", column=missing[0], fix=fix)
    wanted = [c for c in (*PREFERENCE_COLUMNS, *META_COLUMNS) if c in names]
    if isinstance(dataset, datasets.Dataset):
        values = dataset.with_format(None).select_columns(wanted).to_dict() if wanted else {}
    else:
        values = {c: [row.get(c, ABSENT) if isinstance(row, Mapping) else ABSENT for row in dataset] for c in wanted}
    for c in (*PREFERENCE_COLUMNS, *META_COLUMNS):  # every check then finds its column (maybe all absent)
        values.setdefault(c, [ABSENT] * num_rows)
    return num_rows, names, values


# ------------------------------------------------------------------------------------------------ 1. values


def _check_values(values: list, column: str, has_prompt: bool, found: _Findings) -> list[str | None]:
    """Each value's format (None when unreadable); the first failing check of each goes to ``found``."""
    checked = [_check_value(value, column, has_prompt) for value in values]
    for row, (_, reason, note) in enumerate(checked):
        if reason:
            found.add(row, reason, note, column=column)
    return [kind for kind, _, _ in checked]


def _check_value(value: Any, column: str, check_roles: bool) -> tuple[str | None, str | None, str]:
    """(format, reason, note) for one prompt/chosen/rejected value; reason None when it is fine."""
    if value is ABSENT:
        return None, "missing_field", "absent"
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None, "missing_field", repr(value)
    if isinstance(value, str):
        if not value or value.isspace():
            return "standard", "empty", ""
        return "standard", *_check_text(value)
    if isinstance(value, list) and not value:
        return None, "empty", "no messages"
    if not isinstance(value, list) or not all(isinstance(m, Mapping) for m in value):
        what = type(value).__name__ if not isinstance(value, list) else "list of non-messages"
        return None, "not_text", what
    return "conversational", *message_problem(value, column, check_roles)


def is_empty(value: Any) -> bool:
    """Whether the quality check finds ``value`` (a string or messages) ``empty``: blank text, no messages, or
    messages whose contents are all blank and that call no tool."""
    return _check_value(value, "value", check_roles=False)[1] == "empty"


def _check_text(text: str) -> tuple[str | None, str]:
    bad = _INVALID_TEXT.search(text)
    return (None, "") if bad is None else ("invalid_text", f"{bad.group()!r} at character {bad.start()}")


def _beyond_chance(fraction: float, pairs: int, alpha: float = 0.01) -> bool:
    """A length bias that fair coins would seldom give: ``fraction`` of ``pairs`` chosen longer, two-sided binomial
    p below ``alpha`` (8 of 8 pairs one way is, 7 of 7 is not; a single pair never; from 50 pairs on, every fraction
    outside [0.3, 0.7] is)."""
    if pairs >= 50:
        return True
    fewer = min(round(fraction * pairs), pairs - round(fraction * pairs))
    return 2 * sum(math.comb(pairs, k) for k in range(fewer + 1)) / 2**pairs < alpha


def message_problem(messages: list, column: str, check_roles: bool) -> tuple[str | None, str]:
    """(reason, note) of a message list: bad_message, empty, invalid_text, roles_out_of_order; (None, "") if fine."""
    for k, message in enumerate(messages):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            if role is None and message.get("from") is not None and "value" in message:  # (ShareGPT's keys)
                return (
                    "bad_message",
                    f"message {k}: no role (ShareGPT's 'from' and 'value': rename them 'role' and 'content')",
                )
            return "bad_message", f"message {k}: " + ("no role" if role is None else f"role {_short(role)}")
        # an assistant turn that only calls tools has no content (OpenAI format; TRL's templates accept it)
        if content is None and not (role == "assistant" and message.get("tool_calls")):
            return "bad_message", f"message {k}: no content"
        if content is not None and content_text(content) is None:
            return "bad_message", f"message {k}: content is {_parts(content)}"
    calls = any(m.get("tool_calls") for m in messages)
    if not calls and all(not (text := content_text(m["content"])) or text.isspace() for m in messages):
        return "empty", "every content empty"
    for k, message in enumerate(messages):
        reason, note = _check_text(content_text(message.get("content")) or "")
        if reason:
            return reason, f"message {k}: {note}"
    if column == "prompt" and messages[-1]["role"] not in _TURN_ENDS:
        return "roles_out_of_order", f"prompt ends with {messages[-1]['role']}"
    if column != "prompt" and check_roles and messages[0]["role"] != "assistant":
        return "roles_out_of_order", f"starts with {messages[0]['role']}"
    return None, ""


def _parts(content: Any) -> str:
    """What a content that is not text is: its type, or the first part that is not a text part."""
    if not isinstance(content, list):
        return type(content).__name__
    part = next(p for p in content if not is_text_part(p))
    if not isinstance(part, Mapping):
        return f"a list with a {type(part).__name__} in it (text parts only)"
    kind = part.get("type")
    return f"a list with a {_short(kind)} part (text parts only)" if kind else "a list with a part of no 'type'"


def _did_you_mean(name: str, choices: Iterable[str]) -> str:
    guess = close_match(str(name), choices)
    return f"did you mean {guess!r}? " if guess else ""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


# ------------------------------------------------------------------------------------------ 2-3. pairs and rows


def _majority_format(formats: list[str | None]) -> str | None:
    """The format most chosen values have; on a tie, the first row's (as prepare_preferences detects it)."""
    counts = Counter(f for f in formats if f is not None)
    best = max(counts.values(), default=0)
    return next((f for f in formats if f is not None and counts[f] == best), None)


def _check_pairs(num_rows, columns, formats, majority, found) -> tuple[list[int], list[tuple]]:
    """mixed_format, else identical, for rows whose values passed; returns the rows that pass and their keys."""
    valid, keys = [], []
    names = list(formats)
    for row in range(num_rows):
        if row in found.details:
            continue
        kinds = [formats[c][row] for c in names]
        if any(kind != majority for kind in kinds):
            note = ", ".join(f"{c} {kind}" for c, kind in zip(names, kinds, strict=True))
            found.add(row, "mixed_format", f"{note}; the dataset is {majority}")
            continue
        key = tuple(_key(columns[c][row]) for c in names)
        if len(names) == 2:
            key = ("", *key)
        chosen, rejected = columns[names[-2]][row], columns[names[-1]][row]
        if key[1] == key[2] or (_solid(chosen) == _solid(rejected) and squeezed(chosen) == squeezed(rejected)):
            found.add(row, "identical", "" if key[1] == key[2] else "they differ in whitespace only")
            continue
        valid.append(row)
        keys.append(key)
    return valid, keys


def _key(value: str | list) -> str:
    """A string as it is; messages as JSON without None fields (Arrow gives every message every key, None-filled)."""
    return value if isinstance(value, str) else json.dumps(without_none(value), sort_keys=True, default=str)


def squeezed(value: Any) -> str:
    """``value`` with the whitespace that carries no meaning left out: ``\\r\\n`` read as ``\\n``, spaces and tabs at
    line ends, and whitespace at both ends (indentation, blank lines and a space against a newline stay); messages
    as JSON without None fields. Two values with the same squeezed text differ in such whitespace only."""
    if isinstance(value, str):
        return _LINE_END_SPACE.sub("\n", value.replace("\r\n", "\n")).strip()
    return json.dumps(without_none(value, squeezed), sort_keys=True, default=str)


_LINE_END_SPACE = re.compile(r"[ \t]+\n")


def _solid(value: Any) -> int:
    """How many characters of ``value``'s text are not whitespace: equal for values that squeeze to the same text
    (a quick test first: most pairs differ in it)."""
    if isinstance(value, str):
        return len("".join(value.split()))  # (every Unicode space: squeezed strips them all at the ends)
    parts = value.values() if isinstance(value, Mapping) else value if isinstance(value, list) else ()
    return sum(map(_solid, parts))


def _check_duplicates(valid: list[int], keys: list[tuple], found: _Findings) -> list[int]:
    """duplicate for later copies, contradictory for rows reversing another; returns the first copies."""
    first: dict[tuple, int] = {}
    pairs = []
    for row, key in zip(valid, keys, strict=True):
        earlier = first.setdefault(key, row)
        if earlier != row:
            found.add(row, "duplicate", f"of row {found.named(earlier)}")
        else:
            pairs.append(row)
    for (prompt, chosen, rejected), row in first.items():
        other = first.get((prompt, rejected, chosen))
        if other is not None:
            found.add(row, "contradictory", f"row {found.named(other)} prefers the other completion")
    return pairs


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):  # NaN, ±inf (an int is finite)
        return None
    return float(value)


def at_margin(difference: float, margin: float) -> bool:
    """Whether a score ``difference`` equals ``margin`` but for float rounding (8.3 − 8.0 is 0.3000000000000007,
    7.5 − 7.2 is 0.2999999999999998: both are 0.3), which is then neither above nor below it (the check's
    ``min_score_margin``, ``fastdpo.data.pairs``' margin)."""
    return math.isclose(difference, margin, rel_tol=1e-9, abs_tol=1e-12)


def _check_metadata(num_rows, columns, found, min_score_margin, *, skip: set[int]) -> None:
    """bad_score; tie (status or equal scores), else small_score_margin."""
    status, chosen_score, rejected_score = columns["status"], columns["chosen_score"], columns["rejected_score"]
    for row in range(num_rows):
        if row in skip:
            continue
        for name, score in (("chosen_score", chosen_score[row]), ("rejected_score", rejected_score[row])):
            if score is not ABSENT and score is not None and _number(score) is None:
                found.add(row, "bad_score", _short(score), column=name)
        if isinstance(status[row], str) and status[row].strip().lower() == "tie":
            found.add(row, "tie", f"status {_short(status[row])}")
            continue
        a, b = _number(chosen_score[row]), _number(rejected_score[row])
        if a is None or b is None:
            continue
        if a == b:
            found.add(row, "tie", f"both scores {a:g}")
        elif min_score_margin is not None and a - b < min_score_margin and not at_margin(a - b, min_score_margin):
            found.add(row, "small_score_margin", f"{a:g} - {b:g} < {min_score_margin:g}")
