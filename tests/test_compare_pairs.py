"""``fastdpo compare``'s held-out pairs (``pair_metrics``, ``--pairs``): pairs in the trainers' formats, scored on
the trainers' token ids, against a token-by-token fp64 reference; empty prompts, answers cut at the context,
prompts that fill it, and a bad file."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_tokenizer import build_tiny_tokenizer
from tokenizers import processors
from transformers import LlamaConfig, LlamaForCausalLM

from fastdpo.cli import main as cli
from fastdpo.compare import pair_metrics
from fastdpo.data import prepare_preferences, tokenize_preferences

CONTEXT = 48
BETA = 0.25


def tiny_llama(tokenizer, seed: int, hidden: int = 32) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=CONTEXT, pad_token_id=tokenizer.pad_token_id,
                         eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    return LlamaForCausalLM(config).double().eval()


def no_bos(tokenizer):
    # a tokenizer that adds nothing (as Qwen's): an empty prompt is then no token at all
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(single="$A", pair="$A $B")
    return tokenizer


def scored(model, prompt: list[int], answer: list[int]) -> float:
    # one sequence at a time, whole, cut at the context; every answer token with a token before it
    ids = (prompt + answer)[:CONTEXT]
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(max(1, len(prompt)), len(ids)))


def expected(policy, reference, tokenizer, rows) -> dict:
    tokenized = tokenize_preferences(prepare_preferences(rows), tokenizer, max_length=CONTEXT)
    kept = tokenized.dataset

    def sums(side: str) -> list[list[float]]:  # [policy, reference] per pair
        pairs = zip(kept["prompt_ids"], kept[f"{side}_ids"], strict=True)
        return [[scored(model, prompt, answer) for model in (policy, reference)] for prompt, answer in pairs]

    chosen, rejected = sums("chosen"), sums("rejected")
    margins = [BETA * ((cp - cr) - (rp - rr)) for (cp, cr), (rp, rr) in zip(chosen, rejected, strict=True)]
    n = len(kept)
    return {"pairs": n, "reward_accuracy": sum(m > 0 for m in margins) / n, "reward_margin": sum(margins) / n,
            "logps_chosen_policy": sum(c[0] for c in chosen) / n,
            "logps_chosen_reference": sum(c[1] for c in chosen) / n, "dropped_pairs": len(rows) - n,
            "ids": kept}  # fmt: skip


def numbers(result: dict) -> dict:
    # pair_metrics' result without its per-reason counts and length (dicts: pytest.approx takes no nested one)
    return {key: value for key, value in result.items() if key not in ("dropped", "length")}


STANDARD = [
    {"prompt": "What color is the sky?", "chosen": " Blue on a clear day.", "rejected": " Green."},
    {"prompt": "", "chosen": "bonjour", "rejected": "buenos dias and more words"},  # empty prompt
    {"prompt": "Explain photosynthesis:", "chosen": " plants turn light into sugar" * 20, "rejected": " no"},  # cut
    {"prompt": "1 2 3 4 5 6 7 8 9 10 " * 6, "chosen": " 11", "rejected": " 12"},  # the prompt fills the context
    {"prompt": "def add(a, b):", "chosen": " return a + b", "rejected": " return a - b"},
]
CONVERSATIONAL = [
    {"prompt": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "6 * 7 ="}],
     "chosen": [{"role": "assistant", "content": "42"}], "rejected": [{"role": "assistant", "content": "41"}]},
    {"prompt": [{"role": "user", "content": "Translate 'good morning' into French"}],
     "chosen": [{"role": "assistant", "content": "bonjour"}],
     "rejected": [{"role": "assistant", "content": "buenos dias, the quick brown fox"}]},
]  # fmt: skip


@pytest.mark.parametrize("rows", [STANDARD, CONVERSATIONAL], ids=["standard", "conversational"])
@pytest.mark.parametrize("adds_bos", [True, False], ids=["bos", "no_bos"])
def test_pair_metrics_scores_the_trainers_token_ids_against_a_token_by_token_reference(rows, adds_bos):
    tokenizer = build_tiny_tokenizer() if adds_bos else no_bos(build_tiny_tokenizer())
    policy, reference = tiny_llama(tokenizer, 0), tiny_llama(tokenizer, 1)
    want = expected(policy, reference, tokenizer, rows)
    ids = want.pop("ids")
    if rows is STANDARD:  # the edge cases are there: an empty prompt, an answer past the context, one pair dropped
        lengths = [len(p) + len(c) for p, c in zip(ids["prompt_ids"], ids["chosen_ids"], strict=True)]
        assert want["dropped_pairs"] == 1 and max(lengths) > CONTEXT
        assert ids["prompt_ids"][1] == ([tokenizer.bos_token_id] if adds_bos else [])
    else:  # rendered by the chat template, as the trainers render it
        assert (
            ids["prompt_ids"][0]
            == tokenizer.apply_chat_template(rows[0]["prompt"], add_generation_prompt=True)["input_ids"]
        )
    got = pair_metrics(policy, reference, tokenizer, rows, beta=BETA, data_filter="none")  # the empty prompt kept
    assert got.pop("displacement") is False  # (its rule: tests/test_quickstart.py's displacement tests)
    assert got.pop("dropped") == ({"prompt_fills_max_length": 1} if rows is STANDARD else {})
    assert got.pop("length") == {"tokens": CONTEXT, "of": "the context"}
    # fp64 both ways, batched against one sequence at a time: equal to ~1e-12
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
    assert 0 < got["reward_accuracy"] < 1 or rows is CONVERSATIONAL  # the draws give both signs on the standard rows
    same = pair_metrics(
        policy, policy, tokenizer, rows, beta=BETA, data_filter="none"
    )  # policy = reference: no margin, no accuracy
    assert same["reward_margin"] == 0 and same["reward_accuracy"] == 0


def test_many_pairs_of_one_length_are_scored_in_batches_of_a_bounded_size(monkeypatch):
    # every pair of the same prompt and answer lengths ran as one batch: its fp32 log-probs over the vocabulary grew
    # with the pairs' number (400 short pairs of a 128k vocabulary: tens of GB); now in batches of SCORE_BYTES
    import fastdpo.compare as compare

    tokenizer = build_tiny_tokenizer()
    policy, reference = tiny_llama(tokenizer, 0), tiny_llama(tokenizer, 1)
    rows = [{"prompt": "Say red.", "chosen": " red.", "rejected": " blue."}] * 5  # (kept: data_filter none)
    batches = []
    real = compare._answer_log_probs
    monkeypatch.setattr(compare, "_answer_log_probs", lambda model, ids, start: batches.append(len(ids)) or real(
        model, ids, start))  # fmt: skip
    whole = pair_metrics(policy, reference, tokenizer, rows, beta=BETA, data_filter="none")
    assert max(batches) == 5, batches  # (the rows' prompts and answers of one length each: one group)
    batches.clear()
    monkeypatch.setattr(compare, "SCORE_BYTES", 4 * 2 * len(tokenizer) * 3)  # 2 rows' log-probs at 3 positions
    pieces = pair_metrics(policy, reference, tokenizer, rows, beta=BETA, data_filter="none")
    assert max(batches) <= 2 and sum(batches) == 4 * 5, batches  # (each model and side, in pieces)
    batches.clear()
    monkeypatch.setattr(compare, "SCORE_BYTES", 1 << 40)  # and by the tokens through the model: 3 rows' at most
    monkeypatch.setattr(compare, "SCORE_TOKENS", 3 * len(tokenizer("Say red. red.")["input_ids"]) + 2)
    thirds = pair_metrics(policy, reference, tokenizer, rows, beta=BETA, data_filter="none")
    assert max(batches) == 3 and sum(batches) == 4 * 5, batches
    # fp64 models: the same sums in any batch, to rounding
    numbers = [key for key, value in whole.items() if isinstance(value, float)]
    for scored in (pieces, thirds):
        assert {key: scored[key] for key in numbers} == pytest.approx({key: whole[key] for key in numbers}, rel=1e-9)
        assert {key: value for key, value in scored.items() if key not in numbers} == {
            key: value for key, value in whole.items() if key not in numbers}  # fmt: skip


def test_a_pair_with_an_empty_answer_is_dropped_and_counted_as_the_trainers_drop_it():
    # "empty" is a drop reason of the quality check, but preparation refused such a row first: compare --pairs
    # stopped at it, where the trainers' data_filter: drop (and README) leave it out, counted
    tokenizer = build_tiny_tokenizer()
    policy, reference = tiny_llama(tokenizer, 0), tiny_llama(tokenizer, 1)
    clean = pair_metrics(policy, reference, tokenizer, STANDARD, beta=BETA)
    empty = [*STANDARD[:2], {"prompt": "Hi?", "chosen": "  ", "rejected": " Bye."}, *STANDARD[2:]]
    got = pair_metrics(policy, reference, tokenizer, empty, beta=BETA)
    assert got["dropped"] == {**clean["dropped"], "empty": clean["dropped"].get("empty", 0) + 1}
    assert got["dropped_pairs"] == clean["dropped_pairs"] + 1
    assert numbers({**got, "dropped_pairs": 0}) == numbers({**clean, "dropped_pairs": 0})


def test_the_report_says_which_length_a_dropped_prompt_filled():
    # a prompt that fills the run's max_length (not the context) was said to fill "the context"
    from fastdpo.compare import markdown

    tokenizer = build_tiny_tokenizer()
    policy, reference = tiny_llama(tokenizer, 0), tiny_llama(tokenizer, 1)
    stats = {"prompts": 0, "truncated": 0, "mean_reward_policy": 0.0, "mean_reward_reference": 0.0,
             "mean_tokens_policy": 0.0, "mean_tokens_reference": 0.0, "kl_estimate": None}  # fmt: skip
    for max_length, said in ((None, f"prompt fills the context ({CONTEXT} tokens)"),
                             (24, "prompt fills max_length (24 tokens)")):  # fmt: skip
        pairs = pair_metrics(policy, reference, tokenizer, STANDARD, beta=BETA, max_length=max_length)
        assert pairs["dropped"]["prompt_fills_max_length"] >= 1
        assert f"prompt_fills_max_length ({said})" in markdown([], stats, pairs, BETA)


def test_compare_cli_takes_a_conversational_pairs_file_and_names_a_bad_one(tmp_path, capsys, monkeypatch):
    tokenizer = build_tiny_tokenizer()
    for name, seed in (("policy", 0), ("reference", 1)):
        tiny_llama(tokenizer, seed).float().save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in CONVERSATIONAL))
    common = ["compare", "--policy", str(tmp_path / "policy"), "--reference", str(tmp_path / "reference"),
              "--limit", "1", "--samples", "0", "--max-new-tokens", "2"]  # fmt: skip
    assert cli([*common, "--pairs", str(pairs), "--out", str(tmp_path / "out")]) == 0
    reported = json.loads((tmp_path / "out" / "compare.json").read_text())["pairs"]
    policy, reference = (LlamaForCausalLM.from_pretrained(tmp_path / name).double() for name in ("policy", "reference"))
    want = pair_metrics(policy, reference, tokenizer, CONVERSATIONAL, beta=0.1)
    # the CLI ran in fp32 (the saved models' dtype), the check in fp64: log-prob sums of ~10 tokens agree to 1e-4
    assert reported["pairs"] == 2 and numbers(reported) == pytest.approx(numbers(want), rel=1e-4, abs=1e-4)
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "hi", "chosen": "a"}) + "\n")
    import fastdpo.compare_cli

    # the file is read before any answer is generated (it failed only after), and the fix is one compare can take
    monkeypatch.setattr(fastdpo.compare_cli, "compare", lambda *a, **k: pytest.fail("answers generated first"))
    capsys.readouterr()
    assert cli([*common, "--pairs", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "out2")]) == 2
    error = capsys.readouterr().err
    assert "column 'rejected': column not found — map your column with --columns '{\"rejected\": " in error
    # what only tokenizing finds is found before any answer too: a chat conversation without a chat template
    tokenizer.chat_template = None
    for name, seed in (("plain_policy", 0), ("plain_reference", 1)):
        tiny_llama(tokenizer, seed).float().save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    plain = [*common[:2], str(tmp_path / "plain_policy"), common[3], str(tmp_path / "plain_reference"), *common[5:]]
    assert cli([*plain, "--pairs", str(pairs), "--out", str(tmp_path / "out3")]) == 2
    assert "chat template" in capsys.readouterr().err


def test_compare_loads_a_lora_runs_adapter_folder_and_names_a_missing_base(tmp_path, capsys, monkeypatch):
    peft = pytest.importorskip("peft")
    tokenizer = build_tiny_tokenizer()
    monkeypatch.chdir(tmp_path)  # the adapter names its base by the relative path it was trained with, as a run does
    tiny_llama(tokenizer, 0).float().save_pretrained("base")
    tokenizer.save_pretrained("base")
    adapted = peft.get_peft_model(
        LlamaForCausalLM.from_pretrained("base"), peft.LoraConfig(r=4, target_modules=["q_proj"])
    )
    with torch.no_grad():  # a trained adapter: B no longer zero
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    adapted.save_pretrained("run")
    tokenizer.save_pretrained("run")
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in CONVERSATIONAL))
    common = ["compare", "--policy", "run", "--reference", "base", "--limit", "1", "--samples", "0",
              "--max-new-tokens", "2", "--pairs", "pairs.jsonl"]  # fmt: skip
    assert cli([*common, "--out", "out"]) == 0
    reported = json.loads((tmp_path / "out" / "compare.json").read_text())["pairs"]
    base = LlamaForCausalLM.from_pretrained("base").double()
    want = pair_metrics(adapted.double(), base, tokenizer, CONVERSATIONAL, beta=0.1)
    # the policy is the adapter on its base (fp32 in the CLI, fp64 here): not the base alone
    assert numbers(reported) == pytest.approx(numbers(want), rel=1e-4, abs=1e-4) and reported["reward_margin"] != 0
    (tmp_path / "base").rename(tmp_path / "moved")
    # offline: the adapter's "base" is then looked up on no hub (with one, ~20 s of retries here, then the same error)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    assert cli([*common, "--reference", "moved", "--out", "out2"]) == 2
    assert "base_model_name_or_path" in capsys.readouterr().err


def test_compare_loads_a_qlora_runs_base_and_reference_quantized(tmp_path, capsys, monkeypatch):
    # a QLoRA run trained on its base in 4 bits, against that base in 4 bits: compare loads both so (and --unquantized
    # in full precision). bitsandbytes' 4-bit layers run on a CPU.
    peft = pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    tokenizer = build_tiny_tokenizer()
    monkeypatch.chdir(tmp_path)
    # 64 wide: on a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights for inference, and that needs layers of
    # at least 64 inputs and a multiple of 32 outputs
    tiny_llama(tokenizer, 0, hidden=64).float().save_pretrained("base")
    tokenizer.save_pretrained("base")
    four_bits = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_type="nf4")
    adapted = peft.get_peft_model(LlamaForCausalLM.from_pretrained("base", quantization_config=four_bits),
                                  peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))  # fmt: skip
    with torch.no_grad():
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    adapted.save_pretrained("run")
    tokenizer.save_pretrained("run")
    # the keys a `fastdpo dpo --use_peft --load_in_4bit` run writes to its config.yaml (with many others)
    (tmp_path / "run" / "config.yaml").write_text("use_peft: true\nload_in_4bit: true\nbnb_4bit_quant_type: nf4\n"
                                                  "model_init_kwargs: null\nbeta: 0.25\n")  # fmt: skip
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in CONVERSATIONAL))
    common = ["compare", "--policy", "run", "--reference", "base", "--limit", "1", "--samples", "0",
              "--max-new-tokens", "2", "--pairs", "pairs.jsonl"]  # fmt: skip
    assert cli([*common, "--out", "out"]) == 0
    out = capsys.readouterr().out
    assert "in 4 bits, as the run loaded its base (run/config.yaml: load_in_4bit" in out
    assert "beta 0.25: run/config.yaml's (--beta to set another)" in out
    assert cli([*common, "--out", "full", "--unquantized"]) == 0
    reported, full = (json.loads((tmp_path / d / "compare.json").read_text())["pairs"] for d in ("out", "full"))
    policy = LlamaForCausalLM.from_pretrained("run", quantization_config=four_bits)
    reference = LlamaForCausalLM.from_pretrained("base", quantization_config=four_bits)
    assert {type(model.model.layers[0].mlp.up_proj).__name__ for model in (policy, reference)} == {"Linear4bit"}
    # the same 4-bit models, loaded here: equal up to fp32 sums of ~10 tokens
    # at the run's beta (0.25 in its config.yaml): compare reads it, as it reads the quantization
    want = pair_metrics(policy, reference, tokenizer, CONVERSATIONAL, beta=0.25)
    assert numbers(reported) == pytest.approx(numbers(want), rel=1e-5)
    policy, reference = LlamaForCausalLM.from_pretrained("run"), LlamaForCausalLM.from_pretrained("base")
    want = pair_metrics(policy, reference, tokenizer, CONVERSATIONAL, beta=0.25)
    assert numbers(full) == pytest.approx(numbers(want), rel=1e-5)
    # and the 4-bit report is not the full-precision one: NF4 moves this tiny model's (near-uniform) log-probs
    # (measured: chosen under the policy -25.541 vs -25.507, margin 0.03998 vs 0.03948), far past the
    # rel 1e-5 that the agreement above allows (2.5e-4 on the log-probs, 4e-7 on the margin)
    assert abs(reported["logps_chosen_policy"] - full["logps_chosen_policy"]) > 1e-3
    assert abs(reported["reward_margin"] - full["reward_margin"]) > 1e-4
    # a config.yaml the run could not have trained with: one line naming the file and the key
    (tmp_path / "run" / "config.yaml").write_text("use_peft: true\nload_in_4bit: true\nbnb_4bit_quant_type: nf5\n")
    capsys.readouterr()
    assert cli([*common, "--out", "bad"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "option 'bnb_4bit_quant_type'" in err and "run/config.yaml" in err and "'nf4' or 'fp4'" in err, err


def test_compare_refuses_bad_options_and_prompts_in_one_line(tmp_path, capsys, monkeypatch):
    tokenizer = build_tiny_tokenizer()
    monkeypatch.chdir(tmp_path)
    tiny_llama(tokenizer, 0).float().save_pretrained("model")
    tokenizer.save_pretrained("model")
    common = ["compare", "--policy", "model", "--reference", "model", "--samples", "0", "--max-new-tokens", "2"]
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "blank_lines.txt").write_text("first\n\nsecond\n")
    (tmp_path / "number.jsonl").write_text('{"prompt": "ok"}\n{"prompt": 5}\n')
    (tmp_path / "ids.jsonl").write_text('{"prompt": [1, 2, 99999]}\n')
    (tmp_path / "parts.json").write_text('[{"prompt": [{"role": "user", "content": ["x"]}]}]')  # no text content
    cases = [(["--limit", "0"], "option '--limit': must be at least 1, got 0"),
             (["--limit", "-1"], "option '--limit': must be at least 1, got -1"),
             (["--samples", "-1"], "option '--samples': must be at least 0"),
             (["--max-new-tokens", "0"], "option '--max-new-tokens': must be at least 1"),
             (["--beta", "0"], "option '--beta': must be a number > 0, got 0.0"),
             (["--beta", "nan"], "option '--beta': must be a number > 0, got nan"),
             (["--prompts", "empty.txt"], "empty.txt holds no prompt"),
             (["--prompts", "number.jsonl"], "row 1, column 'prompt': number.jsonl: line 2's prompt is int 5"),
             (["--prompts", "ids.jsonl"], "line 1: token id 99999 has no embedding in the models"),
             (["--prompts", "parts.json"], "row 0, column 'prompt': parts.json: item 1's prompt: message 0: content "
              "is")]  # fmt: skip
    for i, (flags, expected) in enumerate(cases):
        capsys.readouterr()
        assert cli([*common, *flags, "--out", f"out{i}"]) == 2, flags
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("fastdpo: error:") and expected in line, (flags, line)
    # blank lines of a .txt file are skipped, as in a .jsonl file
    assert cli([*common, "--prompts", "blank_lines.txt", "--out", "blank"]) == 0
    assert [row["name"] for row in json.loads((tmp_path / "blank" / "compare.json").read_text())["rows"]] == [
        "line 1", "line 3"]  # fmt: skip


@pytest.mark.parametrize("mode", ["keep_start", "keep_end"])
def test_pairs_cut_to_the_runs_max_length_score_as_its_own_evaluation(mode, tmp_path):
    # compare --pairs scored whole sequences (to the context) and dropped prompts that fill the context, where the
    # run's evaluation cuts to max_length and drops by it: accuracy 1.0 against the run's 0.667, 6 pairs against 3
    from fastdpo import DPOConfig, DPOTrainer

    tokenizer = build_tiny_tokenizer()
    policy, reference = tiny_llama(tokenizer, 0), tiny_llama(tokenizer, 1)
    rows = [row for row in STANDARD if row["prompt"]]  # (the trainers refuse an empty prompt's pair at evaluation)
    got = pair_metrics(policy, reference, tokenizer, rows, beta=BETA, data_filter="none", max_length=20,
                       truncation_mode=mode)  # fmt: skip
    args = DPOConfig(output_dir=str(tmp_path / mode), report_to=[], beta=BETA, max_length=20, truncation_mode=mode,
                     per_device_eval_batch_size=8, bf16=False, use_cpu=True)  # fmt: skip
    trainer = DPOTrainer(policy, ref_model=reference, args=args, train_dataset=prepare_preferences(rows),
                         processing_class=tokenizer)  # fmt: skip
    run = trainer.evaluate(prepare_preferences(rows))
    dropped = 1 if mode == "keep_start" else 0  # (the prompt of 60 tokens fills 20: TRL's keep_start drop)
    assert got["pairs"] == len(rows) - dropped and got["dropped_pairs"] == dropped
    # fp64 models: the packed evaluation and the batched scoring agree to ~1e-9
    assert got["reward_margin"] == pytest.approx(run["eval_rewards/margins"], rel=1e-6, abs=1e-9)
    assert got["reward_accuracy"] == pytest.approx(run["eval_rewards/accuracies"])
    assert got["logps_chosen_policy"] == pytest.approx(run["eval_logps/chosen"], rel=1e-6)
