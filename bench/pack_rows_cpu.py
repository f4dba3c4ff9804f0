"""Row layout and attention: whole pairs or sequences in sdpa rows, against one row per batch on fastdpo_varlen.

    python -m bench.pack_rows_cpu [--pairs 64] [--batch 8] [--repeats 2] [--threads 2]

The DPO step of bench/dpo_cpu.py (tiny Llama H=256, 4 layers, V=32000, fp32, gradient checkpointing) on the same
batches of the same synthetic pairs, three ways:

- ``pack_pairs(pack_length=2048)`` on sdpa: a row holds whole pairs, chosen and rejected together;
- ``pack_pairs(pack_length=None, split_pairs=True)`` on sdpa: the sequences are packed into rows as long as the
  batch's longest sequence (the trainers' default on eager/sdpa);
- every batch in one row, no padding, on ``fastdpo_varlen`` (causal attention per sequence;
  ``packed_attention="varlen"``).

sdpa computes every entry of each row's L×L mask, so the layout changes the attention work; varlen computes each
sequence's own n×n block (counted as n² here, like the rows' L²). Timed: ``preference_step`` forward + backward over
all batches (reference pass included), best of ``--repeats`` after a warm-up batch. Results:
bench/results/<cpu>/pack_rows_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.dpo_cpu import MODEL, _pairs
from bench.machine import cpu_results, environment, pin
from fastdpo.atomic import atomic_write
from fastdpo.data.packing import pack_pairs
from fastdpo.model import VARLEN, use_attention

LAYOUTS = {  # name: (pack_pairs options, attention)
    "pairs in rows of 2048, sdpa": ({"pack_length": 2048}, "sdpa"),
    "sequences in rows of the longest sequence, sdpa": ({"pack_length": None, "split_pairs": True}, "sdpa"),
    "one row per batch, fastdpo_varlen": ({"pack_length": None, "split_pairs": True, "one_row": True}, VARLEN),
}


def _attention_entries(batch, attention: str) -> int:
    """Score entries the attention computes: every row's L×L on sdpa, each segment's n×n on varlen."""
    rows, length = batch.input_ids.shape
    return int((batch.cu_seqlens.diff() ** 2).sum()) if attention == VARLEN else rows * length**2


def main(argv: list[str] | None = None) -> None:
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastdpo.data import prepare_preferences, tokenize_preferences
    from fastdpo.data.tiny_tokenizer import build_tiny_tokenizer
    from fastdpo.ops import LossConfig
    from fastdpo.train import preference_step

    parser = argparse.ArgumentParser(prog="python -m bench.pack_rows_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=64)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="folder for pack_rows_cpu.{json,md} (default: bench/results/<cpu>)")
    args = parser.parse_args(argv)
    pin(args.threads)
    meta = environment(args.threads, ("torch", "transformers", "fastdpo"))
    datasets.disable_progress_bars()
    tokenizer = build_tiny_tokenizer()
    rows = datasets.Dataset.from_list(_pairs(args.pairs))
    data = tokenize_preferences(prepare_preferences(rows), tokenizer, max_length=1024).dataset
    torch.manual_seed(0)
    config = LlamaConfig(**MODEL, pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")
    policy, reference = LlamaForCausalLM(config), LlamaForCausalLM(config)
    policy.gradient_checkpointing_enable()
    policy.train()
    loss_config = LossConfig(loss_type="sigmoid")
    batches = [[data[i] for i in range(start, start + args.batch)] for start in range(0, len(data), args.batch)]
    results = []
    for name, (options, attention) in LAYOUTS.items():
        packed = [pack_pairs(examples, max_length=1024, **options) for examples in batches]
        with use_attention([policy, reference], attention):  # held across the backward (checkpointing recomputes)
            preference_step(policy, packed[0], loss_config, ref_model=reference).loss.backward()  # warm-up
            times, losses = [], []
            for _ in range(args.repeats):
                policy.zero_grad(set_to_none=True)
                start = time.perf_counter()
                for batch in packed:
                    out = preference_step(policy, batch, loss_config, ref_model=reference)
                    out.loss.backward()
                    losses.append(float(out.loss.detach()))
                times.append(time.perf_counter() - start)
        shapes = [tuple(b.input_ids.shape) for b in packed]
        padding = sum(b.num_padding for b in packed) / sum(b.input_ids.numel() for b in packed)
        results.append({"layout": name, "attention": attention, "seconds": min(times), "all_seconds": times,
                        "losses": losses[: len(packed)], "rows": shapes,
                        "attention_entries": sum(_attention_entries(b, attention) for b in packed),
                        "padding": padding})  # fmt: skip
    base = results[0]
    lines = [
        f"DPO step fwd+bwd (reference included), tiny Llama H=256, 4 layers, V=32000, fp32, checkpointing; "
        f"{args.pairs} pairs in batches of {args.batch}; {args.threads} threads; best of {args.repeats}. "
        f"{meta['cpu']}; torch {torch.__version__}, transformers {meta['versions']['transformers']}; {meta['date']}.",
        "",
        "| layout | s (all batches) | vs pairs | padding | attention entries vs pairs |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['layout']} | {r['seconds']:.2f} | {r['seconds'] / base['seconds']:.2f}x | "
                     f"{r['padding']:.1%} | {r['attention_entries'] / base['attention_entries']:.2f}x |")  # fmt: skip
    worst = max(abs(a - b) for r in results[1:] for a, b in zip(base["losses"], r["losses"], strict=True))
    lines += ["", f"Largest loss difference between the layouts over the batches: {worst:.1e} (fp32 rounding)."]
    text = "\n".join(lines) + "\n"
    args.out = args.out or cpu_results()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "pack_rows_cpu.json", json.dumps({"meta": meta, "results": results}, indent=1))
    atomic_write(args.out / "pack_rows_cpu.md", text)
    print(text)


if __name__ == "__main__":
    main()
