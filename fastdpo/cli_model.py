"""The LoRA and quantization keys of ``fastdpo dpo|sft`` configs: TRL 1.16's ``ModelConfig`` names and defaults.

``use_peft: true`` trains a LoRA adapter (``lora_r``, ``lora_alpha``, ``lora_dropout``, ``lora_target_modules``,
``lora_modules_to_save``, ``use_rslora``, ``use_dora``; PEFT picks the target modules for known architectures when
``lora_target_modules`` is unset), as ``trl dpo --use_peft`` does; the reference is then the base model.
``load_in_4bit`` / ``load_in_8bit`` load the model with bitsandbytes (``bnb_4bit_quant_type``,
``use_bnb_nested_quant``; 4-bit products in ``model_init_kwargs``' ``dtype``, float32 unless set), and need
``use_peft``: a quantized model trains through adapters only. ``streamed_splits``: the data of a run with
``dataset_streaming`` (TRL's ``ScriptArguments`` name), read as training goes. ``check_evaluation``: the held-out
rows and ``eval_strategy`` agree. ``TRL_KEYS``: what to write instead of TRL keys fastdpo has no field for.
``environment``: what ``fastdpo env`` reports.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import platform
from dataclasses import dataclass, field, fields
from importlib import metadata
from pathlib import Path

import torch

from fastdpo.cli_checks import no_assumed_split
from fastdpo.cli_mixture import mixture_rows
from fastdpo.errors import ConfigError, DataError

logger = logging.getLogger("fastdpo")


@dataclass
class AdapterArguments:
    """LoRA and bitsandbytes quantization, as TRL's ``ModelConfig`` names them."""

    use_peft: bool = field(default=False, metadata={"help": "train LoRA adapters; the reference is the base model"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout"})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "modules to adapt (default: PEFT's for the architecture)"}
    )
    lora_modules_to_save: list[str] | None = field(default=None, metadata={"help": "modules trained in full"})
    use_rslora: bool = field(default=False, metadata={"help": "rank-stabilized LoRA (alpha / sqrt(r))"})
    use_dora: bool = field(default=False, metadata={"help": "weight-decomposed LoRA (DoRA)"})
    load_in_8bit: bool = field(default=False, metadata={"help": "load the model in 8 bits (bitsandbytes)"})
    load_in_4bit: bool = field(default=False, metadata={"help": "load the model in 4 bits (bitsandbytes): QLoRA"})
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "'nf4' or 'fp4'"})
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "quantize the quantization constants too"})


# TRL scripts' keys that fastdpo has no field for: what to write instead (an unknown key's closest field misleads:
# model_revision is not hub_revision, torch_dtype not torch_compile)
TRL_KEYS = {
    "torch_dtype": "dtype (its new name)",
    "lora_task_type": "remove it: fastdpo's adapters are CAUSAL_LM",
    "lora_target_parameters": "not supported: LoRA adapts modules (lora_target_modules)",
    "bnb_4bit_quant_storage": "not supported: 4-bit weights are stored as bitsandbytes stores them by default",
    "rpo_alpha": "TRL 1.x's RPO is a loss mix: loss_type: [sigmoid, sft] with loss_weights: [1.0, ALPHA]",
    "max_prompt_length": "not a TRL 1.16 DPOConfig field: max_length cuts prompt + completion (truncation_mode)",
    "max_completion_length": "not a TRL 1.16 DPOConfig field: max_length cuts prompt + completion (truncation_mode)",
    "env": "TRL's YAML env: section is not read: set the environment variables in the shell",
    "lora_rank": "lora_r (TRL's name for the rank)",
    "gradient_checkpointing_use_reentrant": "gradient_checkpointing_kwargs: {use_reentrant: false}",
    "warmup_ratio": "warmup_steps, which takes a fraction of the steps below 1 (transformers 5's name for it)",
    # TRL's CLI hands what its parser does not know to `accelerate launch`; fastdpo's command is the script
    **dict.fromkeys(
        (
            "accelerate_config",
            "num_processes",
            "mixed_precision",
            "config_file",
            "num_machines",
            "main_process_port",
            "multi_gpu",
        ),
        "an `accelerate launch` option, which `trl` passes on: launch fastdpo with it, `accelerate launch "
        "--config_file fastdpo/configs/accelerate/ddp.yaml --num_processes N -m fastdpo.cli dpo --config "
        "run.yaml` (ddp, fsdp2, zero3; README, Several processes)",
    ),
    # removed before TRL 1.16 (their close matches mean other things: sync_ref_model turns TR-DPO on)
    "force_use_ref_model": "not a TRL 1.16 field: a ref_model_name_or_path given is used (with a PEFT policy too)",
    "model_adapter_name": "not a TRL 1.16 field: the policy trains its active adapter",
    "ref_adapter_name": "not a TRL 1.16 field: a PEFT policy's reference is its base (adapters off), or "
    "ref_model_name_or_path",
}

# TRL keys fastdpo has no field for, taken where they hold TRL's default, what fastdpo does (recipes write them)
TRL_DEFAULTS = {"lora_task_type": "CAUSAL_LM"}


def without_trl_defaults(values: dict, flags: list[str]) -> tuple[dict, list[str]]:
    """``values`` (the YAML's) and ``flags`` without the ``TRL_DEFAULTS`` keys set to their defaults; set otherwise,
    they are left for ``TRL_KEYS``' refusal."""

    def is_default(key: str | None, text: str) -> bool:  # (a flag's value as written: false in any case)
        default = TRL_DEFAULTS.get(key, ...)
        return default is not ... and (text.lower() == "false" if default is False else text == default)

    values = {key: value for key, value in values.items()
              if not (key in TRL_DEFAULTS and value == TRL_DEFAULTS[key])}  # fmt: skip
    kept, i = [], 0
    while i < len(flags):
        name, equals, inline = flags[i].partition("=")
        key = name[2:] if name.startswith("--") else None
        if equals and is_default(key, inline):  # --key=value
            i += 1
        elif not equals and i + 1 < len(flags) and is_default(key, flags[i + 1]):  # --key value
            i += 2
        else:
            kept.append(flags[i])
            i += 1
    return values, kept


_LORA_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save", "use_rslora",
                "use_dora")  # fmt: skip


def peft_and_quantization(run_args: AdapterArguments, model_init_kwargs: dict | None):
    """``(peft_config, quantization_config)`` for the trainer (None for either when off); ``ConfigError`` for a
    combination that cannot train, a warning for LoRA settings given without ``use_peft``."""
    if run_args.load_in_4bit and run_args.load_in_8bit:
        raise ConfigError("load_in_4bit and load_in_8bit are both set", column="load_in_4bit", fix="pick one")
    quantized = run_args.load_in_4bit or run_args.load_in_8bit
    from fastdpo.train.loading import is_adapter_folder

    model = getattr(run_args, "model_name_or_path", None)
    adapter = bool(model) and is_adapter_folder(model)  # (a LoRA run's folder: its adapter trains on)
    if quantized and not run_args.use_peft and not adapter:
        raise ConfigError("a quantized model trains through adapters only",
                          column="load_in_4bit" if run_args.load_in_4bit else "load_in_8bit",
                          fix="set use_peft: true (QLoRA), or load the model unquantized")  # fmt: skip
    if adapter and not quantized:  # a QLoRA run's adapter, on its base in full precision: other weights, silently
        _, key = run_quantization(run_config(Path(model)), Path(model, "config.yaml"))
        if key:
            logger.warning("%s's run trained its adapter on its base loaded with %s; this run loads the base in full "
                           "precision (other weights than it trained on): add --%s to go on as it trained",
                           model, key, key)  # fmt: skip
    defaults = {f.name: f.default for f in fields(AdapterArguments)}
    ignored = [name for name in _LORA_FIELDS if getattr(run_args, name) != defaults[name]]
    if ignored and not run_args.use_peft:
        logger.warning("%s set but use_peft is false: no adapter is trained, and they are not used", ignored)
    if run_args.bnb_4bit_quant_type not in ("nf4", "fp4"):
        raise ConfigError(f"must be 'nf4' or 'fp4', got {run_args.bnb_4bit_quant_type!r}", column="bnb_4bit_quant_type")
    return (_lora(run_args) if run_args.use_peft else None), (_bnb(run_args, model_init_kwargs) if quantized else None)


def _lora(run_args: AdapterArguments):
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ConfigError("needs the peft package", column="use_peft", fix="pip install 'fastdpo[peft]'") from error
    targets = run_args.lora_target_modules
    if targets == ["all-linear"]:  # (--lora_target_modules all-linear: PEFT's keyword, which it takes as a string)
        targets = "all-linear"
    return LoraConfig(task_type="CAUSAL_LM", r=run_args.lora_r, lora_alpha=run_args.lora_alpha,
                      lora_dropout=run_args.lora_dropout, target_modules=targets,
                      modules_to_save=run_args.lora_modules_to_save, use_rslora=run_args.use_rslora,
                      use_dora=run_args.use_dora, bias="none")  # fmt: skip


def _bnb(run_args: AdapterArguments, model_init_kwargs: dict | None):
    import importlib.util

    from transformers import BitsAndBytesConfig

    column = "load_in_4bit" if run_args.load_in_4bit else "load_in_8bit"
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError("needs the bitsandbytes package", column=column, fix="pip install bitsandbytes")
    if run_args.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    kwargs = model_init_kwargs or {}
    dtype = kwargs.get("dtype", kwargs.get("torch_dtype", "float32"))  # (torch_dtype: the old name, read as dtype)
    compute = dtype if isinstance(dtype, torch.dtype) else getattr(torch, str(dtype), None)
    if not isinstance(compute, torch.dtype):
        raise ConfigError(f"the 4-bit products run in model_init_kwargs' dtype, got {dtype!r}",
                          column="model_init_kwargs", fix="set dtype to float32, bfloat16 or float16")  # fmt: skip
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute,
                              bnb_4bit_quant_type=run_args.bnb_4bit_quant_type,
                              bnb_4bit_use_double_quant=run_args.use_bnb_nested_quant)  # fmt: skip


def merge_model_keys(run_args, args) -> None:
    """TRL's ModelConfig keys (``dtype``, ``attn_implementation``, ``model_revision``) into ``model_init_kwargs``, as
    TRL's scripts merge them: ``model_init_kwargs``' own keys win. A ``dtype`` that names none is said as ``dtype``'s
    (it was said as ``model_init_kwargs``', where it went)."""
    from fastdpo.train.loading import DTYPES

    if run_args.dtype not in (None, "auto", *DTYPES):
        raise ConfigError(f"{run_args.dtype!r} is no dtype", column="dtype",
                          fix=f"use one of {', '.join(map(repr, [*DTYPES, 'auto']))}")  # fmt: skip
    loading = {"revision": None if run_args.model_revision == "main" else run_args.model_revision,
               "dtype": run_args.dtype, "attn_implementation": run_args.attn_implementation}  # fmt: skip
    loading = {key: value for key, value in loading.items() if value is not None}
    if loading:
        args.model_init_kwargs = {**loading, **(args.model_init_kwargs or {})}


def run_config(run_dir: Path) -> dict:
    """The settings a ``fastdpo dpo|sft`` run recorded in ``run_dir/config.yaml``; {} for a folder no run wrote."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        return {}
    import yaml

    keys = yaml.safe_load(path.read_text(encoding="utf-8"))
    return keys if isinstance(keys, dict) else {}


def run_quantization(keys: dict, path: Path):
    """``(BitsAndBytesConfig, key)`` a run loaded its base with, from the settings it recorded (``run_config``; its
    ``config.yaml``'s ``load_in_4bit``/``load_in_8bit`` and the keys beside them; ``path``: that file, for errors),
    or ``(None, None)``: no run wrote them, or the run did not quantize."""
    if not (keys.get("load_in_4bit") or keys.get("load_in_8bit")):
        return None, None
    # (use_peft as the base was loaded for an adapter: a QLoRA adapter continued with load_in_4bit alone records
    # use_peft false, and its folder read again was refused as "a quantized model trains through adapters only")
    keys = {**keys, "use_peft": True}
    run_args = AdapterArguments(**{f.name: keys[f.name] for f in fields(AdapterArguments) if f.name in keys})
    key = "load_in_4bit" if run_args.load_in_4bit else "load_in_8bit"
    try:
        init = {**({"dtype": keys["dtype"]} if keys.get("dtype") else {}), **(keys.get("model_init_kwargs") or {})}
        return peft_and_quantization(run_args, init)[1], key  # (TRL's dtype key, as merge_model_keys merges it)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error.message}", column=error.column, fix=error.fix) from error


def streamed_splits(command: str, run_args, text_field: str | None = None) -> tuple:
    """(train, eval or None) as streams (``dataset_streaming``), their columns renamed as ``dataset_columns`` says,
    lazily (a CSV file's text columns, SFT's ``text_field`` too, read as text). The quality report and its filter
    need every row: skipped, with a warning when ``data_filter`` asks (its ``drop`` drops a stream's refused rows as
    they are read: the config's ``stream_bad_rows``, set by the command line's parsing)."""
    from fastdpo.data import load_stream
    from fastdpo.data.formats import KNOWN_TARGETS
    from fastdpo.data.load import text_columns
    from fastdpo.data.schema import rename_columns
    from fastdpo.data.sft import SFT_COLUMNS
    from fastdpo.data.stream import first_row

    if run_args.eval_fraction is not None:
        fix = "evaluate on a split of its own (dataset_test_split), or drop dataset_streaming"
        raise ConfigError("a stream cannot be split by prompt before it is read", column="eval_fraction", fix=fix)

    def stream(split: str):
        text = (*text_columns(run_args.dataset_columns), *filter(None, [text_field]))
        if run_args.datasets:  # (a mixture: one split, train, as settle_mixture checked)
            data = mixture_rows(run_args, text, streaming=True)[0]
        else:
            data = load_stream(run_args.dataset_name, split=split, text=text)
        present = list(data.column_names or first_row(data, split))
        known = KNOWN_TARGETS if command == "dpo" else SFT_COLUMNS
        return rename_columns(data, run_args.dataset_columns or {}, known, present=present)

    if command == "dpo" and run_args.data_filter == "drop":
        logger.warning("dataset_streaming: the quality report and its filter (data_filter) need every row and are "
                       "skipped (the rows preparation refuses are dropped as they are read, counted in "
                       "dropped_rows.json); run 'fastdpo data check' on a sample of the data for the rest")  # fmt: skip
    with no_assumed_split(run_args):
        evaluation = stream(run_args.dataset_test_split) if run_args.dataset_test_split is not None else None
    return stream(run_args.dataset_train_split), evaluation


def _auto_heads(device: str) -> dict[str, str]:
    """What ``impl="auto"`` of the head ops picks here for bf16 and fp32 inputs (the ops' own choice, asked)."""
    from fastdpo.ops.linear_logprobs import _resolve_impl

    picks = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        hidden, weight = torch.empty(1, 8, dtype=dtype, device=device), torch.empty(4, 8, dtype=dtype, device=device)
        picks[name] = _resolve_impl("auto", hidden, weight)
    return picks


def environment(*, as_json: bool) -> str:
    """What ``fastdpo env`` prints: versions, the device, what the head ops and lean layers run here, the packer."""
    versions = {"python": platform.python_version()}
    for package in ("fastdpo", "torch", "transformers", "accelerate", "datasets", "trl", "peft", "triton",
                    "deepspeed", "liger-kernel", "bitsandbytes"):  # fmt: skip
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.processor() or platform.machine()})"
    try:
        import fastdpo._packer  # noqa: F401

        packer = True
    except ImportError:
        packer = False
    info = {
        "versions": versions,
        "device": device,
        "cuda": cuda,
        "head_impl_auto": _auto_heads("cuda" if cuda else "cpu"),
        "lean_kernels": cuda and versions["triton"] is not None,
        "cpp_packer": packer,
    }
    if as_json:
        return json.dumps(info, indent=1)
    lines = [f"{name:14s} {version or 'not installed'}" for name, version in versions.items()]
    built = "built" if packer else "not built (the Python packer gives the same bins)"
    heads = ", ".join(f"{dtype} → {impl}" for dtype, impl in info["head_impl_auto"].items())
    lean = ("Triton RMSNorm, SiLU product and RoPE kernels" if info["lean_kernels"]
            else "the modules' own ops (the kernels need CUDA and Triton)")  # fmt: skip
    lines += [f"{'device':14s} {device}", f"{'head impl auto':14s} {heads}", f"{'lean layers':14s} {lean}",
              f"{'C++ packer':14s} {built}"]  # fmt: skip
    return "\n".join(lines)


def loaded_splits(command: str, run_args, seed: int, text_field: str = "text", numbering: dict | None = None):
    """(train, eval or None, files): the data loaded and prepared (SFT's text from ``text_field``); for DPO its
    quality report (the files) and the rows it drops (``data_filter``). ``numbering`` gets the file's row of each row
    of the splits (``"train"``, ``"eval"``: ``fastdpo.data.source_rows.numbered_as``'s). An error about a column the
    run's ``dataset_columns`` maps names the data's column (it named fastdpo's: ``'chosen'`` for the file's
    ``good``)."""
    try:
        return _loaded_splits(command, run_args, seed, text_field, numbering)
    except DataError as error:
        theirs = {"text": text_field, **(run_args.dataset_columns or {})}.get(error.column)
        if not isinstance(theirs, str) or theirs == error.column:
            raise
        raise DataError(
            f"{error.message} (the column map's {error.column!r})", row=error.row, column=theirs, fix=error.fix
        ) from None


def _loaded_splits(command: str, run_args, seed: int, text_field: str, numbering: dict | None):
    import functools

    from fastdpo.data import check_preferences, load_data, prepare_preferences, prepare_sft
    from fastdpo.data.formats import rename_preference_columns, warn_preference_labels
    from fastdpo.data.load import text_columns
    from fastdpo.data.refused import prepared_rows
    from fastdpo.data.split import split_pairs, split_sft_rows
    from fastdpo.data.written import row_warnings_said  # (the rows' counted warnings: given for the whole set once)

    columns, refused, gone = run_args.dataset_columns, {}, {}
    source, mixed = run_args.dataset_name, None  # (a mixture: its rows, read once; which dataset gave which)
    if run_args.datasets:
        source, mixed = mixture_rows(run_args, (*text_columns(columns), text_field))
    as_trl = {"text_field": text_field, "read_as_trl": True}  # (SFT: the columns TRL's trainer reads, the others out)
    prepare = prepare_preferences if command == "dpo" else functools.partial(prepare_sft, **as_trl)
    if run_args.data_filter == "drop":  # rows preparation refuses: dropped, as the filter drops
        from fastdpo.data.refused import prepare_dropping, prepare_sft_dropping

        dropping = prepare_dropping if command == "dpo" else functools.partial(prepare_sft_dropping, **as_trl)
        prepare = functools.partial(_without_refused_rows, counts=refused, dropping=dropping, gone=gone)
    # the file's row of each row, in a column the preparation, the split and the filter carry along (a Dataset.select
    # of consecutive rows keeps no indices to read them from)
    evaluation, train_split, test_split = None, run_args.dataset_train_split, run_args.dataset_test_split
    if run_args.eval_fraction is not None:  # split as given, as `fastdpo data split` splits, then prepared
        loaded = load_data(source, split=train_split, text=(*text_columns(columns), text_field))
        if command == "dpo":
            loaded, part_columns = rename_preference_columns(loaded, columns or {})[0], None
            warn_preference_labels(loaded, columns or {})  # (the parts are prepared without the map)
            # (the groups of rows without a prompt column keyed on the rows as given: the numbering left out of them)
            prepared = None if "prompt" in loaded.column_names else prepared_rows(loaded, None)[0]
            split = functools.partial(split_pairs, prepared=prepared)
        else:  # (the parts prepared under the run's column map, as the split's keys were)
            split, part_columns = functools.partial(split_sft_rows, columns=columns, text_field=text_field), columns
        given, held_out = held_out_split(split, _numbered(loaded, range(len(loaded))), run_args.eval_fraction, seed)
        with row_warnings_said():  # (the split gave them, for every row)
            train = _in_file_rows(prepare, given, split=train_split, columns=part_columns)
            evaluation = _in_file_rows(prepare, held_out, split="eval", columns=part_columns)
    else:
        prepared = prepare(source, columns=columns, split=train_split)
        train = _numbered_left(prepared, gone.get(train_split))
    if test_split is not None:
        with no_assumed_split(run_args):
            evaluation = _numbered_left(prepare(run_args.dataset_name, columns=columns, split=test_split),
                                        gone.get(test_split))  # fmt: skip
    if {"image", "images"} & set(train.column_names):  # (before the quality check: its image parts are no text,
        # every row a bad_message, and "every row is dropped" said instead)
        from fastdpo.train.common import check_dataset

        try:
            check_dataset(train, "train")
        except ConfigError as error:
            raise error.but(column="dataset_name") from None
    if command != "dpo":
        return (*_without_numbers(train, evaluation, numbering), {})
    file_rows = list(train[_ROW])  # (the report's rows: those of the train split before its filter)
    with row_warnings_said():
        report = check_preferences(train, row_ids=file_rows)
    dropped: dict[str, int] = refused.get(train_split, {})
    removed_eval: dict[str, int] = dict(refused.get(test_split if test_split is not None else "eval", {}))
    if run_args.data_filter == "drop":
        train, more = report.filter(train)
        dropped = dict(collections.Counter(dropped) + collections.Counter(more))
        if dropped:
            logger.warning("dropped %d training rows: %s (data_quality.md)", sum(dropped.values()), dropped)
        if len(train) == 0 and dropped:  # ("the dataset has no rows, check the file or the split", from tokenizing)
            raise DataError(f"every one of the {sum(dropped.values())} training rows is dropped ({dropped})",
                            option="data_filter", fix="check the data (fastdpo data check FILE) and the column map "
                            "(dataset_columns), or data_filter: none to stop at the first such row")  # fmt: skip
        if evaluation is not None:  # (its rows preparation refused are gone already, as the train split's)
            rows = len(evaluation)
            with row_warnings_said():
                evaluation, more = check_preferences(evaluation).filter(evaluation)
            if more:
                logger.warning("dropped %d evaluation rows: %s (data_quality.md)", rows - len(evaluation), more)
            removed_eval = dict(collections.Counter(removed_eval) + collections.Counter(more))  # (the refused too)
            if len(evaluation) == 0:
                raise DataError(f"every one of the {rows} evaluation rows is dropped ({removed_eval})",
                                option="data_filter", fix="check the evaluation data (fastdpo data check FILE), or "
                                "data_filter: none")  # fmt: skip
    report = _in_file_rows_of(report, file_rows, gone.get(train_split) or {})
    mixed = f" (a mixture, its datasets' rows one after another: {mixed})" if mixed else ""
    files = {"data_quality.md": report.to_markdown() + "\nRow ids are the data file's rows (from 0), as `fastdpo data "
             f"check` numbers them{mixed}.\nRows removed before training: {dropped}\n"
             + (f"Evaluation rows removed: {removed_eval}\n" if removed_eval else ""),
             "data_quality.json": json.dumps({**report.to_dict(), "removed": dropped, "removed_eval": removed_eval},
                                             indent=1)}  # fmt: skip
    return (*_without_numbers(train, evaluation, numbering), files)


def _in_file_rows_of(report, file_rows: list[int], refused: dict):
    """``report`` (of the rows left after preparation) by the file's rows, with the rows preparation refused under
    every reason the check finds for them (``prepare_dropping``'s), as ``fastdpo data check`` lists them (they were
    counted only)."""
    from fastdpo.data.quality import REASONS

    rows = {reason: [file_rows[row] for row in found] for reason, found in report.rows.items()}
    details = {file_rows[row]: notes for row, notes in report.details.items()}
    named = 0
    for row, found in refused.items():
        if found is not None:
            reasons, notes = found
            for reason in reasons:
                rows[reason] = sorted([*rows.get(reason, []), row])
            details[row], named = [*notes, "refused by the preparation: not trained on"], named + 1
    order = list(REASONS)  # (as the check orders them)
    rows = dict(sorted(rows.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))
    counts = {reason: len(found) for reason, found in rows.items()}
    return dataclasses.replace(report, rows=rows, details=dict(sorted(details.items())), counts=counts,
                               num_rows=report.num_rows + named)  # fmt: skip


_ROW = "__fastdpo_file_row__"  # a row's place in its data file, through preparation, split and filter


def _numbered(dataset, rows):
    """``dataset`` with its rows' file rows (``rows``) in the ``_ROW`` column (a file's own column of that name, no
    column a trainer reads, replaced)."""
    if _ROW in dataset.column_names:
        dataset = dataset.remove_columns(_ROW)
    return dataset.add_column(_ROW, list(rows))


def _numbered_left(prepared, gone) -> object:
    """A prepared split ``_numbered``: its rows are the file's, but those in ``gone`` (the rows preparation refused
    and dropped), in order."""
    out = set(gone or ())
    return _numbered(prepared, [row for row in range(len(prepared) + len(out)) if row not in out])


def _without_numbers(train, evaluation, numbering: dict | None) -> tuple:
    """(train, evaluation) without the ``_ROW`` column, their file rows in ``numbering`` (``"train"``, ``"eval"``)."""
    if numbering is not None:
        numbering.update(train=list(train[_ROW]), eval=None if evaluation is None else list(evaluation[_ROW]))
    return train.remove_columns(_ROW), None if evaluation is None else evaluation.remove_columns(_ROW)


def _in_file_rows(prepare, part, *, split: str, columns: dict | None = None):
    """``prepare(part)`` for one part of a split file (``_numbered``), an error's row named as the file numbers it,
    not as the part does; ``columns``: the part's column map (None: it has fastdpo's names)."""
    rows = list(part[_ROW])
    numbering = {"file_rows": rows} if getattr(prepare, "func", None) is _without_refused_rows else {}
    try:  # (the refused rows' warning numbers them too)
        return prepare(part, columns=columns, split=split, **numbering)
    except DataError as error:
        if error.row is None:
            raise
        raise error.but(row=rows[error.row]) from None


def held_out_split(split, dataset, fraction: float, seed: int):
    """``split(dataset)`` by ``eval_fraction``: a fraction in (0, 1), or a whole number of rows (``5.0`` as the flag
    reads it too); its errors under the name ``eval_fraction``."""
    test_size = int(fraction) if fraction >= 1 and float(fraction).is_integer() else fraction
    try:
        return split(dataset, test_size=test_size, seed=seed)
    except ConfigError as error:
        if error.column != "test_size":
            raise
        raise error.but(column="eval_fraction") from None


def _without_refused_rows(source, *, columns: dict | None, split: str, counts: dict, dropping, gone: dict,
                          file_rows: list | None = None):  # fmt: skip
    """``dropping``'s rows (``prepare_dropping``, ``prepare_sft_dropping``), its counts in ``counts[split]``, the rows
    it dropped in ``gone[split]``, warned about (the rows as ``file_rows`` number them: a part's rows in its file)."""
    prepared, counts[split], rows = dropping(source, columns=columns, split=split)
    rows = rows if isinstance(rows, dict) else dict.fromkeys(rows)  # (row → the check's reasons, notes; SFT's: none)
    rows = {row if file_rows is None else file_rows[row]: why for row, why in rows.items()}
    gone[split] = rows
    if rows:
        shown = ", ".join(map(str, list(rows)[:10])) + (" ..." if len(rows) > 10 else "")
        logger.warning("%s split: dropped %d rows the preparation refuses: %s (rows %s)", split, len(rows),
                       counts[split], shown)  # fmt: skip
    return prepared
