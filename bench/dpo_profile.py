"""Where a DPO training run's time goes on CPU: fastdpo's DPOTrainer and TRL 1.16's, same model, data and steps.

    python -m bench.dpo_profile [--pairs 256] [--batch 8] [--steps 8] [--threads 2] [--out DIR]

Each engine runs ``trainer.train()`` in its own process, built as in ``bench.dpo_cpu``. Wall time is split into
exclusive sections (a nested section pauses the one around it) by wrapping this trainer instance's methods and
by module hooks; nothing in fastdpo or TRL is changed:

- data: ``get_batch_samples`` (dataset rows fetched and collated/packed; the loader's prefetch included);
- reference forward: fastdpo's ``reference_logps`` (body + head) / TRL's ``ref_model`` forward (body + fused head);
- policy body forward: forward of ``model.get_decoder()``;
- policy head + loss forward: the rest of ``compute_loss`` (head, loss, metrics). fastdpo's fused head forms its
  gradients in the forward, so its head ``dX``/``dW`` GEMMs land here;
- backward, head: ``accelerator.backward`` until the gradient of the body's output is ready (a tensor hook);
- backward, body: the rest of it, less the recompute: the decoder layers' submodules (norms, attention, MLP) run
  again by gradient checkpointing (the residual adds between them stay in "backward, body");
- optimizer: gradient clipping and ``optimizer.step()`` (between the Trainer's optimizer callbacks);
- other: ``train()`` wall time less all the above (zero_grad, scheduler, logging, the Trainer's loop).

Results: bench/results/<cpu>/dpo_profile.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

from bench.dpo_cpu import build_trainer
from bench.machine import cpu_results, environment, pin
from fastdpo.atomic import atomic_write
from fastdpo.profiling import run_measured

SECTIONS = ("data", "reference forward", "policy body forward", "policy head + loss forward", "backward, head",
            "backward, body", "backward, body recompute", "optimizer", "other")  # fmt: skip


class Sections:
    """Exclusive wall time per named section: entering a section pauses the one it is nested in."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._stack: list[str] = []
        self._mark = time.perf_counter()

    @property
    def current(self) -> str | None:
        return self._stack[-1] if self._stack else None

    def _charge(self) -> None:
        now = time.perf_counter()
        if self._stack:
            self.seconds[self._stack[-1]] += now - self._mark
        self._mark = now

    def enter(self, name: str) -> None:
        self._charge()
        self._stack.append(name)
        self.calls[name] += 1

    def leave(self) -> None:
        self._charge()
        self._stack.pop()

    def switch(self, name: str) -> None:
        """Charge the time so far to the current section and go on in ``name`` instead."""
        self._charge()
        self._stack[-1] = name
        self.calls[name] += 1

    def wrap(self, name: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            self.enter(name)
            try:
                return fn(*args, **kwargs)
            finally:
                self.leave()

        return timed

    def time_module(self, module, name: str, *, only_in: str | None = None) -> None:
        """Time ``module``'s forward as ``name`` (only while the current section is ``only_in``, when given)."""
        entered: list[bool] = []

        def pre_hook(module, args):
            entered.append(only_in is None or self.current == only_in)
            if entered[-1]:
                self.enter(name)

        def post_hook(module, args, output):
            if entered.pop():
                self.leave()

        module.register_forward_pre_hook(pre_hook)
        # always_call: checkpointing's recompute stops early by raising once it has what backward needs
        module.register_forward_hook(post_hook, always_call=True)


class _OptimizerSection(TrainerCallback):
    def __init__(self, sections: Sections) -> None:
        self.sections = sections

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.sections.enter("optimizer")

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.sections.leave()


def instrument(trainer, engine: str) -> Sections:
    """Wrap this trainer instance (and hook its models) so that its ``train()`` fills the returned ``Sections``."""
    sections = Sections()
    trainer.get_batch_samples = sections.wrap("data", trainer.get_batch_samples)
    trainer.compute_loss = sections.wrap("policy head + loss forward", trainer.compute_loss)
    trainer.accelerator.backward = sections.wrap("backward, head", trainer.accelerator.backward)
    trainer._clip_grad_norm = sections.wrap("optimizer", trainer._clip_grad_norm)
    trainer.add_callback(_OptimizerSection(sections))
    if engine == "fastdpo":
        import fastdpo.train.dpo
        import fastdpo.train.step

        # the reference pass is a function (body + fused head), looked up in the calling module at each call: wrapped
        # where it is bound, for this process only
        original = fastdpo.train.step.reference_logps
        for module in (fastdpo.train.step, fastdpo.train.dpo):
            if getattr(module, "reference_logps", None) is original:
                module.reference_logps = sections.wrap("reference forward", original)
    else:
        sections.time_module(trainer.ref_model, "reference forward")
    body = trainer.model.get_decoder()
    sections.time_module(body, "policy body forward")

    def body_grad_ready(grad):
        if sections.current == "backward, head":
            sections.switch("backward, body")

    def watch_body_output(module, args, output):
        if output.last_hidden_state.requires_grad:
            output.last_hidden_state.register_hook(body_grad_ready)

    body.register_forward_hook(watch_body_output)
    # run again inside backward only by gradient checkpointing; transformers checkpoints a layer's forward, not its
    # __call__, so the layer's own hooks do not fire on the replay but those of its submodules do
    for layer in body.layers:
        for part in layer.children():
            sections.time_module(part, "backward, body recompute", only_in="backward, body")
    return sections


def _worker(args: argparse.Namespace) -> dict:
    trainer, _ = build_trainer(args.worker, pairs=args.pairs, batch=args.batch, steps=args.steps,
                               threads=args.threads)  # fmt: skip
    sections = instrument(trainer, args.worker)
    start = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - start
    if sections.current is not None:
        raise RuntimeError(f"section {sections.current!r} was entered and never left: the profile would be wrong")
    expected = set(SECTIONS) - {"other", "backward, body recompute"}
    if trainer.args.gradient_checkpointing:
        expected.add("backward, body recompute")
    if missed := expected - {name for name, calls in sections.calls.items() if calls}:
        raise RuntimeError(f"sections never entered: {sorted(missed)} (the engine's code path changed?)")
    seconds = dict(sections.seconds)
    seconds["other"] = train_s - sum(seconds.values())
    return {"engine": args.worker, "train_s": train_s, "seconds": seconds, "calls": dict(sections.calls),
            "gradient_checkpointing": bool(trainer.args.gradient_checkpointing)}  # fmt: skip


def _table(args: argparse.Namespace, meta: dict, results: list[dict]) -> str:
    header = " | ".join(f"{r['engine']} s | {r['engine']} %" for r in results)
    lines = [
        f"Where train() time goes: DPO, tiny Llama (H=256, 4 layers, V=32000, fp32, sdpa), {args.pairs} pairs, batch "
        f"{args.batch}, {args.steps} steps, {args.threads} threads. {meta['cpu']}; torch {meta['versions']['torch']}, "
        f"transformers {meta['versions']['transformers']}, trl {meta['versions']['trl']}; {meta['date']}.",
        "",
        f"| section | {header} |",
        "|---|" + "---|---|" * len(results),
    ]
    for name in SECTIONS:
        cells = " | ".join(f"{r['seconds'].get(name, 0.0):.2f} | {100 * r['seconds'].get(name, 0.0) / r['train_s']:.1f}"
                           for r in results)  # fmt: skip
        lines.append(f"| {name} | {cells} |")
    lines.append("| **train()** | " + " | ".join(f"**{r['train_s']:.2f}** | 100.0" for r in results) + " |")
    lines += [
        "",
        "Exclusive wall time per section (bench/dpo_profile.py). Gradient checkpointing: "
        + ", ".join(f"{r['engine']} {'on' if r['gradient_checkpointing'] else 'off'}" for r in results)
        + ". fastdpo's fused head forms its gradients in the forward: its head backward is near zero and its "
        "'head + loss forward' holds the head's backward GEMMs.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.dpo_profile", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--engines", nargs="+", choices=("trl", "fastdpo"), default=["trl", "fastdpo"])
    parser.add_argument("--worker", choices=("fastdpo", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="folder for dpo_profile.{json,md} (default: bench/results/<cpu>)")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return
    pin(args.threads)  # the workers inherit the affinity
    args.out = args.out or cpu_results()
    results = []
    for engine in args.engines:
        print(f"profiling {engine} ...", file=sys.stderr, flush=True)
        command = [sys.executable, "-m", "bench.dpo_profile", "--worker", engine, "--pairs", str(args.pairs),
                   "--batch", str(args.batch), "--steps", str(args.steps), "--threads", str(args.threads)]  # fmt: skip
        results.append(run_measured(command, env={"OMP_NUM_THREADS": str(args.threads)},
                                    cwd=Path(__file__).parents[1]))  # fmt: skip
    meta = {**environment(args.threads), "pairs": args.pairs, "batch": args.batch, "steps": args.steps}
    text = _table(args, meta, results)
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out / "dpo_profile.json", json.dumps({"meta": meta, "results": results}, indent=1))
    atomic_write(args.out / "dpo_profile.md", text)
    print(text)


if __name__ == "__main__":
    main()
