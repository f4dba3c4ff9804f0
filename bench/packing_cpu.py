"""Padding and attention cost: TRL-style padded DPO batches against fastdpo's packed pairs.

    python -m bench.packing_cpu [--pairs 20000] [--batch-sizes 4 8 16 32 64] [--pack-lengths 2048 4096 8192]
                                [--model-timing]
    python -m bench.packing_cpu --render bench/results/AMD_EPYC_2cpu   # only draw packing_cpu*.png from the stored json

Lengths follow an UltraFeedback-like distribution (seeded): prompts uniform in 10–500 tokens, chosen and rejected
completions uniform in 10–800, each sequence truncated to ``--max-length`` (1024, TRL's default) as TRL's collator
does. For each batch size B the pairs are taken in order, B at a time (the same pairs a TRL step would see):

- TRL 1.16 pads the 2B sequences of a step to the longest one (its DPO trainer ignores ``padding_free``);
- fastdpo packs the B pairs (chosen + rejected together) into rows of at most ``pack_length`` tokens with
  best-fit-decreasing and pads rows to the longest row of the batch.

Reported: padding fraction, computed tokens per real token, and the attention work of eager/sdpa, which build a
dense mask per row and so cost Σ rows L² (relative to TRL's). With ``--model-timing``, a tiny Llama body is run
forward+backward on packed rows of each ``pack_length`` and on TRL-style padded batches, to time real tokens/s.
Results go to bench/results/<cpu>/packing_cpu.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

from bench.machine import cpu_results, environment
from bench.plots import bar_panels, palette
from fastdpo.atomic import atomic_write


def ultrafeedback_like(pairs: int, max_length: int, seed: int = 0) -> list[tuple[int, int]]:
    """(chosen, rejected) sequence lengths after per-sequence truncation to ``max_length``."""
    rng = random.Random(seed)
    out = []
    for _ in range(pairs):
        prompt = rng.randint(10, 500)
        out.append((min(prompt + rng.randint(10, 800), max_length), min(prompt + rng.randint(10, 800), max_length)))
    return out


def padded_cost(batch: list[tuple[int, int]]) -> tuple[int, int, int]:
    """(real tokens, computed tokens, Σ L²) of TRL's padded batch: 2B rows of the longest sequence."""
    longest = max(max(c, r) for c, r in batch)
    real = sum(c + r for c, r in batch)
    return real, 2 * len(batch) * longest, 2 * len(batch) * longest**2


def packed_cost(batch: list[tuple[int, int]], pack_length: int) -> tuple[int, int, int]:
    """(real tokens, computed tokens, Σ L²) of the packed batch: rows padded to the longest row."""
    from fastdpo.data.packer import pack

    lengths = [c + r for c, r in batch]
    bins = pack(lengths, pack_length)
    longest = max(sum(lengths[i] for i in items) for items in bins)
    return sum(lengths), len(bins) * longest, len(bins) * longest**2


def padding_table(lengths, batch_sizes, pack_lengths) -> list[dict]:
    rows = []
    for size in batch_sizes:
        batches = [lengths[i : i + size] for i in range(0, len(lengths) - size + 1, size)]
        variants = [("TRL padded", None)] + [(f"fastdpo packed, pack_length={p}", p) for p in pack_lengths]
        base_attention = sum(padded_cost(b)[2] for b in batches)
        for name, pack_length in variants:
            costs = [padded_cost(b) if pack_length is None else packed_cost(b, pack_length) for b in batches]
            real = sum(c[0] for c in costs)
            computed = sum(c[1] for c in costs)
            attention = sum(c[2] for c in costs)
            rows.append({
                "batch_pairs": size, "variant": name, "padding_fraction": 1 - real / computed,
                "computed_per_real": computed / real, "attention_vs_trl": attention / base_attention,
            })  # fmt: skip
    return rows


def model_timing(lengths, batch_size: int, pack_lengths, *, hidden: int = 256, layers: int = 4,
                 repeats: int = 3) -> list[dict]:  # fmt: skip
    """Real tokens/s of a small Llama body fwd+bwd on padded vs packed batches (CPU, fp32)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    heads = max(4, hidden // 64)
    config = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=int(hidden * 2.6875),
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 2,
                         max_position_embeddings=8192, attn_implementation="sdpa")  # fmt: skip
    body = LlamaForCausalLM(config).model
    batch = lengths[:batch_size]
    real = sum(c + r for c, r in batch)

    def run(input_ids, position_ids, attention_mask=None):
        out = body(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False)
        out.last_hidden_state.float().pow(2).mean().backward()

    results = []
    longest = max(max(c, r) for c, r in batch)
    ids = torch.randint(0, 512, (2 * batch_size, longest))
    mask = torch.zeros_like(ids)
    for k, (c, r) in enumerate(batch):
        mask[k, :c] = 1
        mask[batch_size + k, :r] = 1
    cases = [("TRL padded", lambda: run(ids, torch.arange(longest).expand_as(ids), mask))]
    from fastdpo.data.packer import pack

    for pack_length in pack_lengths:
        pair_lengths = [c + r for c, r in batch]
        bins = pack(pair_lengths, pack_length)
        row = max(sum(pair_lengths[i] for i in items) for items in bins)
        packed_ids = torch.randint(0, 512, (len(bins), row))
        positions = torch.zeros_like(packed_ids)
        for b, items in enumerate(bins):
            offset = 0
            for i in items:
                for n in batch[i]:
                    positions[b, offset : offset + n] = torch.arange(n)
                    offset += n
            positions[b, offset:] = torch.arange(row - offset)
        cases.append((f"fastdpo packed, pack_length={pack_length}",
                      lambda p=packed_ids, q=positions: run(p, q)))  # fmt: skip
    for name, fn in cases:
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            body.zero_grad(set_to_none=True)
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        results.append({"variant": name, "seconds": statistics.median(times), "real_tokens_per_s":
                        real / statistics.median(times)})  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.packing_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20_000)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    parser.add_argument("--pack-lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--model-timing", action="store_true")
    parser.add_argument("--timing-batch", type=int, default=8)
    parser.add_argument("--timing-hidden", type=int, nargs="+", default=[256], help="model widths to time")
    parser.add_argument("--timing-layers", type=int, default=4)
    parser.add_argument("--timing-repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="folder for NAME.{json,md,png} (default: bench/results/<cpu>)")
    parser.add_argument("--name", default="packing_cpu", help="the files' name (a second setting's: its own)")
    parser.add_argument("--render", type=Path, metavar="DIR", help="only draw DIR/packing_cpu*.png from their json")
    args = parser.parse_args(argv)
    if args.render:
        for stored in sorted(args.render.glob("packing_cpu*.json")):  # also runs stored under another name
            _plot(json.loads(stored.read_text()), stored.with_suffix(".png"))
        return
    import torch

    meta = {**environment(torch.get_num_threads()),
            "args": {k: v for k, v in vars(args).items() if k not in ("out", "render")}}  # fmt: skip
    lengths = ultrafeedback_like(args.pairs, args.max_length)
    table = padding_table(lengths, args.batch_sizes, args.pack_lengths)
    given = sys.argv[1:] if argv is None else list(argv)
    for index, flag in reversed(list(enumerate(given))):  # (the folder written to: not how the numbers were made)
        if flag.startswith("--o") and "--out".startswith(flag.split("=")[0]):
            del given[index : index + (1 if "=" in flag else 2)]
    command = " ".join(["python -m bench.packing_cpu", *given])
    lines = [
        f"Command: {command} ({_provenance(args, meta)}).",
        "",
        f"{args.pairs} UltraFeedback-like pairs (prompts 10–500, completions 10–800 tokens, max_length "
        f"{args.max_length}); consecutive batches of B pairs.",
        "",
        "| B pairs | variant | padding fraction | computed / real tokens | attention work vs TRL |",
        "|---|---|---|---|---|",
    ]
    for r in table:
        lines.append(f"| {r['batch_pairs']} | {r['variant']} | {r['padding_fraction']:.1%} | "
                     f"{r['computed_per_real']:.2f} | {r['attention_vs_trl']:.2f} |")  # fmt: skip
    timing = []
    if args.model_timing:
        for hidden in args.timing_hidden:
            rows = model_timing(lengths, args.timing_batch, args.pack_lengths, hidden=hidden,
                                layers=args.timing_layers, repeats=args.timing_repeats)  # fmt: skip
            timing += [{**r, "hidden": hidden} for r in rows]
            lines += ["", f"Llama body H={hidden}, {args.timing_layers} layers, sdpa, fp32, fwd+bwd on the first "
                      f"{args.timing_batch} pairs, median of {args.timing_repeats}:", "",
                      "| variant | seconds | real tokens/s |", "|---|---|---|"]  # fmt: skip
            lines += [f"| {t['variant']} | {t['seconds']:.2f} | {t['real_tokens_per_s']:,.0f} |" for t in rows]
    text = "\n".join(lines) + "\n"
    args.out = args.out or cpu_results()
    args.out.mkdir(parents=True, exist_ok=True)
    stored = {"meta": meta, "padding": table, "timing": timing}
    atomic_write(args.out / f"{args.name}.json", json.dumps(stored, indent=1, default=str))
    atomic_write(args.out / f"{args.name}.md", text)
    _plot(stored, args.out / f"{args.name}.png")
    print(text)


def _provenance(args: argparse.Namespace, meta: dict) -> str:
    """The run's date, machine and versions, for the table's first line."""
    timing = f"; timings: the median of {args.timing_repeats} after one warm-up" if args.model_timing else ""
    return (f"{meta['date']}, {meta['cpu']}, {meta['threads']} threads, torch {meta['versions']['torch']}, "
            f"transformers {meta['versions']['transformers']}{timing}")  # fmt: skip


def _plot(stored: dict, path: Path) -> None:
    """The padding table's three columns per (B, variant), a color per variant; below, real tokens/s per variant of
    each timed model width (dashed: TRL's padded batches, the first row of each)."""
    rows = stored["padding"]
    color = palette(r["variant"] for r in [*rows, *stored["timing"]])
    labels = [f"B={r['batch_pairs']}, {r['variant']}" for r in rows]
    colors = [color[r["variant"]] for r in rows]
    panels = [
        {"title": "padding", "labels": labels, "values": [100 * r["padding_fraction"] for r in rows],
         "unit": "% of computed tokens"},
        {"title": "computed / real tokens", "labels": labels, "values": [r["computed_per_real"] for r in rows],
         "unit": "ratio (dashed: 1, no padding)", "reference": 1.0},
        {"title": "attention work vs TRL (eager/sdpa: Σ rows L²)", "labels": labels,
         "values": [r["attention_vs_trl"] for r in rows], "unit": "ratio (dashed: 1, TRL's)", "reference": 1.0},
    ]  # fmt: skip
    for panel in panels:
        panel["color"] = colors
    widths = dict.fromkeys(t.get("hidden") for t in stored["timing"])  # runs before widths were recorded: None
    for hidden in widths:
        timed = [t for t in stored["timing"] if t.get("hidden") == hidden]
        panels.append({"title": "model fwd+bwd" + (f", H={hidden}" if hidden else ""),
                       "labels": [t["variant"] for t in timed], "values": [t["real_tokens_per_s"] for t in timed],
                       "unit": f"real tokens per second (dashed: {timed[0]['variant']})",
                       "reference": timed[0]["real_tokens_per_s"],
                       "color": [color[t["variant"]] for t in timed]})  # fmt: skip
    title = ("Padding and attention work of batches of B pairs: TRL's padded batches against fastdpo's packed rows"
             + ("; below, a Llama body's fwd+bwd on the first pairs" if widths else ""))  # fmt: skip
    bar_panels(path, title, panels, columns=3, label_width=3.6)


if __name__ == "__main__":
    main()
