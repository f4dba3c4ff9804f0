"""Drop-in for TRL: change one import, keep the script.

    from fastdpo.trl import DPOTrainer        # was: from trl import DPOTrainer  (SFTTrainer likewise)
    from trl import DPOConfig                 # unchanged, as every other argument

``fastdpo.trl.ORPOTrainer`` and ``fastdpo.trl.CPOTrainer`` (CPO, SimPO, AlphaPO) do the same for TRL's experimental
``trl.experimental.orpo.ORPOTrainer`` and ``trl.experimental.cpo.CPOTrainer`` (``fastdpo.trl_experimental``).

``fastdpo.trl.DPOConfig`` and ``fastdpo.trl.SFTConfig`` are TRL's configs with fastdpo's two step options added
(``packed_attention``, ``lean_activations``, both off by default; see ``fastdpo.DPOConfig``): import them instead of
TRL's to turn those on; anything that takes TRL's config takes them.

``fastdpo.trl.DPOTrainer`` is a subclass of ``trl.DPOTrainer``: TRL's constructor does everything it does
(argument checks, model loading, PEFT wrapping and the "ref" adapter, its own tokenization into ``prompt_ids`` /
``chosen_ids`` / ``rejected_ids``, the reference model, ``precompute_ref_log_probs``, TR-DPO's callback, logging,
saving, the model card). Two things are replaced, on this trainer instance only (no TRL or transformers class is
patched):

- the collator: the batch's pairs are packed without padding (``fastdpo.train.dpo.PairPacker``; the Trainer's
  sampler still picks the same pairs per step as TRL); a ``data_collator`` must be one (a ``ConfigError`` names
  any other: the packed step cannot read padded batches);
- the loss: ``_compute_loss`` runs fastdpo's reference pass and policy pass on the packed batch
  (``preference_step``: the fused head, segment sums, TRL's loss family), through the DDP/FSDP wrapper's forward,
  and logs TRL's metrics under TRL's names the way TRL does (one value per micro-batch, averaged at each log).

It adds one thing TRL does not do: fastdpo's likelihood-displacement watch (``fastdpo.train.dpo.DisplacementWatch``
with ``DPOConfig``'s default margin): ``logps/chosen_change`` in the training logs, and one
``LikelihoodDisplacementWarning`` when the chosen answers grow less likely while reward accuracy rises.

The loss of a micro-batch is the mean over its pairs, as TRL's (the Trainer then scales for gradient accumulation
as it does for TRL). ``ld_alpha`` (LD-DPO) and ``use_weighting`` (WPO) run on the step's plain head path
(``fastdpo.train.step``); ``ld_alpha`` outside [0, 1] is a ``ConfigError``. Streams (``IterableDataset``) are
prepared by TRL's own code, as in TRL. Refused with a ``ConfigError``: vision datasets, and ``compute_metrics`` (it
needs the full logits, which are never built).
"""

from __future__ import annotations

import dataclasses
import warnings
from types import SimpleNamespace

import torch

from fastdpo.data.vocabulary import check_positions, check_positions_as_cut, check_token_ids
from fastdpo.errors import ConfigError, DataError, close_match

try:
    import trl
except ImportError as error:  # pragma: no cover - exercised in a process without TRL
    raise ImportError(
        "fastdpo.trl is a drop-in for TRL's trainers and needs TRL: pip install 'fastdpo[trl]' (TRL 1.16)"
    ) from error

SUPPORTED_TRL = ((1, 16), (1, 17))  # [first, last) minor versions tested


def _check_version(version: str) -> None:
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    low, high = SUPPORTED_TRL
    if not low <= parts < high:
        raise ImportError(
            f"fastdpo.trl supports TRL {low[0]}.{low[1]}.x (the TRL it is tested against); TRL {version} is "
            f"installed: pip install 'trl=={low[0]}.{low[1]}.*', or use fastdpo.DPOTrainer, which needs no TRL"
        )


_check_version(trl.__version__)

from accelerate.utils import is_peft_model  # noqa: E402  (after the TRL check: its error comes first)
from trl.models.utils import disable_gradient_checkpointing  # noqa: E402
from trl.trainer.utils import use_adapter  # noqa: E402

from fastdpo.model.adapters import refuse_unsupported_adapter  # noqa: E402
from fastdpo.model.attention import PACKED_ATTENTION, packed_attention, use_attention  # noqa: E402
from fastdpo.model.hooks import forward_as  # noqa: E402
from fastdpo.model.packed import head_softcap  # noqa: E402
from fastdpo.train.common import (  # noqa: E402
    PackedTokenCount,
    _first_process,
    check_attention_device,
    check_collator,
    check_lean_activations,
    check_liger,
    lean_layers,
    neftune_as_trl,
    refuse_outputs,
    uncompiled,
    undispatched,
    warn_no_logits,
)
from fastdpo.train.config import DPOConfig as FastDPOConfig  # noqa: E402
from fastdpo.train.config import check_loss_options, loss_config_of  # noqa: E402
from fastdpo.train.displacement import DisplacementWatch  # noqa: E402
from fastdpo.train.dpo import PairPacker, _as_batch, packer_for  # noqa: E402
from fastdpo.train.dropout import SavesUserDropout, disable_dropout  # noqa: E402
from fastdpo.train.model_checks import check_best_metric, check_sync_reference  # noqa: E402
from fastdpo.train.resume import ResumeChecks, WatchResume  # noqa: E402
from fastdpo.train.sft import PackedSFTLoss, SequencePacker  # noqa: E402
from fastdpo.train.sft_config import check_label_smoothing, warn_eval_packing  # noqa: E402
from fastdpo.train.sft_setup import _pack_length, refuse_logit_hooks  # noqa: E402
from fastdpo.train.step import preference_step, reference_logps  # noqa: E402

TRL_FALLBACK = ", or use TRL's own trainer for this run"


_PACKED_ATTENTION_HELP = (f"attention of the packed steps, one of {PACKED_ATTENTION}: 'varlen' runs each sequence on "
                          "its own (fastdpo.model.attention); 'auto' and 'model' keep the model's own")  # fmt: skip
_LEAN_HELP = "RMSNorms and gated MLPs that keep less for the backward, same gradients (fastdpo.model.lean)"


@dataclasses.dataclass
class _StepOptions:
    """fastdpo's two step options, added to TRL's configs below."""

    packed_attention: str = dataclasses.field(default="auto", metadata={"help": _PACKED_ATTENTION_HELP})
    lean_activations: bool = dataclasses.field(default=False, metadata={"help": _LEAN_HELP})


@dataclasses.dataclass
class DPOConfig(_StepOptions, trl.DPOConfig):
    """``trl.DPOConfig`` with fastdpo's ``packed_attention`` and ``lean_activations`` (as ``fastdpo.DPOConfig``'s)."""


@dataclasses.dataclass
class SFTConfig(_StepOptions, trl.SFTConfig):
    """``trl.SFTConfig`` with fastdpo's ``packed_attention`` and ``lean_activations`` (as ``fastdpo.SFTConfig``'s)."""


def _from_native(args, config_cls: type):
    """``args`` for a drop-in: a config of fastdpo's own trainer (``fastdpo.DPOConfig``, ``fastdpo.SFTConfig``) as the
    drop-in's ``config_cls`` (TRL's SFT trainer rebuilt it from ``to_dict()``: a TypeError from inside TRL naming a
    fastdpo field; TRL's DPO trainer took it as it is and ignored fastdpo's fields), refused where it sets a field of
    fastdpo's own trainer, which TRL's has not."""
    from fastdpo.train.config import DPOConfig as NativeDPO
    from fastdpo.train.sft_config import SFTConfig as NativeSFT

    if not isinstance(args, (NativeDPO, NativeSFT)):
        return args
    known = {field.name for field in dataclasses.fields(config_cls) if field.init}
    fresh = type(args)(output_dir=args.output_dir)  # (the defaults, as the config's own checks leave them)
    own = [field.name for field in dataclasses.fields(args) if field.init and field.name not in known]
    changed = [name for name in own if getattr(args, name) != getattr(fresh, name)]
    if changed:
        trainer = config_cls.__name__.replace("Config", "Trainer")
        raise ConfigError(f"{', '.join(changed)}: options of fastdpo's own trainer, and fastdpo.trl.{trainer} runs "
                          "TRL's, which has none", column=changed[0],
                          fix=f"train with fastdpo.{trainer} (same arguments), or leave them out and use "
                              f"fastdpo.trl.{config_cls.__name__}")  # fmt: skip
    values = {name: value for name, value in args.to_dict().items() if name in known}
    values.update({name: getattr(args, name) for name in values if name.endswith("_token")})  # (to_dict hides them)
    return config_cls(**values)


def _attention_of(args) -> str | None:
    """The packed steps' attention implementation (None: the model's own); TRL's own configs have no option."""
    return packed_attention(getattr(args, "packed_attention", "auto"))


# fastdpo's loss types that TRL 1.16's DPOTrainer has not (it fails on them at the first step), and where TRL has them
_NOT_TRLS = {
    "cdpo": "TRL 1.16 has no conservative DPO: train it with fastdpo.DPOTrainer, or use loss_type='robust' (rDPO)",
    "simpo": "SimPO is TRL's CPO trainer's: from fastdpo.trl import CPOTrainer (trl.experimental.cpo's drop-in)",
    "cpo": "CPO is TRL's CPO trainer's: from fastdpo.trl import CPOTrainer (trl.experimental.cpo's drop-in)",
    "orpo": "ORPO is TRL's ORPO trainer's: from fastdpo.trl import ORPOTrainer (trl.experimental.orpo's drop-in)",
}


def _refuse(args, compute_metrics) -> None:
    if args is not None:
        types = [args.loss_type] if isinstance(args.loss_type, str) else list(args.loss_type)
        for name in types:
            if name in _NOT_TRLS:  # (the drop-in trained them, a script that failed under TRL's import)
                raise ConfigError(f"{name!r} is fastdpo's, not a loss type of TRL 1.16's DPOTrainer",
                                  column="loss_type", fix=_NOT_TRLS[name])  # fmt: skip
        check_loss_options(args)
    refuse_logit_hooks(TRL_FALLBACK, compute_metrics=compute_metrics)


def _set_name(key: str, train_prepared: bool = True) -> str:
    """How errors name a set TRL prepares under ``key``: ``train``, ``eval``, or one of a dict's eval sets as
    ``eval_<key>`` (as the constructor names them); ``train_prepared``: the train set was prepared already, so that a
    set under ``"train"`` is a dict's eval set (it was named as the train set)."""
    if key == "train" and train_prepared:
        return "eval_train"
    return key if key in ("train", "eval") else f"eval_{key}"


class _CheckedEvalSets:
    """A dataset given to ``evaluate()``, which TRL prepares there, checked for token ids the model has no embedding
    for as the constructor checks its sets (an ``IndexError`` from inside torch's embedding, before)."""

    def _prepare_dataset(self, dataset, *args, **kwargs):
        prepared = super()._prepare_dataset(dataset, *args, **kwargs)
        if getattr(self, "model", None) is not None:  # (in the constructor, before the Trainer's: checked after it)
            name = _set_name(kwargs.get("dataset_name", args[-1] if args else "eval"))  # (a dict's sets: their keys;
            # after the constructor: a key "train" is an eval set's)
            check_token_ids(prepared, self.model, name)
            check_positions_as_cut(prepared, self.model, name, self.args)
        return prepared


class _PredictsRows:
    """``predict()`` of rows as given (text pairs, messages) prepared first as TRL's ``evaluate()`` prepares a set
    given to it (``_as_evaluate_prepares``); TRL's ``predict()`` left them to transformers' column check, which failed
    ("No columns in the dataset match the model's forward method signature"). Tokenized rows too: SFT's are cut to
    ``max_length`` and packed as ``evaluate()`` does (their loss differed from its), DPO's get the reference log-probs
    ``precompute_ref_log_probs`` reads."""

    def predict(self, test_dataset, ignore_keys: list[str] | None = None, metric_key_prefix: str = "test"):
        test_dataset = self._as_evaluate_prepares(test_dataset)
        return super().predict(test_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)


def _check_pair_columns(dataset, name: str) -> None:
    """A DataError for a dataset without the ``chosen`` or ``rejected`` text TRL's preparation reads (its
    ``KeyError: 'chosen'`` from inside a map, before), naming a close column or fastdpo's trainer for tokenized rows
    (TRL 1.16 tokenizes every pair itself)."""
    columns = getattr(dataset, "column_names", None)  # (None: a stream that does not know them)
    missing = [column for column in ("chosen", "rejected") if columns is not None and column not in columns]
    if not missing:
        return
    guess = close_match(missing[0], columns)
    if {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(columns):
        fix = "TRL's DPOTrainer tokenizes text pairs itself: train tokenized rows with fastdpo.DPOTrainer"
    else:
        fix = f"rename your column to {missing[0]!r} (dataset.rename_column({guess or '<your column>'!r}, "
        fix += f"{missing[0]!r})); columns present: {', '.join(columns)}"
    raise DataError(f"the {name} data has no {missing[0]!r} column", column=missing[0], fix=fix)


def _count_dropped(given, prepared, name: str, why: str, max_length: int | None, *, unit: str = "pairs",
                   needed: bool = True, fix: str | None = None) -> None:  # fmt: skip
    """TRL's drop of the ``unit`` whose prompt fills ``max_length`` (``why``: as TRL decides it), said: a set it
    emptied failed later, deep inside (the sampler's ``num_samples=0``; DPO's precompute's ``torch.cat`` of nothing)
    or, an eval set, gave no eval metrics at all; a part dropped went unsaid. A DataError where none is left and the
    set is ``needed`` (an eval set nothing evaluates is not; ``fix``: its fix where truncation_mode is none), else
    one warning (on the first process)."""
    import datasets

    if not isinstance(given, datasets.Dataset) or not isinstance(prepared, datasets.Dataset):
        return  # (a stream: read as training goes)
    gone = len(given) - len(prepared)
    if gone <= 0:
        return
    if len(prepared) == 0 and needed:
        raise DataError(f"no {unit[:-1]} of the {name} data is left to {'train' if name == 'train' else 'evaluate'} "
                        f"on: all {gone} were dropped, {why}", option=f"{name}_dataset",
                        fix=fix or f"raise max_length (now {max_length}), set truncation_mode='keep_end', or shorten "
                        f"the prompts{'; give each row a completion (a token with a loss)' if unit == 'rows' else ''}"
                        )  # fmt: skip
    if _first_process():
        warnings.warn(f"{name} data: {gone} of {len(given)} {unit} dropped: {why}", stacklevel=4)


def _needed(trainer, name: str, args) -> bool:
    """Whether a set TRL prepares is scored: the train set; an eval set given to ``evaluate()`` (after the
    constructor), or where training evaluates; DPO's precompute of the reference runs on every set."""
    strategy = getattr(args.eval_strategy, "value", args.eval_strategy)
    return (name == "train" or getattr(trainer, "model", None) is not None or str(strategy) != "no"
            or getattr(args, "precompute_ref_log_probs", False))  # fmt: skip


class DPOTrainer(_PredictsRows, _CheckedEvalSets, PackedTokenCount, WatchResume, SavesUserDropout, trl.DPOTrainer):
    """``trl.DPOTrainer`` on fastdpo's packed batches and fused head; the same constructor arguments."""

    _tag_names = (*trl.DPOTrainer._tag_names, "fastdpo")  # (TRL's model card and the model's hub tags)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name: str):
        name = _set_name(dataset_name, getattr(self, "_train_prepared", False))  # (TRL prepares the train set first)
        self._train_prepared = True
        _check_pair_columns(dataset, name)
        prepared = super()._prepare_dataset(dataset, processing_class, args, dataset_name)
        why = f"their prompt fills max_length ({args.max_length} tokens), and TRL drops such pairs under keep_start"
        _count_dropped(dataset, prepared, name, why, args.max_length, needed=_needed(self, name, args))
        return prepared

    def _as_evaluate_prepares(self, dataset):
        if self._is_vision_dataset:
            return dataset
        columns = set(getattr(dataset, "column_names", None) or ())
        needs_reference = self.precompute_ref_logps and "ref_chosen_logps" not in columns  # (given: kept)
        trained = self.state.global_step > 0  # (TRL's evaluate() refuses it too: the policy is no reference now)
        if needs_reference and self.ref_model is None and not is_peft_model(self.model) and trained:
            raise ConfigError(
                "rows given to predict() after training began need their reference log-probs, and "
                "with precompute_ref_log_probs and no ref_model the policy is no longer the reference",
                column="test_dataset",
                fix="predict() on them before training, or pass a ref_model",
            )
        if "prompt_ids" in columns and not {"chosen", "rejected"} <= columns:
            prepared = dataset  # token ids alone: TRL's preparation needs the text (evaluate() fails on them)
        else:  # (TRL's preparation of its own output gives the same ids)
            prepared = self._prepare_dataset(dataset, self.processing_class, self.args, "test")
        if needs_reference:
            size = self.args.precompute_ref_batch_size or self.args.per_device_eval_batch_size
            prepared = self._precompute_ref_logps(prepared, "test", size)
        return prepared

    def __init__(self, model, ref_model=None, args: trl.DPOConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, compute_metrics=None, callbacks=None,
                 optimizers=(None, None), quantization_config=None, peft_config=None) -> None:  # fmt: skip
        args = _from_native(args, DPOConfig)
        _refuse(args, compute_metrics)
        check_best_metric(args, eval_dataset)
        check_collator(data_collator, PairPacker)
        refuse_unsupported_adapter(model, peft_config)
        undispatched(args)
        uncompiled(args)
        check_liger(args)
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         compute_metrics=compute_metrics, callbacks=callbacks, optimizers=optimizers,
                         quantization_config=quantization_config, peft_config=peft_config)  # fmt: skip
        for split, data in (("train", self.train_dataset), ("eval", self.eval_dataset)):
            check_token_ids(data, self.model, split)
            check_positions_as_cut(data, self.model, split, self.args)
        if self.args.disable_dropout:  # (TRL's left the rates attention modules keep as numbers on)
            for module in (self.model, self.ref_model):
                if module is not None:
                    disable_dropout(module)
        if self.args.sync_ref_model and self.ref_model is not None:  # (TRL's error came at the first sync, deep inside)
            unwrap = self.accelerator.unwrap_model
            check_sync_reference(unwrap(self.model), unwrap(self.ref_model))
        if self._is_vision_dataset:
            raise ConfigError("vision datasets are not supported by fastdpo.trl", column="train_dataset",
                              fix="use trl.DPOTrainer for vision-language models")  # fmt: skip
        args = self.args
        self.packed_attention_impl = _attention_of(args)
        self._trl_collator = self.data_collator  # TRL's padded batches: its reference precompute in evaluate()
        if data_collator is None:
            self.data_collator = packer_for(self.model, args, self.packed_attention_impl, self._tokenizer.pad_token_id)
        check_lean_activations(self)
        check_attention_device(self)
        self._displacement = DisplacementWatch(FastDPOConfig.displacement_margin,  # fastdpo's default margin
                                               None if self.loss_config.reference_free else args.beta)  # fmt: skip

    @property
    def loss_config(self):
        """The loss of TRL's attributes as they are now: TRL's loss reads ``beta``, ``loss_types``, ``loss_weights``,
        ``label_smoothing`` and the f-divergence's at every step (a subclass or a callback may change them)."""
        names = ("beta", "loss_weights", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef")
        now = {name: getattr(self, name) for name in names}
        return loss_config_of(SimpleNamespace(**now, loss_type=self.loss_types, discopop_tau=self.args.discopop_tau))

    def training_step(self, model, inputs, num_items_in_batch=None):
        # held across the backward: gradient checkpointing recomputes the layers there (use_attention, lean)
        with use_attention([self.model, self.ref_model], self.packed_attention_impl), lean_layers(self):
            return super().training_step(model, inputs, num_items_in_batch)

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        # TRL's precompute (at init, and for a dataset given to evaluate()), with fastdpo's reference pass on fastdpo's
        # packed batches, as the steps compute the policy's: TRL's padded forward rounded otherwise, and a policy still
        # equal to its reference had margins of ±1e-7 (rewards/accuracies 0.31 at step 1 where TRL's are 0). Under
        # DeepSpeed, TRL's own forward (its inference engine gathers the sharded weights). The constructor's runs
        # before its token-id check of the sets: checked here first (named as the constructor names the sets: TRL's
        # name for a dict's eval set is its key)
        label = _set_name(name, train_prepared=dataset is not self.train_dataset)
        if self.args.disable_dropout:  # (the constructor's precompute runs before its disable_dropout below: a model
            for module in (self.model, getattr(self, "ref_model", None)):  # given in train mode scored its
                if module is not None:  # reference with the attention rates on; margins at step 1 were not 0)
                    disable_dropout(module)
        check_token_ids(dataset, self.model, label)
        check_positions(dataset, self.model, label, self.args.max_length)
        if self.is_deepspeed_enabled:
            collator = getattr(self, "_trl_collator", self.data_collator)
        else:
            collator = packer_for(self.model, self.args, _attention_of(self.args), self._tokenizer.pad_token_id)
        # TRL names its cache file by the dataset's fingerprint and the model's hash alone: a run at another
        # max_length (keep_end, or None), truncation_mode or ld_alpha read the first run's values, silently (step-1
        # margins 11.1 where 0). Those settings join the model's hash here, and the autocast the pass runs under
        # (bf16/fp16: the values differ from fp32's in the fourth digit); and, TRL's hash being the weights' alone,
        # the reference's config and adapters' configs, attention and device (a config field changed at the same
        # path read values 1.57 nats off)
        from datasets.fingerprint import Hasher

        from fastdpo.model.reference_cache import config_fingerprint

        model_hash, args = self._precompute_model_hash, self.args
        saved, self.data_collator = self.data_collator, collator
        reference = self.ref_model if self.ref_model is not None else self.model
        settings = (args.max_length, args.truncation_mode, args.ld_alpha, args.bf16, args.fp16,
                    config_fingerprint(reference), _attention_of(args))  # fmt: skip
        self._precompute_model_hash = Hasher.hash((model_hash, *settings))
        try:
            return super()._precompute_ref_logps(dataset, name, batch_size)
        finally:
            self.data_collator, self._precompute_model_hash = saved, model_hash

    def compute_ref_log_probs(self, model, inputs):
        # (TRL calls it from its precompute only, which runs on fastdpo's packed batches but under DeepSpeed)
        if self.is_deepspeed_enabled:
            return super().compute_ref_log_probs(model, inputs)
        batch = _as_batch(dict(inputs))
        with use_attention([self.model, self.ref_model], _attention_of(self.args)):
            logps = self._reference_logps(self.accelerator.unwrap_model(self.model), batch, precompute=True)
        return logps[:, 0], logps[:, 1]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        warn_no_logits(prediction_loss_only)  # (TRL would return its full logits: predict())
        with use_attention([self.model, self.ref_model], self.packed_attention_impl):
            return super().prediction_step(model, inputs, True, ignore_keys=ignore_keys)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # fastdpo's likelihood-displacement watch on the averages TRL's log is about to write (it clears them after)
        if self.model.training and "loss" in logs:
            watched = {name: sum(values) / len(values) for name, values in self._metrics["train"].items()
                       if name in ("logps/chosen", "rewards/accuracies", "rewards/chosen") and values}  # fmt: skip
            if self._displacement.beta is not None:  # (a callback may anneal beta: rewards / beta now)
                self._displacement.beta = self.beta
            self._displacement.update(watched, learning_rate=self.args.learning_rate, warn=self.is_world_process_zero())
            if "logps/chosen_change" in watched:
                logs["logps/chosen_change"] = watched["logps/chosen_change"]
        super().log(logs, start_time)

    def _compute_loss(self, model, inputs, return_outputs):
        refuse_outputs(return_outputs)
        mode = "train" if self.model.training else "eval"
        inputs = dict(inputs)
        ref_logps = inputs.pop("ref_logps", None)
        if not self.precompute_ref_logps:  # stale columns of an earlier run's precompute, which TRL ignores too
            ref_logps = None
        batch = _as_batch(inputs)
        inner = self.accelerator.unwrap_model(model)
        aux_coef = self.router_aux_loss_coef if self.aux_loss_enabled else 0.0

        def packed_forward(*args, **kwargs):
            return preference_step(inner, batch, self.loss_config, ref_logps=ref_logps, head_impl="auto",
                                   token_metrics=True, aux_loss_coef=aux_coef, ld_alpha=self.ld_alpha,
                                   use_weighting=self.use_weighting)  # fmt: skip

        # (TRL's DPO batches are padded: its padding_free is ignored)
        with neftune_as_trl(inner, batch, padding_free=False, pad_to_multiple_of=self.args.pad_to_multiple_of):
            if ref_logps is None:
                ref_logps = self._reference_logps(inner, batch)
            with self.accelerator.autocast(), forward_as(inner, packed_forward):
                out = model()  # through the DDP/FSDP wrapper (forward_as)
        self._record(out, batch, mode)
        return out.loss

    def _reference_logps(self, inner, batch, *, precompute: bool = False) -> torch.Tensor:
        """``[P, 2]``: TRL's reference for this setup, on the packed batch; ``precompute``: before training, where
        TRL's reference without a ``ref_model`` is the policy itself. Under accelerate's autocast (bf16/fp16), as
        TRL's: its reference's forward is the prepared model's, and its precompute runs in ``accelerator.autocast``."""
        ld_alpha = self.ld_alpha
        with (torch.no_grad(), self.accelerator.autocast(),
              disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs)):  # fmt: skip
            if self.ref_model is not None:
                return reference_logps(self.accelerator.unwrap_model(self.ref_model), batch, ld_alpha=ld_alpha)
            if precompute and not is_peft_model(inner):
                return reference_logps(inner, batch, ld_alpha=ld_alpha)
            if not is_peft_model(inner):
                raise ConfigError("no reference: TRL keeps none here", column="ref_model",
                                  fix="pass ref_model, a peft_config, or precompute_ref_log_probs=True")  # fmt: skip
            # as TRL: a new adapter's reference is the base (adapters off), a re-trained one's its "ref" copy
            with use_adapter(inner, adapter_name="ref" if "ref" in inner.peft_config else None):
                return reference_logps(inner, batch, ld_alpha=ld_alpha)

    def _record(self, out, batch, mode: str) -> None:
        """TRL's metrics of this micro-batch, gathered over processes: one value each, averaged at the next log."""
        # as TRL gathers each: the per-token means as sums over counts, and aux_loss, with gather_for_metrics (at the
        # end of the data it leaves out the processes past its sample count: the pair accelerate repeats); the
        # others (rewards, log-probs) with gather, the processes' mean
        trimmed = [name for name in sorted(out.metrics) if name in out.token_counts or name == "aux_loss"]
        plain = [name for name in sorted(out.metrics) if name not in trimmed]
        device = self.accelerator.device

        def stacked(values: dict, names: list) -> torch.Tensor:
            ones = torch.ones((), device=device)
            return torch.stack([values[name].detach().float().reshape(()).to(device) if name in values else ones
                                for name in names])  # fmt: skip

        values = {}
        if plain:
            gathered = self.accelerator.gather(stacked(out.metrics, plain)[None]).mean(0)
            values.update(zip(plain, gathered.tolist(), strict=True))
        if trimmed:
            means, weights = stacked(out.metrics, trimmed), stacked(out.token_counts, trimmed)  # aux_loss: weight 1
            sums = self.accelerator.gather_for_metrics(torch.stack([means * weights, weights])[None]).sum(0)
            values.update(zip(trimmed, (sums[0] / sums[1].clamp(min=1)).tolist(), strict=True))
        for name in sorted(values):
            self._metrics[mode][name].append(values[name])
        if mode == "train":  # every real token, prompts counted in both sequences of a pair, as TRL counts
            tokens = torch.tensor(batch.input_ids.numel() - batch.num_padding, device=self.accelerator.device)
            self._total_train_tokens += int(self.accelerator.gather_for_metrics(tokens[None]).sum()) // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]


class SFTTrainer(_PredictsRows, _CheckedEvalSets, PackedSFTLoss, PackedTokenCount, ResumeChecks, trl.SFTTrainer):
    """``trl.SFTTrainer`` on fastdpo's packed batches and fused head; the same constructor arguments.

    TRL prepares the dataset (tokenization, its labels, its packing into rows with ``seq_lengths``); the collator
    packs a step's examples without padding between them, and the loss is TRL's (the NLL of every label that is not
    -100 over the optimizer step's labels, ``dft`` too, and ``label_smoothing_factor`` without TRL's second forward:
    ``fastdpo.ops.label_smoothing``) from the fused head (``fastdpo.train.step.sft_step``).
    """

    _tag_names = (*trl.SFTTrainer._tag_names, "fastdpo")  # (TRL's model card and the model's hub tags)

    logs_padding_fraction = False  # TRL's metrics, under TRL's names, and no others

    def _metric_gather(self):
        return self.accelerator.gather_for_metrics  # TRL's (its end-of-data trimming too)

    def _counted_tokens(self, batch) -> int:
        # TRL counts a padding-free batch (its padding_free: the option, or bfd packing) by its flattened row, padded
        # to pad_to_multiple_of (position_ids.size(1)); a padded one by its attention mask (padding excluded)
        real = super()._counted_tokens(batch)
        multiple = self.args.pad_to_multiple_of
        return -(-real // multiple) * multiple if multiple and self.padding_free else real

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name: str):
        name = _set_name(dataset_name, getattr(self, "_train_prepared", False))  # (TRL prepares the train set first)
        self._train_prepared = True
        prepared = super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)
        if not packing:  # (packed, a set's rows are others: TRL keeps the rows cut before their completion there)
            why = (f"no token with a loss (a completion's) is left in them within max_length ({args.max_length} "
                   "tokens), or they had none, and TRL drops such rows")  # fmt: skip
            _count_dropped(dataset, prepared, name, why, args.max_length, unit="rows", needed=_needed(self, name, args))
        return prepared

    def _as_evaluate_prepares(self, dataset):
        if self._skip_prepare_dataset or "seq_lengths" in (getattr(dataset, "column_names", None) or ()):
            return dataset  # (packed by TRL's preparation already, the trainer's own eval set: packed again, its
            # rows' sequences attended to each other's)
        packing = self.args.packing if self.args.eval_packing is None else self.args.eval_packing
        return self._prepare_dataset(dataset, self.processing_class, self.args, packing, self._formatting_func, "test")

    def _aux_loss_trained(self) -> bool:
        # TRL's label-smoothed loss is its smoother's over the logits alone: the aux loss is logged, not trained
        return not (self.args.label_smoothing_factor and self.args.loss_type == "nll")

    def __init__(self, model, args: trl.SFTConfig | None = None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, compute_loss_func=None, compute_metrics=None,
                 callbacks=None, optimizers=(None, None), optimizer_cls_and_kwargs=None,
                 preprocess_logits_for_metrics=None, quantization_config=None, peft_config=None,
                 formatting_func=None) -> None:  # fmt: skip
        args = _from_native(args, SFTConfig)
        check_best_metric(args, eval_dataset)
        refuse_logit_hooks(TRL_FALLBACK, compute_loss_func=compute_loss_func, compute_metrics=compute_metrics,
                           preprocess_logits_for_metrics=preprocess_logits_for_metrics)  # fmt: skip
        check_collator(data_collator, SequencePacker)
        refuse_unsupported_adapter(model, peft_config)
        undispatched(args)
        uncompiled(args)
        check_liger(args)
        with warnings.catch_warnings():  # TRL's says label smoothing costs a second forward: not here
            warnings.filterwarnings("ignore", message="`label_smoothing_factor` is deprecated", category=FutureWarning)
            super().__init__(model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                             eval_dataset=eval_dataset, processing_class=processing_class, callbacks=callbacks,
                             optimizers=optimizers, optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
                             quantization_config=quantization_config, peft_config=peft_config,
                             formatting_func=formatting_func)  # fmt: skip
        for split, data in (("train", self.train_dataset), ("eval", self.eval_dataset)):
            check_token_ids(data, self.model, split)
            check_positions_as_cut(data, self.model, split, self.args)
        if self._is_vision_dataset:
            raise ConfigError("vision datasets are not supported by fastdpo.trl", column="train_dataset",
                              fix="use trl.SFTTrainer for vision-language models")  # fmt: skip
        warn_eval_packing(self.args, stacklevel=2)
        if self.args.label_smoothing_factor:
            check_label_smoothing(self.args.label_smoothing_factor, self.args.loss_type, head_softcap(self.model))
        self.packed_attention_impl = _attention_of(self.args)
        if data_collator is None:
            # TRL's padded rows on a model whose loss transformers does not know as causal count the rows' first
            # labels too, which no position predicts (GPT-2's LMHeadModel: loss 5.705 where the mean is 6.376)
            padded = not self.padding_free  # (TRL's: padding_free, or bfd packing)
            packer = _FirstLabels if padded and not getattr(self, "_loss_shifts_labels", True) else SequencePacker
            self.data_collator = packer(pack_length=_pack_length(self.model, self.args, self.packed_attention_impl),
                                        pad_token_id=self._tokenizer.pad_token_id,
                                        pad_to_multiple_of=self.args.pad_to_multiple_of)  # fmt: skip
        check_lean_activations(self)
        check_attention_device(self)
        self.aux_loss_coef = self.router_aux_loss_coef if self.aux_loss_enabled else 0.0

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        # under skip_prepare_dataset TRL's evaluate() takes a set given there as it is: checked as the constructor's
        # sets are (an IndexError from inside the embedding, before)
        if self._skip_prepare_dataset and eval_dataset is not None and not isinstance(eval_dataset, str):
            check_token_ids(eval_dataset, self.model, "eval")
            check_positions(eval_dataset, self.model, "eval", None, as_given=True)
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)


class _FirstLabels(SequencePacker):
    """``SequencePacker`` whose batches also say how many rows have a first label that is not -100, for the loss's
    divisor as TRL's padded batches count it where transformers' ``_loss_shifts_labels`` is False: every label, the
    first of each row too (``PackedSFTLoss._get_num_items_in_batch`` adds them)."""

    def __call__(self, examples: list[dict]) -> dict:
        fields = super().__call__(examples)
        labels = [example["input_ids"] if example.get("labels") is None else example["labels"] for example in examples]
        fields["first_labels"] = torch.tensor(sum(len(row) > 0 and int(row[0]) != -100 for row in labels))
        return fields


# TRL's experimental ORPO and CPO trainers' drop-ins (their own module: TRL's classes are others)
from fastdpo.trl_experimental import CPOTrainer, ORPOTrainer  # noqa: E402

__all__ = ["CPOTrainer", "DPOConfig", "DPOTrainer", "ORPOTrainer", "SFTConfig", "SFTTrainer"]
