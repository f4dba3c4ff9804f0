"""The preference loss straight from hidden states, with its gradients computed in the forward: 3 GEMMs, not 4.

The plain path is ``linear_logprobs`` → ``segment_sum`` → ``preference_loss``; its backward recomputes every logit
tile (4 GEMMs: logits, recompute, dh, dW). When each pair's loss gradient depends only on that pair's log-probs
(every loss type but ``aot``/``aot_unpaired``, which sort the batch, and ``orpo``, whose NLL term needs the prompt
tokens) and the reference log-probs are known before the policy pass, the whole gradient can be formed while the
logits are at hand. Chunk by chunk of whole pairs::

    z = transform(h[chunk] @ W.T + b); logp = z[y] - logsumexp(z)          # GEMM 1
    seq_logps = segment sums; dL/dseq from the loss on those pairs (autograd on [pairs] only)
    dz = dL/dseq[token] * (onehot(y) - softmax(z)) * transform'
    dh[chunk] = dz @ W; dW += dz.T @ h[chunk]; db += dz.sum(0)               # GEMMs 2 and 3

and the backward only scales the stored gradients by the upstream scalar. The loss of one chunk's pairs is taken
as the batch loss with every other pair held at zero, so batch-level normalizations (the ``sft`` and ``cpo`` NLL
token means, the mean over pairs) come out exactly; ``tests/test_fused_pair_loss.py`` checks every supported type
against the plain path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastdpo.ops.head_checks import check_args, check_targets, refuse_second_derivative
from fastdpo.ops.linear_logprobs import (
    _acc_dtype,
    _dz_from_probs_,
    _HeadGemms,
    _transform_,
    autocast_head_inputs,
    autocast_off,
)
from fastdpo.ops.losses import LossConfig, LossOutput, PairLogps, preference_loss
from fastdpo.ops.segments import pair_segments as _pair_segments
from fastdpo.ops.segments import segment_ids

FUSED_LOSS_TYPES = frozenset(
    {"sigmoid", "cdpo", "robust", "hinge", "ipo", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero",
     "apo_down", "discopop", "sft", "sigmoid_norm", "simpo", "cpo"}
)  # fmt: skip
"""Loss types whose per-pair gradient depends only on the pair: the ones ``fused_pair_loss`` takes."""


def supports_fused(config: LossConfig) -> bool:
    """Whether ``fused_pair_loss`` can compute this configuration (else use the plain path)."""
    return set(config.loss_types) <= FUSED_LOSS_TYPES


def fused_pair_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    cu_seqlens: Tensor,
    seq_pair: Tensor,
    seq_is_chosen: Tensor,
    config: LossConfig,
    *,
    ref_chosen: Tensor | None = None,
    ref_rejected: Tensor | None = None,
    bias: Tensor | None = None,
    logit_scale: float = 1.0,
    temperature: float = 1.0,
    softcap: float | None = None,
    ignore_index: int = -100,
    chunk_bytes: int | None = None,
    token_metrics: bool = False,
    return_logps: bool = False,
    seq_starts_completion: Tensor | None = None,
) -> LossOutput | tuple[LossOutput, Tensor]:
    """The preference loss of packed pairs, its gradient formed in the forward (see the module docstring).

    Args:
        hidden: ``[N, H]`` (the flattened packed rows), weight ``[V, H]``, targets ``[N]`` (-100 outside
            completions), as ``linear_logprobs`` takes them.
        cu_seqlens: ``[S + 1]`` segment offsets into the N tokens; seq_pair ``[S]`` the pair of each segment (-1:
            padding); seq_is_chosen ``[S]``. Every pair ``0..P-1`` has one chosen and one rejected segment.
        config: the loss; ``supports_fused(config)`` must hold.
        ref_chosen, ref_rejected: ``[P]`` reference log-prob sums (not needed by reference-free types).
        token_metrics: also compute TRL's per-token metrics from the same logits (a few passes over each chunk):
            ``entropy`` (over all completion tokens), ``logits/chosen|rejected`` (mean logit over the completion
            tokens), ``mean_token_accuracy`` (chosen completion tokens whose target is the first argmax).
        return_logps: also return the ``[P, 2]`` (chosen, rejected) log-prob sums, detached.
        seq_starts_completion: ``[S]`` bool, the sequences whose first token is a completion token (``PackedBatch``'s):
            ``ipo`` and ``sigmoid_norm`` count that token in the length, as TRL does; None: none.

    Returns:
        LossOutput whose ``loss`` carries the gradient to hidden, weight and bias; the rest is detached.
    """
    if not supports_fused(config):
        unsupported = sorted(set(config.loss_types) - FUSED_LOSS_TYPES)
        raise ValueError(f"config: fused_pair_loss does not take {unsupported}; use the plain path for them")
    check_args(hidden, weight, targets, bias, logit_scale, temperature, softcap, (), chunk_bytes)
    if hidden.dim() != 2:  # (a [B, T, H] batch was blamed on cu_seqlens)
        raise ValueError(f"hidden: expected [N, H], the packed rows flattened, got {tuple(hidden.shape)}")
    hidden, weight, bias = autocast_head_inputs(hidden, weight, bias)  # what an nn.Linear head would multiply
    pairs_of = _pair_segments(cu_seqlens, seq_pair, seq_is_chosen)
    for name, ref in (("ref_chosen", ref_chosen), ("ref_rejected", ref_rejected)):
        if ref is not None and tuple(getattr(ref, "shape", ())) != (pairs_of.shape[0],):
            raise ValueError(f"{name}: expected one log-prob per pair, shape ({pairs_of.shape[0]},), got "
                             f"{tuple(getattr(ref, 'shape', ())) or type(ref).__name__}")  # fmt: skip
    transform = (float(logit_scale), None if softcap is None else float(softcap), float(temperature))
    state: dict = {"grad": torch.is_grad_enabled()}  # (inside forward it is off; needs_input_grad ignores it)
    with autocast_off(hidden):
        loss = _FusedPairLoss.apply(
            hidden, weight, bias, targets, cu_seqlens, pairs_of, ref_chosen, ref_rejected, config, transform,
            ignore_index, chunk_bytes, token_metrics, state,
            None if seq_starts_completion is None else seq_starts_completion.to(pairs_of.device)[pairs_of].long(),
        )  # fmt: skip
    out = state["output"]
    result = LossOutput(loss, out.per_pair.detach(), out.chosen_rewards.detach(), out.rejected_rewards.detach(),
                        out.metrics, out.token_counts)  # fmt: skip
    return (result, state["seq_logps"]) if return_logps else result


class _FusedPairLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, cu_seqlens, pairs_of, ref_chosen, ref_rejected, config,
                transform, ignore_index, chunk_bytes, token_metrics, state, leads):  # fmt: skip
        acc = _acc_dtype(hidden, weight, bias)
        device, num_pairs, vocab = hidden.device, pairs_of.shape[0], weight.shape[0]
        valid = targets != ignore_index
        check_targets(targets, valid, vocab)  # (on a GPU the kernels read past the row; _chunks syncs here anyway)
        # completion token counts per pair (known before any logit): lengths for the length-normalized types
        num_segments = cu_seqlens.numel() - 1
        counts = torch.zeros(num_segments, dtype=torch.long, device=device)
        token_seg = segment_ids(cu_seqlens, len(targets))
        counts.index_add_(0, token_seg, valid.long())
        tokens = counts[pairs_of]  # [P, 2]
        lengths = tokens if leads is None else tokens + leads  # ipo and sigmoid_norm's, as TRL counts them
        gemms = _HeadGemms(hidden, weight, bias, acc)
        chunk_bytes = gemms.chunk_bytes(chunk_bytes)
        need_h, need_w, need_b = (need and state["grad"] for need in ctx.needs_input_grad[:3])  # (no_grad: none)
        grad_h = torch.zeros_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=acc, device=device) if need_w else None
        grad_b = torch.zeros(vocab, dtype=acc, device=device) if need_b else None
        seq_logps = torch.zeros(num_pairs, 2, dtype=acc, device=device)
        zeros = torch.zeros(num_pairs, dtype=acc, device=device)
        # per (pair, chosen/rejected) sums of entropy, mean logit and top-1 hits over completion tokens
        token_sums = torch.zeros(3, num_pairs * 2, dtype=acc, device=device) if token_metrics else None
        for chunk in _chunks(tokens.sum(1), vocab, chunk_bytes):
            segs = pairs_of[chunk]  # [p, 2]
            rows, row_seg = _rows_of(segs, token_seg, valid, num_segments)
            h = gemms.rows(hidden[rows])
            y = targets[rows].long()
            if gemms.epilogue is not None:  # the raw logits read once per kernel (see _HeadGemms)
                z = gemms.raw_logits(h)
                wanted = (token_metrics,) * 3 + (False,)
                lse, logp, entropy, mean_logit, is_top1, _ = gemms.stats(z, y, transform, wanted)
            else:
                stats = _chunk_stats(gemms, h, y, transform, token_metrics)
                logp, entropy, mean_logit, is_top1, exp, sum_exp, tanh = stats
            if token_metrics:
                flat_seg = (chunk[:, None] * 2 + torch.arange(2, device=device)).view(-1)[row_seg]
                token_sums.index_add_(1, flat_seg, torch.stack([entropy, mean_logit, is_top1]))
            live = torch.zeros(segs.numel(), dtype=acc, device=device).index_add_(0, row_seg, logp).view(-1, 2)
            seq_logps[chunk] = live
            if not (need_h or need_w or need_b):  # (an evaluation's step: the log-probs alone)
                z = exp = tanh = None
                continue
            live.requires_grad_()
            with torch.enable_grad():
                chosen = zeros.index_put((chunk,), live[:, 0])
                rejected = zeros.index_put((chunk,), live[:, 1])
                pairs = PairLogps(chosen, rejected, ref_chosen, ref_rejected, tokens[:, 0], tokens[:, 1],
                                  chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1])  # fmt: skip
                (grad_seq,) = torch.autograd.grad(preference_loss(pairs, config).loss, live)
            if gemms.epilogue is not None:
                dz = gemms.dz(z, y, lse, grad_seq.view(-1)[row_seg], transform)
            else:
                dz = _dz_from_probs_(exp.div_(sum_exp[:, None]), y, grad_seq.view(-1)[row_seg], transform, tanh)
            if grad_h is not None:
                grad_h[rows] = gemms.grad_hidden(dz, hidden.dtype)
            if grad_w is not None:
                gemms.add_grad_weight(grad_w, dz, h)
            if grad_b is not None:
                grad_b += dz.sum(0, dtype=acc)
            z = exp = dz = tanh = None  # this chunk's buffers go before the next product allocates its own
        full = PairLogps(seq_logps[:, 0], seq_logps[:, 1], ref_chosen, ref_rejected, tokens[:, 0], tokens[:, 1],
                         chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1])  # fmt: skip
        state["seq_logps"] = seq_logps
        with torch.no_grad():
            state["output"] = output = preference_loss(full, config)
            if token_metrics:
                means, counts = _token_metrics(token_sums.view(3, num_pairs, 2), tokens)
                output.metrics.update(means)
                output.token_counts.update(counts)
        ctx.save_for_backward(grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                              None if grad_b is None else grad_b.to(bias.dtype))  # fmt: skip
        return output.loss.detach().clone()

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_second_derivative("fused_pair_loss")
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scaled = [None if g is None else g * grad_loss.to(g.dtype) for g in (grad_h, grad_w, grad_b)]
        return (*scaled, *([None] * 12))


def _chunk_stats(gemms, h: Tensor, y: Tensor, transform, token_metrics: bool):
    """Torch ops over one chunk's logits: logp, the token metrics (or None), exp(z − max) (in the chunk's buffer),
    its row sums, and the softcap's tanh (None without one) for the transform's derivative."""
    z = _transform_(gemms.logits(h), transform)
    tanh = z * (transform[2] / transform[1]) if transform[1] is not None else None
    logp = z.gather(1, y[:, None]).squeeze(1)
    entropy = mean_logit = is_top1 = None
    if token_metrics:  # (max's index: the first maximum, as TRL's argmax; one pass for both, argmax alone took 3)
        mean_logit, (row_max, first) = z.mean(1), z.max(1)
        is_top1 = (first == y).to(z.dtype)
    else:
        row_max = z.amax(1)
    shifted = z.sub_(row_max[:, None])
    if token_metrics:  # e = exp(z − m) beside z − m: H = log s − Σ e·(z − m) / s, no log per logit (xlogy's: 3x the
        # time of all the other passes); a −inf logit (e = 0) adds 0, not 0 · −inf
        exp = torch.exp(shifted)
        sum_exp = exp.sum(1)
        weighted = shifted.clamp_(min=torch.finfo(shifted.dtype).min).mul_(exp).sum(1)
        entropy = sum_exp.log() - weighted / sum_exp
    else:
        exp = shifted.exp_()  # in place: the chunk's buffer now holds exp(z - max)
        sum_exp = exp.sum(1)
    logp -= row_max + sum_exp.log()
    return logp, entropy, mean_logit, is_top1, exp, sum_exp, tanh


def _token_metrics(sums: Tensor, tokens: Tensor) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """TRL's per-token metrics from per-(pair, side) sums ``[3, P, 2]`` and completion token counts ``[P, 2]``, and
    the token count of each (``LossOutput.token_counts``)."""
    entropy, logits, top1 = sums
    count = tokens.to(sums.dtype)
    chosen, rejected = count[:, 0].sum(), count[:, 1].sum()
    counts = {"entropy": chosen + rejected, "logits/chosen": chosen, "logits/rejected": rejected,
              "mean_token_accuracy": chosen}  # fmt: skip
    totals = {"entropy": entropy.sum(), "logits/chosen": logits[:, 0].sum(), "logits/rejected": logits[:, 1].sum(),
              "mean_token_accuracy": top1[:, 0].sum()}  # fmt: skip
    return {name: total / counts[name].clamp(min=1) for name, total in totals.items()}, counts


def _chunks(pair_tokens: Tensor, vocab: int, chunk_bytes: int) -> list[Tensor]:
    """Consecutive groups of whole pairs whose fp32 logits fit ``chunk_bytes`` (at least one pair each)."""
    budget = max(1, chunk_bytes // (4 * vocab))
    groups, current, used = [], [], 0
    for pair, n in enumerate(pair_tokens.tolist()):
        if current and used + n > budget:
            groups.append(current)
            current, used = [], 0
        current.append(pair)
        used += n
    if current:
        groups.append(current)
    return [torch.tensor(g, device=pair_tokens.device) for g in groups]


def _rows_of(segs: Tensor, token_seg: Tensor, valid: Tensor, num_segments: int) -> tuple[Tensor, Tensor]:
    """The valid token rows of the segments ``segs`` ``[p, 2]``, and each row's position in ``segs.view(-1)``.

    Tensor ops only (no per-segment host round trip): a segment → position map read at every token.
    """
    position = torch.full((num_segments,), -1, device=valid.device)
    position[segs.view(-1)] = torch.arange(segs.numel(), device=valid.device)
    owner = position[token_seg]
    rows = torch.nonzero(valid & (owner >= 0)).squeeze(-1)
    return rows, owner[rows]
