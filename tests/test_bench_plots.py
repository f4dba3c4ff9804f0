"""bench.plots and the benchmarks' charts: drawn from the stored results, also for runs made on a GPU elsewhere."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from bench import (
    data_cpu,
    dpo_cpu,
    dpo_gpu,
    head_cpu_grid,
    head_gpu,
    load_cpu,
    memory_cpu,
    packer,
    packing_cpu,
    ref_cache_cpu,
)
from bench.plots import bar_panels, shows_labels, timing_panel

RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"
CPU = "AMD_EPYC_2cpu"  # the CPU results README shows (bench/machine.py names the folder)
PNG = b"\x89PNG\r\n\x1a\n"


def test_panels_in_a_grid_with_errors_and_a_reference_are_drawn(tmp_path):
    panels = [{"title": f"panel {k}", "labels": ["a", "b", "c"][: k + 1], "values": [1.0, 250.0, 3e4][: k + 1],
               "errors": [(0.5, 2.0), (200.0, 300.0), (2e4, 4e4)][: k + 1], "unit": "ms", "reference": 1.0}
              for k in range(3)]  # fmt: skip
    path = tmp_path / "chart.png"
    assert bar_panels(path, "three panels on two rows", panels, columns=2)
    assert path.read_bytes().startswith(PNG)


def test_each_row_of_panels_is_as_tall_as_its_longest_panel_needs(tmp_path):
    long, short = {"labels": [f"bar {k}" for k in range(20)], "values": [1.0] * 20}, {"labels": ["a"], "values": [1.0]}
    panels = [{"title": "t", "unit": "u", **bars} for bars in (long, long, short)]  # rows of 20 bars and of 1
    path = tmp_path / "chart.png"
    assert bar_panels(path, "rows of different heights", panels, columns=2)
    height = int.from_bytes(path.read_bytes()[20:24], "big")  # the PNG header's IHDR: width, then height
    assert height == pytest.approx(110 * ((0.9 + 0.34 * 20) + 2.2), abs=2)  # not two rows of 20 bars' height


def test_a_panel_whose_bars_differ_from_its_rows_first_shows_its_own_labels():
    # the grid's largest shape had no full-logits bar (out of memory): its bars read as the first panel's labels,
    # fastdpo_torch's time under "full_logits"
    same, fewer = {"labels": ["a", "b", "c"]}, {"labels": ["b", "c"]}
    panels = [same, same, same, fewer]
    assert [shows_labels(panels, index, 2) for index in range(4)] == [True, False, True, True]


def test_without_matplotlib_no_chart_and_a_note(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on a GPU image without it: import fails
    path = tmp_path / "chart.png"
    assert not bar_panels(path, "t", [{"title": "x", "labels": ["a"], "values": [1.0], "unit": "s"}])
    assert not path.exists() and "matplotlib is not installed" in capsys.readouterr().err


def test_a_timing_panel_is_in_ms_with_the_baselines_median_dashed():
    rows = [{"variant": "gemms_4", "times": [0.002, 0.001, 0.004]}, {"variant": "ours", "times": [0.003, 0.005]},
            {"variant": "broken", "error": "OutOfMemoryError"}]  # fmt: skip
    panel = timing_panel("N=1", rows, "gemms_4")
    assert panel["labels"] == ["gemms_4", "ours"]  # a failed variant has no bar
    assert panel["values"] == pytest.approx([2.0, 4.0]) and panel["reference"] == pytest.approx(2.0)
    assert panel["errors"] == [pytest.approx((1.0, 4.0)), pytest.approx((3.0, 5.0))]
    assert timing_panel("N=1", rows[2:], "gemms_4") is None


@pytest.mark.parametrize(
    ("module", "stored", "name"),
    [(dpo_gpu, "NVIDIA_H200/run4/batch64", "dpo_gpu"), (head_gpu, "NVIDIA_H200/run5", "head_gpu"),
     (dpo_cpu, CPU, "dpo_cpu"), (memory_cpu, CPU, "memory_cpu"), (packer, CPU, "packer"),
     (data_cpu, CPU, "data_cpu"), (packing_cpu, CPU, "packing_cpu"), (packing_cpu, CPU, "packing_cpu_widths"),
     (ref_cache_cpu, CPU, "ref_cache_cpu"), (load_cpu, CPU, "load_cpu"),
     (head_cpu_grid, "Intel_Xeon_2cpu", "head_cpu_grid")],
)  # fmt: skip
def test_render_draws_a_stored_runs_chart_from_its_json_and_leaves_its_table(tmp_path, module, stored, name):
    shutil.copy(RESULTS / stored / f"{name}.json", tmp_path)
    module.main(["--render", str(tmp_path)])
    assert (tmp_path / f"{name}.png").read_bytes().startswith(PNG)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.json", f"{name}.png"]  # no md rewritten
