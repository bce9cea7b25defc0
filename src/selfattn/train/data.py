"""Text in, batches out: the corpus, its tokenizer, the train/validation split, random windows.

    text (str) -> first 90% train, last 10% validation (split on characters, as nanoGPT)
               -> tokenizer: "char" (the text's distinct characters, sorted) or "bpe" (a
                  byte-level BPE trained on the training split with the `tokenizers` library)
               -> two 1-D int64 tensors of token ids
               -> `Batches`: random windows x (B, T) and their next tokens y (B, T)

The built-in corpus is tiny Shakespeare, shipped in `selfattn.data`. Any UTF-8 file works with
``text_file``; a missing, empty, binary or too short one is a ValueError naming the file.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

import torch
from torch import Tensor

from selfattn._extras import require

BUILTIN = "tinyshakespeare"  # the name of the built-in corpus in config.json
TRAIN_FRACTION = 0.9
BPE_FILE = "tokenizer.json"  # a BPE tokenizer is saved beside the weights under this name


@dataclass(frozen=True)
class Corpus:
    """A text and where it came from: ``source`` is BUILTIN or the file's absolute path."""

    text: str
    source: str
    sha256: str

    @property
    def splits(self) -> tuple[str, str]:
        """(train text, validation text): the first 90% of the characters, then the rest."""
        cut = int(len(self.text) * TRAIN_FRACTION)
        return self.text[:cut], self.text[cut:]


def read_corpus(text_file: str | None) -> Corpus:
    """The built-in tiny Shakespeare (``None``) or a UTF-8 text file, checked."""
    if text_file is None:
        data = resources.files("selfattn.data").joinpath("tinyshakespeare.txt").read_bytes()
        return Corpus(data.decode("utf-8"), BUILTIN, hashlib.sha256(data).hexdigest())
    path = Path(text_file).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "no such file"
        raise ValueError(f"cannot read --text-file {text_file}: {what}")
    data = path.read_bytes()
    if not data.strip():
        raise ValueError(f"--text-file {text_file} is empty")
    if b"\x00" in data:
        raise ValueError(f"--text-file {text_file} looks binary (it holds NUL bytes), not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"--text-file {text_file} is not UTF-8 text (byte {err.start} cannot be decoded)"
        ) from None
    return Corpus(text, str(path.resolve()), hashlib.sha256(data).hexdigest())


class Tokenizer(Protocol):
    """What training and generation need from a tokenizer."""

    kind: str

    @property
    def vocab_size(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def describe(self) -> dict:
        """Its entry in config.json (files it needs are written by `save`)."""
        ...

    def save(self, run_dir: Path) -> None: ...


class CharTokenizer:
    """One token per distinct character of the text, sorted (nanoGPT's shakespeare_char)."""

    kind = "char"

    def __init__(self, chars: str) -> None:
        if not chars or len(set(chars)) != len(chars):
            raise ValueError("a char tokenizer needs distinct characters, at least one")
        self.chars = chars
        self._ids = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self._ids[c] for c in text]
        except KeyError as err:
            raise ValueError(
                f"the character {err.args[0]!r} is not in this run's vocabulary of "
                f"{self.vocab_size} characters"
            ) from None

    def decode(self, ids: list[int]) -> str:
        return "".join(self.chars[i] for i in ids)

    def describe(self) -> dict:
        return {"kind": self.kind, "chars": self.chars}

    def save(self, run_dir: Path) -> None:
        pass  # the characters live in config.json


class BPETokenizer:
    """A byte-level BPE (GPT-2's scheme) from the `tokenizers` library; saved as tokenizer.json."""

    kind = "bpe"

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        tk = require("tokenizers", "text", "--tokenizer bpe")
        if vocab_size < 257:
            raise ValueError(
                f"--vocab-size must be at least 257 for a byte-level BPE (256 byte tokens + "
                f"merges), got {vocab_size}"
            )
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        lines = text.splitlines(keepends=True)
        chunks = ("".join(lines[i : i + 1000]) for i in range(0, len(lines), 1000))
        tok.train_from_iterator(chunks, trainer)
        return cls(tok)

    @classmethod
    def load(cls, run_dir: Path) -> BPETokenizer:
        tk = require("tokenizers", "text", "a BPE run")
        path = run_dir / BPE_FILE
        try:
            return cls(tk.Tokenizer.from_file(str(path)))
        except Exception as err:  # the library raises its own Exception subclass
            raise ValueError(f"cannot load the run's tokenizer {path}: {err}") from None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def describe(self) -> dict:
        return {"kind": self.kind, "file": BPE_FILE, "vocab_size": self.vocab_size}

    def save(self, run_dir: Path) -> None:
        from selfattn.train.files import atomic_write_text

        atomic_write_text(run_dir / BPE_FILE, self.tokenizer.to_str())


def new_tokenizer(kind: str, corpus: Corpus, vocab_size: int | None) -> Tokenizer:
    """A tokenizer for a new run: "char" over the whole text, "bpe" trained on the train split."""
    if kind == "char":
        if vocab_size is not None:
            raise ValueError("--vocab-size is for --tokenizer bpe; a char vocabulary is the text's")
        return CharTokenizer.from_text(corpus.text)
    if kind == "bpe":
        return BPETokenizer.train(corpus.splits[0], 512 if vocab_size is None else vocab_size)
    raise ValueError(f"unknown tokenizer {kind!r}; expected 'char' or 'bpe'")


def saved_tokenizer(entry: dict, run_dir: Path) -> Tokenizer:
    """The tokenizer a run saved (its config.json entry, and tokenizer.json for BPE)."""
    kind = entry.get("kind")
    if kind == "char" and isinstance(entry.get("chars"), str):
        return CharTokenizer(entry["chars"])
    if kind == "bpe":
        return BPETokenizer.load(run_dir)
    raise ValueError(
        f"{run_dir}/config.json has an unreadable tokenizer entry: {json.dumps(entry)}"
    )


@dataclass(frozen=True)
class TokenSplits:
    """The corpus as token ids: train and val, 1-D int64 each."""

    train: Tensor
    val: Tensor


def encode_splits(corpus: Corpus, tokenizer: Tokenizer, block_size: int) -> TokenSplits:
    """Both splits encoded; each must hold a window of block_size + 1 tokens."""
    parts = {}
    for name, text in zip(("train", "val"), corpus.splits, strict=True):
        ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
        if ids.numel() < block_size + 1:
            share = "first 90%" if name == "train" else "last 10%"
            raise ValueError(
                f"the text is too short: its {name} split (the {share}) has {ids.numel()} "
                f"tokens, fewer than block size + 1 = {block_size + 1}"
            )
        parts[name] = ids
    return TokenSplits(**parts)


def rank_rows(batch_size: int, rank: int, world_size: int) -> slice:
    """This process's rows of a global batch drawn whole by every process from one seeded
    generator: equal shares, in rank order (a ValueError when the batch does not split)."""
    if batch_size % world_size != 0:
        raise ValueError(f"batch size {batch_size} must be divisible by the {world_size} processes")
    share = batch_size // world_size
    return slice(rank * share, (rank + 1) * share)


class RandomBatches:
    """What every batch source shares: x, y (B_local, T) int64 on ``device``, y being x shifted
    by one token, drawn from one seeded training generator (nanoGPT's get_batch).

    Every process draws the same global batch of ``batch_size`` rows and keeps its own slice
    (rank r of W keeps rows r*B/W .. (r+1)*B/W), so W processes see together exactly what one
    process sees. `eval_batch` draws from a generator the caller passes, so evaluation never
    moves the training stream. `state` / `load_state` carry the stream across a resume.

    A batch source for another task needs `rows` only: this process's rows, (B_local, T + 1),
    of a global batch drawn from ``generator``.
    """

    def __init__(
        self,
        batch_size: int,
        block_size: int,
        seed: int,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.batch_size, self.block_size = batch_size, block_size
        self.device = device
        self.rows = rank_rows(batch_size, rank, world_size)
        self.generator = torch.Generator().manual_seed(seed)

    def sequences(self, split: str, generator: torch.Generator) -> Tensor:
        raise NotImplementedError

    def _draw(self, split: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        seq = self.sequences(split, generator)  # (B_local, T + 1)
        x, y = seq[:, :-1], seq[:, 1:]  # (B_local, T) each
        return x.to(self.device), y.to(self.device)

    def next_train(self) -> tuple[Tensor, Tensor]:
        return self._draw("train", self.generator)

    def eval_batch(self, split: str, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        return self._draw(split, generator)

    def state(self) -> Tensor:
        return self.generator.get_state()

    def load_state(self, state: Tensor) -> None:
        self.generator.set_state(state)


class Batches(RandomBatches):
    """Random windows of T + 1 tokens from the text's token ids (see `RandomBatches`)."""

    def __init__(
        self,
        splits: TokenSplits,
        batch_size: int,
        block_size: int,
        seed: int,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(batch_size, block_size, seed, device, rank, world_size)
        self.splits = splits
        # every window of T + 1 tokens, as a view: (N - T, T + 1)
        self._windows = {
            name: ids.unfold(0, block_size + 1, 1)
            for name, ids in (("train", splits.train), ("val", splits.val))
        }

    def sequences(self, split: str, generator: torch.Generator) -> Tensor:
        windows = self._windows[split]
        ix = torch.randint(len(windows), (self.batch_size,), generator=generator)  # (B,)
        return windows[ix[self.rows]]  # (B_local, T + 1), a copy
