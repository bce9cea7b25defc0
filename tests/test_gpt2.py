"""Real GPT-2 in the chapter's GPT (issue 19): `GPT.from_hf` / `GPT.to_hf`, the folder's tokenizer,
`selfattn generate` / `selfattn explain` on a GPT-2 folder, and every head's induction scores.

Nothing is downloaded: a small random GPT-2 (2 layers, 4 heads, width 32) is built with
transformers and saved with ``save_pretrained``, beside a byte-level BPE tokenizer.json trained
with `tokenizers` on the start of the package's tiny Shakespeare.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib import resources
from pathlib import Path

import pytest
import torch
from extras import need_module
from tolerances import HF_GPT2_F32

os.environ["HF_HUB_OFFLINE"] = "1"  # no download, ever
need_module("transformers")
need_module("tokenizers")
need_module("safetensors")

import transformers  # noqa: E402

from selfattn.cli import main  # noqa: E402
from selfattn.models import gpt2  # noqa: E402
from selfattn.models.gpt import GPT, GPTConfig  # noqa: E402
from selfattn.train.data import BPETokenizer  # noqa: E402
from selfattn.train.head_scores import checkpoint_head_scores, head_scores, probe  # noqa: E402
from selfattn.train.induction import induction_scores, previous_token_scores  # noqa: E402

LAYERS, HEADS, WIDTH, CONTEXT = 2, 4, 32, 64
TEXT = "ROMEO: But soft, what light through yonder window breaks?"


def assert_logits(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, **HF_GPT2_F32)


@pytest.fixture(scope="module")
def tokenizer():
    """A byte-level BPE of 300 tokens, trained on the first 60,000 characters of tiny
    Shakespeare (GPT-2's scheme: `selfattn train --tokenizer bpe`'s)."""
    text = resources.files("selfattn.data").joinpath("tinyshakespeare.txt").read_text("utf-8")
    return BPETokenizer.train(text[:60_000], 300).tokenizer


def hf_model(vocab_size: int, **extra) -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=vocab_size, n_positions=CONTEXT, n_embd=WIDTH, n_layer=LAYERS, n_head=HEADS,
        initializer_range=0.2, bos_token_id=None, eos_token_id=None, **extra,
    )  # fmt: skip
    config._attn_implementation = "eager"  # output_attentions needs the weights
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tokenizer):
    """(a saved GPT-2 folder with its tokenizer.json, the model it was saved from)."""
    model = hf_model(tokenizer.get_vocab_size())
    out = tmp_path_factory.mktemp("gpt2") / "tiny-gpt2"
    model.save_pretrained(out)
    tokenizer.save(str(out / "tokenizer.json"))
    return out, model


def copy(folder: Path, tmp_path: Path, *drop: str) -> Path:
    out = tmp_path / folder.name
    shutil.copytree(folder, out)
    for name in drop:
        (out / name).unlink()
    return out


def ids(tokenizer, text: str = TEXT) -> torch.Tensor:
    return torch.tensor([tokenizer.encode(text).ids])  # (1, T)


# --- loading: the chapter-5 mapping ------------------------------------------------------------


def test_from_hf_gives_transformers_logits_from_a_folder_and_a_model(folder, tokenizer):
    path, model = folder
    x = torch.cat([ids(tokenizer)[:, :10], torch.randint(model.config.vocab_size, (1, 10))])
    with torch.no_grad():
        expected = model(x).logits
        for source in (path, str(path), model):
            ours = GPT.from_hf(source)
            assert not ours.training and ours.config.tie_embeddings and ours.config.qkv_bias
            assert ours.config.context_length == CONTEXT and ours.config.n_heads == HEADS
            assert_logits(ours(x), expected)


def test_pytorch_model_bin_is_read_with_weights_only(folder, tokenizer, tmp_path):
    path, model = folder
    out = copy(path, tmp_path, "model.safetensors")
    # OpenAI's converted files: no "transformer." prefix, the causal-mask buffers kept
    state = {k.removeprefix("transformer."): v for k, v in model.state_dict().items()}
    state["h.0.attn.bias"] = torch.ones(1, 1, CONTEXT, CONTEXT).tril()
    torch.save(state, out / "pytorch_model.bin")
    x = ids(tokenizer)
    with torch.no_grad():
        assert_logits(GPT.from_hf(out)(x), model(x).logits)
    torch.save({"wte.weight": torch.zeros(1), "code": Path("x")}, out / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"pytorch_model.bin as tensors \(weights_only=True\)"):
        GPT.from_hf(out)


def test_greedy_generate_gives_transformers_tokens(folder, tokenizer):
    path, model = folder
    prompt = ids(tokenizer, "Every effort moves you")
    ours = GPT.from_hf(path).generate(prompt, 30, temperature=0)
    theirs = model.generate(prompt, max_new_tokens=30, do_sample=False, pad_token_id=0)
    assert ours.tolist() == theirs.tolist()


def test_a_config_that_is_not_gpt2_shaped_says_what_differs(folder, tmp_path, capsys):
    path, _ = folder
    out = copy(path, tmp_path)
    config = json.loads((out / "config.json").read_text())
    config.update(activation_function="relu", layer_norm_epsilon=1e-6, n_inner=100)
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError) as err:
        GPT.from_hf(out)
    for words in ("not GPT-2 shaped", "activation_function 'relu'", "layer_norm_epsilon 1e-06",
                  "n_inner 100"):  # fmt: skip
        assert words in str(err.value)
    assert main(["generate", "--checkpoint", str(out), "--max-new-tokens", "2"]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("selfattn generate: error: ")
    assert "activation_function 'relu'" in lines[0]


def test_tensors_that_do_not_fit_the_config_are_named(folder, tmp_path, capsys):
    path, _ = folder
    out = copy(path, tmp_path)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "n_layer": 3, "n_positions": 32}))
    for argv in (["generate", "--checkpoint", str(out)],
                 ["explain", "--checkpoint", str(out), "--text", "ab"],
                 ["explain", "--checkpoint", str(out), "--induction-scores"]):  # fmt: skip
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "model.safetensors does not fit" in err, err
        assert "wpe.weight saved (64, 32), expected (32, 32)" in err
        assert "h.2.ln_1.weight missing" in err and "more" in err


def test_a_folder_that_is_no_gpt2_or_lacks_a_tokenizer_is_one_line(folder, tmp_path, capsys):
    path, _ = folder
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert"}))
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "config.json").write_text(json.dumps({"hidden_size": 3}))
    cases = {
        bert: "model_type 'bert', not a GPT-2 checkpoint",
        neither: "neither a selfattn run",
        copy(path, tmp_path, "tokenizer.json"): "has no tokenizer: tokenizer.json, or vocab.json",
        copy(path, tmp_path / "w", "model.safetensors"): "holds no weights (model.safetensors",
    }
    for where, words in cases.items():
        for argv in (["generate", "--checkpoint", str(where)],
                     ["explain", "--checkpoint", str(where), "--induction-scores"]):  # fmt: skip
            assert main(argv) == 2
            err = capsys.readouterr().err
            assert err.count("\n") == 1 and words in err, err


def test_vocab_and_merges_read_as_tokenizer_json(folder, tokenizer, tmp_path):
    path, _ = folder
    out = copy(path, tmp_path, "tokenizer.json")
    tokenizer.model.save(str(out))  # vocab.json + merges.txt, GPT-2's older layout
    assert {"vocab.json", "merges.txt"} <= {p.name for p in out.iterdir()}
    read = gpt2.load_tokenizer(out)
    assert read.encode(TEXT).ids == tokenizer.encode(TEXT).ids
    assert read.decode(read.encode(TEXT).ids) == TEXT


# --- export -------------------------------------------------------------------------------------


def test_to_hf_writes_a_folder_transformers_loads_with_the_same_logits(folder, tokenizer, tmp_path):
    path, model = folder
    out = GPT.from_hf(path).to_hf(tmp_path / "out", BPETokenizer(tokenizer))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary folder left
    back = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    x = ids(tokenizer)
    with torch.no_grad():
        assert_logits(back(x).logits, model(x).logits)
    assert gpt2.load_tokenizer(out).encode(TEXT).ids == tokenizer.encode(TEXT).ids


@pytest.mark.parametrize(
    "extra",
    [
        dict(qkv_bias=False, n_kv_heads=2, tie_embeddings=False),  # `selfattn train`'s defaults
        dict(qkv_bias=True, n_kv_heads=1, attn_only=True, tie_embeddings=True),
    ],
)
def test_a_selfattn_model_goes_out_as_an_equivalent_gpt2(extra, tmp_path):
    torch.manual_seed(1)
    cfg = GPTConfig(vocab_size=50, context_length=16, emb_dim=WIDTH, n_heads=HEADS, n_layers=2,
                    drop_rate=0.0, **extra)  # fmt: skip
    model = GPT(cfg).eval()
    for p in model.parameters():  # biases away from zero: a dropped one would show
        torch.nn.init.normal_(p, std=0.3)
    out = model.to_hf(tmp_path / "exported")
    back = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert back.config.tie_word_embeddings is cfg.tie_embeddings
    x = torch.randint(50, (2, 16))
    with torch.no_grad():
        assert_logits(back(x).logits, model(x))
        assert_logits(GPT.from_hf(out)(x), model(x))


def test_to_hf_refuses_what_it_cannot_write_and_writes_nothing(tmp_path):
    model = GPT(GPTConfig(vocab_size=20, context_length=8, emb_dim=8, n_heads=2, n_layers=1))
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="is not empty"):
        model.to_hf(full)
    assert [p.name for p in full.iterdir()] == ["keep.txt"]
    model.to_hf(full, overwrite=True)
    assert sorted(p.name for p in full.iterdir()) == ["config.json", "model.safetensors"]
    windowed = GPT(GPTConfig(vocab_size=20, context_length=8, emb_dim=8, n_heads=2, n_layers=1,
                             window=3))  # fmt: skip
    with pytest.raises(ValueError, match="sliding window"):
        windowed.to_hf(tmp_path / "w")
    from selfattn.train.data import CharTokenizer

    with pytest.raises(TypeError, match="got CharTokenizer"):
        model.to_hf(tmp_path / "chars", CharTokenizer("ab"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


# --- the CLI on a GPT-2 folder ------------------------------------------------------------------


def test_generate_on_a_gpt2_folder_is_transformers_greedy_text(folder, tokenizer, capsys):
    path, model = folder
    prompt = "ROMEO:"
    argv = ["generate", "--checkpoint", str(path), "--prompt", prompt, "--max-new-tokens", "12"]
    assert main([*argv, "--temperature", "0"]) == 0
    printed = capsys.readouterr().out
    theirs = model.generate(ids(tokenizer, prompt), max_new_tokens=12, do_sample=False,
                            pad_token_id=0)  # fmt: skip
    new = theirs[0, ids(tokenizer, prompt).shape[1] :].tolist()
    assert printed == prompt + tokenizer.decode(new) + "\n"
    sampled = [*argv, "--temperature", "0.8", "--top-k", "20", "--seed", "3"]
    assert main(sampled) == 0
    first = capsys.readouterr().out
    assert main(sampled) == 0
    assert capsys.readouterr().out == first and first.startswith(prompt)


def test_explain_weights_are_transformers_output_attentions(folder, tokenizer, capsys, tmp_path):
    path, model = folder
    x = ids(tokenizer)
    with torch.no_grad():
        attentions = model(x, output_attentions=True).attentions  # per layer (1, H, T, T)
    argv = ["explain", "--checkpoint", str(path), "--text", TEXT]
    for layer, head in ((0, 0), (1, 3)):
        assert main([*argv, "--layer", str(layer), "--head", str(head), "--json"]) == 0
        shown = json.loads(capsys.readouterr().out)
        weights = next(s for s in shown["steps"] if s["name"] == "weights")
        torch.testing.assert_close(
            torch.tensor(weights["values"]), attentions[layer][0, head], **HF_GPT2_F32
        )
        assert len(shown["tokens"]) == x.shape[1]
        assert "a GPT-2 checkpoint" in shown["description"]
    assert main([*argv, "--layer", "1"]) == 0  # the terminal walkthrough
    assert "weights" in capsys.readouterr().out
    html = tmp_path / "gpt2.html"
    assert main([*argv, "--html", str(html)]) == 0 and html.stat().st_size > 0
    capsys.readouterr()
    need_module("matplotlib")
    png = tmp_path / "gpt2.png"
    assert main([*argv, "--layer", "1", "--png", str(png)]) == 0 and png.stat().st_size > 0


# --- every head's induction and previous-token scores ------------------------------------------


def test_the_probe_is_random_tokens_repeated_after_bos():
    x = probe(300, 10, 3, seed=5, bos=7)
    assert x.shape == (3, 21) and (x[:, 0] == 7).all()
    assert torch.equal(x[:, 1:11], x[:, 11:])
    assert torch.equal(x, probe(300, 10, 3, seed=5, bos=7))
    assert not torch.equal(x, probe(300, 10, 3, seed=6, bos=7))


def test_induction_scores_of_a_gpt2_folder_are_transformers_attentions_scored(folder, capsys):
    path, model = folder
    assert main(["explain", "--checkpoint", str(path), "--induction-scores", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(r["layer"], r["head"]) for r in data["heads"]] == [
        (layer, head) for layer in range(LAYERS) for head in range(HEADS)
    ]
    probe_info = data["probe"]
    assert probe_info["tokens_per_copy"] == CONTEXT // 2 and probe_info["seed"] == 0
    vocab = model.config.vocab_size
    x = probe(vocab, probe_info["tokens_per_copy"], probe_info["sequences"], 0)
    with torch.no_grad():
        attentions = model(x, output_attentions=True).attentions
    for r in data["heads"]:
        w = attentions[r["layer"]]  # (S, H, T, T)
        assert r["induction"] == pytest.approx(induction_scores(w, x)[r["head"]].item(), abs=1e-5)
        expected = previous_token_scores(w)[r["head"]].item()
        assert r["previous_token"] == pytest.approx(expected, abs=1e-5)
    assert main(["explain", "--checkpoint", str(path), "--induction-scores", "--seed", "1"]) == 0
    table = capsys.readouterr().out
    assert "induction" in table and "previous-token" in table and "seed 1" in table
    assert sum(line.split()[:2] == ["1", "3"] for line in table.splitlines()) == 1


def test_induction_scores_options_that_do_not_apply_are_refused(folder, capsys):
    path, _ = folder
    base = ["explain", "--induction-scores"]
    cases = [
        ([], "--induction-scores applies to --checkpoint DIR only"),
        (["--checkpoint", str(path), "--text", "ab"], "--text does not apply to --induction"),
        (["--checkpoint", str(path), "--layer", "1"], "--layer and --head do not apply"),
        (["--checkpoint", str(path), "--html", "x.html"], "--png and --html do not apply"),
    ]
    for extra, words in cases:
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err


def test_induction_scores_of_a_selfattn_run_and_its_export(tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--preset", "induction", "--quiet", "--threads", "1", "--iters", "2",
            "--eval-every", "2", "--eval-iters", "1", "--batch-size", "4", "--block-size", "32",
            "--emb-dim", "32", "--out", str(run)]  # fmt: skip
    assert main(argv) == 0
    capsys.readouterr()
    assert main(["explain", "--checkpoint", str(run), "--induction-scores", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert "selfattn train" in data["model"] and data["probe"]["bos_token_id"] is None
    from selfattn.train.checkpoint import load_checkpoint

    loaded = load_checkpoint(run)
    x = probe(loaded.tokenizer.vocab_size, 16, data["probe"]["sequences"], 0)
    assert data["heads"] == head_scores(loaded.model, x)
    assert data == checkpoint_head_scores(str(run))
    # the attention-only run, no qkv bias, goes out as a GPT-2 with the same logits
    out = loaded.model.to_hf(tmp_path / "exported")
    back = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    with torch.no_grad():
        assert_logits(back(x).logits, loaded.model(x))


def test_a_tokenizer_larger_than_the_model_and_a_wrong_source_are_refused(folder, tmp_path):
    path, _ = folder
    out = copy(path, tmp_path)
    config = json.loads((out / "config.json").read_text())
    small = {**config, "vocab_size": 100}
    (out / "config.json").write_text(json.dumps(small))
    from safetensors.torch import load_file, save_file

    tensors = load_file(out / "model.safetensors")
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][:100].clone()
    save_file(tensors, out / "model.safetensors")
    GPT.from_hf(out)  # the weights fit their config ...
    with pytest.raises(ValueError, match="more than the model's vocab_size of 100"):
        from selfattn.train.checkpoint import load_checkpoint

        load_checkpoint(out)  # ... but the tokenizer's ids would not
    with pytest.raises(TypeError, match="a folder .* or a GPT2LMHeadModel, got int"):
        GPT.from_hf(3)
    with pytest.raises(TypeError, match="from_hf expects a GPT2LMHeadModel, got Linear"):
        GPT.from_hf(torch.nn.Linear(2, 2))
