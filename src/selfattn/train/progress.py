"""What a run shows while it trains: a rich progress bar, or plain log lines (``--quiet``).

Both print one line per evaluation; only the bar shows every iteration (loss, validation loss,
learning rate, tokens/s, time left). Processes other than rank 0 get `Silent`.
"""

from __future__ import annotations

import sys
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


class Bar(Lines):
    """A rich progress bar, with the evaluation lines printed above it."""

    def __init__(self, iters: int, start: int, title: str) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

        super().__init__(iters)
        self.console = Console(file=sys.stdout)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  val {task.fields[val]}"),
            TextColumn("lr {task.fields[lr]}  {task.fields[speed]} tok/s"),
            TimeRemainingColumn(),
            console=self.console,
        )
        self.task = self.progress.add_task(
            title, total=iters, completed=start, loss="-", val="-", lr="-", speed="-"
        )
        self.progress.start()

    def step(self, record: dict) -> None:
        self.progress.update(
            self.task,
            completed=record["iter"],
            loss=f"{record['train_loss']:.4f}",
            lr=f"{record['lr']:.1e}",
            speed=f"{record['tokens_per_s']:,.0f}",
        )

    def evaluation(self, record: dict) -> None:
        self.progress.update(self.task, val=f"{record['val_loss']:.4f}")
        self.progress.console.print(eval_line(record, self.iters), markup=False, highlight=False)

    def message(self, text: str) -> None:
        self.progress.console.print(text, markup=False, highlight=False)

    def close(self) -> None:
        self.progress.stop()
