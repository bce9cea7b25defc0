"""selfattn.attention: each engine against an float64 reference, forward and backward."""

import math

import pytest
import torch
from tolerances import assert_close

from selfattn import (
    attention,
    attention_with_lse,
    attention_with_weights,
    causal_mask,
    key_padding_mask,
    merge_partials,
    sliding_window_mask,
)
from selfattn.engines import AttentionRequest
from selfattn.functional import select_engine

ENGINES = ["naive", "sdpa", "fused", "tiled"]
DROPOUT_ENGINES = ["naive", "sdpa", "tiled"]  # fused refuses dropout (tests/test_fused.py)
DTYPES = [torch.float32, torch.bfloat16]


def reference(q, k, v, keep=None, bias=None, scale=None):
    """float64 attention written independently: repeat heads, mask, softmax, zero dead rows."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scale = 1 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = (q @ k.transpose(-2, -1)) * scale
    allowed = torch.ones(s.shape, dtype=torch.bool)
    if keep is not None:
        allowed = allowed & keep
    if bias is not None:
        bias = bias.double().expand(s.shape)
        allowed = allowed & torch.isfinite(bias)
        # softmax(s + b) = softmax(s + b - c) for a constant c per row: take c = the row's largest
        # visible bias, so that a row held at finfo.min keeps its scores instead of rounding
        # them away (the float64 sum s + finfo.min would, as float32's does).
        c = bias.masked_fill(~allowed, float("-inf")).amax(-1, keepdim=True)
        s = s + (bias - c.masked_fill(~c.isfinite(), 0)).masked_fill(~allowed, 0)
    s = s.masked_fill(~allowed, float("-inf"))
    w = torch.softmax(s, dim=-1)
    w = torch.where(allowed.any(-1, keepdim=True), w, 0.0)
    return w @ v


def make_qkv(b, hq, hkv, lq, lk, e, ev=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ev = e if ev is None else ev
    q = torch.randn(b, hq, lq, e, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, lk, e, generator=g, dtype=torch.float64)
    v = torch.randn(b, hkv, lk, ev, generator=g, dtype=torch.float64)
    # round to the test dtype first, so the reference sees exactly the engine's inputs
    return [t.to(dtype).double().requires_grad_() for t in (q, k, v)]


def compare(engine, dtype, q64, k64, v64, *, keep=None, bias=None, is_causal=False, window=None):
    """Run ``engine`` in ``dtype`` and the reference in float64; compare output and gradients."""
    ref_keep = keep
    if is_causal:
        cm = causal_mask(q64.shape[2], k64.shape[2], window=window)
        ref_keep = cm if keep is None else keep & cm
    expected = reference(q64, k64, v64, keep=ref_keep, bias=bias)
    grad_out = torch.randn(expected.shape, generator=torch.Generator().manual_seed(9)).double()
    exp_grads = torch.autograd.grad(expected, (q64, k64, v64), grad_out)

    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64))
    mask = keep if bias is None else bias.to(dtype)
    out = attention(q, k, v, attn_mask=mask, is_causal=is_causal, window=window, backend=engine)
    assert out.dtype == dtype and out.shape == expected.shape
    assert torch.isfinite(out).all()
    assert_close(out, expected, dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out.to(dtype))
    for name, got, want in zip("qkv", grads, exp_grads, strict=True):
        assert torch.isfinite(got).all(), f"d{name} has non-finite values"
        assert_close(got, want, dtype, grad=True)


# (B, Hq, Hkv, Lq, Lk, E, Ev)
SHAPES = [
    (2, 2, 2, 1, 1, 16, 16),
    (1, 4, 2, 7, 7, 16, 16),  # GQA
    (2, 2, 1, 7, 12, 64, 64),  # MQA, Lq < Lk
    (1, 2, 2, 12, 7, 80, 80),  # Lq > Lk: the first rows are dead under causal
    (1, 3, 3, 129, 129, 64, 32),
    (1, 2, 1, 129, 300, 80, 80),
]
LONG = (1, 2, 2, 1000, 1000, 64, 64)


def masks_for(kind, b, hq, lq, lk, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    if kind == "none":
        return None, None
    keep = torch.rand(b, 1, lq, lk, generator=g) > 0.3
    keep[..., 0] = True  # keep every row alive here; dead rows have their own test
    if kind == "bool":
        return keep, None
    bias = torch.randn(b, hq, lq, lk, generator=g, dtype=torch.float64)
    return None, bias.masked_fill(~keep, float("-inf")).to(dtype).double()


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
def test_engine_matches_float64_reference(engine, dtype, shape, is_causal, mask_kind):
    b, hq, hkv, lq, lk, e, ev = shape
    q, k, v = make_qkv(b, hq, hkv, lq, lk, e, ev, dtype=dtype)
    keep, bias = masks_for(mask_kind, b, hq, lq, lk, dtype)
    compare(engine, dtype, q, k, v, keep=keep, bias=bias, is_causal=is_causal)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("is_causal", [False, True], ids=["full", "causal"])
def test_engine_long_sequence(engine, is_causal):
    b, hq, hkv, lq, lk, e, ev = LONG
    q, k, v = make_qkv(b, hq, hkv, lq, lk, e, ev)
    compare(engine, torch.float32, q, k, v, is_causal=is_causal)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    ("lq", "lk", "window"), [(9, 9, 1), (40, 40, 5), (7, 20, 3), (129, 200, 64)]
)
def test_sliding_window(engine, lq, lk, window):
    q, k, v = make_qkv(1, 2, 1, lq, lk, 16)
    compare(engine, torch.float32, q, k, v, is_causal=True, window=window)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_fully_masked_rows_give_zeros_and_zero_gradient(engine, mask_kind):
    q, k, v = (t.detach().float().requires_grad_() for t in make_qkv(2, 2, 2, 6, 5, 16))
    keep = torch.ones(2, 1, 6, 5, dtype=torch.bool)
    keep[0, :, 2] = False  # row 2 of batch 0 sees nothing
    keep[1] = False  # batch 1 sees nothing at all
    mask = keep if mask_kind == "bool" else torch.zeros(keep.shape).masked_fill(~keep, -torch.inf)
    out = attention(q, k, v, attn_mask=mask, backend=engine)
    out.sum().backward()
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
    assert (out[0, :, 2] == 0).all() and (out[1] == 0).all()
    assert (q.grad[0, :, 2] == 0).all() and (q.grad[1] == 0).all()
    assert (k.grad[1] == 0).all() and (v.grad[1] == 0).all()
    assert (out[0, :, 3] != 0).any()


def test_sdpa_adapter_handles_dead_rows_itself_where_the_kernel_does_not(monkeypatch):
    """A kernel that returns NaN on rows with no key (as bf16 SDPA on an H200 returned garbage)
    never shows through: the adapter hands SDPA no dead row and zeroes those rows itself."""
    from selfattn.engines import sdpa

    real = sdpa.F.scaled_dot_product_attention

    def nan_on_dead_rows(q, k, v, attn_mask=None, **kw):
        out = real(q, k, v, attn_mask=attn_mask, **kw)
        if attn_mask is not None:
            keep = attn_mask if attn_mask.dtype == torch.bool else attn_mask > float("-inf")
            out = out.masked_fill(~keep.any(dim=-1, keepdim=True), float("nan"))
        return out

    monkeypatch.setattr(sdpa.F, "scaled_dot_product_attention", nan_on_dead_rows)
    test_fully_masked_rows_give_zeros_and_zero_gradient("sdpa", "bool")
    test_fully_masked_rows_give_zeros_and_zero_gradient("sdpa", "float")
    q, k, v = make_qkv(1, 2, 1, 9, 4, 16)
    compare("sdpa", torch.float32, q, k, v, is_causal=True)


@pytest.mark.parametrize("engine", ENGINES)
def test_single_query_decoding_step_sees_every_key(engine):
    q, k, v = make_qkv(2, 4, 2, 1, 13, 16)
    compare(engine, torch.float32, q, k, v, is_causal=True)


@pytest.mark.parametrize("engine", ENGINES)
def test_causal_lq_greater_than_lk_has_dead_leading_rows(engine):
    q, k, v = (t.detach().float() for t in make_qkv(1, 1, 1, 6, 3, 8))
    out = attention(q, k, v, is_causal=True, backend=engine)
    assert (out[0, 0, :3] == 0).all()
    assert (out[0, 0, 3:] != 0).all()


def test_causal_is_bottom_right_aligned():
    """Two new queries after three cached keys: q0 sees k0..k3, q1 sees k0..k4."""
    expected = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 5), expected)
    q, k, v = (t.detach().float() for t in make_qkv(1, 1, 1, 2, 5, 8))
    for engine in ENGINES:
        out = attention(q, k, v, is_causal=True, backend=engine)
        torch.testing.assert_close(out, reference(q, k, v, keep=expected).float())
    # differs from SDPA's own top-left is_causal
    top_left = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.allclose(out, top_left)


def test_window_mask_picture():
    expected = torch.tensor(
        [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 0, 1, 1]],
        dtype=torch.bool,
    )
    assert torch.equal(sliding_window_mask(5, 5, 2), expected)


def test_key_padding_mask_from_lengths():
    m = key_padding_mask([3, 1], max_len=4)
    assert m.shape == (2, 1, 1, 4)
    assert m[0, 0, 0].tolist() == [True, True, True, False]
    assert m[1, 0, 0].tolist() == [True, False, False, False]
    q, k, v = (t.detach().float() for t in make_qkv(2, 2, 2, 4, 4, 8))
    out = attention(q, k, v, attn_mask=m)
    # padding keys do not matter: changing them leaves the output unchanged
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 3] += 5
    v2[1, :, 1:] -= 3
    torch.testing.assert_close(attention(q, k2, v2, attn_mask=m), out)
    with pytest.raises(ValueError, match="shorter"):
        key_padding_mask([3, 5], max_len=4)
    with pytest.raises(TypeError, match="integers"):
        key_padding_mask(torch.tensor([1.5]))


@pytest.mark.parametrize("engine", ["naive", "fused", "tiled"])
@pytest.mark.parametrize("is_causal", [False, True])
def test_lse_and_merging_partials(engine, is_causal):
    q, k, v = (t.detach().float() for t in make_qkv(1, 2, 2, 5, 10, 16))
    out, lse = attention_with_lse(q, k, v, is_causal=is_causal, backend=engine)
    scores = (q.double() @ k.double().transpose(-2, -1)) / 4
    if is_causal:
        scores = scores.masked_fill(~causal_mask(5, 10), float("-inf"))
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), atol=1e-5, rtol=1e-5)
    # attention over keys [0, 6) and [6, 10), merged, equals attention over all ten
    keep = torch.ones(5, 10, dtype=torch.bool)
    if is_causal:
        keep = causal_mask(5, 10)
    a = attention_with_lse(q, k[:, :, :6], v[:, :, :6], attn_mask=keep[:, :6], backend=engine)
    b = attention_with_lse(q, k[:, :, 6:], v[:, :, 6:], attn_mask=keep[:, 6:], backend=engine)
    merged, merged_lse = merge_partials(*a, *b)
    torch.testing.assert_close(merged, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(merged_lse, lse, atol=1e-5, rtol=1e-5)


def test_weights_are_available_from_the_reference_engine():
    q, k, v = (t.detach().float() for t in make_qkv(1, 2, 2, 4, 4, 8))
    out, w = attention_with_weights(q, k, v, is_causal=True)
    assert w.shape == (1, 2, 4, 4)
    assert (w.triu(1) == 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 4))
    torch.testing.assert_close(w @ v, out)
    with pytest.raises(ValueError, match="sdpa.*weights"):
        attention_with_weights(q, k, v, backend="sdpa")


def test_chapter_dropout_on_weights_is_reproduced():
    """ch03: torch.manual_seed(123); dropout(attn_weights) with p=0.5 on the causal weights."""
    from selfattn import SelfAttention_v2
    from selfattn.explain import example_inputs

    torch.manual_seed(789)
    sa = SelfAttention_v2(3, 2)
    x = example_inputs()
    q, k, v = (m(x)[None, None] for m in (sa.W_query, sa.W_key, sa.W_value))
    torch.manual_seed(123)
    _, w = attention_with_weights(q, k, v, is_causal=True, dropout_p=0.5, backend="naive")
    expected = torch.tensor(
        [
            [2.0000, 0.0000, 0.0000, 0.0000, 0.0000, 0.0000],
            [0.0000, 0.0000, 0.0000, 0.0000, 0.0000, 0.0000],
            [0.7599, 0.6194, 0.6206, 0.0000, 0.0000, 0.0000],
            [0.0000, 0.4921, 0.4925, 0.0000, 0.0000, 0.0000],
            [0.0000, 0.3966, 0.0000, 0.3775, 0.0000, 0.0000],
            [0.0000, 0.3327, 0.3331, 0.3084, 0.3331, 0.0000],
        ]
    )
    torch.testing.assert_close(w[0, 0].detach(), expected, atol=5e-5, rtol=0)


@pytest.mark.parametrize("engine", DROPOUT_ENGINES)
def test_dropout_keeps_the_right_fraction(engine):
    """With v = identity, the output *is* the dropped-out weight matrix, on any engine."""
    torch.manual_seed(0)
    length, p = 64, 0.3
    q = torch.zeros(4, 4, length, 8)  # all scores equal: every weight is 1/L
    v = torch.eye(length).expand(4, 1, length, length)
    out = attention(q, q[:, :1], v, dropout_p=p, backend=engine)
    kept = out != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.02
    torch.testing.assert_close(out[kept], torch.full_like(out[kept], 1 / length / (1 - p)))
    no_drop = attention(q, q[:, :1], v, backend=engine)
    assert (no_drop != 0).all()


def test_auto_picks_a_capable_engine():
    plain = AttentionRequest()
    assert select_engine("auto", plain).name == "sdpa"
    assert select_engine("auto", AttentionRequest(need_weights=True)).name == "naive"
    # The log-sum-exp: PyTorch's fused kernels where they can run, else the tiled engine.
    assert select_engine("auto", AttentionRequest(need_lse=True)).name == "fused"
    lse_cuda = AttentionRequest(need_lse=True, device_type="cuda", dtype=torch.bfloat16)
    assert select_engine("auto", lse_cuda).name == "fused"
    lse_dropout = AttentionRequest(need_lse=True, dropout_p=0.1)
    assert select_engine("auto", lse_dropout).name == "tiled"
    lse_mps = AttentionRequest(need_lse=True, device_type="mps")
    assert select_engine("auto", lse_mps).name == "tiled"
    windowed = AttentionRequest(is_causal=True, window=8)
    assert select_engine("auto", windowed).name == "tiled"
    windowed_lse_cuda = AttentionRequest(is_causal=True, window=8, need_lse=True,
                                         device_type="cuda")  # fmt: skip
    assert select_engine("auto", windowed_lse_cuda).name == "fused"


def test_unknown_backend_lists_the_valid_ones():
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match=r"'flash'.*'naive', 'sdpa', 'tiled', 'fused', 'auto'"):
        attention(q, q, q, backend="flash")


def shaped(*shape, dtype=torch.float32):
    return torch.randn(*shape).to(dtype)


@pytest.mark.parametrize(
    ("q", "k", "v", "kwargs", "error", "needle"),
    [
        (shaped(2, 2, 3, 4), shaped(1, 2, 3, 4), shaped(1, 2, 3, 4), {}, ValueError, "batch"),
        (shaped(1, 3, 3, 4), shaped(1, 2, 3, 4), shaped(1, 2, 3, 4), {}, ValueError, "multiple"),
        (shaped(1, 2, 3, 4), shaped(1, 2, 3, 5), shaped(1, 2, 3, 4), {}, ValueError, "head dim"),
        (shaped(1, 2, 3, 4), shaped(1, 2, 3, 4), shaped(1, 1, 3, 4), {}, ValueError, "same number"),
        (shaped(1, 2, 3, 4), shaped(1, 2, 3, 4), shaped(1, 2, 5, 4), {}, ValueError, "length Lk"),
        (shaped(2, 3, 4), shaped(2, 3, 4), shaped(2, 3, 4), {}, ValueError, "4-D"),
        (torch.ones(1, 1, 3, 4, dtype=torch.long),) * 3 + ({}, TypeError, "floating-point"),
        (
            shaped(1, 1, 3, 4),
            shaped(1, 1, 3, 4, dtype=torch.float64),
            shaped(1, 1, 3, 4),
            {},
            TypeError,
            "dtype",
        ),
        (shaped(1, 2, 3, 4),) * 3
        + (
            {"attn_mask": torch.ones(3, 5, dtype=torch.bool)},
            ValueError,
            r"\(3, 5\) cannot broadcast.*\(1, 2, 3, 3\)",
        ),
        (shaped(1, 2, 3, 4),) * 3
        + ({"attn_mask": torch.ones(3, 3, dtype=torch.long)}, TypeError, "bool or floating"),
        (shaped(1, 2, 3, 4),) * 3 + ({"window": 2}, ValueError, "is_causal"),
        (shaped(1, 2, 3, 4),) * 3 + ({"window": 0, "is_causal": True}, ValueError, ">= 1"),
        (shaped(1, 2, 3, 4),) * 3 + ({"dropout_p": 1.5}, ValueError, r"\[0, 1\)"),
        (shaped(1, 2, 3, 4),) * 3 + ({"is_causal": 1}, TypeError, "bool"),
    ],
)
def test_bad_input_is_named(q, k, v, kwargs, error, needle):
    with pytest.raises(error, match=needle):
        attention(q, k, v, **kwargs)


def test_shape_errors_print_the_sizes():
    with pytest.raises(ValueError, match=r"q \(1, 3, 3, 4\), k \(1, 2, 3, 4\)"):
        attention(shaped(1, 3, 3, 4), shaped(1, 2, 3, 4), shaped(1, 2, 3, 4))


def test_empty_sequences():
    q = torch.randn(1, 2, 0, 4)
    k = torch.randn(1, 2, 5, 4)
    assert attention(q, k, k).shape == (1, 2, 0, 4)
    q = torch.randn(1, 2, 3, 4, requires_grad=True)
    out = attention(q, torch.randn(1, 2, 0, 4), torch.randn(1, 2, 0, 6))
    assert out.shape == (1, 2, 3, 6) and (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()
