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
