"""selfattn: scaled dot-product self-attention you can read, see and ship."""

from selfattn.engines import available as available_backends
from selfattn.functional import (
    attention,
    attention_with_lse,
    attention_with_weights,
    merge_partials,
)
from selfattn.masks import causal_mask, key_padding_mask, sliding_window_mask
from selfattn.modules.causal_multihead import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
)
from selfattn.modules.self_attention import SelfAttention_v1, SelfAttention_v2
from selfattn.trace import Trace, trace, trace_all

__all__ = [
    "CausalAttention",
    "MultiHeadAttention",
    "MultiHeadAttentionWrapper",
    "SelfAttention_v1",
    "SelfAttention_v2",
    "Trace",
    "attention",
    "attention_with_lse",
    "attention_with_weights",
    "available_backends",
    "causal_mask",
    "key_padding_mask",
    "merge_partials",
    "sliding_window_mask",
    "trace",
    "trace_all",
]

__version__ = "0.1.0"
