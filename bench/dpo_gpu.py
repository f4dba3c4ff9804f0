"""End-to-end DPO on a CUDA GPU: fastdpo against TRL 1.16 (its defaults, a precomputed reference, use_liger_kernel).

    python -m bench.dpo_gpu [--model 1b] [--data ultrafeedback short] [--engines ...] [--pairs 384]
                            [--batch 8] [--steps 12] [--out bench/results/<device>]

The model is a Llama with Llama-3.2-1B's shape (hidden 2048, 16 layers, 32 query / 8 key-value heads, MLP 8192,
vocab 128256, tied head), randomly initialised in bf16 on the GPU, and an identical copy as the reference; sdpa
attention (the GPU image has no flash-attn). Text is synthetic words through the locally trained tiny tokenizer
(ids stay under 590; the head still scores all 128256 entries). Two length distributions:

- ``ultrafeedback``: lengths in tokens drawn like UltraFeedback-binarized's: prompt log-normal with median 100,
  completions log-normal with median 230 (σ 0.9 and 0.8, clipped to [8, 1024] and [4, 1024]); max_length 1024
  truncates the tail, as both trainers' default does.
- ``short``: uniform short sequences, prompts of 16–48 tokens and completions of 16–64.

Every engine runs in its own process with bf16=True and otherwise its defaults (gradient checkpointing on,
max_length 1024, AdamW), batch ``--batch`` pairs, the same seed (so the same pairs per step); the engines named
with options (``ENGINES``) differ from their trainer's defaults in those options only. ``fastdpo_lean`` is the
least memory fastdpo offers without changing the training: the reference's weights and the policy's checkpointed
activations wait in host memory, each on the device only while needed, and the policy's norms and MLPs keep less
for their backward (``lean_activations``). ``fastdpo_varlen_leanact`` is the candidate for speed and memory together:
each sequence attending only to itself in torch's flash varlen kernel, and the lean layers with their Triton
kernels (norms, SiLU products, RoPE). Measured:

- ``setup s``: building the trainer (tokenization; TRL's ``precompute_ref_log_probs`` runs its reference pass over
  every pair here, when the trainer is built, not in ``train()``);
- ``first step s``: from ``train()`` to the end of the first optimizer step (kernel compilation, cuBLAS handles);
- ``tokens/s``: real tokens (chosen and rejected sequences, prompt counted in both, as both trainers log
  ``num_tokens``) of steps 2..N over their time, from a callback that synchronizes the device at every step end;
- ``peak GiB``: ``torch.cuda.max_memory_allocated`` during ``train()`` (weights, reference, optimizer states and
  activations), and the part above the baseline taken after setup (which holds both models' weights);
- ``padding``: padded positions over all positions the model ran on;
- ``TFLOP/s``: useful FLOPs (``bench.flops.dpo_step_flops``: policy forward+backward, reference forward, head on
  the scored positions; no recomputation or padding) of steps 2..N over their time, and that as a share of this
  device's bf16 GEMM rate, measured in its own process (``torch.mm`` 8192³, median of 20). An engine whose
  reference was precomputed (``PRECOMPUTED``) ran no reference pass in those steps: its FLOPs leave it out.

Results: ``<out>/dpo_gpu.{json,md,png}``; ``--render DIR`` draws a stored run's png from its json; ``--summarize
DIR`` summarizes its recorded steps again (``summarize``) and rewrites its json, md and png.
``--device cpu --model tiny`` runs the same code on a CPU (a smoke test).

``--profile`` instead runs each engine under ``torch.profiler`` for two steps after two unrecorded ones and writes
``<out>/dpo_gpu_profile.md``: per engine, the device's busy time (the union of its kernels' intervals) against the
steps' wall time — a step whose device sits idle is bound by the host — and the operators ranked by their own
device time (CPU time on a CPU). Profiled steps run slower; their times are not benchmark results.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.data_cpu import WORDS
from bench.dpo_cpu import PRECOMPUTED, engine_trainer, record_lengths
from bench.flops import ModelShape, StepFlops, dpo_step_flops
from bench.machine import RESULTS, folder_name, run_record
from bench.plots import bar_panels
from fastdpo.atomic import atomic_write
from fastdpo.profiling import run_measured

ENGINES = {  # in the order they run: a run cut short keeps the first
    "trl": "TRL 1.16 DPOTrainer, defaults",
    "fastdpo": "fastdpo DPOTrainer",
    "fastdpo_varlen": "fastdpo DPOTrainer, packed_attention='varlen'",
    "fastdpo_leanact": "fastdpo DPOTrainer, lean_activations",
    "fastdpo_varlen_leanact": "fastdpo DPOTrainer, packed_attention='varlen', lean_activations",
    "fastdpo_lean": "fastdpo DPOTrainer, ref_offload, activation_offloading, lean_activations",
    "fastdpo.trl": "fastdpo.trl drop-in (TRL's script, one import changed)",
    "trl_precompute": "TRL, precompute_ref_log_probs=True",
    "trl_liger": "TRL, use_liger_kernel=True",
}
MODELS = {
    "1b": {"vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
           "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 4096,
           "tie_word_embeddings": True},
    "tiny": {"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 4,
             "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 2048},
}  # fmt: skip
TOKENS_PER_WORD = 1.69  # the tiny tokenizer on bench.data_cpu.WORDS (measured over 1000 random words)


def _length(rng: random.Random, kind: str, part: str) -> int:
    """A length in tokens for ``part`` (prompt or completion) of the ``kind`` distribution."""
    if kind == "short":
        return rng.randint(16, 48) if part == "prompt" else rng.randint(16, 64)
    median, sigma, low = (100, 0.9, 8) if part == "prompt" else (230, 0.8, 4)
    return int(min(1024, max(low, rng.lognormvariate(0.0, sigma) * median)))


def make_pairs(count: int, kind: str, seed: int = 0) -> list[dict]:
    """Synthetic pairs whose token lengths follow ``kind`` (see the module docstring)."""
    rng = random.Random(seed)

    def text(tokens: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(max(1, round(tokens / TOKENS_PER_WORD))))

    return [{"prompt": text(_length(rng, kind, "prompt")) + "?", "chosen": " " + text(_length(rng, kind, "completion")),
             "rejected": " " + text(_length(rng, kind, "completion"))} for _ in range(count)]  # fmt: skip


class StepClock:
    """A TrainerCallback recording, at ``train()``'s start and every step's end, the device-synchronized time."""

    def __init__(self, device: str):
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                clock.sync()
                clock.begin = time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                clock.sync()
                clock.ends.append(time.perf_counter())

        self.device, self.begin, self.ends, self.callback = device, 0.0, [], _Callback()

    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()


def build_trainer(engine: str, *, model: str, data: str, pairs: int, batch: int, steps: int, device: str):
    """The engine's trainer on the model and pairs; and its setup seconds."""
    import datasets
    from transformers import LlamaConfig, LlamaForCausalLM

    from fastdpo.data.tiny_tokenizer import build_tiny_tokenizer

    datasets.disable_progress_bars()
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(0)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = LlamaConfig(**MODELS[model], pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")
    with torch.device(device):
        policy = LlamaForCausalLM(config).to(dtype)
        reference = LlamaForCausalLM(config).to(dtype)
    reference.load_state_dict(policy.state_dict())
    dataset = datasets.Dataset.from_list(make_pairs(pairs, data))
    common = {"output_dir": f"/tmp/bench_dpo_gpu_{engine}", "per_device_train_batch_size": batch, "max_steps": steps,
              "logging_steps": 1, "report_to": [], "bf16": device == "cuda", "save_strategy": "no", "seed": 0,
              "use_cpu": device == "cpu"}  # fmt: skip
    start = time.perf_counter()
    trainer = engine_trainer(engine, policy, reference, dataset, tokenizer, common)
    return trainer, time.perf_counter() - start


def _padding(engine: str, inputs: dict) -> tuple[int, int]:
    """(padded positions, all positions) of one batch as the engine's model runs it."""
    if engine.startswith("fastdpo"):
        return int(inputs["num_padding"]), inputs["input_ids"].numel()
    mask = inputs["attention_mask"]
    return int(mask.numel() - mask.sum()), mask.numel()


def _worker(args: argparse.Namespace) -> dict:
    device = args.device
    trainer, setup_s = build_trainer(args.worker, model=args.model, data=args.data[0], pairs=args.pairs,
                                     batch=args.batch, steps=args.steps, device=device)  # fmt: skip
    if args.profile:
        return _profile_worker(trainer, args.worker, device)
    steps = record_lengths(trainer, args.worker)
    padding: list[tuple[int, int]] = []
    compute_loss = trainer.compute_loss  # record_lengths' wrapper

    def counting(model, inputs, *rest, **kwargs):
        if model.training:
            padding.append(_padding(args.worker, inputs))
        return compute_loss(model, inputs, *rest, **kwargs)

    trainer.compute_loss = counting
    clock = StepClock(device)
    trainer.add_callback(clock.callback)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else 0
    logs = [log for log in trainer.state.log_history if "loss" in log]
    return {"engine": args.worker, "setup_s": setup_s, "first_step_s": clock.ends[0] - clock.begin,
            "step_ends": [t - clock.begin for t in clock.ends], "num_tokens": logs[-1]["num_tokens"],
            "losses": [log["loss"] for log in logs], "steps": steps, "padding": padding,
            "peak_bytes": peak, "base_bytes": base if device == "cuda" else 0}  # fmt: skip


PROFILE_SKIP, PROFILE_ACTIVE = 2, 2  # steps run before recording (compilation, allocator growth), steps recorded


def _profile_worker(trainer, engine: str, device: str) -> dict:
    """Profile steps 3-4 of ``trainer.train()``: device busy time against wall time, and the top operators."""
    from torch.profiler import ProfilerActivity, profile, schedule
    from transformers import TrainerCallback

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    clock = StepClock(device)
    with profile(activities=activities, schedule=schedule(wait=PROFILE_SKIP, warmup=0, active=PROFILE_ACTIVE)) as prof:

        class _Step(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                prof.step()

        trainer.add_callback(clock.callback)
        trainer.add_callback(_Step())
        trainer.train()
    wall = clock.ends[PROFILE_SKIP + PROFILE_ACTIVE - 1] - clock.ends[PROFILE_SKIP - 1]
    kernels = sorted((e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type.name == "CUDA")
    busy, last_end = 0.0, float("-inf")
    for start, end in kernels:  # the union of the kernels' intervals, in µs
        busy += max(0.0, end - max(start, last_end))
        last_end = max(last_end, end)
    sort = "self_device_time_total" if device == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=70)
    return {"engine": engine, "profile": {"wall_s": wall, "device_busy_s": busy / 1e6, "kernels": len(kernels),
                                          "table": table}}  # fmt: skip


def _profile_report(meta: dict, results: dict[str, list[dict]]) -> str:
    lines = [f"DPO steps {PROFILE_SKIP + 1}–{PROFILE_SKIP + PROFILE_ACTIVE} under torch.profiler on "
             f"{meta['device']['name']}; model {meta['model']}, batch {meta['batch']} pairs, {meta['dtype']}. Profiled "
             "steps run slower than unprofiled ones: these are shares, not benchmark times.", "",
             "| data | engine | wall s (2 steps) | device busy s | busy share | kernels |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    tables = []
    for data, rows in results.items():
        for r in rows:
            if "profile" not in r:
                lines.append(f"| {data} | {ENGINES[r['engine']]} | failed: {r.get('error', '?')} | | | |")
                continue
            p = r["profile"]
            share = f"{100 * p['device_busy_s'] / p['wall_s']:.0f}%" if meta["dtype"] == "bf16" else "n/a (CPU)"
            lines.append(f"| {data} | {ENGINES[r['engine']]} | {p['wall_s']:.3f} | {p['device_busy_s']:.3f} | {share} "
                         f"| {p['kernels']} |")  # fmt: skip
            tables += ["", f"{data}, {ENGINES[r['engine']]}:", "", "```", p["table"].rstrip("\n"), "```"]
    return "\n".join(lines + tables) + "\n"


def _gemm_worker(args: argparse.Namespace) -> dict:
    """bf16 ``torch.mm`` rate at 8192³ on random data, median of 20 after 5 warm-ups, with CUDA events."""
    n = 8192
    gen = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(n, n, generator=gen, device="cuda").bfloat16()
    b = torch.randn(n, n, generator=gen, device="cuda").bfloat16()
    out = torch.empty(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        torch.mm(a, b, out=out)
    times = []
    for _ in range(20):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.mm(a, b, out=out)
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    median = statistics.median(times)
    return {"shape": [n, n, n], "median_s": median, "tflops": 2 * n**3 / median / 1e12}


def summarize(result: dict, shape: ModelShape) -> dict:
    """Steady-state rates over steps 2..N (one micro-batch per step), padding, and useful FLOPs."""
    later = result["steps"][1:]
    span = result["step_ends"][-1] - result["step_ends"][0]
    tokens = sum(sum(s["seq_lens"]) for s in later)
    parts = sum((dpo_step_flops(shape, s["seq_lens"], head_tokens=s["scored"]) for s in later),
                StepFlops(0, 0, 0, 0, 0, 0))  # fmt: skip
    flops = parts.total
    if result["engine"] in PRECOMPUTED:  # (its reference pass ran when the trainer was built: not in these steps)
        flops -= parts.reference_body + parts.reference_head + parts.reference_attention
    padded = sum(p for p, _ in result["padding"])
    positions = sum(n for _, n in result["padding"])
    all_tokens = sum(sum(s["seq_lens"]) for s in result["steps"])
    if all_tokens != result["num_tokens"]:
        logged = result["num_tokens"]
        raise RuntimeError(f"{result['engine']}: recorded {all_tokens} tokens, the trainer logged {logged}")
    return {"tokens_per_s": tokens / span, "useful_tflops": flops / span / 1e12, "padding_fraction": padded / positions,
            "mean_seq_len": all_tokens / sum(len(s["seq_lens"]) for s in result["steps"])}  # fmt: skip


def _table(meta: dict, gemm: dict | None, results: dict[str, list[dict]]) -> str:
    dev = meta["device"]
    rate = f"{gemm['tflops']:.0f} TFLOP/s" if gemm else "not measured"
    lines = [
        f"DPO end to end on {dev['name']} (driver {dev['driver']}); model {meta['model']} "
        f"({', '.join(f'{k}={v}' for k, v in MODELS[meta['model']].items())}), {meta['dtype']}, sdpa; "
        f"batch {meta['batch']} pairs, {meta['steps']} steps; torch {meta['versions']['torch']}, transformers "
        f"{meta['versions']['transformers']}, trl {meta['versions']['trl']}, liger-kernel "
        f"{meta['versions']['liger-kernel']}. bf16 GEMM rate of this device: {rate} (torch.mm 8192³).",
        "",
        "| data | engine | tokens/s (steps 2..N) | vs TRL | peak GiB | above setup GiB | vs TRL | setup s "
        "| first step s | padding | mean seq len | useful TFLOP/s | % of GEMM rate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for data, rows in results.items():
        base = next((r for r in rows if r["engine"] == "trl" and "tokens_per_s" in r), None)
        for r in rows:
            if "tokens_per_s" not in r:
                lines.append(f"| {data} | {ENGINES[r['engine']]} | failed: {r['error']} | | | | | | | | | | |")
                continue
            speed = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "n/a"
            above = r["peak_bytes"] - r["base_bytes"]
            mem = f"{r['peak_bytes'] / base['peak_bytes']:.2f}x" if base and base["peak_bytes"] else "n/a"
            share = f"{100 * r['useful_tflops'] / gemm['tflops']:.1f}%" if gemm else "n/a"
            lines.append(
                f"| {data} | {ENGINES[r['engine']]} | {r['tokens_per_s']:,.0f} | {speed} "
                f"| {r['peak_bytes'] / 2**30:.1f} | {above / 2**30:.1f} | {mem} | {r['setup_s']:.1f} "
                f"| {r['first_step_s']:.1f} "
                f"| {100 * r['padding_fraction']:.1f}% "
                f"| {r['mean_seq_len']:.0f} | {r['useful_tflops']:.0f} | {share} |"
            )
    same = {data: len({json.dumps(r["steps"]) for r in rows if "steps" in r}) == 1 for data, rows in results.items()}
    lines += [
        "",
        "Sequence lengths recorded by all engines identical step by step (the same pairs per step): "
        + ", ".join(f"{data} {'yes' if ok else 'NO'}" for data, ok in same.items())
        + ". Peak is the whole of `max_memory_allocated` during train(); 'vs TRL' compares those peaks.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dpo_gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="1b")
    parser.add_argument("--data", nargs="+", choices=("ultrafeedback", "short"), default=["ultrafeedback", "short"])
    parser.add_argument("--engines", nargs="+", choices=list(ENGINES), default=list(ENGINES))
    parser.add_argument(
        "--short-engines",
        nargs="+",
        choices=list(ENGINES),
        default=["trl", "fastdpo"],
        help="engines run on the short data (a subset keeps the run short)",
    )
    parser.add_argument("--pairs", type=int, default=384)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--timeout", type=float, default=240, help="seconds per engine process")
    parser.add_argument("--worker", choices=(*ENGINES, "gemm"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/<device name>")
    parser.add_argument("--profile", action="store_true", help="profile two steps per engine (see the docstring)")
    parser.add_argument("--render", type=Path, metavar="DIR", help="only draw DIR/dpo_gpu.png from its json")
    parser.add_argument("--summarize", type=Path, metavar="DIR", help="only summarize DIR/dpo_gpu.json again and "
                        "rewrite its json, md and png")  # fmt: skip
    args = parser.parse_args(argv)
    if args.summarize:
        resummarize(args.summarize)
        return
    if args.render:
        render(args.render)
        return
    if args.profile and args.steps < PROFILE_SKIP + PROFILE_ACTIVE:
        parser.error(f"--profile records steps {PROFILE_SKIP + 1}-{PROFILE_SKIP + PROFILE_ACTIVE}: give --steps of at "
                     f"least {PROFILE_SKIP + PROFILE_ACTIVE}")  # fmt: skip
    if args.worker:
        print(json.dumps(_gemm_worker(args) if args.worker == "gemm" else _worker(args)))
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (--device cpu runs the smoke test)")
    from transformers import LlamaConfig

    from bench.head_gpu import _device, _versions

    device = _device() if args.device == "cuda" else {"name": "cpu", "driver": "-"}
    out = args.out or RESULTS / folder_name(device["name"])
    out.mkdir(parents=True, exist_ok=True)
    shape = ModelShape.from_config(LlamaConfig(**MODELS[args.model]))
    meta = {"device": device, "versions": _versions(), "model": args.model, "batch": args.batch, "steps": args.steps,
            "pairs": args.pairs, "dtype": "bf16" if args.device == "cuda" else "fp32",
            **run_record("bench.dpo_gpu")}  # fmt: skip
    gemm = None
    if args.device == "cuda" and not args.profile:
        gemm = _run([sys.executable, "-m", "bench.dpo_gpu", "--worker", "gemm"], args.timeout)
        gemm = None if "error" in gemm else gemm
    results: dict[str, list[dict]] = {}
    for data in args.data:
        engines = args.engines if data == args.data[0] else [e for e in args.engines if e in args.short_engines]
        for engine in engines:
            print(f"{data}: {engine} ...", file=sys.stderr, flush=True)
            command = [sys.executable, "-m", "bench.dpo_gpu", "--worker", engine, "--model", args.model, "--data", data,
                       "--pairs", str(args.pairs), "--batch", str(args.batch), "--steps", str(args.steps),
                       "--device", args.device] + ["--profile"] * args.profile  # fmt: skip
            result = _run(command, args.timeout) | {"engine": engine}
            results.setdefault(data, []).append(result)
            if args.profile:
                atomic_write(out / "dpo_gpu_profile.md", _profile_report(meta, results))
                continue
            if "error" not in result:
                result.update(summarize(result, shape))
            _write(out, meta, gemm, results)  # after every engine: a run cut short keeps what it measured
    print((out / "dpo_gpu_profile.md").read_text() if args.profile else _table(meta, gemm, results))


def _run(command: list[str], timeout: float) -> dict:
    """A worker's JSON result, or ``{"error": ...}`` (a failing engine is reported, not fatal)."""
    import subprocess

    try:
        return run_measured(command, cwd=Path(__file__).parents[1], timeout=timeout)
    except (RuntimeError, subprocess.TimeoutExpired, json.JSONDecodeError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        raised = [line for line in lines if re.match(r"[\w.]*(Error|Exception|Expired)\b", line)]
        return {"error": (raised or lines or [type(error).__name__])[-1][:300], "log": str(error)[-4000:]}


def _write(out: Path, meta: dict, gemm: dict | None, results: dict[str, list[dict]]) -> None:
    atomic_write(out / "dpo_gpu.json", json.dumps({"meta": meta, "gemm": gemm, "results": results}, indent=1))
    atomic_write(out / "dpo_gpu.md", _table(meta, gemm, results))
    _plot(meta, results, out / "dpo_gpu.png")


def _plot(meta: dict, results: dict[str, list[dict]], path: Path) -> None:
    """tokens/s and peak memory per engine, a pair of panels per data set; TRL's value dashed."""
    panels = []
    for data, rows in results.items():
        done = [r for r in rows if "tokens_per_s" in r]
        if not done:
            continue
        base = next((r for r in done if r["engine"] == "trl"), None)
        names = [r["engine"] for r in done]
        base_peak = base and base["peak_bytes"] / 2**30
        panels += [
            {"title": f"{data}: tokens/s", "labels": names, "values": [r["tokens_per_s"] for r in done],
             "unit": "real tokens per second, steps 2..N", "reference": base and base["tokens_per_s"]},
            {"title": f"{data}: peak memory", "labels": names, "values": [r["peak_bytes"] / 2**30 for r in done],
             "unit": "max_memory_allocated, GiB", "color": "tab:orange", "reference": base_peak},
        ]  # fmt: skip
    if panels:
        title = (f"DPO end to end on {meta['device']['name']}, model {meta['model']}, {meta['dtype']}, batch "
                 f"{meta['batch']} pairs, {meta['steps']} steps (dashed: TRL)")  # fmt: skip
        bar_panels(path, title, panels, columns=2)


def render(folder: Path) -> None:
    """Draw ``dpo_gpu.png`` of a stored run from its ``dpo_gpu.json`` (no GPU needed; the run's md stays as it is)."""
    stored = json.loads((folder / "dpo_gpu.json").read_text())
    _plot(stored["meta"], stored["results"], folder / "dpo_gpu.png")


def resummarize(folder: Path) -> None:
    """A stored run's ``dpo_gpu.json`` summarized again (``summarize``: its recorded steps) and its json, md and png
    rewritten (no GPU needed)."""
    from transformers import LlamaConfig

    stored = json.loads((folder / "dpo_gpu.json").read_text())
    shape = ModelShape.from_config(LlamaConfig(**MODELS[stored["meta"]["model"]]))
    for rows in stored["results"].values():
        for result in rows:
            if "error" not in result:
                result.update(summarize(result, shape))
    _write(folder, stored["meta"], stored["gemm"], stored["results"])


if __name__ == "__main__":
    main()
