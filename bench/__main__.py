"""One entry point for the benchmarks: ``python -m bench run --suite cpu|gpu|all``, ``python -m bench list``.

Each benchmark runs as its own module (``python -m bench.<name>``, in a fresh process, writing its files under
bench/results/<device>/, named by bench/machine.py), one after another; a failing one is reported and the next still
runs. The GPU suite is ``bench/gpu.sh`` (tests, head op, end to end; see README "GPU"). Afterwards README.md's results
blocks are refreshed from the files (``python -m bench.report``). Timings mean something only on a quiet machine.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITES = {
    "cpu": {
        "head_cpu": "head op fwd+bwd against full logits, TRL's chunked path, Liger's DPO loss, cut-cross-entropy",
        "head_cpu_grid": "the head op's variants across N in {2k, 8k, 32k} tokens x V in {32k, 128k}, H=256",
        "dpo_cpu": "end-to-end DPO: TRL 1.16 (and with a precomputed reference), fastdpo, the drop-in; 3 rounds",
        "orpo_cpu": "end-to-end ORPO and SimPO: TRL 1.16's experimental trainers against the drop-ins; 3 rounds",
        "dpo_profile": "where the end-to-end step's time goes",
        "ref_cache_cpu": "cached reference against a separate one",
        "memory_cpu": "measured peaks against fastdpo.estimate_memory",
        "memory_estimates": "fastdpo.estimate_memory's table at published models' shapes (formulas, no measuring)",
        "data_cpu": "data check and tokenization rows/s",
        "packer": "the BFD packer, C++ against Python",
        "packing_cpu": "padding and attention work, packed against TRL's padding; a Llama body timed on both",
        "packing_cpu_widths": "the Llama body's timing at two widths (H=256, 1024)",
        "pack_rows_cpu": "pair rows against sequence rows on eager/sdpa",
        "rank_balance": "tokens of the busiest process with and without rank balancing",
        "quickstart_seeds": "the quickstart over seeds 0-2 against its targets",
        "memory_model": "the head op's memory per approach from formulas, against the measured peaks",
        "load_cpu": "200k pairs through check, tokenize and packing (peak RSS); RSS over 500 tiny training steps",
        "stream_cpu": "200k pairs trained on as a stream against loaded first: first batch, memory, cache on disk",
        "kl_estimate_cpu": "compare's KL estimate against the plain Monte-Carlo one: spread over seeds",
    },
    "gpu": {"gpu.sh": "gpu tests, head op (with cut-cross-entropy and Liger FLCE), end-to-end DPO, on a CUDA GPU"},
}


# entries run as a module with arguments: (module, arguments) (the others: bench.<name> with none)
COMMANDS = {
    "packing_cpu": ("packing_cpu", ["--model-timing"]),
    "packing_cpu_widths": ("packing_cpu", ["--model-timing", "--timing-hidden", "256", "1024", "--timing-layers", "2",
                                           "--timing-repeats", "1", "--pack-lengths", "2048", "4096",
                                           "--name", "packing_cpu_widths"]),
    "memory_estimates": ("memory_cpu", ["--estimates"]),
}  # fmt: skip


def _command(name: str) -> list[str]:
    if name.endswith(".sh"):
        return ["bash", str(ROOT / "bench" / name)]
    module, arguments = COMMANDS.get(name, (name, []))
    return [sys.executable, "-m", f"bench.{module}", *arguments]


def _names(suite: str) -> list[str]:
    """The benchmarks of ``suite`` (``all``: both)."""
    return [name for part in (("cpu", "gpu") if suite == "all" else (suite,)) for name in SUITES[part]]


def run(suite: str, only: list[str] | None = None) -> int:
    names = [n for n in _names(suite) if not only or n in only]
    failed = []
    for name in names:
        print(f"bench: {name} ...", flush=True)
        start = time.perf_counter()
        code = subprocess.call(_command(name), cwd=ROOT)
        print(f"bench: {name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
        if code:
            failed.append(name)
    subprocess.call([sys.executable, "-m", "bench.report"], cwd=ROOT)
    if failed:
        print(f"bench: failed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run", help="run a suite")
    run_parser.add_argument("--suite", choices=("cpu", "gpu", "all"), default="cpu")
    run_parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these (see: python -m bench list)")
    sub.add_parser("list", help="list the benchmarks of each suite")
    args = parser.parse_args(argv)
    if args.command == "list":
        width = max(len(name) for entries in SUITES.values() for name in entries)
        for suite, entries in SUITES.items():
            for name, what in entries.items():
                print(f"{suite:4} {name:{width}} {what}")
        return 0
    known = {n for entries in SUITES.values() for n in entries}
    if args.only and set(args.only) - known:
        parser.error(f"unknown benchmarks {sorted(set(args.only) - known)}; python -m bench list shows them")
    if args.only and set(args.only) - set(_names(args.suite)):  # (they ran nothing, and the exit said success)
        outside = sorted(set(args.only) - set(_names(args.suite)))
        theirs = {suite for suite, entries in SUITES.items() for n in args.only if n in entries}
        suite = theirs.pop() if len(theirs) == 1 else "all"  # (names of both suites: all)
        parser.error(f"{', '.join(outside)} not in the {args.suite} suite: add --suite {suite}")
    return run(args.suite, args.only)


if __name__ == "__main__":
    sys.exit(main())
