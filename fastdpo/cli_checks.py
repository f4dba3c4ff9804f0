"""The run's settings checked before anything is written: the held-out rows against the evaluation strategy, the
learning-rate schedule, gradient checkpointing's keys, the reporting integrations."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from pathlib import Path

import torch

from fastdpo.errors import ConfigError, DataError

logger = logging.getLogger("fastdpo")


def check_evaluation(run_args, args, *, evaluated_after: bool):
    """A ConfigError where the held-out rows and the evaluation strategy disagree: rows held out (``eval_fraction``)
    that ``eval_strategy: no`` never evaluates (lost to training, silently), an evaluation with nothing to evaluate
    on (transformers' traceback), both ways of holding rows out at once; a best checkpoint with no metric to pick it
    by. Returns the run arguments the splits are read with: without a ``dataset_test_split`` that nothing evaluates
    (TRL's scripts pass no eval split then; a missing one failed the run), said in a warning; with the split ``test``
    where an evaluating run holds nothing out and its data has one or may (a local folder's, a hub dataset's), as
    TRL's scripts read it by default (``assumed_test_split`` set: see ``no_assumed_split``)."""
    held_out = {"eval_fraction": run_args.eval_fraction, "dataset_test_split": run_args.dataset_test_split}
    given = [key for key, value in held_out.items() if value is not None]
    if len(given) == 2:
        raise ConfigError("eval_fraction and dataset_test_split both give the evaluation rows", column="eval_fraction",
                          fix="keep one of them")  # fmt: skip
    fraction = run_args.eval_fraction  # (a fraction of the rows, or a number of them; said as the run's own key)
    key = "eval_fraction" if getattr(run_args, "test_split_size", None) is None else "test_split_size"  # (a mixture's)
    if fraction is not None and not (0 < fraction < 1 or (float(fraction).is_integer() and fraction >= 1)):
        raise ConfigError(f"must be a fraction of the rows in (0, 1) or a number of rows, got {fraction!r}",
                          column=key, fix=f"e.g. {key}: 0.1")  # fmt: skip
    strategy = str(getattr(args.eval_strategy, "value", args.eval_strategy))
    if strategy == "no" and run_args.eval_fraction is not None and not evaluated_after:
        fix = f"set eval_strategy (steps, with eval_steps; or epoch); or drop {key}"
        raise ConfigError(f"holds out {run_args.eval_fraction} of the rows, which eval_strategy 'no' never "
                          "evaluates: they would be lost to training", column=key, fix=fix)  # fmt: skip
    if str(getattr(args.save_strategy, "value", args.save_strategy)) == "best" and args.metric_for_best_model is None:
        raise ConfigError("save_strategy 'best' saves at the best evaluation by a metric, and none is set",
                          column="metric_for_best_model", fix="set it, e.g. eval_rewards/accuracies")  # fmt: skip
    if strategy != "no" and not given:
        tests = test_split_of(run_args)
        if tests:  # TRL's scripts' dataset_test_split ('test', their default), where the data has it or may have it
            said = logger.info if tests == "found" else logger.warning  # (a hub dataset's splits: found on loading)
            said(
                "eval_strategy %r evaluates the split 'test' of %s, as TRL's scripts do (dataset_test_split's "
                "default); set dataset_test_split or eval_fraction to choose",
                strategy,
                run_args.dataset_name,
            )
            read = dataclasses.replace(run_args, dataset_test_split="test")
            read.assumed_test_split = True  # (a hub dataset without one: said as such, see no_assumed_split)
            return read
        fix = "set eval_fraction (e.g. 0.1), or dataset_test_split (TRL's scripts read the split 'test')"
        fix = "set test_split_size (e.g. 0.1)" if getattr(run_args, "datasets", None) else fix  # (a mixture: one split)
        raise ConfigError(f"eval_strategy {strategy!r} evaluates held-out rows, and the config holds none out",
                          column="eval_strategy", fix=f"{fix}, or eval_strategy: no")  # fmt: skip
    if run_args.dataset_test_split and not evaluated_after and strategy == "no":
        logger.warning("dataset_test_split %r is not read: eval_strategy 'no' evaluates nothing",
                       run_args.dataset_test_split)  # fmt: skip
        return dataclasses.replace(run_args, dataset_test_split=None)
    return run_args


@contextlib.contextmanager
def no_assumed_split(run_args):
    """A hub dataset's loading error for the split ``test`` that ``check_evaluation`` assumed (TRL's scripts'
    default), as a ConfigError naming the settings that choose the evaluation rows (it was datasets' "Unknown split",
    after the train split had been read)."""
    try:
        yield
    except ValueError as error:  # (datasets' "Unknown split"; a DataError's "has no split")
        said = str(error).split(" — ")[0]
        if not getattr(run_args, "assumed_test_split", False) or "split" not in said.lower():
            raise
        raise ConfigError(f"eval_strategy evaluates the split 'test' (TRL's scripts' default dataset_test_split), "
                          f"and {run_args.dataset_name} has none ({said[:200]})", column="dataset_test_split",
                          fix="set dataset_test_split to one of its splits, or eval_fraction to hold rows out of "
                          "train, or eval_strategy: no") from None  # fmt: skip


def test_split_of(run_args) -> str | None:
    """``"found"`` where the run's data is a local folder with a split ``test``, ``"hub"`` where it is a hub name
    (its splits known when it is read), None otherwise (one file, a mixture, a folder without one)."""
    from fastdpo.data.load import folder_splits, is_local

    if getattr(run_args, "datasets", None) or not run_args.dataset_name:
        return None
    path = Path(run_args.dataset_name).expanduser()
    if not is_local(path):
        return "hub"
    try:
        return "found" if "test" in (folder_splits(path) or ()) else None
    except DataError:  # (a folder the load refuses: it says why)
        return None


def check_scheduler(args) -> None:
    """A ConfigError, before anything is written, for a negative ``max_steps`` other than -1, and for a learning-rate
    schedule the Trainer could not build at its first step (``cosine_with_min_lr`` without ``min_lr``, an argument
    the schedule does not take): the run directory was written by then, and the fixed run needed ``--overwrite``."""
    from transformers import get_scheduler

    if args.max_steps < -1:  # (transformers trains num_train_epochs for any max_steps <= 0: -5 trained 3 epochs)
        raise ConfigError(
            f"{args.max_steps} is no number of steps (transformers would train num_train_epochs, "
            f"{args.num_train_epochs:g}, for it)",
            column="max_steps",
            fix="give a positive number of optimizer steps, or -1 (the default) for num_train_epochs",
        )
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)  # (a stand-in)
    try:
        get_scheduler(args.lr_scheduler_type, optimizer, num_warmup_steps=0, num_training_steps=max(args.max_steps, 10),
                      scheduler_specific_kwargs=args.lr_scheduler_kwargs)  # fmt: skip
    except (TypeError, ValueError) as error:
        name = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
        raise ConfigError(
            f"lr_scheduler_type {name!r}: {' '.join(str(error).split())}",
            column="lr_scheduler_kwargs",
            fix="give the schedule the arguments it names in lr_scheduler_kwargs, or drop those it does not take",
        ) from None


def check_checkpointing(args) -> None:
    """A ConfigError, before anything is written, for a ``gradient_checkpointing_kwargs`` key that torch's
    checkpoint does not take (a typo, ``use_reentrnt``: torch's ValueError at the first step, the run directory
    written by then)."""
    import inspect

    from torch.utils.checkpoint import checkpoint

    taken = {*inspect.signature(checkpoint).parameters, "preserve_rng_state"} - {"function", "args", "kwargs"}
    unknown = sorted(set((args.gradient_checkpointing_kwargs or {}) if args.gradient_checkpointing else ()) - taken)
    if unknown:
        raise ConfigError(
            f"torch's checkpoint takes no {', '.join(map(repr, unknown))}",
            column="gradient_checkpointing_kwargs",
            fix=f"use its keys: {', '.join(sorted(taken))}",
        )


# the report_to integrations transformers can tell installed (get_available_reporting_integrations); azure_ml is
# left out there beside mlflow, flyte never listed: those two are not judged here
_JUDGED = ("comet_ml", "dagshub", "dvclive", "mlflow", "neptune", "tensorboard", "wandb", "codecarbon", "clearml",
           "swanlab", "trackio", "kubeflow")  # fmt: skip


def check_reporting(args) -> None:
    """A ConfigError for a ``report_to`` integration whose package is not installed (the Trainer's RuntimeError
    traceback when it builds the callback)."""
    from transformers.integrations import get_available_reporting_integrations

    available = get_available_reporting_integrations()
    missing = [name for name in args.report_to or [] if name in _JUDGED and name not in available]
    if missing:
        raise ConfigError(f"{', '.join(missing)}: not installed here", column="report_to",
                          fix="install the package it reports through, or report_to: none")  # fmt: skip
