"""The "tiled" engine: the FlashAttention algorithm written in plain PyTorch.

Attention is computed one (query block, key block) tile at a time and the (Lq, Lk) score matrix
never exists. Each query block walks its key blocks keeping, per query row, a running maximum
``m``, a running sum ``l`` of ``exp(s - m)`` and a running output ``acc`` (the online softmax of
FlashAttention, Dao et al. 2022, https://arxiv.org/abs/2205.14135, in the loop order of
FlashAttention-2, Dao 2023, https://arxiv.org/abs/2307.08691)::

    for each query block Q_i:                          m = -inf, l = 0, acc = 0
        for each key block K_j, V_j the masks leave visible:
            S    = scale * Q_i K_j^T  (+ mask)         (bq, bk): the only tile in memory
            m'   = max(m, rowmax(S))
            P    = exp(S - m')                         (m' = -inf: shift by 0, never -inf - -inf)
            l    = exp(m - m') * l   + rowsum(P)
            acc  = exp(m - m') * acc + P V_j           (dropout: P -> P * keep / (1 - p))
            m    = m'
        O_i = acc / l,   lse_i = m + log(l)           (l = 0, no visible key: O_i = 0, lse = -inf)

The code keeps scores in base 2 (``exp2``, about 4x faster than ``exp`` on CPU) and works in
place on one reused tile buffer; the maths is the above. A float ``attn_mask`` is first shifted
so that each row's largest visible entry is 0 (`selfattn.masks.float_mask_shift`, here computed
tile by tile): softmax does not change, and Hugging Face's ``torch.finfo(dtype).min`` neither
overflows to -inf in base 2 nor rounds the scores away; the shift is added back to lse.

The backward pass (FlashAttention-2) saves only q, k, v, O and lse, and recomputes each tile:
``P = exp(S - lse)``, ``dV += P^T dO``, ``dP = dO V^T``, ``dS = P * (dP - D)`` with
``D = rowsum(dO * O)``, ``dQ += scale * dS K``, ``dK += scale * dS^T Q`` (and, for a float
``attn_mask`` that requires grad, ``dMask = dS`` summed over its broadcast dims). Extra memory is
O((Lq + Lk) * E) plus a few (bq, bk) tiles, in both directions.

Where the speed comes from: with ``is_causal`` (and ``window``), a tile the mask rules out entirely
is skipped (`selfattn.masks.block_is_empty`), and a tile the mask keeps entirely is computed with
no mask at all (`selfattn.masks.block_is_full`); only tiles on the mask's edge are masked. Causal
attention thus does about half the work, and a sliding window of W keys roughly
(W + bq + bk) / Lk of it.

Alignment: ``is_causal`` is bottom-right (query i sees keys j <= i + Lk - Lq), as in all of
selfattn. Rows that see no key (Lq > Lk causal, or a fully masked row) return zeros, lse = -inf
and zero gradient.

Dropout: a seed is drawn once per call from the default generator (so `torch.manual_seed` makes
a call reproducible); each tile's keep-mask comes from a generator seeded with (seed, tile), so
the backward pass regenerates exactly the forward's masks. The masks depend on the block sizes.

Shapes: B batch, Hq query heads, Hkv key/value heads, G = Hq / Hkv queries per key head,
Lq queries, Lk keys, E head dim, Ev value head dim, bq / bk block sizes. Inside, the B * Hkv
pairs form one batch dim N, and a query block's G * bq rows are stacked so one batched matmul
serves a whole group (grouped-query attention without repeating k or v): R = G * bq.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from selfattn._checks import (
    check_flag,
    check_mask,
    check_qkv,
    check_scale,
    check_window,
    compute_dtype,
    positive_int,
    probability,
)
from selfattn._seeds import mixed_seed
from selfattn.engines.registry import (
    AttentionRequest,
    BlockKernels,
    Engine,
    EngineOutput,
    register,
)
from selfattn.masks import block_is_empty, block_is_full, causal_block

# Default tiles: 512 keys, and 1024 queries (512 under a causal mask, where smaller query blocks
# skip more of the masked half). Timed on the 2-core AMD EPYC (fp32, E=64, H=8, 1 thread, CPU
# time, one run): forward L=4096 full at (256, 512) / (512, 512) / (1024, 512) took 345 / 319 /
# 309 ms (SDPA 287); L=8192 causal at the same sizes 773 / 715 / 758 ms; a window of 256, 237 /
# 245 / 344 ms. Larger tiles mean fewer Python steps, and more tiles on the fast path of
# `_forward`; smaller ones skip more. See benchmarks/engines.py for the measured targets.
BLOCK_Q = 512  # under a causal mask (and for callers that pass no is_causal)
BLOCK_Q_FULL = 1024  # without one
BLOCK_K = 512


def default_block_q(is_causal: bool) -> int:
    """The query tile `tiled_attention` uses when ``block_q`` is None."""
    return BLOCK_Q if is_causal else BLOCK_Q_FULL


_NEG_INF = float("-inf")
# Scores are kept in base 2 (s * log2(e)) so the kernels can use exp2, about 4x faster than exp
# on CPU (torch 2.13): exp(x) = exp2(x * LOG2E). LOG2E is folded into q's scale: no extra pass.
LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)


def tiled_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    attn_mask: Tensor | None = None,
    is_causal: bool = False,
    window: int | None = None,
    scale: float | None = None,
    dropout_p: float = 0.0,
    block_q: int | None = None,
    block_k: int = BLOCK_K,
) -> tuple[Tensor, Tensor]:
    """Blockwise scaled dot-product attention (FlashAttention in PyTorch); returns (out, lse).

    Args:
        q: (B, Hq, Lq, E).
        k: (B, Hkv, Lk, E), Hq a multiple of Hkv (query head h uses key head h // (Hq / Hkv)).
        v: (B, Hkv, Lk, Ev).
        attn_mask: None, bool (True = may attend) or float (added to the scores), broadcastable
            to (B, Hq, Lq, Lk). A float mask that requires grad gets its gradient.
        is_causal: bottom-right causal mask, query i sees keys j <= i + Lk - Lq::

                Lq = 2, Lk = 5     k0 k1 k2 k3 k4
                              q0    1  1  1  1  0
                              q1    1  1  1  1  1

        window: with ``is_causal``, keep only the ``window`` most recent keys of each query.
        scale: score scale; None means 1 / sqrt(E).
        dropout_p: probability of zeroing an attention weight (kept ones are scaled by
            1 / (1 - p)); reproducible under `torch.manual_seed`.
        block_q, block_k: tile sizes (any positive ints; they need not divide Lq or Lk).
            ``block_q=None``: `default_block_q(is_causal)`.

    Returns:
        out (B, Hq, Lq, Ev) in q's dtype, and lse (B, Hq, Lq), the log-sum-exp of each row's
        scaled, masked scores (before dropout), float32 (float64 for float64 inputs), -inf on
        rows with no visible key. Both are differentiable.
    """
    check_qkv(q, k, v)
    attn_mask = check_mask(attn_mask, q, k)
    check_window(window, is_causal)
    check_flag("is_causal", is_causal)
    dropout_p = probability("dropout_p", dropout_p)
    block_q = default_block_q(is_causal) if block_q is None else positive_int("block_q", block_q)
    positive_int("block_k", block_k)
    scale = check_scale(scale, q.shape[-1])
    seed = _draw_seed() if dropout_p > 0.0 else 0
    return _TiledAttention.apply(
        q, k, v, attn_mask, is_causal, window, scale, dropout_p, seed, block_q, block_k
    )


# --------------------------------------------------------------------------------------------
# The autograd Function: saves q, k, v, out, lse and recomputes tiles in backward.


class _TiledAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, window, scale, dropout_p, seed, bq, bk):
        mask_grad = attn_mask is not None and ctx.needs_input_grad[3]
        prob = _Problem.build(
            q, k, v, attn_mask, mask_grad, is_causal, window, scale, dropout_p, seed, bq, bk
        )
        out_c, lse = _forward(prob, *_to_blocks(prob, q, k, v), bq, bk)  # (B,Hq,Lq,Ev), (B,Hq,Lq)
        out = out_c.to(q.dtype)  # (B, Hq, Lq, Ev)
        # O is kept in the compute dtype (the same tensor for fp32/fp64): D = rowsum(dO * O) from
        # a bf16-rounded O would not cancel dP exactly, which shows in dK at short Lk.
        ctx.save_for_backward(q, k, v, out_c, lse, attn_mask)
        # The resolved problem, reused by backward: no second pass over the mask for its shift.
        # It holds views of the inputs and the (detached) row shift, never the outputs.
        ctx.prob, ctx.blocks = prob, (mask_grad, bq, bk)
        ctx.set_materialize_grads(False)
        if prob.mask_shift is not None:  # the float mask's row shift, back into the user's lse
            shift = prob.mask_shift.squeeze(-1).expand(prob.b, prob.hkv, prob.g, prob.lq)
            lse = lse + shift.reshape(lse.shape)  # (B, Hq, Lq); a new tensor, not the saved one
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if torch.is_grad_enabled():  # backward(create_graph=True): a graph of the gradient
            raise NotImplementedError(
                "the tiled attention engine does not support double backward "
                "(create_graph=True, e.g. a gradient penalty): its backward is hand-written; "
                "use backend='naive' or 'sdpa' for higher-order gradients"
            )
        q, k, v, out, lse, attn_mask = ctx.saved_tensors
        prob, (mask_grad, bq, bk) = ctx.prob, ctx.blocks
        if dout is None:
            dout = torch.zeros(prob.out_shape, dtype=q.dtype, device=q.device)
        qb, kb, vb = _to_blocks(prob, q, k, v)
        n, g, lq = qb.shape[:3]
        ev = out.shape[-1]
        out_b = out.view(n, g, lq, ev)  # (B, Hq, Lq, Ev) -> (N, G, Lq, Ev)
        dout_b = dout.reshape(n, g, lq, ev).to(prob.dtype)  # (N, G, Lq, Ev)
        lse_b = lse.view(n, g, lq)  # (N, G, Lq)
        dlse_b = None if dlse is None else dlse.reshape(n, g, lq).to(prob.dtype)
        dq, dk, dv, dmask = _backward(
            prob, qb, kb, vb, out_b, lse_b, dout_b, dlse_b, mask_grad, bq, bk
        )
        dq = dq.view(q.shape).to(q.dtype)  # (B, Hq, Lq, E)
        dk = dk.view(k.shape).to(k.dtype)  # (B, Hkv, Lk, E)
        dv = dv.view(v.shape).to(v.dtype)  # (B, Hkv, Lk, Ev)
        if dmask is not None:
            dmask = dmask.view(attn_mask.shape).to(attn_mask.dtype)
        return dq, dk, dv, dmask, None, None, None, None, None, None, None


# --------------------------------------------------------------------------------------------
# The problem, its block plan and the per-tile helpers.


@dataclass(frozen=True)
class _Problem:
    """One call's sizes and options, resolved once."""

    b: int
    hkv: int
    g: int  # query heads per key/value head
    lq: int
    lk: int
    dtype: torch.dtype  # compute dtype: float64 for float64 inputs, float32 otherwise
    out_shape: tuple[int, int, int, int]  # (B, Hq, Lq, Ev)
    mask5: Tensor | None  # attn_mask as (1|B, 1|Hkv, 1|G, 1|Lq, 1|Lk), a view
    is_causal: bool
    window: int | None
    scale: float
    dropout_p: float
    seed: int
    # A float mask's per-row shift, (1|B, 1|Hkv, 1|G, 1|Lq, 1): each row's largest visible entry
    mask_shift: Tensor | None = None  # (so mask5 - mask_shift peaks at 0); added back to lse
    mask_has_neg_inf: bool = False  # a float mask with -inf cells: filled, not only added

    @staticmethod
    def build(q, k, v, attn_mask, mask_grad, is_causal, window, scale, dropout_p, seed, bq, bk):
        b, hq, lq, _ = q.shape
        hkv, lk = k.shape[1], k.shape[2]
        g = hq // hkv
        mask5 = None
        if attn_mask is not None:
            m4 = attn_mask.reshape((1,) * (4 - attn_mask.ndim) + tuple(attn_mask.shape))
            if not mask_grad:  # undo expand(): a stride-0 dim becomes size 1 and broadcasts
                m4 = m4[tuple(slice(0, 1) if st == 0 else slice(None) for st in m4.stride())]
            heads = (1, 1) if m4.shape[1] == 1 else (hkv, g)
            mask5 = m4.reshape(m4.shape[0], *heads, m4.shape[2], m4.shape[3])
            if mask5.dtype == torch.bool:
                mask5 = ~mask5  # True = masked out, ready for masked_fill_
        dtype = compute_dtype(q.dtype)
        prob = _Problem(
            b, hkv, g, lq, lk, dtype, (b, hq, lq, v.shape[-1]), mask5,
            is_causal, window, scale, dropout_p, seed,
        )  # fmt: skip
        if mask5 is None or mask5.dtype == torch.bool:
            return prob
        return replace(
            prob,
            mask_shift=_visible_row_max(prob, bq, bk),
            mask_has_neg_inf=bool((mask5 == _NEG_INF).any()),
        )


def _visible_row_max(prob: _Problem, bq: int, bk: int) -> Tensor:
    """Each row's largest float-mask entry among the keys causal/window leaves visible (0 where
    none is finite): `selfattn.masks.float_mask_shift` computed tile by tile, never (Lq, Lk)."""
    m = prob.mask5  # (1|B, 1|Hkv, 1|G, 1|Lq, 1|Lk)
    if m.shape[-1] == 0:  # no keys: nothing to shift
        return m.new_zeros(*m.shape[:-1], 1)
    if not prob.is_causal:
        row_max = m.detach().amax(dim=-1, keepdim=True)  # (1|B, 1|Hkv, 1|G, 1|Lq, 1)
    else:
        row_max = m.new_full((*m.shape[:3], prob.lq, 1), _NEG_INF)  # (1|B, 1|Hkv, 1|G, Lq, 1)
        for _, qs, qe, visits in _plan(prob, bq, bk):
            for _, ks, ke, full in visits:
                tile = _mask_block(prob, qs, qe, ks, ke).detach()  # (.., 1|bq, 1|bk)
                if not full:  # (.., bq, bk): the causal edge hides some cells
                    tile = tile.masked_fill(_causal_drop(qs, qe, ks, ke, prob, m.device), _NEG_INF)
                blk = row_max[..., qs:qe, :]
                torch.maximum(blk, tile.amax(dim=-1, keepdim=True), out=blk)
    return row_max.masked_fill(~row_max.isfinite(), 0.0)


def _to_blocks(prob: _Problem, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The kernel layout, in the compute dtype (no copy for contiguous fp32/fp64 inputs)."""
    n = prob.b * prob.hkv
    e, ev = k.shape[-1], v.shape[-1]
    qb = q.to(prob.dtype).reshape(n, prob.g, prob.lq, e)  # (B, Hq, Lq, E) -> (N, G, Lq, E)
    kb = k.to(prob.dtype).reshape(n, prob.lk, e)  # (B, Hkv, Lk, E) -> (N, Lk, E)
    vb = v.to(prob.dtype).reshape(n, prob.lk, ev)  # (B, Hkv, Lk, Ev) -> (N, Lk, Ev)
    return qb, kb, vb


def _plan(prob: _Problem, bq: int, bk: int):
    """Yield (qi, q_start, q_end, visits) per query block; visits lists the key blocks to compute
    as (ki, k_start, k_end, full). Blocks the causal/window mask rules out are not listed; ``full``
    blocks need no causal mask."""
    lq, lk, window = prob.lq, prob.lk, prob.window
    for qi, qs in enumerate(range(0, lq, bq)):
        qe = min(qs + bq, lq)
        visits = []
        for ki, ks in enumerate(range(0, lk, bk)):
            ke = min(ks + bk, lk)
            if prob.is_causal and block_is_empty(qs, qe, ks, ke, lq, lk, window):
                continue  # every cell masked: skipped, never computed
            full = not prob.is_causal or block_is_full(qs, qe, ks, ke, lq, lk, window)
            visits.append((ki, ks, ke, full))
        yield qi, qs, qe, visits


def _rows(x: Tensor, qs: int, qe: int) -> Tensor:
    """Rows [qs:qe] of every group, stacked: (N, G, Lq, *) -> (N, G * bq, *)."""
    n, g = x.shape[:2]
    return x[:, :, qs:qe].reshape(n, g * (qe - qs), *x.shape[3:])


def _causal_drop(qs: int, qe: int, ks: int, ke: int, prob: _Problem, device) -> Tensor:
    """(bq, bk) bool, True where the causal/window mask removes a cell of tile [qs:qe, ks:ke]."""
    return ~causal_block(qs, qe, ks, ke, prob.lq, prob.lk, prob.window, device=device)


def _mask_block(prob: _Problem, qs: int, qe: int, ks: int, ke: int) -> Tensor | None:
    """The user mask's slice for one tile, (1|B, 1|Hkv, 1|G, 1|bq, 1|bk), still a view."""
    m = prob.mask5
    if m is None:
        return None
    if m.shape[3] != 1:
        m = m[:, :, :, qs:qe]
    if m.shape[4] != 1:
        m = m[..., ks:ke]
    return m


class _Scratch:
    """Tile buffers reused across blocks: a fresh multi-MB tile per block costs page faults that
    show in the timings (about 20% of the forward at L=4096). Also caches the causal edge masks."""

    def __init__(self, like: Tensor, prob: _Problem, bq: int, bk: int, count: int):
        size = like.shape[0] * prob.g * min(bq, prob.lq) * min(bk, prob.lk)
        self.buffers = [like.new_empty(size) for _ in range(count)]
        self.drops: dict[tuple[int, int, int], Tensor] = {}

    def tile(self, i: int, shape: tuple[int, int, int]) -> Tensor:
        return self.buffers[i][: math.prod(shape)].view(shape)


def _score_tile(prob, q_blk, k_blk, qs, qe, ks, ke, full, scratch: _Scratch) -> Tensor:
    """Scaled, masked base-2 scores of one tile, (N, R, bk), -inf where masked.

    ``q_blk`` already carries scale * LOG2E; a float mask, already shifted so that each row's
    visible maximum is 0, is converted to base 2 as it is added (entries that overflow to -inf
    there weigh exp(-1e38) = 0 anyway).
    """
    bq, bk = qe - qs, ke - ks
    s = scratch.tile(0, (q_blk.shape[0], q_blk.shape[1], bk))
    torch.bmm(q_blk, k_blk.transpose(1, 2), out=s)  # (N, R, E) x (N, E, bk) -> (N, R, bk)
    user = _mask_block(prob, qs, qe, ks, ke)
    if user is not None:
        s5 = s.view(prob.b, prob.hkv, prob.g, bq, bk)  # (B, Hkv, G, bq, bk) view
        if user.dtype == torch.bool:
            s5.masked_fill_(user, _NEG_INF)
        else:
            shift = prob.mask_shift
            shift = shift if shift.shape[3] == 1 else shift[:, :, :, qs:qe]  # (.., 1|bq, 1)
            s5.add_(user - shift, alpha=LOG2E)  # (.., bq, bk): shifted first, then base 2
            if prob.mask_has_neg_inf:  # -inf hides a cell even where the score is +inf
                s5.masked_fill_(user == _NEG_INF, _NEG_INF)
    if not full:
        key = (bq, bk, qs - ks)  # tiles on the same diagonal share one mask
        if key not in scratch.drops:
            scratch.drops[key] = _causal_drop(qs, qe, ks, ke, prob, s.device)
        s.view(-1, prob.g, bq, bk).masked_fill_(scratch.drops[key], _NEG_INF)  # (N, G, bq, bk) view
    return s


def _draw_seed() -> int:
    """One dropout seed per call, from the default generator (`torch.manual_seed` controls it)."""
    return int(torch.randint(0, 2**62, (1,)).item())


def _dropout_keep(seed: int, qi: int, ki: int, shape, keep_prob: float, device) -> Tensor:
    """Tile (qi, ki)'s keep-mask, bool of ``shape`` (N, R, bk); the same on every call."""
    gen = torch.Generator(device=device)
    gen.manual_seed(mixed_seed(seed, qi, ki))
    return torch.rand(shape, generator=gen, device=device) < keep_prob


def dropout_keep_mask(
    seed: int,
    q_shape,
    k_shape,
    *,
    dropout_p: float,
    is_causal: bool = False,
    block_q: int | None = None,
    block_k: int = BLOCK_K,
) -> Tensor:
    """The dense (B, Hq, Lq, Lk) keep-mask a call with this ``seed`` (and the same ``is_causal``
    and tile sizes) uses: for tests and explanations only, it costs Lq x Lk memory."""
    block_q = default_block_q(is_causal) if block_q is None else block_q
    b, hq, lq, _ = q_shape
    hkv, lk = k_shape[1], k_shape[2]
    g = hq // hkv
    keep = torch.empty(b, hkv, g, lq, lk, dtype=torch.bool)
    for qi, qs in enumerate(range(0, lq, block_q)):
        qe = min(qs + block_q, lq)
        for ki, ks in enumerate(range(0, lk, block_k)):
            ke = min(ks + block_k, lk)
            tile = _dropout_keep(
                seed, qi, ki, (b * hkv, g * (qe - qs), ke - ks), 1 - dropout_p, "cpu"
            )
            keep[:, :, :, qs:qe, ks:ke] = tile.view(b, hkv, g, qe - qs, ke - ks)
    return keep.view(b, hq, lq, lk)


# --------------------------------------------------------------------------------------------
# Forward and backward kernels, on the (N, G, L, E) layout.


def _forward(prob: _Problem, q, k, v, bq: int, bk: int) -> tuple[Tensor, Tensor]:
    """q (N, G, Lq, E), k (N, Lk, E), v (N, Lk, Ev) -> out (B, Hq, Lq, Ev), lse (B, Hq, Lq).

    The online softmax keeps, per row, a *reference* ``ref`` (an attained base-2 score) in place
    of the running max. Without a float mask, scores are taken relative to it inside the matmul
    ([q | -ref] @ [k | 1]^T: ref is score-sized, so this costs no precision), and a tile whose
    exp2 row sums stay below `_FAST_LIMIT` is accumulated as it is: no row max, no subtraction,
    no rescaling. That is most tiles once every row has seen a key. Any other tile takes the
    exact step of FlashAttention: ``ref`` rises to the tile's max, the sums are rescaled. A float
    mask (whose offsets, -1e9 say, can make ``ref`` far from the scores) always takes it.
    """
    n, g, lq, e = q.shape
    ev = v.shape[-1]
    out_bhle = q.new_empty(prob.out_shape)  # (B, Hq, Lq, Ev): allocated in the caller's shape
    lse_bhl = q.new_empty(prob.out_shape[:-1])  # (B, Hq, Lq)  so neither is returned as a view
    out = out_bhle.view(n, g, lq, ev)  # (N, G, Lq, Ev) view
    lse = lse_bhl.view(n, g, lq)  # (N, G, Lq) view
    scratch = _Scratch(q, prob, bq, bk, count=1)
    folded = prob.mask_shift is None  # no float mask
    kx = torch.cat([k, k.new_ones(n, prob.lk, 1)], dim=-1) if folded else k  # (N, Lk, E+1): [k|1]
    for qi, qs, qe, visits in _plan(prob, bq, bk):
        rows = g * (qe - qs)
        qx = q.new_zeros(n, rows, kx.shape[-1])  # (N, R, E[+1]): [q * scale * log2(e) | -ref]
        torch.mul(_rows(q, qs, qe), prob.scale * LOG2E, out=qx[..., :e])  # base-2 scores
        ref = q.new_zeros(n, rows)  # (N, R) the rows' reference score (base 2)
        l = q.new_zeros(n, rows)  # running sum of exp2(s - ref)
        acc = q.new_zeros(n, rows, ev)  # running unnormalised output, relative to ref
        settled = False  # every row has seen a key: the fast step may keep ref as it is
        for ki, ks, ke, full in visits:
            tile = (prob, qx, kx[:, ks:ke], qs, qe, ks, ke, full, scratch)
            s = _score_tile(*tile)  # (N, R, bk): base-2 scores (- ref when folded), -inf masked
            if settled:
                if _fast_step(prob, s, l, acc, v[:, ks:ke], qi, ki):
                    continue
                s = _score_tile(*tile)  # a score far above ref (s was spent): redo it exactly
            shift, alpha, ref = _exact_reference(s, ref, l > 0, folded)  # (N, R) each
            if folded:
                qx[..., e].sub_(shift)  # the column holds -ref: later tiles come shifted
            p = s.sub_(shift.unsqueeze(-1)).exp2_()  # (N, R, bk), in place over s
            l.mul_(alpha).add_(p.sum(dim=-1))
            acc.mul_(alpha.unsqueeze(-1)).baddbmm_(_dropout(prob, p, qi, ki), v[:, ks:ke])
            settled = folded and bool((l > 0).all())
        # Rows that saw no key: l = 0 and acc = 0, so out = 0 and lse = ref + log2 0 = -inf.
        out_blk = acc / l.masked_fill(l == 0.0, 1.0).unsqueeze(-1)  # (N, R, Ev)
        out[:, :, qs:qe] = out_blk.view(n, g, qe - qs, ev)
        lse[:, :, qs:qe] = ((ref + l.log2()) * LN2).view(n, g, qe - qs)  # natural log again
    return out_bhle, lse_bhl


def _fast_step(prob: _Problem, s: Tensor, l: Tensor, acc: Tensor, v_blk: Tensor, qi, ki) -> bool:
    """Accumulate tile ``s`` (N, R, bk), relative to the rows' reference, as it is: no row max,
    no rescaling. False (``s`` spent, nothing accumulated) if a weight rose too far above it."""
    p = s.exp2_()  # (N, R, bk), in place over s
    row_sum = p.sum(dim=-1)  # (N, R)
    if not bool(row_sum.max() < _FAST_LIMIT):  # also on inf or NaN
        return False
    l.add_(row_sum)
    acc.baddbmm_(_dropout(prob, p, qi, ki), v_blk)  # += (N, R, bk) x (N, bk, Ev)
    return True


def _exact_reference(
    s: Tensor, ref: Tensor, seen: Tensor, folded: bool
) -> tuple[Tensor, Tensor, Tensor]:
    """FlashAttention's exact step for tile ``s`` (N, R, bk): the reference rises to the tile's
    max where that is higher (a row that saw no key yet jumps to it; nothing visible, inf or NaN
    leave it alone). Returns (what to subtract from s, the factor that rescales what was
    accumulated, the new reference), each (N, R).

    ``folded``: s is already relative to ref, and the shift is the rise. Otherwise s is absolute
    and the shift is the new reference itself (never ref + a difference, which a -1e9 mask
    offset in ref would round away).
    """
    tile_max = s.amax(dim=-1)  # (N, R)
    if folded:
        rise = torch.where(seen, tile_max.clamp(min=0.0), tile_max)
        rise = rise.masked_fill(~rise.isfinite(), 0.0)
        shift, alpha, new_ref = rise, torch.exp2(-rise), ref + rise
    else:
        new_ref = torch.where(seen, torch.maximum(ref, tile_max), tile_max)
        new_ref = torch.where(new_ref.isfinite(), new_ref, ref)
        shift, alpha = new_ref, torch.exp2(ref - new_ref)
    return shift, alpha.masked_fill(~seen, 0.0), new_ref  # alpha 0: never inf * 0


# The fast step keeps a tile whose exp2 row sums stay below this: each weight is then at most
# 2^32 times the row's reference, far from float32's 2^128 over a whole row.
_FAST_LIMIT = 2.0**32


def _dropout(prob: _Problem, p: Tensor, qi: int, ki: int) -> Tensor:
    """Dropout on one tile of weights, in place (after l has summed them): keep and rescale."""
    if prob.dropout_p == 0.0:
        return p
    keep = _dropout_keep(prob.seed, qi, ki, p.shape, 1.0 - prob.dropout_p, p.device)
    return p.mul_(keep).mul_(1.0 / (1.0 - prob.dropout_p))


def _backward(prob: _Problem, q, k, v, out, lse, dout, dlse, mask_grad: bool, bq: int, bk: int):
    """FlashAttention-2 backward on the kernel layout: returns dq, dk, dv, dmask (or None)."""
    n, g = q.shape[:2]
    # D = rowsum(dO * O) = sum_j P_ij dP_ij; a gradient on lse adds P_ij * dlse_i to dS_ij.
    d = (dout * out).sum(dim=-1)  # (N, G, Lq)
    if dlse is not None:
        d = d - dlse
    lse2 = lse.masked_fill(lse == _NEG_INF, float("inf")) * LOG2E  # dead rows: p = exp2(-inf)
    dq = torch.empty_like(q)  # (N, G, Lq, E)
    # dK and dV accumulate per key block in contiguous pieces: baddbmm_ into a strided slice of
    # one (N, Lk, E) tensor falls back to a slow per-batch loop.
    starts = range(0, prob.lk, bk)
    dk_parts = [k.new_zeros(n, min(ks + bk, prob.lk) - ks, k.shape[-1]) for ks in starts]
    dv_parts = [v.new_zeros(n, min(ks + bk, prob.lk) - ks, v.shape[-1]) for ks in starts]
    dmask5 = q.new_zeros(prob.mask5.shape) if mask_grad else None
    p_drop = prob.dropout_p
    keep_scale = 1.0 / (1.0 - p_drop) if p_drop < 1.0 else 0.0
    scratch = _Scratch(q, prob, bq, bk, count=2)
    for qi, qs, qe, visits in _plan(prob, bq, bk):
        q_blk = _rows(q, qs, qe) * (prob.scale * LOG2E)  # (N, R, E), as in forward
        do_blk = _rows(dout, qs, qe)  # (N, R, Ev)
        lse_blk = _rows(lse2, qs, qe).unsqueeze(-1)  # (N, R, 1), base 2
        d_blk = _rows(d, qs, qe).unsqueeze(-1)  # (N, R, 1)
        dq_blk = torch.zeros_like(q_blk)  # (N, R, E)
        for ki, ks, ke, full in visits:
            k_blk, v_blk = k[:, ks:ke], v[:, ks:ke]  # (N, bk, E), (N, bk, Ev)
            s = _score_tile(prob, q_blk, k_blk, qs, qe, ks, ke, full, scratch)  # (N, R, bk)
            p = s.sub_(lse_blk).exp2_()  # (N, R, bk): the forward's weights, recomputed
            dp = scratch.tile(1, s.shape)
            torch.bmm(do_blk, v_blk.transpose(1, 2), out=dp)  # (N,R,Ev) x (N,Ev,bk) -> (N,R,bk)
            if p_drop > 0.0:
                keep = _dropout_keep(prob.seed, qi, ki, p.shape, 1.0 - p_drop, p.device)
                p_kept = p * keep * keep_scale  # (N, R, bk), what multiplied V in forward
                dp.mul_(keep).mul_(keep_scale)  # gradient reaching the weights before dropout
            else:
                p_kept = p
            dv_parts[ki].baddbmm_(p_kept.transpose(1, 2), do_blk)  # += (N,bk,R) x (N,R,Ev)
            ds = dp.sub_(d_blk).mul_(p)  # dS = P * (dP - D), (N, R, bk), in place over dp
            dq_blk.baddbmm_(ds, k_blk)  # += (N, R, bk) x (N, bk, E)
            # q_blk carries scale * LOG2E; alpha=LN2 leaves scale: dK += scale * dS^T Q
            dk_parts[ki].baddbmm_(ds.transpose(1, 2), q_blk, alpha=LN2)  # (N,bk,R) x (N,R,E)
            if dmask5 is not None:  # d(loss)/d(mask) = dS, summed over the mask's broadcast dims
                ds5 = ds.view(prob.b, prob.hkv, g, qe - qs, ke - ks)
                dims = [i for i in range(5) if dmask5.shape[i] == 1 and ds5.shape[i] != 1]
                ds5 = ds5.sum(dim=dims, keepdim=True) if dims else ds5
                qsl = slice(qs, qe) if dmask5.shape[3] != 1 else slice(None)
                ksl = slice(ks, ke) if dmask5.shape[4] != 1 else slice(None)
                dmask5[:, :, :, qsl, ksl] += ds5
        dq[:, :, qs:qe] = dq_blk.mul_(prob.scale).view(n, g, qe - qs, q.shape[-1])
    dk = torch.cat(dk_parts, dim=1) if dk_parts else torch.zeros_like(k)  # (N, Lk, E)
    dv = torch.cat(dv_parts, dim=1) if dv_parts else torch.zeros_like(v)  # (N, Lk, Ev)
    return dq, dk, dv, dmask5


# --------------------------------------------------------------------------------------------
# The kernels as plain functions, for callers that write their own autograd (ring attention).


def tiled_forward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> tuple[Tensor, Tensor]:
    """The forward kernel outside autograd: q (B, Hq, Lq, E), k (B, Hkv, Lk, E), v (B, Hkv, Lk, Ev)
    -> out (B, Hq, Lq, Ev), lse (B, Hq, Lq), both in the compute dtype (float64 for float64
    inputs, else float32), lse -inf on rows with no visible key. ``is_causal`` is bottom-right
    aligned, as in `tiled_attention`; no mask, window or dropout. Nothing is saved for backward:
    pair it with `tiled_backward`."""
    check_qkv(q, k, v)
    check_flag("is_causal", is_causal)
    scale = check_scale(scale, q.shape[-1])
    prob = _Problem.build(q, k, v, None, False, is_causal, None, scale, 0.0, 0, block_q, block_k)
    with torch.no_grad():
        return _forward(prob, *_to_blocks(prob, q, k, v), block_q, block_k)


def tiled_backward(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    dout: Tensor,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    block_q: int = BLOCK_Q,
    block_k: int = BLOCK_K,
) -> tuple[Tensor, Tensor, Tensor]:
    """The FlashAttention-2 backward kernel outside autograd: (dq, dk, dv) in the compute dtype,
    shaped like q, k and v.

    ``out`` (B, Hq, Lq, Ev), ``lse`` (B, Hq, Lq) and ``dout`` (B, Hq, Lq, Ev) are those of the
    query rows' whole attention. They may come from more keys than k holds (ring attention
    passes the output and lse merged over every block): then P = exp(S - lse) is the rows' true
    weights on these keys, dk and dv are exactly these keys' gradients, and dq is these keys'
    share of q's gradient, to be summed over the blocks.
    """
    check_qkv(q, k, v)
    scale = check_scale(scale, q.shape[-1])
    prob = _Problem.build(q, k, v, None, False, is_causal, None, scale, 0.0, 0, block_q, block_k)
    qb, kb, vb = _to_blocks(prob, q, k, v)
    n, g, lq = qb.shape[:3]
    ev = v.shape[-1]
    out_b = out.to(prob.dtype).reshape(n, g, lq, ev)  # (B, Hq, Lq, Ev) -> (N, G, Lq, Ev)
    dout_b = dout.to(prob.dtype).reshape(n, g, lq, ev)  # (N, G, Lq, Ev)
    lse_b = lse.to(prob.dtype).reshape(n, g, lq)  # (B, Hq, Lq) -> (N, G, Lq)
    with torch.no_grad():
        grads = _backward(prob, qb, kb, vb, out_b, lse_b, dout_b, None, False, block_q, block_k)
    dq, dk, dv, _ = grads  # (N, G, Lq, E), (N, Lk, E), (N, Lk, Ev): back to q's, k's, v's shapes
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


# --------------------------------------------------------------------------------------------
# Argument checks and the engine adapter.


def tiled_attention_engine(
    q: Tensor, k: Tensor, v: Tensor, request: AttentionRequest
) -> EngineOutput:
    """Engine adapter: `tiled_attention` with the request's options and default block sizes."""
    out, lse = tiled_attention(
        q,
        k,
        v,
        attn_mask=request.attn_mask,
        is_causal=request.is_causal,
        window=request.window,
        scale=request.scale,
        dropout_p=request.dropout_p,
    )
    return EngineOutput(output=out, lse=lse if request.need_lse else None)


def _unsupported(request: AttentionRequest) -> str | None:
    if request.need_weights:
        return "tiled never materialises the (Lq, Lk) attention weights (use backend='naive')"
    return None


register(
    Engine(
        name="tiled",
        fn=tiled_attention_engine,
        unsupported=_unsupported,
        summary="FlashAttention in plain torch: online softmax over tiles, skips masked blocks",
        blocks=BlockKernels(forward=tiled_forward, backward=tiled_backward),
    )
)
