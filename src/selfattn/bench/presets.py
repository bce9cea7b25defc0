"""What a benchmark run measures: the cases, the settings, and the named presets.

A `Case` is one shape of the layer every contender computes, x (B, L, d) -> (B, L, d) with
d = H * E. `BenchConfig` is what a caller asks for (anything left None comes from the preset);
`resolve` turns it into `Settings`, with every value filled in and checked.

Presets:
    quick    two small shapes, every cheap contender; a smoke test (well under 60 s on 2 cores).
    book     the chapter's comparison: B=8, T=1024, d=768, 12 heads, causal, no dropout
             (batch 2 on a CPU, which the output says; --batch 8 restores it).
    scaling  the length sweep, L = 128, 256, ..., 32768; each contender stops where it would
             exceed the time or memory budget.
    decode   tokens/s generating 256 tokens after a 512-token prompt, with and without the KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch

from selfattn._checks import check_device, positive_int
from selfattn.bench.contenders import CONTENDERS, DECODERS
from selfattn.bench.machine import total_memory_bytes
from selfattn.bench.results import DTYPES, Case

PASSES: tuple[str, ...] = ("fwd", "fwd+bwd")
MAX_LENGTH = 1 << 20


@dataclass
class BenchConfig:
    """A benchmark request. Fields left None take the preset's value (see `PRESETS`)."""

    preset: str = "quick"
    contenders: tuple | None = None  # names, or `Contender` objects (for tests and plug-ins)
    baseline: str | None = None
    device: str | None = None  # "cpu" or "cuda"; None: cuda when available
    batch: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None
    head_dim: tuple[int, ...] | None = None
    lengths: tuple[int, ...] | None = None
    causal: tuple[bool, ...] | None = None
    dtype: tuple[str, ...] | None = None  # None: fp32 on CPU, bf16 on CUDA
    passes: tuple[str, ...] | None = None
    repeats: int | None = None
    warmup: int | None = None
    time_budget_s: float | None = None  # per call: a contender stops past it
    memory_budget_gib: float | None = None  # per contender: module state + one call's peak
    measure_memory: bool = True
    threads: int | None = None
    seed: int = 0
    # decode preset only
    prompt: int | None = None
    new_tokens: int | None = None
    layers: int | None = None


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    kind: str = "layer"  # "layer": time the layer on each case; "decode": a generation loop
    contenders: tuple[str, ...] = ()
    skip: dict = field(default_factory=dict)  # contender -> why this preset leaves it out
    baseline: str = "torch-mha"
    batch: tuple[int, ...] = (1,)
    cpu_batch: tuple[int, ...] | None = None  # a smaller batch on a CPU, said in the notes
    heads: tuple[int, ...] = (8,)
    head_dim: tuple[int, ...] = (64,)
    lengths: tuple[int, ...] = (1024,)
    causal: tuple[bool, ...] = (True,)
    passes: tuple[str, ...] = PASSES
    repeats: int = 5
    warmup: int = 1
    time_budget_s: float = 10.0
    cpu_time_budget_s: float | None = None
    min_sample_s: float = 0.02  # short calls are looped until one sample lasts this long
    threads: int | None = None  # torch threads during the run; None: leave torch's setting
    prompt: int = 512
    new_tokens: int = 256
    layers: int = 2


LAYER_CONTENDERS = (
    "torch-mha",
    "torch-mha-weights",
    "sdpa",
    "sdpa-flash",
    "flex",
    "mha-auto",
    "mha-sdpa",
    "mha-tiled",
    "mha-naive",
    "wrapper-naive",
    "x-transformers",
)
DECODE_CONTENDERS = (
    "mha-auto",
    "mha-auto+cache",
    "mha-sdpa+cache",
    "mha-tiled+cache",
    "mha-naive+cache",
    "torch-mha",
)
_FLEX_COMPILE = "torch.compile of FlexAttention takes 10-30 s on a CPU, over this preset's budget"

PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            name="quick",
            summary="two small causal shapes, the cheap contenders: a smoke test",
            contenders=LAYER_CONTENDERS,
            skip={"flex": _FLEX_COMPILE},
            batch=(2,),
            heads=(4,),
            head_dim=(32,),
            lengths=(128, 256),
            repeats=3,
            warmup=1,
            time_budget_s=2.0,
            min_sample_s=0.005,
            threads=1,  # a smoke test: one thread stays quick on a busy machine
        ),
        Preset(
            name="book",
            summary="the chapter's comparison: B=8, T=1024, d=768, 12 heads, causal, no dropout",
            contenders=LAYER_CONTENDERS,
            batch=(8,),
            cpu_batch=(2,),
            heads=(12,),
            head_dim=(64,),
            lengths=(1024,),
            repeats=10,
            warmup=2,
            time_budget_s=30.0,
        ),
        Preset(
            name="scaling",
            summary="the length sweep L = 128 ... 32768 (B=1, 8 heads of 64, causal)",
            contenders=LAYER_CONTENDERS,
            batch=(1,),
            heads=(8,),
            head_dim=(64,),
            lengths=tuple(128 << i for i in range(9)),  # 128 ... 32768
            repeats=5,
            warmup=1,
            time_budget_s=1.0,
            cpu_time_budget_s=2.0,
        ),
        Preset(
            name="decode",
            summary="tokens/s generating 256 tokens after a 512-token prompt, KV cache or not",
            kind="decode",
            contenders=DECODE_CONTENDERS,
            baseline="mha-auto",
            batch=(1,),
            heads=(8,),
            head_dim=(64,),
            lengths=(512,),
            passes=("decode",),
            repeats=3,
            warmup=1,
            time_budget_s=120.0,
        ),
    )
}


@dataclass(frozen=True)
class Settings:
    """A resolved `BenchConfig`: every value known and checked."""

    preset: str
    kind: str
    contenders: tuple  # names or Contender objects, in table order
    skip: dict
    baseline: str
    device: str
    cases: tuple[Case, ...]
    passes: tuple[str, ...]
    repeats: int
    warmup: int
    time_budget_s: float
    memory_budget_bytes: int
    measure_memory: bool
    min_sample_s: float
    threads: int
    seed: int
    prompt: int
    new_tokens: int
    layers: int
    notes: tuple[str, ...]

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["contenders"] = [c if isinstance(c, str) else c.name for c in self.contenders]
        out["cases"] = [c.to_dict() for c in self.cases]
        return out


def resolve(config: BenchConfig) -> Settings:
    """Fill ``config`` from its preset and check it; a ValueError names what is valid."""
    if config.preset not in PRESETS:
        raise ValueError(f"unknown preset {config.preset!r}; expected one of {', '.join(PRESETS)}")
    preset = PRESETS[config.preset]
    device = _device(config.device)
    notes: list[str] = []
    contenders, baseline = _contenders_and_baseline(config, preset)
    cases = _cases(config, preset, device, notes)
    memory_budget = _memory_budget(config.memory_budget_gib, device)
    prompt = config.prompt or preset.prompt
    new_tokens = config.new_tokens or preset.new_tokens
    for case in cases:
        _check_fits(case, memory_budget, prompt + new_tokens if preset.kind == "decode" else 0)
    repeats = config.repeats if config.repeats is not None else preset.repeats
    warmup = config.warmup if config.warmup is not None else preset.warmup
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0, got {repeats} and {warmup}")
    return Settings(
        preset=preset.name,
        kind=preset.kind,
        contenders=tuple(contenders),
        skip={} if config.contenders is not None else dict(preset.skip),
        baseline=baseline,
        device=device,
        cases=cases,
        passes=_passes(config, preset),
        repeats=repeats,
        warmup=warmup,
        time_budget_s=_time_budget(config, preset, device),
        memory_budget_bytes=memory_budget,
        measure_memory=config.measure_memory,
        min_sample_s=preset.min_sample_s,
        threads=_threads(config, preset, notes),
        seed=config.seed,
        prompt=prompt,
        new_tokens=new_tokens,
        layers=config.layers or preset.layers,
        notes=tuple(notes),
    )


def _contenders_and_baseline(config: BenchConfig, preset: Preset) -> tuple[list, str]:
    """The contenders asked for (names checked) and the baseline among them: the one asked
    for, else the preset's, else the first contender."""
    names = config.contenders if config.contenders is not None else preset.contenders
    contenders = _contenders(names, preset)
    contender_names = [c if isinstance(c, str) else c.name for c in contenders]
    baseline = config.baseline if config.baseline is not None else preset.baseline
    if baseline not in contender_names:
        if config.baseline is not None:
            raise ValueError(
                f"baseline {baseline!r} is not among the contenders; expected one of "
                f"{', '.join(contender_names)}"
            )
        baseline = contender_names[0]
    return contenders, baseline


def _cases(config: BenchConfig, preset: Preset, device: str, notes: list[str]) -> tuple[Case, ...]:
    """Every combination of dtype, mask, batch, heads, head dim and length, in sweep order
    (length innermost). A smaller CPU batch than the preset's is said in ``notes``."""
    on_cpu = device == "cpu"
    batch = config.batch
    if batch is None:
        batch = preset.cpu_batch if (on_cpu and preset.cpu_batch) else preset.batch
        if batch != preset.batch:
            notes.append(
                f"batch {', '.join(map(str, batch))} instead of the preset's "
                f"{', '.join(map(str, preset.batch))} on this CPU (--batch "
                f"{','.join(map(str, preset.batch))} to match it)"
            )
    dtypes = config.dtype if config.dtype is not None else (("fp32",) if on_cpu else ("bf16",))
    for d in dtypes:
        if d not in DTYPES:
            raise ValueError(f"unknown dtype {d!r}; expected one of {', '.join(DTYPES)}")
    heads = config.heads or preset.heads
    head_dim = config.head_dim or preset.head_dim
    lengths = tuple(sorted(set(config.lengths or preset.lengths)))
    causal = config.causal if config.causal is not None else preset.causal
    for name, values in (
        ("batch", batch),
        ("heads", heads),
        ("head dim", head_dim),
        ("length", lengths),
    ):
        for v in values:
            positive_int(name, v)
    if lengths[-1] > MAX_LENGTH:
        raise ValueError(f"length {lengths[-1]} is over the largest supported, {MAX_LENGTH}")
    return tuple(
        Case(b, h, length, e, c, d)
        for d in dtypes
        for c in causal
        for b in batch
        for h in heads
        for e in head_dim
        for length in lengths
    )


def _passes(config: BenchConfig, preset: Preset) -> tuple[str, ...]:
    passes = config.passes if config.passes is not None else preset.passes
    valid = ("decode",) if preset.kind == "decode" else PASSES
    for p in passes:
        if p not in valid:
            raise ValueError(f"unknown pass {p!r}; expected one of {', '.join(valid)}")
    return tuple(passes)


def _time_budget(config: BenchConfig, preset: Preset, device: str) -> float:
    budget = config.time_budget_s
    if budget is None:
        budget = preset.cpu_time_budget_s if device == "cpu" and preset.cpu_time_budget_s else None
        budget = budget or preset.time_budget_s
    if budget <= 0:
        raise ValueError(f"the time budget must be > 0 s, got {budget}")
    return float(budget)


def _threads(config: BenchConfig, preset: Preset, notes: list[str]) -> int:
    """Torch threads for the run: asked for, else the preset's (said in ``notes``), else
    torch's current setting."""
    threads = config.threads if config.threads is not None else preset.threads
    if threads is not None:
        positive_int("threads", threads)
    if threads is not None and config.threads is None:
        notes.append(f"{threads} thread(s), the {preset.name} preset's (--threads to change)")
    return threads or torch.get_num_threads()


def _device(device: str | None) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return check_device(device)


def _contenders(names, preset: Preset) -> list:
    if isinstance(names, str):
        names = (names,)
    if not names:
        raise ValueError("no contenders to run")
    valid = tuple(DECODERS if preset.kind == "decode" else CONTENDERS)
    out, seen = [], set()
    for c in names:
        name = c if isinstance(c, str) else getattr(c, "name", None)
        if isinstance(c, str) and c not in valid:
            raise ValueError(
                f"unknown contender {c!r} for the {preset.name} preset; expected one of "
                f"{', '.join(valid)}"
            )
        if name in seen:
            continue
        seen.add(name)
        out.append(c)
    return out


def _memory_budget(gib: float | None, device: str) -> int:
    if gib is not None:
        if gib <= 0:
            raise ValueError(f"the memory budget must be > 0 GiB, got {gib}")
        return int(gib * (1 << 30))
    if device == "cuda":
        return int(torch.cuda.get_device_properties(0).total_memory * 0.6)
    return int(total_memory_bytes() * 0.25)


def _check_fits(case: Case, budget: int, context: int) -> None:
    """A case whose inputs, weights and activations alone break the memory budget cannot run."""
    elem = torch.empty((), dtype=case.torch_dtype).element_size()
    tokens = case.batch * max(case.length, context)
    need = 12 * tokens * case.d_model * elem + 12 * case.d_model**2 * elem
    if need > budget:
        raise ValueError(
            f"{case.label} (d={case.d_model}) needs at least {need / 2**30:.1f} GiB for its "
            f"inputs, weights and activations, over the memory budget of "
            f"{budget / 2**30:.1f} GiB (--memory-budget)"
        )
