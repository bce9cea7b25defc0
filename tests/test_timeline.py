"""The training timeline: probes recorded at each evaluation, resumes, the page's data and errors,
`selfattn.show(run, timeline=True)`, and `selfattn train --tensorboard`.

Every run is the induction preset shrunk to seconds (context 40, batch 8, 6 iterations, an
evaluation every 2) or the tiny text preset, on one thread. The page in a real browser is
tests/test_timeline_browser.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from tolerances import STORED_F16

from selfattn.cli import main
from selfattn.explain import timeline
from selfattn.explain.inline import TimelineView, show
from selfattn.probe_file import MAX_TOKENS, PROBES, Probes, read_probes
from selfattn.train import checkpoint, command
from selfattn.train.command import TrainRequest, run_train
from selfattn.train.data import encode_splits, read_corpus
from selfattn.train.data_parallel import SINGLE
from selfattn.train.induction import induction_scores, previous_token_scores
from selfattn.train.loop import Hooks
from selfattn.train.tensorboard_log import tag
from selfattn.train.traces import trace_run

SMALL = {"block_size": 40, "batch_size": 8, "iters": 6, "eval_every": 2, "eval_iters": 1}
FLAGS = ["--block-size", "40", "--batch-size", "8", "--iters", "6", "--eval-every", "2",
         "--eval-iters", "1"]  # fmt: skip
INDUCTION = ["train", "--preset", "induction", "--quiet", "--threads", "1", *FLAGS]


def train(capsys, out: Path, *args: str) -> None:
    status = main([*INDUCTION, "--out", str(out), *args])
    captured = capsys.readouterr()
    assert status == 0, captured.err


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def induction_run(tmp_path_factory) -> Path:
    """One small induction run with --tensorboard, shared read-only: copy it to change it."""
    out = tmp_path_factory.mktemp("timeline") / "run"
    board = out.parent / "board"
    assert main([*INDUCTION, "--out", str(out), "--tensorboard", str(board)]) == 0
    return out


# --- the probes ----------------------------------------------------------------------------------


def test_each_evaluation_records_every_heads_attention_on_the_probe(induction_run):
    probes = read_probes(induction_run)
    assert probes.kind == "induction"
    assert probes.iterations.tolist() == [2, 4, 6]
    t = min(MAX_TOKENS, SMALL["block_size"])
    assert probes.tokens.shape == (t,) and len(probes.labels) == t
    assert probes.attention.shape == (3, 2, 4, t, t)  # (N, layers, heads, T, T)
    assert probes.attention.dtype == torch.float16
    assert probes.induction.shape == probes.previous_token.shape == (3, 2, 4)
    w = probes.attention.float()
    # each of the T weights of a row rounds by at most STORED_F16, so the row sum by T times that
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 2, 4, t), atol=t * 2.5e-4, rtol=0)
    assert torch.equal(w.triu(1), torch.zeros_like(w))  # causal: nothing above the diagonal
    # a repeated segment: some query's token occurred before
    assert len(set(probes.tokens.tolist())) < t
    # small: the float16 weights and little else (3 x 2 x 4 x 40 x 40 x 2 bytes = 77 KB)
    assert (induction_run / PROBES).stat().st_size < probes.attention.numel() * 2 + 4096


def test_the_last_probe_is_the_checkpointed_models_own_attention(induction_run):
    probes = read_probes(induction_run)
    text = "".join(probes.labels)  # the induction alphabet's symbols: one character per token
    traces = trace_run(induction_run, text)  # the checkpoint, loaded and traced afresh
    assert checkpoint.load_state(induction_run).iteration == int(probes.iterations[-1])
    for layer, tr in enumerate(traces):
        expected = tr.steps["weights"]  # (H, T, T) float32
        actual = probes.attention[-1, layer].float()
        torch.testing.assert_close(actual, expected, **STORED_F16)
        ids = probes.tokens[None]
        torch.testing.assert_close(
            probes.induction[-1, layer], induction_scores(expected[None], ids), **STORED_F16
        )
        torch.testing.assert_close(
            probes.previous_token[-1, layer], previous_token_scores(expected[None]), **STORED_F16
        )


def test_a_text_run_probes_the_first_line_of_its_validation_split(tmp_path, capsys):
    out = tmp_path / "tiny"
    status = main(["train", "--preset", "tiny", "--quiet", "--threads", "1", "--iters", "2",
                   "--eval-every", "2", "--eval-iters", "1", "--sample-tokens", "0",
                   "--out", str(out)])  # fmt: skip
    assert status == 0, capsys.readouterr().err
    probes = read_probes(out)
    assert probes.kind == "text" and probes.iterations.tolist() == [2]
    run = checkpoint.load_run(out)
    val = encode_splits(read_corpus(None), run.tokenizer, 32).val
    text = run.tokenizer.decode(val.tolist())
    start = text.index("\n") + 1  # characters: one token each
    start += len(text[start:]) - len(text[start:].lstrip())  # past blank lines
    assert not text[start].isspace()
    assert run.tokenizer.decode(probes.tokens.tolist()) == text[start : start + 32]
    assert probes.attention.shape == (1, 2, 2, 32, 32)


def _stop_at(iteration: int):
    def hook(record):
        if record["iter"] == iteration:
            os.kill(os.getpid(), signal.SIGINT)

    return hook


def _slow_evaluation_at(iteration: int):
    def hook(ctx):  # Ctrl-C while this iteration's evaluation runs
        if ctx.iteration == iteration:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1.0)
        return {}

    return hook


@pytest.mark.parametrize(
    "stop",
    [
        "after-iteration-3",
        "during-evaluation-4",
        "during-the-last-evaluation",
        "probes-past-the-checkpoint",
    ],
)
def test_a_stopped_and_resumed_run_has_the_probes_of_the_uninterrupted_one(
    induction_run, tmp_path, capsys, stop
):
    out = tmp_path / "cut"
    if stop == "during-evaluation-4":
        hooks = Hooks(on_eval=[_slow_evaluation_at(4)])
    elif stop == "during-the-last-evaluation":  # iteration 6 of 6 is done, its evaluation not
        hooks = Hooks(on_eval=[_slow_evaluation_at(6)])
    else:
        hooks = Hooks(on_step=[_stop_at(3)])
    request = TrainRequest("induction", {**SMALL, "threads": 1}, str(out), quiet=True)
    assert run_train(request, hooks=hooks) == 130
    capsys.readouterr()
    kept = read_probes(out).iterations.tolist()
    # (stopped during an evaluation: its probe is not taken yet)
    assert kept == ([2, 4] if stop == "during-the-last-evaluation" else [2])
    if stop == "probes-past-the-checkpoint":  # a run killed after writing probes it never saved
        shutil.copy(induction_run / PROBES, out / PROBES)
        assert read_probes(out).iterations.tolist() == [2, 4, 6]
        command.resume_run(TrainRequest(resume=str(out)), SINGLE)  # what a resume does first
        assert read_probes(out).iterations.tolist() == [2]  # cut to the checkpoint's iteration
    assert main(["train", "--resume", str(out), "--quiet"]) == 0
    capsys.readouterr()
    whole, cut = read_probes(induction_run), read_probes(out)
    assert cut.iterations.tolist() == whole.iterations.tolist() == [2, 4, 6]
    assert torch.equal(cut.tokens, whole.tokens) and cut.labels == whole.labels
    for name in ("attention", "induction", "previous_token"):  # bitwise: the same numbers
        assert torch.equal(getattr(cut, name), getattr(whole, name)), name


def test_a_forced_new_run_drops_the_old_runs_probes(induction_run, tmp_path, capsys):
    out = shutil.copytree(induction_run, tmp_path / "run")
    train(capsys, out, "--force", "--iters", "2")
    assert read_probes(out).iterations.tolist() == [2]


# --- the page's data and the command ------------------------------------------------------------


def _probes(induction: list[float], t: int = 4) -> Probes:
    """Synthetic probes: one layer of 2 heads; head 1's induction score at each evaluation."""
    n = len(induction)
    scores = torch.zeros(n, 1, 2)
    scores[:, 0, 1] = torch.tensor(induction)
    w = torch.full((n, 1, 2, t, t), 1.0 / t)
    return Probes(
        torch.arange(t), [str(i) for i in range(t)], "induction", "test",
        torch.arange(1, n + 1) * 10, w.half(), scores, torch.zeros(n, 1, 2),
    )  # fmt: skip


def test_the_page_marks_the_first_evaluation_where_an_induction_head_forms():
    assert timeline._formed(_probes([0.1, 0.3, 0.6, 0.9])) == {
        "iteration": 30, "layer": 0, "head": 1, "score": pytest.approx(0.6),
    }  # fmt: skip
    assert timeline._formed(_probes([0.1, 0.49, float("nan")])) is None


def test_a_long_run_keeps_evenly_spaced_evaluations_with_the_formation(monkeypatch):
    probes = _probes([0.0] * 40 + [0.7] + [0.9] * 59)  # 100 evaluations, formed at the 41st
    per = probes.attention[0].numel()
    monkeypatch.setattr(timeline, "MAX_CELLS", 10 * per)
    keep, note = timeline._kept(probes, timeline._formed(probes))
    assert keep[0] == 0 and keep[-1] == 99 and 40 in keep and len(keep) <= 11
    assert "keeps 11 of the 100 evaluations" in note


def test_the_page_data_holds_every_kept_evaluation(induction_run):
    data = timeline.timeline_data(induction_run)
    assert data["iterations"] == [2, 4, 6]
    assert (data["layers"], data["heads"], data["size"]) == (2, 4, 40)
    import base64

    weights = torch.frombuffer(bytearray(base64.b64decode(data["weights"])), dtype=torch.uint8)
    expected = read_probes(induction_run).attention.float().clamp(0, 1) * 255
    assert torch.equal(weights.reshape(expected.shape).float(), expected.round())
    assert [it for it, _ in data["train"]] == list(range(1, 7))
    assert [it for it, _ in data["val"]] == [2, 4, 6]


def test_the_timeline_command_writes_one_offline_page(induction_run, tmp_path, capsys):
    page = tmp_path / "page.html"
    assert main(["explain", "--checkpoint", str(induction_run), "--timeline", "--html",
                 str(page)]) == 0  # fmt: skip
    assert "wrote" in capsys.readouterr().out
    text = page.read_text()
    assert '<input id="slider" type="range"' in text
    assert "http://" not in text.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in text and "src=" not in text


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--timeline", "--html", "P"], "--timeline needs --checkpoint RUN"),
        (["--timeline", "--checkpoint", "RUN"], "--timeline draws a web page: give --html"),
        (["--timeline", "--checkpoint", "RUN", "--html", "P", "--png", "x.png"], "--png does not"),
        (["--timeline", "--checkpoint", "RUN", "--html", "P", "--json"], "--json does not apply"),
        (["--timeline", "--checkpoint", "RUN", "--html", "P", "--text", "ab"], "--text does not"),
        (["--timeline", "--checkpoint", "RUN", "--html", "P", "--induction-scores"],
         "--induction-scores does not apply to --timeline"),
        (["--timeline", "--checkpoint", "RUN", "--html", "P", "--layer", "1"], "--layer, --head"),
    ],
)  # fmt: skip
def test_timeline_usage_errors_are_one_line_exit_2(induction_run, tmp_path, capsys, args, needle):
    page = tmp_path / "page.html"
    args = [str(page) if a == "P" else str(induction_run) if a == "RUN" else a for a in args]
    assert main(["explain", *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err
    assert not page.exists()


def test_a_run_without_probes_says_what_was_expected_and_how_to_get_them(
    induction_run, tmp_path, capsys
):
    old = shutil.copytree(induction_run, tmp_path / "old")
    (old / PROBES).unlink()  # a run of a selfattn before the timeline
    page = tmp_path / "page.html"
    assert main(["explain", "--checkpoint", str(old), "--timeline", "--html", str(page)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and not page.exists()
    assert f"{old} has no {PROBES}" in err and "Train it again with this version" in err
    with pytest.raises(ValueError, match="has no probes.safetensors"):
        show(old, timeline=True)
    (old / PROBES).write_bytes(b"not safetensors")
    assert main(["explain", "--checkpoint", str(old), "--timeline", "--html", str(page)]) == 2
    assert "truncated or corrupted" in capsys.readouterr().err


def test_a_damaged_probe_file_does_not_stop_a_resume(induction_run, tmp_path, capsys):
    out = shutil.copytree(induction_run, tmp_path / "run")
    (out / PROBES).write_bytes(b"not safetensors")
    assert main(["train", "--resume", str(out), "--iters", "8", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "warning:" in err and "truncated or corrupted" in err and "starts again" in err
    assert read_probes(out).iterations.tolist() == [8]  # a new timeline, from the next one


# --- inline --------------------------------------------------------------------------------------


def test_show_draws_a_timeline_inline_with_its_own_ids(induction_run, tmp_path):
    view = show(induction_run, timeline=True)
    assert isinstance(view, TimelineView)
    assert "3 evaluations, 2 layers x 4 heads on 40 tokens" in repr(view)
    one, two = view._repr_html_(), view._repr_html_()
    assert one != two and "attachShadow" in one and '<input id="slider" type="range"' in one
    view.save(tmp_path / "page.html")
    assert "selfattn timeline" in (tmp_path / "page.html").read_text()


def test_show_timeline_refuses_what_it_cannot_show(induction_run):
    with pytest.raises(TypeError, match=r"folder: show\(run_dir, timeline=True\)"):
        show(str(induction_run))
    with pytest.raises(TypeError, match="expects the folder of a selfattn train run"):
        show(torch.nn.Linear(2, 2), timeline=True)
    with pytest.raises(TypeError, match="takes no layer"):
        show(induction_run, timeline=True, layer=1)


# --- TensorBoard ---------------------------------------------------------------------------------


def _events(folder: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    return events


def _scalars_match_metrics(board: Path, run: Path) -> None:
    _scalars_match_metrics_of(board, run, {"loss/train", "loss/val", "train/lr", "induction/L1H0"})


def _scalars_match_metrics_of(board: Path, run: Path, among: set[str]) -> None:
    """TensorBoard's scalars are metrics.jsonl's, tag by tag, ``among`` them (and the probe's
    scores, ``probe/...``)."""
    events = _events(board)
    logged = {t for t in events.Tags()["scalars"] if not t.startswith("probe/")}
    wanted = {}
    for r in records(run):
        for key, value in r.items():
            if tag(key) is not None:
                wanted.setdefault(tag(key), []).append((r["iter"], value))
    assert logged == set(wanted)
    assert among | {"train/tokens_per_s"} <= logged
    for name, points in wanted.items():  # float32 in the event file: exactly the rounded value
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert got == [(it, float(torch.tensor(v, dtype=torch.float32))) for it, v in points]


def test_tensorboard_gets_the_scalars_of_metrics_jsonl_and_the_probes_images(induction_run):
    board = induction_run.parent / "board"
    _scalars_match_metrics(board, induction_run)
    events = _events(board)
    probes = read_probes(induction_run)  # every head's probe scores, each evaluation, exactly
    for name, scores in (
        ("induction", probes.induction),
        ("previous_token", probes.previous_token),
    ):
        for layer, head in ((0, 3), (1, 2)):
            got = [(e.step, e.value) for e in events.Scalars(f"probe/{name}/L{layer}H{head}")]
            its = probes.iterations.tolist()
            assert got == [(it, float(scores[k, layer, head])) for k, it in enumerate(its)]
    assert set(events.Tags()["images"]) == {"attention/layer0", "attention/layer1"}
    images = events.Images("attention/layer1")
    assert [i.step for i in images] == [2, 4, 6]
    px = 192 // 40
    assert (images[0].height, images[0].width) == (40 * px, 4 * 40 * px + 3 * 2)


def test_a_resumed_run_continues_its_tensorboard_log(tmp_path, capsys):
    out, board = tmp_path / "cut", tmp_path / "board"
    request = TrainRequest(
        "induction", {**SMALL, "threads": 1}, str(out), quiet=True, tensorboard=str(board)
    )
    assert run_train(request, hooks=Hooks(on_step=[_stop_at(3)])) == 130
    # a run killed past its checkpoint (iteration 3) had logged iterations 4 and 5 too
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(board)) as late:
        for step in (4, 5):
            late.add_scalar("loss/train", 99.0, step)
    assert main(["train", "--resume", str(out), "--quiet", "--tensorboard", str(board)]) == 0
    capsys.readouterr()
    _scalars_match_metrics(board, out)  # the resumed run's values alone: 99 is purged


def test_a_tensorboard_folder_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "tb").write_text("")
    out = tmp_path / "run"
    assert main([*INDUCTION, "--out", str(out), "--tensorboard", str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith("is a file: expected a folder for event files") and not out.exists()


def test_tensorboard_without_its_extra_is_one_line_naming_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard fails
    out = tmp_path / "run"
    assert main([*INDUCTION, "--out", str(out), "--tensorboard", str(tmp_path / "tb")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'tensorboard' extra" in err, err
    assert not out.exists() and not (tmp_path / "tb").exists()


def test_a_short_validation_split_is_probed_from_its_start():
    from selfattn.train.data import CharTokenizer
    from selfattn.train.presets import PRESETS
    from selfattn.train.probes import probe_tokens

    tokenizer = CharTokenizer("\nabcxy")
    cfg = PRESETS["tiny"].config.replace(block_size=4)
    long = torch.tensor(tokenizer.encode("ab\n\ncxyab"))
    assert tokenizer.decode(probe_tokens(cfg, tokenizer, long)[0].tolist()) == "cxya"
    short = torch.tensor(tokenizer.encode("abc\nxy"))  # the first line leaves 2 tokens: too few
    assert tokenizer.decode(probe_tokens(cfg, tokenizer, short)[0].tolist()) == "abc\n"


def test_under_two_processes_rank_0_alone_records_the_probes_and_tensorboard(tmp_path):
    import test_data_parallel

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    out, board = tmp_path / "run", tmp_path / "board"
    args = ["train", "--preset", "tiny", "--quiet", "--threads", "1", "--iters", "4",
            "--eval-every", "2", "--eval-iters", "1", "--sample-tokens", "0", "--out", str(out),
            "--tensorboard", str(board)]  # fmt: skip
    ranks = test_data_parallel.launch(["-m", "selfattn"], args)
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr + ranks[1].stderr
    assert len(list(board.glob("events.out.tfevents.*"))) == 1  # one writer: rank 0
    assert read_probes(out).iterations.tolist() == [2, 4]
    _scalars_match_metrics_of(board, out, {"loss/train", "loss/val", "train/lr"})
