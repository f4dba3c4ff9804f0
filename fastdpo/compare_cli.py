"""``fastdpo compare``'s command line (``fastdpo.compare`` says what it computes): the models and files it names,
read with what the policy's run recorded in its ``config.yaml`` (β, the cut, the quantization, the pairs' columns,
``data_filter``, ``displacement_margin``, the held-out split); a Trainer checkpoint (``RUN/checkpoint-N``) reads its
run's, in the folder above it."""

from __future__ import annotations

import argparse
import contextlib
import json
from pathlib import Path

import torch

from fastdpo.atomic import refuse_non_empty
from fastdpo.compare import (
    SEEDS,
    _checked_prompt_ids,
    _vocabulary,
    check_counts,
    compare,
    model_context,
    pair_metrics,
    write_report,
)
from fastdpo.data.hub_config import hub_config
from fastdpo.errors import ConfigError, DataError


def _columns(text: str) -> dict:
    from fastdpo.cli_values import _json_dict

    return _json_dict(text)


def run_settings(policy: Path) -> tuple[dict, Path]:
    """(what the policy's run recorded, the file it is read from): ``policy/config.yaml``; for a Trainer checkpoint
    without one (``checkpoint-N`` with its ``trainer_state.json``), its run's ``config.yaml`` above it, said so."""
    from fastdpo.cli_model import run_config

    path = policy / "config.yaml"
    run = policy.parent
    checkpoint = policy.name.startswith("checkpoint-") and (policy / "trainer_state.json").is_file()
    if not path.is_file() and checkpoint and (run / "config.yaml").is_file():
        path = run / "config.yaml"
        print(f"{policy} is a checkpoint of the run in {run}: its settings read from {path}")
    return run_config(path.parent), path


def pairs_split(pairs: Path, split: str | None, recorded: dict, path: Path) -> str | None:
    """The split of a folder or hub dataset of several that ``--pairs`` names to read (None for one file, one saved
    Dataset, a folder or hub dataset of one split, or a local path that is not there, which loading names):
    ``--pairs-split``, else the run's ``dataset_test_split`` (``path``: where it is recorded); a ConfigError where
    neither says (it read the training split and called it held out). A hub dataset's splits are asked of the hub
    (in ``hub_config``'s configuration): a name it has not is named so at once (it was asked for a split first)."""
    from fastdpo.data.hub import hub_split_names
    from fastdpo.data.load import folder_splits, is_local

    splits = folder_splits(pairs)
    if splits is None and not is_local(pairs) and split is None and recorded.get("dataset_test_split") is None:
        splits = hub_split_names(str(pairs))  # (only where no split is named: loading checks a named one)
        if len(splits) == 1:
            return splits[0]
    missing = not pairs.exists() and is_local(pairs)  # (a file's name: loading says so)
    one = pairs.is_file() or missing or (splits is not None and len(splits) == 1)
    if one:
        if split is not None and pairs.is_file():
            raise ConfigError(f"{pairs} is one file, one split", column="--pairs-split",
                              fix="drop --pairs-split, or give --pairs the folder (or hub name) of splits")  # fmt: skip
        return split
    chosen = split or recorded.get("dataset_test_split")
    if not isinstance(chosen, str):
        known = f" (its splits: {', '.join(splits)})" if splits else ""
        raise ConfigError(f"{pairs} holds several splits and the policy's run recorded no dataset_test_split: which "
                          f"holds the held-out pairs?{known}", column="--pairs-split",
                          fix="pass --pairs-split NAME, or the held-out file itself (fastdpo data split writes "
                          "one)")  # fmt: skip
    source = "--pairs-split" if split else f"{path}'s dataset_test_split"
    print(f"--pairs: the split {chosen!r} of {pairs} ({source})")
    return chosen


def run_held_out(pairs: Path, split: str | None, recorded: dict, path: Path) -> tuple[float, int, str] | None:
    """``(eval_fraction, seed, split)`` where ``--pairs`` is the data the policy's run held ``eval_fraction`` of its
    train ``split`` out of (``_same_data``; ``--pairs-split`` unset or that split; not a mixture's run): the pairs
    compared are the rows the run held out, drawn as it drew them, said so (they were every row, trained on,
    reported as held-out); None otherwise."""
    fraction, name, seed = recorded.get("eval_fraction"), recorded.get("dataset_name"), recorded.get("seed", 42)
    train = recorded.get("dataset_train_split") or "train"
    if not isinstance(fraction, (int, float)) or not isinstance(name, str) or split not in (None, train):
        return None
    # (a mixture's run reads no dataset_name)
    if recorded.get("datasets") or not _same_data(pairs, name, path.parent, train):
        return None
    print(f"--pairs: the pairs the policy's run held out of {pairs} ({path}'s eval_fraction {fraction}, drawn with "
          f"its seed {seed}); the others trained it")  # fmt: skip
    return fraction, seed, None if pairs.is_file() else train  # (a file's one split: a folder's train split alone)


def _same_data(pairs: Path, name: str, run: Path, train: str) -> bool:
    """Whether ``--pairs`` is the run's ``dataset_name``: a hub dataset by its name; a local file or folder by its
    contents, as the run's ``data_fingerprint.json`` (in ``run``) records them (the run's relative path was read
    from another folder, maybe; a copy under another name; a folder's ``train`` split file given alone), else by
    being that file."""
    from fastdpo.cli_resume import FINGERPRINT, data_fingerprint
    from fastdpo.data.load import is_local

    if not is_local(pairs) and not is_local(Path(name)):
        return str(pairs) == name
    if not pairs.exists():
        return False
    try:
        ran, given = json.loads((run / FINGERPRINT).read_text()), data_fingerprint(str(pairs))
        prints = list(given.values()) if pairs.is_file() and given else None
        return ran == given or (prints is not None and isinstance(ran, dict) and (
            ran.get(train) == prints[0] or list(ran.values()) == prints))  # fmt: skip
    except (OSError, ValueError):  # (none recorded: a run of an older fastdpo, or a copied folder)
        try:
            return pairs.samefile(Path(name).expanduser())
        except OSError:
            return False


@contextlib.contextmanager
def _as_pairs_split():
    """DataErrors about the split to read said as ``--pairs-split``'s (they said "option 'split'")."""
    try:
        yield
    except DataError as error:
        if error.option != "split":
            raise
        raise error.but(column="--pairs-split") from None


def reference_free(recorded: dict) -> list[str]:
    """The loss types of the policy's run that read no reference (SimPO, CPO, ORPO), as its config.yaml records
    ``loss_type`` (a name or a list)."""
    from fastdpo.ops import REFERENCE_FREE

    types = recorded.get("loss_type")
    types = [types] if isinstance(types, str) else types if isinstance(types, list) else []
    return [name for name in types if isinstance(name, str) and name in REFERENCE_FREE]


def pairs_config(pairs: Path, config: str | None, recorded: dict, path: Path) -> str | None:
    """The hub configuration to read ``--pairs`` with: ``--pairs-config``, else the run's ``dataset_config`` where
    ``--pairs`` names the run's own ``dataset_name`` (said so), else None (the dataset's default)."""
    if config is not None or recorded.get("dataset_config") is None or str(pairs) != recorded.get("dataset_name"):
        return config
    print(f"--pairs: the configuration {recorded['dataset_config']!r} of {pairs} ({path}'s dataset_config)")
    return recorded["dataset_config"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastdpo compare", description="A policy against its reference, answer by "
                                     "answer: rewards, KL estimate, held-out pairs.")  # fmt: skip
    parser.add_argument("--policy", type=Path, required=True, help="the trained model's folder")
    parser.add_argument("--reference", type=Path, required=True, help="the reference model's folder")
    parser.add_argument("--prompts", default="builtin", help="builtin (edge cases; the default), quickstart (its "
                        "held-out problems), or a .txt/.jsonl/.json file (.gz too)")  # fmt: skip
    parser.add_argument("--pairs", type=Path, help="held-out preference pairs (a data file, standard or "
                        "conversational; a folder or hub name of splits): accuracy, displacement")  # fmt: skip
    parser.add_argument("--pairs-split", help="the split of a --pairs folder or hub name (default: the policy run's "
                        "dataset_test_split)")  # fmt: skip
    parser.add_argument("--pairs-config", help="the configuration of a --pairs hub dataset (load_dataset's name; "
                        "default: the policy run's dataset_config where --pairs is its dataset_name)")  # fmt: skip
    parser.add_argument("--columns", type=_columns, help='the pairs\' column names, e.g. \'{"prompt": "question"}\' '
                        "(default: the policy run's dataset_columns where the file has those columns)")  # fmt: skip
    parser.add_argument("--samples", type=int, default=4, help="sampled policy answers per prompt (KL estimate; "
                        "default: 4)")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=48, help="at most a quarter of the context (default: 48)")
    parser.add_argument("--beta", type=float, help="of the implicit rewards (default: the β the policy's run "
                        "recorded in its config.yaml, else 0.1)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="of the sampled answers (default: 0)")
    parser.add_argument("--limit", type=int, help="only the first N prompts")
    parser.add_argument("--out", type=Path, default=Path("runs/compare"), help="default: runs/compare")
    parser.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out")
    parser.add_argument("--unquantized", action="store_true", help="load a QLoRA run's base and reference in full "
                        "precision (default: quantized as the run loaded its base, from its config.yaml)")  # fmt: skip
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    check_counts(args, at_least={"limit": 1, "samples": 0, "max_new_tokens": 1, "seed": SEEDS[0]},
                 at_most={"seed": SEEDS[1]})  # fmt: skip
    if args.beta is not None and not 0 < args.beta < float("inf"):
        raise ConfigError(f"must be a number > 0, got {args.beta}", column="--beta")
    refuse_non_empty(
        args.out,
        overwrite=args.overwrite,
        column="--out",
        fix="pass another --out, or --overwrite to replace the report there",
    )
    from transformers import AutoModelForCausalLM

    from fastdpo.cli_model import run_quantization
    from fastdpo.compare_io import builtin_prompts, load_tokenizer, quickstart_prompts, read_pairs, read_prompts
    from fastdpo.train.model_checks import check_reference

    recorded, path = run_settings(args.policy)  # what the policy's run recorded, if any
    free = reference_free(recorded)
    if free:  # (its rewards, eval_rewards/*, are β/|y|·log π (SimPO's) or β·log π: not what compare measures)
        print(f"the policy's run trained without a reference ({path}: loss_type {', '.join(free)}): its rewards are "
              "not these; here rewards are β·(log π − log π_ref) against --reference")  # fmt: skip
    if args.beta is None:  # the β the policy trained with, where its run recorded one (and it had a reference)
        beta = recorded.get("beta")
        from_run = isinstance(beta, (int, float)) and not free
        args.beta = float(beta) if from_run else 0.1
        other = f" (the run's beta {beta} scaled another reward)" if free and isinstance(beta, (int, float)) else ""
        source = f"{path}'s" if from_run else f"the default{other}"
        print(f"beta {args.beta:g}: {source} (--beta to set another)")

    for flag, what in (("--pairs-split", "a split"), ("--pairs-config", "a hub configuration")):
        if getattr(args, flag[2:].replace("-", "_")) is not None and not args.pairs:
            raise ConfigError(f"names {what} of --pairs, which is not given", column=flag, fix="add --pairs")
    # the files read and checked before the models load, and before the answers are generated, which take the time
    source, split, config, held = args.pairs, None, None, None
    if args.pairs:
        config = pairs_config(args.pairs, args.pairs_config, recorded, path)
        held = run_held_out(args.pairs, args.pairs_split, recorded, path)
        with hub_config(config, "--pairs-config"), _as_pairs_split():
            split = held[2] if held else pairs_split(args.pairs, args.pairs_split, recorded, path)
            args.pairs, args.columns = read_pairs(args.pairs, args.columns, recorded.get("dataset_columns"),
                                                  split=split, held_out=held[:2] if held else None)  # fmt: skip
    prompts, checkers = None, None
    if args.prompts == "quickstart":  # the held-out problems of the seed the quickstart run recorded
        prompts, checkers = quickstart_prompts(args.policy, args.seed)
    elif args.prompts != "builtin":
        prompts = read_prompts(Path(args.prompts))
    # a QLoRA run trained on its base quantized, against that quantized base: both are loaded so again (and fit so)
    quantization, key = (None, None) if args.unquantized else run_quantization(recorded, path)
    if quantization is not None:
        bits = 4 if key == "load_in_4bit" else 8
        print(f"loading the policy's base and the reference in {bits} bits, as the run loaded its base "
              f"({path}: {key}; --unquantized to load them in full precision)")  # fmt: skip
    remote = recorded.get("trust_remote_code") is True  # (the run trusted the model's own code: loaded so again)
    models, device = [], "cuda" if torch.cuda.is_available() else "cpu"
    for name, folder in (("--policy", args.policy), ("--reference", args.reference)):
        if not folder.is_dir():  # (it said the folder "holds no model")
            raise ConfigError(f"there is no folder {folder.resolve()}", column=name,
                              fix=f"check the path (a relative one is read from {Path.cwd()})")  # fmt: skip
        if not any((folder / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise ConfigError(f"{folder} holds no model (no config.json, no adapter_config.json)", column=name,
                              fix="pass the folder a trainer saved (save_pretrained)")  # fmt: skip
        try:  # a LoRA run's folder holds its adapter: transformers loads the base it names, then the adapter
            quantized = {} if quantization is None else {"quantization_config": quantization}  # on the GPU if any
            models.append(AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=remote, **quantized))
        except (OSError, ValueError) as error:
            fix = "pass the folder a trainer saved (save_pretrained)"
            from fastdpo.train.loading import is_adapter_folder

            if is_adapter_folder(folder):
                fix = ("an adapter's base model (base_model_name_or_path in its adapter_config.json) is found from "
                       "the directory you trained in: run from there, or edit that path")  # fmt: skip
            raise ConfigError(f"cannot load {folder} ({str(error).splitlines()[0]})", column=name, fix=fix) from error
        if quantization is None:  # (bitsandbytes places a quantized model on the GPU as it loads it)
            models[-1].to(device)
    policy, reference = models
    tokenizer = load_tokenizer(args.policy, args.reference, trust_remote_code=remote)
    try:  # as the trainers check it: the same vocabulary size, and the same tokenizer where one is saved with it
        check_reference(policy, reference, tokenizer)
    except ConfigError as error:
        raise error.but(column="--reference") from None
    context = model_context(policy, reference)
    if args.prompts == "builtin":  # (sized in the models' context and tokens)
        prompts = builtin_prompts(context, tokenizer)
    if args.limit is not None:
        prompts, checkers = prompts[: args.limit], None if checkers is None else checkers[: args.limit]
    for name, prompt in prompts:  # before the pairs: a prompt compare() cannot take is named first (it checks again)
        _checked_prompt_ids(tokenizer, name, prompt, context, _vocabulary(policy, reference))
    # the pairs first: what they cannot do (no chat template, every prompt past the context) before any answer
    cut = {"max_length": recorded.get("max_length"), "truncation_mode": recorded.get("truncation_mode", "keep_start")}
    if args.pairs and cut["max_length"] is not None:
        print(f"--pairs: sequences cut as the policy's run cut them (max_length {cut['max_length']}, "
              f"{cut['truncation_mode']})")  # fmt: skip
    # the pairs the run's trainer dropped (its data_filter), its displacement watch's margin
    kept = {"data_filter": "none" if recorded.get("data_filter") == "none" else "drop",
            "displacement_margin": recorded.get("displacement_margin", 0.1)}  # fmt: skip
    pairs = None if not args.pairs else pair_metrics(policy, reference, tokenizer, args.pairs, beta=args.beta, **cut,
                                                     **kept)  # fmt: skip
    rows = compare(policy, reference, tokenizer, prompts, beta=args.beta, samples=args.samples,
                   max_new_tokens=args.max_new_tokens, checkers=checkers, seed=args.seed)  # fmt: skip
    settings = {"samples": args.samples, "max_new_tokens": min(args.max_new_tokens, max(1, context // 4)),
                "seed": args.seed, "prompts": args.prompts, "policy": args.policy, "reference": args.reference,
                "quantization": key, "pairs": source, "pairs_split": split if source else None,
                "pairs_held_out": dict(zip(("eval_fraction", "seed"), held[:2], strict=True)) if held else None,
                "pairs_config": config, "pairs_columns": args.columns, "pairs_cut": cut if source else None,
                **(kept if source else {})}  # fmt: skip
    print(write_report(args.out, rows, pairs, args.beta, settings))
    print(f"report: {args.out}/compare.{{md,html,json}}")
    return 0
