"""The tiled (FlashAttention) engine against an independent float64 reference written here."""

from __future__ import annotations

import math

import pytest
import torch
from tolerances import assert_close
from torch.autograd import gradcheck

from selfattn.engines import AttentionRequest, get_engine
from selfattn.engines import tiled as tiled_module
from selfattn.engines.tiled import dropout_keep_mask, tiled_attention
from selfattn.masks import causal_mask

NEG_INF = float("-inf")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These problems are small: a second thread only adds a sync per op, and on a busy machine
    each costs a scheduler slice (the file took 35 s instead of 4 s under load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference(
    q, k, v, *, attn_mask=None, is_causal=False, window=None, scale=None, keep=None, p=0.0
):
    """Plain float64 softmax attention: (out, lse). ``keep`` is a dense dropout keep-mask."""
    q, k, v = q.double(), k.double(), v.double()
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)  # (B, Hq, Lk, E)
    v = v.repeat_interleave(groups, dim=1)  # (B, Hq, Lk, Ev)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = q @ k.transpose(-2, -1) * scale  # (B, Hq, Lq, Lk)
    allowed = torch.ones(s.shape, dtype=torch.bool)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        allowed = allowed & attn_mask
    elif attn_mask is not None:
        s = s + attn_mask.double()
    if is_causal:
        allowed = allowed & causal_mask(q.shape[-2], k.shape[-2], window=window)
    s = s.masked_fill(~allowed, NEG_INF)
    dead = (s == NEG_INF).all(dim=-1, keepdim=True)  # rows with no key
    w = torch.softmax(s.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    lse = torch.logsumexp(s, dim=-1)
    if keep is not None:
        w = w * keep / (1 - p)
    return w @ v, lse


def make_qkv(b, hq, hkv, lq, lk, e=16, ev=None, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, lq, e, generator=gen, dtype=torch.float64).to(dtype)
    k = torch.randn(b, hkv, lk, e, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(b, hkv, lk, ev or e, generator=gen, dtype=torch.float64).to(dtype)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


def check(q, k, v, *, block_q=32, block_k=48, keep=None, **kw):
    """Forward, lse and gradients of tiled against the reference, with q's dtype's tolerances.

    ``keep``: the dense dropout keep-mask the call will use (with ``dropout_p`` in ``kw``).
    """
    out, lse = tiled_attention(q, k, v, block_q=block_q, block_k=block_k, **kw)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    p = kw.pop("dropout_p", 0.0)
    ref_out, ref_lse = reference(*leaves, keep=keep, p=p, **kw)
    assert out.dtype == q.dtype and out.shape == ref_out.shape
    assert lse.dtype == (torch.float64 if q.dtype == torch.float64 else torch.float32)
    assert_close(out, ref_out, q.dtype)
    assert torch.equal(lse.isneginf(), ref_lse.isneginf())
    finite = ref_lse.isfinite()
    assert_close(lse[finite], ref_lse[finite], q.dtype)

    gen = torch.Generator().manual_seed(5)
    grad_out = torch.randn(ref_out.shape, generator=gen, dtype=torch.float64).to(q.dtype)
    out.backward(grad_out)
    ref_out.backward(grad_out.double())  # the same (rounded) values
    for got, want in zip((q, k, v), leaves, strict=True):
        assert got.grad.dtype == got.dtype
        assert_close(got.grad, want.grad, q.dtype)
    return out, lse


LENGTHS = [(1, 1), (7, 7), (129, 129), (7, 129), (129, 7), (1, 129), (129, 1)]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("is_causal", [False, True])
@pytest.mark.parametrize(("lq", "lk"), LENGTHS)
def test_matches_reference(lq, lk, is_causal, dtype):
    check(*make_qkv(2, 2, 2, lq, lk, dtype=dtype), is_causal=is_causal)


@pytest.mark.parametrize("is_causal", [False, True])
def test_length_1000(is_causal):
    check(*make_qkv(1, 1, 1, 1000, 1000), is_causal=is_causal, block_q=128, block_k=256)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("hkv", [2, 1])
def test_grouped_query(hkv, dtype):
    q, k, v = make_qkv(2, 4, hkv, 37, 53, dtype=dtype)
    mask = torch.rand(2, 4, 37, 53, generator=torch.Generator().manual_seed(1)) > 0.3
    check(q, k, v, is_causal=True, attn_mask=mask, block_q=8, block_k=16)


@pytest.mark.parametrize(("e", "ev"), [(16, 16), (64, 64), (80, 80), (80, 16)])
def test_head_dims(e, ev):
    check(*make_qkv(1, 2, 2, 70, 90, e=e, ev=ev), is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(2, 1, 40, 60), (40, 60), (60,), (1, 2, 40, 1)])
def test_bool_and_float_masks(shape, dtype):
    gen = torch.Generator().manual_seed(2)
    keep = torch.rand(shape, generator=gen) > 0.4
    bias = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    for mask in (keep, bias):
        check(*make_qkv(2, 2, 2, 40, 60, dtype=dtype), attn_mask=mask, block_q=16, block_k=16)


def test_expanded_mask():
    keep = (torch.rand(40, 60, generator=torch.Generator().manual_seed(3)) > 0.4).expand(
        2, 2, 40, 60
    )
    check(*make_qkv(2, 2, 2, 40, 60), attn_mask=keep, is_causal=True)


@pytest.mark.parametrize(("lq", "lk"), [(30, 30), (20, 45), (45, 20)])
@pytest.mark.parametrize("window", [1, 3, 17, 100])
def test_window(window, lq, lk):
    check(*make_qkv(1, 2, 1, lq, lk), is_causal=True, window=window, block_q=8, block_k=8)


@pytest.mark.parametrize(("block_q", "block_k"), [(1, 1), (5, 3), (64, 1000), (1000, 7)])
def test_block_sizes_that_do_not_divide(block_q, block_k):
    q, k, v = make_qkv(1, 2, 2, 61, 67)
    check(q, k, v, is_causal=True, block_q=block_q, block_k=block_k)


def test_scale_and_non_contiguous_inputs():
    q, k, v = (
        t.detach().transpose(1, 2).contiguous().transpose(1, 2) for t in make_qkv(2, 2, 2, 9, 11)
    )
    assert not q.is_contiguous()
    check(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), scale=0.3, is_causal=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_with_no_key(dtype):
    q, k, v = make_qkv(1, 2, 1, 12, 9, dtype=dtype)
    keep = torch.ones(12, 9, dtype=torch.bool)
    keep[3] = False  # row 3 masked by the bool mask
    bias = torch.zeros(12, 9)
    bias[5] = NEG_INF  # row 5 masked by a float mask
    for mask in (keep, bias.to(dtype)):
        for t in (q, k, v):
            t.grad = None
        # Lq > Lk causal: rows 0..2 see no key either.
        out, lse = check(q, k, v, attn_mask=mask, is_causal=True, block_q=4, block_k=4)
        dead = [0, 1, 2, 3] if mask.dtype == torch.bool else [0, 1, 2, 5]
        assert (out[:, :, dead] == 0).all()
        assert lse[:, :, dead].isneginf().all()
        assert (q.grad[:, :, dead] == 0).all()
        assert all(t.grad.isfinite().all() for t in (q, k, v))


def test_everything_masked_and_empty_keys():
    q, k, v = make_qkv(1, 2, 2, 5, 6)
    out, lse = tiled_attention(q, k, v, attn_mask=torch.zeros(5, 6, dtype=torch.bool))
    out.sum().backward()
    assert (out == 0).all() and lse.isneginf().all()
    assert all((t.grad == 0).all() for t in (q, k, v))
    out, lse = tiled_attention(q[:, :, :0], k, v)  # Lq = 0
    assert out.shape == (1, 2, 0, 16) and lse.shape == (1, 2, 0)


def test_causal_block_masks_agree_with_masks_module():
    for lq, lk, window in [(50, 50, None), (20, 50, 7), (50, 20, None), (33, 40, 1)]:
        prob = tiled_module._Problem.build(
            *make_qkv(1, 1, 1, lq, lk), None, False, True, window, 1.0, 0.0, 0, 16, 16
        )
        full = causal_mask(lq, lk, window=window)
        for qs, qe, ks, ke in [(0, 7, 0, 9), (13, 20, 5, 20), (7, 19, 11, 20)]:
            drop = tiled_module._causal_drop(qs, qe, ks, ke, prob, "cpu")
            assert torch.equal(drop, ~full[qs:qe, ks:ke])


# ---------------------------------------------------------------------------- gradcheck


def _gradcheck(q, k, v, mask=None, fast=True, **kw):
    inputs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    if mask is not None and mask.requires_grad:
        inputs.append(mask)

    def fn(q, k, v, *m):
        out, lse = tiled_attention(q, k, v, attn_mask=m[0] if m else mask, **kw)
        return out, lse.masked_fill(lse.isneginf(), 0.0)  # -inf rows: no finite differences

    assert gradcheck(fn, inputs, fast_mode=fast)


@pytest.mark.parametrize(
    "case",
    [
        "plain",
        "causal",
        "causal_lq_gt_lk",
        "window",
        "gqa",
        "bool_mask_dead_row",
        "float_mask_grad",
    ],
)
def test_gradcheck(case):
    q, k, v = make_qkv(1, 2, 2, 7, 9, e=4, dtype=torch.float64)
    blocks = dict(block_q=3, block_k=2)
    if case == "plain":
        _gradcheck(q, k, v, fast=False, **blocks)
    elif case == "causal":
        _gradcheck(q, k, v, is_causal=True, fast=False, **blocks)
    elif case == "causal_lq_gt_lk":
        q, k, v = make_qkv(1, 2, 1, 9, 5, e=4, dtype=torch.float64)
        _gradcheck(q, k, v, is_causal=True, **blocks)
    elif case == "window":
        _gradcheck(q, k, v, is_causal=True, window=3, **blocks)
    elif case == "gqa":
        q, k, v = make_qkv(2, 4, 2, 6, 8, e=4, dtype=torch.float64)
        _gradcheck(q, k, v, is_causal=True, **blocks)
    elif case == "bool_mask_dead_row":
        keep = torch.rand(7, 9, generator=torch.Generator().manual_seed(4)) > 0.3
        keep[2] = False
        _gradcheck(q, k, v, mask=keep, is_causal=True, **blocks)
    elif case == "float_mask_grad":  # the mask's own gradient, summed over broadcast dims
        bias = torch.randn(1, 2, 7, 1, dtype=torch.float64, requires_grad=True)
        _gradcheck(q, k, v, mask=bias, is_causal=True, **blocks)


# ---------------------------------------------------------------------------- dropout


def test_dropout_reproducible_under_manual_seed():
    q, k, v = make_qkv(1, 2, 2, 20, 30)
    torch.manual_seed(0)
    a, _ = tiled_attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(0)
    b, _ = tiled_attention(q, k, v, dropout_p=0.3)
    c, _ = tiled_attention(q, k, v, dropout_p=0.3)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("is_causal", [False, True])
def test_dropout_matches_reference_with_the_same_keep_mask(is_causal):
    q, k, v = make_qkv(1, 4, 2, 21, 30, dtype=torch.float64)
    p, blocks = 0.25, dict(block_q=8, block_k=7)
    torch.manual_seed(7)
    seed = tiled_module._draw_seed()
    keep = dropout_keep_mask(seed, q.shape, k.shape, dropout_p=p, **blocks)
    torch.manual_seed(7)
    check(q, k, v, is_causal=is_causal, dropout_p=p, keep=keep, **blocks)


def test_dropout_gradcheck_with_fixed_seed():
    q, k, v = make_qkv(1, 2, 1, 7, 9, e=4, dtype=torch.float64)

    def fn(q, k, v):
        torch.manual_seed(11)  # gradcheck reruns forward: every run draws the same seed
        return tiled_attention(q, k, v, is_causal=True, dropout_p=0.4, block_q=3, block_k=2)[0]

    assert gradcheck(fn, (q, k, v))


def test_dropout_statistics():
    keep = dropout_keep_mask(123, (2, 4, 64, 64), (2, 4, 64, 64), dropout_p=0.3, block_q=16)
    assert abs(keep.float().mean().item() - 0.7) < 0.01

    q, k, v = (t.detach() for t in make_qkv(1, 1, 1, 8, 16, dtype=torch.float64))
    expected, _ = tiled_attention(q, k, v)
    torch.manual_seed(0)
    mean = sum(tiled_attention(q, k, v, dropout_p=0.3)[0] for _ in range(500)) / 500
    assert (mean - expected).abs().max() < 0.05  # E[dropout(w)] = w; std of the mean < 0.01


def test_dropout_p_must_be_below_one_as_everywhere():
    q, k, v = make_qkv(1, 1, 1, 5, 6)
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        tiled_attention(q, k, v, dropout_p=1.0)


# ---------------------------------------------------------------------------- block skipping


def count_tiles(monkeypatch, **kw):
    """Score tiles computed (forward, backward) at L=1024 in 8 x 8 blocks, and how many of the
    forward's needed the causal mask."""
    calls = []
    score_tile = tiled_module._score_tile

    def counting(prob, q_blk, k_blk, qs, qe, ks, ke, full, scratch):
        calls.append(full)
        return score_tile(prob, q_blk, k_blk, qs, qe, ks, ke, full, scratch)

    monkeypatch.setattr(tiled_module, "_score_tile", counting)
    q, k, v = make_qkv(1, 1, 1, 1024, 1024, e=8)
    out, _ = tiled_attention(q, k, v, block_q=128, block_k=128, **kw)
    forward = list(calls)
    out.sum().backward()
    return len(forward), len(calls) - len(forward), forward.count(False)


def test_masked_blocks_are_skipped(monkeypatch):
    assert count_tiles(monkeypatch) == (64, 64, 0)  # 8 x 8 tiles, none masked
    # Causal: the 8 * 9 / 2 = 36 tiles on or below the diagonal (about half), in both passes;
    # only the 8 on the diagonal straddle the mask's edge.
    assert count_tiles(monkeypatch, is_causal=True) == (36, 36, 8)
    # Window of 100 keys: each query block needs its own key block and the one before it.
    assert count_tiles(monkeypatch, is_causal=True, window=100) == (15, 15, 15)


# ---------------------------------------------------------------------------- the engine


def test_engine_registration_and_capabilities():
    engine = get_engine("tiled")
    assert engine.unsupported(AttentionRequest(need_weights=True))
    assert engine.unsupported(AttentionRequest(need_lse=True, is_causal=True, window=4)) is None

    q, k, v = make_qkv(1, 2, 1, 9, 11)
    request = AttentionRequest(is_causal=True, scale=0.5, need_lse=True)
    result = engine.fn(q, k, v, request)
    out, lse = tiled_attention(q, k, v, is_causal=True, scale=0.5)
    assert torch.equal(result.output, out) and torch.equal(result.lse, lse)
    assert result.weights is None
    assert engine.fn(q, k, v, AttentionRequest(scale=0.5)).lse is None


def test_bad_arguments_raise():
    q, k, v = make_qkv(1, 4, 2, 5, 6)
    with pytest.raises(ValueError, match="window"):
        tiled_attention(q, k, v, window=3)
    with pytest.raises(ValueError, match=r"multiple of key/value heads"):
        tiled_attention(q, k[:, :1].expand(1, 3, 6, 16), v[:, :1].expand(1, 3, 6, 16))
    with pytest.raises(ValueError, match="attn_mask"):
        tiled_attention(q, k, v, attn_mask=torch.ones(5, 7, dtype=torch.bool))
    with pytest.raises(ValueError, match="4-D"):
        tiled_attention(q[0], k[0], v[0])
