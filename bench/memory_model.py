"""What the head op keeps, per approach, from formulas, against the measured extra peaks (bench/results).

    python -m bench.memory_model [--out bench/results]

N tokens, V vocabulary, H hidden, b bytes per input element (2 for bf16, 4 for fp32), E = N·V logits. "Extra" is
what the op holds beyond its inputs, outputs and the two gradients it returns (the benchmarks' measure). Formulas,
each read off the code (fastdpo's) or off the tool's design (marked "not derived" where we did not):

- full logits (``impl="naive"``): the logits in the input dtype (b·E), their fp32 copy (4E, absent when b = 4), the
  log-softmax kept for the backward (4E) and its gradient (4E): E·(b + 4·[b≠4] + 8).
- fastdpo ``impl="torch"``: one fp32 chunk of logits (C = 64 MiB, or 1 GiB for half inputs on a GPU); on a GPU with
  half inputs also the chunk's dz in the input dtype (C·b/4, written by the epilogue kernel) and the fp32
  weight-gradient accumulator (4VH, which the products add into), less the returned weight gradient (bVH) that the
  measure subtracts but that exists only after the accumulation. On a CPU with fp32 inputs the accumulator is the
  returned gradient.
- fastdpo ``fused_pair_loss`` (GPU, half inputs): the same per chunk of whole pairs (``rows`` = the pairs' tokens
  that fit C), and the gradient of the hidden states it forms in the forward (bNH) is not a returned gradient yet.
- fastdpo ``impl="triton"``: no logits; fp32 accumulators for dW (4VH) and dh (4NH), and the log-sum-exp (4N).
- cut-cross-entropy ``cce``: the log-sum-exp (4N) by design; its other buffers not derived.
- TRL's chunked path and Liger's fused cross-entropy: chunks of logits, sizes not derived here (measured only).

Results: ``<out>/memory_model.{md,json}``: the formulas at Llama-3-8B's head (H = 4096, V = 128256) and 8192 tokens
in bf16 next to the H200 measurement of that exact shape (bench/results/NVIDIA_H200/run3/head_gpu.json), and at the
CPU benchmark's shape (N = 8192, H = 256, V = 32000, fp32) next to bench/results/AMD_EPYC_2cpu/head_cpu.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench.machine import RESULTS
from fastdpo.atomic import atomic_write

MiB = 2**20
CPU_CHUNK, GPU_CHUNK = 64 * MiB, 2**30
PAIR_ROW = 256  # the benchmarks' pair loss: each sequence a row of 256 tokens (bench/head_cpu.py)
MEASURED_RUN = "run3"  # bench/results/NVIDIA_H200/<run>/head_gpu.json
CPU_MEASURED = "AMD_EPYC_2cpu"  # bench/results/<cpu>/head_cpu.json


def formulas(n: int, h: int, v: int, b: int, gpu: bool) -> dict[str, float | None]:
    """Extra bytes per approach (None: not derived)."""
    e = n * v
    half_gpu = gpu and b == 2
    chunk = GPU_CHUNK if half_gpu else CPU_CHUNK
    torch_extra = chunk + (chunk * b / 4 + 4 * v * h - b * v * h if half_gpu else 0)
    pair_rows = min(n, (GPU_CHUNK // (4 * v)) // PAIR_ROW * PAIR_ROW)  # whole pairs of PAIR_ROW-token rows
    pair_extra = 4 * pair_rows * v + b * pair_rows * v + 4 * v * h - b * v * h + b * n * h if half_gpu else None
    return {
        "full_logits": e * (b + 4 * (b != 4) + 8),
        "fastdpo_torch": torch_extra,
        "fastdpo_fused_pair": pair_extra,
        "fastdpo_triton": 4 * v * h + 4 * n * h + 4 * n if gpu else None,
        "cce": 4 * n if gpu else None,
        "trl_chunked": None,
        "liger_flce": None,
    }


MEASURED_NAMES = {"full_logits": "full_logits", "fastdpo_torch": "fastdpo_torch",
                  "fastdpo_fused_pair": "fastdpo_fused_pair", "fastdpo_triton": "fastdpo_triton",
                  "cce": "cce_nofilter", "trl_chunked": "trl_chunked", "liger_flce": "liger_flce"}  # fmt: skip
LABELS = {"full_logits": "full logits", "fastdpo_torch": "fastdpo impl='torch'",
          "fastdpo_fused_pair": "fastdpo fused_pair_loss", "fastdpo_triton":
          "fastdpo impl='triton'", "cce": "cut-cross-entropy cce", "trl_chunked": "TRL 1.16 chunked",
          "liger_flce": "Liger FLCE"}  # fmt: skip
KEPT = {"full_logits": "the [N, V] logits, fp32 copy, log-softmax and its gradient",
        "fastdpo_torch": "one fp32 chunk of logits; GPU: + its dz in bf16, fp32 dW accumulator",
        "fastdpo_fused_pair": "the same, per chunk of whole pairs",
        "fastdpo_triton": "no logits: fp32 dW and dh accumulators, LSE per token", "cce": "LSE per token",
        "trl_chunked": "chunks of logits (not derived)", "liger_flce": "chunks of logits (not derived)"}  # fmt: skip


def _measured(path: Path) -> dict[str, float]:
    data = json.loads(path.read_text())
    return {r["variant"]: r["extra_bytes"] for r in data["results"] if "extra_bytes" in r}


def _ratio(measured: float | None, formula: float | None) -> str:
    if measured is None or formula is None or formula < MiB:
        return ""
    return f"{measured / formula:.2f}"


def _cell(value: float | None) -> str:
    if value is None:
        return "not derived"
    return f"{value / MiB:,.0f}" if value >= MiB else f"{value / MiB:.2f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory_model", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    gpu_measured = _measured(RESULTS / "NVIDIA_H200" / MEASURED_RUN / "head_gpu.json")
    cpu_measured = _measured(RESULTS / CPU_MEASURED / "head_cpu.json")
    gpu = formulas(8192, 4096, 128256, 2, gpu=True)
    cpu = formulas(8192, 256, 32000, 4, gpu=False)
    lines = [
        "Extra memory of the head op (beyond inputs, outputs and gradients), MiB: formulas (bench/memory_model.py) "
        "against measured peaks. Llama-3-8B's head (H=4096, V=128256), 8192 tokens, bf16, measured on an H200 "
        f"(bench/results/NVIDIA_H200/{MEASURED_RUN}); and the CPU benchmark's shape (N=8192, H=256, V=32000, fp32, "
        f"bench/results/{CPU_MEASURED}/head_cpu.json). The CPU run has no Triton row, and its cut-cross-entropy row is "
        "its torch_compile path (compiled full logits), not the cce kernel counted here; Liger's CPU row is its DPO "
        "loss, another op.",
        "",
        "| approach | what it keeps | 8B head, 8k tokens: formula | measured (H200) | ratio | CPU shape: formula "
        "| measured (CPU) | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    rows = []
    for key, label in LABELS.items():
        g_meas, c_meas = gpu_measured.get(MEASURED_NAMES[key]), cpu_measured.get(MEASURED_NAMES[key])
        g_ratio, c_ratio = _ratio(g_meas, gpu[key]), _ratio(c_meas, cpu[key])
        g_cell, c_cell = ("" if m is None else _cell(m) for m in (g_meas, c_meas))
        cpu_formula = "GPU only" if key in ("fastdpo_triton", "cce") else _cell(cpu[key])
        lines.append(f"| {label} | {KEPT[key]} | {_cell(gpu[key])} | {g_cell} | {g_ratio} | {cpu_formula} | "
                     f"{c_cell} | {c_ratio} |")  # fmt: skip
        rows.append({"approach": key, "gpu_formula": gpu[key], "gpu_measured": g_meas, "cpu_formula": cpu[key],
                     "cpu_measured": c_meas})  # fmt: skip
    lines += ["", "Ratio = measured / formula (left out under 1 MiB, where allocator granularity dominates). Full "
              "logits: the CPU peak is the count (0.99x); the GPU peak, measured with impl='naive' before it "
              "dropped its passes by a scale and a temperature of 1.0 and its unused exp, a little less (0.92x). "
              "fastdpo impl='torch' on the GPU was measured before commit "
              "'linear_logprobs backward: free each chunk's dz': until then the previous chunk's dz (C·b/4 = 512 "
              "MiB) was still alive when the next one was written, so that code's formula is 512 MiB more (3,050, "
              "ratio 1.01); the fix is counted and tested (no earlier chunk alive when a product is formed: "
              "tests/test_head_epilogue.py), not yet measured on a GPU. fused_pair_loss already freed it."]  # fmt: skip
    text = "\n".join(lines) + "\n"
    atomic_write(args.out / "memory_model.json", json.dumps(rows, indent=1))
    atomic_write(args.out / "memory_model.md", text)
    print(text)


if __name__ == "__main__":
    main()
