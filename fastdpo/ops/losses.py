"""The preference-loss family on per-sequence log-probs, with TRL 1.16's semantics.

Inputs are summed completion log-probs per sequence: policy ``π_c, π_r`` and reference ``ρ_c, ρ_r``
(``[B]`` each), with completion token counts where a type needs means. With
``Δ = β[(π_c − ρ_c) − (π_r − ρ_r)]``, e.g. ``sigmoid`` is ``−log σ(Δ)``; every type is documented in
``LOSS_TYPES`` and written out in ``_pair_loss``. Reference-free types (``simpo``, ``cpo``, ``orpo``) need no
reference log-probs. The total loss is ``Σ_k w_k · mean_b loss_k[b]`` over ``loss_type`` and ``loss_weights``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from fastdpo.errors import ConfigError, unknown_choice

LOSS_TYPES: dict[str, str] = {
    "sigmoid": "DPO: −log σ(Δ). Ignores label_smoothing, as TRL does (use 'cdpo' for conservative DPO).",
    "cdpo": "conservative DPO: −(1−ε) log σ(Δ) − ε log σ(−Δ).",
    "robust": "robust DPO: (−(1−ε) log σ(Δ) + ε log σ(−Δ)) / (1−2ε), 0 ≤ ε < 0.5.",
    "hinge": "SLiC: relu(1 − Δ).",
    "ipo": "IPO on length-averaged log-ratios: (Δ̄/β − 1/(2β))².",
    "exo_pair": "EXO-pref (needs ε > 0): KL of softmax(Δ) over the pair from (1−ε, ε).",
    "nca_pair": "NCA: −log σ(r_c) − ½ log σ(−r_c) − ½ log σ(−r_r), r = β·log-ratio.",
    "bco_pair": "BCO: −log σ(r_c) − log σ(−r_r).",
    "sppo_hard": "SPPO (hard labels): (log-ratio_c − 1/(2β))² + (log-ratio_r + 1/(2β))².",
    "aot": "AOT: sorted policy log-odds minus sorted reference log-odds within the micro-batch, smoothed by ε.",
    "aot_unpaired": "AOT unpaired: sorted chosen log-ratios minus sorted rejected log-ratios, smoothed by ε.",
    "apo_zero": "APO-zero: 1 − σ(r_c) + σ(r_r).",
    "apo_down": "APO-down: σ(r_c) + 1 − σ(r_c − r_r).",
    "discopop": "DiscoPOP: logistic/exponential blend modulated by σ(Δ/τ).",
    "sft": "NLL of the chosen completions: the token mean over the micro-batch.",
    "sigmoid_norm": "DPO on length-averaged log-ratios: −log σ(β Δ̄).",
    "simpo": "SimPO (reference-free): −log σ(β(π̄_c − π̄_r) − γ), smoothed by ε.",
    "cpo": "CPO (reference-free): −log σ(β(π_c − π_r)) smoothed by ε, + cpo_alpha · NLL(chosen).",
    "orpo": "ORPO (reference-free): NLL(chosen) − β·log σ(log odds(π̄_c) − log odds(π̄_r)).",
}
REFERENCE_FREE = frozenset({"simpo", "cpo", "orpo"})
SMOOTHED = frozenset({"cdpo", "robust", "exo_pair", "aot", "aot_unpaired", "simpo", "cpo"})  # take label_smoothing
NEEDS_LENGTHS = frozenset({"ipo", "sigmoid_norm", "sft", "simpo", "orpo", "cpo"})
SORTING = frozenset({"aot", "aot_unpaired"})
# types whose loss is not a sum of per-pair terms: a sort or a token mean over the micro-batch (its pairs matter)
BATCH_COUPLED = SORTING | {"sft", "cpo", "orpo"}
F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
# The f-DPO reparameterization leaves a β·log Z(x) term that cancels only in the chosen − rejected difference
F_DIVERGENCE_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft", "cdpo"}
)


@dataclass
class LossConfig:
    """Which losses, and their hyper-parameters (TRL's names and defaults)."""

    loss_type: str | list[str] = "sigmoid"
    loss_weights: list[float] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    loss_types: tuple[str, ...] = field(init=False, repr=False)
    weights: tuple[float, ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        types = [self.loss_type] if isinstance(self.loss_type, str) else list(self.loss_type)
        if not types:
            raise ConfigError("is empty", column="loss_type", fix=f"use one of {', '.join(LOSS_TYPES)}")
        for name in types:
            if name not in LOSS_TYPES:
                raise unknown_choice("loss_type", name, LOSS_TYPES)
        weights = [1.0] * len(types) if self.loss_weights is None else _numbers(self.loss_weights, "loss_weights")
        if len(weights) != len(types):
            raise ConfigError(
                f"has {len(weights)} weights for {len(types)} loss types",
                column="loss_weights",
                fix="give one weight per entry of loss_type",
            )
        free = REFERENCE_FREE.intersection(types)
        if len(free) > 1 or (free and set(types) - free - {"sft"}):
            raise ConfigError(
                f"mixes reference-free {sorted(free)} with other preference losses",
                column="loss_type",
                fix="use one reference-free loss, combined with 'sft' at most",
            )
        if not (self.beta > 0 and math.isfinite(self.beta)):
            raise ConfigError(f"must be > 0, got {self.beta}", column="beta", fix="typical values are 0.01 to 0.5")
        self._check_smoothing(types)
        self._check_divergence(types)
        if "discopop" in types and not self.discopop_tau > 0:  # (another type's run ignores it, as TRL does)
            raise ConfigError(f"must be > 0, got {self.discopop_tau}", column="discopop_tau", fix="the paper uses 0.05")
        for name in ("f_alpha_divergence_coef", "simpo_gamma", "cpo_alpha"):  # (NaN: every step's loss NaN, or the
            value = getattr(self, name)  # option silently taken as another value)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"must be a finite number, got {value!r}", column=name)
        self.loss_types, self.weights = tuple(types), tuple(weights)

    def _check_smoothing(self, types: list[str]) -> None:
        eps = self.label_smoothing
        if not SMOOTHED.intersection(types):  # ignored, as TRL ignores it (the trainers warn of it): sigmoid's 1.0 too
            return
        if not 0.0 <= eps < 1.0:
            raise ConfigError(f"must be in [0, 1), got {eps}", column="label_smoothing")
        if "robust" in types and not eps < 0.5:
            raise ConfigError(f"must be in [0, 0.5) for 'robust', got {eps}", column="label_smoothing")
        if "cdpo" in types and not eps <= 0.5:
            raise ConfigError(f"must be in [0, 0.5] for 'cdpo', got {eps}", column="label_smoothing")
        if "exo_pair" in types and eps == 0.0:
            raise ConfigError(
                "must be > 0 for 'exo_pair'", column="label_smoothing", fix="the EXO paper recommends 1e-3"
            )

    def _check_divergence(self, types: list[str]) -> None:
        if self.f_divergence_type not in F_DIVERGENCES:
            raise unknown_choice("f_divergence_type", self.f_divergence_type, F_DIVERGENCES)
        unsupported = sorted(set(types) - F_DIVERGENCE_TYPES)
        if self.f_divergence_type != "reverse_kl" and unsupported:
            raise ConfigError(
                f"'{self.f_divergence_type}' is not defined for {unsupported}",
                column="f_divergence_type",
                fix=f"use 'reverse_kl' with these losses, or one of {sorted(F_DIVERGENCE_TYPES)}",
            )

    @property
    def reference_free(self) -> bool:
        return bool(REFERENCE_FREE.intersection(self.loss_types))


@dataclass
class PairLogps:
    """Per-pair inputs of a loss, all ``[B]`` (``chosen_nll`` a scalar)."""

    chosen: Tensor
    """Policy log-probs of the chosen completions, summed over their tokens."""
    rejected: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_tokens: Tensor | None = None
    """Completion token counts (for length-averaged types: ipo, sigmoid_norm, sft, simpo, cpo, orpo)."""
    rejected_tokens: Tensor | None = None
    chosen_nll: Tensor | None = None
    """ORPO only: token-mean NLL over the whole prompt + chosen sequences of the micro-batch (TRL's choice)."""
    chosen_unweighted: Tensor | None = None
    """When ``chosen`` holds weighted sums (LD-DPO's ``ld_alpha``): the plain sums, for the SFT/CPO NLL term (TRL's
    SFT term is the plain token mean)."""
    chosen_lengths: Tensor | None = None
    """``ipo`` and ``sigmoid_norm``'s divisor as TRL's DPOTrainer takes it (its unshifted completion mask): the token
    counts, plus one for a sequence that begins with its completion (its first token, which no position predicts);
    None: the token counts."""
    rejected_lengths: Tensor | None = None


@dataclass
class LossOutput:
    loss: Tensor
    """Scalar: ``Σ_k w_k · mean(per-pair loss_k)``."""
    per_pair: Tensor
    """``[B]``: ``Σ_k w_k · loss_k``, whose mean is ``loss`` (for sorting types, in sorted order)."""
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    metrics: dict[str, Tensor]
    """Detached scalars named as TRL logs them: rewards/chosen|rejected|accuracies|margins, logps/chosen|rejected,
    and nll_loss, log_odds_ratio, log_odds_chosen where the type has them."""
    token_counts: dict[str, Tensor] = field(default_factory=dict)
    """For each per-token mean in ``metrics`` (entropy, logits/chosen|rejected, mean_token_accuracy), the number of
    tokens it is a mean over: means of several micro-batches or processes weigh them so, as TRL divides its gathered
    sums once (a mean of per-process means was off: logits/rejected 9x under 2 processes)."""


def preference_loss(pairs: PairLogps, config: LossConfig, *, pair_weights: Tensor | None = None) -> LossOutput:
    """The loss of ``config`` on ``pairs``; ``pair_weights [B]`` (WPO) multiply each type's per-pair loss."""
    _check_pairs(pairs, config, pair_weights)
    per_pair = torch.zeros_like(pairs.chosen)
    extra: dict[str, Tensor] = {}
    for loss_type, weight in zip(config.loss_types, config.weights, strict=True):
        losses = _pair_loss(loss_type, pairs, config, extra)
        if pair_weights is not None:
            losses = losses * pair_weights
        per_pair = per_pair + weight * losses
    chosen_rewards, rejected_rewards = _rewards(pairs, config)
    chosen_logps, rejected_logps = _logged_logps(pairs, config)
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.mean(),
        "logps/rejected": rejected_logps.mean(),
        **{name: value.detach() for name, value in extra.items()},
    }
    return LossOutput(per_pair.mean(), per_pair, chosen_rewards, rejected_rewards, metrics)


def _check_pairs(pairs: PairLogps, config: LossConfig, pair_weights: Tensor | None) -> None:
    shape = pairs.chosen.shape
    if pairs.chosen.dim() != 1 or pairs.rejected.shape != shape:
        raise ValueError(f"pairs: chosen {tuple(shape)} and rejected {tuple(pairs.rejected.shape)} must both be [B]")
    if not config.reference_free and (pairs.ref_chosen is None or pairs.ref_rejected is None):
        raise ValueError(f"pairs: loss_type {list(config.loss_types)} needs ref_chosen and ref_rejected")
    if NEEDS_LENGTHS.intersection(config.loss_types) and (pairs.chosen_tokens is None or pairs.rejected_tokens is None):
        needing = sorted(NEEDS_LENGTHS.intersection(config.loss_types))
        raise ValueError(f"pairs: loss_type {needing} needs chosen_tokens and rejected_tokens (completion lengths)")
    if "orpo" in config.loss_types and pairs.chosen_nll is None:
        raise ValueError("pairs: 'orpo' needs chosen_nll, the token-mean NLL over prompt + chosen")
    if pair_weights is not None and SORTING.intersection(config.loss_types):
        raise ValueError("pair_weights: not defined for 'aot'/'aot_unpaired', which sort the pairs")


def _log_ratios(pairs: PairLogps) -> tuple[Tensor, Tensor]:
    return pairs.chosen - pairs.ref_chosen, pairs.rejected - pairs.ref_rejected


def _scores(log_ratio: Tensor, config: LossConfig) -> Tensor:
    """f'(π/ρ) for the f-divergence: the log-ratio itself for reverse KL (standard DPO)."""
    kind, alpha = config.f_divergence_type, config.f_alpha_divergence_coef
    if kind == "forward_kl":
        return 1 - torch.exp(-log_ratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(log_ratio)
    if kind == "alpha_divergence" and abs(alpha - 1.0) > 1e-6:
        # (t^(α−1) − 1)/(α−1) with t = π/ρ; clamped so exp stays finite, as TRL does (80 in fp32, 11 in fp16)
        clamp = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0}.get(log_ratio.dtype, 700.0)
        t = torch.clamp((alpha - 1.0) * log_ratio, max=clamp)
        return (torch.exp(t) - 1.0) / (alpha - 1.0)
    return log_ratio


def _mean(total: Tensor, tokens: Tensor) -> Tensor:
    return total / tokens.to(total.dtype).clamp(min=1.0)


def _numbers(values, column: str) -> list[float]:
    """``values`` as finite floats; a ConfigError naming ``column`` where one is not."""
    try:
        numbers = [float(value) for value in values]
    except (TypeError, ValueError):
        raise ConfigError(f"expected a list of numbers, got {values!r}", column=column) from None
    if not all(map(math.isfinite, numbers)):
        raise ConfigError(f"must be finite, got {numbers}", column=column)
    return numbers


def _smoothed(logits: Tensor, eps: float) -> Tensor:
    return -F.logsigmoid(logits) * (1 - eps) - F.logsigmoid(-logits) * eps


def _pair_loss(loss_type: str, pairs: PairLogps, config: LossConfig, extra: dict[str, Tensor]) -> Tensor:
    if loss_type in REFERENCE_FREE or loss_type == "sft":
        return _reference_free_loss(loss_type, pairs, config, extra)
    beta, eps = config.beta, config.label_smoothing
    chosen_ratio, rejected_ratio = _log_ratios(pairs)
    chosen_score, rejected_score = _scores(chosen_ratio, config), _scores(rejected_ratio, config)
    delta = beta * (chosen_score - rejected_score)
    if loss_type == "sigmoid":
        return -F.logsigmoid(delta)
    if loss_type == "cdpo":
        return _smoothed(delta, eps)
    if loss_type == "robust":
        return (-(1 - eps) * F.logsigmoid(delta) + eps * F.logsigmoid(-delta)) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - delta)
    if loss_type in ("ipo", "sigmoid_norm"):
        chosen_length = pairs.chosen_tokens if pairs.chosen_lengths is None else pairs.chosen_lengths
        rejected_length = pairs.rejected_tokens if pairs.rejected_lengths is None else pairs.rejected_lengths
        mean_delta = _mean(chosen_score, chosen_length) - _mean(rejected_score, rejected_length)
        if loss_type == "ipo":
            return (mean_delta - 1 / (2 * beta)) ** 2
        return -F.logsigmoid(beta * mean_delta)
    if loss_type == "exo_pair":
        eps_t = torch.tensor(eps, dtype=delta.dtype, device=delta.device)
        win = torch.sigmoid(delta) * (F.logsigmoid(delta) - torch.log1p(-eps_t))
        lose = torch.sigmoid(-delta) * (F.logsigmoid(-delta) - torch.log(eps_t))
        return win + lose
    chosen_reward, rejected_reward = beta * chosen_ratio, beta * rejected_ratio
    if loss_type == "nca_pair":
        return -F.logsigmoid(chosen_reward) - 0.5 * F.logsigmoid(-chosen_reward) - 0.5 * F.logsigmoid(-rejected_reward)
    if loss_type == "bco_pair":
        return -F.logsigmoid(chosen_reward) - F.logsigmoid(-rejected_reward)
    if loss_type == "sppo_hard":
        return (chosen_ratio - 0.5 / beta) ** 2 + (rejected_ratio + 0.5 / beta) ** 2
    if loss_type == "aot":
        policy = torch.sort(pairs.chosen - pairs.rejected).values
        reference = torch.sort(pairs.ref_chosen - pairs.ref_rejected).values
        return _smoothed(beta * (policy - reference), eps)
    if loss_type == "aot_unpaired":
        return _smoothed(beta * (torch.sort(chosen_ratio).values - torch.sort(rejected_ratio).values), eps)
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(chosen_reward) + torch.sigmoid(rejected_reward)
    if loss_type == "apo_down":
        return torch.sigmoid(chosen_reward) + 1 - torch.sigmoid(chosen_reward - rejected_reward)
    if loss_type == "discopop":
        modulation = torch.sigmoid(delta / config.discopop_tau)
        return -F.logsigmoid(delta) * (1 - modulation) + torch.exp(-delta) * modulation
    raise AssertionError(f"loss type {loss_type!r} passed validation but has no formula")


def _chosen_nll(pairs: PairLogps) -> Tensor:
    """Token-mean NLL of the chosen completions over the micro-batch (of the plain sums when ``chosen`` is
    weighted)."""
    chosen = pairs.chosen if pairs.chosen_unweighted is None else pairs.chosen_unweighted
    return -chosen.sum() / pairs.chosen_tokens.sum().to(chosen.dtype).clamp(min=1.0)


def _log1mexp(x: Tensor) -> Tensor:
    """log(1 − eˣ) for x < 0, switching form at −ln 2 to avoid cancellation."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def _reference_free_loss(loss_type: str, pairs: PairLogps, config: LossConfig, extra: dict[str, Tensor]) -> Tensor:
    beta, eps = config.beta, config.label_smoothing
    batch = pairs.chosen.shape[0]
    if loss_type == "sft":
        return _chosen_nll(pairs).expand(batch)
    if loss_type == "cpo":
        nll = _chosen_nll(pairs)
        extra["nll_loss"] = nll
        return _smoothed(beta * (pairs.chosen - pairs.rejected), eps) + config.cpo_alpha * nll
    chosen_mean = _mean(pairs.chosen, pairs.chosen_tokens)
    rejected_mean = _mean(pairs.rejected, pairs.rejected_tokens)
    if loss_type == "simpo":
        if "sft" in config.loss_types:  # CPO-SimPO: its NLL logged, as TRL's CPO trainer logs it (for plain SimPO,
            extra["nll_loss"] = _chosen_nll(pairs).detach()  # cpo_alpha=0, TRL logs a 0: not here)
        return _smoothed(beta * (chosen_mean - rejected_mean) - config.simpo_gamma, eps)
    # orpo: log odds(p) = log p − log(1 − p) on mean completion log-probs
    log_odds = (chosen_mean - rejected_mean) - (_log1mexp(chosen_mean) - _log1mexp(rejected_mean))
    ratio = F.logsigmoid(log_odds)
    extra.update(nll_loss=pairs.chosen_nll, log_odds_ratio=ratio.mean(), log_odds_chosen=log_odds.mean())
    return pairs.chosen_nll - beta * ratio


def _logged_logps(pairs: PairLogps, config: LossConfig) -> tuple[Tensor, Tensor]:
    """The log-probs TRL logs as logps/*: summed, or the token means for simpo and orpo."""
    with torch.no_grad():
        if {"simpo", "orpo"}.intersection(config.loss_types):
            return _mean(pairs.chosen, pairs.chosen_tokens), _mean(pairs.rejected, pairs.rejected_tokens)
        return pairs.chosen.detach(), pairs.rejected.detach()


def _rewards(pairs: PairLogps, config: LossConfig) -> tuple[Tensor, Tensor]:
    """Implicit rewards as TRL logs them: β·log-ratio; β·log-prob (token mean for simpo/orpo) when reference-free."""
    with torch.no_grad():
        if not config.reference_free:
            chosen_ratio, rejected_ratio = _log_ratios(pairs)
            return config.beta * chosen_ratio, config.beta * rejected_ratio
        chosen, rejected = _logged_logps(pairs, config)
        return config.beta * chosen, config.beta * rejected
