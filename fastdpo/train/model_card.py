"""The model card of the native trainers: ``README.md`` in ``output_dir``, written at each checkpoint and with the
final model (as TRL's trainers write theirs), and the one ``push_to_hub`` uploads.

It says what was trained and how: the base model and data where they have hub names, the method (loss types, beta,
reference), the packing, the schedule, the last logged train and eval metrics, how to load the result, the versions.
A ``README.md`` fastdpo did not write (the user's own, or one transformers or TRL wrote) is never replaced: the card
is skipped with one warning, and ``push_to_hub`` uploads the folder's own.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from fastdpo.ops.losses import SMOOTHED

logger = logging.getLogger("fastdpo")

MARK = "<!-- written by fastdpo; it replaces a README.md that has this line, and no other -->"
_METRICS = {
    "dpo": ("loss", "rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "logps/chosen",
            "logps/rejected"),
    "sft": ("loss", "mean_token_accuracy", "entropy"),
}  # fmt: skip
_REFERENCES = {
    "separate": "a separate frozen model (the initial model, or the ref_model given)",
    "cached": "the initial model's log-probs, computed once before training",
    "adapter": "the model with its adapter off",
    "none": "none (a reference-free loss)",
}
_DPO_CITATION = """```bibtex
@inproceedings{rafailov2023direct,
    title     = {{Direct Preference Optimization: Your Language Model is Secretly a Reward Model}},
    author    = {Rafael Rafailov and Archit Sharma and Eric Mitchell and Christopher D. Manning and Stefano Ermon and Chelsea Finn},
    booktitle = {Advances in Neural Information Processing Systems 36},
    year      = 2023,
}
```"""  # noqa: E501


class WritesModelCard:
    """Trainer mixin: ``create_model_card`` writes fastdpo's card; ``_save_checkpoint`` and ``save_model`` (into
    ``output_dir``) call it. ``card_dataset``: the training data's hub name, where the caller knows it (the CLI)."""

    card_dataset: str | None = None
    _card_warned = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if hasattr(self.model, "add_model_tags"):  # (as TRL's trainers tag it: the model's own push_to_hub has them)
            self.model.add_model_tags(card_tags(self))

    def create_model_card(self, language=None, license=None, tags=None, model_name=None, finetuned_from=None,
                          tasks=None, dataset_tags=None, dataset=None, dataset_args=None) -> None:  # fmt: skip
        """transformers' arguments (``push_to_hub`` passes them); the card is fastdpo's own (see the module)."""
        self._write_card(tags=tags, model_name=model_name, base=finetuned_from, dataset=dataset, language=language,
                         license=license)  # fmt: skip

    def _write_card(self, *, replace: bool = False, **fields) -> None:
        """The card into ``output_dir``, over a README.md of fastdpo's (or, ``replace``, over whatever is there)."""
        if not self.is_world_process_zero():
            return
        path = Path(self.args.output_dir) / "README.md"
        if not replace and path.exists() and not written_by_fastdpo(path):
            if not self._card_warned:
                self._card_warned = True
                logger.warning("%s was not written by fastdpo: kept as it is (the model card is not written)", path)
            return
        from fastdpo.atomic import atomic_write

        try:
            text = card_text(self, **fields)
        except Exception as error:  # (a card is not worth a checkpoint, nor a long run: said, and training goes on)
            logger.warning("the model card was not written (%s: %s)", type(error).__name__, error)
            return
        atomic_write(path, text)

    def _save_checkpoint(self, model, trial) -> None:
        self.create_model_card()
        super()._save_checkpoint(model, trial)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        target = self.args.output_dir if output_dir is None else output_dir
        final = os.path.abspath(target) == os.path.abspath(self.args.output_dir)
        path = Path(target) / "README.md"
        # a PEFT model's save_pretrained writes a card of its own there: over none, or over ours, it is replaced
        replace = final and (not path.exists() or written_by_fastdpo(path))
        super().save_model(output_dir, _internal_call)
        if final:
            self._write_card(replace=replace)


def written_by_fastdpo(path: Path) -> bool:
    """Whether the README.md at ``path`` is a card fastdpo wrote (it carries ``MARK``)."""
    return MARK in path.read_text(encoding="utf-8", errors="replace")


def card_tags(trainer) -> list[str]:
    """``fastdpo``, the method (``dpo``, ``sft``) and a DPO run's loss types."""
    method = "dpo" if hasattr(trainer, "reference_mode") else "sft"
    return ["fastdpo", method, *(trainer.args.loss_type if method == "dpo" else [])]


def card_text(trainer, *, tags=None, model_name=None, base=None, dataset=None, language=None, license=None) -> str:
    """The card of ``trainer`` (a native DPOTrainer or SFTTrainer) as it stands."""
    method = "dpo" if hasattr(trainer, "reference_mode") else "sft"
    args = trainer.args
    base = base or hub_name(getattr(_unwrapped(trainer.model).config, "_name_or_path", None))
    dataset = dataset or trainer.card_dataset or _dataset_name(trainer.train_dataset)
    datasets_named = [dataset] if isinstance(dataset, str) else list(dataset or [])
    name = model_name or (args.hub_model_id or "").split("/")[-1] or Path(args.output_dir).resolve().name
    all_tags = [*card_tags(trainer), *([tags] if isinstance(tags, str) else tags or [])]
    front = ["---", "library_name: " + ("peft" if _is_peft(trainer.model) else "transformers")]
    if base:
        front.append(f"base_model: {base}")
    for key, values in (("datasets", datasets_named), ("tags", list(dict.fromkeys(all_tags)))):
        if values:
            front += [f"{key}:", *(f"- {value}" for value in values)]
    front += [f"{key}: {value}" for key, value in (("language", language), ("license", license)) if value]
    front.append("---")

    whose = f"[{base}](https://huggingface.co/{base})" if base else "a local model"
    data = ", ".join(f"[{d}](https://huggingface.co/datasets/{d})" for d in datasets_named) or "local data"
    what = f"Preference optimization ({', '.join(args.loss_type)})" if method == "dpo" else "Supervised fine-tuning"
    version = _version("fastdpo")
    lines = [*front, MARK, "", f"# {name}", "", f"{what} of {whose} on {data}, trained with fastdpo {version}.", ""]
    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {value} |" for key, value in _settings(trainer, method)]
    lines += ["", *_results(trainer.state.log_history, _METRICS[method])]
    where = args.hub_model_id or str(Path(args.output_dir).resolve())
    loader = ("from peft import AutoPeftModelForCausalLM as Model" if _is_peft(trainer.model)
              else "from transformers import AutoModelForCausalLM as Model")  # fmt: skip
    lines += ["## Use", "", "```python", loader, "from transformers import AutoTokenizer", "",
              f'model = Model.from_pretrained("{where}")', f'tokenizer = AutoTokenizer.from_pretrained("{where}")',
              "```", ""]  # fmt: skip
    packages = ("fastdpo", "transformers", "torch", "datasets", *(("peft",) if _is_peft(trainer.model) else ()))
    lines += ["## Versions", "", *(f"- {package} {_version(package)}" for package in packages), ""]
    if method == "dpo":
        lines += ["## Citation", "", "DPO:", "", _DPO_CITATION, ""]
    return "\n".join(lines)


def _settings(trainer, method: str) -> list[tuple[str, str]]:
    args, state = trainer.args, trainer.state
    rows = []
    if method == "dpo":
        losses = ", ".join(args.loss_type)
        weights = f" (weights {', '.join(f'{w:g}' for w in args.loss_weights)})" if args.loss_weights else ""
        rows += [("loss", f"{losses}{weights}, beta {args.beta:g}"), ("reference", _REFERENCES[trainer.reference_mode])]
        if args.label_smoothing and SMOOTHED.intersection(args.loss_type):  # (another type ignores it: not said)
            rows.append(("label smoothing", f"{args.label_smoothing:g}"))
    else:
        only = "completion tokens" if getattr(trainer, "completion_only_loss", False) else "every token"
        rows.append(("loss", "assistant tokens" if args.assistant_only_loss else only))
    if method == "dpo":
        packed = "a pair's chosen and rejected packed together with other pairs' (padding only at a row's end)"
    elif args.packing:
        packed = f"rows packed into sequences ({args.packing_strategy}; padding only at a sequence's end)"
    else:
        packed = "one row per sequence, concatenated into each batch without padding"
    cut = "no max_length" if args.max_length is None else f"max_length {args.max_length}"
    rows.append(("sequences", f"{packed}; {cut}"))
    processes = max(args.world_size, 1)
    per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * processes
    unit = "pairs" if method == "dpo" else "rows"
    rows.append(("batch", f"{args.per_device_train_batch_size} per device × {args.gradient_accumulation_steps} "
                          f"accumulated × {processes} process(es) = {per_step} {unit} per step"))  # fmt: skip
    warmup = args.warmup_steps or 0
    warmup = f"{warmup:g} of the steps" if 0 < warmup < 1 else f"{warmup:g} steps"
    rows.append(("learning rate", f"{args.learning_rate:g}, {_name(args.lr_scheduler_type)}, warmup {warmup}"))
    rows.append(("optimizer", _name(args.optim)))
    rows.append(("trained", f"{state.global_step} of {state.max_steps} steps, epoch {state.epoch or 0:.2f}"))
    weights = str(getattr(trainer.model, "dtype", "float32")).removeprefix("torch.")
    autocast = " under bf16 autocast" if args.bf16 else " under fp16 autocast" if args.fp16 else ""
    rows.append(("precision", f"weights {weights}{autocast}"))
    adapter = _adapter(trainer.model)
    if adapter:
        rows.append(("adapter", adapter))
    rows.append(("seed", str(args.seed)))
    return rows


def _results(history: list[dict], names: tuple[str, ...]) -> list[str]:
    """The last logged train and eval values of ``names`` as a table (nothing where nothing was logged)."""
    train = next((log for log in reversed(history) if "loss" in log), None)
    evaluated = next((log for log in reversed(history) if "eval_loss" in log), None)
    columns = [(f"train (step {log['step']})", log, "") for log in [train] if log]
    columns += [(f"eval (step {log['step']})", log, "eval_") for log in [evaluated] if log]
    shown = [name for name in names if any(prefix + name in log for _, log, prefix in columns)]
    if not shown:
        return []
    lines = ["## Results (last logged)", "", "| metric | " + " | ".join(head for head, _, _ in columns) + " |",
             "|---|" + "---:|" * len(columns)]  # fmt: skip
    for name in shown:
        cells = [f"{log[prefix + name]:.4g}" if prefix + name in log else "" for _, log, prefix in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return [*lines, ""]


def hub_name(name) -> str | None:
    """``name`` where it reads as a hub repository (``org/model``), not a local folder."""
    if not isinstance(name, str) or not name or os.path.exists(name) or name.startswith((".", "/", "~")):
        return None
    parts = name.split("/")
    return name if len(parts) <= 2 and all(parts) else None


def _dataset_name(dataset) -> str | None:
    """The hub name datasets recorded for ``dataset``, where it is a whole one (``org/name``): a builder's name
    alone (``json``, or a hub dataset's name without its owner) names no page to link."""
    name = getattr(getattr(dataset, "info", None), "dataset_name", None)
    return name if isinstance(name, str) and "/" in name else None


def _unwrapped(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config")


def _adapter(model) -> str | None:
    config = getattr(model, "peft_config", {}).get("default") if _is_peft(model) else None
    if config is None:
        return None
    kind = _name(getattr(config, "peft_type", "adapter"))
    rank = getattr(config, "r", None)
    return f"{kind}" + (f" r={rank}, alpha {getattr(config, 'lora_alpha', '')}" if rank else "")


def _name(value) -> str:
    return str(getattr(value, "value", value))


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "(not installed)"
