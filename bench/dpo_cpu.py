"""End-to-end DPO training on CPU: fastdpo's DPOTrainer and the drop-in (``fastdpo.trl``) against TRL 1.16's.

    python -m bench.dpo_cpu [--pairs 256] [--batch 8] [--steps 8] [--threads 2] [--repeats 3] [--out bench/results]

A tiny Llama (hidden 256, 4 layers, vocab 32000, sdpa, fp32) and 256 synthetic pairs (prompts of 5–60 words,
completions of 5–200, seeded) tokenized by the locally trained tiny tokenizer. Both engines run with fp32
(``bf16=False``) and otherwise their defaults (gradient checkpointing on, max_length 1024), each in its own
process; ``--repeats`` rounds of every engine in turn (a round's engines in the order of the one before reversed,
so a machine that slows down or speeds up over the run weighs on each alike), the median (min–max) reported. Timed:
``trainer.train()`` only (setup and tokenization excluded and reported). Tokens are counted the same way for all:
the ``num_tokens`` the trainers log (every real token of every sequence). Peak RSS is the whole process, measured
from a baseline taken after setup. TRL with ``precompute_ref_log_probs=True`` runs its reference pass when its
trainer is built (in ``setup s``), so its steps run no reference forward: its useful FLOPs leave that pass out.
Results: bench/results/<cpu>/dpo_cpu.{json,md,png}.

Useful FLOP/s: each worker records the real length of every sequence and the number of scored positions (whose
next token is a completion token) of every step it trains on; ``bench.flops.dpo_step_flops`` turns them into the
useful FLOPs of the run (policy forward + backward, reference forward; padding and recomputation not counted),
the same count for both engines when they see the same pairs. It is held against this machine's fp32 GEMM rate,
measured in a third process with the same threads: the best ``torch.mm`` rate over the step's GEMM shapes.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

from bench.data_cpu import WORDS
from bench.flops import ModelShape, StepFlops, dpo_step_flops, gemm_rates, gemm_shapes
from bench.machine import cpu_results, environment, pin
from bench.plots import bar_panels
from fastdpo.atomic import atomic_write
from fastdpo.profiling import peak_rss, reset_peak_rss, run_measured

# fastdpo.trl: TRL's script with only the import changed; fastdpo_varlen: packed_attention="varlen" (each sequence
# attends only to itself, one row per batch) against the default's sdpa over rows of the longest sequence
ENGINES = ("trl", "trl_precompute", "fastdpo", "fastdpo_varlen", "fastdpo.trl")
PRECOMPUTED = frozenset({"trl_precompute"})  # engines whose reference pass ran before train(), in setup
FASTDPO_OPTIONS = {  # fastdpo's engines: the DPOConfig options each sets (the rest at their defaults)
    "fastdpo": {},
    "fastdpo_varlen": {"packed_attention": "varlen"},
    "fastdpo_leanact": {"lean_activations": True},
    "fastdpo_varlen_leanact": {"packed_attention": "varlen", "lean_activations": True},
    # and the reference and the saved activations in host memory
    "fastdpo_lean": {"lean_activations": True, "ref_offload": True, "activation_offloading": True},
}
OPTION_ENGINES = tuple(e for e in FASTDPO_OPTIONS if e not in ENGINES)  # for workers (A/B runs) and dpo_gpu
MODEL = {"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048}  # fmt: skip


def _pairs(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def words(low, high):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    return [{"prompt": words(5, 60) + "?", "chosen": " " + words(5, 200) + ".", "rejected": " " + words(5, 200) + "."}
            for _ in range(count)]  # fmt: skip


def build_trainer(engine: str, *, pairs: int, batch: int, steps: int, threads: int):
    """The engine's DPOTrainer (``ENGINES``) on the tiny Llama and the pairs; and its setup seconds."""
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastdpo.data.tiny_tokenizer import build_tiny_tokenizer

    torch.set_num_threads(threads)
    datasets.disable_progress_bars()
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(**MODEL, pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")
    model, reference = LlamaForCausalLM(config), LlamaForCausalLM(config)
    reference.load_state_dict(model.state_dict())
    data = datasets.Dataset.from_list(_pairs(pairs))
    common = {"output_dir": f"/tmp/bench_dpo_{engine}", "per_device_train_batch_size": batch, "max_steps": steps,
              "logging_steps": 1, "report_to": [], "bf16": False, "save_strategy": "no", "seed": 0}  # fmt: skip
    start = time.perf_counter()
    trainer = engine_trainer(engine, model, reference, data, tokenizer, common)
    return trainer, time.perf_counter() - start


def engine_trainer(engine: str, policy, reference, dataset, tokenizer, common: dict):
    """The trainer of ``engine`` (this module's ``ENGINES`` and ``FASTDPO_OPTIONS``, and bench/dpo_gpu.py's
    ``trl_precompute`` and ``trl_liger``) with the config fields ``common``: TRL's DPOTrainer and DPOConfig at their
    defaults otherwise, fastdpo's, or TRL's script with only the import changed (``fastdpo.trl``)."""
    if engine in FASTDPO_OPTIONS:
        from fastdpo.train import DPOConfig, DPOTrainer

        return DPOTrainer(policy, ref_model=reference, args=DPOConfig(**common, **FASTDPO_OPTIONS[engine]),
                          train_dataset=dataset, processing_class=tokenizer)  # fmt: skip
    import trl

    extra = {"trl_precompute": {"precompute_ref_log_probs": True}, "trl_liger": {"use_liger_kernel": True}}
    cls = trl.DPOTrainer
    if engine == "fastdpo.trl":
        from fastdpo.trl import DPOTrainer as cls
    return cls(policy, ref_model=reference, args=trl.DPOConfig(**common, **extra.get(engine, {})),
               train_dataset=dataset, processing_class=tokenizer)  # fmt: skip


def _step_lengths(engine: str, inputs: dict) -> dict:
    """Real sequence lengths and scored positions of one batch, read from what the engine's model receives."""
    if engine.startswith("fastdpo"):  # packed: segments of cu_seqlens, row-end padding segments have seq_pair -1
        lengths = inputs["cu_seqlens"].diff()[inputs["seq_pair"] >= 0]
        scored = (inputs["targets"] != -100).sum()
    else:  # padded [chosen; rejected] rows; TRL scores the labels shifted by one: completion_mask[:, 1:]
        lengths = inputs["attention_mask"].sum(1)
        scored = inputs["completion_mask"][:, 1:].sum()
    return {"seq_lens": sorted(lengths.tolist()), "scored": int(scored)}


def record_lengths(trainer, engine: str) -> list[dict]:
    """Append ``_step_lengths`` of every training batch to the returned list (wraps this trainer's compute_loss)."""
    steps: list[dict] = []
    compute_loss = trainer.compute_loss

    def recording(model, inputs, *args, **kwargs):
        if model.training:
            steps.append(_step_lengths(engine, inputs))
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.compute_loss = recording
    return steps


def _worker(args: argparse.Namespace) -> dict:
    trainer, setup_s = build_trainer(args.worker, pairs=args.pairs, batch=args.batch, steps=args.steps,
                                     threads=args.threads)  # fmt: skip
    steps = record_lengths(trainer, args.worker)
    base = reset_peak_rss()
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    logs = [log for log in trainer.state.log_history if "loss" in log]
    return {"engine": args.worker, "setup_s": setup_s, "train_s": train_s, "num_tokens": logs[-1]["num_tokens"],
            "peak_extra_bytes": peak_rss() - base, "losses": [log["loss"] for log in logs], "steps": steps}  # fmt: skip


def _gemm_worker(args: argparse.Namespace) -> dict:
    from transformers import LlamaConfig

    torch.set_num_threads(args.threads)
    shapes = gemm_shapes(ModelShape.from_config(LlamaConfig(**MODEL)), args.gemm_tokens)
    rows = gemm_rates(shapes, repeats=args.gemm_repeats)
    return {"threads": torch.get_num_threads(), "repeats": args.gemm_repeats, "shapes": rows,
            "best_gflops": max(row["gflops"] for row in rows)}  # fmt: skip


def useful_flops(result: dict, shape: ModelShape) -> dict:
    """The run's useful FLOPs from the worker's per-step lengths: head on scored positions, and on every token."""
    scored = sum((dpo_step_flops(shape, s["seq_lens"], head_tokens=s["scored"]) for s in result["steps"]),
                 StepFlops(0, 0, 0, 0, 0, 0))  # fmt: skip
    every = sum((dpo_step_flops(shape, s["seq_lens"]) for s in result["steps"]), StepFlops(0, 0, 0, 0, 0, 0))
    tokens = sum(sum(s["seq_lens"]) for s in result["steps"])
    if tokens != result["num_tokens"]:
        raise RuntimeError(f"{result['engine']}: recorded {tokens} tokens, the trainer logged {result['num_tokens']}")
    totals = [scored.total, every.total]
    if result["engine"] in PRECOMPUTED:  # (its reference pass ran when the trainer was built: not in these steps)
        totals = [total - parts.reference_body - parts.reference_head - parts.reference_attention
                  for total, parts in zip(totals, (scored, every), strict=True)]  # fmt: skip
    return {"useful_flops": totals[0], "useful_flops_head_all_tokens": totals[1],
            "useful_parts": vars(scored), "scored_positions": sum(s["scored"] for s in result["steps"])}  # fmt: skip


def merged(runs: list[dict]) -> dict:
    """One engine's rounds as one result: the medians of its times and peaks (each round's kept beside them), the
    rest from the first round (the same steps, tokens and losses in each: a worker is deterministic)."""
    import statistics

    first = dict(runs[0])
    for key in ("train_s", "setup_s", "peak_extra_bytes"):
        first[f"{key}_runs"] = [run[key] for run in runs]
        first[key] = statistics.median(first[f"{key}_runs"])
    return first


def _table(args: argparse.Namespace, meta: dict, gemm: dict, results: list[dict]) -> str:
    trl_row = results[0]
    same = all(r["steps"] == trl_row["steps"] for r in results)
    best = max(gemm["shapes"], key=lambda g: g["gflops"])
    lines = [
        f"DPO, tiny Llama (H=256, 4 layers, V=32000, fp32, sdpa), {args.pairs} pairs, batch {args.batch}, "
        f"{args.steps} steps, {args.threads} threads; train() only; {meta.get('repeats', 1)} rounds of every engine. "
        f"{meta['cpu']}; torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}, trl "
        f"{meta['versions']['trl']}; {meta.get('date', 'undated')}.",
        "",
        f"fp32 GEMM rate of this machine: {gemm['best_gflops']:.1f} GFLOP/s (torch.mm, {gemm['threads']} threads, "
        f"best of {gemm['repeats']} runs; the fastest of the step's {len(gemm['shapes'])} GEMM shapes at "
        f"{args.gemm_tokens} tokens, [{best['m']},{best['k']}]x[{best['k']},{best['n']}]; all in the json).",
        "",
        "| engine | train s, median (min–max) | tokens | tokens/s | vs TRL | peak extra RSS MiB | vs TRL | setup s "
        "| useful GFLOP/s "
        "| % of GEMM rate | % of GEMM rate, head on all tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rate = r["num_tokens"] / r["train_s"]
        base_rate = trl_row["num_tokens"] / trl_row["train_s"]
        gflops = r["useful_flops"] / r["train_s"] / 1e9
        all_heads = r["useful_flops_head_all_tokens"] / r["train_s"] / 1e9
        lines.append(
            f"| {r['engine']} | {r['train_s']:.1f} ({_spread(r, 'train_s')}) | {r['num_tokens']:.0f} | {rate:,.0f} | "
            f"{rate / base_rate:.2f}x | "
            f"{r['peak_extra_bytes'] / 2**20:.0f} | {r['peak_extra_bytes'] / trl_row['peak_extra_bytes']:.2f}x | "
            f"{r['setup_s']:.1f} | {gflops:.2f} | {100 * gflops / gemm['best_gflops']:.1f}% | "
            f"{100 * all_heads / gemm['best_gflops']:.1f}% |"
        )
    lines += [
        "",
        "Useful FLOPs (bench/flops.py): matmuls only, over the real tokens of the sequences trained on — policy "
        "forward + backward 6·P per token, reference forward 2·P, P = the body's linear weights "
        f"({trl_row['body_params'] / 1e6:.2f}M) and, for the head ({trl_row['head_params'] / 1e6:.2f}M), only the "
        f"{trl_row['scored_positions']} positions the loss reads (whose next token is a completion token); causal "
        "attention within each sequence (forward 4·heads·head_dim·n(n+1)/2 per layer, backward 2x). Padding, "
        "gradient-checkpointing recomputation, logits nobody reads and elementwise work are not counted. Last "
        "column: the head on every real token (the usual 6·N per token).",
        f"Sequence lengths recorded by all engines identical step by step: {'yes' if same else 'NO'}.",
    ]
    return "\n".join(lines) + "\n"


def _spread(result: dict, key: str) -> str:
    runs = result.get(f"{key}_runs", [result[key]])
    return f"{min(runs):.1f}–{max(runs):.1f}"


def run_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of an end-to-end run (this module's and bench/orpo_cpu.py's)."""
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of every engine (the median reported)")


def run_rounds(module: str, engines: list[str], args: argparse.Namespace, extra: list[str] = (),
               first_only: tuple[str, ...] = ()) -> dict[str, list[dict]]:  # fmt: skip
    """Each engine's results, ``args.repeats`` rounds of every engine in turn, each in its own process (``python -m
    module --worker ENGINE`` with the run's options and ``extra``), each round's order the one before reversed, so
    that a machine that slows down or speeds up over the run weighs on each alike; ``first_only``: workers run once,
    after the first round."""
    runs: dict[str, list[dict]] = {}
    order = list(engines)
    for round_ in range(args.repeats):
        for worker in [*order, *first_only] if round_ == 0 else order:
            print(f"round {round_ + 1}: running {worker} ...", file=sys.stderr, flush=True)
            command = [sys.executable, "-m", module, "--worker", worker, "--pairs", str(args.pairs), "--batch",
                       str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads), *extra]  # fmt: skip
            runs.setdefault(worker, []).append(run_measured(command, env={"OMP_NUM_THREADS": str(args.threads)},
                                                            cwd=Path(__file__).parents[1]))  # fmt: skip
        order.reverse()
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dpo_cpu", description=__doc__.splitlines()[0])
    run_arguments(parser)
    parser.add_argument("--gemm-tokens", type=int, default=4096, help="rows of the timed GEMMs (a step's tokens)")
    parser.add_argument("--gemm-repeats", type=int, default=5)
    parser.add_argument("--worker", choices=(*ENGINES, *OPTION_ENGINES, "gemm"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="folder for dpo_cpu.{json,md,png} (default: bench/results/<cpu>)")
    parser.add_argument("--render", type=Path, metavar="DIR", help="only draw DIR/dpo_cpu.png from its json")
    args = parser.parse_args(argv)
    if args.render:
        render(args.render)
        return
    if args.worker:
        print(json.dumps(_gemm_worker(args) if args.worker == "gemm" else _worker(args)))
        return
    from transformers import LlamaConfig

    shape = ModelShape.from_config(LlamaConfig(**MODEL))
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    pin(args.threads)  # the workers inherit the affinity
    args.out = args.out or cpu_results()
    runs = run_rounds(
        "bench.dpo_cpu",
        list(ENGINES),
        args,
        first_only=("gemm",),
        extra=["--gemm-tokens", str(args.gemm_tokens), "--gemm-repeats", str(args.gemm_repeats)],
    )
    results = [merged(runs[engine]) for engine in ENGINES]  # TRL first: the baseline of the ratios
    for r in results:
        r.update(useful_flops(r, shape), body_params=shape.body_params, head_params=shape.head_params)
    meta = {**environment(args.threads), "pairs": args.pairs, "batch": args.batch, "steps": args.steps,
            "model": MODEL, "repeats": args.repeats}  # fmt: skip
    gemm = runs["gemm"][0]
    text = _table(args, meta, gemm, results)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "dpo_cpu.json", json.dumps({"meta": meta, "gemm": gemm, "results": results}, indent=1))
    atomic_write(args.out / "dpo_cpu.md", text)
    _plot(meta, results, args.out / "dpo_cpu.png")
    print(text)


def _plot(meta: dict, results: list[dict], path: Path) -> None:
    """tokens/s and peak extra RSS per engine (TRL's dashed)."""
    names = [r["engine"] for r in results]
    rates = [r["num_tokens"] / r["train_s"] for r in results]
    peaks = [r["peak_extra_bytes"] / 2**20 for r in results]
    title = (f"DPO end to end, tiny Llama (H=256, 4 layers, V=32000) fp32, batch {meta['batch']} pairs, "
             f"{meta['steps']} steps, {meta['cpu']}, {meta['threads']} threads (dashed: TRL)")  # fmt: skip
    bar_panels(path, title, [
        {"title": "tokens/s", "labels": names, "values": rates, "unit": "real tokens per second, train()",
         "reference": rates[0]},
        {"title": "peak memory", "labels": names, "values": peaks, "unit": "peak extra RSS, MiB", "color": "tab:orange",
         "reference": peaks[0]},
    ])  # fmt: skip


def render(folder: Path) -> None:
    """Draw ``dpo_cpu.png`` from a stored ``dpo_cpu.json`` (its md, written by the run, stays as it is)."""
    stored = json.loads((folder / "dpo_cpu.json").read_text())
    _plot(stored["meta"], stored["results"], folder / "dpo_cpu.png")


if __name__ == "__main__":
    main()
