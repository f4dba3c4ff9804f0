"""``fastdpo_varlen``: causal attention within each packed sequence, with no mask and no row padding.

What it computes, per segment ``[a, b)`` of ``cu_seq_lens_q`` over the flattened rows (plain torch)::

    out[a:b] = F.scaled_dot_product_attention(q[a:b], k[a:b], v[a:b], is_causal=True, scale=scaling,
                                              enable_gqa=True)

eager and sdpa attend over whole rows through a dense ``[L, L]`` block mask that transformers builds from the
position ids: their work grows with the row length², most of it on masked entries, and rows must stay short (so
padded). Here each sequence attends only to itself, so the work is Σ lenᵢ² / 2 and the rows can be one row with
no padding at all. On CUDA with fp16/bf16 the segments run in one call of the flash-attention varlen kernel that
ships inside torch (``aten._flash_attention_forward``, which has its own backward; grouped key/value heads
natively); anywhere else (CPU, fp32) in a loop over the segments with ``scaled_dot_product_attention``.

transformers builds no mask for an implementation it does not know (``masking_utils._preprocess_mask_arguments``
returns early), and passes the varlen keyword arguments of ``PackedBatch.flash_attn_kwargs`` through to the
attention function, so ``fastdpo.model.packed_body`` runs it exactly as it runs flash-attention. It is registered
with transformers' ``AttentionInterface`` when ``fastdpo.model`` is imported, and trainers switch a model to it
only while they run their packed steps (``use_attention``); outside them (generation, a plain forward) the model
keeps its own implementation, and a call without ``cu_seq_lens_q`` is refused.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastdpo.errors import ConfigError, unknown_choice

VARLEN = "fastdpo_varlen"
"""The name under which ``varlen_attention`` is registered in transformers' ``AttentionInterface``."""

PACKED_ATTENTION = ("auto", "varlen", "model")
"""Choices of the trainers' ``packed_attention`` option (see ``packed_attention``)."""


def attends_per_sequence(attn_implementation: str) -> bool:
    """Whether an implementation attends within each sequence of ``cu_seq_lens`` over rows flattened into one
    (flash-attention, ``fastdpo_varlen``): rows then cost nothing, and one row per batch has no padding at all.

    transformers' own test (``utils.generic.is_flash_attention_requested``): any implementation named "*flash*"
    ("flash_attention_2/3/4", hub kernels such as "kernels-community/flash-attn3") goes through its flash path.
    """
    return "flash" in attn_implementation or attn_implementation == VARLEN


# layer types (transformers' cache_utils.get_layer_types_and_kwargs) whose state runs along the sequence: Mamba,
# gated-delta and lightning linear attention, short convolutions (Qwen3.5, Qwen3-Next, LFM2, Jamba, Falcon-H1, ...)
_STATEFUL_LAYERS = ("conv", "linear_attention", "hybrid", "hybrid_sliding")
_STEP = {"packed": 0, "varlen_calls": 0}  # inside packed_body's per-sequence forward; varlen_attention's calls


def carries_state(config) -> bool:
    """Whether a model (its config) has layers whose state runs along a row (recurrent, convolution, linear
    attention): sequences packed in one row would then read the ones before them, whatever the attention mask."""
    config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    try:
        from transformers.cache_utils import get_layer_types_and_kwargs

        types = get_layer_types_and_kwargs(config)[0]
    except Exception:  # (a config of another shape: its own layer_types, if any)
        types = getattr(config, "layer_types", None) or []
    return any(kind in _STATEFUL_LAYERS for kind in types)


def check_per_sequence(inner: nn.Module, implementation: str) -> None:
    """ConfigError where attention per sequence over one row of the whole batch would not keep ``inner``'s packed
    sequences apart: a class that does not declare transformers' attention interface (BART's decoders embed
    positions by their place in the row, whatever ``position_ids`` say); for ``fastdpo_varlen`` also layers with
    state along the row and a sliding window or chunked attention that the config sets. (On its own flash
    implementation, a model with state along the row runs each sequence alone instead.)"""
    name, fix = type(inner).__name__, "use packed_attention='model' (the model's own attention: packed rows, or each " \
        "sequence alone where they would not keep sequences apart)"  # fmt: skip
    if carries_state(inner.config):  # (on its own flash: each sequence alone, in packed_body)
        if implementation != VARLEN:
            return
        raise ConfigError(f"{name} has recurrent or convolution layers, whose state runs along a row: over one row "
                          f"of the whole batch ({implementation}) each sequence would read the ones before it",
                          column="packed_attention", fix=fix)  # fmt: skip
    if not getattr(inner, "_supports_attention_backend", False):
        raise ConfigError(f"{name} does not declare transformers' attention interface, so packed sequences over one "
                          f"row ({implementation}) are not known to stay apart (BART's decoders number positions by "
                          "the row)", column="packed_attention", fix=fix if implementation == VARLEN else
                          "load the model with attn_implementation='sdpa' (or 'eager')")  # fmt: skip
    if implementation != VARLEN:
        return
    config = inner.config.get_text_config(decoder=True)
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    types = getattr(config, "layer_types", None)  # (SmolLM3 sets a window that no layer of its uses)
    if window and types is not None and not any("sliding" in str(kind) for kind in types):
        window = None
    chunk = getattr(config, "attention_chunk_size", None)
    if window or chunk:
        what = f"a sliding window of {window}" if window else f"chunked attention of {chunk}"
        raise ConfigError(f"{name}'s config sets {what} tokens, which {VARLEN} does not implement",
                          column="packed_attention", fix=fix)  # fmt: skip
    # DeepSeek-V3.2's and GLM-MoE-DSA's indexer reads the attention mask, None under varlen (a TypeError inside)
    if getattr(config, "index_topk", None):
        raise ConfigError(f"{name}'s sparse attention picks each query's top {config.index_topk} keys by an indexer "
                          f"that reads the attention mask, which {VARLEN} does not build", column="packed_attention",
                          fix=fix)  # fmt: skip


@contextmanager
def per_sequence_step(inner: nn.Module, implementation: str) -> Iterator[None]:
    """``packed_body``'s forward with attention per sequence: ``check_per_sequence`` first, and a ConfigError after
    a ``fastdpo_varlen`` forward that never called it (a model whose attention does not go through transformers'
    attention functions: Bloom loaded with it)."""
    check_per_sequence(inner, implementation)
    calls = _STEP["varlen_calls"]
    _STEP["packed"] += 1
    try:
        yield
    finally:
        _STEP["packed"] -= 1
    if implementation == VARLEN and _STEP["varlen_calls"] == calls:
        raise ConfigError(f"{type(inner).__name__} never called {VARLEN}: packed sequences would attend to each other",
                          column="packed_attention", fix="use packed_attention='model'")  # fmt: skip


def varlen_attention(
    module: nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[Tensor, None]:
    """A transformers attention function: query ``[B, Hq, L, D]``, key/value ``[B, Hkv, L, D]`` → ``[B, L, Hq, D]``.

    ``kwargs`` must carry ``cu_seq_lens_q`` (``[S + 1]`` offsets into the ``B·L`` flattened tokens, covering
    every token) and ``max_length_q``, as ``PackedBatch.flash_attn_kwargs`` gives them.
    """
    _check_call(module, attention_mask, kwargs)
    _STEP["varlen_calls"] += 1
    cu_seqlens, max_length = kwargs["cu_seq_lens_q"], int(kwargs["max_length_q"])
    batch, heads, length, dim = query.shape
    # [B, H, L, D] → [B·L, H, D]: the token-major layout both paths take
    q, k, v = (t.transpose(1, 2).reshape(batch * length, t.shape[1], dim) for t in (query, key, value))
    if _flash_applies(q):
        cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
        out = torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max_length, max_length, dropout, True, False,
                                                      scale=scaling)[0]  # fmt: skip
    else:
        out = _segment_loop(q, k, v, cu_seqlens, dropout=dropout, scaling=scaling)
    return out.view(batch, length, heads, dim), None


def _check_call(module: nn.Module, attention_mask: Tensor | None, kwargs: dict) -> None:
    if (kwargs.get("cu_seq_lens_q") is None or kwargs.get("max_length_q") is None) and _STEP["packed"]:
        raise ConfigError(f"{type(module).__name__} does not pass the packed batch's cu_seq_lens_q/max_length_q on to "
                          f"its attention function, which {VARLEN} needs", column="packed_attention",
                          fix="use packed_attention='model' (the model's own attention)")  # fmt: skip
    if kwargs.get("cu_seq_lens_q") is None or kwargs.get("max_length_q") is None:
        raise ConfigError(
            f"{VARLEN} attention was called without the packed batch's cu_seq_lens_q/max_length_q (e.g. by "
            "generate() or a plain forward)",
            column="attn_implementation",
            fix=f"keep the model on its own implementation (sdpa); fastdpo switches to {VARLEN} only inside its "
            "packed steps",
        )
    cu_k = kwargs.get("cu_seq_lens_k")
    if attention_mask is not None or (cu_k is not None and cu_k is not kwargs["cu_seq_lens_q"]):
        raise ConfigError(f"{VARLEN} attention takes no attention mask and no separate key offsets",
                          column="attn_implementation", fix="run it through fastdpo.model.packed_body")  # fmt: skip
    unsupported = [name for name in ("sliding_window", "softcap", "s_aux", "sinks", "indices", "position_bias",
                                     "block_indices") if kwargs.get(name) is not None]  # fmt: skip
    if getattr(module, "is_causal", True) is False:
        unsupported.append("non-causal attention")
    if unsupported:
        raise ConfigError(
            f"{type(module).__name__} uses {', '.join(unsupported)}, which {VARLEN} does not implement",
            column="packed_attention",
            fix="use packed_attention='model' (the model's own attention)",
        )


def _flash_applies(q: Tensor) -> bool:
    # torch's flash kernels: CUDA, fp16/bf16, head dim a multiple of 8 up to 256
    dim = q.shape[-1]
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and dim % 8 == 0 and dim <= 256


def _segment_loop(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, *, dropout: float, scaling: float | None):
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0]:
        raise ValueError(f"cu_seq_lens_q must run from 0 to the {q.shape[0]} tokens, got {bounds[0]}..{bounds[-1]}")
    gqa = k.shape[1] != q.shape[1]
    pieces = []
    for start, end in itertools.pairwise(bounds):
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))  # [H, len, D]
        pieces.append(F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, is_causal=True, scale=scaling,
                                                     enable_gqa=gqa).transpose(0, 1))  # fmt: skip
    return torch.cat(pieces)


def register_varlen_attention() -> None:
    """Register ``varlen_attention`` as ``fastdpo_varlen`` with transformers (idempotent)."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)


def packed_attention(choice: str) -> str | None:
    """The attention implementation a trainer runs its packed steps with; None keeps the model's own.

    ``varlen``: ``fastdpo_varlen``. ``model`` and ``auto``: the model's own. ``auto`` is the default that will pick
    ``fastdpo_varlen`` where it is measured faster: on a CPU the difference is within noise (bench/pack_rows_cpu.py:
    0.98x the step time of sdpa rows; bench/dpo_cpu.py end to end 0.94–0.99x in paired runs, slower in single
    runs), and on a GPU it is not measured yet.
    """
    if choice not in PACKED_ATTENTION:
        raise unknown_choice("packed_attention", choice, PACKED_ATTENTION)
    return VARLEN if choice == "varlen" else None


@contextmanager
def use_attention(models: Sequence[nn.Module | None], implementation: str | None) -> Iterator[None]:
    """The models (None entries skipped) on ``implementation`` for the duration, then back on their own.

    Held across forward and backward: gradient checkpointing recomputes each layer in the backward, and the
    recomputation looks the attention function up by name again.
    """
    with ExitStack() as stack:
        for model in models:
            if model is not None:
                stack.enter_context(switched_attention(model, implementation))
        yield


@contextmanager
def switched_attention(model: nn.Module, requested: str | None) -> Iterator[str]:
    """The model's attention implementation, switched to ``requested`` for the duration when that differs (None:
    unchanged); yields the active one."""
    inner = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    current = inner.config._attn_implementation
    if requested is None or requested == current:
        yield current
        return
    try:
        inner.set_attn_implementation(requested)
    except (ValueError, ImportError) as error:
        raise ConfigError(
            f"{type(inner).__name__} cannot run {requested!r}: {error}",
            column="attn_implementation",
            fix="use 'eager' (every model has it)",
        ) from error
    active = inner.config._attn_implementation
    if active == current:  # transformers only warns when a model cannot switch
        fix = f"load the model with attn_implementation={requested!r}"
        if requested == VARLEN or not getattr(inner, "_supports_attention_backend", False):
            fix = "use packed_attention='model' (the model's own attention)"  # (loaded with it, it would not run)
        raise ConfigError(f"{type(inner).__name__} cannot switch attention from {current!r} at run time",
                          column="attn_implementation", fix=fix)  # fmt: skip
    try:
        yield active
    finally:
        inner.set_attn_implementation(current)
