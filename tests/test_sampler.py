"""Token-budget batches: budget respected, every pair once, seeded, disjoint across processes; rank-balanced
fixed-size batches: the same pairs per round, tokens evened out across processes."""

from __future__ import annotations

import itertools
import random

import pytest

from fastdpo.data.sampler import RankBalancedBatchSampler, TokenBudgetBatchSampler
from fastdpo.errors import ConfigError, DataError

_RNG = random.Random(0)
LENGTHS = [_RNG.randint(20, 900) for _ in range(500)]  # one generator: varied lengths (a fresh one per item repeats)


def test_budget_and_every_pair_once():
    sampler = TokenBudgetBatchSampler(LENGTHS, 4096, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[i] for i in b) <= 4096 for b in batches)
    assert len(sampler) == len(batches)
    # greedy: a batch closes only when the next pair would overflow it
    for b, nxt in itertools.pairwise(batches):
        assert sum(LENGTHS[i] for i in b) + LENGTHS[nxt[0]] > 4096


def test_a_pair_over_the_budget_goes_alone():
    batches = list(TokenBudgetBatchSampler([10, 5000, 10], 100, shuffle=False))
    assert batches == [[0], [1], [2]]


def test_seeded_and_per_epoch():
    a = list(TokenBudgetBatchSampler(LENGTHS, 4096, seed=3))
    b = list(TokenBudgetBatchSampler(LENGTHS, 4096, seed=3))
    other = TokenBudgetBatchSampler(LENGTHS, 4096, seed=3)
    other.set_epoch(1)
    assert a == b and list(other) != a


def test_processes_get_disjoint_batches_and_the_same_number_of_steps():
    one = list(TokenBudgetBatchSampler(LENGTHS, 4096, seed=2))
    assert len(one) % 3  # (a last round short of 3 batches)
    parts = [list(TokenBudgetBatchSampler(LENGTHS, 4096, seed=2, rank=r, world_size=3)) for r in range(3)]
    assert len({len(p) for p in parts}) == 1
    rounds = [batch for round_ in zip(*parts, strict=True) for batch in round_]
    # every pair of the pass trains (the short last round was cut, its pairs left out silently), topped up with the
    # pass's first batches as accelerate tops up fixed-size ones: the same batches as one process, in rounds
    assert rounds[: len(one)] == one and rounds[len(one) :] == one[: -len(one) % 3]
    # a pass of fewer batches than processes trained nothing at all (0 steps, the untrained model saved)
    few = [list(TokenBudgetBatchSampler([100, 100, 100], 1000, rank=r, world_size=2)) for r in range(2)]
    assert len(few[0]) == 1 and few[0] == few[1] and sorted(few[0][0]) == [0, 1, 2]


def test_bad_settings():
    with pytest.raises(ConfigError, match="max_tokens_per_batch"):
        TokenBudgetBatchSampler(LENGTHS, 0)
    with pytest.raises(ConfigError, match="rank 3 is outside world_size 2"):
        TokenBudgetBatchSampler(LENGTHS, 100, rank=3, world_size=2)
    with pytest.raises(DataError, match="no pairs"):
        TokenBudgetBatchSampler([], 100)


def test_every_epoch_is_as_long_as_the_first_and_each_pass_has_every_pair_once():
    # a pass over these 30 pairs makes 12 to 14 batches depending on its order, while transformers' Trainer runs
    # len(sampler) steps every epoch and resumes in epoch global_step // len(sampler): an epoch is that many
    # batches of the stream of passes
    rng = random.Random(0)
    lengths = [rng.randint(20, 900) for _ in range(30)]
    sampler = TokenBudgetBatchSampler(lengths, 1500, seed=4)
    stream = []
    for epoch in range(8):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == 12
        stream += batches
    pass_sizes, seen, size = [], set(), 0
    for batch in stream:  # cut where every pair has come: no pair twice before
        assert not seen & set(batch)
        seen, size = seen | set(batch), size + 1
        if len(seen) == len(lengths):
            pass_sizes, seen, size = [*pass_sizes, size], set(), 0
    assert len(pass_sizes) == 7 and pass_sizes[0] == 12 and len(set(pass_sizes)) > 1, pass_sizes
    two = [TokenBudgetBatchSampler(lengths, 1500, seed=4, rank=r, world_size=2) for r in range(2)]
    for epoch in range(4):
        for sampler in two:
            sampler.set_epoch(epoch)
        first, second = (list(sampler) for sampler in two)
        assert len(first) == len(second) == len(two[0]) == 6
        assert all(not set(a) & set(b) for a, b in zip(first, second, strict=True))


# --- RankBalancedBatchSampler: the same pairs per round as BatchSampler, dealt evenly by tokens


def _rank_tokens(batches: list[list[int]], lengths: list[int], world_size: int) -> list[list[int]]:
    """Per round, each process's token sum (process r takes batch r of each round, as accelerate shards)."""
    rounds = [batches[i : i + world_size] for i in range(0, len(batches), world_size)]
    return [[sum(lengths[i] for i in b) for b in r] for r in rounds if len(r) == world_size]


@pytest.mark.parametrize(("world_size", "batch_size", "count"), [(2, 3, 61), (4, 2, 37), (3, 5, 150), (1, 4, 9)])
def test_balanced_rounds_hold_the_same_pairs_and_even_tokens(world_size, batch_size, count):
    from torch.utils.data import BatchSampler, SequentialSampler

    lengths = LENGTHS[:count]
    order = SequentialSampler(range(count))
    plain = list(BatchSampler(order, batch_size, drop_last=False))
    balanced = list(RankBalancedBatchSampler(order, batch_size, lengths=lengths, world_size=world_size))
    assert len(balanced) == len(plain) == len(RankBalancedBatchSampler(order, batch_size, lengths=lengths,
                                                                       world_size=world_size))  # fmt: skip
    round_size = world_size * batch_size
    full = count // round_size * world_size  # batches in full rounds; the tail is BatchSampler's own
    for start in range(0, full, world_size):
        got, want = balanced[start : start + world_size], plain[start : start + world_size]
        assert sorted(i for b in got for i in b) == sorted(i for b in want for i in b)
        assert all(len(b) == batch_size for b in got)  # every process keeps its batch size
    assert balanced[full:] == plain[full:]
    spread = [max(r) - min(r) for r in _rank_tokens(balanced, lengths, world_size)]
    before = [max(r) - min(r) for r in _rank_tokens(plain, lengths, world_size)]
    # greedy largest-first: no process is more than one pair's length above the lightest one
    assert all(s <= max(lengths) for s in spread)
    if world_size > 1:
        assert sum(spread) < sum(before) / 3  # a factor well inside what the greedy deal gives on these lengths


def test_balanced_drop_last_and_bad_world_size():
    from torch.utils.data import SequentialSampler

    sampler = RankBalancedBatchSampler(SequentialSampler(range(11)), 4, lengths=LENGTHS[:11], world_size=2,
                                       drop_last=True)  # fmt: skip
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2  # the 3-pair tail dropped, as BatchSampler drops it
    with pytest.raises(ConfigError, match="world_size"):
        RankBalancedBatchSampler(SequentialSampler(range(3)), 1, lengths=[1, 2, 3], world_size=0)


@pytest.mark.parametrize("count", [7, 3, 8])
def test_a_short_last_round_is_topped_up_with_the_pairs_accelerate_takes(count):
    # accelerate completes a short last round with the first batches the sampler gave: the dealt ones under
    # balancing, so the last step trained another repeated pair than TRL's (loss 0.5748 where 0.5848)
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    def rounds(batch_sampler):
        shards = [list(BatchSamplerShard(batch_sampler, num_processes=2, process_index=r, even_batches=True))
                  for r in range(2)]  # fmt: skip
        assert len(shards[0]) == len(shards[1]) == len(BatchSamplerShard(batch_sampler, num_processes=2))
        return [sorted(a + b) for a, b in zip(*shards, strict=True)]

    order = SequentialSampler(range(count))
    plain = rounds(BatchSampler(order, 2, drop_last=False))
    lengths = list(range(10, 10 + count))  # (the first pairs the shortest: dealt last, longest first)
    balanced = rounds(RankBalancedBatchSampler(order, 2, lengths=lengths, world_size=2, top_up=True))
    assert balanced == plain


def test_the_trainer_seeds_budget_batches_with_data_seed_and_drops_a_short_last_one(tmp_path):
    # transformers' sampler takes data_seed (else seed), and dataloader_drop_last drops a short last batch: the budget
    # sampler took seed alone and kept every batch (data_seed 1 and 2 gave the same batches)
    from test_train_dpo import common_args, synthetic_pairs, tiny_model
    from tiny_tokenizer import build_tiny_tokenizer

    from fastdpo.train import DPOConfig, DPOTrainer

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    pairs = synthetic_pairs(24)

    def batches(**options):
        args = DPOConfig(**{**common_args(tmp_path, "budget"), "max_tokens_per_batch": 150, **options})
        trainer = DPOTrainer(load(), ref_model=load(), args=args, train_dataset=pairs, processing_class=tokenizer)
        sampler = trainer.get_train_dataloader().batch_sampler  # (one process: accelerate keeps it)
        return list(sampler), sampler.lengths

    unset, lengths = batches()
    assert batches(data_seed=0)[0] == unset  # (seed 0: common_args')
    assert batches(data_seed=1)[0] != unset != batches(data_seed=2)[0]
    dropped = batches(dataloader_drop_last=True)[0]
    assert sum(lengths[i] for i in unset[-1]) < 150  # the last batch is short of the budget here: dropped
    assert dropped == unset[:-1]
    # train_sampling_strategy "sequential" (shuffled as "random" under a budget before): the pairs in order
    ordered = batches(train_sampling_strategy="sequential")[0]
    assert [i for batch in ordered for i in batch] == list(range(len(pairs))) and ordered != unset
    from fastdpo.errors import ConfigError  # auto_find_batch_size: its retries halved a size no batch read

    with pytest.raises(ConfigError, match="^option 'auto_find_batch_size'"):
        DPOConfig(**common_args(tmp_path, "x"), max_tokens_per_batch=150, auto_find_batch_size=True)


def test_drop_last_keeps_a_pass_whose_only_batch_is_short():
    # dataloader_drop_last drops a last batch short of the budget; a set within one budget made no batch at all, and
    # train() ended at step 0 without a word
    assert list(TokenBudgetBatchSampler([10, 20], 100, shuffle=False, drop_last=True)) == [[0, 1]]
    assert list(TokenBudgetBatchSampler([60, 60, 10], 100, shuffle=False, drop_last=True)) == [[0]]  # ([1, 2] short)
    assert list(TokenBudgetBatchSampler([60, 60, 10], 125, shuffle=False, drop_last=True)) == [[0, 1]]
