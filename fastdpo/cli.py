"""The ``fastdpo`` command: train from a YAML config whose every field a flag can override; inspect the setup.

    fastdpo dpo --config run.yaml [--beta 0.2 ...] [--overwrite] [--debug]
    fastdpo sft --config run.yaml [...]
    fastdpo env [--json]
    fastdpo data check|stats DATA [--columns JSON] [--tokenizer T] [--max-length N --truncation-mode M (check)] [--json]
                                  [--limit N]
    fastdpo data filter DATA OUT [--drop REASONS] [--where 'chosen_score >= 8'] [--tokenizer T] [--max-length N]
                                 [--truncation-mode M]
    fastdpo data pairs DATA OUT [--strategy best_vs_worst] [--margin M]     (rated completions → pairs)
    fastdpo data split DATA TRAIN_OUT EVAL_OUT [--test-size 0.1] [--seed 42] (held out by prompt)

A config is flat, as ``trl dpo --config`` takes it: the run's own keys (``RunArguments``: the model, the data and
what to do with it) next to every field of ``DPOConfig`` / ``SFTConfig`` (fastdpo's configs, which carry TRL's
names and defaults), and TRL's LoRA and bitsandbytes keys (``use_peft``, ``lora_r``, ``load_in_4bit``, ...:
``fastdpo.cli_model``). Precedence: flags, then the YAML, then the defaults. An unknown key fails with the close
match. The run directory (``output_dir``) gets:

- ``config.yaml``: every field as resolved (what ran, re-runnable with ``--config``);
- ``metrics.jsonl``: one JSON object per log (train and eval), with its step;
- ``data_quality.md`` / ``.json`` (DPO): ``fastdpo.data.check_preferences`` of the training data, and the rows
  removed (``data_filter: drop`` removes the rows with a "drop" reason, counted and warned about, and those the
  preparation refuses for one, from the train and eval splits (``fastdpo.data.refused``); ``none`` keeps them, and
  the trainer then drops only what TRL would); none with ``dataset_streaming``;
- ``dropped_rows.json``: the rows tokenization dropped, by split and reason, by the data file's rows (DPO and SFT; a
  stream's once read, numbered as read, and the rows its dataloader workers read under splits of their own,
  ``train (dataloader worker N)``, numbered among the rows each read);
- ``plots/*.png``: loss, ``rewards/margins``, ``rewards/accuracies`` (train and eval), refreshed at each evaluation
  and at the end;
- the Trainer's checkpoints and the final model.

``data`` writes ``.jsonl``, ``.parquet`` or ``.csv`` files, each with ``.<OUT>.dropped.json`` beside it (what was
left out, and why), never over its input and never over an existing file without ``--overwrite``. An existing,
non-empty run directory is not written into without ``--overwrite``; nothing is written before the trainer is built
(data loaded, tokenized, checked), so a run that fails on its data leaves no directory behind. ``--resume`` goes on
in its run directory from the last complete checkpoint (``--resume PATH``: that one), with the settings
``config.yaml`` recorded (``fastdpo.cli_resume`` says which may change); ``metrics.jsonl`` keeps the lines up to the
checkpoint's step. The first Ctrl-C (SIGINT) or SIGTERM finishes the optimizer step under way, saves a checkpoint of
it and exits with status 128 + the signal's number (130, 143), without the final model; a second one stops at once
(``fastdpo.train.interrupt``). Errors are one line on stderr (``fastdpo: error: ...``) and exit status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import os
import re
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fastdpo.atomic import refuse_non_empty, run_lock
from fastdpo.cli_checks import check_checkpointing, check_evaluation, check_reporting, check_scheduler
from fastdpo.cli_data import add_data_parser, run_data
from fastdpo.cli_errors import in_cli_terms
from fastdpo.cli_mixture import MixtureArguments, card_datasets, data_prints, local_paths, settle_mixture
from fastdpo.cli_model import (
    TRL_KEYS,
    AdapterArguments,
    environment,
    loaded_splits,
    merge_model_keys,
    peft_and_quantization,
    streamed_splits,
    without_trl_defaults,
)
from fastdpo.cli_output import speaking
from fastdpo.cli_values import (
    _aliases_settled,
    _json_dict,
    _ListOrNull,
    _none_word,
    _or_null,
    _other_command,
    _scalar_problem,
    _unique_keys_loader,
    settle_data_filter,
)
from fastdpo.data.hub_config import hub_config
from fastdpo.errors import ConfigError, DataError, offline_hint

logger = logging.getLogger("fastdpo")


@dataclass
class RunArguments(MixtureArguments, AdapterArguments):
    """The run's own keys (beside the trainer config's); LoRA and quantization: ``fastdpo.cli_model``."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "the policy: a folder or a hub name"})
    ref_model_name_or_path: str | None = field(default=None, metadata={"help": "DPO: a separate reference model"})
    dataset_name: str | None = field(default=None, metadata={"help": "a data file, a folder of them, or a hub name"})
    dataset_train_split: str = field(default="train", metadata={"help": "the split to train on"})
    dataset_test_split: str | None = field(default=None, metadata={"help": "a split of the dataset to evaluate on"})
    dataset_config: str | None = field(default=None, metadata={"help": "a hub dataset's configuration name"})
    eval_fraction: float | None = field(
        default=None, metadata={"help": "hold out this fraction of the rows by prompt (no prompt in both parts)"}
    )
    dataset_columns: dict | None = field(
        default=None, metadata={"help": 'column names in the data, e.g. {"prompt": "question"}'}
    )
    data_filter: str = field(default="drop", metadata={"help": "'drop' rows with a drop reason, or 'none'"})
    dataset_streaming: bool = field(
        default=False, metadata={"help": "read the data as training goes (needs max_steps; no quality report)"}
    )
    ignore_bias_buffers: bool = field(default=False, metadata={"help": "DDP: the model's bool buffers not synced"})
    # TRL's ModelConfig keys for loading the model, which its scripts put in model_init_kwargs (whose own keys win)
    model_revision: str = field(default="main", metadata={"help": "the model's branch, tag or commit (hub)"})
    dtype: str | None = field(default=None, metadata={"help": "'float32' (unset), 'bfloat16', 'float16' or 'auto'"})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. 'sdpa', 'flash_attention_2'"})


COMMANDS = {"dpo": "DPOConfig", "sft": "SFTConfig"}


def main(argv: list[str] | None = None) -> int:
    with speaking():  # (fastdpo's warnings as one line each, others' notices quiet; as it was again after)
        return _main(sys.argv[1:] if argv is None else list(argv))


def _main(argv: list[str]) -> int:
    if argv[:1] in (["quickstart"], ["compare"], ["sweep"]):  # their own parsers (fastdpo.quickstart, ...)
        from fastdpo.compare_cli import main as compare
        from fastdpo.quickstart import main as quickstart
        from fastdpo.sweep import main as sweep

        try:
            return {"quickstart": quickstart, "compare": compare, "sweep": sweep}[argv[0]](argv[1:])
        except (Exception, KeyboardInterrupt) as error:
            return _failed(error, argv[0], debug="--debug" in argv)
    parser = _parser()
    known, rest = parser.parse_known_args(argv)
    if known.command == "data" and rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if known.command is None:
        parser.print_help()
        return 2
    try:
        if known.command == "data":
            return run_data(known)
        if known.command == "env":
            if rest:
                raise ConfigError(f"unexpected arguments {rest}", column="env", fix="fastdpo env [--json]")
            print(environment(as_json=known.json))
            return 0
        return _train(known, rest)
    except (Exception, KeyboardInterrupt) as error:
        return _failed(error, known.command, debug=known.debug)


def _failed(error: BaseException, command: str, *, debug: bool) -> int:
    """One line on stderr and the exit status for what stopped a command (``--debug``: the traceback instead): 2
    for the errors that name their fix, 130 for Ctrl-C, 1 for anything else (its type and first line)."""
    if debug:
        raise error
    if isinstance(error, KeyboardInterrupt):
        print("fastdpo: interrupted", file=sys.stderr)
        return 130
    if isinstance(error, (ConfigError, DataError, OSError)):
        print(f"fastdpo: error: {in_cli_terms(error, trains=command in COMMANDS)}", file=sys.stderr)
        return 2
    said = (str(error).strip().splitlines() or [""])[0][:300]
    hint = offline_hint(error)
    if hint:  # (httpx's ConnectError of push_to_hub's repository, offline: the error alone)
        print(
            f"fastdpo: error: {type(error).__name__}: {said} — the hub could not be reached (push_to_hub, a hub "
            f"name): check the connection, or set push_to_hub: false{hint}",
            file=sys.stderr,
        )
        return 2
    print(f"fastdpo: error: {type(error).__name__}: {said} (--debug shows the traceback)", file=sys.stderr)
    return 1


class _Once(argparse.Action):
    """An option given once: a second ``--config`` replaced the first, unsaid."""

    def __call__(self, parser, namespace, values, option_string=None):
        if getattr(namespace, self.dest) is not None:
            parser.error(f"{option_string} given twice ({getattr(namespace, self.dest)}, {values}): give one")
        setattr(namespace, self.dest, values)


def _parser() -> argparse.ArgumentParser:
    from fastdpo import __version__

    parser = argparse.ArgumentParser(prog="fastdpo", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--version", action="version", version=f"fastdpo {__version__}")
    commands = parser.add_subparsers(dest="command")
    for name, config in COMMANDS.items():
        sub = commands.add_parser(
            name,
            add_help=False,
            help=f"train ({name.upper()}) from a YAML config",
            description=f"Train with fastdpo's {config}. Every field of RunArguments and {config} can be set in "
            f"the YAML file or as --field value (flags win); see fastdpo.cli's docstring for the run directory.",
        )
        sub.add_argument("-h", "--help", action=_HelpWithFields, config=config)
        sub.add_argument("--config", type=Path, action=_Once,
                         help="the YAML file (optional: every field can be a flag)")  # fmt: skip
        sub.add_argument("--overwrite", action="store_true", help="write into an existing run directory")
        sub.add_argument("--resume", nargs="?", const=True, metavar="CHECKPOINT",
                         help="go on from the last complete checkpoint in output_dir (or from CHECKPOINT)")  # fmt: skip
        sub.add_argument("--debug", action="store_true", help="show tracebacks")
    commands.add_parser("quickstart", help="SFT then DPO of a tiny model on a built-in task, with a before/after "
                        "report (fastdpo quickstart -h)")  # fmt: skip
    commands.add_parser("compare", help="a policy against its reference, answer by answer: rewards, KL estimate, "
                        "checker, edge-case prompts; markdown and HTML (fastdpo compare -h)")  # fmt: skip
    commands.add_parser("sweep", help="one DPO run per beta on a cached reference, compared on held-out pairs, "
                        "with a recommended beta (fastdpo sweep -h)")  # fmt: skip
    env = commands.add_parser("env", help="versions, device, head implementation per dtype, lean kernels, C++ packer")
    env.add_argument("--json", action="store_true")
    env.add_argument("--debug", action="store_true")
    add_data_parser(commands)
    return parser


# ------------------------------------------------------------------------------------------------------ training


def _train(known: argparse.Namespace, flags: list[str]) -> int:
    import shlex

    from fastdpo.train.interrupt import TrainingInterrupted

    try:
        run_training(known, flags)
    except TrainingInterrupted as stop:  # the first SIGINT/SIGTERM: a checkpoint, and no final model
        config = ["--config", str(known.config)] if known.config else []
        again = shlex.join(["fastdpo", known.command, *config, *flags, "--resume"])
        saved = f"saved {stop.checkpoint}" if stop.checkpoint else "no checkpoint of it was saved"
        print(f"fastdpo: stopped by {signal.Signals(stop.signum).name} after step {stop.step}: {saved}; "
              f"resume with: {again}", file=sys.stderr)  # fmt: skip
        return 128 + stop.signum
    except KeyboardInterrupt:  # a second one (or one before training): stopped at once
        from fastdpo.cli_resume import stopped_at_once

        print(stopped_at_once(getattr(known, "run_dir", None)), file=sys.stderr)
        return 130
    return 0


def load_config(known: argparse.Namespace, flags: list[str]):
    """``(RunArguments, DPOConfig | SFTConfig)`` of ``known.config`` (YAML) overridden by ``flags``."""
    import yaml

    from fastdpo.train import DPOConfig, SFTConfig

    config_cls = DPOConfig if known.command == "dpo" else SFTConfig
    if known.config is None:  # flags alone, as trl dpo takes them
        return _resolve(config_cls, {}, flags)
    if not known.config.is_file():
        raise ConfigError(f"{known.config}: no such file", column="--config", fix="pass the path of a YAML file")
    raw = known.config.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ConfigError(f"{known.config}: line {line} is not UTF-8 (byte {raw[error.start]:#04x})", column="config",
                          fix="save the file as UTF-8 (an editor's 'save with encoding')") from None  # fmt: skip
    try:
        values = yaml.load(text, Loader=_unique_keys_loader(known.config)) or {}
    except yaml.YAMLError as error:
        raise _yaml_error(known.config, error, text) from None
    if not isinstance(values, dict):
        raise ConfigError(f"{known.config} holds a {type(values).__name__}, not a mapping of field: value",
                          column="config")  # fmt: skip
    return _resolve(config_cls, values, flags)


def _yaml_error(path: Path, error, text: str) -> ConfigError:
    """PyYAML's error as one line naming where and what (its first line alone named neither: "while scanning for
    the next token"; a control character's, the reader's, gave an offset into the text)."""
    import yaml

    if isinstance(error, yaml.reader.ReaderError):
        before = text[: error.position]
        line, column = before.count("\n") + 1, len(before) - before.rfind("\n")
        column -= line == 1 and text.startswith("\ufeff")  # (a BOM, which editors and PyYAML's scanner do not count)
        return ConfigError(f"{path} is not valid YAML: line {line}, column {column}: character "
                           f"{chr(error.character)!r} ({error.reason})", column="config",
                           fix="remove it, or write it as an escape (\\x..) in double quotes")  # fmt: skip
    mark, problem = getattr(error, "problem_mark", None), getattr(error, "problem", None)
    if mark is None or not problem:
        return ConfigError(f"{path} is not valid YAML ({str(error).splitlines()[0]})", column="config")
    fix = "indent with spaces: YAML takes no tabs" if "\\t" in problem or "\t" in problem else None
    return ConfigError(f"{path} is not valid YAML: line {mark.line + 1}, column {mark.column + 1}: {problem}"
                       + (f" ({error.context})" if getattr(error, "context", None) else ""), column="config",
                       fix=fix)  # fmt: skip


def run_training(known: argparse.Namespace, flags: list[str], *, evaluated_after: bool = False):
    """``fastdpo dpo|sft``: the run directory, training, the final model; returns the trainer. ``evaluated_after``:
    the caller evaluates the held-out rows itself (``fastdpo sweep``), whatever ``eval_strategy`` says. One run at
    a time in a run directory (``run_lock``: two started together mixed their logs and models)."""
    run_args, args = load_config(known, flags)
    with run_lock(Path(args.output_dir)):
        return _run_training(known, run_args, args, evaluated_after)


def _run_training(known: argparse.Namespace, run_args: RunArguments, args, evaluated_after: bool):
    import yaml

    from fastdpo.cli_resume import (
        FINGERPRINT,
        MODEL_FINGERPRINT,
        checkpoint_to_resume,
        is_own,
        models_fingerprint,
        refuse_changed_config,
        refuse_changed_data,
        refuse_replacing_the_config,
        stale_checkpoints,
        stale_outputs,
        when_training_begins,
    )

    read = check_evaluation(run_args, args, evaluated_after=evaluated_after)  # (the splits as they are read)
    check_scheduler(args)
    check_checkpointing(args)
    check_reporting(args)
    out = known.run_dir = Path(args.output_dir)  # (a stop before training names its checkpoints: _train)
    resolved = _resolved_config(run_args, args)  # as given (building the trainer may adjust args: a stream's)
    if read.dataset_test_split and not run_args.dataset_test_split:  # (TRL's default split, read: compare reads it)
        resolved["dataset_test_split"] = read.dataset_test_split
    merge_model_keys(run_args, args)  # (after: config.yaml keeps dtype, ... and model_init_kwargs apart, as given)
    resume = getattr(known, "resume", None) or args.resume_from_checkpoint  # (TRL's key, as its scripts read it)
    resume = True if str(resume).lower() == "true" else None if str(resume).lower() == "false" else resume  # YAML's
    checkpoint, foreign, fingerprint = None, False, data_prints(run_args)
    models = models_fingerprint(run_args)
    if resume:  # into its own, non-empty run directory: that is the point
        asked = "--resume" if getattr(known, "resume", None) else "resume_from_checkpoint: true in the config"
        checkpoint = checkpoint_to_resume(out, resume, asked)
        foreign = not is_own(out, checkpoint)
        recorded = Path(checkpoint).resolve().parent / "config.yaml"  # (the settings of the run it goes on with)
        recorded = recorded if foreign and recorded.is_file() else out / "config.yaml"
        refuse_changed_config(recorded, resolved, overwrite=known.overwrite)
        refuse_changed_data(recorded.parent / FINGERPRINT, fingerprint, overwrite=known.overwrite,
                            split=run_args.dataset_train_split)  # fmt: skip
        refuse_changed_data(recorded.parent / MODEL_FINGERPRINT, models, overwrite=known.overwrite, what="model")
        if foreign:  # another run's checkpoint: out must be free too
            refuse_non_empty(out, overwrite=known.overwrite, column="output_dir", what="the run directory ",
                             fix="resume into an empty or new output_dir, or pass --overwrite")  # fmt: skip
    else:
        model_folder = run_args.model_name_or_path and Path(run_args.model_name_or_path).is_dir() and out.is_dir()
        in_place = model_folder and Path(run_args.model_name_or_path).resolve() == out.resolve()
        refuse_non_empty(
            out,
            overwrite=known.overwrite,
            column="output_dir",
            what="the run directory (the model_name_or_path folder: the trained model would replace the weights it "
            "starts from) "
            if in_place
            else "the run directory ",
            fix="set another output_dir (--overwrite replaces them)"
            if in_place
            else "pass --overwrite, or set another output_dir; or --resume to go on from its last checkpoint",
        )
        if in_place:
            print(f"fastdpo: training in place: the trained model replaces the weights in {out}", file=sys.stderr)
    refuse_replacing_the_config(known.config, out)
    inputs = (run_args.model_name_or_path, run_args.ref_model_name_or_path, run_args.dataset_name, known.config,
              getattr(args, "ref_cache_dir", None), *local_paths(run_args))  # fmt: skip
    stale = stale_checkpoints(out, checkpoint, overwrite=known.overwrite, keep=inputs)  # a later --resume's pick
    # nothing is written before the trainer is built: a run that fails on its data or model leaves no directory to
    # --overwrite next time
    # (resumed from another run's checkpoint: the log that out holds is not this run's)
    trainer, files, numbering = _build_trainer(known.command, read, args, out, restart_log=foreign)
    from fastdpo.atomic import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    # (without resume_from_checkpoint: a rerun of this config starts the run, as a run started with --resume's does)
    config_text = yaml.safe_dump({key: value for key, value in resolved.items() if key != "resume_from_checkpoint"},
                                 sort_keys=True)  # fmt: skip
    # the stale checkpoints go, and config.yaml is written, once training begins (a checkpoint that fails to load,
    # a run that fails to start, leave the directory's checkpoints and config.yaml as they were: in agreement)
    settings = {"config.yaml": config_text, **({FINGERPRINT: json.dumps(fingerprint, indent=1)} if fingerprint else {}),
                **({MODEL_FINGERPRINT: json.dumps(models, indent=1)} if models else {})}  # fmt: skip
    # (resumed into another run's directory with --overwrite: that run's outputs go too, an adapter beside the new
    # model; not the files this run writes before training begins, its quality report: the replaced run's rewritten)
    outputs = [] if resume and not foreign else stale_outputs(out, overwrite=known.overwrite, keep=inputs)
    outputs = [path for path in outputs if path.name not in files]
    when_training_begins(trainer, stale, out, settings, outputs)
    # the rows tokenization dropped (those TRL drops too: e.g. no completion token left after truncation), as the
    # data file numbers them
    files["dropped_rows.json"] = json.dumps(numbering(trainer.dropped_rows), indent=1)
    # the main process writes the run's files (the others took no run_lock: one of a second run refused by the lock
    # rewrote a running run's data_quality.json before it failed)
    main = trainer.is_world_process_zero()
    for name, text in files.items() if main else ():
        atomic_write(out / name, text)
    try:
        trainer.train(resume_from_checkpoint=checkpoint)
    finally:  # (a stream's rows are counted as they are read: written when training stops, a stop by signal too)
        if main:
            atomic_write(out / "dropped_rows.json", json.dumps(numbering(trainer.dropped_rows), indent=1))
    trainer.save_model(str(out))
    return trainer


def _fields_parser(config_cls):
    from transformers import HfArgumentParser

    return HfArgumentParser((RunArguments, config_cls))


class _HelpWithFields(argparse.Action):
    """``fastdpo dpo|sft --help``: the command's own options, then every field a config may set (as ``trl dpo
    --help`` lists them)."""

    def __init__(self, option_strings, dest, config: str, **kwargs):
        super().__init__(option_strings, dest, nargs=0, help="show this help, with every config field, and exit")
        self.config = config

    def __call__(self, parser, namespace, values, option_string=None):
        import fastdpo.train

        fields = _fields_parser(getattr(fastdpo.train, self.config)).format_help()
        listed = fields[fields.index("options:") :].split("\n", 2)[2]  # its options, less its own -h line
        print(parser.format_help() + f"\nfields ({self.config} and the run's keys; in the YAML file, or as --field "
              "value, flags winning):\n" + listed)  # fmt: skip
        parser.exit()


def _resolve(config_cls, values: dict, flags: list[str]):
    """``(RunArguments, config)`` from the YAML ``values`` overridden by ``flags``; unknown keys fail."""
    from transformers.hf_argparser import string_to_bool  # (a bool field's flag type)

    listing = f"fastdpo {'sft' if config_cls.__name__ == 'SFTConfig' else 'dpo'} --help lists the fields"
    values, flags = without_trl_defaults(values, flags)
    known = {f.name for cls in (RunArguments, config_cls) for f in dataclasses.fields(cls) if f.init}
    for key in values:
        if not isinstance(key, str):  # (1: 2, true: x; difflib failed on them)
            raise ConfigError(f"{key!r} ({type(key).__name__}) is no field name", column="config",
                              fix=f"keys are field names; {listing}")  # fmt: skip
        if key not in known:
            close = difflib.get_close_matches(key, known, n=1)
            hint = TRL_KEYS.get(key) or _other_command(key, config_cls) or (
                f"did you mean {close[0]!r}?" if close else listing)  # fmt: skip
            raise ConfigError(f"unknown field {key!r} in the config", column=key, fix=hint)
    # the annotations as written (HfArgumentParser rewrites a dataclass field's type, Optional[float] to float)
    hints = {
        name: str(hint).replace("typing.", "").replace(" ", "")
        for cls in (RunArguments, config_cls)
        for klass in reversed(cls.__mro__)
        for name, hint in vars(klass).get("__annotations__", {}).items()
    }
    if "debug" in values and not isinstance(values["debug"], (str, list)):  # (it failed inside train(), files written)
        raise ConfigError(f"expected TrainingArguments' debug options, got {values['debug']!r}", column="debug",
                          fix="'underflow_overflow' or 'tpu_metrics_debug', or remove it; fastdpo's --debug "
                          "(tracebacks) is a command-line flag")  # fmt: skip
    if isinstance(values.get("resume_from_checkpoint"), bool):  # TRL's scripts: true resumes the last checkpoint
        values = {**values, "resume_from_checkpoint": str(values["resume_from_checkpoint"]).lower()}
    for key, value in values.items():
        expected = _scalar_problem(hints.get(key, ""), value)
        if expected:
            raise ConfigError(f"expected {expected}, got {type(value).__name__} {value!r}", column=key, fix=listing)
    values = _aliases_settled(values, flags)
    parser = _fields_parser(config_cls)
    # a list field given one string or number in the YAML (lora_modules_to_save: norm; loss_weights: 1.0) is that
    # one item, as its flag makes it: PEFT walked the string letter by letter (every module ending in n, o, r or m
    # trained in full). Not where a string means something of its own: a field that takes a string too (debug's
    # space-separated options, report_to), and lora_target_modules, whose string PEFT reads as a regular expression
    # (as TRL passes it)
    takes_string = {name for name, hint in hints.items() if "str|" in hint or "|str" in hint} | {"lora_target_modules"}
    lists = {action.dest for action in parser._actions if action.nargs in ("+", "*")} - takes_string
    values = {key: [value] if key in lists and isinstance(value, (str, int, float)) and not isinstance(value, bool)
              else value for key, value in values.items()}  # (a number too: loss_weights: 1.0)  # fmt: skip
    parser.set_defaults(**values)

    def error(message: str):  # argparse's own error prints the whole usage and exits: one line instead
        named = re.match(r"argument --([\w-]+)", message)
        field = named[1].replace("-", "_") if named else None
        if field in values and not any(f.split("=")[0] in (f"--{field}", f"--{named[1]}") for f in flags):
            raise ConfigError(message.split(": ", 1)[-1], column=field, fix="fix its value in the YAML file")
        raise ConfigError(message, column="flags", fix=listing)

    parser.error = error
    nullable = {name for name, hint in hints.items() if "None" in hint or "Optional" in hint}
    for action in parser._actions:
        if action.dest in values:  # the YAML may give what a flag must otherwise give
            action.required = False
        if action.type is dict:  # a dict field as a flag: JSON text (or null, where the field may be None)
            action.type = _json_dict if action.dest not in nullable else _or_null(_json_dict)
        elif action.dest == "report_to":  # its own word for no integration is 'none' (a string, not None)
            action.type = _none_word
        elif action.dest in nullable and action.type in (int, float, str, string_to_bool):  # --field null unsets
            # what the YAML set (bool | None: completion_only_loss, eval_packing, bf16)
            action.type = _or_null(action.type)
            if action.nargs in ("+", "*"):  # a list field: null alone unsets it
                action.__class__ = _ListOrNull
    try:
        run_args, args, rest = parser.parse_args_into_dataclasses(args=flags, return_remaining_strings=True)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:  # the configs' own checks (transformers', TRL's): one line
        raise ConfigError(" ".join(str(error).split()), column="config", fix=listing) from None  # (all its lines)
    if rest:
        names = [r.split("=")[0][2:] for r in rest if r.startswith("--")]  # (--torch_dtype=bfloat16: its name)
        close = difflib.get_close_matches(names[0], known, n=1) if names else []
        hint = (TRL_KEYS.get(names[0]) or _other_command(names[0], config_cls) if names else None) or (
            f"did you mean --{close[0]}?" if close else listing)  # fmt: skip
        raise ConfigError(f"unknown flags {rest}", column="flags", fix=hint)
    if run_args.model_name_or_path is None or (run_args.dataset_name is None and not run_args.datasets):
        raise ConfigError("a run needs model_name_or_path and dataset_name (or datasets, a mixture)", column="config",
                          fix="set both in the YAML file or as flags")  # fmt: skip
    settle_mixture(run_args)
    if run_args.dataset_columns is not None and not isinstance(run_args.dataset_columns, dict):
        raise ConfigError("must map fastdpo's column names to the data's", column="dataset_columns",
                          fix='e.g. {"prompt": "question"}')  # fmt: skip
    settle_data_filter(run_args, args, values, flags)
    for name in ("model_name_or_path", "ref_model_name_or_path", "dataset_name"):  # ~ as output_dir takes it
        path = getattr(run_args, name)
        if isinstance(path, str) and path.startswith("~"):
            setattr(run_args, name, os.path.expanduser(path))
    return run_args, args


def _resolved_config(run_args: RunArguments, args) -> dict:
    from fastdpo.train.common import config_values

    # (no hub_token: a secret, out of config.yaml; a rerun logs in as the run did, by its login or HF_TOKEN)
    values = {k: v for k, v in config_values(args).items() if _plain(v) and k != "hub_token"}
    return {**dataclasses.asdict(run_args), **getattr(run_args, "as_given", {}), **values}  # (a mixture's: as given)


def _plain(value) -> bool:
    return value is None or isinstance(value, (str, int, float, bool, list, dict))


def _splits(command: str, run_args: RunArguments, args, rows: dict) -> tuple:
    """(train, eval or None, the run directory's data files): streams, or the rows loaded and prepared."""
    if run_args.dataset_streaming:  # read as training goes: no quality report (it needs every row)
        return (*streamed_splits(command, run_args, getattr(args, "dataset_text_field", None)), {})
    splits = loaded_splits(command, run_args, args.seed, getattr(args, "dataset_text_field", ""), numbering=rows)
    if command == "sft":  # (config.yaml keeps the field as given)
        args.dataset_text_field = "text"  # prepared: its column is named text now
    return splits


def _build_trainer(command: str, run_args: RunArguments, args, out: Path, *, restart_log: bool = False):
    """The trainer, the files (name → text) the run directory gets before training, and a function giving the
    trainer's ``dropped_rows`` by the data file's rows. ``restart_log``: the ``metrics.jsonl`` in ``out`` starts
    over, even when resuming."""
    import torch

    from fastdpo.data.source_rows import numbered_as, source_dropped
    from fastdpo.data.written import row_warnings_said
    from fastdpo.run_files import RunFiles  # transformers' Trainer (seconds to import): only for training
    from fastdpo.train import DPOTrainer, SFTTrainer
    from fastdpo.train.loading import is_adapter_folder, refuse_missing_folder

    for column in ("model_name_or_path", "ref_model_name_or_path"):  # before the data is read, which takes a while
        if getattr(run_args, column):
            refuse_missing_folder(getattr(run_args, column), column)
    model = run_args.model_name_or_path
    if run_args.use_peft and model and is_adapter_folder(model):  # (a LoRA run's folder)
        raise ConfigError(f"{model} holds a LoRA adapter, which the run trains on; use_peft "
                          "would add a new one beside it", column="use_peft",
                          fix="drop --use_peft to go on training that adapter, or merge it into its base first "
                          "(peft's merge_and_unload, then save_pretrained) and give that folder")  # fmt: skip
    rows: dict = {}  # (the file's row of each row the trainer is given, where the command dropped some)
    with hub_config(run_args.dataset_config):  # (a hub dataset's configuration, for each split read)
        train, evaluation, files = _splits(command, run_args, args, rows)
    peft_config, quantization_config = peft_and_quantization(run_args, args.model_init_kwargs)
    options = {"args": args, "train_dataset": train, "eval_dataset": evaluation,
               "callbacks": [RunFiles(out, restart=restart_log)], "peft_config": peft_config,
               "quantization_config": quantization_config}  # fmt: skip
    # a local folder by its absolute path (links kept), of a hub id's shape too (runs/sft: transformers loads the
    # folder): a LoRA run's adapter_config.json then names a base found from anywhere; a hub name stays as given
    model, reference = (os.path.abspath(name) if name and Path(name).exists() else name
                        for name in (run_args.model_name_or_path, run_args.ref_model_name_or_path))  # fmt: skip
    if command != "dpo" and reference is not None:
        raise ConfigError("SFT has no reference model", column="ref_model_name_or_path", fix="remove it")

    def numbering(dropped: dict) -> dict:
        with numbered_as(rows):
            return source_dropped(dropped)

    with numbered_as(rows), row_warnings_said():  # (its warnings and errors name a row as the data file numbers
        # it; the rows' counted warnings were given as the data was read)
        if command == "dpo":
            trainer = DPOTrainer(model, ref_model=reference, **options)
        else:
            trainer = SFTTrainer(model, **options)
    trainer.card_dataset = card_datasets(run_args)  # (the model card's hub names; a local file has none)
    if run_args.ignore_bias_buffers:  # (as TRL's scripts: DDP leaves them out, a mask's bool "bias" buffer its error)
        trainer.model._ddp_params_and_buffers_to_ignore = [
            name for name, buffer in trainer.model.named_buffers() if buffer.dtype == torch.bool
        ]
    return trainer, files, numbering


if __name__ == "__main__":
    sys.exit(main())
