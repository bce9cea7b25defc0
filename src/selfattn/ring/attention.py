"""Ring attention: exact attention over a sequence split across the P ranks of a process group.

Each rank holds n = L / P tokens of the sequence (a layout, see `selfattn.ring.layouts`):
its queries, keys and values. The key/value blocks travel around the ring, one step at a time,
and each rank's queries meet every block once (Liu et al. 2023, Ring Attention with Blockwise
Transformers, https://arxiv.org/abs/2310.01889)::

    step t: rank r holds the block of rank s = r - t (mod P)
        post: send the block to rank r + 1, receive the next from rank r - 1   (in flight...)
        out_s, lse_s = attention of the local queries on block s, with lse     (...while this runs)
        out, lse     = merge(out, lse, out_s, lse_s)      exact: the log-sum-exp merge
        wait for the transfer

Each block runs on an engine's block kernels (`selfattn.engines.BlockKernels`): "fused"
(PyTorch's own fused kernels, on CPU and CUDA) or "tiled" (FlashAttention in plain PyTorch);
``backend="auto"`` takes the first of `selfattn.engines.RING_ORDER` that can run the call.

The merge is `selfattn.merge_partials`: out = (e^lse · out + e^lse_s · out_s) / (e^lse + e^lse_s),
NaN-free on rows that have seen no key yet (lse = -inf). Under a causal mask a step computes
only the pieces that the positions leave visible (`layouts.visible_pieces`): whole blocks are
skipped or computed with no mask, and only the diagonal block is causal.

Backward (a custom autograd Function, FlashAttention-2 per block): the forward saves only q, k,
v, the merged out and lse. The blocks go around once more; the engine's block backward gets the
merged out and lse (as FlashAttention's ring backward does), so its weights P = exp(S - lse) are
the true weights, and each step's dq, dk, dv are exact shares.
dq accumulates at home; dk and dv travel with their block, each rank adding its share, and come
home after the last step::

    step t: post: send the block to r + 1, receive the next    (in flight...)
        dk_s, dv_s = the partial sums received from rank r - 1 (zeros at step 0)
        dq += dq_s;   dk_s, dv_s += this rank's shares         (...while this runs)
        post: send dk_s, dv_s on to rank r + 1
    after step P - 1, the dk, dv received are this rank's own block's, complete.

Memory per rank, beyond q, k, v, out and their gradients: lse, dq, the key/value block in hand
and the one arriving, one dk/dv pair, and the block kernel's per-piece results: O(n · E), never
O(L). (The dk/dv partial sums are waited for at the start of a step rather than overlapped with
it: that keeps one pair alive instead of three, and costs little, as every rank does the same
work and sends them at the same moment.)

Shapes: B batch, Hq query heads, Hkv key/value heads (Hq a multiple of Hkv: grouped-query
attention without repeating keys), L tokens in all, P ranks, n = L / P tokens per rank, E head
dim, Ev value head dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from selfattn._checks import check_flag, check_qkv, check_scale
from selfattn._errors import first_line
from selfattn.engines import RING_ORDER, AttentionRequest, BlockKernels, get_engine
from selfattn.functional import merge_partials
from selfattn.ring.comm import Pending, RingComm
from selfattn.ring.layouts import (
    LAYOUTS,
    check_layout,
    check_local_length,
    visible_pieces,
)

# Message tags (k and v take two each, k's first): a block and its gradients travel at once.
_KV, _DKV = 0, 2


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    layout: str = "zigzag",
    backend: str = "auto",
) -> Tensor:
    """Attention over a sequence sharded across ``group``: this rank's rows of the output.

    Every rank of ``group`` calls it at once (and, for training, calls backward at once too),
    with its own shard of the sequence in ``layout`` (`shard_sequence` makes them):

    Args:
        q: (B, Hq, n, E), this rank's n = L / P queries.
        k: (B, Hkv, n, E), Hq a multiple of Hkv (query head h uses key head h // (Hq / Hkv)).
        v: (B, Hkv, n, Ev).
        group: the process group; None means the default group, or a ring of one (plain
            attention) when no process group is initialised.
        is_causal: each token sees itself and the tokens before it in the whole sequence (the
            query and key lengths are equal, so no alignment question arises).
        scale: score scale; None means 1 / sqrt(E).
        layout: "zigzag" (balanced under a causal mask; L a multiple of 2P) or "contiguous"
            (L a multiple of P).
        backend: the engine whose block kernels compute each step: "fused", "tiled", or "auto"
            (the first of `selfattn.engines.RING_ORDER` that can run the call). An engine
            without block kernels ("naive", "sdpa") is a ValueError.

    Returns:
        (B, Hq, n, Ev) in q's dtype: this rank's rows of ``selfattn.attention(q_full, k_full,
        v_full, is_causal=is_causal, scale=scale)`` over the whole sequence, in ``layout``'s
        order. Differentiable with respect to q, k and v (float16/bfloat16 inputs compute and
        accumulate in float32).

    Every rank must pass the same shapes, dtype and options; a rank that raises or never calls
    makes the others raise a RuntimeError naming it (at the latest after the process group's
    timeout).
    """
    check_qkv(q, k, v)
    check_flag("is_causal", is_causal)
    layout = check_layout(layout)
    scale = check_scale(scale, q.shape[-1])
    if k.shape[-2] != q.shape[-2]:
        raise ValueError(
            "ring_attention is self-attention over one sharded sequence: q and k must have the "
            f"same per-rank length, got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    comm = RingComm(group)
    check_local_length(q.shape[-2], comm.world_size, layout)
    if comm.world_size > 1:
        _check_same_call(comm, q, k, v, is_causal, scale, layout)
    blocks = block_kernels(backend, q, is_causal, scale)
    ring = _Ring(comm, layout, is_causal, scale, blocks)
    return _RingAttention.apply(q, k, v, ring)


def block_kernels(backend: str, q: Tensor, is_causal: bool, scale: float) -> BlockKernels:
    """The block kernels of ``backend`` (or of the first engine in `RING_ORDER` that can run
    the call, for "auto"); a ValueError saying why when the named engine cannot."""
    return kernels_for(backend, q.device.type, q.dtype, is_causal, scale)


def kernels_for(
    backend: str, device_type: str, dtype: torch.dtype, is_causal: bool = True, scale: float = 1.0
) -> BlockKernels:
    """`block_kernels` for queries of ``dtype`` on ``device_type`` ("cpu", "cuda"), decided
    before any tensor exists: a command checks its --backend with it before it starts."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str, got {type(backend).__name__}")
    request = AttentionRequest(
        is_causal=is_causal, scale=scale, need_lse=True, device_type=device_type, dtype=dtype
    )
    names = RING_ORDER if backend == "auto" else (backend,)
    reasons = []
    for name in names:
        engine = get_engine(name)  # a ValueError listing the valid names for an unknown one
        reason = engine.unsupported(request)
        if engine.blocks is None:
            valid = ", ".join(repr(n) for n in (*RING_ORDER, "auto"))
            reason = f"it has no block kernels for ring attention (use one of {valid})"
        if reason is None:
            return engine.blocks
        reasons.append(f"{name}: {reason}")
    raise ValueError("ring_attention cannot run its blocks on " + "; ".join(reasons))


@dataclass(frozen=True)
class _Ring:
    """One call's ring and options, resolved once."""

    comm: RingComm
    layout: str
    is_causal: bool
    scale: float
    blocks: BlockKernels  # the engine's block forward and backward

    def pieces(self, step: int, local: int):
        """The block in hand at ``step`` is rank (r - step)'s: the pieces to compute on it."""
        c = self.comm
        source = (c.rank - step) % c.world_size
        return visible_pieces(c.rank, source, c.world_size, local, self.layout, self.is_causal)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ring: _Ring):
        out, lse = _ring_forward(q, k, v, ring)  # compute dtype: (B, Hq, n, Ev), (B, Hq, n)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring = ring
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, dout):
        if torch.is_grad_enabled():
            raise NotImplementedError(
                "ring_attention does not support double backward (create_graph=True): its "
                "backward is hand-written"
            )
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _ring_backward(q, k, v, out, lse, dout, ctx.ring)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None


def _ring_forward(q: Tensor, k: Tensor, v: Tensor, ring: _Ring) -> tuple[Tensor, Tensor]:
    """This rank's rows of attention over every block: out (B, Hq, n, Ev), lse (B, Hq, n)."""
    comm, local = ring.comm, q.shape[-2]
    out = lse = None
    for step in range(comm.world_size):
        last = step == comm.world_size - 1
        pending = None if last else comm.exchange([k, v], "key/value blocks", _KV)
        for piece in ring.pieces(step, local):
            o, s = ring.blocks.forward(
                q[:, :, piece.q],  # (B, Hq, rows, E)
                k[:, :, piece.kv],  # (B, Hkv, keys, E)
                v[:, :, piece.kv],  # (B, Hkv, keys, Ev)
                is_causal=piece.is_causal,
                scale=ring.scale,
            )  # (B, Hq, rows, Ev), (B, Hq, rows), compute dtype
            if out is None:  # allocated on first use, in the kernel's compute dtype
                out = o.new_zeros(*q.shape[:-1], v.shape[-1])  # (B, Hq, n, Ev)
                lse = s.new_full(q.shape[:-1], float("-inf"))  # (B, Hq, n): no key seen yet
            out[:, :, piece.q], lse[:, :, piece.q] = merge_partials(
                out[:, :, piece.q], lse[:, :, piece.q], o, s
            )
            del o, s  # freed now, not when the next piece's result replaces them
        if pending is not None:
            k, v = pending.wait()  # the next block, (B, Hkv, n, E) and (B, Hkv, n, Ev)
    return out, lse


def _ring_backward(q, k, v, out, lse, dout, ring: _Ring) -> tuple[Tensor, Tensor, Tensor]:
    """dq, dk, dv (compute dtype) of this rank's shard, dk and dv summed over every rank.

    The partial dk, dv of the block in hand arrive from rank r - 1 (sent at the end of its
    previous step) and this rank adds its share to them in place: only one dk/dv pair per rank
    is alive at a time, and the wait for it is short, since every rank does the same work.
    """
    comm, local, dtype = ring.comm, q.shape[-2], out.dtype
    dq = torch.zeros(q.shape, dtype=dtype, device=q.device)  # (B, Hq, n, E)
    dkv_pending: Pending | None = None
    for step in range(comm.world_size):
        last = step == comm.world_size - 1
        kv_pending = None if last else comm.exchange([k, v], "key/value blocks", _KV)
        if dkv_pending is None:  # step 0: this rank is the block's first visitor
            dk = torch.zeros(k.shape, dtype=dtype, device=k.device)  # (B, Hkv, n, E)
            dv = torch.zeros(v.shape, dtype=dtype, device=v.device)  # (B, Hkv, n, Ev)
        else:  # the shares of the ranks this block visited before
            dk, dv = dkv_pending.wait()
        for piece in ring.pieces(step, local):
            rows = (slice(None), slice(None), piece.q)
            keys = (slice(None), slice(None), piece.kv)
            dq_p, dk_p, dv_p = ring.blocks.backward(
                q[rows],  # (B, Hq, rows, E)
                k[keys],  # (B, Hkv, keys, E)
                v[keys],  # (B, Hkv, keys, Ev)
                out[rows],  # (B, Hq, rows, Ev): the merged output, and its lse
                lse[rows],  # (B, Hq, rows)
                dout[rows],  # (B, Hq, rows, Ev)
                is_causal=piece.is_causal,
                scale=ring.scale,
            )
            dq[rows] += dq_p
            dk[keys] += dk_p
            dv[keys] += dv_p
            del dq_p, dk_p, dv_p  # freed now, not when the next piece's replace them
        if comm.world_size > 1:
            dkv_pending = comm.exchange([dk, dv], "key/value gradients", _DKV)
        if kv_pending is not None:
            k, v = kv_pending.wait()
    if dkv_pending is not None:
        dk, dv = dkv_pending.wait()  # this rank's own block, every rank's share summed
    return dq, dk, dv


def _check_same_call(comm: RingComm, q, k, v, is_causal, scale, layout) -> None:
    """Every rank must pass the same shapes, dtype and options: a mismatch is a ValueError on
    every rank (one small all-gather), not a hang or a garbled message later."""
    mine = _signature(q, k, v, is_causal, scale, layout)
    t = torch.tensor(mine, dtype=torch.float64, device=q.device)
    gathered = [torch.empty_like(t) for _ in range(comm.world_size)]
    try:
        dist.all_gather(gathered, t, group=comm.group)
    except RuntimeError as err:
        raise RuntimeError(
            f"ring_attention: rank {comm.rank} of {comm.world_size} could not agree on the call "
            "with the other ranks; a peer rank has probably raised, exited or not called "
            f"ring_attention. The backend said: {first_line(err)}"
        ) from err
    for rank, theirs in enumerate(gathered):
        if not torch.equal(theirs, t):
            raise ValueError(
                "ring_attention: every rank must pass the same shapes, dtype and options; "
                f"rank {comm.rank} has {_describe(mine)}, rank {rank} has "
                f"{_describe(theirs.tolist())}"
            )


_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def _signature(q, k, v, is_causal, scale, layout) -> list[float]:
    """The call as numbers: q's shape (4), k's shape (4), Ev, dtype, is_causal, scale, layout."""
    dtype = _DTYPES.index(q.dtype) if q.dtype in _DTYPES else len(_DTYPES)
    return [*q.shape, *k.shape, v.shape[-1], dtype, is_causal, scale, LAYOUTS.index(layout)]


def _describe(sig: list[float]) -> str:
    x = [int(a) for a in sig[:11]]
    dtype = _DTYPES[x[9]] if x[9] < len(_DTYPES) else "another dtype"
    return (
        f"q {tuple(x[:4])}, k {tuple(x[4:8])}, Ev {x[8]}, {dtype}, is_causal={bool(x[10])}, "
        f"scale={sig[11]:.6g}, layout={LAYOUTS[int(sig[12])]!r}"
    )
