"""Microbenchmarks of the ops with pytest-benchmark, outside the CI test run (testpaths is tests/):

    pytest bench/ --benchmark-only [--benchmark-json out.json]

Small shapes, fp32 on the CPU (on a CUDA machine the GPU shapes of bench.head_gpu are the ones that matter).
"""

from __future__ import annotations

import random

import pytest
import torch

from fastdpo.data.packer import cpp_available, pack
from fastdpo.ops import LossConfig, linear_logprobs
from fastdpo.ops.fused_pair_loss import fused_pair_loss

N, H, V, SEQ = 2048, 256, 32000, 256


@pytest.fixture(scope="module")
def head():
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(N, H, generator=gen).requires_grad_()
    weight = (torch.randn(V, H, generator=gen) / H**0.5).requires_grad_()
    targets = torch.randint(0, V, (N,), generator=gen)
    return hidden, weight, targets


@pytest.mark.parametrize("impl", ["naive", "torch"])
def test_linear_logprobs_fwd_bwd(benchmark, head, impl):
    hidden, weight, targets = head

    def step():
        hidden.grad = weight.grad = None
        linear_logprobs(hidden, weight, targets, impl=impl).logp.sum().backward()

    benchmark(step)


def test_fused_pair_loss_fwd_bwd(benchmark, head):
    hidden, weight, targets = head
    rows = N // SEQ
    cu_seqlens = torch.arange(0, N + 1, SEQ, dtype=torch.int32)
    seq_pair, seq_is_chosen = torch.arange(rows) % (rows // 2), torch.arange(rows) < rows // 2
    ref = torch.full((rows // 2,), -100.0)
    config = LossConfig(loss_type="sigmoid", beta=0.1)

    def step():
        hidden.grad = weight.grad = None
        fused_pair_loss(hidden, weight, targets, cu_seqlens, seq_pair, seq_is_chosen, config, ref_chosen=ref,
                        ref_rejected=ref).loss.backward()  # fmt: skip

    benchmark(step)


@pytest.mark.parametrize("backend", ["python", "cpp"])
def test_pack_20k_sequences(benchmark, backend):
    if backend == "cpp" and not cpp_available():
        pytest.skip("the C++ packer was not built")
    rng = random.Random(0)
    lengths = [rng.randint(20, 1800) for _ in range(20000)]
    bins = benchmark(pack, lengths, 2048, backend=backend)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
