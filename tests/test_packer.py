"""Best-fit-decreasing packing: literal examples, properties against the definition, Python == C++, errors."""

from __future__ import annotations

import os
import random
import shutil
import sysconfig

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdpo.data import packer
from fastdpo.data.packer import BACKENDS, cpp_available, pack
from fastdpo.errors import ConfigError, DataError

BUILT = ["python", "cpp"] if cpp_available() else ["python"]
needs_cpp = pytest.mark.skipif(not cpp_available(), reason="fastdpo._packer is not built (no C++ compiler at install)")


def bfd_by_definition(lengths, capacity):
    """The algorithm as the docstring states it, scanning every bin: O(n · bins)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])  # stable: equal lengths keep input order
    bins, room = [], []
    for i in order:
        fits = [b for b in range(len(bins)) if room[b] >= lengths[i]]
        if fits:
            chosen = min(fits, key=lambda b: (room[b], b))
        else:
            chosen = len(bins)
            bins.append([])
            room.append(capacity)
        bins[chosen].append(i)
        room[chosen] -= lengths[i]
    return bins


def ffd_bin_count(lengths, capacity):
    """First-fit-decreasing: the lowest-indexed bin that fits."""
    loads = []
    for length in sorted(lengths, reverse=True):
        for b, load in enumerate(loads):
            if load + length <= capacity:
                loads[b] += length
                break
        else:
            loads.append(length)
    return len(loads)


# (lengths, capacity, bins): each worked out by hand from the rules, see the comments
EXAMPLES = {
    # order 0(5) 2(4) 1(3) 3(2): 0 opens bin 0 (room 3); 2 does not fit, opens bin 1 (room 4); 1 fits both,
    # bin 0 has less room (3 < 4); 3 goes to bin 1, the only one with room
    "docstring": ([5, 3, 4, 2], 8, [[0, 1], [2, 3]]),
    # equal lengths keep input order: 1 and 3 (length 5) open bins 0 and 1 (room 2 each), then 0 and 2 (length 2)
    # meet a tie in room: the lower bin index wins, so 0 -> bin 0, and then 2 -> bin 1
    "ties": ([2, 5, 2, 5], 7, [[1, 0], [3, 2]]),
    # order 4(6) 0(4) 1(4) 2(2) 3(1): 4 opens bin 0 (room 3), 0 opens bin 1 (room 5); 1 -> bin 1 (room 1 now);
    # 2 -> bin 0, the only one with room (room 1 now); 3 meets bins 0 and 1 both at room 1 -> bin 0, the lower
    # index, although bin 1 has been at room 1 longer
    "tie_in_room_lowest_index_not_first_come": ([4, 4, 2, 1, 6], 9, [[4, 2, 3], [0, 1]]),
    # order 1(6) 2(5) 3(5) 0(4): bin 0 room 4, bin 1 room 5; 3 fills bin 1 exactly, 0 fills bin 0 exactly
    "exact_fits": ([4, 6, 5, 5], 10, [[1, 0], [2, 3]]),
    # order 1(3) 3(2) 0(0) 2(0): bin 0 full (room 0), bin 1 room 1; zero-length items fit everywhere and go to the
    # smallest room: bin 0
    "zero_length": ([0, 3, 0, 2], 3, [[1, 0, 2], [3]]),
    # bins 0 and 1 both full; both zero-length items go to bin 0 (room 0, lower index)
    "zero_length_full_bins": ([0, 1, 0, 1], 1, [[1, 0, 2], [3]]),
    "all_zero": ([0, 0, 0], 5, [[0, 1, 2]]),
    "one_item": ([7], 7, [[0]]),
    "one_zero_item": ([0], 1, [[0]]),
    "all_at_capacity": ([4, 4, 4], 4, [[0], [1], [2]]),
    "fits_one_bin": ([1, 2, 3], 100, [[2, 1, 0]]),
    "empty": ([], 8, []),
    # order 23 17 10 9 5 3 3 3: rooms 2, 8, 15; 9 -> bin 2 (room 6); 5 -> bin 2 (6 < 8: best fit, where first fit
    # would take bin 1) -> room 1; 3, 3 -> bin 1 (room 8 -> 5 -> 2); the last 3 fits nowhere: a fourth bin
    "best_not_first_fit": ([23, 17, 10, 9, 5, 3, 3, 3], 25, [[0], [1, 5, 6], [2, 3, 4], [7]]),
}


@pytest.mark.parametrize("backend", BUILT)
@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_examples(name, backend):
    lengths, capacity, expected = EXAMPLES[name]
    assert bfd_by_definition(lengths, capacity) == expected  # the hand derivation agrees with the definition
    assert pack(lengths, capacity, backend=backend) == expected


def test_best_fit_can_need_more_bins_than_first_fit():
    # BFD is not always at least as good as FFD: on this input FFD needs 3 bins (5 joins bin 1 and the 3s fill
    # bins 1 and 2), BFD 4. So the property tests check the guarantees BFD has, not "<= FFD".
    lengths, capacity, expected = EXAMPLES["best_not_first_fit"]
    assert ffd_bin_count(lengths, capacity) == 3
    assert len(pack(lengths, capacity)) == len(expected) == 4


def check_packing(bins, lengths, capacity):
    assert sorted(i for items in bins for i in items) == list(range(len(lengths)))  # every item exactly once
    loads = [sum(lengths[i] for i in items) for items in bins]
    assert all(load <= capacity for load in loads)
    assert all(items for items in bins)
    # Bin j was opened because its first item fit no earlier bin, and loads only grow: no two bins could be merged.
    for i in range(len(loads)):
        for j in range(i + 1, len(loads)):
            assert loads[i] + loads[j] > capacity, (i, j, loads)
    assert len(bins) >= -(-sum(lengths) // capacity)


@st.composite
def packing_inputs(draw):
    capacity = draw(st.integers(1, 80))
    top = draw(st.integers(0, capacity))  # small tops give many equal lengths (ties) and zero-length items
    lengths = draw(st.lists(st.integers(0, top), max_size=60))
    return lengths, capacity


@settings(max_examples=300, deadline=None)
@given(packing_inputs())
def test_properties_and_definition(inputs):
    lengths, capacity = inputs
    bins = pack(lengths, capacity, backend="python")
    check_packing(bins, lengths, capacity)
    assert bins == bfd_by_definition(lengths, capacity)


@needs_cpp
@settings(max_examples=300, deadline=None)
@given(packing_inputs())
def test_cpp_matches_python(inputs):
    lengths, capacity = inputs
    expected = pack(lengths, capacity, backend="python")
    assert pack(lengths, capacity, backend="cpp") == expected  # a list: read by _packer.pack_ints
    assert pack(np.array(lengths, dtype=np.int64), capacity, backend="cpp") == expected  # an array: _packer.pack


@needs_cpp
def test_cpp_module_checks_its_inputs():
    from fastdpo import _packer

    for bad_capacity in (0, 2**62):
        with pytest.raises(ValueError, match="capacity must be in"):
            _packer.pack(np.array([1], dtype=np.int64), bad_capacity)
    with pytest.raises(ValueError, match="item 1 has length 5 outside 0..4"):
        _packer.pack(np.array([1, 5], dtype=np.int64), 4)
    with pytest.raises(ValueError, match="one-dimensional"):
        _packer.pack(np.ones((2, 2), dtype=np.int64), 4)
    # pack_ints declines (None) anything but Python ints in range, so that pack() can name the item
    assert _packer.pack_ints([1, 5], 4) is None
    assert _packer.pack_ints([1, 2.0], 4) is None
    assert _packer.pack_ints([1, 2**70], 4) is None
    assert _packer.pack_ints([1, np.int64(2)], 4) is None
    assert _packer.pack_ints((3, 1, 2), 4) == [[0, 1], [2]]


@needs_cpp
@pytest.mark.parametrize(
    ("n", "low", "high", "capacity"),
    [
        (20_000, 1, 700, 2048),  # many bins, long heaps at each room
        (5_000, 0, 60_000, 200_000),  # three levels of occupancy bits
        (500, 0, 900_000, 1_000_000),  # lengths above 4n + 65536: the C++ sort is a stable_sort, not counting
    ],
)
def test_cpp_matches_python_large(n, low, high, capacity):
    lengths = np.random.default_rng(n).integers(low, high + 1, size=n)
    bins = pack(lengths, capacity, backend="cpp")
    assert bins == pack(lengths, capacity, backend="python")
    assert sorted(i for items in bins for i in items) == list(range(n))


@pytest.mark.parametrize("size", [1, 63, 64, 65, 4095, 4096, 4097, 300_000])
def test_occupancy_next_at_least(size):
    rng = random.Random(size)
    occupied, members = packer._Occupancy(size), set()
    for _ in range(400):
        value = rng.randrange(size)
        if rng.random() < 0.6:
            occupied.add(value)
            members.add(value)
        else:
            occupied.discard(value)
            members.discard(value)
        query = rng.randrange(size)
        expected = min((m for m in members if m >= query), default=-1)
        assert occupied.next_at_least(query) == expected


@pytest.mark.parametrize("backend", BUILT)
def test_input_types(backend):
    lengths, capacity, expected = EXAMPLES["best_not_first_fit"]
    for given_lengths in (
        lengths,
        tuple(lengths),
        np.array(lengths, dtype=np.int32),
        np.array(lengths, dtype=np.uint16),
        np.array(lengths, dtype=object),
        [np.int64(length) for length in lengths],  # not Python ints: converted by numpy
        np.repeat(np.array(lengths, dtype=np.int64), 2)[::2],  # not contiguous
        torch.tensor(lengths),
    ):
        assert pack(given_lengths, capacity, backend=backend) == expected
        assert pack(given_lengths, np.int64(capacity), backend=backend) == expected


@pytest.mark.parametrize("backend", BUILT)
def test_errors(backend):
    with pytest.raises(DataError) as err:
        pack([3, 9, 2], 8, backend=backend)
    assert err.value.row == 1
    fix = "truncate or drop the item, or raise the capacity"
    assert str(err.value) == f"row 1: item 1 has length 9 > capacity 8 — {fix}"
    with pytest.raises(DataError, match=r"^row 2: item 2 has negative length -1"):
        pack([3, 2, -1, 9], 8, backend=backend)  # the first bad item is named
    with pytest.raises(DataError, match=r"^row 1: item 1 has length 2.5, not an integer"):
        pack([3, 2.5], 8, backend=backend)
    with pytest.raises(DataError, match=r"^row 0: item 0 has length 3.0, not an integer"):
        pack(torch.tensor([3.0]), 8, backend=backend)
    with pytest.raises(DataError, match=r"one-dimensional, got shape \(2, 1\)"):
        pack([[1], [2]], 8, backend=backend)
    for capacity in (0, -3):
        with pytest.raises(ConfigError) as err:
            pack([1], capacity, backend=backend)
        assert err.value.column == "capacity"
        assert str(err.value).startswith(f"option 'capacity': must be at least 1, got {capacity}")
    with pytest.raises(ConfigError, match=r"^option 'capacity': must be an integer, got 8.0"):
        pack([1], 8.0, backend=backend)


def test_unknown_backend():
    with pytest.raises(ConfigError) as err:
        pack([1], 4, backend="cp")
    assert str(err.value) == "option 'backend': unknown value 'cp' — did you mean 'cpp'?"
    assert BACKENDS == ("auto", "python", "cpp")


def test_cpp_backend_not_built(monkeypatch):
    monkeypatch.setattr(packer, "_packer", None)
    assert not cpp_available()
    with pytest.raises(ConfigError) as err:
        pack([1], 4, backend="cpp")
    assert err.value.column == "backend"
    assert "not built" in str(err.value) and "install a C++ compiler" in err.value.fix
    assert pack([1, 4, 2], 4) == [[1], [2, 0]]  # auto falls back to Python


def _cxx_compiler() -> str | None:
    # The compiler setuptools would use: $CXX, else the one Python was built with
    command = os.environ.get("CXX") or sysconfig.get_config_var("CXX") or "c++"
    return shutil.which(command.split()[0])


@pytest.mark.skipif(_cxx_compiler() is None, reason="no C++ compiler here: the install skips the optional extension")
def test_cpp_extension_is_built():
    # With a compiler, `pip install -e .` must have built fastdpo._packer (setup.py only skips it when compiling
    # fails); if this fails, reinstall and read the 'WARNING: not building' line of the pip output.
    assert cpp_available(), "fastdpo._packer is not built: run `pip install -e .` again and check its output"
    from fastdpo import _packer

    assert _packer.pack(np.array([5, 3, 4, 2], dtype=np.int64), 8) == [[0, 1], [2, 3]]
