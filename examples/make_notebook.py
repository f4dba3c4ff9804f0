"""Write examples/dpo_tutorial.ipynb from examples/dpo_tutorial.py: each ``# %%`` line starts a cell, ``# %%
[markdown]`` a markdown cell (its lines without the leading ``# ``).

    python examples/make_notebook.py
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cells(source: str) -> list[dict]:
    """The notebook cells of a ``# %%`` script (the module docstring before the first marker is left out)."""
    out: list[dict] = []
    kind, lines = None, []

    def flush():
        if kind is not None:
            while lines and not lines[-1].strip():
                lines.pop()
            text = [_uncomment(line) if kind == "markdown" else line for line in lines]
            out.append({"cell_type": kind, "metadata": {}, "source": [t + "\n" for t in text[:-1]] + text[-1:]}
                       | ({"execution_count": None, "outputs": []} if kind == "code" else {}))  # fmt: skip

    for line in source.splitlines():
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        elif kind is not None:
            lines.append(line)
    flush()
    return out


def _uncomment(line: str) -> str:
    return line[2:] if line.startswith("# ") else line[1:] if line.startswith("#") else line


def notebook(source: str) -> dict:
    return {"cells": cells(source), "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python",
            "name": "python3"}, "language_info": {"name": "python"}}, "nbformat": 4, "nbformat_minor": 5}  # fmt: skip


def main() -> None:
    source = (HERE / "dpo_tutorial.py").read_text(encoding="utf-8")
    target = HERE / "dpo_tutorial.ipynb"
    target.write_text(json.dumps(notebook(source), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
