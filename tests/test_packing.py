"""pack_pairs: whole pairs in rows, positions restarting, next-token targets on completions only, segments."""

from __future__ import annotations

import itertools

import pytest
import torch

from fastdpo.data.packing import IGNORE_INDEX, default_pack_length, pack_pairs
from fastdpo.data.tokenize import truncate
from fastdpo.errors import ConfigError, DataError


def pair(prompt: int, chosen: int, rejected: int, start: int = 1) -> dict:
    """Token ids that say where they come from: prompt 1xx, chosen 2xx, rejected 3xx (+ start offset)."""
    return {
        "prompt_ids": [100 * start + i for i in range(prompt)],
        "chosen_ids": [200 * start + i for i in range(chosen)],
        "rejected_ids": [300 * start + i for i in range(rejected)],
    }


EXAMPLES = [pair(3, 2, 4, 1), pair(5, 3, 1, 2), pair(2, 6, 2, 3), pair(1, 1, 1, 4)]


def sequences_of(batch):
    """Each segment's tokens, read back through cu_seqlens over the flattened rows."""
    flat = batch.input_ids.reshape(-1)
    bounds = batch.cu_seqlens.tolist()
    return [flat[a:b].tolist() for a, b in itertools.pairwise(bounds)]


def test_every_sequence_is_whole_and_restarts_its_positions():
    batch = pack_pairs(EXAMPLES, pack_length=16, backend="python")
    seqs = sequences_of(batch)
    flat_pos = batch.position_ids.reshape(-1)
    bounds = batch.cu_seqlens.tolist()
    for s, (a, b) in enumerate(itertools.pairwise(bounds)):
        assert flat_pos[a:b].tolist() == list(range(b - a))  # restart at 0 in every segment, padding included
        pair_index = int(batch.seq_pair[s])
        if pair_index < 0:
            continue
        example = EXAMPLES[batch.pair_ids[pair_index]]
        completion = example["chosen_ids"] if batch.seq_is_chosen[s] else example["rejected_ids"]
        assert seqs[s] == example["prompt_ids"] + completion
    assert sorted(batch.pair_ids) == [0, 1, 2, 3]
    # chosen directly followed by the rejected of the same pair, in the same row
    real = [s for s in range(len(seqs)) if batch.seq_pair[s] >= 0]
    for first, second in zip(real[::2], real[1::2], strict=True):
        assert batch.seq_pair[first] == batch.seq_pair[second] and batch.seq_is_chosen[first]
        assert not batch.seq_is_chosen[second]
    assert batch.cu_seqlens.dtype == torch.int32 and int(batch.cu_seqlens[-1]) == batch.input_ids.numel()
    assert batch.max_seqlen == max(b - a for a, b in itertools.pairwise(bounds))


def test_targets_are_the_next_completion_token_only():
    batch = pack_pairs(EXAMPLES, pack_length=16, backend="python")
    flat_ids, flat_targets = batch.input_ids.reshape(-1), batch.targets.reshape(-1)
    bounds = batch.cu_seqlens.tolist()
    for s, (a, b) in enumerate(itertools.pairwise(bounds)):
        if batch.seq_pair[s] < 0:
            assert (flat_targets[a:b] == IGNORE_INDEX).all()  # padding is never a target
            continue
        example = EXAMPLES[batch.pair_ids[int(batch.seq_pair[s])]]
        n_prompt = len(example["prompt_ids"])
        expected = [IGNORE_INDEX] * (n_prompt - 1) + flat_ids[a + n_prompt : b].tolist() + [IGNORE_INDEX]
        assert flat_targets[a:b].tolist() == expected


def test_trls_orpo_rows_pack_as_the_same_pairs_of_fastdpos_columns():
    # TRL's ORPO/CPO tokenization (each side whole, its prompt's labels -100) gives the batch fastdpo's own columns
    # give; a row holding both (a dataset that kept an earlier TRL tokenization's columns) is read by fastdpo's
    ours = [pair(3, 4, 2), pair(1, 5, 6, start=40)]
    theirs = [{f"{side}_{name}": values for side in ("chosen", "rejected")
               for name, values in (("input_ids", e["prompt_ids"] + e[f"{side}_ids"]),
                                    ("labels", [IGNORE_INDEX] * len(e["prompt_ids"]) + e[f"{side}_ids"]))}
              for e in ours]  # fmt: skip
    want = pack_pairs(ours, pack_length=16, backend="python")
    for examples in (theirs, [{**t, **o} for t, o in zip(theirs, ours, strict=True)]):
        got = pack_pairs(examples, pack_length=16, backend="python")
        for name in ("input_ids", "position_ids", "targets", "cu_seqlens", "seq_pair", "seq_is_chosen"):
            assert torch.equal(getattr(got, name), getattr(want, name)), name
    stale = [{**o, "chosen_input_ids": [9] * 3, "chosen_labels": [9] * 3, "rejected_input_ids": [9],
              "rejected_labels": [9]} for o in ours]  # fmt: skip
    assert torch.equal(pack_pairs(stale, pack_length=16, backend="python").input_ids, want.input_ids)


def test_padding_only_at_row_ends_and_counted():
    batch = pack_pairs(EXAMPLES, pack_length=16, pad_token_id=7, backend="python")
    real = sum(len(e["prompt_ids"]) * 2 + len(e["chosen_ids"]) + len(e["rejected_ids"]) for e in EXAMPLES)
    assert batch.num_padding == batch.input_ids.numel() - real
    assert batch.padding_fraction == pytest.approx(batch.num_padding / batch.input_ids.numel())
    assert batch.input_ids.shape[1] <= 16
    padded = pack_pairs(EXAMPLES, pack_length=16, pad_to_multiple_of=8, backend="python")
    assert padded.input_ids.shape[1] % 8 == 0


def test_truncation_is_per_sequence_as_trl():
    long = pair(6, 9, 3)
    batch = pack_pairs([long], pack_length=32, max_length=8, backend="python")
    seqs = [s for s, p in zip(sequences_of(batch), batch.seq_pair.tolist(), strict=True) if p >= 0]
    assert seqs[0] == truncate(long["prompt_ids"], long["chosen_ids"], 8)[0]
    assert seqs[1] == long["prompt_ids"] + long["rejected_ids"][:2]
    end = pack_pairs([long], pack_length=32, max_length=8, truncation_mode="keep_end", backend="python")
    assert (
        next(s for s, p in zip(sequences_of(end), end.seq_pair.tolist(), strict=True) if p >= 0)
        == (long["prompt_ids"] + long["chosen_ids"])[-8:]
    )


def test_a_pair_longer_than_a_row_is_an_error_naming_the_row():
    with pytest.raises(DataError, match=r"row 41: the pair \(chosen \+ rejected\) is 14 tokens but pack_length is 12"):
        pack_pairs([pair(2, 2, 2), pair(4, 3, 3)], pack_length=12, row_ids=[40, 41], backend="python")
    with pytest.raises(ConfigError, match="pack_length"):
        pack_pairs(EXAMPLES, pack_length=1)
    with pytest.raises(DataError, match="no pairs"):
        pack_pairs([], pack_length=16)
    with pytest.raises(DataError, match="row 0, column 'chosen': no completion token"):
        pack_pairs([{"prompt_ids": [5], "chosen_ids": [], "rejected_ids": [1]}], pack_length=16)
    # a prompt that fills max_length under keep_start leaves nothing to learn: an error, not a silent zero signal
    with pytest.raises(DataError, match="row 7, column 'chosen': no completion token .* truncation"):
        pack_pairs([pair(10, 2, 2)], pack_length=64, max_length=8, row_ids=[7])


def test_flash_attention_kwargs_cover_all_rows():
    batch = pack_pairs(EXAMPLES, pack_length=16, backend="python")
    kwargs = batch.flash_attn_kwargs()
    assert kwargs["cu_seq_lens_q"] is batch.cu_seqlens and kwargs["max_length_k"] == batch.max_seqlen


def test_default_pack_length_follows_the_attention_backend():
    assert default_pack_length(1024, "sdpa") is default_pack_length(1024, "eager") is None  # the longest sequence
    assert default_pack_length(1024, "flash_attention_2") == 4096
    assert default_pack_length(4096, "flex_attention") == 8192
    with pytest.raises(ConfigError, match="max_length"):
        default_pack_length(0)


def test_without_max_length_the_dpo_rows_hold_the_longest_sequence_for_any_attention():
    # flex attention packs into rows of 4096 where max_length is set; without one (TRL's max_length=None) a longer
    # sequence was refused with "raise pack_length", an option TRL's DPOConfig does not have
    from types import SimpleNamespace

    from torch import nn

    from fastdpo.train.dpo import packer_for

    args = SimpleNamespace(max_length=None, truncation_mode="keep_start", pad_to_multiple_of=None)
    long = {"prompt_ids": [1, 2], "chosen_ids": list(range(3, 5003)), "rejected_ids": [7, 8]}
    for attention in ("flex_attention", "sdpa"):
        packer = packer_for(nn.Module(), args, attention, pad_token_id=0)
        assert packer.pack_length is None
        assert packer([long, EXAMPLES[0]])["input_ids"].shape[1] == 5002
    assert packer_for(nn.Module(), SimpleNamespace(**{**vars(args), "max_length": 64}), "flex_attention",
                      pad_token_id=0).pack_length == 4096  # fmt: skip


def test_split_pairs_packs_sequences_into_rows_of_the_longest_sequence():
    gen = torch.Generator().manual_seed(3)

    def ids(n):
        return torch.randint(5, 90, (n,), generator=gen).tolist()

    examples = [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)}
                for p, c, r in [(3, 9, 2), (7, 1, 4), (2, 2, 2), (5, 12, 6), (1, 3, 3)]]  # fmt: skip
    batch = pack_pairs(examples, pack_length=None, split_pairs=True, backend="python")
    longest = max(len(e["prompt_ids"]) + len(e[k]) for e in examples for k in ("chosen_ids", "rejected_ids"))
    assert batch.input_ids.shape[1] == longest
    assert batch.pair_ids == list(range(5))  # pairs numbered in input order
    flat = batch.input_ids.reshape(-1).tolist()
    cu = batch.cu_seqlens.tolist()
    for segment, (pair, chosen) in enumerate(zip(batch.seq_pair.tolist(), batch.seq_is_chosen.tolist(), strict=True)):
        if pair < 0:
            continue
        example = examples[pair]
        expected = example["prompt_ids"] + example["chosen_ids" if chosen else "rejected_ids"]
        assert flat[cu[segment] : cu[segment + 1]] == expected
    assert sorted(batch.seq_pair[batch.seq_pair >= 0].tolist()) == sorted(list(range(5)) * 2)
    rows_of = {}  # some pair is split over two rows: the packer placed its sequences independently
    row_of_token = torch.arange(batch.input_ids.numel()) // batch.input_ids.shape[1]
    for segment, pair in enumerate(batch.seq_pair.tolist()):
        if pair >= 0:
            rows_of.setdefault(pair, set()).add(int(row_of_token[cu[segment]]))
    assert any(len(rows) == 2 for rows in rows_of.values())
    assert batch.num_padding == batch.input_ids.numel() - sum(cu[s + 1] - cu[s] for s in range(len(cu) - 1)
                                                              if batch.seq_pair[s] >= 0)  # fmt: skip


def test_one_row_holds_the_whole_batch_without_padding():
    # max_length 6 truncates some of the sequences: the row holds exactly what truncation leaves, and nothing else
    batch = pack_pairs(EXAMPLES, pack_length=None, max_length=6, split_pairs=True, one_row=True, backend="python")
    expected = sum(len(truncate(e["prompt_ids"], e[name], 6, "keep_start")[0])
                   for e in EXAMPLES for name in ("chosen_ids", "rejected_ids"))  # fmt: skip
    assert batch.input_ids.shape == (1, expected) and batch.num_padding == 0
    assert bool((batch.seq_pair >= 0).all()) and sorted(batch.pair_ids) == [0, 1, 2, 3]
    with pytest.raises(ConfigError, match="one_row"):
        pack_pairs(EXAMPLES, pack_length=64, one_row=True)
    with pytest.raises(ConfigError, match="one_row"):
        pack_pairs(EXAMPLES, pack_length=None, one_row=True, one_pair_per_row=True)


def test_tokenize_preferences_result_packs_as_its_dataset():
    # README's flow: tokenized = tokenize_preferences(...); pack_pairs(tokenized, ...) raised "not iterable"
    from tiny_tokenizer import build_tiny_tokenizer

    from fastdpo.data import prepare_preferences, tokenize_preferences

    rows = [{"prompt": "Sky?", "chosen": " Blue.", "rejected": " Red."}, {"prompt": "Cat?", "chosen": " Meow.",
                                                                          "rejected": " Woof!"}]  # fmt: skip
    tokenized = tokenize_preferences(prepare_preferences(rows), build_tiny_tokenizer())
    assert len(tokenized) == 2 and tokenized[1] == tokenized.dataset[1] and list(tokenized) == list(tokenized.dataset)
    ours, theirs = (pack_pairs(source, pack_length=None, split_pairs=True) for source in (tokenized, tokenized.dataset))
    assert torch.equal(ours.input_ids, theirs.input_ids) and torch.equal(ours.targets, theirs.targets)
