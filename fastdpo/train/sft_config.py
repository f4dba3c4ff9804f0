"""``SFTConfig``: TRL 1.16's SFT options with TRL's names and defaults, plus fastdpo's own, on TrainingArguments.

A TRL user's arguments mean the same thing here. Differences, each deliberate:

- ``bf16`` left unset is True only on a GPU that supports it (and without ``fp16``); on a CPU it is False (fp32),
  where TRL's default would autocast to bf16.
- ``packing`` keeps TRL's default (False) and TRL's meaning: it decides *which sequences share an optimizer step*.
  With ``packing=True`` the whole dataset is packed into rows of ``max_length`` tokens before training, exactly
  as TRL packs it (``packing_strategy``; ``fastdpo.data.packing.pack_sft_dataset``), and each step takes
  ``per_device_train_batch_size`` of those rows; as in TRL, every sequence is then cut to its first
  ``max_length`` tokens whatever ``truncation_mode`` says, and rows left with no label are kept. With
  ``packing=False`` each step takes ``per_device_train_batch_size`` examples (truncated, rows left with no label
  dropped and counted), as TRL does. Either way the only padding is at row ends: TRL's packed rows are the rows of
  the step (TRL flattens them into one), and unpacked examples are packed into rows of ``pack_length`` tokens
  (TRL pads each to the longest example). Padding is no target, so the loss is the same.
- ``padding_free`` changes nothing (fastdpo never pads) and is accepted with a warning; TRL refuses it without
  packing unless ``max_length`` is None.
- ``label_smoothing_factor`` (which TRL 1.16 deprecates: its loss then takes a second forward with the full
  logits) is computed without the logits (``fastdpo.ops.label_smoothing``); with ``loss_type="dft"`` (where TRL
  ignores it) or a soft-capped head (Gemma 2) it is a ``ConfigError``.
- Options this version does not implement raise ``ConfigError`` naming the option instead of being ignored:
  ``dataset_kwargs`` keys other than ``skip_prepare_dataset``, ``chat_template_path`` other than a ``.jinja``
  file.
- ``activation_offloading`` moves the body's saved activations to host memory (``fastdpo.model.offload``; the
  copies do not overlap compute as TRL's do; nothing moves on a CPU).
- Ours: ``pack_length`` (row capacity for unpacked steps; default the step's longest sequence for eager/sdpa
  attention, as DPO's, at least 4096 for flash-style attention, never less than the longest sequence of the step),
  ``head_impl``,
  ``packed_attention`` (as ``DPOConfig``'s: ``auto|varlen|model``, the attention the packed steps run with;
  ``fastdpo.model.packed_attention``), ``lean_activations`` (as ``DPOConfig``'s: ``fastdpo.model.lean``),
  ``max_nonfinite_steps``, ``stream_bad_rows`` (as ``DPOConfig``'s; a row dropped from an SFT stream is counted as
  ``refused_<column>``).
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Any, ClassVar

from transformers import TrainingArguments

from fastdpo.data.packing import SFT_PACKING_STRATEGIES
from fastdpo.errors import ConfigError, unknown_choice
from fastdpo.model.attention import PACKED_ATTENTION
from fastdpo.train.common import check_liger, check_report_to, check_shared_options, resolve_trl_defaults

LOSS_TYPES = ("nll", "dft")


@dataclass
class SFTConfig(TrainingArguments):
    """TrainingArguments plus the SFT options (TRL 1.16's names and defaults; see the module docstring)."""

    # fields TrainingArguments parses from a JSON string (the command line passes dicts that way)
    _VALID_DICT_FIELDS: ClassVar[list[str]] = [
        *TrainingArguments._VALID_DICT_FIELDS,
        "model_init_kwargs",
        "dataset_kwargs",
    ]

    # --- TRL 1.16 SFTConfig fields, same names and defaults
    model_init_kwargs: dict[str, Any] | str | None = None
    trust_remote_code: bool = False
    router_aux_loss_coef: float | None = None
    chat_template_path: str | None = None
    dataset_text_field: str = "text"
    dataset_kwargs: dict[str, Any] | str | None = None
    dataset_num_proc: int | None = None
    eos_token: str | None = None
    max_length: int | None = 1024
    truncation_mode: str = "keep_start"
    shuffle_dataset: bool = False
    packing: bool = False
    packing_strategy: str = "bfd"
    padding_free: bool = False
    pad_to_multiple_of: int | str | None = "auto"
    eval_packing: bool | None = None
    completion_only_loss: bool | None = None
    assistant_only_loss: bool = False
    loss_type: str = "nll"
    activation_offloading: bool = False
    pad_token: str | None = None
    # --- TrainingArguments defaults TRL changes
    learning_rate: float = 2e-5
    logging_steps: float = 10
    gradient_checkpointing: bool = True
    bf16: bool | None = None
    # --- fastdpo's own
    pack_length: int | None = None
    head_impl: str = "auto"
    packed_attention: str = "auto"
    lean_activations: bool = False
    max_nonfinite_steps: int = 10
    stream_bad_rows: str = "raise"

    def __post_init__(self) -> None:
        resolve_trl_defaults(self)
        self._normalize()
        super().__post_init__()  # parses the dict fields given as JSON strings
        self._check_options()
        check_liger(self)
        check_report_to(self)

    def _normalize(self) -> None:
        # the CLI passes numbers as strings; "auto" pads nowhere (TRL pads to 128 on Neuron only)
        if isinstance(self.pad_to_multiple_of, str):
            text = self.pad_to_multiple_of.lower()
            self.pad_to_multiple_of = None if text in ("auto", "none", "null") else _int(text, "pad_to_multiple_of")
        if self.loss_type == "chunked_nll":
            warnings.warn("loss_type='chunked_nll' is TRL's deprecated alias of 'nll'", FutureWarning, stacklevel=4)
            self.loss_type = "nll"
        if self.packing_strategy == "bfd-requeue":
            warnings.warn("packing_strategy 'bfd-requeue' is now 'bfd_split'", FutureWarning, stacklevel=4)
            self.packing_strategy = "bfd_split"
        if self.truncation_mode == "keep_end":
            warnings.warn("truncation_mode='keep_end' is deprecated in TRL 1.16", FutureWarning, stacklevel=4)
        if self.pad_token is not None:
            warnings.warn("pad_token is deprecated in TRL 1.16: set tokenizer.pad_token", FutureWarning, stacklevel=4)

    def _check_options(self) -> None:
        check_shared_options(self, {})
        check_label_smoothing(self.label_smoothing_factor, self.loss_type)
        if self.padding_free:
            warnings.warn("padding_free: fastdpo never pads sequences; the option changes nothing", stacklevel=4)
        warn_eval_packing(self, stacklevel=5)
        if self.loss_type not in LOSS_TYPES:
            raise unknown_choice("loss_type", self.loss_type, LOSS_TYPES)
        if self.packing_strategy not in SFT_PACKING_STRATEGIES:
            raise unknown_choice("packing_strategy", self.packing_strategy, SFT_PACKING_STRATEGIES)
        if self.packed_attention not in PACKED_ATTENTION:
            raise unknown_choice("packed_attention", self.packed_attention, PACKED_ATTENTION)
        if self.max_length is None and (self.packing or self.eval_packing):
            raise ConfigError("packing needs max_length, the length of a packed row", column="max_length",
                              fix="set max_length, or packing=False")  # fmt: skip
        for name in ("pack_length", "pad_to_multiple_of"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"must be positive or None, got {value}", column=name)
        if isinstance(self.dataset_kwargs, dict):
            unknown = sorted(set(self.dataset_kwargs) - {"skip_prepare_dataset"})
            if unknown:
                raise ConfigError(f"unknown key {unknown[0]!r}", column="dataset_kwargs",
                                  fix="the only key is 'skip_prepare_dataset'")  # fmt: skip
        path = self.chat_template_path
        if path is not None and not (os.path.isfile(path) and path.endswith((".jinja", ".j2"))):
            raise ConfigError(
                f"{path!r} is not a .jinja/.j2 file (cloning a tokenizer's template is not supported yet)",
                column="chat_template_path",
                fix="pass the path of a Jinja template file, or set processing_class.chat_template yourself",
            )


def _int(text: str, name: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"expected an integer, 'auto' or None, got {text!r}", column=name) from None


def warn_eval_packing(args, stacklevel: int) -> None:
    """A warning where ``eval_packing=True`` beside ``packing=False`` (fastdpo's config or TRL's): the eval rows are
    then scored unlike TRL's."""
    if getattr(args, "eval_packing", None) and not args.packing:
        warnings.warn("eval_packing=True with packing=False: fastdpo scores each sequence of a packed eval row on its "
                      "own; TRL 1.16 collates such rows as plain padded rows (their sequences attend to each other), "
                      "so its eval metrics differ a little", stacklevel=stacklevel)  # fmt: skip


def check_label_smoothing(factor: float, loss_type: str, softcap: float | None = None) -> None:
    """``ConfigError`` for a ``label_smoothing_factor`` the fused head cannot apply: outside [0, 1), with ``dft``
    (TRL ignores it there), or with a soft-capped head (Gemma 2's ``final_logit_softcapping``)."""
    if not 0.0 <= factor < 1.0:
        raise ConfigError(f"must be in [0, 1), got {factor}", column="label_smoothing_factor")
    if factor and loss_type != "nll":
        raise ConfigError(f"applies to loss_type='nll' only (TRL ignores it with {loss_type!r})",
                          column="label_smoothing_factor",
                          fix="set label_smoothing_factor=0 or loss_type='nll'")  # fmt: skip
    if factor and softcap is not None:
        raise ConfigError("is not supported with a soft-capped LM head (final_logit_softcapping): the mean logit "
                          "is then no longer linear in the head's weights, and fastdpo builds no logits",
                          column="label_smoothing_factor", fix="set label_smoothing_factor=0")  # fmt: skip


def as_sft_config(args, model) -> SFTConfig:
    """``args`` as an ``SFTConfig``: None → the defaults, writing where TRL's would (``<model name>-SFT``); TRL's
    ``SFTConfig`` or ``TrainingArguments`` → the same settings (TRL's SFT options at their defaults where it has
    none)."""
    from fastdpo.train.common import config_values, default_output_dir

    if args is None:
        return SFTConfig(output_dir=default_output_dir(model, "SFT"))
    if isinstance(args, SFTConfig):
        return args
    if isinstance(args, TrainingArguments):
        return SFTConfig(**config_values(args))
    raise ConfigError(f"expected an SFTConfig, got {type(args).__name__}", column="args")
