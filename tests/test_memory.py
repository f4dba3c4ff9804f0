"""Memory: impl="torch" never holds the [N, V] logits (peak RSS of fwd+bwd measured in a fresh process), and
``fastdpo.estimate_memory`` counts what a DPO step holds: by hand, against real models, against autograd's saved
tensors, and against a measured peak."""

from __future__ import annotations

import importlib.util
import sys
import textwrap

import pytest
import torch

from fastdpo import estimate_memory
from fastdpo.errors import ConfigError
from fastdpo.profiling import peak_rss_supported, run_measured

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from fastdpo import linear_logprobs
    from fastdpo.profiling import peak_rss, reset_peak_rss

    torch.manual_seed(0)
    n, h, v, impl = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) * 0.05).requires_grad_()
    targets = torch.randint(0, v, (n,))
    upstream = torch.randn(n)
    # warm-up: the same code path on a few tokens, so lazy initialisation is not counted
    linear_logprobs(hidden[:64], weight, targets[:64], impl=impl).logp.sum().backward()
    hidden.grad = weight.grad = None
    base = reset_peak_rss()
    out = linear_logprobs(hidden, weight, targets, impl=impl)
    (out.logp * upstream).sum().backward()
    peak = peak_rss()
    kept = out.logp.nbytes + hidden.grad.nbytes + weight.grad.nbytes
    print(json.dumps({"extra_bytes": peak - base - kept, "kept_bytes": kept}))
    """
)


def measure(n: int, h: int, v: int, impl: str) -> dict:
    return run_measured([sys.executable, "-c", SCRIPT, str(n), str(h), str(v), impl])


@pytest.mark.slow
@pytest.mark.skipif(not peak_rss_supported(), reason="needs Linux /proc/self/clear_refs")
def test_torch_impl_peak_memory_is_independent_of_full_logits():
    # Full fp32 logits here would be 16384 x 32000 x 4 B = 2 GiB (and autograd keeps about two copies).
    # The chunked impl holds one 64 MiB chunk of logits (plus a same-size scratch) at a time.
    result = measure(16384, 256, 32000, "torch")
    assert result["extra_bytes"] < 400 * 2**20, result


@pytest.mark.slow
@pytest.mark.skipif(not peak_rss_supported(), reason="needs Linux /proc/self/clear_refs")
def test_the_full_logits_baseline_holds_what_a_plain_head_holds():
    # impl="naive" is the benchmarks' full-logits baseline: a plain head (logits, log-softmax, its gradient: about 3
    # [N, V] fp32 buffers at the peak). It multiplied by a scale and divided by a temperature of 1.0 and kept an
    # unused exp: 4 buffers (3961 MiB where a plain head takes 2961), and 1.45x the time
    logits = 4096 * 8000 * 4
    result = measure(4096, 64, 8000, "naive")
    assert result["extra_bytes"] < 3.5 * logits, result["extra_bytes"] / logits


# ---------------------------------------------------------------------------------------------------------------------
# fastdpo.estimate_memory
# ---------------------------------------------------------------------------------------------------------------------

# Parameter totals of the published checkpoints (the safetensors metadata on the hub), not computed by fastdpo.
PUBLISHED_PARAMS = {"llama-3.2-1b": 1_235_814_400, "llama-3-8b": 8_030_261_248, "qwen2.5-7b": 7_615_616_512}
TINY = {"vocab_size": 211, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2}  # fmt: skip


def tiny_model(kind: str = "llama", **extra):
    import transformers

    torch.manual_seed(0)
    config_class = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                    "qwen3": transformers.Qwen3Config}[kind]  # fmt: skip
    config = config_class(**TINY, attn_implementation="sdpa", **extra)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
def test_presets_have_the_published_parameter_counts(name):
    estimate = estimate_memory(name, 1024)
    assert estimate.params == PUBLISHED_PARAMS[name]
    # hub names map to the same preset, without a download
    hub = {"llama-3.2-1b": "meta-llama/Llama-3.2-1B", "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
           "qwen2.5-7b": "Qwen/Qwen2.5-7B"}[name]  # fmt: skip
    assert estimate_memory(hub, 1024).params == PUBLISHED_PARAMS[name]


SHAPES = [("llama", {}), ("llama", {"tie_word_embeddings": True}), ("qwen2", {"tie_word_embeddings": False}),
          ("qwen3", {"head_dim": 16})]  # fmt: skip


@pytest.mark.parametrize(("kind", "extra"), SHAPES)
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_weights_are_the_bytes_of_the_model(kind, extra, precision):
    model = tiny_model(kind, **extra).to({"fp32": torch.float32, "bf16": torch.bfloat16}[precision])
    nbytes = sum(p.nbytes for p in model.parameters())  # tied weights are one parameter: counted once
    for config_or_name in (model.config, model.config.to_dict(), model):
        estimate = estimate_memory(config_or_name, 512, precision=precision, reference="cached")
        assert estimate.params == sum(p.numel() for p in model.parameters())
        assert estimate.weights == nbytes
    separate = estimate_memory(model.config, 512, precision=precision, reference="separate")
    assert separate.reference >= nbytes  # a second copy (plus its pass when that is the peak)
    assert separate.phases["optimizer step"]["reference"] == nbytes


def test_config_read_from_a_local_folder(tmp_path):
    model = tiny_model()
    model.config.save_pretrained(tmp_path)
    assert estimate_memory(str(tmp_path), 512).params == sum(p.numel() for p in model.parameters())


def test_optimizer_state_and_gradients_per_trainable_parameter():
    params = PUBLISHED_PARAMS["llama-3-8b"]
    fp32 = estimate_memory("llama-3-8b", 4096, precision="fp32", reference="cached")
    # AdamW: exp_avg and exp_avg_sq, each the size of the parameter (torch keeps them in the parameter's dtype)
    assert fp32.optimizer == 2 * 4 * params
    assert fp32.phases["optimizer step"]["gradients"] == 4 * params
    bf16 = estimate_memory("llama-3-8b", 4096, precision="bf16", reference="cached")
    assert bf16.optimizer == 2 * 2 * params
    assert estimate_memory("llama-3-8b", 4096, optimizer="sgd").optimizer == 0
    eight_bit = estimate_memory("llama-3-8b", 4096, optimizer="adamw_8bit").optimizer
    assert 2 * params < eight_bit < 2.05 * params  # one byte per state, plus a fp32 scale per 256-value block


def test_lora_parameters_by_hand():
    # Llama-3-8B, rank 16: r·(in + out) per adapted linear layer, 32 layers
    # q 4096+4096, k 4096+1024, v 4096+1024, o 4096+4096, gate and up 4096+14336 each, down 14336+4096
    all_linear = 32 * 16 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096) + 3 * (4096 + 14336))
    assert all_linear == 41_943_040
    estimate = estimate_memory("llama-3-8b", 4096, lora={"r": 16}, reference="adapter")
    assert estimate.trainable_params == all_linear
    # adapters are fp32 (PEFT upcasts bf16 ones): fp32 gradients and AdamW states, the frozen base in bf16
    assert estimate.optimizer == 2 * 4 * all_linear
    assert estimate.phases["optimizer step"]["gradients"] == 4 * all_linear
    assert estimate.weights == 2 * PUBLISHED_PARAMS["llama-3-8b"] + 4 * all_linear
    assert estimate.reference == estimate.phases["head forward"]["reference"] == 0
    q_v = estimate_memory("llama-3-8b", 4096, lora={"r": 8, "target_modules": ["q_proj", "v_proj"]},
                          reference="adapter")  # fmt: skip
    assert q_v.trainable_params == 32 * 8 * ((4096 + 4096) + (4096 + 1024))


def test_lora_parameters_as_peft_makes_them():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, target_modules=["q_proj", "down_proj"]))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    lora = {"r": 4, "target_modules": ["q_proj", "down_proj"]}
    assert estimate_memory(model.base_model.model.config, 512, lora=lora, reference="adapter").trainable_params == (
        trainable
    )


def test_the_peak_is_the_largest_phase_and_options_move_it_the_right_way():
    estimate = estimate_memory("llama-3.2-1b", 8192)
    totals = {name: sum(parts.values()) for name, parts in estimate.phases.items()}
    assert estimate.total == max(totals.values()) == totals[estimate.phase]
    assert "peak" in str(estimate) and estimate.phase in estimate.table()
    assert estimate.fits(80) and not estimate.fits(estimate.total / 2**30)
    no_checkpointing = estimate_memory("llama-3.2-1b", 8192, gradient_checkpointing=False)
    assert no_checkpointing.total > estimate.total
    assert estimate_memory("llama-3.2-1b", 16384).total > estimate.total
    assert estimate_memory("llama-3.2-1b", 8192, reference="cached").total < estimate.total
    lora = estimate_memory("llama-3.2-1b", 8192, lora={"r": 16}, reference="adapter")
    assert lora.total < estimate.total


def test_offloading_options_move_what_they_move():
    base = estimate_memory("llama-3-8b", 16384, gradient_checkpointing=False)
    weights = base.params * 2  # bf16
    # ref_offload: the reference's weights leave every phase but its own pass, where they come back
    moved = estimate_memory("llama-3-8b", 16384, gradient_checkpointing=False, ref_offload=True)
    for name, parts in moved.phases.items():
        expected = base.phases[name]["reference"] - (0 if name == "reference forward" else weights)
        assert parts["reference"] == expected, name
    # activation offloading: nothing saved on the device while the head runs; the last layer's saved tensors
    # (without checkpointing, one layer's) come back for its backward
    offloaded = estimate_memory("llama-3-8b", 16384, gradient_checkpointing=False, activation_offloading=True)
    assert offloaded.phases["head forward"]["activations"] == 0
    saved = base.phases["head forward"]["activations"]
    assert 0 < offloaded.phases["last layer backward"]["activations"] < saved / 8  # one of 32 layers, plus its input
    assert offloaded.total < 0.6 * base.total  # without checkpointing, saved activations dominate this shape


@pytest.mark.parametrize(
    ("bad", "column"),
    [({"reference": "copy"}, "reference"), ({"precision": "fp16"}, "precision"), ({"optimizer": "adam"}, "optimizer"),
     ({"reference": "adapter"}, "reference"), ({"lora": {"r": 8, "target_modules": ["lm_head"]}}, "lora"),
     ({"lora": {"rank": 8}}, "lora"), ({"reference": "cached", "ref_offload": True}, "ref_offload"),
     ({"quantization": "4bit"}, "quantization"), ({"quantization": "3bit", "lora": {"r": 8}}, "quantization")],
)  # fmt: skip
def test_bad_options_raise_config_errors(bad, column):
    with pytest.raises(ConfigError) as error:
        estimate_memory("llama-3-8b", 1024, **bad)
    assert error.value.column == column


def test_mixture_of_experts_is_refused():
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        estimate_memory({**TINY, "num_local_experts": 4}, 512)


def saved_bytes(model, batch, *, lean: bool = False) -> int:
    """Bytes of the tensors autograd saves in the body's forward, each storage once, parameters excluded."""
    from fastdpo.model import packed_body
    from fastdpo.model.lean import use_lean_layers

    with use_lean_layers([model] * lean):
        return bytes_saved_by(lambda: packed_body(model, batch), alive=list(model.parameters()))


def bytes_saved_by(run, alive) -> int:
    """Bytes of the distinct storages autograd saves while ``run()`` runs, those of the tensors ``alive`` left out."""
    kept = {t.untyped_storage().data_ptr() for t in alive}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in kept:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        run()
    return sum(storages.values())


@pytest.mark.parametrize("lean", [False, True], ids=["own", "lean_activations"])
@pytest.mark.parametrize("lora", [None, "all-linear", ("q_proj", "v_proj")], ids=["full", "lora", "lora_qv"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_activations_are_what_autograd_saves(precision, lora, lean):
    from fastdpo.data.packing import pack_pairs

    model = tiny_model().to({"fp32": torch.float32, "bf16": torch.bfloat16}[precision])
    options = {"lora": None, "reference": "separate"}
    if lora:
        peft = pytest.importorskip("peft")
        targets = lora if isinstance(lora, str) else list(lora)  # q/v only: the MLPs stay plain (lean switches them)
        model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=targets))
        options = {"lora": {"r": 4, "target_modules": targets}, "reference": "adapter"}
    gen = torch.Generator().manual_seed(0)
    pairs = [{"prompt_ids": torch.randint(3, 211, (16,), generator=gen).tolist(),
              "chosen_ids": torch.randint(3, 211, (48,), generator=gen).tolist(),
              "rejected_ids": torch.randint(3, 211, (48,), generator=gen).tolist()} for _ in range(4)]  # fmt: skip
    # 4 rows of two 64-token sequences: packed rows get the block mask (a row of one sequence would not)
    batch = pack_pairs(pairs, pack_length=128, split_pairs=True)
    assert batch.input_ids.shape == (4, 128)
    counted = saved_bytes(model, batch, lean=lean)
    estimate = estimate_memory(TINY, 512, precision=precision, gradient_checkpointing=False, max_length=128,
                               device="cpu", lean_activations=lean, **options)  # fmt: skip
    # Counted tensor by tensor from the same code, so only a few bytes of bookkeeping may differ: 1%
    assert estimate.phases["head forward"]["activations"] == pytest.approx(counted, rel=0.01)


@pytest.mark.slow
@pytest.mark.skipif(not peak_rss_supported(), reason="needs Linux /proc/self/clear_refs")
def test_estimate_within_20_percent_of_a_measured_dpo_step():
    from bench.memory_cpu import CONFIGS, measure

    # One configuration of bench/memory_cpu.py: a 2-layer H=256 Llama (V=32000), a separate reference, gradient
    # checkpointing, 2048 tokens, two AdamW steps. The bench runs 11 such configurations (results in
    # bench/results/AMD_EPYC_2cpu/memory_cpu.md). 20%: the bound for CPU peak RSS, which holds allocator slack,
    # MKL and thread buffers and page rounding the estimate does not count; nothing in the estimate is fitted to this
    # run.
    config = next(c for c in CONFIGS if c["name"] == "S sep ckpt 2k")
    result = measure(config, steps=2, threads=2)
    assert 0.8 < result["estimate_bytes"] / result["peak_bytes"] < 1.2, result


def test_per_sequence_attention_keeps_no_mask_and_no_repeated_keys():
    # varlen runs torch's flash kernel on CUDA: counted as flash; masked sdpa adds the block mask and k/v repeated
    # to every query head (Llama-3.2-1B: 32 query heads on 8 key-value heads)
    sizes = {attention: estimate_memory("llama-3.2-1b", 8192, attention=attention).total
             for attention in ("sdpa", "flash", "varlen")}  # fmt: skip
    assert sizes["varlen"] == sizes["flash"] < sizes["sdpa"]
    with pytest.raises(ConfigError, match="attention"):
        estimate_memory("llama-3.2-1b", 8192, attention="eager")


needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
BNB = {"4bit": {"load_in_4bit": True}, "4bit_nested": {"load_in_4bit": True, "bnb_4bit_use_double_quant": True},
       "8bit": {"load_in_8bit": True}}  # fmt: skip


def quantized_tiny_model(tmp_path, quantization: str):
    """TINY in bf16, loaded as bitsandbytes quantizes it (on a CPU: the same storage as on a GPU)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_model().to(torch.bfloat16).save_pretrained(tmp_path)
    config = BitsAndBytesConfig(**BNB[quantization], bnb_4bit_compute_dtype=torch.bfloat16)
    return AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, dtype=torch.bfloat16)


@needs_bnb
@pytest.mark.parametrize("quantization", list(BNB))
def test_quantized_weights_are_the_bytes_bitsandbytes_keeps(tmp_path, quantization):
    model = quantized_tiny_model(tmp_path, quantization)
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        state = getattr(weight, "quant_state", None)
        # per weight: the 4-bit absmax (8-bit when nested, with its own fp32 absmax and offset), the 8-bit row
        # scales; not counted: the per-layer code tables (16 values; 256 more when nested)
        extra = [getattr(weight, "SCB", None)]
        if state is not None:
            extra += [state.absmax, state.offset] + ([state.state2.absmax] if state.nested else [])
        storages.update({t.untyped_storage().data_ptr(): t.nbytes for t in extra if t is not None})
    lora = {"r": 4, "target_modules": "all-linear"}
    estimate = estimate_memory(TINY, 512, precision="bf16", lora=lora, reference="adapter", quantization=quantization)
    adapters = estimate.trainable_params * 2  # bf16
    assert estimate.weights - adapters == sum(storages.values())
    unquantized = estimate_memory(TINY, 512, precision="bf16", lora=lora, reference="adapter").weights
    assert estimate.weights < unquantized


@needs_bnb
@pytest.mark.parametrize("lean", [False, True], ids=["own", "lean_activations"])  # lean: the norms only (4-bit MLPs)
@pytest.mark.parametrize("targets", ["all-linear", ("q_proj", "v_proj")], ids=["lora", "lora_qv"])
def test_qlora_activations_are_what_autograd_saves(tmp_path, targets, lean):
    from fastdpo.data.packing import pack_pairs
    from fastdpo.model.adapters import prepare_quantized_training

    peft = pytest.importorskip("peft")
    targets = targets if isinstance(targets, str) else list(targets)
    model = peft.get_peft_model(quantized_tiny_model(tmp_path, "4bit"), peft.LoraConfig(r=4, target_modules=targets))
    prepare_quantized_training(model)  # as the trainers set QLoRA up
    gen = torch.Generator().manual_seed(0)
    pairs = [{"prompt_ids": torch.randint(3, 211, (16,), generator=gen).tolist(),
              "chosen_ids": torch.randint(3, 211, (48,), generator=gen).tolist(),
              "rejected_ids": torch.randint(3, 211, (48,), generator=gen).tolist()} for _ in range(4)]  # fmt: skip
    batch = pack_pairs(pairs, pack_length=128, split_pairs=True)
    counted = saved_bytes(model, batch, lean=lean)
    estimate = estimate_memory(TINY, 512, precision="bf16", gradient_checkpointing=False, max_length=128,
                               device="cpu", lora={"r": 4, "target_modules": targets}, reference="adapter",
                               quantization="4bit", lean_activations=lean)  # fmt: skip
    # as test_activations_are_what_autograd_saves: counted from the same code, 1% for bookkeeping
    assert estimate.phases["head forward"]["activations"] == pytest.approx(counted, rel=0.01)
