"""The "fused" engine: PyTorch's own fused kernels, with the log-sum-exp.

``torch.nn.functional.scaled_dot_product_attention`` computes each row's log-sum-exp and throws it
away. The private ATen ops under it return it, and their backwards take it back
(`selfattn.engines._aten` holds them and checks their signatures):

    CPU   _scaled_dot_product_flash_attention_for_cpu      any float dtype, a float mask
    CUDA  _scaled_dot_product_flash_attention              fp16/bf16, no mask
          _scaled_dot_product_efficient_attention          fp32/fp16/bf16, a bias (the mask)

The CUDA paths are written from the ops' schemas and checked on "meta" tensors only: they have
not run on a GPU yet (benchmarks/gpu_check.sh runs them where one is lent).

The adapter gives them selfattn's contract (`selfattn.engines.registry`):
- Causal is bottom-right; the kernels' is top-left. Lq == Lk: the kernel's own (it skips the
  masked blocks). Lq > Lk: the first Lq - Lk rows see no key; the last Lk rows are a square,
  run with the kernel's flag. One query: it sees every key, no mask. 1 < Lq < Lk, and any
  window: a dense bottom-right mask (Lq x Lk memory; "tiled" skips those blocks instead).
- Masks: a bool mask becomes 0 / -inf. A float mask is shifted so each row peaks at 0
  (`selfattn.masks.float_mask_shift`) and the shift is added back to the lse. On CPU the mask
  stays in float32 (float64 for float64 inputs); the CUDA bias is in q's dtype.
- Rows with no key: whatever a kernel returns there, they return zeros and lse = -inf. The
  adapter lets them see key 0 (as the sdpa adapter does) and zeroes them afterwards; the
  backward feeds them zero gradient, so key 0 gets nothing from them.
- The gradient of the lse: the kernels' backwards take none. The backward computes
  ``dS = P * (dP - D)`` with ``D = rowsum(dO * O)`` read from ``out``; a gradient on lse adds
  ``P * dlse``, i.e. ``D - dlse`` in place of D. The adapter widens the head dim by one column:
  v gets a 0 there, dO a 1 and ``out`` -dlse, so the kernel's own D is D - dlse and dP is
  unchanged (q and k get 0 there: the scores do not change).
- The gradient of a float mask that requires grad: CUDA's efficient kernel returns it; on CPU it
  is ``dS`` recomputed from the saved lse, a block of query rows at a time (B x Hq x rows x Lk
  floats at once), summed over the mask's broadcast dims.
- Grouped-query attention: the CPU kernel and CUDA's flash take Hkv < Hq as they are; CUDA's
  efficient kernel does not, so k and v are repeated to Hq heads there (a copy).
- Head dims: the CPU and flash kernels need E == Ev: the narrower is padded with zeros (a
  copy), which changes no score and no output. CUDA's kernels get head dims padded to a
  multiple of 8, the bias's last dim to a multiple of 16 (as SDPA does).
- Float32 accumulation for bf16/fp16 (the kernels do), lse in float32 (float64 for float64).
- Dropout is refused: the CPU kernel has none, and the CUDA kernels' Philox keep-mask cannot be
  made the other engines'. Use "tiled" (reproducible masks) or "sdpa".

Shapes: B batch, Hq query heads, Hkv key/value heads, G = Hq / Hkv, Lq queries, Lk keys,
E head dim, Ev value head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from selfattn._checks import compute_dtype
from selfattn.engines import _aten
from selfattn.engines.registry import (
    AttentionRequest,
    BlockKernels,
    Engine,
    EngineOutput,
    register,
)
from selfattn.masks import float_mask_shift, merge_masks

_NEG_INF = float("-inf")
_CPU_FLASH, _CUDA_FLASH, _CUDA_EFFICIENT = "cpu_flash", "cuda_flash", "cuda_efficient"
# Rows of the float-mask gradient computed at once on CPU: B * Hq * rows * Lk <= this.
_MASK_GRAD_CELLS = 1 << 22


def fused_attention(q: Tensor, k: Tensor, v: Tensor, request: AttentionRequest) -> EngineOutput:
    """Engine entry: q (B, Hq, Lq, E), k (B, Hkv, Lk, E), v (B, Hkv, Lk, Ev), Lq, Lk >= 1."""
    out, lse = _FusedAttention.apply(q, k, v, request.attn_mask, request)
    return EngineOutput(output=out, lse=lse if request.need_lse else None)


# --------------------------------------------------------------------------------------------
# How one call maps onto a kernel.


@dataclass(frozen=True)
class _Plan:
    kernel: str  # _CPU_FLASH, _CUDA_FLASH or _CUDA_EFFICIENT
    is_causal: bool  # the kernel's own (top-left) flag: only ever on a square problem
    first_row: int  # rows before it see no key (causal, Lq > Lk): never computed
    mask: Tensor | None  # the kernel's float mask, 4-D, rows with no key rescued
    shift: Tensor | None  # a float mask's row shift (..., Lq, 1), added back to lse
    dead: Tensor | None  # (..., Lq, 1) bool: rows the mask leaves without a key
    scale: float


def _plan(q: Tensor, k: Tensor, request: AttentionRequest) -> _Plan:
    lq, lk = q.shape[-2], k.shape[-2]
    no_mask = request.window is None and request.attn_mask is None
    if no_mask and (not request.is_causal or lq == 1):  # one query sees every key
        causal, first_row, merged = False, 0, None
    elif no_mask and lq >= lk:  # a square after the rows that see nothing
        causal, first_row, merged = True, lq - lk, None
    else:
        merged = merge_masks(
            request.attn_mask, request.is_causal, request.window, lq, lk, device=q.device
        )  # bool or float, broadcastable to (B, Hq, Lq, Lk)
        causal, first_row = False, 0
    kernel = _kernel_for(q.device.type, q.dtype, merged is not None, q.shape[-1])
    mask = shift = dead = None
    if merged is not None:
        mask, shift, dead = _kernel_mask(merged, q.dtype, kernel)
    return _Plan(kernel, causal, first_row, mask, shift, dead, request.scale)


def _kernel_for(device_type: str, dtype: torch.dtype, has_mask: bool, head_dim: int) -> str:
    if device_type == "cpu":
        return _CPU_FLASH
    flash_ok = dtype in (torch.float16, torch.bfloat16) and head_dim <= 256
    return _CUDA_FLASH if flash_ok and not has_mask else _CUDA_EFFICIENT


def _kernel_mask(merged: Tensor, dtype: torch.dtype, kernel: str):
    """The kernel's float mask (4-D), the float mask's row shift (or None) and the dead rows."""
    merged = merged.detach()
    keep = merged if merged.dtype == torch.bool else merged > _NEG_INF
    dead = ~keep.any(dim=-1, keepdim=True)  # (..., Lq, 1); no .any() here: no host sync
    first_key = torch.zeros(keep.shape[-1], dtype=torch.bool, device=keep.device)  # (Lk,)
    first_key[0] = True
    rescue = dead & first_key  # (..., Lq, Lk): key 0 of dead rows only
    work = compute_dtype(dtype)
    if merged.dtype == torch.bool:
        shift = None
        mask = torch.zeros(keep.shape, dtype=work, device=keep.device)
        mask = mask.masked_fill_(~(keep | rescue), _NEG_INF)
    else:
        mask = merged.to(work)
        shift = float_mask_shift(mask)  # (..., Lq, 1)
        mask = (mask - shift).masked_fill_(rescue, 0.0)  # each row peaks at 0
    if kernel != _CPU_FLASH:  # CUDA's bias is in q's dtype (after the shift: see sdpa.py)
        mask = mask.to(dtype)
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))  # 4-D
    return mask, shift, dead


# --------------------------------------------------------------------------------------------
# The autograd Function.


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_mask, request: AttentionRequest):
        plan = _plan(q, k, request)
        rows = q[:, :, plan.first_row :]  # (B, Hq, Lq', E)
        out_k, lse_k, state = kernel_forward(plan.kernel, rows, k, v, plan)
        out, lse = _assemble(plan, q, v, out_k, lse_k)
        ctx.save_for_backward(q, k, v, out, lse_k, attn_mask)
        ctx.plan, ctx.state = plan, state
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if torch.is_grad_enabled():
            raise NotImplementedError(
                "the fused attention engine does not support double backward "
                "(create_graph=True): its backward is PyTorch's private kernel; use "
                "backend='naive' or 'sdpa' for higher-order gradients"
            )
        q, k, v, out, lse_k, attn_mask = ctx.saved_tensors
        plan: _Plan = ctx.plan
        if dout is None:
            dout = torch.zeros_like(out)
        r = plan.first_row
        dout_r, out_r = dout[:, :, r:], out[:, :, r:]  # (B, Hq, Lq', Ev)
        dlse_r = None if dlse is None else dlse[:, :, r:]  # (B, Hq, Lq')
        if plan.dead is not None:  # rows with no key pass no gradient (key 0 rescued them)
            dout_r = dout_r.masked_fill(plan.dead, 0.0)
            dlse_r = None if dlse_r is None else dlse_r.masked_fill(plan.dead.squeeze(-1), 0.0)
        mask_grad = attn_mask is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dbias = kernel_backward(
            plan.kernel, dout_r, q[:, :, r:], k, v, out_r, lse_k, dlse_r, plan, ctx.state,
            mask_grad,
        )  # fmt: skip
        if r:
            dq = torch.cat([dq.new_zeros(*dq.shape[:2], r, dq.shape[-1]), dq], dim=2)
        dmask = None
        if mask_grad:
            if dbias is None:  # CPU: recompute dS from the saved lse
                dbias = _cpu_mask_grad(q, k, v, out, lse_k, dout_r, dlse_r, plan, attn_mask.shape)
            dmask = dbias.sum_to_size(attn_mask.shape).to(attn_mask.dtype)
        return dq, dk, dv, dmask, None


def _assemble(plan: _Plan, q: Tensor, v: Tensor, out_k: Tensor, lse_k: Tensor):
    """The kernel's results as the engine's: (B, Hq, Lq, Ev) in q's dtype and (B, Hq, Lq)
    lse; rows with no key zero and -inf, the float mask's shift back in the lse."""
    out = out_k[..., : v.shape[-1]]  # (B, Hq, Lq', Ev): the padding columns dropped
    lse = lse_k.to(compute_dtype(q.dtype), copy=True)  # (B, Hq, Lq'): not the saved tensor
    if plan.first_row:  # causal, Lq > Lk: the leading rows see no key
        b, hq, r = q.shape[0], q.shape[1], plan.first_row
        out = torch.cat([out.new_zeros(b, hq, r, out.shape[-1]), out], dim=2)
        lse = torch.cat([lse.new_full((b, hq, r), _NEG_INF), lse], dim=2)
    if plan.shift is not None:
        lse = lse + plan.shift.squeeze(-1)
    if plan.dead is not None:
        out = out.masked_fill(plan.dead, 0.0)
        lse = lse.masked_fill(plan.dead.squeeze(-1), _NEG_INF)
    return out.contiguous(), lse.contiguous()


# --------------------------------------------------------------------------------------------
# The kernels: forward and backward, shared with ring attention's block kernels.


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _widths(kernel: str, e: int, ev: int, spare: bool) -> tuple[int, int]:
    """Head dims (q/k, v) to pad to; ``spare``: one more column of v for the lse gradient."""
    ev = ev + spare
    if kernel == _CUDA_EFFICIENT:
        return _round_up(e, 8), _round_up(ev, 8)
    width = max(e, ev)
    return (width, width) if kernel == _CPU_FLASH else (_round_up(width, 8),) * 2


def _pad(t: Tensor, width: int) -> Tensor:
    t = t if t.stride(-1) == 1 else t.contiguous()  # every kernel reads rows contiguously
    return t if t.shape[-1] == width else F.pad(t, (0, width - t.shape[-1]))


def _repeat_heads(kernel: str, q: Tensor, t: Tensor) -> Tensor:
    """k or v as the kernel takes them: as they are, or repeated to Hq heads (efficient)."""
    if kernel != _CUDA_EFFICIENT or t.shape[1] == q.shape[1]:
        return t
    return t.repeat_interleave(q.shape[1] // t.shape[1], dim=1)  # (B, Hkv, ..) -> (B, Hq, ..)


def _bias(plan: _Plan, q: Tensor, lk: int) -> Tensor | None:
    """The efficient kernel's bias: (B, Hq, Lq, Lk) in q's dtype, rows 16-aligned in memory."""
    if plan.mask is None:
        return None
    pad = (-lk) % 16
    aligned = F.pad(plan.mask, (0, pad))[..., :lk] if pad else plan.mask
    return aligned.expand(q.shape[0], q.shape[1], q.shape[2], lk)


def kernel_forward(kernel: str, q: Tensor, k: Tensor, v: Tensor, plan: _Plan):
    """One fused forward: out (B, Hq, Lq, W) in q's dtype (W >= Ev: padding columns last),
    lse (B, Hq, Lq) as the kernel returns it (float32; float64 on CPU for float64), and the
    kernel's state for its backward."""
    we, wv = _widths(kernel, q.shape[-1], v.shape[-1], spare=False)
    qp, kp, vp = _pad(q, we), _pad(k, we), _pad(v, wv)
    kp, vp = _repeat_heads(kernel, q, kp), _repeat_heads(kernel, q, vp)
    lq = q.shape[-2]
    if kernel == _CPU_FLASH:
        out, lse = _aten.op("_scaled_dot_product_flash_attention_for_cpu")(
            qp, kp, vp, 0.0, plan.is_causal, attn_mask=plan.mask, scale=plan.scale
        )
        return out, lse, ()
    if kernel == _CUDA_FLASH:
        out, lse, cum_q, cum_k, max_q, max_k, seed, offset, _ = _aten.op(
            "_scaled_dot_product_flash_attention"
        )(qp, kp, vp, 0.0, plan.is_causal, False, scale=plan.scale)
        return out, lse, (cum_q, cum_k, max_q, max_k, seed, offset)
    out, lse, seed, offset = _aten.op("_scaled_dot_product_efficient_attention")(
        qp, kp, vp, _bias(plan, qp, k.shape[-2]), True, 0.0, plan.is_causal, scale=plan.scale
    )
    return out, lse[..., :lq], (seed, offset)  # the kernel pads lse to a multiple of 32 rows


def kernel_backward(
    kernel: str, dout, q, k, v, out, lse, dlse, plan: _Plan, state: tuple, mask_grad: bool
):
    """One fused backward: (dq, dk, dv) shaped and typed like q, k, v, and the efficient
    kernel's bias gradient (B, Hq, Lq, Lk) or None.

    ``out`` (B, Hq, Lq, >= Ev) and ``lse`` (B, Hq, Lq) are the rows' whole attention's, as the
    kernel returned them or merged over more keys than k holds (ring attention); ``dout``
    (B, Hq, Lq, Ev); ``dlse`` (B, Hq, Lq) or None.
    """
    e, ev = q.shape[-1], v.shape[-1]
    spare = dlse is not None
    we, wv = _widths(kernel, e, ev, spare)
    qp, kp, vp = _pad(q, we), _pad(k, we), _pad(v, wv)
    kp, vp = _repeat_heads(kernel, q, kp), _repeat_heads(kernel, q, vp)
    out = out[..., :ev].to(q.dtype)
    dout = dout.to(q.dtype)
    if spare:  # D - dlse through the kernel's own D = rowsum(dO * O): see the module docstring
        out = torch.cat([out, (-dlse).to(q.dtype).unsqueeze(-1)], dim=-1)
        dout = torch.cat([dout, dout.new_ones(*dout.shape[:-1], 1)], dim=-1)
    outp, doutp = _pad(out, wv), _pad(dout, wv)
    scale, causal = plan.scale, plan.is_causal
    dbias = None
    if kernel == _CPU_FLASH:
        lse = lse.to(compute_dtype(q.dtype)).contiguous()
        dq, dk, dv = _aten.op("_scaled_dot_product_flash_attention_for_cpu_backward")(
            doutp, qp, kp, vp, outp, lse, 0.0, causal, attn_mask=plan.mask, scale=scale
        )
    elif kernel == _CUDA_FLASH:
        cum_q, cum_k, max_q, max_k, seed, offset = state or _no_state(kernel, q, k)
        dq, dk, dv = _aten.op("_scaled_dot_product_flash_attention_backward")(
            doutp, qp, kp, vp, outp, lse.float().contiguous(), cum_q, cum_k, max_q, max_k,
            0.0, causal, seed, offset, scale=scale,
        )  # fmt: skip
    else:
        seed, offset = state or _no_state(kernel, q, k)
        lse32 = F.pad(lse.float(), (0, (-lse.shape[-1]) % 32)).contiguous()
        dq, dk, dv, dbias = _aten.op("_scaled_dot_product_efficient_attention_backward")(
            doutp, qp, kp, vp, _bias(plan, qp, k.shape[-2]), outp, lse32, seed, offset, 0.0,
            [True, True, True, mask_grad], causal, scale=scale,
        )  # fmt: skip
        dk, dv = _sum_groups(dk, k.shape[1]), _sum_groups(dv, k.shape[1])
    return dq[..., :e], dk[..., :e], dv[..., :ev], dbias


def _sum_groups(grad: Tensor, hkv: int) -> Tensor:
    """(B, Hq, Lk, W) gradient of repeated heads -> (B, Hkv, Lk, W), each group summed."""
    b, hq, lk, w = grad.shape
    return grad if hq == hkv else grad.view(b, hkv, hq // hkv, lk, w).sum(dim=2)


def _no_state(kernel: str, q: Tensor, k: Tensor) -> tuple:
    """Stand-ins for the dropout state of a forward that ran elsewhere (ring attention's merged
    blocks): with dropout_p = 0 the kernels never read it."""
    dev = q.device
    if kernel == _CUDA_FLASH:
        seed = torch.zeros(2, dtype=torch.uint64, device=dev)
        offset = torch.zeros((), dtype=torch.uint64, device=dev)
        return None, None, q.shape[-2], k.shape[-2], seed, offset
    zero = torch.zeros((), dtype=torch.long, device=dev)
    return zero, zero.clone()


def _cpu_mask_grad(q, k, v, out, lse_k, dout, dlse, plan: _Plan, mask_shape) -> Tensor:
    """d(loss)/d(mask) = dS = P * (dP - D + dlse), with P = exp(s + mask - lse) recomputed a
    block of query rows at a time; summed to ``mask_shape`` (left as 4-D)."""
    work = compute_dtype(q.dtype)
    b, hq, lq, _ = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    g = hq // hkv
    shape4 = (1,) * (4 - len(mask_shape)) + tuple(mask_shape)
    dmask = torch.zeros(shape4, dtype=work, device=q.device)
    d = (dout.to(work) * out.to(work)).sum(dim=-1)  # (B, Hq, Lq)
    if dlse is not None:
        d = d - dlse.to(work)
    k5 = k.to(work).unsqueeze(2)  # (B, Hkv, 1, Lk, E)
    v5 = v.to(work).unsqueeze(2)  # (B, Hkv, 1, Lk, Ev)
    step = max(1, _MASK_GRAD_CELLS // max(1, b * hq * lk))
    for r0 in range(0, lq, step):
        r1 = min(r0 + step, lq)
        q5 = q[:, :, r0:r1].to(work).reshape(b, hkv, g, r1 - r0, -1)  # (B, Hkv, G, rows, E)
        s = (q5 @ k5.transpose(-2, -1)).reshape(b, hq, r1 - r0, lk) * plan.scale
        mask = plan.mask if plan.mask.shape[2] == 1 else plan.mask[:, :, r0:r1]
        p = torch.exp(s + mask - lse_k[:, :, r0:r1, None].to(work))  # (B, Hq, rows, Lk)
        do5 = dout[:, :, r0:r1].to(work).reshape(b, hkv, g, r1 - r0, -1)
        dp = (do5 @ v5.transpose(-2, -1)).reshape(b, hq, r1 - r0, lk)  # (B, Hq, rows, Lk)
        ds = p * (dp - d[:, :, r0:r1, None])  # (B, Hq, rows, Lk)
        rows = slice(r0, r1) if shape4[2] != 1 else slice(None)
        dmask[:, :, rows] += ds.sum_to_size(dmask[:, :, rows].shape)
    return dmask


# --------------------------------------------------------------------------------------------
# Ring attention's block kernels, and the engine.


def fused_block_forward(q: Tensor, k: Tensor, v: Tensor, *, is_causal: bool, scale: float):
    """One ring block outside autograd: out (B, Hq, Lq, Ev) and lse (B, Hq, Lq) in the compute
    dtype; ``is_causal`` bottom-right (ring blocks are square where causal)."""
    request = AttentionRequest(is_causal=is_causal, scale=scale, need_lse=True)
    plan = _plan(q, k, request)
    with torch.no_grad():
        out_k, lse_k, _ = kernel_forward(plan.kernel, q[:, :, plan.first_row :], k, v, plan)
        out, lse = _assemble(plan, q, v, out_k, lse_k)
    return out.to(lse.dtype), lse


def fused_block_backward(q, k, v, out, lse, dout, *, is_causal: bool, scale: float):
    """The block's (dq, dk, dv) in the compute dtype, from the rows' merged ``out`` and ``lse``
    (the whole attention's, over every block: see `selfattn.engines.tiled.tiled_backward`)."""
    request = AttentionRequest(is_causal=is_causal, scale=scale)
    plan = _plan(q, k, request)
    r = plan.first_row
    work = compute_dtype(q.dtype)
    with torch.no_grad():
        dq, dk, dv, _ = kernel_backward(
            plan.kernel, dout[:, :, r:], q[:, :, r:], k, v, out[:, :, r:], lse[:, :, r:], None,
            plan, (), False,
        )  # fmt: skip
        if r:
            dq = torch.cat([dq.new_zeros(*dq.shape[:2], r, dq.shape[-1]), dq], dim=2)
    return dq.to(work), dk.to(work), dv.to(work)


def _unsupported(request: AttentionRequest) -> str | None:
    if request.need_weights:
        return "fused never materialises the (Lq, Lk) attention weights (use backend='naive')"
    if request.dropout_p > 0.0:
        return (
            "fused has no dropout that matches the other engines' (the CPU kernel has none, "
            "the CUDA kernels draw a Philox mask of their own); use backend='tiled' or 'sdpa'"
        )
    if request.device_type not in _aten.DEVICE_OPS:
        return f"fused has kernels for cpu and cuda only, not {request.device_type}"
    if request.device_type == "cuda" and request.dtype == torch.float64:
        return "fused has no float64 kernel on cuda (use backend='tiled' or 'naive')"
    problems = _aten.problems(request.device_type)
    return "; ".join(problems) if problems else None


register(
    Engine(
        name="fused",
        fn=fused_attention,
        unsupported=_unsupported,
        summary="PyTorch's private fused kernels with the log-sum-exp (CPU flash; CUDA "
        "flash / efficient), behind a bottom-right adapter",
        blocks=BlockKernels(forward=fused_block_forward, backward=fused_block_backward),
    )
)
