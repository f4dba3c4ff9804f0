"""How much memory a DPO training step needs at its peak, predicted from the model's shape: ``estimate_memory``.

    est = fastdpo.estimate_memory("llama-3-8b", 16384, lora={"r": 16}, reference="adapter")
    est.total            # bytes at the peak of a training step
    print(est)           # every component at every moment of the step, in GiB

The step is ``DPOTrainer``'s (``fastdpo.train.step.preference_step``): the reference pass under ``no_grad`` keeps
only per-sequence log-probs; the policy body runs once and autograd saves what its backward needs (with gradient
checkpointing, only each layer's input, and one layer is recomputed at a time in the backward); the fused head
(``fused_pair_loss``) forms the gradients of the hidden states and of the LM head in its forward, chunk by chunk of
whole pairs. The estimate is the largest total over the moments of that step in ``phases`` (reference forward,
head forward and backward, the backward of the last and of the first layer, the embedding's backward, the optimizer
step), each the sum of seven components: weights; reference (its weights, and its pass in its own phase);
gradients; optimizer state; activations (what autograd saved); head (its buffers); temporaries (a layer's backward).

Counted tensor by tensor from the code as it runs (transformers 5's Llama/Qwen2 layer on a packed batch), with
``N`` tokens, ``b`` bytes per activation (4 for ``fp32``, 2 for ``bf16``), ``H`` hidden, ``I`` intermediate, ``q``
and ``kv`` the query and key widths, ``V`` vocabulary:

- weights ``params × b``; LoRA adapters in fp32 (PEFT upcasts bf16 ones). Gradients: trainable parameters × their
  size. AdamW: two states per trainable parameter in its dtype (torch; the Trainer's default is fused, with no
  temporaries); ``adamw_8bit``: 1 byte per state plus fp32 block scales; ``sgd``: none.
- activations, per layer: each of the two RMSNorms keeps its input in fp32 and its rsqrt (``4NH + 4N``) and, when
  its weight trains, the normalized input (``bNH``); attention keeps q, k, v and its output (``bN(2q + 2kv)``; on
  masked sdpa k and v are repeated to every head: ``4bNq``), a fp32 log-sum-exp per head, and on sdpa the packed
  block mask converted to the query's dtype (``bN × row length``); the MLP keeps gate, silu(gate), up (``3bNI``);
  trained linear layers keep their inputs (``bN(2H + I)``, q/k/v and gate/up sharing one; an adapter keeps a copy in
  its own dtype when that differs or autocast runs). Checkpointed: ``bNH`` per layer, and the one recomputed.
  With ``lean_activations`` (``fastdpo.model.lean``) each RMSNorm keeps only its input (``bNH``; the first norm's is
  the checkpointed layer input), and unless LoRA adapts down_proj the MLP keeps gate and up only (``2bNI``,
  down_proj's input not kept) and its backward needs two blocks of ``MLP_CHUNK_ELEMENTS`` beyond them instead of two
  ``[N, I]`` (``_mlp_backward``).
- head: ``rows × V × 4`` bytes of fp32 logits per chunk, ``rows`` the larger of ``chunk_bytes / 4V`` and the largest
  pair's completion tokens (a chunk holds whole pairs); two chunks are alive once there are several, and one more
  for the entropy of TRL's token metrics; the fp32 gradient of a trained head weight (``4VH``); a fp32 copy of a
  bf16 head weight (``4VH``); the gradient and output of the hidden states (``2bNH``). Half precision on CUDA
  (``_HeadGemms`` with its epilogue kernels): 1 GiB chunks by default, one chunk alive (the token metrics come
  from the same kernel), no fp32 weight copy, the chunk's dz in the input dtype (``rows × V × b``); dW accumulates
  inside the product. The reference's head there is the same chunked path (one fp32 chunk).

What it means: on CUDA, ``torch.cuda.max_memory_allocated()`` of the training process — the caching allocator's
fragmentation, the CUDA context, cuBLAS workspaces and NCCL buffers come on top. On CPU, the growth of resident memory
over the run; ``bench/memory_cpu.py`` measures it (fp32 and bf16, full and LoRA, checkpointing on and off:
``bench/results/AMD_EPYC_2cpu/memory_cpu.md``). The CUDA-only paths (autocast with LoRA, flash attention, the Triton
reference head) are counted from the code, not measured. Not modeled: fp32 master weights under autocast (``bf16=True``
on an fp32 model: 16 bytes per parameter plus autocast's weight copies), mixture-of-experts layers, FSDP/DeepSpeed
sharding, the SFT step, eager attention. ``ref_offload`` and ``activation_offloading`` are counted from the code (what
leaves the device and when it comes back; tensors under the 1 MiB offloading threshold are neglected), not measured: on
a CPU nothing moves.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastdpo.errors import ConfigError, unknown_choice
from fastdpo.model import lean
from fastdpo.ops.linear_logprobs import DEFAULT_CHUNK_BYTES, GPU_CHUNK_BYTES

GiB = 2**30
COMPONENTS = ("weights", "reference", "gradients", "optimizer", "activations", "head", "temporaries")
REFERENCES = ("separate", "adapter", "cached", "none")
PRECISIONS = {"fp32": 4, "bf16": 2}
# bytes of optimizer state per trainable parameter; None: two states of the parameter's own size
OPTIMIZERS: dict[str, float | None] = {"adamw": None, "adamw_8bit": 2 + 2 * 4 / 256, "sgd": 0}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
QUANTIZATIONS = ("4bit", "4bit_nested", "8bit")  # bitsandbytes' storage: quantized_linear_bytes

# The published config.json fields of the shapes in the README's table: estimates without a download.
PRESETS: dict[str, dict] = {
    "llama-3.2-1b": {"model_type": "llama", "hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "head_dim": 64, "intermediate_size": 8192, "vocab_size": 128256,
                     "tie_word_embeddings": True},
    "llama-3-8b": {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                   "num_key_value_heads": 8, "head_dim": 128, "intermediate_size": 14336, "vocab_size": 128256,
                   "tie_word_embeddings": False},
    "qwen2.5-7b": {"model_type": "qwen2", "hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28,
                   "num_key_value_heads": 4, "head_dim": 128, "intermediate_size": 18944, "vocab_size": 152064,
                   "tie_word_embeddings": False},
}  # fmt: skip
COUNTED_LAYOUTS = ("llama", "mistral", "qwen2", "qwen3")  # the decoder layers whose saved tensors were counted
_MOE_FIELDS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


@dataclass(frozen=True)
class ModelShape:
    """The numbers of a dense decoder that its memory depends on."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    tied: bool = False
    qkv_bias: bool = False
    qk_norm: bool = False
    model_type: str = "llama"

    @classmethod
    def from_config(cls, config) -> ModelShape:
        """From a ``PretrainedConfig``, a dict of its fields, or a model (its ``.config``)."""
        config = getattr(config, "config", config)
        if hasattr(config, "get_text_config"):
            config = config.get_text_config()
        values = dict(config) if isinstance(config, dict) else config.to_dict()
        if any(values.get(name) for name in _MOE_FIELDS):
            fix = "estimate a dense model of the same size, or measure"
            raise ConfigError("mixture-of-experts layers are not modeled", column="config_or_name", fix=fix)
        missing = [name for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                     "vocab_size") if name not in values]  # fmt: skip
        if missing:
            raise ConfigError(f"the config has no {', '.join(missing)}", column="config_or_name",
                              fix="pass the config of a decoder-only causal LM")  # fmt: skip
        model_type = values.get("model_type") or "llama"
        hidden, heads = values["hidden_size"], values["num_attention_heads"]
        return cls(hidden=hidden, layers=values["num_hidden_layers"], heads=heads,
                   kv_heads=values.get("num_key_value_heads") or heads,
                   head_dim=values.get("head_dim") or hidden // heads, intermediate=values["intermediate_size"],
                   vocab=values["vocab_size"], tied=bool(values.get("tie_word_embeddings", False)),
                   qkv_bias=model_type == "qwen2" or bool(values.get("attention_bias", False)),
                   qk_norm=model_type == "qwen3", model_type=model_type)  # fmt: skip

    @property
    def q(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> dict[str, tuple[int, int]]:
        """``(in, out)`` features of the linear layers of one decoder layer."""
        h, i = self.hidden, self.intermediate
        return {"q_proj": (h, self.q), "k_proj": (h, self.kv), "v_proj": (h, self.kv), "o_proj": (self.q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}  # fmt: skip

    def layer_params(self) -> int:
        weights = sum(i * o for i, o in self.linears().values())
        return weights + 2 * self.hidden + (self.q + 2 * self.kv) * self.qkv_bias + 2 * self.head_dim * self.qk_norm

    def params(self) -> int:
        """Every parameter: embeddings, layers, final norm, and the LM head unless tied."""
        return self.vocab * self.hidden * (1 if self.tied else 2) + self.layers * self.layer_params() + self.hidden

    def lora_layer_params(self, rank: int, target_modules) -> int:
        """Parameters of rank-``rank`` LoRA adapters on the named linear layers of one decoder layer."""
        return sum(rank * (i + o) for name, (i, o) in self.linears().items() if name in target_modules)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes by component at the peak of a training step; ``phases``: the same at every moment considered."""

    weights: int
    reference: int
    gradients: int
    optimizer: int
    activations: int
    head: int
    temporaries: int
    phase: str
    """The moment of the step the peak is at (a key of ``phases``)."""
    phases: dict[str, dict[str, int]] = field(repr=False)
    params: int = 0
    trainable_params: int = 0
    notes: tuple[str, ...] = ()

    @property
    def total(self) -> int:
        return sum(getattr(self, name) for name in COMPONENTS)

    def fits(self, gib: float, *, usable: float = 0.9) -> bool:
        """Whether the peak is within ``usable`` of a ``gib`` GiB device (the rest: context, fragmentation)."""
        return self.total <= usable * gib * GiB

    def table(self) -> str:
        """Markdown: components (rows) at each phase (columns) in GiB, the peak's column in bold."""
        names = [f"**{name}**" if name == self.phase else name for name in self.phases]
        lines = ["| GiB | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        for component in (*COMPONENTS, "total"):
            cells = [sum(p.values()) if component == "total" else p[component] for p in self.phases.values()]
            lines.append(f"| {component} | " + " | ".join(f"{cell / GiB:.2f}" for cell in cells) + " |")
        lines.append(f"\npeak {self.total / GiB:.2f} GiB at '{self.phase}'; {self.params / 1e9:.3f}B parameters, "
                     f"{self.trainable_params / 1e6:.2f}M trainable")  # fmt: skip
        return "\n".join(lines + [f"- {note}" for note in self.notes])

    __str__ = table


@dataclass(frozen=True)
class _Step:
    """What the step runs: the shape and the options, normalized."""

    shape: ModelShape
    tokens: int
    bytes: int  # of a weight and an activation of the base model
    lora_rank: int | None
    lora_targets: frozenset[str]
    reference: str
    checkpointing: bool
    sdpa: bool
    row_length: int
    pair_tokens: int
    chunk_bytes: int
    token_metrics: bool
    device: str
    ref_offload: bool = False
    activation_offloading: bool = False
    lean_activations: bool = False
    quantization: str | None = None

    @property
    def full(self) -> bool:
        return self.lora_rank is None

    @property
    def adapter_bytes(self) -> int:
        # QLoRA's adapters in bf16 (TRL's and fastdpo's trainers cast them); else PEFT's fp32
        return 2 if self.quantization else 4

    @property
    def autocast(self) -> bool:
        # DPOConfig's bf16 is True on a bf16-capable GPU, so the step runs under autocast there; never on a CPU
        return self.device == "cuda" and self.bytes == 2


def estimate_memory(
    config_or_name,
    tokens_per_batch: int,
    *,
    optimizer: str = "adamw",
    lora: dict | None = None,
    reference: str = "separate",
    precision: str = "bf16",
    gradient_checkpointing: bool = True,
    attention: str = "sdpa",
    max_length: int = 1024,
    pair_tokens: int | None = None,
    chunk_bytes: int | None = None,
    token_metrics: bool = True,
    device: str = "cuda",
    ref_offload: bool = False,
    activation_offloading: bool = False,
    lean_activations: bool = False,
    quantization: str | None = None,
) -> MemoryEstimate:
    """The peak memory of one ``DPOTrainer`` training step (what is counted: the module docstring).

    Args:
        config_or_name: a transformers ``PretrainedConfig`` (or a model), a dict of config fields, a preset
            (``llama-3.2-1b``, ``llama-3-8b``, ``qwen2.5-7b``, or their hub names), or a name or path that
            ``AutoConfig.from_pretrained`` reads.
        tokens_per_batch: tokens of one packed micro-batch (all rows, row-end padding included).
        optimizer: ``adamw`` (torch: states in the parameters' dtype), ``adamw_8bit`` (bitsandbytes), ``sgd``.
        lora: None (full fine-tuning) or ``{"r": 16, "target_modules": [...]}``; the modules default to every linear
            layer of the decoder layers (PEFT's ``"all-linear"``; never the LM head).
        reference: ``separate`` (a second copy of the weights), ``adapter`` (the policy with its new adapter
            disabled: no copy), ``cached`` or ``none`` (no reference pass).
        precision: ``bf16`` (the model loaded in bf16: weights, gradients, AdamW states and activations in bf16) or
            ``fp32``.
        gradient_checkpointing: DPOConfig's default is on.
        attention: ``sdpa`` (transformers' default; packed rows get a block mask), ``flash``, or ``varlen``
            (``packed_attention="varlen"``: on CUDA the same flash kernel, no mask, k and v not repeated).
        max_length: the longest sequence; on sdpa DPOTrainer's rows are as long as a batch's longest sequence.
        pair_tokens: completion tokens of the largest pair in a batch (a head chunk holds whole pairs); default
            ``min(tokens_per_batch, 2 × max_length)``, the worst case.
        chunk_bytes, token_metrics: the fused head's chunk size (None: what the head picks, 1 GiB for half precision
            on CUDA, else 64 MiB), and whether it computes TRL's per-token metrics (DPOTrainer does).
        device: ``cuda`` (bf16 steps run under autocast) or ``cpu``.
        ref_offload: a separate reference in host memory, on the device only for its pass (``DPOConfig.ref_offload``).
        activation_offloading: the body's saved activations in host memory, each layer's brought back for its
            backward (``DPOConfig.activation_offloading``).
        lean_activations: the RMSNorms keep only their inputs and the MLPs only gate and up (not where LoRA adapts
            down_proj) (``DPOConfig.lean_activations``, ``fastdpo.model.lean``).
        quantization: QLoRA (needs ``lora``): the decoder layers' linear weights in bitsandbytes' ``4bit`` (NF4/FP4),
            ``4bit_nested`` (``bnb_4bit_use_double_quant``) or ``8bit`` (``quantized_linear_bytes``); the adapters
            in bf16; ``precision`` is the compute dtype (the other weights and the activations).
    """
    step = _step(config_or_name, tokens_per_batch, lora=lora, reference=reference, precision=precision,
                 gradient_checkpointing=gradient_checkpointing, attention=attention, max_length=max_length,
                 pair_tokens=pair_tokens, chunk_bytes=chunk_bytes, token_metrics=token_metrics,
                 device=device, ref_offload=ref_offload, activation_offloading=activation_offloading,
                 lean_activations=lean_activations, quantization=quantization)  # fmt: skip
    if ref_offload and reference != "separate":
        raise ConfigError(f"moves a separate reference; reference={reference!r} has none", column="ref_offload")
    if optimizer not in OPTIMIZERS:
        raise unknown_choice("optimizer", optimizer, OPTIMIZERS)
    shape, params = step.shape, step.shape.params()
    if step.full:
        trainable, trainable_bytes = params, step.bytes
    else:  # PEFT upcasts bf16 adapters to fp32 (QLoRA's: bf16)
        trainable = shape.layers * shape.lora_layer_params(step.lora_rank, step.lora_targets)
        trainable_bytes = step.adapter_bytes
    per_parameter = OPTIMIZERS[optimizer]
    state = 2 * trainable_bytes if per_parameter is None else per_parameter
    base = base_weight_bytes(shape, step.bytes, step.quantization)
    persistent = {
        "weights": base + (0 if step.full else trainable * trainable_bytes),
        "reference": base if step.reference == "separate" and not step.ref_offload else 0,
        "optimizer": int(trainable * state),
    }
    phases = _phases(step, persistent, trainable * trainable_bytes, base)
    peak = max(phases, key=lambda name: sum(phases[name].values()))
    notes = ()
    if shape.model_type not in COUNTED_LAYOUTS:
        notes = (f"activations counted for the Llama layer; a {shape.model_type!r} layer may keep other tensors",)
    return MemoryEstimate(**phases[peak], phase=peak, phases=phases, params=params, trainable_params=trainable,
                          notes=notes)  # fmt: skip


def base_weight_bytes(shape: ModelShape, b: int, quantization: str | None = None) -> int:
    """Bytes of the model's own weights: ``b`` each, or the decoder layers' linear weights as bitsandbytes stores
    them quantized (the rest, embeddings, norms, biases, the LM head, stay in ``b``)."""
    if quantization is None:
        return shape.params() * b
    linears = shape.linears().values()
    plain = shape.params() - shape.layers * sum(i * o for i, o in linears)
    return plain * b + shape.layers * sum(quantized_linear_bytes(i, o, quantization) for i, o in linears)


def quantized_linear_bytes(inputs: int, outputs: int, quantization: str) -> int:
    """A linear weight as bitsandbytes keeps it: ``8bit``, a byte per weight and a fp32 scale per output row;
    ``4bit``, two weights a byte and a fp32 absmax per block of 64; ``4bit_nested``, those absmax in 8 bits, with a
    fp32 absmax per 256 of them and a fp32 offset. Not counted: the per-layer code tables (16 values; 256 more when
    nested)."""
    weights = inputs * outputs
    if quantization == "8bit":
        return weights + 4 * outputs
    blocks = -(-weights // 64)
    packed = -(-weights // 2)
    if quantization == "4bit":
        return packed + 4 * blocks
    return packed + blocks + 4 * -(-blocks // 256) + 4


def _step(config_or_name, tokens: int, *, lora, reference, precision, **options) -> _Step:
    if not isinstance(tokens, int) or tokens < 1:
        raise ConfigError(f"must be a positive number of tokens, got {tokens!r}", column="tokens_per_batch")
    for option, value, choices in (("reference", reference, REFERENCES), ("precision", precision, PRECISIONS),
                                   ("attention", options["attention"], ("sdpa", "flash", "varlen")),
                                   ("device", options["device"], ("cuda", "cpu"))):  # fmt: skip
        if value not in choices:
            raise unknown_choice(option, value, choices)
    rank, targets = None, frozenset()
    if lora is not None:
        if set(lora) - {"r", "target_modules"}:
            raise ConfigError(f"unknown keys {sorted(set(lora) - {'r', 'target_modules'})}", column="lora",
                              fix="give 'r' and 'target_modules'")  # fmt: skip
        rank, names = int(lora.get("r", 16)), lora.get("target_modules", "all-linear")
        targets = frozenset(LINEARS if names == "all-linear" else [names] if isinstance(names, str) else names)
        if not targets or not targets <= set(LINEARS):
            raise ConfigError(f"target_modules {sorted(targets)} are not among {LINEARS}", column="lora",
                              fix="name linear layers of the decoder layers, or 'all-linear'")  # fmt: skip
    elif reference == "adapter":
        raise ConfigError("an adapter reference needs a LoRA policy", column="reference", fix="pass lora={'r': 16}")
    if options["quantization"] is not None:
        if options["quantization"] not in QUANTIZATIONS:
            raise unknown_choice("quantization", options["quantization"], QUANTIZATIONS)
        if lora is None:
            raise ConfigError("a quantized model trains through adapters only", column="quantization",
                              fix="pass lora={'r': 16} (QLoRA)")  # fmt: skip
    max_length = options.pop("max_length")
    if options["chunk_bytes"] is None:
        half_on_gpu = options["device"] == "cuda" and PRECISIONS[precision] == 2
        options["chunk_bytes"] = GPU_CHUNK_BYTES if half_on_gpu else DEFAULT_CHUNK_BYTES
    pair_tokens = options.pop("pair_tokens") or min(tokens, 2 * max_length)
    return _Step(shape=ModelShape.from_config(_config(config_or_name)), tokens=tokens, bytes=PRECISIONS[precision],
                 lora_rank=rank, lora_targets=targets, reference=reference,
                 checkpointing=options.pop("gradient_checkpointing"), sdpa=options.pop("attention") == "sdpa",
                 row_length=min(tokens, max_length), pair_tokens=pair_tokens, **options)  # fmt: skip


def _config(config_or_name):
    if not isinstance(config_or_name, str):
        return config_or_name
    key = config_or_name.lower().rstrip("/").rsplit("/", 1)[-1].removeprefix("meta-")
    if key in PRESETS:
        return PRESETS[key]
    from transformers import AutoConfig  # a local folder, or the hub: only for names that are no preset

    try:
        return AutoConfig.from_pretrained(config_or_name)
    except (OSError, ValueError) as error:
        fix = f"pass a config, a dict of its fields, or one of {', '.join(PRESETS)}"
        raise ConfigError(f"cannot read a config from {config_or_name!r} ({type(error).__name__})",
                          column="config_or_name", fix=fix) from error  # fmt: skip


def _layer_activations(step: _Step) -> int:
    """Bytes autograd saves in one decoder layer's forward without checkpointing."""
    s, n, b = step.shape, step.tokens, step.bytes
    h, i = s.hidden, s.intermediate
    lean = step.lean_activations  # an adapted down_proj keeps the model's own MLP (fastdpo.model.lean)
    lean_mlp = lean and _lean_mlp(step)
    if lean:  # each RMSNorm keeps its input: the first norm's is the checkpointed layer input when checkpointing
        saved = b * n * h * (2 - step.checkpointing) + b * n * (s.q + s.kv) * s.qk_norm
        if step.device == "cuda":  # the norm kernels' fp32 rsqrt per row (fastdpo.ops.rms_norm)
            saved += 4 * n * (2 + (s.heads + s.kv_heads) * s.qk_norm)
    else:  # RMSNorms: fp32 input, rsqrt; normalized if trained
        saved = 2 * (4 * n * h + 4 * n + b * n * h * step.full) + (4 + b * step.full) * n * (s.q + s.kv) * s.qk_norm
    key_width = s.q if step.sdpa and s.kv_heads < s.heads else s.kv  # masked sdpa: k, v repeated to every head
    saved += b * n * (2 * s.q + 2 * key_width) + 4 * n * s.heads  # q, k, v, the output; log-sum-exp
    saved += b * n * step.row_length * step.sdpa  # the block mask, in the query's dtype
    saved += (2 if lean_mlp else 3) * b * n * i  # gate, silu(gate) (not when lean), up
    if step.full:  # inputs of q/k/v (one tensor), gate/up (one), down_proj (not when lean); o_proj's is attention's
        return saved + b * n * (2 * h + i * (not lean_mlp))
    linears, adapter_bytes = s.linears(), 2 if step.autocast else step.adapter_bytes
    # QLoRA's bf16 adapters copy their inputs only when the activations are fp32
    copies = b != adapter_bytes if step.quantization else step.autocast or b != 4
    if copies:  # every adapted layer casts its input to the adapter's dtype: a copy each
        saved += sum(n * linears[name][0] * adapter_bytes for name in step.lora_targets)
    else:  # the adapters keep the inputs the trained layers would have kept
        shared = ({"q_proj", "k_proj", "v_proj"}, {"gate_proj", "up_proj"}, {"down_proj"})
        saved += sum(b * n * linears[min(group)][0] for group in shared if group & step.lora_targets)
    return saved + len(step.lora_targets) * n * step.lora_rank * adapter_bytes  # lora_A's outputs


def _lean_mlp(step: _Step) -> bool:
    """Whether ``lean_activations`` runs the lean MLP: not where LoRA adapts down_proj, nor on a quantized model (a
    bitsandbytes down_proj is no plain ``nn.Linear``: ``fastdpo.model.lean`` keeps the model's own MLP)."""
    return "down_proj" not in step.lora_targets and step.quantization is None


def _mlp_backward(step: _Step) -> int:
    """Bytes of temporaries at the peak of one MLP's backward.

    The model's own MLP: two ``[N, I]`` beyond what its forward saved (``2bNI``). The lean
    MLP (``fastdpo.model.lean``) works on blocks of ``lean.MLP_CHUNK_ELEMENTS // I`` tokens and writes the gradients of
    gate and up over them: two blocks at a time (act(gate) and the product, then act(gate) and the product's
    gradient), one on CUDA (the kernels form the product, then take the product's gradient, one after the other;
    an activation they take is assumed: SiLU, or Gemma's tanh GELU); with several blocks, down_proj's weight
    gradient accumulates in fp32 (``4HI``), and on a CPU a bf16 block's product and incoming gradient are upcast for
    it.
    """
    s, n, b = step.shape, step.tokens, step.bytes
    i = s.intermediate
    if not (step.lean_activations and _lean_mlp(step)):
        return 2 * b * n * i
    rows = min(n, max(1, lean.MLP_CHUNK_ELEMENTS // i))
    trained = step.full  # down_proj's weight: only full training gives it a gradient (LoRA leaves it alone here)
    accumulated = rows < n and trained
    cuda = step.device == "cuda"
    upcast = 4 * rows * (i + s.hidden) * (accumulated and b != 4 and not cuda)  # product, gradient
    return (1 if cuda else 2) * b * rows * i + (4 * s.hidden * i + upcast) * accumulated


def _phases(step: _Step, persistent: dict[str, int], gradients: int, weights: int) -> dict[str, dict[str, int]]:
    """The components at each moment of the step: persistent state plus what that moment holds."""
    s, n, b, full = step.shape, step.tokens, step.bytes, step.full
    h, i, vh = s.hidden, s.intermediate, s.vocab * s.hidden
    layer = _layer_activations(step)
    hidden = b * n * h  # one [N, H] tensor: a layer input, the hidden states, their gradient
    mask = n * step.row_length * step.sdpa  # the boolean block mask, alive through a forward
    # once per model: final norm, rotary cos/sin, token ids; checkpointing keeps the mask for its recomputation
    final_norm = hidden if step.lean_activations else 4 * n * h + 4 * n + hidden * full
    shared = final_norm + 2 * b * n * s.head_dim + 8 * n + mask * step.checkpointing
    saved = shared + s.layers * (hidden if step.checkpointing else layer)
    if not full and not step.checkpointing:  # frozen embeddings: the first norm's input needs no gradient
        saved -= hidden if step.lean_activations else 4 * n * h + 4 * n
    recompute = layer if step.checkpointing else 0
    # the incoming gradient, the MLP's temporaries; a quantized layer's weight, dequantized for the input's gradient
    dequantized = b * max(i * o for i, o in s.linears().values()) if step.quantization else 0
    layer_backward = b * n * h + _mlp_backward(step) + dequantized
    layer_grads = (s.layer_params() * b if full
                   else s.lora_layer_params(step.lora_rank, step.lora_targets) * step.adapter_bytes)  # fmt: skip
    head_grad = vh * b if full else 0  # the LM head weight's gradient (the embedding's, when tied)
    embed_grad = vh * b if full and not s.tied else 0
    # fused head: a chunk's buffer stays alive (as its dz) until the next chunk's dz is formed
    rows = min(n, max(step.chunk_bytes // (4 * s.vocab), step.pair_tokens))
    chunk = rows * s.vocab * 4
    live_chunks = (2 if rows < n else 1) + step.token_metrics  # the entropy takes one more
    half_gemms = step.device == "cuda" and b == 2  # _HeadGemms: products in bf16, fp32 results
    weight_fp32 = 4 * vh * (b != 4) * (not half_gemms)  # elsewhere the head multiplies in fp32
    in_loop = chunk * live_chunks + 2 * rows * h * 4
    if half_gemms:  # the epilogue kernels: the raw fp32 chunk and its dz in bf16; dW accumulates in the product
        in_loop = chunk + rows * s.vocab * b + 2 * rows * h * 4
    at_save = chunk + head_grad * (b != 4)  # the fp32 weight gradient cast to the weight's dtype
    head_forward = 2 * hidden + weight_fp32 + 4 * vh * full + max(in_loop, at_save)

    def at(**parts: int) -> dict[str, int]:
        return {name: persistent.get(name, 0) + parts.get(name, 0) for name in COMPONENTS}

    phases = {}
    if step.reference in ("separate", "adapter"):  # no grad: one layer's tensors at a time, then the head
        repeated = step.sdpa and s.kv_heads < s.heads
        # layer input, normalized; q, k, v, the output, k and v repeated; the block mask in the query's dtype
        attention = b * n * (2 * h + 2 * s.q + 2 * s.kv + 2 * s.q * repeated) + b * mask
        body = max(attention, b * n * (2 * h + 3 * i)) + shared + mask * (not step.checkpointing) + dequantized
        head = hidden
        if step.device == "cpu" or half_gemms:  # the chunked head (the Triton kernel of other CUDA dtypes keeps none)
            head += weight_fp32 + min(n, step.chunk_bytes // (4 * s.vocab)) * s.vocab * 4
        brought = weights if step.ref_offload else 0  # ref_offload: the weights come for this pass only
        phases["reference forward"] = at(reference=brought + max(body, head))
    # activation offloading: what the body saved waits in host memory; one layer's comes back for its backward
    on_device = 0 if step.activation_offloading else saved
    last_layer = (
        (hidden + recompute if step.checkpointing else layer) if step.activation_offloading else saved + recompute
    )
    phases["head forward"] = at(activations=on_device, head=head_forward)
    phases["head backward"] = at(activations=on_device, gradients=head_grad, head=head_grad + 2 * hidden)
    phases["last layer backward"] = at(activations=last_layer, gradients=head_grad + layer_grads,
                                       temporaries=layer_backward + hidden)  # fmt: skip
    first_layer = shared + (hidden + recompute if step.checkpointing else layer)
    phases["first layer backward"] = at(activations=first_layer, gradients=gradients - embed_grad,
                                        temporaries=layer_backward + hidden)  # fmt: skip
    tied_grad = vh * b if full and s.tied else 0  # the embedding's gradient, before it is added to the head's
    phases["embedding backward"] = at(gradients=gradients, temporaries=hidden + tied_grad)
    phases["optimizer step"] = at(gradients=gradients)
    return phases


__all__ = ["PRESETS", "MemoryEstimate", "ModelShape", "estimate_memory"]
