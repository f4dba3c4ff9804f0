"""A few DPO steps of a tiny Llama through the fused op, timed against full logits (``make demo``).

Each head implementation trains the same model from the same seed in its own process, so its peak memory is
measured from a clean baseline taken after setup and one warm-up step. Runs on a CPU in about a minute.

    python -m fastdpo.demo [--steps 8] [--pairs 8] [--seq-len 128] [--vocab 32000]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

import torch

from fastdpo.ops import LossConfig, PairLogps, linear_logprobs, preference_loss
from fastdpo.profiling import peak_rss, peak_rss_supported, reset_peak_rss, run_measured

IMPLS = {"torch": "fastdpo fused head (chunked torch)", "naive": "full [tokens, vocab] logits"}


def _tiny_llama(vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    model.config.use_cache = False
    return model


def _synthetic_pairs(pairs: int, seq_len: int, vocab: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[chosen; rejected] rows: a random prompt, then its own tokens repeated (chosen) or random tokens (rejected)."""
    gen = torch.Generator().manual_seed(seed)
    half = seq_len // 2
    prompt = torch.randint(0, vocab, (pairs, half), generator=gen)
    chosen = torch.cat([prompt, prompt[:, : seq_len - half]], dim=1)
    rejected = torch.cat([prompt, torch.randint(0, vocab, (pairs, seq_len - half), generator=gen)], dim=1)
    completion = torch.zeros(2 * pairs, seq_len, dtype=torch.bool)
    completion[:, half:] = True
    return torch.cat([chosen, rejected]), completion


def _sequence_logps(model, input_ids, completion, impl: str) -> torch.Tensor:
    hidden = model.model(input_ids=input_ids, use_cache=False).last_hidden_state
    targets = input_ids.masked_fill(~completion, -100)[:, 1:]
    logp = linear_logprobs(hidden[:, :-1], model.lm_head.weight, targets, impl=impl).logp
    return logp.sum(-1)


def _train(impl: str, steps: int, pairs: int, seq_len: int, vocab: int, seed: int = 0) -> dict:
    torch.set_num_threads(int(os.environ.get("FASTDPO_THREADS", torch.get_num_threads())))
    policy = _tiny_llama(vocab, seed)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-3)
    loss_config = LossConfig(loss_type="sigmoid", beta=0.1)
    input_ids, completion = _synthetic_pairs(pairs, seq_len, vocab, seed)

    def step() -> dict:
        with torch.no_grad():
            ref_logps = _sequence_logps(reference, input_ids, completion, impl)
        logps = _sequence_logps(policy, input_ids, completion, impl)
        out = preference_loss(
            PairLogps(logps[:pairs], logps[pairs:], ref_logps[:pairs], ref_logps[pairs:]), loss_config
        )
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        return {"loss": out.loss.item(), **{k: v.item() for k, v in out.metrics.items()}}

    history = [step()]  # warm-up step: allocations and lazy init happen here, and it is not timed
    baseline = reset_peak_rss() if peak_rss_supported() else None
    start = time.perf_counter()
    for _ in range(steps - 1):
        history.append(step())
    seconds = (time.perf_counter() - start) / max(1, steps - 1)
    extra = None if baseline is None else peak_rss() - baseline
    return {"impl": impl, "seconds_per_step": seconds, "peak_extra_bytes": extra, "history": history}


def _run_worker(impl: str, args: argparse.Namespace) -> dict:
    command = [sys.executable, "-m", "fastdpo.demo", "--worker", impl, "--steps", str(args.steps)]
    command += ["--pairs", str(args.pairs), "--seq-len", str(args.seq_len), "--vocab", str(args.vocab)]
    try:
        return run_measured(command)
    except RuntimeError as error:
        raise SystemExit(f"demo worker for impl={impl}: {error}") from None


def _report(results: list[dict], args: argparse.Namespace) -> str:
    tokens = 2 * args.pairs * args.seq_len
    lines = [
        f"DPO on a tiny Llama (2 layers, hidden 128, vocab {args.vocab}): {args.pairs} pairs x {args.seq_len} tokens "
        f"= {tokens} tokens/step, half of them completion; {args.steps} steps, {torch.get_num_threads()} threads",
        "The fused head computes only completion positions; full logits cover every position, as a model head does.",
        "",
        f"{'head':<38} {'s/step':>8} {'peak extra MiB':>15} {'loss first→last':>18} {'reward acc':>11}",
    ]
    for r in results:
        mib = "n/a" if r["peak_extra_bytes"] is None else f"{r['peak_extra_bytes'] / 2**20:.0f}"
        first, last = r["history"][0], r["history"][-1]
        lines.append(
            f"{IMPLS[r['impl']]:<38} {r['seconds_per_step']:>8.3f} {mib:>15} "
            f"{first['loss']:>8.4f}→{last['loss']:<8.4f} {last['rewards/accuracies']:>11.2f}"
        )
    fused, full = results
    drift = max(abs(a["loss"] - b["loss"]) for a, b in zip(fused["history"], full["history"], strict=True))
    lines += [
        "",
        f"time: fused / full = {fused['seconds_per_step'] / full['seconds_per_step']:.2f}x",
    ]
    if fused["peak_extra_bytes"] and full["peak_extra_bytes"]:
        lines.append(f"peak extra memory: fused / full = {fused['peak_extra_bytes'] / full['peak_extra_bytes']:.2f}x")
    lines.append(f"largest loss difference between the two over all steps: {drift:.2e} (same model, same math)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    description = __doc__.splitlines()[0].replace("``", "")
    parser = argparse.ArgumentParser(prog="python -m fastdpo.demo", description=description)
    parser.add_argument("--steps", type=int, default=8, help="DPO steps per head (the first is a warm-up)")
    parser.add_argument("--pairs", type=int, default=8, help="preference pairs per step")
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (prompt + completion)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size of the tiny model")
    parser.add_argument("--worker", choices=sorted(IMPLS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 2:
        parser.error("--steps must be at least 2 (one warm-up step, then timed steps)")
    if args.worker:
        print(json.dumps(_train(args.worker, args.steps, args.pairs, args.seq_len, args.vocab)))
        return
    results = [_run_worker(impl, args) for impl in IMPLS]
    print(_report(results, args))


if __name__ == "__main__":
    main()
