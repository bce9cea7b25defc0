"""A trained run's attention on some text: what `selfattn explain --checkpoint DIR` renders.
DIR is a `selfattn train` run or a transformers GPT-2 folder (`load_checkpoint`).

    text -> the run's tokenizer -> ids (1, T), T <= context_length
         -> the trained GPT, traced (`selfattn.trace.trace_all`): one `Trace` per block, H heads
            of (T queries, T keys), the tokens' text as labels

On an induction run (``selfattn train --preset induction``) and a text such as
"abcdefghijabcdefghij", layer 0 shows the previous-token diagonal and layer 1 the induction
stripe: each repeated token looks at the key right after its earlier occurrence.
"""

from __future__ import annotations

from pathlib import Path

import torch

from selfattn.trace import Trace, trace_all
from selfattn.train.checkpoint import load_checkpoint

VISIBLE = {" ": "␣", "\n": "\\n", "\t": "\\t"}  # whitespace tokens, drawn as labels


def token_label(text: str) -> str:
    """A token's text as a label: whitespace made visible."""
    return "".join(VISIBLE.get(c, c) for c in text) or "∅"


def trace_run(run_dir: str | Path, text: str, device: str = "cpu") -> list[Trace]:
    """One `Trace` per layer of the checkpoint's model on ``text`` (eval mode, no dropout)."""
    if not text:
        raise ValueError("--text must hold at least one character")
    loaded = load_checkpoint(run_dir, device)
    ids = loaded.tokenizer.encode(text)
    context = loaded.model.config.context_length
    if len(ids) > context:
        raise ValueError(
            f"--text is {len(ids)} tokens long, over the run's context of {context} tokens"
        )
    labels = [token_label(loaded.tokenizer.decode([i])) for i in ids]
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    traces = trace_all(loaded.model, idx, labels)
    for tr in traces:
        tr.extras["description"] = (
            f"{Path(run_dir).name}: {loaded.description}, block {tr.extras['layer']}"
        )
    return traces
