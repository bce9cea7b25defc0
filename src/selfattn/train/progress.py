"""What a run shows while it trains: a rich progress bar, or plain log lines (``--quiet``).

Both print one line per evaluation; only the bar shows every iteration (loss, validation loss,
learning rate, tokens/s, time left). Processes other than rank 0 get `Silent`.
"""

from __future__ import annotations

import sys
import time
from typing import Protocol


def eval_line(record: dict, iters: int) -> str:
    """iter 250/2000: train 2.0412, val 2.0871, lr 9.3e-04, 41,210 tok/s, 35.2 s"""
    parts = [f"iter {record['iter']}/{iters}:"]
    if "eval_train_loss" in record:
        parts.append(f"train {record['eval_train_loss']:.4f},")
    parts.append(f"val {record['val_loss']:.4f},")
    parts.append(f"lr {record['lr']:.1e},")
    parts.append(f"{record['tokens_per_s']:,.0f} tok/s,")
    parts.append(f"{record['elapsed_s']:.1f} s")
    extra = hook_summary(record)
    return " ".join(parts + ([", ".join(extra)] if extra else []))


def hook_summary(record: dict) -> list[str]:
    """The hooks' metrics, short: "NAME 0.9512" each, and for a family of them ("hook/FAMILY/
    MEMBER", say a score per head) its best member only: "induction max 0.8731 (L1H2)"."""
    out, best = [], {}
    for key, value in record.items():
        if not key.startswith("hook/"):
            continue
        family, _, member = key[len("hook/") :].partition("/")
        if not member:
            out.append(f"{family} {value:.4f}")
        elif family not in best or value > best[family][1]:
            best[family] = (member, value)
    out += [f"{family} max {value:.4f} ({member})" for family, (member, value) in best.items()]
    return out


class Reporter(Protocol):
    def step(self, record: dict) -> None: ...

    def evaluation(self, record: dict) -> None: ...

    def message(self, text: str) -> None: ...

    def close(self) -> None: ...


class Silent:
    def step(self, record: dict) -> None:
        pass

    def evaluation(self, record: dict) -> None:
        pass

    def message(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass


class Lines(Silent):
    """--quiet: one plain line per evaluation on stdout, for logs."""

    def __init__(self, iters: int) -> None:
        self.iters = iters

    def evaluation(self, record: dict) -> None:
        print(eval_line(record, self.iters), flush=True)

    def message(self, text: str) -> None:
        print(text, flush=True)


# The bar's fields, left to right, and the order in which they give way to a narrow terminal
# (the last first): a field is shown whole or not at all, as explain's tables drop columns.
FIELDS = ("title", "count", "loss", "val", "lr", "speed", "eta")
KEEP = ("count", "loss", "val", "eta", "lr", "speed", "title")
BAR_MIN, BAR_MAX = 10, 40  # the bar's own width: what the fields leave, within these


def bar_layout(texts: dict[str, str], width: int) -> tuple[str, int, str]:
    """(left text, bar width, right text) for a line of at most ``width - 1`` columns: the
    title left of the bar, the other fields right of it, as many whole ones as fit."""
    shown: list[str] = []
    for name in KEEP:
        if _line_width(texts, [*shown, name], BAR_MIN) < width:
            shown.append(name)
    left = texts["title"] if "title" in shown else ""
    right = "  ".join(texts[name] for name in FIELDS if name in shown and name != "title")
    bar = max(BAR_MIN, min(BAR_MAX, width - 1 - _line_width(texts, shown, 0)))
    return left, bar, right


def _line_width(texts: dict[str, str], shown: list[str], bar: int) -> int:
    right = [len(texts[name]) for name in shown if name != "title"]
    left = len(texts["title"]) if "title" in shown else 0
    return left + 1 + bar + 1 + sum(right) + 2 * max(len(right) - 1, 0)  # 1: rich's padding


class Bar(Lines):
    """A rich progress bar, with the evaluation lines printed above it. Its fields fit the
    terminal's width each time it is drawn (`bar_layout`)."""

    def __init__(self, iters: int, start: int, title: str, console=None) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn

        super().__init__(iters)
        self.console = console if console is not None else Console(file=sys.stdout)
        self.bar = BarColumn(bar_width=BAR_MIN)
        self.progress = Progress(
            TextColumn("[bold]{task.fields[left]}"),
            self.bar,
            TextColumn("{task.fields[right]}"),
            console=self.console,
        )
        self.start, self.started = start, time.monotonic()
        self.texts = {"title": title, "count": f"{start}/{iters}", "loss": "loss -",
                      "val": "val -", "lr": "lr -", "speed": "- tok/s", "eta": "eta -"}  # fmt: skip
        self.task = self.progress.add_task(title, total=iters, completed=start, left="", right="")
        self._draw(start)
        self.progress.start()

    def _draw(self, completed: int) -> None:
        left, self.bar.bar_width, right = bar_layout(self.texts, self.console.width)
        self.progress.update(self.task, completed=completed, left=left, right=right)

    def step(self, record: dict) -> None:
        done = record["iter"]
        self.texts |= {
            "count": f"{done}/{self.iters}",
            "loss": f"loss {record['train_loss']:.4f}",
            "lr": f"lr {record['lr']:.1e}",
            "speed": f"{record['tokens_per_s']:,.0f} tok/s",
        }
        if done > self.start:
            left = (time.monotonic() - self.started) / (done - self.start) * (self.iters - done)
            self.texts["eta"] = (
                f"eta {int(left) // 3600}:{int(left) // 60 % 60:02d}:{int(left) % 60:02d}"
            )
        self._draw(done)

    def evaluation(self, record: dict) -> None:
        self.texts["val"] = f"val {record['val_loss']:.4f}"
        self._draw(record["iter"])
        self.progress.console.print(eval_line(record, self.iters), markup=False, highlight=False)

    def message(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self.progress.stop()
