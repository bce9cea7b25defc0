"""`--preset induction`: the data, the head scores on hand-built attention, and a short run."""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from selfattn.cli import main
from selfattn.models.gpt import GPT, GPTConfig
from selfattn.train.induction import (
    SEGMENT_LENGTHS,
    InductionBatches,
    induction_keys,
    induction_scores,
    induction_tokenizer,
    previous_token_scores,
    repeat_accuracy,
    repeated_segments,
)

SHORT = ["train", "--preset", "induction", "--quiet", "--threads", "1", "--iters", "40"]


def metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# --- the data ------------------------------------------------------------------------------------


def test_sequences_are_one_segment_of_distinct_tokens_repeated():
    seq = repeated_segments(200, 97, 64, torch.Generator().manual_seed(0))  # (200, 97)
    assert seq.shape == (200, 97) and seq.dtype == torch.long
    assert seq.min() >= 0 and seq.max() < 64
    lengths = set()
    for row in seq.tolist():
        period = next(p for p in range(1, 98) if row[p:] == row[:-p])
        assert len(set(row[:period])) == period  # distinct inside the segment
        lengths.add(period)
    assert min(lengths) == SEGMENT_LENGTHS[0] and max(lengths) == SEGMENT_LENGTHS[1]


def test_batches_are_seeded_shifted_and_split_across_ranks():
    whole = InductionBatches(64, 8, 24, seed=3)
    x, y = whole.next_train()
    assert x.shape == y.shape == (8, 24)
    assert torch.equal(x[:, 1:], y[:, :-1])
    halves = [InductionBatches(64, 8, 24, seed=3, rank=r, world_size=2) for r in (0, 1)]
    assert torch.equal(torch.cat([h.next_train()[0] for h in halves]), x)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    train, val = whole.eval_batch("train", g1), whole.eval_batch("val", g2)
    assert not torch.equal(train[0], val[0])  # the splits never share sequences
    state = whole.state()
    after = whole.next_train()
    whole.load_state(state)
    assert torch.equal(whole.next_train()[0], after[0])


def test_the_tokenizer_is_characters_and_the_vocabulary_is_checked():
    tok = induction_tokenizer(40)
    assert tok.vocab_size == 40 and tok.decode(tok.encode("abc")) == "abc"
    with pytest.raises(ValueError, match="32..77"):
        induction_tokenizer(20)


# --- the scores on hand-built attention ---------------------------------------------------------


def test_induction_keys_are_the_keys_after_each_earlier_occurrence():
    x = torch.tensor([[0, 1, 2, 0, 1, 0]])  # a b c a b a
    keys = induction_keys(x)[0]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    expected[3, 1] = True  # a: after the a at 0
    expected[4, 2] = True  # b: after the b at 1
    expected[5, 1] = expected[5, 4] = True  # a: after the a at 0 and the a at 3
    assert torch.equal(keys, expected)


def test_scores_of_hand_built_heads_are_exact():
    x = torch.tensor([[0, 1, 2, 0, 1, 2]])  # a b c a b c: queries 3, 4, 5 repeat
    length = 6
    eye = torch.eye(length)
    previous = torch.zeros(length, length)  # head 0: every query on the key before it
    previous[0, 0] = 1.0
    previous[torch.arange(1, length), torch.arange(length - 1)] = 1.0
    induction = eye.clone()  # head 1: repeats on the key after the earlier occurrence
    induction[3], induction[4], induction[5] = eye[1], eye[2], eye[3]
    half = (eye + induction) / 2  # head 2: half and half
    uniform = torch.tril(torch.ones(length, length))  # head 3: causal uniform
    uniform = uniform / uniform.sum(-1, keepdim=True)
    weights = torch.stack([previous, induction, half, uniform])[None]  # (1, 4, 6, 6)

    ind = induction_scores(weights, x)
    assert ind[0].item() == 0.0
    assert ind[1].item() == 1.0
    assert ind[2].item() == 0.5
    assert ind[3].item() == pytest.approx((1 / 4 + 1 / 5 + 1 / 6) / 3, abs=1e-7)

    prev = previous_token_scores(weights)
    assert prev[0].item() == 1.0
    assert prev[1].item() == 0.0  # on itself, or on the key after an earlier occurrence
    assert prev[2].item() == 0.0
    assert prev[3].item() == pytest.approx((1 / 2 + 1 / 3 + 1 / 4 + 1 / 5 + 1 / 6) / 5)


def test_accuracy_counts_the_repeated_positions_only():
    x = torch.tensor([[0, 1, 0, 1]])  # repeats at 2, 3
    y = torch.tensor([[1, 0, 1, 0]])
    logits = torch.zeros(1, 4, 3)
    logits[0, 0, 2] = logits[0, 1, 0] = 1  # position 0 wrong (not counted), 1 right (not counted)
    logits[0, 2, 1] = 1  # right
    logits[0, 3, 2] = 1  # wrong
    assert repeat_accuracy(logits, x, y) == 0.5


# --- the model and a short run -------------------------------------------------------------------


def test_an_attention_only_gpt_has_no_feed_forward():
    cfg = GPTConfig(vocab_size=10, context_length=8, emb_dim=8, n_heads=2, n_layers=2)
    full = GPT(cfg)
    lean = GPT(GPTConfig(**{**vars(cfg), "attn_only": True}))
    names = {n for n, _ in lean.named_parameters()}
    assert not any(".ff." in n or ".norm2." in n for n in names)
    assert names < {n for n, _ in full.named_parameters()}
    assert lean(torch.zeros(1, 8, dtype=torch.long)).shape == (1, 8, 10)


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A 40-iteration induction run, shared read-only: (its folder, what it printed)."""
    out = tmp_path_factory.mktemp("induction") / "ind"
    capture = io.StringIO()
    with contextlib.redirect_stdout(capture):
        assert main([*SHORT, "--eval-every", "20", "--out", str(out)]) == 0
    return out, capture.getvalue()


def test_a_short_run_reports_accuracy_and_scores_per_head(short_run):
    out, printed = short_run
    assert "accuracy" in printed and "induction max" in printed
    evals = [r for r in metrics(out) if "val_loss" in r]
    assert [r["iter"] for r in evals] == [20, 40]
    heads = [f"L{layer}H{head}" for layer in (0, 1) for head in range(4)]
    for record in evals:
        assert 0 <= record["hook/accuracy"] <= 1
        for name in ("induction", "prev_token"):
            scores = [record[f"hook/{name}/{h}"] for h in heads]
            assert all(0 <= s <= 1 for s in scores)
        assert record["val_loss"] < 4.5  # below ln(64) + a margin: it learns something
    config = json.loads((out / "config.json").read_text())
    assert config["model"]["attn_only"] is True and config["train"]["data"] == "induction"
    assert (out / "scores.png").exists() or "matplotlib" in printed
    assert not (out / "samples.txt").exists()


def test_one_layer_and_a_resume_of_the_induction_task(tmp_path, capsys):
    one = tmp_path / "one"
    assert main([*SHORT, "--n-layers", "1", "--iters", "20", "--out", str(one)]) == 0
    assert {k for k in metrics(one)[-1] if k.startswith("hook/induction/")} == {
        f"hook/induction/L0H{h}" for h in range(4)
    }
    assert main(["train", "--resume", str(one), "--iters", "30", "--quiet"]) == 0
    straight = tmp_path / "straight"
    assert main([*SHORT, "--n-layers", "1", "--iters", "30", "--out", str(straight)]) == 0
    capsys.readouterr()
    a, b = metrics(one), metrics(straight)
    assert [r["train_loss"] for r in a] == pytest.approx([r["train_loss"] for r in b], abs=1e-5)
    assert a[-1]["hook/accuracy"] == pytest.approx(b[-1]["hook/accuracy"], abs=1e-6)


def test_explain_shows_the_trained_heads_with_the_tokens_as_labels(short_run, capsys):
    out, _ = short_run
    text = "abcdefghabcdefgh"
    args = ["explain", "--checkpoint", str(out), "--text", text]
    assert main([*args, "--layer", "1", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["tokens"] == list(text) and shown["layer"] == 1 and shown["head"] == 0
    weights = next(s for s in shown["steps"] if s["name"] == "weights")
    assert weights["shape"][-2:] == [len(text), len(text)]
    assert main([*args, "--layer", "2"]) == 2
    assert "--layer 2 is out of range: valid layers are 0..1" in capsys.readouterr().err
    assert main(["explain", "--checkpoint", str(out), "--text", "x" * 97]) == 2
    assert "over the run's context of 96 tokens" in capsys.readouterr().err
    assert main([*args, "--seed", "1"]) == 2
    assert "--seed does not apply to --checkpoint" in capsys.readouterr().err
    assert main([*args, "--heads", "2"]) == 2  # not a --module the user never named
    assert "--heads does not apply to --checkpoint" in capsys.readouterr().err
