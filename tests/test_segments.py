from __future__ import annotations

import pytest
import torch

from fastdpo.ops import segment_mean, segment_sum


def loop_sum(values, cu, weights=None):
    w = torch.ones_like(values) if weights is None else weights
    return torch.stack([(values[a:b] * w[a:b]).sum() for a, b in zip(cu[:-1].tolist(), cu[1:].tolist(), strict=True)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sum_and_mean_match_a_loop_with_empty_segments(dtype):
    gen = torch.Generator().manual_seed(0)
    lengths = torch.tensor([3, 0, 1, 7, 0, 5])
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
    values = torch.randn(int(lengths.sum()), generator=gen, dtype=dtype, requires_grad=True)
    mask = (torch.rand(values.shape, generator=gen) > 0.4).to(dtype)
    sums = segment_sum(values, cu)
    torch.testing.assert_close(sums, loop_sum(values.detach(), cu), rtol=0, atol=1e-6)
    assert sums[1] == 0 and sums[4] == 0
    weighted = segment_sum(values, cu, mask)
    torch.testing.assert_close(weighted, loop_sum(values.detach(), cu, mask), rtol=0, atol=1e-6)
    means = segment_mean(values, cu, mask)
    counts = loop_sum(mask, cu)
    expected = torch.where(counts > 0, loop_sum(values.detach(), cu, mask) / counts.clamp(min=1), 0)
    torch.testing.assert_close(means, expected.to(means.dtype), rtol=0, atol=1e-6)
    plain_means = segment_mean(values, cu)
    assert plain_means[1] == 0 and torch.isclose(plain_means[0], values[:3].mean().to(plain_means.dtype))


def test_gradients_flow_to_each_token():
    cu = torch.tensor([0, 2, 2, 5])
    values = torch.arange(5, dtype=torch.float64, requires_grad=True)
    (segment_mean(values, cu) * torch.tensor([1.0, 7.0, 3.0], dtype=torch.float64)).sum().backward()
    torch.testing.assert_close(values.grad, torch.tensor([0.5, 0.5, 1.0, 1.0, 1.0], dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda v: segment_sum(v, cu), (values,))


@pytest.mark.parametrize(
    "cu",
    [torch.tensor([1, 3, 5]), torch.tensor([0, 3, 4]), torch.tensor([0, 4, 2, 5]), torch.tensor([[0, 5]])],
)
def test_bad_boundaries_are_refused(cu):
    with pytest.raises(ValueError, match="^cu_seqlens:"):
        segment_sum(torch.zeros(5), cu)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="^values:"):
        segment_sum(torch.zeros(5, 2), torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="^weights:"):
        segment_sum(torch.zeros(5), torch.tensor([0, 5]), torch.ones(4))
    with pytest.raises(ValueError, match="^cu_seqlens:"):
        segment_sum(torch.zeros(5), torch.tensor([0.0, 5.0]))


def test_ld_token_weights_weigh_each_pairs_tail_past_the_shorter_side():
    from fastdpo.ops.segments import ld_token_weights, pair_segments

    # segments: pair 0 chosen (3 completion tokens), pair 0 rejected (1), a padding segment, pair 1 rejected (2) and
    # pair 1 chosen (4): pairs need not be adjacent nor in order
    x = -100
    segments = [[x, x, 5, 6, 7, x], [x, 8, x], [x, x], [x, 1, 2, x], [x, 3, 4, 9, 9, x]]
    targets = torch.tensor([t for segment in segments for t in segment])
    cu_seqlens = torch.tensor([0, 6, 9, 11, 15, 21], dtype=torch.int32)
    seq_pair, seq_is_chosen = torch.tensor([0, 0, -1, 1, 1]), torch.tensor([True, False, False, False, True])
    a = 0.25
    expected = [*[1, 1, 1, a, a, 1], *[1, 1, 1], *[1, 1], *[1, 1, 1, 1], *[1, 1, 1, a, a, 1]]
    got = ld_token_weights(targets, cu_seqlens, pair_segments(cu_seqlens, seq_pair, seq_is_chosen), a)
    assert got.dtype == torch.float32 and got.tolist() == expected
