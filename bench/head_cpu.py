"""Head op fwd+bwd on CPU: fastdpo's chunked torch path against full logits, TRL, Liger and the bare GEMMs.

    python -m bench.head_cpu [--tokens 8192] [--hidden 256] [--vocab 32000] [--repeats 3] [--threads 2]

Every variant runs in its own process (threads pinned, one warm-up call not timed, then the median of
``--repeats`` timed calls) so its peak RSS is measured from a baseline taken after setup and warm-up; "extra"
memory excludes the inputs, the outputs and the gradients, which every variant must hold. All targets are
valid tokens (nothing to skip), fp32 throughout. Results go to bench/results/<cpu>/head_cpu.{json,csv,md,png}
(bench/machine.py names the folder).
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.machine import cpu_results, environment, pin
from bench.plots import bar_panels
from fastdpo.atomic import atomic_open, atomic_write
from fastdpo.profiling import peak_rss, reset_peak_rss, run_measured

VARIANTS = {
    "full_logits": "full logits: h@W.T, log_softmax, gather (fastdpo impl='naive')",
    "fastdpo_torch": "fastdpo linear_logprobs impl='torch' (64 MiB chunks)",
    "trl_chunked": "TRL 1.16 ChunkedLogProbFunction (its fused_lm_head path; on CPU its tiles fold in torch ops)",
    "liger_dpo": "Liger 0.8.5 LigerFusedLinearDPOLoss (compiled, no reference)",
    "liger_dpo_eager": "Liger 0.8.5 LigerFusedLinearDPOLoss (compiled=False, no reference)",
    "fastdpo_liger_api": "fastdpo FusedLinearDPOLoss (Liger's call, no reference)",
    "fastdpo_fused_pair": "fastdpo fused_pair_loss, sigmoid DPO, reference log-probs given (3 GEMMs)",
    "cce_torch_compile": "cut-cross-entropy 25.1.1 impl='torch_compile' (its CPU path: full logits, compiled; its "
    "'cce' kernels need a GPU)",
    "gemms_3": "bare GEMMs: h@W.T, dz@W, dz.T@h at full size (3 GEMMs)",
}


def _inputs(n: int, h: int, v: int):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=gen).requires_grad_()
    weight = (torch.randn(v, h, generator=gen) * h**-0.5).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    upstream = torch.randn(n, generator=gen)
    return hidden, weight, targets, upstream


def _variant(name: str, hidden, weight, targets, upstream):
    """A closure running one fwd+bwd, returning the tensors it keeps (outputs and gradients)."""
    if name == "full_logits" or name == "fastdpo_torch":
        from fastdpo.ops import linear_logprobs

        impl = "naive" if name == "full_logits" else "torch"

        def run():
            logp = linear_logprobs(hidden, weight, targets, impl=impl).logp
            (logp * upstream).sum().backward()
            return [logp]

    elif name == "trl_chunked":
        from trl.kernels import ChunkedLogProbFunction
        from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

        def run():
            logp = ChunkedLogProbFunction.apply(
                hidden, weight, None, targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ()
            )[0]
            (logp * upstream).sum().backward()
            return [logp]

    elif name in ("liger_dpo", "liger_dpo_eager", "fastdpo_liger_api"):
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

        from fastdpo.ops import FusedLinearDPOLoss

        if name == "fastdpo_liger_api":
            loss_fn = FusedLinearDPOLoss(use_ref_model=False)
        else:
            loss_fn = LigerFusedLinearDPOLoss(use_ref_model=False, compiled=name == "liger_dpo")
        seq = 256
        rows = hidden.shape[0] // seq  # [chosen; rejected] rows of 256 tokens; one pair per chunk (Liger's default)

        def run():
            out = loss_fn(weight, hidden.view(rows, seq, -1), targets.view(rows, seq))
            out[0].backward()
            return [out[0]]

    elif name == "fastdpo_fused_pair":
        from fastdpo.ops import LossConfig
        from fastdpo.ops.fused_pair_loss import fused_pair_loss

        seq = 256  # the same layout as liger_dpo: rows of 256 tokens, chosen rows first, then rejected
        rows = hidden.shape[0] // seq
        device = hidden.device
        cu_seqlens = torch.arange(0, rows * seq + 1, seq, dtype=torch.int32, device=device)
        seq_pair = torch.arange(rows, device=device) % (rows // 2)
        seq_is_chosen = torch.arange(rows, device=device) < rows // 2
        ref = torch.zeros(rows // 2, device=device)
        config = LossConfig(loss_type="sigmoid", beta=0.1)

        def run():
            out = fused_pair_loss(hidden, weight, targets, cu_seqlens, seq_pair, seq_is_chosen, config,
                                  ref_chosen=ref, ref_rejected=ref)  # fmt: skip
            out.loss.backward()
            return [out.loss]

    elif name == "cce_torch_compile":
        from cut_cross_entropy import linear_cross_entropy

        def run():  # its per-token cross-entropy is -log p of the target: the same output and gradient
            logp = -linear_cross_entropy(hidden, weight, targets, reduction="none", impl="torch_compile")
            (logp * upstream).sum().backward()
            return [logp]

    elif name == "gemms_3":

        def run():
            with torch.no_grad():
                z = hidden @ weight.T
                grad_hidden = z @ weight
                grad_weight = z.T @ hidden
            return [grad_hidden, grad_weight]

    else:
        raise ValueError(f"unknown variant {name!r}")
    return run


def _worker(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    if args.memory_limit:  # an allocation past it fails in this process (recorded), not the machine's OOM killer
        resource.setrlimit(resource.RLIMIT_AS, (args.memory_limit, args.memory_limit))
    hidden, weight, targets, upstream = _inputs(args.tokens, args.hidden, args.vocab)
    run = _variant(args.worker, hidden, weight, targets, upstream)
    start = time.perf_counter()
    run()  # warm-up: lazy init, and torch.compile for Liger; reported, not counted
    first_call = time.perf_counter() - start
    times, extras = [], []
    for _ in range(args.repeats):
        hidden.grad = weight.grad = None
        base = reset_peak_rss()
        start = time.perf_counter()
        kept = run()
        times.append(time.perf_counter() - start)
        kept += [t for t in (hidden.grad, weight.grad) if t is not None]
        extras.append(peak_rss() - base - sum(t.nbytes for t in kept))
        del kept
    return {"variant": args.worker, "times": times, "first_call_s": first_call, "extra_bytes": max(extras)}


def _run_all(args: argparse.Namespace) -> list[dict]:
    results, limit = [], memory_limit(args.memory_limit_gib)
    for name in args.variants:
        command = [sys.executable, "-m", "bench.head_cpu", "--worker", name]
        command += ["--tokens", str(args.tokens), "--hidden", str(args.hidden), "--vocab", str(args.vocab)]
        command += ["--repeats", str(args.repeats), "--threads", str(args.threads)]
        command += ["--memory-limit", str(limit)]
        print(f"running {name} (N={args.tokens}, V={args.vocab}) ...", file=sys.stderr, flush=True)
        try:
            env = {"OMP_NUM_THREADS": str(args.threads)}
            results.append(run_measured(command, env=env, cwd=Path(__file__).parents[1], timeout=args.timeout))
        except RuntimeError as error:
            last = str(error).strip().splitlines()[-1]
            if any(sign in last for sign in ("allocate memory", "not enough memory", "MemoryError")):
                last = f"out of memory (limit {limit / 2**30:.1f} GiB): {last}"
            results.append({"variant": name, "error": last[:300]})
        except subprocess.TimeoutExpired:
            results.append({"variant": name, "error": f"timed out after {args.timeout:.0f} s"})
    return results


def memory_limit(gib: float | None) -> int:
    """Bytes of address space a worker may take: ``gib``, or 80% of the machine's memory (``/proc/meminfo``)."""
    if gib:
        return int(gib * 2**30)
    with open("/proc/meminfo") as info:
        total_kib = next(int(line.split()[1]) for line in info if line.startswith("MemTotal:"))
    return int(0.8 * total_kib * 1024)


def _table(results: list[dict], meta: dict) -> str:
    base = next((r for r in results if r["variant"] == "full_logits" and "times" in r), None)
    lines = [
        f"Head op fwd+bwd, N={meta['tokens']} H={meta['hidden']} V={meta['vocab']} fp32, all targets valid; "
        f"{meta['cpu']}, {meta['threads']} threads; torch {meta['versions']['torch']}, trl "
        f"{meta['versions']['trl']}, liger-kernel {meta['versions']['liger-kernel']}, cut-cross-entropy "
        f"{meta['versions'].get('cut-cross-entropy', '?')}; median of {meta['repeats']} (min–max), after one warm-up "
        f"call (first call s: that call, compiling included); {meta.get('date', 'undated')}.",
        "",
        "| variant | time s (min–max) | vs full logits | extra peak MiB | first call s |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if "times" not in r:
            lines.append(f"| {VARIANTS[r['variant']]} | failed: {r['error']} | | | |")
            continue
        median = statistics.median(r["times"])
        ratio = f"{median / statistics.median(base['times']):.2f}x" if base else "n/a"
        lines.append(
            f"| {VARIANTS[r['variant']]} | {median:.2f} ({min(r['times']):.2f}–{max(r['times']):.2f}) | {ratio} "
            f"| {r['extra_bytes'] / 2**20:.0f} | {r['first_call_s']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def _plot(results: list[dict], meta: dict, path: Path) -> None:
    done = [r for r in results if "times" in r]
    names = [r["variant"] for r in done]
    title = (f"Head op fwd+bwd, N={meta['tokens']} H={meta['hidden']} V={meta['vocab']} fp32, {meta['cpu']}, "
             f"{meta['threads']} threads, median of {meta['repeats']}")  # fmt: skip
    bar_panels(path, title, [
        {"title": "time", "labels": names, "values": [statistics.median(r["times"]) for r in done],
         "errors": [(min(r["times"]), max(r["times"])) for r in done], "unit": "seconds, median (min–max)"},
        {"title": "memory", "labels": names, "values": [r["extra_bytes"] / 2**20 for r in done],
         "unit": "extra peak RSS, MiB", "color": "tab:orange"},
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.head_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--out", type=Path, help="folder for head_cpu.{json,csv,md,png} (default: bench/results/<cpu>)")
    parser.add_argument("--memory-limit-gib", type=float, help="address space per variant (default: 80%% of RAM)")
    parser.add_argument("--timeout", type=float, help="seconds per variant, warm-up and repeats included")
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--memory-limit", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    pin(args.threads)  # the workers inherit the affinity
    args.out = args.out or cpu_results()
    results = _run_all(args)
    meta = {"tokens": args.tokens, "hidden": args.hidden, "vocab": args.vocab, "repeats": args.repeats,
            **environment(args.threads)}  # fmt: skip
    table = _table(results, meta)
    atomic_write(args.out / "head_cpu.json", json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    with atomic_open(args.out / "head_cpu.csv") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "median_s", "min_s", "max_s", "extra_peak_mib", "first_call_s"])
        for r in results:
            if "times" in r:
                writer.writerow([
                    r["variant"], f"{statistics.median(r['times']):.4f}", f"{min(r['times']):.4f}",
                    f"{max(r['times']):.4f}", f"{r['extra_bytes'] / 2**20:.1f}", f"{r['first_call_s']:.2f}",
                ])  # fmt: skip
    atomic_write(args.out / "head_cpu.md", table)
    _plot(results, meta, args.out / "head_cpu.png")
    print(table)


if __name__ == "__main__":
    main()
