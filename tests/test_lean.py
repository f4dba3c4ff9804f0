"""Lean activations (fastdpo.model.lean): the same gradients as the modules' own forwards, fewer bytes kept.

The reference is the same model and packed batch with its own forwards: in fp64 the two may differ by summation
order only; in bf16 the recomputation repeats the forward's ops on the same operands, so they agree bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from test_memory import bytes_saved_by
from test_model_packed import FAMILIES, make_batch, make_examples, make_model

from fastdpo.model import lean as lean_module
from fastdpo.model import packed_logps
from fastdpo.model.lean import lean_forward, use_lean_layers


def _grads(model, batch, *, lean: bool, checkpointing: bool = True):
    """Per-parameter gradients of a weighted sum of the packed batch's sequence log-probs."""
    model.zero_grad(set_to_none=True)
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    weights = None
    with use_lean_layers([model] if lean else []) as switched:
        out = packed_logps(model, batch, impl="torch")
        weights = torch.linspace(-1, 1, len(out.seq_logps), dtype=out.seq_logps.dtype)
        (out.seq_logps * weights).sum().backward()
    assert all("forward" not in vars(m) for m in model.modules())  # every forward put back
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return out.seq_logps.detach(), grads, switched


def _switchable(model) -> dict[str, int]:
    kinds = {"norm": 0, "mlp": 0}
    for module in model.modules():
        if lean_forward(module) is not None:
            kinds["norm" if type(module).__name__.endswith("RMSNorm") else "mlp"] += 1
    return kinds


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gradients_match_the_models_own_in_fp64(family):
    model = make_model(family).double()
    batch = make_batch(make_examples())
    value, grads, switched = _grads(model, batch, lean=False)
    lean_value, lean_grads, lean_switched = _grads(model, batch, lean=True)
    layers = model.config.num_hidden_layers
    kinds = _switchable(model)
    assert switched == 0 and lean_switched == kinds["norm"] + kinds["mlp"]
    # Phi-3 fuses gate and up into one projection: its MLP keeps its own forward; the norms switch everywhere
    assert kinds["mlp"] == (0 if family == "phi3" else layers), kinds
    assert kinds["norm"] >= (0 if family == "cohere" else 2 * layers + 1), kinds  # Cohere's norm is a LayerNorm
    torch.testing.assert_close(lean_value, value, rtol=0, atol=0)  # the forward's ops are the same ops
    assert grads.keys() == lean_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        # fp64: summation order only (~1e-15 relative); a wrong term in a derivative is O(1)
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.parametrize("checkpointing", [True, False])
@pytest.mark.parametrize("family", ["qwen3", "gemma3"])
def test_bf16_gradients_are_bitwise_the_same(checkpointing, family):
    # Qwen3: q/k norms too; Gemma 3: the tanh GELU, its derivative aten's gelu_backward as autograd's
    model = make_model(family).to(torch.bfloat16)
    if family == "gemma3":
        assert {lean_module._gate_activation(m.mlp.act_fn) for m in model.model.layers} == {"gelu_tanh"}
    batch = make_batch(make_examples())
    value, grads, _ = _grads(model, batch, lean=False, checkpointing=checkpointing)
    lean_value, lean_grads, _ = _grads(model, batch, lean=True, checkpointing=checkpointing)
    assert torch.equal(lean_value, value)
    for name, grad in grads.items():
        assert torch.equal(lean_grads[name], grad), name


def test_under_autocast_the_recomputation_runs_in_the_forwards_precision():
    # fp32 weights under CPU bf16 autocast: the backward (outside autocast) must recompute in bf16 as the forward
    # ran, and down_proj's gradient reach its fp32 weight as autograd's cast would give it
    model = make_model("llama")
    batch = make_batch(make_examples())
    results = []
    for lean in (False, True):
        model.zero_grad(set_to_none=True)
        model.train()
        with use_lean_layers([model] if lean else []):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = packed_logps(model, batch, impl="torch")
            out.seq_logps.sum().backward()
        results.append((out.seq_logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (value, grads), (lean_value, lean_grads) = results
    assert torch.equal(lean_value, value)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32, name
        if "layers." in name:
            assert torch.equal(lean_grads[name], grad), name
        else:  # the fp32 residual stream feeds the first norm's pow and mul and the residual add: summed in another
            # order (the norm's two inside its backward), which moves the embedding's gradient by fp32 ulps only
            torch.testing.assert_close(lean_grads[name], grad, rtol=1e-6, atol=1e-6 * grad.abs().max().item())


def _saved_bytes(module, *inputs) -> int:
    """Bytes autograd saves in one forward of ``module`` (inputs and parameters left out: they are alive anyway)."""
    return bytes_saved_by(lambda: module(*inputs), alive=[*inputs, *module.parameters()])


def test_an_mlp_and_a_norm_keep_32_and_24_kb_less_per_token_in_bf16():
    # Llama-3.2-1B's widths (H 2048, I 8192) on 64 tokens, one MLP and one norm in bf16: the MLP keeps gate and up
    # (2·2·I bytes per token) instead of gate, silu(gate), up and their product (4·2·I); the norm keeps nothing
    # beyond its input instead of the fp32 input and the normalized bf16 output (4H + 2H) and the fp32 rsqrt. (The
    # input is left out of the count, as the caller's; a post-attention norm's input is held only by the lean norm,
    # which fastdpo.memory counts: 52 KB per token and layer less under checkpointing.)
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    config = LlamaConfig(hidden_size=2048, intermediate_size=8192)
    n, h, i = 64, 2048, 8192
    mlp, norm = LlamaMLP(config).to(torch.bfloat16), LlamaRMSNorm(h).to(torch.bfloat16)
    x = torch.randn(n, h, dtype=torch.bfloat16, requires_grad=True)
    own = {"mlp": _saved_bytes(mlp, x), "norm": _saved_bytes(norm, x)}
    with use_lean_layers([mlp, norm]) as switched:
        lean = {"mlp": _saved_bytes(mlp, x), "norm": _saved_bytes(norm, x)}
    assert switched == 2
    assert own["mlp"] == n * 4 * 2 * i and lean["mlp"] == n * 2 * 2 * i
    assert own["norm"] == n * (4 * h + 2 * h + 4) and lean["norm"] == 0


@pytest.fixture
def blocks_of(monkeypatch):
    """``blocks_of(rows, width)``: the lean MLP's backward on blocks of ``rows`` tokens of an ``[N, width]`` MLP."""

    def set_rows(rows: int, width: int) -> None:
        monkeypatch.setattr(lean_module, "MLP_CHUNK_ELEMENTS", rows * width)

    return set_rows


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh", "gelu", "gelu_new"])
@pytest.mark.parametrize("rows", [None, 3], ids=["one_block", "blocks_of_3"])
@pytest.mark.parametrize("overwrite", [True, False], ids=["in_place", "hooked_gate_proj"])
def test_every_gradient_the_mlp_asks_for_with_a_bias(act, rows, overwrite, blocks_of):
    # down_proj with a bias, and every subset of (input, gate_proj, down_proj) needing gradients: fp64, lean against
    # the module's own forward, with aten's derivative of SiLU and of both GELUs, and the generic (autograd) one of
    # gelu_new (a python formula); the backward on one block or
    # on blocks of 3 of the 14 tokens (the last one short), writing the gradients over gate and up or, with a hook
    # on gate_proj (which could keep its output), into new tensors
    import itertools

    mlp = _small_mlp(torch.float64, mlp_bias=True, hidden_act=act)
    assert lean_module._gate_activation(mlp.act_fn) == {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                                                        "gelu": "gelu"}.get(act)  # fmt: skip
    if rows is not None:
        blocks_of(rows, 24)
    if not overwrite:
        mlp.gate_proj.register_forward_hook(lambda module, args, out: None)
    assert lean_module._output_is_fresh(mlp.gate_proj) == overwrite and lean_module._output_is_fresh(mlp.up_proj)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    grad = torch.randn(2, 7, 16, dtype=torch.float64)
    for need_x, need_gate, need_down in itertools.product((False, True), repeat=3):
        if not (need_x or need_gate or need_down):
            continue
        mlp.gate_proj.requires_grad_(need_gate)
        mlp.down_proj.requires_grad_(need_down)
        results = []
        for lean in (False, True):
            leaf = x.clone().requires_grad_(need_x)
            for p in mlp.parameters():
                p.grad = None
            with use_lean_layers([mlp] if lean else []) as switched:
                out = mlp(leaf)
                out.backward(grad)
            assert switched == lean
            results.append([t.grad for t in (leaf, *mlp.parameters())])
        for own, got in zip(*results, strict=True):
            assert (own is None) == (got is None), (need_x, need_gate, need_down)
            if own is not None:
                torch.testing.assert_close(got, own, rtol=1e-12, atol=1e-14)


def _small_mlp(dtype=torch.float64, **fields):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=2, **fields)
    torch.manual_seed(0)
    return LlamaMLP(config).to(dtype)


@pytest.mark.parametrize("overwrite", [True, False], ids=["in_place", "hooked_gate_proj"])
def test_a_second_backward_fails_loudly_where_the_gradients_overwrote_gate_and_up(overwrite, blocks_of):
    # retain_graph: the overwritten gate and up would give a wrong second gradient; autograd's version check refuses
    # them instead. Without the overwrite (a hooked gate_proj) the second backward gives the first one's gradients.
    mlp = _small_mlp()
    if not overwrite:
        mlp.gate_proj.register_forward_hook(lambda module, args, out: None)
    blocks_of(4, 24)
    x = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    with use_lean_layers([mlp]):
        out = mlp(x).square().sum()
        (first,) = torch.autograd.grad(out, x, retain_graph=True)
        if overwrite:
            with pytest.raises(RuntimeError, match="modified by an inplace operation"):
                torch.autograd.grad(out, x)
        else:
            (second,) = torch.autograd.grad(out, x)
            assert torch.equal(first, second)


def test_bf16_gradients_on_blocks_are_as_close_to_fp64_as_the_models_own(blocks_of):
    # bf16 MLP with a bias on 333 tokens in blocks of 50: down_proj's weight gradient accumulates over the blocks in
    # fp32 and is rounded once, as one bf16 GEMM accumulates inside: its error against the same bf16 inputs run in
    # fp64 may differ from the module's own by rounding only (a lost block would be O(1/7) of it)
    from transformers.models.llama.modeling_llama import LlamaMLP

    mlp = _small_mlp(torch.bfloat16, mlp_bias=True)
    reference = LlamaMLP(mlp.config).double()
    reference.load_state_dict({k: v.double() for k, v in mlp.state_dict().items()})
    x = torch.randn(333, 16).bfloat16()
    grad = torch.randn(333, 16).bfloat16()

    def grads(module, lean: bool, dtype):
        leaf = x.to(dtype).clone().requires_grad_()
        for p in module.parameters():
            p.grad = None
        with use_lean_layers([module] if lean else []):
            module(leaf).backward(grad.to(dtype))
        return [leaf.grad, *(p.grad for p in module.parameters())]

    exact = grads(reference, False, torch.float64)
    own = grads(mlp, False, torch.bfloat16)
    blocks_of(50, 24)
    blocked = grads(mlp, True, torch.bfloat16)
    names = ["x", *(name for name, _ in mlp.named_parameters())]
    for name, e, o, b in zip(names, exact, own, blocked, strict=True):
        assert b.dtype == o.dtype == torch.bfloat16, name
        own_error, error = (o.double() - e).abs().max().item(), (b.double() - e).abs().max().item()
        scale = e.abs().max().item()
        # the module's own bf16 run is within 2^-7 of fp64 at the largest entry's scale here (its rounded
        # intermediates); the blocked one may differ from it by a rounding of the fp32 sums, one bf16 ulp (2^-8),
        # where a block lost or counted twice would move a weight gradient by about 1/7 of it
        assert error <= 2**-7 * scale, (name, error, scale)
        assert error <= own_error + 2**-8 * scale, (name, error, own_error, scale)


def test_a_model_on_blocks_gives_its_own_gradients_in_fp64(blocks_of):
    # Llama with checkpointing, the lean MLPs' backward on blocks of 5 tokens of the packed batch
    model = make_model("llama").double()
    batch = make_batch(make_examples())
    _, grads, _ = _grads(model, batch, lean=False)
    blocks_of(5, model.config.intermediate_size)
    _, lean_grads, switched = _grads(model, batch, lean=True)
    assert switched > 0 and grads.keys() == lean_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-10, atol=1e-13, msg=name)  # summation order only


def test_lora_on_gate_and_up_keeps_the_lean_mlp_and_writes_over_its_outputs(blocks_of):
    # LoRA on gate_proj and up_proj (not down_proj): PEFT's Linear gives a fresh output, so the lean MLP runs and
    # writes the gradients over gate and up; the adapters' gradients are the module's own
    peft = pytest.importorskip("peft")
    adapters = peft.LoraConfig(r=4, target_modules=["gate_proj", "up_proj"], init_lora_weights=False)
    model = peft.get_peft_model(make_model("llama").double(), adapters)
    mlps = [m for m in model.modules() if type(m).__name__ == "LlamaMLP"]
    assert mlps and all(lean_forward(m) is not None for m in mlps)
    assert all(lean_module._output_is_fresh(m.gate_proj) and lean_module._output_is_fresh(m.up_proj) for m in mlps)
    batch = make_batch(make_examples())
    _, grads, _ = _grads(model, batch, lean=False)
    blocks_of(5, model.config.intermediate_size)
    _, lean_grads, _ = _grads(model, batch, lean=True)
    assert grads.keys() == lean_grads.keys() and any("lora_A" in name for name in grads)
    for name, grad in grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-10, atol=1e-13, msg=name)


def test_reentrant_checkpointing_gives_the_same_gradients():
    model = make_model("llama").double()
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    batch = make_batch(make_examples())
    grads = []
    for lean in (False, True):
        model.zero_grad(set_to_none=True)
        with use_lean_layers([model] if lean else []):
            out = packed_logps(model, batch, impl="torch")
            out.seq_logps.sum().backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-10, atol=1e-13, msg=name)


def test_other_forwards_are_left_alone():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=2)
    mlp = LlamaMLP(config)
    assert lean_forward(mlp) is not None
    mlp.forward = lambda x: x  # a forward set on the instance (a wrapper's): not ours to replace
    assert lean_forward(mlp) is None
    plain = LlamaMLP(config)
    plain.down_proj = torch.nn.Sequential(torch.nn.Linear(24, 16))  # not an nn.Linear: its backward is not ours
    assert lean_forward(plain) is None
    in_place = LlamaMLP(config)
    in_place.act_fn = torch.nn.SiLU(inplace=True)  # would overwrite the gate the lean MLP keeps
    assert lean_forward(in_place) is None
    learned = LlamaMLP(config)
    learned.act_fn = torch.nn.PReLU()  # its parameter would get no gradient
    assert lean_forward(learned) is None
    hooked = LlamaMLP(config)
    handle = hooked.down_proj.register_forward_pre_hook(lambda module, args: None)  # would not run
    assert lean_forward(hooked) is None
    handle.remove()
    assert lean_forward(hooked) is not None
    torch.nn.utils.parametrize.register_parametrization(hooked.down_proj, "weight", torch.nn.Identity())
    assert lean_forward(hooked) is None  # a parametrized weight: F.linear on the parameter would bypass it
    assert lean_forward(torch.nn.Linear(3, 4)) is None
    # gate_proj/up_proj whose output something else might hold: the lean MLP runs, but its gradients go to new tensors
    fresh = LlamaMLP(config)
    assert lean_module._output_is_fresh(fresh.gate_proj)
    fresh.gate_proj.forward = fresh.gate_proj.forward  # a wrapper's forward on the instance (accelerate's)
    assert not lean_module._output_is_fresh(fresh.gate_proj) and lean_forward(fresh) is not None
    fresh.up_proj.register_forward_hook(lambda module, args, out: None)
    assert not lean_module._output_is_fresh(fresh.up_proj)
    assert not lean_module._output_is_fresh(torch.nn.Sequential(torch.nn.Linear(3, 4)))


def _peak_bytes(fn) -> int:
    """The most bytes the CPU allocator held at once while ``fn`` ran, above what it held before (from the
    profiler's allocation and free events, in time order)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())  # fmt: skip
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_the_mlps_forward_and_backward_peak_lower_by_two_intermediates_and_by_more_on_blocks(act, blocks_of):
    # norm → MLP, forward and backward, bf16, many tokens on a narrow H so that the [N, I] tensors dominate (H/I =
    # 1/32). Autograd's MLP holds gate, silu(gate), up, their product and, in the product's backward, the incoming
    # gradient and both factors' gradients: about 6 [N, I] at once. The lean one keeps gate and up, and its backward
    # on one block of all tokens writes each gradient over a buffer that is done with (4 at once); on 8 blocks it
    # writes them over gate and up and needs two blocks beyond (and on a CPU one fp32 copy of a block's product for
    # down_proj's fp32 weight gradient): 2 + 2/8 + 2/8 [N, I], and the [N, H] tensors.
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    n, h, i = 4096, 32, 1024
    config = LlamaConfig(hidden_size=h, intermediate_size=i, num_attention_heads=4, num_key_value_heads=2,
                         hidden_act=act)  # fmt: skip
    torch.manual_seed(0)
    mlp, norm = LlamaMLP(config).bfloat16(), LlamaRMSNorm(h).bfloat16()
    x = torch.randn(n, h, dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(n, h, dtype=torch.bfloat16)

    def step():
        mlp(norm(x)).backward(grad)

    peaks = {}
    for name, lean, rows in (("own", False, None), ("lean", True, None), ("blocks", True, n // 8)):
        if rows is not None:
            blocks_of(rows, i)
        step()  # the parameters' .grad exist before the measured step: only activations and temporaries are counted
        with use_lean_layers([mlp, norm] if lean else []):
            peaks[name] = _peak_bytes(step) / (n * i * 2)  # in [N, I] bf16 tensors
    # measured: own 6.16, lean 4.07, blocks 2.59 [N, I], the same with the tanh GELU
    assert peaks["own"] - peaks["lean"] >= 2, peaks
    assert peaks["lean"] <= 4.25, peaks  # gate, up, two [N, I] temporaries, and the [N, H] tensors (1/32 each)
    assert peaks["blocks"] <= 2.5 + 0.25, peaks
    assert peaks["own"] - peaks["blocks"] >= 3, peaks


def test_which_activations_have_a_derivative_from_the_gate_alone():
    # the torch ops whose aten backward (and kernels) the lean MLP uses; python formulas of the same functions round
    # differently and keep autograd's own derivative
    from torch import nn
    from transformers import activations

    known = {
        nn.SiLU(): "silu", activations.SiLUActivation(): "silu", nn.GELU(): "gelu",
        nn.GELU(approximate="tanh"): "gelu_tanh", activations.GELUTanh(): "gelu_tanh",
        activations.GELUActivation(): "gelu", activations.ACT2FN["gelu_pytorch_tanh"]: "gelu_tanh",
        activations.GELUTanh(use_gelu_tanh_python=True): None, activations.GELUActivation(use_gelu_python=True): None,
        activations.NewGELUActivation(): None, activations.FastGELUActivation(): None, nn.ReLU(): None,
        activations.ACT2FN["relu2"]: None,
    }  # fmt: skip
    for act, name in known.items():
        assert lean_module._gate_activation(act) == name, act
    x = torch.randn(50, dtype=torch.float64)
    for act, name in known.items():  # and the name is the op the module runs
        if name is not None:
            torch.testing.assert_close(act(x), {"silu": nn.functional.silu(x), "gelu": nn.functional.gelu(x),
                                                "gelu_tanh": nn.functional.gelu(x, approximate="tanh")}[name],
                                       rtol=0, atol=0)  # fmt: skip


def test_which_norms_the_kernels_compute():
    # on a GPU: Llama's form (weight * normed.to(dtype)) and Gemma's (normed * (1 + w), all fp32) by their source;
    # a norm with another forward, or whose weight is not a plain parameter, keeps the recomputing lean norm
    from test_model_packed import cached_model

    expected = {family: "gemma" if family.startswith("gemma") else "llama" for family in FAMILIES if family != "cohere"}
    for family, form in expected.items():
        norms = [m for m in cached_model(family).modules() if type(m).__name__.endswith("RMSNorm")]
        assert norms and {lean_module._norm_form(m) for m in norms} == {form}, family
    assert not any(type(m).__name__.endswith("RMSNorm") for m in cached_model("cohere").modules())  # LayerNorms
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm

    class Scaled(Gemma3RMSNorm):
        def forward(self, x):
            return 2 * super().forward(x)

    assert lean_module._norm_form(Scaled(8)) is None
    plain = Gemma3RMSNorm(8)
    plain.weight = torch.nn.Parameter(torch.zeros(8))
    assert lean_module._norm_form(plain) == "gemma"
    del plain.weight
    plain.weight = torch.zeros(8)  # a buffer-like plain tensor: not the parameter the kernels' gradient is for
    assert lean_module._norm_form(plain) is None


def test_a_lora_model_switches_its_norms_and_keeps_its_adapted_mlps():
    # LoRA wraps down_proj, whose backward the lean MLP would bypass: the MLPs keep their own forward, the norms
    # (frozen weights, inputs that need gradients) switch, and the adapters' gradients are the same
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(make_model("llama").double(), peft.LoraConfig(r=4, target_modules="all-linear"))
    kinds = _switchable(model)
    assert kinds == {"norm": 2 * model.config.num_hidden_layers + 1, "mlp": 0}
    batch = make_batch(make_examples())
    _, grads, _ = _grads(model, batch, lean=False)
    _, lean_grads, switched = _grads(model, batch, lean=True)
    assert switched == kinds["norm"] and grads.keys() == lean_grads.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(lean_grads[name], grad, rtol=1e-10, atol=1e-13, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("act", ["silu", "gelu_pytorch_tanh"])
def test_on_a_gpu_the_same_gradients_at_a_lower_peak(act):
    # one decoder layer's MLP and norm at Llama-3.2-1B's widths on 16k tokens in bf16, under autocast on fp32
    # weights and on bf16 weights: the lean backward runs on 4 blocks of 4096 tokens (MLP_CHUNK_ELEMENTS), so
    # cuBLAS sums in another order and down_proj's weight gradient accumulates over the blocks in fp32: every
    # gradient within 2 bf16 ulps of autograd's, at the largest entry's scale where sums cancel; and
    # max_memory_allocated at least 3 [N, I] lower (autograd's MLP about 6 [N, I], the lean one 2 and two blocks)
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    n, h, i = 16384, 2048, 8192
    assert n // lean_module._block_rows(n, i) == 4
    config = LlamaConfig(hidden_size=h, intermediate_size=i, hidden_act=act)  # the kernels' SiLU or tanh GELU
    for weights, autocast in ((torch.bfloat16, False), (torch.float32, True)):
        torch.manual_seed(0)
        mlp, norm = LlamaMLP(config).to("cuda", weights), LlamaRMSNorm(h).to("cuda", weights)
        x = torch.randn(n, h, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        grad = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
        results = {}
        for lean in (False, True):
            for p in (*mlp.parameters(), *norm.parameters(), x):
                p.grad = None
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start = torch.cuda.memory_allocated()
            with use_lean_layers([mlp, norm] if lean else []):
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                    out = mlp(norm(x))
                out.backward(grad.to(out.dtype))
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - start
            grads = [t.grad.clone() for t in (x, *mlp.parameters(), *norm.parameters())]
            results[lean] = (peak, grads)
        for own, lean in zip(results[False][1], results[True][1], strict=True):
            scale = own.abs().max().item()
            torch.testing.assert_close(lean, own, rtol=2**-7, atol=2**-7 * scale, msg=str((weights, autocast)))
        assert results[False][0] - results[True][0] >= 3 * n * i * 2, (weights, results[False][0], results[True][0])
