"""Measured peak memory of DPO training steps on CPU against ``fastdpo.estimate_memory``'s prediction.

    python -m bench.memory_cpu [--steps 2] [--threads 2] [--only NAME ...]

Each configuration runs in its own process (``fastdpo.profiling.run_measured``): a tiny Llama built from a config
(random weights), a packed batch of exactly ``tokens`` tokens (sequences of ``row / 2`` tokens, a quarter of them
prompt, two to a row), and ``steps`` optimizer steps as ``DPOTrainer`` runs them — the reference pass (a separate model,
the policy with its LoRA adapter disabled, or cached log-probs given), ``preference_step`` with TRL's token metrics,
backward, gradient clipping, fused ``torch.optim.AdamW``, gradients set to None. Gradient checkpointing is
transformers' (non-reentrant). The measured peak is the process's resident memory at its highest during the steps
above its resident memory before the models were built; a warm-up step on a one-layer model first initializes the
libraries (thread pools, kernels), and the construction's own transient peak is reset away. So it holds the
weights, and everything the steps add. Results: bench/results/<cpu>/memory_cpu.{json,md,png}.

The estimate is computed from the same config and batch (``device="cpu"``, ``pair_tokens`` of the batch);
nothing in it is fitted to these measurements.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path

SMALL = {"vocab_size": 32000, "hidden_size": 256, "intermediate_size": 688, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
MEDIUM = {"vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 4,
          "num_attention_heads": 8, "num_key_value_heads": 4}  # fmt: skip
WIDE = {"vocab_size": 4096, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
TALL = {"vocab_size": 4096, "hidden_size": 128, "intermediate_size": 8192, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip
ONE_BLOCK = 2**40  # the lean MLP's backward on all tokens at once (fastdpo.model.lean.MLP_CHUNK_ELEMENTS)
WARMUP = {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1,
          "num_attention_heads": 2, "num_key_value_heads": 1}  # fmt: skip


def _run(name, model, tokens, *, precision="fp32", reference="separate", checkpointing=True, lora=False, row=512,
         lean=False, mlp_block=None):  # fmt: skip
    return {"name": name, "model": model, "tokens": tokens, "precision": precision, "reference": reference,
            "checkpointing": checkpointing, "lora": lora, "row": row, "lean": lean, "mlp_block": mlp_block}  # fmt: skip


CONFIGS = [
    _run("S sep ckpt 2k", SMALL, 2048),
    _run("S sep 2k", SMALL, 2048, checkpointing=False),
    _run("S cached ckpt 8k", SMALL, 8192, reference="cached"),
    _run("S sep 8k", SMALL, 8192, checkpointing=False),
    _run("M sep ckpt 4k", MEDIUM, 4096),
    _run("M sep 4k", MEDIUM, 4096, checkpointing=False),
    _run("M cached 8k", MEDIUM, 8192, reference="cached", checkpointing=False),
    _run("S bf16 sep 4k", SMALL, 4096, precision="bf16", checkpointing=False),
    _run("S bf16 sep ckpt 4k", SMALL, 4096, precision="bf16"),
    _run("M LoRA adapter ckpt 4k", MEDIUM, 4096, reference="adapter", lora=True),
    _run("M bf16 LoRA adapter 4k", MEDIUM, 4096, precision="bf16", reference="adapter", lora=True,
         checkpointing=False),
    _run("W bf16 sep ckpt 16k", WIDE, 16384, precision="bf16"),
    _run("W bf16 sep ckpt 16k lean", WIDE, 16384, precision="bf16", lean=True),
    _run("W bf16 sep 8k", WIDE, 8192, precision="bf16", checkpointing=False),
    _run("W bf16 sep 8k lean", WIDE, 8192, precision="bf16", checkpointing=False, lean=True),
    _run("T bf16 sep ckpt 16k", TALL, 16384, precision="bf16"),
    _run("T bf16 sep ckpt 16k lean, one block", TALL, 16384, precision="bf16", lean=True, mlp_block=ONE_BLOCK),
    _run("T bf16 sep ckpt 16k lean", TALL, 16384, precision="bf16", lean=True),
]  # fmt: skip
LORA = {"r": 16, "target_modules": "all-linear"}


def batch_of(config: dict, vocab: int):
    """A ``PackedBatch`` of exactly ``tokens`` tokens: two sequences of ``row / 2`` tokens per row, pairs split.

    Rows must hold several sequences: a row of one sequence gets no block mask from transformers (plain causal
    attention), which is not the packed case the estimate counts.
    """
    import torch

    from fastdpo.data.packing import pack_pairs

    generator = torch.Generator().manual_seed(0)
    prompt, completion = config["row"] // 8, config["row"] // 2 - config["row"] // 8

    def ids(count):
        return torch.randint(3, vocab, (count,), generator=generator).tolist()

    pairs = [{"prompt_ids": ids(prompt), "chosen_ids": ids(completion), "rejected_ids": ids(completion)}
             for _ in range(config["tokens"] // config["row"])]  # fmt: skip
    return pack_pairs(pairs, pack_length=config["row"], split_pairs=True)


def pair_tokens(batch) -> int:
    """Completion tokens of the largest pair of ``batch`` (scored positions, as the fused head counts them)."""
    import torch

    from fastdpo.ops.segments import segment_ids

    scored = batch.targets.reshape(-1) != -100
    owner = batch.seq_pair[segment_ids(batch.cu_seqlens, scored.numel())]
    pair_of_token = owner[scored]
    counts = torch.zeros(int(batch.seq_pair.max()) + 1, dtype=torch.long)
    return int(counts.index_add_(0, pair_of_token, torch.ones_like(pair_of_token)).max())


def _build(config: dict, model_fields: dict):
    """Policy (LoRA-wrapped when asked), reference model or None, optimizer."""
    import copy

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[config["precision"]]
    model = LlamaForCausalLM(LlamaConfig(**model_fields, attn_implementation="sdpa")).to(dtype)
    if config["checkpointing"]:
        model.gradient_checkpointing_enable()
    if config["lora"]:
        from peft import LoraConfig

        from fastdpo.model.adapters import wrap_with_adapter

        adapter = LoraConfig(r=LORA["r"], target_modules=LORA["target_modules"], lora_dropout=0.0)
        model = wrap_with_adapter(model, adapter, gradient_checkpointing=config["checkpointing"])
    model.train()
    reference = None
    if config["reference"] == "separate":
        reference = copy.deepcopy(model).requires_grad_(False).eval()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-6, fused=True)
    return model, reference, optimizer


def _steps(config: dict, model, reference, optimizer, batch, steps: int) -> None:
    import torch

    from fastdpo.model.lean import use_lean_layers
    from fastdpo.ops import LossConfig

    loss_config = LossConfig(loss_type="sigmoid", beta=0.1)
    cached = -100.0 - torch.rand(batch.num_pairs, 2)
    for _ in range(steps):
        with use_lean_layers([model] if config.get("lean") else []):
            _step(config, model, reference, optimizer, batch, loss_config, cached)


def _step(config: dict, model, reference, optimizer, batch, loss_config, cached) -> None:
    import torch

    from fastdpo.model.adapters import adapter_reference
    from fastdpo.train.step import preference_step, reference_logps

    if config["reference"] == "separate":
        ref_logps = reference_logps(reference, batch)
    elif config["reference"] == "adapter":
        with adapter_reference(model):
            ref_logps = reference_logps(model, batch)
    else:
        ref_logps = cached
    out = preference_step(model, batch, loss_config, ref_logps=ref_logps, token_metrics=True)
    out.loss.backward()
    del out
    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def _mlp_blocks(config: dict):
    """The lean MLP's block size of ``config`` (its ``mlp_block`` elements; None: the default) for the duration."""
    from fastdpo.model import lean

    default = lean.MLP_CHUNK_ELEMENTS
    lean.MLP_CHUNK_ELEMENTS = config.get("mlp_block") or default
    try:
        yield
    finally:
        lean.MLP_CHUNK_ELEMENTS = default


def _worker(config: dict, steps: int, threads: int) -> dict:
    import torch

    from fastdpo.profiling import peak_rss, reset_peak_rss

    torch.set_num_threads(threads)
    warm = dict(config, tokens=2 * config["row"])
    model, reference, optimizer = _build(warm, WARMUP)
    _steps(warm, model, reference, optimizer, batch_of(warm, WARMUP["vocab_size"]), 1)
    del model, reference, optimizer
    batch = batch_of(config, config["model"]["vocab_size"])
    base = reset_peak_rss()
    model, reference, optimizer = _build(config, config["model"])
    setup = reset_peak_rss() - base
    start = time.perf_counter()
    with _mlp_blocks(config):
        _steps(config, model, reference, optimizer, batch, steps)
    seconds = time.perf_counter() - start
    weights = sum(p.nbytes for m in (model, reference) if m is not None for p in m.parameters())
    return {"peak_bytes": peak_rss() - base, "setup_bytes": setup, "weight_bytes": weights, "seconds": seconds,
            "tokens": batch.input_ids.numel(), "pair_tokens": pair_tokens(batch)}  # fmt: skip


def estimate(config: dict, pair_tokens: int):
    from fastdpo.memory import estimate_memory

    with _mlp_blocks(config):
        return estimate_memory(config["model"], config["tokens"], lora=LORA if config["lora"] else None,
                               reference=config["reference"], precision=config["precision"],
                               gradient_checkpointing=config["checkpointing"], max_length=config["row"],
                               pair_tokens=pair_tokens, device="cpu",
                               lean_activations=config.get("lean", False))  # fmt: skip


def measure(config: dict, *, steps: int = 2, threads: int = 2) -> dict:
    """Run ``config`` in a fresh process; its measurement with the estimate beside it."""
    from fastdpo.profiling import run_measured

    command = [sys.executable, "-m", "bench.memory_cpu", "--worker", json.dumps(config), "--steps", str(steps),
               "--threads", str(threads)]  # fmt: skip
    result = run_measured(command, env={"OMP_NUM_THREADS": str(threads)}, cwd=Path(__file__).parents[1])
    predicted = estimate(config, result["pair_tokens"])
    parts = {name: getattr(predicted, name) for name in ("weights", "reference", "gradients", "optimizer",
                                                          "activations", "head", "temporaries")}  # fmt: skip
    return {**config, **result, "estimate_bytes": predicted.total, "estimate_phase": predicted.phase,
            "estimate_parts": parts}  # fmt: skip


def _table(results: list[dict], meta: dict) -> str:
    mib = 2**20
    lines = [
        f"Peak memory of DPO steps on CPU, measured (whole-process peak RSS above the RSS before the models were "
        f"built) against `fastdpo.estimate_memory(..., device='cpu')`. {meta['steps']} steps each, "
        f"{meta['threads']} threads; {meta['cpu']}; torch {meta['versions']['torch']}, transformers "
        f"{meta['versions']['transformers']}, peft {meta['versions']['peft']}; {meta['date']}.",
        "",
        "S: Llama H=256, 2 layers, I=688, 4 heads / 2 kv, V=32000; M: H=512, 4 layers, I=1376, 8 / 4, V=32000; "
        "W: H=256, 2 layers, I=1024, 4 / 2, V=4096 (a small head, so that the decoder layers set the peak); "
        "T: H=128, 2 layers, I=8192, 4 / 2, V=4096 (an MLP wider than the rest, so that its backward sets the peak). "
        "sdpa, rows of 512 tokens; LoRA r=16 on every linear layer of the decoder layers; 'lean': "
        "`lean_activations` (`fastdpo.model.lean`), whose MLP backward runs on blocks of 4096 tokens at I=8192 "
        "('one block': on all tokens at once, as lean_activations first did).",
        "",
        "| config | tokens | measured MiB | estimate MiB | estimate / measured | beyond weights: measured | "
        "estimate | ratio | peak phase (estimate) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        weights = r["weight_bytes"]
        beyond = (r["peak_bytes"] - weights, r["estimate_bytes"] - weights)
        lines.append(
            f"| {r['name']} | {r['tokens']} | {r['peak_bytes'] / mib:.0f} | {r['estimate_bytes'] / mib:.0f} | "
            f"{r['estimate_bytes'] / r['peak_bytes']:.2f} | {beyond[0] / mib:.0f} | {beyond[1] / mib:.0f} | "
            f"{beyond[1] / beyond[0]:.2f} | {r['estimate_phase']} |"
        )
    ratios = [r["estimate_bytes"] / r["peak_bytes"] for r in results]
    lines += ["", f"estimate / measured: {min(ratios):.2f} to {max(ratios):.2f} over {len(results)} configurations. "
              "'Beyond weights' subtracts the weights of the policy and reference models (their exact bytes), so "
              "the ratio there is over what the step itself adds: gradients, optimizer state, activations, head "
              "and temporaries.",
              "",
              "Where the estimate is high: it takes a head chunk to be as large as `chunk_bytes` allows (524 rows at "
              "V=32000), the worst case over pair lengths; these batches' pairs have 384 completion tokens each, so "
              "their chunks hold one pair, 384 rows, and three chunks live at once about 50 MiB less."]  # fmt: skip
    return "\n".join(lines) + "\n"


TABLE_OPTIONS = [
    ("full", "separate", {}),
    ("full", "separate, ref_offload", {"ref_offload": True}),
    ("full + activation_offloading", "separate, ref_offload", {"ref_offload": True, "activation_offloading": True}),
    ("full + lean_activations", "separate, ref_offload", {"ref_offload": True, "lean_activations": True}),
    ("full", "cached", {"reference": "cached"}),
    ("LoRA r=16", "adapter", {"lora": LORA, "reference": "adapter"}),
    ("QLoRA r=16 (4-bit NF4)", "adapter", {"lora": LORA, "reference": "adapter", "quantization": "4bit"}),
]
TABLE_MODELS = {"llama-3.2-1b": "Llama-3.2-1B", "llama-3-8b": "Llama-3-8B", "qwen2.5-7b": "Qwen2.5-7B"}
TABLE_TOKENS = (8192, 16384)
TABLE_GIB = (24, 48, 80)


def estimates_table() -> str:
    """What fits where: the estimate for the three presets, options, and batch sizes; markdown."""
    from fastdpo.memory import estimate_memory

    lines = [
        "Estimated peak memory of a fastdpo DPO step (`fastdpo.estimate_memory`, defaults unless stated) and the "
        "GPUs it fits: the batch sizes (tokens per micro-batch) whose peak is at most 90% of the card.",
        "",
        "| model | training | reference | checkpointing | GiB at 8k tokens | GiB at 16k tokens | 24 GB | 48 GB "
        "| 80 GB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for preset, model in TABLE_MODELS.items():
        for training, reference, options in TABLE_OPTIONS:
            for checkpointing in (True, False):
                estimates = [estimate_memory(preset, tokens, gradient_checkpointing=checkpointing, **options)
                             for tokens in TABLE_TOKENS]  # fmt: skip
                fits = [", ".join(f"{t // 1024}k" for t, e in zip(TABLE_TOKENS, estimates, strict=True)
                                  if e.fits(gib)) or "no" for gib in TABLE_GIB]  # fmt: skip
                sizes = [f"{e.total / 2**30:.1f}" for e in estimates]
                lines.append(f"| {model} | {training} | {reference} | {'on' if checkpointing else 'off'} | "
                             f"{' | '.join(sizes)} | {' | '.join(fits)} |")  # fmt: skip
    example = estimate_memory("llama-3-8b", 16384, lora=LORA, reference="adapter")
    lines += [
        "",
        "Assumptions: one GPU, no sharding; the model loaded in bf16 (weights, gradients, activations, and AdamW's two "
        "states per trainable parameter in bf16, as `torch.optim.AdamW` keeps them in the parameter's dtype; fp32 "
        "master weights are not modeled); DPOTrainer's defaults: sdpa attention on packed rows as long as the "
        "longest sequence, at most `max_length=1024` (the block mask and k/v repeated to every head are counted), "
        "TRL's token metrics on, the fused head's 1 GiB chunks of fp32 logits (its default for half precision on a "
        "GPU); a chunk holds whole pairs, and the largest pair is taken as 2048 completion tokens (the worst case; "
        "shorter completions make the head smaller); the reference's head is the same chunked path. LoRA: rank 16 "
        "on every linear layer of the decoder layers, adapters in fp32 (PEFT's default), run under autocast; QLoRA: "
        "the same adapters in bf16 (as TRL and fastdpo set them up) on the decoder layers' linear weights in "
        "bitsandbytes' 4-bit NF4 (half a byte per weight and a fp32 absmax per 64; the storage checked byte for byte "
        "against bitsandbytes' on a CPU, and the activations against what autograd saves there). ref_offload: the "
        "reference's weights on the GPU only for its pass; activation_offloading: the body's saved activations in "
        "host memory, one layer's back for its backward (host RAM must hold them); lean_activations: the RMSNorms "
        "keep only their inputs and the MLPs gate and up. 'Fits' leaves 10% of the card for the CUDA context, cuBLAS "
        "workspaces and the caching allocator's fragmentation: an allowance, not a measurement. These sizes were not "
        "measured on a GPU; the same counting is within bench/results/AMD_EPYC_2cpu/memory_cpu.md's ratios of "
        "measured CPU peaks, and within 0.96–1.03x of the peaks of a 1.24B Llama's full DPO steps on an H200 at 1.8k "
        "to 59k tokens (bench/results/NVIDIA_H200/README.md).",
        "",
        "Where the memory goes, Llama-3-8B, LoRA r=16, adapter reference, checkpointing, 16k tokens (GiB):",
        "",
        example.table(),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", help="configuration names to run (default: all)")
    parser.add_argument("--estimates", action="store_true", help="only write memory_estimates.md (no measuring)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="folder (default: bench/results/<cpu>; --estimates: bench/results)")
    parser.add_argument("--render", type=Path, metavar="DIR", help="only draw DIR/memory_cpu.png from its json")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker), args.steps, args.threads)))
        return
    if args.render:
        stored = json.loads((args.render / "memory_cpu.json").read_text())
        _plot(stored["results"], stored["meta"], args.render / "memory_cpu.png")
        return
    from bench.machine import RESULTS, cpu_results, environment, pin
    from fastdpo.atomic import atomic_write

    if args.estimates:  # formulas: no machine's
        args.out = args.out or RESULTS
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out / "memory_estimates.md", estimates_table())
        print(estimates_table())
        return
    pin(args.threads)  # the workers inherit the affinity
    args.out = args.out or cpu_results()
    results = []
    for config in CONFIGS:
        if args.only and config["name"] not in args.only:
            continue
        print(f"running {config['name']} ...", file=sys.stderr, flush=True)
        results.append(measure(config, steps=args.steps, threads=args.threads))
    meta = {**environment(args.threads, ("torch", "transformers", "peft", "fastdpo")), "steps": args.steps}
    text = _table(results, meta)
    if not args.only:
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write(args.out / "memory_cpu.json", json.dumps({"meta": meta, "results": results}, indent=1))
        atomic_write(args.out / "memory_cpu.md", text)
        _plot(results, meta, args.out / "memory_cpu.png")
    print(text)


def _plot(results: list[dict], meta: dict, path: Path) -> None:
    """Measured peak, estimate and their ratio per configuration."""
    from bench.plots import bar_panels

    names = [r["name"] for r in results]
    measured = [r["peak_bytes"] / 2**20 for r in results]
    estimated = [r["estimate_bytes"] / 2**20 for r in results]
    title = (f"Peak memory of DPO steps on {meta['cpu']} ({meta['threads']} threads): measured peak RSS against "
             "fastdpo.estimate_memory")  # fmt: skip
    bar_panels(path, title, [
        {"title": "measured", "labels": names, "values": measured, "unit": "peak RSS above the start, MiB"},
        {"title": "estimated", "labels": names, "values": estimated, "unit": "estimate, MiB", "color": "tab:orange"},
        {"title": "estimate / measured", "labels": names, "values": [e / m for e, m in zip(estimated, measured,
         strict=True)], "unit": "ratio (dashed: 1)", "color": "tab:green", "reference": 1.0},
    ], columns=3, label_width=4.2)  # fmt: skip


if __name__ == "__main__":
    main()
