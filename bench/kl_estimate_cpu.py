"""The spread of ``fastdpo compare``'s KL estimate against the plain Monte-Carlo one, on the quickstart's models.

    python -m bench.kl_estimate_cpu [--run runs/quickstart] [--seeds 10] [--samples 4]

``compare`` estimates KL(π ‖ π_ref) per prompt from the policy's own samples ``y``. Two unbiased estimators of it:

- ``log-ratio``: the mean of ``log π(y|x) − log π_ref(y|x)`` (what ``compare`` reported before 2026-11-27);
- ``token KL``: the mean of ``Σ_t KL(π(·|x, y<t) ‖ π_ref(·|x, y<t))``, each next-token distribution's KL computed
  over the whole vocabulary (``compare`` now).

Both are read from the same samples: ``compare(..., samples=S, seed=s)`` on the builtin prompts, for ``--seeds``
seeds; per seed, the mean over prompts (what the report prints). Reported per estimator: mean, standard deviation
over seeds, min, max. Two policies: the quickstart's DPO model against its SFT reference, and a policy near its
reference (each weight 10% of the way from the SFT model's to the DPO model's), where a sweep's β values land and
the KL is small. Without ``--run`` the short quickstart is trained first (~2 min) in a temporary folder. Results:
bench/results/<cpu>/kl_estimate_cpu.{json,md}. Threads pinned to 2.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.machine import DATA_PACKAGES, cpu_results, environment, pin

MIXES = {"DPO policy": 1.0, "10% of the way": 0.1}


def _estimates(policy, reference, tokenizer, prompts, *, seeds: int, samples: int, max_new_tokens: int) -> dict:
    from fastdpo.compare import compare, summary

    out = {"log-ratio": [], "token KL": []}
    for seed in range(seeds):
        rows = compare(policy, reference, tokenizer, prompts, beta=1.0, samples=samples,
                       max_new_tokens=max_new_tokens, seed=seed)  # fmt: skip
        # beta=1: an answer's reward is its log-ratio
        out["log-ratio"].append(statistics.mean(statistics.mean(a.reward for a in r.samples) for r in rows))
        out["token KL"].append(summary(rows)["kl_estimate"])
    return {name: {"mean": statistics.mean(values), "std": statistics.stdev(values), "min": min(values),
                   "max": max(values), "per_seed": values} for name, values in out.items()}  # fmt: skip


def measure(run: Path, *, seeds: int, samples: int, max_new_tokens: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastdpo.compare import builtin_prompts

    reference = AutoModelForCausalLM.from_pretrained(run / "sft").eval()
    tokenizer = AutoTokenizer.from_pretrained(run / "dpo")
    prompts = builtin_prompts(reference.config.max_position_embeddings)
    results = {}
    for name, fraction in MIXES.items():
        policy = AutoModelForCausalLM.from_pretrained(run / "dpo").eval()
        with torch.no_grad():
            start = reference.state_dict()
            for key, parameter in policy.named_parameters():
                parameter.copy_(start[key] + fraction * (parameter - start[key]))
        began = time.perf_counter()
        results[name] = _estimates(policy, reference, tokenizer, prompts, seeds=seeds, samples=samples,
                                   max_new_tokens=max_new_tokens)  # fmt: skip
        results[name]["seconds"] = time.perf_counter() - began
    return {"prompts": len(prompts), "seeds": seeds, "samples": samples, "max_new_tokens": max_new_tokens,
            "results": results}  # fmt: skip


def render(report: dict) -> str:
    lines = [f"KL estimates of `fastdpo compare` on the quickstart's models: {report['prompts']} builtin prompts, "
             f"{report['samples']} policy samples per prompt (up to {report['max_new_tokens']} tokens), "
             f"{report['seeds']} seeds; per seed the mean over prompts. {report['cpu']}, threads pinned to 2; "
             + ", ".join(f"{k} {v}" for k, v in report["versions"].items()) + f"; {report['date']}.", "",
             "| policy | estimator | mean | std over seeds | min | max | std / mean |",
             "|---|---|---:|---:|---:|---:|---:|"]  # fmt: skip
    for policy, estimators in report["results"].items():
        for name in ("log-ratio", "token KL"):
            r = estimators[name]
            lines.append(f"| {policy} | {name} | {r['mean']:.3f} | {r['std']:.3f} | {r['min']:.3f} | {r['max']:.3f} "
                         f"| {r['std'] / abs(r['mean']):.1%} |")  # fmt: skip
    ratios = {policy: e["log-ratio"]["std"] / e["token KL"]["std"] for policy, e in report["results"].items()}
    lines += ["", "Spread over seeds, log-ratio's std over token KL's: "
              + ", ".join(f"{policy} {ratio:.1f}x" for policy, ratio in ratios.items()) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kl_estimate_cpu", description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a quickstart output folder (sft/, dpo/); default: train one")
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--out", type=Path, help="folder for kl_estimate_cpu.{json,md} (default: bench/results/<cpu>)")
    args = parser.parse_args(argv)
    pin(2)
    args.out = args.out or cpu_results()
    with tempfile.TemporaryDirectory() as folder:
        run = args.run
        if run is None:
            from fastdpo.quickstart import main as quickstart

            run = Path(folder) / "quickstart"
            if quickstart(["--short", "--out", str(run)]) != 0:
                return 1
        report = measure(run, seeds=args.seeds, samples=args.samples, max_new_tokens=args.max_new_tokens)
    report.update(environment(2, DATA_PACKAGES))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "kl_estimate_cpu.json").write_text(json.dumps(report, indent=1) + "\n")
    (args.out / "kl_estimate_cpu.md").write_text(render(report))
    print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
