"""The policy against its reference, answer by answer: ``fastdpo compare``.

    fastdpo compare --policy DIR --reference DIR [--prompts builtin|quickstart|FILE] [--pairs FILE [--pairs-split S]]
                    [--samples 4] [--max-new-tokens 48] [--beta B] [--out DIR] [--overwrite] [--unquantized]

For every prompt, each model's greedy answer (and ``--samples`` sampled answers of the policy), with:

- per answer, its length in tokens and its implicit reward ``β·(log π(y|x) − log π_ref(y|x))`` (the answer's
  log-probability under the policy minus under the reference, EOS included when the answer ended);
- a KL estimate of KL(π ‖ π_ref) per prompt, averaged over prompts: the mean over the policy's own samples ``y`` of
  ``Σ_t KL(π(·|x, y<t) ‖ π_ref(·|x, y<t))``, each next-token distribution's KL computed exactly over the
  vocabulary. Unbiased, as the mean of ``log π(y|x) − log π_ref(y|x)`` is, but never negative, and at each step
  it averages over every token the policy could have picked, not only the one it sampled: less spread over seeds
  (``python -m bench.kl_estimate_cpu``: 2.3x for a policy near its reference, 1.5x for the short quickstart's
  policy; what is left comes from which answers are sampled);
- with a checker (``--prompts quickstart``: the held-out problems of the seed the run recorded in its
  ``report.json``, else of ``--seed``), each greedy answer's correctness and the policy's win / tie / loss rate;
- with ``--pairs FILE`` (held-out preference pairs in any format the trainers take: standard or conversational,
  any data file the trainers read, tokenized as they tokenize them, the pairs they drop dropped and counted), reward
  accuracy and margin and both models' mean log-probability of the chosen answers: lower under the policy while
  accuracy is high is likelihood displacement, flagged in the report.

A ``FILE`` of prompts: .txt (one a line), .jsonl (``{"prompt": ...}`` or a prompt a line) or .json (an array of
them; an object's ``system``/``input``/``context`` joined in as the trainers join them); a prompt is text, messages
(rendered as the trainers render them) or token ids. The command line (``fastdpo.compare_cli``) reads what the
policy's run recorded. ``builtin`` prompts are edge cases: empty,
one character, near the model's context length, Chinese and mixed script, emoji, code, a prompt-injection attempt,
a repeated token, a multi-turn conversation (rendered with the tokenizer's chat template when it has one). A prompt
too long for the context keeps its last tokens, and the report says so. A QLoRA run's folder
(``load_in_4bit``/``load_in_8bit`` in its ``config.yaml``) loads its base, and the reference, quantized as the run
loaded its base: the reference it trained against; ``--beta`` defaults to the β a run's ``config.yaml`` recorded
(else 0.1). Output in ``--out``: ``compare.json``, ``compare.md`` and ``compare.html`` (one
self-contained page, its plots inline). Answers end at the tokenizer's EOS or any of the generation config's; the
models run on the GPU where there is one; a folder saved without its tokenizer uses its adapter's base's or the
reference's, said so.
"""

from __future__ import annotations

import argparse
import base64
import functools
import html
import inspect
import io
import json
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fastdpo.atomic import pyplot_or_none
from fastdpo.data.schema import content_text
from fastdpo.errors import ConfigError, DataError


@dataclass
class Answer:
    text: str
    tokens: int
    reward: float  # β·(log π − log π_ref) of this answer
    correct: bool | None = None
    kl: float = 0.0  # Σ over its tokens of KL(π(·|x, y<t) ‖ π_ref(·|x, y<t)): the next-token distributions along it


@dataclass
class Row:
    name: str
    prompt: str
    prompt_tokens: int
    truncated: bool
    policy: Answer
    reference: Answer
    samples: list[Answer] = field(default_factory=list)
    kl_estimate: float | None = None


# ----------------------------------------------------------------------------------------------------- scoring


def model_context(policy, reference) -> int:
    """The positions both models have (``max_position_embeddings``; 2048 where neither says): a reference of a
    shorter context than the policy's took the policy's, and an embedding lookup failed deep inside."""
    sizes = [getattr(getattr(m, "config", None), "max_position_embeddings", None) for m in (policy, reference)]
    return min([s for s in sizes if isinstance(s, int)] or [2048])


def _vocabulary(policy, reference) -> int:
    # (the sweep's reference of a LoRA policy is a view of it, with no embedding of its own: the policy's)
    models = [m for m in (policy, reference) if hasattr(m, "get_input_embeddings")]
    return min(m.get_input_embeddings().num_embeddings for m in models)


def _checked_prompt_ids(tokenizer, name: str, prompt, limit: int, vocab: int) -> tuple[list[int], bool]:
    """``_prompt_ids``, a ``DataError`` naming the prompt for a chat template that refuses it or a token id the
    models have no embedding for (a token added to the tokenizer, the models never resized)."""
    from fastdpo.data.render import describe_error

    try:
        ids, truncated = _prompt_ids(tokenizer, prompt, limit)
    except Exception as error:  # (jinja's TemplateError, or a Python error inside the template)
        if not isinstance(prompt, list) or not tokenizer.chat_template:
            raise
        raise DataError(f"{name}: the chat template refused it ({describe_error(error)})", column="prompt",
                        fix="fix or remove that prompt, or use a template that renders it") from None  # fmt: skip
    if ids and max(ids) >= vocab:
        raise DataError(f"{name}: token id {max(ids)} has no embedding in the models ({vocab} ids)", column="prompt",
                        fix="resize the models' embeddings to the tokenizer (resize_token_embeddings), or leave "
                        "that token out")  # fmt: skip
    return ids, truncated


def _prompt_ids(tokenizer, prompt, limit: int) -> tuple[list[int], bool]:
    if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt) and prompt:  # token ids already
        return (prompt[-limit:], True) if len(prompt) > limit else (prompt, False)
    if isinstance(prompt, list) and tokenizer.chat_template:  # as the trainers: the template's own special tokens only
        ids = tokenizer.apply_chat_template(prompt, tokenize=True, return_dict=True, add_generation_prompt=True)
        ids = list(ids["input_ids"])
    elif isinstance(prompt, list):  # (a content of text parts: their text)
        texts = [content_text(message.get("content")) for message in prompt]
        if None in texts:
            raise DataError(f"message {texts.index(None)}'s content is no text (a string or text parts)",
                            column="prompt", fix="give it text, or leave that prompt out")  # fmt: skip
        text = "\n".join(f"{message['role']}: {said}" for message, said in zip(prompt, texts, strict=True))
        ids = tokenizer(text + "\nassistant: ")["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:  # an empty prompt with a tokenizer that adds no BOS: start from BOS (or EOS)
        start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        ids = [start]
    truncated = len(ids) > limit
    return (ids[-limit:] if truncated else ids), truncated


def _stop_ids(tokenizer, *models) -> set[int]:
    """The tokenizer's EOS and every EOS id of the models' generation configs (an int or a list: ChatML's
    ``<|im_end|>``, Llama 3's ``<|eot_id|>``)."""
    ids = {tokenizer.eos_token_id}
    for model in models:
        config = getattr(model, "generation_config", None) or getattr(model, "config", None)
        eos = getattr(config, "eos_token_id", None)
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    return {i for i in ids if isinstance(i, int)}


@functools.cache
def _keeps_logits(cls: type) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False


def _last_logits(model, ids: torch.Tensor, keep: int, **kwargs):
    """``model``'s output with ``.logits`` of the last ``keep`` positions only (batch, keep, vocab): the LM head
    runs on those alone where the forward takes transformers' ``logits_to_keep``, else all are computed and cut."""
    if _keeps_logits(type(model)):
        kwargs["logits_to_keep"] = keep
    output = model(input_ids=ids, **kwargs)
    output.logits = output.logits[:, -keep:]
    return output


@torch.no_grad()
def _generate(
    model, ids: list[int], *, max_new_tokens: int, eos: int | set[int], sample: bool, generator=None
) -> list[int]:
    """Up to ``max_new_tokens`` after ``ids``, greedy or sampled (on the CPU generator), ending at ``eos`` (an id
    or a set of them), with the model's KV cache where it returns one (each step then runs the new token only),
    else the whole sequence again at every step."""
    device = next(model.parameters()).device
    stops = {eos} if isinstance(eos, int) else set(eos)
    out: list[int] = []
    cache = None  # (keyword, cache): "cache" in transformers ≥ 5.x's renaming, "past_key_values" before it
    for _ in range(max_new_tokens):
        if cache is None:
            output = _last_logits(model, torch.tensor([ids + out], device=device), 1, use_cache=not out)
            if not out:
                cache = next(((name, getattr(output, name)) for name in ("cache", "past_key_values")
                              if getattr(output, name, None) is not None), None)  # fmt: skip
        else:
            output = model(input_ids=torch.tensor([out[-1:]], device=device), use_cache=True, **{cache[0]: cache[1]})
            cache = (cache[0], getattr(output, cache[0]))  # the same object, or a new one (a legacy tuple cache)
        logits = output.logits[0, -1].float()
        if sample:
            token = int(torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator))
        else:
            token = int(logits.argmax())
        out.append(token)
        if token in stops:
            break
    return out


@torch.no_grad()
def _answer_log_probs(model, ids: torch.Tensor, start: int) -> torch.Tensor:
    """(batch, length − start, vocab) log-probabilities of the tokens ``ids[:, start:]`` (fp32 at least): the LM head
    applied to their positions only."""
    logits = _last_logits(model, ids, ids.shape[1] - start + 1).logits[:, :-1]
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).log_softmax(-1)  # half → fp32; fp64 stays


@torch.no_grad()
def _scores(policy, reference, prompt_ids: list[int], answer_ids: list[int]) -> tuple[float, float]:
    """``(log π(y|x) − log π_ref(y|x), Σ_t KL(π(·|x, y<t) ‖ π_ref(·|x, y<t)))`` for the answer ``y``, over its
    tokens with a token before them (as ``_logps``): one forward pass of each model."""
    start, ids = max(1, len(prompt_ids)), prompt_ids + answer_ids
    if len(ids) <= start:
        return 0.0, 0.0
    log_probs = [_answer_log_probs(m, torch.tensor([ids], device=next(m.parameters()).device), start)[0].cpu()
                 for m in (policy, reference)]  # fmt: skip
    ours, theirs = log_probs[0], log_probs[1].to(log_probs[0].dtype)
    target = torch.tensor(ids[start:])[:, None]
    ratio = float(ours.gather(-1, target).sum() - theirs.gather(-1, target).sum())
    # each position's KL is ≥ 0; rounding makes one of two near-equal distributions a few ulps negative: 0 there
    return ratio, float((ours.exp() * (ours - theirs)).sum(-1).clamp_min(0).sum())


SCORE_BYTES = 1 << 28  # the fp32 log-probs of one scoring batch at most (256 MiB), whatever the pairs' number
SCORE_TOKENS = 1 << 14  # and its tokens through the model (long prompts of one-token answers: few log-probs)


@torch.no_grad()
def _logps(model, items: list[tuple[list[int], list[int]]], vocab: int) -> list[float]:
    """Σ log π(answer | prompt) for each ``(prompt_ids, answer_ids)``, over the answer tokens that have a token
    before them (with an empty prompt the first answer token is context only, as in training); items whose prompts
    and answers have the same lengths run as batches, with no padding (a row attends to its own tokens only), of
    ``SCORE_BYTES`` of log-probs and ``SCORE_TOKENS`` tokens at most (one batch of 400 short pairs of a 128k
    vocabulary took tens of GB; ``vocab``: ``_vocabulary``'s)."""
    device = next(model.parameters()).device
    sums = [0.0] * len(items)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, (prompt, answer) in enumerate(items):
        if len(prompt) + len(answer) > max(1, len(prompt)):  # an answer with no scored token scores 0
            groups.setdefault((len(prompt), len(answer)), []).append(i)
    for (prompt_length, answer_length), group in groups.items():
        start = max(1, prompt_length)  # the first scored position
        length = prompt_length + answer_length
        rows_per_batch = max(1, min(SCORE_BYTES // (4 * (length - start) * vocab), SCORE_TOKENS // length))
        for first in range(0, len(group), rows_per_batch):
            rows = group[first : first + rows_per_batch]
            ids = torch.tensor([items[i][0] + items[i][1] for i in rows], device=device)
            scores = _answer_log_probs(model, ids, start).gather(-1, ids[:, start:, None]).sum((1, 2))
            for i, score in zip(rows, scores.tolist(), strict=True):
                sums[i] = score
    return sums


def _answer(policy, reference, tokenizer, prompt_ids, answer_ids, beta, checker=None, stops=()) -> Answer:
    ratio, kl = _scores(policy, reference, prompt_ids, answer_ids)
    text = tokenizer.decode([t for t in answer_ids if t != tokenizer.eos_token_id and t not in stops])
    return Answer(text=text, tokens=len(answer_ids), reward=beta * ratio, correct=None if checker is None else
                  checker(text), kl=kl)  # fmt: skip


def compare(policy, reference, tokenizer, prompts: list[tuple[str, object]], *, beta: float = 0.1, samples: int = 0,
            max_new_tokens: int = 48, checkers: list | None = None, seed: int = 0) -> list[Row]:  # fmt: skip
    """One ``Row`` per ``(name, prompt)``; ``checkers[i]`` (or None) judges an answer to prompt ``i``."""
    _check_compare_args(prompts, samples, max_new_tokens)
    policy.eval()
    reference.eval()
    context, vocab = model_context(policy, reference), _vocabulary(policy, reference)
    if max_new_tokens > max(1, context // 4):  # a small model's context keeps room for the prompt
        print(f"max_new_tokens {max_new_tokens} capped to {max(1, context // 4)}: a quarter of the models' context "
              f"({context} tokens), the rest left to the prompt")  # fmt: skip
        max_new_tokens = max(1, context // 4)
    limit = max(1, context - max_new_tokens - 1)
    eos = _stop_ids(tokenizer, policy, reference)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    # every prompt's ids before any answer is generated: a prompt that cannot be taken is named first
    tokenized = [_checked_prompt_ids(tokenizer, name, prompt, limit, vocab) for name, prompt in prompts]
    for i, ((name, prompt), (ids, truncated)) in enumerate(zip(prompts, tokenized, strict=True)):
        checker = checkers[i] if checkers else None
        policy_ids = _generate(policy, ids, max_new_tokens=max_new_tokens, eos=eos, sample=False)
        reference_ids = _generate(reference, ids, max_new_tokens=max_new_tokens, eos=eos, sample=False)
        row = Row(name=name, prompt=prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False),
                  prompt_tokens=len(ids), truncated=truncated,
                  policy=_answer(policy, reference, tokenizer, ids, policy_ids, beta, checker, eos),
                  reference=_answer(policy, reference, tokenizer, ids, reference_ids, beta, checker, eos))  # fmt: skip
        for _ in range(samples):
            sampled = _generate(policy, ids, max_new_tokens=max_new_tokens, eos=eos, sample=True, generator=generator)
            row.samples.append(_answer(policy, reference, tokenizer, ids, sampled, beta, checker, eos))
        if row.samples:  # the exact KL of each next-token distribution, summed along the policy's own samples
            row.kl_estimate = sum(a.kl for a in row.samples) / len(row.samples)
        rows.append(row)
    return rows


def _check_compare_args(prompts, samples: int, max_new_tokens: int) -> None:
    """``compare``'s arguments as ``fastdpo compare`` checks its flags (an empty list divided by zero in the summary;
    no token to generate reported a KL of 0)."""
    if not prompts:
        raise ConfigError("no prompt to compare on", column="prompts", fix="pass a list of (name, prompt) pairs")
    bad = next((i for i, item in enumerate(prompts) if not (isinstance(item, tuple | list) and len(item) == 2)), None)
    if bad is not None:
        raise ConfigError(f"item {bad} is {type(prompts[bad]).__name__} {str(prompts[bad])[:40]!r}, not a (name, "
                          "prompt) pair", column="prompts", fix="pass [(name, prompt), ...], e.g. "
                          "list(enumerate(prompts)) with str names")  # fmt: skip
    for name, value, least in (("samples", samples, 0), ("max_new_tokens", max_new_tokens, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"must be a whole number of at least {least}, got {value!r}", column=name)


@torch.no_grad()
def pair_metrics(policy, reference, tokenizer, pairs, *, beta: float = 0.1, data_filter: str = "drop",
                 max_length: int | None = None, truncation_mode: str = "keep_start",
                 displacement_margin: float | None = 0.1) -> dict:  # fmt: skip
    """Reward accuracy and margin on held-out preference pairs, both models' mean chosen log-probability, and
    whether it fell under the policy while accuracy is high (likelihood displacement).

    ``pairs`` takes what the trainers take (a ``datasets.Dataset``, a list of row dicts or a file; standard strings
    or conversational message lists, system and input columns), prepared and tokenized as they do it
    (``prepare_preferences``, ``tokenize_preferences``: a conversation through the tokenizer's chat template, EOS
    after a string completion). Each sequence is scored cut as the trainers cut it: to ``max_length`` (the run's:
    its held-out evaluation's numbers) under ``truncation_mode``, and never past the policy's context length
    (``max_position_embeddings``; ``max_length`` None: whole up to it, the end cut beyond). The pairs the trainers
    drop are dropped: with ``data_filter="drop"`` (their default) those of the quality check's "drop" reasons
    (identical, empty, duplicate, ...), and those whose prompt fills the length (keep_start); counted by reason in
    ``dropped``, in all in ``dropped_pairs``. Likelihood displacement: the chosen answers' mean log-probability
    fallen under the policy by more than ``max(1, displacement_margin × |the reference's|)`` nats while accuracy is
    above 0.5 (the trainers' ``displacement_margin``; None: not flagged). The sums are plain: an ``ld_alpha`` run's
    evaluation weighs the tokens past the shorter answer's length, and its margins differ from these."""
    from fastdpo.data import check_preferences, prepare_preferences, tokenize_preferences
    from fastdpo.data.refused import prepare_dropping
    from fastdpo.data.tokenize import truncate
    from fastdpo.data.vocabulary import check_token_ids

    if data_filter not in ("drop", "none"):
        raise ConfigError(f"must be 'drop' or 'none', got {data_filter!r}", column="data_filter")
    context = model_context(policy, reference)
    length = context if max_length is None else min(max_length, context)
    if data_filter == "drop":  # (rows preparation refuses for a drop reason, empty answers: dropped too)
        prepared, refused, _ = prepare_dropping(pairs)
        kept, dropped = check_preferences(prepared).filter(prepared)
        dropped = dict(Counter(refused) + Counter(dropped))
    else:
        kept, dropped = prepare_preferences(pairs), {}
    if len(kept) == 0:
        raise DataError(f"every pair has a problem the trainers drop it for ({dropped})", column="pairs",
                        fix="run 'fastdpo data check' on the file to list them")  # fmt: skip
    tokenized = tokenize_preferences(kept, tokenizer, max_length=length, truncation_mode=truncation_mode)
    rows, dropped = tokenized.dataset, {**dropped, **tokenized.dropped}
    for model in (policy, reference):  # (an IndexError deep in the embedding before)
        check_token_ids(rows, model, "pairs")
    if len(rows) == 0:
        raise DataError(f"every pair's prompt fills {'the context' if length == context else 'max_length'} "
                        f"({length} tokens)", column="prompt", fix="pass pairs with shorter prompts")  # fmt: skip

    def answers(side: str) -> list[tuple[list[int], list[int]]]:
        # (prompt, answer) as truncation leaves them: keep_start cuts the answer's end (the prompts kept are
        # shorter), keep_end the sequence's start; the scored tokens are the answer's that remain
        sides = zip(rows["prompt_ids"], rows[f"{side}_ids"], strict=True)
        cut = [truncate(prompt, answer, length, truncation_mode) for prompt, answer in sides]
        return [(ids[: mask.count(0)], ids[mask.count(0) :]) for ids, mask in cut]  # (the mask: 0s, then 1s)

    chosen, rejected = answers("chosen"), answers("rejected")
    vocab = _vocabulary(policy, reference)
    chosen_policy, chosen_reference = _logps(policy, chosen, vocab), _logps(reference, chosen, vocab)
    rejected_policy, rejected_reference = _logps(policy, rejected, vocab), _logps(reference, rejected, vocab)
    chosen_gap = [p - r for p, r in zip(chosen_policy, chosen_reference, strict=True)]
    rejected_gap = [p - r for p, r in zip(rejected_policy, rejected_reference, strict=True)]
    margins = [beta * (c - r) for c, r in zip(chosen_gap, rejected_gap, strict=True)]
    n = len(rows)
    chosen_policy_mean, chosen_reference_mean = sum(chosen_policy) / n, sum(chosen_reference) / n
    result = {"pairs": n, "reward_accuracy": sum(m > 0 for m in margins) / n, "reward_margin": sum(margins) / n,
              "logps_chosen_policy": chosen_policy_mean, "logps_chosen_reference": chosen_reference_mean,
              "dropped_pairs": sum(dropped.values()), "dropped": dropped,
              "length": {"tokens": length, "of": "the context" if length == context else "max_length"}}  # fmt: skip
    fallen = chosen_reference_mean - chosen_policy_mean
    result["displacement"] = (displacement_margin is not None and result["reward_accuracy"] > 0.5
                              and fallen > max(1.0, displacement_margin * abs(chosen_reference_mean)))  # fmt: skip
    return result


# ------------------------------------------------------------------------------------------------------ report


def summary(rows: list[Row]) -> dict:
    out = {"prompts": len(rows), "truncated": sum(r.truncated for r in rows),
           "mean_reward_policy": sum(r.policy.reward for r in rows) / len(rows),
           "mean_reward_reference": sum(r.reference.reward for r in rows) / len(rows),
           "mean_tokens_policy": sum(r.policy.tokens for r in rows) / len(rows),
           "mean_tokens_reference": sum(r.reference.tokens for r in rows) / len(rows)}  # fmt: skip
    kls = [r.kl_estimate for r in rows if r.kl_estimate is not None]
    out["kl_estimate"] = sum(kls) / len(kls) if kls else None
    judged = [r for r in rows if r.policy.correct is not None]
    if judged:
        wins = sum(r.policy.correct and not r.reference.correct for r in judged)
        losses = sum(r.reference.correct and not r.policy.correct for r in judged)
        out.update(checker_policy=sum(r.policy.correct for r in judged) / len(judged),
                   checker_reference=sum(r.reference.correct for r in judged) / len(judged),
                   win_rate=wins / len(judged), loss_rate=losses / len(judged),
                   tie_rate=(len(judged) - wins - losses) / len(judged))  # fmt: skip
    return out


_BREAKS = str.maketrans(dict.fromkeys("\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029", "⏎"))


def _cell(text: str, width: int = 60) -> str:
    """One markdown table cell: every line break (``\\r``, ``\\u2028``, ... too) as ⏎, cut to ``width``, then the
    HTML in it escaped (model output may hold tags) and ``|`` too (it would end the cell)."""
    text = text.replace("\r\n", "\n").translate(_BREAKS)
    text = text if len(text) <= width else text[: width - 1] + "…"
    return html.escape(text, quote=False).replace("|", "\\|")


def markdown(rows: list[Row], stats: dict, pairs: dict | None, beta: float) -> str:
    lines = ["# fastdpo compare: policy against reference", ""]
    lines.append(f"{stats['prompts']} prompts ({stats['truncated']} cut to the context, keeping their last tokens); "
                 f"implicit reward β·(log π − log π_ref) with β = {beta}.")  # fmt: skip
    lines.append("")
    lines.append(f"- mean reward of the greedy answers: policy {stats['mean_reward_policy']:.3f}, reference "
                 f"{stats['mean_reward_reference']:.3f}; mean length {stats['mean_tokens_policy']:.1f} and "
                 f"{stats['mean_tokens_reference']:.1f} tokens")  # fmt: skip
    if stats["kl_estimate"] is not None:
        lines.append(f"- KL estimate (mean over the policy's samples of Σ_t KL of the next-token distributions): "
                     f"{stats['kl_estimate']:.3f}")  # fmt: skip
    if "win_rate" in stats:
        lines.append(f"- checker: policy {stats['checker_policy']:.1%} correct, reference "
                     f"{stats['checker_reference']:.1%}; policy wins {stats['win_rate']:.1%}, ties "
                     f"{stats['tie_rate']:.1%}, loses {stats['loss_rate']:.1%}")  # fmt: skip
    if pairs:
        lines.append(f"- {pairs['pairs']} held-out pairs: reward accuracy {pairs['reward_accuracy']:.1%}, margin "
                     f"{pairs['reward_margin']:.3f}; chosen log-prob policy {pairs['logps_chosen_policy']:.2f}, "
                     f"reference {pairs['logps_chosen_reference']:.2f}")  # fmt: skip
        if pairs.get("dropped_pairs"):
            from fastdpo.data.quality import REASONS

            cut = pairs.get("length", {"of": "the context"})  # (a report written before: no length)
            fills = f"prompt fills {cut['of']}" + (f" ({cut['tokens']} tokens)" if "tokens" in cut else "")
            why = {**{r: d for r, (_, d) in REASONS.items()}, "prompt_fills_max_length": fills}
            reasons = ", ".join(f"{n} {r} ({why.get(r, r)})" for r, n in pairs.get("dropped", {}).items())
            lines.append(f"- {pairs['dropped_pairs']} more pairs dropped, as the trainers drop them: {reasons}")
        if pairs["displacement"]:
            lines.append("- **likelihood displacement**: the policy finds the chosen answers less likely than the "
                         "reference does, although it ranks them above the rejected ones. Add an SFT term "
                         "(loss_type=['sigmoid', 'sft']) or lower the learning rate.")  # fmt: skip
    lines += ["", "| prompt | policy answer | reward | tokens | reference answer | reward | tokens |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        mark = {True: " ✓", False: " ✗", None: ""}
        lines.append(f"| {_cell(_label(r), 40)}{' (cut)' if r.truncated else ''} | "
                     f"{_cell(r.policy.text)}{mark[r.policy.correct]} | {r.policy.reward:.3f} | {r.policy.tokens} | "
                     f"{_cell(r.reference.text)}{mark[r.reference.correct]} | {r.reference.reward:.3f} | "
                     f"{r.reference.tokens} |")  # fmt: skip
    return "\n".join(lines) + "\n"


def _label(row: Row) -> str:
    """``name: prompt``, or the prompt alone where it starts with its name (the quickstart's ``prev: 51``)."""
    return row.prompt if row.prompt.startswith(row.name) else f"{row.name}: {row.prompt}"


def _plot(rows: list[Row]) -> str:
    """A PNG (base64) of both models' greedy-answer rewards and lengths, or '' without matplotlib."""
    plt = pyplot_or_none("compare's chart")
    if plt is None:
        return ""
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].hist([[r.policy.reward for r in rows], [r.reference.reward for r in rows]], label=["policy", "reference"])
    axes[0].set_title("implicit reward of the greedy answers")
    axes[0].legend()
    axes[1].scatter([r.reference.tokens for r in rows], [r.policy.tokens for r in rows], s=10)
    axes[1].set_xlabel("reference answer tokens")
    axes[1].set_ylabel("policy answer tokens")
    axes[1].set_title("answer lengths")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def html_page(rows: list[Row], stats: dict, pairs: dict | None, beta: float) -> str:
    esc = html.escape
    md = markdown(rows, stats, pairs, beta).splitlines()
    bullets = "".join(f"<li>{esc(line[2:]).replace('**', '')}</li>" for line in md if line.startswith("- "))
    image = _plot(rows)
    body = [f"<h1>fastdpo compare: policy against reference</h1><p>{esc(md[2])}</p><ul>{bullets}</ul>"]
    if image:
        body.append(f'<img alt="rewards and lengths" src="data:image/png;base64,{image}">')
    body.append("<table><thead><tr><th>prompt</th><th>policy answer</th><th>reward</th><th>tokens</th>"
                "<th>reference answer</th><th>reward</th><th>tokens</th></tr></thead><tbody>")  # fmt: skip
    for r in rows:
        prompt = _label(r) + (" (cut)" if r.truncated else "")
        cells = [prompt, r.policy.text, f"{r.policy.reward:.3f}", str(r.policy.tokens), r.reference.text,
                 f"{r.reference.reward:.3f}", str(r.reference.tokens)]  # fmt: skip
        body.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    body.append("</tbody></table>")
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px;vertical-align:top;white-space:pre-wrap}")  # fmt: skip
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>fastdpo compare</title>'
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")  # fmt: skip


# --------------------------------------------------------------------------------------------------------- CLI


def write_report(out: Path, rows: list[Row], pairs: dict | None, beta: float, settings: dict | None = None) -> str:
    """``compare.{json,md,html}`` in ``out``; returns the markdown. ``settings``: what the numbers were computed
    with, kept in the JSON beside β (samples, seed, sources, ...)."""
    from fastdpo.atomic import atomic_write

    stats = summary(rows)
    out.mkdir(parents=True, exist_ok=True)
    report = {"settings": {"beta": beta, **(settings or {})}, "summary": stats, "pairs": pairs,
              "rows": [asdict(r) for r in rows]}  # fmt: skip
    atomic_write(out / "compare.json", json.dumps(report, indent=1, ensure_ascii=False, default=str))
    text = markdown(rows, stats, pairs, beta)
    atomic_write(out / "compare.md", text)
    atomic_write(out / "compare.html", html_page(rows, stats, pairs, beta))
    return text


SEEDS = (0, 2**32 - 1)  # what numpy's seeding takes (transformers' set_seed seeds it too)


def check_counts(args: argparse.Namespace, at_least: dict[str, int], at_most: dict[str, int] | None = None) -> None:
    """A ``ConfigError`` naming the first option of ``at_least`` set below its least value (or not a number: NaN), or
    of ``at_most`` above its most (None: unset, fine)."""
    for name, least in at_least.items():
        value, most = getattr(args, name), (at_most or {}).get(name, math.inf)
        if value is not None and not least <= value <= most:
            bound = f"between {least} and {most}" if most < math.inf else f"at least {least}"
            raise ConfigError(f"must be {bound}, got {value}", column="--" + name.replace("_", "-"))
