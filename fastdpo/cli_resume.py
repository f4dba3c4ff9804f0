"""``fastdpo dpo|sft --resume``: which checkpoint a run goes on from, and that it goes on with the same settings.

``--resume`` takes the last complete ``checkpoint-<step>`` in ``output_dir`` (``fastdpo.train.resume.last_checkpoint``:
one a kill cut short is skipped), ``--resume PATH`` that checkpoint. The settings are compared with the run
directory's ``config.yaml``: a field that changes what a step computes or which data it sees (anything outside
``RESUME_MAY_CHANGE``) fails, naming each one with both values, unless ``--overwrite`` is given too (then a warning,
and ``config.yaml`` records the new settings). A resumed run with, say, another learning rate or data file would
otherwise look like one run in its run directory and logs while being two. ``resume_from_checkpoint`` in the config
(TRL's key) is ``--resume PATH``; resumed into a new run directory, the settings are compared with those of the
checkpoint's run.

Checkpoints that a later ``--resume`` would go on from, though the run no longer leads to them, are removed when
training begins, once the checkpoint resumed from has loaded (``stale_checkpoints``, ``when_training_begins``):
with ``--overwrite`` (a run started over), the earlier run's; with ``--resume PATH`` back to an earlier step, those
after it (refused without ``--overwrite``). A checkpoint that fails to load leaves them all.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
from pathlib import Path

from fastdpo.errors import ConfigError

logger = logging.getLogger("fastdpo")

# what a resumed run may change: how long it runs, how often it logs, saves and evaluates, where it reports, how
# its data is loaded. max_steps / num_train_epochs are here to extend a run; the Trainer rebuilds the learning-rate
# schedule for the new length: the first resumed step keeps the rate the checkpoint saved, the next ones take the
# new schedule's at their step (a linear one that reached 0 at step 2 of 2, extended to 4: 0 at step 3, a quarter of
# the peak at step 4; tests/test_train_resume.py). dataset_test_split is the evaluation data only.
# (not metric_for_best_model or greater_is_better: the checkpoint's best value is the old metric's, which the new
# metric's values would be compared with)
RESUME_MAY_CHANGE = frozenset({
    "output_dir", "max_steps", "num_train_epochs", "resume_from_checkpoint", "local_rank", "ddp_timeout",
    "save_steps", "save_strategy", "save_total_limit", "save_only_model", "save_on_each_node",
    "logging_steps", "logging_strategy", "logging_first_step", "logging_nan_inf_filter", "log_level",
    "log_level_replica", "log_on_each_node", "disable_tqdm", "skip_memory_metrics", "include_num_input_tokens_seen",
    "report_to", "run_name", "project", "trackio_bucket_id", "trackio_space_id", "trackio_static_space_id",
    "push_to_hub", "hub_always_push", "hub_model_id", "hub_private_repo", "hub_revision", "hub_strategy",
    "hub_token", "dataset_test_split", "eval_steps", "eval_strategy", "do_eval", "do_predict", "eval_delay",
    "eval_on_start",
    "eval_accumulation_steps", "per_device_eval_batch_size", "eval_do_concat_batches", "eval_use_gather_object",
    "batch_eval_metrics", "prediction_loss_only", "include_for_metrics", "load_best_model_at_end",
    "dataloader_num_workers", "dataloader_prefetch_factor",
    "dataloader_persistent_workers", "dataloader_pin_memory", "dataloader_multiprocessing_context",
    "torch_empty_cache_steps",
    # how memory is spent, not what a step computes: recomputed activations equal those kept (dropout too, where the
    # recompute restores the random state: its kwargs' preserve_rng_state, compared by _compared), moved ones too;
    # torch_compile is not applied by fastdpo's trainers (said when set)
    "gradient_checkpointing", "activation_checkpointing", "activation_offloading", "ref_offload", "torch_compile",
    "torch_compile_backend", "torch_compile_mode",
})  # fmt: skip


def checkpoint_to_resume(out: Path, resume: str | bool, asked: str = "--resume") -> str:
    """``--resume``: the last complete checkpoint in ``out``; ``--resume PATH``: PATH, if it is a checkpoint.
    ``asked``: what asked for it, as the fix names it (the config's ``resume_from_checkpoint``, TRL's key)."""
    from fastdpo.train.resume import is_complete, last_checkpoint

    if resume is True:
        checkpoint = last_checkpoint(out)
        if checkpoint is None:
            raise ConfigError(f"{out} has no complete checkpoint to resume from", column="resume",
                              fix=f"run without {asked} to start the run (--overwrite to start it over)")  # fmt: skip
        return checkpoint
    if not is_complete(resume):
        raise ConfigError(f"{resume} is not a complete checkpoint (no readable trainer_state.json)", column="resume",
                          fix="give a checkpoint-<step> folder, or --resume alone: output_dir's last one")  # fmt: skip
    return str(resume)


# may be set where the run had none (load_best_model_at_end added: transformers fills them in), not changed: the
# checkpoint's best value is the old metric's, which the new one's values would be compared with
_SET_FROM_NONE = frozenset({"metric_for_best_model", "greater_is_better"})


_RANDOM_STATE_ONLY = ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs")


def _compared(key: str, value):
    """What of a setting a resume compares: of checkpointing's kwargs, whether the recompute restores the random state
    (``preserve_rng_state``, torch's default true: dropout recomputed otherwise changes the numbers); ``use_reentrant``
    and the like compute the same values. Every other setting whole."""
    if key in _RANDOM_STATE_ONLY and (value is None or isinstance(value, dict)):
        return (value or {}).get("preserve_rng_state", True)
    return value


def refuse_changed_config(recorded_path: Path, resolved: dict, *, overwrite: bool) -> None:
    """``ConfigError`` naming the fields outside ``RESUME_MAY_CHANGE`` where ``resolved`` (the settings as
    ``config.yaml`` records them) differs from ``recorded_path``; with ``overwrite``, a warning instead."""
    import yaml

    if not recorded_path.is_file():  # e.g. a run directory the Python API wrote
        logger.warning("%s is missing: cannot check that the resumed run has the same settings", recorded_path)
        return
    recorded = yaml.safe_load(recorded_path.read_text()) or {}
    current = yaml.safe_load(yaml.safe_dump(resolved))  # compared as recorded: through YAML
    # a field only one side has comes from another version of fastdpo or transformers: not compared
    changed = sorted(key for key in recorded.keys() & current.keys()
                     if key not in RESUME_MAY_CHANGE and _compared(key, recorded[key]) != _compared(key, current[key])
                     and not (key in _SET_FROM_NONE and recorded[key] is None))  # fmt: skip
    if not changed:
        return
    details = ", ".join(f"{key}: {recorded[key]!r} -> {current[key]!r}" for key in changed)
    if not overwrite:
        raise ConfigError(f"the settings differ from the run's, in {recorded_path} ({details})", column="resume",
                          fix="resume with the recorded settings, or add --overwrite to go on with these")  # fmt: skip
    logger.warning("resuming with settings that differ from %s: %s", recorded_path, details)


FINGERPRINT = "data_fingerprint.json"
MODEL_FINGERPRINT = "model_fingerprint.json"  # the local policy's and reference's files (model_fingerprint)


def data_fingerprint(dataset_name: str | None) -> dict | None:
    """What a resumed run compares to see that its local data did not change: each data file's size and a SHA-256 of
    its first and last 4 MiB (a file copied elsewhere keeps it; an edit of the same size in the middle of a large
    file escapes it). None for a hub dataset or a ``save_to_disk`` folder."""
    from fastdpo.data.load import saved_to_disk, split_files

    path = Path(dataset_name or "")
    if not dataset_name or not path.exists() or saved_to_disk(path):
        return None
    files = split_files(path) if path.is_dir() else {"": [path]}
    return {(split if len(shards) == 1 else f"{split}/{file.name}") or file.name: _file_print(file)
            for split, shards in files.items() for file in shards}  # fmt: skip


def model_fingerprint(name: str | None) -> dict | None:
    """``data_fingerprint``'s print of a local model folder's weights and configs (None for a hub name): what a
    sweep resumed from finished runs compares, so that runs of other weights at the same path are not ranked as
    one sweep."""
    path = Path(name or "")
    if not name or not path.is_dir():
        return None
    files = sorted(file for pattern in ("*.safetensors", "*.bin", "*config.json") for file in path.glob(pattern))
    prints = {file.name: _file_print(file) for file in files}
    from fastdpo.train.loading import adapter_base, is_adapter_folder

    if is_adapter_folder(path):  # a LoRA run's folder: its adapter's base model (when a folder) too
        base = adapter_base(path)
        own = base and Path(base).resolve() == path.resolve()
        base = model_fingerprint(base) if base and not own and Path(base, "config.json").is_file() else None
        prints.update({"base_model": base} if base else {})
    return prints


def _file_print(file: Path) -> dict:
    """A file's size and a SHA-256 of its first and last 4 MiB."""
    import hashlib

    size, digest, block = file.stat().st_size, hashlib.sha256(), 4 << 20
    with open(file, "rb") as handle:
        digest.update(handle.read(block))
        if size > block:
            handle.seek(max(block, size - block))
            digest.update(handle.read())
    return {"size": size, "sha256": digest.hexdigest()}


def same_models(recorded: dict | None, current: dict | None) -> bool:
    """Whether ``models_fingerprint``'s (or ``model_fingerprint``'s) ``current`` print equals ``recorded``, a LoRA
    folder's base model left out where ``recorded`` (an earlier fastdpo's) has none."""

    def without_base(prints, reference):
        if not isinstance(prints, dict) or not isinstance(reference, dict):
            return prints
        if "base_model" in prints and "base_model" not in reference and "adapter_config.json" in prints:
            prints = {name: value for name, value in prints.items() if name != "base_model"}
        return {name: without_base(value, reference.get(name)) for name, value in prints.items()}

    return recorded == without_base(current, recorded)


def refuse_changed_data(recorded_path: Path, fingerprint: dict | None, *, overwrite: bool, what: str = "data",
                        split: str | None = None) -> None:  # fmt: skip
    """``ConfigError`` where the run's data files (``fingerprint``) differ from those ``recorded_path`` recorded
    (a resumed run would go on over other rows: its sampler's order points elsewhere); with ``overwrite``, a
    warning. ``split``: the training split, whose files alone are compared where a folder holds it (the evaluation
    data may change, as ``dataset_test_split`` may). ``what="model"``: the local model files (``MODEL_FINGERPRINT``:
    a reference of other weights, or an adapter on another base, would go on from the checkpoint as if it were the
    same run)."""
    import json

    if fingerprint is None or not recorded_path.is_file():  # (a hub dataset; a run directory of an older fastdpo)
        return
    recorded = json.loads(recorded_path.read_text(encoding="utf-8"))

    def of_split(key: str) -> bool:  # (a split's one file, or its shards)
        return key == split or key.startswith(f"{split}/")

    if split is not None and any(map(of_split, fingerprint)):
        recorded, fingerprint = ({key: value for key, value in prints.items() if of_split(key)}
                                 for prints in (recorded, fingerprint))  # fmt: skip
    if recorded == fingerprint or same_models(recorded, fingerprint):
        return
    if not overwrite:
        raise ConfigError(f"the {what} files differ from those the run trained on ({recorded_path})", column="resume",
                          fix=f"resume with the run's {what}, or add --overwrite to go on with these")  # fmt: skip
    logger.warning("resuming with %s files that differ from those recorded in %s", what, recorded_path)


def models_fingerprint(run_args) -> dict | None:
    """``model_fingerprint`` of the run's local policy and reference folders; None where both are hub names."""
    prints = {"model": model_fingerprint(run_args.model_name_or_path),
              "reference": model_fingerprint(getattr(run_args, "ref_model_name_or_path", None))}  # fmt: skip
    return {name: value for name, value in prints.items() if value is not None} or None


def stale_checkpoints(out: Path, checkpoint: str | None, *, overwrite: bool, keep=()) -> list[Path]:
    """The Trainer checkpoints (``checkpoint-<step>`` folders, not links, written completely) in ``out`` that this run
    leaves behind (see the module docstring): with ``checkpoint`` in ``out``, those of later steps; from another
    run's, or with none under ``overwrite``, all of them. A ``ConfigError`` when one of them holds a path in ``keep``
    (the run's model, reference, data, cache: it cannot go, and left it is what a later ``--resume`` would take), and
    when resuming would need ``--overwrite`` and it was not given."""
    from fastdpo.train.resume import saved_step

    if not out.is_dir() or (checkpoint is None and not overwrite):
        return []
    inputs = [Path(path).resolve() for path in keep if path]
    steps = {path.resolve(): saved_step(path) for path in out.iterdir() if not path.is_symlink() and path.is_dir()
             and re.fullmatch(r"checkpoint-\d+", path.name)}  # fmt: skip
    steps = {real: step for real, step in steps.items() if step is not None}  # (None: incomplete, or no checkpoint)
    if checkpoint is not None:
        real = Path(checkpoint).resolve()
        if is_own(out, checkpoint):  # this run's own: the checkpoints of later steps are another future of it
            least = saved_step(real)
            steps = {other: step for other, step in steps.items() if other != real and step > (least or 0)}
        else:  # another run's checkpoint: every one here is an earlier run's
            steps.pop(real, None)
    held = [real for real in steps if any(path == real or real in path.parents for path in inputs)]
    if held:  # (it cannot be removed, and left it is what a later --resume would take)
        raise ConfigError(f"{out / held[0].name} holds what this run reads (its model, reference, data or config), "
                          "and this run leaves that checkpoint behind: a later --resume would go on from it, and "
                          "the run's own saves could write over it", column="output_dir",
                          fix="copy it out of the run directory first, or write this run to another output_dir"
                          )  # fmt: skip
    later = [out / real.name for real in sorted(steps, key=steps.get)]
    if later and checkpoint is not None and not overwrite:
        names = ", ".join(path.name for path in later[:3]) + (f" and {len(later) - 3} more" if len(later) > 3 else "")
        raise ConfigError(f"{out} has checkpoints of another run or of later steps than {Path(checkpoint).name} "
                          f"({names}), which a later --resume would go on from", column="resume",
                          fix="add --overwrite to remove them and go on from this one, or resume from the last one"
                          )  # fmt: skip
    return later


def is_own(out: Path, checkpoint: str) -> bool:
    """Whether ``checkpoint`` is a folder of ``out`` (itself perhaps a link to elsewhere), not another run's."""
    return Path(os.path.abspath(checkpoint)).parent.resolve() == out.resolve()


# what a finished run leaves in its directory besides checkpoints, which the run that --overwrite starts may not
# write again (a LoRA run writes adapter_* where a full run wrote model.safetensors: from_pretrained read both)
# (the tokenizer's files too: one the new run's tokenizer does not write, a chat template, stayed beside its own)
RUN_OUTPUTS = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
               "pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_config.json", "adapter_model.safetensors",
               "adapter_model.bin", "training_args.bin", "data_quality.md", "data_quality.json",
               *(f"plots/{name}.png" for name in ("loss", "rewards_margins", "rewards_accuracies")),  # RunFiles'
               "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
               "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt", "tokenizer.model")  # fmt: skip


def stale_outputs(out: Path, *, overwrite: bool, keep) -> list[Path]:
    """The previous run's final model and run files in ``out`` (``RUN_OUTPUTS``, weight shards) that a fresh run
    started with ``--overwrite`` removes when training begins; none where ``out`` is one of the run's inputs
    (``keep``: the model trained in place), without ``--overwrite``, or where no fastdpo run was there (no
    ``metrics.jsonl``, which every run writes as training begins: a folder of the user's own keeps its files, but
    those the new run writes over)."""
    if not overwrite or not out.is_dir() or not (out / "metrics.jsonl").is_file():
        return []
    if any(path and Path(path).exists() and Path(path).resolve() == out.resolve() for path in keep):
        return []
    shards = [*out.glob("model-*-of-*.safetensors"), *out.glob("pytorch_model-*-of-*.bin")]
    return [out / name for name in RUN_OUTPUTS if (out / name).exists()] + sorted(shards) + _card(out)


def _card(out: Path) -> list[Path]:
    """The replaced run's model card, where fastdpo wrote it (a README.md of the user's own stays)."""
    from fastdpo.train.model_card import written_by_fastdpo

    card = out / "README.md"
    return [card] if card.is_file() and written_by_fastdpo(card) else []


def when_training_begins(trainer, stale: list[Path], out: Path, settings: dict[str, str],
                         outputs: list[Path] = ()) -> None:  # fmt: skip
    """At ``on_train_begin`` (the checkpoint resumed from, if any, loaded: weights, optimizer, state; no step taken)
    the main process removes ``stale`` (``remove_checkpoints``, said on stderr) and ``outputs`` (``stale_outputs``),
    then writes ``settings`` (file name → text: ``config.yaml``, the data's fingerprint) into ``out``; the other
    processes wait. A run that fails before (a damaged checkpoint, memory, a package) leaves the run directory's
    checkpoints and settings as they were, in agreement."""
    import sys

    from transformers import TrainerCallback

    from fastdpo.atomic import atomic_write

    class Begin(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                if stale:
                    left = remove_checkpoints(stale)
                    print(f"fastdpo: removed {len(stale) - len(left)} checkpoint(s) of the run this one replaces in "
                          f"{stale[0].parent}" + (f"; {', '.join(left)} could not be removed whole (no longer "
                          "resumable)" if left else ""), file=sys.stderr)  # fmt: skip
                for path in outputs:
                    path.unlink(missing_ok=True)
                with contextlib.suppress(OSError):  # (the plots' folder, where nothing else is left in it)
                    (out / "plots").rmdir()
                if outputs:
                    print(f"fastdpo: removed the replaced run's {', '.join(p.name for p in outputs[:4])}"
                          + (f" and {len(outputs) - 4} more" if len(outputs) > 4 else "") + f" from {out}",
                          file=sys.stderr)  # fmt: skip
                for name, text in settings.items():
                    atomic_write(out / name, text)
            trainer.accelerator.wait_for_everyone()

    trainer.add_callback(Begin())


def remove_checkpoints(folders: list[Path]) -> list[str]:
    """Remove ``folders``; each loses its ``trainer_state.json`` first, so that what cannot be removed is no
    longer a checkpoint a ``--resume`` would take (a ``ConfigError`` where even that fails). The names of those
    left in part."""
    for folder in folders:
        try:
            (folder / "trainer_state.json").unlink(missing_ok=True)
        except OSError as error:
            raise ConfigError(f"cannot remove {folder} ({error.strerror})", column="output_dir",
                              fix="make it writable, or remove it yourself") from None  # fmt: skip
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)
    return [folder.name for folder in folders if folder.exists()]


def refuse_replacing_the_config(config: Path | None, out: Path) -> None:
    """A ``ConfigError`` where ``--config`` is ``out/config.yaml`` as a user wrote it (comments, layout: not as a run
    writes it, sorted keys alone), which the run would replace with its resolved settings: the user's text lost."""
    import yaml

    target = out / "config.yaml"
    if config is None or not target.is_file() or Path(config).resolve() != target.resolve():
        return
    text = target.read_text(encoding="utf-8")
    try:
        as_written = yaml.safe_dump(yaml.safe_load(text), sort_keys=True) == text
    except yaml.YAMLError:
        as_written = False
    if not as_written:
        raise ConfigError(f"--config is {target}, which the run replaces with its resolved settings: the file as you "
                          "wrote it (its comments, its layout) would be lost", column="config",
                          fix=f"keep your config outside the run directory (e.g. copy it to {out.name}.yaml) and "
                              "pass that")  # fmt: skip


def stopped_at_once(out: Path | None) -> str:
    """The line for a run stopped at once (a second signal, or one before training began): the checkpoint
    ``--resume`` goes on from, or that there is none (it said "--resume goes on from the last complete one" where
    there was none, and ``--resume`` was refused). ``out``: the run's directory, None before the config was read."""
    from fastdpo.train.resume import last_checkpoint

    last = None if out is None else last_checkpoint(out)
    then = f"--resume goes on from the last complete one ({last})" if last else "there is no checkpoint to resume"
    return f"fastdpo: stopped at once, with no checkpoint of the step under way; {then}"
