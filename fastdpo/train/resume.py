"""Exact resume for both trainers: what they keep on themselves, saved with every checkpoint.

A transformers checkpoint holds the weights, the optimizer and scheduler, the RNG and ``TrainerState``, and a run
resumed from it skips the batches it already trained on. fastdpo's trainers also keep running counts that are not
in there: the tokens trained on (``num_tokens``, which would start again from 0), the numerics guard's skipped
steps (``nonfinite_steps``, and the skips in a row that stop training), and, derived from the first, the start of
``tokens_per_second``. ``ResumableTrainer`` writes them as JSON next to ``trainer_state.json``, one file per process
(a count may be this process's own share, as DPO's tokens are), and reads them back when ``train`` is given
``resume_from_checkpoint``::

    class DPOTrainer(ResumableTrainer, NumericsGuard, Trainer): ...

A checkpoint without the file (written by another version) resumes with the counts at 0 and a warning.
"""

from __future__ import annotations

import json
import logging
import os

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

logger = logging.getLogger(__name__)

# every one an int that the trainer or a mixin of it sets: missing ones are left out of the file
COUNTERS = ("_total_train_tokens", "_nonfinite_total", "_nonfinite_in_row")


def counters_file(checkpoint: str, process_index: int) -> str:
    return os.path.join(checkpoint, f"fastdpo_counters_{process_index}.json")


def save_counters(trainer, checkpoint: str) -> None:
    """Write ``trainer``'s counters into ``checkpoint`` (this process's file)."""
    counters = {name: int(getattr(trainer, name)) for name in COUNTERS if hasattr(trainer, name)}
    os.makedirs(checkpoint, exist_ok=True)
    with open(counters_file(checkpoint, trainer.args.process_index), "w", encoding="utf-8") as file:
        json.dump(counters, file, indent=2)


def load_counters(trainer, checkpoint: str) -> None:
    """Set ``trainer``'s counters from ``checkpoint``; and the token rate's start, since ``train`` restarts it."""
    path = counters_file(checkpoint, trainer.args.process_index)
    if not os.path.isfile(path):
        logger.warning("%s has no %s: num_tokens and nonfinite_steps start again from 0", checkpoint,
                       os.path.basename(path))  # fmt: skip
        return
    with open(path, encoding="utf-8") as file:
        counters = json.load(file)
    for name, value in counters.items():
        if name in COUNTERS:
            setattr(trainer, name, int(value))
    rate = getattr(trainer, "_token_rate", None)
    if rate is not None:
        rate.restart(getattr(trainer, "_total_train_tokens", 0))


class ResumableTrainer:
    """Trainer mixin: ``COUNTERS`` saved with each checkpoint and restored when training resumes from one."""

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        save_counters(self, os.path.join(self._get_output_dir(trial=trial), folder))

    def train(self, resume_from_checkpoint: str | bool | None = None, *args, **kwargs):
        checkpoint = resume_from_checkpoint
        if checkpoint is True:  # as transformers: the last checkpoint in output_dir
            checkpoint = get_last_checkpoint(self.args.output_dir) if os.path.isdir(self.args.output_dir) else None
            resume_from_checkpoint = checkpoint or True  # none found: transformers raises its own error
        if isinstance(checkpoint, str):
            load_counters(self, checkpoint)
        return super().train(resume_from_checkpoint, *args, **kwargs)
