"""Models built from selfattn's own modules.

`gpt`: the book's chapter-4 GPT (`GPT`, `GPTConfig`), on `selfattn.MultiHeadAttention`; trained by
`selfattn train` (`selfattn.train`).

`minilm`: sentence-transformers' all-MiniLM-L6-v2, a 6-layer BERT encoder whose every attention
layer is a `selfattn.MultiHeadAttention`. Loading it needs the ``text`` extra (tokenizers,
safetensors and the packaged model files) and raises `MissingExtra` without it; importing this
package does not need it.
"""

from selfattn._extras import MissingExtra
from selfattn.models.gpt import GPT, GPTConfig
from selfattn.models.minilm import (
    MODEL_NAME,
    MiniLM,
    MiniLMConfig,
    load_minilm,
    load_tokenizer,
    model_dir,
    real_tokens,
    trace_layers,
)

__all__ = [
    "GPT",
    "MODEL_NAME",
    "GPTConfig",
    "MiniLM",
    "MiniLMConfig",
    "MissingExtra",
    "load_minilm",
    "load_tokenizer",
    "model_dir",
    "real_tokens",
    "trace_layers",
]
