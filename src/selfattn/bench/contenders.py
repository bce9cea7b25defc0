"""The contenders: every implementation the bench times, built from one set of weights.

Each contender computes the same layer, so their times compare and one float64 reference checks
them all. Shapes: B batch, L tokens, H heads, E head dim, d = H * E::

    q, k, v = x W_qᵀ, x W_kᵀ, x W_vᵀ     (B, L, d) each: three d x d projections, no bias
    context = attention(q, k, v)          H heads of E, causal (bottom-right) or not, (B, L, d)
    y       = context W_oᵀ + b_o          the output projection, (B, L, d)

The chapter's `MultiHeadAttentionWrapper` has no output projection; it is checked against the
context instead (``produces="context"``), and its FLOP count has three projections, not four.

Bare kernels (SDPA, FlexAttention) run inside `ProjectedKernel`, the same projections written
plainly, so that they too compute the layer: what differs between two contenders is the attention
and the glue around it, never the work asked for.

A contender that cannot apply to a case says why through ``unsupported(case, device)``; one
that finds out only when it runs raises `SkipContender` (or NotImplementedError), and the bench
lists it as skipped with that reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfattn.bench.results import Case, SkipContender


@dataclass(frozen=True)
class Weights:
    """One layer's weights in float64: every contender is built from these."""

    wq: Tensor  # (d, d)
    wk: Tensor  # (d, d)
    wv: Tensor  # (d, d)
    wo: Tensor  # (d, d)
    bo: Tensor  # (d,)

    @staticmethod
    def make(d: int, seed: int) -> Weights:
        gen = torch.Generator().manual_seed(seed)
        bound = 1.0 / math.sqrt(d)  # nn.Linear's default init range

        def uniform(*shape):
            return (torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound

        return Weights(uniform(d, d), uniform(d, d), uniform(d, d), uniform(d, d), uniform(d))

    def cast(self, dtype: torch.dtype) -> Weights:
        """The weights as ``dtype`` holds them, back in float64 (for the reference)."""
        return Weights(*(t.to(dtype).to(torch.float64) for t in self.tensors()))

    def tensors(self) -> tuple[Tensor, ...]:
        return (self.wq, self.wk, self.wv, self.wo, self.bo)


def make_input(case: Case, seed: int, device: str) -> Tensor:
    """x (B, L, d), standard normal, in the case's dtype on ``device``."""
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(case.batch, case.length, case.d_model, generator=gen, dtype=torch.float64)
    return x.to(device=device, dtype=case.torch_dtype)


@dataclass
class Built:
    """A contender made ready for one case: ``fn(x (B, L, d)) -> (B, L, d)``."""

    fn: Callable[[Tensor], Tensor]
    module: nn.Module
    extra_bytes: int = 0  # state held outside the module (a mask built once per case)

    def params(self) -> list[Tensor]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def module_bytes(self) -> int:
        """Parameters and buffers of the module."""
        return module_bytes(self.module)

    def state_bytes(self) -> int:
        """The module's parameters and buffers, and what the contender keeps beside them."""
        return self.module_bytes() + self.extra_bytes


def module_bytes(*modules: nn.Module) -> int:
    """Bytes of the parameters and buffers of ``modules``."""
    tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    return sum(t.numel() * t.element_size() for t in tensors)


@dataclass(frozen=True)
class Contender:
    """An implementation the bench times: built per case from the shared `Weights`."""

    name: str
    summary: str
    build: Callable[[Case, Weights, str], Built]  # (case, weights, device) -> Built
    unsupported: Callable[[Case, str], str | None] = field(default=lambda case, device: None)
    produces: str = "output"  # "output" (after out_proj) or "context" (before it)
    linears: int = 4  # d x d projections it runs, for the FLOP count
    memory_note: str = ""  # set: its CPU memory is not measured in a fresh process, and why

    @property
    def memory_in_subprocess(self) -> bool:
        return not self.memory_note


CONTENDERS: dict[str, Contender] = {}


def register(contender: Contender) -> Contender:
    CONTENDERS[contender.name] = contender
    return contender


def get_contender(name: str) -> Contender:
    if name not in CONTENDERS:
        raise ValueError(f"unknown contender {name!r}; expected one of {', '.join(CONTENDERS)}")
    return CONTENDERS[name]


# ----------------------------------------------------------------------------- building blocks


def _load(linear: nn.Linear, weight: Tensor, bias: Tensor | None = None) -> None:
    with torch.no_grad():
        linear.weight.copy_(weight)
        if bias is not None:
            linear.bias.copy_(bias)
        elif linear.bias is not None:
            linear.bias.zero_()


def _ready(module: nn.Module, case: Case, device: str) -> nn.Module:
    return module.to(device=device, dtype=case.torch_dtype).eval()  # eval: no dropout anywhere


class ProjectedKernel(nn.Module):
    """The layer around a bare kernel: projections, ``kernel(q, k, v)`` on (B, H, L, E), out_proj.

    Written as plainly as the layer's definition, so a kernel's contender costs what the
    kernel costs plus the projections every contender pays.
    """

    def __init__(self, case: Case, w: Weights, kernel: Callable[[Tensor, Tensor, Tensor], Tensor]):
        super().__init__()
        d = case.d_model
        self.heads = case.heads
        self.kernel = kernel
        self.W_query = nn.Linear(d, d, bias=False)
        self.W_key = nn.Linear(d, d, bias=False)
        self.W_value = nn.Linear(d, d, bias=False)
        self.out_proj = nn.Linear(d, d)
        for linear, weight in zip(
            (self.W_query, self.W_key, self.W_value), (w.wq, w.wk, w.wv), strict=True
        ):
            _load(linear, weight)
        _load(self.out_proj, w.wo, w.bo)

    def forward(self, x: Tensor) -> Tensor:
        b, length, d = x.shape
        h = self.heads

        def split(t: Tensor) -> Tensor:  # (B, L, d) -> (B, H, L, E)
            return t.view(b, length, h, d // h).transpose(1, 2)

        q, k, v = split(self.W_query(x)), split(self.W_key(x)), split(self.W_value(x))
        context = self.kernel(q, k, v)  # (B, H, L, E)
        return self.out_proj(context.transpose(1, 2).reshape(b, length, d))  # (B, L, d)


# ----------------------------------------------------------------------------- selfattn


def _selfattn_mha(engine: str) -> Callable[[Case, Weights, str], Built]:
    def build(case: Case, w: Weights, device: str) -> Built:
        from selfattn.modules.causal_multihead import MultiHeadAttention

        d = case.d_model
        m = MultiHeadAttention(
            d, d, case.length, 0.0, case.heads, causal=case.causal, backend=engine
        )
        _load(m.W_query, w.wq)
        _load(m.W_key, w.wk)
        _load(m.W_value, w.wv)
        _load(m.out_proj, w.wo, w.bo)
        m = _ready(m, case, device)
        return Built(fn=m, module=m)

    return build


for _engine, _summary in (
    ("auto", "selfattn MultiHeadAttention, default engine (auto: the fastest that applies)"),
    ("sdpa", "selfattn MultiHeadAttention on the sdpa engine"),
    ("tiled", "selfattn MultiHeadAttention on the tiled engine (FlashAttention in torch)"),
    ("naive", "selfattn MultiHeadAttention on the naive engine: the chapter's class"),
):
    register(Contender(f"mha-{_engine}", _summary, _selfattn_mha(_engine)))


def _wrapper(case: Case, w: Weights, device: str) -> Built:
    from selfattn.modules.causal_multihead import MultiHeadAttentionWrapper

    e = case.head_dim
    m = MultiHeadAttentionWrapper(case.d_model, e, case.length, 0.0, case.heads, backend="naive")
    for i, head in enumerate(m.heads):  # head i owns rows i*E:(i+1)*E of each projection
        rows = slice(i * e, (i + 1) * e)
        _load(head.W_query, w.wq[rows])
        _load(head.W_key, w.wk[rows])
        _load(head.W_value, w.wv[rows])
    m = _ready(m, case, device)
    return Built(fn=m, module=m)


register(
    Contender(
        "wrapper-naive",
        "the chapter's MultiHeadAttentionWrapper: H separate causal heads, concatenated",
        _wrapper,
        unsupported=lambda case, device: (
            None if case.causal else "the chapter's MultiHeadAttentionWrapper is causal only"
        ),
        produces="context",
        linears=3,
    )
)


# ----------------------------------------------------------------------------- torch.nn


def _torch_mha(need_weights: bool) -> Callable[[Case, Weights, str], Built]:
    def build(case: Case, w: Weights, device: str) -> Built:
        d = case.d_model
        m = nn.MultiheadAttention(d, case.heads, bias=True, batch_first=True)
        with torch.no_grad():
            m.in_proj_weight.copy_(torch.cat([w.wq, w.wk, w.wv]))  # (3d, d)
            m.in_proj_bias.zero_()
        _load(m.out_proj, w.wo, w.bo)
        m = _ready(m, case, device)
        mask = None
        if case.causal:  # (L, L) bool, True = may NOT attend (nn.MultiheadAttention's polarity)
            ones = torch.ones(case.length, case.length, dtype=torch.bool, device=device)
            mask = torch.triu(ones, diagonal=1)

        def fn(x: Tensor) -> Tensor:
            out, _ = m(
                x, x, x, attn_mask=mask, is_causal=case.causal, need_weights=need_weights
            )  # is_causal is a hint that lets it skip the mask when need_weights=False
            return out

        return Built(fn=fn, module=m, extra_bytes=0 if mask is None else mask.numel())

    return build


register(
    Contender(
        "torch-mha",
        "torch.nn.MultiheadAttention(need_weights=False), causal attn_mask + is_causal hint",
        _torch_mha(need_weights=False),
    )
)
register(
    Contender(
        "torch-mha-weights",
        "torch.nn.MultiheadAttention(need_weights=True): also returns the averaged weights",
        _torch_mha(need_weights=True),
    )
)


# ----------------------------------------------------------------------------- bare kernels


def _sdpa(flash_only: bool) -> Callable[[Case, Weights, str], Built]:
    def build(case: Case, w: Weights, device: str) -> Built:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def kernel(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
            if not flash_only:
                return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=case.causal)

        m = _ready(ProjectedKernel(case, w, kernel), case, device)
        return Built(fn=m, module=m)

    return build


def _flash_unsupported(case: Case, device: str) -> str | None:
    if device == "cuda" and case.dtype == "fp32":
        return "SDPA's flash backend needs fp16 or bf16 on CUDA"
    return None


register(
    Contender(
        "sdpa",
        "F.scaled_dot_product_attention called directly (its own backend choice)",
        _sdpa(flash_only=False),
    )
)
register(
    Contender(
        "sdpa-flash",
        "F.scaled_dot_product_attention forced onto its flash backend",
        _sdpa(flash_only=True),
        unsupported=_flash_unsupported,
    )
)

_COMPILED_FLEX: dict[str, Callable] = {}


def _compiled_flex(device: str) -> Callable:
    """torch.compile(flex_attention), once per process and device (dynamic shapes on a CPU,
    where each new length would otherwise cost another 10-30 s compile)."""
    if device not in _COMPILED_FLEX:
        from torch.nn.attention.flex_attention import flex_attention

        dynamic = True if device == "cpu" else None
        _COMPILED_FLEX[device] = torch.compile(flex_attention, dynamic=dynamic)
    return _COMPILED_FLEX[device]


def _flex(case: Case, w: Weights, device: str) -> Built:
    try:
        from torch.nn.attention.flex_attention import create_block_mask
    except ImportError as err:
        raise SkipContender(f"FlexAttention is not in torch {torch.__version__}: {err}") from None
    flex = _compiled_flex(device)
    block_mask = None
    if case.causal:

        def causal(b, h, q_idx, kv_idx):
            return q_idx >= kv_idx

        block_mask = create_block_mask(causal, None, None, case.length, case.length, device=device)

    def kernel(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        try:
            return flex(q, k, v, block_mask=block_mask)
        except NotImplementedError:
            raise
        except Exception as err:
            if "torch._dynamo" in type(err).__module__ or "torch._inductor" in type(err).__module__:
                first = str(err).strip().splitlines()[0] if str(err).strip() else ""
                raise SkipContender(
                    f"torch.compile failed here ({type(err).__name__}: {first[:160]})"
                ) from None
            raise

    m = _ready(ProjectedKernel(case, w, kernel), case, device)
    return Built(fn=m, module=m)


register(
    Contender(
        "flex",
        "FlexAttention (torch.compile) with a causal block mask",
        _flex,
        memory_note="not measured on a CPU: each fresh process would compile it again (10-30 s)",
    )
)


# ----------------------------------------------------------------------------- x-transformers


def _x_transformers(case: Case, w: Weights, device: str) -> Built:
    try:
        from x_transformers import Attention
    except ImportError:
        raise SkipContender(
            "x-transformers is not installed (pip install 'selfattn[bench]')"
        ) from None
    m = Attention(dim=case.d_model, dim_head=case.head_dim, heads=case.heads, causal=case.causal,
                  flash=True)  # fmt: skip
    _load(m.to_q, w.wq)
    _load(m.to_k, w.wk)
    _load(m.to_v, w.wv)
    _load(m.to_out, w.wo)  # no bias there: added below, as the layer asks
    m = _ready(m, case, device)
    bias = w.bo.to(device=device, dtype=case.torch_dtype)

    def fn(x: Tensor) -> Tensor:
        return m(x) + bias

    return Built(fn=fn, module=m, extra_bytes=bias.numel() * bias.element_size())


register(
    Contender(
        "x-transformers",
        "x-transformers Attention(flash=True) (optional: the 'bench' extra)",
        _x_transformers,
    )
)


# ----------------------------------------------------------------------------- decoders


@dataclass(frozen=True)
class Decoder:
    """A contender of the decode preset: a selfattn engine with or without the KV cache, or
    torch.nn.MultiheadAttention (which has none). `selfattn.bench.decode` runs them."""

    name: str
    summary: str
    engine: str | None  # a selfattn engine, or None for torch.nn.MultiheadAttention
    cache: bool


DECODERS: dict[str, Decoder] = {}
for _engine in ("auto", "sdpa", "tiled", "naive"):
    DECODERS[f"mha-{_engine}"] = Decoder(
        f"mha-{_engine}",
        f"selfattn MultiHeadAttention ({_engine}), recomputing the whole prefix every step",
        _engine,
        cache=False,
    )
    DECODERS[f"mha-{_engine}+cache"] = Decoder(
        f"mha-{_engine}+cache",
        f"selfattn MultiHeadAttention ({_engine}) with use_cache=True: one token per step",
        _engine,
        cache=True,
    )
DECODERS["torch-mha"] = Decoder(
    "torch-mha",
    "torch.nn.MultiheadAttention (no KV cache): recomputes the whole prefix every step",
    None,
    cache=False,
)
