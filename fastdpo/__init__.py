"""fastdpo: SFT and preference optimization with fused log-prob kernels and packed sequences."""

from __future__ import annotations

import os as _os

__version__ = "0.1.0"


def _add_source_tree_kernels() -> None:
    # Wheels install the top-level kernels/ folder as fastdpo/kernels. In a source tree (an editable install, or
    # tests run from the repository root, where ./fastdpo shadows any installed copy) there is no fastdpo/kernels:
    # the repository root goes on this package's __path__ so that `fastdpo.kernels` resolves to ./kernels.
    here = _os.path.dirname(_os.path.abspath(__file__))
    if _os.path.isdir(_os.path.join(here, "kernels")):
        return
    root = _os.path.dirname(here)
    if _os.path.isfile(_os.path.join(root, "kernels", "__init__.py")):
        __path__.append(root)


_add_source_tree_kernels()

from fastdpo.errors import ConfigError, DataError  # noqa: E402
from fastdpo.ops import (  # noqa: E402
    LinearLogprobs,
    LossConfig,
    LossOutput,
    PairLogps,
    linear_logprobs,
    preference_loss,
    segment_mean,
    segment_sum,
)

_LAZY = {name: "fastdpo.train" for name in ("DPOConfig", "DPOTrainer", "SFTConfig", "SFTTrainer")}
_LAZY["estimate_memory"] = "fastdpo.memory"


def __getattr__(name: str):
    # The trainers import transformers' Trainer (seconds): only when asked for, so `import fastdpo` stays light.
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastdpo' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "DPOConfig",
    "DPOTrainer",
    "DataError",
    "LinearLogprobs",
    "LossConfig",
    "LossOutput",
    "PairLogps",
    "SFTConfig",
    "SFTTrainer",
    "__version__",
    "estimate_memory",
    "linear_logprobs",
    "preference_loss",
    "segment_mean",
    "segment_sum",
]
