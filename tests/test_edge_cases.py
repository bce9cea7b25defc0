"""Edge cases of the attention core, each a defect once seen on main (issue 8), each against an
independent float64 reference or an exact expectation."""

import math
import subprocess
import sys

import pytest
import torch
from test_functional import ENGINES, compare, make_qkv, reference
from tolerances import TOL, assert_close

from selfattn import attention, attention_with_lse, causal_mask, merge_partials
from selfattn.engines import AttentionRequest
from selfattn.engines.tiled import tiled_attention
from selfattn.functional import select_engine

LSE_ENGINES = ["naive", "tiled"]  # the engines that return the log-sum-exp


def _bias(keep: torch.Tensor, fill: float, dtype=torch.float64) -> torch.Tensor:
    """An additive float mask: 0 where ``keep``, ``fill`` elsewhere."""
    return torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, fill)


# ------------------------------------------------------------------ float masks: finfo.min, -1e9


@pytest.mark.parametrize("engine", [*ENGINES, "auto"])
@pytest.mark.parametrize("fill", ["finfo.min", -1e9, float("-inf")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_float_masks_in_every_convention_agree_across_engines(engine, fill, dtype):
    """Hugging Face masks use torch.finfo(dtype).min for "may not attend". Rows partly masked
    and rows fully masked give the same answer on every engine and against float64, forward and
    backward; tiled once returned zeros on a fully masked row (finfo.min * log2(e) = -inf).

    A fully masked row is a constant added to every score of the row, which softmax ignores:
    the answer is the unmasked row's (`selfattn.masks.float_mask_shift`)."""
    value = torch.finfo(dtype).min if fill == "finfo.min" else fill
    q, k, v = make_qkv(2, 2, 1, 6, 9, 16, dtype=dtype)
    keep = torch.rand(2, 1, 6, 9, generator=torch.Generator().manual_seed(3)) > 0.4
    keep[0, 0, 2] = False  # a fully masked row
    keep[1, 0, 5] = False
    bias = _bias(keep, value).to(dtype)  # what a caller builds in the model's dtype
    compare(engine, dtype, q, k, v, bias=bias.double())
    got = attention(*(t.detach().to(dtype) for t in (q, k, v)), attn_mask=bias, backend=engine)
    free = attention(*(t.detach().to(dtype) for t in (q, k, v)), backend=engine)
    if fill == float("-inf"):
        assert (got[0, :, 2] == 0).all()
    else:  # a constant row bias changes nothing: the unmasked row's answer
        torch.testing.assert_close(got[0, :, 2], free[0, :, 2], **TOL[dtype])


@pytest.mark.parametrize("engine", LSE_ENGINES)
def test_finfo_min_rows_have_finite_lse_and_gradients(engine):
    q, k, v = (t.detach().float().requires_grad_() for t in make_qkv(1, 1, 1, 3, 5, 8))
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[1] = False
    bias = _bias(keep, torch.finfo(torch.float32).min, torch.float32).requires_grad_()
    out, lse = attention_with_lse(q, k, v, attn_mask=bias, backend=engine)
    assert torch.isfinite(lse).all() and lse[0, 0, 1] < -1e38  # finfo.min + lse of the scores
    (out.sum() + lse[..., [0, 2]].sum()).backward()
    for t in (q.grad, k.grad, v.grad, bias.grad):
        assert torch.isfinite(t).all()


# --------------------------------------------------------------------- dead rows and the lse


@pytest.mark.parametrize("engine", LSE_ENGINES)
def test_lse_of_dead_rows_passes_zero_gradient_not_nan(engine):
    """Backpropagating through lse where a row sees no key: naive once took log(0)."""
    q, k, v = (t.detach().float().requires_grad_() for t in make_qkv(1, 2, 2, 5, 4, 8))
    keep = torch.ones(1, 1, 5, 4, dtype=torch.bool)
    keep[..., 1, :] = False  # row 1 dead; causal with Lq > Lk also kills row 0
    out, lse = attention_with_lse(q, k, v, attn_mask=keep, is_causal=True, backend=engine)
    assert (lse[..., :2] == float("-inf")).all() and torch.isfinite(lse[..., 2:]).all()
    (out.square().sum() + lse.masked_fill(lse.isinf(), 0).sum() + lse.sum() * 0).backward()
    for name, grad in zip("qkv", (q.grad, k.grad, v.grad), strict=True):
        assert torch.isfinite(grad).all(), f"d{name} has NaN"
    assert (q.grad[..., :2, :] == 0).all()


def test_lse_gradient_matches_float64_reference():
    """d lse / d(q, k) equals the float64 logsumexp's gradient (alive rows), on both engines."""
    q64, k64, v64 = make_qkv(1, 2, 1, 6, 6, 8, dtype=torch.float64)
    s = (q64 @ k64.repeat_interleave(2, 1).transpose(-2, -1)) / math.sqrt(8)
    s = s.masked_fill(~causal_mask(6, 6), float("-inf"))
    want = torch.autograd.grad(s.logsumexp(-1).sum(), (q64, k64))
    for engine in LSE_ENGINES:
        q, k, v = (t.detach().requires_grad_() for t in (q64, k64, v64))
        _, lse = attention_with_lse(q, k, v, is_causal=True, backend=engine)
        got = torch.autograd.grad(lse.sum(), (q, k))
        for g, w in zip(got, want, strict=True):
            assert_close(g, w, torch.float64, grad=True)


def test_merge_partials_of_rows_dead_in_both_parts_is_nan_free():
    q, k, v = (t.detach().float().requires_grad_() for t in make_qkv(1, 1, 1, 4, 6, 8))
    keep = torch.ones(4, 6, dtype=torch.bool)
    keep[0] = False  # row 0 sees nothing in either half
    keep[1, :3] = False  # row 1 sees only the second half
    a = attention_with_lse(q, k[..., :3, :], v[..., :3, :], attn_mask=keep[:, :3], backend="tiled")
    b = attention_with_lse(q, k[..., 3:, :], v[..., 3:, :], attn_mask=keep[:, 3:], backend="naive")
    out, lse = merge_partials(*a, *b)
    full, full_lse = attention_with_lse(q, k, v, attn_mask=keep, backend="naive")
    assert_close(out, full.detach().double(), torch.float32)
    assert lse[0, 0, 0] == float("-inf") and (out[0, 0, 0] == 0).all()
    torch.testing.assert_close(lse[..., 1:], full_lse[..., 1:])
    (out.sum() + lse[..., 1:].sum()).backward()
    for name, grad in zip("qkv", (q.grad, k.grad, v.grad), strict=True):
        assert torch.isfinite(grad).all(), f"d{name} has NaN"
    assert (q.grad[0, 0, 0] == 0).all()


def test_merge_partials_keeps_the_output_dtype():
    out = torch.ones(1, 1, 2, 4, dtype=torch.bfloat16)
    lse = torch.zeros(1, 1, 2)
    merged, merged_lse = merge_partials(out, lse, out, lse)
    assert merged.dtype == torch.bfloat16 and merged_lse.dtype == torch.float32
    assert torch.allclose(merged_lse, torch.full_like(lse, math.log(2)))


# --------------------------------------------------------------------------------- arguments


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 0.0, -0.5, 0])
@pytest.mark.parametrize("backend", [*ENGINES, "auto"])
def test_scale_must_be_finite_and_positive(scale, backend):
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match=r"scale must be a finite number > 0"):
        attention(q, q, q, scale=scale, backend=backend)
    with pytest.raises(ValueError, match=r"scale must be a finite number > 0"):
        tiled_attention(q, q, q, scale=scale)


@pytest.mark.parametrize("big", [float("inf"), -float("inf"), 6e4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_no_keys_gives_zeros_whatever_the_queries_hold(big, dtype):
    """Lk = 0: every row is dead. q.sum() * 0 once made the output NaN for a q holding inf."""
    q = torch.full((2, 2, 3, 4), big, dtype=dtype, requires_grad=True)
    kv = torch.zeros(2, 1, 0, 4, dtype=dtype, requires_grad=True)
    out, lse = attention_with_lse(q, kv, kv)
    assert out.shape == (2, 2, 3, 4) and (out == 0).all()
    assert (lse == float("-inf")).all()
    out.sum().backward()
    assert (q.grad == 0).all()


def test_double_backward_through_tiled_is_a_clear_error():
    q, k, v = (t.detach().requires_grad_() for t in make_qkv(1, 1, 1, 4, 4, 8))
    out = attention(q, k, v, backend="tiled")
    (dq,) = torch.autograd.grad(out.sum(), q, create_graph=False)
    assert torch.isfinite(dq).all()  # a first-order gradient still works
    out = attention(q, k, v, backend="tiled")
    with pytest.raises(NotImplementedError, match="does not support double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


def test_double_backward_works_on_the_reference_engine():
    q, k, v = (t.detach().requires_grad_() for t in make_qkv(1, 1, 1, 4, 4, 8))
    out = attention(q, k, v, backend="naive")
    (dq,) = torch.autograd.grad(out.square().sum(), q, create_graph=True)
    (ddq,) = torch.autograd.grad(dq.sum(), q)
    assert torch.isfinite(ddq).all()


# ------------------------------------------------------------------------- masks of low rank


@pytest.mark.parametrize("backend", [*ENGINES, "auto"])
@pytest.mark.parametrize("kind", ["0d", "1d", "2d", "3d"])
def test_low_rank_masks_broadcast_on_every_engine(backend, kind):
    """A 0-D or 1-D attn_mask broadcasts to (B, Hq, Lq, Lk) as documented; sdpa and auto once
    raised IndexError on it."""
    q = torch.randn(2, 2, 5, 8)
    keep = {
        "0d": torch.tensor(True),
        "1d": torch.tensor([True, False, True, True, False]),
        "2d": torch.rand(5, 5, generator=torch.Generator().manual_seed(1)) > 0.3,
        "3d": torch.rand(2, 5, 5, generator=torch.Generator().manual_seed(2)) > 0.3,
    }[kind]
    expected = reference(q, q, q, keep=keep.expand(2, 2, 5, 5))
    for mask in (keep, _bias(keep, float("-inf"), torch.float32)):
        out = attention(q, q, q, attn_mask=mask, backend=backend)
        assert_close(out, expected, torch.float32)


# ---------------------------------------------------------------- the naive engine's numerics


def test_naive_a_masked_inf_key_spoils_only_the_rows_that_see_it():
    """A -inf bias added to a +inf score is NaN: masked cells must be filled, not added to."""
    q = torch.ones(1, 1, 4, 4)
    k = torch.randn(1, 1, 4, 4)
    k[..., 3, :] = float("inf")  # the last key: causal rows 0..2 may not see it
    results = {name: attention(q, k, q, is_causal=True, backend=name) for name in ENGINES}
    for name, out in results.items():
        assert torch.isfinite(out[..., :3, :]).all(), name
        assert not torch.isfinite(out[..., 3, :]).all(), name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_naive_accumulates_low_precision_in_float32(dtype):
    """bf16 inputs of std 3, E = 64: naive once computed scores and softmax in bf16 (max error
    0.27 against 0.016 for sdpa and tiled). Its error now matches theirs, and its lse is float32."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (3 * torch.randn(2, 4, 64, 64, generator=g, dtype=torch.float64) for _ in range(3))
    q, k, v = (t.to(dtype) for t in (q, k, v))
    expected = reference(q, k, v, keep=causal_mask(64, 64))
    errors = {}
    for name in ENGINES:
        out = attention(q, k, v, is_causal=True, backend=name)
        assert out.dtype == dtype
        errors[name] = (out.double() - expected).abs().max().item()
    # flash-attn's rule: at most twice the error of the fused kernels in the same dtype (it was
    # 0.27 against 0.016: the output's own bf16 rounding is about 0.03 at this scale)
    assert errors["naive"] <= 2 * max(errors["sdpa"], errors["tiled"]), errors
    _, lse = attention_with_lse(q, k, v, is_causal=True, backend="naive")
    assert lse.dtype == torch.float32


# ---------------------------------------------------------------------------- engine choice


def test_auto_window_on_cpu_takes_tiled_and_on_gpu_takes_sdpa():
    """The tiled engine is a Python loop over tiles: fast on CPU (it skips the window's blocks),
    about 100x slower than SDPA on an H200. "auto" chooses by device."""
    cpu = AttentionRequest(is_causal=True, window=64, device_type="cpu")
    cuda = AttentionRequest(is_causal=True, window=64, device_type="cuda")
    assert select_engine("auto", cpu).name == "tiled"
    assert select_engine("auto", cuda).name == "sdpa"
    # The log-sum-exp on a GPU: PyTorch's fused kernels (issue 16), not the tiled loop.
    assert (
        select_engine("auto", AttentionRequest(device_type="cuda", need_lse=True)).name == "fused"
    )


def test_attention_passes_the_device_to_the_engine_choice(monkeypatch):
    from selfattn import functional

    seen = []
    real = functional.select_engine
    monkeypatch.setattr(
        functional, "select_engine", lambda b, r: seen.append(r.device_type) or real(b, r)
    )
    q = torch.randn(1, 1, 4, 8)
    attention(q, q, q, is_causal=True, window=2)
    assert seen == ["cpu"]


# ---------------------------------------------------------------------------------- import


def test_import_inside_inference_mode_works():
    """No autograd probe at import: `import selfattn` first thing under inference_mode."""
    code = (
        "import torch\n"
        "with torch.inference_mode():\n"
        "    import selfattn\n"
        "    q = torch.randn(1, 1, 4, 8)\n"
        "    keep = torch.tensor([False, True, True, True])\n"
        "    out = selfattn.attention(q, q, q, attn_mask=keep, backend='sdpa')\n"
        "    assert torch.isfinite(out).all()\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


@pytest.mark.parametrize("backend", [*ENGINES, "auto"])
@pytest.mark.parametrize(
    ("dtype", "fill"), [(torch.bfloat16, "finfo32.min"), (torch.float16, -1e9)]
)
def test_a_wider_float_mask_is_not_narrowed_to_the_inputs_dtype(backend, dtype, fill):
    """A float32 mask with bf16/fp16 inputs: finfo(float32).min is -inf in bf16 and -1e9 is -inf
    in fp16, so casting the mask to q's dtype once turned such rows dead (zeros)."""
    value = torch.finfo(torch.float32).min if fill == "finfo32.min" else fill
    q, k, v = make_qkv(1, 2, 2, 3, 5, 8, dtype=dtype)
    keep = torch.ones(3, 5, dtype=torch.bool)
    keep[1] = False  # a row held entirely at the value: softmax ignores a constant
    keep[2, :2] = False
    mask = _bias(keep, value, torch.float32)
    out = attention(*(t.detach().to(dtype) for t in (q, k, v)), attn_mask=mask, backend=backend)
    expected = reference(q, k, v, bias=mask.double())
    assert (out[..., 1, :] != 0).any()
    assert_close(out, expected, torch.bfloat16)  # fp16 and bf16 inputs: the looser row
