"""Test helpers shared by the linear_logprobs tests: an independent fp64 reference and input factories."""

from __future__ import annotations

import torch

IGNORE = -100


def reference(h, w, b, y, *, logit_scale=1.0, temperature=1.0, softcap=None):
    """Every output from the full fp64 logits, by definition (no code shared with fastdpo)."""
    h, w = h.double(), w.double()
    z = h @ w.T
    if b is not None:
        z = z + b.double()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    valid = y != IGNORE
    safe = torch.where(valid, y, 0)
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(-1, safe[..., None]).squeeze(-1) - lse
    p = torch.softmax(z, dim=-1)
    out = {
        "logp": logp,
        "entropy": -(p * torch.log(p)).nan_to_num().sum(-1),
        "mean_logit": z.mean(-1),
        "is_top1": (z.argmax(-1) == safe).double(),
        "log_sum_sq_probs": torch.log((p * p).sum(-1)),
    }
    return {k: torch.where(valid, v, torch.zeros_like(v)) for k, v in out.items()}


def make(n, h, v, dtype, *, ignore="some", bias=False, seed=0, lead=None):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen) * 2.0
    weight = torch.randn(v, h, generator=gen) / h**0.5
    targets = torch.randint(0, v, (n,), generator=gen)
    if ignore == "some":
        targets[torch.rand(n, generator=gen) < 0.3] = IGNORE
    elif ignore == "all":
        targets[:] = IGNORE
    b = torch.randn(v, generator=gen) if bias else None
    if lead is not None:
        hidden, targets = hidden.view(*lead, h), targets.view(*lead)
    cast = [hidden.to(dtype), weight.to(dtype), None if b is None else b.to(dtype)]
    return [None if t is None else t.requires_grad_() for t in cast] + [targets]


def max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
