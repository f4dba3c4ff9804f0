"""Head op fwd+bwd on a CUDA GPU: fastdpo's Triton kernels against full logits, TRL, Liger FLCE and CCE.

    python -m bench.head_gpu [--tokens 2048 8192 32768] [--hidden 2048 4096] [--vocab 32000 128256]
                             [--dtype bf16] [--repeats 10] [--out bench/results/<device>]

For every shape, each variant runs one fwd+bwd (loss = Σ upstream·logp, or the summed cross-entropy for the
tools that only offer a loss) after warm-up calls that are not timed (they include Triton compilation and
torch.compile, reported as ``first_call_s``); the time is the median of ``--repeats`` calls timed with CUDA
events (min and max kept). Peak memory is ``max_memory_allocated`` above a baseline taken after setup, minus the
gradients every variant must return. The yardstick is the 4 GEMMs of forward + recompute + backward
(h@W.T twice, dz@W, dz.T@h) through cuBLAS on the same device, 8·N·H·V FLOPs: ``vs GEMMs`` is the variant's time
over theirs, and TFLOP/s counts those 8·N·H·V FLOPs for every variant. Logits are scaled to a standard deviation
of ``--logit-std`` so that the softmax is peaked, as in a trained model, which is what gradient filtering
exploits. Results: ``<out>/head_gpu.{json,csv,md,png}`` with the device, driver and library versions (``--render DIR``
draws a stored run's png from its json).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import itertools
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from bench.machine import RESULTS, folder_name, run_record, versions
from bench.plots import bar_panels, timing_panel
from fastdpo.atomic import atomic_open, atomic_write

VARIANTS = {
    "gemms_4": "cuBLAS GEMMs: h@W.T twice, dz@W, dz.T@h (the yardstick)",
    "fastdpo_triton": "fastdpo impl='triton' (atomic backward)",
    "fastdpo_triton_det": "fastdpo impl='triton', deterministic=True",
    "fastdpo_triton_filter": "fastdpo impl='triton', grad_filter_eps=finfo(dtype).eps/32 (CCE's default)",
    "fastdpo_torch": "fastdpo impl='torch' (chunked: cuBLAS products, Triton epilogue kernels)",
    "fastdpo_torch_ops": "fastdpo impl='torch' with torch element-wise ops between the products (no epilogue)",
    "full_logits": "full logits (fastdpo impl='naive')",
    "trl_chunked": "TRL 1.16 ChunkedLogProbFunction",
    "liger_flce": "Liger 0.8.5 LigerFusedLinearCrossEntropyLoss (sum)",
    "cce_nofilter": "cut-cross-entropy 25.1.1 cce, filter_eps=None",
    "cce_default": "cut-cross-entropy 25.1.1 cce, filter_eps default ('high')",
    "liger_dpo": "Liger 0.8.5 LigerFusedLinearDPOLoss (compiled, no reference; rows of 256)",
    "fastdpo_fused_pair": "fastdpo fused_pair_loss, sigmoid DPO, reference given (3 GEMMs; rows of 256)",
    # DPOTrainer on a model loaded in fp32 with bf16=True: the same inputs upcast to fp32, run under bf16 autocast
    # (the fp32 leaves' gradients from the warm-up are in the baseline, as the other rows' are: their extra memory is
    # the step's own)
    "fastdpo_fused_pair_fp32_autocast": "fastdpo fused_pair_loss as above, fp32 h and W under bf16 autocast",
    "trl_chunked_fp32_autocast": "TRL 1.16 ChunkedLogProbFunction, fp32 h and W under bf16 autocast",
}


def _inputs(n: int, h: int, v: int, dtype: torch.dtype, logit_std: float):
    gen = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(n, h, generator=gen, device="cuda").to(dtype).requires_grad_()
    weight = (torch.randn(v, h, generator=gen, device="cuda") * (logit_std / h**0.5)).to(dtype).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen, device="cuda")
    upstream = torch.randn(n, generator=gen, device="cuda")
    return hidden, weight, targets, upstream


def _variant(name: str, hidden, weight, targets, upstream):
    """A closure running one fwd+bwd."""
    if name.endswith("_fp32_autocast"):  # the variant on fp32 copies (leaves of their own), run under autocast
        leaves = [hidden.detach().float().requires_grad_(), weight.detach().float().requires_grad_()]
        inner = _variant(name.removesuffix("_fp32_autocast"), *leaves, targets, upstream)

        def run():
            for leaf in leaves:  # _measure clears the bf16 leaves' gradients; these are cleared here
                leaf.grad = None
            with torch.autocast(hidden.device.type, dtype=torch.bfloat16):
                inner()

    elif name in ("liger_dpo", "fastdpo_fused_pair"):  # the pair losses, as the CPU benchmark runs them
        from bench.head_cpu import _variant as pair_variant

        keep = pair_variant(name, hidden, weight, targets, upstream)

        def run():
            keep()

    elif name.startswith("fastdpo") or name == "full_logits":
        from fastdpo.ops import linear_logprobs

        kw = {
            "fastdpo_triton": {"impl": "triton"},
            "fastdpo_triton_det": {"impl": "triton", "deterministic": True},
            # CCE's default ("high"): finfo(dtype).eps / 32, i.e. 2^-12 for bf16, 2^-15 for fp16
            "fastdpo_triton_filter": {"impl": "triton", "grad_filter_eps": torch.finfo(hidden.dtype).eps / 32},
            "fastdpo_torch": {"impl": "torch"},
            "fastdpo_torch_ops": {"impl": "torch"},
            "full_logits": {"impl": "naive"},
        }[name]

        def run():
            if name != "fastdpo_torch_ops":
                (linear_logprobs(hidden, weight, targets, **kw).logp * upstream).sum().backward()
                return
            module = importlib.import_module("fastdpo.ops.linear_logprobs")  # the package's name is the function
            kernels = module._epilogue_kernels
            module._epilogue_kernels = lambda hidden: None  # the torch ops this change replaced, for an A/B
            try:
                (linear_logprobs(hidden, weight, targets, **kw).logp * upstream).sum().backward()
            finally:
                module._epilogue_kernels = kernels

    elif name == "trl_chunked":
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        def run():
            logp = ChunkedLogProbFunction.apply(
                hidden, weight, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ()
            )[0]
            (logp * upstream).sum().backward()

    elif name == "liger_flce":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss(reduction="sum")

        def run():
            loss_fn(weight, hidden, targets).backward()

    elif name.startswith("cce"):
        from cut_cross_entropy import linear_cross_entropy

        kw = {"filter_eps": None} if name == "cce_nofilter" else {}

        def run():
            linear_cross_entropy(hidden, weight, targets, reduction="sum", impl="cce", **kw).backward()

    elif name == "gemms_4":

        def run():
            with torch.no_grad():
                z = hidden @ weight.T
                z = hidden @ weight.T  # the recompute
                hidden_grad = z @ weight
                weight_grad = z.T @ hidden
            del hidden_grad, weight_grad

    else:
        raise ValueError(f"unknown variant {name!r}")
    return run


def _measure(run, hidden, weight, repeats: int) -> dict:
    def call():
        hidden.grad = weight.grad = None
        run()

    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    call()  # the first call: compilation, autotuning, cuBLAS handles
    stop.record()
    torch.cuda.synchronize()
    first_call_s = start.elapsed_time(stop) / 1e3
    for _ in range(2):  # further warm-up, not timed
        call()
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        hidden.grad = weight.grad = None
        start.record()
        run()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    grads = sum(t.nbytes for t in (hidden.grad, weight.grad) if t is not None)
    extra = torch.cuda.max_memory_allocated() - base - grads
    hidden.grad = weight.grad = None
    return {"times": times, "first_call_s": first_call_s, "extra_bytes": max(0, extra)}


def _versions() -> dict:
    found = versions("triton", "trl", "liger-kernel", "cut-cross-entropy", "transformers", "fastdpo")
    return {"python": found.pop("python"), "torch": torch.__version__, "cuda": torch.version.cuda, **found}


def _device() -> dict:
    props = torch.cuda.get_device_properties(0)
    try:
        driver = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
        ).stdout.strip()
    except OSError:
        driver = "unknown"
    return {"name": props.name, "sms": props.multi_processor_count, "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}", "driver": driver}  # fmt: skip


def run_shape(n: int, h: int, v: int, args: argparse.Namespace) -> list[dict]:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    hidden, weight, targets, upstream = _inputs(n, h, v, dtype, args.logit_std)
    rows = []
    for name in args.variants:
        print(f"N={n} H={h} V={v} {name} ...", file=sys.stderr, flush=True)
        row = {"tokens": n, "hidden": h, "vocab": v, "variant": name}
        try:
            row.update(_measure(_variant(name, hidden, weight, targets, upstream), hidden, weight, args.repeats))
        except Exception as error:  # a tool that cannot run a shape (memory, support) is reported, not fatal
            row["error"] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:200]}"
            hidden.grad = weight.grad = None
        torch.cuda.empty_cache()
        rows.append(row)
    return rows


def _table(results: list[dict], meta: dict) -> str:
    dev = meta["device"]
    lines = [
        f"Head op fwd+bwd on {dev['name']} (driver {dev['driver']}, CUDA {meta['versions']['cuda']}), "
        f"{meta['dtype']}, all targets valid, logit std {meta['logit_std']}; torch {meta['versions']['torch']}, "
        f"triton {meta['versions']['triton']}, trl {meta['versions']['trl']}, liger-kernel "
        f"{meta['versions']['liger-kernel']}, cut-cross-entropy {meta['versions']['cut-cross-entropy']}. "
        f"Median of {meta['repeats']} (min–max) ms after warm-up; TFLOP/s counts 8·N·H·V.",
        "",
        "| N | H | V | variant | ms (min–max) | vs GEMMs | TFLOP/s | extra peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (n, h, v), group in itertools.groupby(results, key=lambda r: (r["tokens"], r["hidden"], r["vocab"])):
        group = list(group)
        gemm = next((r for r in group if r["variant"] == "gemms_4" and "times" in r), None)
        for r in group:
            label = VARIANTS[r["variant"]]
            if "times" not in r:
                lines.append(f"| {n} | {h} | {v} | {label} | failed: {r['error']} | | | |")
                continue
            median = statistics.median(r["times"])
            ratio = f"{median / statistics.median(gemm['times']):.2f}x" if gemm else "n/a"
            tflops = 8 * n * h * v / median / 1e12
            lines.append(
                f"| {n} | {h} | {v} | {label} | {ms_cell(r['times'])} | {ratio} | {tflops:.0f} | "
                f"{r['extra_bytes'] / 2**20:.0f} |"
            )
    return "\n".join(lines) + "\n"


def ms_cell(times: list[float]) -> str:
    """A table cell of timings in seconds: the median and (min–max), in ms."""
    return f"{statistics.median(times) * 1e3:.2f} ({min(times) * 1e3:.2f}–{max(times) * 1e3:.2f})"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.head_gpu", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[2048, 8192, 32768])
    parser.add_argument("--hidden", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--logit-std", type=float, default=4.0)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=None, help="default: bench/results/<device name>")
    parser.add_argument("--render", type=Path, metavar="DIR", help="only draw DIR/head_gpu.png from its json")
    args = parser.parse_args(argv)
    if args.render:
        render(args.render)
        return
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (the CPU benchmark is python -m bench.head_cpu)")
    device = _device()
    out = args.out or RESULTS / folder_name(device["name"])
    out.mkdir(parents=True, exist_ok=True)
    meta = {"device": device, "versions": _versions(), "dtype": args.dtype, "logit_std": args.logit_std,
            "repeats": args.repeats, **run_record("bench.head_gpu")}  # fmt: skip
    results = []
    for n, h, v in itertools.product(args.tokens, args.hidden, args.vocab):
        results += run_shape(n, h, v, args)
        _write(out, results, meta)  # after every shape: a run cut short keeps what it measured
    print(_table(results, meta))


def _write(out: Path, results: list[dict], meta: dict) -> None:
    atomic_write(out / "head_gpu.json", json.dumps({"meta": meta, "results": results}, indent=1))
    with atomic_open(out / "head_gpu.csv") as handle:
        writer = csv.writer(handle)
        writer.writerow(["tokens", "hidden", "vocab", "variant", "median_s", "min_s", "max_s", "extra_bytes", "error"])
        for r in results:
            t = r.get("times")
            stats = [statistics.median(t), min(t), max(t)] if t else ["", "", ""]
            writer.writerow([r["tokens"], r["hidden"], r["vocab"], r["variant"], *stats, r.get("extra_bytes", ""),
                             r.get("error", "")])  # fmt: skip
    atomic_write(out / "head_gpu.md", _table(results, meta))
    _plot(results, meta, out / "head_gpu.png")


def _plot(results: list[dict], meta: dict, path: Path) -> None:
    """ms per variant, a panel per shape; the 4 GEMMs' time dashed."""
    groups = itertools.groupby(results, key=lambda r: (r["tokens"], r["hidden"], r["vocab"]))
    panels = [timing_panel(f"N={n} H={h} V={v}", list(rows), "gemms_4") for (n, h, v), rows in groups]
    if any(panels):
        dev = meta["device"]
        title = (f"Head op fwd+bwd on {dev['name']}, {meta['dtype']}, median of {meta['repeats']} "
                 "(dashed: the 4 GEMMs of forward, recompute and backward)")  # fmt: skip
        bar_panels(path, title, [p for p in panels if p], columns=4)


def render(folder: Path) -> None:
    """Draw ``head_gpu.png`` of a stored run from its ``head_gpu.json`` (no GPU needed; its csv and md, written by
    the run, stay as they are: their labels are the variants' of that run's code)."""
    stored = json.loads((folder / "head_gpu.json").read_text())
    _plot(stored["results"], stored["meta"], folder / "head_gpu.png")


if __name__ == "__main__":
    main()
