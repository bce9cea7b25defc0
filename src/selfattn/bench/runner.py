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
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from selfattn.bench.contenders import (
    TOLERANCE,
    Contender,
    SkipContender,
    Weights,
    check_rows,
    get_contender,
    make_input,
    reference_rows,
)
from selfattn.bench.memory import measure_cpu, measure_cuda
from selfattn.bench.presets import DTYPES, BenchConfig, Case, Settings, resolve
from selfattn.bench.timing import (
    FLOP_FORMULA,
    layer_flops,
    loop_count,
    make_step,
    matmul_peak,
    summarize,
    time_calls,
)

STATUSES = ("ok", "skipped", "wrong", "error", "oom", "stopped")


@dataclass
class Measurement:
    """One (case, contender, pass): its figures, or why it has none."""

    case: dict
    contender: str
    pass_: str  # "fwd", "fwd+bwd" or "decode"
    status: str  # one of STATUSES
    reason: str = ""
    samples_s: list[float] = field(default_factory=list)  # per-call seconds, one per repeat
    calls_per_sample: int = 1
    median_s: float | None = None
    q1_s: float | None = None
    q3_s: float | None = None
    min_s: float | None = None
    max_s: float | None = None
    ratio: float | None = None  # median / the baseline's median, same case and pass
    tokens_per_s: float | None = None
    flops: float | None = None  # per call (decode: the useful work of one generation)
    gflops_per_s: float | None = None
    peak_fraction: float | None = None  # of the matmul peak measured in this run, same dtype
    memory_bytes: int | None = None  # peak during one call beyond the state
    state_bytes: int | None = None  # parameters, buffers and per-case masks
    max_error: float | None = None  # vs the float64 reference, relative to its largest value
    tolerance: float | None = None
    extra: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return case_label(self.case)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["pass"] = out.pop("pass_")
        return out

    @staticmethod
    def from_dict(d: dict) -> Measurement:
        d = dict(d)
        d["pass_"] = d.pop("pass")
        return Measurement(**d)


def case_label(case: dict) -> str:
    if "prompt" in case:
        return (
            f"prompt {case['prompt']} + {case['new_tokens']} new, "
            + Case(
                **{k: case[k] for k in ("batch", "heads", "length", "head_dim", "causal", "dtype")}
            ).series
            + f", {case['layers']} layers"
        )
    return Case(**case).label


@dataclass
class Results:
    settings: dict
    environment: dict
    peaks: dict  # dtype -> {"n", "seconds", "gflops"}
    measurements: list[Measurement]
    notes: list[str]
    flop_formula: str = FLOP_FORMULA
    elapsed_s: float = 0.0

    def to_dict(self) -> dict:
        return {
            "format": "selfattn-bench",
            "version": 1,
            "settings": self.settings,
            "environment": self.environment,
            "matmul_peak": self.peaks,
            "flop_formula": self.flop_formula,
            "notes": self.notes,
            "elapsed_s": self.elapsed_s,
            "measurements": [m.to_dict() for m in self.measurements],
        }

    @staticmethod
    def from_dict(d: dict) -> Results:
        if not isinstance(d, dict) or d.get("format") != "selfattn-bench":
            raise ValueError('not a selfattn bench JSON file (no "format": "selfattn-bench")')
        return Results(
            settings=d["settings"],
            environment=d["environment"],
            peaks=d["matmul_peak"],
            measurements=[Measurement.from_dict(m) for m in d["measurements"]],
            notes=d.get("notes", []),
            flop_formula=d.get("flop_formula", FLOP_FORMULA),
            elapsed_s=d.get("elapsed_s", 0.0),
        )


class Progress:
    """What the run reports as it goes; the CLI draws a progress bar from it."""

    def start(self, total: int) -> None:
        pass

    def advance(self, description: str, steps: int = 1) -> None:
        pass


# ----------------------------------------------------------------------------- environment


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    from selfattn import __version__
    from selfattn.bench.presets import total_memory_bytes

    env = {
        "selfattn": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "threads": torch.get_num_threads(),
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_bytes": total_memory_bytes(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env.update(
            gpu=props.name,
            gpu_memory_bytes=props.total_memory,
            cuda=torch.version.cuda,
            capability=f"{props.major}.{props.minor}",
        )
    return env


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
            from selfattn.bench.decode import run_decode

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

    from selfattn.bench.memory import vm_size_bytes

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


def measure_peaks(settings: Settings, earlier: dict | None = None) -> dict:
    """The matmul peak per dtype of the run. Measured at the start and again at the end: the
    best of both counts (a busy moment can only make a measurement slower)."""
    dtypes = sorted({case.dtype for case in settings.cases})
    peaks = {}
    for d in dtypes:
        now = matmul_peak(DTYPES[d], settings.device)
        before = (earlier or {}).get(d)
        best = now if before is None or now["gflops"] >= before["gflops"] else dict(before)
        samples = [*(before or {}).get("samples", []), round(now["gflops"], 1)]
        peaks[d] = {**{k: best[k] for k in ("n", "seconds", "gflops")}, "samples": samples}
    return peaks


def _run_layer(settings: Settings, progress: Progress) -> Results:
    contenders = [get_contender(c) if isinstance(c, str) else c for c in settings.contenders]
    per_case = len(contenders) * (2 + len(settings.passes) * (settings.warmup + settings.repeats))
    progress.start(len(settings.cases) * per_case + 1)
    progress.advance("matmul peak")
    peaks = measure_peaks(settings)
    sweep = _Sweep(settings)
    measurements: list[Measurement] = []
    for case in settings.cases:
        measurements += _run_case(case, contenders, settings, sweep, progress)
        gc.collect()
        if settings.device == "cuda":
            torch.cuda.empty_cache()
    progress.advance("matmul peak, again")
    peaks = measure_peaks(settings, peaks)
    _derive(measurements, settings, peaks)
    notes = list(settings.notes)
    return Results(settings.to_dict(), environment(settings.device), peaks, measurements, notes)


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
        m.status, m.reason = _classify(err)
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


def _classify(err: BaseException) -> tuple[str, str]:
    """(status, reason) for an exception a contender raised."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, SkipContender | NotImplementedError | ImportError):
        return "skipped", text[:240]
    if isinstance(err, MemoryError) or (
        isinstance(err, RuntimeError)
        and ("out of memory" in text.lower() or "can't allocate memory" in text.lower())
    ):
        return "oom", text[:240]
    return "error", f"{type(err).__name__}: {text}"[:240]


def _run_case(
    case: Case, contenders: list[Contender], settings: Settings, sweep: _Sweep, progress: Progress
) -> list[Measurement]:
    device = settings.device
    out: list[Measurement] = []
    weights = Weights.make(case.d_model, settings.seed)
    x = make_input(case, settings.seed, device)
    grad_out = torch.randn_like(x)
    rows = check_rows(case.length)
    reference = None
    live: list[_Live] = []
    keep_alive = []
    per_contender = 2 + len(settings.passes) * (settings.warmup + settings.repeats)

    def record(contender, pass_, status, reason="", **figures) -> Measurement:
        m = Measurement(case.to_dict(), contender.name, pass_, status, reason, **figures)
        out.append(m)
        return m

    for contender in contenders:
        name = contender.name
        progress.advance(f"{case.label}  {name}: check", 1)
        reason = settings.skip.get(name) or contender.unsupported(case, device)
        if reason:
            for p in settings.passes:
                record(contender, p, "skipped", reason)
            progress.advance(case.label, per_contender - 1)
            continue
        passes = []
        for p in settings.passes:
            skip = sweep.why_skip(case, name, p)
            stop = None if skip else sweep.why_stop(case, name, p)
            if skip or stop:
                record(contender, p, "skipped" if skip else "stopped", skip or stop)
            else:
                passes.append(p)
        if not passes:
            progress.advance(case.label, per_contender - 1)
            continue

        # Build and check against the float64 reference: a wrong contender is never timed.
        try:
            built = contender.build(case, weights, device)
            with torch.no_grad():
                y = built.fn(x)
            if reference is None:
                reference = reference_rows(case, weights.cast(case.torch_dtype), x, rows)
            ref = reference[0] if contender.produces == "context" else reference[1]
            got = y[:, rows.to(y.device)].to(torch.float64).cpu()
            error = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
            del y, got
        except Exception as err:  # recorded; the run goes on
            for p in passes:
                sweep.fail(case, record(contender, p, "error"), err)
            progress.advance(case.label, per_contender - 1)
            continue
        tolerance = TOLERANCE[case.dtype]
        if not error <= tolerance:  # NaN is wrong too
            for p in passes:
                record(
                    contender,
                    p,
                    "wrong",
                    f"WRONG: max error {error:.2e} vs the float64 reference > {tolerance:.0e}",
                    max_error=error,
                    tolerance=tolerance,
                )
            progress.advance(case.label, per_contender - 1)
            continue
        check = {"max_error": error, "tolerance": tolerance, "state_bytes": built.state_bytes()}

        # Peak memory, before any timing (a fresh process per case on a CPU).
        memory: dict = {}
        progress.advance(f"{case.label}  {name}: memory", 1)
        if settings.measure_memory and device == "cpu" and not contender.memory_in_subprocess:
            memory = {"status": "unmeasured", "reason": contender.memory_note}
        elif settings.measure_memory and device == "cpu":
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
                    record(contender, p, memory["status"], memory["reason"], **check)
                    sweep.stop(case, name, p, f"{memory['status']} at L={case.length}")
                progress.advance(case.label, per_contender - 2)
                continue

        for p in passes:
            step = make_step(built.fn, x, built.params(), p, grad_out)
            m = record(contender, p, "ok", **check)
            try:
                if settings.measure_memory and device == "cuda":
                    m.memory_bytes = measure_cuda(step)
                peak = memory.get("peak_bytes", {}).get(p)
                if peak is not None:
                    m.memory_bytes = peak
                elif memory.get("status") == "unmeasured":
                    m.extra["memory"] = memory["reason"]
            except Exception as err:
                sweep.fail(case, m, err)
                continue
            live.append(_Live(contender, p, step, m))
        keep_alive.append(built)

    _time_round_robin(live, settings, sweep, case, progress)
    order = {c.name: i for i, c in enumerate(contenders)}
    return sorted(out, key=lambda m: (order[m.contender], settings.passes.index(m.pass_)))


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
