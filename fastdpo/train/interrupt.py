"""Stop on SIGINT/SIGTERM with a checkpoint: Ctrl-C (or a scheduler's SIGTERM) ends training at a step it can
resume from, instead of losing everything since the last periodic checkpoint.

While ``train`` runs, in the main thread of a single-process run, the first SIGINT or SIGTERM only sets a flag: the
optimizer step under way finishes, a checkpoint of it is saved (``checkpoint-<step>`` in ``output_dir``, whatever
``save_strategy`` says), and ``train`` raises ``TrainingInterrupted`` (a ``KeyboardInterrupt``) naming it, so a
script stops there as it would on Ctrl-C, rather than going on to save or push an unfinished model as the final
one. A second signal does what it did before ``train`` started (Ctrl-C: ``KeyboardInterrupt`` at once, with no
checkpoint). The previous handlers are restored when ``train`` returns or raises. Resume with
``train(resume_from_checkpoint=True)`` (``fastdpo dpo|sft ... --resume``)::

    class DPOTrainer(InterruptibleTrainer, ResumableTrainer, NumericsGuard, Trainer): ...

Not handled (the signals act as before): runs of several processes, whose processes would have to agree on the
step to stop at (a collective every step; stop them with their launcher and resume from the last periodic
checkpoint), a ``train`` called from another thread (Python runs handlers in the main thread only), and signals
that were ignored when ``train`` started (``nohup``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from fastdpo.train.resume import is_complete

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class TrainingInterrupted(KeyboardInterrupt):
    """``train`` stopped early on a signal, after saving ``checkpoint`` (None when none could be saved)."""

    def __init__(self, signum: int, step: int, checkpoint: str | None) -> None:
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        name = signal.Signals(signum).name
        if checkpoint is None:  # save_strategy="best" decides itself whether a step with an evaluation is saved
            super().__init__(f"{name} at step {step}: no checkpoint was saved at this step")
        else:
            super().__init__(f"{name} at step {step}: saved {checkpoint}; resume with "
                             f"train(resume_from_checkpoint=True)")  # fmt: skip


class StopOnSignal(TrainerCallback):
    """Once ``signum`` is set (by the signal handler), asks the Trainer to save and stop at the end of the step,
    evaluation or save under way."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.stopped_at: int | None = None
        self.kept_limit = False  # save_total_limit raised from 1 to 2 for the stop (set back by the trainer)

    def on_step_end(self, args, state, control, **kwargs):
        self._stop(state, control)

    def on_evaluate(self, args, state, control, **kwargs):
        # a signal during an evaluation: its step is saved right after it, not one step later
        self._stop(state, control)

    def on_save(self, args, state, control, **kwargs):
        if self.signum is not None:  # a signal during a save: that checkpoint is the one to stop at
            control.should_training_stop = True
            self.stopped_at = state.global_step
            self._keep(args, state)

    def _stop(self, state, control) -> None:
        if self.signum is not None:  # (the save it asks for ends in on_save)
            control.should_save = True
            control.should_training_stop = True
            self.stopped_at = state.global_step

    def _keep(self, args, state) -> None:
        # under save_total_limit=1 with a best checkpoint, the Trainer's end of training deletes every other one:
        # the stop's too, just saved (its rotation keeps the best and the newest whatever the limit). Raised once
        # the checkpoint is saved, its training_args.bin holds the user's limit. A best set by the stop's own save is
        # the stop's checkpoint: kept anyway
        if args.save_total_limit == 1 and state.best_model_checkpoint is not None:
            args.save_total_limit, self.kept_limit = 2, True


@contextlib.contextmanager
def stop_on_signals(trainer):
    """Within: SIGINT/SIGTERM stop ``trainer``'s training with a checkpoint (see the module); yields the callback."""
    callback = StopOnSignal()
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    # ignored signals stay ignored (nohup, a shell's background job); None: a handler not set from Python
    previous = {signum: handler for signum, handler in previous.items() if handler not in (signal.SIG_IGN, None)}
    if trainer.args.world_size > 1 or threading.current_thread() is not threading.main_thread() or not previous:
        yield callback
        return

    owner = os.getpid()

    def receive(signum, frame) -> None:
        callback.signum = signum
        for number, handler in previous.items():  # a second signal does what it did before
            signal.signal(number, handler)
        if os.getpid() == owner:  # not in a forked data-loader worker, which inherits the handler: one notice
            name = signal.Signals(signum).name
            _notice(f"fastdpo: {name}: finishing this optimizer step, then saving a checkpoint and stopping ({name} "
                    "again stops at once, without one)\n")  # fmt: skip

    trainer.add_callback(callback)
    try:
        for signum in previous:
            signal.signal(signum, receive)
        with _workers_leave_sigterm(trainer.args):
            yield callback
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        trainer.remove_callback(callback)


@contextlib.contextmanager
def _workers_leave_sigterm(args):
    """Within: the data-loader workers started here ignore SIGTERM (their run stops them itself, after its
    checkpoint). A SIGTERM sent to the whole process group (a job scheduler's, ``kill -TERM -PGID``) killed torch's
    workers, whose handler dies of it, and their death raised "DataLoader worker ... is killed by signal:
    Terminated" in the main process wherever it was: often no checkpoint. Workers call the hook patched here at their
    start (a forked worker sees the patch; a spawned one does not, and dies as before). Not for persistent workers:
    they outlive ``train``, and Python's exit stops them with a SIGTERM it then waits on (the process never ended)."""
    from torch.utils.data._utils import signal_handling

    original = getattr(signal_handling, "_set_worker_signal_handlers", None)
    if original is None or getattr(args, "dataloader_persistent_workers", False):  # (as before)
        yield
        return

    def set_handlers(*args, **kwargs):
        original(*args, **kwargs)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)  # (SIGINT: torch's workers leave it to their process already)

    signal_handling._set_worker_signal_handlers = set_handlers
    try:
        yield
    finally:
        signal_handling._set_worker_signal_handlers = original


def _notice(text: str) -> None:
    # straight to the file descriptor: a handler that writes to sys.stderr while the interrupted code is writing
    # to it (a progress bar) raises "reentrant call"
    with contextlib.suppress(OSError, ValueError, AttributeError):
        os.write(sys.stderr.fileno(), text.encode())


class InterruptibleTrainer:
    """Trainer mixin: ``train`` under ``stop_on_signals``; raises ``TrainingInterrupted`` if a signal stopped it."""

    def train(self, *args, **kwargs):
        with stop_on_signals(self) as callback:
            try:
                output = super().train(*args, **kwargs)
            finally:
                if callback.kept_limit:  # (raised for the stop: the user's again)
                    self.args.save_total_limit = 1
        if callback.stopped_at is not None and self.state.global_step < self.state.max_steps:
            folder = os.path.join(self.args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            saved = is_complete(folder)
            raise TrainingInterrupted(callback.signum, self.state.global_step, folder if saved else None)
        if callback.signum is not None:
            logger.warning("%s came after the last step: training finished", signal.Signals(callback.signum).name)
        return output
