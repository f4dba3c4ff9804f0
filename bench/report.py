"""README.md's measured tables come from the files under bench/results, never typed by hand.

    python -m bench.report          # rewrite every results block of README.md from its file
    python -m bench.report --check  # exit 1, naming each block, where README.md differs from the files

A results block is::

    <!-- results: bench/results/AMD_EPYC_2cpu/dpo_cpu.md -->
    (the file's content, verbatim)
    <!-- /results -->

``tests/test_readme_results.py`` fails when a block is stale or when a table of README's "Benchmarks" section
stands outside a block.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- results: (?P<path>\S+) -->\n(?P<body>.*?)<!-- /results -->", re.DOTALL)


def _content(path: str, root: Path) -> str:
    text = (root / path).read_text(encoding="utf-8").strip("\n")
    return text + "\n"


def render(readme: str, root: Path = ROOT) -> str:
    """README's text with every results block replaced by its file's current content."""
    return BLOCK.sub(lambda m: f"<!-- results: {m['path']} -->\n{_content(m['path'], root)}<!-- /results -->", readme)


def stale_blocks(readme: str, root: Path = ROOT) -> list[str]:
    """The paths of the blocks whose text differs from their file (or whose file is missing)."""
    stale = []
    for match in BLOCK.finditer(readme):
        path = root / match["path"]
        if not path.is_file() or match["body"] != _content(match["path"], root):
            stale.append(match["path"])
    return stale


def tables_outside_blocks(readme: str, section: str = "## Benchmarks") -> list[int]:
    """Line numbers (1-based) of table rows in ``section`` (up to the next ``## `` heading) outside any block."""
    lines = readme.splitlines()
    inside_section = inside_block = False
    rows = []
    for number, line in enumerate(lines, start=1):
        if line.startswith("## "):
            inside_section = line.strip() == section
        elif line.startswith("<!-- results: "):
            inside_block = True
        elif line.startswith("<!-- /results -->"):
            inside_block = False
        elif inside_section and not inside_block and line.startswith("|"):
            rows.append(number)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.report", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale blocks (exit 1 if any)")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    stale = stale_blocks(text)
    if args.check:
        for path in stale:
            print(f"{args.readme.name}: the block of {path} differs from the file (run python -m bench.report)")
        return 1 if stale else 0
    args.readme.write_text(render(text), encoding="utf-8")
    print(f"{args.readme.name}: {len(BLOCK.findall(text))} results blocks, {len(stale)} rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
