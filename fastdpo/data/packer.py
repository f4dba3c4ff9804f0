"""Best-fit-decreasing bin packing of sequence lengths into rows of a fixed capacity, in Python and in C++.

    from fastdpo.data.packer import pack
    pack([5, 3, 4, 2], 8)        # [[0, 1], [2, 3]]: bins of item indices, each summing to at most 8

Both backends run the same algorithm and return identical bins; ``backend="cpp"`` needs the optional extension
``fastdpo._packer`` (built from ``csrc/packer.cpp`` by ``pip install`` when a C++ compiler is present).
"""

from __future__ import annotations

import contextlib
import gc
import heapq
import operator
from collections.abc import Iterator, Sequence

import numpy as np

from fastdpo.errors import ConfigError, DataError, unknown_choice

try:  # optional: built by setup.py only where a C++ compiler and pybind11 were available
    from fastdpo import _packer
except ImportError:  # pragma: no cover - depends on the install
    _packer = None

BACKENDS = ("auto", "python", "cpp")
_NO_CPP_FIX = "install a C++ compiler (e.g. g++) and reinstall fastdpo ('pip install -e .'), or use backend='python'"


def cpp_available() -> bool:
    """Whether the C++ backend (``fastdpo._packer``) was built and imports."""
    return _packer is not None


def pack(lengths: Sequence[int], capacity: int, *, backend: str = "auto") -> list[list[int]]:
    """Pack items of the given lengths into as few bins of ``capacity`` as best-fit-decreasing finds.

    Items are taken longest first; equal lengths keep their input order (a stable sort). Each item goes into the
    open bin with the smallest remaining capacity that still fits it; among bins with equal remaining capacity the
    lowest bin index wins; if no bin fits, a new bin is opened. Bins are numbered in the order they were opened.
    Zero-length items are allowed and placed like any other (into the fullest bin, since every bin fits them).

    Args:
        lengths: ``[n]`` non-negative integers, each at most ``capacity`` (list, tuple, numpy array, torch tensor).
        capacity: the most a bin may hold, ≥ 1.
        backend: ``"auto"`` (C++ when built, else Python), ``"python"`` or ``"cpp"``.

    Returns:
        The bins in the order they were opened, each the list of item indices in the order they were put in.
        Every index ``0..n-1`` appears exactly once.

    Runs in O(n log n) time and O(n + min(capacity, sum(lengths))) memory: the remaining capacities of the
    open bins are kept as occupancy bits in a 64-ary tree (find the smallest occupied value ≥ length), and the
    bins at each remaining capacity in a min-heap of bin indices.
    """
    if backend not in BACKENDS:
        raise unknown_choice("backend", backend, BACKENDS)
    if backend == "cpp" and _packer is None:
        raise ConfigError("the C++ packer (fastdpo._packer) is not built", column="backend", fix=_NO_CPP_FIX)
    capacity = _check_capacity(capacity)
    if backend != "python" and _packer is not None and type(lengths) in (list, tuple):
        with _gc_paused():
            bins = _packer.pack_ints(lengths, capacity)  # skips numpy's conversion, a fifth of the time
        if bins is not None:
            return bins  # else an item is not an int in 0..capacity: the checks below name it
    array = _as_lengths(lengths, capacity)
    if len(array) == 0:
        return []
    if _total(array) <= capacity:  # everything fits one bin; this also bounds the tree size by sum(lengths)
        return [_descending_order(array.tolist())]
    with _gc_paused():
        if backend == "python" or _packer is None:
            return _pack_python(array.tolist(), capacity)
        return _packer.pack(array, capacity)


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    # The result is up to n small lists: each allocation counts towards the cyclic collector's thresholds, and
    # the collections it sets off (which find nothing: lists of ints form no cycles) cost more than the packing.
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _check_capacity(capacity: int) -> int:
    try:
        capacity = operator.index(capacity)
    except TypeError:
        raise ConfigError(f"must be an integer, got {capacity!r}", column="capacity") from None
    if capacity < 1:
        fix = "it is the most a bin holds, e.g. a row's length in tokens"
        raise ConfigError(f"must be at least 1, got {capacity}", column="capacity", fix=fix)
    if capacity >= 2**62:
        raise ConfigError(f"must be below 2**62, got {capacity}", column="capacity")
    return capacity


def _as_lengths(lengths: Sequence[int], capacity: int) -> np.ndarray:
    """``lengths`` as a contiguous ``[n]`` int64 array, each checked to be an integer in ``0..capacity``."""
    if hasattr(lengths, "detach"):  # a torch tensor, possibly on a GPU
        lengths = lengths.detach().cpu().numpy()
    array = lengths if isinstance(lengths, np.ndarray) else np.asarray(lengths)
    if array.ndim != 1:
        raise DataError(f"lengths must be one-dimensional, got shape {tuple(array.shape)}")
    if array.size and array.dtype.kind not in "iub":
        # floats, strings, objects: check item by item to name the first one that is not an integer in range
        values = lengths if not isinstance(lengths, np.ndarray) else array.tolist()
        checked = []
        for i, value in enumerate(values):
            try:
                length = operator.index(value)
            except TypeError:
                raise DataError(f"item {i} has length {value!r}, not an integer", row=i) from None
            _check_item(i, length, capacity)
            checked.append(length)
        return np.asarray(checked, dtype=np.int64)
    bad = np.flatnonzero((array < 0) | (array > capacity))
    if bad.size:
        i = int(bad[0])
        _check_item(i, int(array[i]), capacity)
    return np.ascontiguousarray(array, dtype=np.int64)


def _check_item(i: int, length: int, capacity: int) -> None:
    if length < 0:
        raise DataError(f"item {i} has negative length {length}", row=i, fix="lengths are token counts, ≥ 0")
    if length > capacity:
        raise DataError(
            f"item {i} has length {length} > capacity {capacity}",
            row=i,
            fix="truncate or drop the item, or raise the capacity",
        )


def _total(array: np.ndarray) -> int:
    if int(array.max()) * len(array) < 2**63:  # numpy's int64 sum cannot overflow
        return int(array.sum())
    return sum(array.tolist())


def _descending_order(lengths: list[int]) -> list[int]:
    # sorted() is stable, also with reverse=True: equal lengths keep their input order
    return sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)


def _pack_python(lengths: list[int], capacity: int) -> list[list[int]]:
    """The reference implementation, on checked, non-empty ``lengths``; ``csrc/packer.cpp`` takes the same steps."""
    occupied = _Occupancy(capacity + 1)
    bins_at: dict[int, list[int]] = {}  # remaining capacity -> min-heap of the indices of the bins with it
    bins: list[list[int]] = []
    shortest = min(lengths)  # a bin with less room than this is full for good: it leaves the structures
    for item in _descending_order(lengths):
        length = lengths[item]
        room = occupied.next_at_least(length)
        if room < 0:
            chosen = len(bins)
            bins.append([item])
            room = capacity
        else:
            heap = bins_at[room]
            chosen = heapq.heappop(heap)
            if not heap:
                occupied.discard(room)
            bins[chosen].append(item)
        room -= length
        if room < shortest:
            continue
        heap = bins_at.get(room)
        if heap:
            heapq.heappush(heap, chosen)
        else:
            bins_at[room] = [chosen]
            occupied.add(room)
    return bins


class _Occupancy:
    """A set of integers in ``0..size-1`` as bits in a 64-ary tree: a bit at level k+1 says word w of level k is
    non-zero. ``next_at_least(v)``, ``add`` and ``discard`` touch one word per level: O(log_64 size)."""

    def __init__(self, size: int) -> None:
        self.levels: list[list[int]] = []
        while True:
            size = (size + 63) >> 6
            self.levels.append([0] * size)
            if size == 1:
                break

    def add(self, value: int) -> None:
        for level in self.levels:
            word = level[value >> 6]
            level[value >> 6] = word | (1 << (value & 63))
            if word:  # the word was already non-zero: the levels above know
                return
            value >>= 6

    def discard(self, value: int) -> None:
        for level in self.levels:
            word = level[value >> 6] & ~(1 << (value & 63))
            level[value >> 6] = word
            if word:
                return
            value >>= 6

    def next_at_least(self, value: int) -> int:
        """The smallest member ≥ ``value``, or -1 when there is none."""
        levels = self.levels
        depth = 0
        while True:  # climb until a word has a member at or after the position
            if depth == len(levels) or (value >> 6) >= len(levels[depth]):
                return -1
            bits = levels[depth][value >> 6] >> (value & 63)
            if bits:
                value += (bits & -bits).bit_length() - 1
                break
            value = (value >> 6) + 1
            depth += 1
        while depth:  # descend along the lowest set bits
            depth -= 1
            word = levels[depth][value]
            value = (value << 6) + (word & -word).bit_length() - 1
        return value
