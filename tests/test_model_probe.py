"""fastdpo.model.probe: what fastdpo assumes of a model, checked once on a probe of a few tokens against the model's
own forward. Models found by a sweep of transformers' causal LMs (every type it could build tiny: 115 matched
one-by-one log-probs): three were trained on other log-probs than their own without a word (ELECTRA 9 nats apart,
XLNet's default bidirectional attention 2.2, CPM-Ant 0.2 to 11). And what the sweep found said unclearly: a model
class without gradient checkpointing (the configs' default), a head of the model's own kind."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers
from test_model_packed import make_batch, make_examples, make_model, one_by_one_logps, segment_sequences

from fastdpo.errors import ConfigError
from fastdpo.model import head_spec, packed_logps
from fastdpo.model.probe import check_head

TINY = {"vocab_size": 160, "initializer_range": 0.2, "pad_token_id": 0}


def electra(embedding_size: int = 32):
    config = transformers.ElectraConfig(**TINY, embedding_size=embedding_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                                        is_decoder=True, hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0)  # fmt: skip
    return transformers.ElectraForCausalLM(config)


def xlnet(attn_type: str):
    config = transformers.XLNetConfig(**TINY, d_model=32, n_layer=2, n_head=4, d_inner=64, dropout=0.0,
                                      attn_type=attn_type)  # fmt: skip
    return transformers.XLNetLMHeadModel(config)


def cpmant():
    config = transformers.CpmAntConfig(vocab_size=160, hidden_size=32, dim_ff=64, num_hidden_layers=2,
                                       num_attention_heads=4, dim_head=8, prompt_length=4, dropout_p=0.0,
                                       init_std=0.2)  # fmt: skip
    return transformers.CpmAntForCausalLM(config)


def logps(model, batch=None):
    with warnings.catch_warnings():  # (the bodies here run unpacked, said in a warning: test_model_packed's)
        warnings.filterwarnings("ignore", message=".*alone in a padded row")
        return packed_logps(model, make_batch(make_examples()) if batch is None else batch, impl="torch")


def test_a_transform_before_the_head_is_refused():
    # ElectraForCausalLM's forward runs generator_predictions (dense, GELU, LayerNorm) before generator_lm_head, the
    # head get_output_embeddings() gives; with embedding_size < hidden_size the head took features the body never
    # gave (a ValueError from inside the ops: "weight: has H=128 but hidden has H=32")
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="ElectraForCausalLM's own log-probs differ from those of its LM head on its"):
        logps(electra().eval())
    torch.manual_seed(0)
    with pytest.raises(ConfigError, match="hidden states of 32 features and its LM head takes 16: its forward"):
        logps(electra(embedding_size=16).eval())


def test_a_transform_of_the_logits_the_head_rules_do_not_know_is_refused():
    class ScaledLlama(transformers.LlamaForCausalLM):  # (a remote-code model's own logit scale, no config key)
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 1.5
            return out

    model = make_model("llama")
    scaled = ScaledLlama(model.config)
    scaled.load_state_dict(model.state_dict())
    with pytest.raises(ConfigError, match="ScaledLlama's own log-probs differ"):
        logps(scaled)
    logps(model)  # the same weights, unscaled: fine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_shift_of_one_logit_after_the_head_is_refused_in_half_precision_too(dtype):
    # largest logit ~30, as a trained model's: bf16's tolerance was 8 units of the last place of it (1.85 nats here),
    # which let a 1-nat shift through; 4 units (0.93); a family fastdpo knows (MiniCPM3, which divides the states
    # where fastdpo divides the logits) came to 1.04 units on tiny models
    class Shifted(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits[..., 7] += 1.0
            return out

    torch.manual_seed(0)
    base = make_model("llama", initializer_range=0.02)
    with torch.no_grad():
        base.lm_head.weight.mul_(80.0)
    shifted = Shifted(base.config)
    shifted.load_state_dict(base.state_dict())
    with pytest.raises(ConfigError, match="Shifted's own log-probs differ"):
        check_head(shifted.to(dtype))
    check_head(base.to(dtype))  # (the same weights without the shift)
    assert base._fastdpo_head_checked


@pytest.mark.parametrize("make", [lambda: xlnet("bi"), cpmant], ids=["xlnet_bidirectional", "cpmant"])
def test_a_body_that_reads_the_padding_after_a_sequence_is_refused(make):
    # run alone in a row padded at its end (their masks ignore position_ids): XLNet's bidirectional attention reads
    # the padding, CPM-Ant's masks take it for the start of the row
    torch.manual_seed(0)
    model = make().eval()
    with pytest.raises(ConfigError, match="hidden states of a sequence change when padding follows it"):
        logps(model)


def test_padding_read_beside_one_large_state_the_head_does_not_read_is_refused():
    # the change was measured against the largest state: one feature of 100 the head ignores (trained models' states
    # hold such) hid XLNet's bidirectional attention, its log-probs 2.6 nats off; the head's log-probs show it
    torch.manual_seed(0)
    model = xlnet("bi").eval()
    with torch.no_grad():
        model.transformer.layer[-1].ff.layer_norm.weight[0] = 0.0
        model.transformer.layer[-1].ff.layer_norm.bias[0] = 100.0
        model.lm_loss.weight[:, 0] = 0.0
    with pytest.raises(ConfigError, match="change when padding follows it"):
        logps(model)


def test_a_causal_body_run_unpacked_passes_and_matches_its_own_forward():
    # XLNet with attn_type="uni" attends causally: padded at the end, its log-probs are its own (the sweep: 3e-6)
    torch.manual_seed(0)
    model = xlnet("uni").eval()
    examples = make_examples()
    batch = make_batch(examples)
    out = logps(model, batch)
    # fp32 forwards, each sequence in a row of its own against the padded rows: ~1e-6; reading the padding moved
    # them by more than 0.1
    expected = one_by_one_logps(model, segment_sequences(batch, examples))
    torch.testing.assert_close(out.seq_logps.double(), expected, rtol=0, atol=1e-4)
    assert model._fastdpo_head_checked and model.transformer._fastdpo_padding_checked


def test_the_probe_runs_once_and_leaves_the_training_flags_as_they_were(monkeypatch):
    from fastdpo.model import probe

    model, batch = make_model("llama"), make_batch(make_examples())
    model.train()
    model.model.layers[0].eval()  # (a frozen part a user set to eval: left so)
    checks = []
    monkeypatch.setattr(probe, "_apart", lambda own, ours: checks.append(1) or 0.0)
    packed_logps(model, batch, impl="torch")
    packed_logps(model, batch, impl="torch")
    assert len(checks) == 1
    assert model.training and model.model.training and not model.model.layers[0].training
    assert model.model.layers[1].training


def test_checkpointing_on_for_a_model_without_it_is_refused_naming_the_option(tmp_path):
    # the configs' default (TRL's too); transformers' ValueError ("CTRLLMHeadModel does not support activation
    # checkpointing") came from inside the trainer's set-up and named no option
    import datasets
    from tiny_tokenizer import build_tiny_tokenizer

    from fastdpo.train import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    tokenizer = build_tiny_tokenizer()
    config = transformers.CTRLConfig(vocab_size=len(tokenizer), n_embd=32, dff=64, n_layer=2, n_head=4,
                                     n_positions=128, resid_pdrop=0.0, embd_pdrop=0.0)  # fmt: skip
    pairs = datasets.Dataset.from_list([{"prompt": "Q?", "chosen": " yes", "rejected": " no"}] * 4)
    common = {"per_device_train_batch_size": 2, "max_steps": 1, "report_to": [], "save_strategy": "no", "bf16": False}
    completions = pairs.rename_column("chosen", "completion")
    for trainer_cls, config_cls, data in ((DPOTrainer, DPOConfig, pairs), (SFTTrainer, SFTConfig, completions)):
        args = config_cls(output_dir=str(tmp_path / config_cls.__name__), **common)
        with pytest.raises(ConfigError, match="gradient_checkpointing.*CTRLLMHeadModel does not support it.*=False"):
            trainer_cls(transformers.CTRLLMHeadModel(config), args=args, train_dataset=data, processing_class=tokenizer)
        args = config_cls(output_dir=str(tmp_path / config_cls.__name__), gradient_checkpointing=False, **common)
        trainer = trainer_cls(transformers.CTRLLMHeadModel(config), args=args, train_dataset=data,
                              processing_class=tokenizer)  # fmt: skip
        trainer.train()
        assert trainer.state.global_step == 1


def test_a_compiled_model_is_probed_through_its_wrapper_and_the_probe_calls_no_train_or_eval():
    # torch.compile's wrapper has no forward of its own (the probe's class forward failed: "_forward_unimplemented()
    # got an unexpected keyword argument 'input_ids'") and its class name matched no head rule (a compiled Gemma-2
    # was refused for its soft-cap); the probe set eval mode by model.eval(), which a model's own train() may act on
    # (use_kernels swaps its kernels for inference): the flags alone now
    calls = []

    class Watched(transformers.LlamaForCausalLM):
        def train(self, mode: bool = True):
            calls.append(mode)
            return super().train(mode)

    model = make_model("llama")
    watched = Watched(model.config)
    watched.load_state_dict(model.state_dict())
    watched.train()
    calls.clear()
    compiled = torch.compile(watched)
    logps(compiled)
    assert watched._fastdpo_head_checked and calls == [] and watched.training
    gemma = torch.compile(make_model("gemma2"))
    assert head_spec(gemma).softcap == 3.0
    logps(gemma)


def test_a_quantized_head_is_told_not_to_quantize_it_and_a_models_own_head_to_use_trl():
    from torch.ao.quantization import quantize_dynamic
    from transformers.integrations.bitnet import AutoBitLinear

    model = make_model("llama")
    model.lm_head = AutoBitLinear(32, 160, bias=False)  # (transformers' own quantized layers: its integrations)
    with pytest.raises(ConfigError, match="AutoBitLinear .* not a plain nn.Linear .* do not quantize it"):
        head_spec(model)
    model = make_model("llama")  # (torch.ao's dynamic quantization: its weight is a method; the error failed on it)
    model.lm_head = quantize_dynamic(torch.nn.Sequential(model.lm_head), {torch.nn.Linear}, dtype=torch.qint8)[0]
    with pytest.raises(ConfigError, match="a Linear with weight None, not a plain nn.Linear .* do not quantize it"):
        head_spec(model)
