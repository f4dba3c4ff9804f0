"""DPO, the classic TRL tutorial flow, with fastdpo: load a chat model and a preference dataset, SFT, DPO, evaluate,
compare. As shipped it runs on the embedded default (a tiny model and the quickstart task) on a CPU in a few
minutes; change the two names below to run it on a hub model and dataset.

    python examples/dpo_tutorial.py [--model NAME] [--dataset NAME] [--sft-steps N] [--dpo-steps N] [--out DIR]

The notebook examples/dpo_tutorial.ipynb holds the same cells (``python examples/make_notebook.py`` writes it from
this file; a test keeps the two in step). Each ``# %%`` line starts a cell.
"""

# %% [markdown]
# # DPO with fastdpo
# Two names choose the model and the data. `fastdpo:tiny` and `fastdpo:quickstart` are built here, with nothing
# downloaded; e.g. `Qwen/Qwen2.5-0.5B-Instruct` and `trl-lib/ultrafeedback_binarized` run the same code on the hub's.

# %%
import argparse
import sys
from pathlib import Path

import datasets
import torch

from fastdpo.compare import compare, summary
from fastdpo.data import prepare_preferences
from fastdpo.train import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

MODEL = "fastdpo:tiny"  # or a hub name, e.g. "Qwen/Qwen2.5-0.5B-Instruct"
DATASET = "fastdpo:quickstart"  # or a hub name, e.g. "trl-lib/ultrafeedback_binarized"

parser = argparse.ArgumentParser(description="DPO, the classic flow, with fastdpo")
parser.add_argument("--model", default=MODEL)
parser.add_argument("--dataset", default=DATASET)
parser.add_argument("--sft-steps", type=int, default=1000)
parser.add_argument("--dpo-steps", type=int, default=500)
parser.add_argument("--out", type=Path, default=Path("runs/tutorial"))
args = parser.parse_args([] if "ipykernel" in sys.modules else None)  # a notebook passes no flags
on_cpu = not torch.cuda.is_available()

# %% [markdown]
# ## Load a chat model and a preference dataset

# %%
if args.model == "fastdpo:tiny":
    from fastdpo.quickstart import build_char_tokenizer, build_model

    tokenizer = build_char_tokenizer()
    model = build_model(tokenizer, seed=0)
else:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype="auto")

if args.dataset == "fastdpo:quickstart":
    from fastdpo.quickstart import make_data

    sft_rows, train_pairs, test_pairs, _ = make_data(seed=0)
    sft_data = datasets.Dataset.from_list(sft_rows)  # prompt/completion, with the task's systematic slip
    train_data, test_data = datasets.Dataset.from_list(train_pairs), datasets.Dataset.from_list(test_pairs)
else:
    preferences = datasets.load_dataset(args.dataset)
    train_data, test_data = preferences["train"], preferences["test"]
    sft_data = train_data.map(lambda row: {"messages": row["chosen"]}, remove_columns=train_data.column_names)
print(f"{len(sft_data)} SFT rows, {len(train_data)} training pairs, {len(test_data)} held-out pairs")

# %% [markdown]
# ## SFT

# %%
common = {"report_to": [], "save_strategy": "no", "logging_steps": 50, "weight_decay": 0.0, "use_cpu": on_cpu,
          "gradient_checkpointing": not on_cpu, "disable_tqdm": True}  # fmt: skip
sft_args = SFTConfig(output_dir=str(args.out / "sft"), max_steps=args.sft_steps, per_device_train_batch_size=64,
                     learning_rate=2e-3 if args.model == "fastdpo:tiny" else 2e-5, warmup_steps=50,
                     lr_scheduler_type="constant_with_warmup", **common)  # fmt: skip
SFTTrainer(model, args=sft_args, train_dataset=sft_data, processing_class=tokenizer).train()
model.save_pretrained(args.out / "sft")
tokenizer.save_pretrained(args.out / "sft")

# %% [markdown]
# ## DPO, with the SFT model as reference
# RPO (`loss_type=["sigmoid", "sft"]`) keeps the chosen answers likely; the trainer warns if they become less likely
# while reward accuracy rises (likelihood displacement).

# %%
reference = type(model).from_pretrained(args.out / "sft")
dpo_args = DPOConfig(output_dir=str(args.out / "dpo"), max_steps=args.dpo_steps, per_device_train_batch_size=32,
                     learning_rate=1e-4 if args.model == "fastdpo:tiny" else 5e-7, beta=0.1,
                     loss_type=["sigmoid", "sft"], loss_weights=[1.0, 1.0], lr_scheduler_type="constant",
                     **common)  # fmt: skip
trainer = DPOTrainer(model, ref_model=reference, args=dpo_args, train_dataset=train_data, eval_dataset=test_data,
                     processing_class=tokenizer)  # fmt: skip
trainer.train()
trainer.save_model(str(args.out / "dpo"))

# %% [markdown]
# ## Evaluate on the held-out pairs

# %%
metrics = trainer.evaluate()
for name in ("eval_rewards/accuracies", "eval_rewards/margins", "eval_logps/chosen", "eval_logps/rejected"):
    print(f"{name}: {metrics[name]:.4f}")

# %% [markdown]
# ## Compare the policy with its reference, answer by answer

# %%
# (prepare_preferences: the prompt as training read it, also where a dataset keeps it inside chosen/rejected)
held_out = prepare_preferences(test_data.select(range(8)))
prompts = [(f"held-out {i}", prompt) for i, prompt in enumerate(held_out["prompt"])]
rows = compare(trainer.model, reference, tokenizer, prompts, beta=0.1, samples=2, max_new_tokens=16)
for row in rows:
    print(f"{row.prompt!r:>24} policy {row.policy.text!r} ({row.policy.reward:+.3f})  reference {row.reference.text!r}")
print(summary(rows))
