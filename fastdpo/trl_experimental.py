"""Drop-ins for TRL 1.16's reference-free pair trainers: change one import, keep the script.

    from fastdpo.trl import ORPOTrainer       # was: from trl.experimental.orpo import ORPOTrainer
    from fastdpo.trl import CPOTrainer        # was: from trl.experimental.cpo import CPOTrainer (SimPO, AlphaPO)
    from trl.experimental.orpo import ORPOConfig      # unchanged, as every other argument

Both are subclasses of TRL's trainers: TRL's constructor does everything it does (the prompt taken out of the
pairs, the chat template, its own tokenization into ``chosen_input_ids`` / ``chosen_labels`` with the prompt's labels
-100, its truncation, PEFT, dropout), and TRL's ``get_batch_loss_metrics`` computes the loss and logs the metrics
(``odds_ratio_loss``, ``cpo_loss`` with every CPO loss type, ``label_smoothing``, ``simpo_gamma`` and AlphaPO's
``alpha``). Two things are replaced, on the instance only:

- the collator: a batch's pairs packed without padding (``fastdpo.train.dpo.PairPacker`` on TRL's sequences; the
  Trainer's sampler picks the same pairs per step as TRL's);
- ``concatenated_forward``: the packed body and the fused head (no ``[tokens, vocab]`` logits) give what TRL's
  forward gives: each sequence's completion log-prob, summed or averaged as the trainer takes it (ORPO: averaged;
  CPO: averaged for ``ipo`` and ``simpo``), the chosen NLL (ORPO: every next token of prompt + chosen; CPO: the
  chosen completions', 0 where ``cpo_alpha`` is 0), a mixture-of-experts model's router loss, and the mean logits.

Differences from TRL: ``logits/chosen`` and ``logits/rejected`` are the mean logit over the completion tokens (TRL's
averages every position of its padded batch, padding included, so its value changes with the batch's padding);
pairs whose completion TRL's truncation emptied (the prompt fills ``max_length``) are dropped with a warning (TRL
trains on them: ORPO's mean log-prob of no token is NaN), in the constructor's sets and in those given to
``evaluate()``/``predict()``; ``disable_dropout`` zeroes attention modules' rates too (``fastdpo.train.dropout``, as
the DPO drop-in). Refused with a ``ConfigError``: ``compute_metrics`` and ``preprocess_logits_for_metrics`` (they
need the full logits), ``generate_during_eval``, prompt-learning adapters, encoder-decoder models, a
``data_collator`` other than fastdpo's packer.
"""

from __future__ import annotations

import warnings

with warnings.catch_warnings():  # (TRL warns at the first import from trl.experimental: the drop-in is not)
    warnings.filterwarnings("ignore", message="You are importing from 'trl.experimental'")
    from trl.experimental.cpo import CPOConfig
    from trl.experimental.cpo import CPOTrainer as _TRLCPOTrainer
    from trl.experimental.orpo import ORPOConfig
    from trl.experimental.orpo import ORPOTrainer as _TRLORPOTrainer

from fastdpo.data.packing import IGNORE_INDEX, default_pack_length
from fastdpo.data.vocabulary import check_token_ids
from fastdpo.errors import ConfigError
from fastdpo.model import packed_body, run_head
from fastdpo.model.adapters import refuse_head_adapter, refuse_unsupported_adapter
from fastdpo.model.attention import attends_per_sequence
from fastdpo.model.hooks import forward_as
from fastdpo.model.moe import moe_aux_loss
from fastdpo.ops import linear_logprobs
from fastdpo.ops.segments import pair_segments, segment_sum
from fastdpo.train.common import PackedTokenCount, check_collator, check_liger, neftune_as_trl, uncompiled, undispatched
from fastdpo.train.dpo import PairPacker, _as_batch
from fastdpo.train.dropout import SavesUserDropout, disable_dropout
from fastdpo.train.resume import ResumeChecks
from fastdpo.train.step import _head_options, with_chosen_prompts


def pair_pass(model, batch, *, average: bool, nll: str | None, aux: bool = False) -> dict:
    """What TRL's ORPO/CPO ``concatenated_forward`` computes, on a packed batch: ``chosen``/``rejected`` ``[P]`` the
    completions' log-probs (``average``: per token), ``nll`` the chosen sequences' token-mean NLL (``"prompt"``: every
    next token of prompt + chosen, ORPO's; ``"completion"``: the chosen completions', CPO's; None: 0), the mean logit
    over the chosen and the rejected completions' tokens (detached), and ``aux_loss`` (unweighted) where ``aux``."""
    body = packed_body(model, batch, output_router_logits=aux)
    device = body.hidden.device
    targets = batch.targets.reshape(-1).to(device)
    completion = targets != IGNORE_INDEX
    scored = with_chosen_prompts(batch, targets) if nll == "prompt" else targets

    def head(states, spec):
        out = linear_logprobs(states, spec.weight, scored, impl="auto", outputs=("logp", "mean_logit"),
                              **_head_options(spec))  # fmt: skip
        return out.logp, out

    logp, per_token = run_head(model, head, body.hidden)
    cu_seqlens = batch.cu_seqlens.to(device)
    pairs = pair_segments(cu_seqlens, batch.seq_pair.to(device), batch.seq_is_chosen.to(device))
    sums = segment_sum(logp * completion, cu_seqlens)[pairs]
    counts = segment_sum(completion.to(logp.dtype), cu_seqlens)[pairs]
    logps = sums / counts if average else sums  # (no empty completion: the trainers drop such pairs)
    logits = segment_sum(per_token.mean_logit.detach() * completion, cu_seqlens)[pairs].sum(0) / counts.sum(0)
    if nll == "prompt":
        chosen_nll = -segment_sum(logp, cu_seqlens)[pairs[:, 0]].sum()
        chosen_nll = chosen_nll / segment_sum((scored != IGNORE_INDEX).to(logp.dtype), cu_seqlens)[pairs[:, 0]].sum()
    elif nll == "completion":
        chosen_nll = -sums[:, 0].sum() / counts[:, 0].sum()
    else:
        chosen_nll = logp.new_zeros(())
    out = {"chosen": logps[:, 0], "rejected": logps[:, 1], "logits": logits, "nll": chosen_nll}
    if aux:
        out["aux_loss"] = moe_aux_loss(model, body.router_logits, batch)
    return out


TRL_ID_COLUMNS = ("chosen_input_ids", "rejected_input_ids")  # TRL's ORPO/CPO sequences (the prompt in each)


def _has_completions(row: dict) -> bool:
    """Both sides keep a completion token that a position predicts (labels past the first that are not -100)."""
    return all(any(label != IGNORE_INDEX for label in row[f"{side}_labels"][1:]) for side in ("chosen", "rejected"))


class _PackedPairTrainer(PackedTokenCount, ResumeChecks, SavesUserDropout):
    """What the two drop-ins share: TRL's constructor, then the packer and the packed forward."""

    def _average(self) -> bool:  # pair_pass's ``average``
        raise NotImplementedError

    def _nll(self) -> str | None:  # pair_pass's ``nll``
        raise NotImplementedError

    def __init__(self, model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, model_init=None, callbacks=None, optimizers=(None, None),
                 preprocess_logits_for_metrics=None, peft_config=None, compute_metrics=None) -> None:  # fmt: skip
        name = type(self).__name__
        for option, value in (("compute_metrics", compute_metrics),
                              ("preprocess_logits_for_metrics", preprocess_logits_for_metrics)):  # fmt: skip
            if value is not None:
                raise ConfigError(f"needs the full logits, which fastdpo.trl.{name} never builds", column=option,
                                  fix=f"leave it unset, or use TRL's own {name} for this run")  # fmt: skip
        check_collator(data_collator, PairPacker)
        refuse_unsupported_adapter(model, peft_config)
        if args is not None:
            if args.generate_during_eval:
                raise ConfigError(f"is not supported by fastdpo.trl.{name}", column="generate_during_eval",
                                  fix=f"leave it False, or use TRL's own {name} for this run")  # fmt: skip
            undispatched(args)
            uncompiled(args)
            check_liger(args)
        super().__init__(model=model, args=args, data_collator=None, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, model_init=model_init,
                         callbacks=callbacks, optimizers=optimizers, peft_config=peft_config)  # fmt: skip
        refuse_head_adapter(self.accelerator.unwrap_model(self.model))  # (TRL's takes it: the first step failed)
        if self.is_encoder_decoder:
            raise ConfigError(f"encoder-decoder models are not supported by fastdpo.trl.{name}", column="model",
                              fix=f"use TRL's own {name} for this model")  # fmt: skip
        if self.args.disable_dropout:  # (TRL's leaves the rates attention modules keep as numbers on)
            disable_dropout(self.model)
        self.train_dataset = self._with_completions(self.train_dataset, "train")
        if isinstance(self.eval_dataset, dict):
            self.eval_dataset = {key: self._with_completions(data, f"eval_{key}")
                                 for key, data in self.eval_dataset.items()}  # fmt: skip
        elif self.eval_dataset is not None:
            self.eval_dataset = self._with_completions(self.eval_dataset, "eval")
        for split, data in (("train", self.train_dataset), ("eval", self.eval_dataset)):
            check_token_ids(data, self.model, split, columns=TRL_ID_COLUMNS)  # (TRL's: an IndexError, deep inside)
        if data_collator is None:
            attention = getattr(self.accelerator.unwrap_model(self.model).config, "_attn_implementation", None)
            one_row = attends_per_sequence(attention or "sdpa")
            data_collator = PairPacker(pack_length=None if one_row else default_pack_length(self.max_length,
                                                                                          attention or "sdpa"),
                                       max_length=None, truncation_mode="keep_start", pad_token_id=self._pad_id(),
                                       one_row=one_row)  # fmt: skip
        self.data_collator = data_collator

    def _pad_id(self) -> int:
        """The id of padding positions (never a target): TRL's own (ORPO's ``padding_value``, CPO's pad token)."""
        for value in (getattr(self, "padding_value", None), getattr(self, "pad_token_id", None)):
            if value is not None:
                return int(value)
        return 0

    def _with_completions(self, dataset, name: str):
        """``dataset`` without the pairs TRL's truncation left no completion token in, said in a warning; a
        DataError where none is left."""
        import datasets

        from fastdpo.trl import _count_dropped  # (fastdpo.trl imports this module)

        if not isinstance(dataset, datasets.Dataset):
            return dataset.filter(_has_completions) if dataset is not None else None  # (a stream: as it is read)
        kept = dataset.filter(_has_completions)
        why = f"their prompt fills max_length ({self.max_length} tokens), which leaves no completion token to score"
        _count_dropped(dataset, kept, name, why, self.max_length, fix="raise max_length, or shorten the prompts")
        return kept

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        # a tokenized set given here: its emptied pairs dropped as the constructor drops them (the packer refused the
        # first, naming fastdpo's own tokenizer as the fix; TRL's evaluate() gave a NaN loss)
        return super().evaluate(self._given_set(eval_dataset), ignore_keys=ignore_keys,
                                metric_key_prefix=metric_key_prefix)  # fmt: skip

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix: str = "test"):
        return super().predict(self._given_set(test_dataset, "test"), ignore_keys=ignore_keys,
                               metric_key_prefix=metric_key_prefix)  # fmt: skip

    def _given_set(self, dataset, name: str = "eval"):
        columns = getattr(dataset, "column_names", None)
        if isinstance(dataset, dict):
            return {key: self._given_set(part, f"{name}_{key}") for key, part in dataset.items()}
        return self._with_completions(dataset, name) if columns and "chosen_labels" in columns else dataset

    def concatenated_forward(self, model, batch):
        inner = self.accelerator.unwrap_model(model)
        packed = _as_batch({name: value for name, value in batch.items() if name != "ref_logps"})
        aux = bool(self.aux_loss_enabled)

        def forward(*args, **kwargs):
            return pair_pass(inner, packed, average=self._average(), nll=self._nll(), aux=aux)

        # (NEFTune's noise as on TRL's padded batch, whose rows are as long as the longest sequence)
        with neftune_as_trl(inner, packed, padding_free=False), self.accelerator.autocast(), forward_as(inner, forward):
            out = model()  # through the DDP/FSDP wrapper (forward_as)
        logits = out["logits"]
        result = (out["chosen"], out["rejected"], logits[0], logits[1], out["nll"])
        return (*result, out["aux_loss"]) if aux else result


class ORPOTrainer(_PackedPairTrainer, _TRLORPOTrainer):
    """``trl.experimental.orpo.ORPOTrainer`` on fastdpo's packed batches and fused head; the same arguments."""

    _tag_names = (*_TRLORPOTrainer._tag_names, "fastdpo")

    def _average(self) -> bool:
        return True

    def _nll(self) -> str | None:
        return "prompt"


class CPOTrainer(_PackedPairTrainer, _TRLCPOTrainer):
    """``trl.experimental.cpo.CPOTrainer`` (CPO, SimPO, AlphaPO) on fastdpo's packed batches and fused head; the
    same arguments."""

    _tag_names = (*_TRLCPOTrainer._tag_names, "fastdpo")

    def _average(self) -> bool:
        return self.loss_type in ("ipo", "simpo")

    def _nll(self) -> str | None:
        return None if self.cpo_alpha == 0 else "completion"


__all__ = ["CPOConfig", "CPOTrainer", "ORPOConfig", "ORPOTrainer"]
