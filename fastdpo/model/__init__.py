"""The model layer: run a Hugging Face causal LM body on a ``PackedBatch``; log-probs through the fused head.

from fastdpo.model import packed_logps
out = packed_logps(model, batch)          # .logp [R·L], .seq_logps [S], .seq_num_tokens [S]
"""

from fastdpo.model.attention import PACKED_ATTENTION, VARLEN, packed_attention, use_attention, varlen_attention
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
    "PACKED_ATTENTION",
    "VARLEN",
    "BodyOutput",
    "HeadSpec",
    "PackedLogps",
    "head_spec",
    "packed_attention",
    "packed_body",
    "packed_hidden_states",
    "packed_logps",
    "run_head",
    "use_attention",
    "varlen_attention",
]
