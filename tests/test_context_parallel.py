"""Context-parallel training (issue 17): each sequence split across gloo processes (loopback, one
thread each), every attention layer on ring attention.

The processes are started as torchrun starts them (`test_data_parallel.launch`); the model test
runs on `selfattn.ring.run_local`. Each has a process-group timeout and a subprocess timeout.
"""

import json
import shutil

import pytest
import torch
import torch.distributed
from test_data_parallel import launch, losses
from tolerances import SAME_MODEL_F32, STORED_F16, TRAIN_LOSS_ABS

from selfattn.cli import main
from selfattn.probe_file import read_probes

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="needs torch.distributed with gloo",
)

# 6 iterations in all (a run stopped at 3 resumes to 6 on the same schedule), evaluations at 3, 6
TINY = ["--preset", "tiny", "--quiet", "--threads", "1", "--eval-every", "3", "--eval-iters", "2"]
TINY += ["--warmup-iters", "2", "--decay-iters", "6", "--sample-tokens", "8"]


# ------------------------------------------------------------------------------ the model side


def _sharded_gpt(tol: dict) -> bool:
    """(In each of 2 ranks.) The GPT on zigzag shards against the one-process GPT: logits,
    gradients (summed over the ranks) and greedy sampling; raises on a difference."""
    import torch.distributed as dist

    from selfattn.models.gpt import GPT, GPTConfig
    from selfattn.ring import shard_sequence

    rank, ranks = dist.get_rank(), dist.get_world_size()
    cfg = GPTConfig(vocab_size=11, context_length=16, emb_dim=16, n_heads=2, n_layers=2)
    torch.manual_seed(0)
    whole = GPT(cfg).eval()  # eval: no dropout (drop_rate is the chapter's 0.1)
    torch.manual_seed(0)
    sharded = GPT(cfg, context_parallel_group=dist.group.WORLD).eval()
    idx = torch.randint(11, (2, 12), generator=torch.Generator().manual_seed(1))  # T = 12 < 16
    logits = whole(idx)  # (2, 12, 11)
    logits.square().mean().backward()
    mine = sharded(shard_sequence(idx, rank, ranks, dim=1))  # (2, 6, 11): tokens 0-2 and 9-11
    torch.testing.assert_close(mine, shard_sequence(logits, rank, ranks, dim=1), **tol)
    (mine.square().sum() / logits.numel()).backward()  # this rank's share of the same loss
    expected = dict(whole.named_parameters())
    for name, p in sharded.named_parameters():
        dist.all_reduce(p.grad)
        torch.testing.assert_close(p.grad, expected[name].grad, **tol, msg=name)
    prompt = idx[:1, :3]  # sampled on this rank alone, on the whole model
    assert torch.equal(sharded.generate(prompt, 5, temperature=0), whole.generate(prompt, 5, 0))
    assert sharded.context_parallel_group is dist.group.WORLD  # and the group is back
    return True


def test_the_gpt_on_zigzag_shards_is_the_gpt_on_whole_sequences():
    from selfattn.ring import run_local

    assert run_local(_sharded_gpt, 2, SAME_MODEL_F32, timeout=90, group_timeout=30) == [True] * 2


# ----------------------------------------------------------------------------------- training


def _assert_same_losses(got, expected):
    assert [i for i, _, _ in got] == [i for i, _, _ in expected]
    for (i, a, va), (_, b, vb) in zip(got, expected, strict=True):
        assert a == pytest.approx(b, abs=TRAIN_LOSS_ABS), f"iteration {i}"
        assert (va is None) == (vb is None), f"iteration {i}"
        if va is not None:
            assert va == pytest.approx(vb, abs=TRAIN_LOSS_ABS), f"iteration {i}"


def _ok(ranks):
    assert all(r.returncode == 0 for r in ranks), "\n".join(r.stderr for r in ranks)


def test_context_parallel_runs_take_one_process_steps_and_resume_anywhere(tmp_path, capsys):
    """P=2, C=2 for 3 iterations, then resumed to 6 at P=4 (C=2 x data 2) and, from a copy, in
    one process: every loss (train and validation) is the uninterrupted one-process run's; the
    folder is an ordinary run's, which generate and explain read."""
    single, cp = tmp_path / "single", tmp_path / "cp"
    assert main(["train", *TINY, "--iters", "6", "--out", str(single)]) == 0
    expected = losses(single)
    ranks = launch(["-m", "selfattn"], ["train", *TINY, "--iters", "3", "--out", str(cp),
                                        "--context-parallel", "2"])  # fmt: skip
    _ok(ranks)
    assert "2 processes = 1 data-parallel replica x 2 ranks per sequence" in ranks[0].stderr
    assert ranks[1].stdout == "" and "context parallel" not in ranks[1].stderr
    _assert_same_losses(losses(cp), expected[:3])
    assert sorted(p.name for p in cp.iterdir()) == sorted(p.name for p in single.iterdir())
    config, one = (json.loads((d / "config.json").read_text()) for d in (cp, single))
    assert config["train"]["iters"] == 3
    config["train"]["iters"] = 6  # the only difference: --iters 3 here, 6 there
    assert config == one
    assert (cp / "samples.txt").read_text().startswith("=== iteration 3 ===")

    copy = shutil.copytree(cp, tmp_path / "copy")
    assert main(["train", "--resume", str(copy), "--iters", "6", "--quiet"]) == 0
    _assert_same_losses(losses(copy), expected)

    ranks = launch(["-m", "selfattn"], ["train", "--resume", str(cp), "--iters", "6", "--quiet",
                                        "--context-parallel", "2"], world=4)  # fmt: skip
    _ok(ranks)
    assert "4 processes = 2 data-parallel replicas x 2 ranks per sequence" in ranks[0].stderr
    _assert_same_losses(losses(cp), expected)
    # each evaluation's sample, drawn by rank 0 alone on the whole model, is one process's
    assert (cp / "samples.txt").read_text() == (single / "samples.txt").read_text()
    # and so is the timeline's probe (rank 0 alone, float16)
    probes, one = read_probes(cp), read_probes(single)
    assert probes.iterations.tolist() == one.iterations.tolist()
    torch.testing.assert_close(probes.attention.float(), one.attention.float(), **STORED_F16)

    capsys.readouterr()
    assert main(["generate", "--checkpoint", str(cp), "--max-new-tokens", "5", "--seed", "1"]) == 0
    assert main(["explain", "--checkpoint", str(cp), "--text", "To be", "--json"]) == 0
    assert capsys.readouterr().out


# Saves each rank's first dropout mask (the embeddings') to MASKS/<rank>.pt.
MASK_HARNESS = """
import os, sys
import torch
from selfattn.cli import main

dropout, saved = torch.nn.functional.dropout, []

def first_mask(x, p=0.5, training=True, inplace=False):
    out = dropout(x, p, training, inplace)
    if training and p > 0 and not saved:
        saved.append(1)
        torch.save(out == 0, os.path.join(os.environ["MASKS"], os.environ.get("RANK", "0") + ".pt"))
    return out

torch.nn.functional.dropout = first_mask
sys.exit(main(sys.argv[1:]))
"""


def test_each_rank_draws_its_own_dropout_masks_not_one_process_s(tmp_path, monkeypatch):
    """With dropout, rank 0's and rank 1's masks differ, and rank 0's is not one process's mask
    on the same tokens (the same seed and rank would draw it; context-parallel ranks have
    streams of their own)."""
    from selfattn.ring import shard_positions

    args = ["train", *TINY, "--iters", "1", "--dropout", "0.2"]
    masks = []
    dropout = torch.nn.functional.dropout

    def first_mask(x, p=0.5, training=True, inplace=False):
        out = dropout(x, p, training, inplace)
        if training and p > 0 and not masks:
            masks.append(out == 0)
        return out

    monkeypatch.setattr(torch.nn.functional, "dropout", first_mask)
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    monkeypatch.undo()
    cp_args = [*args, "--out", str(tmp_path / "cp"), "--context-parallel", "2"]
    ranks = launch(["-c", MASK_HARNESS], cp_args, MASKS=str(tmp_path))
    _ok(ranks)
    assert "acts on the embeddings and shortcuts only" in ranks[0].stderr
    whole = masks[0]  # (8, 32, 32): batch, tokens, embedding
    shard0, shard1 = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))  # (8, 16, 32) each
    assert shard0.shape == shard1.shape == (8, 16, 32)
    assert not torch.equal(shard0, shard1)
    same = (shard0 == whole[:, shard_positions(0, 2, 32)]).all(dim=-1)  # (8, 16): per token
    assert not same.any(), same.nonzero().tolist()  # the same seed would give row 0's first 8
    rate = torch.cat([shard0, shard1]).float().mean().item()
    assert 0.15 < rate < 0.25  # still dropout at 0.2


# --------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("env", "extra", "message"),
    [
        ({}, [], "start them with torchrun"),
        ({"WORLD_SIZE": "3"}, [], "--context-parallel 2 must divide the 3 processes torchrun "
         "started (the rest is data parallel): use one of 1, 3"),
        ({"WORLD_SIZE": "2"}, ["--block-size", "30"], "--block-size 30 cannot be cut into the "
         "2C = 4 zigzag chunks of --context-parallel 2: use a multiple of 4 (e.g. 28 or 32)"),
        ({"WORLD_SIZE": "2"}, ["--backend", "naive"], "--backend naive cannot"),
        ({"WORLD_SIZE": "2"}, ["--backend", "sdpa"], "need an engine that returns the "
         "log-sum-exp; --backend sdpa cannot"),
        ({"WORLD_SIZE": "4"}, ["--batch-size", "3"], "--batch-size 3 must be divisible by the "
         "2 data-parallel replicas"),
        ({"WORLD_SIZE": "2"}, ["--compile"], "--context-parallel does not run under --compile"),
    ],
)  # fmt: skip
def test_settings_context_parallelism_cannot_run_are_one_line_and_exit_2(
    tmp_path, capsys, monkeypatch, env, extra, message
):
    """Refused before any process group is joined or file written."""
    for name in ("RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    if env:
        monkeypatch.setenv("RANK", "0")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    out = tmp_path / "run"
    args = ["train", *TINY, "--iters", "2", "--out", str(out), "--context-parallel", "2", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("selfattn train: error: "), err
    assert message in err[0]
    assert not out.exists()
    assert not torch.distributed.is_initialized()


def test_the_induction_task_is_refused_under_context_parallelism(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = ["train", "--preset", "induction", "--context-parallel", "2", "--out", str(tmp_path)]
    assert main(args) == 2
    assert "does not run the induction task" in capsys.readouterr().err
