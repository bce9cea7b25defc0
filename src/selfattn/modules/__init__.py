"""The chapter's attention modules, on selfattn's core.

self_attention.py    SelfAttention_v1 (raw matrices, ``x @ W``), SelfAttention_v2 (nn.Linear)
causal_multihead.py  CausalAttention, MultiHeadAttentionWrapper, MultiHeadAttention
"""

from selfattn.modules.causal_multihead import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
)
from selfattn.modules.self_attention import SelfAttention_v1, SelfAttention_v2

__all__ = [
    "CausalAttention",
    "MultiHeadAttention",
    "MultiHeadAttentionWrapper",
    "SelfAttention_v1",
    "SelfAttention_v2",
]
