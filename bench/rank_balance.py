"""Tokens per process per step, with and without ``balance_ranks`` (``RankBalancedBatchSampler``).

    python -m bench.rank_balance [--pairs 20000] [--seed 1] [--out bench/results]

A step of DDP waits for its busiest process, so the measure is the busiest process's tokens over the mean of the
step's processes, averaged over the steps of one epoch. Pair lengths (prompt + chosen + prompt + rejected tokens)
are drawn from a lognormal (median ≈ 545 tokens, capped at 4096), a shape typical of chat preference data; the
sampler order is torch's seeded ``RandomSampler``, as the Trainer's. Without balancing, process ``r`` takes the
``r``-th of every ``world_size`` consecutive batches (accelerate's sharding). Counting only: no model runs,
nothing depends on the machine. Results: bench/results/rank_balance.{json,md} (no machine's folder).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
from pathlib import Path

import torch
from torch.utils.data import BatchSampler, RandomSampler

from bench.machine import RESULTS, environment
from fastdpo.atomic import atomic_write
from fastdpo.data.sampler import RankBalancedBatchSampler

SETUPS = [(2, 4), (8, 4), (8, 8), (8, 16)]  # (processes, pairs per process per step)


def busiest_over_mean(batches: list[list[int]], lengths: list[int], world_size: int) -> float:
    ratios = []
    for start in range(0, len(batches) - world_size + 1, world_size):
        tokens = [sum(lengths[i] for i in batch) for batch in batches[start : start + world_size]]
        ratios.append(max(tokens) / (sum(tokens) / world_size))
    return statistics.mean(ratios)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.rank_balance", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for rank_balance.{json,md}")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    lengths = [min(4096, int(rng.lognormvariate(6.3, 0.7))) for _ in range(args.pairs)]
    rows = []
    for world_size, batch_size in SETUPS:
        orders = {}
        for name in ("plain", "balanced"):
            sampler = RandomSampler(range(len(lengths)), generator=torch.Generator().manual_seed(0))
            if name == "plain":
                orders[name] = list(BatchSampler(sampler, batch_size, drop_last=False))
            else:
                orders[name] = list(RankBalancedBatchSampler(sampler, batch_size, lengths=lengths,
                                                             world_size=world_size))  # fmt: skip
        rows.append({"processes": world_size, "pairs_per_process": batch_size,
                     **{name: busiest_over_mean(b, lengths, world_size) for name, b in orders.items()}})  # fmt: skip
    meta = environment(packages=("torch", "fastdpo"))
    lines = [f"{args.pairs} pairs, lognormal lengths (median {statistics.median(lengths):.0f} tokens): the busiest "
             "process's tokens over the step's mean, averaged over an epoch (1.00 = perfectly even). Seed "
             f"{args.seed}; torch {meta['versions']['torch']}; {meta['date']}.", "",
             "| processes | pairs per process | without balance_ranks | with balance_ranks |",
             "|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['processes']} | {r['pairs_per_process']} | {r['plain']:.3f} | {r['balanced']:.3f} |" for r in rows]
    args.out.mkdir(parents=True, exist_ok=True)
    stored = {"meta": meta, "pairs": args.pairs, "seed": args.seed, "rows": rows}
    atomic_write(args.out / "rank_balance.json", json.dumps(stored, indent=1))
    atomic_write(args.out / "rank_balance.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
