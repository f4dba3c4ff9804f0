"""Rows ``prepare_preferences`` refuses, kept aside instead of stopping everything.

``prepared_rows``: every row as the trainers read it, those preparation refuses as they are, for the quality check
to judge (``fastdpo data check|filter|split``). ``prepare_dropping``: the prepared rows without those refused for a
reason the quality check drops (an empty answer, a missing one, not text): what ``data_filter: drop`` (the
trainers' CLI default) and ``fastdpo compare --pairs`` do with them, where preparation stopped at the first.
"""

from __future__ import annotations

from collections import Counter

from fastdpo.data.formats import (
    _detect_format,
    check_row,
    prepare_preferences,
    rename_preference_columns,
    require_answers,
    warn_of_rows,
)
from fastdpo.data.load import load_data, text_columns
from fastdpo.data.written import row_warnings_said
from fastdpo.errors import DataError


def prepared_rows(dataset, columns: dict | None):
    """``(rows, refused)``: ``dataset`` as the trainers read it (``prepare_preferences``: columns mapped, score
    aliases, the prompt taken out of whole conversations, system/input columns joined in), row for row, and
    ``{row: its DataError}`` for the rows preparation refuses, which stay as they are (mapped; ``rows`` is a list
    then) for the quality check to judge."""
    try:
        return prepare_preferences(dataset, columns=columns), {}
    except DataError as error:
        if error.row is None:  # the whole dataset's problem (a missing column): the check says the same
            raise
        renamed, _ = rename_preference_columns(dataset, columns or {})
        kind = _detect_format(renamed, "auto")
        raw = renamed.to_list()
        refused = {}
        for row, example in enumerate(raw):
            try:
                check_row(example, row, kind)
            except DataError as problem:
                refused[row] = problem
        if not refused:  # (a row _check_rows refuses that check_row passes cannot be: they run the same checks)
            raise
        kept = [row for row in range(len(raw)) if row not in refused]
        warn_of_rows(renamed, kind)  # (by the rows as given; the kept rows' preparation would number its own)
        if kept:
            with row_warnings_said():
                prepared = prepare_preferences(renamed.select(kept)).to_list()
            for row, example in zip(kept, prepared, strict=True):
                raw[row] = example
        _read_around(raw, refused, kind)
        return raw, refused


def refused_rows(dataset) -> set[int]:
    """The rows ``prepare_preferences`` refuses, found by ``check_row`` (its checks) without preparing the others,
    and the rows' counted warnings given as it gives them: what ``split_pairs`` counts toward no size (preparing
    every row for it took 2.8 s of 50,000 rows). A DataError where the whole dataset is refused (no row of a known
    format, none at all, no chosen or rejected column: ``prepare_preferences``' errors). ``dataset``: under fastdpo's
    column names."""
    if len(dataset) == 0:
        raise DataError("the dataset has no rows", fix="check the file or the split you loaded")
    require_answers(dataset)
    kind = _detect_format(dataset, "auto")
    warn_of_rows(dataset, kind)
    read = [name for name in (*ANSWERED, *TEMPLATE_INPUTS) if name in dataset.column_names]
    refused, row = set(), 0
    for batch in dataset.select_columns(read).iter(batch_size=1000):
        for values in zip(*batch.values(), strict=True):
            try:
                check_row(dict(zip(read, values, strict=True)), row, kind)
            except DataError:
                refused.add(row)
            row += 1
    return refused


ANSWERED = ("prompt", "chosen", "rejected", "system", "input", "context")  # (the columns check_row reads)
TEMPLATE_INPUTS = ("tools", "chat_template_kwargs")


def _read_around(raw: list[dict], refused: dict[int, DataError], kind: str) -> None:
    """Each refused row whose fault is one answer, beside a prompt column, as the trainers would read it but for that
    answer (in place): the other answer stands in for it while the row is prepared (the prompt taken out of a whole
    conversation, a system column joined), and it goes back as written. The quality check then judges the answer's
    own fault alone: an UltraFeedback row's ``chosen: []`` also counted ``roles_out_of_order``, its rejected
    conversation holding the user's turn still. Rows that will not prepare so stay as written."""
    stand_ins = {}
    for row, problem in refused.items():
        other = {"chosen": "rejected", "rejected": "chosen"}.get(problem.column)
        if other is None or "prompt" not in raw[row]:  # (without one, identical answers hold no prompt to take out)
            continue
        stand_in = {**raw[row], problem.column: raw[row].get(other)}
        try:
            check_row(stand_in, row, kind)
        except DataError:
            continue
        stand_ins[row] = stand_in
    if not stand_ins:
        return
    try:
        with row_warnings_said():
            read = prepare_preferences(list(stand_ins.values())).to_list()
    except DataError:  # (check_row passed each: what preparation refuses; left as written all the same)
        return
    for (row, _), example in zip(stand_ins.items(), read, strict=True):
        column = refused[row].column
        raw[row] = {**example, column: raw[row].get(column)}


def prepare_dropping(data, *, columns: dict | None = None, split: str | None = "train"):
    """``(prepared, dropped, rows)``: ``prepare_preferences(data, columns=, split=)`` but for the rows it refuses for
    a reason the quality check drops, counted by that reason in ``dropped``, ``rows`` their numbers in ``data`` (each
    with the quality check's reasons and notes for it, as ``fastdpo data check`` gives them). A
    refused row the check would keep is its DataError, as is any other problem, named by its row in ``data``."""
    from fastdpo.data.quality import check_preferences

    dataset = load_data(data, split=split, text=text_columns(columns))
    checked, refused = prepared_rows(dataset, columns)
    if not refused:
        return checked, {}, {}
    with row_warnings_said():  # (prepared_rows gave them, by the rows as given)
        report = check_preferences(checked)
    reasons = {row: reason for reason, found in report.dropped_rows(checked).items() for row in found}
    kept = [row for row in range(len(dataset)) if row not in refused]
    if any(row not in reasons for row in refused):
        raise next(error for row, error in refused.items() if row not in reasons)
    dropped = dict(Counter(reasons[row] for row in refused))
    if not kept:
        raise DataError(f"every row is refused for a reason the quality check drops ({dropped})",
                        fix="fix the data: fastdpo.data.check_preferences lists them")  # fmt: skip
    try:
        with row_warnings_said():
            prepared = prepare_preferences(dataset.select(kept), columns=columns)
    except DataError as error:  # (named by its row in data, not among the rows kept)
        if error.row is None:
            raise
        raise error.but(row=kept[error.row]) from None
    found = {row: [reason for reason, rows in report.rows.items() if row in rows] for row in refused}
    return prepared, dropped, {row: (found[row], report.details.get(row, [])) for row in refused}


def prepare_sft_dropping(data, *, columns: dict | None = None, split: str | None = "train", text_field: str = "text",
                         read_as_trl: bool = False):  # fmt: skip
    """``(prepared, dropped, rows)``: ``prepare_sft`` but for the rows it refuses (an empty completion, a message
    without content, ...), counted in ``dropped`` by the column at fault, ``rows`` their numbers in ``data``; a
    DataError where none is left (the first row's)."""
    from fastdpo.data.sft import prepare_sft

    refused: dict[int, DataError] = {}
    prepared = prepare_sft(data, columns=columns, split=split, text_field=text_field, refused=refused,
                           read_as_trl=read_as_trl)  # fmt: skip
    return prepared, dict(Counter(error.column or "row" for error in refused.values())), sorted(refused)
