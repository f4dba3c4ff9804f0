"""The chunked head's epilogue kernels (``fastdpo.kernels.head_epilogue``) under TRITON_INTERPRET=1.

On a GPU, ``impl="torch"`` and ``fused_pair_loss`` with half-precision inputs leave the logits to cuBLAS and run
these two row kernels over each chunk of raw fp32 logits. Here they run on CPU tensors (fp32 and fp16; the
interpreter has no bf16) with 32-wide vocabulary tiles, against the fp64 reference of ``logprob_reference`` and
against the torch ops they replace, on vocabularies that are not multiples of the tile, with bias, softcap, scale and
temperature. ``tests/test_kernels_gpu.py`` runs the same paths in bf16 at real shapes on a GPU.
"""

from __future__ import annotations

import sys

import pytest
import torch
from interpreter import MARKS
from logprob_reference import IGNORE, make, max_err, reference
from test_fused_pair_loss import packed_case, plain

from fastdpo.ops import LossConfig, linear_logprobs
from fastdpo.ops.fused_pair_loss import fused_pair_loss

pytestmark = MARKS

TRANSFORMS = {
    "plain": {},
    "temperature": {"temperature": 0.7},
    "softcap_scale_temperature": {"softcap": 4.0, "temperature": 1.3, "logit_scale": 0.9},
}


def epilogue():
    from fastdpo.kernels import head_epilogue

    assert head_epilogue.INTERPRETED, "fastdpo.kernels was imported before TRITON_INTERPRET=1 was set"
    return head_epilogue


def transformed(z, bias, transform):
    x = z.double() + (0 if bias is None else bias.double())
    x = x * transform.get("logit_scale", 1.0)
    if transform.get("softcap") is not None:
        x = transform["softcap"] * torch.tanh(x / transform["softcap"])
    return x / transform.get("temperature", 1.0)


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize(
    ("n", "vocab", "dtype", "with_bias"),
    [(7, 203, torch.float32, True), (5, 33, torch.float16, False), (3, 1, torch.float32, True)],
)
def test_kernels_equal_the_fp64_definitions(name, n, vocab, dtype, with_bias):
    module = epilogue()
    gen = torch.Generator().manual_seed(n * vocab)
    z = (torch.randn(n, vocab, generator=gen) * 4).to(dtype)
    bias = torch.randn(vocab, generator=gen).to(dtype) if with_bias else None
    targets = torch.randint(0, vocab, (n,), generator=gen)
    # row 0: a tie for the maximum between the first and the last column (another tile), target on the last: the
    # first index is the argmax, so no hit; row 1: the target is the argmax, a hit
    last = vocab - 1
    z[0, 0] += 50
    z[0, last] = z[0, 0]
    if bias is not None:
        bias[last] = bias[0]
    targets[0] = last
    targets[1 % n] = int(transformed(z, bias, TRANSFORMS[name])[1 % n].argmax())
    transform = TRANSFORMS[name]
    kernel_transform = module.Transform(
        transform.get("logit_scale", 1.0), transform.get("softcap"), transform.get("temperature", 1.0)
    )
    x = transformed(z, bias, transform)
    log_p = x.log_softmax(1)
    expected = [
        x.logsumexp(1),
        log_p.gather(1, targets[:, None])[:, 0],
        -(log_p.exp() * log_p).sum(1),
        x.mean(1),
        (x.argmax(1) == targets).double(),
        (2 * log_p).logsumexp(1),
    ]
    got = module.row_stats(z, bias, targets, kernel_transform, (True, True, True, True))
    for value, want in zip(got, expected, strict=True):
        assert value.dtype == torch.float32
        # fp32 arithmetic on values of magnitude <= ~60 over <= 203 terms: a few fp32 ulps of 60 (~4e-6)
        torch.testing.assert_close(value.double(), want, rtol=1e-5, atol=2e-5)
    assert got[4][1 % n] == 1 and (vocab == 1 or got[4][0] == 0)
    assert [v is None for v in module.row_stats(z, bias, targets, kernel_transform, (False,) * 4)[2:]] == [True] * 4

    grad = torch.randn(n, generator=gen, dtype=torch.float64)
    raw = (z.double() + (0 if bias is None else bias.double())).requires_grad_()
    xr = transformed(raw, None, transform)
    (xr.log_softmax(1).gather(1, targets[:, None])[:, 0] * grad).sum().backward()
    for out_dtype in (torch.float32, torch.float16):
        z_in = z.clone()
        dz = module.logits_grad(z_in, bias, targets, got[0], grad.float(), kernel_transform, out_dtype)
        assert dz.dtype == out_dtype and dz.shape == z.shape
        assert (dz.data_ptr() == z_in.data_ptr()) == (out_dtype == z.dtype)  # in place exactly when dtypes agree
        # fp32: rounding of p = exp(x - lse) (~1e-7 relative); fp16 output: half an fp16 ulp, 2^-11 relative
        tol = 1e-6 if out_dtype == torch.float32 else 2.0**-11
        torch.testing.assert_close(dz.double(), raw.grad, rtol=tol, atol=tol * raw.grad.abs().max().item())


def test_empty_chunk_and_bad_shapes():
    module = epilogue()
    z = torch.zeros(0, 9)
    lse, logp, *_ = module.row_stats(z, None, torch.zeros(0, dtype=torch.long), module.Transform(), (False,) * 4)
    assert lse.shape == logp.shape == (0,)
    assert module.logits_grad(
        z, None, torch.zeros(0, dtype=torch.long), lse, lse, module.Transform(), torch.float16
    ).shape == (0, 9)
    with pytest.raises(ValueError, match="^targets:"):
        module.row_stats(torch.ones(3, 4), None, torch.zeros(2, dtype=torch.long), module.Transform(), (False,) * 4)
    with pytest.raises(ValueError, match="^z:"):
        module.row_stats(torch.ones(4, 3).t(), None, torch.zeros(3, dtype=torch.long), module.Transform(), (False,) * 4)


@pytest.fixture
def epilogue_on(monkeypatch):
    """Switch the chunked paths' epilogue on for fp32/fp16 CPU tensors (on a GPU: half inputs); count its uses."""
    module = sys.modules["fastdpo.ops.linear_logprobs"]
    kernels, calls = epilogue(), []
    real_init = module._HeadGemms.__init__

    def init(self, hidden, weight, bias, acc):
        real_init(self, hidden, weight, bias, acc)
        if hidden.dtype != torch.float64:  # the fp64 references keep the torch ops
            self.epilogue = kernels
            calls.append(hidden.dtype)

    monkeypatch.setattr(module._HeadGemms, "__init__", init)
    return calls


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_linear_logprobs_with_the_epilogue_equals_the_reference(epilogue_on, name):
    hidden, weight, bias, targets = make(37, 20, 203, torch.float32, bias=True, seed=5)
    outputs = ("logp", "entropy", "mean_logit", "is_top1", "log_sum_sq_probs")
    transform = TRANSFORMS[name]
    with torch.no_grad():  # a third of the kept targets made the argmax, so that is_top1 has hits to get right
        top = (hidden @ weight.T + bias).argmax(1)
        targets[::3] = torch.where(targets[::3] == IGNORE, IGNORE, top[::3])
    # chunks of 8 rows: 26 kept rows in 4 chunks, the last one short
    out = linear_logprobs(
        hidden, weight, targets, bias=bias, impl="torch", outputs=outputs, chunk_bytes=4 * 203 * 8, **transform
    )
    assert epilogue_on, "the epilogue branch did not run"
    expected = reference(hidden, weight, bias, targets, **transform)
    for field in outputs:
        # fp32 logits and statistics (values <= ~30): 1e-5 absolute; is_top1 exactly (no near-ties in these draws)
        assert max_err(getattr(out, field), expected[field]) <= (0 if field == "is_top1" else 1e-5), field
    assert out.is_top1.sum() >= 4
    upstream = torch.randn(targets.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad((out.logp * upstream).sum(), (hidden, weight, bias))
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (hidden, weight, bias))
    want = torch.autograd.grad(
        (reference(h64, w64, b64, targets, **transform)["logp"] * upstream.double()).sum(), (h64, w64, b64)
    )
    for g, r in zip(got, want, strict=True):
        # fp32 products and softmax; sums of <= 37 terms of magnitude <= ~5: 2e-5 absolute
        assert max_err(g, r) < 2e-5


def test_fused_pair_loss_with_the_epilogue_equals_the_plain_path(epilogue_on):
    config = LossConfig(loss_type="sigmoid", beta=0.1)
    h, w, b, targets, cu, seq_pair, seq_is_chosen, ref = packed_case(dtype=torch.float32)
    kw = {"softcap": 5.0, "temperature": 0.8, "logit_scale": 1.3}
    packing = (cu, seq_pair, seq_is_chosen, config)
    got = fused_pair_loss(h, w, targets, *packing, ref_chosen=ref[:, 0], ref_rejected=ref[:, 1], bias=b,
                          chunk_bytes=4 * 97 * 14, token_metrics=True, **kw)  # fmt: skip
    assert epilogue_on
    grads = torch.autograd.grad(got.loss, (h, w, b))
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, w, b))
    assert epilogue_on == [torch.float32]
    expected = plain(h64, w64, b64, targets, cu, seq_pair, seq_is_chosen, ref.double(), config, **kw)
    want = torch.autograd.grad(expected.loss, (h64, w64, b64))
    # fp32 against fp64: the loss ~0.7 to 1e-6, the gradients (magnitude <= ~0.1) to 1e-6
    assert abs(got.loss.item() - expected.loss.item()) < 1e-6
    for g, r in zip(grads, want, strict=True):
        assert max_err(g, r) < 1e-6
    ref64 = ref.double()
    plain_metrics = fused_pair_loss(h64, w64, targets, *packing, ref_chosen=ref64[:, 0], ref_rejected=ref64[:, 1],
                                    bias=b64, token_metrics=True, **kw).metrics  # fmt: skip
    for key in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"):
        assert abs(got.metrics[key].item() - plain_metrics[key].item()) < 1e-5, key


@pytest.mark.parametrize("op", ["linear_logprobs", "fused_pair_loss"])
def test_one_chunk_of_logits_is_alive_at_a_time(epilogue_on, monkeypatch, op):
    # what estimate_memory counts for the GPU path: when a chunk's product is formed, the previous chunk's logits and
    # its dz are gone (on a GPU each product allocates; a dz still referenced from the last chunk would double them)
    import weakref

    module = sys.modules["fastdpo.ops.linear_logprobs"]
    real_raw, real_dz, earlier, alive_at_product = module._HeadGemms.raw_logits, module._HeadGemms.dz, [], []

    def raw_logits(self, h):
        alive_at_product.append(sum(ref() is not None for ref in earlier))
        z = real_raw(self, h)
        earlier.append(weakref.ref(z))
        return z

    def dz(self, *args):
        out = real_dz(self, *args)
        earlier.append(weakref.ref(out))
        return out

    monkeypatch.setattr(module._HeadGemms, "raw_logits", raw_logits)
    monkeypatch.setattr(module._HeadGemms, "dz", dz)
    if op == "linear_logprobs":
        hidden, weight, _, targets = make(37, 20, 203, torch.float32, seed=2)
        out = linear_logprobs(hidden, weight, targets, impl="torch", chunk_bytes=4 * 203 * 8)
        out.logp.sum().backward()
    else:
        h, w, _bias, targets, cu, seq_pair, seq_is_chosen, ref = packed_case(dtype=torch.float32)
        loss = fused_pair_loss(h, w, targets, cu, seq_pair, seq_is_chosen, LossConfig(loss_type="sigmoid"),
                               ref_chosen=ref[:, 0], ref_rejected=ref[:, 1], chunk_bytes=4 * 97 * 4).loss  # fmt: skip
        loss.backward()
    assert len(alive_at_product) >= 4, "the case needs several chunks"
    assert max(alive_at_product) == 0, alive_at_product
