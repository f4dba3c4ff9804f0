"""Models whose packed rows would not keep sequences apart by the attention mask alone: layers with state along the
row (Mamba, gated-delta and linear attention, short convolutions: Qwen3.5, Qwen3-Next, LFM2, Jamba, Falcon-H1),
attention that bypasses transformers' functions, sliding windows the config sets, bodies fastdpo cannot find.
Each runs each sequence alone, or is refused with the fix; none gives other numbers silently (they did)."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from test_model_packed import COMMON, make_batch, make_examples, one_by_one_logps, segment_sequences

from fastdpo.errors import ConfigError
from fastdpo.model import packed_logps

STATEFUL = {  # model_type: settings of 2-layer models, one layer of each kind
    "lfm2": {"layer_types": ["conv", "full_attention"]},
    "qwen3_5_text": {"layer_types": ["linear_attention", "full_attention"], "head_dim": 8, "linear_num_value_heads": 2,
                     "linear_num_key_heads": 2, "linear_key_head_dim": 8, "linear_value_head_dim": 8},
    "mamba": {"state_size": 4, "expand": 2, "conv_kernel": 4, "use_mambapy": False},
}  # fmt: skip


def build(model_type: str, **settings) -> torch.nn.Module:
    config = transformers.AutoConfig.for_model(model_type, **{**COMMON, **settings})
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config).float().eval()


@pytest.fixture(scope="module")
def case():
    examples = make_examples()
    batch = make_batch(examples)
    return batch, segment_sequences(batch, examples)


@pytest.mark.parametrize("model_type", list(STATEFUL))
def test_layers_with_state_along_the_row_run_each_sequence_alone_or_refuse_varlen(model_type, case):
    # the state of one packed sequence ran into the next of its row: Qwen3.5 -32.87 where the sequence alone gives
    # -37.10, on the default eager/sdpa path, silently (and in TRL's drop-in: logps/rejected -65.29 vs TRL's -65.17)
    batch, sequences = case
    model = build(model_type, **STATEFUL[model_type])
    expected = one_by_one_logps(model, sequences)
    for backend in ("eager", "sdpa") if model.config.model_type != "mamba" else ("eager",):  # (Mamba: no sdpa)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = packed_logps(model, batch, impl="torch", attn_implementation=backend).seq_logps.double()
        # fp32 tiny models: each sequence alone through the model either way, ~1e-6 apart
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-4)
        said = [str(w.message) for w in caught if "has recurrent or convolution layers" in str(w.message)]
        assert len(said) == (backend == "eager"), said  # said once: the verdict is kept on the body
    with pytest.raises(ConfigError, match=r"option 'packed_attention': \w+ has recurrent or convolution layers, whose "
                       r"state runs along a row: .* use packed_attention='model'"):  # fmt: skip
        packed_logps(model, batch, impl="torch", attn_implementation="fastdpo_varlen")


def test_varlen_refuses_what_it_would_not_compute(case, monkeypatch):
    batch, _ = case
    # a sliding window the config sets but the attention does not pass on (Qwen2-MoE, PhiMoE): varlen ignored it
    qwen_moe = build("qwen2_moe", use_sliding_window=True, sliding_window=6, num_experts=4, num_experts_per_tok=2,
                     moe_intermediate_size=16, shared_expert_intermediate_size=16)  # fmt: skip
    with pytest.raises(ConfigError, match=r"Qwen2MoeForCausalLM's config sets a sliding window of 6 tokens, which "
                       r"fastdpo_varlen does not implement"):  # fmt: skip
        packed_logps(qwen_moe, batch, impl="torch", attn_implementation="fastdpo_varlen")
    # a model that cannot switch: the fix was "load it with attn_implementation='fastdpo_varlen'", which ran with
    # its own attention over whole rows (Bloom 3.0 off); loaded so, it is refused now too
    config = transformers.BloomConfig(**COMMON)
    with pytest.raises(ConfigError, match=r"cannot switch attention from 'eager' at run time — use "
                       r"packed_attention='model'"):  # fmt: skip
        packed_logps(transformers.BloomForCausalLM(config), batch, impl="torch", attn_implementation="fastdpo_varlen")
    loaded = transformers.BloomForCausalLM._from_config(config, attn_implementation="fastdpo_varlen")
    with pytest.raises(ConfigError, match=r"BloomForCausalLM does not declare transformers' attention interface"):
        packed_logps(loaded, batch, impl="torch")
    # a class that does not declare the interface: BART's decoder calls varlen with the offsets, but embeds positions
    # by their place in the row (7.7 off); refused before, and again (a run-time count alone let it through)
    config = transformers.BartConfig(**COMMON, d_model=32, decoder_layers=2, decoder_attention_heads=4,
                                     decoder_ffn_dim=64)  # fmt: skip
    bart = transformers.BartForCausalLM(config)
    with pytest.raises(ConfigError, match=r"BartForCausalLM does not declare transformers' attention interface"):
        packed_logps(bart, batch, impl="torch", attn_implementation="fastdpo_varlen")
    # attention that drops the varlen arguments (Nemotron): named as such, not as "generate() or a plain forward"
    nemotron = build("nemotron", head_dim=8, partial_rotary_factor=0.5)
    with pytest.raises(ConfigError, match=r"NemotronAttention does not pass the packed batch's "
                       r"cu_seq_lens_q/max_length_q on"):  # fmt: skip
        packed_logps(nemotron, batch, impl="torch", attn_implementation="fastdpo_varlen")
    # a forward that never called varlen at all
    llama = build("llama")
    for layer in llama.model.layers:
        monkeypatch.setattr(layer.self_attn, "forward", lambda hidden_states, **kwargs: (hidden_states * 0, None))
    with pytest.raises(ConfigError, match=r"LlamaForCausalLM never called fastdpo_varlen"):
        packed_logps(llama, batch, impl="torch", attn_implementation="fastdpo_varlen")


def test_a_model_whose_get_decoder_is_not_its_body_is_refused(case):
    # Llama4ForCausalLM.get_decoder() is the model itself: it ran the whole forward, logits included, then failed
    # deep inside (AttributeError: no last_hidden_state)
    batch, _ = case
    llama4 = transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(**COMMON, head_dim=8, num_local_experts=2,
                                                                          intermediate_size_mlp=64))  # fmt: skip
    with pytest.raises(ConfigError, match=r"option 'model': Llama4ForCausalLM.get_decoder\(\) gives the whole model"):
        packed_logps(llama4, batch, impl="torch")


def test_a_hybrid_model_takes_trls_steps_and_refuses_varlen_before_training(tmp_path):
    # through the trainers: LFM2's logps/chosen were -63.8458 where TRL's are -63.8367
    from test_train_dpo import assert_first_steps_match, common_args, data, run
    from tiny_tokenizer import build_tiny_tokenizer

    import fastdpo.trl as dropin
    from fastdpo.train import DPOConfig, DPOTrainer

    trl = pytest.importorskip("trl")
    tokenizer = build_tiny_tokenizer()
    pairs = data.__wrapped__()
    settings = {**STATEFUL["lfm2"], "vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
                "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}  # fmt: skip
    build("lfm2", **settings).save_pretrained(tmp_path / "lfm2")
    load = lambda: transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "lfm2", dtype=torch.float32)  # noqa: E731
    theirs = run(trl.DPOTrainer, trl.DPOConfig, load, pairs, tokenizer, tmp_path, "trl")
    for trainer_cls, config_cls in ((DPOTrainer, DPOConfig), (dropin.DPOTrainer, trl.DPOConfig)):
        with pytest.warns(UserWarning, match="has recurrent or convolution layers"):
            ours = run(trainer_cls, config_cls, load, pairs, tokenizer, tmp_path, trainer_cls.__module__)
        assert_first_steps_match(ours, theirs)
    with pytest.raises(ConfigError, match=r"Lfm2ForCausalLM has recurrent or convolution layers"):  # (at init)
        DPOTrainer(load(), args=DPOConfig(**common_args(tmp_path, "varlen"), packed_attention="varlen"),
                   train_dataset=pairs, processing_class=tokenizer)  # fmt: skip
