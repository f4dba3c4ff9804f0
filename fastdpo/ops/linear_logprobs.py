"""Per-token log-probs straight from hidden states and the LM head, without the ``[tokens, vocab]`` logits.

The op, in plain torch (what ``impl="naive"`` does, and what every other impl must agree with)::

    z = hidden @ weight.T (+ bias)                 # [N, V]
    z = z * logit_scale
    z = softcap * tanh(z / softcap)                # when softcap is set
    z = z / temperature
    logp = z.log_softmax(-1).gather(-1, targets)   # [N], 0 where targets == ignore_index

``impl="torch"`` computes the same thing chunk by chunk of tokens: each chunk's logits live in one reused
buffer (64 MiB of fp32 by default; half-precision inputs on a GPU multiply on the tensor cores with fp32 results
in 1 GiB chunks, and Triton row kernels do the element-wise work between the products, see ``_HeadGemms``), the
forward keeps only the log-sum-exp per token, and the backward recomputes each chunk's logits from it.
``impl="triton"`` runs fused kernels (``fastdpo.kernels``) that never write a logit to memory. Either way, only
tokens whose target is not ignored are ever computed.
"""

from __future__ import annotations

import contextlib
import functools
from typing import NamedTuple

import torch
from torch import Tensor

from fastdpo.kernels import triton_available
from fastdpo.ops.head_checks import OUTPUT_NAMES, check_args, check_targets, refuse_second_derivative

IMPLS = ("auto", "torch", "naive", "triton")
DEFAULT_CHUNK_BYTES = 64 * 2**20
GPU_CHUNK_BYTES = 2**30  # half-precision heads on a GPU: fewer, larger chunks (see _HeadGemms)
HALF = (torch.float16, torch.bfloat16)


class LinearLogprobs(NamedTuple):
    """Per-token results, each shaped like ``targets``, fp32 (fp64 for fp64 inputs), 0 at ignored positions.

    Fields not asked for in ``outputs`` are None. Only ``logp`` carries gradients.
    """

    logp: Tensor
    """log p(target | context)."""
    entropy: Tensor | None
    """Entropy of the next-token distribution, ``-Σ_v p_v log p_v``."""
    mean_logit: Tensor | None
    """Mean over the vocabulary of the transformed logits (what TRL logs as ``logits/chosen|rejected``)."""
    is_top1: Tensor | None
    """1.0 where the target is the first argmax of the logits (``mean_token_accuracy``), else 0.0."""
    log_sum_sq_probs: Tensor | None
    """``log Σ_v p_v²`` (the WPO weights)."""


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    impl: str = "auto",
    outputs: tuple[str, ...] = ("logp",),
    chunk_bytes: int | None = None,
    deterministic: bool | None = None,
    grad_filter_eps: float | None = None,
) -> LinearLogprobs:
    """Log-probs of ``targets`` under ``softmax(transform(hidden @ weight.T + bias))``, fused.

    Args:
        hidden: ``[..., H]`` fp32, fp16, bf16 (or fp64, for gradcheck).
        weight: ``[V, H]``, the LM head.
        targets: ``[...]`` int64, the next token per position; ``ignore_index`` where there is none.
        bias: ``[V]`` or None.
        logit_scale, softcap, temperature: applied in that order (as transformers' heads and TRL do).
        impl: ``naive`` (full logits; the reference), ``torch`` (chunked; on a GPU with half inputs, cuBLAS
            products and Triton epilogue kernels), ``triton`` (fused CUDA kernels, no logits at all), ``auto`` (on
            CUDA with Triton: torch for fp16/bf16 hidden and weight of one dtype, triton for other dtypes; else
            torch).
        outputs: which of ``logp, entropy, mean_logit, is_top1, log_sum_sq_probs`` to compute;
            ``logp`` is always computed.
        chunk_bytes: ``impl="torch"`` only: the tokens of one chunk are ``chunk_bytes // (4·V)``, the size of
            their logits in fp32 (fp64 inputs' logits take twice that, and ``entropy`` a second buffer of it); None:
            64 MiB, or 1 GiB for half-precision inputs on a GPU (whose products allocate each chunk, see
            ``_HeadGemms``).
        deterministic: ``impl="triton"``: bitwise reproducible gradients (two backward passes, one more logit
            recompute) instead of fp32 atomic adds; None (default) follows
            ``torch.are_deterministic_algorithms_enabled()``. ``naive`` and ``torch`` are always deterministic.
        grad_filter_eps: ``impl="triton"``: skip the backward work of logit tiles whose probabilities are all
            below this and that hold no target (an approximation; None, the default, is exact). Each skipped
            gradient term is ``g·p·t'`` with ``p < grad_filter_eps`` and ``t'`` the transform's derivative
            (``logit_scale / temperature`` without a softcap). ``naive`` and ``torch`` are always exact.

    Returns:
        LinearLogprobs of per-token tensors shaped like ``targets``.
    """
    check_args(hidden, weight, targets, bias, logit_scale, temperature, softcap, outputs, chunk_bytes)
    if grad_filter_eps is not None and not 0.0 <= grad_filter_eps < 1.0:
        raise ValueError(f"grad_filter_eps: must be in [0, 1) or None, got {grad_filter_eps}")
    hidden, weight, bias = autocast_head_inputs(hidden, weight, bias)
    impl = _resolve_impl(impl, hidden, weight)
    lead_shape = targets.shape
    hidden_2d = hidden.reshape(-1, hidden.shape[-1])
    targets_1d = targets.reshape(-1)
    transform = (float(logit_scale), None if softcap is None else float(softcap), float(temperature))
    wanted = tuple(name in outputs for name in OUTPUT_NAMES[1:])
    if impl == "naive":
        results = _naive(hidden_2d, weight, bias, targets_1d, transform, ignore_index, wanted)
    elif impl == "triton":
        if deterministic is None:
            deterministic = torch.are_deterministic_algorithms_enabled()
        backward_options = (bool(deterministic), grad_filter_eps)
        with autocast_off(hidden_2d):
            results = _TritonLinearLogprobs.apply(
                hidden_2d, weight, bias, targets_1d, transform, ignore_index, wanted, backward_options
            )
    else:
        with autocast_off(hidden_2d):
            results = _ChunkedLinearLogprobs.apply(
                hidden_2d, weight, bias, targets_1d, transform, ignore_index, wanted, chunk_bytes
            )
    return LinearLogprobs(*(None if r is None else r.view(lead_shape) for r in results))


def autocast_head_inputs(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    """The head's inputs as an ``nn.Linear`` head would multiply them on a GPU: in autocast's dtype when autocast is
    on there (``bf16=True`` on a model loaded in fp32), else unchanged.

    The casts are autograd ops: gradients reach fp32 weights in fp32, each step's contribution rounded to the
    autocast dtype as in every autocast ``nn.Linear``. Without them the chunked path would run its products in
    fp32 (autocast does not lower ``mm(out=)`` or an in-place ``addmm_``), about an order of magnitude below the
    half-precision tensor-core rate. fp64 inputs are left alone, as autocast leaves them. Where the chunked path
    has no half-precision products (``_half_branch``: a CPU) nothing is cast: it multiplies in fp32 anyway, and a
    cast would only cost a rounded copy of the weight.
    """
    device_type = hidden.device.type
    if not (_half_branch(hidden.device) and torch.is_autocast_enabled(device_type)):
        return hidden, weight, bias
    dtype = torch.get_autocast_dtype(device_type)
    tensors = [t for t in (hidden, weight, bias) if t is not None]
    if dtype not in HALF or any(t.dtype == torch.float64 for t in tensors) or all(t.dtype == dtype for t in tensors):
        return hidden, weight, bias
    return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)


def autocast_off(tensor: Tensor):
    """A context with autocast off on ``tensor``'s device: the chunked paths pick each product's precision
    themselves (autocast would lower some of the element-wise work and the gradient products formed in the forward,
    and leave the rest)."""
    device_type = tensor.device.type
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _resolve_impl(impl: str, hidden: Tensor, weight: Tensor) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl: unknown {impl!r}; choose from {IMPLS}")
    triton_dtypes = (torch.float16, torch.bfloat16, torch.float32)
    if impl == "auto":
        usable = hidden.is_cuda and hidden.dtype in triton_dtypes and weight.dtype in triton_dtypes
        if not (usable and triton_available()):
            return "torch"
        # half inputs of one dtype (autocast's included, see autocast_head_inputs): cuBLAS products and the
        # epilogue kernels (_HeadGemms) ran 2.1x faster than the fused kernels on an H200
        # (bench/results/NVIDIA_H200/run3); other dtype mixes keep the fused kernels, which take mixed inputs in the
        # wider dtype (fp32), as the chunked path would (fp32 on a GPU: not measured against it)
        same_half = hidden.dtype in HALF and weight.dtype == hidden.dtype and _half_branch(hidden.device)
        return "torch" if same_half else "triton"
    if impl == "triton":
        if not triton_available():
            raise ValueError("impl: 'triton' needs the triton package (Linux x86_64 with a CUDA GPU); use 'torch'")
        if hidden.dtype not in triton_dtypes or weight.dtype not in triton_dtypes:
            raise ValueError(
                f"impl: 'triton' takes fp16, bf16 or fp32 inputs, got {hidden.dtype} and {weight.dtype}; "
                "use impl='torch' (e.g. for fp64 gradchecks)"
            )
        from fastdpo.kernels import linear_logprobs as kernels  # imports triton: only when asked for

        if not hidden.is_cuda and not kernels.INTERPRETED:
            raise ValueError(
                f"impl: 'triton' needs CUDA tensors, got {hidden.device}; use impl='torch' on CPU (or set "
                "TRITON_INTERPRET=1 before the first triton call, to test the kernels on CPU)"
            )
    return impl


def _acc_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp32, or fp64 when any input is fp64: the dtype logits and statistics are computed in."""
    dtype = torch.float32
    for t in tensors:
        if t is not None:
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _transform_(z: Tensor, transform: tuple[float, float | None, float]) -> Tensor:
    """In place: ``z * logit_scale``, then the tanh softcap, then ``/ temperature``."""
    scale, softcap, temperature = transform
    if softcap is None:
        if scale / temperature != 1.0:
            z.mul_(scale / temperature)
        return z
    return z.mul_(scale / softcap).tanh_().mul_(softcap / temperature)


def _naive(hidden, weight, bias, targets, transform, ignore_index, wanted):
    """Full ``[N, V]`` logits, as a plain model head would: matmul in the input dtype, softmax in fp32."""
    acc = _acc_dtype(hidden, weight, bias)
    logits = torch.nn.functional.linear(
        hidden, weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)
    )
    z = logits.to(acc)
    scale, softcap, temperature = transform
    if scale != 1.0:  # (only where set: each is a pass over [N, V] and another buffer, which a plain head has not)
        z = z * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    if temperature != 1.0:
        z = z / temperature
    valid = targets != ignore_index
    check_targets(targets, valid, weight.shape[0])
    safe_targets = torch.where(valid, targets, 0).long()
    log_probs = torch.log_softmax(z, dim=-1)
    logp = log_probs.gather(-1, safe_targets[:, None]).squeeze(-1).masked_fill(~valid, 0.0)
    want_entropy, want_mean, want_top1, want_sq = wanted
    with torch.no_grad():
        entropy = None  # (p log p is 0 where a logit is -inf, a bias banning tokens: 0 * -inf was NaN)
        if want_entropy:
            p_log_p = torch.where(log_probs == float("-inf"), 0.0, log_probs.exp() * log_probs)  # (a NaN stays NaN)
            entropy = -p_log_p.sum(-1).masked_fill(~valid, 0.0)
        mean_logit = z.mean(-1).masked_fill(~valid, 0.0) if want_mean else None
        is_top1 = ((z.argmax(-1) == safe_targets) & valid).to(acc) if want_top1 else None
        log_sum_sq = torch.logsumexp(2 * log_probs, dim=-1).masked_fill(~valid, 0.0) if want_sq else None
    return logp, entropy, mean_logit, is_top1, log_sum_sq


def _chunk_rows(num_rows: int, vocab: int, chunk_bytes: int) -> int:
    return max(1, min(num_rows, chunk_bytes // (4 * vocab)))


class _ChunkedLinearLogprobs(torch.autograd.Function):
    """Chunked over tokens; forward keeps lse [n_valid], backward recomputes each chunk's logits from it."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform, ignore_index, wanted, chunk_bytes):
        acc = _acc_dtype(hidden, weight, bias)
        valid = targets != ignore_index
        check_targets(targets, valid, weight.shape[0])
        rows = valid.nonzero().squeeze(-1)
        kept_targets = targets[rows].long()
        n_valid, vocab = rows.numel(), weight.shape[0]
        gemms = _HeadGemms(hidden, weight, bias, acc)
        chunk_bytes = gemms.chunk_bytes(chunk_bytes)
        lse = torch.empty(n_valid, dtype=acc, device=hidden.device)
        stats = [torch.zeros(n_valid, dtype=acc, device=hidden.device) for _ in range(5)]
        chunk = _chunk_rows(n_valid, vocab, chunk_bytes)
        # one reused buffer, except where the products allocate their fp32 result (half inputs on a GPU)
        logits = torch.empty(chunk, vocab, dtype=acc, device=hidden.device) if n_valid and not gemms.half else None
        scratch = None
        if n_valid and wanted[0] and gemms.epilogue is None:
            scratch = torch.empty(chunk, vocab, dtype=acc, device=hidden.device)
        for start in range(0, n_valid, chunk):
            stop = min(start + chunk, n_valid)
            h = gemms.rows(hidden[rows[start:stop]])
            if gemms.epilogue is not None:  # one kernel reads the raw logits once (see _HeadGemms)
                found = gemms.stats(gemms.raw_logits(h), kept_targets[start:stop], transform, wanted)
                for value, target in zip(found, [lse, *stats], strict=True):
                    if value is not None:
                        target[start:stop] = value
                continue
            buffer = None if logits is None else logits[: stop - start]
            z = _transform_(gemms.logits(h, out=buffer), transform)
            _fold_chunk(z, kept_targets[start:stop], wanted, lse[start:stop], [s[start:stop] for s in stats], scratch)
        logp_kept = stats[0]
        results = [_scatter(logp_kept, rows, targets)]
        for want, stat in zip(wanted, stats[1:], strict=True):
            results.append(_scatter(stat, rows, targets) if want else None)
        ctx.save_for_backward(hidden, weight, bias, rows, kept_targets, lse)
        ctx.transform, ctx.chunk_bytes = transform, chunk_bytes
        ctx.mark_non_differentiable(*(r for r in results[1:] if r is not None))
        ctx.set_materialize_grads(False)
        return tuple(results)

    @staticmethod
    def backward(ctx, grad_logp, *_unused):
        refuse_second_derivative("linear_logprobs")
        hidden, weight, bias, rows, kept_targets, lse = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if grad_logp is None:
            return (None,) * 8
        acc = lse.dtype
        gemms = _HeadGemms(hidden, weight, bias, acc)
        grad_kept = grad_logp.reshape(-1)[rows].to(acc)
        n_valid, vocab = rows.numel(), weight.shape[0]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(vocab, dtype=acc, device=weight.device) if need_bias else None
        chunk = _chunk_rows(n_valid, vocab, gemms.chunk_bytes(ctx.chunk_bytes))
        softcapped = ctx.transform[1] is not None
        logits = torch.empty(chunk, vocab, dtype=acc, device=hidden.device) if n_valid and not gemms.half else None
        tanh_buf = None
        if n_valid and softcapped and gemms.epilogue is None:
            tanh_buf = torch.empty(chunk, vocab, dtype=acc, device=hidden.device)
        for start in range(0, n_valid, chunk):
            stop = min(start + chunk, n_valid)
            chunk_rows = rows[start:stop]
            h = gemms.rows(hidden[chunk_rows])
            if gemms.epilogue is not None:
                z = gemms.raw_logits(h)
                dz = gemms.dz(z, kept_targets[start:stop], lse[start:stop], grad_kept[start:stop], ctx.transform)
                z = None  # freed before the next chunk's product allocates
            else:
                dz = _logits_grad(
                    h, gemms, kept_targets[start:stop], lse[start:stop], grad_kept[start:stop], ctx.transform,
                    out=None if logits is None else logits[: stop - start],
                    tanh_buf=None if tanh_buf is None else tanh_buf[: stop - start],
                )  # fmt: skip
            if grad_hidden is not None:
                grad_hidden[chunk_rows] = gemms.grad_hidden(dz, hidden.dtype)
            if grad_weight is not None:
                gemms.add_grad_weight(grad_weight, dz, h)
            if grad_bias is not None:
                grad_bias += dz.sum(0, dtype=acc)
            dz = None  # gone before the next chunk's product allocates (its dz is a new tensor on a GPU)
        return (
            grad_hidden,
            None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype),
            None, None, None, None, None,
        )  # fmt: skip


class _HeadGemms:
    """The head's three products for one call of the chunked paths, in the precision the inputs allow.

    Half-precision hidden and weight on a GPU multiply in their own dtype on the tensor cores with fp32 results
    (``torch.mm(..., out_dtype=torch.float32)``): the logits are not rounded to the input dtype as a bf16
    ``nn.Linear`` would round them, and no fp32 copy of the weight is made. dz is rounded to the input dtype before
    the two backward products, as torch's own half-precision backward does, and dW accumulates over chunks in fp32
    (in the product's epilogue where ``torch.addmm(..., out_dtype=)`` allows it). Where Triton is installed, what
    lies between the products runs in the kernels of ``fastdpo.kernels.head_epilogue`` (``epilogue``): one read of
    each chunk's raw fp32 logits for the log-sum-exp and the statistics, one for a dz written in the input dtype,
    in place of a dozen torch passes over the chunk. Anything else (CPU, fp32, fp64, mixed dtypes) is upcast to the
    accumulation dtype and multiplied there, with torch's element-wise ops between.
    """

    def __init__(self, hidden: Tensor, weight: Tensor, bias: Tensor | None, acc: torch.dtype):
        self.acc = acc
        self.half = _half_branch(hidden.device) and hidden.dtype in HALF and weight.dtype == hidden.dtype
        self.weight = weight if self.half else weight.to(acc)
        self.bias = None if bias is None else bias.to(acc)
        self.epilogue = _epilogue_kernels(hidden) if self.half else None

    def chunk_bytes(self, requested: int | None) -> int:
        if requested is not None:
            return requested
        return GPU_CHUNK_BYTES if self.half else DEFAULT_CHUNK_BYTES

    def rows(self, h: Tensor) -> Tensor:
        """A chunk of hidden rows as the products take it."""
        return h if self.half else h.to(self.acc)

    def logits(self, h: Tensor, *, out: Tensor | None = None) -> Tensor:
        """``h @ W.T + b``, the raw logits of one chunk, in the accumulation dtype (into ``out`` if given and used)."""
        if self.half:
            z = torch.mm(h, self.weight.t(), out_dtype=self.acc)
        else:  # into an accumulation-dtype buffer (autocast does not lower mm(out=): see autocast_head_inputs)
            if out is None:
                out = torch.empty(h.shape[0], self.weight.shape[0], dtype=self.acc, device=h.device)
            z = torch.mm(h, self.weight.t(), out=out)
        if self.bias is not None:
            z.add_(self.bias)
        return z

    def raw_logits(self, h: Tensor) -> Tensor:
        """``h @ W.T`` of one chunk in the accumulation dtype, without the bias (the epilogue kernels add it)."""
        return torch.mm(h, self.weight.t(), out_dtype=self.acc) if self.half else torch.mm(h, self.weight.t())

    def stats(self, z: Tensor, targets: Tensor, transform, wanted) -> list[Tensor | None]:
        """Epilogue: ``[lse, logp, entropy, mean_logit, is_top1, log_sum_sq_probs]`` of raw logits ``z``."""
        return self.epilogue.row_stats(z, self.bias, targets, self.epilogue.Transform(*transform), wanted)

    def dz(self, z: Tensor, targets: Tensor, lse: Tensor, grad: Tensor, transform) -> Tensor:
        """Epilogue: ``∂loss/∂(h W.T + b)`` from raw logits ``z``, in the weight's dtype (z is then free)."""
        transform = self.epilogue.Transform(*transform)
        return self.epilogue.logits_grad(z, self.bias, targets, lse, grad, transform, self.weight.dtype)

    def grad_hidden(self, dz: Tensor, dtype: torch.dtype) -> Tensor:
        """``dz @ W`` in ``dtype``."""
        return (dz.to(self.weight.dtype) if self.half else dz).mm(self.weight).to(dtype)

    def add_grad_weight(self, grad_weight: Tensor, dz: Tensor, h: Tensor) -> None:
        """``grad_weight += dz.T @ h`` (grad_weight in the accumulation dtype)."""
        add_product(grad_weight, (dz.to(h.dtype) if self.half else dz).t(), h)


def add_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b`` with ``acc`` in a wider dtype than half-precision ``a`` and ``b``: on CUDA the product runs
    in their dtype on the tensor cores with ``acc``'s dtype as its result (in the GEMM's epilogue where
    ``torch.addmm(..., out_dtype=)`` allows it); elsewhere ``a`` and ``b`` are upcast first."""
    if a.dtype == b.dtype and a.dtype in HALF and acc.dtype != a.dtype and _half_branch(acc.device):
        if _addmm_out_dtype():
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
        else:
            acc.add_(torch.mm(a, b, out_dtype=acc.dtype))
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _half_branch(device: torch.device) -> bool:
    """Whether the chunked paths multiply half-precision inputs in their own dtype on ``device`` (``_HeadGemms``):
    CUDA where ``torch.mm(..., out_dtype=)`` exists."""
    return device.type == "cuda" and _mm_out_dtype()


@functools.cache
def _mm_out_dtype() -> bool:
    """Whether this torch has ``torch.mm(a, b, out_dtype=)`` for half inputs on CUDA (probed once)."""
    try:
        a = torch.ones(16, 16, dtype=torch.bfloat16, device="cuda")
        return torch.mm(a, a, out_dtype=torch.float32).dtype == torch.float32
    except (RuntimeError, TypeError):
        return False


@functools.cache
def _addmm_out_dtype() -> bool:
    """Whether ``torch.addmm(c, a, b, out_dtype=torch.float32, out=c)`` accumulates half products into an fp32 ``c``
    correctly on CUDA here (probed once against the plain sum): dW then needs no fp32 temporary per chunk."""
    try:
        gen = torch.Generator(device="cuda").manual_seed(0)
        a, b = (torch.randn(64, 64, device="cuda", generator=gen).bfloat16() for _ in range(2))
        c = torch.randn(64, 64, device="cuda", generator=gen)
        expected = c + a.float() @ b.float()
        torch.addmm(c, a, b, out_dtype=torch.float32, out=c)
        return bool(torch.allclose(c, expected, rtol=1e-4, atol=1e-4))
    except (RuntimeError, TypeError):
        return False


def _epilogue_kernels(hidden: Tensor):
    """``fastdpo.kernels.head_epilogue`` for CUDA inputs where Triton is installed, else None (torch ops instead)."""
    if not (hidden.is_cuda and triton_available()):
        return None
    from fastdpo.kernels import head_epilogue  # imports triton: only on a GPU

    return head_epilogue


def _fold_chunk(z, targets, wanted, lse, stats, scratch):
    """Turn one chunk of logits into lse and the per-token statistics; ``z`` is overwritten."""
    want_entropy, want_mean, want_top1, want_sq = wanted
    logp, entropy, mean_logit, is_top1, log_sum_sq = stats
    target_logit = z.gather(1, targets[:, None]).squeeze(1)
    if want_mean:
        mean_logit.copy_(z.mean(1))
    if want_top1:
        # max's index is the first maximum, so a tie with an earlier token is not a top-1 hit (as TRL's argmax);
        # one pass for both (argmax alone took 3x max's time on a CPU)
        row_max, first = z.max(1)
        is_top1.copy_(first == targets)
    else:
        row_max = z.amax(1)
    shifted = z.sub_(row_max[:, None])  # z - max, in place
    # Entropy needs z - max and its exp side by side; otherwise exponentiate in place
    exp = torch.exp(shifted, out=scratch[: z.shape[0]]) if want_entropy else shifted.exp_()
    sum_exp = exp.sum(1)
    log_sum_exp = sum_exp.log()
    lse.copy_(row_max + log_sum_exp)
    logp.copy_(target_logit - lse)
    if want_entropy:
        # H = log s - Σ e (z - m) / s, with e = exp(z - m) and s = Σ e; a -inf logit (e = 0) adds 0, not 0 * -inf
        # (in place on z - max, read no more: a batched dot product took 4x a product and a sum on a CPU)
        weighted = shifted.clamp_(min=torch.finfo(shifted.dtype).min).mul_(exp).sum(1)
        entropy.copy_(log_sum_exp - weighted / sum_exp)
    if want_sq:
        # log Σ p² = log Σ e² - 2 log s; Σ e² >= 1 since the largest e is 1, so this cannot underflow
        log_sum_sq.copy_(2 * torch.linalg.vector_norm(exp, dim=1).log() - 2 * log_sum_exp)


def _logits_grad(h, gemms, targets, lse, grad, transform, *, out, tanh_buf):
    """``∂loss/∂(h W.T + b)`` for one chunk (into ``out`` where given): ``g (onehot(y) - p)`` through the transform."""
    scale, softcap, temperature = transform
    out = gemms.logits(h, out=out)
    if softcap is None:
        out.mul_(scale / temperature)
    else:
        tanh = torch.tanh(out.mul_(scale / softcap), out=tanh_buf)
        torch.mul(tanh, softcap / temperature, out=out)
    probs = out.sub_(lse[:, None]).exp_()
    return _dz_from_probs_(probs, targets, grad, transform, tanh if softcap is not None else None)


def _dz_from_probs_(probs: Tensor, targets: Tensor, grad: Tensor, transform, tanh: Tensor | None) -> Tensor:
    """In place on the softmax ``probs``: ``grad·(onehot(y) − probs)`` times the transform's derivative.

    With a softcap, ``z = (c/T)·tanh(u)`` and ``dz/draw = (s/T)(1 − tanh²)``; ``tanh`` (overwritten) is its tanh.
    """
    scale, softcap, temperature = transform
    dz = probs.mul_(-grad[:, None])
    dz.scatter_add_(1, targets[:, None], grad[:, None])
    if softcap is not None:
        dz.mul_(tanh.square_().neg_().add_(1.0))  # d tanh = 1 - tanh²
    if scale / temperature != 1.0:
        dz.mul_(scale / temperature)
    return dz


def _scatter(values_kept: Tensor, rows: Tensor, targets: Tensor) -> Tensor:
    out = torch.zeros(targets.shape, dtype=values_kept.dtype, device=values_kept.device)
    out[rows] = values_kept
    return out


class _TritonLinearLogprobs(torch.autograd.Function):
    """The fused Triton kernels: forward keeps lse [n_valid]; backward recomputes logit tiles from it."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, transform, ignore_index, wanted, backward_options):
        from fastdpo.kernels import linear_logprobs as kernels

        valid = targets != ignore_index
        check_targets(targets, valid, weight.shape[0])
        rows = valid.nonzero().squeeze(-1)
        kept_targets = targets[rows].long()
        dtype = torch.promote_types(hidden.dtype, weight.dtype)  # mixed inputs run in the wider dtype
        h, w = hidden.to(dtype), weight.to(dtype)
        b = None if bias is None else bias.to(dtype)
        kernel_transform = kernels.Transform(*transform)
        out = kernels.forward(h, w, b, rows, kept_targets, transform=kernel_transform, wanted=wanted)
        results = [_scatter(out[1], rows, targets)]
        for want, stat in zip(wanted, out[2:], strict=True):
            results.append(_scatter(stat, rows, targets) if want else None)
        ctx.save_for_backward(h, w, b, rows, kept_targets, out[0])
        ctx.transform, ctx.backward_options = kernel_transform, backward_options
        ctx.input_dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        ctx.mark_non_differentiable(*(r for r in results[1:] if r is not None))
        ctx.set_materialize_grads(False)
        return tuple(results)

    @staticmethod
    def backward(ctx, grad_logp, *_unused):
        from fastdpo.kernels import linear_logprobs as kernels

        refuse_second_derivative("linear_logprobs")
        if grad_logp is None:
            return (None,) * 8
        h, w, b, rows, kept_targets, lse = ctx.saved_tensors
        deterministic, filter_eps = ctx.backward_options
        need = tuple(ctx.needs_input_grad[:3])
        grads = kernels.backward(
            h, w, b, rows, kept_targets, lse, grad_logp.reshape(-1)[rows], transform=ctx.transform, need=need,
            deterministic=deterministic, filter_eps=filter_eps,
        )  # fmt: skip
        hidden_dtype, weight_dtype, bias_dtype = ctx.input_dtypes
        grad_hidden = None
        if grads.hidden is not None:
            grad_hidden = torch.zeros(h.shape, dtype=hidden_dtype, device=h.device)
            grad_hidden[rows] = grads.hidden.to(hidden_dtype)
        grad_weight = None if grads.weight is None else grads.weight.to(weight_dtype)
        grad_bias = None if grads.bias is None else grads.bias.to(bias_dtype)
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None
