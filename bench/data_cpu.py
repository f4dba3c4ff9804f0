"""Data-layer throughput on CPU: normalizing, tokenizing and checking synthetic preference pairs.

    python -m bench.data_cpu [--rows 100000] [--num-proc 1 2]
    python -m bench.data_cpu --render bench/results/AMD_EPYC_2cpu   # only draw data_cpu.png from a stored data_cpu.json

Synthetic standard-format pairs (prompts of ~30 words, completions of ~40, drawn from a fixed word list with a
seeded generator) and the locally trained tiny tokenizer. Each stage is timed once on a fresh in-memory dataset
with caching disabled, so nothing is read back from a previous run; rows/s = rows / wall seconds. Results go to
bench/results/<cpu>/data_cpu.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import datasets

from bench.machine import DATA_PACKAGES, cpu_results, environment
from bench.plots import bar_panels, palette
from fastdpo.atomic import atomic_write
from fastdpo.data.formats import prepare_preferences
from fastdpo.data.tiny_tokenizer import build_tiny_tokenizer
from fastdpo.data.tokenize import tokenize_preferences

WORDS = tuple(
    [
        "the",
        "sky",
        "is",
        "blue",
        "green",
        "clear",
        "day",
        "night",
        "rain",
        "sun",
        "moon",
        "plant",
        "water",
        "light",
        "sugar",
        "oxygen",
        "bread",
        "flour",
        "yeast",
        "salt",
        "knead",
        "bake",
        "answer",
        "question",
        "explain",
        "write",
        "translate",
        "morning",
        "good",
        "quick",
        "brown",
        "fox",
        "jumps",
        "over",
        "lazy",
        "dog",
        "cat",
    ]
)


def synthetic_pairs(rows: int, seed: int = 0) -> datasets.Dataset:
    rng = random.Random(seed)

    def sentence(n):
        return " ".join(rng.choice(WORDS) for _ in range(n))

    data = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(rows):
        data["prompt"].append(sentence(rng.randint(20, 40)) + "?")
        data["chosen"].append(" " + sentence(rng.randint(30, 50)) + ".")
        data["rejected"].append(" " + sentence(rng.randint(30, 50)) + ".")
    return datasets.Dataset.from_dict(data)


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def run(rows: int, num_procs: list[int]) -> list[dict]:
    datasets.disable_caching()
    datasets.disable_progress_bars()
    tokenizer = build_tiny_tokenizer()
    raw = synthetic_pairs(rows)
    results = []
    for num_proc in num_procs:
        proc = None if num_proc == 1 else num_proc
        prepared, t_prepare = _timed(lambda p=proc: prepare_preferences(raw, num_proc=p))
        _, t_tokenize = _timed(
            lambda p=proc, d=prepared: tokenize_preferences(d, tokenizer, max_length=1024, num_proc=p)
        )
        results.append({"stage": "prepare_preferences", "num_proc": num_proc, "seconds": t_prepare})
        results.append({"stage": "tokenize_preferences", "num_proc": num_proc, "seconds": t_tokenize})
    try:
        from fastdpo.data.quality import check_preferences
    except ImportError:
        return results
    _, t_check = _timed(lambda: check_preferences(raw))
    results.append({"stage": "check_preferences (no tokenizer)", "num_proc": 1, "seconds": t_check})
    _, t_check_tok = _timed(lambda: check_preferences(raw, tokenizer, max_length=128))
    results.append({"stage": "check_preferences (tokenizer, max_length=128)", "num_proc": 1, "seconds": t_check_tok})
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.data_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", type=Path, help="folder for data_cpu.{json,md,png} (default: bench/results/<cpu>)")
    parser.add_argument("--render", type=Path, metavar="DIR", help="only draw DIR/data_cpu.png from its json")
    args = parser.parse_args(argv)
    if args.render:
        stored = json.loads((args.render / "data_cpu.json").read_text())
        _plot(stored["rows"], stored["results"], args.render / "data_cpu.png")
        return
    args.out = args.out or cpu_results()
    results = run(args.rows, args.num_proc)
    meta = environment(packages=DATA_PACKAGES)
    header = (
        f"Data layer on {args.rows} synthetic standard pairs, tiny BPE tokenizer, {meta['cpus']} CPUs ({meta['cpu']}), "
        f"datasets {datasets.__version__}, tokenizers {meta['versions']['tokenizers']}; one timed run per stage, "
        f"caching off; {meta['date']}.\n\n"
        "| stage | num_proc | seconds | rows/s |\n|---|---|---|---|\n"
    )
    table = header + "".join(
        f"| {r['stage']} | {r['num_proc']} | {r['seconds']:.2f} | {args.rows / r['seconds']:,.0f} |\n" for r in results
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stored = {"meta": meta, "rows": args.rows, "results": results}
    atomic_write(args.out / "data_cpu.json", json.dumps(stored, indent=1))
    atomic_write(args.out / "data_cpu.md", table)
    _plot(args.rows, results, args.out / "data_cpu.png")
    print(table)


def _plot(rows: int, results: list[dict], path: Path) -> None:
    """rows/s and seconds per (stage, num_proc), as the table; a color per num_proc."""
    labels = [f"{r['stage']}, num_proc={r['num_proc']}" for r in results]
    color = palette(sorted(r["num_proc"] for r in results))
    colors = [color[r["num_proc"]] for r in results]
    bar_panels(path, f"Data layer on {rows:,} synthetic standard pairs, tiny BPE tokenizer; one timed run per stage", [
        {"title": "throughput", "labels": labels, "values": [rows / r["seconds"] for r in results], "color": colors,
         "unit": "rows per second"},
        {"title": "time", "labels": labels, "values": [r["seconds"] for r in results], "color": colors,
         "unit": "seconds"},
    ], columns=2, label_width=4.2)  # fmt: skip


if __name__ == "__main__":
    main()
