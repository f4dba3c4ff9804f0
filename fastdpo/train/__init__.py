"""Training: ``SFTConfig``/``SFTTrainer``, ``DPOConfig``/``DPOTrainer``, and their steps on packed batches."""

from fastdpo.train.config import DPOConfig
from fastdpo.train.dpo import DPOTrainer
from fastdpo.train.interrupt import TrainingInterrupted
from fastdpo.train.sft import SFTTrainer, sft_step
from fastdpo.train.sft_config import SFTConfig
from fastdpo.train.step import preference_step, reference_logps

__all__ = [
    "DPOConfig",
    "DPOTrainer",
    "SFTConfig",
    "SFTTrainer",
    "TrainingInterrupted",
    "preference_step",
    "reference_logps",
    "sft_step",
]
