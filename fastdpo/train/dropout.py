"""Dropout off for DPO (``disable_dropout``), and the rates a user's config holds saved as they were.

Three places hold a rate: ``nn.Dropout`` modules, numbers a module keeps and passes to its attention call
(``self.attention_dropout``), and the config a module reads at every call (Falcon's ``hidden_dropout``, GPT-Neo's and
Persimmon's ``attention_dropout``, BLT's ``dropout``). The last are the config's own fields, saved with the model: they
are zeroed for training and written back as the user had them whenever the trainer saves (``SavesUserDropout``).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

# id of a config disable_dropout zeroed → (a weak reference to it, {field: the rate it held}); configs define __eq__
# and no __hash__, so no WeakKeyDictionary
_ZEROED: dict[int, tuple[weakref.ref, dict]] = {}


def _zeroed(config) -> dict:
    """The rates ``disable_dropout`` took from ``config`` (a dict it fills; empty where none)."""
    found = _ZEROED.get(id(config))
    if found is None or found[0]() is not config:  # (a config since freed, its id reused)
        found = _ZEROED[id(config)] = (weakref.ref(config), {})
    return found[1]


def _is_rate(name: str, value) -> bool:
    return ("dropout" in name or "pdrop" in name) and type(value) is float and value > 0


def _configs(model: nn.Module) -> Iterator:
    """Every transformers config the modules of ``model`` hold, and the sub-configs inside them, once each."""
    from transformers import PretrainedConfig

    seen, stack = set(), [getattr(module, "config", None) for module in model.modules()]
    while stack:
        config = stack.pop()
        if not isinstance(config, PretrainedConfig) or id(config) in seen:
            continue
        seen.add(id(config))
        yield config
        stack += [value for value in vars(config).values() if isinstance(value, PretrainedConfig)]


def disable_dropout(model: nn.Module) -> None:
    """Every dropout of ``model`` off: its ``nn.Dropout`` modules, the rates modules keep as numbers and pass to their
    attention call (``self.attention_dropout``, GPT-BigCode's ``attn_pdrop``: 231 of transformers' modeling files),
    which TRL's ``disable_dropout`` left on (two training forwards differed by 2.9 in the logits), and the rates of
    its configs that modules read at each call (Falcon's, GPT-Neo's, Persimmon's, BLT's; the config's fields are
    restored when the trainer saves, ``SavesUserDropout``)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in vars(module).items():
            if _is_rate(name, value):
                setattr(module, name, 0.0)
    for config in _configs(model):
        zeroed = _zeroed(config)
        for name, value in vars(config).items():
            if _is_rate(name, value):
                zeroed[name] = value
                setattr(config, name, 0.0)


@contextmanager
def user_dropout_rates(model: nn.Module) -> Iterator[None]:
    """Inside: the config rates ``disable_dropout`` zeroed in ``model`` as the user gave them (for a save); zero again
    after."""
    restored = [(config, _zeroed(config)) for config in _configs(model)]
    restored = [(config, rates) for config, rates in restored if rates]
    for config, rates in restored:
        for name, value in rates.items():
            setattr(config, name, value)
    try:
        yield
    finally:
        for config, rates in restored:
            for name in rates:
                setattr(config, name, 0.0)


class SavesUserDropout:
    """A Trainer mixin: a saved model's (and checkpoint's) config holds the dropout rates the user gave, not the
    zeros ``disable_dropout`` trains with."""

    def _save(self, output_dir=None, state_dict=None):
        with user_dropout_rates(self.model):
            return super()._save(output_dir, state_dict)
