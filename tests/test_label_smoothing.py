"""Label smoothing without the logits (``fastdpo.ops.label_smoothing``, ``sft_step(label_smoothing=...)``): against
full logits in fp64, and transformers' own ``LabelSmoother`` on a padded batch."""

from __future__ import annotations

import pytest
import torch
from test_train_sft import padded, random_examples
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.trainer_pt_utils import LabelSmoother

from fastdpo.data.packing import pack_sft
from fastdpo.errors import ConfigError
from fastdpo.ops import label_smoothing as smoothing
from fastdpo.ops.label_smoothing import target_logit_gap
from fastdpo.train import sft_step


def naive_gap(hidden, weight, targets, bias, scale):
    logits = (hidden @ weight.T + (0 if bias is None else bias)) * scale
    gap = logits.gather(-1, targets.clamp(min=0)[:, None]).squeeze(-1) - logits.mean(-1)
    return torch.where(targets != -100, gap, 0.0)


@pytest.mark.parametrize("with_bias", [False, True])
def test_gap_and_its_gradients_equal_full_logits_in_fp64(monkeypatch, with_bias):
    monkeypatch.setattr(smoothing, "TOKENS_PER_CHUNK", 8)  # 37 tokens: 5 chunks, the last one short
    gen = torch.Generator().manual_seed(0)
    tokens, hidden_size, vocab = 37, 13, 29
    hidden = torch.randn(tokens, hidden_size, dtype=torch.float64, generator=gen, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64, generator=gen, requires_grad=True)
    bias = torch.randn(vocab, dtype=torch.float64, generator=gen, requires_grad=True) if with_bias else None
    targets = torch.randint(0, 6, (tokens,), generator=gen)  # few distinct rows, each repeated
    targets[::5] = -100
    upstream = torch.randn(tokens, dtype=torch.float64, generator=gen)
    inputs = [hidden, weight, *([bias] if with_bias else [])]
    got = target_logit_gap(hidden, weight, targets, bias=bias, logit_scale=0.7)
    want = naive_gap(hidden, weight, targets, bias, 0.7)
    # fp64 both ways, products summed in another order: ~1e-15
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert bool((got[::5] == 0).all())
    for g, w in zip(
        torch.autograd.grad(got, inputs, upstream), torch.autograd.grad(want, inputs, upstream), strict=True
    ):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_gradients_keep_the_inputs_dtypes():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(9, 8, generator=gen).half().requires_grad_()
    weight = torch.randn(17, 8, generator=gen).requires_grad_()  # fp32 weight under fp16 hidden, as autocast leaves it
    gap = target_logit_gap(hidden, weight, torch.randint(0, 17, (9,), generator=gen))
    gap.sum().backward()
    assert gap.dtype == torch.float32 and hidden.grad.dtype == torch.float16 and weight.grad.dtype == torch.float32


def label_smoother_loss(model, examples, epsilon):
    """transformers' LabelSmoother on a padded batch with full logits (TRL 1.16's SFT loss with label smoothing)."""
    ids, labels, mask = padded(examples)
    outputs = model(input_ids=ids, attention_mask=mask)
    return LabelSmoother(epsilon=epsilon)(outputs, labels, shift_labels=True)


@pytest.mark.parametrize("tied", [True, False])
def test_sft_step_with_label_smoothing_equals_transformers_label_smoother(tied):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa",
                         tie_word_embeddings=tied)  # fmt: skip
    model = LlamaForCausalLM(config).double()
    examples = random_examples(6, seed=4)
    expected = label_smoother_loss(model, examples, 0.1)
    expected_grads = torch.autograd.grad(expected, list(model.parameters()))
    batch = pack_sft(examples, pack_length=16, backend="python")
    out = sft_step(model, batch, head_impl="torch", label_smoothing=0.1)
    got_grads = torch.autograd.grad(out.loss, list(model.parameters()))
    # fp64 both ways (packed against padded attention, the fused head and the rows against full logits), except that
    # LabelSmoother sums each token's V log-probs in fp32 (its `dtype=torch.float32`): ~1e-8 relative on the loss;
    # that sum's gradient is all ones, exact, so the gradients agree as in fp64
    torch.testing.assert_close(out.loss, expected, rtol=1e-7, atol=1e-12)
    for (name, _), g, e in zip(model.named_parameters(), got_grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-7, atol=1e-10, msg=name)
    plain = sft_step(model, batch, head_impl="torch").loss.detach()
    # smoothing changed the loss: by ~1e-3 only (an untrained model is near uniform), yet 200x the loss's tolerance
    assert abs(float(out.loss.detach()) - float(plain)) > 1e-4


def test_label_smoothing_is_refused_where_it_cannot_apply():
    from fastdpo.train.sft_config import check_label_smoothing

    refused = [(1.0, "nll", None, r"\[0, 1\)"), (-0.1, "nll", None, r"\[0, 1\)"), (0.1, "dft", None, "'nll' only"),
               (0.1, "nll", 30.0, "soft-capped")]  # fmt: skip
    for factor, loss_type, softcap, match in refused:
        with pytest.raises(ConfigError, match=match) as info:
            check_label_smoothing(factor, loss_type, softcap)
        assert info.value.column == "label_smoothing_factor"
    check_label_smoothing(0.0, "dft", 30.0)  # off: nothing to check


def test_the_soft_cap_is_read_from_the_class_and_config_alone():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from fastdpo.model.packed import head_softcap

    small = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
             "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8}  # fmt: skip
    assert head_softcap(Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=30.0))) == 30.0
    assert head_softcap(Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=None))) is None
    assert head_softcap(LlamaForCausalLM(LlamaConfig(**small))) is None


def test_gap_refuses_ids_outside_the_vocabulary_and_keeps_the_bias_dtype():
    # a negative id other than ignore_index read a row from the end without a word; an fp32 bias beside an fp16 head
    # got its gradient rounded to fp16
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(4, 8, generator=gen, requires_grad=True)
    weight = torch.randn(11, 8, generator=gen)
    for bad in (-3, 11):
        with pytest.raises(ValueError, match=rf"^targets: token id {bad} is outside the vocabulary \[0, 11\)"):
            target_logit_gap(hidden, weight, torch.tensor([0, bad, 2, -100]))
    half, bias = weight.half(), torch.randn(11, generator=gen, requires_grad=True)
    targets = torch.tensor([0, 5, 5, -100])
    target_logit_gap(hidden.half(), half, targets, bias=bias).sum().backward()
    # d gap / d bias = onehot counts − valid tokens / V, exactly: 2 − 3/11 for id 5, 1 − 3/11 for 0, −3/11 elsewhere
    want = torch.full((11,), -3 / 11, dtype=torch.float64)
    want[0] += 1
    want[5] += 2
    assert bias.grad.dtype == torch.float32
    torch.testing.assert_close(bias.grad.double(), want, rtol=0, atol=1e-7)  # fp32 of the exact values (fp16: 1e-3)


def test_a_second_derivative_of_the_gap_is_refused():
    hidden = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    gap = target_logit_gap(hidden, torch.randn(7, 5, dtype=torch.float64), torch.tensor([1, 2, 3]))
    with pytest.raises(RuntimeError, match=r"^target_logit_gap: a second derivative"):
        torch.autograd.grad(gap.sum(), hidden, create_graph=True)
