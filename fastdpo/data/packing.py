"""Pairs packed into rows with no padding between sequences: the ``PackedBatch`` every step runs on.

``pack_pairs`` takes tokenized pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``), truncates each sequence
as TRL's collator does (``truncate``), and packs whole pairs (chosen then rejected, never split) into rows of at
most ``pack_length`` tokens with best-fit-decreasing (``fastdpo.data.pack``). Rows are padded only up to the
longest row of the batch. Every token belongs to one segment of ``cu_seqlens``: a real sequence, or the padding
at the end of a row (``seq_pair == -1``), so segment sums over ``cu_seqlens`` and flash-attention's varlen kernels
see the same boundaries. ``position_ids`` restart at 0 in every segment: with no attention mask and no cache,
transformers' eager and sdpa paths derive the block-diagonal mask from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastdpo.data.tokenize import truncate
from fastdpo.errors import ConfigError, DataError

IGNORE_INDEX = -100
ROW_ATTENTION = ("eager", "sdpa")
"""Backends that attend over whole rows with a dense block mask: their attention cost grows with the row length²."""


def default_pack_length(max_length: int, attn_implementation: str = "sdpa") -> int:
    """The row length fastdpo packs to by default.

    eager/sdpa: ``2 * max_length``, the shortest row that fits any pair. Measured on CPU (bench/packing_cpu.py,
    UltraFeedback-like lengths, max_length 1024): longer rows cut padding further (17–20% at 2048, 5–26% at
    4096 falling with the batch size, against TRL's 33–37%), but these backends attend over the whole row, so
    attention work grows to 2.7–3.4x TRL's at 4096 against 1.5x at 2048, and a 2-layer Llama body ran fwd+bwd
    slower at 4096 than at 2048 at both widths tried (H=256, 1024). At 2048, packing beat TRL's padded batches
    at H=1024 (456 vs 430 real tokens/s) and lost at H=256 (3,703 vs 4,042), where attention dominates: wider
    models gain more. flash-attention and flex attention skip masked blocks (work per sequence, not per row):
    ``max(2 * max_length, 4096)``, which brought padding to 5–12% at 16+ pairs per batch in the same table (not
    yet timed on a GPU).
    """
    if max_length < 1:
        raise ConfigError(f"must be positive, got {max_length}", column="max_length")
    if attn_implementation in ROW_ATTENTION:
        return 2 * max_length
    return max(2 * max_length, 4096)


@dataclass
class PackedBatch:
    """One packed batch. ``R`` rows of ``L`` tokens; ``S`` segments (sequences and row-end padding)."""

    input_ids: torch.Tensor
    """[R, L] int64."""
    position_ids: torch.Tensor
    """[R, L] int64, restarting at 0 in every segment."""
    targets: torch.Tensor
    """[R, L] int64: the next token where that token is a completion token, else -100 (prompt, padding, the
    last position of each sequence)."""
    cu_seqlens: torch.Tensor
    """[S + 1] int32 offsets of the segments in the flattened ``R·L`` tokens."""
    max_seqlen: int
    """Longest segment."""
    seq_pair: torch.Tensor
    """[S] int64: the pair (index into ``pair_ids``) a segment belongs to, -1 for padding."""
    seq_is_chosen: torch.Tensor
    """[S] bool: True for the chosen sequence of its pair."""
    pair_ids: list[int]
    """Which examples (positions in the list given to ``pack_pairs``) the pairs are, in pair order."""
    num_padding: int
    """Padding tokens in ``input_ids``."""

    @property
    def num_pairs(self) -> int:
        return len(self.pair_ids)

    @property
    def padding_fraction(self) -> float:
        return self.num_padding / max(1, self.input_ids.numel())

    def flash_attn_kwargs(self) -> dict:
        """Varlen keyword arguments transformers' flash-attention path takes, for all rows flattened."""
        return {
            "cu_seq_lens_q": self.cu_seqlens,
            "cu_seq_lens_k": self.cu_seqlens,
            "max_length_q": self.max_seqlen,
            "max_length_k": self.max_seqlen,
        }

    def to(self, device: torch.device | str) -> PackedBatch:
        moved = {name: getattr(self, name) for name in self.__dataclass_fields__}
        for name, value in moved.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device, non_blocking=True)
        return PackedBatch(**moved)


def _sequences(example: dict, max_length: int | None, truncation_mode: str) -> list[tuple[list[int], list[int]]]:
    return [truncate(example["prompt_ids"], example[name], max_length, truncation_mode)
            for name in ("chosen_ids", "rejected_ids")]  # fmt: skip


def pack_pairs(
    examples: Sequence[dict],
    *,
    pack_length: int,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    pad_token_id: int = 0,
    pad_to_multiple_of: int | None = None,
    backend: str = "auto",
    row_ids: Sequence[int] | None = None,
) -> PackedBatch:
    """Pack tokenized pairs into a ``PackedBatch``.

    Args:
        examples: dicts with ``prompt_ids``, ``chosen_ids``, ``rejected_ids``.
        pack_length: the longest a row may be; a pair (chosen + rejected, after truncation) longer than this is a
            DataError naming the row.
        max_length, truncation_mode: per-sequence truncation, as TRL's collator applies it.
        pad_token_id: the id put in padding positions (never a target).
        pad_to_multiple_of: round the row length up (e.g. 8 or 64 for tensor cores).
        backend: the packer backend (``auto``, ``python``, ``cpp``).
        row_ids: dataset row of each example, for error messages (default: the position).
    """
    from fastdpo.data.packer import pack  # the packer backends are their own module

    if pack_length < 2:
        raise ConfigError(f"must be at least 2 (a pair is two sequences), got {pack_length}", column="pack_length")
    if not examples:
        raise DataError("no pairs to pack", fix="check the dataset and the batch size")
    pairs = [_sequences(example, max_length, truncation_mode) for example in examples]
    lengths = [len(chosen[0]) + len(rejected[0]) for chosen, rejected in pairs]
    for position, sequences in enumerate(pairs):
        for name, (_, mask) in zip(("chosen", "rejected"), sequences, strict=True):
            if not any(mask[1:]):  # position t predicts token t + 1: a completion token after the first position
                row = position if row_ids is None else row_ids[position]
                raise DataError(
                    "no completion token to learn from (empty, or cut away by truncation)",
                    row=row,
                    column=name,
                    fix="drop the row (tokenize_preferences drops prompts that fill max_length) or raise max_length",
                )
    for position, length in enumerate(lengths):
        if length > pack_length:
            row = position if row_ids is None else row_ids[position]
            raise DataError(
                f"the pair is {length} tokens (chosen + rejected) but pack_length is {pack_length}",
                row=row,
                fix="raise pack_length to at least twice max_length, or lower max_length",
            )
    bins = pack(lengths, pack_length, backend=backend)
    row_length = max(sum(lengths[i] for i in items) for items in bins)
    if pad_to_multiple_of:
        row_length = -(-row_length // pad_to_multiple_of) * pad_to_multiple_of

    input_ids = torch.full((len(bins), row_length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(bins), row_length), dtype=torch.long)
    targets = torch.full((len(bins), row_length), IGNORE_INDEX, dtype=torch.long)
    seg_lengths: list[int] = []
    seq_pair: list[int] = []
    seq_is_chosen: list[bool] = []
    pair_ids: list[int] = []
    for row, items in enumerate(bins):
        offset = 0
        for item in items:
            pair_index = len(pair_ids)
            pair_ids.append(item)
            for is_chosen, (ids, mask) in zip((True, False), pairs[item], strict=True):
                n = len(ids)
                input_ids[row, offset : offset + n] = torch.tensor(ids, dtype=torch.long)
                position_ids[row, offset : offset + n] = torch.arange(n)
                # position t predicts token t + 1; it is a target only where token t + 1 is a completion token
                next_ids = torch.tensor(ids[1:], dtype=torch.long)
                next_is_completion = torch.tensor(mask[1:], dtype=torch.bool)
                targets[row, offset : offset + n - 1] = torch.where(next_is_completion, next_ids, IGNORE_INDEX)
                seg_lengths.append(n)
                seq_pair.append(pair_index)
                seq_is_chosen.append(is_chosen)
                offset += n
        if offset < row_length:
            position_ids[row, offset:] = torch.arange(row_length - offset)
            seg_lengths.append(row_length - offset)
            seq_pair.append(-1)
            seq_is_chosen.append(False)
    cu_seqlens = torch.zeros(len(seg_lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(seg_lengths, dtype=torch.int32).cumsum(0)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        targets=targets,
        cu_seqlens=cu_seqlens,
        max_seqlen=max(seg_lengths),
        seq_pair=torch.tensor(seq_pair, dtype=torch.long),
        seq_is_chosen=torch.tensor(seq_is_chosen, dtype=torch.bool),
        pair_ids=pair_ids,
        num_padding=input_ids.numel() - sum(lengths),
    )
