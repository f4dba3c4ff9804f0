"""Token ids the model has embeddings for: a token added to the tokenizer but not to the model (no
``resize_token_embeddings``) failed deep inside torch's embedding (``IndexError: index out of range in self``)."""

from __future__ import annotations

import re

import datasets

from fastdpo.data.source_rows import source_rows
from fastdpo.errors import DataError

ID_COLUMNS = ("input_ids", "prompt_ids", "chosen_ids", "rejected_ids")
_BATCH = 4096


def check_token_ids(dataset, model, name: str, dropped: dict | None = None, columns: tuple = ID_COLUMNS) -> None:
    """A ``DataError`` at the first row of ``dataset`` (a tokenized ``Dataset``, or a dict of them; streams are not
    read) holding a token id the model's input embedding has no row for, or a negative one. ``dropped``: the rows
    tokenization dropped (split → reason → input rows, the trainers' ``dropped_rows``), so that the row is named as
    the input numbers it; a packed dataset's rows are named as packed rows. ``columns``: those read (TRL's ORPO/CPO
    rows: theirs)."""
    if isinstance(dataset, dict):
        for key, part in dataset.items():
            check_token_ids(part, model, f"{name}_{key}", dropped, columns)
        return
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if not isinstance(dataset, datasets.Dataset) or not isinstance(rows, int):
        return

    for column in (c for c in columns if c in dataset.column_names):
        batches = dataset.select_columns([column]).with_format("arrow").iter(_BATCH)
        for start, batch in zip(range(0, len(dataset), _BATCH), batches, strict=False):
            found = _first_outside(batch[column], rows)
            if found is None:
                continue
            row, value = found
            packed = "seq_lengths" in dataset.column_names
            raise DataError(f"token id {value} in the {name} data{' (a packed row)' if packed else ''}: the model's "
                            f"input embedding has {rows} rows (ids 0 to {rows - 1})",
                            row=_input_row(dataset, start + row, name, dropped), column=column,
                            fix="resize the model to its tokenizer, model.resize_token_embeddings(len(tokenizer)), "
                            "or tokenize with the model's own tokenizer")  # fmt: skip
    if "labels" in dataset.column_names and "input_ids" in dataset.column_names:
        _check_labels(dataset, _head_rows(model, rows), name, dropped)


def _head_rows(model, rows: int) -> int:
    """The rows of the model's LM head (the ids a label may hold); ``rows``, the input embedding's, where unknown."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = getattr(head, "out_features", None)  # (a quantized head's weight is packed: its shape is not the rows)
    return out if isinstance(out, int) else rows


def _check_labels(dataset: datasets.Dataset, rows: int, name: str, dropped: dict | None) -> None:
    """A ``DataError`` at the first row whose ``labels`` are not as many as its ``input_ids``, or hold an id the head
    has no row for (or a negative one other than -100, the ignored label): found mid-training before, when the
    step reached the row (a batch's row named, or the head's error naming none)."""
    import pyarrow.compute as pc

    packed = " (a packed row)" if "seq_lengths" in dataset.column_names else ""
    batches = dataset.select_columns(["input_ids", "labels"]).with_format("arrow").iter(_BATCH)
    for start, batch in zip(range(0, len(dataset), _BATCH), batches, strict=False):
        ids, labels = batch["input_ids"], batch["labels"]
        unequal = pc.not_equal(pc.list_value_length(ids), pc.list_value_length(labels))
        if pc.any(unequal).as_py():
            at = pc.index(unequal, True).as_py()
            raise DataError(f"the {name} data{packed} has {len(labels[at])} labels for {len(ids[at])} input_ids",
                            row=_input_row(dataset, start + at, name, dropped), column="labels",
                            fix="give every row one label per input id (-100 where no loss is wanted)")  # fmt: skip
        found = _first_outside(labels, rows, ignored=-100)
        if found is None:
            continue
        row, value = found
        raise DataError(f"label {value} in the {name} data{packed}: the model's head has {rows} rows "
                        f"(ids 0 to {rows - 1}), and -100 marks a token without a loss",
                        row=_input_row(dataset, start + row, name, dropped), column="labels",
                        fix="use -100 for the tokens without a loss, and the model's own tokenizer's ids")  # fmt: skip


def _first_outside(ids, rows: int, ignored: int | None = None) -> tuple[int, int] | None:
    """(row within the batch, value) of the first id in the Arrow list array ``ids`` outside [0, ``rows``) but
    ``ignored``; None where every one is within."""
    import pyarrow.compute as pc

    flat = pc.list_flatten(ids)
    if len(flat) == 0:
        return None
    bad = pc.or_(pc.greater_equal(flat, rows), pc.less(flat, 0))
    if ignored is not None:
        bad = pc.and_(bad, pc.not_equal(flat, ignored))
    if not pc.any(bad).as_py():
        return None
    first = pc.index(bad, True).as_py()
    return int(pc.list_parent_indices(ids).to_numpy()[first]), flat[first].as_py()


def _input_row(dataset: datasets.Dataset, row: int, name: str, dropped: dict | None) -> int:
    """Row ``row`` of the prepared ``dataset`` as the input numbers it (past the rows tokenization dropped; a
    selected or shuffled dataset's table row); a packed dataset's rows are its packed rows."""
    gone = sorted(r for rows_of in ((dropped or {}).get(name) or {}).values() for r in rows_of)
    if dataset._indices is not None:  # rows selected (those dropped left out), shuffled: the table's row
        row, gone = int(dataset._indices.column(0)[row].as_py()), []
    if "seq_lengths" in dataset.column_names:
        return row
    for earlier in gone:  # past the rows dropped before it
        row += earlier <= row
    return source_rows(name, [row])[0]  # (the data file's row, in a run of the fastdpo command)


_POSITIONS = re.compile(r"(^|\.)(wpe|embed_positions|position_embeddings)$")


def position_limit(model) -> int | None:
    """The positions a model with a learned absolute position table has (GPT-2's ``wpe``, OPT's ``embed_positions``
    less its offset of 2, ...); None for rotary, ALiBi and the like, which take any position."""
    from torch import nn

    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for module_name, module in model.named_modules():
        if isinstance(module, nn.Embedding) and module is not embeddings and _POSITIONS.search(module_name):
            return module.num_embeddings - int(getattr(module, "offset", 0) or 0)
    return None


def kept_as_given(args) -> bool:
    """Whether an SFT trainer keeps its sequences as given: ``dataset_kwargs``' ``skip_prepare_dataset``."""
    return bool((getattr(args, "dataset_kwargs", None) or {}).get("skip_prepare_dataset"))


def cut_length(args) -> int | None:
    """The length an SFT trainer cuts sequences to: ``max_length``; None where it keeps them as given
    (``kept_as_given``: a longer one passed the position check, then failed)."""
    return None if kept_as_given(args) else args.max_length


def check_positions_as_cut(dataset, model, name: str, args, dropped: dict | None = None) -> None:
    """``check_positions`` for a trainer's ``args``: its sequences as it cuts them (``cut_length``), the fix for
    those it keeps as given (``kept_as_given``) saying to cut them."""
    check_positions(dataset, model, name, cut_length(args), dropped, as_given=kept_as_given(args))


def check_positions(dataset, model, name: str, max_length: int | None, dropped: dict | None = None, *,
                    as_given: bool = False) -> None:  # fmt: skip
    """A ``DataError`` at the first row of ``dataset`` (tokenized; a dict of them; streams are not read) with a
    sequence longer, once cut to ``max_length``, than the model's learned position table (``position_limit``): it
    failed deep inside the embedding (``IndexError``; on a GPU a device-side assert), TRL's too. A DPO row's
    sequences are its prompt + each completion; a packed row's are its ``seq_lengths``. ``as_given``: sequences that
    nothing cuts (``kept_as_given``), which the fix says."""
    if isinstance(dataset, dict):
        for key, part in dataset.items():
            check_positions(part, model, f"{name}_{key}", max_length, dropped, as_given=as_given)
        return
    limit = position_limit(model)
    if limit is None or not isinstance(dataset, datasets.Dataset) or len(dataset) == 0:
        return
    names = dataset.column_names
    columns = (["seq_lengths"] if "seq_lengths" in names else ["input_ids"] if "input_ids" in names
               else ["prompt_ids", "chosen_ids", "rejected_ids"])  # fmt: skip
    if not set(columns) <= set(names):
        return
    found = _first_over(dataset, columns, limit, max_length)
    if found is not None:
        row, longest = found
        packed = " (a packed row)" if columns == ["seq_lengths"] else ""
        raise DataError(f"a sequence of {longest} tokens in the {name} data{packed}: {type(model).__name__} has a "
                        f"learned position table of {limit} positions", row=_input_row(dataset, row, name, dropped),
                        column=columns[0], fix=f"cut the sequences to at most {limit} tokens (skip_prepare_dataset "
                        "keeps them as given), or drop such rows" if as_given else f"set max_length to at most "
                        f"{limit} (a longer sequence is cut to it), or drop such rows")  # fmt: skip


def check_pack_length(dataset, collator, name: str, dropped: dict | None = None) -> None:
    """A ``DataError`` at the first row of a tokenized DPO ``dataset`` (a dict of them; streams are not read) whose
    sequence (or, ``packing=False``, pair) is longer than the rows of ``collator`` (a ``PairPacker`` with a
    ``pack_length``; ``max_length`` None lets sequences be any length): the collator refused it mid-training,
    naming its place in the batch."""
    if isinstance(dataset, dict):
        for key, part in dataset.items():
            check_pack_length(part, collator, f"{name}_{key}", dropped)
        return
    capacity = getattr(collator, "pack_length", None)
    columns = ["prompt_ids", "chosen_ids", "rejected_ids"]
    if capacity is None or not isinstance(dataset, datasets.Dataset) or not set(columns) <= set(dataset.column_names):
        return
    found = _first_over(dataset, columns, capacity, collator.max_length, pairs=not collator.packing)
    if found is not None:
        what = "sequence" if collator.packing else "pair (chosen + rejected: packing=False)"
        cut = "set max_length" if collator.max_length is None else f"lower max_length (now {collator.max_length})"
        room = "" if collator.packing else ": a pair's row holds both sequences, up to 2 × max_length"
        raise DataError(f"the {what} is {found[1]} tokens in the {name} data but pack_length is {capacity}",
                        row=_input_row(dataset, found[0], name, dropped), column="prompt_ids",
                        fix=f"raise pack_length (or leave it unset){room}; or {cut}")  # fmt: skip


def _first_over(dataset: datasets.Dataset, columns: list[str], limit: int, max_length: int | None,
                pairs: bool = False) -> tuple[int, int] | None:  # fmt: skip
    """(row, length) of the first row of ``dataset`` longer than ``limit``: its packed sequences (``seq_lengths``),
    its ``input_ids``, or its DPO sequences (prompt + each completion, each cut to ``max_length``; ``pairs``: both
    together); None where none is."""
    import numpy as np
    import pyarrow.compute as pc

    batches = dataset.select_columns(columns).with_format("arrow").iter(_BATCH)
    for start, batch in zip(range(0, len(dataset), _BATCH), batches, strict=False):
        if columns == ["seq_lengths"]:
            lengths = np.array([max(row or [0]) for row in batch["seq_lengths"].to_pylist()])
        else:
            lengths = [pc.list_value_length(batch[c]).to_numpy(zero_copy_only=False) for c in columns]
            if len(lengths) == 3:  # a DPO row: its two sequences, each cut to max_length
                both = [lengths[0] + lengths[i] for i in (1, 2)]
                both = [np.minimum(n, max_length) if max_length is not None else n for n in both]
                lengths = both[0] + both[1] if pairs else np.maximum(*both)
            else:
                lengths = lengths[0]
        if max_length is not None and not pairs:
            lengths = np.minimum(lengths, max_length)
        over = np.nonzero(lengths > limit)[0]
        if over.size:
            return start + int(over[0]), int(lengths[over[0]])
    return None
