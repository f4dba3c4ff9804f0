"""Iterable (streaming) datasets: prepared lazily as map-style ones are, trained on as TRL 1.16 trains on them."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
from test_train_dpo import assert_first_steps_match, common_args, synthetic_pairs, tiny_model
from tiny_tokenizer import build_tiny_tokenizer

from fastdpo.data import prepare_preferences, tokenize_preferences
from fastdpo.data.stream import STREAM_BATCH, prepare_sft_stream, prepare_stream, prepare_tokenized_stream
from fastdpo.errors import ConfigError, DataError
from fastdpo.train import DPOConfig
from fastdpo.train.dpo import DPOTrainer

datasets = pytest.importorskip("datasets")
trl = pytest.importorskip("trl")
FIXTURE = "tests/fixtures/distilabel_orca.jsonl"
TOKENS = ("prompt_ids", "chosen_ids", "rejected_ids")


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def stream_file(path):
    """The file as a stream: ``load_dataset(..., streaming=True)``, as a user streams a large file or hub dataset."""
    return datasets.load_dataset("json", data_files=str(path), split="train", streaming=True)


def conversational(rows: list[dict]) -> list[dict]:
    return [{"prompt": [{"role": "user", "content": row["prompt"]}],
             "chosen": [{"role": "assistant", "content": row["chosen"]}],
             "rejected": [{"role": "assistant", "content": row["rejected"]}]} for row in rows]  # fmt: skip


def streamed_pairs(tmp_path, kind: str) -> str:
    """A file of 18 pairs; row 3's prompt alone fills max_length=64 (TRL drops it, and so does fastdpo)."""
    rows = synthetic_pairs(18).to_list()
    rows[3]["prompt"] = " ".join(["word"] * 80) + "?"
    return write_jsonl(tmp_path / f"{kind}.jsonl", rows if kind == "standard" else conversational(rows))


def run(trainer_cls, config_cls, load, tokenizer, tmp_path, name, train, eval_dataset=None, **extra):
    args = config_cls(**{**common_args(tmp_path, name), "eval_strategy": "steps", "eval_steps": 2,
                         "per_device_eval_batch_size": 3, **extra})  # fmt: skip
    trainer = trainer_cls(model=load(), ref_model=load(), args=args, train_dataset=train, eval_dataset=eval_dataset,
                          processing_class=tokenizer)  # fmt: skip
    trainer.train()
    logs = trainer.state.log_history
    evals = {key: value for log in logs for key, value in log.items() if key.endswith("_loss") and "eval" in key}
    return trainer, [log for log in logs if "loss" in log], evals


@pytest.mark.parametrize("kind", ["standard", "conversational"])
def test_a_stream_trains_as_trl_trains_on_it(kind, tmp_path, caplog):
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    path = streamed_pairs(tmp_path, kind)
    evals = lambda: {"held": datasets.load_dataset("json", data_files=path, split="train").select(range(8, 13)),  # noqa: E731
                     "streamed": stream_file(path).skip(13)}  # fmt: skip
    _, theirs, their_evals = run(trl.DPOTrainer, trl.DPOConfig, load, tokenizer, tmp_path, "trl", stream_file(path),
                                 evals())  # fmt: skip
    with caplog.at_level(logging.WARNING, logger="fastdpo"):
        trainer, ours, our_evals = run(DPOTrainer, DPOConfig, load, tokenizer, tmp_path, "ours", stream_file(path),
                                       evals())  # fmt: skip
    assert_first_steps_match(ours, theirs)
    # the eval losses: the same pairs through the same weights (the per-pair metric means are weighted by pairs in
    # fastdpo, by batch in TRL, so only the loss, the Trainer's own mean, is compared)
    assert set(our_evals) == set(their_evals) == {"eval_held_loss", "eval_streamed_loss"}
    for key, value in their_evals.items():
        assert our_evals[key] == pytest.approx(value, rel=1e-4), key
    # two steps of 2 pairs read rows 0-4 (row 3 dropped): counted, once when read and once at the end
    assert trainer.dropped_rows["train"] == {"prompt_fills_max_length": [3]}
    messages = [r.getMessage() for r in caplog.records]
    assert any("train stream: row 3 dropped (prompt_fills_max_length" in m for m in messages), messages
    assert any("train stream: 1 dropped as prompt_fills_max_length (rows 3)" in m for m in messages), messages

    dropin = pytest.importorskip("fastdpo.trl")  # the drop-in prepares streams with TRL's own code
    _, drop, drop_evals = run(dropin.DPOTrainer, trl.DPOConfig, load, tokenizer, tmp_path, "dropin",
                              stream_file(path), evals())  # fmt: skip
    assert_first_steps_match(drop, theirs)
    assert drop_evals == pytest.approx(their_evals, rel=1e-4)


def test_a_stream_is_prepared_into_the_ids_of_a_map_style_dataset(tmp_path, caplog):
    tokenizer = build_tiny_tokenizer()
    # a raw file: columns mapped (input → prompt), the system column joined, scores renamed, as prepare_preferences
    expected = tokenize_preferences(prepare_preferences(FIXTURE, columns={"prompt": "input"}), tokenizer,
                                    max_length=64, max_prompt_length=20, max_completion_length=9).dataset  # fmt: skip
    prepared = prepare_stream(stream_file(FIXTURE), tokenizer, columns={"prompt": "input"}, max_length=64,
                              max_prompt_length=20, max_completion_length=9)  # fmt: skip
    rows = list(prepared.dataset)
    assert len(rows) == len(expected) == 5
    for row, want in zip(rows, expected, strict=True):
        assert {name: row[name] for name in TOKENS} == {name: want[name] for name in TOKENS}
    assert max(len(row["prompt_ids"]) for row in rows) == 20 and max(len(row["chosen_ids"]) for row in rows) == 9
    assert prepared.summary() is None

    # conversations whose roles are out of order are trained on as they are (as TRL does): flagged and counted
    rows = conversational(synthetic_pairs(6).to_list())
    for index in (1, 4):
        rows[index]["chosen"][0]["role"] = "user"
    stream = datasets.Dataset.from_list(rows).to_iterable_dataset()
    with caplog.at_level(logging.WARNING, logger="fastdpo"):
        prepared = prepare_stream(stream, tokenizer, max_length=None, name="eval")
        tokenized = list(prepared.dataset)
    assert len(tokenized) == 6
    # (the template renders the prompt's generation prompt otherwise before a user turn: its end is cut, flagged too)
    assert prepared.flagged_rows == {"roles_out_of_order": [1, 4], "prompt_not_prefix": [1, 4]}
    assert prepared.dropped_rows == {}
    assert sum("eval stream: row 1 trained on as it is (roles_out_of_order" in r.getMessage()
               for r in caplog.records) == 1  # fmt: skip
    assert prepared.summary() == ("eval stream: 2 flagged as roles_out_of_order, trained on (rows 1, 4); 2 flagged as "
                                  "prompt_not_prefix, trained on (rows 1, 4)")  # fmt: skip


def test_each_pass_over_a_stream_counts_its_drops_again():
    # the Trainer reads a stream again once it ends before max_steps: a row dropped twice is counted twice, and said
    rows = synthetic_pairs(6).to_list()
    rows[4]["prompt"] = " ".join(["word"] * 40)
    prepared = prepare_stream(datasets.Dataset.from_list(rows).to_iterable_dataset(), build_tiny_tokenizer(),
                              max_length=32)  # fmt: skip
    assert len(list(prepared.dataset)) == len(list(prepared.dataset)) == 5
    assert prepared.dropped_rows == {"prompt_fills_max_length": [4, 4]}
    assert prepared.summary() == ("train stream: 2 dropped as prompt_fills_max_length (rows 4, 4) (each pass over "
                                  "the stream counts its rows again)")  # fmt: skip


def test_drops_in_dataloader_workers_reach_the_trainers_dropped_rows(tmp_path, capfd, caplog):
    # each worker reads its own copy of the prepared stream, in its own process: it logs its first drop of each kind
    # (to stderr) and writes its rows back; they were missing from dropped_rows (and dropped_rows.json), a warning
    # said so. Two files are two shards: one a worker, each numbering the rows it reads from 0
    import gc

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    rows = synthetic_pairs(18).to_list()
    rows[3]["prompt"] = " ".join(["word"] * 80) + "?"  # alone fills max_length=64: dropped, as TRL drops it
    rows[9 + 5]["chosen"] = ""  # refused; under stream_bad_rows="drop" dropped as the quality check's "empty"
    files = [write_jsonl(tmp_path / f"part{i}.jsonl", rows[9 * i : 9 * (i + 1)]) for i in range(2)]
    handler = logging.StreamHandler()  # stderr, which the workers' processes share
    logging.getLogger("fastdpo").addHandler(handler)
    try:
        args = DPOConfig(**{**common_args(tmp_path, "workers"), "dataloader_num_workers": 2,
                            "stream_bad_rows": "drop"})  # fmt: skip
        stream = datasets.load_dataset("json", data_files=files, split="train", streaming=True)
        trainer = DPOTrainer(model=load(), ref_model=load(), args=args, processing_class=tokenizer,
                             train_dataset=stream)  # fmt: skip
        with caplog.at_level(logging.WARNING, logger="fastdpo"):
            trainer.train()
    finally:
        logging.getLogger("fastdpo").removeHandler(handler)
    err = capfd.readouterr().err
    assert "dataloader worker 0: train stream: row 3 of the shards it reads dropped (prompt_fills_max_length" in err
    assert "dataloader worker 1: train stream: row 5 of the shards it reads dropped (empty" in err
    assert trainer.dropped_rows["train"] == {}  # (this process read no row)
    assert trainer.dropped_rows["train (dataloader worker 0)"] == {"prompt_fills_max_length": [3]}
    assert trainer.dropped_rows["train (dataloader worker 1)"] == {"empty": [5]}
    messages = [r.getMessage() for r in caplog.records]
    assert ("train stream: dataloader worker 0: 1 dropped as prompt_fills_max_length (its rows 3); dataloader worker "
            "1: 1 dropped as empty (its rows 5)") in messages, messages  # fmt: skip
    spool = trainer._streams[0].spool
    assert os.path.isdir(spool)
    del trainer
    gc.collect()
    assert not os.path.exists(spool)  # (the workers' notes go with the stream)


def test_worker_notes_survive_a_lost_folder_and_a_cut_line(tmp_path, monkeypatch, caplog):
    # the spool removed under a running worker (a cleaner of /tmp) stopped training with a FileNotFoundError; a line a
    # killed worker cut short, appended to by the next pass's worker, made train() raise after its last step
    import torch

    prepared = prepare_stream(synthetic_pairs(4).to_iterable_dataset(), build_tiny_tokenizer())
    prepared.share_with_workers()
    (Path(prepared.spool) / "worker-1.jsonl").write_text(
        '["dropped", "empty", 3]\n["dropped", "emp["dropped", "empty", 9]\n["flagged", "identical_tokens", 5]\n'
        '["dropped", "empty", 1'  # (being written: read next time)
    )
    (Path(prepared.spool) / ".nfs0000000001").write_text("not a worker's")  # (a name that is not a worker's: skipped)
    assert prepared.collect_workers() == {1: {"dropped": {"empty": [3]}, "flagged": {"identical_tokens": [5]}}}
    shutil.rmtree(prepared.spool)
    assert prepared.collect_workers() == {1: {"dropped": {"empty": [3]}, "flagged": {"identical_tokens": [5]}}}
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: type("Info", (), {"id": 1})())  # (a worker's)
    with caplog.at_level(logging.WARNING, logger="fastdpo"):
        prepared.note("dropped", "empty", 12, "an empty answer")
        prepared.note("dropped", "empty", 13, "an empty answer")
    assert prepared.dropped_rows == {"empty": [12, 13]}  # (counted in the worker, as before)
    messages = [r.getMessage() for r in caplog.records]
    assert sum("cannot be written back to the trainer any more" in m for m in messages) == 1, messages


def test_an_evaluation_alone_collects_its_workers_drops(tmp_path):
    # the worker's log said the trainer counts its rows "when training ends": evaluate() outside train() never did
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    args = DPOConfig(**{**common_args(tmp_path, "eval_workers"), "dataloader_num_workers": 1,
                        "per_device_eval_batch_size": 3})  # fmt: skip
    trainer = DPOTrainer(model=load(), ref_model=load(), args=args, processing_class=tokenizer,
                         train_dataset=synthetic_pairs(4),
                         eval_dataset=stream_file(streamed_pairs(tmp_path, "standard")))  # fmt: skip
    trainer.evaluate()
    assert trainer.dropped_rows["eval (dataloader worker 0)"] == {"prompt_fills_max_length": [3]}


def test_a_prepared_stream_pickles_for_workers_started_by_spawn():
    # macOS's start method (and forkserver, Python 3.14's on Linux) sends the dataset to the workers pickled: the
    # stream's lambdas failed there ("Can't pickle local object 'prepare_stream.<locals>.<lambda>'")
    import pickle

    import torch

    rows = synthetic_pairs(6).to_list()
    rows[2]["prompt"] = " ".join(["word"] * 40)
    rows[4]["chosen"] = ""
    prepared = prepare_stream(datasets.Dataset.from_list(rows).to_iterable_dataset(), build_tiny_tokenizer(),
                              max_length=32, bad_rows="drop")  # fmt: skip
    prepared.share_with_workers()
    loader = torch.utils.data.DataLoader(prepared.dataset, batch_size=None, num_workers=1,
                                         multiprocessing_context="spawn")  # fmt: skip
    assert len(list(loader)) == 4
    assert prepared.collect_workers() == {0: {"dropped": {"prompt_fills_max_length": [2], "empty": [4]}}}
    tokenized = datasets.Dataset.from_list(list(prepared.dataset)).to_iterable_dataset()
    pickle.dumps(prepare_tokenized_stream(tokenized, max_length=32).dataset)
    texts = datasets.Dataset.from_list([{"question": "q?", "answer": " a."}] * 3).to_iterable_dataset()
    pickle.dumps(prepare_sft_stream(texts, build_tiny_tokenizer(), formatting_func=formatted_question).dataset)


def formatted_question(row: dict) -> str:
    return row["question"] + row["answer"]


def test_bad_rows_of_a_stream_fail_where_they_are_read(tmp_path):
    tokenizer = build_tiny_tokenizer()
    rows = synthetic_pairs(150).to_list()
    rows[100]["chosen"] = None  # in the second batch of rows the stream tokenizes together (STREAM_BATCH)
    prepared = prepare_stream(stream_file(write_jsonl(tmp_path / "bad.jsonl", rows)), tokenizer)
    read = []
    message = "row 100, column 'chosen': expected a string as the data's answers are, got None"
    with pytest.raises(DataError, match=message) as e:
        read.extend(prepared.dataset)
    assert len(read) == STREAM_BATCH  # the rows before the bad one's batch were trained on
    assert f"its text begins {rows[100]['prompt'][:60]!r}" in str(e.value)  # to find it in a shuffled stream

    messages = conversational(synthetic_pairs(4).to_list())
    del messages[2]["rejected"][0]["role"]
    stream = datasets.Dataset.from_list(messages).to_iterable_dataset()
    with pytest.raises(DataError, match="row 2, column 'rejected': message 0: no role: not a message fastdpo takes"):
        list(prepare_stream(stream, tokenizer).dataset)

    def rows_without_features():  # a generator's stream: no features, and a row may lack a column
        yield {"prompt": "a?", "chosen": " b.", "rejected": " c."}
        yield {"prompt": "d?", "chosen": " e."}

    stream = datasets.IterableDataset.from_generator(rows_without_features)
    with pytest.raises(DataError, match="row 1, column 'rejected': expected a string as the data's answers are, got"):
        list(prepare_stream(stream, tokenizer).dataset)

    empty = datasets.Dataset.from_list(rows).to_iterable_dataset().filter(lambda row: False)
    with pytest.raises(DataError, match="the train stream has no rows"):
        prepare_stream(empty, tokenizer)
    with pytest.raises(DataError, match="column 'chosen': column not found.*did you mean 'chosen_text'"):
        prepare_stream(datasets.Dataset.from_list([{"prompt": "a", "chosen_text": "b", "rejected": "c"}])
                       .to_iterable_dataset(), tokenizer)  # fmt: skip


def generated(rows: list[dict]):
    """A generator's stream: no features, and a row may lack a column another row has."""
    return datasets.IterableDataset.from_generator(lambda: iter(rows))


def test_rows_that_lack_a_renamed_column_read_as_map_style_rows_do(tmp_path):
    tokenizer = build_tiny_tokenizer()
    # a score alias (score_chosen → chosen_score) that a later row lacks: None there, as in a map-style dataset
    rows = [{"prompt": "a?", "chosen": " b.", "rejected": " c.", "score_chosen": 9.0},
            {"prompt": "d?", "chosen": " e.", "rejected": " f."}]  # fmt: skip
    expected = tokenize_preferences(prepare_preferences(rows), tokenizer).dataset
    got = list(prepare_stream(generated(rows), tokenizer).dataset)
    assert [{name: row[name] for name in TOKENS} for row in got] == expected.select_columns(list(TOKENS)).to_list()
    assert [row["chosen_score"] for row in got] == [9.0, None] and "score_chosen" not in got[0]
    # a mapped column a later row lacks: the row's one DataError, where the map-style path finds it
    mapped = [{"prompt": "a?", "good": " b.", "rejected": " c."}, {"prompt": "d?", "rejected": " f."}]
    with pytest.raises(DataError) as map_style:
        prepare_preferences(mapped, columns={"chosen": "good"})
    with pytest.raises(DataError) as streamed:
        list(prepare_stream(generated(mapped), tokenizer, columns={"chosen": "good"}).dataset)
    assert (streamed.value.row, streamed.value.column) == (map_style.value.row, map_style.value.column) == (1, "chosen")
    # a column map that moves "input" (itself a column joined into the prompt) does not join it a second time
    inputs = [{"input": "What is 2+2?", "chosen": " 4", "rejected": " 5"}]
    expected = tokenize_preferences(prepare_preferences(inputs, columns={"prompt": "input"}), tokenizer).dataset
    got = list(prepare_stream(generated(inputs), tokenizer, columns={"prompt": "input"}).dataset)
    assert got[0]["prompt_ids"] == expected[0]["prompt_ids"]


def test_interleaved_streams_whose_columns_differ_train_as_in_trl(tmp_path):
    # datasets' batched map joins the sources' Arrow tables and fails when their columns differ in set or order;
    # the stream is normalized row by row first
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    rows = synthetic_pairs(12).to_list()

    def interleaved():
        plain = datasets.Dataset.from_list(rows[:6]).to_iterable_dataset()
        reordered = [{"source": "b", "rejected": r["rejected"], "chosen": r["chosen"], "prompt": r["prompt"]}
                     for r in rows[6:]]  # fmt: skip
        other = datasets.Dataset.from_list(reordered).to_iterable_dataset()
        return datasets.interleave_datasets([plain, other])

    order = [row["prompt"] for row in interleaved()]
    expected = tokenize_preferences(prepare_preferences([next(r for r in rows if r["prompt"] == p) for p in order]),
                                    tokenizer, max_length=64).dataset  # fmt: skip
    got = list(prepare_stream(interleaved(), tokenizer, max_length=64).dataset)
    assert [{name: row[name] for name in TOKENS} for row in got] == expected.select_columns(list(TOKENS)).to_list()
    _, theirs, _ = run(trl.DPOTrainer, trl.DPOConfig, load, tokenizer, tmp_path, "trl", interleaved(),
                       eval_strategy="no")  # fmt: skip
    _, ours, _ = run(DPOTrainer, DPOConfig, load, tokenizer, tmp_path, "ours", interleaved(), eval_strategy="no")
    assert_first_steps_match(ours, theirs)


def test_what_a_stream_cannot_do_is_refused_with_the_option_to_change(tmp_path):
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    stream = synthetic_pairs(8).to_iterable_dataset()

    def trainer(**options):
        args = DPOConfig(**{**common_args(tmp_path, "x"), **options})
        return DPOTrainer(model=load(), args=args, train_dataset=stream, processing_class=tokenizer)

    with pytest.raises(ConfigError, match="option 'max_steps': an iterable train dataset has no length"):
        trainer(max_steps=-1)
    with pytest.raises(ConfigError, match="option 'precompute_ref_log_probs'.*without streaming=True"):
        trainer(precompute_ref_log_probs=True)
    with pytest.raises(ConfigError, match="option 'max_tokens_per_batch'.*per_device_train_batch_size"):
        trainer(max_tokens_per_batch=256)
    # a stream that is already tokenized (TRL's columns) is taken as it is, and accelerate reads it per process
    tokenized = tokenize_preferences(synthetic_pairs(8), tokenizer, max_length=64).dataset
    args = DPOConfig(**common_args(tmp_path, "y"))
    ready = DPOTrainer(model=load(), args=args, train_dataset=tokenized.to_iterable_dataset(),
                       processing_class=tokenizer)  # fmt: skip
    assert ready.args.accelerator_config.dispatch_batches is False
    assert ready.dropped_rows == {"train": {}}  # (filled as the stream is read: its keep_start drop)
    ready.train()
    assert ready.state.global_step == 2


@pytest.mark.parametrize("streamed", [False, True])
def test_rows_tokenized_before_lose_the_prompts_that_fill_max_length(streamed, tmp_path):
    # a dataset tokenized without max_length (tokenize_preferences(max_length=None), saved), trained with one: the
    # rows whose prompt fills it (TRL's prepare drops them) were kept, and the step that met one failed in the
    # collator ("no completion token to learn from"), naming the row's place in its batch, not the dataset's row
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    rows = synthetic_pairs(6).to_list()
    rows[4]["prompt"] = " ".join(["word"] * 40)
    tokenized = tokenize_preferences(datasets.Dataset.from_list(rows), tokenizer, max_length=None).dataset
    args = DPOConfig(**{**common_args(tmp_path, "pre"), "max_length": 32, "max_steps": 3})  # (other prompts: 8-26)
    data = tokenized.to_iterable_dataset() if streamed else tokenized
    trainer = DPOTrainer(model=load(), args=args, train_dataset=data, processing_class=tokenizer)
    trainer.train()  # 5 pairs: 3 steps of 2 take the stream's rows 0-5 (row 4 dropped, as it is read)
    assert trainer.dropped_rows["train"] == {"prompt_fills_max_length": [4]}
    assert trainer.state.global_step == 3


# ------------------------------------------------------------------------------------------------------------- SFT

SFT_STREAM_CASES = ["packed_prompt_completion", "messages_with_eval", "grad_accumulation", "tokenized_split_shuffled",
                    "label_smoothing"]  # fmt: skip


@pytest.mark.parametrize("case", SFT_STREAM_CASES)
def test_sft_on_a_stream_takes_trls_steps(case, tmp_path):
    # TRL's SFT parity cases (tests/test_train_sft.py), each dataset streamed: packed as read, block by block
    # (shuffled before packing and after, when asked), truncated rows dropped and counted, eval streams too
    from test_train_sft import CASES, tokenized_rows, train
    from test_train_sft import assert_first_steps_match as assert_sft_steps_match

    from fastdpo.train import SFTConfig, SFTTrainer

    tokenizer = build_tiny_tokenizer()
    load = sft_model(tokenizer, tmp_path)
    data, options = CASES[case]
    data = tokenized_rows(tokenizer, 12) if data is None else data
    options = dict(options)
    if case == "packed_prompt_completion":  # the stream's first rows: no token predicted right (accuracy 0 proves
        options["shuffle_dataset"] = True  # little); shuffled by the stream's own buffer before packing, some are
    streams = lambda: {"eval_data": options["eval_data"].to_iterable_dataset()} if "eval_data" in options else {}  # noqa: E731
    trainer, ours = train(SFTTrainer, SFTConfig, load, data.to_iterable_dataset(), tokenizer, tmp_path, "ours",
                          **{**options, **streams()})  # fmt: skip
    _, theirs = train(trl.SFTTrainer, trl.SFTConfig, load, data.to_iterable_dataset(), tokenizer, tmp_path, "trl",
                      **{**options, **streams()})  # fmt: skip
    assert_sft_steps_match(ours, theirs, eval_data="eval_data" in options)
    if case in ("grad_accumulation", "label_smoothing"):  # row 3's prompt fills max_length: TRL drops it too
        assert trainer.dropped_rows["train"] == {"no_labels_after_truncation": [3]}
    if case == "messages_with_eval":
        dropin = pytest.importorskip("fastdpo.trl")  # TRL prepares the stream, fastdpo trains on it
        _, drop = train(dropin.SFTTrainer, trl.SFTConfig, load, data.to_iterable_dataset(), tokenizer, tmp_path,
                        "dropin", **{**options, **streams()})  # fmt: skip
        theirs_again = train(trl.SFTTrainer, trl.SFTConfig, load, data.to_iterable_dataset(), tokenizer, tmp_path,
                             "trl2", **{**options, **streams()})[1]  # fmt: skip
        assert_sft_steps_match(drop, theirs_again, eval_data=True)


def sft_model(tokenizer, tmp_path):
    import torch
    from test_train_sft import tiny_llama_config
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tokenizer)).save_pretrained(tmp_path / "sft_model")
    return lambda: LlamaForCausalLM.from_pretrained(tmp_path / "sft_model", dtype=torch.float32)


def test_sft_streams_are_checked_row_by_row_and_refuse_what_they_cannot_do(tmp_path):
    from fastdpo.data import prepare_sft, tokenize_sft
    from fastdpo.data.stream import prepare_sft_stream
    from fastdpo.train import SFTConfig, SFTTrainer

    tokenizer = build_tiny_tokenizer()
    # a row that lacks the layout's column: the map-style path's DataError at that row, not a KeyError
    lacking = {"text": [{"text": "hello there"}, {"other": "x"}],
               "messages": [{"messages": [{"role": "user", "content": "hi"}]}, {"other": "x"}],
               "sharegpt": [{"conversations": [{"from": "human", "value": "hi"}]}, {"other": "x"}],
               "prompt_completion": [{"prompt": "a", "completion": " b"}, {"prompt": "c"}]}  # fmt: skip
    for layout, rows in lacking.items():
        with pytest.raises(DataError) as map_style:
            tokenize_sft(prepare_sft(rows), tokenizer)
        with pytest.raises(DataError) as streamed:
            list(prepare_sft_stream(generated(rows), tokenizer).dataset)
        assert streamed.value.row == map_style.value.row == 1, layout
        assert streamed.value.column == map_style.value.column, (layout, str(streamed.value), str(map_style.value))
    sharegpt = [{"conversations": [{"from": "user", "value": f"question {i}"}, {"from": "assistant", "value": "ok"}]}
                for i in range(5)]  # fmt: skip
    sharegpt[2]["conversations"] = [{"from": "user", "value": "no answer"}, {"from": "assistant"}]
    prepared = prepare_sft_stream(datasets.Dataset.from_list(sharegpt).to_iterable_dataset(), tokenizer)
    with pytest.raises(DataError, match="row 2, column 'messages': message 1 \\(assistant\\) has no 'content'"):
        list(prepared.dataset)
    texts = datasets.Dataset.from_list([{"body": f"text {i}"} for i in range(3)]).to_iterable_dataset()
    rows = list(prepare_sft_stream(texts, tokenizer, text_field="body").dataset)
    expected = [tokenizer(f"text {i}{tokenizer.eos_token}")["input_ids"] for i in range(3)]
    assert [row["input_ids"] for row in rows] == [row["labels"] for row in rows] == expected
    pairs = datasets.Dataset.from_list([{"prompt": "Hi?", "completion": " Yo."}]).to_iterable_dataset()
    rows = list(prepare_sft_stream(pairs, tokenizer, text_field="body").dataset)  # not read (TRL's order)
    assert rows[0]["input_ids"] == tokenizer(f"Hi? Yo.{tokenizer.eos_token}")["input_ids"]

    args = SFTConfig(output_dir=str(tmp_path / "x"), max_steps=-1, report_to=[], bf16=False)
    with pytest.raises(ConfigError, match="option 'max_steps': an iterable train dataset has no length"):
        SFTTrainer(sft_model(tokenizer, tmp_path)(), args=args, train_dataset=texts.rename_column("body", "text"),
                   processing_class=tokenizer)  # fmt: skip


def test_an_sft_eval_set_keyed_train_is_evaluated_as_an_eval_set(tmp_path):
    # eval_dataset={"train": ...}: named eval_train (as DPOTrainer names it), not taken for the train set's checks
    # and counts; evaluated as TRL evaluates it
    from test_train_sft import prompt_completion_rows, train

    from fastdpo.train import SFTConfig, SFTTrainer

    tokenizer = build_tiny_tokenizer()
    load = sft_model(tokenizer, tmp_path)
    evals = lambda: {"train": prompt_completion_rows(6, seed=9).to_iterable_dataset()}  # noqa: E731
    data = prompt_completion_rows(12)
    trainer, ours = train(SFTTrainer, SFTConfig, load, data.to_iterable_dataset(), tokenizer, tmp_path, "ours",
                          eval_data=evals(), packing=False)  # fmt: skip
    _, theirs = train(trl.SFTTrainer, trl.SFTConfig, load, data.to_iterable_dataset(), tokenizer, tmp_path, "trl",
                      eval_data=evals(), packing=False)  # fmt: skip
    assert ours[-1]["eval_train_loss"] == pytest.approx(theirs[-1]["eval_train_loss"], rel=1e-4)
    # row 3 of each is longer than max_length: dropped and counted under its own set's name
    assert trainer.dropped_rows == {"train": {"no_labels_after_truncation": [3]},
                                    "eval_train": {"no_labels_after_truncation": [3]}}  # fmt: skip


def test_an_eval_stream_beside_a_map_style_train_set_is_evaluated(tmp_path):
    # accelerate dispatched an eval stream's batches (only a train stream was undispatched): a packed batch cannot be
    # concatenated, and every trainer failed at its first evaluation, where TRL evaluates
    from test_train_sft import common_args as sft_args
    from test_train_sft import prompt_completion_rows

    import fastdpo.trl as dropin
    from fastdpo.train import SFTConfig, SFTTrainer

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    pairs, rows = synthetic_pairs(6), prompt_completion_rows(6)
    losses = {}
    for name, trainer_cls, config_cls in (("ours", DPOTrainer, DPOConfig), ("dropin", dropin.DPOTrainer,
                                          trl.DPOConfig), ("trl", trl.DPOTrainer, trl.DPOConfig)):  # fmt: skip
        _, _, evals = run(trainer_cls, config_cls, load, tokenizer, tmp_path, name, pairs, pairs.to_iterable_dataset(),
                          max_steps=2)  # fmt: skip
        losses[name] = evals["eval_loss"]
    # (after two steps at lr 1e-2: fp32 sums in another order, 1e-4 as the parity tests above)
    assert losses["ours"] == pytest.approx(losses["trl"], rel=1e-4)
    assert losses["dropin"] == pytest.approx(losses["trl"], rel=1e-4)
    for trainer_cls, config_cls in ((SFTTrainer, SFTConfig), (dropin.SFTTrainer, trl.SFTConfig)):
        args = config_cls(**sft_args(tmp_path, "sft", packing=False, eval_strategy="steps", eval_steps=1, max_steps=1))
        trainer = trainer_cls(model=load(), args=args, train_dataset=rows, eval_dataset=rows.to_iterable_dataset(),
                              processing_class=tokenizer)  # fmt: skip
        trainer.train()
        assert any("eval_loss" in log for log in trainer.state.log_history)


def test_a_formatting_function_trl_would_not_read_is_refused_on_a_stream_as_on_a_dataset(tmp_path):
    # a stream applied the function after the check that refuses it map-style: messages rows trained on the chat,
    # the function silently unused; text rows under another dataset_text_field hit a misleading 'text' collision
    from test_train_sft import common_args as sft_args

    from fastdpo.train import SFTConfig, SFTTrainer

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    said = [[{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}] for i in range(4)]
    chats = datasets.Dataset.from_list([{"messages": messages} for messages in said])
    bodies = datasets.Dataset.from_list([{"body": f"hello {i}"} for i in range(4)])
    for rows, field in ((chats, "text"), (bodies, "body")):
        args = SFTConfig(**sft_args(tmp_path, "fmt", packing=False, dataset_text_field=field))
        for given in (rows, rows.to_iterable_dataset()):
            with pytest.raises(ConfigError, match="option 'formatting_func': its text would not be read"):
                SFTTrainer(load(), args=args, train_dataset=given, processing_class=tokenizer,
                           formatting_func=lambda row: "formatted")  # fmt: skip


def test_a_train_stream_whose_every_row_is_dropped_is_an_error_not_a_finished_run(tmp_path):
    # it ended at step 0 with warnings, and the CLI saved the untrained model as the run's result (exit 0), where a
    # map-style dataset with no row left is refused
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    long = " ".join(["word"] * 70)  # the prompt alone fills max_length=64: TRL drops the row, as fastdpo does
    rows = datasets.Dataset.from_list(
        [{"prompt": f"Q {i}? {long}", "chosen": " y.", "rejected": " n."} for i in range(6)]
    )
    trainer = DPOTrainer(load(), ref_model=load(), args=DPOConfig(**common_args(tmp_path, "dropped")),
                         train_dataset=rows.to_iterable_dataset(), processing_class=tokenizer)  # fmt: skip
    with pytest.raises(DataError, match="option 'train_dataset': the train stream gave no batch: every row read was") \
            as raised:  # fmt: skip
        trainer.train()
    assert trainer.dropped_rows["train"] == {"prompt_fills_max_length": list(range(6))}
    # its reasons said (where a stream's first row's format had every other row dropped, "raise max_length" misled)
    assert "dropped: {'prompt_fills_max_length': 6}" in str(raised.value) and "rows whose prompt fills it" in str(
        raised.value)  # fmt: skip


def test_a_stream_counts_written_message_lists_and_repeated_prompts(caplog):
    # a stream's rows are read as training goes: the two warnings prepare_preferences gives over the whole set were
    # never given for a stream; its rows are counted under flagged_rows and logged at the first of each
    written = json.dumps([{"role": "user", "content": "2+2?"}])
    prompt = "\n\nHuman: Sky?\n\nAssistant:"
    pairs = [
        {"prompt": "Sky?", "chosen": " Blue.", "rejected": " Green."},
        {"prompt": written, "chosen": "4", "rejected": "5"},
        {"prompt": prompt, "chosen": prompt + " Blue.", "rejected": prompt + " Green."},
        {"prompt": "p", "chosen": str([{"role": "assistant", "content": "4"}]), "rejected": "[{ a bracket"},
    ]
    with caplog.at_level(logging.WARNING, logger="fastdpo.data.stream"):
        stream = prepare_stream(datasets.Dataset.from_list(pairs).to_iterable_dataset(), build_tiny_tokenizer(),
                                max_length=None)  # fmt: skip
        assert len(list(stream.dataset)) == 4  # (trained on as they are)
    assert stream.flagged_rows == {"messages_written_as_text": [1, 3], "prompt_repeated_in_completions": [2]}
    assert "train stream: row 1 trained on as it is (messages_written_as_text: a message list written as text" \
        in caplog.text  # fmt: skip
    assert "2 flagged as messages_written_as_text, trained on (rows 1, 3)" in stream.summary()
