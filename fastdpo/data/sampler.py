"""Batch samplers: token budgets, and fixed-size batches dealt evenly over processes.

Token-budget batches: as many pairs per step as fit a budget of real tokens (``max_tokens_per_batch``).

The default step semantics are TRL's (a fixed number of pairs per device per step, picked by the Trainer's
seeded sampler, packed within the batch). With a token budget instead, each batch takes pairs in a seeded random
order until the next pair would overflow ``max_tokens``, so steps carry about the same work whatever the lengths.
Several processes: the batches are dealt round-robin (``rank`` takes every ``world_size``-th), and a last round
short of ``world_size`` batches is topped up with the pass's first batches (as accelerate tops up fixed-size ones),
so that every process runs the same number of steps and every pair trains each pass (cutting the round left pairs
out silently, and a pass of fewer batches than processes trained nothing).

How many batches a pass over the data makes depends on its order, while transformers' Trainer takes the length of
the first epoch for every epoch: it runs that many steps an epoch (dropping a longer pass's last batches, stopping
short of ``max_steps`` after a shorter one) and finds where to resume as ``global_step // steps_per_epoch``. So an
epoch here is a fixed number of batches, ``len(sampler)`` (the first pass's), taken from the stream of passes
(pass 0, then pass 1 in another order, ...): epoch 1 may end in pass 2. Each pair still comes once a pass (and
on several processes, the pairs of a topped-up last round twice).

Balanced ranks (``RankBalancedBatchSampler``): with a fixed number of pairs per device, accelerate gives process
``r`` the ``r``-th of every ``world_size`` consecutive batches, so the slowest process (the one that drew the long
pairs) sets every step's pace. This sampler takes the same ``world_size × batch_size`` pairs a round would take
and deals them again, longest first, each to the batch with the fewest tokens that still has room: every process
keeps ``batch_size`` pairs, and the step's pairs are unchanged (so is the loss, up to summation order, where it is
a sum of per-pair terms: the trainer leaves it off for the loss types that take a token mean or a sort over each
process's micro-batch, ``fastdpo.ops.losses.BATCH_COUPLED``: RPO's ``sft``, ``cpo``, ``orpo``, ``aot``).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

from torch.utils.data import BatchSampler, Sampler

from fastdpo.errors import ConfigError, DataError

MAX_EMPTY_PASSES = 100  # a pass's batch count depends on its order; only a pathological dataset makes 0 so often


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
        self._pass_sizes: dict[int, int] = {}  # batches per process of each pass

    def set_epoch(self, epoch: int) -> None:
        """The batches of epoch ``epoch`` next (same seed, same epoch: same batches), as DistributedSampler does."""
        self.epoch = epoch

    def _batches_of_pass(self, number: int) -> list[list[int]]:
        """The batches of pass ``number`` over the data, every process's (a multiple of ``world_size``)."""
        order = list(range(len(self.lengths)))
        if self.shuffle:
            random.Random(f"{self.seed}:{number}").shuffle(order)
        batches, current, used = [], [], 0
        for index in order:
            n = self.lengths[index]
            if current and used + n > self.max_tokens:
                batches.append(current)
                current, used = [], 0
            current.append(index)
            used += n
        if current and not (self.drop_last and used < self.max_tokens and batches):  # (a pass's only batch is kept:
            batches.append(current)  # a set within one budget trained 0 steps, silently)
        short = -len(batches) % self.world_size  # the last round's missing batches: the pass's first ones again
        return batches + [batches[i % len(batches)] for i in range(short)] if batches else batches

    def _pass_size(self, number: int) -> int:
        """This process's batches in pass ``number``."""
        if number not in self._pass_sizes:
            self._pass_sizes[number] = len(self._batches_of_pass(number)) // self.world_size
        return self._pass_sizes[number]

    def __iter__(self) -> Iterator[list[int]]:
        # this process's batches number epoch·len .. (epoch + 1)·len in the stream of passes
        start, stop = self.epoch * len(self), (self.epoch + 1) * len(self)
        number, first, empty = 0, 0, 0  # a pass, the stream position of its first batch, empty passes in a row
        while first < stop:
            size = self._pass_size(number)
            if first + size > start:
                mine = self._batches_of_pass(number)[self.rank :: self.world_size]
                yield from mine[max(start - first, 0) : stop - first]
            empty = empty + 1 if size == 0 else 0
            if empty > MAX_EMPTY_PASSES:
                raise DataError(f"{empty} passes in a row made fewer than world_size={self.world_size} batches",
                                fix="use fewer processes or a smaller max_tokens_per_batch")  # fmt: skip
            first += size
            number += 1

    def __len__(self) -> int:
        return self._pass_size(0)


class RankBalancedBatchSampler(BatchSampler):
    """``BatchSampler(sampler, batch_size, drop_last)`` whose every round of ``world_size`` batches holds the same
    indices, dealt so that the batches' token sums (``lengths``) are as even as a greedy deal makes them.

    A last round with fewer than ``world_size × batch_size`` indices is batched as ``BatchSampler`` would; with
    ``top_up`` (accelerate's ``even_batches``, unless ``drop_last``) it is completed first as accelerate completes it,
    with the epoch's first indices in the sampler's order, and dealt: accelerate's own top-up took the first dealt
    batches, other pairs than TRL's. ``sampler`` stays an attribute: accelerate swaps in its seedable sampler.
    """

    def __init__(self, sampler: Sampler, batch_size: int, *, lengths: Sequence[int], world_size: int,
                 drop_last: bool = False, top_up: bool = False) -> None:  # fmt: skip
        super().__init__(sampler, batch_size, drop_last)
        if world_size < 1:
            raise ConfigError(f"must be positive, got {world_size}", column="world_size")
        self.lengths, self.world_size = [int(n) for n in lengths], world_size
        self.top_up = top_up and not drop_last and world_size > 1

    def __len__(self) -> int:
        if not self.top_up:
            return super().__len__()
        return -(-len(self.sampler) // (self.batch_size * self.world_size)) * self.world_size

    def __iter__(self) -> Iterator[list[int]]:
        round_size = self.batch_size * self.world_size
        indices: list[int] = []
        first: list[int] = []  # the epoch's first round of indices, in the sampler's order
        for index in self.sampler:
            indices.append(index)
            if len(first) < round_size:
                first.append(index)
            if len(indices) == round_size:
                yield from self._deal(indices)
                indices = []
        if self.top_up and indices:
            indices += [first[i % len(first)] for i in range(round_size - len(indices))]
            yield from self._deal(indices)
            return
        for start in range(0, len(indices), self.batch_size):
            batch = indices[start : start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch

    def _deal(self, indices: list[int]) -> list[list[int]]:
        batches: list[list[int]] = [[] for _ in range(self.world_size)]
        tokens = [0] * self.world_size
        for index in sorted(indices, key=lambda i: -self.lengths[i]):  # stable: ties keep the sampler's order
            open_batches = [b for b in range(self.world_size) if len(batches[b]) < self.batch_size]
            target = min(open_batches, key=lambda b: tokens[b])
            batches[target].append(index)
            tokens[target] += self.lengths[index]
        return batches
