"""Resident memory of this process and its children, read from ``/proc`` (Linux), for the CPU load benchmark."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def status_kib() -> dict[str, int]:
    wanted = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")
    fields = (line.partition(":") for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(value.split()[0]) for key, _, value in fields if key in wanted}


def statm(pid: int | str) -> tuple[int, int]:
    """(resident, resident anonymous) bytes of a process, from ``/proc/<pid>/statm``; (0, 0) if it is gone."""
    try:
        with open(f"/proc/{pid}/statm") as file:
            fields = file.read().split()
    except OSError:
        return 0, 0
    page = os.sysconf("SC_PAGE_SIZE")
    return int(fields[1]) * page, (int(fields[1]) - int(fields[2])) * page


def rss_bytes(pid: int | str = "self") -> int:
    """Resident memory of a process, in bytes; 0 if it is gone."""
    return statm(pid)[0]


def pss_bytes(pid: int | str = "self") -> int:
    """Proportional set size of a process (its pages shared with others, e.g. a fork's parent, counted by share),
    in bytes; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def children_pids() -> list[int]:
    pids = []
    for task in Path("/proc/self/task").iterdir():
        try:
            pids += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return pids


class RssSampler(threading.Thread):
    """Samples every ``interval`` s the RSS of this process plus the PSS of its children (``num_proc`` workers are
    forks: RSS would count the pages they share with this process again), and this process's anonymous RSS;
    ``take_peak()`` returns and resets the highest of each since the last call (the kernel's VmHWM is exact, but
    covers this process only and does not split anonymous from file-backed pages)."""

    def __init__(self, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.interval, self.peaks = interval, [0, 0, 0]
        self._stop_event = threading.Event()

    def _sample(self) -> list[int]:
        children = sum(pss_bytes(pid) for pid in children_pids())
        rss, anon = statm("self")
        return [rss + children, anon, children]

    def run(self) -> None:
        while not self._stop_event.wait(self.interval):
            self.peaks = [max(a, b) for a, b in zip(self.peaks, self._sample(), strict=True)]

    def take_peak(self) -> tuple[int, int, int]:
        """(process + children, anonymous of this process, children) peaks since the last call."""
        peaks = [max(a, b) for a, b in zip(self.peaks, self._sample(), strict=True)]
        self.peaks = [0, 0, 0]
        return peaks[0], peaks[1], peaks[2]

    def stop(self) -> None:
        self._stop_event.set()
