"""Pairs packed into rows with no padding between sequences: the ``PackedBatch`` every step runs on.

``pack_pairs`` takes tokenized pairs (``prompt_ids``, ``chosen_ids``, ``rejected_ids``), truncates each sequence
as TRL's collator does (``truncate``), and packs whole pairs (chosen then rejected), or with ``split_pairs`` the
sequences themselves, into rows of at most ``pack_length`` tokens with best-fit-decreasing (``fastdpo.data.pack``).
Both sequences of a pair are always in the same batch, so in the same step. Rows are padded only up to the
longest row of the batch. Every token belongs to one segment of ``cu_seqlens``: a real sequence, or the padding
at the end of a row (``seq_pair == -1``), so segment sums over ``cu_seqlens`` and flash-attention's varlen kernels
see the same boundaries. ``position_ids`` restart at 0 in every segment: with no attention mask and no cache,
transformers' eager and sdpa paths derive the block-diagonal mask from them. A row's padding is cut into segments
no longer than the batch's longest sequence (``pad_segments``), so its positions stay within those a learned position
table must hold for the sequences themselves (GPT-2's ``wpe``: one padding segment of a long row past a short one
indexed past the table).

SFT has single sequences: ``pack_sft_dataset`` packs a whole tokenized dataset into rows as TRL 1.16's
``SFTConfig(packing=True)`` does (same rows, same order; ``bfd_bins_fifo`` is TRL's best-fit-decreasing), and
``pack_sft`` turns a batch of such rows, or of single sequences, into a ``PackedBatch``.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fastdpo.data.load import as_dataset
from fastdpo.data.tokenize import truncate
from fastdpo.errors import ConfigError, DataError, unknown_choice

logger = logging.getLogger(__name__)

if TYPE_CHECKING:
    import datasets

IGNORE_INDEX = -100
ROW_ATTENTION = ("eager", "sdpa")
"""Backends that attend over whole rows with a dense block mask: their attention cost grows with the row length²."""


def default_pack_length(max_length: int, attn_implementation: str = "sdpa") -> int | None:
    """The row length fastdpo packs to by default; None: as long as the longest sequence of each batch.

    eager/sdpa attend over whole rows (a dense block mask): the attention work of a row grows with its length²,
    so rows are kept as short as the data allows. The sequences (not the pairs) are packed, into rows as long as
    the batch's longest sequence: a row holding whole pairs must be twice as long. Measured on CPU
    (bench/pack_rows_cpu.py: a 4-layer Llama, H=256, 8 batches of 8 pairs, DPO step fwd+bwd): 31.0 s with pairs
    in rows of 2048, 21.2 s with sequence rows (0.18x the attention entries, 11.9% padding against 17.5%).
    Earlier (bench/packing_cpu.py, UltraFeedback-like lengths), rows of pairs at 4096 ran slower than at 2048.
    flex attention skips masked blocks (work per sequence, not per row): rows of ``max(2 * max_length, 4096)``,
    which brought padding to 5–12% at 16+ pairs per batch (not yet timed on a GPU). The trainers pack each batch
    into a single row, with no padding, for flash-attention and ``fastdpo_varlen``, which flatten the rows anyway
    (``fastdpo.train.dpo.packer_for``); this function's answer for them is the row length a caller that wants
    bounded rows would use.
    """
    if max_length < 1:
        raise ConfigError(f"must be positive, got {max_length}", column="max_length")
    if attn_implementation in ROW_ATTENTION:
        return None
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
    seq_starts_completion: torch.Tensor | None = None
    """[S] bool: True for a sequence whose first token is a completion token (its prompt empty, or cut away by
    ``keep_end``), which no position predicts; None: not known (SFT batches), counted as none. TRL's ``ipo`` and
    ``sigmoid_norm`` count it in the completion's length."""

    @property
    def num_pairs(self) -> int:
        return len(self.pair_ids)

    @property
    def padding_fraction(self) -> float:
        return self.num_padding / max(1, self.input_ids.numel())

    def pair_segments(self) -> torch.Tensor:
        """``[P, 2]``: the segment of each pair's chosen and rejected sequence, in pair order (``pair_ids``): index a
        per-segment tensor with it (``packed_logps(model, batch).seq_logps[batch.pair_segments()]``). The segments
        themselves are in row order, which is not the pairs' once their lengths differ."""
        from fastdpo.ops.segments import pair_segments

        return pair_segments(self.cu_seqlens, self.seq_pair, self.seq_is_chosen)

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
    if "prompt_ids" not in example and "chosen_labels" in example:  # TRL's ORPO/CPO rows: each side whole (cut by
        # TRL), its prompt's labels -100 (a row with fastdpo's own columns too is read by those)
        return [(list(example[f"{side}_input_ids"]), [label != IGNORE_INDEX for label in example[f"{side}_labels"]])
                for side in ("chosen", "rejected")]  # fmt: skip
    return [truncate(example["prompt_ids"], example[name], max_length, truncation_mode)
            for name in ("chosen_ids", "rejected_ids")]  # fmt: skip


def pair_length(example: dict, max_length: int | None = None, truncation_mode: str = "keep_start") -> int:
    """Tokens of a tokenized pair once packed: prompt + chosen and prompt + rejected, each truncated as
    ``pack_pairs`` truncates it."""
    return sum(len(ids) for ids, _ in _sequences(example, max_length, truncation_mode))


def pack_pairs(
    examples: Sequence[dict],
    *,
    pack_length: int | None,
    max_length: int | None = None,
    truncation_mode: str = "keep_start",
    pad_token_id: int = 0,
    pad_to_multiple_of: int | None = None,
    backend: str = "auto",
    row_ids: Sequence[int] | None = None,
    one_pair_per_row: bool = False,
    split_pairs: bool = False,
    one_row: bool = False,
) -> PackedBatch:
    """Pack tokenized pairs into a ``PackedBatch``.

    Args:
        examples: dicts with ``prompt_ids``, ``chosen_ids``, ``rejected_ids``; or TRL's ORPO/CPO rows,
            ``chosen_input_ids`` and ``chosen_labels`` (-100 on the prompt) and the same of ``rejected``.
        pack_length: the longest a row may be; an item longer than this is a DataError naming the row. None: as
            long as the longest item of this batch.
        max_length, truncation_mode: per-sequence truncation, as TRL's collator applies it.
        pad_token_id: the id put in padding positions (never a target).
        pad_to_multiple_of: round the row length up (e.g. 8 or 64 for tensor cores).
        backend: the packer backend (``auto``, ``python``, ``cpp``).
        row_ids: dataset row of each example, for error messages (default: the position).
        one_pair_per_row: no packing across pairs: pair ``i`` alone in row ``i`` (rows padded to the longest pair;
            ``DPOConfig(packing=False)``).
        split_pairs: the packed items are the sequences, not the pairs: a pair's chosen and rejected may land in
            different rows of the batch. For attention that computes whole rows (eager, sdpa), rows as long as the
            longest sequence cost about half the attention of rows that must hold the longest pair.
        one_row: every item in a single row as long as all of them (no padding), for attention that works per
            sequence (flash-attention, ``fastdpo_varlen``); ``pack_length`` must then be None.
    """
    from fastdpo.data.packer import pack  # the packer backends are their own module

    if pack_length is not None and pack_length < 2:
        raise ConfigError(f"must be at least 2 (a sequence to learn from has 2 tokens), got {pack_length}",
                          column="pack_length")  # fmt: skip
    if not examples:
        raise DataError("no pairs to pack", fix="check the dataset and the batch size")
    pairs = [_sequences(example, max_length, truncation_mode) for example in examples]
    _check_completions(pairs, row_ids)
    sequences = [sequence for pair in pairs for sequence in pair]  # 2i: chosen of pair i, 2i + 1: its rejected
    if split_pairs and not one_pair_per_row:
        lengths = [len(ids) for ids, _ in sequences]
        what = "sequence"
    else:
        lengths = [len(chosen[0]) + len(rejected[0]) for chosen, rejected in pairs]
        what = "pair (chosen + rejected)"
    if one_row and (pack_length is not None or one_pair_per_row):
        raise ConfigError("one_row packs a whole batch into one row: it takes no pack_length and no one_pair_per_row",
                          column="pack_length", fix="leave pack_length unset, or use one_row=False")  # fmt: skip
    capacity = sum(lengths) if one_row else max(lengths) if pack_length is None else pack_length
    for position, length in enumerate(lengths):
        if length > capacity:
            index = position // 2 if what == "sequence" else position
            raise DataError(
                f"the {what} is {length} tokens but pack_length is {capacity}",
                row=index if row_ids is None else row_ids[index],
                fix="raise pack_length (or leave it unset), or lower max_length",
            )
    bins = [[i] for i in range(len(lengths))] if one_pair_per_row else pack(lengths, capacity, backend=backend)
    if what != "sequence":  # a pair is its two sequences, chosen first
        bins = [[index for i in items for index in (2 * i, 2 * i + 1)] for items in bins]
    return _fill_rows(bins, sequences, pad_token_id=pad_token_id, pad_to_multiple_of=pad_to_multiple_of,
                      keep_pair_order=what == "sequence")  # fmt: skip


def _check_completions(pairs: list, row_ids: Sequence[int] | None) -> None:
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


def pad_segments(pad: int, longest: int) -> list[int]:
    """The lengths of the segments ``pad`` tokens of padding at a row's end are cut into: none longer than
    ``longest`` (the batch's longest sequence), whose positions the model takes already."""
    longest = max(longest, 1)
    return [longest] * (pad // longest) + ([pad % longest] if pad % longest else [])


def _fill_rows(
    bins: list[list[int]], sequences: list, *, pad_token_id: int, pad_to_multiple_of: int | None, keep_pair_order: bool
) -> PackedBatch:
    """The ``PackedBatch`` of ``bins`` (rows of sequence indices; ``2i``/``2i + 1`` are pair ``i``'s chosen and
    rejected). Pairs are numbered in input order when ``keep_pair_order``, else in the order the rows meet them."""
    row_length = max(sum(len(sequences[i][0]) for i in items) for items in bins)
    if pad_to_multiple_of:
        row_length = -(-row_length // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((len(bins), row_length), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((len(bins), row_length), dtype=torch.long)
    targets = torch.full((len(bins), row_length), IGNORE_INDEX, dtype=torch.long)
    seg_lengths: list[int] = []
    seq_pair: list[int] = []
    seq_is_chosen: list[bool] = []
    starts_completion: list[bool] = []
    number: dict[int, int] = {i: i for i in range(len(sequences) // 2)} if keep_pair_order else {}
    longest = max(len(ids) for ids, _ in sequences)
    for row, items in enumerate(bins):
        offset = 0
        for index in items:
            ids, mask = sequences[index]
            n = len(ids)
            input_ids[row, offset : offset + n] = torch.tensor(ids, dtype=torch.long)
            position_ids[row, offset : offset + n] = torch.arange(n)
            # position t predicts token t + 1; it is a target only where token t + 1 is a completion token
            next_ids = torch.tensor(ids[1:], dtype=torch.long)
            next_is_completion = torch.tensor(mask[1:], dtype=torch.bool)
            targets[row, offset : offset + n - 1] = torch.where(next_is_completion, next_ids, IGNORE_INDEX)
            seg_lengths.append(n)
            seq_pair.append(number.setdefault(index // 2, len(number)))
            seq_is_chosen.append(index % 2 == 0)
            starts_completion.append(bool(mask[0]))
            offset += n
        for piece in pad_segments(row_length - offset, longest):
            position_ids[row, offset : offset + piece] = torch.arange(piece)
            seg_lengths.append(piece)
            seq_pair.append(-1)
            seq_is_chosen.append(False)
            starts_completion.append(False)
            offset += piece
    cu_seqlens = torch.zeros(len(seg_lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(seg_lengths, dtype=torch.int32).cumsum(0)
    pair_ids = sorted(number, key=number.__getitem__)
    return PackedBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        targets=targets,
        cu_seqlens=cu_seqlens,
        max_seqlen=max(seg_lengths),
        seq_pair=torch.tensor(seq_pair, dtype=torch.long),
        seq_is_chosen=torch.tensor(seq_is_chosen, dtype=torch.bool),
        pair_ids=pair_ids,
        num_padding=input_ids.numel() - sum(len(ids) for ids, _ in sequences),
        seq_starts_completion=torch.tensor(starts_completion, dtype=torch.bool),
    )


# ---------------------------------------------------------------------------------------------------------------------
# SFT: single sequences, packed as TRL 1.16's SFTTrainer packs them
# ---------------------------------------------------------------------------------------------------------------------

SFT_PACKING_STRATEGIES = ("bfd", "bfd_split", "wrapped")
TRL_PACKING_BLOCK = 1000
"""Rows per block when a dataset is packed: TRL packs with a batched ``Dataset.map`` at its default batch size."""


def bfd_bins_fifo(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Best-fit-decreasing bins with TRL 1.16's tie-break (``trl.data_utils._pack_bfd``).

    Like ``fastdpo.data.pack`` (items longest first, equal lengths in input order, each into the open bin with the
    least room that still fits it), except among bins with the same room: here the bin that came to have that room
    first wins (a FIFO queue per room), where ``pack`` takes the lowest bin index. The two differ on some inputs
    (9 of 200 random ones in a check), so SFT packing, which must put the same sequences in the same rows as TRL,
    uses this one.
    Lengths must be integers in ``0..capacity`` (else a DataError names the first that is not), capacity ≥ 1.
    """
    from fastdpo.data.packer import _as_lengths, _check_capacity, _Occupancy

    capacity = _check_capacity(capacity)  # ConfigError; below 1 the bit tree is never built (an endless loop)
    lengths = _as_lengths(lengths, capacity).tolist()  # an item over capacity would get a bin of its own, silently
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)  # stable: ties keep input order
    rooms = _Occupancy(capacity + 1)
    waiting: dict[int, deque[int]] = {}
    bins: list[list[int]] = []
    for item in order:
        length = lengths[item]
        room = rooms.next_at_least(length)
        if room < 0:
            chosen, room = len(bins), capacity
            bins.append([item])
        else:
            queue = waiting[room]
            chosen = queue.popleft()
            if not queue:
                rooms.discard(room)
            bins[chosen].append(item)
        room -= length
        if room > 0:
            waiting.setdefault(room, deque()).append(chosen)
            rooms.add(room)
    return bins


def pack_sft_dataset(
    dataset: datasets.Dataset | datasets.IterableDataset | list[dict],
    seq_length: int,
    *,
    strategy: str = "bfd",
    num_proc: int | None = None,
) -> datasets.Dataset | datasets.IterableDataset:
    """Pack a tokenized SFT dataset (``input_ids``, ``labels``) into rows of at most ``seq_length`` tokens, as TRL
    (a stream lazily, block by block as it is read).

    The rows are those ``trl.data_utils.pack_dataset`` makes (TRL 1.16, ``SFTConfig(packing=True)``), row for row:
    the dataset is packed block by block of ``TRL_PACKING_BLOCK`` rows (per worker shard with ``num_proc``, as
    ``Dataset.map`` splits it), and within a block:

    - ``bfd``: empty sequences are dropped, the others cut to their first ``seq_length`` tokens (whatever the
      truncation mode), then binned by ``bfd_bins_fifo``; ``seq_lengths`` lists each row's sequences;
    - ``bfd_split``: the same, but a longer sequence is split into ``seq_length``-token pieces (the last shorter)
      that are binned as separate sequences;
    - ``wrapped``: the block's tokens are concatenated and cut every ``seq_length`` tokens, across sequence
      boundaries; each row is then one sequence (no ``seq_lengths``), as TRL trains on it.
    """
    if strategy not in SFT_PACKING_STRATEGIES:
        raise unknown_choice("packing_strategy", strategy, SFT_PACKING_STRATEGIES)
    if not isinstance(seq_length, int) or seq_length < 1:
        raise ConfigError(f"must be a positive integer to pack, got {seq_length!r}", column="max_length")
    import datasets  # at run time: the module imports it for type checking only

    fn_kwargs = {"seq_length": seq_length, "strategy": strategy}
    if isinstance(dataset, datasets.IterableDataset):  # a stream: packed block by block as it is read, in Arrow's
        # format as TRL's pack_dataset maps it (a later shuffle of a stream of several shards orders the rows by it:
        # the Python format's rows came in another order than TRL's)
        return dataset.select_columns(["input_ids", "labels"]).with_format("arrow").map(
            _pack_table, batched=True, batch_size=TRL_PACKING_BLOCK, fn_kwargs=fn_kwargs,
        ).with_format(None)  # fmt: skip
    dataset = as_dataset(dataset).select_columns(["input_ids", "labels"])
    return dataset.map(
        _pack_block,
        batched=True,
        batch_size=TRL_PACKING_BLOCK,
        fn_kwargs=fn_kwargs,
        remove_columns=["input_ids", "labels"],
        num_proc=num_proc,
        desc=f"Packing SFT sequences ({strategy})",
    )


def _pack_table(table, *, seq_length: int, strategy: str):
    """``_pack_block`` of a block in Arrow's format."""
    import pyarrow as pa

    return pa.Table.from_pydict(_pack_block(table.to_pydict(), seq_length=seq_length, strategy=strategy))


def _pack_block(block: dict, *, seq_length: int, strategy: str) -> dict:
    ids_of, labels_of = block["input_ids"], block["labels"]
    if strategy == "wrapped":
        ids = [token for row in ids_of for token in row]
        labels = [label for row in labels_of for label in row]
        cuts = range(0, len(ids), seq_length)
        return {
            "input_ids": [ids[c : c + seq_length] for c in cuts],
            "labels": [labels[c : c + seq_length] for c in cuts],
        }
    pieces: list[tuple[list[int], list[int]]] = []
    for ids, labels in zip(ids_of, labels_of, strict=True):
        if not ids:
            continue
        if strategy == "bfd":
            pieces.append((ids[:seq_length], labels[:seq_length]))
        else:
            pieces.extend((ids[c : c + seq_length], labels[c : c + seq_length]) for c in range(0, len(ids), seq_length))
    bins = bfd_bins_fifo([len(ids) for ids, _ in pieces], seq_length)
    return {
        "input_ids": [[token for i in items for token in pieces[i][0]] for items in bins],
        "labels": [[label for i in items for label in pieces[i][1]] for items in bins],
        "seq_lengths": [[len(pieces[i][0]) for i in items] for items in bins],
    }


def pack_sft(
    examples: Sequence[dict],
    *,
    pack_length: int | None = None,
    pad_token_id: int = 0,
    pad_to_multiple_of: int | None = None,
    backend: str = "auto",
) -> PackedBatch:
    """Pack tokenized SFT examples into a ``PackedBatch`` whose targets are the next token's label.

    Args:
        examples: dicts with ``input_ids``, optionally ``labels`` (default: ``input_ids``; -100 where no loss) and
            ``seq_lengths``. With ``seq_lengths`` (rows from ``pack_sft_dataset``) each example is one row, split
            into those sequences; without, each example is one sequence and they are packed into rows by
            ``fastdpo.data.pack`` (best-fit-decreasing).
        pack_length: the row capacity for single sequences; raised to the longest sequence when shorter or None.
        pad_token_id: the id in padding positions (never a target).
        pad_to_multiple_of: round the row length up.
        backend: the packer backend.

    In the returned batch a "pair" is one sequence: ``seq_pair`` is the sequence's index into ``pair_ids`` (-1 for
    padding), ``pair_ids`` the position in ``examples`` it came from, ``seq_is_chosen`` True for every sequence.
    Position t of a sequence targets ``labels[t + 1]`` (the causal shift TRL's loss applies), -100 at its last
    position; empty sequences are skipped.
    """
    from fastdpo.data.packer import pack

    if not examples:
        raise DataError("no sequences to pack", fix="check the dataset and the batch size")
    sequences: list[tuple[list[int], list[int]]] = []
    owners: list[int] = []
    rows_of_examples: list[list[int]] = []
    for position, example in enumerate(examples):
        ids = list(example["input_ids"])
        labels = example.get("labels")
        labels = ids if labels is None else list(labels)
        if len(labels) != len(ids):
            raise DataError(f"has {len(labels)} labels for {len(ids)} input_ids", row=position, column="labels")
        lengths = example.get("seq_lengths")
        lengths = [len(ids)] if lengths is None else list(lengths)
        if any(length < 0 for length in lengths):  # would slice from the end: tokens lost or repeated, silently
            raise DataError(f"has a negative length {min(lengths)}", row=position, column="seq_lengths")
        if sum(lengths) != len(ids):
            raise DataError(f"adds up to {sum(lengths)}, not {len(ids)} tokens", row=position, column="seq_lengths",
                            fix="make seq_lengths the row's sequence lengths; a row packed before and then cut to "
                            "max_length (TRL cuts input_ids, not seq_lengths): pack with a smaller max_length, or "
                            "raise max_length")  # fmt: skip
        row, start = [], 0
        for length in lengths:
            if length > 0:
                row.append(len(sequences))
                sequences.append((ids[start : start + length], labels[start : start + length]))
                owners.append(position)
            start += length
        rows_of_examples.append(row)
    if not sequences:
        raise DataError("every sequence in the batch is empty", column="input_ids")
    lengths = [len(ids) for ids, _ in sequences]
    if "seq_lengths" in examples[0]:
        bins = [row for row in rows_of_examples if row]
    else:
        bins = pack(lengths, max(pack_length or 0, max(lengths)), backend=backend)
    return _sft_batch(sequences, owners, bins, pad_token_id, pad_to_multiple_of)


def _sft_batch(sequences, owners, bins, pad_token_id, pad_to_multiple_of) -> PackedBatch:
    row_length = max(sum(len(sequences[i][0]) for i in items) for items in bins)
    if pad_to_multiple_of:
        row_length = -(-row_length // pad_to_multiple_of) * pad_to_multiple_of
    ids, positions, targets, seg_lengths, seq_pair, pair_ids = [], [], [], [], [], []
    longest = max(len(seq_ids) for seq_ids, _ in sequences)
    for items in bins:
        used = 0
        for item in items:
            seq_ids, seq_labels = sequences[item]
            n = len(seq_ids)
            ids.extend(seq_ids)
            positions.extend(range(n))
            targets.extend(seq_labels[1:])
            targets.append(IGNORE_INDEX)
            seg_lengths.append(n)
            seq_pair.append(len(pair_ids))
            pair_ids.append(owners[item])
            used += n
        for piece in pad_segments(row_length - used, longest):
            ids.extend([pad_token_id] * piece)
            positions.extend(range(piece))
            targets.extend([IGNORE_INDEX] * piece)
            seg_lengths.append(piece)
            seq_pair.append(-1)
    shape = (len(bins), row_length)
    cu_seqlens = torch.zeros(len(seg_lengths) + 1, dtype=torch.int32)
    cu_seqlens[1:] = torch.tensor(seg_lengths, dtype=torch.int32).cumsum(0)
    seq_pair_t = torch.tensor(seq_pair, dtype=torch.long)
    return PackedBatch(
        input_ids=torch.tensor(ids, dtype=torch.long).view(shape),
        position_ids=torch.tensor(positions, dtype=torch.long).view(shape),
        targets=torch.tensor(targets, dtype=torch.long).view(shape),
        cu_seqlens=cu_seqlens,
        max_seqlen=max(seg_lengths),
        seq_pair=seq_pair_t,
        seq_is_chosen=seq_pair_t >= 0,
        pair_ids=pair_ids,
        num_padding=len(ids) - sum(len(sequences[i][0]) for items in bins for i in items),
    )


def check_packed_labels(dataset: datasets.Dataset, name: str, max_length: int) -> None:
    """Packing cuts sequences to ``max_length`` as TRL does, which can leave a row with no completion token: a
    warning counts such rows (they train nothing); a ``DataError`` when no row has one (the loss would be 0)."""
    import pyarrow.compute as pc

    labels = dataset.data.column("labels").combine_chunks()
    kept = pc.not_equal(pc.list_flatten(labels), IGNORE_INDEX)
    labelled = len(pc.unique(pc.filter(pc.list_parent_indices(labels), kept)))
    if labelled == 0:
        raise DataError(f"no completion token is left in the packed {name} rows: packing cut every sequence to "
                        f"max_length={max_length} before its completion", option="max_length",
                        fix="raise max_length, shorten the prompts, or packing_strategy='bfd_split'")  # fmt: skip
    if labelled < len(dataset):
        logger.warning("%d of %d packed %s rows hold no completion token (their sequences were cut to max_length=%d "
                       "before it): they count for nothing in the loss", len(dataset) - labelled, len(dataset), name,
                       max_length)  # fmt: skip
