"""`selfattn.trace`: grouped-query heads, models with several attention layers, the wrapper.

Every trace is checked against a float64 reference computed here from the module's own weights.
"""

import pytest
import torch
from tolerances import assert_close
from torch import nn

from selfattn import CausalAttention, MultiHeadAttention, MultiHeadAttentionWrapper, attention
from selfattn.recording import recording
from selfattn.trace import trace, trace_all


def reference_qkv(mha: MultiHeadAttention, x: torch.Tensor):
    """q (H, L, D), k and v (Hkv, L, D) of one sample x (L, d_in), in float64."""
    x = x.double()
    heads = (mha.num_heads, mha.num_kv_heads, mha.num_kv_heads)
    out = []
    for linear, h in zip((mha.W_query, mha.W_key, mha.W_value), heads, strict=True):
        t = x @ linear.weight.double().T  # (L, d_in) -> (L, h * D)
        if linear.bias is not None:
            t = t + linear.bias.double()
        out.append(t.view(x.shape[0], h, -1).transpose(0, 1))  # (h, L, D)
    return out


@pytest.mark.parametrize("num_kv_heads", [1, 2, 4])
def test_gqa_trace_pairs_each_query_head_with_its_kv_head(num_kv_heads):
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 16, 10, 0.0, 4, num_kv_heads=num_kv_heads, qkv_bias=True).eval()
    x = torch.randn(2, 7, 8)
    tr = trace(mha, x, sample=1)
    group = 4 // num_kv_heads
    q, k, v = reference_qkv(mha, x[1])
    assert tr.steps["keys"].shape == tr.steps["values"].shape == (4, 7, 4)  # (H, S, D)
    assert tr.num_heads == 4
    assert tr.extras.get("num_kv_heads", 4) == num_kv_heads
    for h in range(4):
        assert_close(tr.head("queries", h), q[h], torch.float32)
        assert_close(tr.head("keys", h), k[h // group], torch.float32)
        assert_close(tr.head("values", h), v[h // group], torch.float32)
        scores = q[h] @ k[h // group].T  # (L, D) x (D, L) -> (L, L)
        assert_close(tr.head("scores", h), scores, torch.float32)
        # and within the trace itself: scores = queries @ keysᵀ, context = weights @ values
        queries, keys = tr.head("queries", h).double(), tr.head("keys", h).double()
        assert_close(tr.head("scores", h), queries @ keys.T, torch.float32)
        context = tr.head("weights", h).double() @ tr.head("values", h).double()
        assert_close(tr.head("context", h), context, torch.float32)
    one = tr.select_head(3)
    assert_close(one.head("keys", 0), k[3 // group], torch.float32)


def test_gqa_trace_with_a_kv_cache_has_every_cached_key():
    torch.manual_seed(1)
    mha = MultiHeadAttention(8, 16, 10, 0.0, 4, num_kv_heads=2).eval()
    x = torch.randn(1, 6, 8)
    with torch.no_grad():
        mha(x[:, :5], use_cache=True)
    tr = trace(mha, x[:, 5:], use_cache=True)
    _, k, _ = reference_qkv(mha, x[0])
    assert tr.steps["keys"].shape == (4, 6, 4)  # (H, S = 5 cached + 1 new, D)
    assert tr.steps["weights"].shape == (4, 1, 6)  # (H, L, S)
    for h in range(4):
        assert_close(tr.head("keys", h), k[h // 2], torch.float32)


def test_several_layers_are_kept_apart():
    torch.manual_seed(2)
    model = nn.Sequential(
        MultiHeadAttention(8, 8, 10, 0.0, 2), MultiHeadAttention(8, 8, 10, 0.0, 4, causal=False)
    ).eval()
    x = torch.randn(6, 8)
    with pytest.raises(ValueError, match=r"ran 2 attention layers.*layer=i.*0\.\.1.*trace_all"):
        trace(model, x)
    traces = trace_all(model, x, list("abcdef"))
    assert [tr.extras["layer"] for tr in traces] == [0, 1]
    assert [tr.num_heads for tr in traces] == [2, 4]
    assert traces[0].masked and not traces[1].masked  # causal, then bidirectional
    alone = [trace(model[0], x), trace(model[1], traces[0].steps["output"])]
    for tr, expected in zip(traces, alone, strict=True):
        assert tr.tokens == list("abcdef")
        assert tr.steps.keys() == expected.steps.keys()
        for name, tensor in expected.steps.items():
            torch.testing.assert_close(tr.steps[name], tensor, atol=0, rtol=0, msg=name)
    chosen = trace(model, x, layer=1)
    assert chosen.extras["layer"] == 1
    torch.testing.assert_close(chosen.steps["weights"], traces[1].steps["weights"])
    with pytest.raises(ValueError, match=r"layer 2 is out of range.*0\.\.1"):
        trace(model, x, layer=2)
    with pytest.raises(TypeError, match="layer must be an int"):
        trace(model, x, layer="1")


def test_wrapper_heads_are_one_layer_even_when_stacked():
    torch.manual_seed(3)
    wrapper = MultiHeadAttentionWrapper(4, 3, 8, 0.0, 2).eval()
    x = torch.randn(5, 4)
    tr = trace(wrapper, x)
    assert tr.num_heads == 2 and "layer" not in tr.extras
    for h, head in enumerate(wrapper.heads):
        alone = trace(head, x)
        for name in ("keys", "scores", "weights", "context"):
            torch.testing.assert_close(tr.head(name, h), alone.head(name, 0), atol=0, rtol=0)
    torch.testing.assert_close(tr.steps["output"], wrapper(x).detach())

    stacked = nn.Sequential(
        MultiHeadAttentionWrapper(4, 2, 8, 0.0, 2), CausalAttention(4, 4, 8, 0.0)
    ).eval()
    traces = trace_all(stacked, x)
    assert [tr.num_heads for tr in traces] == [2, 1]
    torch.testing.assert_close(traces[0].steps["output"], stacked[0](x).detach())
    torch.testing.assert_close(traces[1].steps["inputs"], traces[0].steps["output"], atol=0, rtol=0)


def test_recording_groups_records_by_layer():
    torch.manual_seed(4)
    q = torch.randn(1, 2, 3, 4)
    with recording() as layers:
        attention(q, q, q)  # a bare call: a layer of its own
        MultiHeadAttention(4, 4, 8, 0.0, 2)(torch.randn(3, 4))
    assert len(layers) == 2
    assert "inputs" not in layers[0] and layers[0]["weights"].shape == (1, 2, 3, 3)
    assert layers[1]["inputs"].shape == (3, 4) and layers[1]["weights"].shape == (1, 2, 3, 3)


def test_trace_argument_errors():
    mha = MultiHeadAttention(4, 4, 8, 0.0, 2)
    with pytest.raises(TypeError, match="nn.Module"):
        trace(lambda x: x, torch.randn(3, 4))
    with pytest.raises(ValueError, match="recorded no attention"):
        trace(nn.Linear(4, 4), torch.randn(3, 4))
    with pytest.raises(ValueError, match="2 token labels for a sequence of 3"):
        trace(mha, torch.randn(3, 4), ["a", "b"])
    with pytest.raises(ValueError, match=r"sample 2 is out of range.*0\.\.1"):
        trace(mha, torch.randn(2, 3, 4), sample=2)
