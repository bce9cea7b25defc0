"""The chapter's causal and multi-head modules: numbers, state_dict compatibility, extras."""

import copy

import pytest
import torch
from chapter import CausalAttention as BookCausalAttention
from chapter import MultiHeadAttention as BookMultiHeadAttention
from chapter import MultiHeadAttentionWrapper as BookMultiHeadAttentionWrapper
from tolerances import PRINTED, SAME_ROUTE_F32, assert_close
from torch import nn

import selfattn.modules.causal_multihead
from selfattn import CausalAttention, MultiHeadAttention, MultiHeadAttentionWrapper
from selfattn.explain import example_inputs
from selfattn.modules.causal_multihead import state_bytes

ENGINES = ["naive", "sdpa", "tiled"]


# ch03.ipynb, cells 34-36 (seed 123, d_in=3, d_out=2, context_length=6, dropout=0.0)
CHAPTER_CAUSAL = [
    [-0.4519, 0.2216],
    [-0.5874, 0.0058],
    [-0.6300, -0.0632],
    [-0.5675, -0.0843],
    [-0.5526, -0.0981],
    [-0.5299, -0.1081],
]
CHAPTER_WRAPPER = [
    [-0.4519, 0.2216, 0.4772, 0.1063],
    [-0.5874, 0.0058, 0.5891, 0.3257],
    [-0.6300, -0.0632, 0.6202, 0.3860],
    [-0.5675, -0.0843, 0.5478, 0.3589],
    [-0.5526, -0.0981, 0.5321, 0.3428],
    [-0.5299, -0.1081, 0.5077, 0.3493],
]
CHAPTER_MHA = [
    [0.3190, 0.4858],
    [0.2943, 0.3897],
    [0.2856, 0.3593],
    [0.2693, 0.3873],
    [0.2639, 0.3928],
    [0.2575, 0.4028],
]

PAIRS = [
    (CausalAttention, BookCausalAttention, (3, 2, 6, 0.0), CHAPTER_CAUSAL),
    (MultiHeadAttentionWrapper, BookMultiHeadAttentionWrapper, (3, 2, 6, 0.0, 2), CHAPTER_WRAPPER),
    (MultiHeadAttention, BookMultiHeadAttention, (3, 2, 6, 0.0, 2), CHAPTER_MHA),
]


def chapter_batch():
    inputs = example_inputs()
    return torch.stack((inputs, inputs), dim=0)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("ours", "book", "args", "printed"), PAIRS, ids=["causal", "wrapper", "mha"]
)
def test_chapter_printed_outputs(ours, book, args, printed, engine):
    torch.manual_seed(123)
    out = ours(*args, backend=engine)(chapter_batch())
    assert out.shape == (2, 6, len(printed[0]))
    for b in range(2):
        torch.testing.assert_close(out[b], torch.tensor(printed), **PRINTED)


@pytest.mark.parametrize(
    ("ours", "book", "args", "printed"), PAIRS, ids=["causal", "wrapper", "mha"]
)
def test_same_seed_same_parameters_and_state_dict_loads_strictly(ours, book, args, printed):
    torch.manual_seed(7)
    reference = book(*args)
    torch.manual_seed(7)
    mine = ours(*args)
    ref_state, my_state = reference.state_dict(), mine.state_dict()
    assert list(ref_state) == list(my_state)
    for name in ref_state:
        assert torch.equal(ref_state[name], my_state[name]), name
    other = ours(*args)
    other.load_state_dict(ref_state, strict=True)
    x = torch.randn(3, 5, 3)
    torch.testing.assert_close(other(x), reference(x))


@pytest.mark.parametrize(
    ("ours", "book", "args", "printed"), PAIRS, ids=["causal", "wrapper", "mha"]
)
def test_our_state_dict_loads_strictly_into_the_chapter_class(ours, book, args, printed):
    torch.manual_seed(8)
    mine = ours(*args)
    reference = book(*args)
    reference.load_state_dict(mine.state_dict(), strict=True)
    x = torch.randn(2, 6, 3)
    torch.testing.assert_close(reference(x), mine(x))


@pytest.mark.parametrize("cls", [CausalAttention, MultiHeadAttention])
def test_module_memory_does_not_grow_with_context_length(cls):
    args = (64, 64)
    heads = () if cls is CausalAttention else (4,)
    with torch.device("meta"):  # sizes only: nothing is allocated, even by a buggy module
        sizes = [state_bytes(cls(*args, n, 0.0, *heads)) for n in (16, 1024, 131072)]
    assert sizes[0] == sizes[1] == sizes[2]
    module = cls(*args, 131072, 0.0, *heads)  # the chapter's buffer would be 64 GiB
    assert "mask" not in dict(module.named_buffers())
    params = sum(p.numel() * p.element_size() for p in module.parameters())
    assert state_bytes(module) == params == sizes[0]
    assert module(torch.randn(1, 5, 64)).shape == (1, 5, 64)


def test_state_bytes_counts_parameters_buffers_and_the_kv_cache_once():
    mha = MultiHeadAttention(8, 8, 16, 0.0, 2).eval()
    params = sum(p.numel() * 4 for p in mha.parameters())
    assert state_bytes(mha) == params
    with torch.no_grad():
        mha(torch.randn(3, 2, 8), use_cache=True)
    assert state_bytes(mha) == params + 2 * 3 * 2 * 16 * 4 * 4  # K and V: (B, Hkv, ctx, D) fp32
    tied = nn.Sequential(mha.W_query, mha.W_query)
    assert state_bytes(tied) == mha.W_query.weight.nbytes


def test_state_dict_mask_follows_dtype_and_device_and_loads_into_the_chapter():
    torch.manual_seed(9)
    mine = MultiHeadAttention(3, 2, 6, 0.0, 2).to(torch.float64)
    assert list(dict(mine.named_buffers())) == []
    state = mine.state_dict()
    assert state["mask"].dtype == torch.float64 and state["mask"].device == torch.device("cpu")
    reference = BookMultiHeadAttention(3, 2, 6, 0.0, 2).double()
    torch.testing.assert_close(state["mask"], reference.mask, atol=0, rtol=0)
    reference.load_state_dict(state, strict=True)
    x = torch.randn(2, 6, 3, dtype=torch.float64)
    assert_close(mine(x), reference(x), torch.float64)


class Parent(nn.Module):
    """A model that holds an attention module, as the chapter's GPT does."""

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(3)
        self.att = attention


@pytest.mark.parametrize(
    ("ours", "book", "args", "printed"), PAIRS, ids=["causal", "wrapper", "mha"]
)
def test_nested_state_dicts_load_strictly_both_ways(ours, book, args, printed):
    torch.manual_seed(10)
    mine, reference = Parent(ours(*args)), Parent(book(*args))
    assert list(mine.state_dict()) == list(reference.state_dict())
    masks = [key for key in mine.state_dict() if key.endswith("mask")]
    if ours is MultiHeadAttentionWrapper:
        assert masks == ["att.heads.0.mask", "att.heads.1.mask"]
    else:
        assert masks == ["att.mask"]
    reference.load_state_dict(mine.state_dict(), strict=True)
    torch.manual_seed(11)
    again = Parent(ours(*args))
    again.load_state_dict(reference.state_dict(), strict=True)
    for name, value in mine.state_dict().items():
        torch.testing.assert_close(again.state_dict()[name], value, atol=0, rtol=0, msg=name)


@pytest.mark.parametrize(
    ("ours", "book", "args", "printed"), PAIRS, ids=["causal", "wrapper", "mha"]
)
def test_a_wrong_mask_in_a_state_dict_is_a_clear_error(ours, book, args, printed):
    key = "heads.1.mask" if ours is MultiHeadAttentionWrapper else "mask"
    state = book(*args).state_dict()
    state[key] = torch.triu(torch.ones(8, 8), diagonal=1)  # saved with context_length=8
    with pytest.raises(ValueError, match=rf"{key}.*\(6, 6\), got \(8, 8\)"):
        ours(*args).load_state_dict(state)
    state[key] = torch.ones(6, 6)
    with pytest.raises(ValueError, match=f"{key}.*not the chapter's causal mask"):
        ours(*args).load_state_dict(state)
    del state[key]  # no mask at all: nothing is lost, it loads
    ours(*args).load_state_dict(state)


@pytest.mark.parametrize("engine", ENGINES)
def test_larger_mha_matches_book_code_forward_and_gradients(engine):
    torch.manual_seed(0)
    book = BookMultiHeadAttention(32, 48, 40, 0.0, 4, qkv_bias=True).double()
    mine = MultiHeadAttention(32, 48, 40, 0.0, 4, qkv_bias=True, backend=engine)
    mine.load_state_dict({k: v.float() for k, v in book.state_dict().items()})
    x64 = torch.randn(2, 37, 32, dtype=torch.float64, requires_grad=True)
    x = x64.detach().float().requires_grad_()
    expected, out = book(x64), mine(x)
    assert_close(out, expected, torch.float32)
    g = torch.randn(expected.shape, dtype=torch.float64)
    expected.backward(g)
    out.backward(g.float())
    assert_close(x.grad, x64.grad, torch.float32, grad=True)
    for (name, p64), p in zip(book.named_parameters(), mine.parameters(), strict=True):
        assert_close(p.grad, p64.grad, torch.float32, grad=True, msg=name)


@pytest.mark.parametrize("num_kv_heads", [None, 2])
@pytest.mark.parametrize("qkv_bias", [False, True])
def test_stacked_qkv_projection_equals_three_projections(num_kv_heads, qkv_bias, monkeypatch):
    """With gradients, q, k and v come from one matmul on the stacked weights: the same
    outputs and gradients as the chapter's three projections (float64, both routes)."""
    torch.manual_seed(3)
    mha = MultiHeadAttention(16, 32, 20, 0.0, 8, qkv_bias, num_kv_heads=num_kv_heads).double()
    x = torch.randn(2, 11, 16, dtype=torch.float64)
    g = torch.randn(2, 11, 32, dtype=torch.float64)
    results = []
    for stacked in (True, False):
        if not stacked:  # every projection looks hooked: the three run apart
            monkeypatch.setattr(selfattn.modules.causal_multihead, "_stackable", lambda ms: False)
        mha.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_()
        out = mha(xi)
        out.backward(g)
        results.append((out, xi.grad, [p.grad for p in mha.parameters()]))
    (out, dx, grads), (ref, ref_dx, ref_grads) = results
    assert_close(out, ref, torch.float64)
    assert_close(dx, ref_dx, torch.float64, grad=True)
    for grad, ref_grad in zip(grads, ref_grads, strict=True):
        assert_close(grad, ref_grad, torch.float64, grad=True)


def test_hooked_or_adapted_projections_are_called_not_bypassed():
    """The stacked matmul is only for plain nn.Linear projections: a forward hook on one, or
    an adapter subclass (LoRA-style) swapped in, still runs in training."""

    class Adapter(nn.Linear):
        def forward(self, x):
            return super().forward(x) + 1.0

    torch.manual_seed(4)
    mha = MultiHeadAttention(8, 8, 16, 0.0, 2)
    x = torch.randn(1, 5, 8, requires_grad=True)
    seen = []
    mha.W_key.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    mha.W_value.register_full_backward_hook(lambda module, g_in, g_out: seen.append("backward"))
    mha(x).sum().backward()
    assert seen == [(1, 5, 8), "backward"]

    plain = mha(x)
    adapted = Adapter(8, 8, bias=False)
    adapted.load_state_dict(mha.W_query.state_dict())
    mha.W_query = adapted
    assert not torch.allclose(mha(x), plain)  # the +1 reached the queries


def test_dropout_on_in_training_off_in_eval():
    torch.manual_seed(1)
    mha = MultiHeadAttention(8, 8, 16, 0.5, 2)
    x = torch.randn(1, 16, 8)
    mha.eval()
    torch.testing.assert_close(mha(x), mha(x))
    mha.train()
    assert not torch.allclose(mha(x), mha(x))


def test_naive_dropout_draws_the_chapter_random_numbers():
    torch.manual_seed(5)
    book = BookMultiHeadAttention(8, 8, 16, 0.3, 2)
    mine = MultiHeadAttention(8, 8, 16, 0.3, 2, backend="naive")
    mine.load_state_dict(book.state_dict())
    x = torch.randn(2, 10, 8)
    torch.manual_seed(11)
    expected = book(x)
    torch.manual_seed(11)
    torch.testing.assert_close(mine(x), expected)


@pytest.mark.parametrize("engine", ENGINES)
def test_gqa_equals_mha_with_repeated_kv_weights(engine):
    torch.manual_seed(2)
    gqa = MultiHeadAttention(16, 32, 20, 0.0, 8, num_kv_heads=2, backend=engine)
    assert gqa.W_key.weight.shape == (2 * 4, 16)
    full = MultiHeadAttention(16, 32, 20, 0.0, 8, backend="naive")
    state = gqa.state_dict()
    for name in ("W_key", "W_value"):
        w = state[f"{name}.weight"].view(2, 4, 16)  # (Hkv, D, d_in)
        state[f"{name}.weight"] = w.repeat_interleave(4, dim=0).reshape(32, 16)
    full.load_state_dict(state)
    x = torch.randn(2, 11, 16)
    torch.testing.assert_close(gqa(x), full(x), **SAME_ROUTE_F32)


@pytest.mark.parametrize("engine", ENGINES)
def test_padding_mask_ignores_padded_keys(engine):
    torch.manual_seed(3)
    mha = MultiHeadAttention(8, 8, 16, 0.0, 2, causal=False, backend=engine)
    x = torch.randn(2, 6, 8)
    pad = torch.tensor([[True] * 6, [True] * 4 + [False] * 2])
    out = mha(x, padding_mask=pad)
    alone = mha(x[1:, :4])
    torch.testing.assert_close(out[1, :4], alone[0], **SAME_ROUTE_F32)
    with pytest.raises(ValueError, match=r"\(B, L_keys\) = \(2, 6\)"):
        mha(x, padding_mask=pad[:, :5])
    with pytest.raises(TypeError, match="bool"):
        mha(x, padding_mask=pad.float())


@pytest.mark.parametrize("engine", ENGINES)
def test_sliding_window_module(engine):
    torch.manual_seed(4)
    mha = MultiHeadAttention(8, 8, 32, 0.0, 2, window=3, backend=engine)
    x = torch.randn(1, 12, 8)
    out = mha(x)
    # token 11 sees tokens 9..11 only: changing token 5 leaves it unchanged
    x2 = x.clone()
    x2[0, 5] += 10
    torch.testing.assert_close(mha(x2)[0, 11], out[0, 11])
    assert not torch.allclose(mha(x2)[0, 6], out[0, 6])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("num_kv_heads", [None, 1])
def test_kv_cache_decoding_equals_one_causal_forward(engine, num_kv_heads):
    torch.manual_seed(5)
    mha = MultiHeadAttention(16, 16, 24, 0.0, 4, num_kv_heads=num_kv_heads, backend=engine)
    mha.eval()
    x = torch.randn(2, 20, 16)
    full = mha(x)
    with torch.no_grad():
        pieces = [mha(x[:, :7], use_cache=True)]  # the prompt
        pieces += [mha(x[:, t : t + 1], use_cache=True) for t in range(7, 20)]  # one at a time
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **SAME_ROUTE_F32)
    assert mha.cache_k.shape == (2, num_kv_heads or 4, 24, 4)  # pre-allocated
    mha.reset_cache()
    with torch.no_grad():
        again = mha(x[:, :5], use_cache=True)
    torch.testing.assert_close(again, full[:, :5], **SAME_ROUTE_F32)


def test_full_cache_is_an_error():
    mha = MultiHeadAttention(4, 4, 8, 0.0, 1).eval()
    with torch.no_grad():
        mha(torch.randn(1, 6, 4), use_cache=True)
        with pytest.raises(ValueError, match=r"6 cached \+ 3 new.*context_length=8"):
            mha(torch.randn(1, 3, 4), use_cache=True)
        mha(torch.randn(1, 2, 4), use_cache=True)  # exactly full is fine
        with pytest.raises(ValueError, match="batch of 1, got 2"):
            mha(torch.randn(2, 1, 4), use_cache=True)


def cached_decode(mha, x, padding=False):
    """Prompt x[:, :4], then one token at a time; the outputs (B, L, d_out) and the cache."""
    pieces = []
    with torch.no_grad():
        for start, end in [(0, 4), *((t, t + 1) for t in range(4, x.shape[1]))]:
            kwargs = {}
            if padding:
                kwargs["padding_mask"] = torch.ones(x.shape[0], end, dtype=torch.bool)
            pieces.append(mha(x[:, start:end], use_cache=True, **kwargs))
    return torch.cat(pieces, dim=1)


def cache_state(mha):
    if mha.cache_k is None:
        return None
    return mha.cache_k.clone(), mha.cache_v.clone(), mha.cache_len


def fail_attention(*args, **kwargs):
    raise RuntimeError("attention failed")


FAILURES = {  # a call that raises, made after a prompt of 4 tokens: kwargs, input shape, error
    "padding_shape": (dict(padding_mask=torch.ones(2, 4, dtype=torch.bool)), (2, 1, 8), ValueError),
    "padding_dtype": (dict(padding_mask=torch.ones(2, 5)), (2, 1, 8), TypeError),
    "full": ({}, (2, 9, 8), ValueError),  # 4 + 9 > context_length=12
    "batch": ({}, (3, 1, 8), ValueError),
    "attention_raises": ({}, (2, 1, 8), RuntimeError),
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("failure", list(FAILURES))
def test_a_failed_cached_call_leaves_the_cache_as_it_was(engine, failure, monkeypatch):
    torch.manual_seed(12)
    mha = MultiHeadAttention(8, 8, 12, 0.0, 4, num_kv_heads=2, backend=engine).eval()
    x = torch.randn(2, 10, 8)
    expected = cached_decode(mha, x, padding=True)
    expected_cache = cache_state(mha)
    torch.testing.assert_close(expected, mha(x), **SAME_ROUTE_F32)

    mha.reset_cache()
    kwargs, shape, error = FAILURES[failure]
    with torch.no_grad():
        prompt = mha(x[:, :4], use_cache=True)
        before = cache_state(mha)
        bad = torch.randn(shape)
        with monkeypatch.context() as patch:
            if failure == "attention_raises":
                patch.setattr(selfattn.modules.causal_multihead, "attention", fail_attention)
            with pytest.raises(error):
                mha(bad, use_cache=True, **kwargs)
    after = cache_state(mha)
    assert after[2] == before[2] == 4
    assert torch.equal(after[0], before[0]) and torch.equal(after[1], before[1])
    # the retry goes on as if nothing had happened
    rest = []
    with torch.no_grad():
        for t in range(4, 10):
            pad = torch.ones(2, t + 1, dtype=torch.bool)
            rest.append(mha(x[:, t : t + 1], use_cache=True, padding_mask=pad))
    torch.testing.assert_close(torch.cat([prompt, *rest], dim=1), expected, atol=0, rtol=0)
    for ours, theirs in zip(cache_state(mha), expected_cache, strict=True):
        assert torch.equal(torch.as_tensor(ours), torch.as_tensor(theirs))


@pytest.mark.parametrize("failure", ["padding_shape", "attention_raises"])
def test_a_failed_first_cached_call_allocates_nothing(failure, monkeypatch):
    mha = MultiHeadAttention(8, 8, 12, 0.0, 2).eval()
    x = torch.randn(2, 3, 8)
    if failure == "attention_raises":
        monkeypatch.setattr(selfattn.modules.causal_multihead, "attention", fail_attention)
    kwargs = (
        {"padding_mask": torch.ones(2, 2, dtype=torch.bool)}
        if failure != "attention_raises"
        else {}
    )
    with torch.no_grad(), pytest.raises((ValueError, RuntimeError)):
        mha(x, use_cache=True, **kwargs)
    assert mha.cache_k is None and mha.cache_v is None and mha.cache_len == 0
    assert dict(mha.named_buffers()) == {}
    monkeypatch.undo()
    with torch.no_grad():
        out = mha(x, use_cache=True)
    torch.testing.assert_close(out, mha(x), **SAME_ROUTE_F32)


def test_cache_is_not_in_state_dict():
    mha = MultiHeadAttention(4, 4, 8, 0.0, 1).eval()
    with torch.no_grad():
        mha(torch.randn(1, 3, 4), use_cache=True)
    assert set(mha.state_dict()) == {
        "W_query.weight",
        "W_key.weight",
        "W_value.weight",
        "out_proj.weight",
        "out_proj.bias",
        "mask",
    }


@pytest.mark.parametrize(("cls", "args"), [(c, a) for c, _, a, _ in PAIRS])
def test_sequence_longer_than_context_length(cls, args):
    with pytest.raises(ValueError, match="7 tokens, longer than context_length=6"):
        cls(*args)(torch.randn(1, 7, 3))


@pytest.mark.parametrize(
    ("kwargs", "error", "needle"),
    [
        (dict(d_out=5, num_heads=2), ValueError, "divisible by num_heads"),
        (dict(num_heads=4, num_kv_heads=3), ValueError, "divisible by num_kv_heads"),
        (dict(num_heads=0), ValueError, "positive int"),
        (dict(dropout=1.0), ValueError, r"\[0, 1\)"),
        (dict(window=4, causal=False), ValueError, "causal=True"),
        (dict(context_length=2.0), TypeError, "positive int"),
    ],
)
def test_constructor_errors(kwargs, error, needle):
    args = dict(d_in=4, d_out=8, context_length=8, dropout=0.0, num_heads=2) | kwargs
    with pytest.raises(error, match=needle):
        MultiHeadAttention(**args)


def test_module_input_errors():
    mha = MultiHeadAttention(4, 4, 8, 0.0, 2)
    with pytest.raises(ValueError, match=r"\(\.\.\., seq_len, 4\), got \(2, 3, 5\)"):
        mha(torch.randn(2, 3, 5))
    with pytest.raises(TypeError, match="floating-point"):
        mha(torch.ones(2, 3, 4, dtype=torch.int64))


def test_deep_copy_and_unbatched_input():
    mha = MultiHeadAttention(4, 4, 8, 0.0, 2)
    x = torch.randn(5, 4)
    torch.testing.assert_close(mha(x), mha(x[None])[0])
    torch.testing.assert_close(copy.deepcopy(mha)(x), mha(x))


def test_wrapper_trace_records_its_own_output():
    from selfattn import trace

    torch.manual_seed(123)
    wrapper = MultiHeadAttentionWrapper(3, 2, 6, 0.0, 2)
    tr = trace(wrapper, example_inputs())
    assert tr.num_heads == 2
    torch.testing.assert_close(tr.steps["output"], wrapper(example_inputs()).detach())


def test_kv_cache_with_autograd_is_a_clear_error():
    mha = MultiHeadAttention(4, 4, 8, 0.0, 1)
    with pytest.raises(ValueError, match=r"torch.no_grad\(\)"):
        mha(torch.randn(1, 3, 4), use_cache=True)


@pytest.mark.parametrize(
    "first, then",
    [(torch.inference_mode, torch.no_grad), (torch.no_grad, torch.inference_mode)],
    ids=["inference_mode-then-no_grad", "no_grad-then-inference_mode"],
)
def test_a_cache_made_in_one_no_grad_mode_continues_in_the_other(first, then):
    """A cache filled under torch.inference_mode() holds inference tensors, which no in-place
    write outside inference mode may touch: decoding goes on under torch.no_grad() all the same,
    with the results of one mode throughout."""
    torch.manual_seed(6)
    mha = MultiHeadAttention(16, 16, 24, 0.0, 4, num_kv_heads=2).eval()
    x = torch.randn(2, 12, 16)
    with torch.no_grad():
        expected = mha(x)
    with first():
        pieces = [mha(x[:, :8], use_cache=True)]  # a prompt of 8 in the first mode
    with then():
        pieces += [mha(x[:, t : t + 1], use_cache=True) for t in range(8, 10)]
    with first():  # and back
        pieces += [mha(x[:, t : t + 1], use_cache=True) for t in range(10, 12)]
    assert mha.cache_len == 12
    torch.testing.assert_close(torch.cat(pieces, dim=1), expected, **SAME_ROUTE_F32)
