"""``DPOConfig``: TRL 1.16's DPO options with TRL's names and defaults, plus fastdpo's own, on TrainingArguments.

A TRL user's arguments mean the same thing here. Differences, each deliberate:

- ``bf16`` left unset is True only on a GPU that supports it (and without ``fp16``); on a CPU it is False (fp32),
  where TRL's default would raise or autocast to bf16.
- ``ld_alpha`` (LD-DPO) and ``use_weighting`` (WPO) run on the plain head path (``fastdpo.train.step``), not the
  fused pair loss; ``ld_alpha`` must lie in [0, 1], and ``use_weighting`` with ``aot``/``aot_unpaired`` is a
  ``ConfigError`` (TRL raises ``NotImplementedError``), as is either with a reference-free type.
  ``precompute_ref_log_probs`` selects the cached reference (``fastdpo.model.reference_cache``; files in
  ``ref_cache_dir``).
- ``activation_offloading`` moves the policy body's saved activations to host memory (``fastdpo.model.offload``;
  the copies do not overlap compute as TRL's do; nothing moves on a CPU).
- ``train_sampling_strategy`` ``group_by_length`` and ``batch_rebalance`` are refused: they sort padded batches
  (and fail on DPO's columns in TRL too); packed batches have no padding, and ``balance_ranks`` evens out tokens
  across processes.
- ``padding_free`` (which TRL 1.16 warns about and ignores) is accepted with a warning: fastdpo always packs.
- Ours: ``packing`` (on; off puts each pair alone in its own row), ``pack_length`` (default
  ``fastdpo.data.default_pack_length``), ``max_tokens_per_batch``, ``reference``
  (``auto|separate|cached|adapter|none``), ``ref_cache_dir``, ``head_impl``, ``simpo_gamma``, ``cpo_alpha``,
  ``max_nonfinite_steps`` (the numerics guard, ``fastdpo.train.common.NumericsGuard``; 0 turns it off),
  ``ref_offload`` (a separate reference waits in host memory between its passes: ``HostResident``),
  ``balance_ranks`` (several processes: each step's pairs are dealt so that every process packs about as many
  tokens; the pairs of a step are the same as without it: ``fastdpo.data.sampler.RankBalancedBatchSampler``; off
  for loss types that take a mean or a sort over a process's micro-batch, ``coupled_losses``),
  ``displacement_margin`` (warn once when ``logps/chosen`` has fallen by more than this fraction of its first logged
  value, at least 1 nat, while reward accuracy rises: ``fastdpo.train.dpo.DisplacementWatch``; None: off; the change
  is logged as ``logps/chosen_change`` either way), ``packed_attention`` (``auto|varlen|model``: the attention the
  packed steps run with; ``varlen`` is ``fastdpo_varlen``, causal attention per sequence with every batch in one
  row and no padding; ``auto`` and ``model`` keep the model's own for now: ``fastdpo.model.packed_attention``),
  ``lean_activations`` (the policy's RMSNorms and gated MLPs keep less for the backward, with the same gradients,
  the MLPs working on blocks of tokens; on a GPU the Llama-form norms and SiLU MLPs, the reference's too, run
  fastdpo's Triton kernels: ``fastdpo.model.lean``; off by default until a GPU has timed it; refused under FSDP and
  ZeRO-3), ``stream_bad_rows`` (``raise|drop``: a stream's row that preparation refuses stops the run with one
  ``DataError``, as TRL's does, or is dropped and counted in ``dropped_rows`` under the quality check's reason, as
  the ``fastdpo`` command's ``data_filter: drop`` drops such rows of a map-style dataset;
  ``fastdpo.data.stream``).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

from transformers import TrainingArguments

from fastdpo.errors import ConfigError, unknown_choice
from fastdpo.model.attention import PACKED_ATTENTION
from fastdpo.ops import REFERENCE_FREE, LossConfig
from fastdpo.ops.losses import BATCH_COUPLED, SMOOTHED
from fastdpo.train.common import check_liger, check_report_to, check_shared_options, resolve_trl_defaults

logger = logging.getLogger(__name__)

REFERENCES = ("auto", "separate", "cached", "adapter", "none")


@dataclass
class DPOConfig(TrainingArguments):
    """TrainingArguments plus the DPO options (TRL 1.16's names and defaults; see the module docstring)."""

    # fields TrainingArguments parses from a JSON string (a command line passes dicts that way)
    _VALID_DICT_FIELDS: ClassVar[list[str]] = [*TrainingArguments._VALID_DICT_FIELDS, "model_init_kwargs"]

    # --- TRL 1.16 DPOConfig fields, same names and defaults
    model_init_kwargs: dict | None = None
    trust_remote_code: bool = False
    router_aux_loss_coef: float | None = None
    disable_dropout: bool = True
    dataset_num_proc: int | None = None
    max_length: int | None = 1024
    truncation_mode: str = "keep_start"
    padding_free: bool = False
    pad_to_multiple_of: int | str | None = "auto"
    precompute_ref_log_probs: bool = False
    precompute_ref_batch_size: int | None = None
    loss_type: list[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: list[float] | None = None
    ld_alpha: float | None = None
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    label_smoothing: float = 0.0
    beta: float = 0.1
    use_weighting: bool = False
    discopop_tau: float = 0.05
    activation_offloading: bool = False
    sync_ref_model: bool = False
    ref_model_mixup_alpha: float = 0.6
    ref_model_sync_steps: int = 512
    pad_token: str | None = None
    # --- TrainingArguments defaults TRL changes
    learning_rate: float = 1e-6
    logging_steps: float = 10
    gradient_checkpointing: bool = True
    bf16: bool | None = None
    # --- fastdpo's own
    packing: bool = True
    pack_length: int | None = None
    max_tokens_per_batch: int | None = None
    reference: str = "auto"
    head_impl: str = "auto"
    packed_attention: str = "auto"
    lean_activations: bool = False
    simpo_gamma: float = 0.5
    cpo_alpha: float = 1.0
    max_nonfinite_steps: int = 10
    ref_cache_dir: str | None = None
    ref_offload: bool = False
    balance_ranks: bool = True
    displacement_margin: float | None = 0.1
    stream_bad_rows: str = "raise"

    def __post_init__(self) -> None:
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        if self.displacement_margin is not None and not self.displacement_margin >= 0:
            raise ConfigError(f"must be a fraction >= 0 or None, got {self.displacement_margin}",
                              column="displacement_margin",
                              fix="e.g. 0.1 (the default), or None to turn it off")  # fmt: skip
        resolve_trl_defaults(self)
        self._check_options()
        super().__post_init__()
        check_report_to(self)
        check_liger(self)  # (after: it reads self.device)
        if isinstance(self.pad_to_multiple_of, str) and self.pad_to_multiple_of != "auto":  # from a CLI or YAML
            text = self.pad_to_multiple_of.strip().lower()
            if text not in ("none", "null") and not text.isdigit():
                raise ConfigError(f"{self.pad_to_multiple_of!r} is not a number", column="pad_to_multiple_of",
                                  fix="use a positive integer, 'auto' or None")  # fmt: skip
            self.pad_to_multiple_of = None if text in ("none", "null") else int(text)
        if self.pad_to_multiple_of == "auto":  # as TRL: only Neuron, which compiles once per shape, rounds
            self.pad_to_multiple_of = 128 if self.device.type == "neuron" else None

    def _check_options(self) -> None:
        check_shared_options(self, {})
        check_loss_options(self)
        if self.padding_free:
            warnings.warn("padding_free: fastdpo always packs sequences; the option changes nothing", stacklevel=3)
        if self.pad_token is not None:  # deprecated in TRL 1.16, which warns and still uses it (so does fastdpo)
            warnings.warn("pad_token is deprecated (as in TRL): set tokenizer.pad_token instead", FutureWarning,
                          stacklevel=3)  # fmt: skip
        if self.reference not in REFERENCES:
            raise unknown_choice("reference", self.reference, REFERENCES)
        if self.packed_attention not in PACKED_ATTENTION:
            raise unknown_choice("packed_attention", self.packed_attention, PACKED_ATTENTION)
        if self.pack_length is not None and self.max_length is not None and self.pack_length < self.max_length:
            raise ConfigError(
                f"{self.pack_length} cannot hold a {self.max_length}-token sequence",
                column="pack_length",
                fix=f"use at least max_length = {self.max_length}, or leave it unset",
            )
        if self.max_tokens_per_batch is not None and self.max_tokens_per_batch < 1:
            raise ConfigError(f"must be positive, got {self.max_tokens_per_batch}", column="max_tokens_per_batch")
        # (its retries shrank a batch size the budget's batches never read, until accelerate gave up at zero)
        if self.max_tokens_per_batch is not None and self.auto_find_batch_size:
            raise ConfigError("halves the batch size after an out-of-memory error; max_tokens_per_batch batches "
                              "by tokens and has none to halve", column="auto_find_batch_size",
                              fix="lower max_tokens_per_batch yourself, or batch by per_device_train_batch_size"
                              )  # fmt: skip
        if self.train_sampling_strategy in ("group_by_length", "batch_rebalance"):
            raise ConfigError(
                f"{self.train_sampling_strategy!r} sorts examples to save padding; packed batches have none",
                column="train_sampling_strategy",
                fix="leave it at 'random'; balance_ranks=True already evens out tokens across processes",
            )
        if self.ref_offload and (self.precompute_ref_log_probs or self.reference in ("cached", "adapter", "none")):
            raise ConfigError("moves a separate reference model between passes; this reference has none",
                              column="ref_offload", fix="use ref_offload=False, or reference='separate'")  # fmt: skip
        if self.sync_ref_model and (self.precompute_ref_log_probs or self.reference in ("cached", "none")):
            fix = "use sync_ref_model=False, or a separate reference"
            raise ConfigError("updates a reference model; a cached or absent reference has none",
                              column="sync_ref_model", fix=fix)  # fmt: skip
        self.loss_config()  # validates the loss options (ConfigError naming the option)

    def loss_config(self) -> LossConfig:
        """The ``LossConfig`` these options describe."""
        return loss_config_of(self)


def check_loss_options(args) -> None:
    """The DPO options fastdpo's and TRL's configs share, checked: ``check_weighting``; TR-DPO's sync settings (a
    period of 0 failed after the first step, ``ZeroDivisionError``, TRL's too; a mixing weight outside [0, 1]
    extrapolated the reference); a warning for ``label_smoothing`` or ``cpo_alpha`` that no loss type uses."""
    check_weighting(args)
    if getattr(args, "sync_ref_model", False):
        steps, alpha = args.ref_model_sync_steps, args.ref_model_mixup_alpha
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"must be a whole number ≥ 1, got {steps!r}", column="ref_model_sync_steps",
                              fix="the reference moves toward the policy every this many steps (TRL: 512)")  # fmt: skip
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise ConfigError(f"must be in [0, 1], got {alpha!r}", column="ref_model_mixup_alpha",
                              fix="the reference becomes α·policy + (1 − α)·reference (TRL: 0.6)")  # fmt: skip
    types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
    if args.label_smoothing and not SMOOTHED.intersection(types):
        warnings.warn(f"label_smoothing={args.label_smoothing} is not used by loss_type {types} (as in TRL 1.16): "
                      f"it smooths {sorted(SMOOTHED)}; conservative DPO is fastdpo.DPOTrainer's loss_type='cdpo' "
                      "(TRL 1.16 has none)", stacklevel=3)  # fmt: skip
    alpha = getattr(args, "cpo_alpha", 1.0)  # (0 beside simpo: TRL's CPO trainer's plain SimPO, as fastdpo's)
    if alpha != 1.0 and "cpo" not in types and not (alpha == 0 and "simpo" in types):
        warnings.warn(f"cpo_alpha={alpha} is used by loss_type 'cpo' alone, not by {types}; CPO-SimPO (TRL's CPO "
                      f"trainer with loss_type='simpo') is loss_type=['simpo', 'sft'], loss_weights=[1, {alpha}]",
                      stacklevel=3)  # fmt: skip


def check_weighting(args) -> None:
    """``ld_alpha`` within [0, 1]; ``use_weighting`` not with the loss types that sort pairs (fastdpo's and TRL's
    configs)."""
    alpha = args.ld_alpha
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1):
        fix = "1.0 weighs every token fully (plain DPO), 0.0 drops the tokens past the shorter side"
        raise ConfigError(f"must be in [0, 1] or None, got {alpha!r}", column="ld_alpha", fix=fix)
    sorting = sorted({"aot", "aot_unpaired"}.intersection(args.loss_type))
    if args.use_weighting and sorting:
        raise ConfigError(f"cannot weigh pairs under {sorting}, which sort them", column="use_weighting",
                          fix="use_weighting=False, or another loss type")  # fmt: skip
    # TRL defines both for its DPO loss family; fastdpo's reference-free types (from TRL's CPO/ORPO trainers, which
    # have neither) would give them a meaning of our own
    free = sorted(REFERENCE_FREE.intersection(args.loss_type))
    for name, off in (("ld_alpha", None), ("use_weighting", False)):
        if free and getattr(args, name) != off:
            raise ConfigError(f"is defined for TRL's DPO losses, not for {free}", column=name,
                              fix=f"leave it at {off!r} with these loss types")  # fmt: skip


def loss_config_of(args) -> LossConfig:
    """The ``LossConfig`` of a ``DPOConfig``, fastdpo's or TRL's (the same field names; TRL's lacks ``simpo_gamma``
    and ``cpo_alpha``, which then keep ``LossConfig``'s defaults)."""
    extra = {name: getattr(args, name) for name in ("simpo_gamma", "cpo_alpha") if hasattr(args, name)}
    return LossConfig(loss_type=list(args.loss_type), loss_weights=args.loss_weights, beta=args.beta,
                      label_smoothing=args.label_smoothing, f_divergence_type=args.f_divergence_type,
                      f_alpha_divergence_coef=args.f_alpha_divergence_coef, discopop_tau=args.discopop_tau,
                      **extra)  # fmt: skip


def coupled_losses(args: DPOConfig) -> list[str]:
    """The loss types whose loss takes a token mean or a sort over a process's micro-batch (``BATCH_COUPLED``):
    ``balance_ranks`` would deal a step's pairs to other processes than TRL's sampler does, changing the loss, so it
    is off for them (said once, on the first process)."""
    coupled = sorted(BATCH_COUPLED.intersection(args.loss_type))
    if coupled and args.balance_ranks and args.world_size > 1 and args.process_index == 0:
        logger.info("balance_ranks is off: %s take a mean or a sort over each process's micro-batch, which the "
                    "balanced deal would change (the batches are TRL's)", ", ".join(coupled))  # fmt: skip
    return coupled
