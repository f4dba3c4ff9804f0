"""The head ops' argument checks (``linear_logprobs``, ``fused_pair_loss``, ``target_logit_gap``): each bad argument
a ``ValueError`` that names it, before any product."""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

OUTPUT_NAMES = ("logp", "entropy", "mean_logit", "is_top1", "log_sum_sq_probs")


def check_args(hidden, weight, targets, bias, logit_scale, temperature, softcap, outputs, chunk_bytes) -> None:
    if not isinstance(hidden, Tensor) or hidden.dim() < 1 or not hidden.is_floating_point():
        raise ValueError("hidden: expected a floating-point tensor [..., H]")
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError("weight: expected a floating-point tensor [V, H]")
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight: has H={weight.shape[1]} but hidden has H={hidden.shape[-1]}")
    if hidden.shape[-1] < 1:
        raise ValueError("hidden: the hidden size is 0 (H = 0)")
    if weight.shape[0] < 1:
        raise ValueError("weight: the vocabulary is empty (V = 0)")
    if not isinstance(targets, Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise ValueError("targets: expected an int64 tensor of token ids")
    if tuple(targets.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"targets: shape {tuple(targets.shape)} does not match hidden {tuple(hidden.shape[:-1])}")
    if bias is not None and (not isinstance(bias, Tensor) or tuple(bias.shape) != (weight.shape[0],)):
        raise ValueError(f"bias: expected a tensor of shape ({weight.shape[0]},)")
    for name, device in (("weight", weight.device), ("targets", targets.device)):
        if device != hidden.device:
            raise ValueError(f"{name}: on {device} but hidden is on {hidden.device}")
    if not math.isfinite(logit_scale):
        raise ValueError(f"logit_scale: must be finite, got {logit_scale}")
    if not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    if softcap is not None and not (softcap > 0 and math.isfinite(softcap)):
        raise ValueError(f"softcap: must be > 0 or None, got {softcap}")
    if isinstance(outputs, str):  # (its letters were named as unknown outputs)
        raise ValueError(f"outputs: a tuple of names, got the string {outputs!r}; write outputs=({outputs!r},)")
    unknown = [name for name in outputs if name not in OUTPUT_NAMES]
    if unknown:
        raise ValueError(f"outputs: unknown {unknown!r}; choose from {OUTPUT_NAMES}")
    whole = isinstance(chunk_bytes, numbers.Integral) and not isinstance(chunk_bytes, bool)  # (a float: torch.empty)
    if chunk_bytes is not None and not (whole and chunk_bytes >= 1):
        raise ValueError(f"chunk_bytes: must be a positive integer (bytes), got {chunk_bytes!r}")


def refuse_second_derivative(op: str) -> None:
    """In a backward: a RuntimeError where autograd asks for its graph (``create_graph=True``, a gradient penalty).
    The head's backward is computed from stored values, not differentiable; without this the second-order terms
    were left out without a word (Triton) or failed inside an ``out=`` product (torch)."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"{op}: a second derivative (create_graph=True) is not supported: its backward is computed "
                           "from stored values, not differentiable; use linear_logprobs(..., impl='naive') for a "
                           "gradient penalty")  # fmt: skip


def check_targets(targets: Tensor, valid: Tensor, vocab: int) -> None:
    kept = targets[valid]
    if kept.numel() and (int(kept.min()) < 0 or int(kept.max()) >= vocab):
        bad = kept[(kept < 0) | (kept >= vocab)][0].item()
        raise ValueError(f"targets: token id {bad} is outside the vocabulary [0, {vocab}) and is not ignore_index")
