"""Token ids the model has embeddings for: a token added to the tokenizer but not to the model (no
``resize_token_embeddings``) failed deep inside torch's embedding (``IndexError: index out of range in self``)."""

from __future__ import annotations

import re

import datasets

from fastdpo.errors import DataError

ID_COLUMNS = ("input_ids", "prompt_ids", "chosen_ids", "rejected_ids")
_BATCH = 4096


def check_token_ids(dataset, model, name: str, dropped: dict | None = None) -> None:
    """A ``DataError`` at the first row of ``dataset`` (a tokenized ``Dataset``, or a dict of them; streams are not
    read) holding a token id the model's input embedding has no row for, or a negative one. ``dropped``: the rows
    tokenization dropped (split → reason → input rows, the trainers' ``dropped_rows``), so that the row is named as
    the input numbers it; a packed dataset's rows are named as packed rows."""
    if isinstance(dataset, dict):
        for key, part in dataset.items():
            check_token_ids(part, model, f"{name}_{key}", dropped)
        return
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if not isinstance(dataset, datasets.Dataset) or not isinstance(rows, int):
        return
    import pyarrow.compute as pc

    for column in (c for c in ID_COLUMNS if c in dataset.column_names):
        batches = dataset.select_columns([column]).with_format("arrow").iter(_BATCH)
        for start, batch in zip(range(0, len(dataset), _BATCH), batches, strict=False):
            ids = batch[column]
            flat = pc.list_flatten(ids)
            if len(flat) == 0:
                continue
            low, high = pc.min_max(flat).values()
            if high.as_py() < rows and low.as_py() >= 0:
                continue
            first = pc.index(pc.or_(pc.greater_equal(flat, rows), pc.less(flat, 0)), True).as_py()
            row = start + int(pc.list_parent_indices(ids).to_numpy()[first])
            value = flat[first].as_py()
            packed = "seq_lengths" in dataset.column_names
            row = _input_row(dataset, row, name, dropped)
            raise DataError(f"token id {value} in the {name} data{' (a packed row)' if packed else ''}: the model's "
                            f"input embedding has {rows} rows (ids 0 to {rows - 1})", row=row, column=column,
                            fix="resize the model to its tokenizer, model.resize_token_embeddings(len(tokenizer)), "
                            "or tokenize with the model's own tokenizer")  # fmt: skip


def _input_row(dataset: datasets.Dataset, row: int, name: str, dropped: dict | None) -> int:
    """Row ``row`` of the prepared ``dataset`` as the input numbers it (past the rows tokenization dropped; a
    selected or shuffled dataset's table row); a packed dataset's rows are its packed rows."""
    gone = sorted(r for rows_of in ((dropped or {}).get(name) or {}).values() for r in rows_of)
    if dataset._indices is not None:  # rows selected (those dropped left out), shuffled: the table's row
        row, gone = int(dataset._indices.column(0)[row].as_py()), []
    for earlier in [] if "seq_lengths" in dataset.column_names else gone:  # past the rows dropped before it
        row += earlier <= row
    return row


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


def check_positions(dataset, model, name: str, max_length: int | None, dropped: dict | None = None) -> None:
    """A ``DataError`` at the first row of ``dataset`` (tokenized; a dict of them; streams are not read) with a
    sequence longer, once cut to ``max_length``, than the model's learned position table (``position_limit``): it
    failed deep inside the embedding (``IndexError``; on a GPU a device-side assert), TRL's too. A DPO row's
    sequences are its prompt + each completion; a packed row's are its ``seq_lengths``."""
    if isinstance(dataset, dict):
        for key, part in dataset.items():
            check_positions(part, model, f"{name}_{key}", max_length, dropped)
        return
    limit = position_limit(model)
    if limit is None or not isinstance(dataset, datasets.Dataset) or len(dataset) == 0:
        return
    import numpy as np
    import pyarrow.compute as pc

    names = dataset.column_names
    columns = (["seq_lengths"] if "seq_lengths" in names else ["input_ids"] if "input_ids" in names
               else ["prompt_ids", "chosen_ids", "rejected_ids"])  # fmt: skip
    if not set(columns) <= set(names):
        return
    batches = dataset.select_columns(columns).with_format("arrow").iter(_BATCH)
    for start, batch in zip(range(0, len(dataset), _BATCH), batches, strict=False):
        if columns == ["seq_lengths"]:
            lengths = np.array([max(row or [0]) for row in batch["seq_lengths"].to_pylist()])
        else:
            lengths = [pc.list_value_length(batch[c]).to_numpy(zero_copy_only=False) for c in columns]
            lengths = lengths[0] if len(lengths) == 1 else lengths[0] + np.maximum(lengths[1], lengths[2])
        if max_length is not None:
            lengths = np.minimum(lengths, max_length)
        over = np.nonzero(lengths > limit)[0]
        if over.size:
            row = _input_row(dataset, start + int(over[0]), name, dropped)
            longest = int(lengths[over[0]])
            raise DataError(f"a sequence of {longest} tokens in the {name} data: {type(model).__name__} has a learned "
                            f"position table of {limit} positions", row=row, column=columns[0],
                            fix=f"set max_length to at most {limit} (a longer sequence is cut to it), or drop such "
                            "rows")  # fmt: skip
