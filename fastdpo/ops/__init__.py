"""The ops layer: fused per-token log-probs, segment reductions over packed sequences, the loss family."""

from fastdpo.ops.fused_linear import (
    FusedLinearCPOLoss,
    FusedLinearDPOLoss,
    FusedLinearORPOLoss,
    FusedLinearSimPOLoss,
)
from fastdpo.ops.fused_pair_loss import FUSED_LOSS_TYPES, fused_pair_loss, supports_fused
from fastdpo.ops.linear_logprobs import OUTPUT_NAMES, LinearLogprobs, linear_logprobs
from fastdpo.ops.losses import LOSS_TYPES, REFERENCE_FREE, LossConfig, LossOutput, PairLogps, preference_loss
from fastdpo.ops.segments import segment_mean, segment_sum

__all__ = [
    "FUSED_LOSS_TYPES",
    "LOSS_TYPES",
    "OUTPUT_NAMES",
    "REFERENCE_FREE",
    "FusedLinearCPOLoss",
    "FusedLinearDPOLoss",
    "FusedLinearORPOLoss",
    "FusedLinearSimPOLoss",
    "LinearLogprobs",
    "LossConfig",
    "LossOutput",
    "PairLogps",
    "fused_pair_loss",
    "linear_logprobs",
    "preference_loss",
    "segment_mean",
    "segment_sum",
    "supports_fused",
]
