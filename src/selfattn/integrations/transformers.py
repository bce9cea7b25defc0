"""selfattn as an attention implementation inside Hugging Face transformers.

    import selfattn.integrations.transformers  # registers the names below
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="selfattn_tiled")
    model.set_attn_implementation("selfattn")  # or switch a model that is already loaded

Importing this module registers, with transformers' `AttentionInterface` and
`masking_utils.AttentionMaskInterface`, one implementation per selfattn engine:

    "selfattn"         the "auto" engine (the fastest that serves the call)
    "selfattn_tiled"   FlashAttention in plain torch, skipping blocks a causal/window mask rules out
    "selfattn_sdpa"    PyTorch's fused kernel behind selfattn's adapter
    "selfattn_naive"   the reference engine

`register()` does the same explicitly and is idempotent. It needs the 'hf' extra
(``pip install 'selfattn[hf]'``); without transformers, importing this module raises
`selfattn._extras.MissingExtra` naming it. Written against transformers 5.x (checked on 5.24).

Shape legend (transformers' names; selfattn's own in brackets):

    B   batch size
    Hq  query heads; Hkv key/value heads, Hq a multiple of Hkv (GQA: keys are never repeated)
    L   query length [Lq]; S key/value length [Lk], the cache included
    E   head dim

    query (B, Hq, L, E)  key, value (B, Hkv, S, E)  ->  (output (B, L, Hq, E), weights or None)

The mask. transformers asks the mask function registered under the model's implementation name
for each mask; all four names get `selfattn_mask` (every engine takes boolean masks and applies
``is_causal`` and ``window`` itself), which returns:

- ``None`` when the mask is exactly selfattn's own causal mask, aligned bottom-right (query i sees
  keys j <= i + S - L), cut to the ``local_size`` most recent keys on sliding-window layers, with
  no padding. This is checked on transformers' own mask function, row block by row block, never
  assumed. The attention function then runs ``is_causal=True, window=sliding_window``, so the
  tiled engine skips masked blocks and no (L, S) mask is ever built. For L = 2, S = 5 (three
  cached tokens), window 3:

           k0 k1 k2 k3 k4
        q0  0  1  1  1  0
        q1  0  0  1  1  1

- otherwise the boolean mask (B, 1, L, S) of transformers' `sdpa_mask` (True = may attend), which
  carries padding, packed sequences and any other pattern. A row that may see no key (a padding
  query in a left-padded batch) returns zeros, where "eager" returns an average of the values.

A 4-D mask the caller built (boolean or additive float with ``finfo.min``) reaches the attention
function unchanged and is used as it is.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from selfattn._extras import require
from selfattn.engines import available
from selfattn.functional import attention, attention_with_weights
from selfattn.masks import causal_block, causal_mask

_transformers = require("transformers", "hf", "selfattn.integrations.transformers")
_masking = require("transformers.masking_utils", "hf", "selfattn.integrations.transformers")

# transformers' implementation name -> the selfattn engine that runs it.
IMPLEMENTATIONS: dict[str, str] = {
    "selfattn": "auto",
    "selfattn_tiled": "tiled",
    "selfattn_sdpa": "sdpa",
    "selfattn_naive": "naive",
}

# Keyword arguments some models pass that selfattn has no counterpart for: refused, never ignored.
_UNSUPPORTED = {
    "softcap": "logit soft-capping (Gemma 2 style)",
    "s_aux": "attention sinks (gpt-oss style)",
    "sinks": "attention sinks",
    "position_bias": "a position bias added inside attention (T5 style)",
}

_SUPPORTED = (
    "boolean and additive float masks, causal and sliding-window attention, grouped-query "
    "attention, dropout and output_attentions"
)

_MASK_ROWS = 256  # query rows per block when `selfattn_mask` checks a mask against ours


def attention_forward(engine: str = "auto") -> Callable[..., tuple[Tensor, Tensor | None]]:
    """The transformers attention function that runs selfattn's ``engine``.

    ``engine`` is one of `selfattn.engines.available()` ("naive", "sdpa", "tiled", "auto");
    another name is a ValueError listing them.
    """
    if engine not in available():
        valid = ", ".join(repr(name) for name in available())
        raise ValueError(f"unknown selfattn engine {engine!r}; expected one of {valid}")

    def selfattn_attention_forward(
        module: nn.Module,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        is_causal: bool | None = None,
        sliding_window: int | None = None,
        **kwargs,
    ) -> tuple[Tensor, Tensor | None]:
        """query (B, Hq, L, E), key/value (B, Hkv, S, E) -> (out (B, L, Hq, E), weights | None).

        ``attention_mask``: None (see the module docstring), bool (B|1, 1|Hq, L, S) with True =
        may attend, or float added to the scores. ``dropout`` is 0.0 outside training (the
        model decides). With ``output_attentions`` the naive engine runs and returns the
        weights (B, Hq, L, S).
        """
        _refuse_unsupported(kwargs, engine)
        if attention_mask is None:  # the mask is ours to apply: causal (+ window) or nothing
            causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
            window = sliding_window if causal else None
        elif _is_window_mask(attention_mask, sliding_window):  # exactly causal + the window:
            causal, window = True, sliding_window  # the tiled engine skips the hidden blocks
            attention_mask = None
        else:  # transformers' mask already holds causality, window and padding
            causal, window = False, None
        options = dict(
            attn_mask=attention_mask,
            is_causal=bool(causal),
            window=window,
            scale=scaling,
            dropout_p=float(dropout),
        )
        if _wants_weights(module, kwargs):
            out, weights = attention_with_weights(query, key, value, **options, backend="naive")
        else:
            out, weights = attention(query, key, value, **options, backend=engine), None
        # out (B, Hq, L, E) -> (B, L, Hq, E), the layout every transformers model expects back
        return out.transpose(1, 2).contiguous(), weights

    selfattn_attention_forward.__qualname__ = f"attention_forward({engine!r})"
    return selfattn_attention_forward


def _refuse_unsupported(kwargs: dict, engine: str) -> None:
    for name, what in _UNSUPPORTED.items():
        if kwargs.get(name) is not None:
            raise ValueError(
                f"selfattn (engine {engine!r}) cannot serve {what}: the model passed {name}="
                f"{kwargs[name]!r}. selfattn supports {_SUPPORTED}; load this model with "
                f"attn_implementation='eager' instead"
            )


def _wants_weights(module: nn.Module, kwargs: dict) -> bool:
    asked = kwargs.get("output_attentions")
    if asked is None:
        asked = getattr(getattr(module, "config", None), "output_attentions", False)
    return bool(asked)


def selfattn_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor = 0,
    kv_offset: int = 0,
    mask_function: Callable = _masking.causal_mask_function,
    attention_mask: Tensor | None = None,
    local_size: int | None = None,
    allow_is_causal_skip: bool = True,
    use_vmap: bool = False,
    device: torch.device | str = "cpu",
    **kwargs,
) -> Tensor | None:
    """The mask transformers hands our attention function: None or bool (B, 1, L, S).

    None exactly when the mask is selfattn's bottom-right causal mask, cut to ``local_size``
    keys where given, with no padding (the attention function then runs ``is_causal=True``
    with ``window=sliding_window``); otherwise `transformers.masking_utils.sdpa_mask`'s boolean
    mask (True = may attend). Arguments as transformers' `sdpa_mask`; ``attention_mask`` is the
    2-D padding mask (B, cached + L).
    """
    padding = _masking.prepare_padding_mask(attention_mask, kv_length, kv_offset)
    # A window that hides keys is never left to the attention function: some models (Qwen2-MoE,
    # PhiMoE, ...) build a sliding-window mask but never pass `sliding_window=` to it, and would
    # silently attend to every key. The attention function finds the window again in the dense
    # mask when the model does pass it (see `_window_of`).
    window_cuts = local_size is not None and kv_length > local_size
    if (
        allow_is_causal_skip
        and not window_cuts
        and not use_vmap
        and _is_selfattn_causal(
            mask_function,
            padding,
            batch_size,
            q_length,
            kv_length,
            q_offset,
            kv_offset,
            local_size,
            device,
        )
    ):
        return None
    return _masking.sdpa_mask(
        batch_size=batch_size,
        q_length=q_length,
        kv_length=kv_length,
        q_offset=q_offset,
        kv_offset=kv_offset,
        mask_function=mask_function,
        attention_mask=attention_mask,
        local_size=local_size,
        allow_is_causal_skip=False,
        use_vmap=use_vmap,
        device=device,
        **kwargs,
    )


def _is_window_mask(mask: Tensor, window: int | None) -> bool:
    """Whether a bool mask (B|1, 1, L, S) is exactly selfattn's bottom-right causal mask with a
    sliding ``window``, for every batch row (no padding): one pass over the mask."""
    if window is None or mask.dtype != torch.bool or mask.ndim != 4 or mask.shape[1] != 1:
        return False
    if torch.compiler.is_compiling():
        return False
    expected = causal_mask(mask.shape[-2], mask.shape[-1], window=window, device=mask.device)
    return bool((mask == expected).all())


def _is_selfattn_causal(
    mask_function: Callable,
    padding: Tensor | None,
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int | Tensor,
    kv_offset: int,
    window: int | None,
    device: torch.device | str,
) -> bool:
    """Whether transformers' mask equals ``is_causal=True, window=window`` (bottom-right).

    Checked on ``mask_function`` itself, ``_MASK_ROWS`` query rows at a time, so it costs
    O(B · L · S) cheap comparisons and never holds the (L, S) mask. Not under torch.compile.
    """
    if torch.compiler.is_compiling() or q_length == 0 or kv_length == 0:
        return False
    if padding is not None and not bool(padding[:, kv_offset : kv_offset + kv_length].all()):
        return False
    b = torch.arange(batch_size, device=device).view(-1, 1, 1, 1)  # (B, 1, 1, 1)
    h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)  # one mask for all heads
    j = torch.arange(kv_length, device=device).view(1, 1, 1, -1)  # (1, 1, 1, S)
    for start in range(0, q_length, _MASK_ROWS):
        stop = min(start + _MASK_ROWS, q_length)
        i = torch.arange(start, stop, device=device).view(1, 1, -1, 1)  # (1, 1, rows, 1)
        theirs = mask_function(b, h, i + q_offset, j + kv_offset)  # broadcasts to (B, 1, rows, S)
        ours = causal_block(start, stop, 0, kv_length, q_length, kv_length, window, device=device)
        if not bool((theirs == ours).all()):  # ours (rows, S) broadcasts too
            return False
    return True


# One function object per name, so that registering again changes nothing.
_FORWARDS = {name: attention_forward(engine) for name, engine in IMPLEMENTATIONS.items()}


def register() -> tuple[str, ...]:
    """Register every selfattn implementation and its mask function with transformers.

    Idempotent; importing this module already did it. Returns the names registered.
    """
    for name, forward in _FORWARDS.items():
        _transformers.AttentionInterface.register(name, forward)
        _masking.AttentionMaskInterface.register(name, selfattn_mask)
    return tuple(_FORWARDS)


register()
