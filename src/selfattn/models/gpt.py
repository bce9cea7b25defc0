"""The book's chapter-4 GPT, built on selfattn's `MultiHeadAttention`.

    idx (B, T) token ids
      -> tok_emb(idx) + pos_emb(0..T-1), drop_emb                      (B, T, E)
      -> n_layers x TransformerBlock (pre-LayerNorm):
             x = x + drop_shortcut(att(norm1(x)))                       causal, H heads of E/H
             x = x + drop_shortcut(ff(norm2(x)))                        E -> 4E -> E, GELU
      -> final_norm, out_head                                           (B, T, vocab_size)

Parameter names and the order in which submodules are created are the chapter's ``GPTModel``:
its ``state_dict`` loads here with ``strict=True``, and the same seed gives the same weights.
The extras (grouped-query attention, a sliding window, tied embeddings, the engine, and
``attn_only``: blocks of attention alone, no feed-forward, as in the induction-head studies) are
off by default; with them off this is exactly the chapter's model.

Context parallelism: ``GPT(config, context_parallel_group=group)`` is the same model (the same
parameters, created in the same order) run on a sequence split across the P ranks of a
``torch.distributed`` group. Every rank calls it at once with its zigzag shard of each
sequence, idx (B, T / P): chunks r and 2P-1-r of 2P (`selfattn.ring.shard_sequence`); each
rank embeds its tokens at their global positions (`selfattn.ring.shard_positions`), every
attention layer runs ring attention over the group, and the rank gets the logits of its own
tokens, (B, T / P, V). Everything else in a block acts token by token, so it runs unchanged.
Ring attention has no attention-weight dropout: under a group ``drop_rate`` acts on the
embeddings and the shortcuts only. `generate` / `stream` run on the calling process alone,
on the whole model (every rank holds all the weights), see `without_context_parallel`.

Shapes: B batch, T tokens (<= context_length), E = emb_dim, H = n_heads, V = vocab_size,
P ranks of the context-parallel group.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfattn._checks import check_window, positive_int, probability
from selfattn.modules.causal_multihead import MultiHeadAttention, without_chapter_masks

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


@dataclass(frozen=True)
class GPTConfig:
    """The model's sizes. The defaults are the chapter's ``GPT_CONFIG_124M``."""

    vocab_size: int = 50257  # V
    context_length: int = 1024  # longest input, and the rows of pos_emb
    emb_dim: int = 768  # E
    n_heads: int = 12  # H; head width E / H
    n_kv_heads: int | None = None  # key/value heads (grouped-query attention); None = n_heads
    n_layers: int = 12
    drop_rate: float = 0.1  # embeddings, attention weights and both shortcuts
    qkv_bias: bool = False
    backend: str = "auto"  # the attention engine
    window: int | None = None  # sliding-window attention: each token sees its `window` latest
    tie_embeddings: bool = False  # out_head shares tok_emb's weight (GPT-2 does; the chapter not)
    attn_only: bool = False  # blocks without ff / norm2: attention-only (Olsson et al. 2022)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            positive_int(name, getattr(self, name))
        if self.emb_dim % self.n_heads != 0:
            raise ValueError(
                f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})"
            )
        if self.n_kv_heads is not None:
            positive_int("n_kv_heads", self.n_kv_heads)
            if self.n_heads % self.n_kv_heads != 0:
                raise ValueError(
                    f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})"
                )
        probability("drop_rate", self.drop_rate)
        check_window(self.window, True)


class LayerNorm(nn.Module):
    """The chapter's layer normalization: ``scale * (x - mean) / sqrt(var + eps) + shift``.

    x (..., E) -> (..., E); biased variance, eps 1e-5, parameters ``scale`` and ``shift``.
    """

    def __init__(self, emb_dim: int) -> None:
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x: Tensor) -> Tensor:
        # The chapter's maths, in one fused kernel (the same formula; about 2x faster to train):
        #   mean = x.mean(-1, keepdim=True); var = x.var(-1, keepdim=True, unbiased=False)
        #   return self.scale * (x - mean) / torch.sqrt(var + self.eps) + self.shift
        return F.layer_norm(x, x.shape[-1:], self.scale, self.shift, self.eps)  # (..., E)


class GELU(nn.Module):
    """GELU, the tanh approximation the chapter (and GPT-2) uses."""

    def forward(self, x: Tensor) -> Tensor:
        # The chapter's formula, in one fused kernel:
        #   0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x**3)))
        return F.gelu(x, approximate="tanh")


class FeedForward(nn.Module):
    """x (..., E) -> Linear(E, 4E) -> GELU -> Linear(4E, E) -> (..., E)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim),
            GELU(),
            nn.Linear(4 * cfg.emb_dim, cfg.emb_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class TransformerBlock(nn.Module):
    """A pre-LayerNorm block: attention, then feed-forward, each with a residual.

    x (B, T, E) -> (B, T, E). With ``cfg.attn_only`` the block is attention alone (no ``ff``,
    no ``norm2``): x = x + drop_shortcut(att(norm1(x))). With a ``context_parallel_group`` the
    attention is ring attention over the group, without dropout on its weights (the ring has
    none); x is then this rank's shard, (B, T / P, E).
    """

    def __init__(self, cfg: GPTConfig, context_parallel_group: ProcessGroup | None = None) -> None:
        super().__init__()
        self.att = MultiHeadAttention(
            d_in=cfg.emb_dim,
            d_out=cfg.emb_dim,
            context_length=cfg.context_length,
            dropout=cfg.drop_rate if context_parallel_group is None else 0.0,
            num_heads=cfg.n_heads,
            qkv_bias=cfg.qkv_bias,
            num_kv_heads=cfg.n_kv_heads,
            window=cfg.window,
            backend=cfg.backend,
            context_parallel_group=context_parallel_group,
        )
        self.ff = None if cfg.attn_only else FeedForward(cfg)
        self.norm1 = LayerNorm(cfg.emb_dim)
        self.norm2 = None if cfg.attn_only else LayerNorm(cfg.emb_dim)
        self.drop_shortcut = nn.Dropout(cfg.drop_rate)

    def forward(self, x: Tensor, use_cache: bool = False) -> Tensor:
        x = x + self.drop_shortcut(self.att(self.norm1(x), use_cache=use_cache))  # (B, T, E)
        if self.ff is not None:
            x = x + self.drop_shortcut(self.ff(self.norm2(x)))  # (B, T, E)
        return x


class GPT(nn.Module):
    """The chapter's ``GPTModel``: ``GPT(config)(idx)`` maps ids (B, T) to logits (B, T, V).

    ``forward(idx, use_cache=True)`` decodes incrementally: each block's attention keeps the
    keys and values of earlier calls (see `MultiHeadAttention`), and the new tokens take the
    positions after them. `reset_cache()` starts a new sequence. `generate` does all of this.

    ``context_parallel_group``: the ranks that share each sequence (see the module's notes):
    ``forward(idx)`` then takes this rank's zigzag shard, idx (B, T / P), T a multiple of 2P,
    and returns its logits (B, T / P, V); backward leaves this rank's share of the gradients
    (sum or average them over the ranks, as DDP does). Not with ``use_cache`` or a ``window``.
    """

    def __init__(
        self, config: GPTConfig, *, context_parallel_group: ProcessGroup | None = None
    ) -> None:
        super().__init__()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        self.config = config
        cfg, group = config, context_parallel_group
        # The chapter's order of creation: the same seed gives the same weights.
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop_emb = nn.Dropout(cfg.drop_rate)
        self.trf_blocks = nn.Sequential(
            *[TransformerBlock(cfg, group) for _ in range(cfg.n_layers)]
        )
        self.final_norm = LayerNorm(cfg.emb_dim)
        self.out_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:  # after out_head's own init, so the other weights do not move
            self.out_head.weight = self.tok_emb.weight

    @classmethod
    def from_hf(cls, source: str | Path | nn.Module) -> GPT:
        """The chapter's GPT (eval mode) with OpenAI's GPT-2 weights: ``source`` is a folder in
        transformers' GPT-2 layout (config.json; model.safetensors or pytorch_model.bin, read
        with ``weights_only=True``) or a ``GPT2LMHeadModel``. The chapter-5 mapping is in
        `selfattn.models.gpt2`. ValueError for a config that is not GPT-2 shaped (saying what
        differs) or tensors that do not fit it (naming them)."""
        from selfattn.models import gpt2

        fields, tensors, where, config_name = gpt2.read_source(source)
        cfg = GPTConfig(**fields)
        state = gpt2.state_from_hf(tensors, cfg, where, config_name)
        model = cls(cfg)
        load_weights(model, state)
        return model.eval()

    def to_hf(self, path: str | Path, tokenizer=None, *, overwrite: bool = False) -> Path:
        """Write this model as a transformers GPT-2 folder (config.json, model.safetensors, and
        tokenizer.json given a `tokenizers.Tokenizer`), atomically, for
        ``GPT2LMHeadModel.from_pretrained``: the same logits. See `selfattn.models.gpt2` for the
        options GPT-2 lacks (no qkv bias, grouped-query attention, attention-only blocks)."""
        from selfattn.models import gpt2

        return gpt2.save_hf(self, path, tokenizer, overwrite=overwrite)

    @property
    def context_parallel_group(self) -> ProcessGroup | None:
        """The group that shares each sequence (None: the whole sequence is here)."""
        return self.trf_blocks[0].att.context_parallel_group

    @contextmanager
    def without_context_parallel(self) -> Iterator[GPT]:
        """This model on this process alone, for the ``with`` block: every attention layer
        attends over the whole sequence it is given, with no group (the weights are the same
        tensors). What `stream` uses: rank 0 samples alone while the other ranks wait."""
        groups = [block.att.context_parallel_group for block in self.trf_blocks]
        for block in self.trf_blocks:
            block.att.context_parallel_group = None
        try:
            yield self
        finally:
            for block, group in zip(self.trf_blocks, groups, strict=True):
                block.att.context_parallel_group = group

    @property
    def cache_len(self) -> int:
        """Tokens held by the KV cache (0 when empty)."""
        return self.trf_blocks[0].att.cache_len

    def reset_cache(self) -> None:
        """Empty every block's KV cache."""
        for block in self.trf_blocks:
            block.att.reset_cache()

    def forward(self, idx: Tensor, use_cache: bool = False) -> Tensor:
        """idx (B, T) int64 -> logits (B, T, V). With use_cache, positions follow the cache."""
        return self.out_head(self._hidden(idx, use_cache))  # (B, T, E) -> (B, T, V)

    def _hidden(self, idx: Tensor, use_cache: bool) -> Tensor:
        """idx (B, T) -> the final norm's output (B, T, E): `forward` without the head, so that
        decoding can take the logits of the last position alone (the head is a (V, E) matmul
        per position: a third of GPT-2 124M's forward over a 512-token prompt)."""
        if not isinstance(idx, Tensor) or idx.dtype != torch.long or idx.dim() != 2:
            got = f"{idx.dtype} {tuple(idx.shape)}" if isinstance(idx, Tensor) else type(idx)
            raise TypeError(f"idx must be an int64 tensor (B, T), got {got}")
        if self.context_parallel_group is not None and not use_cache:
            positions = self._shard_positions(idx.shape[1]).to(idx.device)  # (T / P,)
        else:
            start = self.cache_len if use_cache else 0
            end = start + idx.shape[1]
            if end > self.config.context_length:
                raise ValueError(
                    f"GPT got {end} positions ({start} cached + {idx.shape[1]} new), more "
                    f"than context_length={self.config.context_length}"
                )
            positions = torch.arange(start, end, device=idx.device)  # (T,)
        x = self.tok_emb(idx) + self.pos_emb(positions)  # (B, T, E) + (T, E)
        x = self.drop_emb(x)
        for block in self.trf_blocks:
            x = block(x, use_cache=use_cache)  # (B, T, E)
        return self.final_norm(x)  # (B, T, E)

    def _shard_positions(self, local: int) -> Tensor:
        """The global positions of this rank's ``local`` tokens, (local,) int64: zigzag chunks
        r and 2P-1-r of the whole sequence of T = local * P tokens."""
        from selfattn.ring.comm import rank_and_size  # the ring only where it is used
        from selfattn.ring.layouts import shard_positions

        rank, ranks = rank_and_size(self.context_parallel_group)
        length = local * ranks
        if length > self.config.context_length:
            raise ValueError(
                f"GPT got a shard of {local} tokens on each of {ranks} ranks: {length} "
                f"positions, more than context_length={self.config.context_length}"
            )
        return shard_positions(rank, ranks, length, "zigzag")

    @torch.no_grad()
    def stream(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        *,
        use_cache: bool = True,
    ) -> Iterator[Tensor]:
        """Yield the next token (B, 1) after idx (B, T), ``max_new_tokens`` times.

        Each step feeds the model at most its last ``context_length`` tokens, as the chapter's
        ``generate_text_simple`` does. With ``use_cache`` (the default) the prompt is fed once
        and then one token per step; once the sequence outgrows ``context_length``, the window
        slides and every position changes, so each further step re-feeds the last
        ``context_length`` tokens without the cache (a sliding recompute): the tokens are
        the same as without the cache, only slower past the context. Only the last position
        goes through the output head, as nanoGPT's ``generate`` does.

        temperature: 0 picks the most likely token (greedy); otherwise logits / temperature
            are sampled from. top_k: sample among the k most likely tokens only.
        generator: the random source of sampling (the global one when None).
        The caches are emptied before and after. Dropout is whatever the mode says: call
        ``eval()`` first to decode without it. Under a ``context_parallel_group`` the calling
        process decodes alone, on the whole model (`without_context_parallel`).
        """
        if not isinstance(idx, Tensor) or idx.dtype != torch.long or idx.dim() != 2:
            raise TypeError("idx must be an int64 tensor (B, T)")
        if idx.shape[1] == 0:
            raise ValueError("generate needs a prompt of at least one token, got 0")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None:
            positive_int("top_k", top_k)
        self.reset_cache()
        with self.without_context_parallel():
            yield from self._decode(idx, max_new_tokens, temperature, top_k, generator, use_cache)

    def _decode(self, idx, max_new_tokens, temperature, top_k, generator, use_cache):
        """`stream`'s loop, its arguments checked."""
        n = self.config.context_length
        try:
            for _ in range(max_new_tokens):
                if not use_cache or idx.shape[1] > n:
                    # without the cache, or a window that has slid (every position changed, so
                    # nothing cached holds): the last n tokens, afresh
                    self.reset_cache()
                    h = self._hidden(idx[:, -n:], use_cache=False)
                elif self.cache_len > 0:  # cache the latest token only
                    h = self._hidden(idx[:, -1:], use_cache=True)
                else:  # the prompt
                    h = self._hidden(idx, use_cache=True)
                logits = self.out_head(h[:, -1, :])  # (B, V): the last position's alone
                next_id = _pick(logits, temperature, top_k, generator)  # (B, 1)
                idx = torch.cat((idx, next_id), dim=1)
                yield next_id
        finally:
            self.reset_cache()

    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        *,
        use_cache: bool = True,
    ) -> Tensor:
        """idx (B, T) -> (B, T + max_new_tokens): the prompt and its continuation (see `stream`)."""
        new = list(
            self.stream(idx, max_new_tokens, temperature, top_k, generator, use_cache=use_cache)
        )
        return torch.cat([idx, *new], dim=1)


def _pick(logits: Tensor, temperature: float, top_k: int | None, generator) -> Tensor:
    """The next token (B, 1) from the last position's logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)  # greedy
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator)  # (B, 1)


def weights_state_dict(model: GPT) -> dict[str, Tensor]:
    """The model's weights for saving: no chapter ``mask`` entries (none is even built: at a
    long context they would be n_layers x T x T floats), and with tied embeddings no
    ``out_head.weight`` (it is ``tok_emb.weight``)."""
    with without_chapter_masks():
        state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("out_head.weight", None)
    return state


def load_weights(model: GPT, state: dict[str, Tensor]) -> None:
    """Load what `weights_state_dict` saved (or a chapter ``state_dict``), strictly."""
    state = dict(state)
    if model.config.tie_embeddings and "out_head.weight" not in state and "tok_emb.weight" in state:
        state["out_head.weight"] = state["tok_emb.weight"]
    model.load_state_dict(state, strict=True)
