"""Ring attention (selfattn.ring) against single-process attention.

In-process: the layouts (shards, positions, which pieces of a block a rank computes, checked
against the causal rule on positions), the block decomposition the ring rests on (each engine's
block forward and backward per key block, merged: fused and tiled), which engine a ring runs
on, and a ring of one.

Spawned: gloo process groups of 2, 3 and 4 ranks on loopback (`run_local`, one thread each),
each running a batch of cases on both block engines (fused and tiled), to amortise the
start-up: outputs and the gradients of q, k and v equal `selfattn.attention` over the whole
sequence (float64 within 1e-10; float32 within 1e-5 of float32 attention, and within the
tolerance table of the float64 reference; bfloat16 within the table's bf16 row), causal and
not, both layouts, GQA, through `MultiHeadAttention(context_parallel_group=...)` with the
module's backend, and over size-1 groups. A rank that raises makes the others fail with a clear
error, within seconds.
"""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist
from tolerances import SAME_ROUTE_F32, assert_close

import selfattn
from selfattn.engines import get_engine
from selfattn.ring import (
    LocalRunError,
    ring_attention,
    run_local,
    shard_positions,
    shard_sequence,
    unshard_sequence,
)
from selfattn.ring.attention import block_kernels
from selfattn.ring.layouts import visible_pieces

LAYOUTS = ("zigzag", "contiguous")
BLOCK_ENGINES = ("fused", "tiled")

# ------------------------------------------------------------------------------ the layouts


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_shards_cover_the_sequence_once_and_unshard_back(layout, world):
    length = 8 * world
    x = torch.arange(length).view(1, 1, length, 1).expand(2, 3, length, 5)  # (B, H, L, E)
    shards = [shard_sequence(x, r, world, layout) for r in range(world)]
    assert all(s.shape == (2, 3, length // world, 5) for s in shards)
    for r, s in enumerate(shards):
        assert torch.equal(s[0, 0, :, 0], shard_positions(r, world, length, layout))
    assert torch.equal(unshard_sequence(shards, layout), x)
    assert torch.equal(torch.cat(shards, dim=-2).sort(dim=-2).values, x)  # each token once
    y = torch.randn(length, 4)  # another dim
    parts = [shard_sequence(y, r, world, layout, dim=0) for r in range(world)]
    assert torch.equal(unshard_sequence(parts, layout, dim=0), y)


def test_zigzag_pairs_an_early_chunk_with_a_late_one():
    assert shard_positions(0, 2, 8, "zigzag").tolist() == [0, 1, 6, 7]
    assert shard_positions(1, 2, 8, "zigzag").tolist() == [2, 3, 4, 5]
    assert shard_positions(1, 2, 8, "contiguous").tolist() == [4, 5, 6, 7]


def test_lengths_the_layout_cannot_split_are_value_errors_that_say_which_work():
    x = torch.zeros(1, 1, 12, 4)
    with pytest.raises(ValueError, match=r"multiple of 2P = 8 \(e.g. 8 or 16\)"):
        shard_sequence(x, 0, 4, "zigzag")
    with pytest.raises(ValueError, match=r"multiple of P = 5 \(e.g. 10 or 15\)"):
        shard_sequence(x, 0, 5, "contiguous")
    with pytest.raises(ValueError, match="unknown layout 'striped'"):
        shard_sequence(x, 0, 2, "striped")
    with pytest.raises(TypeError, match="layout must be a str"):
        shard_sequence(x, 0, 2, 2)
    with pytest.raises(ValueError, match=r"rank must be in \[0, 2\)"):
        shard_sequence(x, 2, 2, "zigzag")
    with pytest.raises(ValueError, match="shards of one length"):
        unshard_sequence([x, x[..., :4, :]], "contiguous")


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("world", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("is_causal", [True, False])
def test_the_pieces_of_each_step_are_exactly_the_visible_pairs(layout, world, is_causal):
    """Per (query rank, key rank): the pieces cover each visible (query, key) position pair
    once and nothing else; only the diagonal needs a mask, and there it is plain causal."""
    length = 4 * world
    local = length // world
    for r in range(world):
        q_pos = shard_positions(r, world, length, layout)
        for s in range(world):
            k_pos = shard_positions(s, world, length, layout)
            want = q_pos[:, None] >= k_pos[None, :] if is_causal else torch.ones(local, local)
            got = torch.zeros(local, local, dtype=torch.int64)
            for piece in visible_pieces(r, s, world, local, layout, is_causal):
                cells = torch.ones(local, local, dtype=torch.int64)[piece.q, piece.kv]
                if piece.is_causal:  # bottom-right causal; the diagonal pieces are square
                    assert piece.q == piece.kv and r == s
                    cells = cells.tril()
                got[piece.q, piece.kv] += cells
            assert torch.equal(got, want.long()), (r, s)


def test_zigzag_gives_every_rank_the_same_causal_work():
    world, local = 4, 16
    work = [
        sum(
            (p.q.stop - p.q.start) * (p.kv.stop - p.kv.start) / (2 if p.is_causal else 1)
            for s in range(world)
            for p in visible_pieces(r, s, world, local, "zigzag", True)
        )
        for r in range(world)
    ]
    assert len(set(work)) == 1, work


# --------------------------------------------------------- the block decomposition, in-process


@pytest.mark.parametrize("engine", BLOCK_ENGINES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_block_kernels_per_key_block_merge_into_exact_attention_and_gradients(engine, dtype):
    """What each ring step does: forward per key block, merged by lse; backward per block with
    the merged output and lse gives exact dk, dv of the block and a share of dq."""
    blocks = get_engine(engine).blocks
    scale = 8**-0.5
    g = torch.Generator().manual_seed(1)
    q, k, v, do = (
        torch.randn(2, 4, 24, 8, generator=g, dtype=torch.float64),
        torch.randn(2, 2, 24, 8, generator=g, dtype=torch.float64),
        torch.randn(2, 2, 24, 6, generator=g, dtype=torch.float64),
        torch.randn(2, 4, 24, 6, generator=g, dtype=torch.float64),
    )
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = selfattn.attention(*leaves, is_causal=True, backend="naive")
    ref.backward(do)
    q_, k_, v_, do_ = (t.to(dtype) for t in (q, k, v, do))
    # Two key blocks, 0..9 and 10..23, as two ranks would hold them (contiguous layout):
    parts = [
        (slice(0, 10), slice(0, 10), True),  # queries 0..9 on block 0: the diagonal
        (slice(10, 24), slice(0, 10), False),  # later queries on earlier keys: all visible
        (slice(10, 24), slice(10, 24), True),  # queries 10..23 on block 1: the diagonal
    ]
    work = torch.float64 if dtype == torch.float64 else torch.float32  # the kernels' results
    out = torch.zeros(2, 4, 24, 6, dtype=work)  # merged over the pieces, like a ring step
    lse = torch.full((2, 4, 24), float("-inf"), dtype=work)
    for rows, keys, causal in parts:
        o, s = blocks.forward(
            q_[:, :, rows], k_[:, :, keys], v_[:, :, keys], is_causal=causal, scale=scale
        )
        out[:, :, rows], lse[:, :, rows] = selfattn.merge_partials(
            out[:, :, rows], lse[:, :, rows], o, s
        )
    assert_close(out, ref, dtype)
    dq, dk, dv = (torch.zeros_like(t, dtype=out.dtype) for t in (q_, k_, v_))
    for rows, keys, causal in parts:
        a, b, c = blocks.backward(
            q_[:, :, rows],
            k_[:, :, keys],
            v_[:, :, keys],
            out[:, :, rows],
            lse[:, :, rows],
            do_[:, :, rows],
            is_causal=causal,
            scale=scale,
        )
        dq[:, :, rows] += a
        dk[:, :, keys] += b
        dv[:, :, keys] += c
    for got, leaf in zip((dq, dk, dv), leaves, strict=True):
        assert_close(got, leaf.grad, dtype, grad=True)


# ----------------------------------------------------------------------- a ring of one, here


def test_auto_runs_the_fused_blocks_where_they_can_run_and_names_what_cannot():
    q = torch.zeros(1, 2, 4, 8)
    assert block_kernels("auto", q, True, 0.5) is get_engine("fused").blocks
    assert block_kernels("tiled", q, True, 0.5) is get_engine("tiled").blocks
    with pytest.raises(ValueError, match="sdpa: it has no block kernels.*'fused', 'tiled'"):
        block_kernels("sdpa", q, True, 0.5)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        block_kernels("flash", q, True, 0.5)
    with pytest.raises(TypeError, match="backend must be a str"):
        ring_attention(q, q, q, backend=None)


@pytest.mark.parametrize("backend", BLOCK_ENGINES)
@pytest.mark.parametrize("is_causal", [True, False])
def test_without_a_process_group_it_is_plain_attention(is_causal, backend):
    assert not dist.is_initialized()
    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 4, 20, 8, generator=g, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 1, 20, 8, generator=g, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 20, 8, generator=g, dtype=torch.float64, requires_grad=True)
    out = ring_attention(q, k, v, is_causal=is_causal, scale=0.3, backend=backend)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref = selfattn.attention(q, k, v, is_causal=is_causal, scale=0.3, backend="naive")
    ref_grads = torch.autograd.grad(ref.sum(), (q, k, v))
    assert_close(out, ref, torch.float64)
    for a, b in zip(grads, ref_grads, strict=True):
        assert_close(a, b, torch.float64, grad=True)


def test_argument_errors_name_what_arrived():
    q = torch.zeros(1, 2, 6, 4)
    with pytest.raises(ValueError, match="same per-rank length"):
        ring_attention(q, q[:, :, :4], q[:, :, :4])
    with pytest.raises(ValueError, match="even per-rank length"):
        ring_attention(q[:, :, :5], q[:, :, :5], q[:, :, :5], layout="zigzag")
    with pytest.raises(ValueError, match="unknown layout"):
        ring_attention(q, q, q, layout="ring")
    with pytest.raises(TypeError, match="is_causal must be a bool"):
        ring_attention(q, q, q, is_causal=1)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        ring_attention(q, q[:, :1].expand(1, 3, 6, 4), q[:, :1].expand(1, 3, 6, 4))


def test_the_module_refuses_what_the_ring_cannot_do():
    group = object()  # checked before any use
    with pytest.raises(ValueError, match="no sliding window"):
        selfattn.MultiHeadAttention(8, 8, 16, 0.0, 2, window=4, context_parallel_group=group)
    with pytest.raises(ValueError, match="dropout=0.1"):
        selfattn.MultiHeadAttention(8, 8, 16, 0.1, 2, context_parallel_group=group)
    with pytest.raises(ValueError, match="unknown layout"):
        selfattn.MultiHeadAttention(8, 8, 16, 0.0, 2, context_parallel_layout="rings")


# ------------------------------------------------------------------ spawned gloo process groups
# The functions below run in the spawned ranks (module-level, so the ranks can import them).


def _inputs(b, hq, hkv, length, e, ev, seed):
    """Full-sequence q, k, v and an output gradient, float64, the same on every rank."""
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(b, hq, length, e, generator=g, dtype=torch.float64),
        torch.randn(b, hkv, length, e, generator=g, dtype=torch.float64),
        torch.randn(b, hkv, length, ev, generator=g, dtype=torch.float64),
        torch.randn(b, hq, length, ev, generator=g, dtype=torch.float64),
    )


def _check_ring(case: dict, group=None) -> None:
    """One case on this rank: its rows of the output and its shards' gradients against the
    whole sequence's attention (float64 reference; float32 also against float32 attention)."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    layout, causal, dtype = case["layout"], case["causal"], case["dtype"]
    q, k, v, do = _inputs(*case["shape"], seed=case.get("seed", 0))

    def shard(t):
        return shard_sequence(t, rank, world, layout)

    def whole(dt):  # (out, dq, dk, dv) of single-process attention over all L, in dtype dt
        leaves = [t.to(dt, copy=True).requires_grad_() for t in (q, k, v)]
        out = selfattn.attention(*leaves, is_causal=causal)
        out.backward(do.to(dt))
        return (out, *(t.grad for t in leaves))

    full = whole(torch.float64)
    ring_in = [shard(t).to(dtype, copy=True).requires_grad_() for t in (q, k, v)]
    backend = case.get("backend", "auto")
    out = ring_attention(*ring_in, group=group, is_causal=causal, layout=layout, backend=backend)
    out.backward(shard(do).to(dtype))
    got = (out, *(t.grad for t in ring_in))
    where = f"{case} on rank {rank} of {world}"
    assert out.dtype == dtype, where
    for i, (a, b) in enumerate(zip(got, full, strict=True)):
        try:
            assert_close(a, shard(b), dtype, grad=i > 0)
        except AssertionError as err:
            raise AssertionError(f"{('out', 'dq', 'dk', 'dv')[i]} of {where}: {err}") from None
    if dtype == torch.float32:  # and against single-process float32 attention, within 1e-5
        for a, b in zip(got, whole(torch.float32), strict=True):
            torch.testing.assert_close(a, shard(b), **SAME_ROUTE_F32, msg=lambda m: where + m)


def _check_module(layout: str, num_kv_heads: int, backend: str) -> None:
    """MultiHeadAttention on shards of x equals the module on the whole x: output, x's gradient
    and (summed over the ranks) the parameters' gradients; the ring runs the module's backend."""
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(3)
    kw = dict(num_kv_heads=num_kv_heads, backend=backend)
    whole = selfattn.MultiHeadAttention(12, 12, 64, 0.0, 4, **kw).double()
    mha = selfattn.MultiHeadAttention(
        12, 12, 64, 0.0, 4, **kw, context_parallel_group=dist.group.WORLD,
        context_parallel_layout=layout,
    ).double()  # fmt: skip
    mha.load_state_dict(whole.state_dict())
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 8 * world, 12, generator=g, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(2, 8 * world, 12, generator=g, dtype=torch.float64)
    whole(x).backward(dy)
    x_mine = shard_sequence(x.detach(), rank, world, layout).requires_grad_()
    y = mha(x_mine)
    y.backward(shard_sequence(dy, rank, world, layout))
    assert_close(y, shard_sequence(whole(x).detach(), rank, world, layout), torch.float64)
    assert_close(x_mine.grad, shard_sequence(x.grad, rank, world, layout), torch.float64)
    for (name, p), p_whole in zip(mha.named_parameters(), whole.parameters(), strict=True):
        dist.all_reduce(p.grad)  # each rank holds its shard's share
        try:
            assert_close(p.grad, p_whole.grad, torch.float64, grad=True)
        except AssertionError as err:
            raise AssertionError(f"{name}.grad on rank {rank}: {err}") from None
    with pytest.raises(ValueError, match="longer than context_length=64"):
        mha(torch.zeros(1, 64 // world + 2, 12, dtype=torch.float64))


def _rank_checks(cases: list[dict], modules: list[tuple[str, int, str]]) -> int:
    """Every case on this rank, then the module, size-1 groups and a mismatched call."""
    for case in cases:
        _check_ring(case)
    for layout, kv_heads, backend in modules:
        _check_module(layout, kv_heads, backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    singles = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    one = {"layout": "zigzag", "causal": True, "dtype": torch.float64, "shape": (1, 2, 1, 12, 4, 4)}
    _check_ring(one, group=singles[rank])
    # Ranks that disagree on the call: a ValueError on every rank, naming both.
    q = torch.zeros(1, 1, 4 + 2 * (rank == 0), 4)
    with pytest.raises(ValueError, match=r"same shapes, dtype and options; rank \d has q"):
        ring_attention(q, q, q)
    return len(cases)


# (B, Hq, Hkv, L, E, Ev): small, odd where it can be, GQA, MQA and Ev != E among them.
CASES_2 = [
    {"layout": lay, "causal": c, "dtype": torch.float64, "shape": (2, 4, 2, 24, 8, 6)}
    for lay in LAYOUTS
    for c in (True, False)
] + [
    {"layout": "zigzag", "causal": True, "dtype": torch.float64, "shape": (1, 3, 1, 16, 4, 4)},
    {"layout": "zigzag", "causal": True, "dtype": torch.float32, "shape": (1, 2, 2, 512, 16, 16)},
    {"layout": "contiguous", "causal": True, "dtype": torch.float32, "shape": (1, 2, 1, 96, 8, 8)},
    {"layout": "zigzag", "causal": False, "dtype": torch.float32, "shape": (2, 2, 2, 40, 8, 8)},
    {"layout": "zigzag", "causal": True, "dtype": torch.bfloat16, "shape": (1, 4, 2, 64, 8, 8)},
]
CASES_4 = [
    {"layout": "zigzag", "causal": True, "dtype": torch.float64, "shape": (1, 4, 2, 64, 8, 8)},
    {"layout": "contiguous", "causal": True, "dtype": torch.float64, "shape": (2, 2, 1, 36, 8, 4)},
    {"layout": "zigzag", "causal": False, "dtype": torch.float64, "shape": (1, 2, 2, 16, 4, 4)},
    {"layout": "contiguous", "causal": False, "dtype": torch.float32, "shape": (1, 2, 2, 64, 8, 8)},
    {"layout": "zigzag", "causal": True, "dtype": torch.float32, "shape": (1, 2, 1, 256, 16, 16)},
    {
        "layout": "contiguous",
        "causal": False,
        "dtype": torch.bfloat16,
        "shape": (1, 2, 2, 32, 8, 8),
    },
]

# Three ranks: an odd ring (the zigzag pairs chunk r with chunk 2P-1-r = 5-r), and bf16 inputs
# against the float64 reference within the table's bf16 row.
CASES_3 = [
    {"layout": "zigzag", "causal": True, "dtype": torch.float64, "shape": (1, 4, 2, 36, 8, 8)},
    {"layout": "zigzag", "causal": True, "dtype": torch.bfloat16, "shape": (1, 2, 1, 48, 8, 8)},
    {"layout": "contiguous", "causal": True, "dtype": torch.float64, "shape": (2, 2, 2, 33, 4, 6)},
    {
        "layout": "contiguous",
        "causal": False,
        "dtype": torch.bfloat16,
        "shape": (1, 2, 2, 27, 8, 8),
    },
]


def on_both_engines(cases: list[dict]) -> list[dict]:
    return [{**case, "backend": engine} for case in cases for engine in BLOCK_ENGINES]


def test_two_ranks_equal_single_process_attention():
    cases = on_both_engines(CASES_2)
    modules = [("zigzag", 2, "fused"), ("contiguous", 4, "tiled")]
    done = run_local(_rank_checks, 2, cases, modules, timeout=120)
    assert done == [len(cases)] * 2


def test_three_ranks_equal_single_process_attention():
    cases = on_both_engines(CASES_3)
    done = run_local(_rank_checks, 3, cases, [("contiguous", 2, "auto")], timeout=120)
    assert done == [len(cases)] * 3


def test_four_ranks_equal_single_process_attention():
    cases = on_both_engines(CASES_4)
    done = run_local(_rank_checks, 4, cases, [("zigzag", 1, "fused")], timeout=120)
    assert done == [len(cases)] * 4


def _fail_after_forward(linger: float) -> None:
    """The last rank raises between forward and backward (then exits, or lingers alive); the
    others go on into backward, where the ring needs it."""
    rank, world = dist.get_rank(), dist.get_world_size()
    q = torch.randn(1, 2, 8, 4, requires_grad=True)
    out = ring_attention(q, q, q, is_causal=True)
    if rank == world - 1:
        try:
            raise RuntimeError("this rank failed on purpose")
        finally:
            time.sleep(linger)
    out.sum().backward()


@pytest.mark.parametrize(("world", "linger"), [(3, 0.0), (2, 5.0)])
def test_a_rank_that_raises_makes_the_others_fail_clearly_and_soon(world, linger):
    """A peer that exits is noticed at once (its connection closes); one that stays alive
    without calling is noticed at the process group's timeout (3 s here)."""
    with pytest.raises(LocalRunError) as info:
        run_local(_fail_after_forward, world, linger, group_timeout=3.0, timeout=60)
    *others, culprit = info.value.outcomes
    assert "this rank failed on purpose" in culprit.error
    for o in others:
        assert not o.ok, o
        assert f"ring_attention: rank {o.rank} of {world} failed passing" in o.error, o.error
        assert "a peer rank has probably raised" in o.error
        assert o.seconds < 30, o
