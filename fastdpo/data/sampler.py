"""Token-budget batches: as many pairs per step as fit a budget of real tokens (``max_tokens_per_batch``).

The default step semantics are TRL's (a fixed number of pairs per device per step, picked by the Trainer's
seeded sampler, packed within the batch). With a token budget instead, each batch takes pairs in a seeded random
order until the next pair would overflow ``max_tokens``, so steps carry about the same work whatever the lengths.
Several processes: the batches are dealt round-robin (``rank`` takes every ``world_size``-th), and the number of
batches is cut to a multiple of ``world_size`` so that every process runs the same number of steps.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from fastdpo.errors import ConfigError, DataError


class TokenBudgetBatchSampler:
    """Batches of dataset indices whose pair lengths sum to at most ``max_tokens`` (a longer pair goes alone)."""

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if max_tokens < 1:
            raise ConfigError(f"must be positive, got {max_tokens}", column="max_tokens_per_batch")
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}", column="rank")
        if not lengths:
            raise DataError("no pairs to batch", fix="check the dataset")
        self.lengths = [int(n) for n in lengths]
        self.max_tokens, self.shuffle, self.seed = max_tokens, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """A new order per epoch (same seed, same epoch: same batches), as DistributedSampler does."""
        self.epoch = epoch

    def _all_batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        if self.shuffle:
            random.Random(f"{self.seed}:{self.epoch}").shuffle(order)
        batches, current, used = [], [], 0
        for index in order:
            n = self.lengths[index]
            if current and used + n > self.max_tokens:
                batches.append(current)
                current, used = [], 0
            current.append(index)
            used += n
        if current and not (self.drop_last and used < self.max_tokens):
            batches.append(current)
        usable = len(batches) - len(batches) % self.world_size
        return batches[:usable]

    @property
    def unused_pairs(self) -> int:
        """Pairs this epoch leaves out (the tail that did not make a full round of ``world_size`` batches)."""
        return len(self.lengths) - sum(len(b) for b in self._all_batches())

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._all_batches()[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self._all_batches()) // self.world_size
