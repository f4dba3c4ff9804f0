"""The Python API's words in an error's fix, as the ``fastdpo`` command takes them (``fastdpo.cli``'s, apart for its
length)."""

from __future__ import annotations

import ast
import json
import re

from fastdpo.errors import ConfigError, DataError

_PAIRS_KEYS = r"\b(response_key|score_key|completions|scores|group_by_prompt)=('([^']*)'|True)?"


def _as_flag(found: re.Match) -> str:
    """``response_key='text'`` as ``--response-key text``; ``score_key=`` as ``--score-key``;
    ``group_by_prompt=True`` as ``--group-by-prompt``."""
    return f"--{found[1].replace('_', '-')}" + (f" {found[3]}" if found[3] is not None else "")


def pairs_in_cli_terms(error: Exception) -> Exception:
    """An error of ``build_pairs`` with its keyword arguments (``response_key=``, ``score_key=``, ``completions=``,
    ``scores=``, ``group_by_prompt=True``) as ``fastdpo data pairs``' flags; for its errors alone, whose text names
    no path (another error's folder ``completions=4`` was rewritten too). A fix that names both already (``pass
    prompt=...; fastdpo data: --prompt ...``) is ``in_cli_terms``'."""
    if not isinstance(error, (DataError, ConfigError)) or "; fastdpo data: " in (error.fix or ""):
        return error
    message, fix = (re.sub(_PAIRS_KEYS, _as_flag, text).replace("fastdpo.data.build_tree_pairs", "--tree")
                    for text in (error.message, error.fix or ""))  # fmt: skip
    column = error.column  # (a DataError's names the data's column; a ConfigError's, an option: its flag)
    if isinstance(error, ConfigError) and column in ("response_key", "score_key", "margin", "seed", "strategy"):
        column = f"--{column.replace('_', '-')}"
    return error.but(message=message, fix=fix or None, column=column)


def in_cli_terms(error: Exception, *, trains: bool) -> Exception:
    """``error`` with a fix that names the Python API's ``columns={...}`` rewritten as this command's option for it:
    ``dataset_columns`` in the YAML (``trains``: dpo, sft), ``--columns`` with JSON (data, compare); ``build_pairs``'
    missing columns' ``prompt=...; fastdpo data: --prompt ...`` as the flag alone (its other keywords:
    ``pairs_in_cli_terms``);
    ``check_preferences`` as ``fastdpo data check``, its ``.filter`` as ``fastdpo data filter``; a stream's and a
    row format's Python options as the YAML's (``bad_rows='drop'``: ``data_filter: drop``)."""
    if isinstance(error, ConfigError) and trains and "streaming=True" in (error.fix or ""):
        fix = error.fix.replace("load the data without streaming=True (a map-style Dataset)",
                                "set dataset_streaming: false").replace(
            "use reference='separate' (or 'adapter' with PEFT)", "set precompute_ref_log_probs: false")  # fmt: skip
        error = error.but(fix=fix)
    if isinstance(error, DataError) and trains and "bad_rows='drop'" in (error.fix or ""):  # (a stream's refused row)
        from fastdpo.data.stream import DROP_HINT

        error = error.but(fix=error.fix.replace(DROP_HINT, "or set data_filter: drop to drop such rows as read"))
    if isinstance(error, DataError) and ", or pass format=" in (error.fix or ""):  # (a Python option; a stream's
        error = error.but(fix=error.fix.replace(", or pass format=", ""))  # drop hint may follow it)
    if isinstance(error, DataError) and "; fastdpo data: " in (error.fix or ""):  # (build_pairs' prompt=...)
        fix = re.sub(r"pass \w+=[^;]*; fastdpo data: ", "pass ", error.fix)
        error = error.but(fix=fix)
    if isinstance(error, DataError) and "fastdpo.data.check_preferences" in (error.fix or ""):  # its commands
        fix = error.fix.replace("fastdpo.data.check_preferences(dataset, tokenizer).filter(dataset)",
                                "fastdpo data filter FILE OUT --tokenizer TOKENIZER")  # fmt: skip
        fix = fix.replace("fastdpo.data.check_preferences(dataset).filter(dataset)", "fastdpo data filter FILE OUT")
        fix = fix.replace("fastdpo.data.check_preferences", "fastdpo data check FILE")
        error = error.but(fix=fix)
    found = re.search(r"(map your column with )?columns=(\{[^}]*\})( in prepare_preferences)?",
                      getattr(error, "fix", None) or "")  # fmt: skip
    if not isinstance(error, DataError) or found is None:
        return error
    mapping = ast.literal_eval(found.group(2))
    if trains:
        option = f"{found.group(1) or ''}dataset_columns: {json.dumps(mapping)} in the YAML"
    else:  # data, compare
        option = f"{found.group(1) or ''}--columns '{json.dumps(mapping)}'"
    return error.but(fix=error.fix.replace(found.group(0), option))
