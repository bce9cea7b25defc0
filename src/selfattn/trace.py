"""`trace()`: run any selfattn module once and keep every intermediate of its attention.

Every renderer of `selfattn explain` (terminal, PNG, HTML, JSON) reads a `Trace`; none of them
computes attention itself. A trace is taken by running the module's own ``forward`` under
`selfattn.recording.recording()`, which routes attention to the naive engine so that the scores and
weights exist.

One trace is one attention layer. A module with several (``nn.Sequential`` of two
`MultiHeadAttention`, the MiniLM encoder) gives one trace per layer with `trace_all`, or the one
chosen with ``trace(..., layer=i)``; plain `trace` on it is a ValueError asking for that choice.
The chapter's `MultiHeadAttentionWrapper` is one layer, its heads side by side.

Shapes in a trace are for one sample (``sample=``) of the batch; L queries, S keys (S = L, unless
a KV cache holds earlier tokens):

    inputs          (L, d_in)
    queries         (H, L, D)      H heads, D head width (d_k)
    keys            (H, S, D)      the key/value head each query head reads: with grouped-query
    values          (H, S, Dv)     attention (Hkv < H), head h is kv head h // (H / Hkv), repeated
    scores          (H, L, S)      Q Kᵀ
    scaled_scores   (H, L, S)      Q Kᵀ / sqrt(d_k)
    mask            (H, L, S)      bool, True = may attend
    weights         (H, L, S)      softmax rows, each sums to 1
    context         (H, L, Dv)     weights @ V, per head
    output          (L, d_out)     the module's output (heads merged and projected, if it does)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from selfattn.recording import PER_HEAD_STEPS, recording

# The steps in the order the computation makes them, each with what it means.
STEP_MEANINGS: dict[str, str] = {
    "inputs": "one embedding vector per token",
    "queries": "what each token is looking for (x W_query)",
    "keys": "what each token offers to be matched on (x W_key)",
    "values": "what each token passes on when attended to (x W_value)",
    "scores": "Q Kᵀ: how well each query matches each key",
    "scaled_scores": "scores / sqrt(d_k): keeps softmax from saturating",
    "mask": "which keys each query may attend to (True = allowed)",
    "masked_scores": "scaled scores with -inf where the mask hides a key, before softmax",
    "weights": "softmax over each row: attention weights, each row sums to 1",
    "dropped_weights": "weights after dropout (training mode): kept ones scaled by 1 / (1 - p)",
    "context": "weights @ V: each token's weighted mix of the values",
    "merged": "the heads' context vectors side by side (L, H * Dv), before out_proj",
    "output": "the module's output (heads merged, then out_proj where the module has one)",
}
# masked_scores, dropped_weights and merged are not recorded: `selfattn.explain` derives them.
_MIXES_HEADS = ("merged", "output")

# How Jupyter draws a Trace (`Trace._repr_html_`). The view is `selfattn.explain.inline`'s, a
# layer above this module, which never imports it: importing that module sets the hook (with
# `set_html_view`). Until then a Trace has no HTML form and Jupyter shows its text.
_html_view: Callable[[Trace], str] | None = None


def set_html_view(render: Callable[[Trace], str] | None) -> None:
    """Set the function that turns a `Trace` into the HTML Jupyter shows (None: no HTML)."""
    global _html_view
    _html_view = render


@dataclass
class Trace:
    """Every intermediate of one attention forward pass, for one sample."""

    module: str
    tokens: list[str]
    steps: dict[str, Tensor]
    extras: dict[str, object] = field(default_factory=dict)

    @property
    def num_heads(self) -> int:
        return self.steps["weights"].shape[0]

    @property
    def d_k(self) -> int:
        return self.steps["queries"].shape[-1]

    @property
    def scale(self) -> float:
        """The softmax scale: 1 / sqrt(d_k), unless ``extras["scale"]`` says otherwise."""
        return float(self.extras.get("scale", 1.0 / math.sqrt(self.d_k)))

    @property
    def masked(self) -> bool:
        """Whether any query is kept from any key (causal, window or padding masks)."""
        return not bool(self.steps["mask"].all())

    def step_names(self) -> list[str]:
        return [name for name in STEP_MEANINGS if name in self.steps]

    def select_head(self, h: int) -> Trace:
        """This trace cut to head ``h``: per-head steps become (1, L, ·); the merged output,
        which mixes every head, is dropped. ``extras["head"]`` records the choice."""
        if self.num_heads == 1:
            return self
        if not 0 <= h < self.num_heads:
            raise ValueError(f"head {h} is out of range: valid heads are 0..{self.num_heads - 1}")
        steps = {
            name: t[h : h + 1] if name in PER_HEAD_STEPS else t
            for name, t in self.steps.items()
            if name not in _MIXES_HEADS
        }
        return Trace(self.module, self.tokens, steps, {**self.extras, "head": h})

    def head(self, name: str, h: int) -> Tensor:
        """One head's slice of a per-head step, e.g. ``trace.head("weights", 0)`` -> (L, L)."""
        return self.steps[name][h]

    def _repr_html_(self) -> str | None:
        """Jupyter's rich display: the interactive view of `selfattn.show`, as shown in a
        notebook cell's output (None, so plain text, before that view is loaded)."""
        return None if _html_view is None else _html_view(self)


def trace(
    module: nn.Module,
    x: Tensor,
    tokens: list[str] | None = None,
    *,
    layer: int | None = None,
    sample: int = 0,
    **forward_kwargs: object,
) -> Trace:
    """Run ``module(x, **forward_kwargs)`` and return its attention's intermediates for batch
    item ``sample``.

    x is (L, d_in) or (B, L, d_in) (or whatever the module's forward takes). ``tokens`` labels
    the L positions (default "0", "1", ...). A module that runs several attention layers needs
    ``layer=`` (0 = the first to run), which the trace's ``extras["layer"]`` records; `trace_all`
    gives them all. The module runs in the mode it is in: in training mode with dropout, the
    recorded weights are after dropout, and ``extras["note"]`` (and ``extras["dropout"]``, the
    rate) says so; call ``module.eval()`` first for a trace without dropout.
    """
    if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int)):
        raise TypeError(f"layer must be an int, got {type(layer).__name__} {layer!r}")
    layers = _record(module, x, forward_kwargs)
    if layer is None:
        if len(layers) > 1:
            raise ValueError(
                f"{type(module).__name__} ran {len(layers)} attention layers; pick one with "
                f"trace(..., layer=i) for i in 0..{len(layers) - 1}, or take them all with "
                "trace_all(...)"
            )
        return _make_trace(module, layers[0], tokens, sample)
    if not 0 <= layer < len(layers):
        raise ValueError(
            f"layer {layer} is out of range: {type(module).__name__} ran {len(layers)} attention "
            f"layer(s), 0..{len(layers) - 1}"
        )
    result = _make_trace(module, layers[layer], tokens, sample)
    result.extras["layer"] = layer
    return result


def trace_all(
    module: nn.Module,
    x: Tensor,
    tokens: list[str] | None = None,
    *,
    sample: int = 0,
    **forward_kwargs: object,
) -> list[Trace]:
    """One `Trace` per attention layer that ``module(x, **forward_kwargs)`` runs, in the order
    they ran, each with ``extras["layer"]`` = its index; arguments as `trace`. The module runs
    once."""
    layers = _record(module, x, forward_kwargs)
    traces = []
    for index, steps in enumerate(layers):
        result = _make_trace(module, steps, tokens, sample)
        result.extras["layer"] = index
        traces.append(result)
    return traces


def _record(module: nn.Module, x: Tensor, forward_kwargs: dict) -> list[dict[str, Tensor]]:
    """Run the module under `recording()`: the steps of each attention layer it ran."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"trace expects an nn.Module, got {type(module).__name__}")
    with torch.no_grad(), recording() as layers:
        module(x, **forward_kwargs)
    layers = [steps for steps in layers if "weights" in steps]
    if not layers:
        raise ValueError(f"{type(module).__name__} recorded no attention: is it a selfattn module?")
    return layers


def _make_trace(
    module: nn.Module, recorded: dict[str, Tensor], tokens: list[str] | None, sample: int
) -> Trace:
    """One layer's records (B, H, L, ·) as a `Trace` of batch item ``sample`` (H, L, ·)."""
    batch, length = recorded["weights"].shape[0], recorded["weights"].shape[-2]
    if not -batch <= sample < batch:
        raise ValueError(f"sample {sample} is out of range: the batch has items 0..{batch - 1}")
    if tokens is None:
        tokens = [str(i) for i in range(length)]
    if len(tokens) != length:
        raise ValueError(f"got {len(tokens)} token labels for a sequence of {length} tokens")
    steps = {}
    for name, tensor in recorded.items():
        if name in PER_HEAD_STEPS:
            steps[name] = tensor[sample]  # (N, H, L, ·) -> (H, L, ·)
        else:
            steps[name] = tensor.reshape(-1, *tensor.shape[-2:])[sample]  # (..., L, d) -> (L, d)
    extras: dict[str, object] = {}
    heads = steps["weights"].shape[0]
    for name in ("keys", "values"):
        kv_heads = steps[name].shape[0] if name in steps else heads
        if kv_heads != heads:  # grouped-query attention: query head h reads kv head h // group
            steps[name] = steps[name].repeat_interleave(heads // kv_heads, dim=0)  # -> (H, S, ·)
            extras["num_kv_heads"] = kv_heads
    rate = _dropout_in_use(module)
    if rate:
        extras["dropout"] = rate
        extras["note"] = (
            f"{type(module).__name__} is in training mode: its weights are after dropout "
            f"(p = {rate:g}), so they are random; call module.eval() first for the weights "
            "without it"
        )
    return Trace(module=type(module).__name__, tokens=list(tokens), steps=steps, extras=extras)


def _dropout_in_use(module: nn.Module) -> float:
    """The largest dropout rate acting in ``module`` (0.0 in eval mode or without dropout)."""
    rates = [m.p for m in module.modules() if isinstance(m, nn.Dropout) and m.training]
    return max(rates, default=0.0)
