"""Token ids the model has embeddings for: a token added to the tokenizer but not to the model (no
``resize_token_embeddings``) failed deep inside torch's embedding (``IndexError: index out of range in self``)."""

from __future__ import annotations

import datasets

from fastdpo.errors import DataError

ID_COLUMNS = ("input_ids", "prompt_ids", "chosen_ids", "rejected_ids")
_BATCH = 4096


def check_token_ids(dataset, model, name: str) -> None:
    """A ``DataError`` at the first row of ``dataset`` (a tokenized ``Dataset``, or a dict of them; streams are not
    read) holding a token id the model's input embedding has no row for, or a negative one."""
    if isinstance(dataset, dict):
        for key, part in dataset.items():
            check_token_ids(part, model, f"{name}_{key}")
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
            bad = pc.or_(pc.greater_equal(flat, rows), pc.less(flat, 0))
            row = int(pc.list_parent_indices(ids).to_numpy()[pc.index(bad, True).as_py()])
            value = flat[pc.index(bad, True).as_py()].as_py()
            raise DataError(f"token id {value} in the {name} data: the model's input embedding has {rows} rows "
                            f"(ids 0 to {rows - 1})", row=start + row, column=column,
                            fix="resize the model to its tokenizer, model.resize_token_embeddings(len(tokenizer)), "
                            "or tokenize with the model's own tokenizer")  # fmt: skip
