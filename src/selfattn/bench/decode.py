"""The decode preset: tokens/s of a generation loop, with the KV cache and without it.

What is measured: a stack of ``layers`` attention layers with residual connections,
h <- h + MultiHeadAttention(h), and no embedding, MLP or sampling. The prompt (B, P, d) is run
once (prefill); then N new tokens are fed one at a time. Their inputs are fixed random vectors
(teacher forcing), so every contender does exactly the same work and produces the same outputs:

    with the cache ("+cache")   each step feeds the one new token with ``use_cache=True``; the
                                layer attends to the keys and values it kept
    recomputing (no suffix)     each step runs the whole prefix (P + i + 1 tokens) again and
                                keeps the last position's output, as a loop without a cache does

tokens/s = B * N / (time of the N steps); the prefill is timed apart. Outputs of the first steps
are checked against a float64 run of the whole sequence first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from selfattn.bench.contenders import TOLERANCE, Weights, reference_rows
from selfattn.bench.presets import Case, Settings
from selfattn.bench.timing import summarize, synchronize

CHECK_STEPS = 8


@dataclass(frozen=True)
class Decoder:
    name: str
    summary: str
    engine: str | None  # a selfattn engine, or None for torch.nn.MultiheadAttention
    cache: bool


DECODERS: dict[str, Decoder] = {}
for _engine in ("auto", "sdpa", "tiled", "naive"):
    DECODERS[f"mha-{_engine}"] = Decoder(
        f"mha-{_engine}",
        f"selfattn MultiHeadAttention ({_engine}), recomputing the whole prefix every step",
        _engine,
        cache=False,
    )
    DECODERS[f"mha-{_engine}+cache"] = Decoder(
        f"mha-{_engine}+cache",
        f"selfattn MultiHeadAttention ({_engine}) with use_cache=True: one token per step",
        _engine,
        cache=True,
    )
DECODERS["torch-mha"] = Decoder(
    "torch-mha",
    "torch.nn.MultiheadAttention (no KV cache): recomputes the whole prefix every step",
    None,
    cache=False,
)


class _Stack:
    """``layers`` residual attention layers; ``run(x, cached)`` returns the stack's output."""

    def __init__(self, decoder: Decoder, case: Case, weights: list[Weights], context: int, device):
        d, h = case.d_model, case.heads
        self.decoder = decoder
        self.layers: list[Callable[[Tensor, bool], Tensor]] = []
        self.modules: list[nn.Module] = []
        mask = torch.triu(torch.ones(context, context, dtype=torch.bool, device=device), 1)
        for w in weights:
            if decoder.engine is not None:
                from selfattn.book import MultiHeadAttention

                m = MultiHeadAttention(d, d, context, 0.0, h, backend=decoder.engine)
                linears = (m.W_query, m.W_key, m.W_value)
                with torch.no_grad():
                    for linear, weight in zip(linears, (w.wq, w.wk, w.wv), strict=True):
                        linear.weight.copy_(weight)
                    m.out_proj.weight.copy_(w.wo)
                    m.out_proj.bias.copy_(w.bo)
                m = m.to(device=device, dtype=case.torch_dtype).eval()
                self.layers.append(lambda x, cached, m=m: m(x, use_cache=cached))
            else:
                m = nn.MultiheadAttention(d, h, batch_first=True)
                with torch.no_grad():
                    m.in_proj_weight.copy_(torch.cat([w.wq, w.wk, w.wv]))
                    m.in_proj_bias.zero_()
                    m.out_proj.weight.copy_(w.wo)
                    m.out_proj.bias.copy_(w.bo)
                m = m.to(device=device, dtype=case.torch_dtype).eval()

                def layer(x, cached, m=m):
                    n = x.shape[1]
                    out, _ = m(x, x, x, attn_mask=mask[:n, :n], is_causal=True, need_weights=False)
                    return out

                self.layers.append(layer)
            self.modules.append(m)

    def reset(self) -> None:
        for m in self.modules:
            if hasattr(m, "reset_cache"):
                m.reset_cache()

    def run(self, x: Tensor, cached: bool) -> Tensor:
        for layer in self.layers:
            x = x + layer(x, cached)  # (B, n, d)
        return x

    def generate(self, tokens: Tensor, prompt: int, steps: int, device: str):
        """Prefill ``tokens[:, :prompt]``, then ``steps`` steps; returns
        (prefill seconds, steps seconds, outputs (B, 1 + steps, d): the prompt's last position
        and each new token's)."""
        import time

        self.reset()
        cached = self.decoder.cache
        outs = []
        with torch.no_grad():
            synchronize(device)
            t0 = time.perf_counter()
            outs.append(self.run(tokens[:, :prompt], cached)[:, -1:])
            synchronize(device)
            t1 = time.perf_counter()
            for i in range(steps):
                end = prompt + i + 1
                x = tokens[:, end - 1 : end] if cached else tokens[:, :end]
                outs.append(self.run(x, cached)[:, -1:])  # (B, 1, d)
            synchronize(device)
            t2 = time.perf_counter()
        return t1 - t0, t2 - t1, torch.cat(outs, dim=1)


def _reference(case: Case, weights: list[Weights], tokens: Tensor, prompt: int) -> Tensor:
    """Float64 outputs at positions prompt-1 ... prompt+CHECK_STEPS-1 of the residual stack."""
    length = prompt + CHECK_STEPS
    h = tokens[:, :length].to(torch.float64).cpu()
    full = Case(case.batch, case.heads, length, case.head_dim, True, case.dtype)
    rows = torch.arange(length)
    for w in weights:
        h = h + reference_rows(full, w.cast(case.torch_dtype), h, rows)[1]
    return h[:, prompt - 1 :]


def useful_flops(case: Case, layers: int, prompt: int, steps: int) -> float:
    """FLOPs the cached loop does for ``steps`` new tokens: per token and layer, four d x d
    projections (2·B·d² each) and attention over the t keys it sees (4·B·H·t·E)."""
    d, b = case.d_model, case.batch
    total = 0.0
    for i in range(steps):
        keys = prompt + i + 1
        total += layers * (4 * 2 * b * d * d + 4 * b * case.heads * keys * case.head_dim)
    return total


def run_decode(settings: Settings, progress):
    from selfattn.bench.runner import Measurement, Results, _classify, environment, measure_peaks

    device = settings.device
    prompt, steps, layers = settings.prompt, settings.new_tokens, settings.layers
    decoders = [DECODERS[c] for c in settings.contenders]
    cases = list(dict.fromkeys(Case(c.batch, c.heads, prompt, c.head_dim, True, c.dtype)
                               for c in settings.cases))  # fmt: skip
    progress.start(1 + len(cases) * len(decoders) * (2 + settings.warmup + settings.repeats))
    progress.advance("matmul peak")
    peaks = measure_peaks(settings)
    measurements = []
    notes = list(settings.notes)
    notes.append(
        f"decode: {layers} residual attention layers, prompt {prompt}, {steps} new tokens fed "
        "one at a time (fixed random inputs); tokens/s counts the new tokens only; peak memory "
        "is not measured here"
    )
    context = prompt + steps
    for case in cases:
        info = {**case.to_dict(), "prompt": prompt, "new_tokens": steps, "layers": layers}
        weights = [Weights.make(case.d_model, settings.seed + 101 * i) for i in range(layers)]
        gen = torch.Generator().manual_seed(settings.seed + 1)
        tokens = torch.randn(case.batch, context, case.d_model, generator=gen,
                             dtype=torch.float64)  # fmt: skip
        reference = _reference(case, weights, tokens, prompt)
        tokens = tokens.to(device=device, dtype=case.torch_dtype)
        elem = tokens.element_size()
        kv_bytes = 2 * layers * case.batch * context * case.d_model * elem
        flops = useful_flops(case, layers, prompt, steps)
        live = []
        for dec in decoders:
            progress.advance(f"{dec.name}: check", 1)
            m = Measurement(info, dec.name, "decode", "ok")
            measurements.append(m)
            try:
                stack = _Stack(dec, case, weights, context, device)
                _, _, outs = stack.generate(tokens, prompt, CHECK_STEPS, device)
                ref = reference.to(torch.float64)
                got = outs.to(torch.float64).cpu()
                error = float((got - ref).abs().max() / ref.abs().max())
            except Exception as err:
                m.status, m.reason = _classify(err)
                progress.advance(dec.name, 1 + settings.warmup + settings.repeats)
                continue
            m.max_error, m.tolerance = error, TOLERANCE[case.dtype]
            if not error <= m.tolerance:
                m.status = "wrong"
                m.reason = f"WRONG: max error {error:.2e} vs the float64 reference"
                progress.advance(dec.name, 1 + settings.warmup + settings.repeats)
                continue
            m.state_bytes = sum(
                t.numel() * t.element_size() for mod in stack.modules for t in mod.parameters()
            ) + (kv_bytes if dec.cache else 0)
            # Warm-up: a short generation; its per-step time predicts the whole run.
            progress.advance(f"{dec.name}: warm-up", 1)
            try:
                for _ in range(max(1, settings.warmup)):
                    _, short_s, _ = stack.generate(tokens, prompt, CHECK_STEPS, device)
                    progress.advance(f"{dec.name}: warm-up", 1)
            except Exception as err:
                m.status, m.reason = _classify(err)
                continue
            # Recomputing costs more per step as the prefix grows: scale by the mean length.
            grow = (prompt + steps / 2) / (prompt + CHECK_STEPS / 2) if not dec.cache else 1.0
            predicted = short_s / CHECK_STEPS * steps * grow
            if predicted > settings.time_budget_s:
                m.status = "stopped"
                m.reason = (
                    f"stopped: {steps} steps would take about {predicted:.0f} s, over the "
                    f"{settings.time_budget_s:g} s budget"
                )
                continue
            if device == "cuda":  # every length once: kernels (cuDNN plans) are chosen per shape
                try:
                    stack.generate(tokens, prompt, steps, device)
                except Exception as err:
                    m.status, m.reason = _classify(err)
                    continue
            live.append((dec, stack, m))

        prefill: dict[str, list[float]] = {dec.name: [] for dec, _, _ in live}
        for r in range(settings.repeats):  # round-robin
            for dec, stack, m in live:
                progress.advance(f"{dec.name}: run {r + 1}/{settings.repeats}", 1)
                try:
                    pre_s, steps_s, _ = stack.generate(tokens, prompt, steps, device)
                except Exception as err:
                    m.status, m.reason = _classify(err)
                    continue
                prefill[dec.name].append(pre_s)
                m.samples_s.append(steps_s)
        peaks = measure_peaks(settings, peaks)
        base = None
        for dec, _, m in live:
            if m.status != "ok" or not m.samples_s:
                continue
            for key, value in summarize(m.samples_s).items():
                setattr(m, key, value)
            m.tokens_per_s = case.batch * steps / m.median_s
            m.flops = flops
            m.gflops_per_s = flops / m.median_s / 1e9
            peak = peaks.get(case.dtype, {}).get("gflops")
            m.peak_fraction = m.gflops_per_s / peak if peak else None
            m.extra["prefill_s"] = summarize(prefill[dec.name])["median_s"]
            m.extra["cache"] = dec.cache
            if dec.name == settings.baseline:
                base = m.median_s
        for _, _, m in live:
            if base and m.median_s:
                m.ratio = m.median_s / base
    return Results(settings.to_dict(), environment(device), peaks, measurements, notes)
