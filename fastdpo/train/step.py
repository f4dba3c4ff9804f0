"""One preference step on a packed batch: the reference pass, then the policy pass and the loss.

    out = preference_step(policy, batch, LossConfig(loss_type="sigmoid", beta=0.1), ref_model=reference)
    out.loss.backward()

The reference runs first, under ``torch.no_grad()``, on the same ``PackedBatch`` and keeps only its per-sequence
log-probs (or they are given as ``ref_logps``, e.g. from a cache; reference-free types need none). The policy's
body then runs once, and the head and loss go through ``fused_pair_loss`` (3 GEMMs, gradients formed in the
forward) when the loss type allows it, else through ``linear_logprobs`` → ``segment_sum`` → ``preference_loss``.
ORPO's NLL term is the token mean over prompt + chosen, as TRL computes it: on the plain path the policy head also
scores the prompt tokens of the chosen sequences. TRL's two options that change what is summed run on the plain
path: ``ld_alpha`` (LD-DPO: the completion tokens of a pair beyond the shorter side's length count ``ld_alpha`` times,
in the policy's sums and the reference's) and ``use_weighting`` (WPO: each pair's loss times the product of its two
sequences' ``exp(mean(log p(y_t) - log Σ_v p_v²))``, without gradient, from the same head pass).

``sft_step`` is the SFT counterpart: the NLL (or DFT) of a packed batch from the same fused head.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from fastdpo.data.packing import IGNORE_INDEX, PackedBatch
from fastdpo.model import HeadSpec, packed_body, packed_logps, run_head
from fastdpo.model.moe import moe_aux_loss
from fastdpo.model.packed import ld_weights
from fastdpo.ops import LossConfig, LossOutput, PairLogps, fused_pair_loss, linear_logprobs, preference_loss
from fastdpo.ops.fused_pair_loss import _token_metrics, supports_fused
from fastdpo.ops.label_smoothing import target_logit_gap
from fastdpo.ops.segments import ld_token_weights, pair_segments, segment_ids, segment_sum
from fastdpo.train.sft_config import check_label_smoothing


def reference_logps(ref_model: nn.Module, batch: PackedBatch, *, impl: str = "auto",
                    ld_alpha: float | None = None) -> Tensor:  # fmt: skip
    """``[P, 2]`` (chosen, rejected) log-prob sums of the reference, without gradients (``ld_alpha``: LD-DPO's
    weighted sums, ``ops.segments.ld_token_weights``)."""
    pairs = pair_segments(batch.cu_seqlens, batch.seq_pair, batch.seq_is_chosen)
    weights = None if ld_alpha is None else ld_weights(batch, pairs, ld_alpha)
    with torch.no_grad():
        out = packed_logps(ref_model, batch, impl=impl, token_weights=weights)
    return out.seq_logps[pairs.to(out.seq_logps.device)]


def preference_step(
    model: nn.Module,
    batch: PackedBatch,
    config: LossConfig,
    *,
    ref_model: nn.Module | None = None,
    ref_logps: Tensor | None = None,
    head_impl: str = "auto",
    fused: bool = True,
    token_metrics: bool = False,
    aux_loss_coef: float = 0.0,
    offload_activations: bool = False,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
) -> LossOutput:
    """The loss of ``batch`` under ``model`` (differentiable), with TRL's metrics in ``.metrics``.

    Args:
        model: the policy, a transformers ``*ForCausalLM``.
        batch: a ``PackedBatch`` of whole pairs.
        config: the loss (``LossConfig``: TRL's loss types and hyper-parameters).
        ref_model, ref_logps: the reference model, or its ``[P, 2]`` log-prob sums; neither for reference-free types.
        head_impl: ``linear_logprobs`` impl for the plain path and the reference.
        fused: use ``fused_pair_loss`` where the loss type allows it.
        token_metrics: add TRL's per-token metrics (entropy, logits/chosen|rejected, mean_token_accuracy).
        aux_loss_coef: mixture-of-experts models: add this times the router load-balancing loss (``aux_loss``).
        offload_activations: the body's saved activations wait in host memory until the backward
            (``fastdpo.model.offload``).
        ld_alpha: TRL's LD-DPO option (None: off): the weight of each sequence's completion tokens beyond the
            length the pair's two sides share, in the policy's sums and the reference's (``ld_token_weights``;
            ``ref_logps``, when given, must be weighted the same way).
        use_weighting: TRL's WPO option: weigh each pair's loss by the policy's length-normalized probabilities.
    """
    ld_alpha = None if ld_alpha == 1.0 else ld_alpha  # every weight 1: the plain sums, and the fused path
    if not config.reference_free and ref_logps is None:
        if ref_model is None:
            raise ValueError(f"loss_type {list(config.loss_types)} needs ref_model or ref_logps")
        ref_logps = reference_logps(ref_model, batch, impl=head_impl, ld_alpha=ld_alpha)
    body = packed_body(model, batch, output_router_logits=bool(aux_loss_coef), offload_activations=offload_activations)
    out = _head_and_loss(model, batch, body.hidden, config, ref_logps=ref_logps, head_impl=head_impl,
                         fused=fused and ld_alpha is None and not use_weighting, token_metrics=token_metrics,
                         ld_alpha=ld_alpha, use_weighting=use_weighting)  # fmt: skip
    if aux_loss_coef:
        aux = moe_aux_loss(model, body.router_logits, batch)
        out.loss = out.loss + aux_loss_coef * aux.to(out.loss.device)
        out.metrics["aux_loss"] = aux.detach()
    return out


def _head_and_loss(
    model: nn.Module,
    batch: PackedBatch,
    hidden: Tensor,
    config: LossConfig,
    *,
    ref_logps: Tensor | None,
    head_impl: str,
    fused: bool,
    token_metrics: bool,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
) -> LossOutput:
    """The head and the loss on the body's hidden states: ``fused_pair_loss``, or log-probs then the loss; the head
    runs as the LM head module's forward (``run_head``)."""
    ref_c, ref_r = (None, None) if ref_logps is None else (ref_logps[:, 0], ref_logps[:, 1])
    device = hidden.device
    targets = batch.targets.reshape(-1).to(device)
    cu_seqlens, seq_pair, seq_is_chosen = (
        t.to(device) for t in (batch.cu_seqlens, batch.seq_pair, batch.seq_is_chosen)
    )
    if fused and supports_fused(config):

        def fused_head(states: Tensor, spec: HeadSpec):
            out = fused_pair_loss(states, spec.weight, targets, cu_seqlens, seq_pair, seq_is_chosen, config,
                                  ref_chosen=ref_c, ref_rejected=ref_r, token_metrics=token_metrics,
                                  seq_starts_completion=batch.seq_starts_completion, **_head_options(spec))  # fmt: skip
            return out.loss, out

        loss, out = run_head(model, fused_head, hidden)
        out.loss = loss
        return out
    pairs = pair_segments(cu_seqlens, seq_pair, seq_is_chosen)
    completion = targets != IGNORE_INDEX
    if "orpo" in config.loss_types:  # ORPO's NLL scores the chosen prompts too: in the same head pass
        targets = with_chosen_prompts(batch, targets)
    outputs = ("logp", "entropy", "mean_logit", "is_top1") if token_metrics else ("logp",)
    if use_weighting:
        outputs += ("log_sum_sq_probs",)

    def plain_head(states: Tensor, spec: HeadSpec):
        per_token = linear_logprobs(states, spec.weight, targets, impl=head_impl, outputs=outputs,
                                    **_head_options(spec))  # fmt: skip
        return per_token.logp, per_token

    logp, per_token = run_head(model, plain_head, hidden)
    plain = segment_sum(logp * completion, cu_seqlens)
    sums, unweighted = plain, None
    if ld_alpha is not None:  # on the batch's own targets (ORPO's above also score the chosen prompts)
        own_targets = batch.targets.reshape(-1).to(device)
        weights = ld_token_weights(own_targets, cu_seqlens, pairs, ld_alpha, dtype=logp.dtype)
        sums, unweighted = segment_sum(logp * completion, cu_seqlens, weights), plain[pairs[:, 0]]
    counts = segment_sum(completion.to(logp.dtype), cu_seqlens)
    chosen_nll = None
    if "orpo" in config.loss_types:
        scored = (targets != IGNORE_INDEX).to(logp.dtype)
        nll_sum = -segment_sum(logp, cu_seqlens)[pairs[:, 0]].sum()
        chosen_nll = nll_sum / segment_sum(scored, cu_seqlens)[pairs[:, 0]].sum().clamp(min=1.0)
    lengths = counts  # ipo and sigmoid_norm's, as TRL counts them: a sequence's first token too, if a completion one
    if batch.seq_starts_completion is not None:
        lengths = counts + batch.seq_starts_completion.to(device=device, dtype=counts.dtype)
    pair_logps = PairLogps(sums[pairs[:, 0]], sums[pairs[:, 1]], ref_c, ref_r, counts[pairs[:, 0]],
                           counts[pairs[:, 1]], chosen_nll, unweighted, lengths[pairs[:, 0]],
                           lengths[pairs[:, 1]])  # fmt: skip
    pair_weights = None
    if use_weighting:  # WPO (its eq. 2), as TRL 1.16 computes it: no gradient through the weights
        aligned = (logp.detach() - per_token.log_sum_sq_probs) * completion
        mean = segment_sum(aligned, cu_seqlens) / counts.clamp(min=1.0)
        pair_weights = torch.exp(mean[pairs[:, 0]]) * torch.exp(mean[pairs[:, 1]])
    out = preference_loss(pair_logps, config, pair_weights=pair_weights)
    if token_metrics:
        stats = [per_token.entropy, per_token.mean_logit, per_token.is_top1]
        sums = torch.stack([segment_sum(s.detach() * completion, cu_seqlens)[pairs] for s in stats])
        means, token_counts = _token_metrics(sums, torch.stack([counts[pairs[:, 0]], counts[pairs[:, 1]]], 1))
        out.metrics.update(means)
        out.token_counts.update(token_counts)
    return out


def _head_options(spec: HeadSpec) -> dict:
    return {"bias": spec.bias, "logit_scale": spec.logit_scale, "softcap": spec.softcap}


def with_chosen_prompts(batch: PackedBatch, targets: Tensor) -> Tensor:
    """``targets`` (``[R·L]``, on their device) with every next token of the chosen sequences a target, prompt
    included: what ORPO's NLL scores, as TRL's ORPO computes it."""
    cu_seqlens, seq_pair, seq_is_chosen = (t.to(targets.device) for t in (batch.cu_seqlens, batch.seq_pair,
                                                                           batch.seq_is_chosen))  # fmt: skip
    segment = segment_ids(cu_seqlens, len(targets))
    in_chosen = seq_is_chosen[segment] & (seq_pair[segment] >= 0)
    return torch.where(in_chosen, _next_token_targets(batch).to(targets.device), targets)


def _next_token_targets(batch: PackedBatch) -> Tensor:
    """``[R·L]``: the next token within the same segment at every position (prompt included), -100 at segment ends."""
    flat = batch.input_ids.reshape(-1)
    nxt = torch.cat([flat[1:], flat.new_full((1,), IGNORE_INDEX)])
    ends = batch.cu_seqlens[1:].long() - 1
    nxt[ends] = IGNORE_INDEX
    return nxt


# The SFT step
# ---------------------------------------------------------------------------------------------------------------------

METRIC_OUTPUTS = ("logp", "entropy", "is_top1")  # the per-token outputs SFT's metrics are made of


class SFTStepOutput(NamedTuple):
    """The loss of one packed batch and the sums TRL's metrics are made of."""

    loss: Tensor
    """Scalar, differentiable: the summed per-token loss over the targets, divided by ``num_items`` (or by
    ``num_targets`` when it is None), at least 1."""
    num_targets: Tensor
    """Targets that are not -100 in this batch (int64)."""
    entropy_sum: Tensor
    """Sum over those targets of the next-token entropy (detached)."""
    top1_sum: Tensor
    """How many of those targets are the first argmax of the logits (detached)."""
    aux_loss: Tensor | None
    """Mixture-of-experts models, when asked: the router load-balancing loss (differentiable, unweighted)."""


def sft_step(
    model: nn.Module,
    batch: PackedBatch,
    *,
    loss_type: str = "nll",
    num_items: Tensor | int | None = None,
    head_impl: str = "auto",
    aux_loss: bool = False,
    offload_activations: bool = False,
    label_smoothing: float = 0.0,
) -> SFTStepOutput:
    """The SFT loss of ``batch`` under ``model``; in plain torch, with ``logits`` the model's on the packed rows::

        logp = logits.log_softmax(-1).gather(-1, targets)            # 0 where targets == -100
        loss = -(logp * (logp.exp().detach() if dft else 1)).sum() / num_items

    With ``label_smoothing`` ε (``nll`` only), transformers' ``LabelSmoother``: ``(1 − ε)·loss + ε·`` the same sum
    of ``−mean_v log p_v``, computed without the logits (``fastdpo.ops.label_smoothing``).

    Args:
        model: a transformers ``*ForCausalLM``.
        batch: a ``PackedBatch`` from ``pack_sft``.
        loss_type: ``"nll"``, or ``"dft"`` (each token's loss weighted by its detached probability).
        num_items: the divisor (the targets of the whole optimizer step); None divides by this batch's targets.
        head_impl: the ``linear_logprobs`` implementation.
        aux_loss: also return a mixture-of-experts model's router load-balancing loss over the real tokens.
        offload_activations: the body's saved activations wait in host memory until the backward
            (``fastdpo.model.offload``).
        label_smoothing: ε in [0, 1); not with ``dft`` nor with a soft-capped head (``ConfigError``).
    """
    check_label_smoothing(label_smoothing, loss_type)
    body = packed_body(model, batch, output_router_logits=aux_loss, offload_activations=offload_activations)
    hidden = body.hidden
    targets = batch.targets.reshape(-1).to(hidden.device)

    def head(states: Tensor, spec: HeadSpec):  # run as the LM head module's forward (wrappers' hooks: run_head)
        per_token = linear_logprobs(states, spec.weight, targets, impl=head_impl, outputs=METRIC_OUTPUTS,
                                    bias=spec.bias, logit_scale=spec.logit_scale, softcap=spec.softcap)  # fmt: skip
        if not label_smoothing:
            return per_token.logp, per_token
        check_label_smoothing(label_smoothing, loss_type, spec.softcap)
        # −log p_y + ε·(z_y − mean_v z_v) is (1 − ε)·NLL + ε·(−mean_v log p_v): minus it, as the log-prob
        gap = target_logit_gap(states, spec.weight, targets, bias=spec.bias, logit_scale=spec.logit_scale)
        return per_token.logp - label_smoothing * gap.to(per_token.logp.dtype), per_token

    logp, per_token = run_head(model, head, hidden)
    token_loss = -logp if loss_type == "nll" else -logp * logp.detach().exp()
    num_targets = (targets != IGNORE_INDEX).sum()
    divisor = num_targets if num_items is None else torch.as_tensor(num_items, device=hidden.device)
    loss = token_loss.sum() / divisor.clamp(min=1)
    aux = moe_aux_loss(model, body.router_logits, batch).to(loss.device) if aux_loss else None
    return SFTStepOutput(loss, num_targets, per_token.entropy.detach().sum(), per_token.is_top1.sum(), aux)
