"""Training: ``DPOConfig``, ``DPOTrainer`` and the preference step on packed batches."""

from fastdpo.train.config import DPOConfig
from fastdpo.train.dpo import DPOTrainer
from fastdpo.train.step import preference_step, reference_logps

__all__ = ["DPOConfig", "DPOTrainer", "preference_step", "reference_logps"]
