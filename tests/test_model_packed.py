"""fastdpo.model on packed batches: packed == one-by-one per-sequence log-probs, for every family and backend.

The reference never looks at the packed batch: each sequence (prompt + completion) goes alone through the full model
(``model(input_ids=seq[None]).logits``, eager attention, the LM head included), and its log-probs are summed over
the completion tokens. Tiny random models (fp32, 2 layers, 4 heads, 2 KV heads) with a large init scale so that
attention depends strongly on context: a sequence that sees its row neighbours moves its log-prob by far more than
the 1e-4 tolerance (see test_a_mask_or_a_cache_breaks_isolation).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import warnings

import pytest
import torch
import transformers
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from fastdpo.data.packing import IGNORE_INDEX, pack_pairs
from fastdpo.errors import ConfigError
from fastdpo.model import HeadSpec, head_spec, packed_hidden_states, packed_logps

VOCAB = 160
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    initializer_range=0.2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
# name: (config class, model class, family-specific settings). Sliding windows of 6 are shorter than most sequences,
# so the packed sliding-window masks are exercised too.
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 8}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {"sliding_window": 6}),
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        {"head_dim": 8, "query_pre_attn_scalar": 8, "sliding_window": 6, "final_logit_softcapping": 3.0},
    ),
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        {
            "head_dim": 8,
            "query_pre_attn_scalar": 8,
            "sliding_window": 6,
            "layer_types": ["sliding_attention", "full_attention"],
            "final_logit_softcapping": 3.0,
        },
    ),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}),
    "cohere": ("CohereConfig", "CohereForCausalLM", {"logit_scale": 0.25}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {"logits_scaling": 4.0}),
}
# bodies that build their masks without position_ids: each segment runs alone in a padded row (_unpacked_body)
UNPACKED_FAMILIES = {
    "opt": ("OPTConfig", "OPTForCausalLM", {"ffn_dim": 64, "word_embed_proj_dim": 32, "max_position_embeddings": 64,
                                            "dropout": 0.0, "attention_dropout": 0.0}),
    "bloom": ("BloomConfig", "BloomForCausalLM", {"hidden_dropout": 0.0, "attention_dropout": 0.0}),
    "gpt_oss": ("GptOssConfig", "GptOssForCausalLM", {"head_dim": 8, "num_local_experts": 4, "num_experts_per_tok": 2,
                                                      "sliding_window": 6, "router_aux_loss_coef": 0.0}),
}  # fmt: skip
BACKENDS = ("eager", "sdpa")

# (prompt, chosen, rejected) lengths: 1-token prompts, 1-token completions, up to 13-token sequences
SHAPES = [(3, 5, 2), (7, 2, 4), (1, 6, 6), (4, 3, 1), (5, 5, 5), (2, 1, 8), (6, 4, 3)]


def make_model(family: str, **overrides) -> torch.nn.Module:
    config_name, model_name, settings = {**FAMILIES, **UNPACKED_FAMILIES}[family]
    config = getattr(transformers, config_name)(**{**COMMON, **settings, **overrides})
    torch.manual_seed(0)
    model = getattr(transformers, model_name)(config).eval()
    model.set_attn_implementation("eager")  # the reference backend; packed runs switch for the call
    return model


@functools.cache
def cached_model(family: str) -> torch.nn.Module:
    return make_model(family)


def make_examples(shapes=SHAPES, seed: int = 1) -> list[dict]:
    gen = torch.Generator().manual_seed(seed)

    def ids(n):  # 0 is the pad id: real tokens avoid it so padding is never mistaken for content
        return torch.randint(3, VOCAB, (n,), generator=gen).tolist()

    return [{"prompt_ids": ids(p), "chosen_ids": ids(c), "rejected_ids": ids(r)} for p, c, r in shapes]


def make_batch(examples):
    # 40-token rows hold 2-3 pairs each; the longest row sets L, the others end in a padding segment
    batch = pack_pairs(examples, pack_length=40, backend="python")
    assert batch.input_ids.shape[0] >= 2 and bool((batch.seq_pair == -1).any())  # several rows, row-end padding
    return batch


def segment_sequences(batch, examples):
    """For each segment: (prompt_ids, completion_ids) of the example it holds, or None for padding."""
    out = []
    for pair, is_chosen in zip(batch.seq_pair.tolist(), batch.seq_is_chosen.tolist(), strict=True):
        if pair < 0:
            out.append(None)
            continue
        example = examples[batch.pair_ids[pair]]
        out.append((example["prompt_ids"], example["chosen_ids" if is_chosen else "rejected_ids"]))
    return out


@torch.no_grad()
def one_by_one_logps(model, sequences) -> torch.Tensor:
    """[S] completion log-prob sums, each sequence alone through the full model (its own head); 0 for padding."""
    sums = []
    device = next(model.parameters()).device
    for seq in sequences:
        if seq is None:
            sums.append(torch.zeros((), dtype=torch.float64, device=device))
            continue
        prompt, completion = seq
        ids = torch.tensor(prompt + completion, device=device)
        logits = model(input_ids=ids[None]).logits[0].double()
        logp = logits.log_softmax(-1)[:-1].gather(-1, ids[1:, None])[:, 0]
        sums.append(logp[len(prompt) - 1 :].sum())  # position t predicts token t + 1: completion from len(prompt)
    return torch.stack(sums)


@functools.cache
def reference_case(family: str):
    model = cached_model(family)
    examples = make_examples()
    batch = make_batch(examples)
    sequences = segment_sequences(batch, examples)
    return model, batch, sequences, one_by_one_logps(model, sequences)


def sdpa_unsupported_reason(family: str) -> str | None:
    model_class = getattr(transformers, {**FAMILIES, **UNPACKED_FAMILIES}[family][1])
    if not model_class._supports_sdpa:
        return (
            f"transformers {transformers.__version__}: {model_class.__name__} has no sdpa path (_supports_sdpa=False)"
        )
    return None


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", [*FAMILIES, *UNPACKED_FAMILIES])
def test_packed_equals_one_by_one(family, backend):
    if backend == "sdpa" and (reason := sdpa_unsupported_reason(family)):
        pytest.skip(reason)  # Gemma-2: sdpa cannot soft-cap attention scores; eager (and flex, flash) only
    model, batch, sequences, expected = reference_case(family)
    with torch.no_grad():
        out = packed_logps(model, batch, impl="torch", attn_implementation=backend)
    assert model.config._attn_implementation == "eager"  # switched back after the call
    # fp32 forward of tiny models: one-by-one eager and packed differ by ~1e-6; leaking context moves them by > 1e-2
    torch.testing.assert_close(out.seq_logps.double(), expected, rtol=0, atol=1e-4)
    lengths = [0 if seq is None else len(seq[1]) for seq in sequences]
    assert out.seq_num_tokens.tolist() == lengths
    assert out.logp.shape == (batch.input_ids.numel(),) and bool(
        (out.logp[batch.targets.reshape(-1) == -100] == 0).all()
    )


def test_gemma2_refuses_sdpa_with_a_config_error():
    # What the skip above relies on, checked: transformers will not run Gemma-2 on sdpa, and we say so clearly
    model, batch, _, _ = reference_case("gemma2")
    with pytest.raises(ConfigError, match="attn_implementation.*sdpa"):
        packed_logps(model, batch, attn_implementation="sdpa")
    assert model.config._attn_implementation == "eager"


def test_hidden_states_are_the_body_output_flattened():
    model, batch, _, _ = reference_case("llama")
    with torch.no_grad():
        hidden = packed_hidden_states(model, batch)
        first_row = model.model(input_ids=batch.input_ids[:1], position_ids=batch.position_ids[:1], use_cache=False)
    rows, length = batch.input_ids.shape
    assert hidden.shape == (rows * length, model.config.hidden_size)
    torch.testing.assert_close(hidden[:length], first_row.last_hidden_state[0], rtol=0, atol=1e-6)


def test_gradients_reach_the_body_and_the_head():
    model = make_model("gemma2")  # tied embeddings and both soft-caps: every special path on the backward
    batch = make_batch(make_examples())
    out = packed_logps(model, batch, impl="torch")
    out.seq_logps[batch.seq_pair >= 0].sum().backward()
    embedding = model.get_input_embeddings().weight
    assert embedding.grad is not None and bool(embedding.grad.abs().sum() > 0)
    assert all(p.grad is not None for n, p in model.named_parameters() if "layers.1." in n)


def test_bodies_that_build_masks_without_position_ids_run_unpacked_with_the_same_gradients():
    llama, opt = make_model("llama"), make_model("opt")
    examples = make_examples()
    batch = make_batch(examples)
    sequences = segment_sequences(batch, examples)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a body that isolates packed sequences
        packed_logps(llama, batch, impl="torch")
    assert llama.get_decoder()._fastdpo_isolates_packed is True  # (found in its first forward on shared rows)
    with pytest.warns(UserWarning, match="OPTDecoder builds its attention mask without position_ids, so packed"):
        packed_logps(opt, batch, impl="torch").seq_logps[batch.seq_pair >= 0].sum().backward()
    assert opt.get_decoder()._fastdpo_isolates_packed is False
    packed_grads = {name: p.grad.clone() for name, p in opt.named_parameters() if p.grad is not None}
    opt.zero_grad()
    for seq in filter(None, sequences):  # each sequence alone through the model: the gradient packing must give
        ids = torch.tensor(seq[0] + seq[1])
        logp = opt(input_ids=ids[None]).logits[0].log_softmax(-1)[:-1].gather(-1, ids[1:, None])[:, 0]
        logp[len(seq[0]) - 1 :].sum().backward()
    assert packed_grads.keys() == {name for name, p in opt.named_parameters() if p.grad is not None}
    for name, p in opt.named_parameters():  # fp32 sums over ~50 tokens of a tiny model: ~1e-6 apart
        torch.testing.assert_close(packed_grads[name], p.grad, rtol=1e-4, atol=1e-5, msg=name)


# --- the head --------------------------------------------------------------------------------------------------------

HEAD_CASES = {  # family: (tied, logit_scale, softcap) as the config above sets them
    "gemma2": (True, 1.0, 3.0),
    "cohere": (True, 0.25, None),
    "granite": (False, 1 / 4.0, None),
    "llama": (False, 1.0, None),
}


@pytest.mark.parametrize("family", list(HEAD_CASES))
def test_head_spec_reproduces_the_model_logits(family):
    model = cached_model(family)
    spec = head_spec(model)
    tied, logit_scale, softcap = HEAD_CASES[family]
    assert (spec.weight is model.get_input_embeddings().weight) == tied
    assert spec.logit_scale == pytest.approx(logit_scale, rel=1e-12) and spec.softcap == softcap
    ids = torch.tensor([make_examples(seed=3)[0]["prompt_ids"] + make_examples(seed=3)[0]["chosen_ids"]])
    with torch.no_grad():
        expected = model(input_ids=ids).logits[0].log_softmax(-1)
        hidden = model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state[0]
        from_spec = spec.logits(hidden).log_softmax(-1)
    # same fp32 ops in the same order, except Granite's division done as a multiplication by 1/4 (exact here)
    torch.testing.assert_close(from_spec, expected, rtol=0, atol=1e-6)


def test_head_spec_of_a_tied_llama_is_the_input_embedding():
    config = transformers.LlamaConfig(**{**COMMON, "tie_word_embeddings": True})
    model = transformers.LlamaForCausalLM(config)
    assert head_spec(model).weight is model.get_input_embeddings().weight


def test_unknown_head_transformation_is_refused():
    # HyperCLOVA X MULTIPLIES its logits by `logits_scaling` where Granite divides: the attribute name alone cannot
    # tell, so a class that is not in the table and sets such an attribute is an error, not a guess (a Llama given
    # one stands for a family not read yet)
    config = transformers.LlamaConfig(**COMMON)
    config.logits_scaling = 4.0
    model = transformers.LlamaForCausalLM(config)
    with pytest.raises(ConfigError, match="LlamaForCausalLM sets logits_scaling=4.0"):
        head_spec(model)
    model.config.logits_scaling = 1.0  # neutral: a plain head
    assert head_spec(model) == HeadSpec(weight=model.lm_head.weight, bias=None)


def test_head_that_is_not_a_plain_linear_is_refused():
    class DoubledHead(torch.nn.Linear):  # its own forward: the weight alone no longer says what the head computes
        def forward(self, hidden):
            return 2 * super().forward(hidden)

    model = make_model("llama")
    model.lm_head = DoubledHead(COMMON["hidden_size"], VOCAB, bias=False)
    # (a head of the model's own kind, as DoryForCausalLM's: told it was an adapter or a quantized layer)
    with pytest.raises(
        ConfigError, match="not a plain nn.Linear .* of the model's own kind: train this model with TRL"
    ):
        head_spec(model)


def test_base_model_without_head_is_refused():
    with pytest.raises(ConfigError, match="has no LM head"):
        head_spec(cached_model("llama").model)


def test_attention_without_packed_mask_is_refused():
    # A custom attention function gets no mask from transformers at all (masking_utils returns None for names it
    # does not know), so packed sequences would attend across their boundaries
    AttentionInterface.register("fastdpo_test_attention", sdpa_attention_forward)
    model, batch, _, _ = reference_case("llama")
    with pytest.raises(ConfigError, match="gets no packed-sequence mask"):
        packed_hidden_states(model, batch, attn_implementation="fastdpo_test_attention")
    assert model.config._attn_implementation == "eager"


# --- what must never be added --------------------------------------------------------------------------------------


def logps_from_hidden(model, batch, hidden) -> torch.Tensor:
    spec = head_spec(model)
    logp = spec.logits(hidden).double().log_softmax(-1)
    targets = batch.targets.reshape(-1)
    token = torch.where(targets == IGNORE_INDEX, 0.0, logp.gather(-1, targets.clamp(min=0)[:, None])[:, 0])
    bounds = batch.cu_seqlens.tolist()
    return torch.stack([token[a:b].sum() for a, b in itertools.pairwise(bounds)])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_mask_or_a_cache_breaks_isolation(backend):
    """Why packed_hidden_states passes no attention mask and use_cache=False.

    transformers builds the block-diagonal mask of packed sequences from position_ids only when attention_mask is
    None and there is no cache (masking_utils._preprocess_mask_arguments). An all-ones mask (what a tokenizer or a
    default collator returns) or the cache a model makes when use_cache is left at its config default (True) turns
    that detection off: the mask becomes plain causal over the whole row, and every sequence attends to the ones
    packed before it. Nothing fails; the log-probs are just wrong. This test keeps both out.
    """
    model, batch, _, expected = reference_case("llama")
    body = model.get_decoder()
    rows = dict(input_ids=batch.input_ids, position_ids=batch.position_ids)
    with torch.no_grad():
        model.set_attn_implementation(backend)
        try:
            isolated = body(**rows, use_cache=False).last_hidden_state.flatten(0, 1)
            masked = body(**rows, use_cache=False, attention_mask=torch.ones_like(batch.input_ids))
            cached = body(**rows)  # use_cache from the config: a DynamicCache is created
        finally:
            model.set_attn_implementation("eager")
    assert (cached.cache if hasattr(cached, "cache") else cached.past_key_values) is not None
    torch.testing.assert_close(logps_from_hidden(model, batch, isolated), expected, rtol=0, atol=1e-4)
    for broken in (masked, cached):
        diff = (logps_from_hidden(model, batch, broken.last_hidden_state.flatten(0, 1)) - expected).abs().max()
        assert diff > 1e-3, f"a mask or a cache no longer breaks packing ({diff:.2e}): revisit this test"


# --- GPU backends ---------------------------------------------------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def gpu_case(family: str, dtype: torch.dtype):
    """fp32 one-by-one reference, and the model in ``dtype`` on the GPU with the error plain eager has there.

    Heads of 16 dimensions: flex attention's kernels take no fewer (the CPU cases use 8)."""
    wide = {"head_dim": 16, **({"query_pre_attn_scalar": 16} if family.startswith("gemma") else {})}
    model = make_model(family, **wide)
    examples = make_examples()
    batch = make_batch(examples)
    sequences = segment_sequences(batch, examples)
    expected = one_by_one_logps(model, sequences)
    gpu_model = make_model(family, **wide).to("cuda", dtype)
    plain_error = (one_by_one_logps(gpu_model, sequences).cpu() - expected).abs().max().item()
    return gpu_model, batch.to("cuda"), expected, plain_error


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family", ["llama", "gemma3", "gemma2"])
def test_flex_attention_packed_equals_one_by_one(family):
    model, batch, expected, plain_error = gpu_case(family, torch.float32)
    with torch.no_grad():
        out = packed_logps(model, batch, attn_implementation="flex_attention")
    # fp32 on the GPU (TF32 off by default for matmuls): flex differs from eager by rounding only
    torch.testing.assert_close(out.seq_logps.double().cpu(), expected, rtol=0, atol=max(1e-3, 4 * plain_error))


@pytest.mark.gpu
@needs_cuda
@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None, reason="needs the flash_attn package")
@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
def test_flash_attention_packed_equals_one_by_one(family):
    model, batch, expected, plain_error = gpu_case(family, torch.bfloat16)
    with torch.no_grad():
        out = packed_logps(model, batch, attn_implementation="flash_attention_2")
    # bf16: the tolerance is a small multiple of what plain eager attention in bf16 gets wrong on each sequence alone;
    # leaking context (what this guards against) moves sums by far more
    torch.testing.assert_close(out.seq_logps.double().cpu(), expected, rtol=0, atol=4 * plain_error + 1e-2)
