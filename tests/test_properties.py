"""Property tests: arbitrary rows through formats, checks, tokenization and packing end in our errors
(``DataError``/``ConfigError``) or in output whose invariants hold — every row accounted for, every token in place.

Rows reach the data layer as users bring them: a JSON Lines file the test writes (Arrow accepts mixed types there,
as ``Json`` columns), or a list of dicts for ``check_preferences``, which takes any Python value.
"""

from __future__ import annotations

import itertools
import json
import math
import uuid

import datasets
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from tiny_tokenizer import build_tiny_tokenizer

from fastdpo.data import (
    bfd_bins_fifo,
    check_preferences,
    cpp_available,
    pack,
    pack_pairs,
    pack_sft,
    pack_sft_dataset,
    prepare_preferences,
    prepare_sft,
    tokenize_preferences,
    tokenize_sft,
    truncate,
)
from fastdpo.data.packing import IGNORE_INDEX
from fastdpo.data.quality import REASONS
from fastdpo.errors import ConfigError, DataError
from fastdpo.train.dpo import REFERENCE_COLUMNS, PairPacker, _as_batch

OURS = (DataError, ConfigError)
BACKENDS = ["python", "cpp"] if cpp_available() else ["python"]
MAX_LENGTH = 48  # small enough that long rows are truncated or dropped, large enough for most to fit
GOOD = {"prompt": "a", "chosen": "b", "rejected": "c"}
datasets.disable_progress_bars()


def examples(n: int) -> settings:
    """Derandomized, no database: every run (and CI) tries the same n inputs."""
    slow = [HealthCheck.too_slow, HealthCheck.data_too_large]  # rows go through Arrow and Dataset.map
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, suppress_health_check=slow)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Where rows are written; ``datasets`` caches the loaded files and mapped results there, not in ~/.cache."""
    path = tmp_path_factory.mktemp("rows")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", str(path / "cache"))
        yield path


def write_jsonl(rows: list[dict], folder) -> str:
    path = folder / f"{uuid.uuid4().hex}.jsonl"  # a new name each time: datasets' cache must never match
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")  # NaN/Infinity as Python writes
    return str(path)


# ------------------------------------------------------------------------------------------------------ values

ODD_TEXT = ("", " ", "\n", " \t\n ", "<|eos|>", "<|im_start|>", "<|im_end|>", "{prompt}", "{", "a\x00b", "\x85", "🙂")
WORDS = ("the", "sky", "is", "blue", "cat", "é", "日本語", "🙂", "\n", "{x}", "<|eos|>")
clean_text = st.lists(st.sampled_from(WORDS), min_size=1, max_size=8).map(" ".join)  # text a real row could hold
text = st.one_of(
    clean_text,
    st.text(max_size=20),  # any unicode but lone surrogates (those are in any_value)
    st.sampled_from(ODD_TEXT),  # empty, whitespace, control characters, special-token and template text
    st.text(alphabet="ab ", min_size=1, max_size=5),  # shared prefixes, identical pairs, duplicates
    st.integers(60, 1200).map(lambda n: "the sky is blue " * n),  # huge: over any max_length
)
role = st.sampled_from(["system", "user", "assistant", "tool", "", "human", "gpt", None, 0, 3])
content = st.one_of(text, st.none(), st.integers(-5, 5), st.lists(text, max_size=2))
odd_message = st.fixed_dictionaries({}, optional={"role": role, "content": content})  # keys may be missing


def turns(roles: list[str], contents=text):
    return st.tuples(*(contents for _ in roles)).map(
        lambda values: [{"role": r, "content": c} for r, c in zip(roles, values, strict=True)]
    )


PROMPT_ROLES = (["user"], ["system", "user"], ["user", "assistant", "user"])
COMPLETION_ROLES = (["assistant"], ["assistant", "user", "assistant"])
conversation_prompt = st.sampled_from(PROMPT_ROLES).flatmap(turns)
completion = st.sampled_from(COMPLETION_ROLES).flatmap(turns)
any_value = st.one_of(
    text,
    st.sampled_from(["\ud800", "a \udfff"]),  # lone surrogates: a JSON file can hold them escaped, Arrow cannot
    st.sampled_from([None, True, False, []]),
    st.integers(-(2**70), 2**70),  # beyond 64 bits too
    st.floats(),  # NaN and infinities included
    st.lists(odd_message, min_size=1, max_size=3),
    st.lists(st.one_of(st.integers(), text), min_size=1, max_size=2),
    st.dictionaries(st.sampled_from(["role", "content", "x"]), text, max_size=2),
)
EXTRAS = {  # optional columns, each in some rows only, any type
    "system": st.one_of(clean_text, st.none(), st.integers(0, 3), st.lists(text, max_size=1)),
    "input": st.one_of(clean_text, st.none(), st.integers(0, 3)),
    "chosen_score": st.one_of(st.floats(), st.integers(0, 10), text, st.none()),
    "rejected_score": st.one_of(st.floats(), st.integers(0, 10), st.none()),
    "status": st.sampled_from(["tie", "TIE ", "ok", ""]),
    "tools": st.sampled_from([None, [], [{"name": "search"}], '[{"name": "f"}]', "[1]", [1], "not json", 5]),
    "chat_template_kwargs": st.sampled_from([None, {}, {"enable_thinking": False}, "x", 5]),
}


@st.composite
def preference_rows(draw, *, noisy: bool | None = None, extras_odds: int = 5) -> list[dict]:
    """1-6 rows of one format (strings or conversations; a prompt column or the prompt shared by chosen and
    rejected), text mostly clean, extra columns of any type; in noisy datasets, rows of the other format, and values
    replaced by anything or missing."""
    conversational, implicit = draw(st.booleans()), draw(st.integers(0, 3)) == 0
    noisy = draw(st.booleans()) if noisy is None else noisy
    rows = []
    for _ in range(draw(st.integers(1, 6))):
        words = draw(st.sampled_from([clean_text, clean_text, text]))
        if conversational != (noisy and draw(st.integers(0, 4)) == 0):
            prompt = draw(turns(draw(st.sampled_from(PROMPT_ROLES)), words))
            chosen = draw(turns(draw(st.sampled_from(COMPLETION_ROLES)), words))
            rejected = draw(turns(draw(st.sampled_from(COMPLETION_ROLES)), words))
        else:
            prompt, chosen, rejected = draw(words), draw(words), draw(words)
        if implicit:  # HH-RLHF and whole conversations: the prompt is the shared start
            row = {"chosen": prompt + chosen, "rejected": prompt + rejected}
        else:
            row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
        if noisy and draw(st.integers(0, 2)) == 0:  # one value replaced by anything, or missing
            name = draw(st.sampled_from(sorted(row)))
            if draw(st.booleans()):
                row[name] = draw(any_value)
            else:
                del row[name]
        for name, values in EXTRAS.items():
            if draw(st.integers(1, extras_odds)) == 1:
                row[name] = draw(values)
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------------ packed batch checks


def check_batch(batch, expected: list[tuple[int, bool, list[int], list[int]]], pad_token_id: int, capacity=None):
    """Every invariant of a ``PackedBatch``. ``expected``: (owner, is_chosen, ids, targets) of every sequence; each
    is in the batch exactly once, whole, in one row (of at most ``capacity`` real tokens); positions restart at 0;
    padding is never a target."""
    rows, row_length = batch.input_ids.shape
    cu = batch.cu_seqlens.tolist()
    assert batch.cu_seqlens.dtype == torch.int32 and cu[0] == 0 and cu[-1] == rows * row_length
    assert all(b > a for a, b in itertools.pairwise(cu))  # no empty segment
    assert {r * row_length for r in range(rows)} <= set(cu)  # no segment crosses a row boundary
    assert batch.max_seqlen == max(b - a for a, b in itertools.pairwise(cu))
    assert len(batch.seq_pair) == len(batch.seq_is_chosen) == len(cu) - 1
    ids, positions = batch.input_ids.reshape(-1).tolist(), batch.position_ids.reshape(-1).tolist()
    targets = batch.targets.reshape(-1).tolist()
    seen, used, longest = [], [0] * rows, max(len(ids) for _, _, ids, _ in expected)
    for s, (a, b) in enumerate(itertools.pairwise(cu)):
        assert positions[a:b] == list(range(b - a))
        number = int(batch.seq_pair[s])
        if number < 0:  # padding: at the end of its row (in pieces no longer than a sequence), never a target
            end = (a // row_length + 1) * row_length
            assert ids[a:end] == [pad_token_id] * (end - a) and b - a <= longest
            assert targets[a:b] == [IGNORE_INDEX] * (b - a) and not batch.seq_is_chosen[s]
            continue
        seen.append((batch.pair_ids[number], bool(batch.seq_is_chosen[s]), ids[a:b], targets[a:b]))
        used[a // row_length] += b - a
    assert max(used) <= (capacity or row_length)
    assert sorted(seen) == sorted(expected)  # every sequence exactly once, with its own tokens and targets
    assert batch.num_padding == rows * row_length - sum(len(seq_ids) for _, _, seq_ids, _ in expected)


def next_token_targets(ids: list[int], learn: list[bool]) -> list[int]:
    """Position t targets token t + 1 where that token is learned; the last position never."""
    return [token if ok else IGNORE_INDEX for token, ok in zip(ids[1:], learn[1:], strict=True)] + [IGNORE_INDEX]


# ------------------------------------------------------------------------------------- preferences end to end


@examples(100)
@given(rows=preference_rows())
@example(rows=[{**GOOD, "chosen": "b\ud800"}])  # a lone surrogate (escaped in JSON): Arrow cannot load it
@example(rows=[{**GOOD, "x": "s"}, {**GOOD, "x": 2**70}])  # an integer over 64 bits in a column of mixed types
def test_preference_rows_end_in_our_error_or_every_row_is_accounted_for(rows, tokenizer, folder):
    try:
        prepared = prepare_preferences(write_jsonl(rows, folder))
    except OURS as error:
        event(f"prepare_preferences: {type(error).__name__}")
        return
    assert len(prepared) == len(rows)  # normalizing drops nothing
    try:  # what DPOTrainer does: tokenize the prepared rows, unfiltered
        direct = tokenize_preferences(prepared, tokenizer, max_length=MAX_LENGTH)
        assert len(direct.dataset) + sum(direct.dropped.values()) == len(rows)
    except OURS as error:
        event(f"tokenize_preferences unfiltered: {type(error).__name__}")
    report = check_preferences(prepared, tokenizer, max_length=MAX_LENGTH)  # bad values are reported, not raised
    kept, dropped = report.filter(prepared)
    drop = report.drop_rows()
    assert report.num_rows == len(rows) and sum(dropped.values()) == len(drop) == len(rows) - len(kept)
    assert all(report.details[row] for row in drop)  # each drop has its reason
    assert set(dropped) <= {reason for reason, (severity, _) in REASONS.items() if severity == "drop"}
    event(f"kept {len(kept)} of {len(rows)}")
    if not len(kept):
        with pytest.raises(DataError, match="no rows"):
            tokenize_preferences(kept, tokenizer, max_length=MAX_LENGTH)
        return
    tokenized = tokenize_preferences(kept, tokenizer, max_length=MAX_LENGTH)
    # the report's prompt_fills_max_length is exact: nothing is left for tokenize_preferences to drop
    assert tokenized.dropped == {} and len(tokenized.dataset) == len(kept)
    pairs = tokenized.dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_list()
    collate = PairPacker(pack_length=None, max_length=MAX_LENGTH, truncation_mode="keep_start", pad_token_id=0)
    batch = _as_batch(collate(pairs))  # clean rows pack: every completion keeps a token to learn from
    expected = []
    for i, pair in enumerate(pairs):
        for name in ("chosen_ids", "rejected_ids"):
            ids, mask = truncate(pair["prompt_ids"], pair[name], MAX_LENGTH)
            expected.append((i, name == "chosen_ids", ids, next_token_targets(ids, mask)))
    check_batch(batch, expected, pad_token_id=0)


@examples(40)
@given(rows=preference_rows(noisy=False, extras_odds=2))
def test_extra_columns_are_text_and_template_inputs_or_our_error(rows, tokenizer, folder):
    """system/input are joined into the prompt as text; tools and chat_template_kwargs go to the chat template."""
    try:
        prepared = prepare_preferences(write_jsonl(rows, folder))
        assert len(tokenize_preferences(prepared, tokenizer, max_length=None).dataset) == len(rows)
    except OURS:
        return
    assert all(row.get(c) is None or isinstance(row[c], str) for row in rows for c in ("system", "input"))


python_value = st.one_of(any_value, st.binary(max_size=4), st.tuples(text), st.sets(st.integers(), max_size=2))
python_rows = st.lists(  # rows of the generator above, and rows of anything (keys missing, Python-only values)
    st.one_of(preference_rows(), st.lists(st.dictionaries(st.sampled_from(["prompt", "chosen", "rejected", "x"]),
                                                          python_value), min_size=1, max_size=3)),
    min_size=1, max_size=3,
).map(lambda parts: [row for part in parts for row in part])  # fmt: skip


@examples(150)
@given(rows=python_rows, surrogate=st.sampled_from(["", "\ud800", "a\udfff"]))
def test_check_preferences_reports_any_python_values_and_filter_keeps_the_rest(rows, surrogate, tokenizer):
    rows = [dict(row) for row in rows]
    rows[0].setdefault("chosen", "the sky")
    if surrogate:  # a lone surrogate: only Python holds one (Arrow and UTF-8 files cannot)
        rows[0]["chosen"] = f"the sky{surrogate}"
    rows[-1].setdefault("rejected", b"bytes")
    report = check_preferences(rows, tokenizer, max_length=MAX_LENGTH)
    kept, dropped = report.filter(rows)
    drop = set(report.drop_rows())
    assert kept == [row for i, row in enumerate(rows) if i not in drop]
    assert sum(dropped.values()) == len(drop) and all(report.details[row] for row in drop)
    if surrogate:
        assert 0 in drop
    assert report.to_markdown() and json.loads(report.to_json())["num_rows"] == len(rows)


string_row = st.fixed_dictionaries({"prompt": st.text(min_size=1, max_size=40), "chosen": st.text(max_size=40)},
                                   optional={"rejected": st.text(max_size=40)})  # fmt: skip


@examples(40)
@given(
    rows=st.lists(string_row, min_size=1, max_size=5),
    max_prompt_length=st.one_of(st.none(), st.integers(1, 12)),
    max_completion_length=st.one_of(st.none(), st.integers(1, 12)),
    truncation_mode=st.sampled_from(["keep_start", "keep_end"]),
    max_length=st.integers(1, 40),
)
def test_string_tokens_are_the_encoding_of_the_concatenation(
    rows, max_prompt_length, max_completion_length, truncation_mode, max_length, tokenizer
):
    """tokenize.py: ids of prompt + completion (+ EOS) split where they stop agreeing with the prompt's own."""
    rows = [{"rejected": "x", **row} for row in rows]
    data = datasets.Dataset.from_list(rows)
    whole = tokenize_preferences(data, tokenizer, max_length=None)
    eos = tokenizer.eos_token
    for row, out in zip(rows, whole.dataset, strict=True):
        prompt_alone = tokenizer(row["prompt"])["input_ids"]
        assert out["prompt_ids"] == prompt_alone[: len(out["prompt_ids"])]
        for name in ("chosen", "rejected"):
            completion = row[name] if row[name].endswith(eos) else row[name] + eos
            assert out["prompt_ids"] + out[f"{name}_ids"] == tokenizer(row["prompt"] + completion)["input_ids"]
            assert out[f"{name}_ids"]  # at least the EOS
    limits = {"max_prompt_length": max_prompt_length, "max_completion_length": max_completion_length}
    cut = tokenize_preferences(data, tokenizer, max_length=max_length, truncation_mode=truncation_mode, **limits)
    gone = set(cut.dropped_rows.get("prompt_fills_max_length", []))
    assert set(cut.dropped_rows) <= {"prompt_fills_max_length"} and len(cut.dataset) + len(gone) == len(rows)
    kept = [i for i in range(len(rows)) if i not in gone]
    for i, out in zip(kept, cut.dataset, strict=True):
        full = whole.dataset[i]
        assert out["prompt_ids"] == full["prompt_ids"][-max_prompt_length if max_prompt_length else 0 :]
        assert truncation_mode == "keep_end" or len(out["prompt_ids"]) < max_length
        for name in ("chosen_ids", "rejected_ids"):
            assert out[name] == full[name][:max_completion_length]
            ids, mask = truncate(out["prompt_ids"], out[name], max_length, truncation_mode)
            assert len(ids) == len(mask) <= max_length
    for i in gone:  # dropped exactly when the (clipped) prompt fills max_length, under keep_start only
        n = len(whole.dataset[i]["prompt_ids"])
        assert truncation_mode == "keep_start" and min(n, max_prompt_length or n) >= max_length


@examples(40)
@given(rows=st.lists(st.fixed_dictionaries({"prompt": conversation_prompt, "chosen": completion,
                                            "rejected": completion}), min_size=1, max_size=4))  # fmt: skip
def test_conversation_tokens_are_the_template_of_the_whole_conversation(rows, tokenizer):
    data = datasets.Dataset.from_list(rows)
    out = tokenize_preferences(data, tokenizer, max_length=None).dataset
    for row, ids in zip(rows, out, strict=True):
        for name in ("chosen", "rejected"):
            whole = tokenizer.apply_chat_template(row["prompt"] + row[name], tokenize=True, return_dict=True)
            assert ids["prompt_ids"] + ids[f"{name}_ids"] == whole["input_ids"]


# ---------------------------------------------------------------------------------------------- SFT end to end


sharegpt_message = st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system"]), "value": text})


@st.composite
def sft_rows(draw) -> list[dict]:
    layout = draw(st.sampled_from(["text", "messages", "sharegpt", "prompt_completion", "conversational_pc"]))
    good = {
        "text": st.fixed_dictionaries({"text": text}),
        "messages": st.fixed_dictionaries({"messages": completion}),
        "sharegpt": st.fixed_dictionaries({"conversations": st.lists(sharegpt_message, min_size=1, max_size=3)}),
        "prompt_completion": st.fixed_dictionaries({"prompt": text, "completion": text}),
        "conversational_pc": st.fixed_dictionaries({"prompt": conversation_prompt, "completion": completion}),
    }[layout]
    rows = draw(st.lists(good, min_size=1, max_size=5))
    for row in rows:
        if draw(st.integers(0, 4)) == 0:
            row[draw(st.sampled_from(sorted(row)))] = draw(any_value)
        for name in ("tools", "chat_template_kwargs"):
            if draw(st.integers(0, 2)) == 0:
                row[name] = draw(EXTRAS[name])
    return rows


@examples(80)
@given(rows=sft_rows(), max_length=st.one_of(st.none(), st.integers(1, 40)))
@example(rows=[{"conversations": [{"from": "human", "value": "hi"}]}, {"conversations": 1}], max_length=None)
def test_sft_rows_end_in_our_error_or_every_row_is_tokenized_or_counted(rows, max_length, tokenizer, folder):
    try:
        prepared = prepare_sft(write_jsonl(rows, folder))
        tokenized = tokenize_sft(prepared, tokenizer, max_length=max_length)
    except OURS as error:
        event(f"{type(error).__name__}")
        return
    event(f"tokenized {len(tokenized.dataset)} of {len(rows)}")
    assert len(tokenized.dataset) + sum(tokenized.dropped.values()) == len(rows)
    assert set(tokenized.dropped) <= {"no_labels_after_truncation"}
    sequences = tokenized.dataset.select_columns(["input_ids", "labels"]).to_list()
    for row in sequences:
        assert len(row["input_ids"]) == len(row["labels"]) <= (max_length or math.inf)
        if max_length is not None:
            assert any(label != IGNORE_INDEX for label in row["labels"])
    if sequences:
        batch = pack_sft(sequences, pack_length=max_length)
        check_batch(batch, sft_expected(sequences, [[len(e["input_ids"])] for e in sequences]), pad_token_id=0)


def sft_expected(rows: list[dict], pieces: list[list[int]]) -> list[tuple[int, bool, list[int], list[int]]]:
    """(owner, True, ids, targets) of each non-empty sequence; ``pieces[i]``: the sequence lengths of row i."""
    expected = []
    for owner, (row, lengths) in enumerate(zip(rows, pieces, strict=True)):
        labels = row.get("labels") or row["input_ids"]
        for start, n in zip(itertools.accumulate([0, *lengths]), lengths, strict=False):
            if n:
                seq_labels = labels[start : start + n]
                learn = [label != IGNORE_INDEX for label in seq_labels]
                expected.append((owner, True, row["input_ids"][start : start + n],
                                 next_token_targets(seq_labels, learn)))  # fmt: skip
    return expected


# ------------------------------------------------------------------------------------------------------ packing

ids_list = st.lists(st.integers(3, 999), max_size=12)


@examples(300)
@given(
    lengths=st.one_of(
        st.lists(st.integers(0, 40), max_size=30),
        st.lists(st.sampled_from([0, 40]), max_size=30),  # only empty and full items
        st.lists(st.one_of(st.integers(-2, 45), st.floats(0, 40), st.none(), st.booleans()), max_size=8),
    ),
    capacity=st.one_of(st.just(40), st.integers(-1, 60), st.sampled_from([2**62, 40.0])),
    as_array=st.booleans(),
)
def test_pack_places_every_item_once_or_names_the_bad_one(lengths, capacity, as_array):
    given_lengths = np.array(lengths, dtype=object) if as_array else lengths
    results = []
    for backend in BACKENDS:  # the same bins, or the same error, from every backend
        try:
            results.append(pack(given_lengths, capacity, backend=backend))
        except OURS as error:
            results.append((type(error), str(error)))
    assert all(result == results[0] for result in results)
    if isinstance(bins := results[0], tuple):  # an error of ours
        return
    assert sorted(i for items in bins for i in items) == list(range(len(lengths)))
    assert all(items and sum(lengths[i] for i in items) <= capacity for items in bins)


tokenized_pair = st.fixed_dictionaries({name: ids_list for name in ("prompt_ids", "chosen_ids", "rejected_ids")})
tokenized_pairs = st.lists(tokenized_pair, min_size=1, max_size=8)


@examples(250)
@given(
    pairs=tokenized_pairs,
    pack_length=st.one_of(st.none(), st.integers(2, 50)),
    max_length=st.one_of(st.none(), st.integers(1, 20)),
    truncation_mode=st.sampled_from(["keep_start", "keep_end"]),
    mode=st.sampled_from(["pairs", "split_pairs", "one_pair_per_row"]),
    pad_to_multiple_of=st.one_of(st.none(), st.integers(1, 8)),
)
def test_pack_pairs_keeps_every_pair_whole_and_in_place(
    pairs, pack_length, max_length, truncation_mode, mode, pad_to_multiple_of
):
    sequences = {(i, name == "chosen_ids"): truncate(p["prompt_ids"], p[name], max_length, truncation_mode)
                 for i, p in enumerate(pairs) for name in ("chosen_ids", "rejected_ids")}  # fmt: skip
    split = mode == "split_pairs"
    items = [len(sequences[key][0]) for key in sorted(sequences)] if split else [
        len(sequences[(i, True)][0]) + len(sequences[(i, False)][0]) for i in range(len(pairs))]  # fmt: skip
    capacity = pack_length or max(items)
    nothing_to_learn = any(not any(mask[1:]) for _, mask in sequences.values())
    options = {"pack_length": pack_length, "max_length": max_length, "truncation_mode": truncation_mode,
               "pad_token_id": 1, "pad_to_multiple_of": pad_to_multiple_of}  # fmt: skip
    batches = []
    for backend in BACKENDS:
        try:
            batches.append(pack_pairs(pairs, **options, backend=backend, split_pairs=split,
                                      one_pair_per_row=mode == "one_pair_per_row"))  # fmt: skip
        except DataError as error:
            # exactly the two errors a batch can have: a sequence with nothing to learn, an item over a row
            assert nothing_to_learn or max(items) > capacity, error
            return
    assert not nothing_to_learn and max(items) <= capacity
    batch = batches[0]
    expected = [(i, chosen, ids, next_token_targets(ids, mask)) for (i, chosen), (ids, mask) in sequences.items()]
    check_batch(batch, expected, pad_token_id=1, capacity=capacity)
    for other in batches[1:]:  # the C++ packer gives the same batch
        assert all(torch.equal(getattr(batch, f), getattr(other, f)) for f in ("input_ids", "targets", "cu_seqlens"))
        assert batch.pair_ids == other.pair_ids
    if pad_to_multiple_of:
        assert batch.input_ids.shape[1] % pad_to_multiple_of == 0
    segments = [(int(p), bool(c)) for p, c in zip(batch.seq_pair, batch.seq_is_chosen, strict=True) if p >= 0]
    if split:
        assert batch.pair_ids == list(range(len(pairs)))  # pairs numbered in input order, both in this batch
    else:  # a pair is never split: its chosen, then its rejected, side by side in one row
        assert segments == [(k // 2, k % 2 == 0) for k in range(len(segments))]
        if mode == "one_pair_per_row":
            assert batch.input_ids.shape[0] == len(pairs) and batch.pair_ids == list(range(len(pairs)))


@examples(100)
@given(pairs=tokenized_pairs, packing=st.booleans(), with_reference=st.booleans())
def test_pair_packer_is_pack_pairs_of_sequences_with_reference_in_pair_order(pairs, packing, with_reference):
    pairs = [{**p, "chosen_ids": [7, *p["chosen_ids"]], "rejected_ids": [8, *p["rejected_ids"]],
              "prompt_ids": [5, *p["prompt_ids"]]} for p in pairs]  # fmt: skip
    if with_reference:
        pairs = [{**p, REFERENCE_COLUMNS[0]: -float(i), REFERENCE_COLUMNS[1]: -0.5 - i} for i, p in enumerate(pairs)]
    fields = PairPacker(pack_length=None, max_length=None, truncation_mode="keep_start", pad_token_id=0,
                        packing=packing)(pairs)  # fmt: skip
    batch = pack_pairs(pairs, pack_length=None, split_pairs=True, one_pair_per_row=not packing)
    assert torch.equal(fields["input_ids"], batch.input_ids) and fields["pair_ids"].tolist() == batch.pair_ids
    assert ("ref_logps" in fields) == with_reference
    if with_reference:
        assert fields["ref_logps"].tolist() == [[-float(i), -0.5 - i] for i in batch.pair_ids]


@st.composite
def sft_examples(draw) -> tuple[list[dict], list[list[int]]]:
    """Tokenized SFT examples (``labels`` sometimes absent), as single sequences or rows with ``seq_lengths``."""
    as_rows = draw(st.booleans())
    out, pieces = [], []
    for ids in draw(st.lists(ids_list, min_size=1, max_size=8)):
        row = {"input_ids": ids}
        if draw(st.booleans()):
            row["labels"] = [t if draw(st.booleans()) else IGNORE_INDEX for t in ids]
        lengths = [len(ids)]
        if as_rows:
            cuts = sorted(draw(st.lists(st.integers(0, len(ids)), max_size=3)))
            lengths = [b - a for a, b in itertools.pairwise([0, *cuts, len(ids)])]
            row["seq_lengths"] = lengths
        out.append(row)
        pieces.append(lengths)
    return out, pieces


@examples(200)
@given(data=sft_examples(), pack_length=st.one_of(st.none(), st.integers(1, 30)), broken=st.integers(0, 5))
def test_pack_sft_keeps_every_sequence_or_names_the_bad_column(data, pack_length, broken):
    rows, pieces = data
    first = rows[0]
    if broken == 1:
        first["labels"] = [*first.get("labels", first["input_ids"]), IGNORE_INDEX]
    elif broken == 2 and "seq_lengths" in first:
        first["seq_lengths"] = [*first["seq_lengths"], 1]
    elif broken == 3 and "seq_lengths" in first and first["input_ids"]:
        first["seq_lengths"] = [-1, *pieces[0][:-1], pieces[0][-1] + 1]  # adds up, but one length is negative
    else:
        broken = 0
    if not broken and not any(e["input_ids"] for e in rows):
        broken = 4
    try:
        batch = pack_sft(rows, pack_length=pack_length)
    except DataError as error:
        assert broken and error.row in (0, None), error
        assert error.column == {1: "labels", 2: "seq_lengths", 3: "seq_lengths", 4: "input_ids"}[broken]
        return
    assert not broken
    capacity = max(pack_length or 0, *(len(e["input_ids"]) for e in rows))  # rows: of pack_length, or longer
    check_batch(batch, sft_expected(rows, pieces), pad_token_id=0, capacity=capacity)
    if "seq_lengths" in rows[0]:  # packed rows: each non-empty one stays a row
        assert batch.input_ids.shape[0] == sum(bool(e["input_ids"]) for e in rows)


@examples(200)
@given(
    lengths=st.lists(st.integers(0, 30), max_size=40),
    capacity=st.integers(1, 30),
    extra=st.sampled_from([None, 31, -1]),  # an item longer than a row, or negative
)
def test_bfd_bins_fifo_places_every_item_once_within_capacity(lengths, capacity, extra):
    lengths = [min(length, capacity) for length in lengths] + ([] if extra is None else [extra])
    if extra is not None:
        with pytest.raises(DataError) as error:
            bfd_bins_fifo(lengths, capacity)
        assert error.value.row == len(lengths) - 1
        return
    bins = bfd_bins_fifo(lengths, capacity)
    assert sorted(i for items in bins for i in items) == list(range(len(lengths)))
    assert all(items and sum(lengths[i] for i in items) <= capacity for items in bins)
    if all(lengths):  # 1..capacity: TRL's tie-break, as the docstring states it
        assert bins == fifo_by_definition(lengths, capacity)


def fifo_by_definition(lengths: list[int], capacity: int) -> list[list[int]]:
    """Longest first; the open bin with the least room that fits; on equal room, the one that got that room first."""
    bins, room, since = [], [], []
    for clock, i in enumerate(sorted(range(len(lengths)), key=lambda i: -lengths[i])):
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i] and room[b] > 0]
        chosen = min(fits, key=lambda b: (room[b], since[b])) if fits else len(bins)
        if chosen == len(bins):  # a new bin
            bins, room, since = [*bins, []], [*room, capacity], [*since, clock]
        bins[chosen].append(i)
        room[chosen] -= lengths[i]
        since[chosen] = clock
    return bins


@examples(30)
@given(
    sequences=st.lists(st.lists(st.integers(3, 99), max_size=14), min_size=1, max_size=10),
    seq_length=st.integers(1, 12),
    strategy=st.sampled_from(["bfd", "bfd_split", "wrapped"]),
)
def test_pack_sft_dataset_rows_hold_every_kept_token_once(sequences, seq_length, strategy):
    data = datasets.Dataset.from_dict({"input_ids": sequences, "labels": [[-t for t in ids] for ids in sequences]})
    rows = pack_sft_dataset(data, seq_length, strategy=strategy).to_list()
    assert all(0 < len(row["input_ids"]) == len(row["labels"]) <= seq_length for row in rows)
    assert all(row["labels"] == [-t for t in row["input_ids"]] for row in rows)  # labels travel with their tokens
    if strategy == "wrapped":  # the concatenation, cut every seq_length tokens
        assert [t for row in rows for t in row["input_ids"]] == [t for ids in sequences for t in ids]
        return
    if strategy == "bfd":
        expected = [ids[:seq_length] for ids in sequences if ids]
    else:
        expected = [ids[c : c + seq_length] for ids in sequences for c in range(0, len(ids), seq_length)]
    got = []
    for row in rows:
        assert sum(row["seq_lengths"]) == len(row["input_ids"])
        starts = itertools.accumulate([0, *row["seq_lengths"]])
        got += [row["input_ids"][a : a + n] for a, n in zip(starts, row["seq_lengths"], strict=False)]
    assert sorted(got) == sorted(expected)
    if rows:  # each packed row stays one row of the batch, split into its sequences
        batch = pack_sft(rows)
        assert batch.input_ids.shape[0] == len(rows) and int((batch.seq_pair >= 0).sum()) == len(expected)
