"""SFT packing: the rows TRL 1.16's pack_dataset makes, and pack_sft's PackedBatch of single sequences or rows."""

from __future__ import annotations

import random

import datasets
import pytest
import torch

from fastdpo.data import pack
from fastdpo.data.packing import IGNORE_INDEX, bfd_bins_fifo, pack_sft, pack_sft_dataset
from fastdpo.errors import ConfigError, DataError

datasets.disable_progress_bars()


def random_tokenized(seed: int, count: int, longest: int) -> datasets.Dataset:
    rng = random.Random(seed)
    ids = [[rng.randint(0, 99) for _ in range(rng.randint(0, longest))] for _ in range(count)]
    labels = [[t if rng.random() < 0.6 else IGNORE_INDEX for t in row] for row in ids]
    return datasets.Dataset.from_dict({"input_ids": ids, "labels": labels, "other": list(range(count))})


@pytest.mark.parametrize("strategy", ["bfd", "bfd_split", "wrapped"])
def test_rows_equal_trls_pack_dataset(strategy):
    data_utils = pytest.importorskip("trl.data_utils")
    for seed in range(30):
        capacity = random.Random(seed).randint(3, 25)
        data = random_tokenized(seed, count=random.Random(seed + 1).randint(1, 50), longest=2 * capacity)
        theirs = data_utils.pack_dataset(data.select_columns(["input_ids", "labels"]), capacity, strategy)
        assert pack_sft_dataset(data, capacity, strategy=strategy).to_dict() == theirs.to_dict(), seed


def test_blocks_of_a_thousand_rows_and_worker_shards_as_trl():
    data_utils = pytest.importorskip("trl.data_utils")
    data = random_tokenized(0, count=2300, longest=12)
    for num_proc in (None, 2):  # rows are packed block by block, per worker shard: the blocks change with num_proc
        theirs = data_utils.pack_dataset(
            data.select_columns(["input_ids", "labels"]), 16, "bfd", {"num_proc": num_proc}
        )
        assert pack_sft_dataset(data, 16, num_proc=num_proc).to_dict() == theirs.to_dict(), num_proc


def test_a_stream_of_several_shards_shuffled_after_packing_gives_trls_rows_in_trls_order():
    # the stream was packed in Python's format, TRL's in Arrow's: the same bins, but a shuffle after them (TRL's
    # shuffle_dataset) ordered a stream of several shards otherwise, and the steps trained other rows than TRL's
    data_utils = pytest.importorskip("trl.data_utils")
    data = random_tokenized(4, count=40, longest=10).select_columns(["input_ids", "labels"])
    for strategy in ("bfd", "wrapped"):
        streams = [data.to_iterable_dataset(num_shards=2).shuffle(seed=0) for _ in range(2)]
        theirs = data_utils.pack_dataset(streams[0], 12, strategy).shuffle(seed=0)
        ours = pack_sft_dataset(streams[1], 12, strategy=strategy).shuffle(seed=0)
        assert list(ours) == list(theirs), strategy


def test_trls_tie_break_differs_from_lowest_bin_index():
    # bins 5 and 6 both come to have room 1; bin 6 got there first, so TRL puts the first 1-token item there
    lengths = [7, 1, 2, 9, 2, 6, 1, 9, 4, 1, 2, 7, 7, 2, 4, 2, 9, 7, 1, 2, 4]
    fifo, lowest = bfd_bins_fifo(lengths, 9), pack(lengths, 9, backend="python")
    assert fifo[7] == [5, 15, 6] and fifo[8] == [8, 14, 1]
    assert lowest[7] == [5, 15, 1] and lowest[8] == [8, 14, 6]
    data_utils = pytest.importorskip("trl.data_utils")
    data = datasets.Dataset.from_dict({"input_ids": [[i] * n for i, n in enumerate(lengths)]})
    rows = data_utils.pack_dataset(data, 9, "bfd")["input_ids"]
    assert [sorted(set(row), key=row.index) for row in rows] == fifo


def test_single_sequences_are_packed_with_shifted_labels_as_targets():
    examples = [
        {"input_ids": [1, 2, 3, 4], "labels": [-100, -100, 3, 4]},
        {"input_ids": [5, 6], "labels": [5, 6]},
        {"input_ids": [7, 8, 9]},
    ]  # the last one has no labels: every token is one
    batch = pack_sft(examples, pack_length=5, pad_token_id=0, backend="python")
    # best-fit-decreasing into rows of 5: [seq 0] + padding, [seq 2, seq 1]
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 0], [7, 8, 9, 5, 6]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 0, 1]]
    assert batch.targets.tolist() == [[-100, 3, 4, -100, -100], [8, 9, -100, 6, -100]]
    assert batch.cu_seqlens.tolist() == [0, 4, 5, 8, 10] and batch.max_seqlen == 4
    assert batch.seq_pair.tolist() == [0, -1, 1, 2] and batch.pair_ids == [0, 2, 1]
    assert batch.seq_is_chosen.tolist() == [True, False, True, True]
    assert batch.num_padding == 1 and batch.padding_fraction == pytest.approx(0.1)
    # the capacity grows to the longest sequence; rows round up to a multiple
    wide = pack_sft(examples, pack_length=None, pad_to_multiple_of=8)
    assert wide.input_ids.shape == (3, 8) and wide.num_padding == 24 - 9


def test_packed_rows_keep_their_sequences():
    rows = [{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, -100, 4, 5], "seq_lengths": [3, 2]},
            {"input_ids": [6, 7], "labels": [6, 7], "seq_lengths": [2]}]  # fmt: skip
    batch = pack_sft(rows, pack_length=1)  # rows given: pack_length plays no part
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    assert batch.targets.tolist() == [[2, -100, -100, 5, -100], [7, -100, -100, -100, -100]]
    assert batch.pair_ids == [0, 0, 1] and batch.num_padding == 3


@pytest.mark.parametrize(
    ("examples", "column"),
    [([{"input_ids": [1, 2], "labels": [1]}], "labels"),
     ([{"input_ids": [1, 2], "seq_lengths": [1, 2]}], "seq_lengths"),
     ([{"input_ids": []}], "input_ids")],
)  # fmt: skip
def test_bad_examples_name_the_column(examples, column):
    with pytest.raises(DataError, match=f"column '{column}'"):
        pack_sft(examples)


def test_bad_packing_options():
    data = random_tokenized(0, count=3, longest=4)
    with pytest.raises(ConfigError, match="option 'packing_strategy'"):
        pack_sft_dataset(data, 8, strategy="bdf")
    with pytest.raises(ConfigError, match="option 'max_length'"):
        pack_sft_dataset(data, 0)
    with pytest.raises(DataError, match="no sequences"):
        pack_sft([])
    assert torch.equal(pack_sft([{"input_ids": [3]}]).targets, torch.tensor([[IGNORE_INDEX]]))


def test_rows_packed_before_and_longer_than_max_length_are_refused(tmp_path):
    # a dataset TRL's pack_dataset packed at 32 tokens, trained with max_length=16: the native trainer trained on
    # the whole rows (63 tokens in step 0, TRL 32); the drop-in failed on seq_lengths TRL had not cut, saying nothing
    # of why
    from test_train_sft import common_args, prompt_completion_rows, tiny_llama_config
    from tiny_tokenizer import build_tiny_tokenizer
    from transformers import LlamaForCausalLM

    from fastdpo.data import tokenize_sft
    from fastdpo.train import SFTConfig, SFTTrainer

    data_utils = pytest.importorskip("trl.data_utils")
    dropin = pytest.importorskip("fastdpo.trl")
    tokenizer = build_tiny_tokenizer()
    tokenized = tokenize_sft(prompt_completion_rows(12), tokenizer, max_length=None).dataset
    packed = data_utils.pack_dataset(tokenized.select_columns(["input_ids", "labels"]), 32, "bfd")
    longest = max(len(ids) for ids in packed["input_ids"])
    assert longest > 16
    args = SFTConfig(**common_args(tmp_path, "native", max_length=16, packing=False))
    with pytest.raises(DataError, match=r"column 'seq_lengths': a train row packed before, of \d+ tokens, longer "
                       r"than max_length 16: packed rows are trained on as they are"):  # fmt: skip
        SFTTrainer(LlamaForCausalLM(tiny_llama_config(tokenizer)), args=args, train_dataset=packed,
                   processing_class=tokenizer)  # fmt: skip
    args = SFTConfig(**common_args(tmp_path, "native", max_length=32, packing=False))
    SFTTrainer(
        LlamaForCausalLM(tiny_llama_config(tokenizer)), args=args, train_dataset=packed, processing_class=tokenizer
    )  # rows that fit: taken as they are
    args = SFTConfig(**common_args(tmp_path, "stream", max_length=16, packing=False, max_steps=2))
    trainer = SFTTrainer(LlamaForCausalLM(tiny_llama_config(tokenizer)), args=args,
                         train_dataset=packed.to_iterable_dataset(), processing_class=tokenizer)  # fmt: skip
    row = next(i for i, ids in enumerate(packed["input_ids"]) if len(ids) > 16)
    with pytest.raises(DataError, match=rf"^row {row}, column 'seq_lengths': a train row packed before"):
        trainer.train()  # a stream: as it is read (its rows were trained on whole)
    trl = pytest.importorskip("trl")
    args = trl.SFTConfig(**common_args(tmp_path, "dropin", max_length=16, packing=False))
    trainer = dropin.SFTTrainer(LlamaForCausalLM(tiny_llama_config(tokenizer)), args=args, train_dataset=packed,
                                processing_class=tokenizer)  # fmt: skip
    with pytest.raises(DataError, match=r"column 'seq_lengths': adds up to \d+, not 16 tokens .*\(TRL cuts input_ids, "
                       r"not seq_lengths"):  # fmt: skip
        next(iter(trainer.get_train_dataloader()))
