"""Likelihood displacement: the chosen answers becoming less likely while reward accuracy rises (``DisplacementWatch``,
read by the native DPO trainer and the drop-in's logs)."""

from __future__ import annotations

import warnings


class LikelihoodDisplacementWarning(UserWarning):
    """The chosen answers are becoming less likely while reward accuracy rises (``DisplacementWatch``)."""


class DisplacementWatch:
    """Watches the chosen answers' log-probability and warns once on likelihood displacement.

    DPO can raise reward accuracy while the chosen answers themselves become less likely: both log-probabilities
    fall, the rejected ones faster, and greedy answers often get worse (likelihood displacement; common at high
    learning rates). ``update`` adds ``logps/chosen_change`` (``logps/chosen`` now minus at the first training log)
    to the metrics and warns with ``LikelihoodDisplacementWarning`` the first time the chosen log-probability has
    fallen by more than ``max(1, margin × |first logps/chosen|)`` nats while ``rewards/accuracies`` is above its
    first value. With a reference (``beta`` given), "fallen" is measured on the logged batch itself: the chosen
    answers' log-ratio to the reference (``rewards/chosen / β``) against its first value, so that a batch of longer
    or harder answers (a lower ``logps/chosen`` whatever the weights) does not read as displacement; reference-free
    losses compare ``logps/chosen`` across batches. ``margin`` None: no watch (the change is still logged).
    """

    def __init__(self, margin: float | None, beta: float | None = None):
        self.margin, self.beta, self.warned = margin, beta, False
        self.start = self.start_accuracy = self.start_ratio = None

    def state(self) -> dict:
        """What a checkpoint keeps (``fastdpo.train.resume``): the first values and whether it warned."""
        return {"start": self.start, "start_accuracy": self.start_accuracy, "start_ratio": self.start_ratio,
                "warned": self.warned}  # fmt: skip

    def load_state(self, state: dict) -> None:
        self.start, self.start_accuracy, self.warned = state["start"], state["start_accuracy"], bool(state["warned"])
        self.start_ratio = state.get("start_ratio")  # absent in checkpoints from before 2026-11-27

    def update(self, metrics: dict[str, float], *, learning_rate: float, warn: bool = True) -> bool:
        """Record one log's metrics (in place: adds the change); True when this call found displacement (and warned,
        unless ``warn`` is False: the other processes of a distributed run stay quiet)."""
        chosen, accuracy = metrics.get("logps/chosen"), metrics.get("rewards/accuracies")
        if chosen is None or accuracy is None:
            return False
        matched = self.beta is not None and self.beta != 0 and "rewards/chosen" in metrics
        ratio = metrics["rewards/chosen"] / self.beta if matched else None
        if self.start is None:
            self.start, self.start_accuracy, self.start_ratio = chosen, accuracy, ratio
        metrics["logps/chosen_change"] = chosen - self.start
        matched = matched and self.start_ratio is not None
        fallen = self.start_ratio - ratio if matched else self.start - chosen
        if self.warned or self.margin is None or fallen <= max(1.0, self.margin * abs(self.start)):
            return False
        if accuracy <= self.start_accuracy:
            return False
        self.warned = True
        if not warn:
            return True
        what = (f"fell {fallen:.2f} nats against the reference's on the same answers (rewards/chosen / beta: "
                f"{self.start_ratio:.2f} at the first log, {ratio:.2f} now)" if matched else
                f"(logps/chosen) fell from {self.start:.2f} to {chosen:.2f}")  # fmt: skip
        warnings.warn(
            f"likelihood displacement: the chosen answers' log-probability {what} while reward accuracy rose from "
            f"{self.start_accuracy:.2f} to {accuracy:.2f}. The policy pushes the rejected answers down faster than "
            "it keeps the chosen ones up, and its own answers often get worse. What helps: add an SFT term on the "
            "chosen answers (loss_type=['sigmoid', 'sft'] with loss_weights=[1.0, 1.0], TRL's RPO) or lower the "
            f"learning rate (now {learning_rate:g}). displacement_margin=None turns this check off.",
            LikelihoodDisplacementWarning,
            stacklevel=2,
        )
        return True
