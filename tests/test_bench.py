"""`selfattn bench`: the quick preset end to end, bad input, FLOP counts, --compare, and the
correctness gate that keeps a wrong contender from being timed. No assertion here is on a time."""

from __future__ import annotations

import json
import re

import pytest
import torch
import torch.nn.functional as F
from bench_scripts import load_benchmark

from selfattn.bench import (
    BenchConfig,
    Built,
    Case,
    Contender,
    Measurement,
    Results,
    SkipContender,
    attention_flops,
    layer_flops,
    projection_flops,
    run_benchmark,
    write_json,
)
from selfattn.bench.contenders import ProjectedKernel
from selfattn.bench.presets import resolve
from selfattn.bench.results import STATUSES
from selfattn.bench.runner import _extrapolate
from selfattn.cli import main

SELFATTN = ("mha-auto", "mha-sdpa", "mha-tiled", "mha-naive", "wrapper-naive")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # x-transformers' torch.jit.script
def test_quick_preset_smoke(tmp_path, capsys):
    out, png = tmp_path / "out.json", tmp_path / "out.png"
    args = ["bench", "--preset", "quick", "--json", str(out), "--plot", str(png)]
    # a generous per-call budget: a loaded CI machine must not stop a contender early
    assert main([*args, "--time-budget", "60"]) == 0
    printed = capsys.readouterr().out
    assert "× torch-mha" in printed and "matmul peak" in printed
    data = json.loads(out.read_text())
    env = data["environment"]
    for key in ("torch", "device", "threads", "cpu", "python"):
        assert env[key]
    assert data["matmul_peak"]["fp32"]["gflops"] > 0
    assert "4·B·H·L²·E" in data["flop_formula"]

    measurements = data["measurements"]
    named = {m["contender"] for m in measurements}
    assert set(data["settings"]["contenders"]) == named
    assert len({m["case"]["length"] for m in measurements}) == 2
    for m in measurements:
        assert m["status"] in STATUSES
        if m["status"] == "ok":  # figures, after a passed correctness check
            assert m["median_s"] > 0 and m["q1_s"] <= m["median_s"] <= m["q3_s"]
            assert len(m["samples_s"]) == data["settings"]["repeats"]
            assert m["flops"] > 0 and m["gflops_per_s"] > 0 and m["peak_fraction"] > 0
            assert m["tokens_per_s"] > 0 and m["ratio"] > 0
            assert m["max_error"] <= m["tolerance"]
            assert m["memory_bytes"] is not None
        else:
            assert m["reason"], m
    for m in measurements:  # every selfattn module ran and matched the float64 reference
        if m["contender"] in SELFATTN:
            assert m["status"] == "ok", m
        if m["contender"] == "torch-mha":
            assert m["ratio"] == 1.0
    flex = [m for m in measurements if m["contender"] == "flex"]
    assert flex and all(m["status"] == "skipped" for m in flex)
    assert png.stat().st_size > 0


def _measurement(contender, median, spread, status="ok"):
    return Measurement(
        case=Case(1, 2, 64, 8, True, "fp32").to_dict(),
        contender=contender,
        pass_="fwd",
        status=status,
        samples_s=[median - spread, median, median + spread],
        median_s=median,
        q1_s=median - spread / 2,
        q3_s=median + spread / 2,
        min_s=median - spread,
        max_s=median + spread,
    )


def _results(*measurements):
    return Results(
        settings={"preset": "quick", "baseline": "a", "kind": "layer"},
        environment={"cpu": "test cpu", "torch": torch.__version__, "device": "cpu"},
        peaks={"fp32": {"n": 512, "seconds": 1.0, "gflops": 1.0}},
        measurements=list(measurements),
        notes=[],
    )


def test_compare_flags_an_injected_regression(tmp_path, capsys):
    old, new, same = tmp_path / "old.json", tmp_path / "new.json", tmp_path / "same.json"
    write_json(_results(_measurement("a", 1.0, 0.02), _measurement("b", 2.0, 0.02)), old)
    # a: 50% slower, far outside both spreads; b: 3% slower, within noise.
    write_json(_results(_measurement("a", 1.5, 0.02), _measurement("b", 2.06, 0.02)), new)
    assert main(["bench", "--compare", str(old), str(new)]) == 1
    printed = capsys.readouterr().out
    assert "REGRESSION" in printed and "1 regression(s)" in printed
    assert "within noise" in printed

    # 15% slower but inside a wide spread: not flagged.
    write_json(_results(_measurement("a", 1.15, 0.6), _measurement("b", 2.0, 0.02)), same)
    assert main(["bench", "--compare", str(old), str(same)]) == 0
    assert "0 regression(s)" in capsys.readouterr().out


def test_compare_refuses_runs_of_different_presets(capsys):
    assert main(["bench", "--compare", "docs/bench/book.json", "docs/bench/decode.json"]) == 2
    assert "different presets" in capsys.readouterr().err


def test_compare_rejects_a_file_that_is_not_a_bench_run(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text('{"hello": 1}')
    assert main(["bench", "--compare", str(bad), str(bad)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--preset", "nope"], "quick"),
        (["--contenders", "mha-auto,bogus"], "mha-naive"),
        (["--dtype", "fp16"], "bf16"),
        (["--baseline", "bogus"], "torch-mha"),
        (["--lengths", "0"], "positive"),
        (["--lengths", "abc"], "positive"),
        (["--lengths", "4194304"], "largest"),
        (["--batch", "4096", "--lengths", "65536", "--head-dim", "256"], "memory budget"),
        (["--repeats", "-1"], "positive integer"),
        (["--passes", "sideways"], "fwd+bwd"),
        (["--preset", "decode", "--contenders", "sdpa"], "mha-auto+cache"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    assert main(["bench", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("selfattn")
    assert needle in err


def test_more_threads_than_cores_is_a_one_line_warning_and_the_run_goes_on(
    tmp_path, capsys, monkeypatch
):
    import os

    monkeypatch.setattr(os, "cpu_count", lambda: 1)
    args = ["bench", "--contenders", "mha-naive,torch-mha", "--lengths", "16", "--batch", "1"]
    args += ["--heads", "1", "--head-dim", "8", "--repeats", "1", "--warmup", "0", "--no-memory"]
    out = tmp_path / "run.json"
    assert main([*args, "--threads", "2", "--quiet", "--json", str(out)]) == 0
    err = capsys.readouterr().err
    assert err == "selfattn bench: warning: --threads 2 is more than this machine's 1 core\n"
    assert json.loads(out.read_text())["environment"]["threads"] == 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_a_gpu_is_a_usage_error(capsys):
    assert main(["bench", "--device", "cuda"]) == 2
    assert "CUDA" in capsys.readouterr().err


def test_missing_matplotlib_is_one_line_naming_the_extra(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name)
    )
    assert main(["bench", "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "selfattn[bench]" in err


def test_flop_formula():
    full = Case(batch=2, heads=3, length=16, head_dim=8, causal=False, dtype="fp32")
    causal = Case(batch=2, heads=3, length=16, head_dim=8, causal=True, dtype="fp32")
    assert attention_flops(full, "fwd") == 4 * 2 * 3 * 16**2 * 8
    assert attention_flops(causal, "fwd") == attention_flops(full, "fwd") / 2
    assert attention_flops(full, "fwd+bwd") == 3.5 * attention_flops(full, "fwd")
    d = 3 * 8
    assert projection_flops(full, 4, "fwd") == 4 * 2 * 2 * 16 * d * d
    assert projection_flops(full, 4, "fwd+bwd") == 3 * projection_flops(full, 4, "fwd")
    assert layer_flops(causal, 3, "fwd") == attention_flops(causal, "fwd") + projection_flops(
        causal, 3, "fwd"
    )


def test_extrapolation_follows_the_measured_growth():
    assert _extrapolate([(128, 1.0)], 256) == pytest.approx(4.0)  # quadratic from one point
    assert _extrapolate([(128, 1.0), (256, 2.0)], 512) == pytest.approx(4.0)  # linear so far


class _Counting:
    """Wraps a layer and counts its calls."""

    def __init__(self, fn):
        self.fn, self.calls = fn, 0

    def __call__(self, x):
        self.calls += 1
        return self.fn(x)


def test_a_wrong_contender_is_reported_and_never_timed():
    counters = {}

    def build_wrong(case, w, device):  # forgets the causal mask
        def kernel(q, k, v):
            return F.scaled_dot_product_attention(q, k, v)

        m = ProjectedKernel(case, w, kernel).to(case.torch_dtype).eval()
        counters["wrong"] = _Counting(m)
        return Built(fn=counters["wrong"], module=m)

    def build_crash(case, w, device):
        raise RuntimeError("kaboom")

    def build_skip(case, w, device):
        raise SkipContender("not here")

    config = BenchConfig(
        preset="quick",
        contenders=(
            "mha-auto",
            Contender("wrong", "forgets the causal mask", build_wrong),
            Contender("crash", "raises", build_crash),
            Contender("skip", "does not apply", build_skip),
        ),
        lengths=(64,),
        repeats=2,
        measure_memory=False,
    )
    results = run_benchmark(config)
    by = {(m.contender, m.pass_): m for m in results.measurements}
    for p in ("fwd", "fwd+bwd"):
        wrong = by[("wrong", p)]
        assert wrong.status == "wrong" and "WRONG" in wrong.reason
        assert wrong.max_error > wrong.tolerance
        assert wrong.samples_s == [] and wrong.median_s is None and wrong.ratio is None
        assert by[("crash", p)].status == "error" and "kaboom" in by[("crash", p)].reason
        assert by[("skip", p)].status == "skipped" and by[("skip", p)].reason == "not here"
        ok = by[("mha-auto", p)]
        assert ok.status == "ok" and len(ok.samples_s) == 2 and ok.ratio == 1.0
    assert counters["wrong"].calls == 1  # the correctness check, and nothing after it


def test_a_contender_over_the_time_budget_stops_for_longer_lengths():
    config = BenchConfig(
        preset="quick",
        contenders=("mha-naive",),
        lengths=(32, 64),
        passes=("fwd",),
        time_budget_s=1e-9,
        measure_memory=False,
    )
    results = run_benchmark(config)
    first, second = results.measurements
    assert first.status == second.status == "stopped"
    assert "budget" in first.reason and "budget" in second.reason


def test_decode_preset_small(tmp_path):
    config = BenchConfig(
        preset="decode",
        contenders=("mha-auto", "mha-auto+cache", "mha-naive+cache", "torch-mha"),
        heads=(2,),
        head_dim=(8,),
        prompt=16,
        new_tokens=12,
        layers=2,
        repeats=1,
    )
    results = run_benchmark(config)
    by = {m.contender: m for m in results.measurements}
    for m in by.values():
        assert m.status == "ok", m
        assert m.max_error <= m.tolerance and m.tokens_per_s > 0
    assert by["mha-auto"].ratio == 1.0
    assert by["mha-auto+cache"].extra["cache"] is True
    write_json(results, tmp_path / "decode.json")
    assert json.loads((tmp_path / "decode.json").read_text())["settings"]["kind"] == "decode"


# ----------------------------------------------------------------------------- the correctness gate


def _sdpa_layer(case, w, kernel):
    return ProjectedKernel(case, w, kernel).to(case.torch_dtype).eval()


def _causal_sdpa(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_a_contender_wrong_on_one_late_row_only_is_wrong():
    """1e-4 off on the last row alone: the old measure (largest absolute error over the
    largest reference value) could not see it; the worst row's relative error does."""

    def build(case, w, device):
        m = _sdpa_layer(case, w, _causal_sdpa)

        def fn(x):
            y = m(x).clone()
            y[:, -1] = y[:, -1] * (1 + 1e-4)
            return y

        return Built(fn=fn, module=m)

    config = BenchConfig(
        preset="quick",
        contenders=("mha-auto", Contender("late-row", "off on the last row", build)),
        lengths=(96,),
        repeats=1,
        measure_memory=False,
    )
    by = {(m.contender, m.pass_): m for m in run_benchmark(config).measurements}
    for p in ("fwd", "fwd+bwd"):
        wrong, ok = by[("late-row", p)], by[("mha-auto", p)]
        assert wrong.status == "wrong" and wrong.max_error > wrong.tolerance
        assert wrong.samples_s == [] and wrong.median_s is None
        assert ok.status == "ok" and ok.max_error < ok.tolerance / 10


class _WrongBackward(torch.autograd.Function):
    """Causal attention with a correct forward and a gradient of v that is 1% too large."""

    calls = 0

    @staticmethod
    def forward(ctx, q, k, v):
        ctx.save_for_backward(q, k, v)
        return _causal_sdpa(q, k, v)

    @staticmethod
    def backward(ctx, grad):
        _WrongBackward.calls += 1
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_(True) for t in ctx.saved_tensors)
            dq, dk, dv = torch.autograd.grad(_causal_sdpa(q, k, v), (q, k, v), grad)
        return dq, dk, dv * 1.01


def test_a_contender_with_a_wrong_backward_is_wrong_and_its_backward_never_timed():
    def build(case, w, device):
        m = _sdpa_layer(case, w, _WrongBackward.apply)
        return Built(fn=m, module=m)

    _WrongBackward.calls = 0
    config = BenchConfig(
        preset="quick",
        contenders=("mha-auto", Contender("bad-grad", "wrong dv", build)),
        lengths=(64,),
        repeats=2,
        measure_memory=False,
    )
    by = {(m.contender, m.pass_): m for m in run_benchmark(config).measurements}
    bad = by[("bad-grad", "fwd+bwd")]
    assert bad.status == "wrong" and "gradient" in bad.reason
    assert bad.grad_error > bad.grad_tolerance and bad.samples_s == []
    assert _WrongBackward.calls == 1  # the gradient check, and no timed call after it
    assert by[("bad-grad", "fwd")].status == "ok"  # its forward is right, and timed
    good = by[("mha-auto", "fwd+bwd")]
    assert good.status == "ok" and good.grad_error < good.grad_tolerance / 10


# ----------------------------------------------------------------------------- memory and state


def test_peak_bytes_sees_a_short_lived_allocation():
    from selfattn.bench.memory import peak_bytes

    def spike():  # 200 MB, written (so resident) and freed at once
        t = torch.ones(50_000_000)
        del t

    assert peak_bytes(spike) >= 190e6
    assert peak_bytes(lambda: None) < 20e6


def test_module_state_is_measured_and_shown(capsys):
    from rich.console import Console

    from selfattn.bench import render
    from selfattn.bench.contenders import Weights, get_contender

    case = Case(1, 2, 32, 8, True, "fp32")
    built = get_contender("mha-naive").build(case, Weights.make(case.d_model, 0), "cpu")
    tensors = [*built.module.parameters(), *built.module.buffers()]
    expected = sum(t.numel() * t.element_size() for t in tensors)
    assert built.module_bytes() == expected > 4 * 16 * 16 * 4  # four d x d fp32 weights at least

    config = BenchConfig(
        preset="quick",
        contenders=("mha-naive",),
        heads=(2,),
        head_dim=(8,),
        lengths=(32,),
        passes=("fwd",),
        repeats=1,
        measure_memory=False,
    )
    results = run_benchmark(config)
    (m,) = results.measurements
    assert m.module_bytes == expected
    render(results, Console(width=250, force_terminal=False))
    printed = capsys.readouterr().out
    assert "state" in printed and f"{expected / 2**10:.3g} KiB" in printed


# ----------------------------------------------------------------------------- structure


def test_bench_modules_import_one_way():
    """Each bench module imports only modules before it in this chain (functions included)."""
    import ast
    from pathlib import Path

    import selfattn.bench

    chain = ["results", "timing", "machine", "contenders", "checks", "presets", "memory",
             "decode", "runner", "report", "cli"]  # fmt: skip
    folder = Path(selfattn.bench.__file__).parent
    assert {p.stem for p in folder.glob("*.py")} - {"__init__"} == set(chain)
    for i, name in enumerate(chain):
        tree = ast.parse((folder / f"{name}.py").read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module:
                used = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                used = [a.name for a in node.names]
            else:
                continue
            for module in used:
                if module.startswith("selfattn.bench."):
                    other = module.split(".")[2]
                    assert chain.index(other) < i, f"{name} imports {other}"


# ------------------------------------------------------------------------ benchmarks/engines.py


@pytest.mark.slow
def test_engines_script_runs_tiny(tmp_path):
    engines = load_benchmark("engines")
    out = tmp_path / "engines.txt"
    assert engines.main(["--scale", "64", "--repeats", "1", "--quick", "--out", str(out)]) == 0
    text = out.read_text()
    for needle in ("1. fwd", "2. fwd", "3. fwd", "4. fwd+bwd", "5. fwd", "not judged", "MiB"):
        assert needle in text


def test_engines_script_exits_1_when_a_target_is_missed(monkeypatch):
    engines = load_benchmark("engines")
    missed = [engines.Row("1. fwd", "tiled", 1.0, target=">= 0.8x", ok=False)]
    monkeypatch.setattr(engines, "bench_forward", lambda repeats, size: missed)
    assert engines.main(["--cases", "1"]) == 1
    assert engines.Size(1).judge(False) is False and engines.Size(8).judge(False) is None


def test_a_reason_with_brackets_is_printed_whole():
    """rich markup once ate the '[bench]' of "pip install 'selfattn[bench]'" in a skip reason."""
    from rich.console import Console

    from selfattn.bench.report import _status
    from selfattn.bench.results import Measurement

    m = Measurement({}, "x", "fwd", "skipped", "not installed (pip install 'selfattn[bench]')")
    console = Console(width=200, record=True)
    console.print(_status(m))
    assert "selfattn[bench]" in console.export_text()


@pytest.mark.parametrize(
    ("change", "error", "needle"),
    [
        (dict(heads=(0,)), ValueError, "heads must be a positive integer, got 0"),
        (dict(lengths=(64, 2.0)), TypeError, "length must be a positive integer, got float"),
        (dict(batch=(True,)), TypeError, "batch must be a positive integer, got bool True"),
        (dict(threads=0), ValueError, "threads must be a positive integer, got 0"),
    ],
)
def test_a_bench_config_is_checked_in_the_words_of_every_other_check(change, error, needle):
    with pytest.raises(error, match=re.escape(needle)):
        resolve(BenchConfig(preset="quick", **change))
