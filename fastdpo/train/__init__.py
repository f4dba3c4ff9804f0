"""Training: the preference step on packed batches (the trainers that wrap it come next)."""

from fastdpo.train.step import preference_step, reference_logps

__all__ = ["preference_step", "reference_logps"]
