"""A run's files: the settings, and checkpoints committed as one unit by a manifest.

    DIR/config.json               settings: {"format", "preset", "model", "train", "data"}
    DIR/checkpoint.json           the manifest: {"format", "iteration", "files": {name: {"sha256",
                                  "bytes"}}}, the sha256 of each WHOLE file (header and tensors)
    DIR/model.safetensors         the weights (GPT's state_dict, see `weights_state_dict`)
    DIR/train_state.safetensors   everything a resume needs: the weights again, AdamW's moments
                                  and steps, the RNG states (free names: "torch", "batches", ...)
    DIR/tokenizer.json            a BPE run's tokenizer (a char run keeps its vocabulary in
                                  config.json)

Both .safetensors files are plain tensors plus string metadata: nothing is unpickled when they
load. A save (`save_checkpoint`) goes:

    1. settle: finish a killed save's renames (step 4), remove its leftovers and stale .tmp files
    2. write NAME.new for both files, flushed to disk
    3. write checkpoint.json atomically (a temporary file, fsync, rename): the commit point
    4. rename each NAME.new to NAME

A reader trusts only what checkpoint.json names: each file is NAME, or NAME.new when a kill came
between steps 3 and 4, and it is used only when its whole-file sha256 is the one recorded. So a
kill at any moment leaves the last committed checkpoint (the old one before step 3, the new one
after), never half of each; a damaged file (header or tensors) is a ValueError that names it
("... is truncated or corrupted"), never garbage weights. A folder with config.json and no
checkpoint.json holds no checkpoint yet: its run stopped before the first one.

Runs of an older selfattn (format "selfattn-train/1": no manifest, a checksum of the tensor bytes
only) are not read: the error says so in one line.

`load_run(DIR)` gives the trained model and its tokenizer: what `selfattn generate` (and an
explain of a checkpoint) needs. `load_checkpoint(DIR)` also reads a transformers GPT-2 folder
(config.json with ``"model_type": "gpt2"``, see `selfattn.models.gpt2`): the commands that take
``--checkpoint DIR`` call it. `load_state(DIR)` the training state a resume restores, checked
against the model with `check_state` before anything is written.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from selfattn._atomic import sync_folder
from selfattn._extras import require
from selfattn.models import gpt2
from selfattn.models.gpt import GPT, GPTConfig, load_weights, weights_state_dict
from selfattn.train.config import TrainConfig
from selfattn.train.data import BPETokenizer, Tokenizer, saved_tokenizer
from selfattn.train.files import (
    CheckpointWriteError,
    atomic_write_text,
    remove_stale,
    replace,
    write_durably,
)

CONFIG = "config.json"
MANIFEST = "checkpoint.json"
WEIGHTS = "model.safetensors"
STATE = "train_state.safetensors"
PENDING = ".new"  # NAME.new: written, not yet renamed into place (see the module's docstring)
FORMAT = "selfattn-train/2"
OLD_FORMATS = ("selfattn-train/1",)
CHECKPOINT_FILES = (WEIGHTS, STATE)
# Everything a new run in the folder replaces (`selfattn train --force`).
RUN_FILES = (CONFIG, MANIFEST, *CHECKPOINT_FILES, *(name + PENDING for name in CHECKPOINT_FILES))


def _safetensors():
    return require("safetensors.torch", "text", "selfattn train's checkpoints")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def encode(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes of ``tensors`` (moved to the CPU) with string ``metadata``."""
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    return _safetensors().save(tensors, metadata)


def decode(data: bytes, path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of safetensors bytes read from ``path``; ValueError when unreadable."""
    try:
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        metadata = header.get("__metadata__") or {}
        return _safetensors().load(data), metadata
    except Exception:  # safetensors raises its own error type for a bad header
        raise ValueError(f"checkpoint file {path} is truncated or corrupted") from None


# --- writing -----------------------------------------------------------------------------------


@dataclass
class TrainState:
    """What a resume restores. ``optimizer`` maps a parameter name to its AdamW state; ``rng``
    maps a name to a generator's state: "torch" (the global generator: dropout), "batches",
    maybe "cuda", and whatever else the loop keeps (any name, any tensor)."""

    iteration: int
    model: dict[str, Tensor]
    optimizer: dict[str, dict[str, Tensor]]
    rng: dict[str, Tensor]


def capture(
    model: GPT, optimizer: torch.optim.Optimizer, names: list[str], batches_state: Tensor, it: int
) -> TrainState:
    """The state of a run after ``it`` iterations. ``names``: the optimizer's parameters' names,
    in the optimizer's order."""
    per_index = optimizer.state_dict()["state"]
    moments = {names[i]: dict(state) for i, state in per_index.items()}
    rng = {"torch": torch.get_rng_state(), "batches": batches_state}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    return TrainState(it, weights_state_dict(model), moments, rng)


def _state_tensors(state: TrainState) -> dict[str, Tensor]:
    tensors = {f"model.{k}": v for k, v in state.model.items()}
    for name, moments in state.optimizer.items():
        tensors.update({f"optim.{name}.{key}": value for key, value in moments.items()})
    tensors.update({f"rng.{k}": v for k, v in state.rng.items()})
    return tensors


def save_checkpoint(run_dir: Path, state: TrainState, model: GPT) -> None:
    """Commit DIR/train_state.safetensors and DIR/model.safetensors as one checkpoint (the four
    steps of the module's docstring). A failed write is a `CheckpointWriteError` naming the file,
    and the previous checkpoint stays the committed one."""
    run_dir = Path(run_dir)
    meta = {"format": FORMAT, "iter": str(state.iteration)}
    weights_meta = {**meta, "model": json.dumps(vars(model.config))}
    blobs = {
        STATE: encode(_state_tensors(state), meta),
        WEIGHTS: encode(weights_state_dict(model), weights_meta),
    }
    settle(run_dir)
    try:
        for name, data in blobs.items():
            write_durably(run_dir / (name + PENDING), data, shown=run_dir / name)
        sync_folder(run_dir)
        files = {name: {"sha256": _sha256(b), "bytes": len(b)} for name, b in blobs.items()}
        manifest = {"format": FORMAT, "iteration": state.iteration, "files": files}
        atomic_write_text(run_dir / MANIFEST, json.dumps(manifest, indent=2) + "\n")  # commit
    except CheckpointWriteError:  # not committed: free the space the new files took
        for name in blobs:
            (run_dir / (name + PENDING)).unlink(missing_ok=True)
        raise
    for name in blobs:
        replace(run_dir / (name + PENDING), run_dir / name)
    sync_folder(run_dir)


def settle(run_dir: Path) -> None:
    """Finish what a killed save left: rename the committed NAME.new files into place, remove
    uncommitted ones and stale temporary files. Only a writer calls it; readers need not."""
    run_dir = Path(run_dir)
    try:
        recorded = _read_manifest(run_dir)["files"]
    except ValueError:
        recorded = {}
    for name in CHECKPOINT_FILES:
        pending = run_dir / (name + PENDING)
        if not pending.exists():
            continue
        entry = recorded.get(name) or {}
        if _sha256(pending.read_bytes()) == entry.get("sha256"):
            replace(pending, run_dir / name)
        else:
            pending.unlink()
    remove_stale(run_dir)
    sync_folder(run_dir)


def write_config(run_dir: Path, record: dict) -> None:
    atomic_write_text(Path(run_dir) / CONFIG, json.dumps(record, indent=2) + "\n")


# --- reading -----------------------------------------------------------------------------------


def read_config(run_dir: Path) -> dict:
    """DIR/config.json, checked to be a selfattn run of this format."""
    path = Path(run_dir) / CONFIG
    if not Path(run_dir).is_dir():
        raise ValueError(f"no run directory {run_dir}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{run_dir} holds no run (no {CONFIG})") from None
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path} is truncated or corrupted (not JSON)") from None
    if isinstance(record, dict) and record.get("format") in OLD_FORMATS:
        raise ValueError(
            f"{path}: a run of an older selfattn (format {record['format']!r}); this version "
            f"reads {FORMAT!r} runs only: train it again (its {WEIGHTS} still loads with "
            "safetensors)"
        )
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a selfattn run (format {FORMAT!r} expected)")
    return record


def has_checkpoint(run_dir: Path) -> bool:
    """Whether DIR holds a committed checkpoint (a run killed before its first one does not)."""
    return (Path(run_dir) / MANIFEST).is_file()


def holds_run(folder: Path) -> str | None:
    """The file that makes ``folder`` hold a run worth keeping (a committed checkpoint, or an
    older selfattn's weights), or None: config.json alone is a run that never saved."""
    return next((n for n in (MANIFEST, *CHECKPOINT_FILES) if (Path(folder) / n).exists()), None)


def _read_manifest(run_dir: Path) -> dict:
    path = run_dir / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(
            f"{run_dir} holds no checkpoint yet (no {MANIFEST}): its run stopped before the "
            "first one"
        ) from None
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path} is truncated or corrupted (not JSON)") from None
    try:
        ok = manifest["format"] == FORMAT and isinstance(manifest["iteration"], int)
        ok = ok and all(isinstance(manifest["files"][n]["sha256"], str) for n in CHECKPOINT_FILES)
    except (KeyError, TypeError):
        ok = False
    if not ok:
        raise ValueError(f"{path} is truncated or corrupted (not a {FORMAT} manifest)")
    return manifest


def _read_committed(run_dir: Path, name: str) -> tuple[dict[str, Tensor], int]:
    """(tensors, iteration) of the committed ``name``: NAME, or NAME.new between a commit and
    its rename, whichever has the whole-file sha256 that the manifest records."""
    for _ in range(3):  # a save may commit between our two reads: then read again
        manifest = _read_manifest(run_dir)
        for path in (run_dir / name, run_dir / (name + PENDING)):
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                continue
            if _sha256(data) == manifest["files"][name]["sha256"]:
                return decode(data, run_dir / name)[0], manifest["iteration"]
        if _read_manifest(run_dir) == manifest:
            break
    path = run_dir / name
    if not path.exists():
        raise ValueError(f"checkpoint file {path} is missing ({MANIFEST} names it)")
    raise ValueError(
        f"checkpoint file {path} is truncated or corrupted (its sha256 is not the one "
        f"{MANIFEST} records)"
    )


def load_state(run_dir: Path) -> TrainState:
    """The training state of DIR's committed checkpoint (check it with `check_state`)."""
    tensors, iteration = _read_committed(Path(run_dir), STATE)
    groups: dict[str, dict[str, Tensor]] = {"model": {}, "optim": {}, "rng": {}}
    for key, value in tensors.items():
        kind, _, rest = key.partition(".")
        groups.setdefault(kind, {})[rest] = value
    optimizer: dict[str, dict[str, Tensor]] = {}
    for key, value in groups["optim"].items():
        name, _, field = key.rpartition(".")
        optimizer.setdefault(name, {})[field] = value
    return TrainState(iteration, groups["model"], optimizer, groups["rng"])


def _shapes(tensors: dict[str, Tensor]) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in tensors.items()}


def check_state(state: TrainState, model: GPT, run_dir: Path = Path(".")) -> None:
    """ValueError naming every tensor of ``state`` that does not fit ``model`` (name, saved
    shape, expected shape): the weights, AdamW's moments and the RNG states a resume needs."""
    saved = {f"model.{k}": s for k, s in _shapes(state.model).items()}
    expected = {f"model.{k}": s for k, s in _shapes(weights_state_dict(model)).items()}
    problems = gpt2.shape_problems(saved, expected, "is not in the model")
    params = _shapes(dict(model.named_parameters()))
    for name, moments in state.optimizer.items():
        if name not in params:
            problems.append(f"optim.{name}: the model has no such parameter")
            continue
        for key, value in moments.items():
            want = () if key == "step" else params[name]
            if tuple(value.shape) != want:
                problems.append(f"optim.{name}.{key} saved {tuple(value.shape)}, expected {want}")
    problems += [f"rng.{k} missing" for k in ("torch", "batches") if k not in state.rng]
    if problems:
        raise gpt2.misfit(Path(run_dir) / STATE, Path(run_dir) / CONFIG, problems)


def restore(
    state: TrainState, model: GPT, optimizer: torch.optim.Optimizer, names: list[str]
) -> None:
    """Put a saved state into a freshly built model and optimizer (the batches' and the
    global RNG are restored by the caller: see `TrainState.rng`)."""
    check_state(state, model)
    load_weights(model, state.model)
    wanted = optimizer.state_dict()
    device = next(model.parameters()).device
    index = {name: i for i, name in enumerate(names)}
    if set(state.optimizer) - set(index):
        raise ValueError("the checkpoint's optimizer state names parameters this model lacks")
    wanted["state"] = {
        index[name]: {k: v if k == "step" else v.to(device) for k, v in moments.items()}
        for name, moments in state.optimizer.items()
    }
    optimizer.load_state_dict(wanted)


@dataclass
class LoadedRun:
    """A model ready to run (eval mode) and its tokenizer. For a GPT-2 folder ``train`` and
    ``iteration`` are None and ``record`` is transformers' config.json."""

    model: GPT
    tokenizer: Tokenizer
    record: dict  # config.json
    train: TrainConfig | None
    iteration: int | None
    bos_token_id: int | None = None  # a token that starts every text (GPT-2's <|endoftext|>)

    @property
    def description(self) -> str:
        """What the model is, in words, for captions."""
        if self.train is None:
            return "a GPT-2 checkpoint loaded into the chapter's GPT (GPT.from_hf)"
        return f"the trained GPT of `selfattn train` (iteration {self.iteration})"


def load_checkpoint(folder: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """A selfattn run (`load_run`) or a transformers GPT-2 folder (`load_gpt2`), by its
    config.json: ``"format": "selfattn-train/2"`` or a ``"model_type"``."""
    folder = Path(folder)
    try:
        record = json.loads((folder / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        record = None  # load_run says what is wrong
    if gpt2.is_transformers_config(record):
        return load_gpt2(folder, device)
    if isinstance(record, dict) and "format" not in record:
        raise ValueError(
            f'{folder / CONFIG} is neither a selfattn run ("format": {FORMAT!r}) nor a GPT-2 '
            'checkpoint ("model_type": "gpt2")'
        )
    return load_run(folder, device)


def load_gpt2(folder: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """A transformers GPT-2 folder: `GPT.from_hf`, and its tokenizer (tokenizer.json, or
    vocab.json + merges.txt). ValueError, in one line, for a config that is not GPT-2 shaped,
    tensors that do not fit it (naming them), or a missing tokenizer."""
    folder = Path(folder)
    record = gpt2.read_config(folder)
    gpt2.config_from_hf(record, str(folder / CONFIG))  # refused before any tensor is read
    tokenizer = BPETokenizer(gpt2.load_tokenizer(folder))
    model = GPT.from_hf(folder)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens, more than the model's "
            f"vocab_size of {model.config.vocab_size}"
        )
    bos = record.get("bos_token_id")
    bos = bos if isinstance(bos, int) and 0 <= bos < tokenizer.vocab_size else None
    return LoadedRun(model.to(device), tokenizer, record, None, None, bos)


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """The trained model of a run's committed checkpoint (in eval mode, on ``device``) and its
    tokenizer. ValueError, in one line, for a damaged file or weights that do not fit
    config.json (naming the tensors: name, saved shape, expected shape)."""
    run_dir = Path(run_dir)
    record = read_config(run_dir)
    tensors, iteration = _read_committed(run_dir, WEIGHTS)
    model = GPT(model_config(record))
    problems = gpt2.shape_problems(
        _shapes(tensors), _shapes(weights_state_dict(model)), "is not in the model"
    )
    if problems:
        raise gpt2.misfit(run_dir / WEIGHTS, run_dir / CONFIG, problems)
    load_weights(model, tensors)
    tokenizer = saved_tokenizer(record.get("data", {}).get("tokenizer", {}), run_dir)
    train = TrainConfig.from_dict(record["train"])
    return LoadedRun(model.to(device).eval(), tokenizer, record, train, iteration)


def model_config(record: dict) -> GPTConfig:
    try:
        return GPTConfig(**record["model"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"config.json has no readable model settings: {err}") from None
