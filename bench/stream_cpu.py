"""Streams on CPU: a JSONL file of pairs trained on as a stream or loaded first, time to the first batch, memory, disk.

    python -m bench.stream_cpu [--rows 200000] [--repeats 1]

The data and tokenizer are ``bench.load_cpu``'s (``write_pairs``: UltraFeedback-like lengths; a 16k-token BPE).
Each way runs in a fresh process (threads pinned to 2, ``datasets``' cache in a folder of its own, everything
imported and the way run once on 64 rows first), as a user writes it:

- ``map-style``: ``DPOTrainer(model, train_dataset=load_data(path))``: the trainer normalizes and tokenizes every
  row (``prepare_preferences``, ``tokenize_preferences``: Arrow files in the cache) before it returns;
- ``stream``: ``DPOTrainer(model, train_dataset=load_stream(path), max_steps=...)``: rows are read, checked and
  tokenized as batches are drawn (``prepare_stream``).

Then one pass of ``get_train_dataloader()`` (8 pairs a step, ``PairPacker``; a tiny model only to build the trainer;
the map-style sampler shuffles, the stream is read in file order). Reported: seconds to build the trainer, to the
first batch and for the whole pass; pairs per second over all of it; the peak resident memory above the start
(``VmHWM``; and, sampled every 20 ms, the anonymous pages apart from file-backed ones); the bytes ``datasets``
wrote to its cache. No quality report in either (a stream has none; ``bench.load_cpu`` times it). Results:
bench/results/<cpu>/stream_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from bench.load_cpu import ROOT, _epoch, _pin_threads, _tiny_trainer, _worker_env, train_tokenizer, write_pairs
from bench.rss import RssSampler, status_kib

MIB = 2**20
WAYS = ("map-style", "stream")


def _trainer(way: str, data: Path, tokenizer, *, out: Path, batch_size: int, max_length: int, steps: int):
    from fastdpo.data import load_data, load_stream

    dataset = load_data(str(data)) if way == "map-style" else load_stream(str(data))
    return _tiny_trainer(tokenizer, dataset, out=out, batch_size=batch_size, max_length=max_length, num_proc=None,
                         max_steps=steps)  # fmt: skip


def _pass(loader, first_batch_at: list) -> dict:
    start = time.perf_counter()

    def timed():
        for batch in loader:
            if not first_batch_at:
                first_batch_at.append(time.perf_counter() - start)
            yield batch

    return _epoch(timed())


def _cache_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def worker(way: str, data: Path, tokenizer_dir: Path, cache: Path, *, batch_size: int, max_length: int,
           rows: int) -> dict:  # fmt: skip
    """One way, in this (fresh) process: a warm-up on 64 rows, then the trainer and one pass, measured."""
    import datasets
    from transformers import AutoTokenizer

    from fastdpo.profiling import reset_peak_rss

    _pin_threads()
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    steps = -(-rows // batch_size)  # one pass (map-style: max_steps ends it there too)
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "warm_up.jsonl"
        with open(data, "rb") as source:
            small.write_bytes(b"".join(line for _, line in zip(range(64), source, strict=False)))
        warm = _trainer(way, small, tokenizer, out=Path(tmp) / "run", batch_size=batch_size, max_length=max_length,
                        steps=8)  # fmt: skip
        _pass(warm.get_train_dataloader(), [])
        del warm
    cache_before = _cache_bytes(cache)
    sampler = RssSampler()
    sampler.start()
    start_rss = reset_peak_rss()
    start_anon = status_kib()["RssAnon"] * 1024
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        trainer = _trainer(way, data, tokenizer, out=Path(tmp), batch_size=batch_size, max_length=max_length,
                           steps=steps)  # fmt: skip
        built = time.perf_counter() - start
        first: list[float] = []
        epoch = _pass(trainer.get_train_dataloader(), first)
        total = time.perf_counter() - start
        dropped = {reason: len(rows) for reason, rows in trainer.dropped_rows.get("train", {}).items()}
    sampler.stop()
    peak, anon, _ = sampler.take_peak()
    status = status_kib()
    pairs = rows - sum(dropped.values())
    return {"way": way, "build_seconds": built, "first_batch_seconds": built + first[0], "total_seconds": total,
            "pairs": pairs, "pairs_per_s": pairs / total, "dropped": dropped, "epoch": epoch,
            "start_rss_bytes": start_rss, "hwm_bytes": status["VmHWM"] * 1024,
            "peak_above_start_bytes": max(status["VmHWM"] * 1024, peak) - start_rss, "peak_sampled_bytes": peak,
            "peak_anon_above_start_bytes": anon - start_anon,
            "cache_bytes": _cache_bytes(cache) - cache_before}  # fmt: skip


def run(way: str, data: Path, tokenizer_dir: Path, tmp: Path, *, rows: int, batch_size: int, max_length: int,
        threads: int = 2) -> dict:  # fmt: skip
    import subprocess

    cache = tmp / f"hf_datasets_{way}"
    cache.mkdir(exist_ok=True)
    env = {**_worker_env(tmp, threads), "HF_DATASETS_CACHE": str(cache)}  # a cache of its own, to measure
    command = [sys.executable, "-m", "bench.stream_cpu", "--worker", way, "--data", str(data), "--tokenizer",
               str(tokenizer_dir), "--cache", str(cache), "--rows", str(rows), "--batch-size", str(batch_size),
               "--max-length", str(max_length)]  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"bench.stream_cpu --worker {way} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(meta: dict, results: list[dict]) -> str:
    written = meta["written"]
    lines = [
        f"Streams on CPU: {written['rows']:,} synthetic pairs in a {written['bytes'] / 1e6:,.0f} MB JSONL file "
        f"(bench.load_cpu's data), trained on as a stream or loaded first. {meta['cpus']} CPUs ({meta['cpu']}), "
        f"threads pinned to 2; {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}; {meta['date']}. "
        f"{meta['repeats']} run(s) each, in fresh processes; the median where several.",
        "",
        f"`DPOTrainer(train_dataset=...)` then one pass of `get_train_dataloader()` ({meta['batch_size']} pairs a "
        f"step, max_length {meta['max_length']}; a tiny model only to build the trainer). Peak memory above the "
        "process's start (`VmHWM`); cache: the bytes `datasets` wrote.",
        "",
        "| dataset | build trainer s | first batch s | whole pass s | pairs/s | peak above start MiB | "
        "anonymous peak above start MiB | cache written MB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in results:
        lines.append(
            f"| {result['way']} | {result['build_seconds']:.1f} | {result['first_batch_seconds']:.1f} | "
            f"{result['total_seconds']:.1f} | {result['pairs_per_s']:,.0f} | "
            f"{result['peak_above_start_bytes'] / MIB:,.0f} | {result['peak_anon_above_start_bytes'] / MIB:,.0f} | "
            f"{result['cache_bytes'] / 1e6:,.0f} |"
        )
    same = {r["way"]: (r["pairs"], r["dropped"]) for r in results}
    lines += ["", f"Pairs trained on and rows dropped (the same rows either way): {same}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.stream_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, help="folder for stream_cpu.{json,md} (default: bench/results/<cpu>)")
    parser.add_argument("--worker", choices=WAYS, help=argparse.SUPPRESS)
    for name in ("--data", "--tokenizer", "--cache"):
        parser.add_argument(name, type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, default=1024, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, args.data, args.tokenizer, args.cache, batch_size=args.batch_size,
                                max_length=args.max_length, rows=args.rows)))  # fmt: skip
        return
    from statistics import median

    from bench.machine import DATA_PACKAGES, cpu_results, environment
    from fastdpo.atomic import atomic_write

    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fastdpo-stream-") as name:
        tmp = Path(name)
        data = tmp / "pairs.jsonl"
        written = write_pairs(data, args.rows)
        train_tokenizer(data, tmp / "tokenizer")
        runs = {way: [] for way in WAYS}
        for repeat in range(args.repeats):
            for way in WAYS:
                print(f"{way}, run {repeat + 1} ...", file=sys.stderr, flush=True)
                runs[way].append(run(way, data, tmp / "tokenizer", tmp, rows=args.rows, batch_size=args.batch_size,
                                     max_length=args.max_length))  # fmt: skip
    results = []
    for found in runs.values():
        middle = sorted(found, key=lambda r: r["total_seconds"])[len(found) // 2]
        results.append({**middle, "total_seconds_all": [r["total_seconds"] for r in found],
                        "median_total_seconds": median(r["total_seconds"] for r in found)})  # fmt: skip
    meta = {**environment(2, DATA_PACKAGES), "written": written, "repeats": args.repeats,
            "batch_size": args.batch_size, "max_length": args.max_length,
            "seconds": time.perf_counter() - start}  # fmt: skip
    text = table(meta, results)
    args.out = args.out or cpu_results()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "stream_cpu.json", json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    atomic_write(args.out / "stream_cpu.md", text)
    print(text)


if __name__ == "__main__":
    main()
