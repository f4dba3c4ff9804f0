"""The data layer: load preference and SFT datasets in any common shape, normalize, tokenize as TRL does, check.

    from fastdpo.data import check_preferences, prepare_preferences, tokenize_preferences
    pairs = prepare_preferences("pairs.jsonl", columns={"prompt": "input"})
    report = check_preferences(pairs, tokenizer, max_length=1024)          # .counts, .to_markdown()
    clean, dropped = report.filter(pairs)                                   # every drop counted
    tokenized = tokenize_preferences(clean, tokenizer, max_length=1024)    # .dataset, .dropped_rows

Importing this package imports ``datasets`` and ``transformers``' tokenizer base, not torch kernels.
"""

from fastdpo.data.formats import extract_prompt, prepare_preferences
from fastdpo.data.load import load_data, load_stream
from fastdpo.data.packer import cpp_available, pack
from fastdpo.data.packing import (
    PackedBatch,
    bfd_bins_fifo,
    default_pack_length,
    pack_pairs,
    pack_sft,
    pack_sft_dataset,
)
from fastdpo.data.pairs import PairsResult, build_pairs
from fastdpo.data.quality import REASONS, QualityReport, check_preferences
from fastdpo.data.sampler import TokenBudgetBatchSampler
from fastdpo.data.schema import PREFERENCE_COLUMNS, SCORE_ALIASES
from fastdpo.data.sft import TokenizedSFT, prepare_sft, tokenize_sft
from fastdpo.data.split import split_by_prompt, split_sft_by_prompt
from fastdpo.data.stream import PreparedStream, prepare_sft_stream, prepare_stream
from fastdpo.data.tokenize import TokenizedPreferences, tokenize_preferences, truncate
from fastdpo.data.trees import build_tree_pairs

__all__ = [
    "PREFERENCE_COLUMNS",
    "REASONS",
    "SCORE_ALIASES",
    "PackedBatch",
    "PairsResult",
    "PreparedStream",
    "QualityReport",
    "TokenBudgetBatchSampler",
    "TokenizedPreferences",
    "TokenizedSFT",
    "bfd_bins_fifo",
    "build_pairs",
    "build_tree_pairs",
    "check_preferences",
    "cpp_available",
    "default_pack_length",
    "extract_prompt",
    "load_data",
    "load_stream",
    "pack",
    "pack_pairs",
    "pack_sft",
    "pack_sft_dataset",
    "prepare_preferences",
    "prepare_sft",
    "prepare_sft_stream",
    "prepare_stream",
    "split_by_prompt",
    "split_sft_by_prompt",
    "tokenize_preferences",
    "tokenize_sft",
    "truncate",
]
