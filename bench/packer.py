"""Best-fit-decreasing packing: the Python backend against the C++ one on the same lengths.

    python -m bench.packer [--items 1000000] [--low 10] [--high 1300] [--capacity 4096] [--repeats 3] [--seed 0]
    python -m bench.packer --render bench/results/AMD_EPYC_2cpu   # only draw packer.png from a stored packer.json

Lengths are drawn uniformly from low..high with a seeded numpy generator and packed into bins of ``capacity``
with ``fastdpo.data.packer.pack``, once from a numpy int64 array and once from a Python list of ints (what
``pack_pairs`` passes). Each (input, backend) pair is called once untimed, then timed ``repeats`` times, with a
full garbage collection between calls outside the timed region; we report the median (min–max). The outputs of
the two backends are compared for equality. Results go to bench/results/<cpu>/packer.{json,md,png}.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import statistics
import subprocess
import sysconfig
import time
from pathlib import Path

import numpy as np

from bench.machine import cpu_results, environment, pin
from bench.plots import bar_panels, palette
from fastdpo.atomic import atomic_write
from fastdpo.data.packer import cpp_available, pack


def _time(lengths, capacity: int, backend: str, repeats: int) -> tuple[list[float], list[list[int]]]:
    bins = pack(lengths, capacity, backend=backend)  # untimed first call
    seconds = []
    for _ in range(repeats):
        del bins
        gc.collect()
        start = time.perf_counter()
        bins = pack(lengths, capacity, backend=backend)
        seconds.append(time.perf_counter() - start)
    return seconds, bins


def _compiler() -> str:
    command = (sysconfig.get_config_var("CXX") or "c++").split()[0]
    if shutil.which(command) is None:
        return "none"
    result = subprocess.run([command, "--version"], capture_output=True, text=True, check=False)
    return result.stdout.splitlines()[0] if result.stdout else command


def _table(results: list[dict], meta: dict) -> str:
    lines = [
        f"BFD packing of {meta['items']:,} lengths uniform in {meta['low']}..{meta['high']} (seed {meta['seed']}) "
        f"into bins of {meta['capacity']}: {meta['bins']:,} bins, {meta['fill']:.4%} full. "
        f"{meta['cpu']}; Python {meta['versions']['python']}, numpy {meta['versions']['numpy']}, "
        f"{meta['versions']['c++ compiler']}; median of {meta['repeats']} (min–max) after one untimed call, "
        f"{meta['date']}. Both backends return identical bins: {meta['identical']}.",
        "",
        "| input | backend | seconds (min–max) | items/s | speedup over python |",
        "|---|---|---|---:|---:|",
    ]
    for row in results:
        lines.append(
            f"| {row['input']} | {row['backend']} | {row['median_s']:.3f} ({row['min_s']:.3f}–{row['max_s']:.3f}) "
            f"| {meta['items'] / row['median_s']:,.0f} | {row['speedup']:.1f}x |"
        )
    lines += ["", "Command: `python -m bench.packer" + "".join(f" --{k} {v}" for k, v in meta["args"].items()) + "`"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.packer", description=__doc__.splitlines()[0])
    parser.add_argument("--items", type=int, default=1_000_000)
    parser.add_argument("--low", type=int, default=10)
    parser.add_argument("--high", type=int, default=1300)
    parser.add_argument("--capacity", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="folder for packer.{json,md,png} (default: bench/results/<cpu>)")
    parser.add_argument("--render", type=Path, metavar="DIR", help="only draw DIR/packer.png from its json")
    args = parser.parse_args(argv)
    if args.render:
        render(args.render)
        return
    if not cpp_available():
        raise SystemExit("fastdpo._packer is not built: reinstall with a C++ compiler ('pip install -e .')")
    pin(1)  # both backends run on one thread
    environ = environment(1, ("numpy", "fastdpo"))
    environ["versions"]["c++ compiler"] = _compiler()

    array = np.random.default_rng(args.seed).integers(args.low, args.high + 1, size=args.items, dtype=np.int64)
    inputs = {"numpy int64 array": array, "list of ints": array.tolist()}
    results, outputs = [], {}
    for input_name, lengths in inputs.items():
        python_s = None
        for backend in ("python", "cpp"):
            seconds, outputs[input_name, backend] = _time(lengths, args.capacity, backend, args.repeats)
            median = statistics.median(seconds)
            python_s = python_s or median
            results.append(
                {"input": input_name, "backend": backend, "median_s": median, "min_s": min(seconds),
                 "max_s": max(seconds), "speedup": python_s / median, "seconds": seconds}
            )  # fmt: skip
            print(f"{input_name:>18} {backend:>6}: {median:.3f} s (median of {args.repeats})", flush=True)
    reference = outputs["numpy int64 array", "python"]
    identical = all(bins == reference for bins in outputs.values())
    meta = {
        "items": args.items, "low": args.low, "high": args.high, "capacity": args.capacity, "seed": args.seed,
        "repeats": args.repeats, "bins": len(reference), "fill": int(array.sum()) / (len(reference) * args.capacity),
        "identical": identical, **environ,
        "args": {k: v for k, v in vars(args).items() if k not in ("out", "render")},
    }  # fmt: skip
    args.out = args.out or cpu_results()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "packer.json", json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    table = _table(results, meta)
    atomic_write(args.out / "packer.md", table)
    _plot(results, meta, args.out / "packer.png")
    print(table)
    if not identical:
        raise SystemExit("the backends disagree")


def _plot(results: list[dict], meta: dict, path: Path) -> None:
    """Seconds (median, min–max), items/s and the speedup over python of each (input, backend), as the table."""
    labels = [f"{r['input']}, {r['backend']}" for r in results]
    color = palette(r["backend"] for r in results)
    colors = [color[r["backend"]] for r in results]
    title = (f"BFD packing of {meta['items']:,} lengths in {meta['low']}..{meta['high']} into bins of "
             f"{meta['capacity']}, {meta['cpu']}, median of {meta['repeats']} (dashed: python)")  # fmt: skip
    bar_panels(path, title, [
        {"title": "time", "labels": labels, "values": [r["median_s"] * 1e3 for r in results], "color": colors,
         "errors": [(r["min_s"] * 1e3, r["max_s"] * 1e3) for r in results], "unit": "ms, median (min–max)"},
        {"title": "throughput", "labels": labels, "values": [meta["items"] / r["median_s"] / 1e6 for r in results],
         "color": colors, "unit": "million items per second"},
        {"title": "speedup over python", "labels": labels, "values": [r["speedup"] for r in results], "color": colors,
         "unit": "python's time / this time", "reference": 1.0},
    ], columns=3)  # fmt: skip


def render(folder: Path) -> None:
    """Draw ``packer.png`` from a stored ``packer.json`` (its md, written by the run, stays as it is)."""
    stored = json.loads((folder / "packer.json").read_text())
    _plot(stored["results"], stored["meta"], folder / "packer.png")


if __name__ == "__main__":
    main()
