"""Streams' refused rows under ``bad_rows="drop"`` (the trainers' ``stream_bad_rows``, the CLI's ``data_filter:
drop``): dropped and counted under the quality check's reason as they are read, the rest as without them."""

from __future__ import annotations

import logging

import pytest
from test_train_dpo import common_args, synthetic_pairs, tiny_model
from test_train_stream import conversational, sft_model, stream_file, write_jsonl
from tiny_tokenizer import build_tiny_tokenizer

from fastdpo.data.stream import STREAM_BATCH, prepare_sft_stream, prepare_stream
from fastdpo.errors import ConfigError, DataError

datasets = pytest.importorskip("datasets")

TOKENS = ("prompt_ids", "chosen_ids", "rejected_ids")


def ids(prepared) -> list[tuple]:
    return [tuple(tuple(row[name]) for name in TOKENS) for row in prepared.dataset]


def stream_of(rows: list[dict]):
    """A generator's stream of ``rows``: no features (a number among strings, which no JSON column holds)."""

    def generated():
        yield from rows

    return datasets.IterableDataset.from_generator(generated)


def refused_then_dropped(prepare, rows: list[dict], first: int, tokenizer):
    """``(error, prepared)``: reading the stream stops at its ``first`` refused row, the fix saying how such rows are
    dropped; ``prepare``d with ``bad_rows="drop"``."""
    with pytest.raises(DataError) as raised:
        list(prepare(stream_of(rows), tokenizer).dataset)
    assert raised.value.row == first and "bad_rows='drop'" in raised.value.fix
    return raised.value, prepare(stream_of(rows), tokenizer, bad_rows="drop")


def test_refused_rows_of_a_preference_stream_are_dropped_under_their_reason_and_the_rest_kept(tmp_path, caplog):
    tokenizer = build_tiny_tokenizer()
    rows = synthetic_pairs(150).to_list()
    good = [dict(row) for row in rows]
    rows[2]["chosen"] = "   "  # empty (whitespace only): the quality check's "empty"
    rows[100]["rejected"] = None  # in the second batch tokenized together: "missing_field"
    rows[101]["chosen"] = 7  # "not_text"
    with caplog.at_level(logging.WARNING, logger="fastdpo"):
        error, dropped = refused_then_dropped(prepare_stream, rows, 2, tokenizer)
        read = ids(dropped)
    from fastdpo.cli_errors import in_cli_terms

    said = in_cli_terms(error, trains=True).fix  # (a fastdpo dpo run's: under data_filter: none)
    assert said.endswith("or set data_filter: drop to drop such rows as read") and "bad_rows" not in said, said
    with pytest.raises(DataError) as raised:  # (a value of no format: its fix named format=, Python's, too)
        list(prepare_stream(stream_of([rows[0], rows[101]]), tokenizer).dataset)
    said = in_cli_terms(raised.value, trains=True).fix
    assert "format=" not in said and said.endswith("or set data_filter: drop to drop such rows as read"), said
    assert dropped.dropped_rows == {"empty": [2], "missing_field": [100], "not_text": [101]}
    # the rows kept hold the ids the rows without the refused ones get (numbered as read: rows after them too)
    kept = [row for i, row in enumerate(good) if i not in (2, 100, 101)]
    assert read == ids(prepare_stream(datasets.Dataset.from_list(kept).to_iterable_dataset(), tokenizer))
    assert len(read) == 147 > STREAM_BATCH
    messages = [record.getMessage() for record in caplog.records]
    assert any("train stream: row 100 dropped (missing_field: column 'rejected'" in m for m in messages), messages


def test_a_conversational_streams_refused_rows_and_the_other_format_are_dropped(tmp_path):
    tokenizer = build_tiny_tokenizer()
    rows = conversational(synthetic_pairs(6).to_list())
    rows[0]["chosen"] = None  # missing_field, in the first row: the format is that of most of the first rows
    del rows[1]["rejected"][0]["role"]  # bad_message
    rows[3]["chosen"] = []  # empty
    rows[4]["chosen"] = " a string among message lists"  # the other format: mixed_format
    prepared = prepare_stream(stream_of(rows), tokenizer, bad_rows="drop")
    read = ids(prepared)
    assert prepared.dropped_rows == {"missing_field": [0], "bad_message": [1], "empty": [3], "mixed_format": [4]}
    kept = [row for i, row in enumerate(rows) if i not in (0, 1, 3, 4)]
    assert read == ids(prepare_stream(datasets.Dataset.from_list(kept).to_iterable_dataset(), tokenizer))
    with pytest.raises(ConfigError, match="bad_rows"):
        prepare_stream(stream_of(rows), tokenizer, bad_rows="skip")


def test_a_drop_takes_the_format_of_most_rows_and_says_nothing_of_dropping_what_it_would_not_drop():
    tokenizer = build_tiny_tokenizer()
    rows = conversational(synthetic_pairs(40).to_list())
    strings = synthetic_pairs(40, seed=1).to_list()
    for i in (0, 7, 21):  # a few string pairs among conversations, the first row one of them
        rows[i] = strings[i]
    prepared = prepare_stream(stream_of(rows), tokenizer, bad_rows="drop")
    read = ids(prepared)  # (the first row's format, taken before, kept 3 rows and dropped the 37 others)
    assert prepared.dropped_rows == {"mixed_format": [0, 7, 21]} and len(read) == 37
    # a row refused for what the quality check does not drop (a system column of no text) stops the run either
    # way, and its fix does not say that bad_rows='drop' would drop it
    rows = [{"prompt": "a?", "chosen": " b.", "rejected": " c.", "system": "be brief"}] * 3
    rows[1] = {**rows[1], "system": 5}
    for bad_rows in ("raise", "drop"):
        with pytest.raises(DataError, match="column 'system'") as raised:
            list(prepare_stream(stream_of(rows), tokenizer, bad_rows=bad_rows).dataset)
        assert "bad_rows" not in raised.value.fix, (bad_rows, raised.value.fix)


def test_rows_a_streams_chat_template_refuses_are_dropped_as_chat_template_errors():
    from test_bad_inputs import STRICT_TEMPLATE

    strict = build_tiny_tokenizer()
    strict.chat_template = STRICT_TEMPLATE  # roles must alternate, as Mistral's and Llama-2's templates say
    rows = conversational(synthetic_pairs(70).to_list())
    rows[66]["prompt"] = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]  # 2nd batch
    prepared = refused_then_dropped(prepare_stream, rows, 66, strict)[1]
    read = ids(prepared)
    assert prepared.dropped_rows == {"chat_template_error": [66]} and prepared.flagged_rows == {}
    kept = [row for i, row in enumerate(rows) if i != 66]
    assert read == ids(prepare_stream(datasets.Dataset.from_list(kept).to_iterable_dataset(), strict))


def test_refused_rows_of_an_sft_stream_are_dropped_and_counted_by_their_column():
    tokenizer = build_tiny_tokenizer()
    rows = [{"prompt": f"question {i}?", "completion": f" answer {i}."} for i in range(6)]
    rows[1]["completion"] = ""
    rows[4]["prompt"] = None
    prepared = refused_then_dropped(prepare_sft_stream, rows, 1, tokenizer)[1]
    read = [row["input_ids"] for row in prepared.dataset]
    assert prepared.dropped_rows == {"refused_completion": [1], "refused_prompt": [4]}
    kept = [row for i, row in enumerate(rows) if i not in (1, 4)]
    expected = prepare_sft_stream(datasets.Dataset.from_list(kept).to_iterable_dataset(), tokenizer)
    assert read == [row["input_ids"] for row in expected.dataset]
    # a refused first row does not set the layout's format (conversational completions, ShareGPT conversations):
    # the first given does, as prepare_sft reads it (every row was dropped as refused)
    chats = [{"prompt": [{"role": "user", "content": f"q {i}?"}], "completion": [{"role": "assistant",
              "content": f"a {i}."}]} for i in range(5)]  # fmt: skip
    shared = [{"conversations": [{"from": "human", "value": f"q {i}?"}, {"from": "gpt", "value": f"a {i}."}]}
              for i in range(5)]  # fmt: skip
    for rows, column, reason in (
        (chats, "completion", "refused_completion"),
        (shared, "conversations", "refused_messages"),
    ):  # (converted to messages first)
        prepared = prepare_sft_stream(stream_of([{**rows[0], column: None}, *rows[1:]]), tokenizer, bad_rows="drop")
        assert len(list(prepared.dataset)) == 4 and prepared.dropped_rows == {reason: [0]}, column


def test_trainers_drop_a_streams_refused_rows_under_stream_bad_rows(tmp_path):
    from fastdpo.train import DPOConfig, SFTConfig, SFTTrainer
    from fastdpo.train.dpo import DPOTrainer

    tokenizer = build_tiny_tokenizer()
    rows = synthetic_pairs(12).to_list()
    rows[5]["chosen"] = ""
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    load = tiny_model(tokenizer, tmp_path / "model")
    with pytest.raises(ConfigError, match="stream_bad_rows"):
        DPOConfig(**common_args(tmp_path, "bad"), stream_bad_rows="skip")
    args = DPOConfig(**{**common_args(tmp_path, "drop"), "max_steps": 2}, stream_bad_rows="drop")
    trainer = DPOTrainer(model=load(), ref_model=load(), args=args, processing_class=tokenizer,
                         train_dataset=stream_file(path))  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 2
    assert trainer.dropped_rows["train"]["empty"][0] == 5

    texts = [{"prompt": f"q {i}?", "completion": f" a {i}."} for i in range(8)]
    texts[3]["completion"] = ""
    args = SFTConfig(output_dir=str(tmp_path / "sft"), max_steps=2, per_device_train_batch_size=2, report_to=[],
                     bf16=False, stream_bad_rows="drop")  # fmt: skip
    trainer = SFTTrainer(sft_model(tokenizer, tmp_path)(), args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(texts).to_iterable_dataset())  # fmt: skip
    trainer.train()
    assert trainer.state.global_step == 2 and trainer.dropped_rows["train"] == {"refused_completion": [3]}
    # read by a dataloader worker: its drops written back, under a split of its own (they were not counted here)
    args = SFTConfig(output_dir=str(tmp_path / "sft_worker"), max_steps=2, per_device_train_batch_size=2,
                     report_to=[], bf16=False, stream_bad_rows="drop", dataloader_num_workers=1)  # fmt: skip
    trainer = SFTTrainer(sft_model(tokenizer, tmp_path)(), args=args, processing_class=tokenizer,
                         train_dataset=datasets.Dataset.from_list(texts).to_iterable_dataset())  # fmt: skip
    trainer.train()
    assert trainer.dropped_rows == {"train": {}, "train (dataloader worker 0)": {"refused_completion": [3]}}
