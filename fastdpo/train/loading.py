"""Loading what the trainers are given by name: the model (TRL's dtype rules; an adapter folder as a trainable
``PeftModel``), its tokenizer, and TRL's ``quantization_config`` argument."""

from __future__ import annotations

import functools
import importlib.util
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from fastdpo.errors import ConfigError, offline_hint

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
_HUB_PART = r"[A-Za-z0-9][\w.-]*"
HUB_NAME = re.compile(rf"(?:{_HUB_PART}/)?{_HUB_PART}")  # name or org/name: what the hub can hold
HUB_ID = re.compile(rf"{_HUB_PART}/{_HUB_PART}")  # org/name: a hub id's shape


def refuse_missing_folder(name_or_path: str, column: str) -> None:
    """A ``ConfigError`` naming the folder for a name that is no folder here and cannot be a hub name either
    (``./model``, ``runs/a/b``, ``/abs/x``): transformers reads it as a malformed hub id ("Repo id must ...")."""
    if Path(name_or_path).exists() or HUB_NAME.fullmatch(name_or_path):
        return
    fix = f"check the path (a relative one is read from {os.getcwd()}), or give a hub name"
    raise ConfigError(f"there is no folder {os.path.abspath(name_or_path)}", column=column, fix=fix)


def load_causal_lm(name_or_path: str, init_kwargs: dict | None, *, trust_remote_code: bool, column: str) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(name_or_path, **init_kwargs)`` with TRL's dtype rules. A local folder
    of a PEFT adapter (``adapter_config.json``: a LoRA run's output) is loaded as a ``PeftModel`` on its base, its
    adapter trainable for the policy (``column="model"``), frozen for a reference: transformers' own loading attached
    it frozen to a plain model, which then trained nothing, or lost it under a new ``peft_config``."""
    from transformers import AutoModelForCausalLM

    refuse_missing_folder(name_or_path, column)
    adapter = is_adapter_folder(name_or_path)
    weights = [f for f in ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
               if (Path(name_or_path) / f).is_file()]  # fmt: skip
    if adapter and weights:  # (an --overwrite of an older fastdpo)
        raise ConfigError(f"{name_or_path} holds both a full model ({weights[0]}) and an adapter "
                          "(adapter_config.json): which one is the run's is not known", column=column,
                          fix="remove the files of the run it does not hold, or give the run's folder")  # fmt: skip
    load = AutoModelForCausalLM.from_pretrained
    if adapter:
        if importlib.util.find_spec("peft") is None:
            raise ConfigError(f"{name_or_path} holds a PEFT adapter, which needs the peft package", column=column,
                              fix="pip install 'fastdpo[peft]'")  # fmt: skip
        load = functools.partial(_from_adapter, trainable=column == "model")

    kwargs = dict(init_kwargs or {})
    if "torch_dtype" in kwargs:  # transformers' old name, which TRL 1.16 leaves to it: under TRL's float32 it is lost
        if "dtype" in kwargs:
            raise ConfigError("sets both dtype and torch_dtype, its deprecated name", column="model_init_kwargs",
                              fix="keep dtype only")  # fmt: skip
        message = (f"model_init_kwargs: torch_dtype is the deprecated name of dtype; loading with dtype="
                   f"{kwargs['torch_dtype']!r} (TRL 1.16 loads float32 regardless)")  # fmt: skip
        warnings.warn(message, FutureWarning, stacklevel=3)
        kwargs["dtype"] = kwargs.pop("torch_dtype")
    dtype = kwargs.get("dtype", "float32")
    if isinstance(dtype, str) and dtype in DTYPES:
        dtype = DTYPES[dtype]
    elif not (isinstance(dtype, torch.dtype) or dtype in ("auto", None)):
        raise ConfigError(
            f"dtype {dtype!r} is not a dtype",
            column="model_init_kwargs",
            fix=f"use a torch.dtype or one of {', '.join(map(repr, [*DTYPES, 'auto']))}",
        )
    kwargs["dtype"] = dtype
    kwargs.setdefault("trust_remote_code", trust_remote_code)
    try:
        return load(name_or_path, **kwargs)
    except ImportError as error:  # a package the model needs: flash-attn for its attn_implementation, or its code's
        attention = "attn_implementation" in kwargs
        raise ConfigError(
            f"cannot load a model from {name_or_path!r}: {str(error).splitlines()[0]}",
            column="model_init_kwargs" if attention else column,
            fix="install it" + (", or set attn_implementation to 'sdpa' or 'eager'" if attention else ""),
        ) from error
    except TypeError as error:  # a model_init_kwargs key the model's __init__ does not take (a typo: dtpye)
        if "unexpected keyword argument" not in str(error):
            raise
        raise ConfigError(f"cannot load a model from {name_or_path!r}: {str(error).splitlines()[0]}",
                          column="model_init_kwargs", fix="fix or remove that key") from None  # fmt: skip
    except (OSError, ValueError) as error:  # not a directory with a config, not a valid hub name, or unreachable
        fix = "pass a directory written by save_pretrained, a hub name, or a model object"
        if "custom code" in str(error) and not kwargs["trust_remote_code"]:  # off unless asked: never run it unasked
            fix = f"read the code in {name_or_path}; if you trust it, set trust_remote_code=True"
        if "attn_implementation" in str(error) and "attn_implementation" in kwargs:  # the path is fine
            column, fix = "model_init_kwargs", ("set attn_implementation to 'sdpa' or 'eager' (or an attention "
                                                "kernel that is installed: flash_attention_2, flex_attention), or "
                                                "leave it out")  # fmt: skip
        raise ConfigError(
            f"cannot load a model from {name_or_path!r} ({error.__class__.__name__}: {str(error).splitlines()[0]})",
            column=column,
            fix=fix + offline_hint(error),
        ) from error


def with_quantization(model, init_kwargs: dict | None, quantization_config) -> dict | None:
    """``model_init_kwargs`` with TRL's ``quantization_config`` trainer argument merged in (for a model the trainer
    loads by name or path); a ``ConfigError`` for a model object (it is loaded already, as TRL refuses it) or for a
    quantization set in both places."""
    if quantization_config is None:
        return init_kwargs
    if not isinstance(model, str):
        raise ConfigError(
            "the model is loaded already; quantization applies when the trainer loads it",
            column="quantization_config",
            fix="pass the model's name or path, or load it quantized (from_pretrained(..., quantization_config=...)) "
            "and pass quantization_config=None",
        )
    kwargs = dict(init_kwargs or {})
    if "quantization_config" in kwargs:
        raise ConfigError("is set both as a trainer argument and in model_init_kwargs", column="quantization_config",
                          fix="set it in one place, preferably the trainer argument")  # fmt: skip
    kwargs["quantization_config"] = quantization_config
    return kwargs


def load_tokenizer(model: nn.Module | str, column: str = "processing_class", *, revision: str | None = None,
                   trust_remote_code: bool = False):  # fmt: skip
    """The tokenizer saved with ``model`` (a path, or a model loaded from one), as TRL finds it when none is given:
    at the ``revision`` the model was loaded at (``model_init_kwargs``'), with the config's ``trust_remote_code``."""
    from transformers import AutoTokenizer

    source = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
    if not source:
        raise ConfigError("a tokenizer is needed to tokenize the dataset", column=column, fix="pass processing_class")
    try:
        return AutoTokenizer.from_pretrained(source, revision=revision, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"no tokenizer was given and none could be loaded from {source!r}",
            column=column,
            fix="pass processing_class=tokenizer",
        ) from error


def _from_adapter(path, *, trainable: bool, **kwargs) -> nn.Module:
    """peft's ``AutoPeftModelForCausalLM.from_pretrained`` (the base model's arguments in ``kwargs``), the adapter
    ``is_trainable`` or not; a base it cannot find named with the fix."""
    from peft import AutoPeftModelForCausalLM

    try:
        return AutoPeftModelForCausalLM.from_pretrained(path, is_trainable=trainable, **kwargs)
    except (OSError, ValueError) as error:
        base = adapter_base(path)
        if base is None or Path(base).exists():
            raise
        raise OSError(
            f"its adapter's base model {base!r} (base_model_name_or_path in adapter_config.json) "
            "cannot be loaded from here: a relative path is relative to where that run started, "
            f"a hub name needs the hub ({type(error).__name__}: {str(error)[:120]})"
        ) from error


def is_adapter_folder(path) -> bool:
    """Whether ``path`` is a folder holding a PEFT adapter (``adapter_config.json``: a LoRA run's output)."""
    return Path(path, "adapter_config.json").is_file()


def adapter_base(path) -> str | None:
    """The ``base_model_name_or_path`` that the adapter folder ``path``'s ``adapter_config.json`` names, if any."""
    import json

    try:
        base = json.loads((Path(path) / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):  # (no file, no JSON, no JSON object)
        return None
    return base if isinstance(base, str) and base else None
