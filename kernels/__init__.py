"""Triton kernels of fastdpo, installed as ``fastdpo.kernels``.

This layer holds ``@triton.jit`` kernels and their launchers only: no autograd, no model code. Importing it
never imports Triton or compiles anything; each kernel module does that itself when it is first used.
The fused log-prob kernels behind ``linear_logprobs(impl="triton")`` are the next milestone; until they land,
``fastdpo.ops`` refuses ``impl="triton"`` with a clear error.
"""

from __future__ import annotations

import importlib.util


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported here (it is absent on macOS and Windows)."""
    return importlib.util.find_spec("triton") is not None


KERNELS: tuple[str, ...] = ()
"""Names of the kernel families this build ships; empty until the fused log-prob kernels land."""
