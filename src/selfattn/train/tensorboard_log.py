"""`selfattn train --tensorboard DIR`: the run's scalars and the probe's attention, for TensorBoard.

Written through `torch.utils.tensorboard.SummaryWriter` (the ``tensorboard`` extra, imported only
when asked for), by rank 0 alone:

    every iteration     loss/train, train/lr, train/tokens_per_s
    every evaluation    loss/val, loss/eval_train, and each evaluation hook's metric under its
                        own name (the induction preset: accuracy, induction/L1H0, ...);
                        attention/layer{i}: the probe's weights (`selfattn.train.probes`), the
                        layer's heads side by side, white 0 to dark blue 1

The step of each value is its iteration. A resumed run opens the folder with
``purge_step = checkpoint's iteration + 1``: TensorBoard hides what the stopped run wrote past its
checkpoint, which the resumed run writes again.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import Tensor

from selfattn._extras import require

_TAGS = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "eval_train_loss": "loss/eval_train",
    "lr": "train/lr",
    "tokens_per_s": "train/tokens_per_s",
}
_EVALUATION = ("val_loss", "eval_train_loss")
_IMAGE_PX = 192  # about this many pixels per head's side
_WHITE, _BLUE = torch.tensor([247.0, 251.0, 255.0]), torch.tensor([8.0, 48.0, 107.0])


def tag(key: str) -> str | None:
    """The TensorBoard tag of a metrics.jsonl key (None: not logged, e.g. iter, elapsed_s)."""
    if key.startswith("hook/"):
        return key.removeprefix("hook/")
    return _TAGS.get(key)


def summary_writer_class():
    """`SummaryWriter`, or `MissingExtra` naming the ``tensorboard`` extra."""
    require("tensorboard", "tensorboard", "--tensorboard")
    return require("torch.utils.tensorboard", "tensorboard", "--tensorboard").SummaryWriter


class TensorBoardLog:
    """The hooks that write a run into ``log_dir``: `on_step` (`Hooks.on_step`) and
    `on_evaluated` (`Hooks.on_evaluated`); ``probes`` is the run's `ProbeRecorder`."""

    def __init__(self, log_dir: str | Path, probes, start: int = 0) -> None:
        writer = summary_writer_class()
        self.writer = writer(str(log_dir), purge_step=start + 1 if start > 0 else None)
        self.probes = probes

    def on_step(self, record: dict) -> None:
        for key, value in record.items():
            name = tag(key)
            if name is not None and key not in _EVALUATION and not key.startswith("hook/"):
                self._scalar(name, value, record["iter"])

    def on_evaluated(self, run, records: list[dict]) -> None:
        record = records[-1]
        for key, value in record.items():
            name = tag(key)
            if name is not None and (key in _EVALUATION or key.startswith("hook/")):
                self._scalar(name, value, record["iter"])
        last = self.probes.last
        if last is not None and last[0] == record["iter"]:
            it, attention, induction, previous = last
            for layer, heads in enumerate(attention):
                image = attention_image(heads)
                self.writer.add_image(f"attention/layer{layer}", image, it, dataformats="HWC")
            for name, scores in (("induction", induction), ("previous_token", previous)):
                for (layer, head), value in zip(
                    _heads(scores), scores.flatten().tolist(), strict=True
                ):
                    self._scalar(f"probe/{name}/L{layer}H{head}", value, it)
        self.writer.flush()

    def _scalar(self, name: str, value, step: int) -> None:
        value = math.nan if value is None else float(value)
        self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


def _heads(scores: Tensor) -> list[tuple[int, int]]:
    """(layer, head) of each entry of a (layers, H) tensor, in its flattened order."""
    return [(layer, head) for layer in range(scores.shape[0]) for head in range(scores.shape[1])]


def attention_image(heads: Tensor) -> Tensor:
    """(H, T, T) weights in [0, 1] -> (height, width, 3) uint8: the heads side by side, each
    cell a square of pixels, white (0) to dark blue (1), 2 grey pixels between heads."""
    n_heads, t = heads.shape[0], heads.shape[-1]
    px = max(1, _IMAGE_PX // t)
    w = heads.float().clamp(0, 1).repeat_interleave(px, -1).repeat_interleave(px, -2)
    rgb = _WHITE + (_BLUE - _WHITE) * w[..., None]  # (H, tp, tp, 3)
    gap = torch.full((t * px, 2, 3), 200.0)
    parts = []
    for h in range(n_heads):
        parts += [rgb[h]] + ([gap] if h < n_heads - 1 else [])
    return torch.cat(parts, dim=1).round().to(torch.uint8)
