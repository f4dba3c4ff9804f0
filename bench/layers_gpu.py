"""One decoder layer's RMSNorm, gated MLP and RoPE, forward + backward, as transformers runs them and as
lean_activations.

    python -m bench.layers_gpu [--tokens 16384 59392] [--hidden 2048] [--intermediate 8192] [--repeats 10]
                               [--activation silu] [--norm llama]

Variants, each on the same bf16 inputs and modules (transformers' ``LlamaRMSNorm``, ``LlamaMLP`` and Llama's
``apply_rotary_pos_emb`` on q and k heads of 64, a quarter as many k heads as q heads, as Llama-3.2-1B has them;
the MLP's activation ``--activation``, a transformers name: ``silu``, or ``gelu_pytorch_tanh`` for Gemma's; the
norm ``--norm``: ``llama``, or ``gemma`` for Gemma 3's ``1 + w`` form):

- ``own``: the modules' own forwards under autograd;
- ``lean_torch``: ``fastdpo.model.lean`` with its GPU kernels switched off (torch's element-wise ops between the
  products, the MLP on blocks of tokens);
- ``lean``: ``fastdpo.model.lean`` as the trainers run it (on a GPU: ``fastdpo.kernels.rms_norm``,
  ``fastdpo.kernels.swiglu`` and ``fastdpo.kernels.rope``).

For each: the norm alone, the MLP alone and RoPE alone, forward + backward with gradients for the inputs and every
weight, and the norm and MLP forwards without gradients (what a reference pass runs). Median of ``repeats``
(min–max) after three warm-up calls, each timed between two device synchronizations; the extra peak is
``max_memory_allocated`` above the inputs, parameters and their gradients. Results: ``<out>/layers_gpu.{json,md,png}``
(default ``bench/results/<device>/``). ``--device cpu`` runs the same code on a CPU with no memory figure (a smoke
test: the kernels are GPU-only).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench.head_gpu import _device, _versions, ms_cell
from bench.machine import RESULTS, folder_name
from bench.plots import bar_panels, timing_panel
from fastdpo.atomic import atomic_write

VARIANTS = {
    "own": "transformers' modules (autograd)",
    "lean_torch": "lean_activations, torch element-wise ops",
    "lean": "lean_activations (GPU: Triton norm, gated-product and RoPE kernels)",
}
PARTS = ("norm", "mlp", "rope", "norm + mlp, no grad")
HEAD_DIM = 64


@contextlib.contextmanager
def _variant(name: str, modules):
    from fastdpo.model import lean

    if name == "own":
        yield
        return
    saved = lean.fused_norm_applies, lean._fused_swiglu, lean.fused_rope_applies
    if name == "lean_torch":
        lean.fused_norm_applies = lean._fused_swiglu = lean.fused_rope_applies = lambda *a: False
    try:
        with lean.use_lean_layers(modules):
            yield
    finally:
        lean.fused_norm_applies, lean._fused_swiglu, lean.fused_rope_applies = saved


def _call(part: str, layer: dict):
    from transformers.models.llama import modeling_llama

    if part == "norm":
        layer["norm"](layer["x"]).backward(layer["grad"])
    elif part == "mlp":
        layer["mlp"](layer["x"]).backward(layer["grad"])
    elif part == "rope":  # looked up as Llama's attention looks it up: where lean_activations replaces it
        heads = [t.view(1, t.shape[0], -1, HEAD_DIM).transpose(1, 2) for t in (layer["q"], layer["k"])]
        out = modeling_llama.apply_rotary_pos_emb(*heads, layer["cos"], layer["sin"])
        torch.autograd.backward(out, [layer["grad_q"], layer["grad_k"]])
    else:
        with torch.no_grad():
            layer["mlp"](layer["norm"](layer["x"]))


def _measure(part: str, layer: dict, repeats: int, device: torch.device) -> dict:
    norm, mlp = layer["norm"], layer["mlp"]
    params = [layer["x"], layer["q"], layer["k"], *norm.parameters(), *mlp.parameters()]
    trained = {"norm": [layer["x"], *norm.parameters()], "mlp": [layer["x"], *mlp.parameters()],
               "rope": [layer["q"], layer["k"]]}.get(part, [])  # what gets a gradient in this part  # fmt: skip

    def clear():
        for p in params:
            p.grad = None

    cuda = device.type == "cuda"
    for _ in range(3):  # warm-up: compilation, cuBLAS handles, the allocator's pools
        clear()
        _call(part, layer)
    clear()
    if cuda:
        torch.cuda.synchronize()
        gradients = sum(p.nbytes for p in trained)  # the gradients to come
        base = torch.cuda.memory_allocated() + gradients
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        clear()
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        _call(part, layer)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    extra = max(0, torch.cuda.max_memory_allocated() - base) if cuda else None
    clear()
    return {"times": times, "extra_bytes": extra}


def run_shape(n: int, h: int, i: int, args, device: torch.device) -> list[dict]:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaAttention, LlamaMLP, LlamaRMSNorm, LlamaRotaryEmbedding

    torch.manual_seed(0)
    heads = max(1, h // HEAD_DIM)
    config = LlamaConfig(hidden_size=h, intermediate_size=i, num_attention_heads=heads, head_dim=HEAD_DIM,
                         num_key_value_heads=max(1, heads // 4), hidden_act=args.activation)  # fmt: skip
    bf16 = {"device": device, "dtype": torch.bfloat16}
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    norm = Gemma3RMSNorm if args.norm == "gemma" else LlamaRMSNorm
    layer = {"norm": norm(h).to(**bf16), "mlp": LlamaMLP(config).to(**bf16),
             "attention": LlamaAttention(config, 0).to(**bf16), "x": torch.randn(n, h, **bf16, requires_grad=True),
             "grad": torch.randn(n, h, **bf16)}  # fmt: skip
    for name, count in (("q", heads), ("k", config.num_key_value_heads)):
        layer[name] = torch.randn(n, count * HEAD_DIM, **bf16, requires_grad=True)
        layer[f"grad_{name}"] = torch.randn(1, count, n, HEAD_DIM, **bf16)
    positions = torch.arange(n, device=device)[None] % 1024  # packed sequences of up to 1024 tokens
    rotary = LlamaRotaryEmbedding(config).to(device)
    layer["cos"], layer["sin"] = rotary(layer["x"][None], positions)
    rows = []
    for part in PARTS:
        for name in args.variants:
            print(f"N={n} H={h} I={i} {part} {name} ...", file=sys.stderr, flush=True)
            row = {"tokens": n, "hidden": h, "intermediate": i, "part": part, "variant": name}
            try:
                with _variant(name, [layer["norm"], layer["mlp"], layer["attention"]]):
                    row.update(_measure(part, layer, args.repeats, device))
            except Exception as error:  # reported, not fatal: the next variant still runs
                row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
            rows.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def _table(results: list[dict], meta: dict) -> str:
    dev = meta["device"]
    lines = [
        f"RMSNorm ({meta.get('norm', 'llama')} form), gated MLP ({meta.get('activation', 'silu')}) and RoPE (heads of "
        f"{HEAD_DIM}) of one decoder layer "
        f"on {dev['name']}, bf16, forward + "
        "backward (gradients of the inputs and every weight) and the norm and MLP forwards without gradients; torch "
        f"{meta['versions']['torch']}, triton "
        f"{meta['versions']['triton']}, transformers {meta['versions']['transformers']}. Median of {meta['repeats']} "
        "(min–max) ms after warm-up; extra peak: max_memory_allocated above inputs, parameters and gradients.",
        "",
        "| N | H | I | part | variant | ms (min–max) | vs own | extra peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    own = {(r["tokens"], r["part"]): r for r in results if r["variant"] == "own" and "times" in r}
    for r in results:
        head = f"| {r['tokens']} | {r['hidden']} | {r['intermediate']} | {r['part']} | {VARIANTS[r['variant']]} |"
        if "times" not in r:
            lines.append(f"{head} failed: {r['error']} | | |")
            continue
        median = statistics.median(r["times"])
        base = own.get((r["tokens"], r["part"]))
        ratio = f"{median / statistics.median(base['times']):.2f}x" if base else "n/a"
        memory = "n/a (CPU)" if r["extra_bytes"] is None else f"{r['extra_bytes'] / 2**20:.0f}"
        lines.append(f"{head} {ms_cell(r['times'])} | {ratio} | {memory} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.layers_gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[16384, 59392])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--activation", default="silu", help="the MLP's, by transformers' name (ACT2FN)")
    parser.add_argument("--norm", choices=("llama", "gemma"), default="llama", help="the RMSNorm's form")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/<device name>")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --device cpu for a smoke run)")
    info = _device() if device.type == "cuda" else {"name": "CPU", "driver": "n/a"}
    out = args.out or RESULTS / folder_name(info["name"])
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": info, "versions": _versions(), "repeats": args.repeats, "activation": args.activation,
            "norm": args.norm}  # fmt: skip
    results = []
    for n in args.tokens:
        results += run_shape(n, args.hidden, args.intermediate, args, device)
        atomic_write(out / "layers_gpu.json", json.dumps({"meta": meta, "results": results}, indent=1))
        atomic_write(out / "layers_gpu.md", _table(results, meta))
        _plot(results, meta, out / "layers_gpu.png")
    print(_table(results, meta))


def _plot(results: list[dict], meta: dict, path: Path) -> None:
    """ms per variant, a panel per token count and part (transformers' own dashed)."""
    groups = itertools.groupby(results, key=lambda r: (r["tokens"], r["part"]))
    panels = [timing_panel(f"N={n}: {part}", list(rows), "own") for (n, part), rows in groups]
    if any(panels):
        title = f"One decoder layer's parts on {meta['device']['name']}, bf16 (dashed: transformers' own)"
        bar_panels(path, title, [p for p in panels if p], columns=len(PARTS))


if __name__ == "__main__":
    main()
