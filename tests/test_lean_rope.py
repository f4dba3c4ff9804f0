"""The lean layers' RoPE: which models' ``apply_rotary_pos_emb`` the kernel replaces, for how long, and that the
replacement calls the function itself wherever the kernel does not apply (on a CPU: everywhere).

The kernel's own exactness is tested under the interpreter (``tests/test_rope_kernel.py``) and on a GPU
(``tests/test_kernels_gpu.py``).
"""

from __future__ import annotations

import importlib

import pytest
import torch
from test_model_packed import FAMILIES, make_model

from fastdpo.model import lean
from fastdpo.ops.rope import fused_rope_applies

LLAMA_FORM = {"llama", "qwen2", "qwen3", "mistral", "gemma2", "gemma3", "granite"}
"""Families of ``test_model_packed`` whose ``apply_rotary_pos_emb`` and ``rotate_half`` are Llama's, token for token
(phi3 rotates part of each head, cohere interleaves the halves)."""


def modeling(model):
    return importlib.import_module(type(model).__module__)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_the_llama_form_is_swapped_for_the_duration_and_nothing_else(family):
    model = make_model(family)
    space = modeling(model)
    original = space.apply_rotary_pos_emb
    with lean.use_lean_layers([model]):
        swapped = space.apply_rotary_pos_emb
        assert (swapped is not original) == (family in LLAMA_FORM)
    assert space.apply_rotary_pos_emb is original


def test_nested_uses_swap_once_and_an_error_restores():
    model = make_model("llama")
    space = modeling(model)
    original = space.apply_rotary_pos_emb
    with pytest.raises(RuntimeError, match="inside"), lean.use_lean_layers([model, model]):
        swapped = space.apply_rotary_pos_emb
        with lean.use_lean_layers([model]):
            assert space.apply_rotary_pos_emb is swapped
        assert space.apply_rotary_pos_emb is swapped  # the outer use's, until it ends
        raise RuntimeError("inside")
    assert space.apply_rotary_pos_emb is original


def test_a_rope_another_library_put_there_is_left_alone(monkeypatch):
    # Liger-Kernel's apply_liger_kernel_to_llama replaces modeling_llama.apply_rotary_pos_emb with its own
    model = make_model("llama")
    space = modeling(model)

    def their_rope(q, k, cos, sin, position_ids=None, unsqueeze_dim=1):
        return q, k

    monkeypatch.setattr(space, "apply_rotary_pos_emb", their_rope)
    with lean.use_lean_layers([model]):
        assert space.apply_rotary_pos_emb is their_rope


def test_where_the_kernel_does_not_apply_the_original_runs_with_the_same_arguments(monkeypatch):
    model = make_model("llama")
    space = modeling(model)
    calls = []
    original = space.apply_rotary_pos_emb

    def spy(q, k, cos, sin, unsqueeze_dim=1):
        calls.append(unsqueeze_dim)
        return original(q, k, cos, sin, unsqueeze_dim)

    monkeypatch.setattr(lean, "_is_llama_rope", lambda rope, rotate: True)  # the spy stands in for Llama's
    monkeypatch.setattr(space, "apply_rotary_pos_emb", spy)
    ids = torch.randint(3, 50, (2, 9))
    with torch.no_grad():
        own = model(ids).logits
        with lean.use_lean_layers([model]):
            assert space.apply_rotary_pos_emb is not spy
            swapped = model(ids).logits
    assert calls == [1] * (2 * model.config.num_hidden_layers)  # CPU tensors: the original, every call
    assert torch.equal(swapped, own)


def test_on_cpu_tensors_the_kernel_never_applies():
    # the interpreter tests force it onto CPU tensors; tests/test_kernels_gpu.py checks where it applies on CUDA
    q, k, cos = torch.zeros(1, 4, 3, 8), torch.zeros(1, 2, 3, 8), torch.zeros(1, 3, 8)
    assert not fused_rope_applies(q, k, cos, cos, 1)
