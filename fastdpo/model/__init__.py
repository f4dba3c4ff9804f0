"""The model layer: run a Hugging Face causal LM body on a ``PackedBatch``; log-probs through the fused head.

from fastdpo.model import packed_logps
out = packed_logps(model, batch)          # .logp [R·L], .seq_logps [S], .seq_num_tokens [S]
"""

from fastdpo.model.packed import (
    MASK_BACKENDS,
    BodyOutput,
    HeadSpec,
    PackedLogps,
    head_spec,
    packed_body,
    packed_hidden_states,
    packed_logps,
    run_head,
)

__all__ = [
    "MASK_BACKENDS",
    "BodyOutput",
    "HeadSpec",
    "PackedLogps",
    "head_spec",
    "packed_body",
    "packed_hidden_states",
    "packed_logps",
    "run_head",
]
