"""Checkpoint and resume: N steps straight and the same run stopped at a checkpoint and resumed log the same steps.

CPU, fp32, dropout off: the resumed run restores the weights, the optimizer and scheduler, the RNG and the
trainers' own counters bit for bit and sees the same batches in the same order, so every number it logs after the
checkpoint is the straight run's. The tolerance, 1e-6 relative, is a few fp32 ulps and far below the difference
of a step on other data or other weights (different batches change the loss in the 2nd or 3rd digit).
"""

from __future__ import annotations

import random
import shutil

import datasets
import pytest
import torch
from test_train_dpo import tiny_model
from tiny_tokenizer import build_tiny_tokenizer

from fastdpo.train import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

datasets.disable_progress_bars()
WORDS = ["the", "a", "cat", "dog", "sat", "ran", "on", "under", "blue", "red", "big", "house", "tree", "and"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def load(tokenizer, tmp_path_factory):
    return tiny_model(tokenizer, tmp_path_factory.mktemp("model"))


def text(rng: random.Random, low: int, high: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def pairs(count: int, seed: int = 0) -> datasets.Dataset:
    rng = random.Random(seed)
    rows = [{"prompt": text(rng, 2, 12) + "?", "chosen": " " + text(rng, 1, 15) + ".",
             "rejected": " " + text(rng, 1, 15) + "."} for _ in range(count)]  # fmt: skip
    return datasets.Dataset.from_list(rows)


def prompt_completions(count: int, seed: int = 0) -> datasets.Dataset:
    rng = random.Random(seed)
    rows = [{"prompt": text(rng, 1, 12), "completion": " " + text(rng, 1, 10)} for _ in range(count)]
    return datasets.Dataset.from_list(rows)


def args(tmp_path, name: str, config_cls, **extra):
    # a large learning rate: every step moves the weights enough that a step replayed on the wrong weights or
    # the wrong batch logs other numbers
    values = {"output_dir": str(tmp_path / name), "per_device_train_batch_size": 4, "max_steps": 6,
              "learning_rate": 3e-2, "logging_steps": 1, "report_to": [], "bf16": False, "seed": 0,
              "save_strategy": "steps", "save_steps": 3, "max_length": 64, "dataloader_pin_memory": False}  # fmt: skip
    return config_cls(**{**values, **extra})


def straight_and_resumed(make_trainer, tmp_path, resume_at: int, *, by_path: bool = False):
    """The straight run's trainer and the resumed run's (a fresh trainer resuming from checkpoint-``resume_at``: the
    last in its output_dir, or ``by_path`` given as a ``Path``)."""
    straight = make_trainer("straight")
    straight.train()
    resumed = make_trainer("resumed")
    checkpoint = f"checkpoint-{resume_at}"
    shutil.copytree(tmp_path / "straight" / checkpoint, tmp_path / "resumed" / checkpoint)
    resumed.train(resume_from_checkpoint=tmp_path / "resumed" / checkpoint if by_path else True)
    return straight, resumed


def assert_same_steps(straight, resumed, names: tuple[str, ...], resume_at: int) -> None:
    logs = [[log for log in t.state.log_history if "loss" in log] for t in (straight, resumed)]
    assert [log["step"] for log in logs[0]] == [log["step"] for log in logs[1]] == list(range(1, len(logs[0]) + 1))
    after = [log for log in logs[0] if log["step"] > resume_at]
    assert len(after) >= 3
    for ours, theirs in zip(after, logs[1][resume_at:], strict=True):
        for name in ("loss", "grad_norm", "learning_rate", "num_tokens", "epoch", *names):
            assert theirs[name] == pytest.approx(ours[name], rel=1e-6), (ours["step"], name)
    losses = [log["loss"] for log in logs[0]]
    assert len(set(losses)) == len(losses)  # the steps differ: a replayed step would show
    for (name, a), b in zip(straight.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0, msg=name)


DPO_CASES = {
    # 6 pairs, 4 a step: 2 steps an epoch; checkpoint-3 is mid-epoch 2 (1 batch to skip), then epoch 3
    "batches": (6, {}),
    # 14 pairs, 2 a micro-batch, 2 micro-batches a step: 4 steps an epoch (the last one micro-batch)
    "grad_accumulation": (14, {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2}),
    # token-budget batches, 10 pairs: 5 steps an epoch, checkpoint-3 mid-epoch 1
    "token_budget": (10, {"max_tokens_per_batch": 200}),
    # 5 pairs, budget 240: passes over the data of 3, 2, 3 batches. Epochs of 3, 2, 3 steps stopped the straight
    # run at step 8 of 9 and put step 7 of the resumed run at global_step // 3 = epoch 2's first batch
    "token_budget_short_pass": (5, {"max_tokens_per_batch": 240, "max_steps": 9, "save_steps": 6}),
    # TR-DPO: the reference moves toward the policy every 2 steps, so the checkpoint must hold it
    "sync_ref_model": (6, {"sync_ref_model": True, "ref_model_sync_steps": 2}),
    # a stream of 30 pairs, 4 a step: the resumed run reads past the 12 pairs of its first 3 steps again. (Not a
    # stream shorter than the checkpoint's steps: transformers' Trainer, knowing no pass length, skips the
    # checkpoint's steps in the first pass and then starts the next: TRL resumes such a stream inexactly too.)
    "stream": (30, {"stream": True}),
}


@pytest.mark.parametrize("case", list(DPO_CASES))
def test_dpo_resumes_exactly(case, tokenizer, load, tmp_path):
    count, extra = DPO_CASES[case][0], dict(DPO_CASES[case][1])
    data = pairs(count).to_iterable_dataset() if extra.pop("stream", False) else pairs(count)

    def make_trainer(name):
        config = args(tmp_path, name, DPOConfig, beta=0.5, **extra)
        return DPOTrainer(load(), ref_model=load(), args=config, train_dataset=data, processing_class=tokenizer)

    resume_at = extra.get("save_steps", 3)
    # (TR-DPO's by a Path, which transformers takes: fastdpo's counters and moving reference were not read then)
    straight, resumed = straight_and_resumed(make_trainer, tmp_path, resume_at, by_path=case == "sync_ref_model")
    assert_same_steps(straight, resumed, ("rewards/margins", "logps/chosen", "logps/chosen_change"), resume_at)


SFT_CASES = {
    # 16 rows packed into 13 rows of 32 tokens, 4 a step: 4 steps an epoch, checkpoint-3 mid-epoch 1
    "packed": (16, {"packing": True}),
    # 10 rows, 4 a step: 3 steps an epoch, checkpoint-3 at the end of epoch 1
    "unpacked": (10, {"packing": False}),
}


@pytest.mark.parametrize("case", list(SFT_CASES))
def test_sft_resumes_exactly(case, tokenizer, load, tmp_path):
    count, extra = SFT_CASES[case]
    data = prompt_completions(count)

    def make_trainer(name):
        config = args(tmp_path, name, SFTConfig, max_length=32, **extra)
        return SFTTrainer(load(), args=config, train_dataset=data, processing_class=tokenizer)

    straight, resumed = straight_and_resumed(make_trainer, tmp_path, 3)
    assert_same_steps(straight, resumed, ("entropy", "mean_token_accuracy"), 3)


def test_the_numerics_guard_counts_go_on_after_a_resume(tokenizer, load, tmp_path):
    # steps 3 and 4 have NaN hidden states; 2 skips in a row stop training, at step 4 in both runs: the resumed
    # run knows that step 3 was skipped (and that 1 step was skipped in all)
    from fastdpo.train.common import NumericsError

    data = prompt_completions(10)
    trainers = []

    def make_trainer(name):
        config = args(tmp_path, name, SFTConfig, max_length=32, packing=False, max_nonfinite_steps=2)
        trainer = SFTTrainer(load(), args=config, train_dataset=data, processing_class=tokenizer)

        def poison(module, inputs, output):
            return output * float("nan") if trainer.state.global_step + 1 in (3, 4) else output

        trainer.model.model.norm.register_forward_hook(poison)
        trainers.append(trainer)
        return trainer

    with pytest.raises(NumericsError, match="2 optimizer steps in a row"):
        make_trainer("straight").train()
    shutil.copytree(tmp_path / "straight" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    with pytest.raises(NumericsError, match="2 optimizer steps in a row"):
        make_trainer("resumed").train(resume_from_checkpoint=True)
    for trainer in trainers:
        logs = [log for log in trainer.state.log_history if "loss" in log]
        assert [log.get("nonfinite_steps", 0) for log in logs] == [0, 0, 1, 2]
        assert trainer.state.global_step == 4


def test_an_extended_run_takes_the_schedule_of_its_new_length_from_its_second_resumed_step(tokenizer, load, tmp_path):
    # what README says of `fastdpo dpo --resume --max_steps N` (RESUME_MAY_CHANGE): the Trainer rebuilds the schedule
    # for the new length; its first resumed step keeps the rate the checkpoint saved (0 at the end of a linear decay)
    def rates(max_steps, **resume):
        config = args(tmp_path, "run", SFTConfig, max_length=32, max_steps=max_steps, save_steps=2,
                      learning_rate=1e-2, lr_scheduler_type="linear")  # fmt: skip
        trainer = SFTTrainer(load(), args=config, train_dataset=prompt_completions(16), processing_class=tokenizer)
        trainer.train(**resume)
        return [log["learning_rate"] for log in trainer.state.log_history if "loss" in log]

    assert rates(2) == pytest.approx([1e-2, 5e-3])
    assert rates(4, resume_from_checkpoint=True)[-2:] == pytest.approx([0.0, 1e-2 / 4])


def test_a_finished_run_is_not_trained_past_its_last_step(tokenizer, load, tmp_path):
    # resumed from its last checkpoint, a finished run trained one step past max_steps (transformers' loop: TRL's
    # too) and saved the model again: weights moved by 1.2e-3 under a constant schedule, silently. The run's end is
    # this run's max_steps, as the Trainer computes it (more data or epochs: a longer run, which goes on)
    from fastdpo.errors import ConfigError

    def trainer(name, rows=8, **length):
        config = args(tmp_path, name, SFTConfig, max_length=32, save_steps=1, lr_scheduler_type="constant", **length)
        return SFTTrainer(load(), args=config, train_dataset=prompt_completions(rows), processing_class=tokenizer)

    for name, length, last in (("steps", {"max_steps": 2}, 2), ("epochs", {"max_steps": -1, "num_train_epochs": 1}, 2),
                               ("half", {"max_steps": -1, "num_train_epochs": 0.5}, 1)):  # fmt: skip
        trainer(name, **length).train()  # (batch 4: 2 steps an epoch)
        again = trainer(name, **length)
        with pytest.raises(ConfigError, match=rf"checkpoint-{last} is at step {last}, the run's last") as error:
            again.train(resume_from_checkpoint=True)
        assert ("max_steps (now 2)" if name == "steps" else "num_train_epochs (now") in error.value.fix
        assert again.state.global_step == last  # nothing trained
    extended = trainer("steps", max_steps=3)
    extended.train(resume_from_checkpoint=True)  # a longer run goes on
    assert extended.state.global_step == 3
    more = trainer("epochs", rows=16, max_steps=-1, num_train_epochs=1)  # (the same epochs of more data: 4 steps)
    more.train(resume_from_checkpoint=True)
    assert more.state.global_step == 4


def test_the_dropins_refuse_what_trl_resumes_wrongly(tokenizer, load, tmp_path):
    # TRL's trainers (and so the drop-ins) trained a finished run one step past max_steps, and went on from a
    # model-only checkpoint with a new optimizer and the schedule from step 0, silently: both refused, as natively
    import trl

    import fastdpo.trl as dropin
    from fastdpo.errors import ConfigError

    def config(kind, name, **extra):  # (12 rows, batch 4: 3 steps an epoch, and the run's last is 2)
        return args(tmp_path, name, kind, **{"max_steps": 2, "save_steps": 1, "max_length": 32, **extra})

    def dpo(module, settings):
        return module.DPOTrainer(load(), ref_model=load(), args=settings, train_dataset=pairs(12),
                                 processing_class=tokenizer)  # fmt: skip

    def sft(module, settings):
        return module.SFTTrainer(
            load(), args=settings, train_dataset=prompt_completions(12), processing_class=tokenizer
        )

    for name, make in {"dpo": dpo, "sft": sft}.items():
        kind = trl.DPOConfig if name == "dpo" else trl.SFTConfig
        make(trl, config(kind, name)).train()
        again = make(trl, config(kind, name))
        again.train(resume_from_checkpoint=True)  # TRL's: one step past its last
        assert again.state.global_step == 3, name
        shutil.rmtree(tmp_path / name / "checkpoint-3")
        again = make(dropin, config(kind, name))
        with pytest.raises(ConfigError, match="checkpoint-2 is at step 2, the run's last"):
            again.train(resume_from_checkpoint=True)
        assert again.state.global_step == 2, name
        make(dropin, config(kind, f"{name}_model", save_only_model=True)).train()
        with pytest.raises(ConfigError, match="checkpoint-1 holds the model only"):
            checkpoint = str(tmp_path / f"{name}_model" / "checkpoint-1")
            make(dropin, config(kind, f"{name}_model", max_steps=3)).train(resume_from_checkpoint=checkpoint)


def test_a_checkpoint_of_the_model_only_is_refused_and_a_stops_checkpoint_is_whole(tokenizer, load, tmp_path):
    # save_only_model=True: transformers resumed from such a checkpoint with a new optimizer and the schedule from
    # step 0, silently (loss 5.16 where 2.78); the checkpoint of a stop, which says to resume from it, was one too
    from fastdpo.errors import ConfigError
    from fastdpo.train.common import NumericsError

    config = args(tmp_path, "run", SFTConfig, max_length=32, packing=False, max_nonfinite_steps=2, save_steps=2,
                  save_only_model=True)  # fmt: skip
    trainer = SFTTrainer(load(), args=config, train_dataset=prompt_completions(10), processing_class=tokenizer)
    trainer.model.model.norm.register_forward_hook(
        lambda module, inputs, output: output * float("nan") if trainer.state.global_step + 1 in (3, 4) else output
    )
    with pytest.raises(NumericsError, match="2 optimizer steps in a row"):
        trainer.train()
    saved = tmp_path / "run"
    assert not (saved / "checkpoint-2" / "optimizer.pt").exists()  # as asked
    assert (saved / "checkpoint-4" / "optimizer.pt").is_file() and (saved / "checkpoint-4" / "scheduler.pt").is_file()
    assert trainer.args.save_only_model  # (set back)
    fresh = SFTTrainer(load(), args=config, train_dataset=prompt_completions(10), processing_class=tokenizer)
    with pytest.raises(ConfigError, match="checkpoint-2 holds the model only \\(save_only_model=True\\)"):
        fresh.train(resume_from_checkpoint=str(saved / "checkpoint-2"))
    with pytest.raises(ValueError, match="Can't find a valid checkpoint at"):  # transformers' own (FileNotFoundError)
        fresh.train(resume_from_checkpoint=str(saved / "no_such_checkpoint"))
    # a whole checkpoint that lost one file went on without it, silently: the learning rate back at its peak (no
    # scheduler.pt), a new optimizer (no optimizer.pt: refused as a model-only one, which it was not)
    for lost, said in (("scheduler.pt", "a new learning-rate schedule, from step 0"),
                       ("optimizer.pt", "a new optimizer")):  # fmt: skip
        damaged = shutil.copytree(saved / "checkpoint-4", tmp_path / f"without_{lost}")
        (damaged / lost).unlink()
        with pytest.raises(ConfigError, match=rf"without_{lost} lacks {lost}: the run would go on with {said}"):
            fresh.train(resume_from_checkpoint=str(damaged))


def test_the_dropin_resumes_as_trl_and_keeps_its_displacement_watch(tokenizer, load, tmp_path):
    # TRL's steps (num_tokens starts again from 0, as TRL's does); fastdpo's own logps/chosen_change was measured
    # from the first log after the resume (step 6: 4.25 where 1.57)
    import trl

    import fastdpo.trl as dropin

    def make_trainer(name):
        config = args(tmp_path, name, trl.DPOConfig, beta=0.5)
        return dropin.DPOTrainer(load(), ref_model=load(), args=config, train_dataset=pairs(6),
                                 processing_class=tokenizer)  # fmt: skip

    straight, resumed = straight_and_resumed(make_trainer, tmp_path, 3)
    logs = [[log for log in t.state.log_history if "loss" in log] for t in (straight, resumed)]
    for ours, theirs in zip(logs[0][3:], logs[1][3:], strict=True):
        for name in ("loss", "grad_norm", "rewards/margins", "logps/chosen_change"):
            assert theirs[name] == pytest.approx(ours[name], rel=1e-6), (ours["step"], name)
    assert logs[1][3]["num_tokens"] < logs[0][3]["num_tokens"]  # (TRL's count, from 0)


def test_token_counts_of_a_run_resumed_with_another_number_of_processes_keep_their_total(tmp_path):
    # DPO's num_tokens is each process's share, one file each: resumed in 1 process after 2, it read rank 0's
    # share only and went backwards (670 after 863)
    import json
    from types import SimpleNamespace

    from fastdpo.train.resume import load_counters

    for rank, (tokens, skipped) in enumerate(((500, 1), (363, 1))):
        counts = {"_total_train_tokens": tokens, "_nonfinite_total": skipped, "_nonfinite_in_row": 0}
        (tmp_path / f"fastdpo_counters_{rank}.json").write_text(json.dumps(counts))

    def loaded(rank, world, per_process=True):
        counts = {"_total_train_tokens": 0, "_nonfinite_total": 0, "_nonfinite_in_row": 0}
        trainer = SimpleNamespace(args=SimpleNamespace(process_index=rank, world_size=world),
                                  tokens_per_process=per_process, **counts)  # fmt: skip
        load_counters(trainer, str(tmp_path))
        return trainer._total_train_tokens, trainer._nonfinite_total

    assert loaded(0, 2) == (500, 1) and loaded(1, 2) == (363, 1)  # the same processes: their own
    assert loaded(0, 1) == (863, 1)  # one process: both shares (the skips are every process's alike)
    assert [loaded(rank, 4)[0] for rank in range(4)] == [500, 363, 0, 0]  # more: the total kept
    assert loaded(0, 1, per_process=False) == (500, 1)  # SFT's count is the total already, on every process


def test_a_checkpoint_file_cut_short_is_named(tokenizer, load, tmp_path):
    # a run killed while saving (or a full disk) leaves a file cut short: safetensors' "incomplete metadata, file not
    # fully covered" and the others' errors named no file
    from fastdpo.errors import ConfigError

    config = args(tmp_path, "run", SFTConfig, max_length=32, packing=False, save_steps=2, max_steps=2)
    SFTTrainer(load(), args=config, train_dataset=prompt_completions(10), processing_class=tokenizer).train()
    config = args(tmp_path, "more", SFTConfig, max_length=32, packing=False, max_steps=4)
    fresh = SFTTrainer(load(), args=config, train_dataset=prompt_completions(10), processing_class=tokenizer)
    for name, said in (("model.safetensors", "bytes where its tensors end at byte"),
                       ("optimizer.pt", "a zip archive without its end"),
                       ("trainer_state.json", "not whole JSON")):  # fmt: skip
        damaged = shutil.copytree(tmp_path / "run" / "checkpoint-2", tmp_path / f"cut_{name}")
        whole = (damaged / name).read_bytes()
        (damaged / name).write_bytes(whole[: len(whole) - 100])
        with pytest.raises(ConfigError, match=rf"cut_{name}/{name} is cut short \((\d+ )?{said}"):
            fresh.train(resume_from_checkpoint=str(damaged))
    (damaged / "trainer_state.json").write_bytes(b"")  # (an empty file: not whole either)
    with pytest.raises(ConfigError, match="trainer_state.json is cut short"):
        fresh.train(resume_from_checkpoint=str(damaged))
    (tmp_path / "run" / "checkpoint-2" / "notes.json").symlink_to(tmp_path / "gone.json")  # (a dangling link: not
    # read by transformers, nor refused by the check, which failed on it with a FileNotFoundError)
    resumed = fresh.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))  # a whole one resumes
    assert resumed.global_step == 4


def test_an_fsdp_or_xla_checkpoint_that_lost_its_schedule_or_optimizer_is_refused_naming_it(tmp_path):
    # their optimizer's state lies in files of their own (optimizer_0/, rank0-of-2-optimizer.pt): a lost scheduler.pt
    # went unseen (the learning rate back at its peak); DeepSpeed's engine keeps its schedule in global_step<N>/
    from fastdpo.errors import ConfigError
    from fastdpo.train.resume import refuse_model_only

    # (accelerate's FSDP names by state dict type: sharded through DCP, full, sharded without DCP)
    layouts = {"fsdp": ["optimizer_0/", "pytorch_model_fsdp_0/", "rng_state_0.pth"],
               "fsdp_full": ["optimizer.bin", "pytorch_model_fsdp.bin", "rng_state_0.pth"],
               "fsdp_ranks": ["optimizer_0_rank0.bin", "pytorch_model_fsdp_0_rank0.bin", "rng_state_0.pth"],
               "xla": ["rank0-of-2-optimizer.pt", "rank0-of-2-pytorch_model.bin", "rng_state_0.pth"],
               "deepspeed": ["global_step4/", "latest", "rng_state_0.pth"]}  # fmt: skip
    for name, files in layouts.items():
        folder = tmp_path / name
        folder.mkdir()
        for file in [*files, "trainer_state.json"]:
            if file.endswith("/"):
                (folder / file).mkdir()
            else:
                (folder / file).write_text("{}")
        if name == "deepspeed":
            refuse_model_only(str(folder))
            continue
        with pytest.raises(ConfigError, match=f"{name} lacks scheduler.pt: the run would go on with a new learning"):
            refuse_model_only(str(folder))
        (folder / "scheduler.pt").write_text("")
        refuse_model_only(str(folder))
        # and its optimizer's state lost: named as its layout names it (it was told it lacked optimizer.pt)
        optimizer = folder / files[0].rstrip("/")
        if optimizer.is_dir():
            shutil.rmtree(optimizer)
        else:
            optimizer.unlink()
        said = {
            "fsdp": "optimizer_0 \\(FSDP's",
            "fsdp_full": "optimizer.bin \\(FSDP's",
            "fsdp_ranks": "optimizer_0_rank<r>.bin \\(FSDP's",
            "xla": "rank<i>-of-<N>-optimizer.pt \\(XLA FSDP's",
        }[name]
        with pytest.raises(
            ConfigError, match=f"{name} lacks {said} optimizer state\\): the run would go on with a new optimizer"
        ):
            refuse_model_only(str(folder))
