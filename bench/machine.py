"""Where a benchmark ran and where its files go: ``bench/results/<device>/``, with machine, versions and date.

A CPU machine's folder is named by its processor and its number of CPUs (``AMD_EPYC_2cpu``), a GPU's by
the device's name (``NVIDIA_H200``), so results of two machines never share a folder and every README table is one
machine's. Files that describe no machine (formulas: ``memory_estimates``, ``memory_model``) stay in
``bench/results/``. Every CPU benchmark records ``environment()`` in its json and pins itself with ``pin()``.
"""

from __future__ import annotations

import os
import platform
import re
import time
from importlib import metadata
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
# the libraries a CPU benchmark's numbers depend on; each records the ones it imports (python always)
PACKAGES = ("torch", "transformers", "trl", "liger-kernel", "cut-cross-entropy", "fastdpo")
DATA_PACKAGES = ("torch", "transformers", "datasets", "pyarrow", "tokenizers", "fastdpo")


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpus() -> int:
    """The machine's CPUs (``os.cpu_count()``): the same before and after ``pin()``, which only narrows this process."""
    return os.cpu_count() or 1


def folder_name(device: str) -> str:
    """``device`` as a folder name: trademarks, 'Processor'/'CPU' and the clock dropped, the rest joined by '_'."""
    name = re.sub(r"\((R|TM|tm|r)\)|\bProcessor\b|\bCPU\b|@.*$", " ", device)
    return "_".join(re.findall(r"[A-Za-z0-9.+-]+", name)) or "unknown"


def cpu_results() -> Path:
    """This machine's CPU results folder, e.g. ``bench/results/AMD_EPYC_2cpu``."""
    return RESULTS / f"{folder_name(cpu_name())}_{cpus()}cpu"


def versions(*packages: str) -> dict:
    """Python's version and each package's installed version ('not installed' where it is not)."""
    found = {"python": platform.python_version()}
    for package in packages:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def environment(threads: int | None = None, packages: tuple[str, ...] = PACKAGES) -> dict:
    """What every results json records: processor, CPUs, threads used, versions, date."""
    return {"cpu": cpu_name(), "cpus": cpus(), "threads": threads, "versions": versions(*packages),
            "date": time.strftime("%Y-%m-%d")}  # fmt: skip


def pin(threads: int) -> None:
    """Run this process and the workers it starts on its first ``threads`` CPUs, torch with as many threads."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    import torch

    torch.set_num_threads(threads)


def run_record(module: str) -> dict:
    """The date and the command of a run, for a json whose other fields are its own (the GPU benchmarks' recorded
    neither: their runs' dates and arguments were known from the notes alone)."""
    import shlex
    import sys

    return {"date": time.strftime("%Y-%m-%d"), "command": shlex.join(["python", "-m", module, *sys.argv[1:]])}
