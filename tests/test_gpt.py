"""selfattn.models.gpt against the book's chapter-4 GPTModel: weights, names, outputs, decoding."""

import chapter
import pytest
import torch
from tolerances import SAME_MODEL_F32, assert_close
from torch import nn

from selfattn.models.gpt import GPT, GPTConfig, load_weights, weights_state_dict

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
    book = chapter.GPTModel(SMALL)
    torch.manual_seed(123)
    ours = small()
    theirs = book.state_dict()
    mine = ours.state_dict()
    assert list(mine) == list(theirs)  # same names, same order
    for name, value in theirs.items():
        assert torch.equal(mine[name], value), name
    fresh = small()
    fresh.load_state_dict(theirs, strict=True)
    chapter.GPTModel(SMALL).load_state_dict(mine, strict=True)
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
    assert torch.equal(ours, chapter.generate_text_simple(model, idx, 30, 16))


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


@pytest.mark.parametrize(
    "changes", [{}, {"n_kv_heads": 2}, {"window": 5}], ids=["mha", "gqa", "sliding-window"]
)
def test_decoding_from_a_cache_with_a_long_prefix_equals_one_forward_in_float64(changes):
    """Eight tokens one at a time after a 24-token prefix, each attending to the cached history
    (with a window of 5, to the 4 latest cached tokens and itself): one full forward's logits."""
    torch.manual_seed(4)
    model = small(context_length=32, drop_rate=0.0, **changes).double().eval()
    idx = torch.randint(0, 97, (2, 32), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        full = model(idx)  # (B, 32, V), no cache
        prefix = model(idx[:, :24], use_cache=True)
        steps = [model(idx[:, t : t + 1], use_cache=True) for t in range(24, 32)]
    assert model.cache_len == 32
    assert_close(prefix, full[:, :24], torch.float64)
    assert_close(torch.cat(steps, dim=1), full[:, 24:], torch.float64)


def test_stream_decodes_from_the_cache_then_refeeds_once_the_context_slides(monkeypatch):
    """What each step feeds (cached tokens, new tokens), and that its last position's logits
    (the head sees that position alone) are those of a forward without the cache over the same
    context, in float64."""
    model = small(drop_rate=0.0).double().eval()  # context_length 16
    fed, seen = [], []
    hidden = model._hidden

    def spy(idx, use_cache=False):
        fed.append((model.cache_len, idx.shape[1], use_cache))
        h = hidden(idx, use_cache=use_cache)  # (B, T, E)
        seen.append(model.out_head(h[:, -1]))  # (B, V)
        return h

    monkeypatch.setattr(model, "_hidden", spy)
    idx = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(5))
    out = model.generate(idx, 9, temperature=0.0)  # 19 tokens: two steps past the context
    # the prompt, six tokens from the cache, then (slid) the last 16 without it
    assert fed == [(0, 10, True)] + [(t, 1, True) for t in range(10, 16)] + [(0, 16, False)] * 2
    monkeypatch.undo()
    with torch.no_grad():
        for step, logits in enumerate(seen):
            context = out[:, : 10 + step][:, -16:]
            assert_close(logits, model(context)[:, -1], torch.float64)


def test_decoding_puts_only_the_last_position_through_the_head():
    """The head is a (V, E) matmul per position: the prompt's and a slid window's other
    positions are never multiplied by it (as in nanoGPT's generate)."""
    model = small(drop_rate=0.0).eval()  # context_length 16
    shapes = []
    model.out_head.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    idx = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(5))
    model.generate(idx, 9, temperature=0.0)  # the prompt, 6 cached steps, 2 slid windows
    assert shapes == [(2, model.config.emb_dim)] * 9


def test_a_stream_begun_under_inference_mode_goes_on_outside_it():
    torch.manual_seed(6)
    model = small().eval()
    idx = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(6))
    expected = model.generate(idx, 6, temperature=0.0)
    steps = model.stream(idx, 6, temperature=0.0)
    with torch.inference_mode():  # the prompt and a first token: a cache of inference tensors
        first = [next(steps), next(steps)]
    rest = list(steps)  # under stream's own torch.no_grad()
    assert torch.equal(torch.cat([idx, *first, *rest], dim=1), expected)
    model.reset_cache()
    with torch.inference_mode():
        model(idx, use_cache=True)
    with torch.no_grad():
        assert model(idx[:, :1], use_cache=True).shape == (2, 1, 97)
    assert model.cache_len == 6


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


def test_saving_weights_builds_no_chapter_mask_and_state_dict_still_has_it(monkeypatch):
    """A checkpoint at a long context must not build n_layers x T x T floats; the chapter's
    state_dict (for its GPTModel, strict=True) keeps its masks."""
    from selfattn.modules import causal_multihead

    model = GPT(GPTConfig(**{**SMALL, "context_length": 8192}))
    built = []
    real = causal_multihead._future_mask
    monkeypatch.setattr(
        causal_multihead, "_future_mask", lambda n, like: built.append(n) or real(n, like)
    )
    state = weights_state_dict(model)
    assert built == [] and not any(k.endswith(".att.mask") for k in state)
    assert len(state) == len(model.state_dict()) - model.config.n_layers  # the chapter's masks
    assert built == [8192] * model.config.n_layers
    other = GPT(GPTConfig(**{**SMALL, "context_length": 8192}))
    load_weights(other, state)
    pairs = zip(other.parameters(), model.parameters(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


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
