"""Interrupted runs, in real processes: a ``fastdpo dpo|sft`` run killed (SIGKILL) or stopped (SIGINT, SIGTERM)
mid-run, then ``--resume``, logs every step once, each as an uninterrupted run of the same config logs it, and ends
with its weights.

CPU, fp32, dropout off: the resumed run restores the weights, the optimizer and scheduler, the RNG and the
trainers' counters bit for bit and sees the same batches, so the tolerance is test_train_resume's (1e-6 relative,
a few fp32 ulps; a step replayed on other weights or another batch changes the loss in the 2nd or 3rd digit). A
run is 64 steps of ~25 ms, so that a signal sent when its first checkpoint is written lands with most of the run
still to go (the tests assert that it did: no final model, steps left to train).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file
from test_train_dpo import tiny_model
from test_train_resume import pairs, prompt_completions
from tiny_tokenizer import build_tiny_tokenizer

from fastdpo.cli import main
from fastdpo.train.interrupt import stop_on_signals

pytestmark = pytest.mark.slow
MAX_STEPS = 64
COMPARED = {"dpo": ("loss", "grad_norm", "learning_rate", "num_tokens", "rewards/margins", "logps/chosen"),
            "sft": ("loss", "grad_norm", "learning_rate", "num_tokens", "entropy", "mean_token_accuracy")}  # fmt: skip


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interrupt")
    tokenizer = build_tiny_tokenizer()
    tiny_model(tokenizer, root / "model")
    tokenizer.save_pretrained(root / "model")
    pairs(24).to_json(root / "pairs.jsonl")
    prompt_completions(24).to_json(root / "sft.jsonl")
    # a large learning rate (test_train_resume's): a step replayed on the wrong weights or batch logs other numbers
    common = {"model_name_or_path": str(root / "model"), "per_device_train_batch_size": 4, "max_steps": MAX_STEPS,
              "learning_rate": 3e-2, "logging_steps": 1, "report_to": [], "bf16": False, "seed": 0,
              "save_strategy": "steps", "save_steps": 4, "dataloader_pin_memory": False,
              "disable_tqdm": True}  # fmt: skip
    (root / "dpo.yaml").write_text(yaml.safe_dump({**common, "dataset_name": str(root / "pairs.jsonl"),
                                                   "max_length": 64, "beta": 0.5}))  # fmt: skip
    (root / "sft.yaml").write_text(yaml.safe_dump({**common, "dataset_name": str(root / "sft.jsonl"),
                                                   "max_length": 32}))  # fmt: skip
    return root


# one thread, here and in the runs started: a tiny model gains nothing from two, and with other tests running
# beside these, two threads wait for each other (runs 3x slower)
THREADS = {**os.environ, "OMP_NUM_THREADS": "1"}


def fastdpo(workdir: Path, command: str, out: Path, *flags: str) -> int:
    """The command in this process (the runs that are not interrupted: no interpreter to start)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main([command, "--config", str(workdir / f"{command}.yaml"), "--output_dir", str(out), *flags])
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def straight(workdir):
    """The uninterrupted run of a command's config (run once, on first use)."""
    runs = {}

    def run(command: str) -> Path:
        if command not in runs:
            runs[command] = workdir / f"{command}_straight"
            assert fastdpo(workdir, command, runs[command]) == 0
        return runs[command]

    return run


def _signals_by_default() -> None:
    # a suite started as a shell's background job inherits SIGINT ignored, and ignored signals stay ignored
    # (stop_on_signals): the run gets the disposition of a command typed at a terminal
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_DFL)


def start(workdir: Path, command: str, out: Path, *flags: str, group: bool = False) -> subprocess.Popen:
    # stderr to a file: a pipe nobody reads until the end could fill up and block the run; group: a process group of
    # its own, which a signal can be sent to as a job scheduler sends it
    with (workdir / f"{out.name}.stderr").open("w") as stderr:
        return subprocess.Popen([sys.executable, "-m", "fastdpo.cli", command, "--config", f"{command}.yaml",
                                 "--output_dir", str(out), *flags], cwd=workdir, env=THREADS,
                                stdout=subprocess.DEVNULL, stderr=stderr, preexec_fn=_signals_by_default,
                                start_new_session=group)  # fmt: skip


def wait_until(ready, process: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, f"the run ended (status {process.returncode}) before it could be interrupted"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.005)


def complete(checkpoint: Path) -> bool:
    """Whether ``checkpoint`` was completely written: its trainer_state.json, the Trainer's last file, reads."""
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text())["global_step"] >= 0
    except (OSError, ValueError):
        return False


def logs(out: Path) -> list[dict]:
    """The complete lines of ``out``'s metrics.jsonl (a run may be writing the last one)."""
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True) if (out / "metrics.jsonl").exists() else []
    return [json.loads(line) for line in lines if line.endswith("\n")]


def train_steps(out: Path) -> list[dict]:
    return [log for log in logs(out) if "loss" in log]


def assert_unfinished(out: Path) -> None:
    assert not (out / "model.safetensors").exists()  # no final model: stopped before training ended
    assert train_steps(out)[-1]["step"] < MAX_STEPS


def assert_same_run(command: str, resumed: Path, straight: Path) -> None:
    # one end-of-training summary, the last line: a stopped run's own summary is not kept on resume
    assert ["train_runtime" in log for log in logs(resumed)][-2:] == [False, True]
    assert sum("train_runtime" in log for log in logs(resumed)) == 1
    ours, theirs = train_steps(resumed), train_steps(straight)
    assert [log["step"] for log in ours] == [log["step"] for log in theirs] == list(range(1, MAX_STEPS + 1))
    for a, b in zip(theirs, ours, strict=True):
        for name in COMPARED[command]:
            assert b[name] == pytest.approx(a[name], rel=1e-6), (a["step"], name)
    assert len({log["loss"] for log in theirs}) == MAX_STEPS  # the steps differ: a replayed step would show
    weights, resumed_weights = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert weights.keys() == resumed_weights.keys()
    for name, tensor in weights.items():
        torch.testing.assert_close(resumed_weights[name], tensor, rtol=1e-6, atol=0, msg=name)


def test_a_killed_run_resumes_from_its_last_complete_checkpoint(workdir, straight, caplog):
    reference = straight("dpo")
    out = workdir / "killed"
    process = start(workdir, "dpo", out)
    wait_until(lambda: complete(out / "checkpoint-4"), process)
    process.kill()
    assert process.wait(timeout=60) == -signal.SIGKILL
    assert_unfinished(out)
    saved = max(int(path.name.split("-")[1]) for path in out.glob("checkpoint-*") if complete(path))
    # a checkpoint the kill cut short, as a kill while saving leaves it: weights, no trainer_state.json
    partial = out / f"checkpoint-{saved + 4}"
    if not partial.exists():
        partial.mkdir()
        (partial / "model.safetensors").write_bytes(b"cut short")
    assert not complete(partial)
    assert fastdpo(workdir, "dpo", out, "--resume") == 0
    assert f"checkpoint-{saved + 4} was not completely written" in caplog.text
    assert_same_run("dpo", out, reference)
    assert complete(partial)  # saved again by the resumed run


@pytest.mark.parametrize(("command", "signum"), [("dpo", signal.SIGINT), ("sft", signal.SIGTERM)])
def test_a_signal_saves_a_checkpoint_and_stops_and_the_run_resumes(workdir, straight, command, signum):
    reference = straight(command)
    out = workdir / f"{command}_{signum.name}"
    process = start(workdir, command, out)
    wait_until(lambda: len(train_steps(out)) >= 2, process)
    process.send_signal(signum)
    assert process.wait(timeout=120) == 128 + signum  # 130, 143: the shell's status for a run a signal stopped
    stderr = (workdir / f"{out.name}.stderr").read_text()
    assert f"fastdpo: {signum.name}: finishing this optimizer step" in stderr  # at once, when the signal came
    message = re.search(rf"fastdpo: stopped by {signum.name} after step (\d+): saved (\S+); resume with: (.*)", stderr)
    assert message, stderr[-3000:]
    step = int(message[1])
    assert Path(message[2]) == out / f"checkpoint-{step}" and complete(out / f"checkpoint-{step}")
    assert message[3].endswith(f"--output_dir {out} --resume")
    assert "Traceback" not in stderr
    assert_unfinished(out)
    assert train_steps(out)[-1]["step"] == step  # stopped at the step it saved
    assert fastdpo(workdir, command, out, "--resume") == 0
    assert_same_run(command, out, reference)


def test_a_sigterm_to_the_process_group_leaves_the_data_loader_workers_to_their_run(workdir):
    # a scheduler's SIGTERM to the whole group (kill -TERM -PGID) killed torch's data-loader workers too, whose death
    # raised "DataLoader worker ... is killed by signal: Terminated" in the run wherever it was: exit 1, often no
    # checkpoint (2 runs in 4)
    out = workdir / "dpo_group_SIGTERM"
    process = start(workdir, "dpo", out, "--dataloader_num_workers", "1", group=True)
    wait_until(lambda: len(train_steps(out)) >= 2, process)
    os.killpg(process.pid, signal.SIGTERM)
    assert process.wait(timeout=120) == 128 + signal.SIGTERM
    stderr = (workdir / f"{out.name}.stderr").read_text()
    message = re.search(r"fastdpo: stopped by SIGTERM after step (\d+): saved (\S+);", stderr)
    assert message and complete(Path(message[2])), stderr[-3000:]
    assert "killed by signal" not in stderr and "Traceback" not in stderr
    assert_unfinished(out)


def test_a_run_with_persistent_data_loader_workers_ends(workdir):
    # a first version of the workers' SIGTERM fix applied to persistent workers too: they outlive train(), and
    # Python's exit stops them with a SIGTERM it then waits on: the run trained, saved, and never ended
    out = workdir / "dpo_persistent"
    process = start(workdir, "dpo", out, "--max_steps", "4", "--dataloader_num_workers", "1",
                    "--dataloader_persistent_workers", "true")  # fmt: skip
    try:
        assert process.wait(timeout=180) == 0
    finally:
        if process.poll() is None:  # (hung: its workers first, while they are still its children)
            subprocess.run(["pkill", "-KILL", "-P", str(process.pid)], check=False)
            process.kill()
    assert (out / "model.safetensors").is_file()


def test_resume_refuses_other_settings_and_a_directory_without_checkpoints(workdir, straight, capsys):
    out = straight("dpo")
    recorded = (out / "config.yaml").read_text()
    # logging_steps may change; learning_rate and beta change what a step computes
    code = fastdpo(workdir, "dpo", out, "--resume", "--learning_rate", "0.1", "--beta", "0.5", "--logging_steps", "2")
    assert code == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("fastdpo: error: option 'resume'") and "learning_rate: 0.03 -> 0.1" in line, line
    assert "beta" not in line and "logging_steps" not in line and "--overwrite" in line
    assert (out / "config.yaml").read_text() == recorded  # nothing written
    # the data file changed under the run (it went on over other rows: its sampler's order points elsewhere)
    data = workdir / "pairs.jsonl"
    original = data.read_text()
    try:
        data.write_text(original.replace('"prompt":"', '"prompt":"Q: ', 1))
        assert fastdpo(workdir, "dpo", out, "--resume", "--max_steps", "65") == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert "option 'resume': the data files differ from those the run trained on" in line, line
    finally:
        data.write_text(original)
    assert json.loads((out / "data_fingerprint.json").read_text())["pairs.jsonl"]["size"] == len(original.encode())
    assert fastdpo(workdir, "dpo", workdir / "never_ran", "--resume") == 2
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("fastdpo: error: option 'resume'") and "no complete checkpoint" in line, line
    assert not (workdir / "never_ran").exists()


def test_no_checkpoint_is_left_that_a_later_resume_would_wrongly_take(workdir, straight, capsys):
    run = workdir / "branches"
    shutil.copytree(straight("dpo"), run)
    capsys.readouterr()

    def last_error() -> str:
        return capsys.readouterr().err.strip().splitlines()[-1]

    # --resume PATH back to an earlier step: the later checkpoints are another future of the run
    assert fastdpo(workdir, "dpo", run, "--resume", str(run / "checkpoint-4"), "--max_steps", "6") == 2
    line = last_error()
    assert "later steps than checkpoint-4 (checkpoint-8, checkpoint-12, checkpoint-16 and 12 more)" in line, line
    # resumed into a new run directory: compared with the settings of the checkpoint's run
    elsewhere = workdir / "elsewhere"
    assert fastdpo(workdir, "dpo", elsewhere, "--resume", str(run / "checkpoint-4"), "--beta", "0.9") == 2
    assert "beta: 0.5 -> 0.9" in last_error() and not elsewhere.exists()
    # TRL's resume_from_checkpoint key resumes as --resume PATH does (it was recorded and ignored); without gradient
    # checkpointing (a setting of memory, not of what a step computes: it was refused), to the same numbers
    checkpoint = str(run / "checkpoint-4")
    assert fastdpo(workdir, "dpo", elsewhere, "--resume_from_checkpoint", checkpoint, "--max_steps", "6",
                   "--gradient_checkpointing", "false") == 0  # fmt: skip
    theirs = {log["step"]: log["loss"] for log in train_steps(run)}
    assert {log["step"]: log["loss"] for log in train_steps(elsewhere)} == pytest.approx({5: theirs[5], 6: theirs[6]})
    assert fastdpo(workdir, "dpo", elsewhere, "--resume", checkpoint) == 2  # another run's, into a run directory
    assert "elsewhere exists and is not empty" in last_error()
    # a checkpoint that fails to load leaves the later ones: they go once it has loaded, when training begins
    damaged = run / "damaged"
    shutil.copytree(run / "checkpoint-4", damaged)
    (damaged / "model.safetensors").write_bytes(b"not a model")
    assert fastdpo(workdir, "dpo", run, "--resume", str(damaged), "--overwrite", "--max_steps", "6") == 2
    said = capsys.readouterr().err  # (it was safetensors' own "header" error, naming no file)
    assert "damaged/model.safetensors is cut short (11 bytes, shorter than its header says)" in said, said
    assert len(list(run.glob("checkpoint-*"))) == 16 and "removed" not in said
    shutil.rmtree(damaged)
    # a run started over that fails before training begins (an optimizer whose package is missing) leaves the run it
    # would replace whole: its checkpoints and the config.yaml they go with (a --resume took the old checkpoints on
    # under the new config.yaml)
    recorded = (run / "config.yaml").read_text()
    assert fastdpo(workdir, "dpo", run, "--overwrite", "--optim", "lomo", "--beta", "0.9") == 1
    said = capsys.readouterr().err  # (one line: the CLI's unexpected error)
    assert "fastdpo: error: ImportError: " in said and "lomo" in said
    assert len(list(run.glob("checkpoint-*"))) == 16 and (run / "config.yaml").read_text() == recorded
    # with --overwrite the later checkpoints go; then a run started over removes the earlier run's
    assert fastdpo(workdir, "dpo", run, "--resume", checkpoint, "--overwrite", "--max_steps", "6") == 0
    assert sorted(path.name for path in run.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]  # (6: the end)
    assert fastdpo(workdir, "dpo", run, "--overwrite", "--max_steps", "2") == 0
    assert "removed 2 checkpoint(s) of the run this one replaces" in capsys.readouterr().err
    assert [path.name for path in run.glob("checkpoint-*")] == ["checkpoint-2"]  # its own: --resume goes on from it
    # TRL's resume_from_checkpoint: true (YAML's boolean, or the flag's word) is the last checkpoint (refused before)
    assert fastdpo(workdir, "dpo", run, "--resume_from_checkpoint", "true", "--max_steps", "3") == 0
    assert [log["step"] for log in train_steps(run)] == [1, 2, 3]
    from fastdpo.cli import _resolve
    from fastdpo.train import DPOConfig

    values = {"model_name_or_path": "m", "dataset_name": "d", "output_dir": "o", "resume_from_checkpoint": True}
    assert _resolve(DPOConfig, values, [])[1].resume_from_checkpoint == "true"


def test_stale_checkpoints_are_only_the_trainers_own_and_never_the_runs_model(tmp_path):
    from fastdpo.cli_resume import stale_checkpoints
    from fastdpo.errors import ConfigError

    def saved(folder: Path, step: int | None) -> Path:  # None: a folder that is no Trainer checkpoint (a model)
        folder.mkdir(parents=True)
        if step is not None:
            (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        return folder

    run = tmp_path / "run"
    two, six, nine = saved(run / "checkpoint-2", 2), saved(run / "checkpoint-6", 6), saved(run / "checkpoint-9", 9)
    model = saved(run / "checkpoint-500", None)  # a model saved under a checkpoint's name: the run starts from it
    saved(run / "checkpoint-900", None).joinpath("trainer_state.json").write_text("{}")  # no step: no checkpoint
    best = saved(run / "best", 6)
    (run / "latest").symlink_to(six, target_is_directory=True)
    other = saved(tmp_path / "other" / "checkpoint-3", 3)
    (run / "checkpoint-40").symlink_to(other, target_is_directory=True)  # a link is never removed (nor followed)
    keep = (str(model), None)
    assert stale_checkpoints(run, None, overwrite=False, keep=keep) == []
    assert stale_checkpoints(run, None, overwrite=True, keep=keep) == [two, six, nine]  # never the model
    for checkpoint in (six, best, run / "latest"):  # by its step, whatever its name or link
        assert stale_checkpoints(run, str(checkpoint), overwrite=True, keep=keep) == [nine]
        with pytest.raises(ConfigError, match="later steps than .*\\(checkpoint-9\\)"):
            stale_checkpoints(run, str(checkpoint), overwrite=False, keep=keep)
    assert stale_checkpoints(run, str(nine), overwrite=False, keep=keep) == []
    assert stale_checkpoints(run, str(other), overwrite=True, keep=keep) == [two, six, nine]  # another run's
    # a link in the run directory is the run's own checkpoint, stored elsewhere: only the later ones are stale
    assert stale_checkpoints(run, str(run / "checkpoint-40"), overwrite=True, keep=keep) == [six, nine]
    # a Trainer checkpoint the run leaves behind that holds what it reads (its model; its data file) is refused: it
    # cannot go, and a later --resume went on from it (an earlier run's optimizer and step, the new run's log)
    start, holder = saved(run / "checkpoint-700", 700), saved(run / "checkpoint-800", 800)
    for held, read in ((start, start), (holder, holder / "data" / "pairs.jsonl")):
        for resumed in (None, str(six)):
            with pytest.raises(ConfigError, match=rf"{held.name} holds what this run reads .*copy it out of the run"):
                stale_checkpoints(run, resumed, overwrite=True, keep=(str(read),))
    assert model.is_dir()
    from fastdpo.cli_resume import checkpoint_to_resume, remove_checkpoints

    with pytest.raises(ConfigError, match="checkpoint-900 is not a complete checkpoint"):  # (no step recorded)
        checkpoint_to_resume(run, str(run / "checkpoint-900"))

    assert remove_checkpoints([six, nine]) == [] and not six.exists() and not nine.exists() and two.is_dir()


@pytest.fixture
def interactive_sigint():
    """SIGINT raising KeyboardInterrupt, as Python sets it up at a terminal (not ignored, as in a background job)."""
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, before)


def test_a_second_signal_acts_as_before_and_the_handlers_are_restored(interactive_sigint):
    callbacks = []
    trainer = SimpleNamespace(args=SimpleNamespace(world_size=1), add_callback=callbacks.append,
                              remove_callback=callbacks.remove)  # fmt: skip
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with stop_on_signals(trainer) as callback:
        assert callbacks == [callback] and signal.getsignal(signal.SIGINT) not in before
        os.kill(os.getpid(), signal.SIGINT)  # handled before os.kill returns to the next bytecode
        assert callback.signum == signal.SIGINT
        assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # not reached
    assert callbacks == [] and (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
    trainer.args.world_size = 2  # processes would have to agree on the step: not handled
    with stop_on_signals(trainer):
        assert callbacks == [] and signal.getsignal(signal.SIGINT) is before[0]


def test_the_interruption_is_exported_where_the_trainers_are():
    import fastdpo.train
    from fastdpo.train import interrupt

    assert fastdpo.train.TrainingInterrupted is interrupt.TrainingInterrupted
    assert issubclass(fastdpo.train.TrainingInterrupted, KeyboardInterrupt)  # a bare `except Exception` lets it pass


@pytest.mark.parametrize("best", [True, False])
def test_a_stops_checkpoint_outlives_save_total_limit_1_beside_the_best(interactive_sigint, tmp_path, best):
    # save_total_limit=1 with a best checkpoint: the Trainer's end of training deletes every checkpoint but the best,
    # the stop's too, just saved ("no checkpoint of it was saved"; --resume went back to the best's step). Without a
    # best, one checkpoint is kept, as the user asked (a first fix kept the one before the stop's too)
    from test_train_resume import args
    from transformers import TrainerCallback

    from fastdpo.train import DPOConfig, DPOTrainer, TrainingInterrupted

    class SignalAt(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 5:
                os.kill(os.getpid(), signal.SIGINT)

    tokenizer = build_tiny_tokenizer()
    # (the best: step 2's, its eval loss the highest, as greater_is_better asks)
    ranked = {"eval_strategy": "steps", "eval_steps": 2, "load_best_model_at_end": True,
              "metric_for_best_model": "eval_loss", "greater_is_better": True} if best else {}  # fmt: skip
    config = args(tmp_path, "run", DPOConfig, beta=0.5, save_steps=2, save_total_limit=1, max_steps=12, **ranked)
    trainer = DPOTrainer(tiny_model(tokenizer, tmp_path / "model")(), args=config, train_dataset=pairs(24),
                         eval_dataset=pairs(8, seed=5), processing_class=tokenizer, callbacks=[SignalAt()])  # fmt: skip
    with pytest.raises(TrainingInterrupted) as stopped:
        trainer.train()
    assert stopped.value.checkpoint == str(tmp_path / "run" / "checkpoint-5") and complete(tmp_path / "run" /
                                                                                           "checkpoint-5")  # fmt: skip
    kept = ["checkpoint-2", "checkpoint-5"] if best else ["checkpoint-5"]
    assert sorted(path.name for path in (tmp_path / "run").glob("checkpoint-*")) == kept
    assert trainer.args.save_total_limit == 1  # (the user's again)
    import torch

    saved = torch.load(tmp_path / "run" / "checkpoint-5" / "training_args.bin", weights_only=False)
    assert saved.save_total_limit == 1  # the checkpoint's settings: the user's (it recorded 2, the stop's)


def test_a_stopped_streams_dropped_rows_are_written_and_a_stop_before_training_names_no_checkpoint(workdir, tmp_path):
    # a stream counts its dropped rows as it reads them: dropped_rows.json was written when training ended, so a
    # stopped run left it empty ({"train": {}}) where stderr had named them; a stop before training began said
    # "--resume goes on from the last complete one", and --resume then found none
    from fastdpo.cli_resume import stopped_at_once

    rows = [json.loads(line) for line in (workdir / "pairs.jsonl").read_text().splitlines()]
    for row in (1, 5):  # a prompt that fills max_length (64 tokens): TRL's drop, counted
        rows[row]["prompt"] = "sky " * 80
    (workdir / "long.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = workdir / "dpo_stream_SIGINT"
    process = start(workdir, "dpo", out, "--dataset_name", "long.jsonl", "--dataset_streaming", "true")
    wait_until(lambda: len(train_steps(out)) >= 2, process)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130
    dropped = json.loads((out / "dropped_rows.json").read_text())["train"]
    assert sorted(row for rows in dropped.values() for row in rows) == [1, 5], dropped
    saved = re.search(r"fastdpo: stopped by SIGINT after step \d+: saved (\S+);", (workdir / f"{out.name}.stderr")
                      .read_text())  # fmt: skip
    assert stopped_at_once(out).endswith(f"; --resume goes on from the last complete one ({saved[1]})")
    assert stopped_at_once(tmp_path).endswith("; there is no checkpoint to resume")
    assert stopped_at_once(None).endswith("; there is no checkpoint to resume")  # (before the config was read)


def test_a_resume_may_turn_checkpointing_on_or_off_but_not_change_how_it_keeps_the_random_state(tmp_path):
    # preserve_rng_state: false recomputes dropout otherwise (a model that keeps dropout: step-2 loss 0.7969095 where
    # 0.7816908), so the kwargs are compared; gradient checkpointing itself is not (the same numbers, tested above)
    import yaml

    from fastdpo.cli_resume import refuse_changed_config
    from fastdpo.errors import ConfigError

    recorded = {"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": False}, "beta": 0.1}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(recorded))
    refuse_changed_config(tmp_path / "config.yaml", {**recorded, "gradient_checkpointing": False}, overwrite=False)
    for kwargs in (None, {"use_reentrant": True}, {"use_reentrant": False, "preserve_rng_state": True}):  # (the same)
        changed = {**recorded, "gradient_checkpointing": False, "gradient_checkpointing_kwargs": kwargs}
        refuse_changed_config(tmp_path / "config.yaml", changed, overwrite=False)
    changed = {**recorded, "gradient_checkpointing_kwargs": {"preserve_rng_state": False}}
    with pytest.raises(ConfigError, match="gradient_checkpointing_kwargs"):
        refuse_changed_config(tmp_path / "config.yaml", changed, overwrite=False)
