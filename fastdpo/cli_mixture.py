"""TRL's dataset-mixture keys in ``fastdpo dpo|sft`` configs (``DatasetMixtureConfig``: ``datasets``, ``streaming``,
``test_split_size``), read as TRL's scripts read them: the mixture (``fastdpo.data.mixture``) is read in place of
``dataset_name`` (warned where both are set, as TRL warns), as one split, ``train``; ``test_split_size`` holds rows
out as ``eval_fraction`` does, by prompt and seeded (TRL's ``train_test_split`` draws rows at random, unseeded), and
``streaming`` reads the mixture as training goes, as ``dataset_streaming`` does."""

from __future__ import annotations

import glob
import logging
import os
from dataclasses import dataclass, field

from fastdpo.errors import ConfigError

logger = logging.getLogger("fastdpo")

_DATASETS_HELP = ("TRL's dataset mixture, read in place of dataset_name: a list of {path, name, data_dir, data_files, "
                  "split, columns, fraction}")  # fmt: skip


@dataclass
class MixtureArguments:
    """TRL's ``DatasetMixtureConfig`` keys."""

    datasets: list[dict] | None = field(default=None, metadata={"help": _DATASETS_HELP})
    streaming: bool = field(default=False, metadata={"help": "a mixture: read it as training goes (needs max_steps)"})
    test_split_size: float | None = field(
        default=None, metadata={"help": "a mixture: hold out this fraction (or number) of its rows, by prompt"}
    )


def settle_mixture(run_args) -> None:
    """The mixture's keys checked and put in fastdpo's terms, before anything is read (``run_args`` changed in
    place): ``test_split_size`` as ``eval_fraction``, ``streaming`` as ``dataset_streaming``; the fields as the user
    gave them kept in ``run_args.as_given`` for the run's ``config.yaml`` (so that it runs again as written: with
    ``--streaming false`` too). A ConfigError where a key cannot mean what it says."""
    from fastdpo.data.mixture import parts_of

    if not run_args.datasets:  # (TRL's default is an empty list)
        run_args.datasets = None
        for key, instead in (("streaming", "dataset_streaming"), ("test_split_size", "eval_fraction")):
            if getattr(run_args, key) not in (None, False):
                raise ConfigError("applies to a dataset mixture (datasets), and the config has none", column=key,
                                  fix=f"use {instead} for dataset_name")  # fmt: skip
        return
    parts_of(run_args.datasets)  # (each dataset's keys)
    run_args.as_given = {key: getattr(run_args, key) for key in ("eval_fraction", "dataset_test_split",
                                                                  "dataset_streaming")}  # fmt: skip
    unread = [f"{key} {getattr(run_args, key)!r}" for key in ("dataset_name", "dataset_config")
              if getattr(run_args, key) is not None]  # fmt: skip
    if unread:
        logger.warning("datasets (a mixture) is read; %s %s not, as in TRL's scripts", ", ".join(unread),
                       "is" if len(unread) == 1 else "are")  # fmt: skip
    if run_args.dataset_train_split != "train":
        fix = "name each dataset's own split with its split: key"
        raise ConfigError(f"is {run_args.dataset_train_split!r}: a mixture is one split, train",
                          column="dataset_train_split", fix=fix)  # fmt: skip
    size = run_args.test_split_size
    if size is not None:
        if run_args.eval_fraction not in (None, size):
            raise ConfigError("and eval_fraction both hold rows out", column="test_split_size", fix="keep one")
        if run_args.streaming or run_args.dataset_streaming:
            raise ConfigError("a stream cannot be split by prompt before it is read", column="test_split_size",
                              fix="drop test_split_size, or streaming")  # fmt: skip
        run_args.eval_fraction = size
        if run_args.dataset_test_split == "test":  # (TRL's name for the part test_split_size holds out)
            run_args.dataset_test_split = None
    if run_args.dataset_test_split is not None:
        fix = "hold rows out with test_split_size (or eval_fraction)"
        raise ConfigError(f"names a split ({run_args.dataset_test_split!r}), and a mixture has one",
                          column="dataset_test_split", fix=fix)  # fmt: skip
    run_args.dataset_streaming = run_args.dataset_streaming or run_args.streaming


def mixture_rows(run_args, text: tuple[str, ...], *, streaming: bool = False):
    """``(rows, note)``: the mixture read (``load_mixture``), and which of its rows came from which dataset, said on
    stderr and returned for the quality report."""
    from fastdpo.data.mixture import describe, load_mixture, parts_of, say

    parts = parts_of(run_args.datasets)
    rows, sizes = load_mixture(parts, text=text, streaming=streaming)
    say(parts, sizes)
    return rows, describe(parts, sizes)


def local_paths(run_args) -> list[str]:
    """The mixture's local files and folders as given (``~`` and globs expanded), in the order of its datasets: what
    the run reads, and so must not delete (a checkpoint folder holding one) nor see change under ``--resume``."""
    from fastdpo.data.mixture import parts_of

    paths = []
    for part in parts_of(run_args.datasets) if run_args.datasets else []:
        given = part.data_files if part.data_files is not None else part.path
        given = [*given.values()] if isinstance(given, dict) else [given]
        names = [os.path.expanduser(name) for item in given for name in ([item] if isinstance(item, str) else item)]
        paths += sorted({found for name in names for found in glob.glob(name) or [name] if os.path.exists(found)})
    return paths


def data_prints(run_args) -> dict | None:
    """What a resumed run compares to see that its local data did not change (``data_fingerprint``): the mixture's
    local files and folders, each under its path as given (two datasets' ``train.jsonl`` are two files)."""
    from fastdpo.cli_resume import data_fingerprint

    if not run_args.datasets:
        return data_fingerprint(run_args.dataset_name)
    prints = {}
    for path in local_paths(run_args):
        prints.update({f"{path}/{key}" if os.path.isdir(path) else path: value
                       for key, value in (data_fingerprint(path) or {}).items()})  # fmt: skip
    return prints or None


def card_datasets(run_args) -> str | list | None:
    """The model card's datasets: the hub names of ``dataset_name``, or of the mixture's datasets (local ones have
    none)."""
    from fastdpo.data.mixture import BUILDERS, parts_of
    from fastdpo.train.model_card import hub_name

    if not run_args.datasets:
        return hub_name(run_args.dataset_name)
    names = (hub_name(part.path) for part in parts_of(run_args.datasets) if part.path not in BUILDERS)
    return list(dict.fromkeys(filter(None, names))) or None
