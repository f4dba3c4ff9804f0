"""README.md's benchmark tables are the files under bench/results, verbatim (bench/report.py)."""

from __future__ import annotations

from pathlib import Path

from bench.report import render, stale_blocks, tables_outside_blocks

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_results_block_matches_its_file():
    stale = stale_blocks(README.read_text(encoding="utf-8"))
    assert not stale, f"README.md blocks differ from their files: {stale}; run python -m bench.report"


def test_no_benchmark_table_is_typed_by_hand():
    rows = tables_outside_blocks(README.read_text(encoding="utf-8"))
    assert not rows, f"README.md lines {rows}: tables in 'Benchmarks' outside a results block"


def test_render_replaces_a_block_with_the_file(tmp_path):
    (tmp_path / "r.md").write_text("| a |\n|---|\n| 1 |\n")
    text = "before\n<!-- results: r.md -->\n| a |\n| 0 |\n<!-- /results -->\nafter\n"
    assert stale_blocks(text, tmp_path) == ["r.md"]
    fresh = render(text, tmp_path)
    assert fresh == "before\n<!-- results: r.md -->\n| a |\n|---|\n| 1 |\n<!-- /results -->\nafter\n"
    assert stale_blocks(fresh, tmp_path) == [] and stale_blocks(text.replace("r.md", "gone.md"), tmp_path) == [
        "gone.md"
    ]
    assert tables_outside_blocks("## Benchmarks\n| x |\n" + fresh + "## Next\n| y |\n") == [2]


def test_the_formula_tables_are_what_the_code_computes(tmp_path, capsys):
    # memory_estimates.md and memory_model.md are formulas (and stored measurements), no timing: a change to
    # estimate_memory or to the formulas left README's tables as they were, no test failing
    from bench import memory_cpu, memory_model

    results = README.parent / "bench" / "results"
    assert memory_cpu.estimates_table() == (results / "memory_estimates.md").read_text(encoding="utf-8")
    memory_model.main(["--out", str(tmp_path)])
    assert (tmp_path / "memory_model.md").read_text() == (results / "memory_model.md").read_text(encoding="utf-8")
