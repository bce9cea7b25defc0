"""Every engine on CUDA against a float64 reference, run by hand on a lent GPU (tests never do).

    python benchmarks/gpu_correctness.py        # prints one line per case, exits 1 on a mismatch

Covers fp32 and bf16, causal or not, Lq != Lk, GQA, a sliding window, boolean and float masks and
fully masked rows, forward and gradients of q, k, v. Tolerances as in tests/tolerances.py.
"""

from __future__ import annotations

import itertools
import sys

import torch

from selfattn import attention, causal_mask

TOL = {torch.float32: (2e-4, 2e-3), torch.bfloat16: (3e-2, 3e-2)}  # (atol, rtol) on fwd


def reference(q, k, v, keep):
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    s = s.masked_fill(~keep, float("-inf"))
    w = torch.softmax(s, -1).nan_to_num(0.0)
    return w @ v


def case(engine, dtype, lq, lk, hq, hkv, causal, window, mask_kind, dead):
    dev = "cuda"
    g = torch.Generator(device=dev).manual_seed(0)
    shape_q, shape_kv = (2, hq, lq, 64), (2, hkv, lk, 64)
    q64 = torch.randn(shape_q, device=dev, generator=g, dtype=torch.float64)
    k64 = torch.randn(shape_kv, device=dev, generator=g, dtype=torch.float64)
    v64 = torch.randn(shape_kv, device=dev, generator=g, dtype=torch.float64)
    q64, k64, v64 = (t.to(dtype).double().requires_grad_() for t in (q64, k64, v64))
    keep = torch.ones(2, 1, lq, lk, dtype=torch.bool, device=dev)
    if mask_kind != "none":
        keep = torch.rand(2, 1, lq, lk, device=dev, generator=g) > 0.2
    if dead:
        keep[0, :, : min(3, lq)] = False
    full_keep = keep & causal_mask(lq, lk, window=window, device=dev) if causal else keep
    expected = reference(q64, k64, v64, full_keep)
    dout = torch.randn(expected.shape, device=dev, dtype=torch.float64, generator=g)
    exp_grads = torch.autograd.grad(expected, (q64, k64, v64), dout)

    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q64, k64, v64))
    mask = None
    if mask_kind == "bool" or dead:
        mask = keep
    if mask_kind == "float":
        mask = torch.zeros(keep.shape, device=dev, dtype=dtype).masked_fill(~keep, float("-inf"))
    out = attention(q, k, v, attn_mask=mask, is_causal=causal, window=window, backend=engine)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(dtype))
    atol, rtol = TOL[dtype]
    errors = [(out.double() - expected).abs().max().item()]
    errors += [(a.double() - b).abs().max().item() for a, b in zip(grads, exp_grads, strict=True)]
    ok = all(torch.isfinite(t).all() for t in (out, *grads))
    ok = ok and torch.allclose(out.double(), expected, atol=atol, rtol=rtol)
    ok = ok and all(
        torch.allclose(a.double(), b, atol=4 * atol, rtol=4 * rtol)
        for a, b in zip(grads, exp_grads, strict=True)
    )
    return ok, errors


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_correctness: no CUDA device")
        return 2
    print(torch.__version__, torch.cuda.get_device_name(0))
    failures = 0
    shapes = [(256, 256, 8, 8), (100, 333, 8, 2), (333, 100, 4, 1), (1024, 1024, 8, 2)]
    for engine, dtype, (lq, lk, hq, hkv), causal, mask_kind in itertools.product(
        ["naive", "sdpa", "tiled"],
        [torch.float32, torch.bfloat16],
        shapes,
        [False, True],
        ["none", "bool", "float"],
    ):
        for window, dead in [(None, False), (None, True)] + ([(64, False)] if causal else []):
            ok, errors = case(engine, dtype, lq, lk, hq, hkv, causal, window, mask_kind, dead)
            failures += not ok
            if not ok or (lq, window, dead, mask_kind) == (1024, None, False, "none"):
                print(
                    f"{'ok  ' if ok else 'FAIL'} {engine:5s} {str(dtype)[6:]:8s} Lq={lq} Lk={lk} "
                    f"H={hq}/{hkv} causal={causal} window={window} mask={mask_kind} dead={dead} "
                    f"max|err| out/dq/dk/dv = " + " ".join(f"{e:.1e}" for e in errors)
                )
    print(f"{failures} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
