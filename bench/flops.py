"""Useful training FLOPs of a DPO step, and this machine's measured fp32 GEMM rate to hold them against.

    python -m bench.flops [--tokens 4096] [--repeats 5] [--threads 2]      # prints the GEMM rates

The FLOP convention (``dpo_step_flops``) counts the work a dense implementation needs for the real tokens only:
padding, recomputation (gradient checkpointing) and logits nobody reads are not useful work, whichever engine
spends them. ``gemm_rates`` times ``torch.mm`` on the GEMM shapes of one training step (forward ``X @ W``, and the
backward's ``dY @ W.T`` and ``X.T @ dY``) with the threads the trainer gets.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-style decoder that set its matmul FLOPs."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a transformers ``LlamaConfig`` (or any config with the same field names)."""
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        return cls(hidden=config.hidden_size, layers=config.num_hidden_layers, heads=config.num_attention_heads,
                   kv_heads=config.num_key_value_heads, head_dim=head_dim, intermediate=config.intermediate_size,
                   vocab=config.vocab_size)  # fmt: skip

    @property
    def body_params(self) -> int:
        """Weights of the body's linear layers (q, k, v, o, gate, up, down); no embedding, no norms."""
        attention = 2 * self.hidden * self.heads * self.head_dim + 2 * self.hidden * self.kv_heads * self.head_dim
        return self.layers * (attention + 3 * self.hidden * self.intermediate)

    @property
    def head_params(self) -> int:
        """The LM head ``[V, H]``."""
        return self.vocab * self.hidden


@dataclass(frozen=True)
class StepFlops:
    """Useful FLOPs of one DPO step (policy forward + backward, reference forward), by part."""

    policy_body: float
    policy_head: float
    policy_attention: float
    reference_body: float
    reference_head: float
    reference_attention: float

    @property
    def total(self) -> float:
        return sum(getattr(self, name) for name in self.__dataclass_fields__)

    def __add__(self, other: StepFlops) -> StepFlops:
        return StepFlops(*(getattr(self, n) + getattr(other, n) for n in self.__dataclass_fields__))


def causal_attended(seq_lens: Sequence[int]) -> int:
    """Σ over sequences of Σ_{i=1..n} i: the (query, key) pairs of causal attention within each sequence."""
    return sum(n * (n + 1) // 2 for n in seq_lens)


def dpo_step_flops(shape: ModelShape, seq_lens: Sequence[int], *, head_tokens: int | None = None) -> StepFlops:
    """Useful FLOPs of one DPO step over sequences of real lengths ``seq_lens`` (chosen and rejected, prompt included).

    Convention (a multiply-add is 2 FLOPs; only matmuls are counted, not norms, activations, softmax or the loss):

    - Linear layers, per token: forward ``2·P``, backward ``4·P`` (``dX`` and ``dW``, also in the first layer),
      with ``P = shape.body_params`` for the body (every real token) and ``shape.head_params`` for the head
      (``head_tokens`` tokens). Policy: forward + backward = ``6·P``; reference: forward only = ``2·P``.
    - Attention, per sequence of length ``n`` and per layer: query ``i`` (1-based) attends to ``i`` keys, so
      ``QK^T`` and ``PV`` each cost ``2·A·Σ_{i=1..n} i`` with ``A = heads·head_dim`` (query heads: grouped
      K/V heads share keys but not the work); forward ``2·2·A·n(n+1)/2``, and the backward twice the forward
      (policy ×3, reference ×1). Sequences never attend to each other; padding attends to nothing.
    - ``head_tokens``: positions whose logits are computed. None means every real token (the usual ``6·N`` per
      token); the DPO loss reads only the positions whose next token is a completion token, which is the strictly
      useful count.
    """
    tokens = sum(seq_lens)
    head_tokens = tokens if head_tokens is None else head_tokens
    attention_fwd = 2 * 2 * shape.layers * shape.heads * shape.head_dim * causal_attended(seq_lens)
    body_fwd = 2 * shape.body_params * tokens
    head_fwd = 2 * shape.head_params * head_tokens
    return StepFlops(policy_body=3.0 * body_fwd, policy_head=3.0 * head_fwd, policy_attention=3.0 * attention_fwd,
                     reference_body=float(body_fwd), reference_head=float(head_fwd),
                     reference_attention=float(attention_fwd))  # fmt: skip


def gemm_shapes(shape: ModelShape, tokens: int) -> list[tuple[int, int, int]]:
    """``(m, k, n)`` of the step's GEMMs at ``tokens`` rows: ``X @ W``, ``dY @ W.T``, ``X.T @ dY`` per weight."""
    outs = {shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim, shape.intermediate, shape.vocab}
    shapes: list[tuple[int, int, int]] = []
    for out in sorted(outs):
        for mkn in ((tokens, shape.hidden, out), (tokens, out, shape.hidden), (shape.hidden, tokens, out)):
            if mkn not in shapes:  # q and o of width H: X @ W and dY @ W.T have the same shape
                shapes.append(mkn)
    return shapes


def gemm_rates(shapes: Sequence[tuple[int, int, int]], *, repeats: int = 5) -> list[dict]:
    """Best-of-``repeats`` fp32 ``torch.mm`` rate per ``(m, k, n)``, in GFLOP/s (``2·m·k·n`` FLOPs), after one warm-up.

    Runs with the current ``torch.get_num_threads()``; inputs are contiguous, the output preallocated.
    """
    gen = torch.Generator().manual_seed(0)
    rows = []
    for m, k, n in shapes:
        a, b = torch.randn(m, k, generator=gen), torch.randn(k, n, generator=gen)
        out = torch.empty(m, n)
        torch.mm(a, b, out=out)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            times.append(time.perf_counter() - start)
        rows.append({"m": m, "k": k, "n": n, "best_s": min(times), "gflops": 2 * m * k * n / min(times) / 1e9})
        del a, b, out
    return rows


def main(argv: list[str] | None = None) -> None:
    from transformers import LlamaConfig

    from bench.dpo_cpu import MODEL

    parser = argparse.ArgumentParser(prog="python -m bench.flops", description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096, help="GEMM rows (tokens of a step)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    shape = ModelShape.from_config(LlamaConfig(**MODEL))
    for row in gemm_rates(gemm_shapes(shape, args.tokens), repeats=args.repeats):
        print(f"[{row['m']}, {row['k']}] x [{row['k']}, {row['n']}]: {row['gflops']:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
