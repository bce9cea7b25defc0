"""A training run's probes: the attention of one fixed text at each evaluation, in one file.

`selfattn train` (`selfattn.train.probes`) writes it; the timeline (`selfattn.explain.timeline`)
reads it. It sits below both, so that neither imports the other.

    RUN/probes.safetensors
        tokens           (T,)                int64    the probe's token ids, T <= MAX_TOKENS
        iterations       (N,)                int64    the evaluated iterations, increasing
        attention        (N, layers, H, T, T) float16 each head's weights on the probe (rows sum
                                                      to 1, causal: zero above the diagonal)
        induction        (N, layers, H)      float32  each head's induction score on the probe
        previous_token   (N, layers, H)      float32  ... and previous-token score (NaN: none)
        metadata: "format", "kind" ("induction" | "text"), "about" (the probe in words),
                  "labels" (a JSON list of the T tokens' text)

The file is small (a 64-token probe of 2 layers x 4 heads is 64 KiB per evaluation) and is
rewritten whole, atomically, at each evaluation: a reader sees the evaluations before or after
one, never half of one. Loading it unpickles nothing (safetensors).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from selfattn._extras import require

PROBES = "probes.safetensors"
FORMAT = "selfattn-probes/1"
MAX_TOKENS = 64  # the longest probe: its T x T weights per head stay small
_TENSORS = ("tokens", "iterations", "attention", "induction", "previous_token")


@dataclass
class Probes:
    """Every evaluation's attention on the probe; shapes as in the module's docstring."""

    tokens: Tensor  # (T,) int64
    labels: list[str]  # T token texts, whitespace made visible
    kind: str  # "induction" or "text"
    about: str  # what the probe is, in words
    iterations: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    attention: Tensor | None = None  # (N, layers, H, T, T) float16; None before the first
    induction: Tensor | None = None  # (N, layers, H) float32
    previous_token: Tensor | None = None  # (N, layers, H) float32

    def __len__(self) -> int:
        return int(self.iterations.numel())

    def until(self, iteration: int) -> Probes:
        """The evaluations up to ``iteration`` (a resume keeps those its checkpoint had)."""
        keep = self.iterations <= iteration
        cut = {name: getattr(self, name) for name in ("attention", "induction", "previous_token")}
        cut = {k: None if v is None or not keep.any() else v[keep] for k, v in cut.items()}
        return Probes(self.tokens, self.labels, self.kind, self.about, self.iterations[keep], **cut)

    def add(self, iteration: int, attention: Tensor, induction: Tensor, previous: Tensor) -> Probes:
        """These probes and one more evaluation: attention (layers, H, T, T), the scores
        (layers, H). An iteration already there is replaced (an evaluation run again)."""
        kept = self.until(iteration - 1)
        new = {
            "attention": attention.to(torch.float16)[None],
            "induction": induction.float()[None],
            "previous_token": previous.float()[None],
        }
        merged = {
            k: v if getattr(kept, k) is None else torch.cat([getattr(kept, k), v])
            for k, v in new.items()
        }
        iterations = torch.cat([kept.iterations, torch.tensor([iteration])])
        return Probes(self.tokens, self.labels, self.kind, self.about, iterations, **merged)

    def to_bytes(self) -> bytes:
        """The file's bytes (safetensors)."""
        if self.attention is None:
            raise ValueError("there is no evaluation to save yet")
        tensors = {name: getattr(self, name).contiguous() for name in _TENSORS}
        metadata = {
            "format": FORMAT,
            "kind": self.kind,
            "about": self.about,
            "labels": json.dumps(self.labels, ensure_ascii=False),
        }
        return _safetensors().save(tensors, metadata=metadata)


def read_probes(run_dir: str | Path) -> Probes:
    """The probes of the run in ``run_dir``; a ValueError saying what was expected and what is
    there when it has none, or a file that is not one."""
    folder = Path(run_dir)
    path = folder / PROBES
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: expected the --out folder of selfattn train")
    if not path.is_file():
        raise ValueError(
            f"{folder} has no {PROBES}: expected the attention probes that selfattn train "
            f"records at each evaluation, but this folder has none (a run of an older selfattn, "
            f"or not a run). Train it again with this version (selfattn train --out {folder} "
            "--force, or a new --out) to record them"
        )
    try:
        with _safe_open(path) as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
    except Exception as err:  # a damaged file: safetensors raises its own error types
        raise ValueError(f"{path} is truncated or corrupted ({type(err).__name__})") from None
    if metadata.get("format") != FORMAT or set(tensors) != set(_TENSORS):
        raise ValueError(
            f"{path}: expected probes of format {FORMAT} with tensors {', '.join(_TENSORS)}; got "
            f"format {metadata.get('format')!r} with {', '.join(sorted(tensors)) or 'none'}"
        )
    probes = Probes(
        tensors["tokens"],
        json.loads(metadata.get("labels", "[]")),
        metadata.get("kind", "text"),
        metadata.get("about", ""),
        tensors["iterations"],
        tensors["attention"],
        tensors["induction"],
        tensors["previous_token"],
    )
    _check_shapes(probes, path)
    return probes


def _check_shapes(p: Probes, path: Path) -> None:
    t, n = p.tokens.numel(), p.iterations.numel()
    a = p.attention
    good = (
        a.dim() == 5
        and a.shape[0] == n
        and a.shape[-2:] == (t, t)
        and p.induction.shape == p.previous_token.shape == a.shape[:3]
        and len(p.labels) == t
    )
    if not good:
        raise ValueError(
            f"{path}: expected attention (N, layers, H, T, T) for {n} iterations and {t} tokens; "
            f"got attention {tuple(a.shape)}, scores {tuple(p.induction.shape)}, "
            f"{len(p.labels)} labels"
        )


def _safetensors():
    return require("safetensors.torch", "text", "the training timeline's probes")


def _safe_open(path: Path):
    safetensors = require("safetensors", "text", "the training timeline's probes")
    return safetensors.safe_open(str(path), framework="pt")
