"""The "fused" engine (selfattn.engines.fused) and the private ATen ops it stands on.

The engine is held to the float64 oracle with the others in tests/test_properties.py and
tests/test_functional.py (output, lse, gradients of q, k, v and of a float mask). Here: the ops'
recorded signatures (a torch upgrade that changes one fails here, loudly), what the engine
refuses and why, the parts of the adapter the drawn cases reach only by chance (the gradient of
the lse alone, the float mask's gradient over several row blocks, keys not copied for GQA), and
the CUDA code paths run on "meta" tensors: their arguments and shapes, not their numbers (no GPU
here; benchmarks/gpu_check.sh checks the numbers where one is lent).
"""

from __future__ import annotations

import pytest
import torch
from tolerances import assert_close

from selfattn import attention, attention_with_lse
from selfattn.engines import AttentionRequest, _aten, fused, get_engine


def qkv(b=1, hq=2, hkv=1, lq=9, lk=9, e=8, ev=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        for shape in ((b, hq, lq, e), (b, hkv, lk, e), (b, hkv, lk, ev))
    ]


# ------------------------------------------------------------------ the private ops' signatures


@pytest.mark.parametrize("name", sorted(_aten.SCHEMAS))
def test_the_private_ops_have_the_recorded_signatures(name):
    """If this fails after a torch upgrade, the fused engine refuses to run (see the next test)
    until selfattn.engines._aten and the engine are checked against the new signatures."""
    assert _aten.live_schema(name) == _aten.SCHEMAS[name], (
        f"aten::{name} in torch {torch.__version__} differs from torch {_aten.RECORDED_TORCH}'s"
    )
    assert _aten.problems("cpu") == []


def test_a_changed_signature_makes_the_engine_refuse_and_say_which(monkeypatch):
    name = "_scaled_dot_product_flash_attention_for_cpu"
    monkeypatch.setitem(_aten.SCHEMAS, name, "aten::" + name + "(Tensor query) -> Tensor")
    monkeypatch.setattr(_aten, "_PROBLEMS", {})
    q, k, v = qkv()
    with pytest.raises(ValueError, match=rf"backend 'fused' cannot run.*aten::{name} changed"):
        attention_with_lse(q, k, v, backend="fused")
    _, lse = attention_with_lse(q, k, v)  # auto: the tiled engine serves the lse instead
    assert lse.grad_fn.name() == "_TiledAttentionBackward"


# ------------------------------------------------------------------------ what it refuses


def test_requests_no_fused_kernel_serves_are_errors_with_a_reason():
    engine = get_engine("fused")
    assert "weights" in engine.unsupported(AttentionRequest(need_weights=True))
    assert "dropout" in engine.unsupported(AttentionRequest(dropout_p=0.1))
    assert "not mps" in engine.unsupported(AttentionRequest(device_type="mps"))
    cuda64 = AttentionRequest(device_type="cuda", dtype=torch.float64)
    assert "float64" in engine.unsupported(cuda64)
    assert engine.unsupported(AttentionRequest(device_type="cpu", dtype=torch.float64)) is None
    q, k, v = qkv()
    with pytest.raises(ValueError, match="backend 'fused' cannot run this call: fused has no "):
        attention(q, k, v, dropout_p=0.2, backend="fused")  # never a silent fallback


def test_double_backward_is_refused():
    q, k, v = qkv()
    out = attention(q, k, v, backend="fused")
    with pytest.raises(NotImplementedError, match="double backward"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


# --------------------------------------------------------------------- the adapter's pieces


def naive_and_fused(fn, *inputs):
    """``fn(backend, *leaves)`` -> outputs on both engines; returns (outputs, grads) of each."""
    results = []
    for backend in ("naive", "fused"):
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        outputs = fn(backend, *leaves)
        wanted = [t for t in leaves if t.requires_grad]
        grads = torch.autograd.grad(outputs, wanted, allow_unused=True, materialize_grads=True)
        results.append((outputs, grads))
    return results


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_gradient_through_the_lse_alone(dtype):
    """No gradient reaches the output, only the lse: the widened column carries it."""
    q, k, v = qkv(hq=4, hkv=2, lq=7, lk=12, e=8, ev=5, dtype=dtype)
    g = torch.randn(1, 4, 7, generator=torch.Generator().manual_seed(1)).to(torch.float64)

    def lse_only(backend, q, k, v):
        _, lse = attention_with_lse(q, k, v, is_causal=True, backend=backend)
        return (lse * g.to(lse.dtype)).sum()

    (ref, ref_grads), (got, grads) = naive_and_fused(lse_only, q, k, v)
    assert_close(got, ref, dtype)
    for a, b in zip(grads, ref_grads, strict=True):
        assert_close(a, b, dtype, grad=True)


@pytest.mark.parametrize("mask_shape", [(2, 4, 40, 33), (1, 1, 40, 33), (2, 1, 1, 33), (33,)])
def test_float_mask_gradient_over_several_row_blocks(monkeypatch, mask_shape):
    """The CPU mask gradient is dS recomputed a block of rows at a time, summed to the mask's
    shape: with blocks of 3 rows here, every shape must come out as the reference's."""
    monkeypatch.setattr(fused, "_MASK_GRAD_CELLS", 3 * 2 * 4 * 33)  # 3 rows of (B, Hq, Lk)
    q, k, v = qkv(b=2, hq=4, hkv=2, lq=40, lk=33, e=8, ev=8)
    gen = torch.Generator().manual_seed(2)
    mask = torch.randn(mask_shape, generator=gen, dtype=torch.float64)
    mask = mask.masked_fill(torch.rand(mask_shape, generator=gen) < 0.2, -1e9).requires_grad_()
    dout = torch.randn(2, 4, 40, 8, generator=gen, dtype=torch.float64)

    def run(backend, q, k, v, mask):
        out, lse = attention_with_lse(q, k, v, attn_mask=mask, is_causal=True, backend=backend)
        return (out * dout).sum() + lse.sum()

    (ref, ref_grads), (got, grads) = naive_and_fused(run, q, k, v, mask)
    assert_close(got, ref, torch.float64)
    for a, b in zip(grads, ref_grads, strict=True):
        assert_close(a, b, torch.float64, grad=True)


def test_grouped_query_keys_reach_the_cpu_kernel_uncopied(monkeypatch):
    calls = []
    real = _aten.op

    def spy(name):
        def call(*args, **kw):
            calls.append((name, args[1 if name.endswith("_cpu") else 2]))  # the keys
            return real(name)(*args, **kw)

        return call

    monkeypatch.setattr(_aten, "op", spy)
    q, k, v = qkv(hq=6, hkv=2)
    attention(q, k, v, is_causal=True, backend="fused").sum().backward()
    names = [name for name, _ in calls]
    assert names == [
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
    ]
    fwd_k, bwd_k = calls[0][1], calls[1][1]
    for keys in (fwd_k, bwd_k):  # forward (q, k, v, ...), backward (dout, q, k, v, ...)
        assert keys.data_ptr() == k.data_ptr() and keys.shape[1] == 2


# ------------------------------------------------------------------- CUDA paths, on meta tensors


@pytest.mark.parametrize(
    ("dtype", "kw", "kernel"),
    [
        (torch.bfloat16, {"is_causal": True}, "cuda_flash"),
        (torch.bfloat16, {"is_causal": True, "window": 4}, "cuda_efficient"),
        (torch.float32, {}, "cuda_efficient"),
        (torch.float16, {"attn_mask": "float"}, "cuda_efficient"),
    ],
)
def test_cuda_paths_pass_the_kernels_well_formed_arguments(dtype, kw, kernel):
    """On "meta" tensors the engine takes its CUDA paths (any device but cpu does) and PyTorch's
    meta kernels check the arguments and give the shapes: forward, then backward through out
    and lse (with GQA, Ev != E, Lq > Lk, and a float mask that requires grad)."""
    b, hq, hkv, lq, lk, e, ev = 2, 4, 2, 13, 9, 12, 10
    q = torch.empty(b, hq, lq, e, dtype=dtype, device="meta", requires_grad=True)
    k = torch.empty(b, hkv, lk, e, dtype=dtype, device="meta", requires_grad=True)
    v = torch.empty(b, hkv, lk, ev, dtype=dtype, device="meta", requires_grad=True)
    if kw.get("attn_mask") == "float":
        kw = {"attn_mask": torch.empty(b, 1, lq, lk, device="meta", requires_grad=True)}
    request = AttentionRequest(scale=0.3, need_lse=True, device_type="cuda", dtype=dtype, **kw)
    assert fused._plan(q, k, request).kernel == kernel
    result = fused.fused_attention(q, k, v, request)
    assert result.output.shape == (b, hq, lq, ev) and result.output.dtype == dtype
    assert result.lse.shape == (b, hq, lq) and result.lse.dtype == torch.float32
    leaves = [t for t in (q, k, v, kw.get("attn_mask")) if t is not None]
    grads = torch.autograd.grad(
        (result.output, result.lse),
        leaves,
        (torch.empty_like(result.output), torch.empty_like(result.lse)),
    )
    for leaf, grad in zip(leaves, grads, strict=True):
        assert grad.shape == leaf.shape and grad.dtype == leaf.dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_block_kernels_for_the_ring_on_meta_tensors(dtype):
    q = torch.empty(1, 4, 16, 8, dtype=dtype, device="meta")
    k = torch.empty(1, 2, 16, 8, dtype=dtype, device="meta")
    out, lse = fused.fused_block_forward(q, k, k, is_causal=True, scale=0.35)
    assert out.shape == (1, 4, 16, 8) and out.dtype == lse.dtype == torch.float32
    dq, dk, dv = fused.fused_block_backward(
        q, k, k, out, lse, torch.empty_like(q), is_causal=False, scale=0.35
    )
    assert (dq.shape, dk.shape, dv.shape) == (q.shape, k.shape, k.shape)
