"""Token-budget batches: budget respected, every pair once, seeded, disjoint across processes."""

from __future__ import annotations

import itertools
import random

import pytest

from fastdpo.data.sampler import TokenBudgetBatchSampler
from fastdpo.errors import ConfigError, DataError

LENGTHS = [random.Random(0).randint(20, 900) for _ in range(500)]


def test_budget_and_every_pair_once():
    sampler = TokenBudgetBatchSampler(LENGTHS, 4096, seed=1)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[i] for i in b) <= 4096 for b in batches)
    assert len(sampler) == len(batches) and sampler.unused_pairs == 0
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
    parts = [list(TokenBudgetBatchSampler(LENGTHS, 4096, seed=2, rank=r, world_size=3)) for r in range(3)]
    assert len({len(p) for p in parts}) == 1
    seen = [i for p in parts for b in p for i in b]
    assert len(seen) == len(set(seen))
    unused = TokenBudgetBatchSampler(LENGTHS, 4096, seed=2, world_size=3).unused_pairs
    assert len(seen) + unused == len(LENGTHS)  # the tail left out is counted, not silent


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
