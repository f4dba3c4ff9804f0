"""A preference row's token ids as TRL 1.16's DPO trainer builds them, shared by tokenization
(``fastdpo.data.tokenize``) and the quality report's token checks, so that both count the same tokens.

- strings: ``tokenizer(prompt)``, ``tokenizer(prompt + chosen)``, ``tokenizer(prompt + rejected)``, the EOS string
  appended to a completion that does not end with it;
- conversations: ``apply_chat_template(prompt, add_generation_prompt=True)``, then prompt + chosen and prompt +
  rejected, with the row's ``tools`` (a list or a JSON string) and ``chat_template_kwargs``;
- the completion starts where the prompt's ids and both prompt+completion ids stop agreeing (``split_pair``).
"""

from __future__ import annotations

import json
import logging

from fastdpo.data.schema import without_null_arguments
from fastdpo.errors import unknown_choice

logger = logging.getLogger(__name__)
TRUNCATION_MODES = ("keep_start", "keep_end")
PROMPT_CUT = "_prompt_cut"  # the tokenizers' flag column: the prompt's ids past where prompt + completion part


class TemplateFailure(Exception):
    """The chat template raised on one of a row's three conversations: ``column`` (prompt, chosen or rejected)
    names the one, ``error`` is what the template raised (or ``tools``, ``chat_template_kwargs``: a tools string
    that is not JSON, kwargs that are not a mapping)."""

    def __init__(self, column: str, error: Exception) -> None:
        super().__init__(column, error)
        self.column, self.error = column, error


def describe_error(error: Exception, limit: int = 200) -> str:
    """A chat template's error in a line: its type where it is not jinja's own (a TypeError inside the template)."""
    text = str(error)[:limit]
    return text if type(error).__name__ == "TemplateError" else f"{type(error).__name__}: {text}"


def conversation_ids(example: dict, tokenizer) -> tuple[list[int], list[int], list[int]]:
    """(prompt, prompt + chosen, prompt + rejected) ids of a conversational row; ``TemplateFailure`` naming the
    conversation the template raised on. An empty prompt (the quality report's rows without a prompt column) gives
    no prompt ids: the completions are then rendered alone."""
    tools = example.get("tools")
    try:
        tools = json.loads(tools) if isinstance(tools, str) else tools
    except ValueError as error:
        raise TemplateFailure("tools", error) from error
    try:
        kwargs = {"tools": tools, **(example.get("chat_template_kwargs") or {})}
    except TypeError as error:  # (not a mapping)
        raise TemplateFailure("chat_template_kwargs", error) from error
    prompt = example["prompt"]
    conversations = (("prompt", prompt, True), ("chosen", prompt + example["chosen"], False),
                     ("rejected", prompt + example["rejected"], False))  # fmt: skip
    ids = []
    for column, messages, generation in conversations:
        if column == "prompt" and not messages:
            ids.append([])
            continue
        try:  # a user's template raises what it likes: jinja's TemplateError, a TypeError from `str + None`, ...
            encoded = tokenizer.apply_chat_template(
                without_null_arguments(messages), tokenize=True, return_dict=True,
                add_generation_prompt=generation, **kwargs,
            )  # fmt: skip
        except Exception as error:
            raise TemplateFailure(column, error) from error
        ids.append(encoded["input_ids"])
    return ids[0], ids[1], ids[2]


def string_ids(
    prompts: list[str],
    chosen: list[str],
    rejected: list[str],
    tokenizer,
    eos_token: str | None,
    *,
    verbose: bool = True,
):
    """(prompt, prompt + chosen, prompt + rejected) ids of string rows, one tokenizer call per column; ``verbose``:
    the tokenizer's "longer than model_max_length" warning (not where lengths are what is being measured)."""
    if eos_token is not None:
        chosen = [c if c.endswith(eos_token) else c + eos_token for c in chosen]
        rejected = [r if r.endswith(eos_token) else r + eos_token for r in rejected]
    return (
        tokenizer(prompts, verbose=verbose)["input_ids"],
        tokenizer([p + c for p, c in zip(prompts, chosen, strict=True)], verbose=verbose)["input_ids"],
        tokenizer([p + r for p, r in zip(prompts, rejected, strict=True)], verbose=verbose)["input_ids"],
    )


def common_prefix_length(ids: list[int], other: list[int]) -> int:
    n = 0
    for a, b in zip(ids, other):  # noqa: B905 - stops at the shorter one on purpose
        if a != b:
            break
        n += 1
    return n


def prompt_cut_why(tokenizer, cut: list[int]) -> str:
    """What a prompt whose tokens are not the start of prompt + completion's leaves out (``cut``: its ids past where
    they part): the training sequence's context differs there from the one the prompt alone gives at inference."""
    return (f"the prompt's end {tokenizer.decode(cut)!r} is not where the prompt + completion tokens have it (a chat "
            "template that renders the prompt alone otherwise, or tokens merging across the boundary): the "
            "completion starts where they part")  # fmt: skip


def warn_prompt_cuts(cuts: list[list[int]], tokenizer, what: str) -> None:
    """One counted warning for the rows whose ``cuts`` (``PROMPT_CUT``) are not empty (TRL warns once, of one)."""
    rows = [row for row, cut in enumerate(cuts) if cut]
    if rows:
        more = ", ".join(map(str, rows[:10])) + (f" and {len(rows) - 10} more" if len(rows) > 10 else "")
        logger.warning("%d of %d %s rows: %s, e.g. row %d; rows %s. Trained on as TRL trains on them; end the prompts "
                       "on a token boundary, or use a template that renders the prompt alike alone and with its answer",
                       len(rows), len(cuts), what, prompt_cut_why(tokenizer, cuts[rows[0]]), rows[0], more)  # fmt: skip


def split_pair(prompt: list[int], chosen: list[int], rejected: list[int]) -> tuple[list[int], list[int], list[int]]:
    """``prompt_ids``, ``chosen_ids``, ``rejected_ids``: the completions start where the prompt's ids and both
    prompt+completion ids stop agreeing."""
    start = min(common_prefix_length(prompt, chosen), common_prefix_length(prompt, rejected))
    return prompt[:start], chosen[start:], rejected[start:]


def prompt_fills(prompt_length: int, max_length: int | None, truncation_mode: str) -> bool:
    """Whether a prompt of ``prompt_length`` tokens leaves nothing to learn: it fills ``max_length`` under
    ``keep_start`` (TRL drops such rows)."""
    return max_length is not None and truncation_mode == "keep_start" and prompt_length >= max_length


def truncate(
    prompt_ids: list[int], completion_ids: list[int], max_length: int | None, truncation_mode: str = "keep_start"
) -> tuple[list[int], list[int]]:
    """(input_ids, completion_mask) of one sequence, as TRL's ``DataCollatorForPreference`` builds it."""
    ids = list(prompt_ids) + list(completion_ids)
    mask = [0] * len(prompt_ids) + [1] * len(completion_ids)
    if max_length is None:
        return ids, mask
    if truncation_mode == "keep_start":
        return ids[:max_length], mask[:max_length]
    if truncation_mode == "keep_end":
        return ids[-max_length:], mask[-max_length:]
    raise unknown_choice("truncation_mode", truncation_mode, TRUNCATION_MODES)
