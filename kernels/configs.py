"""Tile configurations for the fused log-prob kernels: a small fixed table, and an opt-in tuner.

Nothing here runs at import: the table is a dict, and the tuner runs only when ``tune`` is called (or the op is
used with ``FASTDPO_TUNE=1``). The table's entries are starting points chosen from the H100's limits (228 KB of
shared memory per SM, 64K registers, 132 SMs) for 128×128 fp32 accumulator tiles; they have not yet been tuned
on a GPU — ``tune`` measures the candidates on the device at hand and replaces the entry for that
(dtype, hidden size) for the rest of the process.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileConfig:
    """Block sizes (rows, vocabulary, hidden), grouped launch order, and Triton's warps and pipeline stages."""

    block_n: int
    block_v: int
    block_k: int
    group_n: int = 8
    num_warps: int = 8
    num_stages: int = 3


def _h_bucket(hidden_size: int) -> str:
    return "small" if hidden_size <= 1024 else "large"


# (dtype class, H bucket, pass) -> config. Chosen by compiling for sm_90 with Triton's ptxas on a CPU machine
# (fastdpo.kernels.compile_report, with the alignment hints real launches get): 128×128 tiles with 64-wide K steps
# and 3 stages keep every operand load pipelined (96–160 KB of shared memory, under the H100's 228 KB); the plain
# atomic backward (dh, dW) spills nothing and the plain forward little, while bias + softcap + filtering or every
# optional output add 30–370 bytes of spills (bench/results/kernel_report_sm90.md); 256-wide vocabulary tiles
# spill hundreds even in the plain kernels.
# Not yet timed on a GPU: `tune` is the way to correct them there.
TABLE: dict[tuple[str, str, str], TileConfig] = {
    ("16bit", "small", "forward"): TileConfig(128, 128, 64, group_n=8, num_warps=8, num_stages=3),
    ("16bit", "large", "forward"): TileConfig(128, 128, 64, group_n=8, num_warps=8, num_stages=3),
    ("16bit", "small", "backward"): TileConfig(128, 128, 64, group_n=8, num_warps=8, num_stages=3),
    ("16bit", "large", "backward"): TileConfig(128, 128, 64, group_n=8, num_warps=8, num_stages=3),
    ("fp32", "small", "forward"): TileConfig(128, 128, 32, group_n=8, num_warps=8, num_stages=2),
    ("fp32", "large", "forward"): TileConfig(128, 128, 32, group_n=8, num_warps=8, num_stages=2),
    ("fp32", "small", "backward"): TileConfig(64, 128, 32, group_n=8, num_warps=8, num_stages=2),
    ("fp32", "large", "backward"): TileConfig(64, 128, 32, group_n=8, num_warps=8, num_stages=2),
}
INTERPRETER_CONFIG = TileConfig(16, 32, 16, group_n=2, num_warps=1, num_stages=1)
"""Under TRITON_INTERPRET=1: the smallest tiles tl.dot accepts, so that small test shapes still span many tiles."""

_TUNED: dict[tuple[str, str, str], TileConfig] = {}


def _key(dtype: torch.dtype, hidden_size: int, backward: bool) -> tuple[str, str, str]:
    dtype_class = "fp32" if dtype == torch.float32 else "16bit"
    return dtype_class, _h_bucket(hidden_size), "backward" if backward else "forward"


def pick_config(dtype: torch.dtype, hidden_size: int, *, interpreted: bool, backward: bool = False) -> TileConfig:
    """The tuned config for this (dtype, H range, pass) if ``tune`` ran, else the table's."""
    if interpreted:
        return INTERPRETER_CONFIG
    key = _key(dtype, hidden_size, backward)
    return _TUNED.get(key, TABLE[key])


def forward_splits(row_tiles: int, vocab_tiles: int, device: torch.device, *, interpreted: bool) -> int:
    """How many vocabulary ranges the forward splits into.

    At least 16 (when V has that many tiles): with the grouped launch order, the programs in flight then cover a
    few row tiles across many vocabulary ranges, so the hidden rows stay in L2 while the head streams past.
    More when there are few row tiles, so that about two programs per SM are in flight.
    """
    if interpreted:
        return min(3, vocab_tiles)
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(vocab_tiles, max(16, -(-2 * sms // row_tiles))))


def candidates(dtype: torch.dtype) -> list[TileConfig]:
    """The configs ``tune`` tries by default."""
    steps = (32,) if dtype == torch.float32 else (32, 64)
    found = []
    for block_n, block_v in ((64, 128), (128, 64), (128, 128), (128, 256)):
        for block_k in steps:
            for num_warps, num_stages in ((4, 3), (8, 3), (8, 4)):
                found.append(TileConfig(block_n, block_v, block_k, 8, num_warps, num_stages))
    return found


def _median_seconds(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def tune(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    configs: Iterable[TileConfig] | None = None,
) -> tuple[TileConfig, TileConfig]:
    """Time the candidate configs on these tensors; keep the fastest forward and backward for their key.

    Opt-in (it compiles and runs every candidate, seconds to minutes on a GPU). Candidates that fail to compile
    or run (e.g. too much shared memory on this device) are skipped. Returns (forward, backward) configs.
    """
    from . import linear_logprobs as kernels

    rows = torch.arange(targets.numel(), device=hidden.device)
    grad = torch.ones(targets.numel(), dtype=torch.float32, device=hidden.device)
    timings: dict[str, list[tuple[float, TileConfig]]] = {"forward": [], "backward": []}
    for cfg in list(configs or candidates(hidden.dtype)):
        try:
            lse = kernels.forward(hidden, weight, None, rows, targets, config=cfg)[0]

            def run_forward(cfg=cfg):
                return kernels.forward(hidden, weight, None, rows, targets, config=cfg)

            def run_backward(cfg=cfg, lse=lse):
                return kernels.backward(hidden, weight, None, rows, targets, lse, grad, config=cfg)

            fwd = _median_seconds(run_forward, hidden.device)
            bwd = _median_seconds(run_backward, hidden.device)
        except Exception as exc:  # a config this device cannot run (shared memory, registers) is no candidate
            if type(exc).__name__ not in ("OutOfResources", "CompilationError"):
                raise
            continue
        timings["forward"].append((fwd, cfg))
        timings["backward"].append((bwd, cfg))
    if not timings["forward"]:
        raise RuntimeError("fastdpo.kernels.tune: no candidate config ran on this device")
    best_fwd = min(timings["forward"], key=lambda t: t[0])[1]
    best_bwd = min(timings["backward"], key=lambda t: t[0])[1]
    _TUNED[_key(hidden.dtype, hidden.shape[-1], backward=False)] = best_fwd
    _TUNED[_key(hidden.dtype, hidden.shape[-1], backward=True)] = best_bwd
    return best_fwd, best_bwd


def tune_once(hidden: torch.Tensor, weight: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor) -> None:
    """``tune`` on these rows unless their (dtype, H range) was tuned already in this process (``FASTDPO_TUNE=1``)."""
    if _key(hidden.dtype, hidden.shape[-1], backward=False) not in _TUNED:
        tune(hidden[rows], weight, targets)
