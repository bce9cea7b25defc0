"""selfattn.models.gpt against the book's chapter-4 GPTModel: weights, names, outputs, decoding."""

import pytest
import torch
from tolerances import SAME_MODEL_F32
from torch import nn

from selfattn.models.gpt import GPT, GPTConfig, load_weights, weights_state_dict

# --- the chapter's reference code (chapter 3's MultiHeadAttention, chapter 4's GPTModel) -------


class ChapterMultiHeadAttention(nn.Module):
    def __init__(self, d_in, d_out, context_length, dropout, num_heads, qkv_bias=False):
        super().__init__()
        assert d_out % num_heads == 0
        self.d_out = d_out
        self.num_heads = num_heads
        self.head_dim = d_out // num_heads
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer(
            "mask", torch.triu(torch.ones(context_length, context_length), diagonal=1)
        )

    def forward(self, x):
        b, num_tokens, d_in = x.shape  # noqa: RUF059 (the chapter's code, verbatim)
        keys = self.W_key(x)
        queries = self.W_query(x)
        values = self.W_value(x)
        keys = keys.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        values = values.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        queries = queries.view(b, num_tokens, self.num_heads, self.head_dim).transpose(1, 2)
        attn_scores = queries @ keys.transpose(2, 3)
        mask_bool = self.mask.bool()[:num_tokens, :num_tokens]
        attn_scores.masked_fill_(mask_bool, -torch.inf)
        attn_weights = torch.softmax(attn_scores / keys.shape[-1] ** 0.5, dim=-1)
        attn_weights = self.dropout(attn_weights)
        context_vec = (attn_weights @ values).transpose(1, 2)
        context_vec = context_vec.contiguous().view(b, num_tokens, self.d_out)
        return self.out_proj(context_vec)


class ChapterLayerNorm(nn.Module):
    def __init__(self, emb_dim):
        super().__init__()
        self.eps = 1e-5
        self.scale = nn.Parameter(torch.ones(emb_dim))
        self.shift = nn.Parameter(torch.zeros(emb_dim))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        var = x.var(dim=-1, keepdim=True, unbiased=False)
        norm_x = (x - mean) / torch.sqrt(var + self.eps)
        return self.scale * norm_x + self.shift


class ChapterGELU(nn.Module):
    def forward(self, x):
        return (
            0.5
            * x
            * (
                1
                + torch.tanh(
                    torch.sqrt(torch.tensor(2.0 / torch.pi)) * (x + 0.044715 * torch.pow(x, 3))
                )
            )
        )


class ChapterFeedForward(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(cfg["emb_dim"], 4 * cfg["emb_dim"]),
            ChapterGELU(),
            nn.Linear(4 * cfg["emb_dim"], cfg["emb_dim"]),
        )

    def forward(self, x):
        return self.layers(x)


class ChapterTransformerBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.att = ChapterMultiHeadAttention(
            d_in=cfg["emb_dim"],
            d_out=cfg["emb_dim"],
            context_length=cfg["context_length"],
            num_heads=cfg["n_heads"],
            dropout=cfg["drop_rate"],
            qkv_bias=cfg["qkv_bias"],
        )
        self.ff = ChapterFeedForward(cfg)
        self.norm1 = ChapterLayerNorm(cfg["emb_dim"])
        self.norm2 = ChapterLayerNorm(cfg["emb_dim"])
        self.drop_shortcut = nn.Dropout(cfg["drop_rate"])

    def forward(self, x):
        shortcut = x
        x = self.norm1(x)
        x = self.att(x)
        x = self.drop_shortcut(x)
        x = x + shortcut
        shortcut = x
        x = self.norm2(x)
        x = self.ff(x)
        x = self.drop_shortcut(x)
        x = x + shortcut
        return x


class ChapterGPTModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.tok_emb = nn.Embedding(cfg["vocab_size"], cfg["emb_dim"])
        self.pos_emb = nn.Embedding(cfg["context_length"], cfg["emb_dim"])
        self.drop_emb = nn.Dropout(cfg["drop_rate"])
        self.trf_blocks = nn.Sequential(
            *[ChapterTransformerBlock(cfg) for _ in range(cfg["n_layers"])]
        )
        self.final_norm = ChapterLayerNorm(cfg["emb_dim"])
        self.out_head = nn.Linear(cfg["emb_dim"], cfg["vocab_size"], bias=False)

    def forward(self, in_idx):
        batch_size, seq_len = in_idx.shape  # noqa: RUF059
        tok_embeds = self.tok_emb(in_idx)
        pos_embeds = self.pos_emb(torch.arange(seq_len, device=in_idx.device))
        x = tok_embeds + pos_embeds
        x = self.drop_emb(x)
        x = self.trf_blocks(x)
        x = self.final_norm(x)
        logits = self.out_head(x)
        return logits


def chapter_generate_text_simple(model, idx, max_new_tokens, context_size):
    for _ in range(max_new_tokens):
        idx_cond = idx[:, -context_size:]
        with torch.no_grad():
            logits = model(idx_cond)
        logits = logits[:, -1, :]
        probas = torch.softmax(logits, dim=-1)
        idx_next = torch.argmax(probas, dim=-1, keepdim=True)
        idx = torch.cat((idx, idx_next), dim=1)
    return idx


# --- tests ---------------------------------------------------------------------------------------

SMALL = dict(
    vocab_size=97,
    context_length=16,
    emb_dim=32,
    n_heads=4,
    n_layers=2,
    drop_rate=0.1,
    qkv_bias=False,
)


def small(**changes) -> GPT:
    return GPT(GPTConfig(**{**SMALL, **changes}))


def test_same_seed_same_weights_and_the_chapter_state_dict_loads_strictly_both_ways():
    torch.manual_seed(123)
    book = ChapterGPTModel(SMALL)
    torch.manual_seed(123)
    ours = small()
    theirs = book.state_dict()
    mine = ours.state_dict()
    assert list(mine) == list(theirs)  # same names, same order
    for name, value in theirs.items():
        assert torch.equal(mine[name], value), name
    fresh = small()
    fresh.load_state_dict(theirs, strict=True)
    ChapterGPTModel(SMALL).load_state_dict(mine, strict=True)
    idx = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fresh.eval()(idx), book.eval()(idx), **SAME_MODEL_F32)


def test_forward_shape_and_parameter_names_follow_the_chapter():
    model = small()
    logits = model(torch.zeros(2, 5, dtype=torch.long))
    assert logits.shape == (2, 5, 97)
    names = dict(model.named_parameters())
    for name in [
        "tok_emb.weight",
        "pos_emb.weight",
        "trf_blocks.1.att.W_query.weight",
        "trf_blocks.1.att.out_proj.bias",
        "trf_blocks.0.ff.layers.0.weight",
        "trf_blocks.0.ff.layers.2.bias",
        "trf_blocks.0.norm1.scale",
        "trf_blocks.0.norm2.shift",
        "final_norm.scale",
        "out_head.weight",
    ]:
        assert name in names
    assert "out_head.bias" not in names
    assert isinstance(model.trf_blocks[0].drop_shortcut, nn.Dropout)
    assert model.trf_blocks[0].norm1.eps == 1e-5


@pytest.mark.slow
def test_the_124m_model_greedily_continues_hello_i_am_with_the_chapter_ids():
    torch.manual_seed(123)
    model = GPT(GPTConfig()).eval()  # the chapter's GPT_CONFIG_124M
    idx = torch.tensor([[15496, 11, 314, 716]])  # "Hello, I am"
    out = model.generate(idx, 10, temperature=0.0)
    expected = [27018, 24086, 47843, 30961, 42348, 7267, 49706, 43231, 47062, 34657]
    assert out[0, 4:].tolist() == expected


def test_greedy_generation_equals_the_chapter_generate_text_simple_past_the_context():
    torch.manual_seed(1)
    model = small().eval()
    idx = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(1))
    ours = model.generate(idx, 30, temperature=0.0)  # 35 tokens > context_length 16
    assert torch.equal(ours, chapter_generate_text_simple(model, idx, 30, 16))


@pytest.mark.parametrize(
    "changes",
    [{}, {"n_kv_heads": 2}, {"window": 5}, {"tie_embeddings": True, "qkv_bias": True}],
    ids=["mha", "gqa", "window", "tied-bias"],
)
def test_sampling_with_the_kv_cache_equals_sampling_without_it(changes):
    torch.manual_seed(2)
    model = small(**changes).eval()
    idx = torch.randint(0, 97, (3, 4), generator=torch.Generator().manual_seed(2))
    kwargs = dict(temperature=0.9, top_k=20)
    cached = model.generate(idx, 40, generator=torch.Generator().manual_seed(7), **kwargs)
    plain = model.generate(
        idx, 40, generator=torch.Generator().manual_seed(7), use_cache=False, **kwargs
    )
    assert cached.shape == (3, 44)
    assert torch.equal(cached, plain)  # 44 tokens: the window slid past context_length 16
    assert model.cache_len == 0  # caches are emptied afterwards


def test_incremental_forward_with_the_cache_equals_one_full_forward():
    torch.manual_seed(3)
    model = small().eval()
    idx = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(3))
    full = model(idx)
    with torch.no_grad():
        parts = [model(idx[:, :7], use_cache=True)]
        parts += [model(idx[:, t : t + 1], use_cache=True) for t in range(7, 12)]
    model.reset_cache()
    torch.testing.assert_close(torch.cat(parts, dim=1), full, **SAME_MODEL_F32)


def test_top_k_one_is_greedy():
    model = small().eval()
    idx = torch.tensor([[1, 2, 3]])
    greedy = model.generate(idx, 8, temperature=0.0)
    assert torch.equal(model.generate(idx, 8, temperature=2.0, top_k=1), greedy)


def test_tied_embeddings_share_one_tensor_and_save_once():
    model = small(tie_embeddings=True)
    assert model.out_head.weight is model.tok_emb.weight
    state = weights_state_dict(model)
    assert "out_head.weight" not in state
    assert not any(k.endswith(".att.mask") for k in state)
    other = small(tie_embeddings=True)
    load_weights(other, state)
    assert torch.equal(other.out_head.weight, model.tok_emb.weight)
    assert other.out_head.weight is other.tok_emb.weight


def test_bad_configs_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match=r"emb_dim \(30\) must be divisible by n_heads \(4\)"):
        GPTConfig(**{**SMALL, "emb_dim": 30})
    with pytest.raises(ValueError, match="n_kv_heads"):
        GPTConfig(**{**SMALL, "n_kv_heads": 3})
    model = small()
    with pytest.raises(ValueError, match="more than context_length=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(TypeError, match="int64"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match="at least one token"):
        model.generate(torch.zeros(1, 0, dtype=torch.long), 3)
