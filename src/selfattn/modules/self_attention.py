"""The two modules selfattn starts from: single-head self-attention, as in the book's chapter 3.

Both compute ``softmax(Q Kᵀ / sqrt(d_k)) V`` with Q = x W_q, K = x W_k, V = x W_v, and both run
on `selfattn.attention` (the same core as every other module here).

Shapes: x (seq_len, d_in) as in the chapter, or batched (..., seq_len, d_in);
the result is (..., seq_len, d_out).

- `SelfAttention_v1` keeps three raw (d_in, d_out) matrices, initialised with ``torch.rand``, and
  projects with ``x @ W``.
- `SelfAttention_v2` uses three ``nn.Linear(d_in, d_out, bias=qkv_bias)`` layers, with PyTorch's
  default initialisation. A Linear layer stores its weight as (d_out, d_in) and computes
  ``x @ weight.T + bias``, so a v1 matrix is the transpose of the matching v2 weight.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from selfattn._checks import merge_heads, positive_int, split_heads, token_input
from selfattn.functional import attention
from selfattn.recording import record


class _SingleHeadSelfAttention(nn.Module):
    """What v1 and v2 share: input checks and the attention call. Subclasses project."""

    d_in: int
    d_out: int

    def __init__(self, d_in: int, d_out: int, backend: str = "auto") -> None:
        super().__init__()
        self.d_in = positive_int("d_in", d_in)
        self.d_out = positive_int("d_out", d_out)
        self.backend = backend

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries, keys, values, each (..., seq_len, d_out)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        """x (..., seq_len, d_in) -> context vectors (..., seq_len, d_out)."""
        x = token_input(x, self.d_in, type(self).__name__)
        record("inputs", x)
        queries, keys, values = self.project(x)  # each (..., seq_len, d_out)
        q, k, v = (split_heads(t, 1) for t in (queries, keys, values))  # (N, 1, seq_len, d_out)
        record("queries", q)
        record("keys", k)
        record("values", v)
        context = attention(q, k, v, backend=self.backend)  # (N, 1, seq_len, d_out)
        out = merge_heads(context, x.shape[:-2])  # (..., seq_len, d_out)
        record("output", out)
        return out

    def extra_repr(self) -> str:
        return f"d_in={self.d_in}, d_out={self.d_out}"


class SelfAttention_v1(_SingleHeadSelfAttention):
    """Self-attention with three raw parameter matrices, projected as ``x @ W``.

    Args:
        d_in: width of each input token vector.
        d_out: width of queries, keys, values and of the output (d_k = d_out).

    Parameters ``W_query``, ``W_key``, ``W_value``: (d_in, d_out), ``torch.rand``-initialised in
    that order, so ``torch.manual_seed(123)`` gives the chapter's weights.
    """

    def __init__(self, d_in: int, d_out: int, *, backend: str = "auto") -> None:
        super().__init__(d_in, d_out, backend)
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        queries = x @ self.W_query  # (..., L, d_in) x (d_in, d_out) -> (..., L, d_out)
        keys = x @ self.W_key  # (..., L, d_out)
        values = x @ self.W_value  # (..., L, d_out)
        return queries, keys, values

    @classmethod
    def from_v2(cls, module: SelfAttention_v2) -> SelfAttention_v1:
        """A v1 with the same outputs as ``module``; refused if ``module`` has biases."""
        if not isinstance(module, SelfAttention_v2):
            raise TypeError(f"from_v2 expects a SelfAttention_v2, got {type(module).__name__}")
        if module.W_query.bias is not None:
            raise ValueError(
                "cannot convert a SelfAttention_v2 with qkv_bias=True to SelfAttention_v1: "
                "v1 has no bias parameters to hold the biases"
            )
        ref = module.W_query.weight
        new = cls.__new__(cls)
        _SingleHeadSelfAttention.__init__(new, module.d_in, module.d_out, module.backend)
        with torch.no_grad():
            for name in ("W_query", "W_key", "W_value"):
                weight = getattr(module, name).weight  # (d_out, d_in)
                setattr(new, name, nn.Parameter(weight.detach().transpose(0, 1).clone()))
        return new.to(device=ref.device, dtype=ref.dtype)


class SelfAttention_v2(_SingleHeadSelfAttention):
    """Self-attention with three ``nn.Linear`` projections.

    Args:
        d_in: width of each input token vector.
        d_out: width of queries, keys, values and of the output (d_k = d_out).
        qkv_bias: give the three Linear layers a bias.

    Submodules ``W_query``, ``W_key``, ``W_value``: ``nn.Linear(d_in, d_out)`` created in that
    order, so ``torch.manual_seed(789)`` gives the chapter's weights.
    """

    def __init__(
        self, d_in: int, d_out: int, qkv_bias: bool = False, *, backend: str = "auto"
    ) -> None:
        super().__init__(d_in, d_out, backend)
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        queries = self.W_query(x)  # (..., L, d_in) -> (..., L, d_out)
        keys = self.W_key(x)  # (..., L, d_out)
        values = self.W_value(x)  # (..., L, d_out)
        return queries, keys, values

    @classmethod
    def from_v1(cls, module: SelfAttention_v1) -> SelfAttention_v2:
        """A bias-free v2 with the same outputs as ``module`` (Linear weight = v1 matrixᵀ)."""
        if not isinstance(module, SelfAttention_v1):
            raise TypeError(f"from_v1 expects a SelfAttention_v1, got {type(module).__name__}")
        ref = module.W_query
        new = cls(module.d_in, module.d_out, qkv_bias=False, backend=module.backend)
        with torch.no_grad():
            for name in ("W_query", "W_key", "W_value"):
                matrix = getattr(module, name)  # (d_in, d_out)
                getattr(new, name).weight.copy_(matrix.transpose(0, 1))
        return new.to(device=ref.device, dtype=ref.dtype)
