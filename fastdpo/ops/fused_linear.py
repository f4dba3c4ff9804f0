"""Liger-Kernel's chunked preference losses, called the same way: ``FusedLinearDPOLoss`` and the ORPO, SimPO, CPO
modules, so code written against ``liger_kernel.chunked_loss`` switches by changing the import.

    loss_fn = FusedLinearDPOLoss(beta=0.1)                       # LigerFusedLinearDPOLoss's arguments
    loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss,
           chosen_rewards, rejected_rewards) = loss_fn(lm_head.weight, hidden, target, ref_input=ref_hidden,
                                                       ref_weight=ref_lm_head.weight)

The call: ``_input`` ``[2B, T, H]`` with the B chosen rows first, ``target`` ``[2B, T]`` already aligned with
``_input`` (``ignore_index`` where nothing is scored), the LM head as ``lin_weight [V, H]`` (and ``bias``), the
reference as its hidden states and head. The values are Liger's (``liger-kernel`` 0.8.5): per-sequence log-prob
sums (means with ``average_log_prob``), the chosen rows' token-mean NLL weighted by ``alpha``, and Liger's
``*_logits_mean`` (the mean logit over every position of the chosen or rejected rows, ignored ones included).

Differences from Liger, each deliberate:

- No ``[chunk, T, V]`` logits. DPO with log-prob sums and no NLL term (the default) runs
  ``fastdpo.ops.fused_pair_loss``: 3 GEMMs, the gradients formed in the forward, rows with no target skipped.
  Otherwise the log-probs come from ``fastdpo.ops.linear_logprobs`` (``impl``). The mean logit is
  ``mean_v(h·W_v + b_v) = h·mean_v(W_v) + mean_v(b_v)`` (one matrix-vector product, no logits).
  ``compiled`` and ``chunk_size`` are accepted and unused (the memory bound is ``linear_logprobs``' chunks).
- ``FusedLinearDPOLoss`` takes every loss type of ``fastdpo.ops.preference_loss`` (TRL's), not only Liger's
  ten: ``ipo``, ``aot``, ``sigmoid_norm`` and the rest too, computed by the same code as the trainers' losses.
  Those that average over tokens by their formula (``ipo``, ``sigmoid_norm``, ``sft``) give TRL's value whatever
  ``average_log_prob`` says (it still makes the returned log-probs means).
- Bad arguments raise ``ConfigError`` naming the argument.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fastdpo.errors import ConfigError
from fastdpo.ops.fused_pair_loss import fused_pair_loss, supports_fused
from fastdpo.ops.linear_logprobs import linear_logprobs
from fastdpo.ops.losses import NEEDS_LENGTHS, LossConfig, PairLogps, preference_loss


class _FusedLinearPreferenceLoss(nn.Module):
    """What the four modules share: per-sequence log-probs of the chosen and rejected rows without logits."""

    average_log_prob = False

    def __init__(self, *, ignore_index: int, beta: float, compute_nll_loss: bool, alpha: float = 1.0,
                 compiled: bool = True, chunk_size: int = 1, impl: str = "auto") -> None:  # fmt: skip
        super().__init__()
        self.ignore_index, self.beta, self.alpha = ignore_index, beta, alpha
        self.compute_nll_loss, self.compiled, self.chunk_size, self.impl = compute_nll_loss, compiled, chunk_size, impl

    def _check(self, _input: Tensor, target: Tensor) -> int:
        if _input.dim() != 3 or target.shape != _input.shape[:2] or _input.shape[0] % 2:
            raise ConfigError(
                f"_input {tuple(_input.shape)} and target {tuple(target.shape)} are not [2B, T, H] and [2B, T]",
                column="_input",
                fix="stack the B chosen rows first, then the B rejected rows, padded to one length T",
            )
        return _input.shape[0] // 2

    def _token_logps(self, hidden: Tensor, weight: Tensor, target: Tensor, bias: Tensor | None) -> Tensor:
        """``[2B, T]`` log-probs of ``target`` (0 where ignored)."""
        out = linear_logprobs(hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1), bias=bias,
                              ignore_index=self.ignore_index, impl=self.impl)  # fmt: skip
        return out.logp.reshape(target.shape)

    def _sequence_logps(self, token_logps: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        counts = (target != self.ignore_index).sum(-1).to(token_logps.dtype)
        sums = token_logps.sum(-1)
        return (sums / counts if self.average_log_prob else sums), counts

    def _nll(self, token_logps: Tensor, target: Tensor, pairs: int) -> Tensor:
        """The chosen rows' NLL, a token mean over all of them (0 when ``compute_nll_loss`` is off)."""
        if not self.compute_nll_loss:
            return token_logps.new_zeros(())
        scored = (target[:pairs] != self.ignore_index).sum()
        return -token_logps[:pairs].sum() / scored

    @staticmethod
    def _logits_means(hidden: Tensor, weight: Tensor, bias: Tensor | None, pairs: int) -> tuple[Tensor, Tensor]:
        """Liger's ``chosen_logits_mean`` and ``rejected_logits_mean``: the mean of ``h·W_v + b_v`` over every
        position of the rows and every v, as a product with the mean head row (no logits)."""
        with torch.no_grad():
            mean_row = weight.float().mean(0)
            per_row = hidden.float().sum(1) @ mean_row / hidden.shape[1]  # [2B]: mean over T of h_t · mean_v W_v
            if bias is not None:
                per_row = per_row + bias.float().mean()
            return per_row[:pairs].mean(), per_row[pairs:].mean()

    def _policy(self, lin_weight, _input, target, bias):
        pairs = self._check(_input, target)
        token_logps = self._token_logps(_input, lin_weight, target, bias)
        logps, counts = self._sequence_logps(token_logps, target)
        return pairs, token_logps, logps, counts


class FusedLinearDPOLoss(_FusedLinearPreferenceLoss):
    """``LigerFusedLinearDPOLoss``'s arguments and outputs; every TRL loss type (``loss_type``)."""

    def __init__(
        self,
        ignore_index: int = -100,
        beta: float = 0.1,
        alpha: float = 1.0,
        compute_nll_loss: bool = False,
        compiled: bool = True,
        use_ref_model: bool = True,
        average_log_prob: bool = False,
        chunk_size: int = 1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        discopop_tau: float = 0.05,
        impl: str = "auto",
    ) -> None:
        super().__init__(ignore_index=ignore_index, beta=beta, alpha=alpha, compute_nll_loss=compute_nll_loss,
                         compiled=compiled, chunk_size=chunk_size, impl=impl)  # fmt: skip
        self.use_ref_model, self.average_log_prob = use_ref_model, average_log_prob
        self.loss_type = loss_type
        self.config = LossConfig(
            loss_type=[loss_type], beta=beta, label_smoothing=label_smoothing, discopop_tau=discopop_tau
        )  # fmt: skip  (validates: ConfigError naming the option)
        if self.config.reference_free:
            raise ConfigError(f"{loss_type!r} takes no reference", column="loss_type",
                              fix="use FusedLinearSimPOLoss, FusedLinearCPOLoss or FusedLinearORPOLoss")  # fmt: skip

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
        pairs = self._check(_input, target)
        if self.use_ref_model:
            if ref_input is None or ref_weight is None:
                raise ConfigError(
                    "use_ref_model=True needs the reference's hidden states and head",
                    column="ref_input",
                    fix="pass ref_input and ref_weight, or build the loss with use_ref_model=False",
                )
            with torch.no_grad():
                ref, _ = self._sequence_logps(self._token_logps(ref_input, ref_weight, target, ref_bias), target)
        else:  # Liger's reference-free DPO: the reference log-probs are 0
            ref = torch.zeros(2 * pairs, dtype=torch.float64 if _input.dtype == torch.float64 else torch.float32,
                              device=_input.device)  # fmt: skip
        if supports_fused(self.config) and not self.average_log_prob and not self.compute_nll_loss:
            out, logps = self._fused(lin_weight, _input, target, bias, ref, pairs)
            nll = logps.new_zeros(())
        else:  # log-probs, then the loss (length means, the NLL term, the types the fused op does not take)
            token_logps = self._token_logps(_input, lin_weight, target, bias)
            logps, counts = self._sequence_logps(token_logps, target)
            # ipo, sigmoid_norm, sft average (sft: token-mean) the sums themselves, as TRL's: given means with
            # average_log_prob, they divided by the lengths twice (ipo 6.39 where 6.95, sft 0.85 where 4.25)
            own_mean = self.average_log_prob and self.loss_type in NEEDS_LENGTHS
            scored, scored_ref = (logps * counts, ref * counts) if own_mean else (logps, ref)
            out = preference_loss(PairLogps(scored[:pairs], scored[pairs:], scored_ref[:pairs], scored_ref[pairs:],
                                            counts[:pairs], counts[pairs:]), self.config)  # fmt: skip
            if own_mean:  # the rewards of the log-probs returned, the means (as every other type's)
                out.chosen_rewards = self.beta * (logps[:pairs] - ref[:pairs])
                out.rejected_rewards = self.beta * (logps[pairs:] - ref[pairs:])
            nll = self._nll(token_logps, target, pairs)
            out.loss = out.loss + self.alpha * nll
        chosen_mean, rejected_mean = self._logits_means(_input, lin_weight, bias, pairs)
        return out.loss, (logps[:pairs].detach(), logps[pairs:].detach(), chosen_mean, rejected_mean, nll.detach(),
                          out.chosen_rewards.detach(), out.rejected_rewards.detach())  # fmt: skip

    def _fused(self, weight, hidden, target, bias, ref, pairs):
        """``fused_pair_loss`` (3 GEMMs, gradients formed in the forward) on the rows as segments."""
        rows, length = target.shape
        device = hidden.device
        cu_seqlens = torch.arange(0, rows * length + 1, length, dtype=torch.int32, device=device)
        row = torch.arange(rows, device=device)
        out, seq_logps = fused_pair_loss(hidden.reshape(-1, hidden.shape[-1]), weight, target.reshape(-1),
                                         cu_seqlens, row % pairs, row < pairs, self.config, ref_chosen=ref[:pairs],
                                         ref_rejected=ref[pairs:], bias=bias, ignore_index=self.ignore_index,
                                         return_logps=True)  # fmt: skip
        return out, torch.cat([seq_logps[:, 0], seq_logps[:, 1]]).to(ref.dtype)


class FusedLinearCPOLoss(_FusedLinearPreferenceLoss):
    """``LigerFusedLinearCPOLoss``: ``-log σ(β(c − r))`` smoothed, plus ``alpha`` × the chosen NLL."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
                 compute_nll_loss: bool = True, compiled: bool = True, average_log_prob: bool = False,
                 chunk_size: int = 1, impl: str = "auto") -> None:  # fmt: skip
        super().__init__(ignore_index=ignore_index, beta=beta, alpha=alpha, compute_nll_loss=compute_nll_loss,
                         compiled=compiled, chunk_size=chunk_size, impl=impl)  # fmt: skip
        self.label_smoothing, self.average_log_prob = label_smoothing, average_log_prob

    def margin(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        return self.beta * (chosen - rejected)

    def forward(self, lin_weight, _input, target, bias=None):
        pairs, token_logps, logps, _ = self._policy(lin_weight, _input, target, bias)
        chosen, rejected = logps[:pairs], logps[pairs:]
        z = self.margin(chosen, rejected)
        smoothing = self.label_smoothing
        preference = (-F.logsigmoid(z) * (1 - smoothing) - F.logsigmoid(-z) * smoothing).mean()
        nll = self._nll(token_logps, target, pairs)
        chosen_mean, rejected_mean = self._logits_means(_input, lin_weight, bias, pairs)
        return preference + self.alpha * nll, (chosen.detach(), rejected.detach(), chosen_mean, rejected_mean,
                                               nll.detach(), self.beta * chosen.detach(),
                                               self.beta * rejected.detach())  # fmt: skip


class FusedLinearSimPOLoss(FusedLinearCPOLoss):
    """``LigerFusedLinearSimPOLoss``: log-prob means (always), ``-log σ(β(c̄ − r̄) − γ)`` smoothed, plus ``alpha`` ×
    the chosen NLL."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
                 compute_nll_loss: bool = True, compiled: bool = True, gamma: float = 0.5, chunk_size: int = 1,
                 impl: str = "auto") -> None:  # fmt: skip
        super().__init__(ignore_index=ignore_index, beta=beta, alpha=alpha, label_smoothing=label_smoothing,
                         compute_nll_loss=compute_nll_loss, compiled=compiled, average_log_prob=True,
                         chunk_size=chunk_size, impl=impl)  # fmt: skip
        self.gamma = gamma

    def margin(self, chosen: Tensor, rejected: Tensor) -> Tensor:
        return self.beta * (chosen - rejected) - self.gamma


class FusedLinearORPOLoss(_FusedLinearPreferenceLoss):
    """``LigerFusedLinearORPOLoss``: log-prob means (always), the chosen NLL (over ``nll_target`` when given) minus
    ``β · log σ(log-odds ratio)``; also returns ``log_odds_ratio`` and ``log_odds_chosen``."""

    average_log_prob = True

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, compute_nll_loss: bool = True,
                 compiled: bool = True, chunk_size: int = 1, impl: str = "auto") -> None:  # fmt: skip
        super().__init__(ignore_index=ignore_index, beta=beta, compute_nll_loss=compute_nll_loss, compiled=compiled,
                         chunk_size=chunk_size, impl=impl)  # fmt: skip

    def forward(self, lin_weight, _input, target, bias=None, nll_target=None):
        pairs, token_logps, logps, _ = self._policy(lin_weight, _input, target, bias)
        chosen, rejected = logps[:pairs], logps[pairs:]
        log_odds = (chosen - rejected) - (torch.log1p(-torch.exp(chosen)) - torch.log1p(-torch.exp(rejected)))
        ratio = F.logsigmoid(log_odds)
        if nll_target is None or not self.compute_nll_loss:
            nll = self._nll(token_logps, target, pairs)
        else:  # the NLL scores other targets of the chosen rows (e.g. prompt included)
            chosen_target = nll_target[:pairs]
            nll = self._nll(self._token_logps(_input[:pairs], lin_weight, chosen_target, bias), chosen_target, pairs)
        loss = nll - self.beta * ratio.mean()
        chosen_mean, rejected_mean = self._logits_means(_input, lin_weight, bias, pairs)
        return loss, (chosen.detach(), rejected.detach(), chosen_mean, rejected_mean, nll.detach(),
                      self.beta * chosen.detach(), self.beta * rejected.detach(), ratio.detach().mean(),
                      log_odds.detach().mean())  # fmt: skip


__all__ = ["FusedLinearCPOLoss", "FusedLinearDPOLoss", "FusedLinearORPOLoss", "FusedLinearSimPOLoss"]
