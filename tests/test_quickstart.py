"""fastdpo quickstart: the built-in task, its checker, and a short SFT → DPO run that must beat its reference."""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import warnings
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fastdpo.cli import main as cli
from fastdpo.compare_io import BUILTIN
from fastdpo.errors import ConfigError
from fastdpo.quickstart import (
    Problem,
    Settings,
    build_char_tokenizer,
    check,
    length_baseline_accuracy,
    make_data,
    make_problem,
    run,
)
from fastdpo.train import DPOConfig
from fastdpo.train.displacement import DisplacementWatch, LikelihoodDisplacementWarning


def test_problems_answers_and_slips():
    assert Problem("next", 479, True).answer == "480" and Problem("next", 479, True).slip == "470"
    assert Problem("prev", 480, True).answer == "479" and Problem("prev", 480, True).slip == "489"
    assert Problem("next", 473, False).slip == "484" and Problem("prev", 473, False).slip == "462"
    assert check(Problem("next", 479, True), " 480 ") and not check(Problem("next", 479, True), "470")
    rng = random.Random(0)
    for _ in range(2000):
        problem = make_problem(rng)
        assert len(problem.answer) == len(problem.slip) == len(str(problem.number)) and problem.answer != problem.slip
        assert problem.hard == (problem.number % 10 == (9 if problem.command == "next" else 0))


def test_data_held_out_and_length_proof():
    sft, pairs, test_pairs, problems = make_data(0, sft_rows=3000, pairs=500, held_out=200)
    held_out = {p.prompt for p in problems}
    assert len(held_out) == 200 and not held_out & ({r["prompt"] for r in sft} | {p["prompt"] for p in pairs})
    assert length_baseline_accuracy(test_pairs) == 0.5  # equal lengths: length cannot pick the chosen answer
    rows = [(Problem(r["prompt"][:4], int(r["prompt"].split()[1]), True), r["completion"]) for r in sft]
    hard = [(p, answer) for p, answer in rows if str(p.number)[-1] == ("9" if p.command == "next" else "0")]
    slipped = sum(answer == p.slip for p, answer in hard)
    assert 0.5 < slipped / len(hard) < 0.7  # the systematic slip, in 60% of the carry/borrow answers
    assert all(answer == str(p.number + (1 if p.command == "next" else -1)) for p, answer in rows if (p, answer)
               not in hard)  # fmt: skip
    tokenizer = build_char_tokenizer()
    ids = tokenizer("next: 479 ")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids[1:]) == "next: 479 "


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart")
    return out, run(out, Settings.short(seed=0), log=lambda *_: None)


@pytest.mark.slow
def test_short_quickstart_beats_its_reference(short_run):
    out, report = short_run
    policy = report["policy"]
    assert policy["reward_margin"] > 0 and policy["reward_accuracy"] >= 0.7, policy
    assert (out / "report.md").is_file() and (out / "dpo" / "config.json").is_file()
    # compare ran on the edge cases and 20 held-out problems, with the checker on the latter
    assert report["compare"]["prompts"] == len(BUILTIN) + 20 and (out / "compare" / "compare.html").is_file()
    rates = report["compare"]
    assert rates["win_rate"] + rates["tie_rate"] + rates["loss_rate"] == pytest.approx(1)
    assert "Answer by answer" in (out / "report.md").read_text()


def _dpo_from_sft(sft_dir, out, **options):
    """DPO steps from the short run's SFT model (reference: the same SFT model), on fresh training pairs."""
    import datasets
    from transformers import AutoTokenizer, LlamaForCausalLM

    from fastdpo.train import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(sft_dir)
    model, reference = LlamaForCausalLM.from_pretrained(sft_dir), LlamaForCausalLM.from_pretrained(sft_dir)
    _, pairs, _, _ = make_data(1, sft_rows=0, pairs=2000, held_out=10)
    args = DPOConfig(output_dir=str(out), max_steps=60, per_device_train_batch_size=32, logging_steps=5, report_to=[],
                     save_strategy="no", use_cpu=True, bf16=False, weight_decay=0.0, lr_scheduler_type="constant",
                     gradient_checkpointing=False, disable_tqdm=True, **options)  # fmt: skip
    trainer = DPOTrainer(model, ref_model=reference, args=args, train_dataset=datasets.Dataset.from_list(pairs),
                         processing_class=tokenizer)  # fmt: skip
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LikelihoodDisplacementWarning)
        trainer.train()
    logs = [log for log in trainer.state.log_history if "logps/chosen_change" in log]
    return [w for w in caught if w.category is LikelihoodDisplacementWarning], logs


@pytest.mark.slow
def test_displacement_is_flagged_for_plain_sigmoid_at_a_high_learning_rate(short_run, tmp_path):
    # built to displace: plain sigmoid DPO at 1e-3 drives both log-probs down (reward accuracy still rises)
    out, _ = short_run
    flagged, logs = _dpo_from_sft(out / "sft", tmp_path, loss_type=["sigmoid"], learning_rate=1e-3)
    assert len(flagged) == 1, [str(w.message) for w in flagged]
    message = str(flagged[0].message)
    assert "loss_type=['sigmoid', 'sft']" in message and "learning rate" in message
    assert logs[-1]["logps/chosen_change"] < -1.0 and logs[-1]["rewards/accuracies"] > logs[0]["rewards/accuracies"]


@pytest.mark.slow
def test_rpo_at_a_low_learning_rate_is_not_flagged(short_run, tmp_path):
    out, _ = short_run
    flagged, logs = _dpo_from_sft(out / "sft", tmp_path, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0],
                                  learning_rate=1e-4)  # fmt: skip
    assert not flagged and logs[-1]["logps/chosen_change"] > -1.0


def test_displacement_watch_rules():
    watch = DisplacementWatch(0.1)
    first = {"logps/chosen": -50.0, "rewards/accuracies": 0.0}
    assert not watch.update(first, learning_rate=1e-4) and first["logps/chosen_change"] == 0.0
    # fallen 4 nats: under max(1, 0.1 × 50) = 5
    assert not watch.update({"logps/chosen": -54.0, "rewards/accuracies": 0.9}, learning_rate=1e-4)
    # fallen 6 nats, but accuracy did not rise: not displacement
    assert not watch.update({"logps/chosen": -56.0, "rewards/accuracies": 0.0}, learning_rate=1e-4)
    with pytest.warns(LikelihoodDisplacementWarning, match="fell from -50.00 to -56.00"):
        assert watch.update({"logps/chosen": -56.0, "rewards/accuracies": 0.8}, learning_rate=1e-4)
    assert not watch.update({"logps/chosen": -90.0, "rewards/accuracies": 1.0}, learning_rate=1e-4)  # once
    quiet = DisplacementWatch(0.1)  # the other processes of a distributed run: found, not warned
    quiet.update({"logps/chosen": -50.0, "rewards/accuracies": 0.0}, learning_rate=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error", LikelihoodDisplacementWarning)
        assert quiet.update({"logps/chosen": -60.0, "rewards/accuracies": 0.9}, learning_rate=1e-4, warn=False)
    off = DisplacementWatch(None)
    metrics = {"logps/chosen": -1.0, "rewards/accuracies": 0.0}
    off.update(metrics, learning_rate=1.0)
    assert not off.update({"logps/chosen": -100.0, "rewards/accuracies": 1.0}, learning_rate=1.0)
    with pytest.raises(ConfigError, match="displacement_margin"):
        DPOConfig(output_dir="unused", displacement_margin=-0.5)


def test_displacement_with_a_reference_is_measured_on_each_batch_against_the_reference():
    # rewards/chosen / β: the batch's chosen log-prob minus the reference's on the same answers. A batch of longer
    # answers (logps/chosen 30 nats lower, the log-ratio unchanged) is not displacement; a log-ratio 6 nats down is
    watch = DisplacementWatch(0.1, beta=0.5)
    watch.update({"logps/chosen": -50.0, "rewards/accuracies": 0.0, "rewards/chosen": 0.0}, learning_rate=1e-4)
    longer = {"logps/chosen": -80.0, "rewards/accuracies": 0.9, "rewards/chosen": 0.1}
    assert not watch.update(longer, learning_rate=1e-4) and longer["logps/chosen_change"] == -30.0
    with pytest.warns(LikelihoodDisplacementWarning, match="fell 6.00 nats against the reference's"):
        assert watch.update({"logps/chosen": -45.0, "rewards/accuracies": 0.9, "rewards/chosen": -3.0},
                            learning_rate=1e-4)  # fmt: skip
    # a checkpoint from before the log-ratio was kept: the batch-to-batch rule, as the run started with
    resumed = DisplacementWatch(0.1, beta=0.5)
    resumed.load_state({"start": -50.0, "start_accuracy": 0.0, "warned": False})
    assert resumed.update({"logps/chosen": -56.0, "rewards/accuracies": 0.5, "rewards/chosen": 0.0},
                          learning_rate=1e-4, warn=False)  # fmt: skip


def test_cli_refuses_a_non_empty_out_without_overwrite(tmp_path, capsys):
    (tmp_path / "keep.txt").write_text("mine")
    assert cli(["quickstart", "--out", str(tmp_path)]) == 2
    assert "--overwrite" in capsys.readouterr().err and (tmp_path / "keep.txt").read_text() == "mine"


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.images, self.rows = [], [], 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.rows += tag == "tr"
        if tag == "img":
            self.images.append(dict(attrs)["src"])


@pytest.mark.slow
def test_compare_on_edge_cases_writes_markdown_html_and_json(short_run, tmp_path):
    out, _ = short_run
    report_dir = tmp_path / "compare"
    code = cli(["compare", "--policy", str(out / "dpo"), "--reference", str(out / "sft"), "--prompts", "builtin",
                "--pairs", str(out / "held_out_pairs.jsonl"), "--samples", "2", "--max-new-tokens", "8",
                "--out", str(report_dir)])  # fmt: skip
    assert code == 0
    data = json.loads((report_dir / "compare.json").read_text())
    rows = {row["name"]: row for row in data["rows"]}
    assert set(rows) == {name for name, _ in BUILTIN}
    assert rows["near the context length"]["truncated"] and not rows["one character"]["truncated"]
    for row in data["rows"]:
        assert len(row["samples"]) == 2 and math.isfinite(row["kl_estimate"])
        for answer in (row["policy"], row["reference"], *row["samples"]):
            assert math.isfinite(answer["reward"]) and 1 <= answer["tokens"] <= 8
    # the reference against itself has zero reward: the reward column is the policy-reference log-prob gap
    assert data["pairs"]["pairs"] == 300 and data["pairs"]["reward_accuracy"] >= 0.7
    page = _Page()
    page.feed((report_dir / "compare.html").read_text())
    assert page.rows == 1 + len(BUILTIN) and "table" in page.tags  # header + one row per prompt
    assert page.images and page.images[0].startswith("data:image/png;base64,")  # self-contained
    assert "| prompt | policy answer |" in (report_dir / "compare.md").read_text()


@pytest.mark.slow
def test_compare_with_the_task_checker(short_run, tmp_path):
    out, _ = short_run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastdpo.compare import compare, summary
    from fastdpo.quickstart import check

    tokenizer = AutoTokenizer.from_pretrained(out / "dpo")
    policy, reference = (AutoModelForCausalLM.from_pretrained(out / name) for name in ("dpo", "sft"))
    _, _, _, problems = make_data(0)
    problems = problems[:30]
    rows = compare(policy, reference, tokenizer, [(p.command, p.prompt) for p in problems], samples=0,
                   max_new_tokens=6, checkers=[lambda text, p=p: check(p, text) for p in problems])  # fmt: skip
    stats = summary(rows)
    assert stats["win_rate"] + stats["tie_rate"] + stats["loss_rate"] == pytest.approx(1.0)
    assert all(isinstance(r.policy.correct, bool) for r in rows) and stats["kl_estimate"] is None
    # the same model on both sides: every reward is exactly zero and nobody wins
    same = compare(reference, reference, tokenizer, [(p.command, p.prompt) for p in problems[:5]], samples=1,
                   max_new_tokens=6)  # fmt: skip
    assert all(r.policy.reward == 0.0 and r.kl_estimate == 0.0 for r in same)


def test_batched_greedy_answers_and_log_probs_equal_one_at_a_time(short_run):
    # prompts of 1-, 2- and 3-digit numbers (token lengths differ) decode in batches of equal length; each answer
    # and each log-probability must be what the prompt gets alone
    out, _ = short_run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fastdpo.compare import _logps, _vocabulary
    from fastdpo.quickstart import greedy_answers

    tokenizer = AutoTokenizer.from_pretrained(out / "dpo")
    model = AutoModelForCausalLM.from_pretrained(out / "dpo")
    prompts = ["next: 9 ", "prev: 10 ", "next: 479 ", "prev: 480 ", "next: 5 ", "next: 99 ", "prev: 301 "]
    assert len({len(tokenizer(p)["input_ids"]) for p in prompts}) == 3
    answers = greedy_answers(model, tokenizer, prompts)
    assert answers == [greedy_answers(model, tokenizer, [p])[0] for p in prompts]
    items = [(tokenizer(p)["input_ids"], tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
             for p, a in zip(prompts, [*answers[:-1], ""], strict=True)]  # fmt: skip
    items[-1] = (items[-1][0], [])  # an empty answer scores 0
    vocab = _vocabulary(model, model)
    alone = [_logps(model, [item], vocab)[0] for item in items]  # one row a call
    # fp32 sums of a few log-probs; a batched product may round otherwise than a lone row's
    assert _logps(model, items, vocab) == pytest.approx(alone, rel=1e-5, abs=1e-6) and alone[-1] == 0.0


@pytest.mark.slow
def test_sweep_reuses_one_reference_cache_goes_on_after_a_stop_and_recommends_a_beta(
    short_run, tmp_path, monkeypatch, capsys
):
    import fastdpo.model.reference_cache as reference_cache

    out, _ = short_run
    pairs = tmp_path / "pairs.jsonl"
    _, train_pairs, _, _ = make_data(3, sft_rows=0, pairs=400, held_out=10)
    pairs.write_text("".join(json.dumps(p) + "\n" for p in train_pairs))
    config, reference = tmp_path / "run.yaml", tmp_path / "reference"
    shutil.copytree(out / "sft", reference)  # (a reference folder of its own: its weights are a part of the rows)
    config.write_text(f"model_name_or_path: {out / 'sft'}\nref_model_name_or_path: {reference}\n"
                      f"dataset_name: {pairs}\neval_fraction: 0.1\nmax_steps: 8\n"
                      "per_device_train_batch_size: 32\nlearning_rate: 0.0001\nloss_type: [sigmoid, sft]\n"
                      "loss_weights: [1.0, 1.0]\nuse_cpu: true\nreport_to: []\nsave_strategy: 'no'\n"
                      "gradient_checkpointing: false\ndisable_tqdm: true\nlogging_steps: 1\n")  # fmt: skip
    computed = []
    real = reference_cache.compute_reference_logps
    monkeypatch.setattr(reference_cache, "compute_reference_logps",
                        lambda *a, **k: computed.append(1) or real(*a, **k))  # fmt: skip
    sweep_dir = tmp_path / "sweep"
    command = ["sweep", "--config", str(config), "--beta", "0.5,0.05", "--out", str(sweep_dir), "--kl-prompts", "4"]
    import fastdpo.cli
    from fastdpo.train import TrainingInterrupted

    real_run, runs = fastdpo.cli.run_training, []

    def stopped_at_step_4(known, flags, **options):  # the second β's run, as SIGTERM stops it: a checkpoint, a raise
        runs.append(flags[flags.index("--output_dir") + 1])
        if runs[-1].endswith("beta_0.5") and known.resume is None:
            real_run(known, [*flags, "--max_steps", "4", "--save_strategy", "steps", "--save_steps", "4"], **options)
            raise TrainingInterrupted(signal.SIGTERM, 4, runs[-1] + "/checkpoint-4")
        return real_run(known, flags, **options)

    monkeypatch.setattr(fastdpo.cli, "run_training", stopped_at_step_4)
    assert cli(command) == 143
    assert f"go on with: fastdpo sweep {' '.join(command[1:])} --resume" in capsys.readouterr().err
    assert cli([*command, "--resume"]) == 0  # β 0.05 read back, β 0.5 resumed from its checkpoint
    assert [Path(run).name for run in runs] == ["beta_0.05", "beta_0.5", "beta_0.5"]
    logs = [json.loads(line) for line in (sweep_dir / "beta_0.5" / "metrics.jsonl").read_text().splitlines()]
    assert [log["step"] for log in logs if "loss" in log] == list(range(1, 9))  # each step once, through the stop
    for changed in (["--max_steps", "9"], ["--samples", "3"]):  # finished under other settings: not read back
        assert cli([*command, "--resume", *changed]) == 2
        assert "β = 0.05 finished under other settings" in capsys.readouterr().err
    kept = pairs.read_text()  # other data in the same file: its rows were read back and ranked beside new ones
    pairs.write_text(
        kept.replace('"chosen"', '"swapped"').replace('"rejected"', '"chosen"').replace('"swapped"', '"rejected"')
    )
    assert cli([*command, "--resume"]) == 2
    assert "β = 0.05 finished under other settings (data_fingerprint)" in capsys.readouterr().err
    pairs.write_text(kept)
    from fastdpo.cli_resume import model_fingerprint  # and other weights at the model's path

    before = model_fingerprint(str(out / "sft"))
    assert before and any(name.endswith(".safetensors") for name in before) and model_fingerprint("org/name") is None
    changed = out.parent / "changed_sft"
    shutil.copytree(out / "sft", changed)
    weights = next(changed.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8] + bytes(8))
    assert model_fingerprint(str(changed)) != {**before} and model_fingerprint(str(changed)).keys() == before.keys()
    shutil.rmtree(reference)  # other weights at the reference's path: rows measured against the old one were read
    shutil.copytree(changed, reference)  # back and ranked beside the new
    assert cli([*command, "--resume"]) == 2
    assert "β = 0.05 finished under other settings (reference_fingerprint)" in capsys.readouterr().err
    assert len(computed) == 2  # the training and the held-out rows, once, for the first β; the second read the files
    result = json.loads((sweep_dir / "sweep.json").read_text())
    assert [r["beta"] for r in result["rows"]] == [0.05, 0.5] and result["recommended_beta"] in (0.05, 0.5)
    for row in result["rows"]:
        assert 0 <= row["reward_accuracy"] <= 1 and math.isfinite(row["kl_estimate"])
        # one reference (its mean over the pairs evaluated: the policy's minus rewards/chosen over β, fp32 means)
        assert row["logps_chosen_reference"] == pytest.approx(result["rows"][0]["logps_chosen_reference"], rel=1e-5)
    assert "Recommended: β =" in (sweep_dir / "sweep.md").read_text() and (sweep_dir / "sweep.png").is_file()
    assert (sweep_dir / "beta_0.05" / "config.json").is_file() and (sweep_dir / "beta_0.5" / "config.json").is_file()


def test_sweep_refuses_bad_betas_and_configs_without_held_out_data(tmp_path, capsys, monkeypatch):
    config = tmp_path / "run.yaml"
    config.write_text("model_name_or_path: some/model\ndataset_name: pairs.jsonl\n")
    assert cli(["sweep", "--config", str(config), "--beta", "0.1,-1", "--out", str(tmp_path / "a")]) == 2
    assert "--beta" in capsys.readouterr().err
    assert cli(["sweep", "--config", str(config), "--beta", "0.1,0.2", "--out", str(tmp_path / "b")]) == 2
    assert "eval_fraction" in capsys.readouterr().err and not (tmp_path / "b").exists()
    # a folder with a split 'test': its pairs held out, as a run that evaluates reads them (TRL's scripts' default);
    # it was refused as holding none out (here the empty model folder ends it: a β's run got past the checks)
    for folder in ("pairs", "empty_model"):
        (tmp_path / folder).mkdir()
    for split in ("train", "test"):
        (tmp_path / "pairs" / f"{split}.jsonl").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    assert cli(["sweep", "--config", str(config), "--beta", "0.1", "--out", str(tmp_path / "t"), "--dataset_name",
                str(tmp_path / "pairs"), "--model_name_or_path", str(tmp_path / "empty_model")]) == 2  # fmt: skip
    said = capsys.readouterr().err
    assert f"the held-out pairs are the split 'test' of {tmp_path / 'pairs'}, as TRL's scripts read it" in said
    assert "empty_model" in said and "holds none out" not in said
    # a hub dataset's splits are asked of the hub: without 'test', refused at once (each β's run failed on it, in
    # datasets' words, after reading the train split)
    import datasets

    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name, config_name: {"org/a": ["train"]}[name])
    assert cli(["sweep", "--config", str(config), "--beta", "0.1", "--out", str(tmp_path / "u"), "--dataset_name",
                "org/a"]) == 2  # fmt: skip
    assert "option 'eval_fraction': a sweep compares the runs on held-out pairs, and the config holds none out" in \
        capsys.readouterr().err and not (tmp_path / "u").exists()  # fmt: skip
    for held in ("0.0", "1.5", "-1", "nan"):  # (refused by the first run, after its beta_0.1 folder was made)
        assert cli(["sweep", "--config", str(config), "--beta", "0.1", "--out", str(tmp_path / "h"),
                    "--eval_fraction", held]) == 2  # fmt: skip
        assert "option 'eval_fraction': must be a fraction of the rows in (0, 1) or a number of rows" in \
            capsys.readouterr().err and not (tmp_path / "h").exists()  # fmt: skip
    config.write_text("model_name_or_path: some/model\ndataset_name: pairs.jsonl\neval_fraction: 0.1\n"
                      "loss_type: [simpo, sft]\nreport_to: []\n")  # fmt: skip
    assert cli(["sweep", "--config", str(config), "--beta", "0.1,0.2", "--out", str(tmp_path / "c")]) == 2
    assert "option 'loss_type': simpo has no reference" in capsys.readouterr().err  # (it crashed after one β)
    config.write_text("model_name_or_path: some/model\ndataset_name: pairs.jsonl\neval_fraction: 0.1\n"
                      "dataset_streaming: true\nreport_to: []\n")  # fmt: skip
    assert cli(["sweep", "--config", str(config), "--beta", "0.1,0.2", "--out", str(tmp_path / "s")]) == 2
    assert "option 'dataset_streaming': a sweep computes the reference's" in capsys.readouterr().err  # (not the model)
    monkeypatch.chdir(tmp_path)  # without --out, the runs went to runs/sweep, unsaid, where the config names another
    assert cli(["sweep", "--config", str(config), "--beta", "0.1", "--output_dir", "mine"]) == 2
    assert "fastdpo sweep: the runs go to runs/sweep/beta_<β>, as --out sets; the config's output_dir (mine) is not " \
        "used" in capsys.readouterr().err and not (tmp_path / "runs").exists()  # fmt: skip
    assert cli(["sweep", "--config", str(config), "--beta", "0.1", "--out", str(tmp_path / "d"), "--resume"]) == 2
    assert "holds no sweep to go on with" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()  # a folder of the user's: its sweep.md was replaced, unasked
    (tmp_path / "notes" / "sweep.md").write_text("mine")
    assert cli(["sweep", "--config", str(config), "--beta", "0.1", "--out", str(tmp_path / "notes"), "--resume"]) == 2
    assert "holds no sweep to go on with" in capsys.readouterr().err
    assert (tmp_path / "notes" / "sweep.md").read_text() == "mine"
    # a NaN passed every comparison (each β trained, then "within nan%"); seeds numpy refuses: tracebacks before
    assert cli(["sweep", "--config", str(config), "--beta", "0.1", "--out", str(tmp_path / "e"), "--nll-rise",
                "nan"]) == 2  # fmt: skip
    assert "option '--nll-rise': must be at least 0, got nan" in capsys.readouterr().err
    assert cli(["quickstart", "--out", str(tmp_path / "q"), "--seed", "-1"]) == 2 and not (tmp_path / "q").exists()
    assert cli(["compare", "--policy", "p", "--reference", "r", "--seed", str(2**70)]) == 2
    assert "option '--seed': must be between 0 and 4294967295" in capsys.readouterr().err


def test_sweep_recommendation_ties_and_diverged_runs():
    from fastdpo.errors import ConfigError
    from fastdpo.sweep import recommend

    def row(beta, accuracy, margin, nll_rise=0.01):
        return {"beta": beta, "reward_accuracy": accuracy, "reward_margin": margin, "nll_rise": nll_rise}

    # 12 of 18 pairs right for both, averaged from other batch fractions: the larger β-scaled margin won over the
    # last bits of the accuracy, and on a tie the larger β always did (margins in β's units)
    assert recommend([row(0.5, 0.6666666666666666, 0.2 * 0.5), row(2.0, 0.666666661699613, 0.9 * 2.0)], 0.1)[0] == 2.0
    assert recommend([row(0.5, 0.867, 0.742 * 0.5), row(2.0, 0.867, 0.740 * 2.0)], 0.1)[0] == 0.5
    # a diverged β (NaN) was "the highest accuracy (nan%)" when it came first
    nan = float("nan")
    assert recommend([row(0.1, nan, nan, nan), row(0.2, 0.6, 0.1)], 0.1)[0] == 0.2
    assert recommend([row(0.1, 0.6, 0.1, nan), row(0.2, 0.6, 0.1, 0.5)], 0.1)[0] == 0.2  # (the least NLL rise)
    with pytest.raises(ConfigError, match="every β's held-out measurements are NaN"):
        recommend([row(0.1, nan, nan, nan)], 0.1)


def test_the_example_configs_train_on_the_quickstarts_outputs(short_run, tmp_path, monkeypatch):
    # README sends a newcomer to examples/run.yaml and examples/sft.yaml after `make quickstart`, from the
    # repository root: their fields and paths must hold
    out, _ = short_run
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "quickstart").symlink_to(out)
    examples = Path(__file__).parent.parent / "examples"
    for command, config, model in (("dpo", "run.yaml", "example_dpo"), ("sft", "sft.yaml", "example_sft")):
        assert cli([command, "--config", str(examples / config), "--max_steps", "2"]) == 0, config
        assert (tmp_path / "runs" / model / "model.safetensors").is_file()
