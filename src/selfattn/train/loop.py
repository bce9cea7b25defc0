"""The training loop: get a batch, forward, backward, clip, step, log; evaluate and checkpoint.

`train(run)` trains ``run.model`` from ``run.state`` (or from scratch) up to
``run.config.iters`` iterations and writes into ``run.out`` (rank 0 only):

    metrics.jsonl   one record per iteration: iter, train_loss (the batch's), lr, tokens_per_s,
                    elapsed_s; evaluation records add val_loss, eval_train_loss and what the
                    evaluation hooks return (as "hook/NAME"). Strict JSON lines: a value that
                    is not finite (NaN, inf) is written as null.
    samples.txt     a sample at each evaluation (unless sample_tokens is 0)
    loss.png        the loss curves, redrawn at each evaluation
    scores.png      the hooks' metrics against iterations (when there are hooks)
    model.safetensors, train_state.safetensors   a checkpoint at each evaluation, at the end,
                    and when a stop is requested (Ctrl-C / SIGTERM, see `StopRequest`)

Evaluation happens every ``eval_every`` iterations and at the last one. Its batches and its
sample come from generators seeded by (seed, iteration), never from the training stream, so a
run stopped and resumed draws exactly the batches of a run that was never stopped. Dropout
draws from the global torch generator, which each iteration reseeds from (seed, rank,
iteration) (`dropout_seed`): every process has its own masks, and a resume, with any number
of processes, draws exactly the masks of a run never stopped.

Stopping. Every tensor operation (forward, backward, the collectives, clipping, the step, an
evaluation, a checkpoint) runs in one worker thread while the main thread waits, answering
signals: a stop request drops an unfinished forward and backward at once, even inside one long
torch operation, and the checkpoint is that of the last complete iteration. The step (the only
change to the weights and the optimizer) and a checkpoint are never cut: a stop waits for them.
A stop during an evaluation keeps its iteration; the resume runs that evaluation first. A loss
that is not finite stops the run with `Diverged`, before the step and before any checkpoint.

Extension points: ``hooks.on_eval`` functions get an `EvalContext` and return extra metrics
(say, an induction score per head); ``hooks.on_step`` functions see every record, and
``hooks.on_evaluated`` ones (rank 0) each committed evaluation; ``dist`` (a
`DataParallel`) decides which process writes and which slice of the batch each one trains on;
``run.batches`` may be any `selfattn.train.data.RandomBatches`.
"""

from __future__ import annotations

import json
import math
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfattn._errors import first_line
from selfattn._seeds import mixed_seed
from selfattn.metrics_file import METRICS
from selfattn.models.gpt import GPT
from selfattn.train import checkpoint
from selfattn.train.config import TrainConfig
from selfattn.train.data import RandomBatches, Tokenizer
from selfattn.train.data_parallel import SINGLE, DataParallel
from selfattn.train.files import atomic_write_text, cannot_write
from selfattn.train.plot import have_matplotlib, plot_losses, plot_scores
from selfattn.train.progress import Reporter, Silent
from selfattn.train.schedule import learning_rate

SAMPLES = "samples.txt"
LOSS_PNG = "loss.png"
SCORES_PNG = "scores.png"  # the evaluation hooks' metrics, when there are any
POLL_S = 0.05  # how often the main thread looks for a stop request while the worker runs
GRACE_S = 2.0  # after a stop, how long the dropped work may take to end before it is abandoned
_DROPOUT = 0x64726F70  # "drop": the dropout streams' part of `mixed_seed`


@dataclass
class Run:
    """A run ready to train: settings, model, tokenizer, batches, folder, and where it starts."""

    config: TrainConfig
    model: GPT
    tokenizer: Tokenizer
    batches: RandomBatches
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
    batches: RandomBatches
    tokenizer: Tokenizer
    device: torch.device
    generator: torch.Generator  # seeded by (seed, iteration): the same on every rank and resume


@dataclass
class Hooks:
    on_eval: list[Callable[[EvalContext], dict[str, float]]] = field(default_factory=list)
    on_step: list[Callable[[dict], None]] = field(default_factory=list)
    # rank 0, after each evaluation's checkpoint: (run, every record so far) -> None; what the run
    # keeps of the evaluation besides its record (the timeline's probes, TensorBoard)
    on_evaluated: list[Callable[[Run, list[dict]], None]] = field(default_factory=list)


@dataclass
class Result:
    iteration: int  # iterations done in all (the last complete one)
    interrupted: bool
    records: list[dict]  # every record, earlier runs' included
    # stopped with work still running (the worker inside one long torch operation after
    # GRACE_S, or peers inside collectives): the checkpoint is saved, and the process can only
    # end with os._exit
    abandoned: bool = False


class Diverged(RuntimeError):
    """A loss became NaN or infinite: the run stops, and no checkpoint of it is written."""


class CompileFailed(RuntimeError):
    """torch.compile could not compile the training step (say, no C++ compiler on the CPU)."""


class StopRequest:
    """A stop asked for by Ctrl-C or SIGTERM, or by code (`request`): the loop drops the
    unfinished iteration, saves the last complete state and returns. A second signal calls
    ``on_second`` (default: raise KeyboardInterrupt; `selfattn train` exits at once). Use as a
    context manager to install the signal handlers (main thread only; restored on exit)."""

    def __init__(self, on_second: Callable[[], None] | None = None) -> None:
        self.requested = False
        self.on_second = on_second
        self._previous: dict[int, object] = {}

    def request(self) -> None:
        self.requested = True

    def _handle(self, signum, frame) -> None:
        if not self.requested:
            self.requested = True
        elif self.on_second is not None:
            self.on_second()
        else:
            raise KeyboardInterrupt

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class _Stopped(Exception):
    """A stop request came while the worker ran: what it was doing is dropped."""


class _Worker:
    """One thread that runs the loop's long work, while the caller's (main) thread waits and
    can still answer signals. One thread for the whole run: torch's intra-op pool stays."""

    def __init__(self, stop: StopRequest) -> None:
        self.stop = stop
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.idle = threading.Event()
        self.idle.set()
        # the current CUDA device is per thread: the worker computes on the caller's
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self.cuda_device = torch.cuda.current_device() if cuda else None
        self.thread = threading.Thread(target=self._serve, name="selfattn-train", daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        if self.cuda_device is not None:
            torch.cuda.set_device(self.cuda_device)
        while (job := self.jobs.get()) is not None:
            job()

    def run(self, fn: Callable[[], object], interruptible: bool = True) -> object:
        """``fn()``, computed by the worker; `_Stopped` as soon as a stop is requested (when
        ``interruptible``; else after ``fn`` is done, for short work that must not be cut)."""
        box: dict = {}
        done = threading.Event()

        def job() -> None:
            try:
                box["value"] = fn()
            except BaseException as err:  # re-raised on the caller's thread
                box["error"] = err
            finally:
                done.set()
                self.idle.set()

        self.idle.clear()
        self.jobs.put(job)
        while not done.wait(POLL_S):
            if interruptible and self.stop.requested:
                raise _Stopped
        if "error" in box:
            raise box["error"]
        return box["value"]

    def close(self, wait_s: float) -> bool:
        """Let the thread end; False when its current job is still running after ``wait_s``."""
        finished = self.idle.wait(wait_s)
        self.jobs.put(None)
        if finished:  # let it end while the interpreter is whole, not in its teardown
            self.thread.join()
        return finished


def _compile_error(err: RuntimeError) -> bool:
    """Whether ``err`` comes from torch.compile (no C++ compiler, an inductor failure...)."""
    from torch._dynamo.exc import TorchDynamoException  # loaded already: --compile ran

    return isinstance(err, TorchDynamoException)


def dropout_seed(seed: int, rank: int, iteration: int) -> int:
    """The seed of rank ``rank``'s dropout masks in the iteration after ``iteration``."""
    return mixed_seed(seed, _DROPOUT, rank, iteration)


def clip_gradients(parameters, max_norm: float) -> None:
    """`nn.utils.clip_grad_norm_`, to the bit, without its multiplication of every gradient by
    1.0 when their norm is within ``max_norm`` (torch always multiplies, to spare a GPU a sync;
    the loop syncs on each iteration's loss anyway): the multiplication is about 0.7 ms of a
    shakespeare-char iteration on 2 CPU cores, and the norm is within 1.0 in most of them."""
    params = [p for p in parameters if p.grad is not None]
    total = nn.utils.get_total_norm([p.grad for p in params])  # () float
    if not max_norm / (total + 1e-6) >= 1.0:  # torch's coefficient; a NaN norm clips, as torch
        nn.utils.clip_grads_with_norm_(params, max_norm, total)


def seed_dropout(seed: int) -> None:
    """What ``torch.manual_seed(seed)`` does for the generators a run's dropout draws from (the
    CPU's, and CUDA's once it is in use), without its lazy CUDA seeding on a machine where CUDA
    is not: that one formats a stack trace at each call, 0.2 ms an iteration."""
    torch.default_generator.manual_seed(seed)
    if torch.cuda.is_initialized():
        torch.cuda.manual_seed_all(seed)


def eval_generator(cfg: TrainConfig, iteration: int, device="cpu") -> torch.Generator:
    """The random source of the evaluation after ``iteration``: seeded by (seed, iteration)."""
    return torch.Generator(device).manual_seed(mixed_seed(cfg.seed, iteration))


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> tuple[torch.optim.AdamW, list[str]]:
    """AdamW with weight decay on matrices and embeddings (dim >= 2) only, as nanoGPT; and the
    parameters' names in the optimizer's order (for checkpoints). torch's fused kernel, on the
    CPU too (nanoGPT asks for it on CUDA only): one pass over each tensor instead of a dozen
    operations, 2-3x faster a step on the shakespeare-char model."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [(n, p) for n, p in params if p.dim() >= 2]
    no_decay = [(n, p) for n, p in params if p.dim() < 2]
    groups = [
        {"params": [p for _, p in decay], "weight_decay": cfg.weight_decay},
        {"params": [p for _, p in no_decay], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=True)
    return optimizer, [n for n, _ in decay + no_decay]


def train(
    run: Run,
    *,
    hooks: Hooks | None = None,
    stop: StopRequest | None = None,
    dist: DataParallel = SINGLE,
    reporter: Reporter | None = None,
) -> Result:
    """Train ``run`` up to ``run.config.iters`` iterations, or until a stop request."""
    loop = _Loop(run, hooks or Hooks(), stop or StopRequest(), dist, reporter or Silent())
    return loop.train()


class _Loop:
    """One call of `train`: its state, and the named steps of nanoGPT's loop."""

    def __init__(self, run: Run, hooks: Hooks, stop: StopRequest, dist, reporter) -> None:
        self.run, self.cfg, self.hooks, self.stop = run, run.config, hooks, stop
        self.dist, self.reporter = dist, reporter
        self.device = torch.device(self.cfg.device)
        run.model.to(self.device).train()
        self.optimizer, self.names = make_optimizer(run.model, self.cfg)
        self.it = _restore(run, self.optimizer, self.names) if run.state is not None else 0
        self.saved_at = self.it if run.state is not None else None  # the last good checkpoint
        self.net = dist.wrap(run.model)  # what the loop calls (DDP under torchrun)
        if self.cfg.compile:  # the training steps only: evaluation and samples run eagerly
            self.net = torch.compile(self.net)
        self.records = list(run.history)
        self.plot = dist.is_main and have_matplotlib()
        self.t0, self.speed = time.perf_counter(), None

    def train(self) -> Result:
        cfg = self.cfg
        if self.dist.is_main and not self.plot:
            self.reporter.message(f"{LOSS_PNG} skipped: drawing it needs the 'plot' extra")
        self.worker = _Worker(self.stop)
        self.pending = None  # an iteration's record while its evaluation runs
        try:
            self.finish_evaluation()
            while self.it < cfg.iters:
                if self.stop.requested:
                    raise _Stopped
                record = self.train_step()
                if self.evaluating():
                    self.pending = record
                    record |= self.worker.run(self.evaluate)
                    self.check_finite(record)
                self.pending = None
                self.log(record)
                if self.evaluating():
                    self.commit()
        except _Stopped:
            return self.drop_and_save()
        finally:
            self.worker.close(0)
        return Result(self.it, False, self.records)

    def evaluating(self) -> bool:
        """Whether the iteration just finished (``self.it``) ends with an evaluation."""
        return self.it % self.cfg.eval_every == 0 or self.it == self.cfg.iters

    def finish_evaluation(self) -> None:
        """A run stopped during an evaluation kept its iteration but not the evaluation: run it
        now, so the resumed run's records equal the uninterrupted run's."""
        if not self.records or self.records[-1]["iter"] != self.it or not self.evaluating():
            return
        if "val_loss" in self.records[-1]:
            return
        record = self.records.pop() | self.worker.run(self.evaluate)
        self.check_finite(record)
        self.records.append(record)
        if self.dist.is_main:
            lines = "".join(_jsonl_line(r) for r in self.records)
            atomic_write_text(self.run.out / METRICS, lines)
            self.reporter.message(f"iteration {self.it}'s evaluation, stopped before, is done now")
        self.commit()

    def train_step(self) -> dict:
        """One iteration: the batch (here); forward and backward (the worker, cut short by a
        stop); clipping and the step (the worker too, never cut: the weights change whole).

        Every tensor operation of any size runs on the worker: torch's OpenMP pool belongs to
        the thread that calls it, and a second pool on this thread, waking and spinning beside
        the worker's on the same cores, made each iteration 1.3-1.6x slower."""
        cfg, it, t_step = self.cfg, self.it, time.perf_counter()
        lr = learning_rate(
            it, lr=cfg.lr, min_lr=cfg.min_lr, warmup_iters=cfg.warmup_iters,
            decay_iters=cfg.lr_decay_iters,
        )  # fmt: skip
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        before = self.run.batches.state()
        x, y = self.run.batches.next_train()  # (B, T), (B, T)
        seed_dropout(dropout_seed(cfg.seed, self.dist.dropout_stream, it))
        try:
            loss = self.worker.run(lambda: self.forward_backward(x, y))
        except _Stopped:
            self.run.batches.load_state(before)  # the dropped iteration never drew its batch
            raise
        except RuntimeError as err:
            if cfg.compile and _compile_error(err):
                raise CompileFailed(
                    f"--compile failed at iteration {it + 1} ({first_line(err, kind=True)}); "
                    "the run trains the same without it: leave --compile out"
                ) from err
            raise
        tokens_per_s = cfg.batch_size * cfg.block_size / (time.perf_counter() - t_step)
        self.speed = tokens_per_s if self.speed is None else 0.9 * self.speed + 0.1 * tokens_per_s
        record = {"iter": it + 1, "train_loss": loss, "lr": lr, "tokens_per_s": self.speed}
        record["elapsed_s"] = time.perf_counter() - self.t0
        self.check_finite(record)
        self.worker.run(self.step, interruptible=False)
        self.it = it + 1
        return record

    def step(self) -> None:
        """(In the worker, whole.) Clip the gradients, and the only change to the weights."""
        if self.cfg.grad_clip > 0:
            clip_gradients(self.run.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()

    def forward_backward(self, x: Tensor, y: Tensor) -> float:
        """(In the worker.) The batch's loss, averaged over processes; gradients in .grad."""
        with self.autocast():
            logits = self.net(x)  # (B, T, V)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return self.dist.mean(loss.item())

    def autocast(self) -> torch.autocast:
        """bfloat16 autocast when asked for (entered on the thread that computes)."""
        enabled = self.cfg.dtype == "bfloat16"
        return torch.autocast(self.device.type, torch.bfloat16, enabled=enabled)

    def evaluate(self) -> dict:
        """(In the worker.) The evaluation's losses and the hooks' metrics."""
        return evaluate(self.run, self.it, self.hooks, self.dist, self.autocast())

    def check_finite(self, record: dict) -> None:
        """`Diverged` (after logging the record) when one of its losses is NaN or infinite."""
        for key, name in (("train_loss", "loss"), ("eval_train_loss", "evaluation train loss"),
                          ("val_loss", "validation loss")):  # fmt: skip
            value = record.get(key, 0.0)
            if not math.isfinite(value):
                self.log(record)
                raise Diverged(f"{name} is {value} at iteration {record['iter']}; {self.last_good}")

    @property
    def last_good(self) -> str:
        if self.saved_at is None:
            return "no checkpoint was written yet"
        return f"the last good checkpoint is iteration {self.saved_at}"

    def log(self, record: dict) -> None:
        self.records.append(record)
        for hook in self.hooks.on_step:
            hook(record)
        if self.dist.is_main:
            _append(self.run.out / METRICS, _jsonl_line(record))
            self.reporter.step(record)

    def commit(self) -> None:
        """Rank 0 alone saves the checkpoint, then the evaluation's line, sample and figures;
        the other processes wait for it (`DataParallel.solo`)."""

        def work() -> None:
            self.worker.run(self.save, interruptible=False)  # on the worker: see train_step
            report = (self.run, self.records, self.reporter, self.plot, self.hooks.on_evaluated)
            self.worker.run(lambda: _report_evaluation(*report))

        self.dist.solo(work, interrupted=lambda: self.stop.requested)
        self.saved_at = self.it
        if self.stop.requested:  # a waiting process was stopped: it leaves as if mid-work
            raise _Stopped

    def save(self) -> None:
        """(Rank 0.) The checkpoint of the last complete iteration; never one of diverged
        weights."""
        model = self.run.model
        if not all(torch.isfinite(p).all() for p in model.parameters()):
            raise Diverged(
                f"the weights after iteration {self.it} are not finite; {self.last_good}"
            )
        state = checkpoint.capture(model, self.optimizer, self.names, self.run.batches.state(),
                                   self.it)  # fmt: skip
        checkpoint.save_checkpoint(self.run.out, state, model)
        self.saved_at = self.it

    def drop_and_save(self) -> Result:
        """A stop: drop the unfinished work, save the last complete iteration (rank 0), and
        let the worker go. Each process stops on its own signal, without a collective (a peer
        may be inside one long operation): `Result.abandoned` for several processes, or when
        the worker is still busy after `GRACE_S`."""
        if self.pending is not None:  # the iteration is complete; its evaluation is not
            self.log(self.pending)
        if self.saved_at != self.it and self.dist.is_main:
            self.save()
        finished = self.worker.close(GRACE_S)
        return Result(self.it, True, self.records, abandoned=self.dist.is_parallel or not finished)


def _restore(run: Run, optimizer, names: list[str]) -> int:
    """Load ``run.state`` into the model, the optimizer and the batches' stream; its iteration.
    (The dropout stream needs nothing: each iteration reseeds it, see `dropout_seed`.)"""
    checkpoint.restore(run.state, run.model, optimizer, names)
    run.batches.load_state(run.state.rng["batches"])
    return run.state.iteration


def _report_evaluation(
    run: Run, records: list[dict], reporter: Reporter, plot: bool, on_evaluated=()
) -> None:
    """The evaluation line, a sample in samples.txt, loss.png (and scores.png) redrawn, and the
    ``on_evaluated`` hooks."""
    it = records[-1]["iter"]
    reporter.evaluation(records[-1])
    for hook in on_evaluated:
        hook(run, records)
    if run.config.sample_tokens > 0:
        _write_sample(run, it)
    if plot:
        plot_losses(run.out / LOSS_PNG, records, f"{run.title}: {run.out.name}")
        if any(key.startswith("hook/") for key in records[-1]):
            plot_scores(run.out / SCORES_PNG, records, f"{run.title}: {run.out.name}")


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
    _append(run.out / SAMPLES, f"=== iteration {it} ===\n{text}\n\n")


def _jsonl_line(record: dict) -> str:
    """One strict JSON line: a value that is not finite becomes null."""
    finite = {
        k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in record.items()
    }
    return json.dumps(finite, allow_nan=False) + "\n"


def _append(path: Path, text: str) -> None:
    """Append ``text`` to ``path``; `CheckpointWriteError` naming the file when it fails."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(text)
    except OSError as err:
        raise cannot_write(path, err) from None
