"""`selfattn train`'s checkpoints: committed as one unit, checked whole, resumed without surprises.

A kill at any step of a save, a full disk, a damaged header, a state from another run, a moved or
changed text, a run killed before its first checkpoint. Runs are the tiny preset on one thread.
"""

import errno
import hashlib
import itertools
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import pytest
import torch

from selfattn.cli import main
from selfattn.models.gpt import load_weights, weights_state_dict
from selfattn.train import checkpoint
from selfattn.train.checkpoint import TrainState
from selfattn.train.command import TrainRequest, run_train
from selfattn.train.config import TrainConfig
from selfattn.train.data import read_corpus
from selfattn.train.files import CheckpointWriteError
from selfattn.train.loop import Hooks
from selfattn.train.schedule import describe_schedule, learning_rate

TINY = ["train", "--preset", "tiny", "--quiet", "--threads", "1"]


def metrics(run_dir) -> list[dict]:
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def snapshot(folder) -> dict[str, str]:
    """{file name: sha256} of a folder, to show that nothing changed."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(folder).iterdir())
        if p.is_file()
    }


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny run of 20 iterations (checkpoints at 10 and 20), shared read-only: copy it."""
    out = tmp_path_factory.mktemp("checkpoint") / "base"
    assert main([*TINY, "--iters", "20", "--eval-every", "10", "--out", str(out)]) == 0
    return out


@pytest.fixture
def run(base, tmp_path):
    return shutil.copytree(base, tmp_path / "run")


# --- a kill at any moment of a save --------------------------------------------------------------


class Killed(BaseException):
    """A kill in the middle of a save (a BaseException, as KeyboardInterrupt is)."""


def kill_at(monkeypatch, step: int | None) -> itertools.count:
    """Make the ``step``-th disk operation of what follows (an fsync or a rename, counted from
    0) die; None: count them only. A killed fsync loses the file's unflushed half."""
    calls = itertools.count()
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        if next(calls) == step:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.ftruncate(fd, os.fstat(fd).st_size // 2)
            raise Killed
        real_fsync(fd)

    def replace(src, dst):
        if next(calls) == step:
            raise Killed
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return calls


def version(run_dir, base_state: TrainState, n: int) -> tuple[TrainState, object]:
    """The base run's state moved on by ``n``: iteration + n, every weight + n; and its model."""
    state = TrainState(
        base_state.iteration + n,
        {k: v + n for k, v in base_state.model.items()},
        base_state.optimizer,
        base_state.rng,
    )
    model = checkpoint.load_run(run_dir).model
    load_weights(model, state.model)
    return state, model


def committed(run_dir, versions: dict[int, TrainState]) -> int:
    """The iteration of the checkpoint a reader sees, checked to be one whole version."""
    state = checkpoint.load_state(run_dir)
    loaded = checkpoint.load_run(run_dir)
    assert loaded.iteration == state.iteration and state.iteration in versions
    weights = weights_state_dict(loaded.model)
    wanted = versions[state.iteration].model
    assert weights.keys() == state.model.keys() == wanted.keys()
    assert all(torch.equal(weights[k], wanted[k]) and torch.equal(state.model[k], wanted[k])
               for k in wanted)  # fmt: skip
    return state.iteration


def test_a_kill_at_any_step_of_a_save_leaves_one_whole_checkpoint(base, tmp_path, monkeypatch):
    original = checkpoint.load_state(base)
    assert original.iteration == 20
    (one, model_one), (two, model_two) = version(base, original, 1), version(base, original, 2)
    versions = {20: original, 21: one, 22: two}
    with monkeypatch.context() as m:  # how many disk operations a save takes
        calls = kill_at(m, None)
        checkpoint.save_checkpoint(shutil.copytree(base, tmp_path / "probe"), one, model_one)
        steps = next(calls)
    assert steps >= 4  # at least a write and a rename for each of the two files
    seen = set()
    for first, second in itertools.product(range(steps), [None, *range(steps)]):
        run = shutil.copytree(base, tmp_path / f"run{first}-{second}")
        with monkeypatch.context() as m:
            kill_at(m, first)
            with pytest.raises(Killed):
                checkpoint.save_checkpoint(run, one, model_one)
        after_first = committed(run, versions)
        seen.add(after_first)
        with monkeypatch.context() as m:  # the next save, itself killed at any step
            kill_at(m, second)
            if second is None:
                checkpoint.save_checkpoint(run, two, model_two)
            else:
                with pytest.raises(Killed):
                    checkpoint.save_checkpoint(run, two, model_two)
        after_second = committed(run, versions)
        assert after_second >= after_first and (second is not None or after_second == 22)
    assert seen == {20, 21}  # kills before the commit keep the old one, after it the new one


def test_a_reader_racing_a_save_reads_the_new_checkpoint_whole(run, monkeypatch):
    original = checkpoint.load_state(run)
    one, model_one = version(run, original, 1)
    real = checkpoint._read_manifest
    saves = []

    def manifest_then_a_save(run_dir):  # a save commits right after the reader's manifest read
        manifest = real(run_dir)
        if not saves:
            saves.append(21)
            checkpoint.save_checkpoint(run, one, model_one)
        return manifest

    monkeypatch.setattr(checkpoint, "_read_manifest", manifest_then_a_save)
    assert committed(run, {20: original, 21: one}) == 21 and saves


def test_a_killed_save_leaves_nothing_behind_after_the_next_one(run):
    (run / ".model.safetensors.x1y2z3.tmp").write_bytes(b"half a file")
    (run / "train_state.safetensors.new").write_bytes(b"an uncommitted file")
    state = checkpoint.load_state(run)
    checkpoint.save_checkpoint(run, state, checkpoint.load_run(run).model)
    names = {p.name for p in run.iterdir()}
    assert not any(name.endswith((".tmp", ".new")) for name in names), names
    assert checkpoint.load_state(run).iteration == 20


# --- damage, and files that do not fit -----------------------------------------------------------


def _retype_first_tensor(path: Path) -> None:
    """Change one tensor's dtype in the safetensors header from F32 to I32 (same length)."""
    data = bytearray(path.read_bytes())
    end = 8 + int.from_bytes(data[:8], "little")
    assert b'"F32"' in data[:end]
    data[:end] = data[:end].replace(b'"F32"', b'"I32"', 1)
    path.write_bytes(bytes(data))


def test_a_damaged_header_is_refused_by_load_run_and_generate(run, capsys):
    _retype_first_tensor(run / "model.safetensors")
    with pytest.raises(ValueError, match="model.safetensors is truncated or corrupted"):
        checkpoint.load_run(run)
    assert main(["generate", "--checkpoint", str(run), "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated or corrupted" in err


def test_a_state_of_another_width_is_refused_naming_tensors_and_writes_nothing(
    run, tmp_path, capsys
):
    other = tmp_path / "wide"
    assert main([*TINY, "--emb-dim", "64", "--iters", "2", "--out", str(other)]) == 0
    capsys.readouterr()
    for name in ("checkpoint.json", "train_state.safetensors", "model.safetensors"):
        shutil.copy(other / name, run / name)
    before = snapshot(run)
    assert main(["train", "--resume", str(run), "--iters", "200", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train_state.safetensors does not fit" in err
    assert "model.tok_emb.weight saved (65, 64), expected (65, 32)" in err and " more" in err
    assert snapshot(run) == before  # config.json still says 20 iterations, metrics untouched
    assert main(["generate", "--checkpoint", str(run), "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.safetensors does not fit" in err
    assert "config.json: tok_emb.weight saved (65, 64), expected (65, 32); " in err


def test_a_run_of_the_older_format_is_one_clear_line(run, capsys):
    record = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**record, "format": "selfattn-train/1"}))
    assert main(["generate", "--checkpoint", str(run), "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "older selfattn" in err and "selfattn-train/2" in err


# --- writes that fail ----------------------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="names an fd through /proc")
def test_a_full_disk_names_the_file_and_keeps_the_last_checkpoint(run, capsys, monkeypatch):
    real_fsync = os.fsync

    def fsync(fd):  # the disk fills up when a checkpoint is written
        if ".safetensors" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    request = TrainRequest(None, {"iters": 25}, resume=str(run), quiet=True)
    wanted = f"cannot write {run / 'train_state.safetensors'}: No space left on device"
    with pytest.raises(CheckpointWriteError) as caught:
        run_train(request)
    assert str(caught.value) == wanted and caught.value.errno == errno.ENOSPC
    assert main(["train", "--resume", str(run), "--iters", "25", "--quiet"]) == 1
    assert capsys.readouterr().err == f"selfattn train: error: {wanted}\n"
    monkeypatch.undo()
    assert checkpoint.load_state(run).iteration == checkpoint.load_run(run).iteration == 20
    assert not [p.name for p in run.iterdir() if p.name.endswith((".new", ".tmp"))]


@pytest.mark.parametrize("name", ["metrics.jsonl", "samples.txt"])
def test_a_full_disk_under_the_run_log_is_one_line_and_exit_1(run, capsys, monkeypatch, name):
    import builtins

    real_open = builtins.open

    def full_open(file, mode="r", *args, **kwargs):  # the disk fills up when a log grows
        if str(file).endswith(name) and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(file, mode, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", full_open)
    assert main(["train", "--resume", str(run), "--iters", "25", "--quiet"]) == 1
    wanted = f"selfattn train: error: cannot write {run / name}: No space left on device\n"
    assert capsys.readouterr().err == wanted
    monkeypatch.undo()
    assert checkpoint.load_state(run).iteration >= 20


def test_a_read_only_folder_names_the_manifest_and_keeps_the_last_checkpoint(run, monkeypatch):
    def replace(src, dst):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    state = checkpoint.load_state(run)
    model = checkpoint.load_run(run).model
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(CheckpointWriteError, match=r"checkpoint.json: Read-only file system$"):
        checkpoint.save_checkpoint(
            run, TrainState(21, state.model, state.optimizer, state.rng), model
        )
    monkeypatch.undo()
    assert checkpoint.load_state(run).iteration == checkpoint.load_run(run).iteration == 20
    assert not [p.name for p in run.iterdir() if p.name.endswith((".new", ".tmp"))]


def test_a_resume_may_change_the_backend_the_weights_do_not_depend_on_it(run, capsys):
    assert json.loads((run / "config.json").read_text())["train"]["backend"] == "auto"
    assert main(["train", "--resume", str(run), "--iters", "22", "--backend", "tiled"]) == 0
    capsys.readouterr()
    assert json.loads((run / "config.json").read_text())["train"]["backend"] == "tiled"
    assert [r["iter"] for r in metrics(run)][-2:] == [21, 22]
    assert main(["train", "--resume", str(run), "--iters", "23", "--quiet"]) == 0  # tiled, now
    assert main(["generate", "--checkpoint", str(run), "--max-new-tokens", "3"]) == 0


# --- the schedule on resume ----------------------------------------------------------------------


def test_a_resume_with_more_iters_keeps_the_schedule_and_continues_at_min_lr(run, capsys):
    assert json.loads((run / "config.json").read_text())["train"]["decay_iters"] == 20
    assert main(["train", "--resume", str(run), "--iters", "24", "--quiet"]) == 0
    said = capsys.readouterr().out.splitlines()[0]  # the run says which schedule it follows
    assert said == (
        "schedule: warm-up 5, cosine to 0.0003 at iteration 20, then 0.0003 "
        "(resumed at iteration 20, lr 0.0003)"
    )
    records = metrics(run)
    assert [r["lr"] for r in records[20:]] == [3e-4] * 4  # the tiny preset's min_lr, exactly
    assert json.loads((run / "config.json").read_text())["train"]["decay_iters"] == 20


def test_an_explicit_decay_iters_may_stretch_the_schedule_on_resume(run, capsys):
    assert main(["train", "--resume", str(run), "--iters", "22", "--decay-iters", "40"]) == 0
    capsys.readouterr()
    kw = dict(lr=3e-3, min_lr=3e-4, warmup_iters=5, decay_iters=40)
    assert [r["lr"] for r in metrics(run)[20:]] == [learning_rate(i, **kw) for i in (20, 21)]
    assert json.loads((run / "config.json").read_text())["train"]["decay_iters"] == 40


def test_the_schedule_is_described_in_one_line():
    cfg = TrainConfig(iters=3000, warmup_iters=100, decay_iters=2000, min_lr=1e-4)
    line = "schedule: warm-up 100, cosine to 0.0001 at iteration 2000, then 0.0001"
    assert describe_schedule(cfg) == line
    assert describe_schedule(cfg, start=2500) == (
        f"{line} (resumed at iteration 2500, past the decay: 0.0001 from here on)"
    )
    assert describe_schedule(cfg, start=1050) == f"{line} (resumed at iteration 1050, lr 0.00055)"
    assert TrainConfig(iters=60, warmup_iters=5).with_fixed_schedule().decay_iters == 60
    assert TrainConfig(iters=4, warmup_iters=5).with_fixed_schedule().decay_iters == 5


# --- folders and paths ---------------------------------------------------------------------------


def test_a_text_file_run_resumes_from_any_folder_and_refuses_a_changed_text(
    tmp_path, capsys, monkeypatch
):
    work = tmp_path / "work"
    work.mkdir()
    text = work / "notes.txt"
    text.write_text(read_corpus(None).text[:20_000], encoding="utf-8")
    out = tmp_path / "run"
    monkeypatch.chdir(work)
    assert main([*TINY, "--text-file", "notes.txt", "--iters", "4", "--out", str(out)]) == 0
    assert json.loads((out / "config.json").read_text())["train"]["text_file"] == str(
        text.resolve()
    )
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--resume", str(out), "--iters", "6", "--quiet"]) == 0
    capsys.readouterr()
    text.write_text(text.read_text() + "one more line\n", encoding="utf-8")
    before = snapshot(out)
    assert main(["train", "--resume", str(out), "--iters", "8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(text.resolve()) in err and "changed" in err
    text.unlink()
    assert main(["train", "--resume", str(out), "--iters", "8", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert str(text.resolve()) in err and "gone" in err and "--text-file" not in err
    assert snapshot(out) == before


def test_a_run_killed_before_its_first_checkpoint_starts_again_without_force(tmp_path, capsys):
    out = tmp_path / "run"

    def kill(record):
        if record["iter"] == 3:  # before the first checkpoint, at 20
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_train(TrainRequest("tiny", {"threads": 1}, str(out), quiet=True), Hooks(on_step=[kill]))
    assert (out / "config.json").exists() and not (out / "checkpoint.json").exists()
    assert main(["train", "--resume", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "nothing to resume" in err and "without --resume" in err
    assert main([*TINY, "--out", str(out), "--iters", "3"]) == 0
    assert checkpoint.load_state(out).iteration == 3


def test_generate_says_when_it_crops_the_prompt_or_clips_top_k(base, capsys):
    prompt = "ROMEO:\n" * 8  # 56 characters, over the tiny model's context of 32
    args = ["generate", "--checkpoint", str(base), "--prompt", prompt, "--seed", "1"]
    assert main([*args, "--max-new-tokens", "2", "--top-k", "1000"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith(prompt)
    assert "prompt is 56 tokens, over the model's context of 32: cropped" in captured.err
    assert "--top-k 1000 is over the vocabulary of 65 tokens: clipped to 65" in captured.err
