"""README.md's Python blocks run as written, on tiny stand-ins for the names they take as given.

Each block is executed verbatim in a namespace that holds what the README leaves to the reader (``hidden``,
``lm_head``, ``tokenizer``, ``chats``, ``model`` ...): small tensors, the tests' tiny Llama and tokenizer, the
fixture files. The only edits to a block's text: a placeholder path (``"path/to/model"``) replaced by a real one,
and ``bf16=False`` added to TRL's config in the drop-in block (transformers refuses TRL's bf16 default on a CPU).
Each test then checks what the block's comments promise. A block added to README without a test here fails
``test_every_python_block_is_run``.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from test_train_dpo import tiny_model
from tiny_tokenizer import build_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).resolve().parent / "fixtures"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```$", (ROOT / "README.md").read_text(encoding="utf-8"), re.S | re.M)


def block(first_line: str) -> str:
    """The README block that starts with ``first_line``; exactly one must."""
    found = [text for text in python_blocks() if text.startswith(first_line)]
    assert len(found) == 1, f"{len(found)} README python blocks start with {first_line!r}"
    return found[0]


FIRST_LINES = {
    "ops": "import torch\nfrom fastdpo.ops import linear_logprobs",
    "liger": "from fastdpo.ops import FusedLinearDPOLoss",
    "data": "from fastdpo.data import (",
    "packing": "from fastdpo.data import pack_pairs",
    "trainers": "from fastdpo import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer",
    "dropin": "from fastdpo.trl import DPOTrainer",
    "step": "from fastdpo.ops import LossConfig\nfrom fastdpo.train import preference_step",
}


def test_every_python_block_is_run():
    tested = {block(line) for line in FIRST_LINES.values()}
    untested = [text.splitlines()[0] for text in python_blocks() if text not in tested]
    assert not untested, f"README python blocks with no test in {Path(__file__).name}: {untested}"


def run(name: str, namespace: dict, replace: dict[str, str] | None = None) -> dict:
    source = block(FIRST_LINES[name])
    for old, new in (replace or {}).items():
        assert old in source, f"README's {name} block no longer has {old!r}"
        source = source.replace(old, new)
    exec(compile(source, f"README.md ({name} block)", "exec"), namespace)
    return namespace


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    """A working directory of its own: the blocks write output_dir="sft", "dpo" relative to it."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


def tiny_model_dir(path: Path) -> Path:
    tokenizer = build_tiny_tokenizer()
    tiny_model(tokenizer, path)
    tokenizer.save_pretrained(path)
    return path


def test_ops_block():
    torch.manual_seed(0)
    hidden = torch.randn(2, 7, 16, requires_grad=True)
    lm_head = torch.nn.Linear(16, 50, bias=False)
    targets = torch.randint(0, 50, (2, 7))
    targets[:, :3] = -100  # a prompt
    cu_seqlens = torch.tensor([0, 7, 14])
    pc, pr, rc, rr = (torch.randn(3, dtype=torch.float64) for _ in range(4))
    lc, lr = torch.tensor([4.0, 5.0, 6.0]), torch.tensor([3.0, 2.0, 7.0])
    ns = run("ops", {"hidden": hidden, "lm_head": lm_head, "targets": targets, "cu_seqlens": cu_seqlens, "pc": pc,
                     "pr": pr, "rc": rc, "rr": rr, "lc": lc, "lr": lr})  # fmt: skip
    out = ns["out"]
    # the comments' promises, against full logits in fp64 (tolerance: fp32 chunked sums of 50 terms)
    full = torch.log_softmax(hidden.detach().double() @ lm_head.weight.detach().double().T, -1)
    expected = full.gather(-1, targets.clamp(min=0)[..., None])[..., 0] * (targets != -100)
    torch.testing.assert_close(out.logp.double(), expected, rtol=1e-5, atol=1e-5)
    assert out.logp.dtype == torch.float32 and out.entropy.shape == targets.shape
    torch.testing.assert_close(ns["seq_logps"].double(), expected.sum(-1), rtol=1e-5, atol=1e-5)
    out.logp.sum().backward()
    assert hidden.grad is not None and lm_head.weight.grad is not None
    loss = ns["loss"]
    assert loss.loss.ndim == 0 and loss.per_pair.shape == (3,) and "rewards/accuracies" in loss.metrics
    # sigmoid DPO: -log sigmoid(beta * ((pc - rc) - (pr - rr))), mean over pairs
    margin = 0.1 * ((pc - rc) - (pr - rr))
    torch.testing.assert_close(loss.loss.double(), -torch.nn.functional.logsigmoid(margin).mean(), rtol=1e-6, atol=0)


def test_liger_block():
    torch.manual_seed(0)
    lm_head, ref_head = torch.nn.Linear(16, 40, bias=False), torch.nn.Linear(16, 40, bias=False)
    hidden, ref_hidden = torch.randn(4, 6, 16, requires_grad=True), torch.randn(4, 6, 16)
    target = torch.randint(0, 40, (4, 6))
    target[:, :2] = -100
    ns = run("liger", {"lm_head": lm_head, "hidden": hidden, "target": target, "ref_hidden": ref_hidden,
                       "ref_head": ref_head})  # fmt: skip
    loss, aux = ns["loss"], ns["aux"]
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert len(aux) >= 5 and aux[0].shape == (2,) and aux[1].shape == (2,)  # chosen_logps, rejected_logps per pair
    loss.backward()
    assert hidden.grad is not None and torch.isfinite(hidden.grad).all()


def test_data_block(in_tmp):
    shutil.copy(FIXTURES / "distilabel_orca.jsonl", in_tmp / "orca_pairs.jsonl")
    ns = run("data", {"tokenizer": build_tiny_tokenizer()})
    rows = ns["pairs"].num_rows
    assert rows == len((FIXTURES / "distilabel_orca.jsonl").read_text().splitlines())
    # the filter drops the fixture's ties and says so, and the two sides of the split hold the rest
    ties = sum(status == "tie" for status in ns["pairs"]["status"])
    assert ties > 0 and sum(ns["dropped"].values()) >= ties
    assert ns["clean"].num_rows == rows - sum(ns["dropped"].values())
    assert ns["train"].num_rows + ns["held_out"].num_rows == ns["clean"].num_rows
    assert set(ns["train"]["prompt"]).isdisjoint(ns["held_out"]["prompt"])
    assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(ns["tokenized"].dataset.column_names)


def tokenized_pairs(tokenizer, n: int) -> list[dict]:
    from fastdpo.data import tokenize_preferences

    rows = [{"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}, I think."}
            for i in range(n)]  # fmt: skip
    return list(tokenize_preferences(rows, tokenizer, max_length=64).dataset)


def test_packing_block(tmp_path):
    tokenizer = build_tiny_tokenizer()
    model = tiny_model(tokenizer, tmp_path / "model")()
    rows = tokenized_pairs(tokenizer, 4)
    rows[1]["chosen_ids"] = rows[1]["chosen_ids"] * 4  # lengths that differ: the packer reorders the sequences in rows
    import datasets

    from fastdpo.data.tokenize import TokenizedPreferences

    # (the block packs tokenize_preferences' result, as the data block before it names it)
    ns = run("packing", {"tokenized": TokenizedPreferences(datasets.Dataset.from_list(rows)), "model": model})
    batch, chosen, rejected = ns["batch"], ns["chosen"], ns["rejected"]
    assert chosen.shape == rejected.shape == (4,) and (chosen < 0).all() and (rejected < 0).all()
    assert batch.seq_pair[batch.seq_pair >= 0].tolist() != sorted(batch.seq_pair[batch.seq_pair >= 0].tolist())
    # pair order: each sum equals the same pair scored alone (the boolean mask of the earlier snippet gave row order)
    for i, row in enumerate(rows):
        alone = ns["pack_pairs"]([row], pack_length=None, max_length=1024, split_pairs=True)
        single = ns["packed_logps"](model, alone).seq_logps[alone.pair_segments()][0]
        torch.testing.assert_close(chosen[i], single[0], rtol=1e-5, atol=1e-5)  # fp32 sums in another order
        torch.testing.assert_close(rejected[i], single[1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_trainers_block(in_tmp):
    import datasets

    datasets.disable_progress_bars()
    shutil.copy(FIXTURES / "sft_messages.jsonl", in_tmp / "chats.jsonl")  # the files the block reads
    # 84 pairs, 4 held out: 10 steps an epoch, so that the default logging_steps (10) logs a step
    rows = [{"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}."} for i in range(84)]
    (in_tmp / "pairs.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    model_dir = tiny_model_dir(in_tmp / "model")
    ns = run("trainers", {}, replace={'"path/to/model"': repr(str(model_dir))})
    assert len(ns["held_out"]) == 4 and len(ns["pairs"]) == 80
    assert ns["sft"].state.global_step > 0 and (in_tmp / "sft" / "config.json").is_file()
    assert (in_tmp / "sft" / "tokenizer.json").is_file()  # "loads straight into DPO"
    logged = {key for log in ns["trainer"].state.log_history for key in log}
    assert {"loss", "rewards/accuracies", "logps/chosen", "padding_fraction", "tokens_per_second"} <= logged


@pytest.mark.slow
def test_dropin_block(in_tmp):
    import datasets

    pytest.importorskip("trl")
    datasets.disable_progress_bars()
    tokenizer = build_tiny_tokenizer()
    model = tiny_model(tokenizer, in_tmp / "model")()
    model.config._name_or_path = str(tiny_model_dir(in_tmp / "model"))  # the trainer finds the tokenizer there
    rows = [{"prompt": f"What is {i} + {i}?", "chosen": f"{2 * i}.", "rejected": f"{2 * i + 1}."} for i in range(8)]
    # TRL's configs default to bf16, which transformers refuses on a CPU: the one edit to this block's text
    ns = run(
        "dropin",
        {"model": model, "pairs": datasets.Dataset.from_list(rows)},
        replace={'DPOConfig(output_dir="dpo", beta=0.1)': 'DPOConfig(output_dir="dpo", beta=0.1, bf16=False)'},
    )
    trainer = ns["trainer"]
    assert type(trainer).__module__.startswith("fastdpo") and trainer.state.global_step > 0
    assert any("rewards/margins" in log for log in trainer.state.log_history)


def test_step_block(tmp_path):
    from fastdpo.data import pack_pairs

    tokenizer = build_tiny_tokenizer()
    load = tiny_model(tokenizer, tmp_path / "model")
    policy, reference = load(), load()
    batch = pack_pairs(tokenized_pairs(tokenizer, 3), pack_length=None, max_length=64)
    ns = run("step", {"policy": policy, "batch": batch, "reference": reference})  # (the block imports the rest)
    out = ns["out"]
    # policy == reference: every reward is 0, the loss log 2
    assert out.loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-6)
    assert {"rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen"} <= set(
        out.metrics
    )
    assert all(p.grad is not None for p in policy.parameters() if p.requires_grad)
