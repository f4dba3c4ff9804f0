"""Exact resume for both trainers: what they keep on themselves, saved with every checkpoint.

A transformers checkpoint holds the weights, the optimizer and scheduler, the RNG and ``TrainerState``, and a run
resumed from it skips the batches it already trained on. fastdpo's trainers also keep running counts that are not
in there: the tokens trained on (``num_tokens``, which would start again from 0), the numerics guard's skipped
steps (``nonfinite_steps``, and the skips in a row that stop training), and, derived from the first, the start of
``tokens_per_second``; DPO's displacement watch (the first ``logps/chosen``, which ``logps/chosen_change`` and the
warning are measured from, and whether it warned). Nor is, with TR-DPO's ``sync_ref_model``, the reference model
that training moves.
``ResumableTrainer`` writes the counts as JSON next to ``trainer_state.json``, one file per process (a count may be
this process's own share, as DPO's tokens are: ``tokens_per_process``; a run resumed with another number of
processes takes the shares of the files ``i`` with ``i % world_size == rank``, so that their sum stays the total),
and such a reference as ``ref_model.safetensors``, and reads them
back when ``train`` is given ``resume_from_checkpoint``::

    class DPOTrainer(ResumableTrainer, NumericsGuard, Trainer): ...

A checkpoint without these files (written by another version) resumes with the counts at 0, or the reference as
it was given, and a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re

from safetensors.torch import load_model, save_model
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

# every one an int that the trainer or a mixin of it sets: missing ones are left out of the file
COUNTERS = ("_total_train_tokens", "_nonfinite_total", "_nonfinite_in_row")
REFERENCE_FILE = "ref_model.safetensors"


def counters_file(checkpoint: str, process_index: int) -> str:
    return os.path.join(checkpoint, f"fastdpo_counters_{process_index}.json")


def save_counters(trainer, checkpoint: str, names: tuple[str, ...] = COUNTERS) -> None:
    """Write ``trainer``'s counters (those of ``names``, and DPO's displacement watch) into ``checkpoint`` (this
    process's file)."""
    counters = {name: int(getattr(trainer, name)) for name in names if hasattr(trainer, name)}
    watch = getattr(trainer, "_displacement", None)  # DPO: the first logged logps/chosen, the change's baseline
    if watch is not None:
        counters["displacement"] = watch.state()
    os.makedirs(checkpoint, exist_ok=True)
    with open(counters_file(checkpoint, trainer.args.process_index), "w", encoding="utf-8") as file:
        json.dump(counters, file, indent=2)


def load_counters(trainer, checkpoint: str, names: tuple[str, ...] = COUNTERS) -> None:
    """Set ``trainer``'s counters (those of ``names``, and DPO's displacement watch) from ``checkpoint``; and the token
    rate's start, since ``train`` restarts it."""
    if not os.path.isdir(checkpoint):  # (transformers' own error names it: "Can't find a valid checkpoint")
        return
    saved = {int(match.group(1)): os.path.join(checkpoint, name) for name in os.listdir(checkpoint)
             if (match := re.fullmatch(r"fastdpo_counters_(\d+)\.json", name))}  # fmt: skip
    if not saved:
        restarting = "num_tokens and nonfinite_steps start" if names else "logps/chosen_change starts"
        logger.warning("%s has no fastdpo_counters_*.json: %s again from 0", checkpoint, restarting)
        return
    rank, world = trainer.args.process_index, trainer.args.world_size
    shares = {}  # the files of this process's share of the tokens (a run saved with another number of processes)
    for index, path in saved.items():
        if index % world == rank:
            with open(path, encoding="utf-8") as file:
                shares[index] = json.load(file)
    with open(saved.get(rank, saved[min(saved)]), encoding="utf-8") as file:  # the counts every process holds alike
        counters = json.load(file)
    for name, value in counters.items():
        if name in names:
            setattr(trainer, name, int(value))
    if "_total_train_tokens" in names and getattr(trainer, "tokens_per_process", False):  # (DPO's: summed at a log)
        trainer._total_train_tokens = sum(int(share.get("_total_train_tokens", 0)) for share in shares.values())
    watch = getattr(trainer, "_displacement", None)
    if watch is not None and "displacement" in counters:
        watch.load_state(counters["displacement"])
    rate = getattr(trainer, "_token_rate", None)
    if rate is not None:
        rate.restart(getattr(trainer, "_total_train_tokens", 0))


def moving_reference(trainer):
    """The reference model when training changes it (TR-DPO's ``sync_ref_model``), else None."""
    return getattr(trainer, "ref_model", None) if getattr(trainer.args, "sync_ref_model", False) else None


def load_reference(reference, checkpoint: str) -> None:
    path = os.path.join(checkpoint, REFERENCE_FILE)
    if not os.path.isfile(path):
        logger.warning("%s has no %s: the reference starts again from the one given", checkpoint, REFERENCE_FILE)
        return
    load_model(reference, path, device=str(next(reference.parameters()).device))


def saved_step(checkpoint: str | os.PathLike) -> int | None:
    """The step ``checkpoint``'s ``trainer_state.json`` records; None where it does not read (written last: a run
    stopped while saving leaves none) or records no step."""
    try:
        with open(os.path.join(checkpoint, TRAINER_STATE_NAME), encoding="utf-8") as file:
            step = json.load(file)["global_step"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def is_complete(checkpoint: str | os.PathLike) -> bool:
    """Whether ``checkpoint`` was written to the end: its ``trainer_state.json``, written last, reads and records
    its step."""
    return saved_step(checkpoint) is not None


def last_checkpoint(folder: str | os.PathLike) -> str | None:
    """The ``checkpoint-<step>`` in ``folder`` of the highest step that was completely written, or None.

    Complete: its ``trainer_state.json``, which is written last, reads as JSON. A run killed while saving leaves a
    folder without one: it is skipped with a warning, and left in place (a save of that step replaces it).
    """
    if not os.path.isdir(folder):
        return None
    steps = {}
    for name in os.listdir(folder):
        match = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", name)
        if match and os.path.isdir(os.path.join(folder, name)):
            steps[int(match.group(1))] = os.path.join(folder, name)
    for step in sorted(steps, reverse=True):
        if is_complete(steps[step]):
            return steps[step]
        logger.warning("%s was not completely written (the run stopped while saving it): skipped", steps[step])
    return None


class ResumeChecks:
    """Trainer mixin (the native trainers' and the TRL drop-ins'): a resume refused where transformers would go on
    wrongly, silently (``refuse_model_only``, ``refuse_finished``: TRL's trainers too), or fail on a file it does not
    name (``refuse_damaged``); ``_restore`` the trainer's own state from the checkpoint, before transformers' loop."""

    def _init_training_state(self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint,
                             trial):  # fmt: skip
        # (the checkpoint's state loaded and this run's max_steps set, before any step)
        started = super()._init_training_state(max_steps, num_update_steps_per_epoch, num_train_epochs,
                                               resume_from_checkpoint, trial)  # fmt: skip
        refuse_finished(self, resume_from_checkpoint)
        return started

    def train(self, resume_from_checkpoint: str | os.PathLike | bool | None = None, *args, **kwargs):
        resume_from_checkpoint = _resolved(self, resume_from_checkpoint)
        if isinstance(resume_from_checkpoint, str):
            refuse_damaged(resume_from_checkpoint)
            refuse_model_only(resume_from_checkpoint)
            self._restore(resume_from_checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def _restore(self, checkpoint: str) -> None:
        pass


class ResumableTrainer(ResumeChecks):
    """Trainer mixin: ``COUNTERS`` (and a moving reference) saved with each checkpoint, restored on resume."""

    def _save_checkpoint(self, model, trial) -> None:
        # ours first: the Trainer writes trainer_state.json last, so a checkpoint that has one is complete
        # (last_checkpoint) and one that a kill cut short is not resumed from
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        save_counters(self, folder)
        reference = moving_reference(self)
        if reference is not None and self.args.should_save:  # every process holds the same whole reference
            save_model(reference, os.path.join(folder, REFERENCE_FILE))
        # the checkpoint of a stop (a signal, the numerics guard), which says to resume from it: whole, whatever
        # save_only_model says (that one held no optimizer, scheduler or RNG state to resume with)
        whole = self.args.save_only_model and _stopping_early(self)
        if whole:
            self.args.save_only_model = False
        try:
            super()._save_checkpoint(model, trial)
        finally:
            if whole:
                self.args.save_only_model = True

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        _requantize(model if model is not None else self.model)

    def _load_best_model(self):
        super()._load_best_model()
        _requantize(self.model)
        reference = moving_reference(self)  # (TR-DPO: the best policy's reference, not the last step's; transformers
        if reference is not None and self.state.best_model_checkpoint:  # restored the policy alone)
            load_reference(reference, self.state.best_model_checkpoint)

    def _restore(self, checkpoint: str) -> None:
        load_counters(self, checkpoint)
        if moving_reference(self) is not None:
            load_reference(moving_reference(self), checkpoint)


class WatchResume(ResumeChecks):
    """Trainer mixin of the TRL drop-in's DPO: the displacement watch (``logps/chosen_change``, fastdpo's own metric)
    saved with each checkpoint and restored on resume; TRL's own counts (``num_tokens``) start again as TRL's do."""

    def _save_checkpoint(self, model, trial) -> None:
        folder = os.path.join(self._get_output_dir(trial=trial), f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
        save_counters(self, folder, names=())
        super()._save_checkpoint(model, trial)

    def _restore(self, checkpoint: str) -> None:
        load_counters(self, checkpoint, names=())


def _resolved(trainer, resume: str | os.PathLike | bool | None):
    """``resume_from_checkpoint`` as a path where it names one: ``True`` as transformers takes it, the last
    checkpoint in ``output_dir`` (but a complete one; ``True`` still where there is none, for transformers' own
    error); a ``Path`` as a string (transformers takes one: the checks on a string missed it)."""
    if isinstance(resume, os.PathLike):
        return os.fspath(resume)
    if resume is True:
        return last_checkpoint(trainer.args.output_dir) or True
    return resume


def refuse_model_only(checkpoint: str) -> None:
    """A ``ConfigError`` for a checkpoint saved with ``save_only_model=True``: transformers resumed from it with a new
    optimizer and the learning-rate schedule from step 0, silently (the loss of step 5 of 6: 5.16 where 2.78); and
    for one that lost its optimizer's or its schedule's file (the learning rate back at its peak, silently)."""
    from fastdpo.errors import ConfigError

    if not os.path.isdir(checkpoint):
        return
    names = os.listdir(checkpoint)
    deepspeed = any(name.startswith("global_step") for name in names)  # (its engine's files: optimizer, schedule)
    # optimizer.pt, FSDP's optimizer.bin or optimizer_0*, XLA's rank0-of-2-optimizer.pt (_optimizer_file)
    optimizer = deepspeed or any("optimizer" in name for name in names)
    if not optimizer and "scheduler.pt" not in names and not any(name.startswith("rng_state") for name in names):
        raise ConfigError(f"{checkpoint} holds the model only (save_only_model=True): no optimizer, learning-rate "
                          "schedule or random state to go on with", column="resume_from_checkpoint",
                          fix="start a new run from its weights (model_name_or_path: the checkpoint), or set "
                          "save_only_model=False for checkpoints to resume from")  # fmt: skip
    # a file lost (FSDP's and XLA's schedules too): transformers went on without it, silently, with a new optimizer
    # or the schedule from step 0
    own = _optimizer_file(names)
    lost = [name for name, kept in (("scheduler.pt", deepspeed or "scheduler.pt" in names), (own, optimizer))
            if not kept]  # fmt: skip
    if lost:
        raise ConfigError(f"{checkpoint} lacks {' and '.join(lost)}: the run would go on with a new "
                          f"{'optimizer' if not optimizer else 'learning-rate schedule, from step 0'}",
                          column="resume_from_checkpoint", fix="resume from another checkpoint (--resume PATH), or "
                          "put the file back")  # fmt: skip


def _optimizer_file(names: list[str]) -> str:
    """The optimizer's file a checkpoint of these ``names`` would hold, by the layout its other files show."""
    fsdp = [name for name in names if name.startswith("pytorch_model_fsdp")]  # (accelerate's names, by state dict)
    if "pytorch_model_fsdp.bin" in fsdp:  # FULL_STATE_DICT
        return "optimizer.bin (FSDP's optimizer state)"
    if any(name.startswith("pytorch_model_fsdp_0_rank") for name in fsdp):  # SHARDED_STATE_DICT without DCP
        return "optimizer_0_rank<r>.bin (FSDP's optimizer state)"
    if fsdp:  # SHARDED_STATE_DICT through DCP, LOCAL_STATE_DICT
        return "optimizer_0 (FSDP's optimizer state)"
    xla = [name for name in names if name.startswith("rank") and "-of-" in name]
    if xla:
        return "rank<i>-of-<N>-optimizer.pt (XLA FSDP's optimizer state)"
    return "optimizer.pt"


def refuse_damaged(checkpoint: str) -> None:
    """A ``ConfigError`` naming a checkpoint's file that is cut short (a run killed while saving it, a full disk):
    safetensors' "incomplete metadata, file not fully covered", torch's "failed finding central directory" and
    json's "Expecting value" named no file."""
    from fastdpo.errors import ConfigError

    if not os.path.isdir(checkpoint):
        return
    for folder, _, names in os.walk(checkpoint):  # (DeepSpeed's global_step<N>/ too)
        for name in sorted(names):
            path = os.path.join(folder, name)
            problem = _cut_short(path)
            if problem:
                raise ConfigError(f"{path} is cut short ({problem}): a save that did not finish",
                                  column="resume_from_checkpoint", fix="resume from the checkpoint before it "
                                  "(--resume PATH), or delete this checkpoint")  # fmt: skip


def _cut_short(path: str) -> str | None:
    """What shows ``path`` cut short, by its kind: a safetensors file shorter than its header says, a torch file (a
    zip archive) without the directory at its end, an empty one, a JSON file that does not parse; None otherwise,
    and for a file of another kind or one that cannot be read (a dangling link: transformers' to say)."""
    if not path.endswith((".safetensors", ".pt", ".pth", ".bin", ".json")) or not os.path.isfile(path):
        return None
    try:
        return _cut_short_file(path, os.path.getsize(path))
    except OSError:
        return None


def _cut_short_file(path: str, size: int) -> str | None:
    import zipfile

    if path.endswith(".json"):
        try:
            with open(path, encoding="utf-8") as file:
                json.load(file)
        except ValueError:
            return "not whole JSON"
        return None
    with open(path, "rb") as file:
        start = file.read(8)
        if not path.endswith(".safetensors"):
            if size == 0:
                return "empty"
            return (
                "a zip archive without its end" if start[:4] == b"PK\x03\x04" and not zipfile.is_zipfile(file) else None
            )
        length = int.from_bytes(start, "little") if len(start) == 8 else size
        try:
            header = json.loads(file.read(length)) if length <= size - 8 else None
        except ValueError:
            return "its header is not whole"
    if header is None:
        return f"{size} bytes, shorter than its header says"
    if not isinstance(header, dict):
        return "its header is not whole"
    ends = [v.get("data_offsets", [0, 0])[-1] for k, v in header.items() if isinstance(v, dict) and k != "__metadata__"]
    end = 8 + length + max(ends, default=0)
    return f"{size} bytes where its tensors end at byte {end}" if size < end else None


def refuse_finished(trainer, checkpoint: str | None) -> None:
    """A ``ConfigError`` for a run resumed at or past its last step (the checkpoint's ``global_step`` ≥ this run's
    ``max_steps``, as the Trainer has just computed it from its data, batch and epochs): transformers trained one step
    past it and saved the model again (weights moved by 1.2e-3 under a constant schedule), silently."""
    from fastdpo.errors import ConfigError

    step, last = trainer.state.global_step, trainer.state.max_steps
    if checkpoint is not None and last and step >= last:
        option = f"max_steps (now {trainer.args.max_steps})" if trainer.args.max_steps > 0 else (
            f"num_train_epochs (now {trainer.args.num_train_epochs:g})")  # fmt: skip
        raise ConfigError(f"{checkpoint} is at step {step}, the run's last ({last}): there is nothing left to train",
                          column="resume_from_checkpoint",
                          fix=f"raise {option} to train further; the finished model is in output_dir")  # fmt: skip


def _stopping_early(trainer) -> bool:
    """Whether this save is a stop's: on a signal (``StopOnSignal``) or by the numerics guard."""
    from fastdpo.train.interrupt import StopOnSignal

    signalled = any(isinstance(callback, StopOnSignal) and callback.signum is not None
                    for callback in trainer.callback_handler.callbacks)  # fmt: skip
    return signalled or getattr(trainer, "_guard_message", None) is not None


def _requantize(model) -> None:
    """A QLoRA model's trainable adapters back in bf16 after the Trainer loaded them from a checkpoint (peft's
    ``load_adapter`` upcasts them to fp32: a resumed run trained them in another precision than the straight one)."""
    from fastdpo.model.adapters import prepare_quantized_training

    prepare_quantized_training(model)
