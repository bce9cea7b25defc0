"""The chapter's causal and multi-head modules, on selfattn's core.

They keep the chapter's constructor signatures, parameter and buffer names (``W_query``,
``W_key``, ``W_value``, ``out_proj``, ``mask``) and order of creation, so the same seed gives the
same weights and a ``state_dict`` saved from the chapter's code loads with ``strict=True``.
Dropout acts on the attention weights, as in the chapter; on the "naive" engine it even draws the
same random numbers.

Each class takes ``backend=`` (default "auto"): every engine gives the same results within
floating-point tolerance.

Shapes: B batch, L tokens (<= context_length), d_in input width, d_out output width,
H heads, D = d_out / H head width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from selfattn._checks import merge_heads, positive_int, probability, split_heads, token_input
from selfattn.functional import attention
from selfattn.recording import record


def _future_mask(context_length: int) -> Tensor:
    """The chapter's buffer: 1 above the diagonal (future positions), (context_length,)*2."""
    return torch.triu(torch.ones(context_length, context_length), diagonal=1)


def _check_length(length: int, context_length: int, module: str) -> None:
    if length > context_length:
        raise ValueError(
            f"{module} got a sequence of {length} tokens, longer than context_length="
            f"{context_length}"
        )


class CausalAttention(nn.Module):
    """Single-head causal self-attention: each token attends to itself and earlier tokens.

    x (..., L, d_in) -> (..., L, d_out). Parameters as `SelfAttention_v2`, plus the chapter's
    ``mask`` buffer and ``nn.Dropout(dropout)`` on the attention weights.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        qkv_bias: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_in = positive_int("d_in", d_in)
        self.d_out = positive_int("d_out", d_out)
        self.context_length = positive_int("context_length", context_length)
        self.backend = backend
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(probability("dropout", dropout))
        self.register_buffer("mask", _future_mask(context_length))

    def forward(self, x: Tensor) -> Tensor:
        x = token_input(x, self.d_in, type(self).__name__)
        _check_length(x.shape[-2], self.context_length, type(self).__name__)
        record("inputs", x)
        q = split_heads(self.W_query(x), 1)  # (..., L, d_in) -> (N, 1, L, d_out)
        k = split_heads(self.W_key(x), 1)  # (N, 1, L, d_out)
        v = split_heads(self.W_value(x), 1)  # (N, 1, L, d_out)
        record("queries", q)
        record("keys", k)
        record("values", v)
        p = self.dropout.p if self.training else 0.0
        context = attention(q, k, v, is_causal=True, dropout_p=p, backend=self.backend)
        out = merge_heads(context, x.shape[:-2])  # (N, 1, L, d_out) -> (..., L, d_out)
        record("output", out)
        return out


class MultiHeadAttentionWrapper(nn.Module):
    """``num_heads`` independent `CausalAttention` heads, concatenated: (..., L, d_out * H).

    The chapter's first multi-head design, kept for comparison: H separate projections and H
    attention calls. `MultiHeadAttention` does the same work in one batched call.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
        *,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        positive_int("num_heads", num_heads)
        self.heads = nn.ModuleList(
            [
                CausalAttention(d_in, d_out, context_length, dropout, qkv_bias, backend=backend)
                for _ in range(num_heads)
            ]
        )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.cat([head(x) for head in self.heads], dim=-1)  # (..., L, d_out * H)
        record("output", out)  # after the heads' own records: the trace keeps this one
        return out


class MultiHeadAttention(nn.Module):
    """Multi-head attention with one set of projections split into heads, and an output projection.

    x (..., L, d_in) -> (..., L, d_out). With the defaults it is exactly the chapter's class; the
    keyword-only extras grow it into what models use:

    Args:
        d_in, d_out, context_length, dropout, num_heads, qkv_bias: as in the chapter;
            d_out must be divisible by num_heads.
        num_kv_heads: key/value heads for grouped-query attention (1 = multi-query). Default:
            num_heads. ``W_key`` and ``W_value`` then project to num_kv_heads * D.
        causal: mask future tokens (the chapter's behaviour). ``False`` gives an encoder
            (bidirectional) attention, as in BERT.
        window: with causal, each token sees only its ``window`` most recent tokens.
        backend: the engine, "auto" by default.

    ``forward(x, use_cache=False, padding_mask=None)``:
        padding_mask: (B, L_keys) bool, True = a real token that may be attended to. (This is
            the opposite polarity of ``nn.MultiheadAttention``'s key_padding_mask; selfattn uses
            True = may attend everywhere.)
        use_cache: incremental decoding. The keys and values of every call are kept in a cache
            pre-allocated for ``context_length`` tokens, and the new queries attend to all cached
            keys (causal, bottom-right aligned). Feed the prompt, then one token at a time;
            `reset_cache()` starts a new sequence. A full cache is a ValueError.
    """

    def __init__(
        self,
        d_in: int,
        d_out: int,
        context_length: int,
        dropout: float,
        num_heads: int,
        qkv_bias: bool = False,
        *,
        num_kv_heads: int | None = None,
        causal: bool = True,
        window: int | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        self.d_in = positive_int("d_in", d_in)
        self.d_out = positive_int("d_out", d_out)
        self.context_length = positive_int("context_length", context_length)
        self.num_heads = positive_int("num_heads", num_heads)
        if d_out % num_heads != 0:
            raise ValueError(f"d_out ({d_out}) must be divisible by num_heads ({num_heads})")
        self.num_kv_heads = positive_int(
            "num_kv_heads", num_heads if num_kv_heads is None else num_kv_heads
        )
        if num_heads % self.num_kv_heads != 0:
            raise ValueError(
                f"num_heads ({num_heads}) must be divisible by num_kv_heads ({self.num_kv_heads})"
            )
        if window is not None:
            positive_int("window", window)
            if not causal:
                raise ValueError(f"window={window} needs causal=True")
        self.head_dim = d_out // num_heads
        self.causal = causal
        self.window = window
        self.backend = backend
        kv_out = self.num_kv_heads * self.head_dim

        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, kv_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, kv_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(probability("dropout", dropout))
        self.register_buffer("mask", _future_mask(context_length))
        # The KV cache: allocated on first use, not part of the state_dict.
        self.register_buffer("cache_k", None, persistent=False)
        self.register_buffer("cache_v", None, persistent=False)
        self.cache_len = 0

    def reset_cache(self) -> None:
        """Forget the cached keys and values: the next ``use_cache=True`` call starts afresh."""
        self.cache_k, self.cache_v, self.cache_len = None, None, 0

    def forward(
        self, x: Tensor, use_cache: bool = False, padding_mask: Tensor | None = None
    ) -> Tensor:
        name = type(self).__name__
        x = token_input(x, self.d_in, name)
        length = x.shape[-2]
        _check_length(length, self.context_length, name)
        record("inputs", x)
        q = split_heads(self.W_query(x), self.num_heads)  # (..., L, d_in) -> (B, H, L, D)
        k = split_heads(self.W_key(x), self.num_kv_heads)  # (B, Hkv, L, D)
        v = split_heads(self.W_value(x), self.num_kv_heads)  # (B, Hkv, L, D)
        if use_cache:
            k, v = self._append_to_cache(k, v)  # (B, Hkv, cache_len, D)
        record("queries", q)
        record("keys", k)
        record("values", v)
        mask = None if padding_mask is None else self._padding(padding_mask, q, k)
        context = attention(
            q,
            k,
            v,
            attn_mask=mask,
            is_causal=self.causal,
            window=self.window,
            dropout_p=self.dropout.p if self.training else 0.0,
            backend=self.backend,
        )  # (B, H, L, D)
        merged = merge_heads(context, x.shape[:-2])  # (B, H, L, D) -> (..., L, d_out)
        out = self.out_proj(merged)  # (..., L, d_out)
        record("output", out)
        return out

    def _append_to_cache(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        if k.requires_grad:
            raise ValueError(
                "use_cache=True is for inference: decode under torch.no_grad() (or "
                "torch.inference_mode()); a cache written by one step cannot be backpropagated "
                "through by the next"
            )
        batch, new = k.shape[0], k.shape[-2]
        if self.cache_k is None:
            shape = (batch, self.num_kv_heads, self.context_length, self.head_dim)
            self.cache_k = k.new_zeros(shape)
            self.cache_v = v.new_zeros((*shape[:-1], v.shape[-1]))
        elif self.cache_k.shape[0] != batch:
            raise ValueError(
                f"the KV cache holds a batch of {self.cache_k.shape[0]}, got {batch}; "
                "call reset_cache() before a new batch"
            )
        end = self.cache_len + new
        if end > self.context_length:
            raise ValueError(
                f"KV cache full: {self.cache_len} cached + {new} new tokens exceed "
                f"context_length={self.context_length}; call reset_cache()"
            )
        self.cache_k[:, :, self.cache_len : end] = k  # written in place: no re-allocation
        self.cache_v[:, :, self.cache_len : end] = v
        self.cache_len = end
        return self.cache_k[:, :, :end], self.cache_v[:, :, :end]

    def _padding(self, padding_mask: Tensor, q: Tensor, k: Tensor) -> Tensor:
        if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool:
            got = padding_mask.dtype if isinstance(padding_mask, Tensor) else type(padding_mask)
            raise TypeError(f"padding_mask must be a bool tensor (B, L_keys), got {got}")
        expected = (q.shape[0], k.shape[-2])
        if tuple(padding_mask.shape) != expected:
            raise ValueError(
                f"padding_mask must have shape (B, L_keys) = {expected}, "
                f"got {tuple(padding_mask.shape)}"
            )
        return padding_mask[:, None, None, :]  # (B, 1, 1, Lk)
