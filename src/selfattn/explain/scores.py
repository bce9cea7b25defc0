"""`selfattn explain --checkpoint DIR --induction-scores`: every head's scores, as a table.

The data comes from the caller (`selfattn.cli` passes `selfattn.train.head_scores`, so explain
does not import train): ``{"checkpoint", "model", "probe": {...}, "heads": [{"layer", "head",
"induction", "previous_token"}, ...]}``. ``--json`` prints it as it is; the terminal gets one
row per head, layer by layer, the few highest induction scores marked.

    layer  head  induction  previous-token
        0     0     0.0123          0.9412  <- previous-token head
        1     1     0.8731          0.0210  <- induction head
"""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.table import Table

TOP = 3  # the highest-scoring heads marked, of each kind
MARK_AT = 0.3  # ... when their score is at least this (a uniform head scores about 1/T)


def _top(rows: list[dict], key: str) -> set[tuple[int, int]]:
    ranked = sorted(rows, key=lambda r: -r[key] if r[key] == r[key] else 0.0)  # NaN last
    return {(r["layer"], r["head"]) for r in ranked[:TOP] if r[key] >= MARK_AT}


def render_head_scores(data: dict, console: Console, precision: int = 4) -> None:
    """The table of ``data`` (see the module's docstring), then what the probe was."""
    rows = data["heads"]
    induction, previous = _top(rows, "induction"), _top(rows, "previous_token")
    probe = data["probe"]
    console.print(f"{data['checkpoint']}: {data['model']}")
    table = Table(box=box.SIMPLE_HEAD, show_edge=False)
    for name in ("layer", "head", "induction", "previous-token"):
        table.add_column(name, justify="right")
    table.add_column("")
    for r in rows:
        where = (r["layer"], r["head"])
        marks = [m for m, s in (("induction head", induction), ("previous-token head", previous))
                 if where in s]  # fmt: skip
        table.add_row(
            str(r["layer"]),
            str(r["head"]),
            f"{r['induction']:.{precision}f}",
            f"{r['previous_token']:.{precision}f}",
            ("<- " + ", ".join(marks)) if marks else "",
        )
    console.print(table)
    bos = "" if probe["bos_token_id"] is None else f", token {probe['bos_token_id']} first"
    console.print(
        f"probe: {probe['sequences']} sequences of {probe['tokens_per_copy']} random tokens "
        f"repeated once{bos} (seed {probe['seed']}; Olsson et al. 2022). induction: attention "
        "on the token after the query's earlier occurrence; previous-token: on the token "
        f"before. Marked: the top {TOP} of each, if >= {MARK_AT}."
    )
