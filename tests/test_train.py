"""`selfattn train` / `selfattn generate`: data, schedule, checkpoints, resume, signals, bad input.

Every run here is the tiny preset on one thread, a few dozen iterations.
"""

import collections
import hashlib
import io
import itertools
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from bench_scripts import BENCHMARKS, load_benchmark
from tolerances import SAME_MODEL_F32

from selfattn.cli import main
from selfattn.train import checkpoint, command, files
from selfattn.train.command import TrainRequest, run_train
from selfattn.train.config import TrainConfig
from selfattn.train.data import (
    Batches,
    CharTokenizer,
    Corpus,
    encode_splits,
    read_corpus,
)
from selfattn.train.loop import Hooks, clip_gradients, seed_dropout
from selfattn.train.schedule import learning_rate

TINY = ["train", "--preset", "tiny", "--quiet", "--threads", "1"]


def train(capsys, out, *args) -> int:
    status = main([*TINY, "--out", str(out), *args])
    capsys.readouterr()
    return status


def metrics(run_dir) -> list[dict]:
    """metrics.jsonl's records, read as strict JSON (a bare NaN or Infinity fails)."""

    def refuse(constant):
        raise ValueError(f"metrics.jsonl holds {constant}: not JSON")

    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line, parse_constant=refuse) for line in lines]


def unigram_cross_entropy(corpus: Corpus) -> float:
    """The validation text's loss (nats per character) under the training text's character
    frequencies: what a model that learned nothing but those frequencies scores."""
    train_text, val_text = corpus.splits
    counts, n = collections.Counter(train_text), len(train_text)
    return -sum(
        k * math.log(counts[c] / n) for c, k in collections.Counter(val_text).items()
    ) / len(val_text)


def snapshot(folder) -> dict[str, str]:
    """{file name: sha256} of a folder, to show that nothing changed."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished tiny run (60 iterations), shared read-only: copy it to change it."""
    out = tmp_path_factory.mktemp("train") / "tiny"
    assert main([*TINY, "--out", str(out)]) == 0
    return out


# --- the schedule and the data -------------------------------------------------------------------


def test_learning_rate_warms_up_decays_by_a_cosine_then_stays_at_the_floor():
    kw = dict(lr=1e-3, min_lr=1e-4, warmup_iters=100, decay_iters=2000)
    assert learning_rate(0, **kw) == pytest.approx(1e-3 / 101)
    assert learning_rate(99, **kw) == pytest.approx(1e-3 * 100 / 101)
    assert learning_rate(100, **kw) == pytest.approx(1e-3)
    assert learning_rate(1050, **kw) == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way: the mean
    assert learning_rate(2000, **kw) == pytest.approx(1e-4)
    assert learning_rate(5000, **kw) == 1e-4
    decay = [learning_rate(i, **kw) for i in range(100, 2001)]
    assert all(a >= b for a, b in itertools.pairwise(decay))
    assert learning_rate(0, lr=1.0, min_lr=0.0, warmup_iters=0, decay_iters=0) == 1.0


@pytest.mark.parametrize("scale", [1e-3, 10.0, float("nan")], ids=["within", "above", "nan"])
def test_clip_gradients_equals_torchs_clipping_to_the_bit(scale):
    torch.manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s)) for s in [(5, 3), (7,), (2, 2, 2)]]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    for a, b in zip(ours, theirs, strict=True):
        a.grad = torch.randn_like(a) * scale
        b.grad = a.grad.clone()
    before = [p.grad.clone() for p in ours]
    clip_gradients(ours, 1.0)
    torch.nn.utils.clip_grad_norm_(theirs, 1.0)
    for a, b, g in zip(ours, theirs, before, strict=True):
        assert torch.equal(a.grad, b.grad) or (a.grad.isnan().all() and b.grad.isnan().all())
        assert torch.equal(a.grad, g) == (scale == 1e-3)  # only a norm within 1.0 is left alone


def test_seed_dropout_draws_what_torch_manual_seed_draws():
    torch.manual_seed(5)
    expected = torch.nn.functional.dropout(torch.ones(64), 0.5)
    torch.manual_seed(6)  # somewhere else
    seed_dropout(5)
    assert torch.equal(torch.nn.functional.dropout(torch.ones(64), 0.5), expected)


def test_the_built_in_corpus_and_its_character_vocabulary():
    corpus = read_corpus(None)
    assert len(corpus.text) == 1_115_394
    assert corpus.sha256 == "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    train_text, val_text = corpus.splits
    assert len(train_text) == int(1_115_394 * 0.9) and train_text + val_text == corpus.text
    tok = CharTokenizer.from_text(corpus.text)
    assert tok.vocab_size == 65 and tok.decode(tok.encode("ROMEO:\n")) == "ROMEO:\n"


def test_batches_are_shifted_windows_from_a_seeded_generator_split_across_ranks():
    text = "".join(chr(97 + i % 26) for i in range(2000))
    corpus = Corpus(text, "test", "")
    splits = encode_splits(corpus, CharTokenizer.from_text(text), 8)
    x, y = Batches(splits, 6, 8, seed=5).next_train()
    assert x.shape == y.shape == (6, 8) and x.dtype == torch.long
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal((x + 1) % 26, y)
    again = Batches(splits, 6, 8, seed=5)
    assert torch.equal(again.next_train()[0], x)
    halves = [Batches(splits, 6, 8, seed=5, rank=r, world_size=2).next_train()[0] for r in (0, 1)]
    assert torch.equal(torch.cat(halves), x)  # two processes see exactly one process's batch


def test_atomic_write_leaves_the_old_file_when_the_rename_fails(tmp_path, monkeypatch):
    path = tmp_path / "f.bin"
    files.atomic_write_bytes(path, b"old")

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(files.os, "replace", boom)
    with pytest.raises(OSError):
        files.atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["f.bin"]


# --- a run and what it leaves --------------------------------------------------------------------


def test_a_tiny_run_writes_every_file(finished):
    names = {p.name for p in finished.iterdir()}
    expected = {"model.safetensors", "train_state.safetensors", "config.json"}
    assert expected | {"metrics.jsonl", "loss.png", "samples.txt"} <= names
    records = metrics(finished)
    assert [r["iter"] for r in records] == list(range(1, 61))
    assert [r["iter"] for r in records if "val_loss" in r] == [20, 40, 60]
    assert all(math.isfinite(r["train_loss"]) for r in records)
    # it learned more than the characters' frequencies (about 3.34 nats; 60 iterations: ~3.2)
    assert records[-1]["val_loss"] < unigram_cross_entropy(read_corpus(None))
    assert (finished / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (finished / "samples.txt").read_text().count("=== iteration") == 3
    record = json.loads((finished / "config.json").read_text())
    assert record["preset"] == "tiny" and record["model"]["n_layers"] == 2
    assert record["data"]["tokenizer"]["kind"] == "char"
    assert len(record["data"]["tokenizer"]["chars"]) == record["model"]["vocab_size"] == 65
    # plain safetensors, readable without selfattn and without unpickling
    from safetensors.torch import load_file

    assert "tok_emb.weight" in load_file(finished / "model.safetensors")
    state = load_file(finished / "train_state.safetensors")
    assert {"rng.torch", "rng.batches", "optim.tok_emb.weight.exp_avg"} <= set(state)


def test_generate_streams_the_same_text_for_the_same_seed(finished, capsys):
    args = ["generate", "--checkpoint", str(finished), "--prompt", "ROMEO:"]
    assert main([*args, "--max-new-tokens", "30", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert main([*args, "--max-new-tokens", "30", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("ROMEO:") and len(first) == len("ROMEO:") + 30 + 1
    loaded = checkpoint.load_run(finished)
    assert loaded.iteration == 60 and not loaded.model.training


@pytest.mark.parametrize("dropout", ["0", "0.1"])
def test_a_run_stopped_by_a_signal_and_resumed_equals_the_uninterrupted_run(
    tmp_path, capsys, monkeypatch, dropout
):
    common = ["--iters", "30", "--eval-every", "10", "--dropout", dropout]
    assert train(capsys, tmp_path / "whole", *common) == 0

    def interrupt(record):  # Ctrl-C after iteration 13: the loop stops after it and saves
        if record["iter"] == 13:
            os.kill(os.getpid(), signal.SIGINT)

    request = TrainRequest(
        "tiny", {"iters": 30, "eval_every": 10, "dropout": float(dropout), "threads": 1},
        str(tmp_path / "cut"), quiet=True,
    )  # fmt: skip
    assert run_train(request, hooks=Hooks(on_step=[interrupt])) == 130
    err = capsys.readouterr().err
    assert "stopped at iteration 13 of 30" in err and f"--resume {tmp_path / 'cut'}" in err
    assert len(metrics(tmp_path / "cut")) == 13
    assert main(["train", "--resume", str(tmp_path / "cut"), "--quiet"]) == 0
    capsys.readouterr()
    whole, cut = metrics(tmp_path / "whole"), metrics(tmp_path / "cut")
    assert [r["iter"] for r in cut] == list(range(1, 31))
    for key in ("train_loss", "val_loss", "lr"):  # bitwise: the same numbers, not close ones
        assert [r[key] for r in whole if key in r] == [r[key] for r in cut if key in r]
    a, b = checkpoint.load_state(tmp_path / "whole"), checkpoint.load_state(tmp_path / "cut")
    assert a.iteration == b.iteration == 30 and a.model.keys() == b.model.keys()
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert all(
        torch.equal(a.optimizer[n][f], b.optimizer[n][f])
        for n in a.optimizer
        for f in a.optimizer[n]
    )


def test_a_stop_during_an_evaluation_keeps_its_iteration_and_the_resume_evaluates_it(
    tmp_path, capsys
):
    common = ["--iters", "20", "--eval-every", "10"]
    assert train(capsys, tmp_path / "whole", *common) == 0

    def slow_evaluation(ctx):  # Ctrl-C while iteration 10's evaluation runs
        if ctx.iteration == 10:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)
        return {}

    request = TrainRequest(
        "tiny", {"iters": 20, "eval_every": 10, "threads": 1}, str(tmp_path / "cut"), quiet=True
    )
    assert run_train(request, hooks=Hooks(on_eval=[slow_evaluation])) == 130
    capsys.readouterr()
    assert checkpoint.load_state(tmp_path / "cut").iteration == 10
    assert [r["iter"] for r in metrics(tmp_path / "cut")] == list(range(1, 11))
    assert main(["train", "--resume", str(tmp_path / "cut"), "--quiet"]) == 0
    capsys.readouterr()
    whole, cut = metrics(tmp_path / "whole"), metrics(tmp_path / "cut")
    assert [r["iter"] for r in cut] == list(range(1, 21))
    for key in ("train_loss", "val_loss", "eval_train_loss", "lr"):
        assert [(r["iter"], r[key]) for r in whole if key in r] == [
            (r["iter"], r[key]) for r in cut if key in r
        ]


def test_resume_continues_up_to_more_iterations(finished, tmp_path, capsys):
    run = shutil.copytree(finished, tmp_path / "run")
    assert main(["train", "--resume", str(run), "--iters", "64", "--quiet"]) == 0
    assert "done: 64 iterations" in capsys.readouterr().out
    assert [r["iter"] for r in metrics(run)][-5:] == [60, 61, 62, 63, 64]
    assert json.loads((run / "config.json").read_text())["train"]["iters"] == 64


def test_compile_trains_the_same_losses_and_a_resume_may_leave_it_out(finished, tmp_path, capsys):
    """--compile (torch.compile of the training steps; inductor's C++ on the CPU) is the same
    maths: the tiny run's losses equal the eager run's to float32 rounding. It is saved, and a
    resume may turn it off (the weights do not depend on it)."""
    run = tmp_path / "compiled"
    assert train(capsys, run, "--compile") == 0
    assert json.loads((run / "config.json").read_text())["train"]["compile"] is True
    eager, compiled = metrics(finished), metrics(run)
    assert [r["iter"] for r in compiled] == [r["iter"] for r in eager]
    for key in ("train_loss", "val_loss"):
        got = torch.tensor([r[key] for r in compiled if key in r])
        expected = torch.tensor([r[key] for r in eager if key in r])
        torch.testing.assert_close(got, expected, **SAME_MODEL_F32)
    assert main(["train", "--resume", str(run), "--iters", "64", "--no-compile", "--quiet"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["compile"] is False
    assert [r["iter"] for r in metrics(run)][-2:] == [63, 64]


def test_compile_without_a_cpp_compiler_is_one_line_that_says_to_leave_it_out(tmp_path):
    """Inductor needs a C++ compiler on the CPU: without one the first iteration fails in one
    line (exit 1) that names the cause and the way out; nothing was trained, so the same
    command without --compile starts the run."""
    env = dict(os.environ, CXX="/bin/false", TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "selfattn", *TINY, "--out", str(out), "--compile"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    prefix = "selfattn train: error: CompileFailed: --compile failed at iteration 1 "
    assert lines[0].startswith(prefix), lines[0]
    assert "C++ compiler" in lines[0] and "leave --compile out" in lines[0]
    assert main([*TINY, "--out", str(out), "--iters", "2", "--eval-every", "2"]) == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_saves_a_checkpoint_says_how_to_resume_and_exits_130(tmp_path, sig):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "selfattn", *TINY, "--iters", "100000", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and f"selfattn train --resume {out}" in err
    done = int(err.split("stopped at iteration ")[1].split()[0])
    state = checkpoint.load_state(out)
    assert state.iteration == done == len(metrics(out))


# A test's slow iteration: the training forward of iteration 4 sleeps (as inside one torch
# operation that takes minutes) after touching MARK; SLOW_SAVE=1 makes the next checkpoint
# (the stop's) sleep too.
SLOW = """
import os, sys, time
from pathlib import Path
import selfattn.train.checkpoint as checkpoint
from selfattn.cli import main
from selfattn.models.gpt import GPT

env, calls, forward, save = os.environ, [], GPT.forward, checkpoint.save_checkpoint

def slow_forward(self, *args, **kwargs):
    if self.training:
        calls.append(1)
        if len(calls) == 4:
            Path(env["MARK"]).touch()
            time.sleep(600)
    return forward(self, *args, **kwargs)

def slow_save(run_dir, state, model):
    if len(calls) >= 4 and env.get("SLOW_SAVE"):
        Path(env["MARK"] + ".save").touch()
        time.sleep(600)
    return save(run_dir, state, model)

GPT.forward, checkpoint.save_checkpoint = slow_forward, slow_save
sys.exit(main(sys.argv[1:]))
"""


def start_slow_run(out: Path, **env: str) -> subprocess.Popen:
    args = [*TINY, "--iters", "10", "--eval-every", "2", "--sample-tokens", "0"]
    cmd = [sys.executable, "-c", SLOW, *args, "--out", str(out)]
    env = dict(os.environ, MARK=str(out.parent / "mark"), **env)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(proc: subprocess.Popen, path: Path) -> None:
    """Until ``path`` exists; a failure when the process ends first or after 60 s."""
    deadline = time.monotonic() + 60
    while not path.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"{path.name} never came: {proc.communicate()}")
        time.sleep(0.05)


def test_a_signal_mid_iteration_stops_within_seconds_and_keeps_the_last_complete_one(tmp_path):
    """SIGTERM while iteration 4 is inside a long operation: exit 130 within seconds, with the
    checkpoint of iteration 3 (the unfinished iteration dropped), loadable."""
    out = tmp_path / "run"
    proc = start_slow_run(out)
    try:
        wait_for(proc, tmp_path / "mark")
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert time.monotonic() - sent < 10
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and "stopped at iteration 3 of 10" in err
    assert checkpoint.load_state(out).iteration == 3 and len(metrics(out)) == 3
    assert checkpoint.load_run(out).iteration == 3


def test_a_second_signal_exits_at_once_and_keeps_the_last_checkpoint(tmp_path):
    """The first SIGINT's checkpoint (of iteration 3) is slow to write: a second SIGINT exits
    at once, and the checkpoint of iteration 2 is intact."""
    out = tmp_path / "run"
    proc = start_slow_run(out, SLOW_SAVE="1")
    try:
        wait_for(proc, tmp_path / "mark")
        proc.send_signal(signal.SIGINT)
        wait_for(proc, tmp_path / "mark.save")
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert time.monotonic() - sent < 5
    assert proc.returncode == 130, err
    assert err.count("\n") == 1 and "stopped at once" in err
    assert checkpoint.load_state(out).iteration == 2 and checkpoint.load_run(out).iteration == 2


def test_a_second_signal_on_a_terminal_gives_the_cursor_back(monkeypatch):
    written = []
    monkeypatch.setattr(os, "isatty", lambda fd: True)
    monkeypatch.setattr(os, "write", lambda fd, data: written.append((fd, data)))
    monkeypatch.setattr(os, "_exit", lambda status: written.append(("exit", status)))
    command._exit_now(command.DataParallel.from_env("cpu"))
    assert written[:2] == [(1, b"\x1b[?25h"), (2, b"\x1b[?25h")]
    assert written[2][0] == 2 and written[2][1].startswith(b"\nselfattn train: stopped at once")
    assert written[3] == ("exit", 130)


def test_the_memory_floor_counts_a_containers_limit(tmp_path, monkeypatch):
    assert command.cgroup_free_bytes(tmp_path) is None  # no cgroup v2 files: no limit known
    (tmp_path / "memory.max").write_text("max\n")
    (tmp_path / "memory.current").write_text("1000\n")
    assert command.cgroup_free_bytes(tmp_path) is None
    (tmp_path / "memory.max").write_text(f"{300 * 2**20}\n")
    (tmp_path / "memory.current").write_text(f"{100 * 2**20}\n")
    assert command.cgroup_free_bytes(tmp_path) == 200 * 2**20
    monkeypatch.setattr(command, "CGROUP", tmp_path)
    assert command._available_bytes("cpu") == 200 * 2**20  # less than the machine's RAM
    with pytest.raises(ValueError, match=r"but 0\.2 GiB is free in RAM"):
        command.check_memory(TrainConfig(block_size=4096, batch_size=64))


@pytest.mark.parametrize(
    ("eval_every", "message", "saved"),
    [
        ("5", "loss is nan at iteration 3; no checkpoint was written yet", None),
        (
            "1",
            "evaluation train loss is nan at iteration 2; the last good checkpoint is iteration 1",
            1,
        ),
    ],
    ids=["train-loss", "evaluation"],
)
def test_a_diverging_run_stops_in_one_line_exit_1_and_saves_no_diverged_weights(
    tmp_path, capsys, eval_every, message, saved
):
    """--lr 1e6: the loss is huge at iteration 2 and NaN after it (the evaluation of iteration 2
    already NaN). One line, exit 1; metrics.jsonl strict JSON lines (NaN as null)."""
    out = tmp_path / "run"
    status = main(
        [*TINY, "--lr", "1e6", "--iters", "10", "--eval-every", eval_every, "--out", str(out)]
    )
    err = capsys.readouterr().err
    assert status == 1 and err.count("\n") == 1
    assert err == f"selfattn train: error: Diverged: {message}\n"
    records = metrics(out)
    assert None in records[-1].values()
    if saved is None:
        assert not (out / "train_state.safetensors").exists()
    else:
        state = checkpoint.load_state(out)
        assert state.iteration == saved and all(v.isfinite().all() for v in state.model.values())


def test_settings_that_cannot_fit_in_memory_are_refused_before_anything_is_written(
    tmp_path, capsys, monkeypatch
):
    """The naive engine holds (B, H, T, T) weights per layer: at block size 2048 that is more
    than the 300 MB this test says are free; the default engine fits (`command.peak_bytes`).
    At block size 100,000 the activations alone need 3.1 GiB (and a checkpoint builds no T x T
    chapter masks: it would have needed 2 x 40 GB more, see test_gpt)."""
    monkeypatch.setattr(command, "_available_bytes", lambda device: 300 * 2**20)
    out = tmp_path / "run"
    args = ["--backend", "naive", "--block-size", "2048", "--iters", "1", "--eval-iters", "1"]
    assert main([*TINY, *args, "--sample-tokens", "0", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the run needs at least 1.1 GiB" in err
    assert "0.3 GiB is free in RAM" in err and not out.exists()
    monkeypatch.setattr(command, "_available_bytes", lambda device: 2 * 2**30)
    assert main([*TINY, "--block-size", "100000", "--out", str(out)]) == 2
    assert "the run needs at least 3.1 GiB" in capsys.readouterr().err and not out.exists()
    assert main([*TINY, *args[2:], "--sample-tokens", "0", "--out", str(out)]) == 0  # sdpa


@pytest.mark.parametrize("width", [30, 45, 60, 80, 100, 140])
def test_the_progress_bar_drops_whole_fields_to_fit_the_terminal(monkeypatch, width):
    from selfattn.train.progress import Bar

    monkeypatch.setenv("COLUMNS", str(width))
    out = io.StringIO()
    monkeypatch.setattr(sys, "stdout", out)
    bar = Bar(2000, 0, "shakespeare-char")
    record = {"iter": 12, "train_loss": 2.34567, "lr": 2.9e-4, "tokens_per_s": 41210.0}
    bar.step(record)
    bar.evaluation(record | {"val_loss": 2.45678, "elapsed_s": 1.0})
    bar.close()
    line = out.getvalue().rstrip("\n").splitlines()[-1]  # the bar, as drawn last
    assert len(line.rstrip()) < width
    fields = {  # each field, whole, and what shows that some of it is there
        r"shakespeare-char": "shakes",
        r"12/2000": "/2",
        r"loss 2\.3457": "loss",
        r"val 2\.4568": "val",
        r"lr 2\.9e-04": "lr ",
        r"41,210 tok/s": "tok",
        r"eta \d+:\d\d:\d\d": "eta",
    }
    for field, part in fields.items():
        assert re.search(field, line) or part not in line, (field, line)
    assert "12/2000" in line and "…" not in line
    if width >= 100:
        assert all(re.search(field, line) for field in fields), line


def test_the_figures_leave_out_values_written_as_null(tmp_path):
    """metrics.jsonl writes a value that is not finite as null: a resumed run's history may
    hold None (say, a hook's score with nothing to score), and the figures still draw."""
    from selfattn.train.plot import plot_losses, plot_scores

    records = [{"iter": 1, "train_loss": None, "hook/a": None}]
    records += [{"iter": 2, "train_loss": 3.0, "val_loss": 3.1, "hook/a": 0.5}]
    plot_losses(tmp_path / "loss.png", records, "t")
    plot_scores(tmp_path / "scores.png", records, "t")
    assert (tmp_path / "scores.png").read_bytes()[:4] == b"\x89PNG"


# --- bad input: one line, exit 2, nothing written ------------------------------------------------


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (None, "no such file"),
        (b"", "is empty"),
        (b"abc\x00def" * 100, "looks binary"),
        (b"\xff\xfe caf\xe9 " * 100, "not UTF-8"),
        (b"To be, or not to be.\n" * 10, "too short"),
    ],
    ids=["missing", "empty", "binary", "latin-1", "short"],
)
def test_bad_text_files_are_one_line_and_write_nothing(tmp_path, capsys, content, needle):
    text = tmp_path / "text.txt"
    if content is not None:
        text.write_bytes(content)
    out = tmp_path / "run"
    assert main([*TINY, "--text-file", str(text), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfattn train: error:") and err.count("\n") == 1 and needle in err
    assert not out.exists()


def test_an_out_folder_holding_a_run_is_kept_unless_forced(finished, tmp_path, capsys):
    run = shutil.copytree(finished, tmp_path / "run")
    before = snapshot(run)
    assert train(capsys, run) == 2
    assert snapshot(run) == before
    assert main([*TINY, "--out", str(run), "--iters", "3", "--force"]) == 0
    assert "done: 3 iterations" in capsys.readouterr().out
    assert len(metrics(run)) == 3


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--n-layers", "3"], "--n-layers 3 contradicts"),
        (["--lr", "0.5"], "--lr 0.5 contradicts"),
        (["--preset", "shakespeare-char"], "--preset shakespeare-char contradicts"),
        (["--iters", "60"], "has done 60 of 60 iterations"),
    ],
)
def test_flags_contradicting_the_checkpoint_are_refused(finished, tmp_path, capsys, args, needle):
    run = shutil.copytree(finished, tmp_path / "run")
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--quiet", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err
    assert snapshot(run) == before


@pytest.mark.parametrize("damage", ["truncate", "flip", "header"])
@pytest.mark.parametrize("name", ["train_state.safetensors", "model.safetensors"])
def test_a_damaged_checkpoint_is_one_line_exit_2(finished, tmp_path, capsys, damage, name):
    run = shutil.copytree(finished, tmp_path / "run")
    data = bytearray((run / name).read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        data[-100] ^= 0xFF  # one byte of a tensor: only the checksum can tell
    else:  # a tensor's dtype in the JSON header, same length: the tensors read as garbage
        header_end = 8 + int.from_bytes(data[:8], "little")
        assert b'"F32"' in data[:header_end]
        data[:header_end] = data[:header_end].replace(b'"F32"', b'"I32"', 1)
    (run / name).write_bytes(bytes(data))
    before = snapshot(run)
    if name == "train_state.safetensors":
        status = main(["train", "--resume", str(run), "--iters", "70", "--quiet"])
    else:
        status = main(["generate", "--checkpoint", str(run), "--max-new-tokens", "3"])
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and "truncated or corrupted" in err and name in err
    assert snapshot(run) == before


def test_usage_errors(tmp_path, capsys):
    assert main([*TINY, "--vocab-size", "300", "--out", str(tmp_path / "a")]) == 2
    assert "--vocab-size is for --tokenizer bpe" in capsys.readouterr().err
    assert main([*TINY, "--dropout", "1.5"]) == 2
    assert "selfattn train: error: argument --dropout" in capsys.readouterr().err
    assert main(["generate", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "no run directory" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


def test_bpe_on_a_text_file_saves_its_tokenizer_and_generates(tmp_path, capsys):
    text = tmp_path / "text.txt"
    text.write_text(read_corpus(None).text[:30_000], encoding="utf-8")
    out = tmp_path / "run"
    args = ["--text-file", str(text), "--tokenizer", "bpe", "--vocab-size", "300", "--iters", "4"]
    assert train(capsys, out, *args) == 0
    record = json.loads((out / "config.json").read_text())
    assert record["data"]["tokenizer"] == {
        "kind": "bpe",
        "file": "tokenizer.json",
        "vocab_size": 300,
    }
    assert record["data"]["source"] == str(text.resolve()) and (out / "tokenizer.json").exists()
    assert main(["generate", "--checkpoint", str(out), "--prompt", "KING", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("KING")


def test_the_training_benchmark_runs_in_quick_mode(tmp_path, capsys):
    """benchmarks/train.py --quick: both contenders train, agree on the first batch, report."""
    bench = load_benchmark("train")
    threads = torch.get_num_threads()
    try:
        out = tmp_path / "train.txt"
        assert bench.main(["--quick", "--iters", "20", "--threads", "1", "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    capsys.readouterr()
    text = out.read_text()
    assert "check: first batch, same weights" in text
    assert "selfattn / plain:" in text and "% peak" in text
    lines = text.splitlines()
    header = next(i for i, line in enumerate(lines) if line.startswith("contender"))
    rows = [line.split() for line in lines[header + 1 : header + 3]]
    assert [r[0] for r in rows] == ["selfattn", "plain"]
    assert all(float(r[1]) > 0 and 0 < float(r[5]) < 5 for r in rows)  # ms/iter, val loss


def test_the_whole_command_report_reads_the_nanogpt_style_iterations(monkeypatch):
    """benchmarks/train.py --whole: the median of the nanoGPT-style log's iteration times,
    leaving out each iteration that began with an evaluation (0, 250, ...)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    bench = load_benchmark("train")
    times = {0: 900.0, 1: 40.0, 2: 41.0, 250: 900.0, 251: 42.0, 252: 43.0, 500: 900.0}  # ms
    lines = [f"iter {i}: loss 3.0000, time {ms:.2f}ms" for i, ms in times.items()]
    log = "\n".join(["step 0: train loss 4.2, val loss 4.2", *lines, "final val loss 2.5000"])
    assert bench.nanogpt_step_time(log) == pytest.approx(0.0415)  # 43 ms with the evaluations


def test_the_generate_benchmark_runs_in_quick_mode(tmp_path, capsys):
    """benchmarks/generate.py --quick: generate and a forward pick the same token; a report."""
    bench = load_benchmark("generate")
    out = tmp_path / "generate.txt"
    assert bench.main(["--quick", "--out", str(out)]) == 0
    capsys.readouterr()
    rows = [line.split() for line in out.read_text().splitlines() if line[:13].strip().isdigit()]
    assert [int(r[0]) for r in rows] == [512, 1024]
    assert all(float(r[1]) > 0 and float(r[2]) > 0 for r in rows)
