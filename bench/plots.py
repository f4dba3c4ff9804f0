"""The benchmarks' charts: horizontal bars, one panel per measured quantity, drawn from the results themselves.

Every ``bench/results/**/<name>.png`` is drawn by the module that writes ``<name>.json`` beside it, from the same
rows as its markdown table; each such module's ``--render DIR`` (``bench.dpo_cpu``, ``bench.head_gpu``,
``bench.packer``, ...) draws a stored run's chart from its json on any machine (the run's own md and csv stay as they
are). matplotlib is a development dependency; where it is missing (a GPU image) the chart is skipped with a note,
after the json and markdown are written.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

from fastdpo.atomic import atomic_open


def bar_panels(path: Path, title: str, panels: list[dict], *, columns: int = 4, label_width: float = 3.2) -> bool:
    """Draw ``panels`` side by side (``columns`` to a row) into ``path``; returns whether it was drawn.

    A panel is ``{"title": str, "labels": [str], "values": [float], "unit": str}`` plus optionally ``"errors"``
    (``[(low, high)]`` around each value, e.g. min and max of repeats) and ``"reference"`` (a value marked with a
    dashed line, e.g. a baseline's or a bar to stay under; the axis reaches it). Bars run top to bottom in the order
    given, each annotated with its value; ``"color"`` may be one color or one per bar. Each row of panels is as tall
    as its longest panel needs; its first panel carries the labels, and any other whose labels differ its own.
    """
    try:
        import matplotlib
    except ImportError:
        print(f"{path.name}: matplotlib is not installed here: no chart (its json and md are written)", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    across = min(columns, len(panels))
    down = -(-len(panels) // across)
    heights = [max(2.2, 0.9 + 0.34 * max(len(p["labels"]) for p in panels[row * across : (row + 1) * across]))
               for row in range(down)]  # fmt: skip
    fig, axes = plt.subplots(down, across, figsize=(label_width + 3.6 * across, sum(heights)), squeeze=False,
                             gridspec_kw={"height_ratios": heights})  # fmt: skip
    for index, ax in enumerate(axes.flat):
        if index >= len(panels):
            ax.set_visible(False)
            continue
        panel = panels[index]
        positions = list(range(len(panel["values"])))[::-1]
        errors = panel.get("errors")
        xerr = None
        if errors:
            xerr = [[v - low for v, (low, _) in zip(panel["values"], errors, strict=True)],
                    [high - v for v, (_, high) in zip(panel["values"], errors, strict=True)]]  # fmt: skip
        ax.barh(positions, panel["values"], xerr=xerr, color=panel.get("color", "tab:blue"), capsize=2)
        shown = shows_labels(panels, index, across)
        ax.set_yticks(positions, panel["labels"] if shown else [""] * len(positions), fontsize=8)
        ax.set_title(panel["title"], fontsize=9)
        ax.set_xlabel(panel["unit"], fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        if panel.get("reference") is not None:
            ax.axvline(panel["reference"], color="0.4", linestyle="--", linewidth=0.8)
        peak = max([*panel["values"], *(high for _, high in errors or []), panel.get("reference") or 0], default=0)
        ends = [high for _, high in errors] if errors else panel["values"]  # past the error bar
        for y, value, end in zip(positions, panel["values"], ends, strict=True):
            ax.text(end + 0.01 * peak, y, _number(value), va="center", fontsize=7)
        ax.set_xlim(0, 1.18 * peak if peak > 0 else 1)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)
    plt.close(fig)
    return True


def shows_labels(panels: list[dict], index: int, across: int) -> bool:
    """Whether panel ``index`` of rows of ``across`` shows its bars' labels: the first of its row does, and one whose
    labels are not the first's (a variant that failed at one shape: its bars would read as the first panel's)."""
    first = index - index % across
    return index == first or panels[index]["labels"] != panels[first]["labels"]


def palette(keys) -> dict:
    """A matplotlib cycle color (``"C0"``, ``"C1"``, ...) per distinct key, in the order keys first appear: bars of
    one group (a backend, a variant) share a color across panels."""
    return {key: f"C{index}" for index, key in enumerate(dict.fromkeys(keys))}


def timing_panel(title: str, rows: list[dict], baseline: str) -> dict | None:
    """A panel of the rows' timings (``times`` in seconds, per ``variant``) in ms, median with min–max, the
    ``baseline`` variant's median dashed; None when no row has timings (every variant failed)."""
    done = [r for r in rows if "times" in r]
    base = next((r for r in done if r["variant"] == baseline), None)
    if not done:
        return None
    return {"title": title, "labels": [r["variant"] for r in done],
            "values": [statistics.median(r["times"]) * 1e3 for r in done],
            "errors": [(min(r["times"]) * 1e3, max(r["times"]) * 1e3) for r in done], "unit": "ms, median (min–max)",
            "reference": base and statistics.median(base["times"]) * 1e3}  # fmt: skip


def _number(value: float) -> str:
    """A bar's value as the tables print such numbers: three significant digits, thousands separated."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}"
