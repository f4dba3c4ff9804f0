"""Training: ``DPOConfig`` and the preference step on packed batches (the trainers that wrap them come next)."""

from fastdpo.train.config import DPOConfig
from fastdpo.train.step import preference_step, reference_logps

__all__ = ["DPOConfig", "preference_step", "reference_logps"]
