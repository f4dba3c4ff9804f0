"""End-to-end ORPO and SimPO on CPU: TRL 1.16's experimental ORPOTrainer and CPOTrainer against the drop-ins.

    python -m bench.orpo_cpu [--pairs 256] [--batch 8] [--steps 8] [--threads 2] [--repeats 3] [--out DIR]

The same tiny Llama (hidden 256, 4 layers, vocab 32000, sdpa, fp32) and synthetic pairs as bench/dpo_cpu.py. Each
engine is TRL's script (its config at its defaults but for ``bf16=False``, ``max_length=1024``, the batch, steps
and seed) with TRL's trainer or with only the import changed (``fastdpo.trl``), each run in its own process;
``--repeats`` rounds of every engine in turn (each round's order the one before reversed), the median (min–max)
reported. Timed: ``trainer.train()`` only. Tokens: the real tokens of every sequence of every step, read from the
batches the model receives (TRL's attention masks; the packed batches' segments), the same count for both when
they see the same pairs. Peak RSS: the whole process, above a baseline taken after setup. SimPO is TRL's CPO
trainer with ``loss_type="simpo"`` and ``cpo_alpha=0``. Results: bench/results/<cpu>/orpo_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch

from bench.dpo_cpu import MODEL, _pairs, _spread, merged, run_arguments, run_rounds
from bench.machine import cpu_results, environment, pin
from fastdpo.atomic import atomic_write
from fastdpo.profiling import peak_rss, reset_peak_rss

# engine → (trainer, drop-in or TRL's, the config's options)
ENGINES = {
    "trl_orpo": ("ORPO", False, {}),
    "fastdpo.trl_orpo": ("ORPO", True, {}),
    "trl_simpo": ("CPO", False, {"loss_type": "simpo", "cpo_alpha": 0.0}),
    "fastdpo.trl_simpo": ("CPO", True, {"loss_type": "simpo", "cpo_alpha": 0.0}),
}


def build_trainer(engine: str, *, pairs: int, batch: int, steps: int, threads: int):
    """The engine's trainer on the tiny Llama and the pairs; and its setup seconds."""
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastdpo.data.tiny_tokenizer import build_tiny_tokenizer

    torch.set_num_threads(threads)
    datasets.disable_progress_bars()
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**MODEL, pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa"))
    data = datasets.Dataset.from_list(_pairs(pairs))
    kind, ours, options = ENGINES[engine]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from trl.experimental.cpo import CPOConfig, CPOTrainer
        from trl.experimental.orpo import ORPOConfig, ORPOTrainer
    if ours:
        from fastdpo.trl import CPOTrainer, ORPOTrainer
    cls, config_cls = (ORPOTrainer, ORPOConfig) if kind == "ORPO" else (CPOTrainer, CPOConfig)
    args = config_cls(output_dir=f"/tmp/bench_orpo_{engine}", per_device_train_batch_size=batch, max_steps=steps,
                      logging_steps=1, report_to=[], bf16=False, save_strategy="no", seed=0, max_length=1024,
                      **options)  # fmt: skip
    start = time.perf_counter()
    trainer = cls(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    return trainer, time.perf_counter() - start


def _tokens(inputs: dict) -> int:
    if "cu_seqlens" in inputs:  # packed: the segments that are sequences (row-end padding has seq_pair -1)
        return int(inputs["cu_seqlens"].diff()[inputs["seq_pair"] >= 0].sum())
    return int(inputs["chosen_attention_mask"].sum() + inputs["rejected_attention_mask"].sum())


def _worker(args: argparse.Namespace) -> dict:
    trainer, setup_s = build_trainer(args.worker, pairs=args.pairs, batch=args.batch, steps=args.steps,
                                     threads=args.threads)  # fmt: skip
    tokens: list[int] = []
    compute_loss = trainer.compute_loss

    def counting(model, inputs, *rest, **kwargs):
        tokens.append(_tokens(inputs))
        return compute_loss(model, inputs, *rest, **kwargs)

    trainer.compute_loss = counting
    base = reset_peak_rss()
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    return {"engine": args.worker, "setup_s": setup_s, "train_s": train_s, "num_tokens": sum(tokens),
            "step_tokens": tokens, "peak_extra_bytes": peak_rss() - base, "losses": losses}  # fmt: skip


def _table(args: argparse.Namespace, meta: dict, results: list[dict]) -> str:
    lines = [
        f"ORPO and SimPO, tiny Llama (H=256, 4 layers, V=32000, fp32, sdpa), {args.pairs} pairs, batch {args.batch}, "
        f"{args.steps} steps, {args.threads} threads; train() only; {meta['repeats']} rounds of every engine. "
        f"{meta['cpu']}; torch {meta['versions']['torch']}, transformers {meta['versions']['transformers']}, trl "
        f"{meta['versions']['trl']}; {meta['date']}.",
        "",
        "| engine | train s, median (min–max) | tokens | tokens/s | vs TRL | peak extra RSS MiB | vs TRL | setup s |"
        " last loss |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    by_name = {r["engine"]: r for r in results}
    for r in results:
        base = by_name[r["engine"].replace("fastdpo.", "")]  # (TRL's run of the same trainer)
        rate, base_rate = r["num_tokens"] / r["train_s"], base["num_tokens"] / base["train_s"]
        lines.append(
            f"| {r['engine']} | {r['train_s']:.1f} ({_spread(r, 'train_s')}) | {r['num_tokens']} | {rate:,.0f} | "
            f"{rate / base_rate:.2f}x | {r['peak_extra_bytes'] / 2**20:.0f} | "
            f"{r['peak_extra_bytes'] / base['peak_extra_bytes']:.2f}x | {r['setup_s']:.1f} | {r['losses'][-1]:.5f} |"
        )
    same = all(by_name[f"fastdpo.{n}"]["step_tokens"] == by_name[n]["step_tokens"] for n in ("trl_orpo", "trl_simpo"))
    lines += ["", f"Tokens of each step the same for TRL and the drop-in: {'yes' if same else 'NO'}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.orpo_cpu", description=__doc__.splitlines()[0])
    run_arguments(parser)
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="folder for orpo_cpu.{json,md} (default: bench/results/<cpu>)")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    pin(args.threads)  # the workers inherit the affinity
    args.out = args.out or cpu_results()
    runs = run_rounds("bench.orpo_cpu", list(ENGINES), args)
    results = [merged(runs[engine]) for engine in ENGINES]
    meta = {**environment(args.threads), "pairs": args.pairs, "batch": args.batch, "steps": args.steps,
            "model": MODEL, "repeats": args.repeats}  # fmt: skip
    text = _table(args, meta, results)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "orpo_cpu.json", json.dumps({"meta": meta, "results": results}, indent=1))
    atomic_write(args.out / "orpo_cpu.md", text)
    print(text)


if __name__ == "__main__":
    main()
