"""Lean activations: RMSNorms and gated MLPs that keep less for the backward, with the gradients autograd gives.

Under gradient checkpointing the peak of a training step is the backward of one recomputed decoder layer
(``fastdpo.memory``). At Llama-3.2-1B's shape in bf16 that layer keeps about 115 KB per token: 64 KB in the MLP
(its gate, silu(gate), up and their product, I = 8192) and 24 KB in its two RMSNorms (each keeps its input upcast
to fp32 and its normalized output). ``use_lean_layers`` gives a model's modules, for the duration, forwards that
keep less:

- an RMSNorm (a module without submodules whose class name ends in ``RMSNorm``, transformers' convention) keeps
  only its input and runs its own forward again in the backward, under the same autocast state, to take autograd's
  gradient of it there: its fp32 intermediates exist for one norm at a time, in its backward.
- a gated MLP whose forward is exactly ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` (checked on the class's
  source; 132 model families of transformers 5.24) with a plain ``nn.Linear`` ``down_proj`` (no hooks, a plain
  weight) and an activation without parameters, hooks or in-place writes keeps gate and up only. Its backward
  forms ``act_fn(gate) * up`` again (element-wise), down_proj's two products from it, then the gradients of gate
  and up, block by block of tokens (``MLP_CHUNK_ELEMENTS``), writing them over gate and up where those are fresh
  outputs of plain (or LoRA) linear layers: for torch's SiLU and GELU (also its tanh form, Gemma's
  ``gelu_pytorch_tanh``) the derivative is the one autograd uses (``aten.silu_backward``, ``aten.gelu_backward``),
  formed from the gate alone; any other activation's is autograd's own, on a recomputed ``act_fn(gate)``.

On a GPU with Triton, Llama-form and Gemma-form (``1 + w``) norms run ``fastdpo.ops.rms_norm`` (keeping the input
and one fp32 value per row), the SiLU and GELU MLPs' element-wise work runs ``fastdpo.kernels.swiglu``, and a Llama-form
``apply_rotary_pos_emb`` (transformers' own, token for token, in the attention's module: 119 families) is replaced
for the duration in that module by one that runs ``fastdpo.ops.rope`` on CUDA heads (bit for bit the same results)
and calls the function itself anywhere else. With or without gradients: a reference's forward runs them too.

What the peak gains, per token and decoder layer at Llama-3.2-1B's shape in bf16 under checkpointing: 64 KB in the
MLP's backward (four ``[N, I]`` fewer, less two blocks) and 20 KB of the norms' saved tensors (``fastdpo.memory``
counts it; ``tests/test_lean.py`` measures the saved bytes and the allocator's peak). What it costs: one more
element-wise pass over each MLP's ``[N, I]`` and each norm in the backward, and the MLP's products on blocks of
4096 tokens at I = 8192 rather than on all of them. Not used where the parameters move between forward
and backward (FSDP, DeepSpeed ZeRO-3: the trainers refuse the option there). A norm's input is kept as it is (the
model's own norm keeps an fp32 copy in bf16 models): changing it in place after the norm ran is then an autograd
error, not a silent change (no transformers decoder layer does it).
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import Tensor, nn

from fastdpo.kernels import triton_available
from fastdpo.model.hooks import forward_as
from fastdpo.ops.linear_logprobs import add_product
from fastdpo.ops.rms_norm import fused_norm_applies, rms_norm
from fastdpo.ops.rope import apply_rope, fused_rope_applies

MLP_CHUNK_ELEMENTS = 2**25
"""The lean MLP's forward and backward work on blocks of this many ``[tokens, I]`` elements (64 MiB in bf16): large
enough that a block's products run at the GEMM rate, small enough that two blocks are small beside gate and up."""

_LLAMA_NORM_FORWARD = (
    "defforward(self,hidden_states:torch.Tensor)->torch.Tensor:input_dtype=hidden_states.dtype"
    "hidden_states=hidden_states.to(torch.float32)variance=hidden_states.pow(2).mean(-1,keepdim=True)"
    "hidden_states=hidden_states*torch.rsqrt(variance+self.variance_epsilon)"
    "returnself.weight*hidden_states.to(input_dtype)"
)
_GEMMA_NORM_FORWARD = (
    "deff(self,x):output=self._norm(x.float())output=output*(1.0+self.weight.float())returnoutput.type_as(x)"
)
_GEMMA_NORM = "deff(self,x):returnx*torch.rsqrt(x.pow(2).mean(-1,keepdim=True)+self.eps)"
_LLAMA_ROPE = (
    "deff(q,k,cos,sin,unsqueeze_dim=1):cos=cos.unsqueeze(unsqueeze_dim)sin=sin.unsqueeze(unsqueeze_dim)"
    "q_embed=q*cos+rotate_half(q)*sink_embed=k*cos+rotate_half(k)*sinreturn(q_embed,k_embed)"
)
_LLAMA_ROTATE_HALF = "deff(x):x1=x[...,:x.shape[-1]//2]x2=x[...,x.shape[-1]//2:]returntorch.cat((-x2,x1),dim=-1)"
_GATED_MLP_FORWARDS = (
    "defforward(self,x):down_proj=self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))returndown_proj",
    "defforward(self,x):returnself.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))",
)


@contextmanager
def use_lean_layers(models: Sequence[nn.Module | None]) -> Iterator[int]:
    """The RMSNorms and gated MLPs of the models (None entries skipped) on their lean forwards for the duration;
    yields how many modules switched.

    Held across forward and backward, as ``use_attention`` is: gradient checkpointing calls each layer's modules
    again in the backward.
    """
    with ExitStack() as stack:
        count = 0
        namespaces = {}
        for model in models:
            if model is None:
                continue
            for module in model.modules():
                forward = lean_forward(module)
                if forward is not None:
                    stack.enter_context(forward_as(module, forward))
                    count += 1
                space = _rope_namespace(type(module))
                if space is not None:
                    namespaces[id(space)] = space
        for space in namespaces.values():
            stack.enter_context(_fused_rope(space))
        yield count


def lean_forward(module: nn.Module) -> Callable | None:
    """The lean forward of ``module`` (see the module docstring), or None when it has none."""
    if "forward" in vars(module):  # already replaced on this instance (a wrapper's, or ours): leave it alone
        return None
    cls = type(module)
    if cls.__name__.endswith("RMSNorm") and not any(True for _ in module.children()):
        form = _norm_form(module)
        return functools.partial(_lean_norm, module, functools.partial(cls.forward, module), form)
    if _is_gated_mlp(cls) and _plain_down_and_act(module):
        return functools.partial(_lean_mlp, module)
    return None


def _plain_down_and_act(mlp: nn.Module) -> bool:
    """Whether the lean MLP computes what ``down_proj`` and ``act_fn`` would: it calls neither module (their hooks
    would not run, the activation's would run again in the backward), it differentiates ``F.linear`` on the weight
    itself (a tensor subclass or a parametrization would be bypassed), and it keeps the gate the activation reads
    (an in-place activation would overwrite it, one with parameters would get no gradient)."""
    down, act = getattr(mlp, "down_proj", None), getattr(mlp, "act_fn", None)
    if type(down) is not nn.Linear or not isinstance(act, nn.Module) or type(down.weight) is not nn.Parameter:
        return False
    if getattr(act, "inplace", False) or any(True for _ in act.parameters()):
        return False
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    # hooks, or a forward replaced on the instance (accelerate's device-map hooks wrap it so)
    local = any(getattr(m, name, None) for m in (down, act) for name in hooks) or any(
        "forward" in vars(m) for m in (down, act)
    )
    module_globals = torch.nn.modules.module
    global_hooks = (module_globals._global_forward_hooks, module_globals._global_forward_pre_hooks,
                    module_globals._global_backward_hooks, module_globals._global_backward_pre_hooks)  # fmt: skip
    return not local and not any(global_hooks) and not hasattr(down, "parametrizations")


@functools.cache
def _is_gated_mlp(cls: type) -> bool:
    body = _forward_source(cls)
    try:
        argument = next(iter(list(inspect.signature(cls.forward).parameters)[1:]), None)
    except (TypeError, ValueError):
        return False
    if body is None or argument is None:
        return False
    return body.replace(f"({argument})", "(x)").replace(f",{argument})", ",x)") in _GATED_MLP_FORWARDS


@functools.cache
def _is_llama_norm(cls: type) -> bool:
    """Whether ``cls.forward`` is, token for token, transformers' Llama-form RMSNorm (``fastdpo.ops.rms_norm``)."""
    return _forward_source(cls) == _LLAMA_NORM_FORWARD


@functools.cache
def _is_gemma_norm(cls: type) -> bool:
    """Whether ``cls.forward`` and ``cls._norm`` are, token for token, transformers' Gemma-form RMSNorm (weights
    ``1 + w``, all in fp32: ``fastdpo.ops.rms_norm(offset=True)``)."""
    norm = getattr(cls, "_norm", None)
    return _bare_source(cls.forward) == _GEMMA_NORM_FORWARD and norm is not None and _bare_source(norm) == _GEMMA_NORM


def _norm_form(module: nn.Module) -> str | None:
    """Which RMSNorm the kernels compute for ``module`` (``fastdpo.ops.rms_norm``): "llama", "gemma" (its ``1 + w``
    form), or None (the recomputing lean norm only); its epsilon must be a float, its weight a plain parameter."""
    cls = type(module)
    if type(getattr(module, "weight", None)) is not nn.Parameter:
        return None
    if _is_llama_norm(cls) and isinstance(getattr(module, "variance_epsilon", None), float):
        return "llama"
    if _is_gemma_norm(cls) and isinstance(getattr(module, "eps", None), float):
        return "gemma"
    return None


def _forward_source(cls: type) -> str | None:
    """The source of ``cls.forward`` without any whitespace (None where it has none to read)."""
    try:
        return "".join(inspect.getsource(cls.forward).split())
    except (OSError, TypeError):
        return None


def _rope_namespace(cls: type) -> dict | None:
    """The module globals through which ``cls.forward`` calls a Llama-form ``apply_rotary_pos_emb`` (None: none);
    looked at on each use, as another library may have replaced the function meanwhile (Liger-Kernel does)."""
    space = _forward_globals(cls)
    if space is None or space.get("torch") is not torch:
        return None
    rope = space["apply_rotary_pos_emb"]
    rope = getattr(rope, "__fastdpo_original__", rope)  # ours, from a use that has not ended
    return space if _is_llama_rope(rope, space.get("rotate_half")) else None


@functools.cache
def _forward_globals(cls: type) -> dict | None:
    try:
        forward = inspect.unwrap(cls.forward)  # transformers' deprecate_kwarg wraps attention forwards
    except ValueError:
        return None
    space = getattr(forward, "__globals__", None)
    return space if space is not None and "apply_rotary_pos_emb" in space else None


@functools.cache
def _is_llama_rope(rope, rotate_half) -> bool:
    return _bare_source(rope) == _LLAMA_ROPE and _bare_source(rotate_half) == _LLAMA_ROTATE_HALF


def _bare_source(fn) -> str | None:
    """``fn``'s definition without decorators, docstring, name, annotations or whitespace (None: no source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn))).body[0]
    except (OSError, TypeError, SyntaxError, IndexError):
        return None
    if not isinstance(tree, ast.FunctionDef):
        return None
    body = tree.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    tree.body, tree.decorator_list, tree.name, tree.returns = body, [], "f", None
    return "".join(ast.unparse(tree).split())


@contextmanager
def _fused_rope(space: dict) -> Iterator[None]:
    """``space``'s ``apply_rotary_pos_emb`` on ``fastdpo.ops.rope`` where it applies (on a GPU), for the duration.

    The replacement computes what the function computes, bit for bit, and calls the function itself wherever the
    kernel does not apply: other models of the family (in the same module) see the same results meanwhile.
    """
    original = space["apply_rotary_pos_emb"]
    if hasattr(original, "__fastdpo_original__"):  # a use of the lean layers around this one put it there
        yield
        return

    @functools.wraps(original)
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if fused_rope_applies(q, k, cos, sin, unsqueeze_dim):
            return apply_rope(q, k, cos, sin)
        return original(q, k, cos, sin, unsqueeze_dim)

    apply_rotary_pos_emb.__fastdpo_original__ = original
    space["apply_rotary_pos_emb"] = apply_rotary_pos_emb
    try:
        yield
    finally:
        if space.get("apply_rotary_pos_emb") is apply_rotary_pos_emb:
            space["apply_rotary_pos_emb"] = original


def _lean_norm(module: nn.Module, forward: Callable, form: str | None, hidden: Tensor, *args, **kwargs) -> Tensor:
    if args or kwargs:
        return forward(hidden, *args, **kwargs)
    if form is not None and fused_norm_applies(hidden, module.weight):  # on a GPU: the kernels, with or without grad
        gemma = form == "gemma"
        return rms_norm(hidden, module.weight, module.eps if gemma else module.variance_epsilon, offset=gemma)
    if not torch.is_grad_enabled():
        return forward(hidden)
    params = [p for p in module.parameters(recurse=False)]
    return _RecomputedNorm.apply(hidden, forward, *params)


def _lean_mlp(module: nn.Module, x: Tensor) -> Tensor:
    gate, up = module.gate_proj(x), module.up_proj(x)
    if not torch.is_grad_enabled():
        kind = _gate_activation(module.act_fn)
        fused = kind is not None and _fused_swiglu(gate, up)
        return module.down_proj(_swiglu().product(gate, up, activation=kind) if fused else module.act_fn(gate) * up)
    down = module.down_proj
    overwrite = _output_is_fresh(module.gate_proj) and _output_is_fresh(module.up_proj)
    return _GatedDown.apply(gate, up, down.weight, down.bias, module.act_fn, overwrite)


def _output_is_fresh(proj: nn.Module) -> bool:
    """Whether ``proj``'s output is a new tensor nothing else holds: a plain ``nn.Linear`` or PEFT's LoRA ``Linear``
    (without DoRA) on one, with no forward hooks (which could keep the output) and no forward replaced on the
    instance. Such an output, kept only by the lean MLP, may take its own gradient in its place once the backward
    has read it."""
    modules = [proj]
    if type(proj) is not nn.Linear:
        base = getattr(proj, "base_layer", None)
        dora = any(getattr(proj, "use_dora", {}).values())
        if not type(proj).__module__.startswith("peft.tuners.lora") or type(base) is not nn.Linear or dora:
            return False
        modules.append(base)
    hooked = any(getattr(m, name) for m in modules for name in ("_forward_hooks", "_forward_pre_hooks"))
    return not hooked and not any("forward" in vars(m) for m in modules)  # nor a wrapper's forward (accelerate's)


def _autocast_state(device_type: str) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)


class _RecomputedNorm(torch.autograd.Function):
    """The norm's forward, keeping only its input; the backward runs it again and takes autograd's gradient."""

    @staticmethod
    def forward(ctx, hidden, forward, *params):
        ctx.forward, ctx.autocast = forward, _autocast_state(hidden.device.type)
        ctx.save_for_backward(hidden, *params)
        return forward(hidden)

    @staticmethod
    def backward(ctx, grad):
        hidden, *params = ctx.saved_tensors
        need_hidden, need_params = ctx.needs_input_grad[0], ctx.needs_input_grad[2:]
        enabled, dtype = ctx.autocast
        with torch.enable_grad(), torch.autocast(hidden.device.type, dtype=dtype, enabled=enabled):
            leaf = hidden.detach().requires_grad_(need_hidden)
            out = ctx.forward(leaf)  # uses the module's parameters themselves: params are the same tensors
        wanted = ([leaf] if need_hidden else []) + [p for p, need in zip(params, need_params, strict=True) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad, allow_unused=True) if wanted else ())
        grad_hidden = next(grads) if need_hidden else None
        return (grad_hidden, None, *(next(grads) if need else None for need in need_params))


class _GatedDown(torch.autograd.Function):
    """``down_proj(act(gate) * up)`` keeping gate and up; the product is formed again in the backward.

    The backward runs over blocks of ``MLP_CHUNK_ELEMENTS // I`` tokens: each block's ``act(gate) * up`` feeds
    down_proj's weight gradient (one product over all tokens when one block holds them; otherwise accumulated over
    the blocks in fp32, as a single half-precision GEMM accumulates inside, and rounded once), then the block's
    gradients of gate and up are formed from it. Where gate and up are fresh outputs held by nothing else
    (``overwrite``), those gradients are written over the block of gate and up they came from: the backward then
    holds gate, up and two ``[block, I]`` temporaries, where autograd's MLP holds about six ``[N, I]`` at once
    (``tests/test_lean.py`` measures both). The forward forms the product block by block too. A second
    backward through the same graph (``retain_graph=True``) then fails on autograd's version check instead of
    reading the overwritten tensors.
    """

    @staticmethod
    def forward(ctx, gate, up, weight, bias, act, overwrite):
        ctx.act, ctx.autocast = act, _autocast_state(gate.device.type)
        ctx.bias_dtype = None if bias is None else bias.dtype
        ctx.activation = _gate_activation(act)
        ctx.fused = ctx.activation is not None and _fused_swiglu(gate, up)  # on a GPU: fastdpo.kernels.swiglu
        width = up.shape[-1]
        gates, ups = gate.reshape(-1, width), up.reshape(-1, width)
        tokens = gates.shape[0]
        rows = _block_rows(tokens, width)
        out = None
        for start in range(0, tokens or 1, rows):
            block = slice(start, start + rows)
            g = gates[block]
            if ctx.fused:
                product = _swiglu().product(g, ups[block], activation=ctx.activation)
            else:
                product = act(g)
                fresh = product is not g and product._base is None  # not the gate itself (an identity activation)
                if fresh and product.dtype == torch.promote_types(product.dtype, up.dtype):
                    product.mul_(ups[block])  # the same product, over act(gate)'s buffer
                else:
                    product = product * ups[block]
            ctx.product_dtype = product.dtype
            result = nn.functional.linear(product, weight, bias)  # autocast lowers it as it lowers nn.Linear
            del product
            if rows >= tokens:
                out = result
            else:
                if out is None:
                    out = result.new_empty(tokens, result.shape[-1])
                out[block] = result
        # in place where it saves memory: on blocks, and with the kernels (which write there directly); on one block
        # without them the gradients take the buffers of act(gate) and of the product's gradient, as autograd's would
        in_place = ctx.fused or rows < tokens
        ctx.overwrite = overwrite and in_place and _own_buffers(gate, up, ctx.product_dtype)
        ctx.save_for_backward(gate, up, weight)
        return out.view(*gate.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad_out):
        gate, up, weight = ctx.saved_tensors
        need_gate, need_up, need_weight, need_bias = ctx.needs_input_grad[:4]
        enabled, dtype = ctx.autocast
        known = ctx.activation  # an op whose derivative aten forms from the gate alone, or None
        width = up.shape[-1]
        # detached: the gradients may be written over them; views of them when overwriting (contiguous)
        gates, ups = gate.detach().reshape(-1, width), up.detach().reshape(-1, width)
        tokens = gates.shape[0]
        rows = _block_rows(tokens, width)
        whole = rows >= tokens
        overwrite = ctx.overwrite
        product_dtype = ctx.product_dtype
        # down_proj's backward as autograd forms it: in the dtype the forward's product ran in (autocast's, where
        # it cast the product, the weight and the bias), its results cast back to theirs
        compute = dtype if enabled and product_dtype != torch.float64 else product_dtype
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1]).to(compute)
        grad_weight = grad_bias = None
        if need_bias:
            grad_bias = flat_grad.sum(0).to(ctx.bias_dtype)
        if need_weight and not whole:  # over the blocks in fp32 (fp64 stays fp64), rounded once
            grad_weight = torch.zeros(weight.shape, dtype=torch.promote_types(compute, torch.float32),
                                      device=weight.device)  # fmt: skip
        down = weight.to(compute)
        grads_gate = grads_up = None
        if not overwrite and (not whole or ctx.fused):
            grads_gate = torch.empty_like(gates) if need_gate else None
            grads_up = torch.empty_like(ups) if need_up else None
        for start in range(0, tokens or 1, rows):
            block = slice(start, start + rows)
            g, u, dy = gates[block], ups[block], flat_grad[block]
            if ctx.fused:  # the element-wise work in two kernels, the gradients written where they belong
                into = [None if t is None else t[block] for t in (grads_gate, grads_up)]
                grad_weight = _fused_block(g, u, dy, down, grad_weight, (need_weight, need_gate, need_up), whole,
                                           weight.dtype, compute, product_dtype, g if overwrite else into[0],
                                           u if overwrite else into[1], known)  # fmt: skip
                continue
            with torch.autocast(gate.device.type, dtype=dtype, enabled=enabled), torch.enable_grad():
                leaf = g.detach().requires_grad_(need_gate and not known)
                activated = ctx.act(leaf)  # a known derivative needs only the gate: no graph kept then
            if need_weight:
                product = (activated.detach() * u).to(compute)
                if whole:
                    grad_weight = dy.t().mm(product).to(weight.dtype)
                else:
                    add_product(grad_weight, dy.t(), product)
                del product
            if not (need_gate or need_up):
                continue
            grad_product = dy.mm(down).to(product_dtype)
            grad_up = None
            if need_up:  # over act(gate) where the derivative reads the gate only
                grad_up = activated.mul_(grad_product) if known else grad_product * activated.detach()
            if known:
                del activated
            grad_gate = None
            if need_gate:  # act(gate)'s gradient over the product's, then the gate's over that (or over the gate)
                grad_product.mul_(u)
                if known:
                    grad_gate = _activation_backward(known, grad_product, g, g if overwrite else grad_product)
                else:
                    (grad_gate,) = torch.autograd.grad(activated, leaf, grad_product)
            del grad_product
            grads_gate = _place(grads_gate, grad_gate, g if overwrite else None, block, whole)
            grads_up = _place(grads_up, grad_up, u if overwrite else None, block, whole)
            del grad_gate, grad_up  # a block's temporaries must not live into the next block
        if need_weight and not whole:
            grad_weight = grad_weight.to(weight.dtype)
        if overwrite:
            grads_gate, grads_up = gates if need_gate else None, ups if need_up else None
        return (
            None if grads_gate is None else grads_gate.view(gate.shape),
            None if grads_up is None else grads_up.view(up.shape),
            grad_weight, grad_bias, None, None,
        )  # fmt: skip


def _fused_block(g, u, dy, down, grad_weight, needs, whole, weight_dtype, compute, product_dtype, into_gate, into_up,
                 activation):  # fmt: skip
    """One block of the lean MLP's backward on the kernels of ``fastdpo.kernels.swiglu``: down_proj's weight
    gradient (formed when ``whole``, else added to ``grad_weight``), the gradients of gate and up written into
    ``into_gate`` and ``into_up`` (gate and up themselves when they are owned); returns the weight gradient."""
    kernels = _swiglu()
    need_weight, need_gate, need_up = needs
    if need_weight:
        product = kernels.product(g, u, compute, activation=activation)
        if whole:
            grad_weight = dy.t().mm(product).to(weight_dtype)
        else:
            add_product(grad_weight, dy.t(), product)
        del product
    if need_gate or need_up:
        grad_product = dy.mm(down).to(product_dtype)
        kernels.gradients(g, u, grad_product, into_gate if need_gate else None, into_up if need_up else None,
                          activation=activation)  # fmt: skip
    return grad_weight


_GELU_FORMS = {"tanh": "gelu_tanh", "none": "gelu"}


def _gate_activation(act: nn.Module) -> str | None:
    """Which of torch's ``silu``, ``gelu(approximate="tanh")`` and ``gelu`` ``act`` runs, by the name the kernels
    give it (``fastdpo.kernels.swiglu.ACTIVATIONS``): the lean MLP then forms its derivative from the gate alone,
    with aten's own backward or the kernels. None for any other (autograd's derivative of a recomputed ``act``).

    ``nn.SiLU``, ``nn.GELU`` and transformers' ``SiLUActivation``, ``GELUTanh`` (``gelu_pytorch_tanh``: Gemma's) and
    ``GELUActivation`` (``gelu``) when they call torch's op (not their python formulas, which round differently).
    """
    cls = type(act)
    if isinstance(act, nn.SiLU) or cls.__name__ == "SiLUActivation":
        return "silu"
    if cls is nn.GELU:
        return _GELU_FORMS.get(act.approximate)
    if cls.__name__ not in ("GELUTanh", "PytorchGELUTanh", "GELUActivation"):
        return None
    call = vars(act).get("act")  # their forward returns self.act(input)
    if call is nn.functional.gelu:
        return "gelu"
    if isinstance(call, functools.partial) and call.func is nn.functional.gelu and not call.args:
        return _GELU_FORMS.get(call.keywords.get("approximate")) if set(call.keywords) == {"approximate"} else None
    return None


def _activation_backward(activation: str, grad: Tensor, gate: Tensor, into: Tensor) -> Tensor:
    """``act'(gate) · grad`` as autograd forms it for these ops (aten's backward of the activation), into ``into``
    (which may be ``grad`` or ``gate``: element-wise, each element read before it is written)."""
    if activation == "silu":
        return torch.ops.aten.silu_backward.grad_input(grad, gate, grad_input=into)
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return torch.ops.aten.gelu_backward.grad_input(grad, gate, approximate=approximate, grad_input=into)


def _fused_swiglu(gate: Tensor, up: Tensor) -> bool:
    """Whether the lean MLP's element-wise work runs in ``fastdpo.kernels.swiglu`` here: CUDA tensors the kernels
    take, Triton installed."""
    if not (gate.is_cuda and triton_available()):
        return False
    return _swiglu().supports(gate, up)


def _swiglu():
    from fastdpo.kernels import swiglu  # imports triton: only where the kernels run

    return swiglu


def _block_rows(tokens: int, width: int) -> int:
    """Tokens per block of the lean MLP (``MLP_CHUNK_ELEMENTS``), at least one."""
    return max(1, min(tokens, MLP_CHUNK_ELEMENTS // width))


def _own_buffers(gate: Tensor, up: Tensor, product_dtype: torch.dtype) -> bool:
    """Whether gate and up can take their gradients in place: contiguous, not views, not sharing memory, and in the
    dtype of their gradients."""
    return (
        gate.is_contiguous() and up.is_contiguous() and gate._base is None and up._base is None
        and gate.dtype == up.dtype == product_dtype and gate.shape == up.shape
        and gate is not up
    )  # fmt: skip


def _place(whole_grad: Tensor | None, block_grad: Tensor | None, own: Tensor | None, block: slice, whole: bool):
    """Put one block's gradient where it belongs: over its own buffer ``own``, into the preallocated gradient of
    all tokens, or, when the block is all tokens, as it is. Returns the gradient of all tokens (or None)."""
    if block_grad is None:
        return whole_grad
    if own is not None:
        if block_grad.data_ptr() != own.data_ptr():
            own.copy_(block_grad)
        return whole_grad
    if whole:
        return block_grad
    whole_grad[block].copy_(block_grad)
    return whole_grad
