"""The quality report's fourth stage (``fastdpo.data.quality``): lengths of the valid pairs, and with a tokenizer
their tokens as ``tokenize_preferences`` builds them (``fastdpo.data.render``): ``prompt_ids``, ``chosen_ids``,
``rejected_ids``, so ``prompt_fills_max_length`` and ``will_be_truncated`` count what training will hold. A row of
a dataset without a prompt column counts its whole conversations (or strings) as completions."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from fastdpo.data.render import (
    TemplateFailure,
    conversation_ids,
    describe_error,
    prompt_cut_why,
    prompt_fills,
    split_pair,
    string_ids,
    truncate,
)
from fastdpo.data.schema import content_text, without_null_arguments

ABSENT = object()  # a key missing from a row of a list input (None is a value there)
_HIST_BINS = 10
_CHUNK = 2048
TOKEN_COLUMNS = ("prompt", "chosen", "rejected")


def _chars(value: str | list) -> int:
    """A string's characters; a message list's: its contents' and its tool calls' (their function's name and
    arguments, as JSON: a turn of calls alone counted 0 against the other answer's text)."""
    if isinstance(value, str):
        return len(value)
    value = without_null_arguments(value)  # (Arrow's None-filled keys of other calls: not rendered, not counted)
    return sum(len(content_text(m.get("content")) or "") + _call_chars(m.get("tool_calls")) for m in value)


def _call_chars(calls) -> int:
    if not isinstance(calls, list):
        return 0
    functions = [call.get("function", call) for call in calls if isinstance(call, dict)]
    return sum(len(str(function.get("name") or "")) + _arguments_chars(function.get("arguments"))
               for function in functions if isinstance(function, dict))  # fmt: skip


def _arguments_chars(arguments) -> int:
    """A call's arguments as JSON text: a string of them as it is."""
    return len(arguments) if isinstance(arguments, str) else len(json.dumps(arguments, ensure_ascii=False, default=str))


def check_lengths(pairs, columns, text_columns, majority, found, *, tokenizer, max_length, length_ratio_warn,
                  truncation_mode: str = "keep_start"):  # fmt: skip
    """length_ratio, the token checks, and (length_stats, length_bias) over the valid pairs."""
    chars = {c: [_chars(columns[c][row]) for row in pairs] for c in text_columns}
    if length_ratio_warn is not None:
        for row, a, b in zip(pairs, chars["chosen"], chars["rejected"], strict=True):
            ratio = max(a, b) / max(1, min(a, b))
            if ratio > length_ratio_warn:
                found.add(row, "length_ratio", f"{ratio:.1f}x: chosen {a:,} chars, rejected {b:,}")
    stats: dict[str, Any] = {"pairs": len(pairs), "chars": {c: _summary(v) for c, v in chars.items() if v}}
    if tokenizer is not None and pairs:
        window = (max_length, truncation_mode)
        tokens, errors, same, same_cut, cuts = _token_counts(tokenizer, pairs, columns, majority,
                                                             "prompt" in text_columns, window)  # fmt: skip
        for k, row in enumerate(pairs):
            prompt, chosen, rejected = (tokens[c][k] for c in TOKEN_COLUMNS)
            if k in cuts:
                found.add(row, "prompt_not_prefix", cuts[k])
            if k in errors:
                found.add(row, "chat_template_error", errors[k][1], column=errors[k][0])
            elif k in same:
                found.add(row, "identical_tokens", f"the same {chosen:,} tokens")
            elif max_length is None:
                continue
            elif prompt_fills(prompt, max_length, truncation_mode):
                found.add(row, "prompt_fills_max_length", f"prompt {prompt:,} tokens >= max_length {max_length:,}")
            elif k in same_cut:  # (they differ past max_length only: TRL trains on the pair with a zero gradient)
                found.add(row, "identical_tokens", f"the same tokens once cut to max_length {max_length:,}")
            elif prompt + max(chosen, rejected) > max_length:
                longest = prompt + max(chosen, rejected)
                found.add(row, "will_be_truncated", f"{longest:,} tokens > max_length {max_length:,}")
        columns_counted = TOKEN_COLUMNS if "prompt" in text_columns else TOKEN_COLUMNS[1:]
        stats["tokens"] = {
            c: s for c in columns_counted if (s := _summary([n for n in tokens[c] if n is not None]))
        }  # fmt: skip
    if not pairs:
        return stats, None
    longer = sum(a > b for a, b in zip(chars["chosen"], chars["rejected"], strict=True))
    shorter = sum(a < b for a, b in zip(chars["chosen"], chars["rejected"], strict=True))
    bias = {
        "pairs": len(pairs),
        "pairs_differing": longer + shorter,  # equal lengths say nothing about a length preference
        "chosen_longer_fraction": round(longer / (longer + shorter), 4) if longer + shorter else None,
        "mean_chosen_chars": round(float(np.mean(chars["chosen"])), 2),
        "mean_rejected_chars": round(float(np.mean(chars["rejected"])), 2),
    }
    return stats, bias


def _summary(values: list[int]) -> dict[str, Any] | None:
    if not values:
        return None
    array = np.asarray(values)
    counts, edges = np.histogram(array, bins=_HIST_BINS)
    return {
        "min": int(array.min()),
        "mean": round(float(array.mean()), 2),
        "median": float(np.median(array)),
        "max": int(array.max()),
        "histogram": {"bin_edges": [round(float(e), 2) for e in edges], "counts": [int(c) for c in counts]},
    }


def _token_counts(tokenizer, pairs, columns, majority, has_prompt, window):
    """Per column (prompt, chosen, rejected), the token count of each valid pair (None where the chat template
    failed); the failures by index, as (column, the template's error); the indices whose chosen and rejected are
    the same tokens, and those that are only once cut as TRL's collator cuts them (``window``: ``max_length``,
    ``truncation_mode``); the indices whose prompt's tokens are cut (``prompt_cut_why``). Counted ``_CHUNK`` rows
    at a time: the ids of no more are held."""
    counts: dict[str, list] = {c: [] for c in TOKEN_COLUMNS}
    errors: dict[int, tuple[str, str]] = {}
    same: set[int] = set()
    same_cut: set[int] = set()
    cuts: dict[int, str] = {}
    eos = getattr(tokenizer, "eos_token", None)
    for begin in range(0, len(pairs), _CHUNK):
        rows = pairs[begin : begin + _CHUNK]
        if majority == "standard":
            prompts = [columns["prompt"][row] for row in rows] if has_prompt else [""] * len(rows)
            completions = ([columns[c][row] for row in rows] for c in ("chosen", "rejected"))
            encoded = list(zip(*string_ids(prompts, *completions, tokenizer, eos, verbose=False), strict=True))
        else:
            encoded = []
            for k, row in enumerate(rows, start=begin):
                try:
                    encoded.append(conversation_ids(_example(columns, row, has_prompt), tokenizer))
                except TemplateFailure as failure:
                    errors[k] = (failure.column, describe_error(failure.error, 120))
                    encoded.append(None)
        for k, ids in enumerate(encoded, start=begin):
            split = split_pair(*ids) if ids is not None else (None, None, None)
            for column, part in zip(TOKEN_COLUMNS, split, strict=True):
                counts[column].append(None if part is None else len(part))
            if ids is None:
                continue
            if split[1] == split[2]:
                same.add(k)
            elif truncate(split[0], split[1], *window)[0] == truncate(split[0], split[2], *window)[0]:
                same_cut.add(k)
            if len(split[0]) < len(ids[0]):
                cuts[k] = prompt_cut_why(tokenizer, ids[0][len(split[0]) :])
    return counts, errors, same, same_cut, cuts


def _example(columns, row: int, has_prompt: bool) -> dict:
    """The row as ``conversation_ids`` reads it (a missing tools or kwargs value as None)."""
    example = {c: columns[c][row] for c in ("chosen", "rejected", "tools", "chat_template_kwargs")}
    example = {c: None if value is ABSENT else value for c, value in example.items()}
    return {**example, "prompt": columns["prompt"][row] if has_prompt else []}
