"""What ``SFTTrainer``'s constructor checks and sets up: options it refuses, special tokens, the training chat
template, the MoE aux loss, the pack length, tokenized and packed datasets given to it."""

from __future__ import annotations

import warnings

import datasets
from torch import nn

from fastdpo.data.packing import ROW_ATTENTION
from fastdpo.data.sft import label_masks, labels_from_masks
from fastdpo.errors import ConfigError, DataError
from fastdpo.model.moe import router_aux_loss_coef
from fastdpo.model.packed import head_softcap
from fastdpo.train.common import refuse_context_parallel, set_pad_token
from fastdpo.train.sft_config import SFTConfig, check_label_smoothing


def refuse_logit_hooks(fix_suffix: str = "", **hooks) -> None:
    """``ConfigError`` naming the first of ``hooks`` that is set: each needs the logits fastdpo never builds."""
    for name, value in hooks.items():
        if value is not None:
            raise ConfigError("is not supported: fastdpo never builds the [tokens, vocab] logits it would need",
                              column=name, fix=f"pass {name}=None{fix_suffix}")  # fmt: skip


def _refuse_unsupported(model, args, train_dataset, processing_class, compute_loss_func, compute_metrics,
                        preprocess_logits_for_metrics) -> None:  # fmt: skip
    if args.label_smoothing_factor:
        check_label_smoothing(args.label_smoothing_factor, args.loss_type, head_softcap(model))
    refuse_logit_hooks(compute_loss_func=compute_loss_func, compute_metrics=compute_metrics,
                       preprocess_logits_for_metrics=preprocess_logits_for_metrics)  # fmt: skip
    if train_dataset is None:
        raise ConfigError("a training dataset is required", column="train_dataset")
    if processing_class is None:
        raise ConfigError("a tokenizer is needed to tokenize the dataset", column="processing_class")
    if not hasattr(processing_class, "get_vocab"):
        fix = "pass the tokenizer (processors of vision-language models are not supported yet)"
        raise ConfigError(f"expected a tokenizer, got {type(processing_class).__name__}", column="processing_class",
                          fix=fix)  # fmt: skip
    refuse_context_parallel(getattr(args, "parallelism_config", None))  # (before the Trainer builds on it)
    checkpointing = args.gradient_checkpointing_kwargs or {}
    if checkpointing.get("selective"):
        raise ConfigError("selective activation checkpointing is not supported yet",
                          column="gradient_checkpointing_kwargs", fix="drop the 'selective' key")  # fmt: skip
    checkpointing.pop("selective", None)


def warn_untrained_stop(tokenizer, template: str | None) -> None:
    """A warning where ``assistant_only_loss`` would never train the end of an assistant turn: a template whose
    ``{% generation %}`` span ends before the end-of-turn token (it is given to the next message), found by rendering
    a user, assistant, user exchange and reading the last masked token that is not whitespace (TRL 1.16 warns so too;
    the loss looks healthy, the model never learns to stop)."""
    from jinja2 import TemplateError

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"}]  # fmt: skip
    try:
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True, chat_template=template)  # fmt: skip
    except (TemplateError, TypeError, ValueError):  # (no template: the rows' preparation says what is missing)
        return
    masked = [token for token, kept in zip(out["input_ids"], out.get("assistant_masks") or [], strict=False) if kept]
    last = next((token for token in reversed(masked) if tokenizer.decode([token]).strip()), None)
    if last is None or last in set(tokenizer.get_added_vocab().values()):
        return
    warnings.warn(
        "assistant_only_loss: the chat template's {% generation %} span ends before the assistant turn's "
        "end-of-turn token, so the model never learns to stop (the loss looks healthy). Put the token "
        "inside {% generation %}...{% endgeneration %}, or set assistant_only_loss=False",
        stacklevel=3,
    )


def _set_special_tokens(model: nn.Module, tokenizer, args: SFTConfig, *, set_pad: bool) -> None:
    """TRL's handling of ``eos_token``, ``pad_token`` and ``chat_template_path`` (on the tokenizer and the model)."""
    vocab = tokenizer.get_vocab()
    text_config = model.config.get_text_config()
    generation = getattr(model, "generation_config", None)
    if args.eos_token is not None:
        if args.eos_token not in vocab:
            raise ConfigError(f"{args.eos_token!r} is not in the tokenizer's vocabulary", column="eos_token")
        tokenizer.eos_token = args.eos_token
        text_config.eos_token_id = tokenizer.eos_token_id
        if generation is not None:  # several EOS ids may stop generation: add this one
            ids = generation.eos_token_id
            ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
            if tokenizer.eos_token_id not in ids:
                generation.eos_token_id = [tokenizer.eos_token_id, *ids]
    if args.chat_template_path is not None:
        with open(args.chat_template_path, encoding="utf-8") as file:
            tokenizer.chat_template = file.read()
    if set_pad:  # after eos_token: the pad falls back to the EOS set here
        set_pad_token(model, tokenizer, args.pad_token, mirror=True)


def training_template(tokenizer, assistant_only_loss: bool) -> str | None:
    """TRL's training template for ``assistant_only_loss`` where the tokenizer's has no ``{% generation %}`` markers
    (TRL's ``get_training_chat_template``: Qwen2.5/3, Llama 3, Gemma, Phi-3, ... with the markers added), as TRL's
    SFTTrainer swaps it in; None (the tokenizer's own) otherwise, or where TRL is not installed."""
    template = getattr(tokenizer, "chat_template", None)
    if not assistant_only_loss or not isinstance(template, str):
        return None
    try:
        from trl.chat_template_utils import get_training_chat_template, has_generation_markers
    except ImportError:
        return None
    if has_generation_markers(template):
        return None
    try:
        return get_training_chat_template(tokenizer)
    except ValueError:  # (a template TRL has no training version of: the rows' check names what is missing)
        return None


def _enable_router_aux_loss(model: nn.Module, args: SFTConfig) -> float:
    """The aux-loss weight (0: none); the model's config says so too, as TRL sets it (and saves it)."""
    coef = router_aux_loss_coef(model, args.router_aux_loss_coef)
    text_config = model.config.get_text_config()
    if hasattr(text_config, "router_aux_loss_coef"):
        text_config.output_router_logits = bool(coef)
        text_config.router_aux_loss_coef = coef
    return coef


def _pack_length(model: nn.Module, args: SFTConfig, attention: str | None = None) -> int | None:
    """Row capacity for unpacked steps (``pack_sft`` raises it to the longest sequence of a step), for the attention
    the steps run with (None: the model's own)."""
    pack_length = getattr(args, "pack_length", None)  # fastdpo's option; TRL's SFTConfig has none
    if pack_length is not None or args.max_length is None:
        return pack_length
    attention = attention or getattr(model.config, "_attn_implementation", None) or "sdpa"
    # eager/sdpa attend over whole rows (cost ∝ row length²): rows as long as the step's longest sequence (None), as
    # TRL's padded ones; max_length rows made 64 sequences of ~15 tokens one 954-token row, 2.2x the quickstart SFT
    # steps' time. Kernels that work per sequence (flash, flex, fastdpo_varlen) lose nothing with long rows.
    return None if attention in ROW_ATTENTION else max(args.max_length, 4096)


def _label_tokenized(dataset: datasets.Dataset, completion_only_loss: bool, num_proc: int | None):
    """A tokenized dataset without ``labels`` gets TRL's: ``input_ids`` with -100 outside its mask columns."""
    names = dataset.column_names
    if "labels" in names:
        return dataset
    masks = label_masks(names, completion_only_loss)
    return dataset.map(lambda example: {"labels": labels_from_masks(example, masks)}, remove_columns=masks,
                       num_proc=num_proc)  # fmt: skip


def _check_packed_rows(dataset: datasets.Dataset, name: str, max_length: int | None) -> datasets.Dataset:
    """A dataset packed before (``seq_lengths``: fastdpo's, or TRL's ``pack_dataset``) is trained on as it is, each
    sequence attending to itself; a row longer than ``max_length`` is a ``DataError`` (it was trained on whole)."""
    if max_length is None:
        return dataset
    import pyarrow.compute as pc

    rows = dataset.select_columns(["input_ids"]).with_format("arrow")
    for start, batch in zip(range(0, len(dataset), 4096), rows.iter(4096), strict=False):
        lengths = pc.list_value_length(batch["input_ids"]).to_numpy(zero_copy_only=False)
        longer = (lengths > max_length).nonzero()[0]
        if len(longer):
            raise _packed_too_long(name, int(lengths[longer[0]]), max_length, start + int(longer[0]))
    return dataset


def _packed_too_long(name: str, length: int, max_length: int, row: int) -> DataError:
    return DataError(f"a {name} row packed before, of {length} tokens, longer than max_length {max_length}: packed "
                     "rows are trained on as they are", row=row, column="seq_lengths",
                     fix="pack them with max_length at most this max_length, raise max_length, or give the rows "
                     "unpacked (without seq_lengths)")  # fmt: skip


def _packed_row_fits(row: dict, index: int, *, name: str, max_length: int) -> dict:
    """``_check_packed_rows`` for one row of a stream, as it is read (a map's function: no change)."""
    if len(row["input_ids"]) > max_length:
        raise _packed_too_long(name, len(row["input_ids"]), max_length, index)
    return {}


def _check_prepared(dataset, name: str, names: list[str]):
    if "input_ids" not in names:
        raise DataError(
            "skip_prepare_dataset needs tokenized rows",
            column="input_ids",
            fix=f"add 'input_ids' (and 'labels') to the {name} dataset, or drop skip_prepare_dataset",
        )
    if "labels" not in names and {"completion_mask", "assistant_masks"} & set(names):
        raise DataError(
            "has mask columns but no 'labels': skip_prepare_dataset would train on every token",
            column="labels",
            fix="add a 'labels' column (-100 where no loss) or drop skip_prepare_dataset",
        )
    return dataset
