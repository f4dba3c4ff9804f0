"""``SFTTrainer``: transformers' Trainer running the SFT loss on packed batches through the fused head.

    trainer = SFTTrainer(model, args=SFTConfig(...), train_dataset=ds, processing_class=tokenizer)
    trainer.train()

The same tokens land in the same optimizer step as with TRL 1.16's ``SFTTrainer`` (see ``SFTConfig`` for what
``packing`` means), and the loss is TRL's: the negative log-likelihood of every label that is not -100 (the
completion of prompt/completion rows by default), summed over a micro-batch and divided by the number of such
labels in the whole optimizer step (all gradient-accumulation micro-batches; all processes when
``average_tokens_across_devices``, with the ×processes factor that DDP's gradient averaging undoes). Only row ends
are padded and no ``[tokens, vocab]`` logits exist: ``linear_logprobs`` scores the targets from the hidden states.
Mixture-of-experts models add ``router_aux_loss_coef`` times the load-balancing loss, averaged over the
accumulation steps, as TRL does (``aux_loss`` in the logs).

Datasets go through ``prepare_sft`` and ``tokenize_sft`` (TRL-identical ``input_ids``/``labels``; rows TRL drops
are dropped and counted in ``self.dropped_rows``), then ``pack_sft_dataset`` when packing. Metrics carry TRL's
names (``loss``, ``entropy``, ``mean_token_accuracy``, ``num_tokens``, and ``eval_*``) plus ``padding_fraction``.

A model may be given as a path (loaded with ``model_init_kwargs`` as TRL loads it, fp32 unless ``dtype`` says
otherwise; quantized with ``quantization_config``), and trained whole or through a PEFT adapter (``peft_config``, or a
``PeftModel``; on a quantized base its adapters train in bf16, as TRL sets QLoRA up). Non-finite steps are skipped by
``NumericsGuard`` (``max_nonfinite_steps``). Options it does not implement raise ``ConfigError``:
``compute_loss_func``, ``compute_metrics`` and ``preprocess_logits_for_metrics`` (they need the logits), vision
datasets. Streams (``datasets.IterableDataset``, with ``max_steps``) are prepared as they are read
(``prepare_sft_stream``), packed block by block as TRL packs them. ``assistant_only_loss`` needs a chat template with
``{% generation %}`` markers (TRL swaps one in for some families; ``tokenize_sft`` names the row). ``num_tokens``
counts real tokens; TRL's packed runs with ``pad_to_multiple_of`` also count their padding.
"""

from __future__ import annotations

import warnings
from collections import defaultdict

import datasets
import torch
from torch import Tensor, nn
from transformers import Trainer, TrainingArguments, set_seed

from fastdpo.data.packing import (
    IGNORE_INDEX,
    PackedBatch,
    check_packed_labels,
    pack_sft,
    pack_sft_dataset,
)
from fastdpo.data.sft import (
    as_trl_reads,
    cut_to_window,
    prepare_sft,
    tokenize_sft,
    truncation_window,
)
from fastdpo.data.source_rows import rows_of
from fastdpo.data.stream import prepare_sft_stream
from fastdpo.data.vocabulary import check_positions_as_cut, check_token_ids, kept_as_given
from fastdpo.errors import ConfigError
from fastdpo.model.adapters import (
    is_peft_model,
    prepare_adapter_model,
    prepare_quantized_training,
    refuse_unsupported_adapter,
    wrap_with_adapter,
)
from fastdpo.model.attention import packed_attention, use_attention
from fastdpo.model.hooks import forward_as
from fastdpo.train.common import (
    NumericsGuard,
    PackedTokenCount,
    TokenRate,
    check_attention_device,
    check_collator,
    check_dataset,
    check_lean_activations,
    check_run_dir,
    check_stream_args,
    checked_rows,
    lean_layers,
    load_causal_lm,
    load_tokenizer,
    neftune_as_trl,
    refuse_outputs,
    report_dropped,
    train_reporting_streams,
    uncompiled,
    undispatched,
    warn_no_logits,
    with_quantization,
)
from fastdpo.train.evaluation import ScoresGivenSets, eval_prefix
from fastdpo.train.interrupt import InterruptibleTrainer
from fastdpo.train.model_card import WritesModelCard
from fastdpo.train.model_checks import check_best_metric, check_checkpointing, warn_batch_dependent_rope
from fastdpo.train.resume import ResumableTrainer
from fastdpo.train.sft_config import SFTConfig, as_sft_config
from fastdpo.train.sft_setup import (
    _check_packed_rows,
    _check_prepared,
    _enable_router_aux_loss,
    _label_tokenized,
    _pack_length,
    _packed_row_fits,
    _refuse_unsupported,
    _set_special_tokens,
    training_template,
    warn_untrained_stop,
)
from fastdpo.train.step import SFTStepOutput, sft_step

TOKEN_COLUMNS = ("input_ids", "labels", "seq_lengths")


# ---------------------------------------------------------------------------------------------------------------------
# Collator
# ---------------------------------------------------------------------------------------------------------------------


class SequencePacker:
    """Collator: tokenized examples (or packed rows with ``seq_lengths``) → the fields of one ``PackedBatch``."""

    def __init__(self, *, pack_length: int | None, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pack_length, self.pad_token_id, self.pad_to_multiple_of = pack_length, pad_token_id, pad_to_multiple_of

    def __call__(self, examples: list[dict]) -> dict:
        batch = pack_sft(examples, pack_length=self.pack_length, pad_token_id=self.pad_token_id,
                         pad_to_multiple_of=self.pad_to_multiple_of)  # fmt: skip
        fields = {name: getattr(batch, name) for name in batch.__dataclass_fields__}
        for name in ("pair_ids", "max_seqlen", "num_padding"):  # tensors, so the Trainer can move the dict
            fields[name] = torch.tensor(fields[name], dtype=torch.long)
        return fields


def batch_from_fields(fields: dict) -> PackedBatch:
    """The ``PackedBatch`` a ``SequencePacker`` dict describes (after the Trainer moved it to the device)."""
    plain = {"pair_ids": fields["pair_ids"].tolist(), "max_seqlen": int(fields["max_seqlen"]),
             "num_padding": int(fields["num_padding"])}  # fmt: skip
    return PackedBatch(**{**{k: v for k, v in fields.items() if k in PackedBatch.__dataclass_fields__}, **plain})


# ---------------------------------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------------------------------


class PackedSFTLoss:
    """Trainer mixin: the SFT loss and TRL's SFT metrics on ``SequencePacker`` batches (fastdpo's ``SFTTrainer`` and
    the TRL drop-in, ``fastdpo.trl.SFTTrainer``). Needs ``self.aux_loss_coef`` (0.0: no router loss) and
    ``self._metrics`` / ``self._total_train_tokens`` as TRL keeps them. Its steps run on
    ``self.packed_attention_impl`` (None: the model's own; ``use_attention``, held through the backward)."""

    packed_attention_impl: str | None = None
    logs_padding_fraction = True  # fastdpo's own metric (the TRL drop-in logs TRL's alone)

    def training_step(self, *args, **kwargs):
        # held across the backward: gradient checkpointing recomputes the layers there (use_attention)
        with use_attention([self.model], self.packed_attention_impl), lean_layers(self):
            return super().training_step(*args, **kwargs)

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Tensor | None:
        """Targets (not -100, after the causal shift) over the step's micro-batches and processes; None where
        transformers counts none (a model without loss kwargs: each micro-batch's mean, divided by GA)."""
        if not (self.model_accepts_loss_kwargs or self.compute_loss_func is not None):
            return None
        if not batch_samples or "targets" not in batch_samples[0]:
            return None
        # (+ the drop-in's count of rows' first labels on models TRL counts them for: fastdpo.trl._FirstLabels)
        count = sum(int((b["targets"] != IGNORE_INDEX).sum()) + int(b.get("first_labels", 0)) for b in batch_samples)
        count = torch.tensor(count, device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            count = self.accelerator.gather(count).sum()
        return count

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        refuse_outputs(return_outputs)
        batch = batch_from_fields(inputs)
        inner = self.accelerator.unwrap_model(model)

        def packed_forward(*args, **kwargs) -> SFTStepOutput:
            return sft_step(inner, batch, loss_type=self.args.loss_type, num_items=num_items_in_batch,
                            head_impl=getattr(self.args, "head_impl", "auto"), aux_loss=bool(self.aux_loss_coef),
                            offload_activations=self.args.activation_offloading and model.training,
                            label_smoothing=self.args.label_smoothing_factor)  # fmt: skip

        # mixed precision as accelerate's forward wrapper would apply it; through the DDP/FSDP wrapper (forward_as)
        bfd = self.args.packing and self.args.packing_strategy in ("bfd", "bfd_split")  # (TRL's padding-free row)
        with (
            self.accelerator.autocast(),
            forward_as(inner, packed_forward),
            neftune_as_trl(
                inner,
                batch,
                padding_free=self.args.padding_free or bfd,
                pad_to_multiple_of=self.args.pad_to_multiple_of,
            ),
        ):
            out = model()
        loss = out.loss
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every process's targets and DDP averages the gradients over processes
            loss = loss * self.accelerator.num_processes
        if out.aux_loss is not None and self._aux_loss_trained():
            # a per-micro-batch mean (DDP averages it over processes): averaged over the accumulation steps, as TRL
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.aux_loss_coef * out.aux_loss / steps
        self._record_metrics(out, batch, "train" if model.training else "eval")
        return loss

    def _aux_loss_trained(self) -> bool:
        """Whether the MoE aux loss joins the loss (it is logged either way): always here."""
        return True

    def _metric_gather(self):
        """How the metrics' sums are gathered over processes: ``gather`` (not ``gather_for_metrics``, whose
        end-of-data trimming counts samples, not processes: the rows accelerate repeats to even out the last batch
        are trained on, and counted)."""
        return self.accelerator.gather

    def _counted_tokens(self, batch: PackedBatch) -> int:
        """This process's share of ``num_tokens`` for ``batch``: every real token (padding excluded)."""
        return batch.input_ids.numel() - batch.num_padding

    def _record_metrics(self, out: SFTStepOutput, batch: PackedBatch, mode: str) -> None:
        gather = self._metric_gather()
        sums = gather(torch.stack([out.num_targets.float(), out.entropy_sum.float(), out.top1_sum.float()])[None])
        num_valid, entropy, top1 = sums.reshape(-1, 3).sum(0).tolist()
        self._metrics[mode]["entropy"].append(entropy / num_valid if num_valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append(top1 / num_valid if num_valid > 0 else 0.0)
        if self.logs_padding_fraction:
            self._metrics[mode]["padding_fraction"].append(batch.padding_fraction)
        if out.aux_loss is not None:
            self._metrics[mode]["aux_loss"].append(float(gather(out.aux_loss.detach()[None]).mean()))
        if mode == "train":
            counted = torch.tensor(self._counted_tokens(batch), device=out.num_targets.device)
            self._total_train_tokens += int(gather(counted[None]).sum())
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        warn_no_logits(prediction_loss_only)
        inputs = self._prepare_inputs(inputs)
        attention = use_attention([self.model], self.packed_attention_impl)
        with torch.no_grad(), self.compute_loss_context_manager(), attention:
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


class SFTTrainer(
    ScoresGivenSets,
    PackedSFTLoss,
    PackedTokenCount,
    InterruptibleTrainer,
    ResumableTrainer,
    NumericsGuard,
    WritesModelCard,
    Trainer,
):
    """Supervised fine-tuning on packed batches; TRL 1.16's constructor arguments."""

    # compute_loss divides by the targets of the whole optimizer step (num_items_in_batch): no further 1/GA
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module,
        args: SFTConfig | TrainingArguments | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_loss_func=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        optimizer_cls_and_kwargs=None,
        preprocess_logits_for_metrics=None,
        quantization_config=None,
        peft_config=None,
        formatting_func=None,
        tokenizer=None,
    ) -> None:
        args = as_sft_config(args, model)
        if tokenizer is not None:  # the old name, as the seed's example uses it
            warnings.warn("SFTTrainer(tokenizer=...) is deprecated: use processing_class", FutureWarning, stacklevel=2)
            processing_class = processing_class if processing_class is not None else tokenizer
        check_collator(data_collator, SequencePacker)
        init_kwargs = with_quantization(model, args.model_init_kwargs, quantization_config)
        revision = (init_kwargs or {}).get("revision") if isinstance(model, str) else None  # (the tokenizer's too)
        if isinstance(model, str):  # the model first: a wrong path is then said as a model's, not a tokenizer's
            model = load_causal_lm(model, init_kwargs, trust_remote_code=args.trust_remote_code, column="model")
        elif args.model_init_kwargs is not None:
            warnings.warn("model_init_kwargs: the model is already built, they are not used", stacklevel=2)
        if processing_class is None:
            processing_class = load_tokenizer(model, revision=revision, trust_remote_code=args.trust_remote_code)
        _refuse_unsupported(model, args, train_dataset, processing_class, compute_loss_func, compute_metrics,
                            preprocess_logits_for_metrics)  # fmt: skip
        check_checkpointing(model, args)
        if peft_config is not None:
            set_seed(args.seed)  # the adapter's random init, reproducible (and TRL's)
            model = wrap_with_adapter(model, peft_config, gradient_checkpointing=args.gradient_checkpointing)
        elif is_peft_model(model):  # train the adapter it has
            model = prepare_adapter_model(model, gradient_checkpointing=args.gradient_checkpointing, new_adapter=True)
        if is_peft_model(model):
            refuse_unsupported_adapter(model)
            prepare_quantized_training(model)
        check_run_dir(args, model)
        check_best_metric(args, eval_dataset)
        warn_batch_dependent_rope(model, args.max_length)
        _set_special_tokens(model, processing_class, args, set_pad=data_collator is None)
        if args.assistant_only_loss:
            warn_untrained_stop(processing_class, training_template(processing_class, True))
        self.aux_loss_coef = _enable_router_aux_loss(model, args)
        self.dropped_rows: dict[str, dict[str, list[int]]] = {}
        self._streams: list = []
        self._formatting_func = formatting_func
        # TRL decides once, from the training data's columns, and applies the decision to every dataset
        self.completion_only_loss = args.completion_only_loss
        if self.completion_only_loss is None:
            self.completion_only_loss = {"prompt", "completion"} <= set(check_dataset(train_dataset, "train"))
        if formatting_func is not None and self.completion_only_loss:
            raise ConfigError(
                "a formatted text has no completion to learn alone (completion_only_loss is on)",
                column="formatting_func",
                fix="format the data first, or set completion_only_loss=False",
            )
        undispatched(args)  # (every stream, an eval set given to evaluate() later too)
        uncompiled(args)
        with args.main_process_first(desc="preparing the datasets"):  # (the others then read its cache, as in TRL)
            train_dataset = self._prepare(train_dataset, processing_class, args, args.packing, "train")
            if eval_dataset is not None:
                eval_dataset = self._prepare_eval(eval_dataset, processing_class, args)
        for split, data in (("train", train_dataset), ("eval", eval_dataset)):
            self._check_ids(data, model, split, args)
        self.packed_attention_impl = packed_attention(args.packed_attention)
        collator = data_collator or SequencePacker(pack_length=_pack_length(model, args, self.packed_attention_impl),
                                                   pad_token_id=processing_class.pad_token_id or 0,
                                                   pad_to_multiple_of=args.pad_to_multiple_of)  # fmt: skip
        super().__init__(model=model, args=args, data_collator=collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs)  # fmt: skip
        check_lean_activations(self)
        check_attention_device(self)
        if self.args.n_gpu > 1:
            raise ConfigError(f"{self.args.n_gpu} GPUs in one process would run nn.DataParallel", column="n_gpu",
                              fix="launch with accelerate launch or torchrun, or make one GPU visible")  # fmt: skip
        self.model_accepts_loss_kwargs = True  # transformers < 5.19 reads this instead of loss_is_scaled_for_ga
        self._metrics: dict[str, dict[str, list[float]]] = {"train": defaultdict(list), "eval": defaultdict(list)}
        self._total_train_tokens = 0
        self._token_rate = TokenRate()

    # --- data

    def _set_signature_columns_if_needed(self) -> None:
        # the columns the collator reads (the Trainer drops the others when remove_unused_columns is on)
        if self._signature_columns is None:
            self._signature_columns = list(TOKEN_COLUMNS)

    def _check_ids(self, dataset, model, split: str, args: SFTConfig) -> None:
        """Token ids the model embeds, sequences its position table holds (as they are cut: ``cut_length``)."""
        check_token_ids(dataset, model, split, self.dropped_rows)
        check_positions_as_cut(dataset, model, split, args, self.dropped_rows)

    def _prepare_eval(self, eval_dataset, tokenizer, args: SFTConfig, name: str = "eval"):
        packing = args.packing if args.eval_packing is None else args.eval_packing
        if isinstance(eval_dataset, dict):
            # named eval_<key> (as DPOTrainer names them): a key "train" is not the train set's checks and counts
            return {key: self._prepare(d, tokenizer, args, packing, f"{name}_{key}") for key, d in eval_dataset.items()}
        return self._prepare(eval_dataset, tokenizer, args, packing, name)

    def _prepare(self, dataset, tokenizer, args: SFTConfig, packing: bool, name: str) -> datasets.Dataset:
        """TRL's ``_prepare_dataset``: tokenize (unless already), label, truncate or pack, shuffle."""
        dataset, names = checked_rows(dataset, name, as_given=kept_as_given(args))
        if isinstance(dataset, datasets.IterableDataset):
            check_stream_args(args, name)
        if (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
            return _check_prepared(dataset, name, names)
        if isinstance(dataset, datasets.IterableDataset):
            return self._prepare_stream(dataset, tokenizer, args, packing, name, names)
        if "seq_lengths" in dataset.column_names:  # already packed (e.g. self.eval_dataset given to evaluate again)
            return _check_packed_rows(dataset, name, args.max_length)
        if "input_ids" in dataset.column_names:
            dataset = _label_tokenized(dataset, self.completion_only_loss, args.dataset_num_proc)
            if args.max_length is not None and not packing:
                dataset = self._truncate(dataset, args, name)
        else:
            if self._formatting_func is not None:
                fn = self._formatting_func
                dataset = dataset.map(lambda example: {"text": fn(example)}, num_proc=args.dataset_num_proc)
            dataset, text_field = as_trl_reads(dataset, args.dataset_text_field, self._formatting_func is not None)
            with rows_of(name):  # (a row named as the data file numbers it, in a run of the fastdpo command)
                prepared = prepare_sft(dataset, text_field=text_field, num_proc=args.dataset_num_proc)
                completion_only_loss = args.completion_only_loss  # an explicit True on other data is an error
                if completion_only_loss is None:
                    is_prompt_completion = {"prompt", "completion"} <= set(prepared.column_names)
                    completion_only_loss = self.completion_only_loss and is_prompt_completion
                tokenized = tokenize_sft(
                    prepared, tokenizer, max_length=None if packing else args.max_length,
                    truncation_mode=args.truncation_mode, completion_only_loss=completion_only_loss,
                    assistant_only_loss=args.assistant_only_loss, num_proc=args.dataset_num_proc,
                    chat_template=training_template(tokenizer, args.assistant_only_loss),
                )  # fmt: skip
            dataset = tokenized.dataset
            if tokenized.dropped_rows:
                self.dropped_rows[name] = tokenized.dropped_rows
                report_dropped(tokenized.dropped_rows, len(prepared), len(dataset), name, args.max_length)
        if packing:
            if args.shuffle_dataset:  # TRL shuffles before packing too
                dataset = dataset.shuffle(seed=args.seed)
            dataset = pack_sft_dataset(dataset, args.max_length, strategy=args.packing_strategy,
                                       num_proc=args.dataset_num_proc)  # fmt: skip
            check_packed_labels(dataset, name, args.max_length)
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset

    def _prepare_stream(self, dataset, tokenizer, args: SFTConfig, packing: bool, name: str, names: list[str]):
        """``_prepare`` of a stream, lazily (``prepare_sft_stream``), the shuffles and packing where TRL has them."""
        if "seq_lengths" in names:  # packed before: each row checked as it is read (_check_packed_rows)
            limit = {"name": name, "max_length": args.max_length}
            return dataset.map(_packed_row_fits, with_indices=True, fn_kwargs=limit) if args.max_length else dataset
        completion_only_loss = self.completion_only_loss if "input_ids" in names else args.completion_only_loss
        if completion_only_loss is None:  # as _prepare decides it for raw rows
            completion_only_loss = self.completion_only_loss and {"prompt", "completion"} <= set(names)
        dataset, text_field = as_trl_reads(dataset, args.dataset_text_field, self._formatting_func is not None, names)
        prepared = prepare_sft_stream(
            dataset, tokenizer, text_field=text_field, max_length=None if packing else args.max_length,
            truncation_mode=args.truncation_mode, completion_only_loss=completion_only_loss,
            assistant_only_loss=args.assistant_only_loss, formatting_func=self._formatting_func, name=name,
            chat_template=training_template(tokenizer, args.assistant_only_loss),
            bad_rows=getattr(args, "stream_bad_rows", "raise"),
        )  # fmt: skip
        self.dropped_rows[name] = prepared.dropped_rows  # filled as the stream is read
        if args.dataloader_num_workers > 0:  # (the workers' counts: collected after evaluations and training)
            prepared.share_with_workers()
        self._streams.append(prepared)
        dataset = prepared.dataset
        if packing:
            if args.shuffle_dataset:
                dataset = dataset.shuffle(seed=args.seed)
            dataset = pack_sft_dataset(dataset, args.max_length, strategy=args.packing_strategy)
        return dataset.shuffle(seed=args.seed) if args.shuffle_dataset else dataset

    def _truncate(self, dataset: datasets.Dataset, args: SFTConfig, name: str) -> datasets.Dataset:
        """Cut ``input_ids``/``labels`` to ``max_length`` and drop the rows left with no label (counted)."""
        window = truncation_window(args.max_length, args.truncation_mode)
        dataset = dataset.map(cut_to_window, fn_kwargs={"window": window}, num_proc=args.dataset_num_proc)
        gone = [i for i, learns in enumerate(dataset["_has_labels"]) if not learns]
        if gone:
            self.dropped_rows[name] = {"no_labels_after_truncation": gone}
            report_dropped(self.dropped_rows[name], len(dataset), len(dataset) - len(gone), name, args.max_length)
            dataset = dataset.select(sorted(set(range(len(dataset))) - set(gone)))
        return dataset.remove_columns("_has_labels")

    def _to_score(self, dataset, name: str):
        """A set given to ``evaluate()`` or ``predict()``, prepared as the constructor prepares eval sets."""
        dataset = self._prepare_eval(dataset, self.processing_class, self.args, name)
        self._check_ids(dataset, self.model, name, self.args)
        return dataset

    # --- loss and metrics

    def train(self, *args, **kwargs):
        self._token_rate.restart(self._total_train_tokens)
        return train_reporting_streams(self, super().train, *args, **kwargs)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = {key: sum(v) / len(v) for key, v in self._metrics[mode].items() if v}
        if mode == "train" and "loss" in logs:
            metrics["tokens_per_second"] = self._token_rate(self._total_train_tokens)
        if mode == "eval":
            metrics = {f"{eval_prefix(logs)}_{key}": value for key, value in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)
        self._metrics[mode].clear()
