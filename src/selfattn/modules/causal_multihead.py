"""The chapter's causal and multi-head modules, on selfattn's core.

They keep the chapter's constructor signatures, parameter names (``W_query``, ``W_key``,
``W_value``, ``out_proj``) and order of creation, so the same seed gives the same weights. The
chapter's (context_length, context_length) ``mask`` buffer is not kept, so a module's memory does
not grow with context_length, but its ``state_dict`` still has the ``mask`` entry: a
``state_dict`` saved by the chapter's code loads here with ``strict=True``, and ours loads into
the chapter's classes (see `_ChapterState`). `state_bytes` measures a module's parameters and
buffers.

Dropout acts on the attention weights, as in the chapter; on the "naive" engine it even draws the
same random numbers.

Each class takes ``backend=`` (default "auto"): every engine gives the same results within
floating-point tolerance.

Shapes: B batch, L tokens (<= context_length), d_in input width, d_out output width,
H heads, D = d_out / H head width.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from selfattn._checks import (
    check_window,
    merge_heads,
    positive_int,
    probability,
    split_heads,
    token_input,
)
from selfattn.functional import attention
from selfattn.recording import one_layer, record

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def state_bytes(module: nn.Module) -> int:
    """The bytes a module holds in its parameters and buffers (a KV cache once allocated), each
    tensor counted once: its "module state memory", whatever memory its forward then takes."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.nbytes for t in tensors.values())


def _future_mask(context_length: int, like: Tensor) -> Tensor:
    """The chapter's buffer: 1 above the diagonal (future positions), (context_length,)*2, in
    ``like``'s dtype and on its device."""
    n = context_length
    return torch.ones(n, n, dtype=like.dtype, device=like.device).triu_(diagonal=1)


_SAVING = threading.local()  # .without_mask: state_dict() leaves the chapter's mask out


@contextmanager
def without_chapter_masks() -> Iterator[None]:
    """In the ``with`` block, ``state_dict()`` of these modules has no chapter ``mask`` entry
    and builds none: how selfattn's own checkpoints save (they rebuild nothing on load either),
    so a long context costs no context_length² floats per layer at a save."""
    before = getattr(_SAVING, "without_mask", False)
    _SAVING.without_mask = True
    try:
        yield
    finally:
        _SAVING.without_mask = before


class _ChapterState(nn.Module):
    """The chapter's ``mask`` buffer in the ``state_dict``, without keeping it in memory.

    The chapter registers a float (context_length, context_length) buffer, 1 above the diagonal,
    that its forward slices; selfattn's engines apply the causal rule without it, so keeping it
    would cost context_length² floats for nothing (4 GiB at 32k tokens). Instead:

    * saving writes the chapter's ``mask`` where its buffer would be (first of the module's own
      entries), built on demand in the dtype and on the device of ``W_query``: the chapter's
      class loads it with ``strict=True``. (So ``state_dict()`` itself does cost that memory;
      `without_chapter_masks` saves without it.)
    * loading accepts a ``mask`` entry, checks that it is the chapter's for this context_length
      (a ValueError otherwise), and drops it; a state_dict without one loads too.
    """

    context_length: int
    W_query: nn.Linear

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if not getattr(_SAVING, "without_mask", False):
            destination[prefix + "mask"] = _future_mask(self.context_length, self.W_query.weight)

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        mask = state_dict.pop(prefix + "mask", None)  # load_state_dict passes us a copy
        if mask is not None:
            _check_chapter_mask(mask, self.context_length, prefix + "mask")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


def _check_chapter_mask(mask: Tensor, context_length: int, key: str) -> None:
    n = context_length
    if not isinstance(mask, Tensor) or tuple(mask.shape) != (n, n):
        got = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
        raise ValueError(
            f"{key} in the state_dict must be the chapter's causal mask of shape "
            f"(context_length, context_length) = ({n}, {n}), got {got}: was it saved with "
            "another context_length?"
        )
    if not mask.is_meta and not torch.equal(mask, torch.ones_like(mask).triu_(diagonal=1)):
        raise ValueError(
            f"{key} in the state_dict is not the chapter's causal mask (1 above the diagonal, "
            "0 elsewhere); selfattn's modules apply the causal rule themselves and cannot load "
            "another mask"
        )


def _stackable(projections: tuple[nn.Module, ...]) -> bool:
    """Whether calling each of ``projections`` is exactly ``F.linear(x, weight, bias)``, so
    they can run as one matmul on their stacked weights: plain ``nn.Linear`` (no subclass),
    all biased or none, and no hook, theirs or global, forward or backward, that a call would
    run."""
    hooks = nn.modules.module
    if any((hooks._global_forward_hooks, hooks._global_forward_pre_hooks,
            hooks._global_backward_hooks, hooks._global_backward_pre_hooks)):  # fmt: skip
        return False
    if len({m.bias is None for m in projections}) != 1:
        return False
    return all(
        type(m) is nn.Linear
        and not (m._forward_hooks or m._forward_pre_hooks)
        and not (m._backward_hooks or m._backward_pre_hooks)
        for m in projections
    )


def _check_length(length: int, context_length: int, module: str) -> None:
    if length > context_length:
        raise ValueError(
            f"{module} got a sequence of {length} tokens, longer than context_length="
            f"{context_length}"
        )


def _check_context_parallel(
    group: ProcessGroup | None, layout: str, window: int | None, dropout: float
) -> str:
    """The layout, checked, and what ring attention cannot do refused (a ValueError).

    The ring (and with it torch.distributed) is imported only when it is asked for: a group, or
    a layout other than the default.
    """
    if group is not None or layout != "zigzag":
        from selfattn.ring.layouts import check_layout

        check_layout(layout)
    if group is not None and (window is not None or probability("dropout", dropout) > 0):
        raise ValueError(
            "context_parallel_group: ring attention has no sliding window and no attention "
            f"dropout; got window={window}, dropout={dropout} (use None and 0.0)"
        )
    return layout


class CausalAttention(_ChapterState):
    """Single-head causal self-attention: each token attends to itself and earlier tokens.

    x (..., L, d_in) -> (..., L, d_out). Parameters as `SelfAttention_v2`, and
    ``nn.Dropout(dropout)`` on the attention weights; the ``state_dict`` also has the chapter's
    ``mask`` (see `_ChapterState`).
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
        with one_layer():  # for selfattn.trace: the heads are one layer, side by side
            out = torch.cat([head(x) for head in self.heads], dim=-1)  # (..., L, d_out * H)
            record("output", out)  # after the heads' own records: the trace keeps this one
        return out


class MultiHeadAttention(_ChapterState):
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
        context_parallel_group: a ``torch.distributed`` process group of P ranks that share one
            sequence (context parallelism; ring attention, `selfattn.ring`). Default
            None: the whole sequence is here. With a group, every rank of it calls forward at
            once with its own shard of the sequence, x (..., L / P, d_in) in
            ``context_parallel_layout`` order (``selfattn.ring.shard_sequence(x, rank, P,
            layout)`` cuts it), and gets its rows of the output, (..., L / P, d_out). The
            projections run locally; attention runs ring-wide, over all L tokens. Backward too
            runs on every rank at once, and leaves on each rank its shard's share of the
            parameters' gradients: sum them over the group (``all_reduce``, or DDP over the
            same ranks). ``context_length`` bounds the whole L. Not with ``window``,
            ``dropout`` > 0, ``use_cache`` or ``padding_mask`` (a ValueError); ``backend``
            computes each ring block ("fused", "tiled" or "auto"; see `ring_attention`).
        context_parallel_layout: how the sequence is sharded: "zigzag" (the default, equal
            work per rank under the causal mask; L a multiple of 2P) or "contiguous" (rank r
            holds tokens [r·L/P, (r+1)·L/P)).

    ``forward(x, use_cache=False, padding_mask=None)``:
        padding_mask: (B, L_keys) bool, True = a real token that may be attended to. (This is
            the opposite polarity of ``nn.MultiheadAttention``'s key_padding_mask; selfattn uses
            True = may attend everywhere.)
        use_cache: incremental decoding. The keys and values of every call are kept in a cache
            pre-allocated for ``context_length`` tokens, and the new queries attend to all cached
            keys (causal, bottom-right aligned). Feed the prompt, then one token at a time;
            `reset_cache()` starts a new sequence. A full cache is a ValueError. A call is all or
            nothing: one that raises (a bad padding_mask, a full cache, an error in attention)
            leaves the cache exactly as it was, so it can be retried. ``use_cache`` must be a
            bool (a TypeError otherwise). Decoding is for eval mode: in training mode each
            step's attention weights go through dropout like any forward's, so the same prompt
            decodes differently from run to run; call ``eval()`` first. Decode under
            ``torch.no_grad()`` or ``torch.inference_mode()``, switching freely: a cache made
            under inference mode is copied once into normal tensors when decoding goes on
            outside it.

    The ``state_dict`` also has the chapter's ``mask`` (see `_ChapterState`).
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
        context_parallel_group: ProcessGroup | None = None,
        context_parallel_layout: str = "zigzag",
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
        check_window(window, causal, "causal")
        self.head_dim = d_out // num_heads
        self.causal = causal
        self.window = window
        self.backend = backend
        self.context_parallel_group = context_parallel_group
        self.context_parallel_layout = _check_context_parallel(
            context_parallel_group, context_parallel_layout, window, dropout
        )
        kv_out = self.num_kv_heads * self.head_dim

        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, kv_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, kv_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(probability("dropout", dropout))
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
        if not isinstance(use_cache, bool):
            raise TypeError(
                f"use_cache must be a bool, got {type(use_cache).__name__} {use_cache!r}"
            )
        x = token_input(x, self.d_in, name)
        length = x.shape[-2]
        if self.context_parallel_group is not None:
            if use_cache or padding_mask is not None:
                raise ValueError(
                    f"{name} with context_parallel_group supports neither use_cache nor "
                    "padding_mask"
                )
            from selfattn.ring.comm import rank_and_size  # the ring only where it is used

            ranks = rank_and_size(self.context_parallel_group)[1]
            _check_length(length * ranks, self.context_length, name)  # the whole sequence
        else:
            _check_length(length, self.context_length, name)
        record("inputs", x)
        q, k, v = self._project(x)  # (B, H, L, D), (B, Hkv, L, D), (B, Hkv, L, D)
        record("queries", q)
        if not use_cache:
            return self._attend(x, q, k, v, self._padding(padding_mask, q.shape[0], length))
        self._check_cache_fits(k)
        mask = self._padding(padding_mask, q.shape[0], self.cache_len + length)
        with self._cache_transaction(k, v) as (k, v):  # (B, Hkv, cache_len + L, D)
            return self._attend(x, q, k, v, mask)

    def _project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (..., L, d_in) -> q (B, H, L, D), k and v (B, Hkv, L, D).

        The chapter's three projections. When gradients flow (training), they run as one
        matmul on the three weights stacked, ``[W_query; W_key; W_value]``: the same maths and
        the same parameters (names, state_dict, initialisation), but one (d_in, d_out + 2 kv)
        product and one gradient matmul instead of three, and backward no longer copies each
        head-split gradient back apart (about 2% of a shakespeare-char iteration, see
        docs/bench/train.txt). Without gradients (evaluation, decoding one token) stacking
        would copy the weights at every call for nothing, so the three run separately; so do
        projections that are not plain ``nn.Linear`` or that carry hooks (an adapter such as
        LoRA swapped in for ``W_query`` must be called, not bypassed).
        """
        projections = (self.W_query, self.W_key, self.W_value)
        if torch.is_grad_enabled() and _stackable(projections):
            weight = torch.cat([w.weight for w in projections])  # (d_out + 2 kv, d_in)
            biased = self.W_query.bias is not None
            bias = torch.cat([w.bias for w in projections]) if biased else None  # (d_out + 2 kv,)
            qkv = nn.functional.linear(x, weight, bias)  # (..., L, d_out + 2 kv)
            kv_out = self.num_kv_heads * self.head_dim
            q, k, v = qkv.split((self.d_out, kv_out, kv_out), dim=-1)
        else:
            q, k, v = (w(x) for w in projections)  # (..., L, d_out), (..., L, kv) x 2
        return (
            split_heads(q, self.num_heads),  # (..., L, d_out) -> (B, H, L, D)
            split_heads(k, self.num_kv_heads),  # (B, Hkv, L, D)
            split_heads(v, self.num_kv_heads),  # (B, Hkv, L, D)
        )

    def _attend(self, x: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
        """q (B, H, L, D) attends to k, v (B, Hkv, S, D); heads merged and projected."""
        record("keys", k)
        record("values", v)
        if self.context_parallel_group is not None:  # this rank's rows, over every rank's keys
            from selfattn.ring.attention import ring_attention

            context = ring_attention(
                q,
                k,
                v,
                group=self.context_parallel_group,
                is_causal=self.causal,
                layout=self.context_parallel_layout,
                backend=self.backend,  # the engine of each ring block ("auto": fused, tiled)
            )  # (B, H, L / P, D)
            return self._output(x, context)
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
        return self._output(x, context)

    def _output(self, x: Tensor, context: Tensor) -> Tensor:
        """context (B, H, L, D): heads merged and projected, (..., L, d_out)."""
        merged = merge_heads(context, x.shape[:-2])  # (B, H, L, D) -> (..., L, d_out)
        out = self.out_proj(merged)  # (..., L, d_out)
        record("output", out)
        return out

    def _check_cache_fits(self, k: Tensor) -> None:
        """Whether ``k`` (B, Hkv, L, D) can join the cache; changes nothing."""
        if k.requires_grad:
            raise ValueError(
                "use_cache=True is for inference: decode under torch.no_grad() (or "
                "torch.inference_mode()); a cache written by one step cannot be backpropagated "
                "through by the next"
            )
        batch, new = k.shape[0], k.shape[-2]
        if self.cache_k is not None and self.cache_k.shape[0] != batch:
            raise ValueError(
                f"the KV cache holds a batch of {self.cache_k.shape[0]}, got {batch}; "
                "call reset_cache() before a new batch"
            )
        if self.cache_len + new > self.context_length:
            raise ValueError(
                f"KV cache full: {self.cache_len} cached + {new} new tokens exceed "
                f"context_length={self.context_length}; call reset_cache()"
            )

    def _make_cache_writable(self) -> None:
        """A cache made under ``torch.inference_mode()`` holds inference tensors, which PyTorch
        lets no in-place write touch outside inference mode: there, copy it once into normal
        tensors (the same values, so decoding goes on under ``torch.no_grad()`` unchanged)."""
        if self.cache_k is None or torch.is_inference_mode_enabled():
            return
        if self.cache_k.is_inference() or self.cache_v.is_inference():
            self.cache_k, self.cache_v = self.cache_k.clone(), self.cache_v.clone()

    @contextmanager
    def _cache_transaction(self, k: Tensor, v: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
        """The cached keys and values followed by ``k``, ``v``: (B, Hkv, cache_len + L, D) each.

        The new tokens are written into the cache's free slots, in place (no copy of the cached
        prefix), but ``cache_len`` moves past them only when the block succeeds. If it raises,
        the slots get their old contents back and a cache allocated here is dropped: the cache
        is exactly as it was, and a retry does not repeat the tokens.
        """
        self._make_cache_writable()
        fresh = self.cache_k is None
        if fresh:  # pre-allocated once per sequence
            shape = (k.shape[0], self.num_kv_heads, self.context_length, self.head_dim)
            self.cache_k = k.new_zeros(shape)
            self.cache_v = v.new_zeros((*shape[:-1], v.shape[-1]))
        start, end = self.cache_len, self.cache_len + k.shape[-2]
        saved = (self.cache_k[:, :, start:end].clone(), self.cache_v[:, :, start:end].clone())
        try:
            self.cache_k[:, :, start:end] = k  # (B, Hkv, L, D) into the free slots
            self.cache_v[:, :, start:end] = v
            yield self.cache_k[:, :, :end], self.cache_v[:, :, :end]
        except BaseException:  # roll back, then let the error through
            if fresh:
                self.cache_k, self.cache_v = None, None
            else:
                self.cache_k[:, :, start:end] = saved[0]
                self.cache_v[:, :, start:end] = saved[1]
            raise
        self.cache_len = end  # commit

    def _padding(self, padding_mask: Tensor | None, batch: int, keys: int) -> Tensor | None:
        """padding_mask (B, S) checked, as an attn_mask (B, 1, 1, S); None stays None."""
        if padding_mask is None:
            return None
        if not isinstance(padding_mask, Tensor) or padding_mask.dtype != torch.bool:
            got = padding_mask.dtype if isinstance(padding_mask, Tensor) else type(padding_mask)
            raise TypeError(f"padding_mask must be a bool tensor (B, L_keys), got {got}")
        expected = (batch, keys)
        if tuple(padding_mask.shape) != expected:
            raise ValueError(
                f"padding_mask must have shape (B, L_keys) = {expected}, "
                f"got {tuple(padding_mask.shape)}"
            )
        return padding_mask[:, None, None, :]  # (B, 1, 1, S)
