"""Pieces both trainers share: loading a model named by a path, and the numerics guard.

- ``load_causal_lm``: a model given as a path or hub name is loaded as TRL 1.16 loads it (``model_init_kwargs``
  passed to ``from_pretrained``, ``dtype`` defaulting to float32 and given as a ``torch.dtype`` or one of
  ``"bfloat16"``, ``"float16"``, ``"float32"``, ``"auto"``; ``trust_remote_code`` from the config).
- (the reference's checks, TR-DPO's ``SyncReference`` and a ZeRO-3 reference: ``fastdpo.train.model_checks``)
- ``NumericsGuard``: a Trainer mixin. An optimizer step whose loss (on any micro-batch, any process) or gradient
  norm is not finite is skipped: every gradient is dropped before ``optimizer.step()``, so no parameter and no
  optimizer state moves (the learning-rate schedule still advances, as it does when fp16's scaler skips a step).
  Skips are counted (``nonfinite_steps`` in the logs, cumulative) and warned about; a skipped step's metrics are
  left out of the logged means (its NaNs made a whole logging window's NaN), and a window of skipped steps alone
  logs its loss as NaN (transformers' filter logged 0.0); ``max_nonfinite_steps`` in a row save a checkpoint, log
  the count and stop training with ``NumericsError`` saying what was seen. The decision is the same on
  every process: the gradient norm is already global, and the loss flags are reduced across processes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
import warnings
from collections import Counter, defaultdict

import torch
from torch import nn

from fastdpo.atomic import check_output_dir
from fastdpo.data.source_rows import source_rows
from fastdpo.data.stream import BAD_ROWS, gather_worker_drops
from fastdpo.data.tokenize import TRUNCATION_MODES
from fastdpo.errors import ConfigError, DataError, unknown_choice
from fastdpo.model.adapters import refuse_frozen
from fastdpo.model.attention import attends_per_sequence, check_per_sequence
from fastdpo.model.lean import use_lean_layers
from fastdpo.model.probe import check_head
from fastdpo.ops.linear_logprobs import IMPLS
from fastdpo.train.loading import DTYPES, load_causal_lm, load_tokenizer, with_quantization  # noqa: F401

logger = logging.getLogger(__name__)


class NumericsError(RuntimeError):
    """Training stopped after too many optimizer steps in a row with a non-finite loss or gradient."""


class TokenRate:
    """``tokens_per_second`` between two logs: tokens counted since the last call over the time since then."""

    def __init__(self) -> None:
        self.restart(0)

    def restart(self, tokens: float) -> None:
        self._time, self._tokens = time.perf_counter(), tokens

    def __call__(self, tokens: float) -> float:
        now = time.perf_counter()
        rate = (tokens - self._tokens) / max(now - self._time, 1e-9)
        self._time, self._tokens = now, tokens
        return rate


class PackedTokenCount:
    """``include_num_input_tokens_seen="non_padding"`` on packed batches: the Trainer counts the tokens that are not the
    pad token (the batch has no attention mask), so every end-of-sequence token counted as padding where the pad
    token is the EOS (TRL sets it so); the batch's real tokens are counted instead, as TRL's attention mask counts
    them. ``"all"`` counts the packed rows' tokens, padding included: those computed (TRL's padded batches hold
    more, its SFT bfd row fewer)."""

    def _track_num_input_tokens(self, inputs):
        if self.args.include_num_input_tokens_seen != "non_padding" or "num_padding" not in inputs:
            return super()._track_num_input_tokens(inputs)
        real = torch.as_tensor(inputs["input_ids"].numel() - int(inputs["num_padding"]), device=self.args.device)
        self.state.num_input_tokens_seen += int(self.accelerator.gather(real.reshape(1)).sum())

    def train(self, *args, **kwargs):  # (every trainer of fastdpo's: a frozen model is refused when training starts)
        refuse_frozen(self.model)
        return super().train(*args, **kwargs)


@contextlib.contextmanager
def neftune_as_trl(model: nn.Module, batch, *, padding_free: bool, pad_to_multiple_of: int | None = None):
    """NEFTune's noise on a packed batch as on TRL 1.16's batch of the same sequences: transformers' hook draws it in
    ±α/√(L·d), L the row length, which is TRL's longest sequence (its padded batches: DPO's, SFT's unpacked) or all
    the tokens (SFT's ``padding_free`` row), padded up to ``pad_to_multiple_of``; packed rows of another length got
    √(L_TRL / L) times TRL's noise. α is scaled for the step (an adapter reference's pass included: TRL's noises it
    too)."""
    embeddings = model.get_input_embeddings()
    alpha = getattr(embeddings, "neftune_noise_alpha", None)
    if alpha is None:
        yield
        return
    lengths = (batch.cu_seqlens[1:] - batch.cu_seqlens[:-1])[batch.seq_pair >= 0]
    trl = batch.input_ids.numel() - batch.num_padding if padding_free else int(lengths.max())
    if pad_to_multiple_of:
        trl = -(-trl // pad_to_multiple_of) * pad_to_multiple_of
    embeddings.neftune_noise_alpha = alpha * math.sqrt(batch.input_ids.shape[-1] / trl)
    try:
        yield
    finally:
        embeddings.neftune_noise_alpha = alpha


class StepMetrics:
    """Metrics of the micro-batches since the last log, averaged with a weight per micro-batch (pairs or tokens),
    over every process: a micro-batch of 1 pair weighs half one of 2, however the step was split. A metric given its
    own weight (a per-token mean: its token count) is averaged with that instead."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)

    def add(self, values: dict[str, float], weight: float, weights: dict[str, float] | None = None) -> None:
        for name, value in values.items():
            own = float((weights or {}).get(name, weight))
            self.sums[name] += float(value) * own
            self.weights[name] += own

    def pop(self, accelerator, totals: dict[str, float] | None = None) -> dict[str, float]:
        """The weighted means, plus ``totals`` summed over processes; then start over."""
        names, totals = sorted(self.sums), dict(totals or {})
        values = torch.tensor([self.sums[n] for n in names] + [self.weights[n] for n in names] + list(totals.values()),
                              dtype=torch.float64, device=accelerator.device)  # fmt: skip
        if accelerator.num_processes > 1:
            values = accelerator.reduce(values, reduction="sum")
        values = values.tolist()
        sums, weights = values[: len(names)], values[len(names) : 2 * len(names)]
        means = {n: v / w for n, v, w in zip(names, sums, weights, strict=True) if w}
        means.update(zip(totals, values[2 * len(names) :], strict=True))
        self.clear()
        return means

    def clear(self) -> None:
        """Start over: nothing added."""
        self.sums.clear()
        self.weights.clear()

    def mark(self) -> tuple[dict, dict]:
        """What was added so far, for ``rollback``."""
        return dict(self.sums), dict(self.weights)

    def rollback(self, mark: tuple[dict, dict] | None) -> None:
        """Back to ``mark`` (None: nothing added)."""
        self.clear()
        if mark is not None:
            self.sums.update(mark[0])
            self.weights.update(mark[1])


class NumericsGuard:
    """Trainer mixin: skip optimizer steps with a non-finite loss or gradient; stop after too many in a row.

    Needs ``args.max_nonfinite_steps`` (0 turns the guard off).
    """

    _nonfinite_total = 0
    _nonfinite_in_row = 0
    _loss_nonfinite = False
    _guard_message: str | None = None
    _metrics_mark = None  # the train metrics as the last optimizer step left them (a skipped step's: dropped)
    _window = (0, 0)  # (steps taken, steps skipped) since the last log

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss)):
            self._loss_nonfinite = True
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if not self.args.max_nonfinite_steps:
            return grad_norm
        bad_loss = torch.tensor(float(self._loss_nonfinite), device=self.args.device)
        if self.accelerator.num_processes > 1:
            bad_loss = self.accelerator.reduce(bad_loss, reduction="sum")
        self._loss_nonfinite = False
        norm = float(grad_norm) if grad_norm is not None else 0.0
        if math.isfinite(norm) and not bool(bad_loss):
            self._nonfinite_in_row = 0
            self._window = (self._window[0] + 1, self._window[1])
            self._metrics_mark = self._step_metrics(mark=True)
            return grad_norm
        self._step_metrics(mark=False)  # (its NaNs left out of the logged means)
        self._window = (self._window[0], self._window[1] + 1)
        for parameter in model.parameters():  # a parameter with no gradient is left alone by every torch optimizer
            parameter.grad = None
        self._nonfinite_total += 1
        self._nonfinite_in_row += 1
        step = self.state.global_step + 1
        seen = f"loss {'not finite' if bool(bad_loss) else 'finite'}, gradient norm {norm}"
        logger.warning("optimizer step %d skipped: %s (%d skipped so far)", step, seen, self._nonfinite_total)
        if self._nonfinite_in_row >= self.args.max_nonfinite_steps:
            self._guard_message = (
                f"{self._nonfinite_in_row} optimizer steps in a row had a non-finite loss or gradient "
                f"(the last, step {step}: {seen}); the parameters are those before the first of them, saved as "
                f"checkpoint-{step} in {self.args.output_dir}. Lower the learning rate, check those batches' data, "
                f"or train in fp32/bf16 instead of fp16; max_nonfinite_steps sets how many skips in a row stop"
            )
            self.control.should_save = True
            self.control.should_training_stop = True
        return grad_norm

    def _step_metrics(self, *, mark: bool):
        """The train metrics' state now (``mark``), or back to the last mark (the step skipped): the native
        trainers' ``StepMetrics``, or SFT's lists of micro-batch values (``num_tokens``: a running total)."""
        metrics = getattr(self, "_metrics", {}).get("train")
        if isinstance(metrics, StepMetrics):
            return metrics.mark() if mark else metrics.rollback(self._metrics_mark)
        if isinstance(metrics, dict):
            lengths = self._metrics_mark or {}
            if mark:
                return {name: len(values) for name, values in metrics.items()}
            for name, values in metrics.items():
                if name != "num_tokens":
                    del values[lengths.get(name, 0) :]
        return None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._nonfinite_total and "loss" in logs:
            logs["nonfinite_steps"] = self._nonfinite_total
            taken, skipped = self._window
            if skipped and not taken:  # (every step since the last log skipped: transformers' filter put the running
                logs["loss"] = float("nan")  # mean of the window's losses there, 0.0 after a log)
        super().log(logs, start_time)
        if "loss" in logs:  # (a train log: its window is over, its metrics popped; the next steps' start from nothing)
            self._window, self._metrics_mark = (0, 0), None

    def train(self, *args, **kwargs):
        output = super().train(*args, **kwargs)
        if self._guard_message is not None:
            message, self._guard_message = self._guard_message, None
            if self._window[1]:  # (the stopping steps were not logged yet: their count is)
                self.log({"nonfinite_steps": self._nonfinite_total})
            raise NumericsError(message)
        return output


def lean_layers(trainer):
    """The context a training step runs in for ``lean_activations``: the lean forwards (``fastdpo.model.lean``) of
    the policy, held through the backward, and of a separate reference (no gradients there: on a GPU its norms and
    MLPs then run the same kernels); a no-op when the option is off or the config has none (TRL's own, which the
    trainers take too)."""
    if not getattr(trainer.args, "lean_activations", False):
        return use_lean_layers([])
    return use_lean_layers([trainer.model, getattr(trainer, "ref_model", None)])


def check_lean_activations(trainer) -> None:
    """Refuse ``lean_activations`` where the parameters leave between forward and backward (its backward reads them
    again): FSDP, DeepSpeed ZeRO-3."""
    if not getattr(trainer.args, "lean_activations", False):  # TRL's own configs (the drop-in) have no such field
        return
    zero3 = trainer.is_deepspeed_enabled and trainer.accelerator.state.deepspeed_plugin.zero_stage == 3
    if trainer.is_fsdp_enabled or zero3:
        raise ConfigError(
            f"runs the norms and MLPs again in the backward with their parameters, which "
            f"{'DeepSpeed ZeRO-3' if zero3 else 'FSDP'} has resharded by then",
            column="lean_activations",
            fix="use lean_activations=False with FSDP or DeepSpeed ZeRO-3",
        )


def refuse_context_parallel(parallelism) -> None:
    """A ConfigError for context or sequence parallelism (``parallelism_config``'s, TrainingArguments' or
    accelerate's): it splits each row over processes, and the packed steps' targets and sequence bounds would not
    follow (TRL refuses it with packing too)."""
    if getattr(parallelism, "cp_enabled", False) or getattr(parallelism, "sp_enabled", False):
        raise ConfigError("context and sequence parallelism split each row over processes, and the packed steps' "
                          "targets and sequence bounds would not follow", column="parallelism_config",
                          fix="use cp_size=1 and sp_size=1 (accelerate's too)")  # fmt: skip


def check_attention_device(trainer) -> None:
    """Refuse to train with flex attention on a CPU, where torch has no backward for it (a ``NotImplementedError``
    from inside the first step, after its compile); evaluation alone would run. ``check_per_sequence`` too; and
    ``head_impl="triton"`` off CUDA (refused at the first step before), but under the Triton interpreter. Context
    parallelism, as the accelerator has it (``accelerate launch --parallelism_config_cp_size``): refused."""
    refuse_context_parallel(getattr(trainer.accelerator, "parallelism_config", None))
    head = getattr(trainer.args, "head_impl", "auto")
    if head == "triton" and trainer.args.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"'triton' runs on CUDA tensors; the trainer's device is {trainer.args.device.type}",
                          column="head_impl", fix="use head_impl='auto' (or 'torch') here")  # fmt: skip
    for model in (trainer.model, getattr(trainer, "ref_model", None)):  # (once per model; not in the steps' counts)
        weight = None if model is None else next(model.parameters(), None)
        if weight is not None and weight.device == trainer.args.device:  # (else at its first pass, on the device)
            check_head(trainer.accelerator.unwrap_model(model))
    impl = trainer.packed_attention_impl or getattr(trainer.model.config, "_attn_implementation", None)
    if impl and attends_per_sequence(impl):
        model = trainer.accelerator.unwrap_model(trainer.model)
        check_per_sequence(model.get_base_model() if hasattr(model, "get_base_model") else model, impl)
    if impl == "flex_attention" and trainer.args.device.type == "cpu":
        raise ConfigError("the model attends with flex_attention, which torch cannot differentiate on a CPU",
                          column="model_init_kwargs", fix="load it with attn_implementation='sdpa' or 'eager', or "
                          "train on a GPU")  # fmt: skip


def check_shared_options(config, not_yet: dict) -> None:
    """The checks ``DPOConfig`` and ``SFTConfig`` share: TRL options not implemented yet (``not_yet``: name → the
    value that means off), ``max_nonfinite_steps``, ``truncation_mode``, ``head_impl``, ``stream_bad_rows`` and
    ``max_length``."""
    for name, off in not_yet.items():
        if getattr(config, name) != off:
            raise ConfigError(
                f"is not supported by this version of fastdpo (got {getattr(config, name)!r})",
                column=name,
                fix=f"leave it at {off!r}",
            )
    if config.max_nonfinite_steps < 0:
        raise ConfigError(
            f"must be 0 (off) or positive, got {config.max_nonfinite_steps}", column="max_nonfinite_steps"
        )
    if config.truncation_mode not in TRUNCATION_MODES:
        raise unknown_choice("truncation_mode", config.truncation_mode, TRUNCATION_MODES)
    if config.head_impl not in IMPLS:
        raise unknown_choice("head_impl", config.head_impl, IMPLS)
    if config.stream_bad_rows not in BAD_ROWS:
        raise unknown_choice("stream_bad_rows", config.stream_bad_rows, BAD_ROWS)
    if config.max_length is not None and config.max_length < 1:
        raise ConfigError(f"must be positive or None, got {config.max_length}", column="max_length")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        value = getattr(config, name)  # (torch's and transformers' own errors come later, from deep inside)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"must be a whole number ≥ 1, got {value!r}", column=name)
    if not config.learning_rate >= 0:
        raise ConfigError(f"must be ≥ 0, got {config.learning_rate}", column="learning_rate")


def config_values(args) -> dict:
    """``args.to_dict()`` (enums as their values) with the settings it hides because their names end in ``_token``
    given back (SFT's ``eos_token``, ``pad_token``, and ``hub_token``: a secret, kept out of files by their
    writers)."""
    values = args.to_dict()
    for name in values:
        if name.endswith("_token"):
            values[name] = getattr(args, name)
    return values


def check_collator(collator, packer_cls: type) -> None:
    """A ``ConfigError`` for a ``data_collator`` that is not fastdpo's packer (TRL's or transformers' make padded
    batches, which the packed step cannot read: a ``KeyError`` at the first step)."""
    if collator is not None and not isinstance(collator, packer_cls):
        raise ConfigError(f"a {type(collator).__name__} makes padded batches; fastdpo's steps read packed ones",
                          column="data_collator", fix=f"leave it unset (fastdpo packs each batch), or pass a "
                          f"{packer_cls.__module__}.{packer_cls.__name__}")  # fmt: skip


def warn_no_logits(prediction_loss_only: bool) -> None:
    """``predict()`` (and any evaluation loop asked for predictions) gets the loss and metrics only: the fused head
    never builds the logits that TRL's prediction step returns."""
    if not prediction_loss_only:
        warnings.warn("predictions are None: fastdpo's fused head builds no logits (the loss and metrics are "
                      "computed as usual; prediction_loss_only=True asks for just those)", stacklevel=3)  # fmt: skip


def refuse_outputs(return_outputs: bool) -> None:
    """A ``ConfigError`` for ``compute_loss(return_outputs=True)`` (a subclass's call): TRL returns the model's
    outputs there, whose full logits the fused head never builds (an empty dict came back, a ``KeyError`` later)."""
    if return_outputs:
        raise ConfigError("compute_loss(return_outputs=True) would return the model's outputs, whose full logits the "
                          "fused head never builds", column="return_outputs",
                          fix="call it with return_outputs=False (the metrics are in self._metrics)")  # fmt: skip


def resolve_trl_defaults(config) -> None:
    """Two TrainingArguments defaults TRL changes, resolved before transformers' ``__post_init__``: ``bf16`` left
    unset is True only on a GPU that supports it (and without ``fp16``; fp32 on a CPU, where TRL's would autocast);
    ``activation_checkpointing`` left unset takes TRL's ``gradient_checkpointing`` (on by default), the name
    transformers 5 reads (under the old one it warned "`gradient_checkpointing` is deprecated" at every config, the
    user having written neither)."""
    if config.bf16 is None:
        config.bf16 = bool(not config.fp16 and torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if config.activation_checkpointing is None:
        config.activation_checkpointing = config.gradient_checkpointing


def check_report_to(config) -> None:
    """A ``ConfigError`` naming ``report_to`` for an integration transformers does not know (its own ``ValueError``
    comes from inside the Trainer's constructor); call after ``TrainingArguments.__post_init__`` made it a list.
    None (YAML's null), which transformers turns into ``[None]`` and then refuses, means no integration."""
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    if config.report_to == [None]:
        config.report_to = []
    for name in config.report_to or []:
        if name not in INTEGRATION_TO_CALLBACK:
            raise unknown_choice("report_to", name, [*INTEGRATION_TO_CALLBACK, "all", "none"])


def set_pad_token(model: nn.Module, tokenizer, pad_token: str | None, *, mirror: bool) -> None:
    """TRL's pad token: ``pad_token`` (the config's, deprecated), else the tokenizer's, else its EOS (never attended
    to, never a target); with fastdpo's collator (``mirror``) the model's configs get its id too, as TRL sets them."""
    pad_token = pad_token or tokenizer.pad_token or tokenizer.eos_token
    if pad_token is None:
        raise ConfigError("the tokenizer has neither a pad token nor an EOS token", column="processing_class",
                          fix="set tokenizer.pad_token")  # fmt: skip
    if pad_token not in tokenizer.get_vocab():
        raise ConfigError(f"{pad_token!r} is not in the tokenizer's vocabulary", column="pad_token",
                          fix="set tokenizer.pad_token (or the config's pad_token or eos_token) to a token it "
                              "has")  # fmt: skip
    tokenizer.pad_token = pad_token
    if mirror:
        model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id


def report_dropped(dropped: dict[str, list[int]], before: int, after: int, split: str, max_length: int | None) -> None:
    """One warning counting the rows tokenization dropped from ``split``; a DataError when none is left."""
    if not dropped:
        return
    reasons = ", ".join(f"{len(rows)} {reason} (rows {_first(source_rows(split, rows))})"
                        for reason, rows in dropped.items())  # fmt: skip
    if after == 0:
        raise DataError(
            f"no row of the {split} data is left to {'train' if split == 'train' else 'evaluate'} on: all {before} "
            f"were dropped, {reasons}",
            option=f"{split}_dataset",
            fix=f"raise max_length (now {max_length}), set truncation_mode='keep_end', or shorten the prompts",
        )
    if _first_process():  # (every process prepares the data: said once)
        logger.warning("%s data: %d of %d rows dropped: %s", split, before - after, before, reasons)


def _first_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _first(rows: list[int], limit: int = 5) -> str:
    return ", ".join(map(str, rows[:limit])) + (", ..." if len(rows) > limit else "")


def check_run_dir(args, model: nn.Module) -> None:
    """``fastdpo.atomic.check_output_dir`` for ``args.output_dir`` with room for one checkpoint when training saves
    them: the weights, plus AdamW's two fp32 moments of the trainable ones unless ``save_only_model``."""
    needed = 0
    if str(getattr(args.save_strategy, "value", args.save_strategy)) != "no":
        needed = sum(p.numel() * p.element_size() for p in model.parameters())
        if not args.save_only_model:
            needed += 8 * sum(p.numel() for p in model.parameters() if p.requires_grad)
    check_output_dir(args.output_dir, needed_bytes=needed)


def check_stream_args(args, name: str, *, cached_reference: bool = False) -> None:
    """ConfigError for what an iterable (streaming) ``name`` dataset cannot do with ``args`` (the trainers have set
    accelerate to give each process its own batches before: ``undispatched``)."""
    fix_map_style = "load the data without streaming=True (a map-style Dataset)"
    if name == "train" and args.max_steps <= 0:
        raise ConfigError("an iterable train dataset has no length, so num_train_epochs cannot be turned into steps",
                          column="max_steps", fix="set max_steps (the optimizer steps to train for)")  # fmt: skip
    if cached_reference:
        raise ConfigError("the cached reference is computed over the whole dataset before training, and a stream is "
                          "only read as training goes", column="precompute_ref_log_probs",
                          fix=f"{fix_map_style}, or use reference='separate' (or 'adapter' with PEFT)")  # fmt: skip
    if name == "train" and getattr(args, "max_tokens_per_batch", None) is not None:
        raise ConfigError("token-budget batches are drawn from the lengths of every row, which a stream does not "
                          "know before it is read", column="max_tokens_per_batch",
                          fix=f"use per_device_train_batch_size, or {fix_map_style}")  # fmt: skip
    if name == "train" and getattr(args, "balance_ranks", False) and args.world_size > 1:
        logger.info("balance_ranks does not apply to an iterable dataset: its lengths are not known ahead")


def undispatched(args) -> None:
    """accelerate set to give each process its own batches (``dispatch_batches=False``, as TRL sets it for a train
    stream): dispatching concatenates the processes' batches, which packed batches (a 0-dim ``max_seqlen``) cannot
    be. accelerate dispatches streams by default, so an eval stream (given to the trainer or to ``evaluate``) failed
    at its first batch where only a train stream was undispatched; map-style data is not dispatched by default."""
    config = getattr(args, "accelerator_config", None)
    if config is None or config.dispatch_batches is False:
        return
    if config.dispatch_batches:
        logger.warning("dispatch_batches=True is set to False: packed batches cannot be concatenated across processes; "
                       "each process reads its own")  # fmt: skip
    config.dispatch_batches = False


def check_liger(args) -> None:
    """``use_liger_kernel``: refused on a CPU, where Liger's Triton kernels cannot run (Triton's "0 active drivers"
    RuntimeError came at the first step, TRL's too); a warning elsewhere, as fastdpo's head replaces Liger's loss.
    Called once TrainingArguments' own ``__post_init__`` has run: ``args.device`` sets up accelerate's state by its
    ``accelerator_config``."""
    if not getattr(args, "use_liger_kernel", False):  # (None: the drop-in's TRL default config)
        return
    if args.device.type == "cpu":
        raise ConfigError("patches the model with Liger's Triton kernels, which run on a GPU only; this run is on the "
                          "CPU", column="use_liger_kernel", fix="remove use_liger_kernel: fastdpo's fused head needs "
                          "no Liger to compute the loss without logits")  # fmt: skip
    warnings.warn("use_liger_kernel: fastdpo's fused head already computes the loss without logits; transformers "
                  "will still patch the model body with Liger's kernels", stacklevel=3)  # fmt: skip


def uncompiled(args) -> None:
    """``torch_compile`` off, with a warning: the trainers run the model's layers in their own packed step and never
    call the compiled module's forward, so it compiled nothing (TRL's compiled step does not apply)."""
    if not getattr(args, "torch_compile", False):
        return
    warnings.warn("torch_compile=True is not applied and is set to False: fastdpo's packed step runs the model's "
                  "layers itself, never the compiled module's forward (its GPU head and lean_activations run fused "
                  "Triton kernels instead)", stacklevel=3)  # fmt: skip
    args.torch_compile, args.torch_compile_backend, args.torch_compile_mode = False, None, None


def train_reporting_streams(trainer, train, *args, **kwargs):
    """``train(*args, **kwargs)``, then the streams' summaries (``report_streams``; when it fails too), the rows
    dataloader workers dropped in ``dropped_rows`` as splits of their own (``train (dataloader worker 0)``: their rows
    are of the shards each reads); a DataError where a train stream gave no batch (every row read was dropped): the
    run ended at step 0 and saved the untrained model as its result, where a map-style dataset with no row left is
    refused."""
    import datasets

    try:
        output = train(*args, **kwargs)
    finally:
        gather_worker_drops(trainer._streams, trainer.dropped_rows)
        report_streams(trainer._streams)
    if trainer.state.global_step == 0 and isinstance(trainer.train_dataset, datasets.IterableDataset):
        counts = Counter()
        for split, reasons in getattr(trainer, "dropped_rows", {}).items():
            if split == "train" or split.startswith("train (dataloader worker"):
                counts.update({reason: len(rows) for reason, rows in reasons.items()})
        why = f": {dict(counts)}" if counts else " (dropped_rows says why)"
        raise DataError(
            f"the train stream gave no batch: every row read was dropped{why}",
            option="train_dataset",
            fix="check the data (fastdpo data check FILE), or raise max_length"
            + (" for rows whose prompt fills it" if set(counts) == {"prompt_fills_max_length"} else ""),
        )
    return output


def report_streams(streams) -> None:
    """One warning per prepared stream that dropped or flagged rows (``PreparedStream.summary``, with what its
    dataloader workers wrote back, as last collected: ``gather_worker_drops``)."""
    for stream in streams:
        summary = stream.summary()
        if summary:
            logger.warning("%s", summary)


def default_output_dir(model, suffix: str) -> str:
    """TRL's output folder where no config is given: the model's name, its last part, then ``-DPO``/``-SFT``
    (``Qwen2-0.5B-DPO``), in the current folder."""
    name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
    return f"{str(name).split('/')[-1]}-{suffix}"


def checked_rows(dataset, name: str, *, as_given: bool = False) -> tuple[object, list[str]]:
    """(``dataset`` read as Python values, its columns) after ``check_dataset``: a format set on it
    (``set_format("torch")``, numpy's) dropped, as the preparation's maps read lists and strings (a tensor's truth
    value failed inside them; TRL's maps take it); a transform (``with_transform``) refused, as TRL refuses it: the
    preparation would write what it gives into the tokenized columns. ``as_given``: rows the trainer does not
    prepare (``skip_prepare_dataset``), kept as they are."""
    import datasets

    names = check_dataset(dataset, name)
    formatting = getattr(dataset, "_formatting", None)  # (a stream's)
    kind = dataset.format["type"] if isinstance(dataset, datasets.Dataset) else getattr(formatting, "format_type", None)
    if kind is None or as_given:
        return dataset, names
    if kind == "custom":
        raise ConfigError(f"the {name} dataset has a transform (with_transform / set_transform), whose output "
                          "preparation would write into its tokenized columns", column=f"{name}_dataset",
                          fix="apply it with dataset.map(...) first, or drop it (with_format(None))")  # fmt: skip
    return dataset.with_format(None), names


def check_dataset(dataset, name: str) -> list[str]:
    """The dataset's columns (a stream's from its first row when it does not know them), after checking it is one
    the trainers take: a ``datasets.Dataset`` or ``IterableDataset``, of text (images would go unread)."""
    import datasets

    from fastdpo.data.stream import first_row

    if isinstance(dataset, datasets.IterableDataset):
        names = list(dataset.column_names or first_row(dataset, name))
    elif isinstance(dataset, datasets.Dataset):
        names = dataset.column_names
    else:
        splits = f": one of its splits, such as {name}_dataset[{next(iter(dataset))!r}]" if isinstance(
            dataset, dict) and dataset else ""  # fmt: skip
        raise ConfigError(f"the {name} dataset is a {type(dataset).__name__}", column=f"{name}_dataset",
                          fix=f"pass a datasets.Dataset or a datasets.IterableDataset{splits}")  # fmt: skip
    if {"image", "images"} & set(names):
        raise ConfigError("vision datasets are not supported yet", column=f"{name}_dataset",
                          fix="use TRL's trainers for vision-language models")  # fmt: skip
    return names
