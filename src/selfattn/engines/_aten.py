"""PyTorch's private fused attention ops, the ones that return the log-sum-exp, in one place.

The "fused" engine (`selfattn.engines.fused`) and ring attention call these ATen ops directly:
``torch.nn.functional.scaled_dot_product_attention`` hides the log-sum-exp they compute. They
are private (a leading underscore): their signatures may change with any torch release. This
module records the schemas they had in the torch release selfattn was written against
(`RECORDED_TORCH`); `problems()` compares them with the running torch, and the engine refuses
to run (its ``unsupported`` gives the reason) when an op it needs is missing or has changed.
tests/test_fused.py fails loudly on such a change, so an upgrade cannot slip one by.

    CPU   _scaled_dot_product_flash_attention_for_cpu (+ _backward): attn_mask, is_causal
          (top-left), scale, grouped-query heads; lse (B, H, L) in float32 (float64 for
          float64 inputs); q, k, v of one head dim; no dropout.
    CUDA  _scaled_dot_product_flash_attention (+ _backward): fp16/bf16, no mask, GQA heads;
          _scaled_dot_product_efficient_attention (+ _backward): an attention bias (and its
          gradient), fp32/fp16/bf16, lse padded to a multiple of 32 rows.
"""

from __future__ import annotations

import torch

# The torch release whose schemas are recorded below (checked on 2.13.0+cpu).
RECORDED_TORCH = "2.13"

SCHEMAS: dict[str, str] = {
    "_scaled_dot_product_flash_attention_for_cpu": (
        "aten::_scaled_dot_product_flash_attention_for_cpu(Tensor query, Tensor key, "
        "Tensor value, float dropout_p=0., bool is_causal=False, *, Tensor? attn_mask=None, "
        "float? scale=None) -> (Tensor output, Tensor logsumexp)"
    ),
    "_scaled_dot_product_flash_attention_for_cpu_backward": (
        "aten::_scaled_dot_product_flash_attention_for_cpu_backward(Tensor grad_out, "
        "Tensor query, Tensor key, Tensor value, Tensor out, Tensor logsumexp, float dropout_p, "
        "bool is_causal, *, Tensor? attn_mask=None, float? scale=None) -> (Tensor grad_query, "
        "Tensor grad_key, Tensor grad_value)"
    ),
    "_scaled_dot_product_flash_attention": (
        "aten::_scaled_dot_product_flash_attention(Tensor query, Tensor key, Tensor value, "
        "float dropout_p=0., bool is_causal=False, bool return_debug_mask=False, *, "
        "float? scale=None) -> (Tensor output, Tensor logsumexp, Tensor cum_seq_q, "
        "Tensor cum_seq_k, SymInt max_q, SymInt max_k, Tensor rng_state, Tensor unused, "
        "Tensor debug_attn_mask)"
    ),
    "_scaled_dot_product_flash_attention_backward": (
        "aten::_scaled_dot_product_flash_attention_backward(Tensor grad_out, Tensor query, "
        "Tensor key, Tensor value, Tensor out, Tensor logsumexp, Tensor cum_seq_q, "
        "Tensor cum_seq_k, SymInt max_q, SymInt max_k, float dropout_p, bool is_causal, "
        "Tensor philox_seed, Tensor philox_offset, *, float? scale=None) -> (Tensor grad_query, "
        "Tensor grad_key, Tensor grad_value)"
    ),
    "_scaled_dot_product_efficient_attention": (
        "aten::_scaled_dot_product_efficient_attention(Tensor query, Tensor key, Tensor value, "
        "Tensor? attn_bias, bool compute_log_sumexp, float dropout_p=0., bool is_causal=False, "
        "*, float? scale=None) -> (Tensor output, Tensor log_sumexp, Tensor philox_seed, "
        "Tensor philox_offset)"
    ),
    "_scaled_dot_product_efficient_attention_backward": (
        "aten::_scaled_dot_product_efficient_attention_backward(Tensor grad_out_, Tensor query, "
        "Tensor key, Tensor value, Tensor attn_bias, Tensor out, Tensor logsumexp, "
        "Tensor philox_seed, Tensor philox_offset, float dropout_p, bool[4] grad_input_mask, "
        "bool is_causal=False, *, float? scale=None) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
}

# Which ops each device's kernels need.
DEVICE_OPS: dict[str, tuple[str, ...]] = {
    "cpu": (
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_flash_attention_for_cpu_backward",
    ),
    "cuda": (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_flash_attention_backward",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_efficient_attention_backward",
    ),
}


def live_schema(name: str) -> str | None:
    """The running torch's schema of ``aten::<name>.default``, or None if it has no such op."""
    packet = getattr(torch.ops.aten, name, None)
    overload = getattr(packet, "default", None) if packet is not None else None
    return None if overload is None else str(overload._schema)


def problems(device_type: str) -> list[str]:
    """What is wrong with the ops ``device_type``'s kernels need: [] when every one is there
    with the recorded schema. Computed once per device type (the ops do not change at run time)."""
    if device_type not in _PROBLEMS:
        found = []
        for name in DEVICE_OPS.get(device_type, ()):
            schema = live_schema(name)
            if schema is None:
                found.append(f"torch {torch.__version__} has no aten::{name}")
            elif schema != SCHEMAS[name]:
                found.append(
                    f"aten::{name} changed in torch {torch.__version__} (selfattn records "
                    f"torch {RECORDED_TORCH}'s): {schema}"
                )
        _PROBLEMS[device_type] = found
    return _PROBLEMS[device_type]


_PROBLEMS: dict[str, list[str]] = {}


def op(name: str):
    """``torch.ops.aten.<name>.default``, after `problems` found its schema as recorded."""
    return getattr(torch.ops.aten, name).default
