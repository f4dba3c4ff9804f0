"""Test order under pytest-xdist: tests/test_load.py first, then the files as xdist would order them.

test_load's two measuring processes keep both CPU cores busy for ~80 s. Beside them, the partitioned DeepSpeed
ZeRO-3 launch of tests/test_train_distributed.py spent 138 s constructing its trainer (both models loaded under
``zero.Init``, parameter by parameter over gloo) against ~3 s otherwise: the suite's longest test (180-194 s in
CI, ~45 s when it ran beside other tests). xdist's ``--dist loadfile`` hands out files with the most tests first,
which put both files (2 and 3 tests) at the end, side by side. Here the files keep that order, except that
test_load leads, far from the distributed tests.
"""

from __future__ import annotations

from collections import Counter

FIRST = "tests/test_load.py"


def pytest_configure(config):
    if hasattr(config.option, "loadscopereorder"):  # pytest-xdist: the order below replaces its own
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    def file(item) -> str:
        return item.nodeid.split("::")[0]

    files = [file(item) for item in items]
    counts, first_seen = Counter(files), {name: i for i, name in reversed(list(enumerate(files)))}
    items.sort(key=lambda item: (file(item) != FIRST, -counts[file(item)], first_seen[file(item)]))  # stable
