"""SelfAttention_v1 / v2: the chapter's numbers, batching, conversion, bad input, training."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from selfattn import SelfAttention_v1, SelfAttention_v2, trace
from selfattn.explain import example_inputs

# Printed by the chapter's code: torch.manual_seed(123); SelfAttention_v1(3, 2)(inputs)
CHAPTER_V1 = [
    [0.2996, 0.8053],
    [0.3061, 0.8210],
    [0.3058, 0.8203],
    [0.2948, 0.7939],
    [0.2927, 0.7891],
    [0.2990, 0.8040],
]
# torch.manual_seed(789); SelfAttention_v2(3, 2)(inputs)
CHAPTER_V2 = [
    [-0.0739, 0.0713],
    [-0.0748, 0.0703],
    [-0.0749, 0.0702],
    [-0.0760, 0.0685],
    [-0.0763, 0.0679],
    [-0.0754, 0.0693],
]


def reference(x, wq, wk, wv, bq=None, bk=None, bv=None):
    """softmax(Q Kᵀ / sqrt(d_out)) V in float64, written independently of selfattn."""
    x, wq, wk, wv = (t.double() for t in (x, wq, wk, wv))
    q, k, v = x @ wq, x @ wk, x @ wv
    if bq is not None:
        q, k, v = q + bq.double(), k + bk.double(), v + bv.double()
    w = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(wq.shape[1]), dim=-1)
    return w @ v


def v2_matrices(m):
    return [getattr(m, n).weight.T for n in ("W_query", "W_key", "W_value")]


def test_v1_reproduces_chapter():
    torch.manual_seed(123)
    out = SelfAttention_v1(3, 2)(example_inputs())
    assert out.shape == (6, 2)
    torch.testing.assert_close(out, torch.tensor(CHAPTER_V1), atol=5e-5, rtol=0)


def test_v2_reproduces_chapter():
    torch.manual_seed(789)
    out = SelfAttention_v2(3, 2)(example_inputs())
    torch.testing.assert_close(out, torch.tensor(CHAPTER_V2), atol=5e-5, rtol=0)


def test_v1_parameters_are_chapter_rand_in_order():
    torch.manual_seed(123)
    expected = [torch.rand(3, 2) for _ in range(3)]
    torch.manual_seed(123)
    m = SelfAttention_v1(3, 2)
    assert [n for n, _ in m.named_parameters()] == ["W_query", "W_key", "W_value"]
    for p, e in zip(m.parameters(), expected, strict=True):
        assert isinstance(p, torch.nn.Parameter)
        torch.testing.assert_close(p.data, e, rtol=0, atol=0)


def test_v2_layers_are_linear_in_order():
    m = SelfAttention_v2(3, 2, qkv_bias=True)
    names = [n for n, _ in m.named_parameters()]
    assert names == [f"W_{r}.{p}" for r in ("query", "key", "value") for p in ("weight", "bias")]
    assert all(isinstance(getattr(m, n), torch.nn.Linear) for n in ("W_query", "W_key", "W_value"))


@pytest.mark.parametrize("cls", [SelfAttention_v1, SelfAttention_v2])
def test_matches_float64_reference(cls):
    torch.manual_seed(0)
    m = cls(5, 4)
    x = torch.randn(9, 5)
    mats = [m.W_query, m.W_key, m.W_value] if cls is SelfAttention_v1 else v2_matrices(m)
    torch.testing.assert_close(m(x).double(), reference(x, *mats), atol=1e-6, rtol=1e-5)


def test_v2_bias_matches_reference():
    torch.manual_seed(1)
    m = SelfAttention_v2(4, 3, qkv_bias=True)
    x = torch.randn(7, 4)
    biases = [getattr(m, n).bias for n in ("W_query", "W_key", "W_value")]
    expected = reference(x, *v2_matrices(m), *biases)
    torch.testing.assert_close(m(x).double(), expected, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cls", [SelfAttention_v1, SelfAttention_v2])
def test_batched_equals_per_sample(cls):
    torch.manual_seed(2)
    m = cls(3, 2)
    x = torch.randn(2, 3, 5, 3)
    out = m(x)
    assert out.shape == (2, 3, 5, 2)
    for i in range(2):
        for j in range(3):
            torch.testing.assert_close(out[i, j], m(x[i, j]), atol=1e-6, rtol=1e-6)


@settings(max_examples=25, deadline=None)
@given(
    d_in=st.integers(1, 6),
    d_out=st.integers(1, 6),
    length=st.integers(1, 9),
    seed=st.integers(0, 2**16),
)
def test_rows_are_convex_combinations_of_values(d_in, d_out, length, seed):
    torch.manual_seed(seed)
    m = SelfAttention_v1(d_in, d_out)
    x = torch.randn(length, d_in)
    tr = trace(m, x)
    w = tr.steps["weights"][0]
    torch.testing.assert_close(w.sum(-1), torch.ones(length), atol=1e-5, rtol=0)
    assert (w >= 0).all()
    values = x @ m.W_value.detach()
    assert (tr.steps["output"] <= values.max(0).values + 1e-5).all()
    assert (tr.steps["output"] >= values.min(0).values - 1e-5).all()


def test_weights_are_visible_through_trace():
    torch.manual_seed(123)
    m = SelfAttention_v1(3, 2)
    x = example_inputs()
    tr = trace(m, x)
    q, k = x @ m.W_query.detach(), x @ m.W_key.detach()
    expected = torch.softmax(q @ k.T / math.sqrt(2), dim=-1)
    torch.testing.assert_close(tr.steps["weights"][0], expected)
    torch.testing.assert_close(tr.steps["output"], m(x).detach())


def test_conversion_both_ways_gives_identical_outputs():
    torch.manual_seed(3)
    v1 = SelfAttention_v1(4, 3)
    x = torch.randn(6, 4)
    v2 = SelfAttention_v2.from_v1(v1)
    assert v2.W_query.bias is None
    torch.testing.assert_close(v2.W_key.weight, v1.W_key.detach().T, rtol=0, atol=0)
    torch.testing.assert_close(v2(x), v1(x), atol=1e-6, rtol=1e-6)
    back = SelfAttention_v1.from_v2(v2)
    torch.testing.assert_close(back(x), v1(x), atol=1e-6, rtol=1e-6)


def test_conversion_does_not_touch_global_rng():
    m = SelfAttention_v2(3, 2)
    state = torch.get_rng_state()
    SelfAttention_v1.from_v2(m)
    assert torch.equal(state, torch.get_rng_state())


def test_converting_biased_v2_is_refused():
    with pytest.raises(ValueError, match="bias"):
        SelfAttention_v1.from_v2(SelfAttention_v2(3, 2, qkv_bias=True))


def test_conversion_rejects_wrong_type():
    with pytest.raises(TypeError, match="SelfAttention_v2"):
        SelfAttention_v1.from_v2(SelfAttention_v1(3, 2))
    with pytest.raises(TypeError, match="SelfAttention_v1"):
        SelfAttention_v2.from_v1(SelfAttention_v2(3, 2))


@pytest.mark.parametrize("cls", [SelfAttention_v1, SelfAttention_v2])
def test_bad_input_shapes(cls):
    m = cls(3, 2)
    with pytest.raises(ValueError, match=r"\(\.\.\., seq_len, 3\).*\(6, 4\)"):
        m(torch.randn(6, 4))
    with pytest.raises(ValueError, match=r"got \(3,\)"):
        m(torch.randn(3))


@pytest.mark.parametrize("cls", [SelfAttention_v1, SelfAttention_v2])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool])
def test_non_float_input_is_type_error(cls, dtype):
    with pytest.raises(TypeError, match="floating-point"):
        cls(3, 2)(torch.ones(6, 3, dtype=dtype))


@pytest.mark.parametrize("cls", [SelfAttention_v1, SelfAttention_v2])
def test_non_tensor_input_is_type_error(cls):
    with pytest.raises(TypeError, match="torch.Tensor"):
        cls(3, 2)([[1.0, 2.0, 3.0]])


@pytest.mark.parametrize("cls", [SelfAttention_v1, SelfAttention_v2])
@pytest.mark.parametrize(
    ("d_in", "d_out", "error"),
    [
        (0, 2, ValueError),
        (3, -1, ValueError),
        (2.5, 2, TypeError),
        (3, "2", TypeError),
        (True, 2, TypeError),
    ],
)
def test_bad_dimensions_fail_at_construction(cls, d_in, d_out, error):
    with pytest.raises(error, match="positive int"):
        cls(d_in, d_out)


@pytest.mark.parametrize("cls", [SelfAttention_v1, SelfAttention_v2])
def test_empty_sequence_gives_empty_result(cls):
    out = cls(3, 2)(torch.empty(0, 3))
    assert out.shape == (0, 2)
    assert cls(3, 2)(torch.empty(4, 0, 3)).shape == (4, 0, 2)


@pytest.mark.parametrize("cls", [SelfAttention_v1, SelfAttention_v2])
def test_one_optimizer_step_changes_all_weights_and_lowers_loss(cls):
    torch.manual_seed(4)
    m = cls(3, 2)
    x = torch.randn(2, 6, 3)
    target = torch.randn(2, 6, 2)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    opt = torch.optim.SGD(m.parameters(), lr=0.1)

    def loss_fn():
        return torch.nn.functional.mse_loss(m(x), target)

    loss0 = loss_fn()
    opt.zero_grad()
    loss0.backward()
    opt.step()
    for name, p in m.named_parameters():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"
    assert loss_fn().item() < loss0.item()


@pytest.mark.parametrize("backend", ["naive", "sdpa", "tiled"])
def test_every_engine_gives_chapter_numbers(backend):
    torch.manual_seed(123)
    out = SelfAttention_v1(3, 2, backend=backend)(example_inputs())
    torch.testing.assert_close(out, torch.tensor(CHAPTER_V1), atol=5e-5, rtol=0)
