"""The CPU head op across the issue's shapes: N ∈ {2k, 8k, 32k} tokens × V ∈ {32k, 128k}, H = 256, fp32.

    python -m bench.head_cpu_grid [--tokens 2048 8192 32768] [--vocab 32000 128256] [--repeats 2] [--threads 2]
    python -m bench.head_cpu_grid --render bench/results/Intel_Xeon_2cpu   # only draw the chart from its json

Each shape runs ``bench.head_cpu``'s variants as that benchmark does (each variant in its own process, threads
pinned, one warm-up call, the median of ``--repeats`` timed calls, peak RSS above a baseline taken after setup), by
default the seven that differ in method (Liger's eager run and fastdpo's Liger-call wrapper of ``fused_pair_loss``
are in ``head_cpu``'s table). A variant whose memory passes ``--memory-limit-gib`` (default 80% of RAM) fails in its
own process and is reported as out of memory, as one that runs past ``--timeout`` is reported timed out. Results:
bench/results/<cpu>/head_cpu_grid.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench.head_cpu import VARIANTS, _run_all, memory_limit
from bench.machine import cpu_results, environment, pin
from bench.plots import bar_panels
from fastdpo.atomic import atomic_write

DEFAULT_VARIANTS = ("full_logits", "fastdpo_torch", "trl_chunked", "liger_dpo", "fastdpo_fused_pair",
                    "cce_torch_compile", "gemms_3")  # fmt: skip


def _cell(result: dict, base: dict | None) -> str:
    if "times" not in result:
        return "out of memory" if result["error"].startswith("out of memory") else result["error"]
    median = statistics.median(result["times"])
    ratio = f", {median / statistics.median(base['times']):.2f}x" if base and "times" in base else ""
    return f"{median:.2f} s{ratio}, {result['extra_bytes'] / 2**20:,.0f} MiB"


def table(meta: dict, shapes: list[dict]) -> str:
    lines = [
        f"Head op fwd+bwd across shapes, H={meta['hidden']} fp32, all targets valid; {meta['cpu']}, "
        f"{meta['threads']} threads; torch {meta['versions']['torch']}, trl {meta['versions']['trl']}, liger-kernel "
        f"{meta['versions']['liger-kernel']}, cut-cross-entropy {meta['versions']['cut-cross-entropy']}; median of "
        f"{meta['repeats']} after one warm-up call; {meta['date']}. Each cell: seconds, time against full logits at "
        f"that shape, extra peak RSS (MiB; beyond inputs, outputs and gradients). Memory limit per variant "
        f"{meta['memory_limit_gib']:.1f} GiB.",
        "",
        "| variant | " + " | ".join(f"N={s['tokens']} V={s['vocab']}" for s in shapes) + " |",
        "|---|" + "---|" * len(shapes),
    ]
    for name in meta["variants"]:
        cells = []
        for shape in shapes:
            found = {r["variant"]: r for r in shape["results"]}
            cells.append(_cell(found[name], found.get("full_logits")))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(meta: dict, shapes: list[dict], path: Path) -> None:
    """Seconds per variant at each shape, one panel per shape (full logits dashed)."""
    panels = []
    for shape in shapes:
        done = [r for r in shape["results"] if "times" in r]
        base = next((r for r in done if r["variant"] == "full_logits"), None)
        panels.append({"title": f"N={shape['tokens']} V={shape['vocab']}", "labels": [r["variant"] for r in done],
                       "values": [statistics.median(r["times"]) for r in done], "unit": "seconds, median",
                       "reference": statistics.median(base["times"]) if base else None})  # fmt: skip
    title = f"Head op fwd+bwd, H={meta['hidden']} fp32, {meta['cpu']}, {meta['threads']} threads (dashed: full logits)"
    bar_panels(path, title, panels, columns=2)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.head_cpu_grid", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--memory-limit-gib", type=float, help="address space per variant (default: 80%% of RAM)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per variant and shape")
    parser.add_argument("--out", type=Path, help="folder for head_cpu_grid.{json,md,png} (default: results/<cpu>)")
    parser.add_argument("--render", type=Path, metavar="DIR", help="only draw DIR/head_cpu_grid.png from its json")
    args = parser.parse_args(argv)
    if args.render:
        stored = json.loads((args.render / "head_cpu_grid.json").read_text())
        plot(stored["meta"], stored["shapes"], args.render / "head_cpu_grid.png")
        return
    pin(args.threads)  # the workers inherit the affinity
    args.out = args.out or cpu_results()
    shapes = []
    for vocab in args.vocab:
        for tokens in args.tokens:
            shape = argparse.Namespace(**{**vars(args), "tokens": tokens, "vocab": vocab})
            shapes.append({"tokens": tokens, "vocab": vocab, "results": _run_all(shape)})
    meta = {"hidden": args.hidden, "repeats": args.repeats, "variants": args.variants, "timeout_s": args.timeout,
            "memory_limit_gib": memory_limit(args.memory_limit_gib) / 2**30, **environment(args.threads)}  # fmt: skip
    text = table(meta, shapes)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "head_cpu_grid.json", json.dumps({"meta": meta, "shapes": shapes}, indent=1) + "\n")
    atomic_write(args.out / "head_cpu_grid.md", text)
    plot(meta, shapes, args.out / "head_cpu_grid.png")
    print(text)


if __name__ == "__main__":
    main()
