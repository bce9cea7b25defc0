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

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from selfattn.bench import checks
from selfattn.bench.contenders import DECODERS, Decoder, Weights, module_bytes
from selfattn.bench.machine import environment, measure_peaks
from selfattn.bench.presets import Settings
from selfattn.bench.results import Case, Measurement, Results, classify
from selfattn.bench.timing import summarize, synchronize

CHECK_STEPS = 8


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
                from selfattn.modules.causal_multihead import MultiHeadAttention

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
        h = h + checks.reference_rows(full, w.cast(case.torch_dtype), h, rows)[1]
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


def run_decode(settings: Settings, progress) -> Results:
    """Check, warm up and time each decoder on each case (see the module's docstring)."""
    prompt, steps, layers = settings.prompt, settings.new_tokens, settings.layers
    decoders = [DECODERS[c] for c in settings.contenders]
    cases = list(dict.fromkeys(Case(c.batch, c.heads, prompt, c.head_dim, True, c.dtype)
                               for c in settings.cases))  # fmt: skip
    progress.start(1 + len(cases) * len(decoders) * (2 + settings.warmup + settings.repeats))
    progress.advance("matmul peak")
    dtypes = [case.dtype for case in cases]
    peaks = measure_peaks(dtypes, settings.device)
    measurements = []
    notes = list(settings.notes)
    notes.append(
        f"decode: {layers} residual attention layers, prompt {prompt}, {steps} new tokens fed "
        "one at a time (fixed random inputs); tokens/s counts the new tokens only; peak memory "
        "is not measured here"
    )
    for case in cases:
        run = _DecodeCase(case, settings, progress)
        live = []
        for dec in decoders:
            m = Measurement(run.info, dec.name, "decode", "ok")
            measurements.append(m)
            stack = run.check_and_warm_up(dec, m)
            if stack is not None:
                live.append((dec, stack, m))
        prefill = run.time_round_robin(live)
        peaks = measure_peaks(dtypes, settings.device, peaks)
        run.summarize(live, prefill, peaks)
    env = environment(settings.device)
    return Results(settings.to_dict(), env, peaks, measurements, notes, "", checks.ERROR_RULE)


class _DecodeCase:
    """One case of the decode preset: its weights, token inputs and float64 reference."""

    def __init__(self, case: Case, settings: Settings, progress) -> None:
        self.case, self.settings, self.progress = case, settings, progress
        prompt, steps, layers = settings.prompt, settings.new_tokens, settings.layers
        self.info = {**case.to_dict(), "prompt": prompt, "new_tokens": steps, "layers": layers}
        self.context = prompt + steps
        self.weights = [Weights.make(case.d_model, settings.seed + 101 * i) for i in range(layers)]
        gen = torch.Generator().manual_seed(settings.seed + 1)
        tokens = torch.randn(case.batch, self.context, case.d_model, generator=gen,
                             dtype=torch.float64)  # fmt: skip
        self.reference = _reference(case, self.weights, tokens, prompt)  # (B, 1 + CHECK_STEPS, d)
        self.tokens = tokens.to(device=settings.device, dtype=case.torch_dtype)

    def _generate(self, stack: _Stack, steps: int):
        return stack.generate(self.tokens, self.settings.prompt, steps, self.settings.device)

    def check_and_warm_up(self, dec: Decoder, m: Measurement) -> _Stack | None:
        """Build ``dec``, check its first steps against the reference, warm it up, and stop it
        if its run would break the time budget. Returns it, or None with ``m`` saying why."""
        settings, case = self.settings, self.case
        not_timed = 1 + settings.warmup + settings.repeats
        self.progress.advance(f"{dec.name}: check", 1)
        try:
            stack = _Stack(dec, case, self.weights, self.context, settings.device)
            state = module_bytes(*stack.modules)  # before a KV cache fills any buffer
            _, _, outs = self._generate(stack, CHECK_STEPS)  # (B, 1 + CHECK_STEPS, d)
            error = float(checks.row_errors(outs, self.reference).max())
        except Exception as err:
            m.status, m.reason = classify(err)
            self.progress.advance(dec.name, not_timed)
            return None
        m.max_error, m.tolerance = error, checks.TOLERANCE[case.dtype]
        if not error <= m.tolerance:
            m.status = "wrong"
            m.reason = f"WRONG: worst step's error {error:.2e} vs the float64 reference"
            self.progress.advance(dec.name, not_timed)
            return None
        m.module_bytes = state
        kv_bytes = 2 * len(stack.modules) * self.tokens.numel() * self.tokens.element_size()
        m.state_bytes = m.module_bytes + (kv_bytes if dec.cache else 0)
        self.progress.advance(f"{dec.name}: warm-up", 1)
        try:
            predicted = self._warm_up(dec, stack)
            if predicted > settings.time_budget_s:
                m.status = "stopped"
                m.reason = (
                    f"stopped: {settings.new_tokens} steps would take about {predicted:.0f} s, "
                    f"over the {settings.time_budget_s:g} s budget"
                )
                return None
            if settings.device == "cuda":  # every length once: kernels are chosen per shape
                self._generate(stack, settings.new_tokens)
        except Exception as err:
            m.status, m.reason = classify(err)
            return None
        return stack

    def _warm_up(self, dec: Decoder, stack: _Stack) -> float:
        """Short generations; returns the seconds the whole run's steps are predicted to take."""
        prompt, steps = self.settings.prompt, self.settings.new_tokens
        short_s = 0.0
        for _ in range(max(1, self.settings.warmup)):
            _, short_s, _ = self._generate(stack, CHECK_STEPS)
            self.progress.advance(f"{dec.name}: warm-up", 1)
        # Recomputing costs more per step as the prefix grows: scale by the mean length.
        grow = (prompt + steps / 2) / (prompt + CHECK_STEPS / 2) if not dec.cache else 1.0
        return short_s / CHECK_STEPS * steps * grow

    def time_round_robin(self, live: list) -> dict[str, list[float]]:
        """Each repeat generates once with every decoder in turn; the steps' seconds go to
        each measurement's samples, the prefill's are returned per decoder."""
        repeats = self.settings.repeats
        prefill: dict[str, list[float]] = {dec.name: [] for dec, _, _ in live}
        for r in range(repeats):
            for dec, stack, m in live:
                self.progress.advance(f"{dec.name}: run {r + 1}/{repeats}", 1)
                try:
                    pre_s, steps_s, _ = self._generate(stack, self.settings.new_tokens)
                except Exception as err:
                    m.status, m.reason = classify(err)
                    continue
                prefill[dec.name].append(pre_s)
                m.samples_s.append(steps_s)
        return prefill

    def summarize(self, live: list, prefill: dict[str, list[float]], peaks: dict) -> None:
        """Medians, tokens/s, GFLOP/s and the ratio to the baseline decoder."""
        case, settings = self.case, self.settings
        flops = useful_flops(case, settings.layers, settings.prompt, settings.new_tokens)
        base = None
        for dec, _, m in live:
            if m.status != "ok" or not m.samples_s:
                continue
            for key, value in summarize(m.samples_s).items():
                setattr(m, key, value)
            m.tokens_per_s = case.batch * settings.new_tokens / m.median_s
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
