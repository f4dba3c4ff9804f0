"""How ``fastdpo dpo|sft`` reads its YAML and flag values (``fastdpo.cli``'s, apart for its length): the YAML loader
(YAML 1.2 scalars, keys set twice refused), the annotations' scalar check, transformers' deprecated names, the hints
for a key of the other command, and argparse's types for list, dict and nullable flags."""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path

from fastdpo.errors import ConfigError


def _unique_keys_loader(path: Path):
    """A safe YAML loader that refuses a key set twice in one mapping (PyYAML keeps the last silently), and reads
    scalars as YAML 1.2 does: only true/false are booleans (``save_strategy: no`` is the string "no", not False),
    ``1e-3`` is a number (PyYAML's YAML 1.1 read it as a string inside a mapping), ``0755`` is 755."""
    from collections.abc import Hashable

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    replaced = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
    resolvers = yaml.SafeLoader.yaml_implicit_resolvers
    Loader.yaml_implicit_resolvers = {first: [(tag, rx) for tag, rx in found if tag not in replaced]
                                      for first, found in resolvers.items()}  # fmt: skip
    number = r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)"
    for tag, pattern, first in (("bool", r"true|True|TRUE|false|False|FALSE", "tTfF"),
                                ("int", r"[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+", "-+0123456789"),
                                ("float", number, "-+0123456789.")):  # fmt: skip
        Loader.add_implicit_resolver(f"tag:yaml.org,2002:{tag}", re.compile(f"^(?:{pattern})$"), list(first))

    def integer(loader, node):  # (PyYAML's reads a leading 0 as octal: 0755 → 493)
        text = loader.construct_scalar(node)
        return int(text, 0) if text[:2] in ("0o", "0x") else int(text, 10)

    Loader.add_constructor("tag:yaml.org,2002:int", integer)

    def mapping(loader, node):
        lines = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' merges a mapping in, to override it
                continue
            key = loader.construct_object(key_node)
            if not isinstance(key, Hashable):  # ('? [a, b]': a list as a key)
                raise yaml.constructor.ConstructorError(None, None, f"a {type(key).__name__} as a key",
                                                        key_node.start_mark)  # fmt: skip
            if key in lines:
                raise ConfigError(f"{path} sets {key!r} twice (lines {lines[key]} and {key_node.start_mark.line + 1})",
                                  column="config", fix="keep one of them")  # fmt: skip
            lines[key] = key_node.start_mark.line + 1
        return loader.construct_mapping(node)

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return Loader


_SCALARS = {"int": int, "float": float, "str": str, "bool": bool, "<class'int'>": int, "<class'float'>": float,
            "<class'str'>": str, "<class'bool'>": bool, "None": type(None), "NoneType": type(None)}  # fmt: skip


def _other_command(key: str, config_cls) -> str | None:
    """A hint for a key of the other command's config (beta in an SFT run, dataset_text_field in a DPO run)."""
    from fastdpo.train import DPOConfig, SFTConfig

    other = SFTConfig if config_cls.__name__ == "DPOConfig" else DPOConfig
    if key in {f.name for f in dataclasses.fields(other)} - {f.name for f in dataclasses.fields(config_cls)}:
        command, this = ("sft", "dpo") if other is SFTConfig else ("dpo", "sft")
        return f"a field of fastdpo {command}, not of fastdpo {this}: remove it"
    return None


# transformers 5's deprecated names: the new name wins where both are set, so a saved config.yaml (which records both)
# ignored a --gradient_checkpointing flag and an edit of that key, silently
_ALIASES = (("gradient_checkpointing", "activation_checkpointing"),
            ("gradient_checkpointing_kwargs", "activation_checkpointing_kwargs"))  # fmt: skip


def _aliases_settled(values: dict, flags: list[str]) -> dict:
    """``values`` where a deprecated name given as a flag wins over the YAML's new name (flags win); a ``ConfigError``
    where the YAML sets both names to different values."""
    given = _flag_names(flags)
    values = dict(values)
    for old, new in _ALIASES:
        if old in given and new not in given:
            values.pop(new, None)
            values.pop(old, None)
        elif old in values and new in values and values[old] != values[new]:
            raise ConfigError(f"sets {old} {values[old]!r} and {new} {values[new]!r}: the first is the deprecated "
                              "name of the second", column=old, fix=f"keep {new} only")  # fmt: skip
    return values


def _flag_names(flags: list[str]) -> set[str]:
    """The fields ``flags`` set (``--max-length=8``: ``max_length``)."""
    return {flag[2:].split("=")[0].replace("-", "_") for flag in flags if flag.startswith("--")}


def settle_data_filter(run_args, args, values: dict, flags: list[str]) -> None:
    """``data_filter`` checked; on a stream (``dataset_streaming``) it decides, unless the run sets
    ``stream_bad_rows`` itself, whether a row preparation refuses is dropped as it is read (``drop``) or stops the
    run (``none``)."""
    if run_args.data_filter not in ("drop", "none"):
        raise ConfigError(f"must be 'drop' or 'none', got {run_args.data_filter!r}", column="data_filter")
    if run_args.dataset_streaming and "stream_bad_rows" not in {*values, *_flag_names(flags)}:
        args.stream_bad_rows = "drop" if run_args.data_filter == "drop" else "raise"


def _scalar_problem(hint: str, value) -> str | None:
    """What a YAML ``value`` of a field annotated ``hint`` (int, float, str, bool, or one of them or None) should
    have been, when it is not that (a list where a number goes, 1.5 for an int); None when it fits or the hint is
    another type. Strings pass: argparse converts a string default as it converts a flag."""
    if hint.startswith("Optional[") and hint.endswith("]"):
        hint = hint[len("Optional[") : -1] + "|None"
    kinds = [_SCALARS.get(part) for part in hint.split("|")]
    if not hint or None in kinds or isinstance(value, str):
        return None
    fits = (value is None and type(None) in kinds) or (isinstance(value, bool) and bool in kinds) or (
        not isinstance(value, bool) and isinstance(value, int) and (int in kinds or float in kinds)) or (
        isinstance(value, float) and float in kinds)  # fmt: skip
    return None if fits else " or ".join(k.__name__.replace("NoneType", "null") for k in kinds)


class _ListOrNull(argparse._StoreAction):
    """A list flag whose ``null`` alone (``--lora_target_modules null``) is None, not ``[None]``."""

    def __call__(self, parser, namespace, values, option_string=None):
        if None in values and len(values) > 1:
            raise argparse.ArgumentError(self, "null unsets the list: give it alone")
        setattr(namespace, self.dest, None if values == [None] else values)


def _or_null(convert):
    """``convert``, but ``null`` (YAML's word; ``None``, ``none`` too) is None."""

    def parse(text: str):
        return None if text in ("null", "None", "none") else convert(text)

    parse.__name__ = convert.__name__  # argparse's "invalid int value" names it
    return parse


def _none_word(text: str) -> str:
    """``report_to``'s flag: ``null`` (YAML's word; ``None`` too) is its ``'none'``."""
    return "none" if text in ("null", "None") else text


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise argparse.ArgumentTypeError(f'{text!r} is not JSON (e.g. \'{{"prompt": "question"}}\')') from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object")
    return value
