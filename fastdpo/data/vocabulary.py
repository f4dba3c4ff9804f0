"""Token ids the model has embeddings for: a token added to the tokenizer but not to the model (no
``resize_token_embeddings``) failed deep inside torch's embedding (``IndexError: index out of range in self``)."""

from __future__ import annotations

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
            gone = sorted(r for rows_of in ((dropped or {}).get(name) or {}).values() for r in rows_of)
            if dataset._indices is not None:  # rows selected (those dropped left out), shuffled: the table's row
                row, gone = int(dataset._indices.column(0)[row].as_py()), []
            for earlier in [] if packed else gone:  # the input's numbering: past the rows dropped before it
                row += earlier <= row
            raise DataError(f"token id {value} in the {name} data{' (a packed row)' if packed else ''}: the model's "
                            f"input embedding has {rows} rows (ids 0 to {rows - 1})", row=row, column=column,
                            fix="resize the model to its tokenizer, model.resize_token_embeddings(len(tokenizer)), "
                            "or tokenize with the model's own tokenizer")  # fmt: skip
