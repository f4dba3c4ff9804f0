"""One DPO run per β on a cached reference, and a recommendation: ``fastdpo sweep``.

    fastdpo sweep --config run.yaml --beta 0.01,0.05,0.1,0.5 [--out runs/sweep] [--nll-rise 0.1]
                  [--samples 2] [--kl-prompts 32] [--overwrite | --resume] [--field value ...]

The config is the one ``fastdpo dpo`` takes (flags after the sweep's own override its fields) and must hold out
evaluation data (``eval_fraction`` or ``dataset_test_split``; without either, the split ``test`` of a folder or hub
dataset that has one, TRL's scripts' default). Each β trains in ``<out>/beta_<β>/`` with
``precompute_ref_log_probs`` on and one shared ``<out>/ref_cache/``: the reference's log-probs over the training
and evaluation rows are computed by the first run and read from disk by the others.

Per β, on the held-out pairs: reward accuracy and margin, the chosen answers' log-probability under the policy
(``logps/chosen``, the mean over pairs of each answer's sum) against the reference's, and a KL estimate (the mean
over the policy's own samples, ``--samples`` per prompt on ``--kl-prompts`` held-out prompts, of the next-token
distributions' KL summed along each; ``fastdpo.compare``).

The rule: among the β whose held-out chosen NLL rose by less than ``--nll-rise`` (a fraction of the reference's),
the one with the highest held-out reward accuracy (to 1e-6; ties: the larger log-ratio margin, the reward margin
over β, which does not grow with β itself). If none qualifies, the β whose NLL rose least, said so. A β whose
measurements are not finite (a run that diverged) is never recommended. Output in ``--out``: ``sweep.json``,
``sweep.md``, ``sweep.png``; each β's measurements in ``beta_<β>/sweep_row.json``. A sweep stopped by Ctrl-C or
SIGTERM prints the command that goes on with it (``--resume``): the β that finished are read back when their
settings (all but where and how often they logged and saved; ``--samples`` and ``--kl-prompts`` too) are these (else
refused; with ``--overwrite`` trained again), the one under way resumes from its last checkpoint, the others train.
Reference-free losses (SimPO, CPO, ORPO) have no reference to measure against: refused.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import signal
import sys
from pathlib import Path

from fastdpo.atomic import pyplot_or_none, refuse_non_empty, save_figure
from fastdpo.errors import ConfigError


def parse_betas(text: str) -> list[float]:
    try:
        betas = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"{text!r} is not a comma-separated list of numbers", column="--beta",
                          fix="e.g. --beta 0.01,0.05,0.1,0.5") from None  # fmt: skip
    if not betas or any(not 0 < b < float("inf") for b in betas) or len(set(betas)) != len(betas):  # (named by repr)
        raise ConfigError(f"needs distinct finite values > 0, got {text!r}", column="--beta",
                          fix="e.g. --beta 0.05,0.1,0.5")  # fmt: skip
    return sorted(betas)


def recommend(rows: list[dict], nll_rise: float) -> tuple[float, str]:
    """The recommended β and the sentence that says why (the rule in the module docstring)."""
    finite = [r for r in rows if all(math.isfinite(r[k]) for k in ("reward_accuracy", "reward_margin", "nll_rise"))]
    if not finite:
        raise ConfigError("every β's held-out measurements are NaN or infinite: the runs diverged", column="--beta",
                          fix="lower the learning rate, or check the data")  # fmt: skip
    rows = finite
    ok = [r for r in rows if r["nll_rise"] < nll_rise]
    if ok:  # (accuracies are means of fp32 fractions: equal counts of pairs can differ in the last bits)
        best = max(ok, key=lambda r: (round(r["reward_accuracy"], 6), r["reward_margin"] / r["beta"]))
        return best["beta"], (f"β = {best['beta']!r}: the highest held-out reward accuracy "
                              f"({best['reward_accuracy']:.1%}) among the β whose held-out chosen NLL rose by "
                              f"less than {nll_rise:.0%} of the reference's")  # fmt: skip
    best = min(rows, key=lambda r: r["nll_rise"])
    return best["beta"], (f"β = {best['beta']!r}: no β kept the held-out chosen NLL within {nll_rise:.0%} of the "
                          f"reference's; this one raised it least ({best['nll_rise']:+.1%})")  # fmt: skip


def _evaluate(trainer, run_args, beta: float, samples: int, kl_prompts: int) -> dict:
    from fastdpo.compare import compare, summary
    from fastdpo.model.adapters import AdapterReference, is_peft_model
    from fastdpo.train.common import load_causal_lm

    evals = [log for log in trainer.state.log_history if "eval_rewards/accuracies" in log]
    at_end = evals and evals[-1]["step"] == trainer.state.global_step and not trainer.args.load_best_model_at_end
    metrics = evals[-1] if at_end else trainer.evaluate()  # (the run's own evaluation at its last step, if it had one)
    dataset = trainer.eval_dataset
    # the reference's mean over the pairs evaluated (rewards/chosen = β·(policy − reference)): dataloader_drop_last
    # leaves the last partial batch out, and a mean over every row compared other rows (+13.6% where +11.5%)
    policy_chosen = metrics["eval_logps/chosen"]
    reference_chosen = policy_chosen - metrics["eval_rewards/chosen"] / beta
    left = len(dataset) % (trainer.args.per_device_eval_batch_size * trainer.args.world_size)
    if trainer.args.dataloader_drop_last and left:
        print(f"fastdpo sweep: dataloader_drop_last leaves the last {left} of the {len(dataset)} held-out pairs out "
              "of every evaluation", file=sys.stderr)  # fmt: skip
    row = {"beta": beta, "reward_accuracy": metrics["eval_rewards/accuracies"],
           "reward_margin": metrics["eval_rewards/margins"], "logps_chosen": policy_chosen,
           "logps_chosen_reference": reference_chosen,
           "nll_rise": (reference_chosen - policy_chosen) / max(abs(reference_chosen), 1e-9)}  # fmt: skip
    if samples and kl_prompts:
        policy = trainer.accelerator.unwrap_model(trainer.model)
        if is_peft_model(policy) and run_args.ref_model_name_or_path is None:  # the reference it trained against:
            # the same model with its adapter off
            reference = AdapterReference(policy)
        else:
            # loaded as the trainer loaded it: model_init_kwargs (dtype, revision), trust_remote_code
            reference = load_causal_lm(run_args.ref_model_name_or_path or run_args.model_name_or_path,
                                       trainer.args.model_init_kwargs, column="ref_model",
                                       trust_remote_code=trainer.args.trust_remote_code)  # fmt: skip
            reference.to(next(policy.parameters()).device)
        prompts = [(f"held-out {i}", list(ids)) for i, ids in enumerate(dataset["prompt_ids"][:kl_prompts])]
        rows = compare(policy, reference, trainer.processing_class, prompts, beta=beta, samples=samples,
                       max_new_tokens=32)  # fmt: skip
        row["kl_estimate"] = summary(rows)["kl_estimate"]
    return row


def table(rows: list[dict], recommendation: str) -> str:
    lines = ["| β | reward accuracy | reward margin | chosen logps (reference) | NLL rise | KL estimate |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        kl = f"{r['kl_estimate']:.3f}" if r.get("kl_estimate") is not None else "-"
        chosen = f"{r['logps_chosen']:.2f} ({r['logps_chosen_reference']:.2f})"
        lines.append(f"| {r['beta']!r} | {r['reward_accuracy']:.1%} | {r['reward_margin']:.3f} | {chosen} | "
                     f"{r['nll_rise']:+.1%} | {kl} |")  # fmt: skip
    return "\n".join(["# fastdpo sweep", "", *lines, "", f"Recommended: {recommendation}."]) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    plt = pyplot_or_none(str(path))
    if plt is None:
        return
    betas = [r["beta"] for r in rows]
    panels = [("reward_accuracy", "held-out reward accuracy"), ("reward_margin", "held-out reward margin"),
              ("nll_rise", "held-out chosen NLL rise"), ("kl_estimate", "KL estimate")]  # fmt: skip
    fig, axes = plt.subplots(1, 4, figsize=(14, 3))
    for ax, (key, title) in zip(axes, panels, strict=True):
        ax.plot(betas, [r.get(key) if r.get(key) is not None else float("nan") for r in rows], marker="o")
        ax.set_xscale("log")
        ax.set_xlabel("β")
        ax.set_title(title)
    fig.tight_layout()
    save_figure(fig, path, dpi=80)
    plt.close(fig)


# what a finished β's row does not depend on: where and how often its run logged and saved
_MAY_DIFFER = frozenset({"output_dir", "resume_from_checkpoint", "report_to", "disable_tqdm", "logging_steps",
                         "logging_strategy", "logging_first_step", "log_level", "save_steps", "save_strategy",
                         "save_total_limit", "run_name", "dataloader_num_workers", "ref_cache_dir"})  # fmt: skip


def _run_beta(args, known: argparse.Namespace, flags: list[str], run_args, beta: float) -> dict:
    """One β's run and its measurements (``beta_<β>/sweep_row.json``, with the settings they came from); with
    ``--resume``, read back when it finished under these settings, resumed from its last checkpoint when it has
    one."""
    from fastdpo.atomic import atomic_write
    from fastdpo.cli import _resolved_config, load_config, run_training
    from fastdpo.cli_mixture import data_prints
    from fastdpo.cli_resume import model_fingerprint, same_models
    from fastdpo.train.resume import last_checkpoint

    run_dir = args.out / f"beta_{beta!r}"
    run_flags = [*flags, "--beta", repr(beta), "--output_dir", str(run_dir), "--precompute_ref_log_probs", "true",
                 "--ref_cache_dir", str(args.out / "ref_cache")]  # fmt: skip
    resolved = _resolved_config(*load_config(known, run_flags))
    prints = {
        "data_fingerprint": data_prints(run_args),  # (other files at the same paths)
        "model_fingerprint": model_fingerprint(run_args.model_name_or_path),
        # (a reference folder given: the rows' margins and accuracy are measured against it)
        "reference_fingerprint": model_fingerprint(getattr(run_args, "ref_model_name_or_path", None)),
    }
    settings = json.loads(json.dumps({**{k: v for k, v in resolved.items() if k not in _MAY_DIFFER},
                                      "samples": args.samples, "kl_prompts": args.kl_prompts, **prints}))  # fmt: skip
    done, again = run_dir / "sweep_row.json", False
    if args.resume and done.is_file():
        saved = json.loads(done.read_text())
        recorded = saved.get("settings") if isinstance(saved, dict) else None
        if not isinstance(recorded, dict):  # (a row written before the settings were)
            saved, recorded = {"row": saved}, {}
        changed = sorted(k for k in recorded.keys() | settings.keys() if recorded.get(k) != settings.get(k))
        for key in ("model_fingerprint", "reference_fingerprint"):  # (an older print; a row from before the
            if same_models(recorded.get(key), settings.get(key)) or (  # reference's was recorded: not known)
                key == "reference_fingerprint" and key not in recorded
            ):
                changed = [k for k in changed if k != key]
        changed = changed if recorded else ["none recorded"]
        if not changed:
            print(f"sweep: β = {beta!r} finished before: read from {done}", flush=True)
            return saved["row"]
        if not args.overwrite:
            raise ConfigError(f"β = {beta!r} finished under other settings ({', '.join(changed)})", column="--resume",
                              fix="go on with the recorded settings, or add --overwrite to train it again with "
                              "these")  # fmt: skip
        again = True  # trained again from the start
    resume = args.resume and not again and last_checkpoint(run_dir) is not None
    print(f"sweep: β = {beta!r} → {run_dir}" + (" (resumed)" if resume else ""), flush=True)
    # with --resume, a β without a checkpoint starts over in its folder
    run_known = argparse.Namespace(**{**vars(known), "resume": True if resume else None,
                                      "overwrite": args.overwrite or (args.resume and not resume)})  # fmt: skip
    done.unlink(missing_ok=True)  # (an earlier sweep's, under --overwrite)
    trainer = run_training(run_known, run_flags, evaluated_after=True)
    row = _evaluate(trainer, run_args, beta, args.samples, args.kl_prompts)
    atomic_write(done, json.dumps({"row": row, "settings": settings}, indent=1))
    return row


def _has_test_split(run_args) -> bool:
    """Whether the run's data has a split ``test`` (TRL's scripts' held-out split): a local folder's files, a hub
    dataset's splits, asked of the hub (each β's run found out after reading the train split, in datasets' words)."""
    from fastdpo.cli_checks import test_split_of
    from fastdpo.data.hub import hub_split_names
    from fastdpo.data.hub_config import hub_config

    found = test_split_of(run_args)
    if found != "hub":
        return found == "found"
    with hub_config(run_args.dataset_config):
        return "test" in hub_split_names(run_args.dataset_name)


def _holds_sweep(out: Path) -> bool:
    """Whether ``out`` is a folder a sweep wrote into (or an empty one, where it stopped before writing)."""
    if not out.is_dir():
        return False
    names = [path.name for path in out.iterdir()]
    return not names or any(name.startswith("beta_") or name in ("ref_cache", "sweep.json") for name in names)


def main(argv: list[str] | None = None) -> int:
    from fastdpo.atomic import atomic_write
    from fastdpo.cli import load_config
    from fastdpo.cli_checks import check_evaluation
    from fastdpo.compare import check_counts
    from fastdpo.ops import REFERENCE_FREE

    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(prog="fastdpo sweep", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--config", type=Path, required=True, help="the YAML file fastdpo dpo takes")
    parser.add_argument("--beta", required=True, help="comma-separated values, e.g. 0.01,0.05,0.1,0.5")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep"), help="one run per β in <out>/beta_<β> (the "
                        "config's output_dir is not used), the reference cache, sweep.{md,json,png} (default: "
                        "runs/sweep)")  # fmt: skip
    parser.add_argument("--nll-rise", type=float, default=0.1, help="the rule's limit on the chosen NLL's rise "
                        "(default: 0.1, 10%%)")  # fmt: skip
    parser.add_argument("--samples", type=int, default=2, help="policy samples per prompt for the KL estimate "
                        "(default: 2)")  # fmt: skip
    parser.add_argument("--kl-prompts", type=int, default=32, help="held-out prompts for the KL estimate (default: 32)")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="go on with a sweep that stopped: finished βs read back, the one under way resumed from its "
        "last checkpoint, the others trained",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args, flags = parser.parse_known_args(argv)
    check_counts(args, at_least={"samples": 0, "kl_prompts": 0, "nll_rise": 0})
    betas = parse_betas(args.beta)
    if args.resume and not _holds_sweep(args.out):  # (a folder of other files: its sweep.md replaced, unasked)
        raise ConfigError(f"{args.out} holds no sweep to go on with (no beta_<β> run, ref_cache or sweep.json)",
                          column="--resume", fix="run it without --resume, with another --out")  # fmt: skip
    if not args.resume:
        refuse_non_empty(args.out, overwrite=args.overwrite, column="--out",
                         fix="pass another --out, --overwrite to replace the runs there, or --resume")  # fmt: skip
    known = argparse.Namespace(command="dpo", config=args.config, overwrite=args.overwrite, debug=args.debug)
    run_args, run_config = load_config(known, flags)
    if "--out" not in argv and run_config.output_dir:  # (the runs went to runs/sweep, unsaid)
        print(f"fastdpo sweep: the runs go to {args.out}/beta_<β>, as --out sets; the config's output_dir "
              f"({run_config.output_dir}) is not used", file=sys.stderr)  # fmt: skip
    if getattr(run_args, "dataset_streaming", False):  # (it failed in the first run, after loading the model)
        key = "streaming" if run_args.streaming else "dataset_streaming"  # (a mixture's key, as written)
        raise ConfigError(
            "a sweep computes the reference's log-probs once, over the whole dataset, for all its runs; "
            "a stream is only read as training goes",
            column=key,
            fix=f"set {key}: false for the sweep",
        )
    if run_args.eval_fraction is None and run_args.dataset_test_split is None:
        if not _has_test_split(run_args):
            key, fix = ("test_split_size", "set test_split_size (e.g. 0.1)") if run_args.datasets else (
                "eval_fraction", "set eval_fraction (e.g. 0.1) or dataset_test_split")  # fmt: skip
            raise ConfigError("a sweep compares the runs on held-out pairs, and the config holds none out", column=key,
                              fix=fix)  # fmt: skip
        # TRL's scripts' dataset_test_split ('test'), as a run that evaluates reads it; given to every β's run
        print(f"fastdpo sweep: the held-out pairs are the split 'test' of {run_args.dataset_name}, as TRL's scripts "
              "read it (dataset_test_split's default); set dataset_test_split or eval_fraction to choose",
              file=sys.stderr)  # fmt: skip
        flags = [*flags, "--dataset_test_split", "test"]
        run_args, run_config = load_config(known, flags)
    check_evaluation(run_args, run_config, evaluated_after=True)  # (each run's own check: before a β's folder is made)
    free = sorted(REFERENCE_FREE.intersection(run_config.loss_type))
    if free:
        raise ConfigError(f"{', '.join(free)} has no reference, which a sweep measures each β against",
                          column="loss_type", fix="tune β with one fastdpo dpo run per value (--beta)")  # fmt: skip
    rows = []
    for beta in betas:
        try:
            rows.append(_run_beta(args, known, flags, run_args, beta))
        except KeyboardInterrupt as stop:  # TrainingInterrupted (a checkpoint saved), or a second Ctrl-C
            number = getattr(stop, "signum", signal.SIGINT)
            again = shlex.join(["fastdpo", "sweep", *[a for a in argv if a not in ("--overwrite", "--resume")],
                                "--resume"])  # fmt: skip
            print(f"fastdpo sweep: stopped by {signal.Signals(number).name} during β = {beta!r}; go on with: "
                  f"{again}", file=sys.stderr)  # fmt: skip
            return 128 + number
    chosen, why = recommend(rows, args.nll_rise)
    text = table(rows, why)
    atomic_write(args.out / "sweep.json", json.dumps({"rows": rows, "recommended_beta": chosen, "rule": why,
                                                      "nll_rise": args.nll_rise}, indent=1))  # fmt: skip
    atomic_write(args.out / "sweep.md", text)
    plot(rows, args.out / "sweep.png")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
