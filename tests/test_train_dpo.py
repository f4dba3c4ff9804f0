"""DPOTrainer end to end on a tiny Llama, and parity with TRL 1.16's DPOTrainer on the first steps."""

from __future__ import annotations

import importlib
import itertools

import pytest
import torch
from test_linear_logprobs import emulated_gpu_gemms  # noqa: F401 (a fixture)
from tiny_models import save_tiny_mixtral
from tiny_tokenizer import build_tiny_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from fastdpo.errors import ConfigError
from fastdpo.train import DPOConfig
from fastdpo.train.dpo import DPOTrainer

trl = pytest.importorskip("trl")
FIXTURE = "tests/fixtures/distilabel_orca.jsonl"


def tiny_model(tokenizer, path):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         attn_implementation="sdpa")  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(path)
    return lambda: LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)


def common_args(tmp_path, name):
    return {"output_dir": str(tmp_path / name), "per_device_train_batch_size": 2, "max_steps": 2,
            "learning_rate": 1e-2, "logging_steps": 1, "report_to": [], "bf16": False, "seed": 0,
            "gradient_checkpointing": False, "save_strategy": "no", "max_length": 64, "beta": 0.1}  # fmt: skip


@pytest.fixture(scope="module")
def data():
    import datasets

    from fastdpo.data import prepare_preferences

    datasets.disable_progress_bars()
    # normalized rows (prompt, chosen, rejected strings) so that both trainers read the same columns
    return prepare_preferences(FIXTURE, columns={"prompt": "input"}).select_columns(["prompt", "chosen", "rejected"])


def run(trainer_cls, config_cls, load, data, tokenizer, tmp_path, name, **extra):
    trainer = trainer_cls(model=load(), ref_model=load(), args=config_cls(**{**common_args(tmp_path, name), **extra}),
                          train_dataset=data, processing_class=tokenizer)  # fmt: skip
    trainer.train()
    return [log for log in trainer.state.log_history if "loss" in log]


# every loss type of TRL 1.16's DPOTrainer (ε where the type needs one), f-divergences, and a weighted mix
PLAIN_TYPES = ("sigmoid", "hinge", "ipo", "nca_pair", "bco_pair", "sppo_hard", "aot", "aot_unpaired", "apo_zero",
               "apo_down", "discopop", "sft", "sigmoid_norm")  # fmt: skip
TRL_CASES = {
    **{name: {"loss_type": [name]} for name in PLAIN_TYPES},
    "exo_pair": {"loss_type": ["exo_pair"], "label_smoothing": 1e-3},
    "robust": {"loss_type": ["robust"], "label_smoothing": 0.1},
    "aot_smoothed": {"loss_type": ["aot"], "label_smoothing": 0.1},
    "js_divergence": {"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"},
    "alpha_divergence": {
        "loss_type": ["sigmoid"],
        "f_divergence_type": "alpha_divergence",
        "f_alpha_divergence_coef": 0.3,
    },
    "forward_kl": {"loss_type": ["hinge"], "f_divergence_type": "forward_kl"},
    "mix": {"loss_type": ["sigmoid", "sft", "ipo"], "loss_weights": [0.8, 0.2, 0.5]},
    # LD-DPO and WPO: the plain head path, token weights in both models' sums, pair weights on every loss type
    "ld_alpha": {"loss_type": ["sigmoid"], "ld_alpha": 0.3},
    "wpo": {"loss_type": ["sigmoid"], "use_weighting": True},
    # (not with "sft": TRL 1.16 fails there, multiplying its expanded SFT loss in place by the weights)
    "wpo_ld_mix": {"loss_type": ["sigmoid", "ipo"], "loss_weights": [0.8, 0.5], "use_weighting": True, "ld_alpha": 0.0},
}


@pytest.mark.parametrize("case", TRL_CASES)
def test_first_steps_match_trl(case, data, tmp_path):
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    ours = run(DPOTrainer, DPOConfig, load, data, tokenizer, tmp_path, "ours", **TRL_CASES[case])
    theirs = run(trl.DPOTrainer, trl.DPOConfig, load, data, tokenizer, tmp_path, "trl", **TRL_CASES[case])
    assert_first_steps_match(ours, theirs)
    assert 0 < ours[0]["padding_fraction"] < 1


@pytest.mark.parametrize("options", [{"loss_type": ["ipo"]}, {"loss_type": ["sigmoid_norm"]},
                                     {"loss_type": ["ipo", "sigmoid_norm"], "ld_alpha": 1.0}],
                         ids=["ipo", "sigmoid_norm", "plain_head"])  # fmt: skip
def test_length_normalized_losses_count_a_completions_first_token_as_trl_does(options, data, tmp_path):
    # keep_end at max_length 12 cuts the whole prompt of most pairs away: their sequences begin with a completion
    # token, which no position predicts; TRL's ipo and sigmoid_norm still count it in the length (its unshifted
    # completion mask), so the per-token means differed (grad norm 8/7 TRL's where 7 tokens were predicted)
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    options = {**options, "truncation_mode": "keep_end", "max_length": 12, "per_device_train_batch_size": 4}
    ours = run(DPOTrainer, DPOConfig, load, data, tokenizer, tmp_path, "ours", **options)
    theirs = run(trl.DPOTrainer, trl.DPOConfig, load, data, tokenizer, tmp_path, "trl", **options)
    assert_first_steps_match(ours, theirs)


def test_ld_alpha_with_sft_matches_trl_where_chosen_and_rejected_lengths_differ(tmp_path):
    # LD-DPO weighs the DPO sums, not the SFT term's token mean (TRL's), on pairs where either side is the longer
    import datasets

    dropin = pytest.importorskip("fastdpo.trl")
    rows = [{"prompt": f"Question {i}?", "chosen": " yes" + " and more words" * (1 + i % 4), "rejected": " no."}
            for i in range(8)]  # fmt: skip
    for row in rows[1::2]:
        row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
    data = datasets.Dataset.from_list(rows)
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    options = {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "ld_alpha": 0.2,
               "per_device_train_batch_size": 4}  # fmt: skip
    theirs = run(trl.DPOTrainer, trl.DPOConfig, load, data, tokenizer, tmp_path, "trl", **options)
    ours = run(DPOTrainer, DPOConfig, load, data, tokenizer, tmp_path, "ours", **options)
    assert_first_steps_match(ours, theirs)
    assert_first_steps_match(run(dropin.DPOTrainer, trl.DPOConfig, load, data, tokenizer, tmp_path, "dropin",
                                 **options), theirs)  # fmt: skip
    plain = run(trl.DPOTrainer, trl.DPOConfig, load, data, tokenizer, tmp_path, "plain",
                **{**options, "ld_alpha": None})  # fmt: skip
    for name in ("logps/chosen", "logps/rejected"):  # the data has tails on both sides to weigh
        assert theirs[0][name] != pytest.approx(plain[0][name], rel=1e-3), name


def test_first_steps_match_trl_on_varlen_attention(data, tmp_path):
    # packed_attention="varlen": each sequence attends only to itself, every batch in one row with no padding
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    ours = run(DPOTrainer, DPOConfig, load, data, tokenizer, tmp_path, "ours", packed_attention="varlen")
    theirs = run(trl.DPOTrainer, trl.DPOConfig, load, data, tokenizer, tmp_path, "trl")
    assert_first_steps_match(ours, theirs)
    assert ours[0]["padding_fraction"] == 0


def test_varlen_and_the_models_attention_train_alike_under_gradient_checkpointing(tmp_path, monkeypatch):
    # the attention switch must hold through the backward, where checkpointing recomputes every layer
    from transformers import AttentionInterface

    from fastdpo.model import VARLEN, varlen_attention

    calls = []

    def counted(*args, **kwargs):
        calls.append(torch.is_grad_enabled())
        return varlen_attention(*args, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, VARLEN, counted)
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    data = synthetic_pairs(8)
    common = {"per_device_train_batch_size": 4, "gradient_checkpointing": True}
    varlen_trainer, varlen = train_ours(load, data, tokenizer, tmp_path, "varlen", packed_attention="varlen", **common)
    # 2 steps × 2 layers × (reference forward, policy forward, the policy's recomputation in the backward)
    assert len(calls) == 12 and calls.count(False) == 4
    model_trainer, model = train_ours(load, data, tokenizer, tmp_path, "model", packed_attention="model", **common)
    examples = [varlen_trainer.train_dataset[i] for i in range(4)]
    one_row = varlen_trainer.data_collator(examples)
    assert one_row["input_ids"].shape[0] == 1 and int(one_row["num_padding"]) == 0
    assert model_trainer.data_collator(examples)["input_ids"].shape[0] > 1
    for step in (0, 1):  # fp32: the two attentions sum in different orders (~1e-6 relative)
        for name in ("loss", "grad_norm", "logps/chosen", "logps/rejected", "num_tokens"):
            assert varlen[step][name] == pytest.approx(model[step][name], rel=1e-4), (step, name)
    for trainer in (varlen_trainer, model_trainer):  # switched back after the steps
        assert trainer.model.config._attn_implementation == "sdpa"
        assert trainer.ref_model.config._attn_implementation == "sdpa"


def test_lean_activations_train_as_the_models_own_forwards_under_gradient_checkpointing(tmp_path, monkeypatch):
    # lean_activations: the policy's norms and MLPs keep less; the same steps, and the switch holds through the
    # backward, where checkpointing calls every layer's MLP again
    from fastdpo.model import lean

    calls, real_mlp, real_norm = [], lean._lean_mlp, lean._lean_norm

    def counted(module, x):
        calls.append(torch.is_grad_enabled())
        return real_mlp(module, x)

    norms = []

    def counted_norm(module, forward, fused, hidden, *args, **kwargs):
        norms.append(torch.is_grad_enabled())
        return real_norm(module, forward, fused, hidden, *args, **kwargs)

    monkeypatch.setattr(lean, "_lean_mlp", counted)
    monkeypatch.setattr(lean, "_lean_norm", counted_norm)
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    data = synthetic_pairs(8)
    common = {"per_device_train_batch_size": 4, "gradient_checkpointing": True}
    lean_trainer, lean_logs = train_ours(load, data, tokenizer, tmp_path, "lean", lean_activations=True, **common)
    # 2 steps × 2 layers × (the reference's forward without gradients, the policy's forward, its recomputation in
    # the backward)
    assert len(calls) == 2 * 2 * 3 and sum(calls) == 8
    # norms: 2 steps × (2 layers × 2 norms × (reference, forward, recomputation) + the final norm, reference and
    # policy)
    assert len(norms) == 2 * (2 * 2 * 3 + 2) and sum(norms) == 2 * (2 * 2 * 2 + 1)
    for model in (lean_trainer.model, lean_trainer.ref_model):  # put back after the steps
        assert all("forward" not in vars(m) for m in model.modules())
    _, own = train_ours(load, data, tokenizer, tmp_path, "own", **common)
    for step in (0, 1):  # fp32: the same ops, the first norm's gradient summed in another order (~1e-7 relative)
        for name in ("loss", "grad_norm", "logps/chosen", "logps/rejected"):
            assert lean_logs[step][name] == pytest.approx(own[step][name], rel=1e-5), (step, name)


def test_lean_activations_are_refused_where_parameters_are_resharded():
    import types

    from fastdpo.train.common import check_lean_activations

    fsdp = types.SimpleNamespace(args=types.SimpleNamespace(lean_activations=True), is_fsdp_enabled=True,
                                 is_deepspeed_enabled=False)  # fmt: skip
    with pytest.raises(ConfigError, match="lean_activations.*FSDP"):
        check_lean_activations(fsdp)
    fsdp.args.lean_activations = False
    check_lean_activations(fsdp)  # off: nothing to refuse


def assert_first_steps_match(ours: list[dict], theirs: list[dict]) -> None:
    """Two logged steps of fastdpo and of TRL on the same pairs and weights: the same values up to fp32 rounding."""
    assert len(ours) == len(theirs) == 2
    # step 1: the same pairs through the same weights; step 2: after one identical optimizer step
    for name in ("logps/chosen", "logps/rejected", "entropy", "mean_token_accuracy", "num_tokens", "loss"):
        assert ours[0][name] == pytest.approx(theirs[0][name], rel=1e-4, abs=1e-7), name
    for name in ("logits/chosen", "logits/rejected"):  # means of ~0 over the vocabulary: an absolute bound
        assert ours[0][name] == pytest.approx(theirs[0][name], abs=1e-5), name
    assert ours[1]["num_tokens"] == theirs[1]["num_tokens"]
    for step in (0, 1):  # the gradient norms: the same gradients, before and after the first update
        assert ours[step]["grad_norm"] == pytest.approx(theirs[step]["grad_norm"], rel=1e-4)
    assert ours[1]["loss"] == pytest.approx(theirs[1]["loss"], rel=1e-4, abs=1e-6)
    assert ours[1]["rewards/accuracies"] == theirs[1]["rewards/accuracies"]
    # rewards are β·(π − ρ), differences of fp32 log-prob sums of size |logps| that the two engines round
    # differently (fused head vs full log_softmax): a few ulps of |logps|, times β
    ulp = torch.finfo(torch.float32).eps * max(abs(theirs[1]["logps/chosen"]), abs(theirs[1]["logps/rejected"]))
    for name in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert ours[1][name] == pytest.approx(theirs[1][name], rel=1e-4, abs=4 * 0.1 * ulp), name


def test_unsupported_arguments_are_refused(tmp_path):

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    args = DPOConfig(**common_args(tmp_path, "x"))
    with pytest.raises(ConfigError, match="peft_config"):
        DPOTrainer(load(), args=args, train_dataset=None, processing_class=tokenizer, peft_config={"r": 8})
    with pytest.raises(ConfigError, match="option 'model': there is no folder"):
        DPOTrainer(str(tmp_path / "no-such-model"), args=args, processing_class=tokenizer)


def synthetic_pairs(count: int, seed: int = 0):
    import random

    import datasets

    rng = random.Random(seed)
    words = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "blue", "red", "big", "house", "tree", "and"]

    def text(low, high):
        return " ".join(rng.choice(words) for _ in range(rng.randint(low, high)))

    rows = [{"prompt": text(2, 12) + "?", "chosen": " " + text(1, 15) + ".", "rejected": " " + text(1, 15) + "."}
            for _ in range(count)]  # fmt: skip
    return datasets.Dataset.from_list(rows)


def train_ours(load, data, tokenizer, tmp_path, name, **extra):
    args = {**common_args(tmp_path, name), **extra}
    trainer = DPOTrainer(model=load(), ref_model=load(), args=DPOConfig(**args), train_dataset=data,
                         processing_class=tokenizer)  # fmt: skip
    trainer.train()
    return trainer, [log for log in trainer.state.log_history if "loss" in log]


def test_every_pair_of_an_optimizer_step_weighs_the_same_under_gradient_accumulation(tmp_path):
    # 7 pairs: step 1 takes pairs 1-4, step 2 pairs 5-7. With batch 2 and 2 accumulation steps, step 2 is a
    # micro-batch of 2 pairs and one of 1; a mean of micro-batch means would weigh the lone pair double.
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    data = synthetic_pairs(7)
    _, accumulated = train_ours(load, data, tokenizer, tmp_path, "ga", per_device_train_batch_size=2,
                                gradient_accumulation_steps=2)  # fmt: skip
    _, whole = train_ours(load, data, tokenizer, tmp_path, "whole", per_device_train_batch_size=4)
    assert [log["num_tokens"] for log in accumulated] == [log["num_tokens"] for log in whole]  # same pairs per step
    for step in (0, 1):  # fp32 sums in a different order: 1e-5 relative
        # (the per-token means average the step's tokens: as the whole batch's, as TRL's over processes)
        for name in ("loss", "grad_norm", "rewards/margins", "entropy", "logits/rejected", "mean_token_accuracy"):
            assert accumulated[step][name] == pytest.approx(whole[step][name], rel=1e-5), (step, name)


def test_token_budget_batches(tmp_path):
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    budget = 120
    _, logs = train_ours(load, synthetic_pairs(24), tokenizer, tmp_path, "budget", max_tokens_per_batch=budget,
                               max_steps=4)  # fmt: skip
    tokens = [0] + [log["num_tokens"] for log in logs]
    per_step = [b - a for a, b in itertools.pairwise(tokens)]
    assert len(per_step) == 4 and all(0 < n <= budget for n in per_step), per_step
    assert len(set(per_step)) > 1  # the pairs per step follow the budget, not a fixed count
    assert all(log["tokens_per_second"] > 0 for log in logs)


def test_token_budgets_with_split_batches_are_refused(tmp_path):
    # accelerate's own error came from deep inside ("you must have a batch_size attribute")
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    args = DPOConfig(**common_args(tmp_path, "split"), max_tokens_per_batch=200,
                     accelerator_config={"split_batches": True})  # fmt: skip
    trainer = DPOTrainer(load(), ref_model=load(), args=args, train_dataset=synthetic_pairs(4),
                         processing_class=tokenizer)  # fmt: skip
    with pytest.raises(ConfigError, match="option 'max_tokens_per_batch': token-budget batches are each one process"):
        trainer.train()


def test_model_given_as_a_path_loads_with_its_tokenizer_in_fp32(tmp_path):

    tokenizer = build_tiny_tokenizer()
    tiny_model(tokenizer, tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    args = DPOConfig(**{**common_args(tmp_path, "path"), "max_steps": 1})
    trainer = DPOTrainer(str(tmp_path / "model"), args=args, train_dataset=synthetic_pairs(4))
    assert trainer.model.dtype == torch.float32 and trainer.ref_model is not None
    assert trainer.processing_class.pad_token_id == tokenizer.pad_token_id
    trainer.train()
    with pytest.raises(ConfigError, match="option 'model': there is no folder"):  # the model's error first,
        DPOTrainer(str(tmp_path / "no_model"), args=args, train_dataset=synthetic_pairs(4))  # not a tokenizer's
    bad = DPOConfig(**{**common_args(tmp_path, "bad"), "model_init_kwargs": {"dtype": "float8"}})
    with pytest.raises(ConfigError, match="model_init_kwargs"):
        DPOTrainer(str(tmp_path / "model"), args=bad, train_dataset=synthetic_pairs(4))


def test_a_tokenizer_with_its_own_code_loads_with_trust_remote_code_at_the_models_revision(tmp_path, monkeypatch):
    # as TRL loads it: trust_remote_code reached the model only (the tokenizer then asked on stdin, and failed)
    import json

    import datasets
    import transformers

    from fastdpo.train import SFTConfig, SFTTrainer

    model = tmp_path / "model"
    tiny_model(build_tiny_tokenizer(), model)
    build_tiny_tokenizer().save_pretrained(model)
    code = "from transformers import PreTrainedTokenizerFast\n\n\nclass Custom(PreTrainedTokenizerFast):\n    pass\n"
    (model / "custom_tokenizer.py").write_text(code)
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="Custom", auto_map={"AutoTokenizer": [None, "custom_tokenizer.Custom"]})
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    asked = []
    load = transformers.AutoTokenizer.from_pretrained
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *a, **k: asked.append(k.get("revision")) or load(*a, **k))  # fmt: skip
    options = {"trust_remote_code": True, "model_init_kwargs": {"revision": "main"}, "max_steps": 1}
    dpo = DPOTrainer(str(model), args=DPOConfig(**{**common_args(tmp_path, "dpo"), **options}),
                     train_dataset=synthetic_pairs(4))  # fmt: skip
    sft = SFTTrainer(str(model), args=SFTConfig(output_dir=str(tmp_path / "sft"), report_to=[], **options),
                     train_dataset=datasets.Dataset.from_list([{"text": "a b c"}] * 4))  # fmt: skip
    assert type(dpo.processing_class).__name__ == type(sft.processing_class).__name__ == "Custom"
    assert asked == ["main", "main"]


def test_vision_datasets_are_refused_as_the_sft_trainer_and_trl_refuse_them(tmp_path):
    # an images column was left unread: the pairs trained on their text alone, silently
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    pairs = synthetic_pairs(4).add_column("images", [["a.png"]] * 4)
    args = DPOConfig(**common_args(tmp_path, "vision"))
    for train in (pairs, pairs.to_iterable_dataset()):
        with pytest.raises(ConfigError, match="option 'train_dataset': vision datasets are not supported yet"):
            DPOTrainer(load(), ref_model=load(), args=args, train_dataset=train, processing_class=tokenizer)
    # a DatasetDict trains nothing (TRL refuses it); it was prepared as several eval sets are, then failed later
    import datasets

    splits = datasets.DatasetDict({"train": synthetic_pairs(4)})
    with pytest.raises(ConfigError, match=r"the train dataset is a DatasetDict .* such as train_dataset\['train'\]"):
        DPOTrainer(load(), ref_model=load(), args=args, train_dataset=splits, processing_class=tokenizer)


def test_evaluation_and_the_best_checkpoint_by_eval_reward_accuracy(tmp_path):
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    args = DPOConfig(**{**common_args(tmp_path, "eval"), "max_steps": 4, "eval_strategy": "steps", "eval_steps": 2,
                        "save_strategy": "steps", "save_steps": 2, "load_best_model_at_end": True,
                        "metric_for_best_model": "eval_rewards/accuracies"})  # fmt: skip
    trainer = DPOTrainer(load(), ref_model=load(), args=args, train_dataset=synthetic_pairs(8),
                         eval_dataset=synthetic_pairs(5, seed=1), processing_class=tokenizer)  # fmt: skip
    trainer.train()
    evals = [log for log in trainer.state.log_history if "eval_loss" in log]
    assert [log["step"] for log in evals] == [2, 4]
    # the closing summary holds TRL's keys only (it took num_tokens, and the unlogged steps' metrics after an eval)
    summary = trainer.state.log_history[-1]
    assert set(summary) == {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos",
                            "train_loss", "epoch", "step"}  # fmt: skip
    for log in evals:
        for name in ("eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen", "eval_entropy"):
            assert name in log, name
    best = max(evals, key=lambda log: log["eval_rewards/accuracies"])  # ties: the first, as transformers keeps it
    assert trainer.state.best_metric == best["eval_rewards/accuracies"]
    assert trainer.state.best_model_checkpoint.endswith(f"checkpoint-{best['step']}")
    from safetensors.torch import load_file

    saved = load_file(f"{trainer.state.best_model_checkpoint}/model.safetensors")
    torch.testing.assert_close(trainer.model.lm_head.weight.detach(), saved["lm_head.weight"], rtol=0, atol=0)
    metrics = trainer.evaluate()  # the loaded best model, evaluated again: the same numbers
    assert metrics["eval_rewards/accuracies"] == pytest.approx(best["eval_rewards/accuracies"])
    # raw rows given to evaluate() are prepared as the constructor prepares them (as TRL's evaluate does; a
    # ValueError for a Dataset, a KeyError deep in the packer for a stream before), and score as the same rows did
    held_out = synthetic_pairs(5, seed=1)
    for given in (held_out, held_out.to_iterable_dataset()):
        assert trainer.evaluate(eval_dataset=given)["eval_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-6)


def test_moe_aux_loss_matches_trl(data, tmp_path):
    # a tiny Mixtral: TRL adds the config's router_aux_loss_coef times the load-balancing loss and logs aux_loss
    tokenizer = build_tiny_tokenizer()
    load = save_tiny_mixtral(tokenizer, tmp_path / "moe")

    ours = run(DPOTrainer, DPOConfig, load, data, tokenizer, tmp_path, "ours")
    theirs = run(trl.DPOTrainer, trl.DPOConfig, load, data, tokenizer, tmp_path, "trl")
    for step in (0, 1):
        assert ours[step]["aux_loss"] > 0
        for name in ("aux_loss", "loss", "grad_norm", "logps/chosen"):
            assert ours[step][name] == pytest.approx(theirs[step][name], rel=1e-4), (step, name)
    with pytest.raises(ConfigError, match="router_aux_loss_coef"):
        DPOTrainer(tiny_model(tokenizer, tmp_path / "dense")(), args=DPOConfig(**common_args(tmp_path, "x"),
                   router_aux_loss_coef=0.1), train_dataset=data, processing_class=tokenizer)  # fmt: skip


def test_rows_round_up_to_pad_to_multiple_of_and_a_tokenizer_without_pad_uses_eos(data, tmp_path):
    tokenizer = build_tiny_tokenizer()
    tokenizer.pad_token = None
    load = tiny_model(tokenizer, tmp_path / "model")
    args = DPOConfig(**common_args(tmp_path, "pad"), pad_to_multiple_of=48)
    trainer = DPOTrainer(load(), ref_model=load(), args=args, train_dataset=data, processing_class=tokenizer)
    assert tokenizer.pad_token == tokenizer.eos_token
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    assert batch["input_ids"].shape[1] % 48 == 0
    assert int(batch["num_padding"]) > 0 and bool((batch["input_ids"][:, -1] == tokenizer.eos_token_id).all())


def test_the_configs_pad_token_is_used_as_trl_uses_it_and_unused_init_kwargs_are_said(data, tmp_path):
    # deprecated in TRL 1.16, which warns and still sets it on the tokenizer and the model's configs (and refuses a
    # token the vocabulary lacks): the same here
    import trl

    states = []
    for trainer_cls, config_cls in ((DPOTrainer, DPOConfig), (trl.DPOTrainer, trl.DPOConfig)):
        tokenizer = build_tiny_tokenizer()
        load = tiny_model(tokenizer, tmp_path / "model")
        with pytest.warns(FutureWarning, match="pad_token"):
            args = config_cls(**common_args(tmp_path, trainer_cls.__module__), pad_token="<|bos|>")
        trainer = trainer_cls(load(), ref_model=load(), args=args, train_dataset=data, processing_class=tokenizer)
        states.append(
            (tokenizer.pad_token, trainer.model.config.pad_token_id, trainer.model.generation_config.pad_token_id)
        )
    assert states[0] == states[1] == ("<|bos|>", tokenizer.bos_token_id, tokenizer.bos_token_id)
    with pytest.warns(UserWarning, match="model_init_kwargs: the model is already built, they are not used"):
        DPOTrainer(load(), args=DPOConfig(**common_args(tmp_path, "y"), model_init_kwargs={"dtype": "bfloat16"}),
                   train_dataset=data, processing_class=build_tiny_tokenizer())  # fmt: skip
    with pytest.warns(FutureWarning), pytest.raises(ConfigError, match="option 'pad_token': 'NOT_A_TOKEN' is not in"):
        DPOTrainer(load(), ref_model=load(), args=DPOConfig(**common_args(tmp_path, "x"), pad_token="NOT_A_TOKEN"),
                   train_dataset=data, processing_class=build_tiny_tokenizer())  # fmt: skip


def test_packing_off_puts_each_pair_in_its_own_row_and_trains_the_same(tmp_path):
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    data = synthetic_pairs(8)
    common = {"per_device_train_batch_size": 4, "pack_length": 512}
    packed_trainer, packed = train_ours(load, data, tokenizer, tmp_path, "packed", **common)
    alone_trainer, alone = train_ours(load, data, tokenizer, tmp_path, "alone", packing=False, **common)
    examples = [alone_trainer.train_dataset[i] for i in range(4)]
    assert alone_trainer.data_collator(examples)["input_ids"].shape[0] == 4
    assert packed_trainer.data_collator(examples)["input_ids"].shape[0] < 4
    for step in (0, 1):  # fp32: attention over other rows' lengths rounds differently
        for name in ("loss", "grad_norm", "logps/chosen", "num_tokens"):
            assert alone[step][name] == pytest.approx(packed[step][name], rel=1e-5), (step, name)
    assert alone[0]["padding_fraction"] > packed[0]["padding_fraction"]


@pytest.mark.parametrize("loss_type", ["simpo", "cpo", "orpo"])
def test_reference_free_losses_train_without_a_reference(loss_type, tmp_path):
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    args = DPOConfig(**common_args(tmp_path, loss_type), loss_type=[loss_type])
    trainer = DPOTrainer(load(), args=args, train_dataset=synthetic_pairs(4), processing_class=tokenizer)
    assert trainer.ref_model is None  # no copy of the policy is made
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and logs[0]["loss"] != logs[1]["loss"]
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in logs)
    assert ("nll_loss" in logs[0]) == (loss_type != "simpo")  # the chosen NLL, as TRL's CPO/ORPO trainers log it


def test_sync_ref_model_matches_trl(data, tmp_path):
    # TR-DPO: the reference moves toward the policy after every step (α = 0.6); step 3 sees a moved reference
    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    options = {"sync_ref_model": True, "ref_model_sync_steps": 1, "max_steps": 3, "per_device_train_batch_size": 1}
    ours = run(DPOTrainer, DPOConfig, load, data, tokenizer, tmp_path, "ours", **options)
    theirs = run(trl.DPOTrainer, trl.DPOConfig, load, data, tokenizer, tmp_path, "trl", **options)
    plain = run(DPOTrainer, DPOConfig, load, data, tokenizer, tmp_path, "plain", **{**options, "sync_ref_model": False})
    assert len(ours) == len(theirs) == 3
    for step in (1, 2):
        for name in ("loss", "grad_norm", "logps/chosen"):
            assert ours[step][name] == pytest.approx(theirs[step][name], rel=1e-4), (step, name)
    assert ours[2]["rewards/margins"] != pytest.approx(plain[2]["rewards/margins"], rel=1e-3)  # the sync mattered
    with pytest.raises(ConfigError, match="sync_ref_model"):
        DPOConfig(**common_args(tmp_path, "x"), sync_ref_model=True, precompute_ref_log_probs=True)  # no model to move


def test_bf16_mixed_precision_trains(data, tmp_path, monkeypatch, emulated_gpu_gemms):  # noqa: F811 (the fixture)
    # accelerate wraps the model's forward for autocast; the packed step replaces it for one call and runs under
    # accelerator.autocast() instead (CPU autocast in bf16 here). With the GPU's half-precision head branch emulated
    # (test_linear_logprobs), the fp32 model's head multiplies in bf16, as an autocast nn.Linear head would
    # (autocast_head_inputs): every head call gets bf16 operands
    head_module = importlib.import_module("fastdpo.ops.linear_logprobs")  # the package exports the function

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    model = load()
    args = DPOConfig(**{**common_args(tmp_path, "bf16"), "bf16": True, "use_cpu": True})
    trainer = DPOTrainer(model, ref_model=load(), args=args, train_dataset=data, processing_class=tokenizer)
    operands, real_init = [], head_module._HeadGemms.__init__

    def spy(self, hidden, weight, bias, acc):
        operands.append((hidden.dtype, weight.dtype))
        real_init(self, hidden, weight, bias, acc)

    monkeypatch.setattr(head_module._HeadGemms, "__init__", spy)
    trainer.train()
    assert model.lm_head.weight.dtype == torch.float32  # the fp32 weights stay fp32 (autocast casts copies)
    # 2 steps: the reference's head and the policy's fused head each time
    assert len(operands) == 4 and set(operands) == {(torch.bfloat16, torch.bfloat16)}
    assert emulated_gpu_gemms and set(emulated_gpu_gemms) == {torch.float32}  # bf16 products, fp32 results
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 2 and all(torch.isfinite(torch.tensor(log["loss"])) for log in logs)
    assert logs[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at step 1
    restored = vars(model).get("forward")  # accelerate's wrapper, put back after each step
    assert restored is not None and "packed_forward" not in getattr(restored, "__qualname__", "")


def test_padding_fraction_over_several_batches_is_their_padding_over_their_tokens(data, tmp_path):
    # it was the pair-weighted mean of each batch's fraction: 0.1054 where the batches held 47 of 444 tokens padding
    from fastdpo.train.dpo import PairPacker

    seen = []
    collate = PairPacker.__call__

    def counting(self, features):
        batch = collate(self, features)
        seen.append((int(batch["num_padding"]), batch["input_ids"].numel()))
        return batch

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(PairPacker, "__call__", counting)
        logs = run(DPOTrainer, DPOConfig, load, data, tokenizer, tmp_path, "ga", gradient_accumulation_steps=3,
                   per_device_train_batch_size=1, max_steps=1)  # fmt: skip
    step = seen[:3]  # (the step's three micro-batches; the loader may have collated the next one ahead)
    assert len({tokens for _, tokens in step}) > 1  # (batches of unequal rows: the case)
    expected = sum(pad for pad, _ in step) / sum(tokens for _, tokens in step)
    assert logs[0]["padding_fraction"] == pytest.approx(expected, rel=1e-9)
