"""What a run records: the case shape, one `Measurement` per (case, contender, pass), the
`Results` of a run, and the status an exception stands for.

Every other bench module imports this one, and it imports none of them. The modules form one
chain, each importing only those above it:

    results -> timing -> machine -> contenders -> checks -> presets -> memory -> decode -> runner
    -> report -> cli
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16}
STATUSES = ("ok", "skipped", "wrong", "error", "oom", "stopped")


@dataclass(frozen=True)
class Case:
    """One shape: x (batch, length, heads * head_dim), causal or not, in ``dtype``."""

    batch: int
    heads: int
    length: int
    head_dim: int
    causal: bool
    dtype: str  # a key of DTYPES

    @property
    def d_model(self) -> int:
        return self.heads * self.head_dim

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def series(self) -> str:
        """Everything but the length: the cases of one length sweep share it."""
        mask = "causal" if self.causal else "full"
        return f"B={self.batch} H={self.heads} E={self.head_dim} {mask} {self.dtype}"

    @property
    def label(self) -> str:
        return f"L={self.length} {self.series}"

    def to_dict(self) -> dict:
        return asdict(self)


class SkipContender(Exception):
    """Raised by a contender that cannot run here; the message is the reason shown."""


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
    state_bytes: int | None = None  # parameters, buffers and per-case masks (decode: + KV cache)
    module_bytes: int | None = None  # parameters and buffers of the module(s) alone
    max_error: float | None = None  # output: worst row's relative error (see checks.ERROR_RULE)
    tolerance: float | None = None
    grad_error: float | None = None  # fwd+bwd: worst row's relative error of dL/dx
    grad_tolerance: float | None = None
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
        shape = Case(**{k: case[k] for k in Case.__dataclass_fields__})
        return (
            f"prompt {case['prompt']} + {case['new_tokens']} new, {shape.series}, "
            f"{case['layers']} layers"
        )
    return Case(**case).label


@dataclass
class Results:
    settings: dict
    environment: dict
    peaks: dict  # dtype -> {"n", "seconds", "gflops"}
    measurements: list[Measurement]
    notes: list[str]
    flop_formula: str = ""
    error_rule: str = ""
    elapsed_s: float = 0.0

    def to_dict(self) -> dict:
        return {
            "format": "selfattn-bench",
            "version": 2,
            "settings": self.settings,
            "environment": self.environment,
            "matmul_peak": self.peaks,
            "flop_formula": self.flop_formula,
            "error_rule": self.error_rule,
            "notes": self.notes,
            "elapsed_s": self.elapsed_s,
            "measurements": [m.to_dict() for m in self.measurements],
        }

    @staticmethod
    def from_dict(d: dict) -> Results:
        """A run read back from JSON (version 1 files too: their ``max_error`` was the largest
        absolute error over the largest reference value)."""
        if not isinstance(d, dict) or d.get("format") != "selfattn-bench":
            raise ValueError('not a selfattn bench JSON file (no "format": "selfattn-bench")')
        return Results(
            settings=d["settings"],
            environment=d["environment"],
            peaks=d["matmul_peak"],
            measurements=[Measurement.from_dict(m) for m in d["measurements"]],
            notes=d.get("notes", []),
            flop_formula=d.get("flop_formula", ""),
            error_rule=d.get("error_rule", ""),
            elapsed_s=d.get("elapsed_s", 0.0),
        )


def classify(err: BaseException) -> tuple[str, str]:
    """(status, reason) for an exception a contender raised: "skipped" (it does not apply),
    "oom" (out of memory) or "error"."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if isinstance(err, SkipContender | NotImplementedError | ImportError):
        return "skipped", text[:240]
    if isinstance(err, MemoryError) or (
        isinstance(err, RuntimeError)
        and ("out of memory" in text.lower() or "can't allocate memory" in text.lower())
    ):
        return "oom", text[:240]
    return "error", f"{type(err).__name__}: {text}"[:240]
