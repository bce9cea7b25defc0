"""The benchmark harness behind `selfattn bench`.

    from selfattn.bench import BenchConfig, run_benchmark
    results = run_benchmark(BenchConfig(preset="book"))
    results.to_dict()    # every figure, plus the environment

Every contender computes the same layer from one set of weights, is checked against a float64
reference before it is timed (see `checks`), and is reported as a ratio to a baseline (see
`runner`). The modules import one way, in the order listed in `results`.
"""

from selfattn.bench.contenders import CONTENDERS, Built, Contender, Weights
from selfattn.bench.presets import PRESETS, BenchConfig
from selfattn.bench.report import compare, plot, read_json, render, write_json
from selfattn.bench.results import Case, Measurement, Results, SkipContender
from selfattn.bench.runner import Progress, run_benchmark
from selfattn.bench.timing import FLOP_FORMULA, attention_flops, layer_flops, projection_flops

__all__ = [
    "CONTENDERS",
    "FLOP_FORMULA",
    "PRESETS",
    "BenchConfig",
    "Built",
    "Case",
    "Contender",
    "Measurement",
    "Progress",
    "Results",
    "SkipContender",
    "Weights",
    "attention_flops",
    "compare",
    "layer_flops",
    "plot",
    "projection_flops",
    "read_json",
    "render",
    "run_benchmark",
    "write_json",
]
