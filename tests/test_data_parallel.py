"""Data-parallel training: 2 gloo processes (loopback, one thread each) on the tiny preset.

The processes are started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR, ...), without
torchrun itself: what is tested is what `selfattn train` does with that environment.
"""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(code: list[str], args: list[str], world: int = 2) -> list[subprocess.CompletedProcess]:
    """Run ``python *code *args`` as ``world`` processes of one run; their results by rank."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
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
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=TIMEOUT_S)
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    return results


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


def test_a_rank_that_dies_makes_the_other_exit_with_a_clear_error(tmp_path):
    started = time.monotonic()
    ranks = launch(["-c", DYING], ["train", *ITERS, "--out", str(tmp_path / "run")])
    assert time.monotonic() - started < 60
    assert ranks[1].returncode == 3
    assert ranks[0].returncode == 1
    message = ranks[0].stderr.strip().splitlines()[-1]
    assert message.startswith("selfattn train: error: PeerFailure: rank 0 of 2: another process")
