"""Peak memory of one call, measured where nothing else can blur it.

CPU: a fresh process per (case, contender), forked from a helper process that has imported
torch and does nothing else. It runs the contender once on a tiny case (so that one-time costs
such as thread pools are resident before the baseline), then builds it for the case. For each
pass, `peak_bytes` measures the call: it resets the kernel's high-water mark of the resident
size (writing "5" to Linux's /proc/self/clear_refs), takes the resident size as the baseline
(the module, its weights and the inputs exist by then), runs the call, and reports the
high-water mark (VmHWM in /proc/self/status) minus that baseline. The kernel keeps that mark
page by page, so a peak however short is seen, which no sampling thread can promise. The
process has an address-space limit a little over the memory budget, so an allocation past it
fails there (reported as OOM) instead of taking the machine down.

Without clear_refs (not Linux, or not permitted), the mark cannot be reset: the measurement is
``ru_maxrss`` minus the resident size before the call, which is right only while the call's
peak is the process's highest so far, as it is in a fresh process.

CUDA: in-process, ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus
what was allocated before the call.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import resource
import select
import signal
import subprocess
import sys
import time

import torch

from selfattn.bench.contenders import CONTENDERS, Contender, Weights, make_input
from selfattn.bench.results import Case, SkipContender
from selfattn.bench.timing import make_step


def measure_cpu(
    contender: Contender,
    case: Case,
    *,
    passes: tuple[str, ...],
    seed: int,
    threads: int,
    limit_bytes: int,
    timeout_s: float,
) -> dict:
    """{"status": "ok", "peak_bytes": {pass: bytes}} or {"status": "oom"|"error"|..., "reason"}."""
    if CONTENDERS.get(contender.name) is not contender:
        return {"status": "unmeasured", "reason": "not in the contender registry"}
    spec = {
        "contender": contender.name,
        "case": case.to_dict(),
        "passes": list(passes),
        "seed": seed,
        "threads": threads,
        "limit_bytes": limit_bytes,
        "timeout_s": timeout_s,
    }
    return _SERVER.request(spec)


class _ForkServer:
    """A helper process that imports torch once and forks a fresh child per measurement.

    (multiprocessing's forkserver would re-run the caller's ``__main__`` in every child; this
    one runs nothing but `serve`.) It never computes anything itself, so forking it is safe.
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None

    def request(self, spec: dict) -> dict:
        if self.proc is None or self.proc.poll() is not None:
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
            # glibc: hand every block over 64 KiB back to the system when it is freed, so that
            # one pass's freed memory cannot hide the next pass's growth.
            env.update(MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
            self.proc = subprocess.Popen(
                [sys.executable, "-c", "from selfattn.bench.memory import serve; serve()"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                text=True,
                env=env,
            )
            atexit.register(self.close)
        try:
            self.proc.stdin.write(json.dumps(spec) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()  # the server enforces the timeout
        except OSError as err:
            line, why = "", str(err)
        else:
            why = "it stopped"
        if not line:
            self.close()
            return {"status": "error", "reason": f"the memory-measuring server failed ({why})"}
        return json.loads(line)

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


_SERVER = _ForkServer()


def serve() -> None:
    """The server's loop: one JSON request a line on stdin, one JSON answer a line on stdout."""
    with contextlib.suppress(ImportError):  # imported once here rather than in every child
        import x_transformers  # noqa: F401
    for line in sys.stdin:
        spec = json.loads(line)
        sys.stdout.write(json.dumps(_fork_and_measure(spec)) + "\n")
        sys.stdout.flush()


def _fork_and_measure(spec: dict) -> dict:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, answer, and leave without running any cleanup
        os.close(read_fd)
        try:
            answer = _measure(spec)
        except BaseException as err:  # pragma: no cover - _measure reports its own errors
            answer = {"status": "error", "reason": f"{type(err).__name__}: {err}"[:200]}
        os.write(write_fd, json.dumps(answer).encode())
        os._exit(0)
    os.close(write_fd)
    data, deadline = b"", time.monotonic() + spec["timeout_s"]
    timed_out = False
    while True:
        remaining = deadline - time.monotonic()
        ready = select.select([read_fd], [], [], max(0.0, remaining))[0] if remaining > 0 else []
        if not ready:
            timed_out = True
            os.kill(pid, signal.SIGKILL)
            break
        chunk = os.read(read_fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    os.close(read_fd)
    _, status = os.waitpid(pid, 0)
    if timed_out:
        return {"status": "error", "reason": f"no answer within {spec['timeout_s']:.0f} s"}
    if data:
        return json.loads(data)
    if os.WIFSIGNALED(status):
        return {
            "status": "oom",
            "reason": f"the measuring process was killed (signal {os.WTERMSIG(status)}), "
            "most likely out of memory",
        }
    return {"status": "error", "reason": f"the measuring process exited with status {status}"}


def _maxrss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux reports KiB


def status_bytes(field: str) -> int | None:
    """A size from /proc/self/status (Linux), e.g. "VmRSS", in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def vm_size_bytes() -> int:
    return status_bytes("VmSize") or 0


def reset_high_water_mark() -> bool:
    """Linux (>= 4.0): make the high-water mark the current resident size again."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_bytes(call) -> int:
    """The peak resident memory of this process during ``call()``, beyond what was resident
    just before it, in bytes (see the module's docstring)."""
    if reset_high_water_mark():
        base = status_bytes("VmRSS")
        call()
        peak = status_bytes("VmHWM")
        if base is not None and peak is not None:
            return max(0, peak - base)
    base = status_bytes("VmRSS") or _maxrss_bytes()
    call()
    return max(0, _maxrss_bytes() - base)


def _run_passes(contender: Contender, case: Case, spec: dict, measure: bool) -> dict:
    weights = Weights.make(case.d_model, spec["seed"])
    x = make_input(case, spec["seed"], "cpu")
    built = contender.build(case, weights, "cpu")
    steps = {p: make_step(built.fn, x, built.params(), p) for p in spec["passes"]}
    peaks = {}
    for pass_, step in steps.items():
        try:  # beyond what is resident now: the module, its weights and the inputs
            peaks[pass_] = peak_bytes(step)
        except (NotImplementedError, SkipContender):
            peaks[pass_] = None
    return {"peak_bytes": peaks, "state_bytes": built.state_bytes()} if measure else {}


def _measure(spec: dict) -> dict:
    """In the forked child: build, run each pass once, report peaks (never raises)."""
    try:
        if spec["limit_bytes"] and vm_size_bytes():
            limit = vm_size_bytes() + spec["limit_bytes"]
            _, hard = resource.getrlimit(resource.RLIMIT_AS)
            if hard == resource.RLIM_INFINITY or hard > limit:
                resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
        torch.set_num_threads(spec["threads"])
        case = Case(**spec["case"])
        contender = CONTENDERS[spec["contender"]]
        # A tiny run first, so that one-time costs (thread pools, autograd's engine, lazy
        # imports) are resident before the baseline and not charged to the call.
        tiny = Case(1, case.heads, 16, case.head_dim, case.causal, case.dtype)
        _run_passes(contender, tiny, spec, measure=False)
        return {"status": "ok", **_run_passes(contender, case, spec, measure=True)}
    except MemoryError as err:
        return {"status": "oom", "reason": f"out of memory: {err}"[:200]}
    except RuntimeError as err:
        text = str(err)
        oom = "alloc" in text and "memory" in text
        return {"status": "oom" if oom else "error", "reason": text.splitlines()[0][:200]}
    except Exception as err:  # reported, never raised: the run goes on
        return {"status": "error", "reason": f"{type(err).__name__}: {err}"[:200]}


def measure_cuda(step, device: str = "cuda") -> int:
    """Peak bytes allocated during one call of ``step`` beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return max(0, torch.cuda.max_memory_allocated() - base)
