"""A run's files: the weights, the training state and the settings, written atomically.

    DIR/config.json               settings: {"format", "preset", "model", "train", "data"}
    DIR/model.safetensors         the weights (GPT's state_dict, see `weights_state_dict`)
    DIR/train_state.safetensors   everything a resume needs: the weights again, AdamW's moments
                                  and steps, the RNG states, the iteration
    DIR/tokenizer.json            a BPE run's tokenizer (a char run keeps its vocabulary in
                                  config.json)

Both .safetensors files are plain tensors plus string metadata: nothing is unpickled when they
load. Each carries a sha256 of its tensor bytes in its metadata, so a truncated or corrupted
file is a ValueError that names it, never garbage weights. Each is written to a temporary
file and renamed (`selfattn.train.files`), so a kill at any moment leaves the last good one.
The training state holds its own copy of the weights so that a resume reads one file, which
is always consistent with itself, whatever moment a kill came at.

`load_run(DIR)` gives the trained model and its tokenizer: what `selfattn generate` (and an
explain of a checkpoint) needs.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from selfattn._extras import require
from selfattn.models.gpt import GPT, GPTConfig, load_weights, weights_state_dict
from selfattn.train.config import TrainConfig
from selfattn.train.data import Tokenizer, saved_tokenizer
from selfattn.train.files import atomic_write_bytes, atomic_write_text

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
STATE = "train_state.safetensors"
FORMAT = "selfattn-train/1"
RUN_FILES = (CONFIG, WEIGHTS, STATE)  # any of them: the folder holds a run


def _safetensors():
    return require("safetensors.torch", "text", "selfattn train's checkpoints")


# --- safetensors with a checksum --------------------------------------------------------------


def encode(tensors: dict[str, Tensor], metadata: dict[str, str]) -> bytes:
    """safetensors bytes with ``metadata`` and a "sha256" of the tensor bytes added to it."""
    st = _safetensors()
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    payload = _payload(st.save(tensors))  # the tensor bytes do not depend on the metadata
    return st.save(tensors, {**metadata, "sha256": hashlib.sha256(payload).hexdigest()})


def decode(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, metadata) of a file written by `encode`; ValueError when it is damaged."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise ValueError(f"missing checkpoint file {path}") from None
    try:
        header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
        metadata = header.get("__metadata__") or {}
        ok = metadata.get("sha256") == hashlib.sha256(_payload(data)).hexdigest()
    except (ValueError, AttributeError, UnicodeDecodeError):
        ok, metadata = False, {}
    if not ok:
        raise ValueError(f"checkpoint file {path} is truncated or corrupted (checksum mismatch)")
    return _safetensors().load(data), metadata


def _payload(data: bytes) -> bytes:
    return data[8 + int.from_bytes(data[:8], "little") :]


# --- writing -----------------------------------------------------------------------------------


def save_weights(run_dir: Path, model: GPT, iteration: int) -> None:
    """DIR/model.safetensors: the weights, with the model config and iteration as metadata."""
    meta = {"format": FORMAT, "model": json.dumps(vars(model.config)), "iter": str(iteration)}
    atomic_write_bytes(Path(run_dir) / WEIGHTS, encode(weights_state_dict(model), meta))


@dataclass
class TrainState:
    """What a resume restores. ``optimizer`` maps a parameter name to its AdamW state."""

    iteration: int
    model: dict[str, Tensor]
    optimizer: dict[str, dict[str, Tensor]]
    rng: dict[str, Tensor]  # "torch" (the global generator: dropout), "batches", maybe "cuda"


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


def save_checkpoint(run_dir: Path, state: TrainState, model: GPT) -> None:
    """DIR/train_state.safetensors, then DIR/model.safetensors, each atomically."""
    tensors = {f"model.{k}": v for k, v in state.model.items()}
    for name, moments in state.optimizer.items():
        tensors.update({f"optim.{name}.{key}": value for key, value in moments.items()})
    tensors.update({f"rng.{k}": v for k, v in state.rng.items()})
    meta = {"format": FORMAT, "iter": str(state.iteration)}
    atomic_write_bytes(Path(run_dir) / STATE, encode(tensors, meta))
    save_weights(run_dir, model, state.iteration)


def write_config(run_dir: Path, record: dict) -> None:
    atomic_write_text(Path(run_dir) / CONFIG, json.dumps(record, indent=2) + "\n")


# --- reading -----------------------------------------------------------------------------------


def read_config(run_dir: Path) -> dict:
    """DIR/config.json, checked to be a selfattn run."""
    path = Path(run_dir) / CONFIG
    if not Path(run_dir).is_dir():
        raise ValueError(f"no run directory {run_dir}")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{run_dir} holds no run (no {CONFIG})") from None
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path} is truncated or corrupted (not JSON)") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise ValueError(f"{path} is not a selfattn run (format {FORMAT!r} expected)")
    return record


def load_state(run_dir: Path) -> TrainState:
    tensors, meta = decode(Path(run_dir) / STATE)
    groups: dict[str, dict[str, Tensor]] = {"model": {}, "optim": {}, "rng": {}}
    for key, value in tensors.items():
        kind, _, rest = key.partition(".")
        groups.setdefault(kind, {})[rest] = value
    optimizer: dict[str, dict[str, Tensor]] = {}
    for key, value in groups["optim"].items():
        name, _, field = key.rpartition(".")
        optimizer.setdefault(name, {})[field] = value
    return TrainState(int(meta.get("iter", 0)), groups["model"], optimizer, groups["rng"])


def restore(
    state: TrainState, model: GPT, optimizer: torch.optim.Optimizer, names: list[str]
) -> None:
    """Put a saved state into a freshly built model and optimizer (the batches' and the
    global RNG are restored by the caller: see `TrainState.rng`)."""
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
    model: GPT
    tokenizer: Tokenizer
    record: dict  # config.json
    train: TrainConfig
    iteration: int


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> LoadedRun:
    """The trained model of a run (in eval mode, on ``device``) and its tokenizer."""
    run_dir = Path(run_dir)
    record = read_config(run_dir)
    tensors, meta = decode(run_dir / WEIGHTS)
    model = GPT(model_config(record))
    try:
        load_weights(model, tensors)
    except RuntimeError as err:  # load_state_dict's size/key mismatch
        raise ValueError(f"{run_dir / WEIGHTS} does not fit {run_dir / CONFIG}: {err}") from None
    tokenizer = saved_tokenizer(record.get("data", {}).get("tokenizer", {}), run_dir)
    train = TrainConfig.from_dict(record["train"])
    return LoadedRun(model.to(device).eval(), tokenizer, record, train, int(meta.get("iter", 0)))


def model_config(record: dict) -> GPTConfig:
    try:
        return GPTConfig(**record["model"])
    except (KeyError, TypeError) as err:
        raise ValueError(f"config.json has no readable model settings: {err}") from None
