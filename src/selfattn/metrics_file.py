"""A training run's metrics.jsonl: one JSON record per iteration (see `selfattn.train.loop`).

`selfattn train` writes it and reads it back on a resume; the timeline
(`selfattn.explain.timeline`) reads it. It sits below both, so that neither imports the other.
"""

from __future__ import annotations

import json
from pathlib import Path

METRICS = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict]:
    """The file's records, in order: JSON objects with an integer "iter". An empty list when
    the file is missing; a line cut short by a kill is skipped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("iter"), int):
            records.append(record)
    return records
