"""`selfattn train` and `selfattn generate`: from the command's request to a run, and back.

Everything that can be wrong with the input is found before any file is written: a bad text
file, an --out folder that holds another run, a checkpoint that contradicts the flags or is
damaged. Each is a ValueError (the CLI prints one line and exits with 2) and nothing on disk
has changed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from selfattn._argtypes import warn_if_more_threads_than_cores
from selfattn._checks import check_device as _check_device
from selfattn.metrics_file import METRICS, read_metrics
from selfattn.models.gpt import GPT
from selfattn.probe_file import Probes
from selfattn.train import checkpoint
from selfattn.train.config import RESUMABLE, TrainConfig
from selfattn.train.context_parallel import start as start_processes
from selfattn.train.data import (
    BPE_FILE,
    Batches,
    encode_splits,
    new_tokenizer,
    read_corpus,
    saved_tokenizer,
)
from selfattn.train.data_parallel import DataParallel, PeerFailure
from selfattn.train.files import remove_stale
from selfattn.train.induction import InductionBatches, induction_metrics, induction_tokenizer
from selfattn.train.loop import (
    LOSS_PNG,
    SAMPLES,
    SCORES_PNG,
    Diverged,
    Hooks,
    Result,
    Run,
    StopRequest,
    train,
)
from selfattn.train.presets import PRESETS
from selfattn.train.probes import PROBES, ProbeRecorder, kept_probes, write_probes
from selfattn.train.progress import Bar, Lines, Reporter, Silent
from selfattn.train.schedule import describe_schedule

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as a shell reports a tool stopped by Ctrl-C
DEFAULT_PRESET = "shakespeare-char"


@dataclass
class TrainRequest:
    preset: str | None = None
    overrides: dict = field(default_factory=dict)  # only the flags given: {field: value}
    out: str | None = None
    resume: str | None = None
    force: bool = False
    quiet: bool = False
    tensorboard: str | None = None  # a folder for TensorBoard's event files
    context_parallel: int | None = None  # C: ranks per sequence (train.context_parallel)


def run_train(req: TrainRequest, hooks: Hooks | None = None) -> int:
    planned = _planned_config(req)
    _check_tensorboard(req.tensorboard)
    dist = start_processes(planned, req.context_parallel)
    try:
        check_memory(planned, dist.world_size)
        run = resume_run(req, dist) if req.resume else new_run(req, dist)
        dist.barrier()  # rank 0 has prepared the folder
        hooks, board = _recorders(req, run, dist, hooks or Hooks())
    except BaseException:
        dist.close()
        raise
    cfg = run.config
    if cfg.data == "induction":
        hooks = dataclasses.replace(hooks, on_eval=[induction_metrics, *hooks.on_eval])
    if dist.is_main:  # the run's own setting: passed now, or saved by the run resumed
        warn_if_more_threads_than_cores("train", cfg.threads)
    threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    reporter = _reporter(req, run, dist)
    reporter.message(describe_schedule(cfg, run.state.iteration if run.state else 0))
    result = None
    try:
        with StopRequest(on_second=lambda: _exit_now(dist)) as stop:
            result = train(run, hooks=hooks, stop=stop, dist=dist, reporter=reporter)
        if not result.abandoned:
            # Every process is done with its collectives before any leaves the group: a process
            # that tore gloo down while its peer still worked aborted ("terminate called ...").
            dist.barrier()
    except RuntimeError as err:
        ours = isinstance(err, PeerFailure | Diverged)
        if dist.is_parallel and not ours and _is_collective_error(err):
            raise dist.failure(err) from err
        raise
    finally:
        reporter.close()
        if board is not None:
            board.close()
        if result is None or not result.abandoned:  # else a worker may be inside a collective
            dist.close()
        torch.set_num_threads(threads)
    status = _report_end(result, run, dist)
    if result.abandoned:  # a worker thread is still inside a long torch operation
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def _check_tensorboard(folder: str | None) -> None:
    """--tensorboard: the extra is installed and the folder can be one (before any file)."""
    if folder is None:
        return
    from selfattn.train.tensorboard_log import summary_writer_class

    summary_writer_class()
    if Path(folder).exists() and not Path(folder).is_dir():
        raise ValueError(f"--tensorboard {folder} is a file: expected a folder for event files")


def _recorders(req: TrainRequest, run: Run, dist: DataParallel, hooks: Hooks):
    """Rank 0's hooks that keep each evaluation: the probe's attention (`ProbeRecorder`) and,
    with --tensorboard, TensorBoard's events (`TensorBoardLog`, returned to be closed)."""
    if not dist.is_main:
        return hooks, None
    splits = getattr(run.batches, "splits", None)  # a text run's; the induction task has none
    probes = ProbeRecorder.for_run(run, None if splits is None else splits.val)
    on_step, on_evaluated = list(hooks.on_step), [probes, *hooks.on_evaluated]
    board = None
    if req.tensorboard is not None:
        from selfattn.train.tensorboard_log import TensorBoardLog

        board = TensorBoardLog(req.tensorboard, probes, run.state.iteration if run.state else 0)
        on_step.append(board.on_step)
        on_evaluated.append(board.on_evaluated)
    return dataclasses.replace(hooks, on_step=on_step, on_evaluated=on_evaluated), board


def _reporter(req: TrainRequest, run: Run, dist: DataParallel) -> Reporter:
    if not dist.is_main:
        return Silent()
    if req.quiet:
        return Lines(run.config.iters)
    return Bar(run.config.iters, run.state.iteration if run.state else 0, run.title)


def _report_end(result: Result, run: Run, dist: DataParallel) -> int:
    """The last line (rank 0) and the exit status."""
    cfg = run.config
    if result.interrupted:
        if dist.is_main:
            print(
                f"selfattn train: stopped at iteration {result.iteration} of {cfg.iters}; "
                f"checkpoint saved in {run.out}. Resume with: selfattn train --resume {run.out}",
                file=sys.stderr,
            )
        return EXIT_INTERRUPTED
    if dist.is_main:
        last = next((r for r in reversed(result.records) if "val_loss" in r), {})
        val = last.get("val_loss", float("nan"))
        print(
            f"done: {result.iteration} iterations, val loss {val:.4f}; files in {run.out} "
            f"(selfattn generate --checkpoint {run.out})"
        )
    return 0


SHOW_CURSOR = b"\x1b[?25h"  # the ANSI sequence that undoes rich's hidden cursor


def _exit_now(dist: DataParallel) -> None:
    """A second Ctrl-C / SIGTERM: leave at once. Checkpoints are written atomically, so the last
    complete one is intact whatever was being written. A terminal gets its cursor back (the
    progress bar hides it) and the message on a line of its own."""
    terminal = [fd for fd in (1, 2) if os.isatty(fd)]
    for fd in terminal:
        os.write(fd, SHOW_CURSOR)
    if dist.is_main:
        os.write(2, (b"\n" if 2 in terminal else b"") + b"selfattn train: stopped at once (a "
                 b"second signal); the last complete checkpoint is kept\n")  # fmt: skip
    os._exit(EXIT_INTERRUPTED)


def _planned_config(req: TrainRequest) -> TrainConfig:
    """The settings the run will have, read before anything is built or written (the process
    group's backend depends on the device; `check_memory` on the sizes)."""
    if req.resume:
        saved = TrainConfig.from_dict(checkpoint.read_config(Path(req.resume))["train"])
        return saved.replace(**{k: v for k, v in req.overrides.items() if k in RESUMABLE})
    return PRESETS[req.preset or DEFAULT_PRESET].config.replace(**req.overrides)


def peak_bytes(cfg: TrainConfig, batch_size: int) -> int:
    """A floor on the memory one iteration needs at its peak, in bytes (float32):

        activations backward keeps   n_layers * k * B * T * C   (k = 16; 8 attention-only)
        the logits and their grads   3 * B * T * V              (V when the settings name it)
        the attention weights        n_layers * 2 * B * H * T * T, backend "naive" only (the
                                     other engines never hold a T x T matrix per head)

    The weights and AdamW's moments are left out: next to these they are small when it matters.
    A checkpoint adds nothing of size T x T (`weights_state_dict` builds no chapter masks).
    """
    b, t, c, h, n = batch_size, cfg.block_size, cfg.emb_dim, cfg.n_heads, cfg.n_layers
    floats = n * (8 if cfg.attn_only else 16) * b * t * c + 3 * b * t * (cfg.vocab_size or 0)
    if cfg.backend == "naive":
        floats += n * 2 * b * h * t * t
    return 4 * floats


def check_memory(cfg: TrainConfig, world_size: int = 1) -> None:
    """ValueError when the run cannot fit in the memory available (`peak_bytes` against RAM's
    MemAvailable for a CPU run, whose processes share it; against the GPU's free memory for a
    CUDA one, each process holding its share of the batch)."""
    batch = cfg.batch_size // world_size if cfg.device == "cuda" else cfg.batch_size
    need, available = peak_bytes(cfg, batch), _available_bytes(cfg.device)
    if available is None or need <= available:
        return
    hint = ", or a backend without T x T weights (sdpa, tiled)" if cfg.backend == "naive" else ""
    where = "on the GPU" if cfg.device == "cuda" else "in RAM"
    raise ValueError(
        f"the run needs at least {need / 2**30:.1f} GiB (batch {cfg.batch_size}, block size "
        f"{cfg.block_size}, backend {cfg.backend}) but {available / 2**30:.1f} GiB is free "
        f"{where}: lower --block-size or "
        f"--batch-size{hint}"
    )


def _available_bytes(device: str) -> int | None:
    """Free memory for the run: the GPU's; on the CPU the kernel's MemAvailable, or less when
    the process's cgroup (a container's limit) leaves less (None: unknown)."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    known = [n for n in (_ram_available_bytes(), cgroup_free_bytes()) if n is not None]
    return min(known) if known else None


def _ram_available_bytes() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, OSError, ValueError):
        return None


CGROUP = Path("/sys/fs/cgroup")  # cgroup v2's unified hierarchy, as a container sees it


def cgroup_free_bytes(root: Path | None = None) -> int | None:
    """What this process's cgroup v2 (at ``root``, default `CGROUP`) still allows: memory.max
    minus memory.current; None when there is no limit ("max") or no cgroup v2 to read."""
    root = CGROUP if root is None else root
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((root / "memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def _is_collective_error(err: RuntimeError) -> bool:
    """Whether ``err`` came from the process group (a peer died, hung or left)."""
    import torch.distributed as tdist

    if isinstance(err, tdist.DistError):
        return True
    text = str(err)
    return any(word in text for word in ("Gloo", "gloo", "NCCL", "Connection closed", "timed out"))


# --- a new run ----------------------------------------------------------------------------------


def new_run(req: TrainRequest, dist: DataParallel) -> Run:
    preset = req.preset or DEFAULT_PRESET
    # The run's schedule and text are fixed now: the decay's end written out (a resume with more
    # --iters keeps it) and the text's absolute path (a resume from any folder finds it).
    cfg = PRESETS[preset].config.replace(**_absolute_text(req.overrides)).with_fixed_schedule()
    out = Path(req.out if req.out is not None else f"runs/{preset}")
    _check_out(out, req.force)
    if cfg.data == "induction":
        tokenizer = induction_tokenizer(cfg.vocab_size)
        batches = _induction_batches(cfg, tokenizer, dist)
        data = {"source": "induction", "tokenizer": tokenizer.describe()}
    else:
        corpus = read_corpus(cfg.text_file)
        tokenizer = new_tokenizer(cfg.tokenizer, corpus, cfg.vocab_size)
        splits = encode_splits(corpus, tokenizer, cfg.block_size)
        batches = _batches(cfg, splits, dist)
        data = {
            "source": corpus.source,
            "sha256": corpus.sha256,
            "tokenizer": tokenizer.describe(),
            "train_tokens": splits.train.numel(),
            "val_tokens": splits.val.numel(),
        }
    _check_device(cfg.device)
    torch.manual_seed(cfg.seed)  # the weights, and the dropout stream after them
    model = GPT(cfg.model_config(tokenizer.vocab_size), context_parallel_group=dist.context_group)
    dist.barrier()  # every process has checked the folder before rank 0 changes it
    if dist.is_main:  # every check passed: now the folder changes
        out.mkdir(parents=True, exist_ok=True)
        for name in (*checkpoint.RUN_FILES, METRICS, SAMPLES, LOSS_PNG, SCORES_PNG, BPE_FILE,
                     PROBES):  # fmt: skip
            (out / name).unlink(missing_ok=True)
        remove_stale(out)
        tokenizer.save(out)
        record = {
            "format": checkpoint.FORMAT,
            "preset": preset,
            "model": dataclasses.asdict(model.config),
            "train": dataclasses.asdict(cfg),
            "data": data,
        }
        checkpoint.write_config(out, record)
    return Run(cfg, model, tokenizer, batches, out, title=preset)


def _check_out(out: Path, force: bool) -> None:
    """A folder holds a run once a checkpoint is committed: one killed before its first
    checkpoint (config.json alone) starts again without --force."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    held = checkpoint.holds_run(out)
    if held and not force:
        raise ValueError(
            f"--out {out} already holds a run ({held}): continue it with --resume {out}, "
            "overwrite it with --force, or pick another --out"
        )


def _absolute_text(overrides: dict) -> dict:
    """The flags with --text-file made absolute (config.json stores it so)."""
    if overrides.get("text_file") is None:
        return overrides
    return {**overrides, "text_file": str(Path(overrides["text_file"]).expanduser().resolve())}


def _batches(cfg: TrainConfig, splits, dist: DataParallel) -> Batches:
    return dist.shard(
        Batches(splits, cfg.batch_size, cfg.block_size, cfg.seed, cfg.device, dist.data_rank,
                dist.data_size)
    )  # fmt: skip


def _induction_batches(cfg: TrainConfig, tokenizer, dist: DataParallel) -> InductionBatches:
    return dist.shard(
        InductionBatches(tokenizer.vocab_size, cfg.batch_size, cfg.block_size, cfg.seed,
                         cfg.device, dist.data_rank, dist.data_size)
    )  # fmt: skip


# --- a resumed run ------------------------------------------------------------------------------


def resume_run(req: TrainRequest, dist: DataParallel) -> Run:
    """The run in --resume, checked whole (flags, text, every tensor's name and shape) before
    anything in its folder changes."""
    out = Path(req.resume)
    if req.out is not None and Path(req.out).resolve() != out.resolve():
        raise ValueError(
            f"--out {req.out} contradicts --resume {req.resume}: a run resumes in place"
        )
    record = checkpoint.read_config(out)
    if not checkpoint.has_checkpoint(out):
        raise ValueError(
            f"the run in {out} stopped before its first checkpoint: there is nothing to resume; "
            "run the command that started it again (without --resume)"
        )
    cfg = _resumed_config(req, out, record)
    state = checkpoint.load_state(out)
    history = [r for r in read_metrics(out / METRICS) if r["iter"] <= state.iteration]
    if state.iteration >= cfg.iters and not _evaluation_pending(history, state.iteration):
        raise ValueError(
            f"the run in {out} has done {state.iteration} of {cfg.iters} iterations: pass "
            f"--iters N (more than {state.iteration}) to go on"
        )
    data = record.get("data", {})
    tokenizer = saved_tokenizer(data.get("tokenizer", {}), out)
    if cfg.data == "induction":
        batches = _induction_batches(cfg, tokenizer, dist)
    else:
        corpus = _same_text(cfg.text_file, data.get("sha256"), out)
        batches = _batches(cfg, encode_splits(corpus, tokenizer, cfg.block_size), dist)
    # the engine may change on a resume (every engine computes the same function)
    model_config = dataclasses.replace(checkpoint.model_config(record), backend=cfg.backend)
    if model_config != cfg.model_config(tokenizer.vocab_size):
        raise ValueError(f"{out}/config.json: its model and training settings disagree")
    _check_device(cfg.device)
    model = GPT(model_config, context_parallel_group=dist.context_group)
    checkpoint.check_state(state, model, out)  # names and shapes: the state will load
    cut, probes = _kept_probes(out, state.iteration, dist)
    dist.barrier()  # every process has read the folder before rank 0 changes it
    if dist.is_main:  # checked: now the folder changes
        record["train"] = dataclasses.asdict(cfg)
        record["model"] = dataclasses.asdict(model_config)
        checkpoint.write_config(out, record)
        checkpoint.atomic_write_text(out / METRICS, "".join(json.dumps(r) + "\n" for r in history))
        if cut:
            write_probes(out, probes)
    return Run(cfg, model, tokenizer, batches, out, record.get("preset", "train"), state, history)


def _evaluation_pending(history: list[dict], iteration: int) -> bool:
    """Whether the run stopped during the evaluation of its last checkpointed iteration (its
    record has no validation loss): a resume runs that evaluation, even at the last iteration."""
    return bool(history) and history[-1]["iter"] == iteration and "val_loss" not in history[-1]


def _kept_probes(out: Path, iteration: int, dist: DataParallel) -> tuple[bool, Probes | None]:
    """The timeline's probes, up to the checkpoint like metrics.jsonl (`kept_probes`). A damaged
    file only feeds the timeline: it is dropped with a warning, and the timeline starts again."""
    try:
        return kept_probes(out, iteration)
    except ValueError as err:
        if dist.is_main:
            print(f"selfattn train: warning: {err}; it is replaced: the timeline starts again "
                  "at the next evaluation", file=sys.stderr)  # fmt: skip
        return True, None


def _resumed_config(req: TrainRequest, out: Path, record: dict) -> TrainConfig:
    """The run's settings with the flags a resume may change; any other flag must agree."""
    saved = TrainConfig.from_dict(record["train"])
    if req.preset is not None and req.preset != record.get("preset"):
        raise ValueError(
            f"--preset {req.preset} contradicts the run in {out} (preset {record.get('preset')})"
        )
    overrides = _absolute_text(req.overrides)
    for name, value in overrides.items():
        if name not in RESUMABLE and value != getattr(saved, name):
            flag = "--" + name.replace("_", "-")
            raise ValueError(
                f"{flag} {value} contradicts the run in {out} ({name}={getattr(saved, name)}); "
                f"a resumed run may change only {', '.join(sorted(RESUMABLE))}"
            )
    return saved.replace(**{k: v for k, v in overrides.items() if k in RESUMABLE})


def _same_text(text_file: str | None, sha256: str | None, out: Path):
    """The run's text, read again: refused when it is gone or changed since the run started."""
    if text_file is not None:
        path = Path(text_file)
        if not path.is_file():
            raise ValueError(
                f"the run in {out} trained on {path}, which is gone (no such file): put it back "
                "to resume"
            )
        if hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
            raise ValueError(f"the text of the run in {out} ({path}) changed since it started")
    corpus = read_corpus(text_file)
    if corpus.sha256 != sha256:
        raise ValueError(f"the text of the run in {out} ({corpus.source}) changed since it started")
    return corpus


# --- generate -----------------------------------------------------------------------------------


@dataclass
class GenerateRequest:
    checkpoint: str
    prompt: str = "\n"
    max_new_tokens: int = 200
    temperature: float = 1.0
    top_k: int | None = None
    seed: int | None = None
    device: str = "cpu"


def run_generate(req: GenerateRequest) -> int:
    """Print the prompt, then each new token's text as soon as it is decoded."""
    if req.prompt == "":
        raise ValueError("--prompt must hold at least one character")
    if req.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {req.temperature}")
    _check_device(req.device)
    loaded = checkpoint.load_checkpoint(req.checkpoint, req.device)
    tokenizer = loaded.tokenizer
    prompt = tokenizer.encode(req.prompt)
    top_k = _generate_notes(req, len(prompt), loaded.model)
    generator = torch.Generator(req.device)
    if req.seed is None:
        generator.seed()
    else:
        generator.manual_seed(req.seed)
    idx = torch.tensor([prompt], dtype=torch.long, device=req.device)  # (1, T)
    sys.stdout.write(req.prompt)
    sys.stdout.flush()
    new: list[int] = []
    shown = ""
    for token in loaded.model.stream(idx, req.max_new_tokens, req.temperature, top_k, generator):
        new.append(int(token))
        text = tokenizer.decode(new)
        if text.endswith("\ufffd"):  # a character cut in the middle of its bytes: wait
            continue
        sys.stdout.write(text[len(shown) :])
        sys.stdout.flush()
        shown = text
    sys.stdout.write(tokenizer.decode(new)[len(shown) :] + "\n")
    return 0


def _generate_notes(req: GenerateRequest, prompt_tokens: int, model: GPT) -> int | None:
    """Say on stderr what the model will not see as asked: a prompt over its context (cropped
    to the last context_length tokens) and a --top-k over its vocabulary (clipped). The top_k
    to sample with."""
    context, vocab = model.config.context_length, model.config.vocab_size
    if prompt_tokens > context:
        print(
            f"selfattn generate: note: the prompt is {prompt_tokens} tokens, over the model's "
            f"context of {context}: cropped, the model sees its last {context}",
            file=sys.stderr,
        )
    if req.top_k is not None and req.top_k > vocab:
        print(
            f"selfattn generate: note: --top-k {req.top_k} is over the vocabulary of {vocab} "
            f"tokens: clipped to {vocab}",
            file=sys.stderr,
        )
        return vocab
    return req.top_k
