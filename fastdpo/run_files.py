"""``RunFiles``: the callback that keeps a ``fastdpo dpo|sft`` run directory's ``metrics.jsonl`` and ``plots/``.

Apart from ``fastdpo.cli`` so that the commands that do not train (``env``, ``data``, ``--help``) do not import
transformers' Trainer machinery (with peft and bitsandbytes installed, about 7 s).
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path

from transformers import TrainerCallback

from fastdpo.atomic import pyplot_or_none, save_figure


class RunFiles(TrainerCallback):
    """Appends every log to ``metrics.jsonl`` and redraws ``plots/*.png`` at each evaluation and at the end."""

    PLOTS = ("loss", "rewards/margins", "rewards/accuracies")

    def __init__(self, out: Path, *, restart: bool = False) -> None:
        self.out = out
        self.metrics = out / "metrics.jsonl"
        self.restart = restart  # the log starts over, even resumed (from another run's checkpoint: not this one's)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        kept, reached = [], 0
        # resumed: the logs up to its checkpoint's step stay, those after it are logged again
        if state.global_step > 0 and not self.restart and self.metrics.is_file():
            for line in self.metrics.read_text().splitlines():
                with contextlib.suppress(ValueError):  # a line a killed run left half-written
                    log = json.loads(line)
                    reached = max(reached, log["step"])
                    # a stopped run's end-of-training summary (at the step it saved) goes: the resumed run logs its own
                    if log["step"] <= state.global_step and "train_runtime" not in log:
                        kept.append(line + "\n")
        if reached > state.global_step:  # (save_total_limit with load_best_model_at_end keeps the best one alone)
            logging.getLogger("fastdpo").warning(
                "resuming from the checkpoint of step %d, where the run had reached step %d: its later steps are "
                "trained again (no later checkpoint is left)", state.global_step, reached)  # fmt: skip
        from fastdpo.atomic import atomic_write

        atomic_write(self.metrics, "".join(kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.metrics.open("a") as handle:
                handle.write(json.dumps({"step": state.global_step, **logs}) + "\n")

    def on_evaluate(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.plot()

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.plot()

    def plot(self) -> None:
        plt = pyplot_or_none(f"{self.out / 'plots'}/")
        if plt is None:
            return
        logs = [json.loads(line) for line in self.metrics.read_text().splitlines() if line]
        (self.out / "plots").mkdir(exist_ok=True)
        for name in self.PLOTS:
            series = {label: [(log["step"], log[key]) for log in logs if key in log]
                      for label, key in (("train", name), ("eval", f"eval_{name}"))}  # fmt: skip
            if not any(series.values()):
                continue
            figure, axes = plt.subplots(figsize=(6, 4))
            for label, points in series.items():
                if points:
                    axes.plot(*zip(*points, strict=True), marker="o", label=label)
            axes.set_xlabel("step")
            axes.set_ylabel(name)
            axes.legend()
            axes.grid(alpha=0.3)
            figure.tight_layout()
            save_figure(figure, self.out / "plots" / f"{name.replace('/', '_')}.png")
            plt.close(figure)
