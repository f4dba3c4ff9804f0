"""The cached reference on CPU: a run that computes the cache, a run that reuses it, and a separate reference.

    python -m bench.ref_cache_cpu [--pairs 256] [--batch 8] [--steps 8] [--threads 2]
    python -m bench.ref_cache_cpu --render bench/results/AMD_EPYC_2cpu   # only draw ref_cache_cpu.png from its json

fastdpo's DPOTrainer on bench/dpo_cpu.py's model and pairs, each run in its own process:

- ``separate``: a reference model in memory, run on every step's batch;
- ``cached, first run``: ``precompute_ref_log_probs=True`` with an empty cache directory: the reference log-probs of
  the whole dataset are computed once at construction (setup), then training runs no reference;
- ``cached, second run``: the same with the file the first run wrote (another beta, as in a sweep): nothing to
  compute.

Timed: construction (setup: tokenization, and for the first cached run the reference pass over every pair) and
``train()``. Peak RSS is the whole process above its state before construction. Results:
bench/results/<cpu>/ref_cache_cpu.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.dpo_cpu import MODEL, _pairs
from bench.machine import cpu_results, environment, pin
from bench.plots import bar_panels
from fastdpo.atomic import atomic_write
from fastdpo.profiling import peak_rss, reset_peak_rss, run_measured

RUNS = {"separate": {}, "cached, first run": {"precompute_ref_log_probs": True},
        "cached, second run": {"precompute_ref_log_probs": True, "beta": 0.2}}  # fmt: skip


def _worker(args: argparse.Namespace) -> dict:
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastdpo.data.tiny_tokenizer import build_tiny_tokenizer
    from fastdpo.train import DPOConfig, DPOTrainer

    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL, pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa"))
    data = datasets.Dataset.from_list(_pairs(args.pairs))
    options = {"output_dir": tempfile.mkdtemp(), "per_device_train_batch_size": args.batch, "max_steps": args.steps,
               "logging_steps": 1, "report_to": [], "bf16": False, "save_strategy": "no", "seed": 0,
               "disable_tqdm": True, "ref_cache_dir": args.cache_dir, **RUNS[args.worker]}  # fmt: skip
    base = reset_peak_rss()
    start = time.perf_counter()
    trainer = DPOTrainer(model, args=DPOConfig(**options), train_dataset=data, processing_class=tokenizer)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    logs = [log for log in trainer.state.log_history if "loss" in log]
    return {"run": args.worker, "setup_s": setup_s, "train_s": train_s, "peak_extra_bytes": peak_rss() - base,
            "losses": [log["loss"] for log in logs]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.ref_cache_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=list(RUNS), help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="folder for ref_cache_cpu.{json,md,png} (default: results/<cpu>)")
    parser.add_argument("--render", type=Path, metavar="DIR", help="only draw DIR/ref_cache_cpu.png from its json")
    args = parser.parse_args(argv)
    if args.render:
        stored = json.loads((args.render / "ref_cache_cpu.json").read_text())
        runs = stored["results"] if isinstance(stored, dict) else stored  # a list: written before meta was recorded
        _plot(runs, args.render / "ref_cache_cpu.png")
        return
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    pin(args.threads)  # the workers inherit the affinity
    args.out = args.out or cpu_results()
    meta = {**environment(args.threads, ("torch", "transformers", "fastdpo")), "pairs": args.pairs,
            "batch": args.batch, "steps": args.steps}  # fmt: skip
    cache_dir = tempfile.mkdtemp(prefix="fastdpo_ref_cache_")
    results = []
    try:
        for run in RUNS:
            print(f"running {run} ...", file=sys.stderr, flush=True)
            command = [sys.executable, "-m", "bench.ref_cache_cpu", "--worker", run, "--cache-dir", cache_dir,
                       "--pairs", str(args.pairs), "--batch", str(args.batch), "--steps", str(args.steps),
                       "--threads", str(args.threads)]  # fmt: skip
            results.append(run_measured(command, env={"OMP_NUM_THREADS": str(args.threads)},
                                        cwd=Path(__file__).parents[1]))  # fmt: skip
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    first, second = results[1], results[2]
    lines = [
        f"fastdpo DPOTrainer, tiny Llama (H=256, 4 layers, V=32000, fp32, sdpa), {args.pairs} pairs, batch "
        f"{args.batch}, {args.steps} steps, {args.threads} threads; {meta['cpu']}; torch {torch.__version__}, "
        f"transformers {meta['versions']['transformers']}; {meta['date']}.",
        "",
        "| run | setup s | train s | total s | peak extra RSS MiB |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['run']} | {r['setup_s']:.1f} | {r['train_s']:.1f} | {r['setup_s'] + r['train_s']:.1f} | "
                     f"{r['peak_extra_bytes'] / 2**20:.0f} |")  # fmt: skip
    total = [r["setup_s"] + r["train_s"] for r in (first, second)]
    lines += ["", f"Second cached run vs first: {total[1] / total[0]:.2f}x the time (setup {second['setup_s']:.1f} s "
              f"against {first['setup_s']:.1f} s); training steps without a reference pass: "
              f"{first['train_s']:.1f} s against {results[0]['train_s']:.1f} s with a separate reference."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "ref_cache_cpu.json", json.dumps({"meta": meta, "results": results}, indent=1))
    atomic_write(args.out / "ref_cache_cpu.md", text)
    _plot(results, args.out / "ref_cache_cpu.png")
    print(text)


def _plot(results: list[dict], path: Path) -> None:
    """Setup, train and total seconds and peak extra RSS per run, as the table; the separate reference's dashed."""
    labels = [r["run"] for r in results]
    columns = {"setup": [r["setup_s"] for r in results], "train()": [r["train_s"] for r in results],
               "total": [r["setup_s"] + r["train_s"] for r in results]}  # fmt: skip
    panels = [{"title": name, "labels": labels, "values": values, "unit": "seconds", "reference": values[0]}
              for name, values in columns.items()]  # fmt: skip
    peaks = [r["peak_extra_bytes"] / 2**20 for r in results]
    panels.append({"title": "peak memory", "labels": labels, "values": peaks, "unit": "peak extra RSS, MiB",
                   "color": "tab:orange", "reference": peaks[0]})  # fmt: skip
    title = (f"fastdpo DPOTrainer on CPU, {len(results[0]['losses'])} steps: a reference cache computed, then reused,\n"
             f"against a separate reference model (dashed: {labels[0]})")  # fmt: skip
    bar_panels(path, title, panels, columns=2, label_width=2.0)


if __name__ == "__main__":
    main()
