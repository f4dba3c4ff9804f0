"""Load: a user's whole data pipeline on 200k synthetic pairs, and RSS over hundreds of tiny training steps, on CPU.

    python -m bench.load_cpu [--rows 200000] [--num-proc 1] [--steps 500] [--skip-sft]

Pipeline: 200k UltraFeedback-like pairs are written to a JSONL file in a temporary folder (prompts lognormal with a
median of 70 words, completions a median of 220, both with long tails; 0.2% exact duplicates and 0.1% rows with
chosen == rejected, which the check drops), and a 16k-token byte-level BPE is trained on the first 2,000 rows
(about 4 characters a token, as English). One fresh process (``datasets`` cache in the temporary folder, threads
pinned to 2), after a warm-up on 64 rows, runs what a user runs: ``prepare_preferences(path)`` →
``check_preferences(ds, tokenizer, max_length=1024)`` → ``report.filter`` → ``tokenize_preferences`` → one epoch
of ``DPOTrainer.get_train_dataloader()`` (8 pairs a step, ``PairPacker``; a tiny model only to build the trainer).
Per stage: wall time, rows/s, the resident memory at its end (anonymous and file-backed: Arrow tables are
memory-mapped files), and the peak: the process's ``VmHWM`` (exact) and, sampled every 20 ms, the process plus
its ``num_proc`` workers (by PSS). What a user's script would keep (report, datasets) stays alive to the end.

Steps: ``DPOTrainer`` (and ``SFTTrainer``) on a tiny Llama (H=32, 2 layers), CPU fp32, 4 pairs a step, max_length
128, logging every step, in a fresh process; RSS read at every step's end. Reported: RSS at step 50 and at the
last step, the growth, the highest RSS in between, the least-squares slope (bytes a step; a leak shows there
first). Results: bench/results/<cpu>/load_cpu.{json,md,png} (``--render DIR`` draws DIR/load_cpu.png from its json).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

from bench.machine import DATA_PACKAGES, cpu_results, environment, pin
from bench.rss import RssSampler, rss_bytes, status_kib

ROOT = Path(__file__).resolve().parents[1]
MIB = 2**20
SYLLABLES = ("ba", "ko", "ri", "te", "mu", "sa", "lo", "ne", "di", "fa", "gu", "pi", "ra", "ve", "zo", "ha", "ki",
             "mo", "tu", "le", "sen", "tor", "val", "mar", "ist", "ent", "ion", "ar", "el", "on", "st", "pre", "un",
             "ing", "ed", "ly", "a", "o", "i")  # fmt: skip
WORD_TYPES = 40_000
PROMPT_WORDS = (70, 1.0, 2000)  # lognormal median, sigma, cap
COMPLETION_WORDS = (220, 0.6, 1500)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS")
PEAK_BAR, GROWTH_BAR = 4e9, 50e6  # bytes: the bars, for the pipeline's peak RSS and for the RSS growth over steps


# ---------------------------------------------------------------------------------------------------- the data


def pseudo_words(count: int = WORD_TYPES, seed: int = 0) -> list[str]:
    """``count`` distinct words of 1-4 syllables, in frequency-rank order: shorter words first, as in a language
    (random among equal lengths). With the BPE below, text has about 4 characters a token, as English has."""
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < count:
        words.add("".join(rng.choice(SYLLABLES) for _ in range(rng.choice((1, 2, 2, 2, 3, 3, 4)))))
    ranked = sorted(words)
    rng.shuffle(ranked)
    return sorted(ranked, key=len)


def write_pairs(path: Path, rows: int, *, seed: int = 0, scale: float = 1.0, chunk: int = 5000) -> dict:
    """Write ``rows`` standard pairs to ``path`` (JSONL), word frequencies Zipfian; returns what was written.

    ``scale`` multiplies the word counts (medians and caps). Every 500th row repeats the row before it (a
    duplicate); one row in 1000 has chosen == rejected.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    vocab = np.array(pseudo_words(seed=seed), dtype=object)
    cdf = np.cumsum(1.0 / np.arange(1, len(vocab) + 1) ** 1.05)
    cdf /= cdf[-1]

    def counts(spec, shape):
        median, sigma, cap = spec
        return np.clip(rng.lognormal(np.log(median * scale), sigma, shape), 3, cap * scale).astype(np.int64)

    written = {"rows": 0, "bytes": 0, "duplicates": 0, "identical": 0, "words": 0}
    with open(path, "w", encoding="utf-8") as handle:
        previous = None
        for start in range(0, rows, chunk):
            n = min(chunk, rows - start)
            lengths = np.stack([counts(PROMPT_WORDS, n), counts(COMPLETION_WORDS, n), counts(COMPLETION_WORDS, n)])
            words = vocab[np.searchsorted(cdf, rng.random(int(lengths.sum())))].tolist()
            ends = np.cumsum(lengths.T.reshape(-1)).tolist()
            texts = [" ".join(words[a:b]) for a, b in zip([0, *ends[:-1]], ends, strict=True)]
            written["words"] += len(words)
            for k in range(n):
                row = {"prompt": texts[3 * k] + "?", "chosen": " " + texts[3 * k + 1] + ".",
                       "rejected": " " + texts[3 * k + 2] + "."}  # fmt: skip
                index = start + k
                if index % 500 == 499 and previous is not None:
                    row, written["duplicates"] = previous, written["duplicates"] + 1
                elif index % 1000 == 250:
                    row["rejected"], written["identical"] = row["chosen"], written["identical"] + 1
                line = json.dumps(row) + "\n"
                handle.write(line)
                written["bytes"] += len(line)
                previous = row
            written["rows"] += n
    return written


def train_tokenizer(path: Path, out: Path, *, vocab_size: int = 16_000, sample_rows: int = 2000):
    """A byte-level BPE trained on the first ``sample_rows`` rows of ``path``, with the tiny tokenizer's specials,
    BOS added by ``tokenizer(text)`` and its chat template; saved to ``out`` (``save_pretrained``)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from fastdpo.data.tiny_tokenizer import CHAT_TEMPLATE, SPECIALS

    def texts():
        with open(path, encoding="utf-8") as handle:
            for _, line in zip(range(sample_rows), handle, strict=False):
                row = json.loads(line)
                yield from (row["prompt"], row["chosen"], row["rejected"])

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(texts(), trainer=trainer)
    bos = tok.token_to_id("<|bos|>")
    tok.post_processor = processors.TemplateProcessing(single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B",
                                                       special_tokens=[("<|bos|>", bos)])  # fmt: skip
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>", pad_token="<|pad|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


# ---------------------------------------------------------------------------------------------------- pipeline


def _pin_threads() -> None:
    pin(int(os.environ["OMP_NUM_THREADS"]))


def _stage(records: list, sampler: RssSampler, name: str, rows: int, fn):
    sampler.take_peak()
    rss_start = rss_bytes()
    start = time.perf_counter()
    out = fn()
    seconds = time.perf_counter() - start
    peak, anon, children = sampler.take_peak()
    status = status_kib()
    records.append({"stage": name, "rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
                    "rss_start_bytes": rss_start, "peak_sampled_bytes": peak, "peak_anon_bytes": anon,
                    "peak_children_bytes": children,
                    "hwm_bytes": status["VmHWM"] * 1024, "rss_end_bytes": status["VmRSS"] * 1024,
                    "anon_end_bytes": status["RssAnon"] * 1024,
                    "file_end_bytes": status["RssFile"] * 1024})  # fmt: skip
    print(f"{name}: {seconds:.1f} s, HWM {status['VmHWM'] / 1024:.0f} MiB", file=sys.stderr, flush=True)
    return out


def _tiny_trainer(tokenizer, dataset, *, out: Path, batch_size: int, max_length: int, num_proc: int | None,
                  max_steps: int = -1):  # fmt: skip
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastdpo.train import DPOConfig, DPOTrainer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         attn_implementation="sdpa")  # fmt: skip
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=batch_size, max_length=max_length,
                     report_to=[], save_strategy="no", bf16=False, use_cpu=True, seed=0, disable_tqdm=True,
                     dataset_num_proc=num_proc, gradient_checkpointing=False, max_steps=max_steps)  # fmt: skip
    return DPOTrainer(LlamaForCausalLM(config), args=args, train_dataset=dataset, processing_class=tokenizer)


def _epoch(loader) -> dict:
    batches = tokens = padding = 0
    for batch in loader:
        batches += 1
        tokens += batch["input_ids"].numel()
        padding += int(batch["num_padding"])
    return {"batches": batches, "tokens": tokens, "padding": padding}


def _warm_up(data: Path, tokenizer, *, max_length: int, num_proc: int | None, batch_size: int) -> None:
    """The pipeline once on the file's first 64 rows: lazy imports and first-use set-up (more of it in a fresh
    clone) go into the baseline, not into the data's cost."""
    from fastdpo.data import check_preferences, prepare_preferences, tokenize_preferences

    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "warm_up.jsonl"
        with open(data, "rb") as source:
            small.write_bytes(b"".join(line for _, line in zip(range(64), source, strict=False)))
        prepared = prepare_preferences(str(small), num_proc=num_proc)
        clean, _ = check_preferences(prepared, tokenizer, max_length=max_length).filter(prepared)
        train = tokenize_preferences(clean, tokenizer, max_length=max_length, num_proc=num_proc).dataset
        trainer = _tiny_trainer(tokenizer, train, out=Path(tmp) / "run", batch_size=batch_size, max_length=max_length,
                                num_proc=num_proc)  # fmt: skip
        _epoch(trainer.get_train_dataloader())


def pipeline_worker(data: Path, tokenizer_dir: Path, *, max_length: int, num_proc: int | None,
                    batch_size: int) -> dict:  # fmt: skip
    """Run the pipeline in this process (a fresh one: see ``run_pipeline``); stage records and totals.

    Every library is imported, and the pipeline run once on 64 rows (``_warm_up``), before ``start_rss_bytes`` is
    read, so peak minus start is what the data cost.
    """
    import datasets
    from transformers import AutoTokenizer

    import fastdpo.train  # noqa: F401 - imported now: its import is no part of any stage
    from fastdpo.data import check_preferences, prepare_preferences, tokenize_preferences
    from fastdpo.profiling import reset_peak_rss

    _pin_threads()
    datasets.disable_progress_bars()
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    _warm_up(data, tokenizer, max_length=max_length, num_proc=num_proc, batch_size=batch_size)
    sampler = RssSampler()
    sampler.start()
    records: list[dict] = []
    start_rss = reset_peak_rss()  # VmHWM restarts here: imports and warm-up are no cost of the data (ru_maxrss is)
    prepared = _stage(records, sampler, "prepare_preferences (load JSONL, normalize)", 0,
                      lambda: prepare_preferences(str(data), num_proc=num_proc))  # fmt: skip
    records[-1]["rows"] = rows = len(prepared)
    records[-1]["rows_per_s"] = rows / records[-1]["seconds"]
    report = _stage(records, sampler, f"check_preferences (tokenizer, max_length={max_length})", rows,
                    lambda: check_preferences(prepared, tokenizer, max_length=max_length))  # fmt: skip
    clean, dropped = _stage(records, sampler, "report.filter", rows, lambda: report.filter(prepared))
    tokenized = _stage(records, sampler, f"tokenize_preferences (max_length={max_length})", len(clean),
                       lambda: tokenize_preferences(clean, tokenizer, max_length=max_length,
                                                    num_proc=num_proc))  # fmt: skip
    train = tokenized.dataset
    with tempfile.TemporaryDirectory() as out:
        trainer = _stage(records, sampler, "DPOTrainer(...) (tiny model; dataset already tokenized)", len(train),
                         lambda: _tiny_trainer(tokenizer, train, out=Path(out), batch_size=batch_size,
                                               max_length=max_length, num_proc=num_proc))  # fmt: skip
        epoch = _stage(records, sampler, f"one epoch of get_train_dataloader() ({batch_size} pairs/step, PairPacker)",
                       len(train), lambda: _epoch(trainer.get_train_dataloader()))  # fmt: skip
    sampler.stop()
    usage, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = max(records[-1]["hwm_bytes"], *(s["peak_sampled_bytes"] for s in records))  # VmHWM since the reset
    return {"stages": records, "start_rss_bytes": start_rss, "ru_maxrss_bytes": usage.ru_maxrss * 1024,
            "ru_maxrss_children_bytes": children.ru_maxrss * 1024, "peak_bytes": peak,
            "peak_above_start_bytes": peak - start_rss, "rows": rows, "kept": len(clean), "dropped_by_check": dropped,
            "dropped_by_tokenize": tokenized.dropped, "trained_pairs": len(train), "counts": report.counts,
            "length_stats": _lengths(report.length_stats), "epoch": epoch}  # fmt: skip


def _lengths(stats: dict) -> dict:
    return {unit: {c: {k: s[k] for k in ("min", "mean", "median", "max")} for c, s in (stats.get(unit) or {}).items()}
            for unit in ("chars", "tokens")}  # fmt: skip


def _worker_env(tmp: Path, threads: int) -> dict:
    return dict(os.environ, **dict.fromkeys(THREAD_VARIABLES, str(threads)), TOKENIZERS_PARALLELISM="true",
                HF_DATASETS_CACHE=str(tmp / "hf_datasets"), HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))  # fmt: skip


def _run_worker(command: list[str], tmp: Path, threads: int, timeout: float | None) -> dict:
    import subprocess

    env = _worker_env(tmp, threads)
    done = subprocess.run([sys.executable, "-m", "bench.load_cpu", *command], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"bench.load_cpu {' '.join(command)} failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_pipeline(rows: int, tmp: Path, *, max_length: int = 1024, num_proc: int = 1, batch_size: int = 8,
                 seed: int = 0, scale: float = 1.0, threads: int = 2,
                 timeout: float | None = None) -> dict:  # fmt: skip
    """Write the data (``write_pairs``) and the tokenizer under ``tmp``, then run the pipeline in a fresh process."""
    data = tmp / "pairs.jsonl"
    start = time.perf_counter()
    written = write_pairs(data, rows, seed=seed, scale=scale)
    generate = time.perf_counter() - start
    train_tokenizer(data, tmp / "tokenizer")
    command = ["--worker", "pipeline", "--data", str(data), "--tokenizer", str(tmp / "tokenizer"),
               "--max-length", str(max_length), "--num-proc", str(num_proc),
               "--batch-size", str(batch_size)]  # fmt: skip
    start = time.perf_counter()
    result = _run_worker(command, tmp, threads, timeout)
    result.update(written=written, generate_seconds=generate, process_seconds=time.perf_counter() - start,
                  num_proc=num_proc, max_length=max_length, batch_size=batch_size)  # fmt: skip
    return result


# ---------------------------------------------------------------------------------------------------- steps


def _rss_trace(trace: list, times: list, leak_bytes: int):
    from transformers import TrainerCallback

    leaked: list[bytearray] = []

    class RssTrace(TrainerCallback):
        """RSS at every step's end; with ``leak_bytes``, keeps that much more each step (a deliberate leak)."""

        def on_step_end(self, args, state, control, **kwargs):
            if leak_bytes:
                leaked.append(bytearray(b"x" * leak_bytes))  # written, so resident
            trace.append(rss_bytes())
            times.append(time.perf_counter())

    return RssTrace()


def steps_worker(kind: str, *, steps: int, rows: int, batch_size: int, max_length: int, leak_bytes: int = 0) -> dict:
    """``steps`` optimizer steps of DPOTrainer or SFTTrainer (``kind``) on a tiny Llama; the RSS of every step."""
    import datasets
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from bench.data_cpu import synthetic_pairs
    from fastdpo.data.tiny_tokenizer import build_tiny_tokenizer
    from fastdpo.train import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    _pin_threads()
    datasets.disable_progress_bars()
    tokenizer = build_tiny_tokenizer()
    pairs = synthetic_pairs(rows)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         attn_implementation="sdpa")  # fmt: skip
    trace: list[int] = []
    times: list[float] = []
    with tempfile.TemporaryDirectory() as out:
        common = {"output_dir": out, "per_device_train_batch_size": batch_size, "max_steps": steps,
                  "learning_rate": 1e-4, "logging_steps": 1, "report_to": [], "save_strategy": "no", "bf16": False,
                  "use_cpu": True, "seed": 0, "disable_tqdm": True, "gradient_checkpointing": False,
                  "max_length": max_length}  # fmt: skip
        if kind == "dpo":
            trainer = DPOTrainer(LlamaForCausalLM(config), args=DPOConfig(**common), train_dataset=pairs,
                                 processing_class=tokenizer)  # fmt: skip
        else:
            rows_sft = pairs.rename_column("chosen", "completion").remove_columns("rejected")
            trainer = SFTTrainer(LlamaForCausalLM(config), args=SFTConfig(**common), train_dataset=rows_sft,
                                 processing_class=tokenizer)  # fmt: skip
        trainer.add_callback(_rss_trace(trace, times, leak_bytes))
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return {"kind": kind, "steps": steps, "rows": rows, "batch_size": batch_size, "max_length": max_length,
            "seconds": seconds, "rss": trace, "step_end_s": [t - start for t in times], "leak_bytes": leak_bytes,
            "log_entries": len(trainer.state.log_history)}  # fmt: skip


def growth(trace: list[int], first: int = 50) -> dict:
    """RSS at step ``first`` and at the last step (1-based), their difference, the highest RSS in between above
    step ``first``'s, and the least-squares slope over those steps (bytes per step)."""
    import numpy as np

    window = np.asarray(trace[first - 1 :], dtype=np.float64)
    slope = float(np.polyfit(np.arange(len(window)), window, 1)[0]) if len(window) > 1 else 0.0
    return {"first_step": first, "last_step": len(trace), "rss_first_bytes": int(window[0]),
            "rss_last_bytes": int(window[-1]), "growth_bytes": int(window[-1] - window[0]),
            "max_above_first_bytes": int(window.max() - window[0]), "slope_bytes_per_step": slope}  # fmt: skip


def run_steps(kind: str, tmp: Path, *, steps: int = 500, first: int = 50, rows: int = 1000, batch_size: int = 4,
              max_length: int = 128, leak_bytes: int = 0, threads: int = 2,
              timeout: float | None = None) -> dict:  # fmt: skip
    """``steps_worker`` in a fresh process, with the growth from step ``first`` to the last (``growth``)."""
    command = ["--worker", "steps", "--kind", kind, "--steps", str(steps), "--train-rows", str(rows),
               "--batch-size", str(batch_size), "--max-length", str(max_length),
               "--leak-bytes", str(leak_bytes)]  # fmt: skip
    result = _run_worker(command, tmp, threads, timeout)
    result["growth"] = growth(result["rss"], first=min(first, len(result["rss"])))
    return result


# ---------------------------------------------------------------------------------------------------- report


def _mib(value: float) -> str:
    return f"{value / MIB:,.0f}"


def _stage_name(stage: dict) -> str:
    """A stage's name without its details in parentheses."""
    return stage["stage"].split(" (")[0]


def _pipeline_table(result: dict) -> list[str]:
    lines = [f"Pipeline, num_proc={result['num_proc']} (RSS in MiB; anon + file: anonymous and file-backed pages, "
             "the latter mostly memory-mapped Arrow files):", "",
             "| stage | rows | seconds | rows/s | RSS at start | RSS at end (anon + file) | peak in stage | "
             "its anon | peak so far (VmHWM) |", "|---|---:|---:|---:|---:|---|---:|---:|---:|"]  # fmt: skip
    for s in result["stages"]:
        lines.append(f"| {s['stage']} | {s['rows']:,} | {s['seconds']:.1f} | {s['rows_per_s']:,.0f} | "
                     f"{_mib(s['rss_start_bytes'])} | {_mib(s['rss_end_bytes'])} ({_mib(s['anon_end_bytes'])} + "
                     f"{_mib(s['file_end_bytes'])}) | {_mib(s['peak_sampled_bytes'])} | {_mib(s['peak_anon_bytes'])} "
                     f"| {_mib(s['hwm_bytes'])} |")  # fmt: skip
    total = sum(s["seconds"] for s in result["stages"])
    anon = max(result["stages"], key=lambda s: s["peak_anon_bytes"])
    peak = max(result["peak_bytes"], result["ru_maxrss_bytes"])  # the bar holds for the whole process
    lines += ["", f"Whole process: peak RSS {_mib(peak)} MiB ({peak / 1e9:.3f} GB; after the warm-up "
              f"{_mib(result['peak_bytes'])} MiB; datasets workers, counted by PSS: at most "
              f"{_mib(max(s['peak_children_bytes'] for s in result['stages']))} MiB together, the largest "
              f"{_mib(result['ru_maxrss_children_bytes'])} MiB by its RSS); anonymous memory peaked at "
              f"{_mib(anon['peak_anon_bytes'])} MiB, in {_stage_name(anon)}; "
              f"{_mib(result['start_rss_bytes'])} MiB before the first stage (libraries imported, tokenizer loaded, "
              f"a warm-up on 64 rows). {total:.0f} s of stages, {result['process_seconds']:.0f} s with start-up. "
              f"Bar, peak < {PEAK_BAR / 1e9:.0f} GB ({PEAK_BAR / 1e9:.0f}e9 bytes): "
              f"{'met' if peak < PEAK_BAR else 'NOT met'}."]  # fmt: skip
    return lines


def _steps_table(results: list[dict]) -> list[str]:
    lines = ["| trainer | steps | s/step | RSS at step 50 MiB | RSS at last step MiB | growth MB | "
             f"max above step 50 MB | slope KiB/step | bar: growth < {GROWTH_BAR / 1e6:.0f} MB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|"]  # fmt: skip
    for r in results:
        g = r["growth"]
        lines.append(f"| {r['kind']} | {r['steps']} | {r['seconds'] / r['steps']:.3f} | {_mib(g['rss_first_bytes'])} | "
                     f"{_mib(g['rss_last_bytes'])} | {g['growth_bytes'] / 1e6:+.1f} | "
                     f"{g['max_above_first_bytes'] / 1e6:.1f} | {g['slope_bytes_per_step'] / 1024:+.1f} | "
                     f"{'met' if g['growth_bytes'] < GROWTH_BAR else 'NOT met'} |")  # fmt: skip
    return lines


def table(meta: dict, pipelines: list[dict], steps: list[dict]) -> str:
    first = pipelines[0]
    written, tokens = first["written"], first["length_stats"]["tokens"]
    token_summary = ", ".join(f"{c} {s['median']:.0f} (max {s['max']:,})" for c, s in tokens.items())
    chars = first["length_stats"]["chars"]
    per_token = sum(chars[c]["mean"] for c in tokens) / sum(s["mean"] for s in tokens.values())
    lines = [
        f"Load on CPU: {written['rows']:,} synthetic pairs through the data pipeline, and {steps[0]['steps']} tiny "
        f"training steps. {meta['cpus']} CPUs ({meta['cpu']}), threads pinned to 2; "
        + ", ".join(f"{k} {v}" for k, v in meta["versions"].items())
        + f"; {meta['date']}. One run each.",
        "",
        f"Data: JSONL of {written['bytes'] / 1e6:,.0f} MB ({written['duplicates']} duplicates, {written['identical']} "
        f"chosen == rejected injected), 16k-token BPE trained on 2,000 of its rows ({per_token:.1f} characters a "
        f"token); median tokens: {token_summary}. "
        f"Kept by the check: {first['kept']:,}; dropped: {first['dropped_by_check']}; trained on "
        f"{first['trained_pairs']:,} pairs, one epoch = {first['epoch']['batches']:,} batches, "
        f"{first['epoch']['padding'] / max(1, first['epoch']['tokens']):.1%} padding.",
        "",
    ]
    for result in pipelines:
        lines += [*_pipeline_table(result), ""]
    lines += [f"Training steps: tiny Llama (H=32, 2 layers, V={meta['vocab']}), CPU fp32, {steps[0]['batch_size']} "
              f"pairs (SFT: examples) a step, max_length {steps[0]['max_length']}, logging every step, "
              f"{steps[0]['rows']} rows (several epochs). RSS read at each step's end; MB = 1e6 bytes.",
              ""]  # fmt: skip
    lines += _steps_table(steps)
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.load_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--num-proc", type=int, nargs="+", default=[1], help="datasets num_proc (1: none)")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--skip-sft", action="store_true")
    parser.add_argument("--out", type=Path, help="folder for load_cpu.{json,md,png} (default: bench/results/<cpu>)")
    parser.add_argument("--render", type=Path, metavar="DIR", help="only draw DIR/load_cpu.png from its json")
    parser.add_argument("--worker", choices=("pipeline", "steps"), help=argparse.SUPPRESS)
    for name in ("--data", "--tokenizer", "--kind"):
        parser.add_argument(name, help=argparse.SUPPRESS)
    for name, default in (("--max-length", 1024), ("--batch-size", 8), ("--train-rows", 1000), ("--leak-bytes", 0)):
        parser.add_argument(name, type=int, default=default, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.render:
        _plot(json.loads((args.render / "load_cpu.json").read_text()), args.render / "load_cpu.png")
        return
    if args.worker == "pipeline":
        num_proc = None if args.num_proc[0] == 1 else args.num_proc[0]
        result = pipeline_worker(Path(args.data), Path(args.tokenizer), max_length=args.max_length,
                                 num_proc=num_proc, batch_size=args.batch_size)  # fmt: skip
        print(json.dumps(result))
        return
    if args.worker == "steps":
        print(json.dumps(steps_worker(args.kind, steps=args.steps, rows=args.train_rows, batch_size=args.batch_size,
                                      max_length=args.max_length, leak_bytes=args.leak_bytes)))  # fmt: skip
        return
    run_all(args)


def run_all(args: argparse.Namespace) -> None:
    from fastdpo.atomic import atomic_write
    from fastdpo.data.tiny_tokenizer import build_tiny_tokenizer

    start = time.perf_counter()
    pipelines, steps = [], []
    with tempfile.TemporaryDirectory(prefix="fastdpo-load-") as name:
        tmp = Path(name)
        for num_proc in args.num_proc:
            run_dir = tmp / f"num_proc_{num_proc}"
            run_dir.mkdir()
            print(f"pipeline, num_proc={num_proc} ...", file=sys.stderr, flush=True)
            pipelines.append(run_pipeline(args.rows, run_dir, num_proc=num_proc))
        for kind in ("dpo",) if args.skip_sft else ("dpo", "sft"):
            print(f"{kind}: {args.steps} steps ...", file=sys.stderr, flush=True)
            steps.append(run_steps(kind, tmp, steps=args.steps))
    meta = {**environment(2, DATA_PACKAGES),
            "vocab": len(build_tiny_tokenizer()), "seconds": time.perf_counter() - start,
            "args": {k: v for k, v in vars(args).items()
                     if k in ("rows", "num_proc", "steps", "skip_sft")}}  # fmt: skip
    text = table(meta, pipelines, steps)
    args.out = args.out or cpu_results()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "load_cpu.json", json.dumps({"meta": meta, "pipelines": pipelines, "steps": steps},
                                                        indent=1) + "\n")  # fmt: skip
    atomic_write(args.out / "load_cpu.md", text)
    _plot({"meta": meta, "pipelines": pipelines, "steps": steps}, args.out / "load_cpu.png")
    print(text)
    print(f"bench.load_cpu: {meta['seconds']:.0f} s", file=sys.stderr)


def _plot(stored: dict, path: Path) -> None:
    """Seconds and peak RSS of each pipeline stage, RSS growth of each trainer, as in the tables (dashed: the bars)."""
    from bench.plots import bar_panels

    panels, steps = [], stored["steps"]
    for p in stored["pipelines"]:
        names = [_stage_name(s) for s in p["stages"]]
        seconds = [s["seconds"] for s in p["stages"]]
        peaks = [s["peak_sampled_bytes"] / MIB for s in p["stages"]]
        panels.append({"title": f"num_proc={p['num_proc']}: wall time", "labels": names, "values": seconds,
                       "unit": "seconds"})  # fmt: skip
        unit = f"MiB (dashed: the bar, {PEAK_BAR / 1e9:.0f} GB)"
        panels.append({"title": "peak RSS in the stage", "labels": names, "values": peaks, "color": "tab:orange",
                       "reference": PEAK_BAR / MIB, "unit": unit})  # fmt: skip
    first = steps[0]["growth"]["first_step"]
    growth = [r["growth"]["growth_bytes"] / 1e6 for r in steps]
    panels.append({"title": f"RSS growth from step {first} to the last", "labels": [r["kind"] for r in steps],
                   "values": growth, "color": "tab:green", "reference": GROWTH_BAR / 1e6,
                   "unit": f"MB (dashed: the bar, {GROWTH_BAR / 1e6:.0f} MB)"})  # fmt: skip
    title = f"Load on CPU, {stored['meta']['cpu']}, {stored['meta']['date']}: the data pipeline's stages (top), RSS"
    bar_panels(path, title + " over training steps (bottom)", panels, columns=2)


if __name__ == "__main__":
    main()
