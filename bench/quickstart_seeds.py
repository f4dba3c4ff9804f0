"""The quickstart over several seeds, against its targets: held-out reward accuracy ≥ 0.9, checker success up by
≥ 20 points over the reference, under 10 minutes each on a 2-core CPU.

    python -m bench.quickstart_seeds [--seeds 0 1 2] [--runs DIR ...] [--out DIR]

Each seed runs ``fastdpo quickstart --seed S`` in its own process (wall time measured around it); ``--runs`` reads
the ``report.json`` of finished runs instead (with their wall times as recorded in ``wall_s.txt`` beside them, if
any; then the machine recorded is the one reading them). Results: bench/results/<cpu>/quickstart_cpu.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.machine import cpu_results, environment
from fastdpo.atomic import atomic_write


def _run_seed(seed: int, root: Path) -> Path:
    out = root / f"seed{seed}"
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "fastdpo.quickstart", "--out", str(out), "--seed", str(seed)], check=True,
                   cwd=Path(__file__).parents[1], capture_output=True)  # fmt: skip
    (out / "wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return out


def table(reports: list[dict], meta: dict) -> str:
    lines = [
        f"fastdpo quickstart per seed ({meta['cpus']} CPUs, {meta['cpu']}; torch {meta['versions']['torch']}, "
        f"transformers {meta['versions']['transformers']}; {meta['date']}): held-out reward accuracy of the policy "
        "against its reference, and the task checker's success rate on greedy answers to held-out prompts "
        "(reference = the SFT model).",
        "",
        "| seed | wall s | reward accuracy | reward margin | checker: reference → policy | points | carry/borrow: "
        "reference → policy | chosen NLL/token: reference → policy | length-only accuracy |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        ref, pol = r["reference"], r["policy"]
        wall = f"{r['wall_s']:.0f}" if r.get("wall_s") else f"{r['seconds']['total']:.0f} (in-process)"
        lines.append(
            f"| {r['settings']['seed']} | {wall} | {pol['reward_accuracy']:.1%} | {pol['reward_margin']:.3f} | "
            f"{ref['checker_success']:.1%} → {pol['checker_success']:.1%} | "
            f"{100 * (pol['checker_success'] - ref['checker_success']):+.1f} | "
            f"{ref['checker_success_hard']:.1%} → {pol['checker_success_hard']:.1%} | "
            f"{ref['chosen_nll']:.3f} → {pol['chosen_nll']:.3f} | {r['length_only_accuracy']:.1%} |"
        )
    met = all(r["policy"]["reward_accuracy"] >= 0.9 and
              r["policy"]["checker_success"] - r["reference"]["checker_success"] >= 0.2 and
              (r.get("wall_s") or r["seconds"]["total"]) < 600 for r in reports)  # fmt: skip
    lines += ["", f"Targets (accuracy ≥ 90%, ≥ +20 points, < 600 s) met for every seed: {'yes' if met else 'NO'}."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.quickstart_seeds", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, nargs="+", help="finished run folders to read instead of running")
    parser.add_argument("--out", type=Path, help="folder for quickstart_cpu.{json,md} (default: bench/results/<cpu>)")
    args = parser.parse_args(argv)
    if args.runs:
        runs = args.runs
    else:
        root = Path(tempfile.mkdtemp(prefix="fastdpo_quickstart_"))
        runs = [_run_seed(seed, root) for seed in args.seeds]
    reports = []
    for run in runs:
        report = json.loads((run / "report.json").read_text())
        wall = run / "wall_s.txt"
        report["wall_s"] = float(wall.read_text()) if wall.is_file() else None
        reports.append(report)
    meta = {**environment(packages=("torch", "transformers", "fastdpo")), "runs_given": bool(args.runs)}
    text = table(reports, meta)
    args.out = args.out or cpu_results()
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "quickstart_cpu.json", json.dumps({"meta": meta, "results": reports}, indent=1))
    atomic_write(args.out / "quickstart_cpu.md", text)
    print(text)


if __name__ == "__main__":
    main()
