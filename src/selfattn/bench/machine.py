"""The machine a run measures: its CPU and memory, the software, and its matmul peak."""

from __future__ import annotations

import os
import platform
import time

import torch

from selfattn.bench.results import DTYPES
from selfattn.bench.timing import matmul_peak


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_memory_bytes() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 8 << 30


def load_average() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:  # pragma: no cover - not on this platform
        return "?"


def summary() -> str:
    """One line: CPU, cores, torch and its threads, and the load while it runs."""
    return (
        f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), load average {load_average()}"
    )


def environment(device: str) -> dict:
    from selfattn import __version__

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
        "load_average": load_average(),
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


def measure_peaks(dtypes, device: str, earlier: dict | None = None) -> dict:
    """The matmul peak per dtype name. Measured at the start of a run and again at its end: the
    best of both counts (a busy moment can only make a measurement slower)."""
    peaks = {}
    for d in sorted(set(dtypes)):
        now = matmul_peak(DTYPES[d], device)
        before = (earlier or {}).get(d)
        best = now if before is None or now["gflops"] >= before["gflops"] else dict(before)
        samples = [*(before or {}).get("samples", []), round(now["gflops"], 1)]
        peaks[d] = {**{k: best[k] for k in ("n", "seconds", "gflops")}, "samples": samples}
    return peaks
