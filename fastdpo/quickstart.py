"""The whole job on a CPU in minutes: SFT, then DPO with the SFT model as reference, then proof it helped.

    fastdpo quickstart [--out runs/quickstart] [--seed 0] [--short] [--overwrite]

Everything ships here; nothing is downloaded:

- **The task**: ``next: 479`` → ``480`` and ``prev: 480`` → ``479`` for numbers 10–998, with a ground-truth
  checker (``check``). Half the problems carry or borrow (``…9 + 1``, ``…0 − 1``).
- **SFT data with a systematic mistake**: in 60% of the carry/borrow problems the answer forgets the carry
  (``next: 479`` → ``470``) or the borrow (``prev: 480`` → ``489``), a realistic slip of the same length and
  format. The SFT model learns the slip, so its greedy answers are wrong on many of those problems.
- **Preference pairs**: chosen is the correct answer. Rejected is the slip, or for problems without a carry a
  wrong carry (``next: 473`` → ``484``). Chosen and rejected always have the same length, so length alone cannot
  separate them; the report proves it with a length-only baseline.
- **The model**: a 4-layer Llama (hidden 128) built from a config, with a character-level tokenizer (digits, the
  two commands) trained here with ``tokenizers``.
- **The runs**: ``fastdpo.SFTTrainer`` from scratch, then ``fastdpo.DPOTrainer`` with the SFT model as
  reference, then ``fastdpo compare`` (edge-case prompts and held-out problems, in ``compare/``).
  - The DPO loss is TRL's RPO: ``loss_type=["sigmoid", "sft"]``, ``loss_weights=[1, 1]``, β 0.1, lr 1e-4.
  - Plain sigmoid at a high learning rate displaces the chosen answers here: reward accuracy reaches 1.0 while
    their likelihood falls and greedy answers do not improve.

The report (printed, and ``report.json``/``report.md`` in ``--out``) compares the reference (the SFT model) with
the policy on held-out pairs and prompts no training row contains:

- reward accuracy and mean margin, with the implicit reward ``β·(log π(y|x) − log π_ref(y|x))``;
- the chosen answers' NLL per token (general capability kept);
- the checker's success rate on greedy answers, overall and on carry/borrow problems.

``--short`` trains fewer steps (CI runs it).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from fastdpo.atomic import atomic_write, refuse_non_empty

COMMANDS = ("next", "prev")
CHARS = "0123456789: " + "".join(sorted(set("nextprv")))
SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]


# ----------------------------------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class Problem:
    command: str
    number: int
    hard: bool  # carries (next) or borrows (prev)

    @property
    def prompt(self) -> str:
        return f"{self.command}: {self.number} "

    @property
    def answer(self) -> str:
        return str(self.number + 1 if self.command == "next" else self.number - 1)

    @property
    def slip(self) -> str:
        """The wrong answer of the same length: a forgotten carry/borrow, or a carry where there is none."""
        digits = str(self.number)
        if self.hard:
            return digits[:-1] + ("0" if self.command == "next" else "9")
        return str(self.number + 11 if self.command == "next" else self.number - 11)


def check(problem: Problem, answer: str) -> bool:
    """The ground truth: the answer, stripped of surrounding spaces, is the right number."""
    return answer.strip() == problem.answer


def make_problem(rng: random.Random, hard: bool | None = None) -> Problem:
    """One problem; ``hard`` (carry/borrow) with probability 1/2 unless given. Answer and slip have the length of
    the number (so 10 − 1 and 999 + 1 never occur)."""
    hard = rng.random() < 0.5 if hard is None else hard
    while True:
        command, number = rng.choice(COMMANDS), rng.randint(10, 998)
        last = number % 10
        if command == "next" and hard:
            number += 9 - last
        elif command == "prev" and hard:
            number -= last
        if not hard and ((last == 9 and command == "next") or (last == 0 and command == "prev")):
            continue
        problem = Problem(command, number, hard)
        if len(problem.answer) == len(problem.slip) == len(str(number)) and number >= 11:
            return problem


def make_data(seed: int, *, sft_rows: int = 6000, pairs: int = 2000, held_out: int = 300, slip_rate: float = 0.6):
    """SFT rows (with the systematic slip), preference pairs, held-out pairs and held-out problems.

    Held-out problems are drawn first and their prompts excluded from every training row."""
    rng = random.Random(seed)
    test = []
    seen: set[str] = set()
    while len(test) < held_out:
        problem = make_problem(rng)
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            test.append(problem)

    def fresh() -> Problem:
        while True:
            problem = make_problem(rng)
            if problem.prompt not in seen:
                return problem

    sft = []
    for _ in range(sft_rows):
        problem = fresh()
        slipped = problem.hard and rng.random() < slip_rate
        sft.append({"prompt": problem.prompt, "completion": problem.slip if slipped else problem.answer})
    train_pairs = [fresh() for _ in range(pairs)]
    return sft, [_pair(p) for p in train_pairs], [_pair(p) for p in test], test


def _pair(problem: Problem) -> dict:
    return {"prompt": problem.prompt, "chosen": problem.answer, "rejected": problem.slip}


def length_baseline_accuracy(pairs: list[dict]) -> float:
    """Accuracy of 'the longer answer is chosen' (a tie counts one half)."""
    score = 0.0
    for pair in pairs:
        chosen, rejected = len(pair["chosen"]), len(pair["rejected"])
        score += 1.0 if chosen > rejected else 0.5 if chosen == rejected else 0.0
    return score / len(pairs)


# ----------------------------------------------------------------------------------------- tokenizer and model


def build_char_tokenizer():
    """A character-level tokenizer over the task's alphabet, with BOS prepended, EOS and PAD."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, *CHARS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", pair="<bos> $A <bos> $B",
                                                       special_tokens=[("<bos>", vocab["<bos>"])])  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")  # fmt: skip


def build_model(tokenizer, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, attn_implementation="sdpa")  # fmt: skip
    return LlamaForCausalLM(config)


# ------------------------------------------------------------------------------------------------- evaluation


@torch.no_grad()
def sequence_logps(model, tokenizer, prompts: list[str], completions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ log π(completion + EOS | prompt) per row, and the number of scored tokens (as the DPO trainer scores)."""
    model.eval()
    rows = [(tokenizer(p)["input_ids"], tokenizer(c, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
            for p, c in zip(prompts, completions, strict=True)]  # fmt: skip
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    scored = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        scored[i, len(p) : len(p) + len(c)] = True
    device = next(model.parameters()).device  # the trainers leave a model on the GPU when there is one
    ids, scored = ids.to(device), scored.to(device)
    logits = model(input_ids=ids, attention_mask=(ids != tokenizer.pad_token_id) | scored).logits.float()
    logp = logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
    mask = scored[:, 1:]
    return (logp * mask).sum(-1).cpu(), mask.sum(-1).cpu()


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 6) -> list[str]:
    """Each prompt's greedy answer, up to EOS or ``max_new_tokens``. Prompts of the same token length decode as one
    batch, with no padding (a row attends to its own tokens only; batched products may round otherwise than a lone
    row's), a row leaving it at its EOS."""
    model.eval()
    encoded = [tokenizer(prompt)["input_ids"] for prompt in prompts]
    answers: list[list[int]] = [[] for _ in prompts]
    groups: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        groups.setdefault(len(ids), []).append(i)
    device = next(model.parameters()).device
    for live in groups.values():
        ids = torch.tensor([encoded[i] for i in live], device=device)
        for _ in range(max_new_tokens):
            tokens = model(input_ids=ids).logits[:, -1].argmax(-1)
            going = tokens != tokenizer.eos_token_id
            still = []
            for i, token, on in zip(live, tokens.tolist(), going.tolist(), strict=True):
                if on:
                    answers[i].append(token)
                    still.append(i)
            live = still
            if not live:
                break
            ids = torch.cat([ids[going], tokens[going, None]], dim=1)
    return [tokenizer.decode(answer) for answer in answers]


@dataclass
class Evaluation:
    checker_success: float
    checker_success_hard: float
    chosen_nll: float  # per token, held-out chosen answers
    reward_accuracy: float | None = None  # policy only: against the reference
    reward_margin: float | None = None
    examples: list[dict] = field(default_factory=list)


def evaluate(model, tokenizer, pairs: list[dict], problems: list[Problem], *, reference=None, beta: float = 0.1):
    prompts = [p["prompt"] for p in pairs]
    chosen, chosen_tokens = sequence_logps(model, tokenizer, prompts, [p["chosen"] for p in pairs])
    answers = greedy_answers(model, tokenizer, [p.prompt for p in problems])
    right = [check(p, a) for p, a in zip(problems, answers, strict=True)]
    hard = [r for r, p in zip(right, problems, strict=True) if p.hard]
    result = Evaluation(checker_success=sum(right) / len(right), checker_success_hard=sum(hard) / max(1, len(hard)),
                        chosen_nll=float(-chosen.sum() / chosen_tokens.sum()),
                        examples=[{"prompt": p.prompt, "answer": a, "correct": r}
                                  for p, a, r in list(zip(problems, answers, right, strict=True))[:6]])  # fmt: skip
    if reference is not None:
        rejected, _ = sequence_logps(model, tokenizer, prompts, [p["rejected"] for p in pairs])
        ref_chosen, _ = sequence_logps(reference, tokenizer, prompts, [p["chosen"] for p in pairs])
        ref_rejected, _ = sequence_logps(reference, tokenizer, prompts, [p["rejected"] for p in pairs])
        margin = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
        result.reward_accuracy = float((margin > 0).float().mean())
        result.reward_margin = float(margin.mean())
    return result


# ---------------------------------------------------------------------------------------------------------- run


@dataclass
class Settings:
    seed: int = 0
    sft_steps: int = 1000
    dpo_steps: int = 500
    sft_batch: int = 64
    dpo_batch: int = 32
    sft_lr: float = 2e-3
    dpo_lr: float = 1e-4
    beta: float = 0.1
    loss_type: tuple[str, ...] = ("sigmoid", "sft")
    loss_weights: tuple[float, ...] = (1.0, 1.0)

    @classmethod
    def short(cls, seed: int = 0) -> Settings:
        return cls(seed=seed, sft_steps=400, dpo_steps=100)


def run(out: Path, settings: Settings, *, log=print) -> dict:
    """SFT, DPO and the before/after evaluation; writes ``report.json``/``report.md`` and both models under ``out``."""
    import datasets
    from transformers.utils import logging as hf_logging

    from fastdpo.train import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_error()
    start = time.perf_counter()
    tokenizer = build_char_tokenizer()
    sft_rows, train_pairs, test_pairs, test_problems = make_data(settings.seed)
    common = {"report_to": [], "save_strategy": "no", "logging_steps": 50, "bf16": False, "seed": settings.seed,
              "use_cpu": not torch.cuda.is_available(), "weight_decay": 0.0, "disable_tqdm": True}  # fmt: skip
    log(f"SFT: {len(sft_rows)} rows (60% of the carry/borrow answers slip), {settings.sft_steps} steps")
    model = build_model(tokenizer, settings.seed)
    sft_args = SFTConfig(output_dir=str(out / "sft"), max_steps=settings.sft_steps, learning_rate=settings.sft_lr,
                         per_device_train_batch_size=settings.sft_batch, lr_scheduler_type="constant_with_warmup",
                         warmup_steps=50, gradient_checkpointing=False, **common)  # fmt: skip
    SFTTrainer(model, args=sft_args, train_dataset=datasets.Dataset.from_list(sft_rows),
               processing_class=tokenizer).train()  # fmt: skip
    model.save_pretrained(out / "sft")
    tokenizer.save_pretrained(out / "sft")
    sft_s = time.perf_counter() - start
    reference = build_model(tokenizer, settings.seed)
    reference.load_state_dict(model.state_dict())
    before = evaluate(reference, tokenizer, test_pairs, test_problems)
    log(f"DPO: {len(train_pairs)} pairs, loss {'+'.join(settings.loss_type)}, {settings.dpo_steps} steps")
    dpo_args = DPOConfig(output_dir=str(out / "dpo"), max_steps=settings.dpo_steps, learning_rate=settings.dpo_lr,
                         per_device_train_batch_size=settings.dpo_batch, lr_scheduler_type="constant",
                         beta=settings.beta, loss_type=list(settings.loss_type),
                         loss_weights=list(settings.loss_weights), gradient_checkpointing=False, **common)  # fmt: skip
    DPOTrainer(model, ref_model=reference, args=dpo_args, train_dataset=datasets.Dataset.from_list(train_pairs),
               processing_class=tokenizer).train()  # fmt: skip
    model.save_pretrained(out / "dpo")
    tokenizer.save_pretrained(out / "dpo")
    after = evaluate(model, tokenizer, test_pairs, test_problems, reference=reference, beta=settings.beta)
    log("compare: the edge-case prompts and 20 held-out problems, answer by answer (compare/compare.html)")
    compared = _compare(model, reference, tokenizer, test_pairs, test_problems[:20], out / "compare", settings.beta)
    report = {"settings": asdict(settings), "seconds": {"sft": sft_s, "total": time.perf_counter() - start},
              "held_out_pairs": len(test_pairs), "length_only_accuracy": length_baseline_accuracy(test_pairs),
              "reference": asdict(before), "policy": asdict(after), "compare": compared}  # fmt: skip
    # the held-out pairs, for ``fastdpo compare --pairs``
    atomic_write(out / "held_out_pairs.jsonl", "".join(json.dumps(p) + "\n" for p in test_pairs))
    atomic_write(out / "report.json", json.dumps(report, indent=1))
    atomic_write(out / "report.md", render(report))
    return report


def _compare(model, reference, tokenizer, pairs: list[dict], problems: list[Problem], out: Path, beta: float) -> dict:
    """``fastdpo compare`` on the built-in edge cases and some held-out problems (with the checker)."""
    from fastdpo.compare import compare, pair_metrics, summary, write_report
    from fastdpo.compare_io import builtin_prompts

    edge = builtin_prompts(model.config.max_position_embeddings, tokenizer)
    prompts = [*edge, *((p.command, p.prompt) for p in problems)]
    checkers = [None] * len(edge) + [lambda text, p=p: check(p, text) for p in problems]
    rows = compare(model, reference, tokenizer, prompts, beta=beta, samples=2, max_new_tokens=8, checkers=checkers)
    held_out = pair_metrics(model, reference, tokenizer, pairs, beta=beta)
    write_report(out, rows, held_out, beta)
    return {**summary(rows), "held_out_pairs": held_out}


def render(report: dict) -> str:
    ref, pol = report["reference"], report["policy"]
    rows = [
        ("checker success, greedy (all held-out prompts)", ref["checker_success"], pol["checker_success"], "{:.1%}"),
        ("checker success, carry/borrow prompts", ref["checker_success_hard"], pol["checker_success_hard"], "{:.1%}"),
        ("NLL per token of held-out chosen answers", ref["chosen_nll"], pol["chosen_nll"], "{:.3f}"),
    ]
    lines = [
        f"fastdpo quickstart, seed {report['settings']['seed']}: {report['held_out_pairs']} held-out pairs and "
        f"prompts; {report['seconds']['total']:.0f} s in all.",
        "",
        "| | reference (SFT) | policy (DPO) |",
        "|---|---|---|",
        *(f"| {name} | {fmt.format(a)} | {fmt.format(b)} |" for name, a, b, fmt in rows),
        f"| reward accuracy on held-out pairs | | {pol['reward_accuracy']:.1%} |",
        f"| mean reward margin | | {pol['reward_margin']:.3f} |",
        "",
        f"Length-only baseline accuracy on the same pairs: {report['length_only_accuracy']:.1%} "
        "(chosen and rejected have equal lengths).",
    ]
    if "compare" in report:
        c = report["compare"]
        from fastdpo.compare_io import BUILTIN

        lines += ["", f"Answer by answer (compare/compare.html): on {c['prompts']} prompts, {len(BUILTIN)} of them "
                  "edge cases, the "
                  f"KL estimate is {c['kl_estimate']:.3f}; on the checked ones the policy wins {c['win_rate']:.0%}, "
                  f"ties {c['tie_rate']:.0%}, loses {c['loss_rate']:.0%}; likelihood displacement on the held-out "
                  f"pairs: {'YES' if c['held_out_pairs']['displacement'] else 'no'}."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="fastdpo quickstart", description=__doc__.splitlines()[0].replace("``", ""))
    parser.add_argument("--out", type=Path, default=Path("runs/quickstart"),
                        help="the folder for both models and the reports (default: runs/quickstart)")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seeds the data, the models and training (default: 0)")
    parser.add_argument("--short", action="store_true", help="400 SFT and 100 DPO steps instead of 1000 and 500 "
                        "(a smoke run)")  # fmt: skip
    parser.add_argument("--overwrite", action="store_true", help="write into an existing non-empty --out")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    args = parser.parse_args(argv)
    from fastdpo.compare import SEEDS, check_counts

    check_counts(args, at_least={"seed": SEEDS[0]}, at_most={"seed": SEEDS[1]})  # (before --out is made)
    refuse_non_empty(
        args.out,
        overwrite=args.overwrite,
        column="--out",
        fix="pass another --out, or --overwrite to replace what is there",
    )
    args.out.mkdir(parents=True, exist_ok=True)
    settings = Settings.short(args.seed) if args.short else Settings(seed=args.seed)
    report = run(args.out, settings)
    print(render(report))
    print(f"models and report: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
