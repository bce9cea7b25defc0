"""Data-parallel training: 2 gloo processes (loopback, one thread each) on the tiny preset.

The processes are started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR, ...), without
torchrun itself: what is tested is what `selfattn train` does with that environment.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed

from selfattn.cli import main

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

ITERS = ["--preset", "tiny", "--quiet", "--threads", "1", "--iters", "20", "--eval-every", "10"]
TIMEOUT_S = 90  # each process; a hang fails the test instead of the suite

# Rank 1 dies (os._exit) after iteration 5; everything else is `selfattn train`.
DYING = """
import os, sys
import selfattn.train.command as command
from selfattn.cli import main
from selfattn.train.loop import Hooks

run_train = command.run_train

def die(record):
    if os.environ["RANK"] == "1" and record["iter"] == 5:
        os._exit(3)

command.run_train = lambda req, hooks=None: run_train(req, Hooks(on_step=[die]))
sys.exit(main(sys.argv[1:]))
"""


# `selfattn train` with test switches, by environment variable: MASKS=1 prints the hash of the
# first dropout mask; STOP_AT=k: each rank sends itself SIGINT after iteration k; TIMEOUT_S lowers
# the process group's timeout; in rank 0's first checkpoint save, SLOW_SAVE=s sleeps s seconds,
# SAVE_THEN=die exits, SAVE_THEN=freeze stops the process (SIGSTOP: no more beats).
HARNESS = """
import hashlib, os, signal, sys, time
import torch
import selfattn.train.checkpoint as checkpoint
import selfattn.train.command as command
import selfattn.train.data_parallel as data_parallel
from selfattn.cli import main
from selfattn.train.loop import Hooks

env, rank = os.environ, int(os.environ["RANK"])
timeout_s, from_env = float(env.get("TIMEOUT_S", "45")), data_parallel.DataParallel.from_env
data_parallel.DataParallel.from_env = lambda device="cpu": from_env(device, timeout_s)
masks, saves = [], []
dropout, save = torch.nn.functional.dropout, checkpoint.save_checkpoint

def first_mask(x, p=0.5, training=True, inplace=False):
    out = dropout(x, p, training, inplace)
    if training and p > 0 and not masks:
        masks.append(hashlib.sha256((out == 0).numpy().tobytes()).hexdigest())
    return out

def slow_save(*args, **kwargs):
    if rank == 0 and not saves:
        saves.append(1)
        time.sleep(float(env.get("SLOW_SAVE", "0")))
        if env.get("SAVE_THEN") == "die":
            os._exit(3)
        if env.get("SAVE_THEN") == "freeze":
            os.kill(os.getpid(), signal.SIGSTOP)
    return save(*args, **kwargs)

def stop(record):
    if record["iter"] == int(env.get("STOP_AT", "0")):  # torchrun signals every rank
        os.kill(os.getpid(), signal.SIGINT)

torch.nn.functional.dropout, checkpoint.save_checkpoint = first_mask, slow_save
run_train = command.run_train
command.run_train = lambda req, hooks=None: run_train(req, Hooks(on_step=[stop]))
status = main(sys.argv[1:])
if env.get("MASKS"):
    print("mask", masks[0])
sys.exit(status)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(
    code: list[str], args: list[str], world: int = 2, **switches: str
) -> list[subprocess.CompletedProcess]:
    """Run ``python *code *args`` as ``world`` processes of one run (``switches`` added to their
    environment); their results by rank. The last rank is waited for first: a rank 0 that was
    frozen is killed after the others are done."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
        env |= switches
        env |= dict(LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        env |= dict(OMP_NUM_THREADS="1")
        if sys.platform.startswith("linux"):
            env["GLOO_SOCKET_IFNAME"] = "lo"
        procs.append(
            subprocess.Popen(
                [sys.executable, *code, *args],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    results = {}
    try:
        for rank in reversed(range(world)):
            proc = procs[rank]
            if rank == 0 and switches.get("SAVE_THEN") == "freeze":
                proc.kill()
            out, err = proc.communicate(timeout=TIMEOUT_S)
            results[rank] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return [results[rank] for rank in range(world)]


def losses(run_dir: Path) -> list[tuple[int, float, float | None]]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["iter"], r["train_loss"], r.get("val_loss")) for r in records]


def test_two_processes_take_the_steps_of_one(tmp_path, capsys):
    single, double = tmp_path / "single", tmp_path / "double"
    assert main(["train", *ITERS, "--out", str(single)]) == 0
    capsys.readouterr()
    ranks = launch(["-m", "selfattn"], ["train", *ITERS, "--out", str(double)])
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr + ranks[1].stderr
    assert "done: 20 iterations" in ranks[0].stdout
    assert ranks[1].stdout == ""  # only rank 0 reports
    one, two = losses(single), losses(double)
    assert [i for i, _, _ in two] == list(range(1, 21))
    for (_, a, va), (_, b, vb) in zip(one, two, strict=True):
        assert a == pytest.approx(b, abs=1e-4)
        assert (va is None) == (vb is None)
        if va is not None:
            assert va == pytest.approx(vb, abs=1e-4)
    assert (double / "model.safetensors").exists()
    # Resumed with another number of processes: the one-process run, continued by two, takes the
    # steps of its copy continued by one (the batches' stream and AdamW's state carry over; the
    # dropout streams, here off, would be reseeded per rank from (seed, rank, iteration)). The
    # two run --compile (torch.compile of DDP's module): the same steps too.
    copy = shutil.copytree(single, tmp_path / "copy")
    assert main(["train", "--resume", str(copy), "--iters", "24", "--quiet"]) == 0
    capsys.readouterr()
    resume = ["train", "--resume", str(single), "--iters", "24", "--quiet", "--compile"]
    ranks = launch(["-m", "selfattn"], resume)
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr + ranks[1].stderr
    one, two = losses(copy), losses(single)
    assert [i for i, _, _ in two] == list(range(1, 25))
    for (_, a, _), (_, b, _) in zip(one[20:], two[20:], strict=True):
        assert a == pytest.approx(b, abs=1e-4)


def test_a_rank_that_dies_makes_the_other_exit_with_a_clear_error(tmp_path):
    started = time.monotonic()
    ranks = launch(["-c", DYING], ["train", *ITERS, "--out", str(tmp_path / "run")])
    assert time.monotonic() - started < 60
    assert ranks[1].returncode == 3
    assert ranks[0].returncode == 1
    message = ranks[0].stderr.strip().splitlines()[-1]
    assert message.startswith("selfattn train: error: PeerFailure: rank 0 of 2: another process")


DROPOUT = ["--preset", "tiny", "--quiet", "--threads", "1", "--dropout", "0.2", "--eval-every", "4"]
DROPOUT += ["--eval-iters", "1", "--sample-tokens", "0"]


def test_each_rank_draws_its_own_dropout_masks_and_a_stopped_run_resumes_bitwise(tmp_path):
    """Two processes: their dropout masks differ; stopped after iteration 3 and resumed, the run
    equals one never stopped, bit for bit (every loss, and the final weights)."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    ranks = launch(["-c", HARNESS], ["train", *DROPOUT, "--iters", "8", "--out", str(whole)],
                   MASKS="1")  # fmt: skip
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr + ranks[1].stderr
    masks = [r.stdout.split("mask ")[1].strip() for r in ranks]
    assert masks[0] != masks[1]
    ranks = launch(["-c", HARNESS], ["train", *DROPOUT, "--iters", "8", "--out", str(cut)],
                   STOP_AT="3")  # fmt: skip
    assert [r.returncode for r in ranks] == [130, 130], ranks[0].stderr + ranks[1].stderr
    assert [i for i, _, _ in losses(cut)] == [1, 2, 3]
    ranks = launch(["-m", "selfattn"], ["train", "--resume", str(cut), "--quiet"])
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr + ranks[1].stderr
    assert losses(cut) == losses(whole)
    from safetensors.torch import load_file

    a, b = load_file(whole / "model.safetensors"), load_file(cut / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_rank_0_writing_alone_for_longer_than_the_timeout_trips_nothing(tmp_path):
    """Rank 0's first checkpoint takes 7 s, the process group's timeout is 3 s: the other rank
    waits on rank 0's beats, not in a collective, and the run ends well."""
    args = ["train", *ITERS, "--iters", "4", "--eval-every", "2", "--out", str(tmp_path / "run")]
    ranks = launch(["-c", HARNESS], args, TIMEOUT_S="3", SLOW_SAVE="7")
    assert [r.returncode for r in ranks] == [0, 0], ranks[0].stderr + ranks[1].stderr
    assert "done: 4 iterations" in ranks[0].stdout


@pytest.mark.parametrize("then", ["die", "freeze"])
def test_a_rank_0_that_dies_or_freezes_while_writing_alone_is_reported(tmp_path, then):
    """Rank 0 dies (its store goes with it) or freezes (its beats stop) inside its first
    checkpoint: the waiting rank says so within the timeout, exit 1."""
    args = ["train", *ITERS, "--iters", "4", "--eval-every", "2", "--out", str(tmp_path / "run")]
    started = time.monotonic()
    ranks = launch(["-c", HARNESS], args, TIMEOUT_S="3", SAVE_THEN=then)
    assert time.monotonic() - started < 40
    assert ranks[1].returncode == 1, ranks[1].stderr
    message = ranks[1].stderr.strip().splitlines()[-1]
    assert message.startswith("selfattn train: error: PeerFailure: rank 1 of 2")
