"""``DPOTrainer``: transformers' Trainer running ``preference_step`` on packed batches.

    trainer = DPOTrainer(model, ref_model=None, args=DPOConfig(...), train_dataset=ds, processing_class=tokenizer)
    trainer.train()

The Trainer's own seeded sampler picks ``per_device_train_batch_size`` pairs per step (the pairs TRL would see); the
collator packs their sequences (``pack_pairs(split_pairs=True)``; rows as long as ``pack_length``, by default the
whole batch in one row when the steps' attention works per sequence (``fastdpo_varlen`` with
``packed_attention="varlen"``, or flash-attention), else ``default_pack_length``: the batch's longest sequence on
eager/sdpa, and on any attention without a ``max_length``). The steps run on that attention (``use_attention``, held
through the backward, where gradient checkpointing recomputes the layers), and ``compute_loss`` runs the reference
pass and the policy pass on that one packed batch, through the DDP/FSDP/DeepSpeed wrapper's forward (``forward_as``;
the head runs as the LM head module's forward, ``run_head``). With several processes, each step's pairs are dealt by
tokens (``balance_ranks``). Every pair of an optimizer step weighs the same, whatever the micro-batches, processes
or token budget (``max_tokens_per_batch``). Datasets go through ``prepare_preferences`` and ``tokenize_preferences``
(TRL-identical ids from TRL's columns, but for a ``system``/``input``/``context`` column, joined into the prompt where
TRL ignores it; the rows TRL drops are dropped and counted in ``self.dropped_rows``); streams
(``datasets.IterableDataset``, with ``max_steps``) through ``prepare_stream`` as they are read, and a dict of eval
datasets under its keys. Metrics carry TRL's names (``rewards/*``, ``logps/*``, ``entropy``, ``logits/*``,
``mean_token_accuracy``, ``num_tokens``, ``aux_loss`` for MoE) plus ``padding_fraction`` and ``tokens_per_second``;
non-finite steps are skipped (``NumericsGuard``).

A model is an object or a path (``model_init_kwargs``; quantized with ``quantization_config``, whose adapters then
train in bf16, as TRL sets QLoRA up), optionally with a ``peft_config``. References:
``separate`` (``ref_model``, or a frozen copy of the policy when it is None), ``cached`` (computed once, read from
files), ``adapter`` (PEFT: adapters disabled, or a frozen copy of a trained adapter; no second copy of the weights)
and ``none`` for reference-free losses. A separate reference can wait in host memory between its passes
(``ref_offload``); under DeepSpeed ZeRO-3 it gets its own engine.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import nullcontext
from functools import partial

import torch
from datasets import IterableDataset
from torch import nn
from torch.utils.data import DataLoader
from transformers import Trainer, set_seed
from transformers.trainer_utils import seed_worker

from fastdpo.data.formats import prepare_preferences
from fastdpo.data.packing import PackedBatch, default_pack_length, pack_pairs, pair_length
from fastdpo.data.sampler import RankBalancedBatchSampler, TokenBudgetBatchSampler
from fastdpo.data.source_rows import rows_of
from fastdpo.data.stream import PreparedStream, first_row, is_tokenized, prepare_stream, prepare_tokenized_stream
from fastdpo.data.tokenize import drop_filling_prompts, tokenize_preferences
from fastdpo.data.vocabulary import check_pack_length, check_positions, check_token_ids
from fastdpo.errors import ConfigError
from fastdpo.model.adapters import (
    adapter_reference,
    is_peft_model,
    prepare_adapter_model,
    prepare_quantized_training,
    refuse_unsupported_adapter,
    wrap_with_adapter,
)
from fastdpo.model.attention import attends_per_sequence, packed_attention, use_attention
from fastdpo.model.hooks import forward_as
from fastdpo.model.moe import router_aux_loss_coef
from fastdpo.model.offload import HostResident
from fastdpo.model.probe import check_head
from fastdpo.model.reference_cache import cached_reference_logps, on_device
from fastdpo.ops import LossOutput
from fastdpo.train.common import (
    NumericsGuard,
    PackedTokenCount,
    StepMetrics,
    TokenRate,
    check_attention_device,
    check_collator,
    check_lean_activations,
    check_run_dir,
    check_stream_args,
    checked_rows,
    default_output_dir,
    lean_layers,
    load_causal_lm,
    load_tokenizer,
    neftune_as_trl,
    refuse_outputs,
    report_dropped,
    set_pad_token,
    train_reporting_streams,
    uncompiled,
    undispatched,
    warn_no_logits,
    with_quantization,
)
from fastdpo.train.config import DPOConfig, coupled_losses
from fastdpo.train.displacement import DisplacementWatch, LikelihoodDisplacementWarning  # noqa: F401 (its old home)
from fastdpo.train.dropout import SavesUserDropout, disable_dropout
from fastdpo.train.evaluation import ScoresGivenSets, eval_prefix
from fastdpo.train.interrupt import InterruptibleTrainer
from fastdpo.train.loss_attributes import LossAttributes
from fastdpo.train.model_card import WritesModelCard
from fastdpo.train.model_checks import (
    SyncReference,
    check_best_metric,
    check_checkpointing,
    check_reference,
    check_sync_reference,
    deepspeed_zero3_reference,
    warn_batch_dependent_rope,
)
from fastdpo.train.resume import ResumableTrainer
from fastdpo.train.sft_setup import refuse_logit_hooks
from fastdpo.train.step import preference_step, reference_logps

TOKEN_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps")  # TRL's names for precomputed reference log-probs


class PairPacker:
    """Collator: a list of tokenized pairs → the fields of one ``PackedBatch`` (a dict the Trainer can move)."""

    def __init__(self, *, pack_length: int | None, max_length: int | None, truncation_mode: str, pad_token_id: int,
                 pad_to_multiple_of: int | None = None, packing: bool = True,
                 one_row: bool = False) -> None:  # fmt: skip
        # pack_length None: rows as long as each batch's longest sequence (see default_pack_length); one_row: the
        # whole batch in one row, for attention that works per sequence (attends_per_sequence), with no padding
        self.pack_length, self.max_length = pack_length, max_length
        self.truncation_mode, self.pad_token_id = truncation_mode, pad_token_id
        self.pad_to_multiple_of, self.packing, self.one_row = pad_to_multiple_of, packing, one_row

    def __call__(self, examples: list[dict]) -> dict:
        batch = pack_pairs(examples, pack_length=self.pack_length, max_length=self.max_length,
                           truncation_mode=self.truncation_mode, pad_token_id=self.pad_token_id,
                           pad_to_multiple_of=self.pad_to_multiple_of,
                           one_pair_per_row=not self.packing, split_pairs=True, one_row=self.one_row)  # fmt: skip
        fields = {name: getattr(batch, name) for name in batch.__dataclass_fields__}
        fields["pair_ids"] = torch.tensor(fields["pair_ids"], dtype=torch.long)
        fields["max_seqlen"] = torch.tensor(fields["max_seqlen"])
        fields["num_padding"] = torch.tensor(fields["num_padding"])
        if all(name in examples[0] for name in REFERENCE_COLUMNS):  # cached reference: [P, 2] in pair order
            fields["ref_logps"] = torch.tensor([[examples[i][name] for name in REFERENCE_COLUMNS]
                                                for i in batch.pair_ids], dtype=torch.float32)  # fmt: skip
        return fields


def _as_batch(inputs: dict) -> PackedBatch:
    fields = dict(inputs)
    fields["pair_ids"] = fields["pair_ids"].tolist()
    fields["max_seqlen"] = int(fields["max_seqlen"])
    fields["num_padding"] = int(fields["num_padding"])
    return PackedBatch(**fields)


class DPOTrainer(
    ScoresGivenSets,
    LossAttributes,
    PackedTokenCount,
    InterruptibleTrainer,
    ResumableTrainer,
    NumericsGuard,
    SavesUserDropout,
    WritesModelCard,
    Trainer,
):
    """DPO (and its family) on packed batches; TRL 1.16's constructor arguments."""

    tokens_per_process = True  # _total_train_tokens: this process's share (resume.load_counters)

    # compute_loss normalizes per pair over the whole optimizer step (see _get_num_items_in_batch)
    loss_is_scaled_for_ga = True

    def __init__(
        self,
        model: nn.Module,
        ref_model: nn.Module | None = None,
        args: DPOConfig | None = None,
        data_collator=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        compute_metrics=None,
        callbacks=None,
        optimizers=(None, None),
        quantization_config=None,
        peft_config=None,
        tokenizer=None,
    ) -> None:  # (TRL 1.16's order: a positional call means what it means there)
        args = args or DPOConfig(output_dir=default_output_dir(model, "DPO"))  # (TRL's)
        refuse_logit_hooks(compute_metrics=compute_metrics)  # (it was never called: evaluation builds no logits)
        if tokenizer is not None:  # the old name, as the seed's example uses it
            warnings.warn("DPOTrainer(tokenizer=...) is deprecated: use processing_class", FutureWarning, stacklevel=2)
            processing_class = processing_class or tokenizer
        if args.n_gpu > 1:
            raise ConfigError(
                f"one process drives {args.n_gpu} GPUs (torch DataParallel), which packed batches do not support",
                column="n_gpu",
                fix="launch one process per GPU: accelerate launch (or torchrun) your script",
            )
        check_collator(data_collator, PairPacker)
        init_kwargs = with_quantization(model, args.model_init_kwargs, quantization_config)
        revision = (init_kwargs or {}).get("revision") if isinstance(model, str) else None  # (the tokenizer's too)
        if isinstance(model, str):  # the model first: a wrong path is then said as a model's, not a tokenizer's
            model = load_causal_lm(model, init_kwargs, trust_remote_code=args.trust_remote_code, column="model")
        elif args.model_init_kwargs is not None and not isinstance(ref_model, str):
            # TRL 1.16 says so too, yet loads its reference from the model's path with them; fastdpo copies the model
            warnings.warn("model_init_kwargs: the model is already built, they are not used (nor for a reference "
                          "copied from it)", stacklevel=2)  # fmt: skip
        if isinstance(ref_model, str):  # quantized as the policy, as TRL loads it
            ref_model = load_causal_lm(ref_model, init_kwargs, trust_remote_code=args.trust_remote_code,
                                       column="ref_model")  # fmt: skip
        if processing_class is None:
            processing_class = load_tokenizer(model, revision=revision, trust_remote_code=args.trust_remote_code)
        if ref_model is not None:
            check_reference(model, ref_model, processing_class)
        check_checkpointing(model, args)
        if peft_config is not None:
            set_seed(args.seed)  # the adapter's random init, reproducible (and TRL's)
            model = wrap_with_adapter(model, peft_config, gradient_checkpointing=args.gradient_checkpointing)
        elif is_peft_model(model):  # a trained adapter: a frozen copy of it is the reference, unless ref_model is
            model = prepare_adapter_model(model, gradient_checkpointing=args.gradient_checkpointing,
                                          new_adapter=ref_model is not None)  # (True: no copy)  # fmt: skip
        if is_peft_model(model):
            refuse_unsupported_adapter(model)
            prepare_quantized_training(model)
        check_run_dir(args, model)
        check_best_metric(args, eval_dataset)
        warn_batch_dependent_rope(model, args.max_length)
        self.reference_mode = _reference_mode(args, is_peft_model(model), has_ref_model=ref_model is not None)
        if ref_model is not None and self.reference_mode == "none":
            warnings.warn(f"ref_model is not used: loss_type {list(args.loss_type)} is reference-free", stacklevel=2)
            ref_model = None
        text_tokenizer = getattr(processing_class, "tokenizer", processing_class)  # a processor holds one
        set_pad_token(model, text_tokenizer, args.pad_token, mirror=data_collator is None)
        self._set_loss_attributes(args.loss_config(), args.ld_alpha)  # (TRL's trainer.beta, ...: read at each step)
        self.dropped_rows: dict[str, dict[str, list[int]]] = {}
        self._streams: list[PreparedStream] = []
        undispatched(args)  # (every stream, an eval set given to evaluate() later too)
        uncompiled(args)
        with args.main_process_first(desc="preparing the datasets"):  # (the others then read its cache, as in TRL)
            train_dataset = self._prepare(train_dataset, processing_class, args, "train")
            if eval_dataset is not None:
                eval_dataset = self._prepare(eval_dataset, processing_class, args, "eval")
        self.packed_attention_impl = packed_attention(args.packed_attention)
        collator = data_collator or packer_for(model, args, self.packed_attention_impl, text_tokenizer.pad_token_id,
                                               pack_length=args.pack_length, packing=args.packing)  # fmt: skip
        for split, data in (("train", train_dataset), ("eval", eval_dataset)):
            check_token_ids(data, model, split, self.dropped_rows)
            check_positions(data, model, split, args.max_length, self.dropped_rows)
            check_pack_length(data, collator, split, self.dropped_rows)
        self.aux_loss_coef = router_aux_loss_coef(model, args.router_aux_loss_coef)
        if args.disable_dropout:
            disable_dropout(model)
        super().__init__(model=model, args=args, data_collator=collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                         optimizers=optimizers)  # fmt: skip
        check_lean_activations(self)
        check_attention_device(self)
        self._displacement = DisplacementWatch(args.displacement_margin,
                                               None if self.loss_config.reference_free else args.beta)  # fmt: skip
        self.ref_model, self._ref_resident, self._ref_engine = None, None, None
        if self.reference_mode == "separate":
            self.ref_model = ref_model if ref_model is not None else copy.deepcopy(model)
            self.ref_model.requires_grad_(False).eval()
            self._ref_engine = deepspeed_zero3_reference(self.ref_model, self.accelerator)
            if self._ref_engine is not None:  # partitioned; the engine's hooks gather it module by module
                if args.ref_offload:
                    raise ConfigError(
                        "DeepSpeed ZeRO-3 partitions the reference; ref_offload would move it whole",
                        column="ref_offload",
                        fix="use DeepSpeed's offload_param_device instead",
                    )
                if args.sync_ref_model:
                    raise ConfigError(
                        "is not supported under DeepSpeed ZeRO-3 yet",
                        column="sync_ref_model",
                        fix="use DDP or FSDP2, or sync_ref_model=False",
                    )
            elif args.ref_offload:  # in host memory; on the device only for its pass
                self._ref_resident = HostResident(self.ref_model)
            else:
                self.ref_model.to(self.args.device)
            if self._ref_resident is None and self._ref_engine is None:  # (else at its first pass, on the device)
                check_head(self.ref_model)  # (as check_attention_device the policy's: once, before the steps)
            if args.sync_ref_model:
                check_sync_reference(self.model, self.ref_model)
                self.add_callback(SyncReference(self.ref_model, self.accelerator))
        elif self.reference_mode == "cached":  # computed once (or read), then no reference model is kept
            if self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3:
                raise ConfigError("the cached reference is computed before training, when ZeRO-3 has partitioned "
                                  "the weights and no engine gathers them yet", column="precompute_ref_log_probs",
                                  fix="compute the cache in a run without ZeRO-3 (same ref_cache_dir; it is reused), "
                                      "or use a separate reference")  # fmt: skip
            # no ref_model: the policy, a PEFT one with its adapter off (or its "ref" adapter), as a separate or
            # adapter reference sees it (and TRL's precompute)
            reference = ref_model if ref_model is not None else model  # (on args.device for the pass: on_device)
            adapter_off = ref_model is None and is_peft_model(model)
            self.train_dataset = self._with_reference_logps(reference, self.train_dataset, "train", adapter_off)
            if self.eval_dataset is not None:
                self.eval_dataset = self._with_reference_logps(reference, self.eval_dataset, "eval", adapter_off)
        self._metrics = {"train": StepMetrics(), "eval": StepMetrics()}
        self._total_train_tokens = 0
        self._token_rate = TokenRate()

    def train(self, *args, **kwargs):
        self._token_rate.restart(self._total_train_tokens)
        return train_reporting_streams(self, super().train, *args, **kwargs)

    def _to_score(self, dataset, name: str):
        """A set given to ``evaluate()`` or ``predict()``, prepared as the constructor prepares eval sets (TRL's
        evaluate tokenizes it too); under a cached reference, the trainer's own sets only (they carry its values: a
        set with another run's columns scored against that run's reference)."""
        if self.reference_mode == "cached":
            own = [self.train_dataset, *(self.eval_dataset.values() if isinstance(self.eval_dataset, dict)
                                         else [self.eval_dataset])]  # fmt: skip
            prints = {getattr(part, "_fingerprint", None) for part in own} - {None}
            parts = dataset.values() if isinstance(dataset, dict) else [dataset]
            if all(getattr(part, "_fingerprint", None) in prints for part in parts):
                return dataset
            raise ConfigError("the cached reference was computed for the sets given to the trainer, and its "
                              "reference model is not kept", column="eval_dataset",
                              fix="pass the set as DPOTrainer(eval_dataset=...) (then trainer.eval_dataset holds it "
                                  "with its reference values), or use a separate reference")  # fmt: skip
        dataset = self._prepare(dataset, self.processing_class, self.args, name)
        check_token_ids(dataset, self.model, name, self.dropped_rows)
        check_positions(dataset, self.model, name, self.args.max_length, self.dropped_rows)
        check_pack_length(dataset, self.data_collator, name, self.dropped_rows)
        return dataset

    def _set_signature_columns_if_needed(self) -> None:
        # the columns the collator reads (the Trainer drops the others when remove_unused_columns is on)
        if self._signature_columns is None:
            self._signature_columns = [*TOKEN_COLUMNS, *REFERENCE_COLUMNS]

    def _with_reference_logps(self, reference: nn.Module, dataset, name: str, adapter_off: bool = False):
        """``dataset`` with the reference's log-probs as columns, from the cache (computed where no file has them,
        each process its share of the rows), under the autocast the policy's passes run under (``bf16``/``fp16``),
        as a separate reference's pass would be; ``adapter_off``: ``reference`` is a PEFT policy, run within
        ``adapter_reference``."""
        if isinstance(dataset, dict):
            return {key: self._with_reference_logps(reference, part, f"{name}_{key}", adapter_off)
                    for key, part in dataset.items()}  # fmt: skip
        args = self.args
        batch_size = args.precompute_ref_batch_size or args.per_device_train_batch_size
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)  # (a processor holds one)
        # (the key's precision: the autocast in effect, not accelerate's label, which DeepSpeed's does not apply)
        # (and on the steps' attention: a policy still equal to its reference then has margins of exactly 0)
        with (self.accelerator.autocast(), on_device(reference, args.device),
              use_attention([reference], self.packed_attention_impl),
              adapter_reference(reference) if adapter_off else nullcontext()):  # fmt: skip
            values = cached_reference_logps(reference, dataset, cache_dir=args.ref_cache_dir, tokenizer=tokenizer,
                                            max_length=args.max_length, truncation_mode=args.truncation_mode,
                                            batch_size=batch_size, head_impl=args.head_impl,
                                            progress=not args.disable_tqdm, ld_alpha=args.ld_alpha,
                                            adapter_off=adapter_off, processes=self.accelerator)  # fmt: skip
        dataset = dataset.remove_columns([c for c in REFERENCE_COLUMNS if c in dataset.column_names])
        dataset = dataset.add_column(REFERENCE_COLUMNS[0], values[:, 0].tolist())
        return dataset.add_column(REFERENCE_COLUMNS[1], values[:, 1].tolist())

    def _prepare(self, dataset, tokenizer, args: DPOConfig, name: str):
        if isinstance(dataset, dict) and name == "eval":  # several eval sets, evaluated under their keys, as TRL's
            return {key: self._prepare(part, tokenizer, args, f"{name}_{key}") for key, part in dataset.items()}
        dataset, _ = checked_rows(dataset, name)  # (images were left unread: the pairs trained on their text alone)
        if isinstance(dataset, IterableDataset):
            return self._prepare_stream(dataset, tokenizer, args, name)
        if all(c in dataset.column_names for c in TOKEN_COLUMNS):  # tokenized before: TRL's keep_start drop only
            if dataset._indices is not None:  # the user's selection or shuffle, as its own table: rows are then
                dataset = dataset.flatten_indices()  # named as the user numbers them, not as its source table did
            kept = drop_filling_prompts(dataset, args.max_length, args.truncation_mode)
            self.dropped_rows[name] = kept.dropped_rows
            report_dropped(kept.dropped_rows, len(dataset), len(kept.dataset), name, args.max_length)
            return kept.dataset
        with rows_of(name):  # (a row named as the data file numbers it, in a run of the fastdpo command)
            prepared = prepare_preferences(dataset, num_proc=args.dataset_num_proc)
            tokenized = tokenize_preferences(prepared, tokenizer, max_length=args.max_length,
                                             truncation_mode=args.truncation_mode,
                                             num_proc=args.dataset_num_proc)  # fmt: skip
        self.dropped_rows[name] = tokenized.dropped_rows
        report_dropped(tokenized.dropped_rows, len(prepared), len(tokenized.dataset), name, args.max_length)
        return tokenized.dataset

    def _prepare_stream(self, dataset, tokenizer, args: DPOConfig, name: str):
        """An iterable dataset, prepared lazily (``prepare_stream``); what needs the whole dataset is refused."""
        check_stream_args(args, name, cached_reference=self.reference_mode == "cached")
        if is_tokenized(first_row(dataset, name)):  # tokenized before: TRL's keep_start drop only
            prepared = prepare_tokenized_stream(dataset, max_length=args.max_length,
                                                truncation_mode=args.truncation_mode, name=name)  # fmt: skip
        else:
            prepared = prepare_stream(dataset, tokenizer, max_length=args.max_length,
                                      truncation_mode=args.truncation_mode, name=name,
                                      bad_rows=getattr(args, "stream_bad_rows", "raise"))  # fmt: skip
        self.dropped_rows[name] = prepared.dropped_rows  # filled as the stream is read
        if args.dataloader_num_workers > 0:  # (the workers' counts: collected after evaluations and training)
            prepared.share_with_workers()
        self._streams.append(prepared)
        return prepared.dataset

    def _reference_pass(self, batch: PackedBatch) -> torch.Tensor:
        """The separate reference's ``[P, 2]`` log-probs, through its root module's forward (a ZeRO-3 engine's
        hooks track steps there), on the device only for the pass when it is host-resident (``ref_offload``)."""
        reference = self.ref_model

        def forward(*args, **kwargs) -> torch.Tensor:
            return reference_logps(reference, batch, impl=self.args.head_impl, ld_alpha=self._step_ld_alpha())

        resident = self._ref_resident.on(self.args.device) if self._ref_resident else nullcontext()
        with resident, forward_as(reference, forward):
            return reference()

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> torch.Tensor | None:
        """Pairs in this optimizer step: the micro-batches of gradient accumulation, summed over processes."""
        if not batch_samples or "pair_ids" not in batch_samples[0]:
            return None
        pairs = torch.tensor(sum(len(b["pair_ids"]) for b in batch_samples), device=device)
        if self.accelerator.num_processes > 1:
            pairs = self.accelerator.gather(pairs).sum()
        return pairs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        refuse_outputs(return_outputs)
        inputs = dict(inputs)
        ref_logps = inputs.pop("ref_logps", None)
        if self.reference_mode != "cached":  # the columns of an earlier run's cache: this run's reference decides
            ref_logps = None
        batch = _as_batch(inputs)
        inner = self.accelerator.unwrap_model(model)

        def packed_forward(*args, **kwargs) -> LossOutput:
            return preference_step(inner, batch, self.loss_config, ref_logps=ref_logps, head_impl=self.args.head_impl,
                                   token_metrics=True, aux_loss_coef=self.aux_loss_coef,
                                   offload_activations=self.args.activation_offloading and model.training,
                                   ld_alpha=self._step_ld_alpha(), use_weighting=self.args.use_weighting)  # fmt: skip

        # mixed precision, as accelerate's forward wrapper would apply it
        with (
            self.accelerator.autocast(),
            neftune_as_trl(inner, batch, padding_free=False, pad_to_multiple_of=self.args.pad_to_multiple_of),
        ):
            if ref_logps is None and self.ref_model is not None:
                ref_logps = self._reference_pass(batch)
            elif ref_logps is None and self.reference_mode == "adapter":
                with adapter_reference(inner):
                    ref_logps = reference_logps(inner, batch, impl=self.args.head_impl, ld_alpha=self._step_ld_alpha())
            with forward_as(inner, packed_forward):
                out = model()  # through the DDP/FSDP wrapper, if any (see forward_as)
        mode = "train" if model.training else "eval"
        values = {name: float(value) for name, value in out.metrics.items()}
        weights = {name: float(count) for name, count in out.token_counts.items()}
        weights["padding_fraction"] = float(batch.input_ids.numel())  # (a share of the rows' tokens, over the batches)
        self._metrics[mode].add({**values, "padding_fraction": batch.padding_fraction}, batch.num_pairs, weights)
        if mode == "train":  # every real token (prompts counted in both sequences of a pair), as TRL counts
            self._total_train_tokens += batch.input_ids.numel() - batch.num_padding
        loss = out.loss
        if num_items_in_batch is not None and model.training:
            # out.loss is this micro-batch's mean over its pairs. Weighted by its share of the step's pairs (all
            # micro-batches, all processes; DDP then averages over processes), every pair of the optimizer step
            # counts the same however the pairs were split into micro-batches or packed.
            loss = loss * (batch.num_pairs * self.accelerator.num_processes / num_items_in_batch)
        return loss

    def get_train_dataloader(self):
        args = self.args
        budget = args.max_tokens_per_batch is not None
        if budget and self.accelerator.split_batches:  # (accelerate's error, from deep inside, asked for a batch_size)
            raise ConfigError("token-budget batches are each one process's; split_batches splits every batch over "
                              "the processes", column="max_tokens_per_batch",
                              fix="drop accelerator_config's split_batches, or max_tokens_per_batch")  # fmt: skip
        # (split_batches: accelerate splits each batch over the processes, so a dealt round would be one step's pairs
        # split again: the steps took other pairs than the sampler's)
        balance = (args.balance_ranks and args.world_size > 1 and not isinstance(self.train_dataset, IterableDataset)
                   and not self.accelerator.split_batches and not coupled_losses(args))  # fmt: skip
        if not budget and not balance:  # (a stream's batches are dealt as they come: its lengths are not known)
            return super().get_train_dataloader()
        dataset = self._remove_unused_columns(self.train_dataset, description="Training")
        lengths = [pair_length(example, args.max_length, args.truncation_mode) for example in dataset]
        if budget:  # rank-aware itself: accelerate must not shard it again (below)
            seed = args.data_seed if args.data_seed is not None else args.seed  # (the Trainer's sampler's seed)
            sampler = TokenBudgetBatchSampler(lengths, args.max_tokens_per_batch, seed=seed,
                                              rank=args.process_index, world_size=args.world_size,
                                              drop_last=args.dataloader_drop_last,
                                              shuffle=args.train_sampling_strategy != "sequential")  # fmt: skip
        else:  # the batches of every process, each step's dealt by tokens; accelerate's shard takes this rank's
            sampler = RankBalancedBatchSampler(self._get_train_sampler(dataset), args.per_device_train_batch_size,
                                               lengths=lengths, world_size=args.world_size,
                                               drop_last=args.dataloader_drop_last,
                                               top_up=self.accelerator.even_batches)  # fmt: skip
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
                            persistent_workers=args.dataloader_persistent_workers, in_order=args.dataloader_in_order,
                            multiprocessing_context=args.dataloader_multiprocessing_context,
                            prefetch_factor=args.dataloader_prefetch_factor,
                            worker_init_fn=partial(seed_worker, num_workers=args.dataloader_num_workers,
                                                   rank=args.process_index))  # fmt: skip
        loader = self.accelerator.prepare(loader)
        shard = getattr(loader, "batch_sampler", None)
        if budget and shard is not None and getattr(shard, "batch_sampler", None) is sampler:
            shard.num_processes, shard.process_index = 1, 0
        return loader

    def training_step(self, model, inputs, num_items_in_batch=None):
        # held across the backward: gradient checkpointing recomputes the layers there (use_attention)
        with use_attention([self.model, self.ref_model], self.packed_attention_impl), lean_layers(self):
            return super().training_step(model, inputs, num_items_in_batch)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        warn_no_logits(prediction_loss_only)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), use_attention([self.model, self.ref_model], self.packed_attention_impl):
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        if "train_runtime" in logs and not self._metrics[mode].sums:  # training's closing summary: TRL's keys only
            return super().log(logs, start_time)  # (metrics of steps after the last log, in train mode, as TRL's)
        metrics = self._metrics[mode].pop(self.accelerator, totals={"num_tokens": self._total_train_tokens})
        if mode == "train" and "loss" in logs:
            metrics["tokens_per_second"] = self._token_rate(metrics["num_tokens"])
            self._displacement.update(metrics, learning_rate=self.args.learning_rate,
                                      warn=self.is_world_process_zero())  # fmt: skip
        if mode == "eval":
            metrics = {f"{eval_prefix(logs)}_{key}": value for key, value in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)


def _reference_mode(args: DPOConfig, is_peft: bool, *, has_ref_model: bool = False) -> str:
    """``separate``, ``cached``, ``adapter`` or ``none``: what ``reference`` (and TRL's ``precompute_ref_log_probs``)
    select for this model; a ``ref_model`` given is the reference, a PEFT policy's too (TRL's rule)."""
    reference_free = args.loss_config().reference_free
    mode = args.reference
    if mode == "auto":
        adapter = "adapter" if is_peft and not has_ref_model else "separate"
        mode = "none" if reference_free else "cached" if args.precompute_ref_log_probs else adapter
    if mode == "adapter" and not is_peft:
        raise ConfigError("'adapter' needs a PEFT model (pass peft_config, or a PeftModel)", column="reference",
                          fix="use 'separate' or 'cached', or pass peft_config")  # fmt: skip
    if mode == "adapter" and has_ref_model:
        raise ConfigError("'adapter' takes the policy with its adapter off as the reference, and a ref_model is given "
                          "too", column="reference", fix="use reference='separate' (or 'auto') to train against "
                          "ref_model, or drop ref_model")  # fmt: skip
    if args.precompute_ref_log_probs and mode != "cached" and not reference_free:
        raise ConfigError(f"precompute_ref_log_probs=True asks for a cached reference, reference={mode!r} for another",
                          column="reference", fix="use reference='cached' (or 'auto')")  # fmt: skip
    if args.ref_offload and mode != "separate":
        raise ConfigError(f"ref_offload moves a separate reference model; reference={mode!r} has none",
                          column="ref_offload", fix="use ref_offload=False, or reference='separate'")  # fmt: skip
    if args.sync_ref_model and mode != "separate":
        raise ConfigError(f"sync_ref_model updates a reference model; reference={mode!r} has none to update",
                          column="sync_ref_model", fix="use reference='separate', or sync_ref_model=False")  # fmt: skip
    if args.sync_ref_model and is_peft:  # (it mixed a full reference with the adapter's weights: a shape error, late)
        raise ConfigError("sync_ref_model mixes the policy's weights into the reference's, and a PEFT policy's "
                          "trained weights are its adapter's", column="sync_ref_model",
                          fix="use sync_ref_model=False, or train without PEFT (TRL refuses it too)")  # fmt: skip
    if mode == "none" and not reference_free:
        fix = "use 'auto', 'separate' or 'cached', or a reference-free loss (simpo, cpo, orpo)"
        raise ConfigError(f"loss_type {list(args.loss_type)} needs a reference", column="reference", fix=fix)
    return "none" if reference_free else mode


def packer_for(model: nn.Module, args, attention: str | None, pad_token_id: int, *, pack_length: int | None = None,
               packing: bool = True) -> PairPacker:  # fmt: skip
    """The collator of a DPO config (fastdpo's or TRL's): rows of ``pack_length`` when set, else one row per batch
    for attention that works per sequence, else ``default_pack_length`` for the attention the steps run with
    (``attention``; None: the model's own) and ``max_length`` (None: rows as long as each batch's longest
    sequence)."""
    attention = attention or getattr(model.config, "_attn_implementation", None) or "sdpa"
    one_row = pack_length is None and packing and attends_per_sequence(attention)
    if pack_length is None and not one_row and args.max_length is not None:  # (no max_length: rows as long as each
        pack_length = default_pack_length(args.max_length, attention)  # batch's longest sequence, which nothing caps)
    return PairPacker(pack_length=pack_length, max_length=args.max_length, truncation_mode=args.truncation_mode,
                      pad_token_id=pad_token_id, pad_to_multiple_of=args.pad_to_multiple_of, packing=packing,
                      one_row=one_row)  # fmt: skip
