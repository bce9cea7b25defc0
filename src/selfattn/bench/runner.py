"""The run: check each contender, measure its memory, then time all of them round-robin.

For each case (shortest length first within a sweep), every contender is:
    1. skipped, with the reason, if it does not apply (or stopped, if a shorter length of the
       same sweep already ran out of budget, or its growth so far predicts it would);
    2. built from the shared weights and run once; its output is checked against a float64
       reference, and one that disagrees is WRONG and never timed;
    3. measured for peak memory (a fresh process per case on a CPU);
    4. warmed up, then timed: each repeat visits every (contender, pass) in turn, so that a
       drift of the machine's speed hits them all alike.
A contender that crashes or runs out of memory is recorded as such; the run goes on.
"""

from __future__ import annotations

import contextlib
import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from selfattn.bench import checks
from selfattn.bench.contenders import Built, Contender, Weights, get_contender, make_input
from selfattn.bench.decode import run_decode
from selfattn.bench.machine import environment, measure_peaks
from selfattn.bench.memory import measure_cpu, measure_cuda, vm_size_bytes
from selfattn.bench.presets import BenchConfig, Settings, resolve
from selfattn.bench.results import Case, Measurement, Results, classify
from selfattn.bench.timing import (
    FLOP_FORMULA,
    layer_flops,
    loop_count,
    make_step,
    summarize,
    time_calls,
)


class Progress:
    """What the run reports as it goes; the CLI draws a progress bar from it."""

    def start(self, total: int) -> None:
        pass

    def advance(self, description: str, steps: int = 1) -> None:
        pass


# ----------------------------------------------------------------------------- the run


def run_benchmark(config: BenchConfig, progress: Progress | None = None) -> Results:
    """Run the benchmark ``config`` asks for (see `BenchConfig` and the presets)."""
    settings = resolve(config)
    progress = progress or Progress()
    started = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)
    try:
        if settings.kind == "decode":
            results = run_decode(settings, progress)
        else:
            with _address_space_guard(settings):
                results = _run_layer(settings, progress)
    finally:
        torch.set_num_threads(threads)
    results.elapsed_s = time.perf_counter() - started
    return results


@contextlib.contextmanager
def _address_space_guard(settings: Settings):
    """On a Linux CPU, cap this process's address space for the run (at what it uses now plus
    twice the memory budget), so that a contender allocating far past the budget fails with an
    error the run records as OOM, rather than drawing the kernel's OOM killer onto the run."""
    import resource

    current = vm_size_bytes()
    if settings.device != "cpu" or not current:
        yield
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    cap = current + 2 * settings.memory_budget_bytes + (4 << 30)
    if hard != resource.RLIM_INFINITY:
        cap = min(cap, hard)
    if soft != resource.RLIM_INFINITY and soft <= cap:
        yield  # already capped tighter
        return
    resource.setrlimit(resource.RLIMIT_AS, (cap, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _run_layer(settings: Settings, progress: Progress) -> Results:
    contenders = [get_contender(c) if isinstance(c, str) else c for c in settings.contenders]
    per_case = len(contenders) * (2 + len(settings.passes) * (settings.warmup + settings.repeats))
    progress.start(len(settings.cases) * per_case + 1)
    progress.advance("matmul peak")
    dtypes = [case.dtype for case in settings.cases]
    peaks = measure_peaks(dtypes, settings.device)
    sweep = _Sweep(settings)
    measurements: list[Measurement] = []
    for case in settings.cases:
        measurements += _run_case(case, contenders, settings, sweep, progress)
        gc.collect()
        if settings.device == "cuda":
            torch.cuda.empty_cache()
    progress.advance("matmul peak, again")
    peaks = measure_peaks(dtypes, settings.device, peaks)
    _derive(measurements, settings, peaks)
    notes = list(settings.notes)
    env = environment(settings.device)
    return Results(
        settings.to_dict(), env, peaks, measurements, notes, FLOP_FORMULA, checks.ERROR_RULE
    )


class _Sweep:
    """What each (series, contender, pass) did at shorter lengths: to stop it before a length
    that would break the time or memory budget."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.history: dict[tuple, list[tuple[int, float, int | None]]] = {}
        self.stopped: dict[tuple, str] = {}
        self.skipped: dict[tuple, str] = {}  # found out at run time; no other length will do

    def why_skip(self, case: Case, name: str, pass_: str) -> str | None:
        return self.skipped.get((case.series, name, pass_))

    def why_stop(self, case: Case, name: str, pass_: str) -> str | None:
        key = (case.series, name, pass_)
        if key in self.stopped:
            return self.stopped[key]
        points = self.history.get(key, [])
        if not points:
            return None
        reason = None
        t_pred = _extrapolate([(p[0], p[1]) for p in points], case.length)
        if t_pred > self.settings.time_budget_s:
            reason = (
                f"stopped at L={case.length}: a call would take about {t_pred:.1f} s, over the "
                f"{self.settings.time_budget_s:g} s budget"
            )
        mem_points = [(p[0], p[2]) for p in points if p[2]]
        if reason is None and mem_points:
            m_pred = _extrapolate(mem_points, case.length)
            budget = self.settings.memory_budget_bytes
            if m_pred > budget:
                reason = (
                    f"stopped at L={case.length}: it would need about {m_pred / 2**30:.1f} GiB, "
                    f"over the {budget / 2**30:.1f} GiB budget"
                )
        if reason:
            self.stopped[key] = reason
        return reason

    def stop(self, case: Case, name: str, pass_: str, reason: str) -> None:
        self.stopped.setdefault((case.series, name, pass_), reason)

    def fail(self, case: Case, m: Measurement, err: BaseException) -> None:
        """Record what ``err`` means for ``m``, and for the longer lengths of its sweep."""
        m.status, m.reason = classify(err)
        if m.status == "skipped":
            self.skipped[(case.series, m.contender, m.pass_)] = m.reason
        elif m.status == "oom":
            self.stop(case, m.contender, m.pass_, f"ran out of memory at L={case.length}")

    def record(self, case: Case, name: str, pass_: str, call_s: float, mem: int | None) -> None:
        self.history.setdefault((case.series, name, pass_), []).append((case.length, call_s, mem))


def _extrapolate(points: list[tuple[int, float]], length: int) -> float:
    """Predict the value at ``length`` from the last two points' growth (quadratic from one)."""
    l1, v1 = points[-1]
    exponent = 2.0
    if len(points) >= 2:
        l0, v0 = points[-2]
        if l1 > l0 and v0 > 0 and v1 > 0:
            exponent = min(2.5, max(1.0, math.log(v1 / v0) / math.log(l1 / l0)))
    return v1 * (length / l1) ** exponent


@dataclass
class _Live:
    contender: Contender
    pass_: str
    step: Callable[[], None]
    measurement: Measurement
    calls: int = 1


def _run_case(
    case: Case, contenders: list[Contender], settings: Settings, sweep: _Sweep, progress: Progress
) -> list[Measurement]:
    run = _CaseRun(case, settings, sweep, progress)
    live: list[_Live] = []
    keep_alive = []  # the built contenders, until their timing is done
    for contender in contenders:
        progress.advance(f"{case.label}  {contender.name}: check", 1)
        passes = run.passes_to_run(contender)
        built = run.build_and_check(contender, passes) if passes else None
        if built is not None:
            memory = run.memory(contender, passes)
            live += run.go_live(contender, built, passes, memory)
            keep_alive.append(built)
        run.advance_past(contender, {e.pass_ for e in live if e.contender is contender})
    _time_round_robin(live, settings, sweep, case, progress)
    order = {c.name: i for i, c in enumerate(contenders)}
    return sorted(run.out, key=lambda m: (order[m.contender], settings.passes.index(m.pass_)))


class _CaseRun:
    """One case's inputs, its float64 reference, and the measurements recorded so far."""

    def __init__(self, case: Case, settings: Settings, sweep: _Sweep, progress: Progress):
        self.case, self.settings, self.sweep, self.progress = case, settings, sweep, progress
        self.out: list[Measurement] = []
        self.weights = Weights.make(case.d_model, settings.seed)
        self.x = make_input(case, settings.seed, settings.device)  # (B, L, d)
        self.grad_out = torch.randn_like(self.x)  # (B, L, d), for the timed fwd+bwd
        self.rows = checks.check_rows(case.length)
        self.grad_rows = checks.grad_rows(case)
        gen = torch.Generator().manual_seed(settings.seed + 2)
        g = torch.randn(case.batch, len(self.grad_rows), case.d_model, generator=gen,
                        dtype=torch.float64)  # fmt: skip
        self.g = g.to(case.torch_dtype)  # (B, R, d): the gradient check's output gradient
        self._reference: tuple | None = None
        self._reference_grads: dict[str, torch.Tensor] = {}
        self.checked: dict[str, dict] = {}  # contender -> figures of its passed checks

    def record(self, contender: Contender, pass_: str, status: str, reason="", **figures):
        m = Measurement(self.case.to_dict(), contender.name, pass_, status, reason, **figures)
        self.out.append(m)
        return m

    def fail(self, contender: Contender, passes: list[str], err: BaseException) -> None:
        for p in passes:
            self.sweep.fail(self.case, self.record(contender, p, "error"), err)

    def passes_to_run(self, contender: Contender) -> list[str]:
        """The passes of ``contender`` to check and time; the others are recorded as skipped
        (it does not apply) or stopped (a shorter length showed it would break a budget)."""
        case, settings = self.case, self.settings
        reason = settings.skip.get(contender.name) or contender.unsupported(case, settings.device)
        if reason:
            for p in settings.passes:
                self.record(contender, p, "skipped", reason)
            return []
        passes = []
        for p in settings.passes:
            skip = self.sweep.why_skip(case, contender.name, p)
            stop = None if skip else self.sweep.why_stop(case, contender.name, p)
            if skip or stop:
                self.record(contender, p, "skipped" if skip else "stopped", skip or stop)
            else:
                passes.append(p)
        return passes

    def reference(self, produces: str) -> torch.Tensor:
        if self._reference is None:
            w = self.weights.cast(self.case.torch_dtype)
            self._reference = checks.reference_rows(self.case, w, self.x, self.rows)
        return self._reference[0] if produces == "context" else self._reference[1]

    def reference_grad(self, produces: str) -> torch.Tensor:
        if produces not in self._reference_grads:
            w = self.weights.cast(self.case.torch_dtype)
            self._reference_grads[produces] = checks.reference_grad(
                self.case, w, self.x, self.grad_rows, self.g, produces
            )
        return self._reference_grads[produces]

    def build_and_check(self, contender: Contender, passes: list[str]) -> Built | None:
        """Build ``contender`` and hold its output (and, for fwd+bwd, its gradient) against the
        float64 reference. Returns it, with ``passes`` cut to those that passed; None when
        nothing is left to time (each pass is recorded as wrong or failed)."""
        case = self.case
        try:
            built = contender.build(case, self.weights, self.settings.device)
            with torch.no_grad():
                y = built.fn(self.x)  # (B, L, d)
            got = y[:, self.rows.to(y.device)]
            error = checks.output_error(case, got, self.reference(contender.produces), self.rows)
            del y, got
        except Exception as err:  # recorded; the run goes on
            self.fail(contender, passes, err)
            return None
        figures = {
            "max_error": error,
            "tolerance": checks.TOLERANCE[case.dtype],
            "state_bytes": built.state_bytes(),
            "module_bytes": built.module_bytes(),
        }
        if not error <= figures["tolerance"]:  # NaN is wrong too
            reason = (
                f"WRONG: worst row's error {error:.2e} vs the float64 reference > "
                f"{figures['tolerance']:.0e}"
            )
            for p in passes:
                self.record(contender, p, "wrong", reason, **figures)
            return None
        self.checked[contender.name] = {p: dict(figures) for p in passes}
        if "fwd+bwd" in passes and not self._gradient_ok(contender, built, figures):
            passes.remove("fwd+bwd")
        return built if passes else None

    def _gradient_ok(self, contender: Contender, built: Built, figures: dict) -> bool:
        case = self.case
        try:
            got = checks.contender_grad(built, self.x, self.grad_rows, self.g)
            error = checks.grad_error(got, self.reference_grad(contender.produces))
        except Exception as err:
            m = self.record(contender, "fwd+bwd", "error", **figures)
            self.sweep.fail(case, m, err)
            return False
        grad = {"grad_error": error, "grad_tolerance": checks.GRAD_TOLERANCE[case.dtype]}
        if not error <= grad["grad_tolerance"]:
            reason = (
                f"WRONG gradient: worst row's dL/dx error {error:.2e} vs the float64 reference "
                f"> {grad['grad_tolerance']:.0e}"
            )
            self.record(contender, "fwd+bwd", "wrong", reason, **figures, **grad)
            return False
        self.checked[contender.name]["fwd+bwd"].update(grad)
        return True

    def memory(self, contender: Contender, passes: list[str]) -> dict:
        """CPU: peak memory per pass in a fresh process, before any timing. A contender that
        runs out of memory (or fails) there is recorded, and ``passes`` emptied."""
        settings, case = self.settings, self.case
        self.progress.advance(f"{case.label}  {contender.name}: memory", 1)
        if not settings.measure_memory or settings.device != "cpu":
            return {}
        if not contender.memory_in_subprocess:
            return {"status": "unmeasured", "reason": contender.memory_note}
        memory = measure_cpu(
            contender,
            case,
            passes=tuple(passes),
            seed=settings.seed,
            threads=settings.threads,
            limit_bytes=int(settings.memory_budget_bytes * 1.5),
            timeout_s=60 + 20 * settings.time_budget_s,
        )
        if memory.get("status") in ("oom", "error"):
            for p in passes:
                figures = self.checked[contender.name][p]
                self.record(contender, p, memory["status"], memory["reason"], **figures)
                self.sweep.stop(case, contender.name, p, f"{memory['status']} at L={case.length}")
            passes.clear()
        return memory

    def go_live(
        self, contender: Contender, built: Built, passes: list[str], memory: dict
    ) -> list[_Live]:
        """A timing entry per pass, with its peak memory (measured now on CUDA)."""
        live = []
        for p in passes:
            step = make_step(built.fn, self.x, built.params(), p, self.grad_out)
            m = self.record(contender, p, "ok", **self.checked[contender.name][p])
            try:
                if self.settings.measure_memory and self.settings.device == "cuda":
                    m.memory_bytes = measure_cuda(step)
                peak = memory.get("peak_bytes", {}).get(p)
                if peak is not None:
                    m.memory_bytes = peak
                elif memory.get("status") == "unmeasured":
                    m.extra["memory"] = memory["reason"]
            except Exception as err:
                self.sweep.fail(self.case, m, err)
                continue
            live.append(_Live(contender, p, step, m))
        return live

    def advance_past(self, contender: Contender, timed: set[str]) -> None:
        """Advance the progress over the warm-ups and repeats of the passes that won't run."""
        settings = self.settings
        idle = sum(p not in timed for p in settings.passes)
        if idle:
            self.progress.advance(self.case.label, idle * (settings.warmup + settings.repeats))


def _time_round_robin(
    live: list[_Live], settings: Settings, sweep: _Sweep, case: Case, progress: Progress
) -> None:
    device = settings.device
    timed: list[_Live] = []
    for entry in live:  # warm-up, and how many calls make one sample
        m = entry.measurement
        try:
            call_s = 0.0
            for _ in range(max(1, settings.warmup)):
                call_s = time_calls(entry.step, 1, device)
                progress.advance(f"{case.label}  {entry.contender.name} {entry.pass_}: warm-up")
                if call_s > settings.time_budget_s:
                    break
        except Exception as err:
            sweep.fail(case, m, err)
            progress.advance(case.label, settings.repeats)
            continue
        if call_s > settings.time_budget_s:
            m.status = "stopped"
            m.reason = (
                f"stopped: one call took {call_s:.1f} s, over the {settings.time_budget_s:g} s "
                f"budget"
            )
            m.samples_s = [call_s]
            sweep.stop(case, m.contender, m.pass_, f"stopped at L={case.length}: over budget")
            progress.advance(case.label, settings.repeats)
            continue
        entry.calls = loop_count(call_s, settings.min_sample_s)
        timed.append(entry)

    for r in range(settings.repeats):  # round-robin: drift hits every contender alike
        for entry in timed:
            m = entry.measurement
            if m.status != "ok":
                continue
            progress.advance(
                f"{case.label}  {m.contender} {m.pass_}: repeat {r + 1}/{settings.repeats}"
            )
            try:
                m.samples_s.append(time_calls(entry.step, entry.calls, device))
            except Exception as err:
                sweep.fail(case, m, err)
    for entry in timed:
        m = entry.measurement
        if m.status != "ok":
            continue
        m.calls_per_sample = entry.calls
        for key, value in summarize(m.samples_s).items():
            setattr(m, key, value)
        total = None if m.memory_bytes is None else m.memory_bytes + (m.state_bytes or 0)
        sweep.record(case, m.contender, m.pass_, m.median_s, total)


def _derive(measurements: list[Measurement], settings: Settings, peaks: dict) -> None:
    """Ratios to the baseline, tokens/s, FLOPs, GFLOP/s and the fraction of the matmul peak."""
    linears = {}
    for c in settings.contenders:
        c = get_contender(c) if isinstance(c, str) else c
        linears[c.name] = c.linears
    base = {
        (m.label, m.pass_): m.median_s
        for m in measurements
        if m.contender == settings.baseline and m.status == "ok"
    }
    for m in measurements:
        if m.status != "ok" or not m.median_s:
            continue
        case = Case(**m.case)
        m.flops = layer_flops(case, linears.get(m.contender, 4), m.pass_)
        m.tokens_per_s = case.batch * case.length / m.median_s
        m.gflops_per_s = m.flops / m.median_s / 1e9
        peak = peaks.get(case.dtype, {}).get("gflops")
        m.peak_fraction = m.gflops_per_s / peak if peak else None
        b = base.get((m.label, m.pass_))
        m.ratio = m.median_s / b if b else None
