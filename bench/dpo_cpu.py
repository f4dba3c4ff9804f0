"""End-to-end DPO training on CPU: fastdpo's DPOTrainer against TRL 1.16's, in one run, same model and data.

    python -m bench.dpo_cpu [--pairs 256] [--batch 8] [--steps 8] [--threads 2]

A tiny Llama (hidden 256, 4 layers, vocab 32000, sdpa, fp32) and 256 synthetic pairs (prompts of 5–60 words,
completions of 5–200, seeded) tokenized by the locally trained tiny tokenizer. Both engines run with fp32
(``bf16=False``) and otherwise their defaults (gradient checkpointing on, max_length 1024), each in its own
process. Timed: ``trainer.train()`` only (setup and tokenization excluded and reported). Tokens are counted the
same way for both: the ``num_tokens`` both trainers log (every real token of every sequence). Peak RSS is the
whole process, measured from a baseline taken after setup. Results: bench/results/dpo_cpu.{json,md}.
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
from fastdpo.atomic import atomic_write
from fastdpo.profiling import peak_rss, reset_peak_rss, run_measured

RESULTS = Path(__file__).parent / "results"


def _pairs(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def words(low, high):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))

    return [{"prompt": words(5, 60) + "?", "chosen": " " + words(5, 200) + ".", "rejected": " " + words(5, 200) + "."}
            for _ in range(count)]  # fmt: skip


def _worker(args: argparse.Namespace) -> dict:
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastdpo.data.tiny_tokenizer import build_tiny_tokenizer

    torch.set_num_threads(args.threads)
    datasets.disable_progress_bars()
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=32000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")  # fmt: skip
    model, reference = LlamaForCausalLM(config), LlamaForCausalLM(config)
    reference.load_state_dict(model.state_dict())
    data = datasets.Dataset.from_list(_pairs(args.pairs))
    common = {"output_dir": f"/tmp/bench_dpo_{args.worker}", "per_device_train_batch_size": args.batch,
              "max_steps": args.steps, "logging_steps": 1, "report_to": [], "bf16": False, "save_strategy": "no",
              "seed": 0}  # fmt: skip
    start = time.perf_counter()
    if args.worker == "fastdpo":
        from fastdpo.train import DPOConfig, DPOTrainer

        trainer = DPOTrainer(model, ref_model=reference, args=DPOConfig(**common), train_dataset=data,
                             processing_class=tokenizer)  # fmt: skip
    else:
        import trl

        trainer = trl.DPOTrainer(model, ref_model=reference, args=trl.DPOConfig(**common), train_dataset=data,
                                 processing_class=tokenizer)  # fmt: skip
    setup_s = time.perf_counter() - start
    base = reset_peak_rss()
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    logs = [log for log in trainer.state.log_history if "loss" in log]
    return {"engine": args.worker, "setup_s": setup_s, "train_s": train_s, "num_tokens": logs[-1]["num_tokens"],
            "peak_extra_bytes": peak_rss() - base, "losses": [log["loss"] for log in logs]}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dpo_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=("fastdpo", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    results = []
    for engine in ("trl", "fastdpo"):
        print(f"running {engine} ...", file=sys.stderr, flush=True)
        command = [sys.executable, "-m", "bench.dpo_cpu", "--worker", engine, "--pairs", str(args.pairs),
                   "--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)]  # fmt: skip
        results.append(run_measured(command, env={"OMP_NUM_THREADS": str(args.threads)},
                                    cwd=Path(__file__).parents[1]))  # fmt: skip
    trl_row = results[0]
    lines = [
        f"DPO, tiny Llama (H=256, 4 layers, V=32000, fp32, sdpa), {args.pairs} pairs, batch {args.batch}, "
        f"{args.steps} steps, {args.threads} threads; train() only.",
        "",
        "| engine | train s | tokens | tokens/s | vs TRL | peak extra RSS MiB | vs TRL | setup s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        rate = r["num_tokens"] / r["train_s"]
        base_rate = trl_row["num_tokens"] / trl_row["train_s"]
        lines.append(
            f"| {r['engine']} | {r['train_s']:.1f} | {r['num_tokens']:.0f} | {rate:,.0f} | {rate / base_rate:.2f}x | "
            f"{r['peak_extra_bytes'] / 2**20:.0f} | {r['peak_extra_bytes'] / trl_row['peak_extra_bytes']:.2f}x | "
            f"{r['setup_s']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "dpo_cpu.json", json.dumps(results, indent=1))
    atomic_write(args.out / "dpo_cpu.md", text)
    print(text)


if __name__ == "__main__":
    main()
