"""The data layer: load preference and SFT datasets in any common shape, normalize, tokenize as TRL does, check.

    from fastdpo.data import prepare_preferences, tokenize_preferences
    pairs = prepare_preferences("pairs.jsonl", columns={"prompt": "input"})
    tokenized = tokenize_preferences(pairs, tokenizer, max_length=1024)   # .dataset, .dropped_rows

Importing this package imports ``datasets`` and ``transformers``' tokenizer base, not torch kernels.
"""

from fastdpo.data.formats import extract_prompt, prepare_preferences
from fastdpo.data.load import load_data
from fastdpo.data.schema import PREFERENCE_COLUMNS, SCORE_ALIASES
from fastdpo.data.tokenize import TokenizedPreferences, tokenize_preferences, truncate

__all__ = [
    "PREFERENCE_COLUMNS",
    "SCORE_ALIASES",
    "TokenizedPreferences",
    "extract_prompt",
    "load_data",
    "prepare_preferences",
    "tokenize_preferences",
    "truncate",
]
