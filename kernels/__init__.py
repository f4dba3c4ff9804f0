"""Triton kernels of fastdpo, installed as ``fastdpo.kernels``.

This layer holds ``@triton.jit`` kernels and their launchers only: no autograd, no model code. Importing it
never imports Triton or compiles anything; each kernel module does that itself when it is first imported
(``fastdpo.ops`` imports ``fastdpo.kernels.linear_logprobs`` on the first ``impl="triton"`` call).

- ``linear_logprobs``: the fused per-token log-prob forward (online softmax over vocabulary tiles, split across
  programs) and backward (logit tiles recomputed from the saved lse; atomic or deterministic two-pass).
- ``head_epilogue``: row kernels over a chunk of raw logits cuBLAS wrote (the chunked head on a GPU): log-sum-exp
  and statistics in one read, dz in the input dtype in another.
- ``rms_norm``: the Llama-form RMSNorm forward and backward, one read of each row (the lean norms on a GPU).
- ``swiglu``: ``silu(gate) * up`` and its gradients, one pass each (the lean MLPs on a GPU).
- ``rope``: the Llama-form rotary embedding of q and k, forward and backward, bit for bit torch's (the lean layers'
  RoPE on a GPU).
- ``configs``: the tile table per (dtype, hidden size) and the opt-in tuner.

``TRITON_INTERPRET=1`` must be set before ``fastdpo.kernels.linear_logprobs`` is imported to run the kernels
on CPU tensors (tests only; bf16 is refused there).
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported here (it is absent on macOS and Windows)."""
    return importlib.util.find_spec("triton") is not None


KERNELS: tuple[str, ...] = ("linear_logprobs", "head_epilogue", "rms_norm", "swiglu", "rope")
"""Names of the kernel families this build ships (modules of this package)."""
