"""Every engine on CUDA against a float64 reference, run by hand on a lent GPU (tests never do).

    python benchmarks/gpu_correctness.py [--engines fused,tiled]   # one line per case; exit 1
    python benchmarks/gpu_correctness.py --time                     # fused vs SDPA flash, bf16

Covers fp32 and bf16, causal or not, Lq != Lk, GQA, a sliding window, boolean and float masks and
fully masked rows, forward and gradients of q, k, v. Tolerances as in tests/tolerances.py. The
engines that return the log-sum-exp ("fused", "tiled", "naive") are also checked through
`attention_with_lse`: the lse, and the gradients of q, k, v and of a float mask with a gradient
fed back through the lse too.

``--time``: forward + backward, bf16, causal, B=4, H=16, E=64, L=4096: the fused engine (with
the lse) against SDPA's flash backend (without), medians of CUDA-event timings; the target is
fused >= 0.9x flash's speed (issue 16). Exit 1 when missed.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import sys

import torch
import torch.nn.functional as F

from selfattn import attention, attention_with_lse, causal_mask

LSE_ENGINES = ("naive", "fused", "tiled")

DEVICE = "cuda"  # --device cpu: a check that the script runs, on a machine without a GPU
TOL = {torch.float32: (2e-4, 2e-3), torch.bfloat16: (3e-2, 3e-2)}  # (atol, rtol) on fwd


def reference(q, k, v, keep, bias=None, with_lse=False):
    """float64 attention; with ``with_lse`` also the lse (-inf on rows with no key)."""
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = (q @ k.transpose(-2, -1)) / q.shape[-1] ** 0.5
    if bias is not None:
        s = s + bias.masked_fill(~keep, 0.0)
    s = s.masked_fill(~keep, float("-inf"))
    w = torch.softmax(s, -1).nan_to_num(0.0)
    if not with_lse:
        return w @ v
    live = keep.expand(s.shape).any(-1)
    lse = torch.logsumexp(s.masked_fill(~live[..., None], 0.0), -1)
    return w @ v, lse.masked_fill(~live, float("-inf"))


def case(engine, dtype, lq, lk, hq, hkv, causal, window, mask_kind, dead):
    dev = DEVICE
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


def lse_case(engine, dtype, lq, lk, hq, hkv, causal):
    """``attention_with_lse`` with a float mask that requires grad (a few dead rows): out, lse
    and the gradients of q, k, v and the mask (fed back through out and lse) vs float64."""
    dev = DEVICE
    g = torch.Generator(device=dev).manual_seed(1)
    q64 = torch.randn(2, hq, lq, 64, device=dev, generator=g, dtype=torch.float64)
    k64 = torch.randn(2, hkv, lk, 64, device=dev, generator=g, dtype=torch.float64)
    v64 = torch.randn(2, hkv, lk, 64, device=dev, generator=g, dtype=torch.float64)
    keep = torch.rand(2, 1, lq, lk, device=dev, generator=g) > 0.2
    keep[0, :, : min(3, lq)] = False
    bias64 = torch.randn(2, 1, lq, lk, device=dev, generator=g, dtype=torch.float64)
    leaves64 = [t.to(dtype).double().requires_grad_() for t in (q64, k64, v64, bias64)]
    full_keep = keep & causal_mask(lq, lk, device=dev) if causal else keep
    out64, lse64 = reference(*leaves64[:3], full_keep, leaves64[3], with_lse=True)
    dout = torch.randn(out64.shape, device=dev, dtype=torch.float64, generator=g)
    dlse = torch.randn(lse64.shape, device=dev, dtype=torch.float64, generator=g)
    live = full_keep.expand((*lse64.shape, lk)).any(-1)
    loss64 = (out64 * dout).sum() + (lse64.masked_fill(~live, 0.0) * dlse).sum()
    want = torch.autograd.grad(loss64, leaves64)

    leaves = [t.detach().to(dtype).requires_grad_() for t in leaves64]
    mask = leaves[3].masked_fill(~keep, float("-inf"))
    out, lse = attention_with_lse(*leaves[:3], attn_mask=mask, is_causal=causal, backend=engine)
    loss = (out.double() * dout).sum() + (lse.double().masked_fill(~live, 0.0) * dlse).sum()
    got = torch.autograd.grad(loss, leaves)
    atol, rtol = TOL[dtype]
    dead_ok = bool((lse[~live] == float("-inf")).all()) and bool((out[~live] == 0).all())
    pairs = [(out, out64, 1), (lse.masked_fill(~live, 0), lse64.masked_fill(~live, 0), 1)]
    pairs += [(a, b, 4) for a, b in zip(got, want, strict=True)]
    errors = [(a.double() - b).abs().max().item() for a, b, _ in pairs]
    ok = dead_ok and all(torch.isfinite(a).all() for a, _, _ in pairs)
    ok = ok and all(
        torch.allclose(a.double(), b, atol=f * atol, rtol=f * rtol) for a, b, f in pairs
    )
    return ok, errors


def time_fused_vs_flash(repeats: int = 20) -> int:
    """Forward + backward, bf16, causal: fused (with the lse) vs SDPA's flash backend."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, length, e = 4, 16, 4096, 64
    q, k, v = (
        torch.randn(b, h, length, e, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        for _ in range(3)
    )
    dout = torch.randn_like(q)

    def flash():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return torch.autograd.grad(out, (q, k, v), dout)

    def fused():
        out, _ = attention_with_lse(q, k, v, is_causal=True, backend="fused")
        return torch.autograd.grad(out, (q, k, v), dout)

    ref, got = flash(), fused()
    worst = max((a.float() - b.float()).abs().max().item() for a, b in zip(got, ref, strict=True))
    times = {"flash": [], "fused": []}
    for _ in range(repeats):  # round-robin
        for name, fn in (("flash", flash), ("fused", fused)):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times[name].append(start.elapsed_time(end))
    flash_ms, fused_ms = (statistics.median(times[n]) for n in ("flash", "fused"))
    ratio = flash_ms / fused_ms
    ok = ratio >= 0.9
    print(
        f"fwd+bwd bf16 causal B={b} H={h} L={length} E={e}: SDPA flash {flash_ms:.2f} ms, "
        f"fused + lse {fused_ms:.2f} ms: fused {ratio:.2f}x flash's speed (target >= 0.9) "
        f"{'PASS' if ok else 'MISS'}; max |grad difference| {worst:.1e}"
    )
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engines", default="naive,sdpa,fused,tiled")
    parser.add_argument("--time", action="store_true", help="time fused vs SDPA flash instead")
    parser.add_argument("--device", default="cuda", help="cpu: check that the script runs")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cpu":
        print("gpu_correctness: on the CPU, a check of the script only")
    elif not torch.cuda.is_available():
        print("gpu_correctness: no CUDA device")
        return 2
    else:
        print(torch.__version__, torch.cuda.get_device_name(0))
    if args.time:
        return time_fused_vs_flash()
    engines = args.engines.split(",")
    failures = 0
    shapes = [(256, 256, 8, 8), (100, 333, 8, 2), (333, 100, 4, 1), (1024, 1024, 8, 2)]
    for engine, dtype, (lq, lk, hq, hkv), causal in itertools.product(
        [e for e in engines if e in LSE_ENGINES], [torch.float32, torch.bfloat16], shapes,
        [False, True],
    ):  # fmt: skip
        ok, errors = lse_case(engine, dtype, lq, lk, hq, hkv, causal)
        failures += not ok
        print(
            f"{'ok  ' if ok else 'FAIL'} {engine:5s} {str(dtype)[6:]:8s} Lq={lq} Lk={lk} "
            f"H={hq}/{hkv} causal={causal} with lse, float mask with grad, dead rows: "
            "max|err| out/lse/dq/dk/dv/dmask = " + " ".join(f"{e:.1e}" for e in errors)
        )
    for engine, dtype, (lq, lk, hq, hkv), causal, mask_kind in itertools.product(
        engines,
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
