"""Tokenization of every fixture and format equals TRL 1.16's, token for token, untruncated and truncated.

TRL's own code does the reference work: ``DPOTrainer._prepare_dataset`` (called on a stub holding only the
tokenizer it reads) for the prepared dataset, and ``DataCollatorForPreference`` for truncation.
"""

from __future__ import annotations

import types
from pathlib import Path

import datasets
import pytest
from tiny_tokenizer import build_tiny_tokenizer

from fastdpo.data.formats import prepare_preferences
from fastdpo.data.tokenize import tokenize_preferences, truncate

trl = pytest.importorskip("trl")
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
datasets.disable_progress_bars()


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


def trl_prepared(dataset, tokenizer, tmp_path, max_length=None, truncation_mode="keep_start") -> datasets.Dataset:
    args = trl.DPOConfig(
        output_dir=str(tmp_path), max_length=max_length, truncation_mode=truncation_mode, bf16=False, report_to=[]
    )
    stub = types.SimpleNamespace(_tokenizer=tokenizer)
    return trl.DPOTrainer._prepare_dataset(stub, dataset, tokenizer, args, "train")


# (fixture, our options, what TRL is given: "raw" = the file as it is, "normalized" = our prompt/chosen/rejected)
CASES = {
    "hh_rlhf_implicit_prompt": ("hh_rlhf.jsonl", {}, "raw"),
    "distilabel_orca_system_input": ("distilabel_orca.jsonl", {"columns": {"prompt": "input"}}, "normalized"),
    "ultrafeedback_binarized": ("ultrafeedback_binarized.jsonl", {}, "normalized"),
    "conversational_tools": ("conversational_tools.jsonl", {}, "raw"),
}


def _load_raw(name: str) -> datasets.Dataset:
    return datasets.load_dataset("json", data_files=str(FIXTURES / name), split="train")


@pytest.mark.parametrize("case", CASES)
def test_token_ids_equal_trl_prepared_dataset(case, tokenizer, tmp_path):
    name, options, trl_input = CASES[case]
    ours = prepare_preferences(FIXTURES / name, **options)
    tokenized = tokenize_preferences(ours, tokenizer, max_length=None)
    assert not tokenized.dropped_rows
    if trl_input == "raw":
        reference = trl_prepared(_load_raw(name), tokenizer, tmp_path)
    else:
        keep = [c for c in ours.column_names if c in ("prompt", "chosen", "rejected", "tools")]
        reference = trl_prepared(ours.select_columns(keep), tokenizer, tmp_path)
    assert len(reference) == len(tokenized.dataset) > 0
    for column in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert tokenized.dataset[column] == reference[column], column


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("truncation_mode", ["keep_start", "keep_end"])
def test_truncation_and_drops_equal_trl(case, truncation_mode, tokenizer, tmp_path):
    name, options, _ = CASES[case]
    ours = prepare_preferences(FIXTURES / name, **options)
    full = tokenize_preferences(ours, tokenizer, max_length=None).dataset
    prompt_lengths = sorted(len(ids) for ids in full["prompt_ids"])
    # a limit inside the prompts of some rows: TRL drops those under keep_start; everything else gets truncated
    max_length = prompt_lengths[len(prompt_lengths) // 2] + 1
    tokenized = tokenize_preferences(ours, tokenizer, max_length=max_length, truncation_mode=truncation_mode)
    keep = [c for c in ours.column_names if c in ("prompt", "chosen", "rejected", "tools")]
    reference_rows = trl_prepared(ours.select_columns(keep), tokenizer, tmp_path, max_length, truncation_mode)
    if truncation_mode == "keep_start":
        expected_drops = [i for i, ids in enumerate(full["prompt_ids"]) if len(ids) >= max_length]
        assert tokenized.dropped_rows.get("prompt_fills_max_length", []) == expected_drops
    else:
        assert not tokenized.dropped_rows
    assert len(reference_rows) == len(tokenized.dataset)

    collator = DataCollatorForPreference(
        pad_token_id=tokenizer.pad_token_id, max_length=max_length, truncation_mode=truncation_mode
    )
    for row, ref_row in zip(tokenized.dataset, reference_rows, strict=True):
        batch = collator.torch_call([ref_row])
        for k, completion in enumerate((row["chosen_ids"], row["rejected_ids"])):
            ids, mask = truncate(row["prompt_ids"], completion, max_length, truncation_mode)
            valid = batch["attention_mask"][k].bool()
            assert ids == batch["input_ids"][k][valid].tolist()
            assert mask == batch["completion_mask"][k][valid].tolist()


def test_string_completions_get_the_eos_string_once(tokenizer):
    rows = datasets.Dataset.from_list(
        [
            {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " Hi!<|eos|>"},
            {"prompt": "Q", "chosen": "a", "rejected": "b"},
        ]
    )
    out = tokenize_preferences(prepare_preferences(rows), tokenizer, max_length=None).dataset
    eos = tokenizer.eos_token_id
    assert out[0]["chosen_ids"][-1] == eos and out[0]["rejected_ids"][-1] == eos
    assert out[0]["chosen_ids"] == out[0]["rejected_ids"]  # the EOS string is not added twice
    assert out[0]["prompt_ids"][0] == tokenizer.bos_token_id  # the tokenizer's own BOS, as TRL keeps it


def test_prompt_only_and_completion_only_limits_are_ours(tokenizer):
    rows = datasets.Dataset.from_list([{"prompt": "What color is the sky on a clear day?", "chosen": " Blue sky.",
                                        "rejected": " It is green on a clear day."}])  # fmt: skip
    full = tokenize_preferences(prepare_preferences(rows), tokenizer, max_length=None).dataset[0]
    clipped = tokenize_preferences(
        prepare_preferences(rows), tokenizer, max_length=None, max_prompt_length=3, max_completion_length=2
    ).dataset[0]
    assert clipped["prompt_ids"] == full["prompt_ids"][-3:]  # the prompt keeps its end
    assert clipped["chosen_ids"] == full["chosen_ids"][:2] and clipped["rejected_ids"] == full["rejected_ids"][:2]


def test_a_prompt_whose_tokens_are_cut_is_counted_in_one_warning_every_tokenizer(tokenizer, caplog):
    # "Assistant: " alone ends in the space token; with its answer the space joins the answer's first word. TRL trains
    # on prompt + completion's own tokens and warns once; fastdpo did the same silently (DPO, SFT, their streams)
    from fastdpo.data import prepare_sft, tokenize_sft
    from fastdpo.data.stream import prepare_sft_stream, prepare_stream

    rows = [{"prompt": "Q: bake bread? Assistant: ", "chosen": "mix flour", "rejected": "no"},
            {"prompt": "Q: bake bread?", "chosen": " mix flour", "rejected": " no"},
            {"prompt": "Q: why? Assistant: ", "chosen": "because", "rejected": "no"}]  # fmt: skip
    space = tokenizer.convert_ids_to_tokens(tokenizer("Assistant: ")["input_ids"])[-1]
    assert space != tokenizer.convert_ids_to_tokens(tokenizer("Assistant: mix")["input_ids"])[-2]  # (the premise)
    said = "2 of 3 {} rows: the prompt's end {!r} is not where the prompt + completion tokens have it"
    with caplog.at_level("WARNING"):
        tokenize_preferences(prepare_preferences(rows), tokenizer, max_length=None)
    assert said.format("preference", tokenizer.decode(tokenizer("Assistant: ")["input_ids"][-1:])) in caplog.text
    assert "e.g. row 0; rows 0, 2." in caplog.text
    caplog.clear()
    sft = [{"prompt": row["prompt"], "completion": row["chosen"]} for row in rows]
    with caplog.at_level("WARNING"):
        tokenize_sft(prepare_sft(sft), tokenizer, max_length=None)
    assert "2 of 3 SFT rows: the prompt's end" in caplog.text and "rows 0, 2." in caplog.text
    # streams: counted as they are read, under flagged_rows
    stream = prepare_stream(datasets.Dataset.from_list(rows).to_iterable_dataset(), tokenizer, max_length=None)
    assert len(list(stream.dataset)) == 3 and stream.flagged_rows == {"prompt_not_prefix": [0, 2]}
    sft_stream = prepare_sft_stream(datasets.Dataset.from_list(sft).to_iterable_dataset(), tokenizer, max_length=None)
    assert len(list(sft_stream.dataset)) == 3 and sft_stream.flagged_rows == {"prompt_not_prefix": [0, 2]}
    # chosen and rejected of the same tokens: warned of in a dataset, counted in a stream too (it said nothing)
    rows[1]["rejected"] = rows[1]["chosen"]
    stream = prepare_stream(datasets.Dataset.from_list(rows).to_iterable_dataset(), tokenizer, max_length=None)
    assert len(list(stream.dataset)) == 3 and stream.flagged_rows["identical_tokens"] == [1]


def test_the_quality_report_counts_what_truncation_leaves_and_the_cut_prompts(tokenizer, tmp_path):
    # chosen and rejected differing past max_length only train as the same tokens (TRL's collator cuts both): they
    # were will_be_truncated; under keep_end a long prompt drops no row (TRL keeps it), yet the report dropped it
    from fastdpo.data import check_preferences

    shared = " the same long answer" * 6
    rows = [{"prompt": "Q?", "chosen": shared + " yes", "rejected": shared + " no"},
            {"prompt": " ".join(["word"] * 30) + "?", "chosen": " Fine.", "rejected": " Bad."},
            {"prompt": "Q? Assistant: ", "chosen": "mix", "rejected": "no"}]  # fmt: skip
    pairs = prepare_preferences(rows)
    ids = tokenize_preferences(pairs, tokenizer, max_length=None).dataset
    max_length = len(ids[0]["prompt_ids"]) + len(ids[0]["chosen_ids"]) - 3  # (cuts both before they differ)
    assert len(ids[1]["prompt_ids"]) >= max_length  # (row 1's prompt fills it)
    for mode, same in (("keep_start", True), ("keep_end", False)):  # TRL's own collator: what it trains on
        collated = DataCollatorForPreference(pad_token_id=0, max_length=max_length, truncation_mode=mode)([ids[0]])
        assert collated["input_ids"][0].equal(collated["input_ids"][1]) is same  # (rows: chosen, rejected)
    start = check_preferences(pairs, tokenizer, max_length=max_length)
    assert start.rows["identical_tokens"] == [0] and start.rows["prompt_fills_max_length"] == [1]
    assert start.rows["prompt_not_prefix"] == [2]
    end = check_preferences(pairs, tokenizer, max_length=max_length, truncation_mode="keep_end")
    assert "prompt_fills_max_length" not in end.rows and 1 in end.rows["will_be_truncated"]
    assert 0 not in end.rows.get("identical_tokens", [])  # (keep_end keeps the ends, where they differ)
