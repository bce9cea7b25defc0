"""The training loop: get a batch, forward, backward, clip, step, log; evaluate and checkpoint.

`train(run)` trains ``run.model`` from ``run.state`` (or from scratch) up to
``run.config.iters`` iterations and writes into ``run.out`` (rank 0 only):

    metrics.jsonl   one record per iteration: iter, train_loss (the batch's), lr, tokens_per_s,
                    elapsed_s; evaluation records add val_loss, eval_train_loss and what the
                    evaluation hooks return (as "hook/NAME")
    samples.txt     a sample at each evaluation (unless sample_tokens is 0)
    loss.png        the loss curves, redrawn at each evaluation
    scores.png      the hooks' metrics against iterations (when there are hooks)
    model.safetensors, train_state.safetensors   a checkpoint at each evaluation, at the end,
                    and when a stop is requested (Ctrl-C / SIGTERM, see `StopRequest`)

Evaluation happens every ``eval_every`` iterations and at the last one. Its batches and its
sample come from generators seeded by (seed, iteration), never from the training stream, so a
run stopped and resumed draws exactly the batches of a run that was never stopped.

Extension points: ``hooks.on_eval`` functions get an `EvalContext` and return extra metrics
(say, an induction score per head); ``hooks.on_step`` functions see every record; ``dist`` (a
`DataParallel`) decides which process writes and which slice of the batch each one trains on;
``run.batches`` may be any object with `Batches`' four methods.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from selfattn.models.gpt import GPT
from selfattn.train import checkpoint
from selfattn.train.config import TrainConfig
from selfattn.train.data import Batches, Tokenizer
from selfattn.train.data_parallel import SINGLE, DataParallel
from selfattn.train.plot import have_matplotlib, plot_losses, plot_scores
from selfattn.train.progress import Reporter, Silent
from selfattn.train.schedule import learning_rate

METRICS = "metrics.jsonl"
SAMPLES = "samples.txt"
LOSS_PNG = "loss.png"
SCORES_PNG = "scores.png"  # the evaluation hooks' metrics, when there are any


@dataclass
class Run:
    """A run ready to train: settings, model, tokenizer, batches, folder, and where it starts."""

    config: TrainConfig
    model: GPT
    tokenizer: Tokenizer
    batches: Batches
    out: Path
    title: str = "train"
    state: checkpoint.TrainState | None = None  # None: from scratch
    history: list[dict] = field(default_factory=list)  # the records before state.iteration


@dataclass
class EvalContext:
    """What an evaluation hook sees. The model is in eval mode; use ``torch.no_grad()``."""

    iteration: int
    model: GPT
    config: TrainConfig
    batches: Batches
    tokenizer: Tokenizer
    device: torch.device
    generator: torch.Generator  # seeded by (seed, iteration): the same on every rank and resume


@dataclass
class Hooks:
    on_eval: list[Callable[[EvalContext], dict[str, float]]] = field(default_factory=list)
    on_step: list[Callable[[dict], None]] = field(default_factory=list)


@dataclass
class Result:
    iteration: int  # iterations done in all
    interrupted: bool
    records: list[dict]  # every record, earlier runs' included


class StopRequest:
    """A stop asked for by Ctrl-C or SIGTERM, or by code (`request`): the loop finishes its
    iteration, saves a checkpoint and returns. A second Ctrl-C stops at once
    (KeyboardInterrupt), leaving the last checkpoint. Use as a context manager to install the
    signal handlers (main thread only; restored on exit)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, object] = {}

    def request(self) -> None:
        self.requested = True

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW with weight decay on matrices and embeddings (dim >= 2) only, as nanoGPT; and the
    parameters' names in the optimizer's order (for checkpoints)."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in params if p.dim() >= 2]
    no_decay = [(n, p) for n, p in params if p.dim() < 2]
    groups = [
        {"params": [p for _, p in decay], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
    return optimizer, [n for n, _ in decay + no_decay]


def eval_generator(cfg: TrainConfig, iteration: int, device="cpu") -> torch.Generator:
    """The random source of the evaluation after ``iteration``: seeded by (seed, iteration)."""
    return torch.Generator(device).manual_seed((cfg.seed * 1_000_003 + iteration) % 2**63)


def train(
    run: Run,
    *,
    hooks: Hooks | None = None,
    stop: StopRequest | None = None,
    dist: DataParallel = SINGLE,
    reporter: Reporter | None = None,
) -> Result:
    cfg, model, batches = run.config, run.model, run.batches
    hooks, stop, reporter = hooks or Hooks(), stop or StopRequest(), reporter or Silent()
    device = torch.device(cfg.device)
    model.to(device).train()
    optimizer, names = make_optimizer(model, cfg)
    start = _restore(run, optimizer, names, device) if run.state is not None else 0
    net = dist.wrap(model)  # what the loop calls (DDP under torchrun)
    records = list(run.history)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cfg.dtype == "bfloat16")
    tokens_per_iter = cfg.batch_size * cfg.block_size
    plot = dist.is_main and have_matplotlib()
    if dist.is_main and not plot:
        reporter.message(f"{LOSS_PNG} skipped: drawing it needs the 'plot' extra (matplotlib)")
    it, saved_at, t0, speed = start, None, time.perf_counter(), None
    while it < cfg.iters and not dist.any(stop.requested):  # every process stops at once
        t_step = time.perf_counter()
        lr = learning_rate(
            it, lr=cfg.lr, min_lr=cfg.min_lr, warmup_iters=cfg.warmup_iters,
            decay_iters=cfg.lr_decay_iters,
        )  # fmt: skip
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = batches.next_train()  # (B, T), (B, T)
        with autocast:
            logits = net(x)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        it += 1
        dt = time.perf_counter() - t_step
        speed = tokens_per_iter / dt if speed is None else 0.9 * speed + 0.1 * tokens_per_iter / dt
        record = {"iter": it, "train_loss": dist.mean(loss.item()), "lr": lr}
        record |= {"tokens_per_s": speed, "elapsed_s": time.perf_counter() - t0}
        evaluating = it % cfg.eval_every == 0 or it == cfg.iters
        if evaluating:
            record |= evaluate(run, it, hooks, dist, autocast)
        records.append(record)
        for hook in hooks.on_step:
            hook(record)
        if dist.is_main:
            _append_jsonl(run.out / METRICS, record)
            reporter.step(record)
        if evaluating:
            if dist.is_main:
                _report_evaluation(run, records, reporter, plot)
            save(run, optimizer, names, it, dist)
            saved_at = it
    interrupted = it < cfg.iters
    if interrupted and saved_at != it:
        save(run, optimizer, names, it, dist)
    return Result(it, interrupted, records)


def _restore(run: Run, optimizer, names: list[str], device: torch.device) -> int:
    """Load ``run.state`` into the model, the optimizer and the RNGs; its iteration."""
    state = run.state
    checkpoint.restore(state, run.model, optimizer, names)
    torch.set_rng_state(state.rng["torch"])
    run.batches.load_state(state.rng["batches"])
    if "cuda" in state.rng and device.type == "cuda":
        torch.cuda.set_rng_state(state.rng["cuda"])
    return state.iteration


def _report_evaluation(run: Run, records: list[dict], reporter: Reporter, plot: bool) -> None:
    """The evaluation line, a sample in samples.txt, loss.png (and scores.png) redrawn."""
    it = records[-1]["iter"]
    reporter.evaluation(records[-1])
    if run.config.sample_tokens > 0:
        _write_sample(run, it)
    if plot:
        plot_losses(run.out / LOSS_PNG, records, f"{run.title}: {run.out.name}")
        if any(key.startswith("hook/") for key in records[-1]):
            plot_scores(run.out / SCORES_PNG, records, f"{run.title}: {run.out.name}")


def save(run: Run, optimizer, names: list[str], it: int, dist: DataParallel) -> None:
    if dist.is_main:
        state = checkpoint.capture(run.model, optimizer, names, run.batches.state(), it)
        checkpoint.save_checkpoint(run.out, state, run.model)


@torch.no_grad()
def evaluate(run: Run, it: int, hooks: Hooks, dist: DataParallel, autocast) -> dict:
    """Mean loss over ``eval_iters`` batches of each split, and the hooks' metrics."""
    cfg, model = run.config, run.model
    model.eval()
    losses = {}
    for split in ("train", "val"):
        generator = eval_generator(cfg, it)
        total = 0.0
        for _ in range(cfg.eval_iters):
            x, y = run.batches.eval_batch(split, generator)
            with autocast:
                logits = model(x)
            total += F.cross_entropy(logits.flatten(0, 1).float(), y.flatten()).item()
        losses[split] = dist.mean(total / cfg.eval_iters)
    out = {"eval_train_loss": losses["train"], "val_loss": losses["val"]}
    device = next(model.parameters()).device
    for hook in hooks.on_eval:
        ctx = EvalContext(
            it, model, cfg, run.batches, run.tokenizer, device, eval_generator(cfg, it)
        )
        out |= {f"hook/{k}": dist.mean(v) for k, v in hook(ctx).items()}
    model.train()
    return out


def sample(model: GPT, tokenizer: Tokenizer, n: int, generator: torch.Generator) -> str:
    """``n`` tokens after a newline (or token 0 when the vocabulary has none), decoded."""
    try:
        prompt = tokenizer.encode("\n") or [0]
    except ValueError:
        prompt = [0]
    device = next(model.parameters()).device
    idx = torch.tensor([prompt], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    out = model.generate(idx, n, temperature=1.0, generator=generator)  # (1, len + n)
    model.train(was_training)
    return tokenizer.decode(out[0, len(prompt) :].tolist())


def _write_sample(run: Run, it: int) -> None:
    device = next(run.model.parameters()).device
    generator = eval_generator(run.config, it, device)
    text = sample(run.model, run.tokenizer, run.config.sample_tokens, generator)
    with open(run.out / SAMPLES, "a", encoding="utf-8") as f:
        f.write(f"=== iteration {it} ===\n{text}\n\n")


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
