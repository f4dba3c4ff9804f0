"""The native trainers' evaluations: a set given to ``evaluate()`` or ``predict()`` is prepared as the constructor
prepares its eval sets and is the set scored, its metrics its own and under its ``metric_key_prefix``."""

from __future__ import annotations

from fastdpo.data.stream import gather_worker_drops


class ScoresGivenSets:
    """``evaluate()`` and ``predict()`` of a dataset given: its rows prepared as the constructor prepares its eval sets
    (the trainer's ``_to_score(dataset, name)``: raw rows tokenized, tokenized ones checked), as TRL's ``evaluate()``
    prepares them (transformers' ``predict()`` of raw rows failed in its column check, TRL's too)."""

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = self._to_score(eval_dataset, "eval")
        try:
            return evaluate_afresh(self, super().evaluate, eval_dataset, ignore_keys, metric_key_prefix)
        finally:  # (an eval stream's rows its dataloader workers dropped: in dropped_rows after each evaluation)
            gather_worker_drops(getattr(self, "_streams", []), self.dropped_rows)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        test_dataset = self._to_score(test_dataset, metric_key_prefix)
        return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)


def evaluate_afresh(trainer, evaluate, eval_dataset, ignore_keys, metric_key_prefix: str) -> dict[str, float]:
    """``evaluate(eval_dataset=...)`` (the Trainer's) on a DataLoader of the set given: under
    ``dataloader_persistent_workers`` transformers returns its cached loader of the trainer's eval set for any set
    given (scoring that one instead, silently); the cached loader is kept for the calls without a set."""
    forget_eval_metrics(trainer)
    cache = getattr(trainer, "_eval_dataloaders", None)
    given = isinstance(cache, dict) and eval_dataset is not None and not isinstance(eval_dataset, str)
    kept = cache.pop("eval", None) if given else None
    try:
        return evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
    finally:
        if given:
            cache.pop("eval", None)
            if kept is not None:
                cache["eval"] = kept


def forget_eval_metrics(trainer) -> None:
    """The eval-mode metrics that a ``predict()`` (which never logs) left, forgotten before an evaluation counts its
    own: they were averaged into the next evaluation's (eval_rewards/accuracies 0.5 where the set's is 0.75)."""
    metrics = getattr(trainer, "_metrics", {}).get("eval")  # (SFT's lists by name, DPO's StepMetrics)
    if metrics is not None:
        metrics.clear()


def eval_prefix(logs: dict) -> str:
    """The prefix of an evaluation's logs, its ``metric_key_prefix`` (``eval``, a dict's ``eval_<name>``, ``test``),
    read from its ``<prefix>_runtime``: the trainers' own eval metrics were logged as ``eval_*`` whatever it was, a
    dict's sets' under one name (the last set's values)."""
    ends = [key.removesuffix("_runtime") for key in logs if key.endswith("_runtime") and key != "train_runtime"]
    return ends[0] if ends else "eval"
