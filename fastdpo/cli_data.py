"""``fastdpo data check|stats|filter|pairs|split``: the quality report, length statistics, filtering, pairs from
rated rows and a held-out split by prompt, on files or hub datasets (``fastdpo.cli`` dispatches here).

Each writing action writes ``.jsonl``, ``.parquet`` or ``.csv`` with ``.<OUT>.dropped.json`` beside it (what was left
out, by reason and row), never over its input and never over an existing file without ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastdpo.errors import ConfigError, DataError, offline_hint


def add_data_parser(commands) -> None:
    """The ``data`` command and its actions, on the ``fastdpo`` parser's subcommands."""
    data = commands.add_parser("data", help="check, filter, describe, pair and split preference data")
    actions = data.add_subparsers(dest="action", required=True)
    for name, help_text in DATA_ACTIONS.items():
        action = actions.add_parser(name, help=help_text, description=help_text)
        action.add_argument("data", help="a .jsonl/.json/.parquet/.csv/.tsv file (or .gz of one) or a hub name")
        if name in ("filter", "pairs"):
            action.add_argument("out", type=Path, help="the file to write (.jsonl, .parquet or .csv)")
        if name == "split":
            action.add_argument("train_out", type=Path)
            action.add_argument("eval_out", type=Path)
            action.add_argument("--test-size", type=_fraction_or_count, default=0.1,
                                help="a fraction (0.1), or a number of rows (500)")  # fmt: skip
            action.add_argument("--seed", type=int, default=42, help="the held-out draw's seed (a run's eval_fraction "
                                "draws with its seed, 42 by default: one seed, the same rows)")  # fmt: skip
        if name in ("check", "stats", "filter", "split"):
            action.add_argument("--columns", type=_json_object, default=None,
                                help='column names in the data, e.g. \'{"prompt": "question"}\'')  # fmt: skip
        if name in ("check", "stats", "filter"):
            action.add_argument("--tokenizer", help="a tokenizer folder or hub name: token statistics and checks "
                                "(chat_template_error, identical_tokens)")  # fmt: skip
            if name in ("check", "filter"):
                action.add_argument("--max-length", type=int, help="with --tokenizer: flag rows that would be cut")
                action.add_argument("--truncation-mode", default="keep_start", choices=("keep_start", "keep_end"),
                                    help="the training's: under keep_end a long prompt drops no row")  # fmt: skip
        if name in ("check", "stats"):
            action.add_argument("--json", action="store_true")
            action.add_argument("--limit", type=int, help="only the first N rows, streamed: a large file or hub "
                                "dataset is not read whole (duplicates are then found among those rows)")  # fmt: skip
        if name == "filter":
            action.add_argument("--drop", help="comma-separated reasons to drop (default: every 'drop' reason)")
            action.add_argument("--where", help="keep only rows where '<column> <op> <value>' holds")
        if name == "pairs":  # rows like {"prompt": ..., "completions": [...], "scores": [...]} (fastdpo.data.pairs)
            action.add_argument("--strategy", default="best_vs_worst",
                                help="best_vs_worst, best_vs_random_lower or all_above_margin")  # fmt: skip
            action.add_argument("--margin", type=float, default=0.0, help="a pair's scores differ by more than this")
            action.add_argument("--seed", type=int, default=0, help="best_vs_random_lower's draws")
            action.add_argument("--lower-is-better", action="store_true", help="the scores are ranks: 1 is the best")
            action.add_argument("--group-by-prompt", action="store_true", help="each row holds one response "
                                "(--completions) and its score (--scores): the rows of one prompt are grouped "
                                "(HelpSteer2's layout; KTO's: --completions completion --scores label)")  # fmt: skip
            action.add_argument("--tree", action="store_true", help="a message tree, one message a row (oasst's "
                                "message_id, parent_id, text, role, rank; --completions and --scores name the text "
                                "and rank columns): the ranked replies to each message paired, 0 the best")  # fmt: skip
            for column, meaning in PAIRS_COLUMNS.items():
                action.add_argument(f"--{column.replace('_', '-')}", dest=column, default=None, help=meaning)
        if name in ("filter", "pairs", "split"):
            action.add_argument("--overwrite", action="store_true", help="replace existing output files")
        action.add_argument("--split", default="train", help="the split of a folder of splits (train.jsonl, "
                            "test.jsonl, ...) or a hub dataset to read (default: train)")  # fmt: skip
        action.add_argument("--dataset-config", help="a hub dataset's configuration name (load_dataset's name; "
                            "a run's dataset_config)")  # fmt: skip
        action.add_argument("--debug", action="store_true")


def _fraction_or_count(text: str) -> float | int:
    """``--test-size``: ``"500"`` is a number of rows, ``"0.1"`` a fraction (``split_by_prompt`` takes either)."""
    try:
        value = float(text)
    except ValueError:  # (argparse said "invalid _fraction_or_count value")
        raise argparse.ArgumentTypeError(f"{text!r} is neither a fraction (0.1) nor a number of rows (500)") from None
    return int(value) if value.is_integer() and value >= 1 else value  # ("5.0" 5 rows, as eval_fraction reads it)


PAIRS_COLUMNS = {"prompt": "the prompt column (default: prompt)",
                 "completions": "the column of completions (default: completions)",
                 "scores": "the column of one score per completion (default: scores)",
                 "response_key": "completions as dicts: the key of the text (e.g. response)",
                 "score_key": "completions as dicts: the key of the score (e.g. overall_score)"}  # fmt: skip
DATA_ACTIONS = {
    "check": "the quality report: every problem by reason and row, lengths, dataset warnings",
    "stats": "length statistics (characters; tokens with --tokenizer)",
    "filter": "write the data without the rows of the given reasons (and/or failing --where; SFT rows: --where alone)",
    "pairs": 'rated rows ({"prompt": ..., "completions": [...], "scores": [...]}) → preference pairs',
    "split": "a held-out split with no prompt in both parts",
}


def run_data(known: argparse.Namespace) -> int:
    """Run ``fastdpo data <action>``; the exit status."""
    from fastdpo.data.hub_config import hub_config

    with hub_config(known.dataset_config, "--dataset-config"):  # (each read below: whole, first rows, verbatim)
        return _run_data(known)


def _run_data(known: argparse.Namespace) -> int:
    from fastdpo.cli_errors import pairs_in_cli_terms
    from fastdpo.data import build_pairs, check_preferences, load_data
    from fastdpo.data.load import text_columns
    from fastdpo.data.split import ROW_COLUMN, split_pairs, split_sft_rows

    if getattr(known, "max_length", None) is not None and not known.tokenizer:
        raise ConfigError("counts tokens", column="--max-length", fix="pass --tokenizer (a folder or hub name) too")

    tokenizer = _tokenizer(known.tokenizer) if getattr(known, "tokenizer", None) else None  # (before the data)
    limit = getattr(known, "limit", None)
    text = text_columns(getattr(known, "columns", None))  # (a CSV file's text columns)
    split = getattr(known, "split", "train")
    dataset = load_data(known.data, split=split, text=text) if limit is None else _first_rows(known.data, limit, text,
                                                                                              split)  # fmt: skip
    _say_split(known.data, split)
    if known.action == "filter" and _holds_sft(dataset, known.columns):
        return _filter_sft(known, dataset, text)
    if known.action in ("check", "stats", "filter"):  # the rows as the trainers read them
        checked = _prepared(dataset, getattr(known, "columns", None))
    elif getattr(known, "columns", None):
        dataset = _mapped(dataset, known.columns)
    if known.action in ("check", "stats"):
        report = check_preferences(checked, tokenizer, max_length=getattr(known, "max_length", None),
                                   truncation_mode=getattr(known, "truncation_mode", "keep_start"))  # fmt: skip
        if known.action == "stats":
            print(json.dumps(report.length_stats, indent=1) if known.json else _stats_table(report.length_stats))
            return 0
        print(report.to_json() if known.json else report.to_markdown())
        if report.num_rows and len(report.drop_rows()) == report.num_rows:  # (a check that passed, status 0, before)
            raise DataError(
                f"every one of the {report.num_rows} rows would be dropped (above, by reason): a run "
                "would have no data to train on",
                fix="fix the rows, or map the columns (--columns)",
            )
        return 0
    if known.action == "filter":  # judged as the trainers read the rows; those kept written under fastdpo's names
        reasons = known.drop.split(",") if known.drop else None
        mapped = _mapped(dataset, known.columns) if known.columns else dataset  # (under fastdpo's column names)
        report = check_preferences(checked, tokenizer, max_length=known.max_length,
                                   truncation_mode=known.truncation_mode)  # fmt: skip
        rows = report.dropped_rows(_where_view(checked, mapped), reasons, where=known.where)
        return _write_kept(known, dataset, text, mapped, rows, "rows", lambda dropped: DataError(
            f"none of the {len(dataset)} rows is kept (dropped: {dropped}): nothing was written",
            fix="drop fewer reasons (--drop), or loosen --where"))  # fmt: skip
    if known.action == "pairs":
        options = {k: getattr(known, k) for k in ("prompt", "completions", "scores", "response_key", "score_key")}
        try:
            if known.tree:
                result = _tree_pairs(dataset, known, options)
            else:
                result = build_pairs(dataset, strategy=known.strategy, margin=known.margin, seed=known.seed,
                                     lower_is_better=known.lower_is_better, group_by_prompt=known.group_by_prompt,
                                     **{k: v for k, v in options.items() if v is not None})  # fmt: skip
        except (DataError, ConfigError) as error:
            raise pairs_in_cli_terms(error) from None
        if len(result.dataset) == 0:  # (an empty file, exit 0, before)
            raise DataError(
                f"no pair: {result.summary()}",
                column="scores",
                fix="check the scores (numbers, higher is better unless --lower-is-better) and --margin",
            )
        _write(result.dataset, known.out, known, {"input": known.data, "rows": result.num_rows,
                                                  "pairs": len(result.dataset), "dropped": result.dropped,
                                                  "dropped_rows": result.dropped_rows, "excluded": result.excluded,
                                                  "excluded_rows": result.excluded_rows})  # fmt: skip
        print(f"{result.summary()} (see {_dropped_path(known.out)})")
        return 0
    _check_outputs([known.train_out, known.eval_out], known, dataset)  # (before the split's work)
    numbered = dataset.add_column(ROW_COLUMN, list(range(len(dataset))))  # (each side written from its output's view)
    if _holds_sft(dataset, None):  # (grouped as `fastdpo sft`'s eval_fraction groups them)
        parts = split_sft_rows(numbered, test_size=known.test_size, seed=known.seed)
    else:  # (without a prompt column: what preparation refuses or takes out of chosen and rejected, said on stderr)
        prepared = None if "prompt" in dataset.column_names else _prepared(dataset, None)
        parts = split_pairs(numbered, test_size=known.test_size, seed=known.seed, prepared=prepared)
    summary = {"input": known.data, "rows": len(dataset), "train": len(parts[0]), "eval": len(parts[1])}
    views = {}  # output suffix → the rows as that output writes them (a CSV's cells as the CSV file has them)
    for part, out in zip(parts, (known.train_out, known.eval_out), strict=True):
        if out.suffix not in views:
            views[out.suffix] = _as_written(known, out, text, dataset)
        _write(views[out.suffix].select(part[ROW_COLUMN]), out, known, summary)
    print(f"train {len(parts[0])} rows, eval {len(parts[1])} rows; no prompt in both")
    return 0


def _filter_sft(known: argparse.Namespace, dataset, text: tuple[str, ...]) -> int:
    """``data filter`` of SFT rows (text, messages, a prompt and its completion): by ``--where`` alone, the quality
    report's reasons being preference pairs' (it refused the rows as not pairs: KTO's ``label == true`` rows could
    not be kept for ``fastdpo sft``)."""
    from fastdpo.data.where import where_mask

    for flag, given in (("--drop", known.drop), ("--tokenizer", known.tokenizer)):
        if given:
            raise ConfigError("judges preference pairs, and these are SFT rows (text, messages, or a prompt and its "
                              "completion)", column=flag, fix=f"leave {flag} out: SFT rows are kept by --where "
                              "'<column> <op> <value>' alone")  # fmt: skip
    if not known.where:
        raise ConfigError(
            "SFT rows (text, messages, or a prompt and its completion) are kept by --where alone",
            column="--where",
            fix="pass --where '<column> <op> <value>', e.g. --where 'label == true'",
        )
    mapped = _mapped(dataset, known.columns) if known.columns else dataset  # (under fastdpo's column names)
    keep = where_mask(mapped, mapped.column_names, known.where, list(range(len(mapped))))
    gone = {"where": [row for row, kept in enumerate(keep) if not kept]}
    return _write_kept(known, dataset, text, mapped, gone, "SFT rows", lambda _: ConfigError(
        f"none of the {len(dataset)} rows holds where {known.where!r}: nothing was written", column="--where",
        fix="check the column's values in the file"))  # fmt: skip


def _write_kept(known: argparse.Namespace, dataset, text: tuple[str, ...], mapped, rows: dict[str, list[int]],
                noun: str, none_kept) -> int:  # fmt: skip
    """``data filter``'s output: the rows of ``dataset`` in none of ``rows`` (reason → its rows), as the input has
    them (``mapped``: under fastdpo's names), with the summary beside them; ``none_kept(dropped)``, the error where
    no row is left (a file of no rows, which nothing then reads)."""
    gone = {row for removed in rows.values() for row in removed}
    kept_rows = [row for row in range(len(dataset)) if row not in gone]
    dropped = {reason: len(removed) for reason, removed in rows.items()}
    if not kept_rows:
        raise none_kept(dropped)
    _write(_as_written(known, known.out, text, mapped).select(kept_rows), known.out, known,
           {"input": known.data, "rows": len(dataset), "kept": len(kept_rows), "dropped": dropped,
            "dropped_rows": rows})  # fmt: skip
    print(f"kept {len(kept_rows)} of {len(dataset)} {noun}; dropped {dropped} (see {_dropped_path(known.out)})")
    return 0


def _tokenizer(name: str):
    """``--tokenizer``: the tokenizer of a folder or hub name, or one ``ConfigError`` saying what is missing (a path
    that is no folder read as a malformed hub id, "Repo id must ...", before)."""
    from transformers import AutoTokenizer

    from fastdpo.train.loading import refuse_missing_folder

    refuse_missing_folder(name, "--tokenizer")
    try:
        return AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:  # (a folder without tokenizer files; a hub name not found or offline)
        files = sorted(p.name for p in Path(name).iterdir())[:8] if Path(name).is_dir() else None
        what = (f"the folder {name} holds no tokenizer (its files: {', '.join(files) or 'none'})" if files is not None
                else f"cannot load a tokenizer from {name!r}: {str(error).splitlines()[0]}")  # fmt: skip
        raise ConfigError(what, column="--tokenizer",
                          fix="give a folder with the tokenizer's files (tokenizer.json, tokenizer_config.json), "
                          f"as save_pretrained writes them, or a hub name{offline_hint(error)}") from None  # fmt: skip


def _say_split(source: str, split: str) -> None:
    """Which split of a local folder of several was read (the others were left unread, unsaid)."""
    from fastdpo.data.load import saved_to_disk, split_files

    path = Path(source).expanduser()
    if path.is_dir() and not saved_to_disk(path):
        others = [name for name in split_files(path) if name != split]
        if others:
            print(f"read split {split!r} of {source} (also: {', '.join(others)}; --split picks one)", file=sys.stderr)


def _first_rows(source: str, limit: int, text: tuple[str, ...], split: str = "train"):
    """The first ``limit`` rows of ``source`` (read as a stream, so no further), as a Dataset."""
    import pyarrow
    from datasets.exceptions import DatasetGenerationError

    from fastdpo.data.load import as_dataset, load_stream, stream_failure

    if limit < 1:
        raise ConfigError(f"must be at least 1, got {limit}", column="--limit", fix="pass a number of rows")
    try:
        rows = list(load_stream(source, split=split, text=text).take(limit))
    except (DatasetGenerationError, pyarrow.lib.ArrowException, ValueError) as error:  # (Arrow's parse error)
        raise stream_failure(source, error) from None
    if not rows:
        raise DataError(f"{source} has no rows", option="data", fix="check the file or the split")
    print(f"fastdpo: the first {len(rows)} rows of {source} (--limit {limit})", file=sys.stderr)
    try:
        return as_dataset(rows)
    except DataError:  # a column of values of several kinds (a score "high" beside 9): Json, as the whole file's
        mixed = _mixed_as_json(rows)  # load reads it (refused with --limit, reported as bad_score without)
        if mixed is None:
            raise
        return mixed


def _mixed_as_json(rows: list[dict]):
    """``rows`` as a Dataset whose columns of values of more than one kind (a score "high" beside 9; ``tools`` a
    list in one row and its JSON text in another, as the whole file's load reads them) are ``Json`` columns; None
    where there is no such column."""
    import datasets

    from fastdpo.data.load import as_dataset, table_columns

    columns = table_columns(rows)
    mixed = [name for name in columns if len({type(row.get(name)) for row in rows} - {type(None)}) > 1]
    if not mixed:
        return None
    rest = as_dataset([{name: value for name, value in row.items() if name not in mixed} for row in rows])
    features = datasets.Features({name: datasets.Json() if name in mixed else rest.features[name] for name in columns})
    return datasets.Dataset.from_dict({name: [row.get(name) for row in rows] for name in columns}, features=features)


def _as_written(known: argparse.Namespace, out: Path, text: tuple[str, ...], dataset):
    """``dataset`` (a local CSV file's rows, written to a CSV file) with every column read as the text the file has:
    pandas reads the others as numbers, booleans and missing values, and wrote them back changed ("001" as 1, "NA"
    as an empty cell, "false" as False). Other inputs and outputs: ``dataset``."""
    from fastdpo.data.load import load_data
    from fastdpo.data.local_files import builder_of, csv_header

    source = Path(known.data).expanduser()
    if out.suffix != ".csv" or builder_of(source) != "csv" or not source.is_file():
        return dataset
    verbatim = load_data(source, text=(*text, *csv_header(source)))
    return _mapped(verbatim, known.columns) if getattr(known, "columns", None) else verbatim


def _prepared(dataset, columns: dict | None):
    """``prepared_rows``' rows, said on stderr where preparation refused some: the report lists their problems and
    judges the others prepared."""
    from fastdpo.data.refused import prepared_rows

    prepared, refused = prepared_rows(dataset, columns)
    if refused:
        print(f"fastdpo: rows the trainers' preparation refuses, checked as they are: {len(refused)} of "
              f"{len(prepared)} (the first: {str(next(iter(refused.values()))).split(' — ')[0]}); the others are "
              "checked as the trainers read them", file=sys.stderr)  # fmt: skip
        return prepared
    if "prompt" not in getattr(dataset, "column_names", []) and "prompt" not in (columns or {}):
        split = sum(prepared["prompt_split_mid_word"]) if "prompt_split_mid_word" in prepared.column_names else 0
        print(f"fastdpo: no prompt column: each pair's prompt is the text chosen and rejected share (TRL's "
              f"extract_prompt); {split} rows have it end inside a word", file=sys.stderr)  # fmt: skip
    return prepared


def _where_view(checked, mapped):
    """The prepared rows with the input's own columns beside them (``score_chosen``, ``system``), for ``--where``."""
    if not hasattr(checked, "column_names"):  # (a list of rows: some were refused by the preparation)
        return [{**row, **{k: v for k, v in original.items() if k not in row}}
                for row, original in zip(checked, mapped.to_list(), strict=True)]  # fmt: skip
    for name in mapped.column_names:
        if name not in checked.column_names:
            checked = checked.add_column(name, mapped[name])
    return checked


def _mapped(dataset, columns: dict):
    """``columns`` maps fastdpo's names to the data's (``{"prompt": "question"}``), checked as the trainers check it
    (a name fastdpo does not know, a column not there with its close match): SFT's names for SFT rows."""
    from fastdpo.data.formats import KNOWN_TARGETS
    from fastdpo.data.schema import rename_columns
    from fastdpo.data.sft import SFT_COLUMNS

    return rename_columns(dataset, columns, SFT_COLUMNS if _holds_sft(dataset, columns) else KNOWN_TARGETS)


def _tree_pairs(dataset, known, options: dict):
    """``fastdpo data pairs --tree``: ``build_tree_pairs``, ``--completions`` and ``--scores`` naming the text and
    rank columns; the options of rows that hold their prompt refused."""
    from fastdpo.data.trees import build_tree_pairs

    for name in ("prompt", "response_key", "score_key", "group_by_prompt"):
        if getattr(known, name, None) or options.get(name):
            flag = f"--{name.replace('_', '-')}"
            raise ConfigError("a message tree's prompts are its conversations, grouped by the message replied to",
                              column=flag, fix=f"drop {flag}; --completions and --scores name the text and rank "
                              "columns")  # fmt: skip
    names = {"text": options["completions"], "rank": options["scores"]}
    return build_tree_pairs(dataset, strategy=known.strategy, margin=known.margin, seed=known.seed,
                            **{k: v for k, v in names.items() if v is not None})  # fmt: skip


def _holds_sft(dataset, columns: dict | None) -> bool:
    """Whether ``dataset`` (its columns as ``columns`` maps them) holds SFT rows (text, a conversation, a prompt
    and its completion), not preference pairs."""
    answers = {"text", "messages", "conversations", "completion"}  # (SFT's names that no preference row has)
    if set(columns or {}) & answers:  # a map to SFT's names: SFT, whatever else the file holds
        return True
    renamed = {theirs: ours for ours, theirs in (columns or {}).items() if isinstance(theirs, str)}
    names = {renamed.get(name, name) for name in dataset.column_names}
    return not {"chosen", "rejected"} <= names and bool(names & answers)  # (text beside chosen: SFT trains on it)


def _dropped_path(out: Path) -> Path:
    """The summary beside ``out``, hidden: ``datasets.load_dataset`` (and ``trl dpo``) of a folder of splits read a
    ``train.jsonl.dropped.json`` beside ``train.jsonl`` as data, and failed."""
    return out.with_name(f".{out.name}.dropped.json")


def _check_outputs(paths: list[Path], known: argparse.Namespace, dataset=None) -> None:
    """Each output path writable without losing a file or a value (``dataset``: the rows to write, when known)."""
    source = Path(known.data).expanduser().resolve()
    inputs = {source, *_folder_files(source)}  # (a folder's data files are the input too)
    nested = [name for name, feature in getattr(dataset, "features", {}).items() if isinstance(feature, (dict, list))
              or type(feature).__name__ in ("List", "LargeList", "Sequence", "Json")]  # fmt: skip
    if len({path.resolve() for path in paths}) < len(paths):
        raise ConfigError(f"{paths[0]} is given for both outputs", column="out",
                          fix="give the train and eval splits a file each")  # fmt: skip
    for path in paths:
        if path.suffix == ".csv" and nested:  # pandas writes their Python repr, which reads back as one string
            raise ConfigError(f"{path.name}: a CSV cell holds text or a number, and {', '.join(map(repr, nested))} "
                              "hold lists or records (messages): they would be read back as their Python text",
                              column="out", fix="write a .jsonl or .parquet file")  # fmt: skip
        if path.suffix not in WRITERS:
            raise ConfigError(f"cannot write {path.name!r}", column="out", fix=f"use one of {', '.join(WRITERS)}")
        if path.resolve() in inputs:
            what = "the input" if path.resolve() == source else f"a file of the input folder {known.data}"
            raise ConfigError(f"{path} is {what}", column="out", fix="write to another file: inputs are kept")
        parent = next((folder for folder in path.resolve().parents if folder.exists()), None)
        if parent is not None and not parent.is_dir():  # (found after the other output was written, before)
            raise ConfigError(f"{path}: {parent} is a file, not a folder", column="out", fix="give a path in a folder")
        for target in (path, _dropped_path(path)):
            if target.is_dir():  # (--overwrite failed on it with the OS's "Is a directory", a partial file left)
                raise ConfigError(f"{target} is a folder", column="out", fix="give a file path (e.g. its_name.jsonl)")
            if target.exists() and not known.overwrite:
                raise ConfigError(f"{target} exists", column="out", fix="pass --overwrite, or another path")


def _folder_files(source: Path) -> list[Path]:
    """The data files of a local dataset folder (every split's); none for a file or a hub name."""
    from fastdpo.data.load import saved_to_disk, split_files

    if not source.is_dir():
        return []
    if saved_to_disk(source):
        return [file.resolve() for file in source.rglob("*") if file.is_file()]
    try:
        return [file.resolve() for files in split_files(source).values() for file in files]
    except DataError:  # (a folder the load refuses: its error comes from there)
        return []


WRITERS = {".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def _write(dataset, out: Path, known: argparse.Namespace, summary: dict) -> None:
    """``dataset`` to ``out`` and the summary beside it, each written to a temporary file and renamed."""
    import os

    from fastdpo.atomic import atomic_write

    _check_outputs([out], known, dataset)
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(f".{out.name}.partial{out.suffix}")
    kind = WRITERS[out.suffix]
    if kind == "json":  # (row by row with Python's json: pandas' to_json rounds floats to 10 digits, 1e-12 to 0.0)
        with open(temporary, "w", encoding="utf-8") as handle:
            for batch in dataset.iter(batch_size=1000):
                rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
                handle.writelines(json.dumps(row, ensure_ascii=False, default=str) + "\n" for row in rows)
    elif kind == "parquet":
        dataset.to_parquet(temporary)
    else:
        dataset.to_csv(temporary, index=False)
    os.replace(temporary, out)
    atomic_write(_dropped_path(out), json.dumps(summary, indent=1, default=str))


def _stats_table(stats: dict) -> str:
    from fastdpo.data.quality import length_table

    return "\n".join([f"{stats.get('pairs', 0):,} valid pairs", "", *length_table(stats)])


# ----------------------------------------------------------------------------------------------------------- env


def _json_object(text: str) -> dict:
    """``--columns``' JSON object (a list or a string there failed later with an AttributeError traceback)."""
    from fastdpo.cli_values import _json_dict

    return _json_dict(text)
