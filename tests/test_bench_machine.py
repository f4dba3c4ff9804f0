"""bench/machine.py: every CPU benchmark writes to its machine's folder and records processor, CPUs, versions, date."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time

import pytest

from bench import data_cpu, machine, packer, packing_cpu, rank_balance
from bench.__main__ import ROOT


@pytest.mark.parametrize(
    ("model", "folder"),
    [("AMD EPYC", "AMD_EPYC"), ("Intel(R) Xeon(R) Processor", "Intel_Xeon"),
     ("Intel(R) Core(TM) i7-8700 CPU @ 3.20GHz", "Intel_Core_i7-8700"),
     ("AMD EPYC 7B13 64-Core Processor", "AMD_EPYC_7B13_64-Core"), ("NVIDIA H200", "NVIDIA_H200"), ("", "unknown")],
)  # fmt: skip
def test_a_device_name_becomes_a_folder_name_without_trademarks_or_clock(model, folder):
    assert machine.folder_name(model) == folder


# Each run small enough for CI (under a few seconds); a benchmark that pins itself is kept from pinning this process.
CHEAP = [
    (packer, ["--items", "3000", "--repeats", "1"], "packer"),
    (data_cpu, ["--rows", "40", "--num-proc", "1"], "data_cpu"),
    (packing_cpu, ["--pairs", "60", "--batch-sizes", "4", "--pack-lengths", "2048"], "packing_cpu"),
]


@pytest.mark.parametrize(("module", "args", "name"), CHEAP)
def test_a_cpu_benchmark_writes_to_its_machines_folder_and_records_the_machine(tmp_path, monkeypatch, module, args,
                                                                               name):  # fmt: skip
    monkeypatch.setattr(machine, "RESULTS", tmp_path)
    if hasattr(module, "pin"):
        monkeypatch.setattr(module, "pin", lambda threads: None)
    days = {time.strftime("%Y-%m-%d")}
    module.main(args)
    days.add(time.strftime("%Y-%m-%d"))  # (a run across midnight)
    folder = tmp_path / f"{machine.folder_name(machine.cpu_name())}_{os.cpu_count()}cpu"
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # nothing beside the machine's folder
    meta = json.loads((folder / f"{name}.json").read_text())["meta"]
    assert meta["cpu"] == machine.cpu_name() and meta["cpus"] == os.cpu_count() and meta["date"] in days
    assert meta["versions"]["python"] == platform.python_version() and "fastdpo" in meta["versions"]
    table = (folder / f"{name}.md").read_text()
    assert meta["date"] in table and meta["cpu"] in table  # the published table says where and when


def test_counting_stays_beside_the_machine_folders_and_still_records_versions_and_date(tmp_path):
    rank_balance.main(["--pairs", "400", "--out", str(tmp_path)])
    stored = json.loads((tmp_path / "rank_balance.json").read_text())
    assert stored["meta"]["versions"]["torch"] and stored["meta"]["date"] in (tmp_path / "rank_balance.md").read_text()
    assert rank_balance.RESULTS == machine.RESULTS  # its default: no machine's folder (nothing in it is timed)


def test_pin_narrows_the_process_and_its_workers_to_the_first_cpus():
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this OS")
    script = ("from bench.machine import pin; pin(1); import os, subprocess, sys, torch; "
              "child = subprocess.run([sys.executable, '-c', 'import os; print(len(os.sched_getaffinity(0)))'], "
              "capture_output=True, text=True).stdout.strip(); "
              "print(len(os.sched_getaffinity(0)), torch.get_num_threads(), child)")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1", "1", "1"]


def test_the_gpu_benchmarks_record_their_date_and_command(monkeypatch):
    # head_gpu and dpo_gpu recorded neither: a run's date and arguments (9 of 15 variants, --repeats 3) were known
    # from the session notes alone
    import inspect

    from bench import dpo_gpu, head_gpu

    monkeypatch.setattr(sys, "argv", ["head_gpu.py", "--tokens", "8192", "--variants", "gemms_4", "a b"])
    record = machine.run_record("bench.head_gpu")
    assert record == {"date": time.strftime("%Y-%m-%d"),
                      "command": "python -m bench.head_gpu --tokens 8192 --variants gemms_4 'a b'"}  # fmt: skip
    for module in (head_gpu, dpo_gpu):  # (their metas, built where a GPU runs them)
        assert f'run_record("{module.__name__}")' in inspect.getsource(module.main)
