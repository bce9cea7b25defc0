"""The training timeline's probes: at each evaluation, every head's attention on one fixed text.

`selfattn train` records them into RUN/probes.safetensors (`selfattn.probe_file`), and
``selfattn explain --checkpoint RUN --timeline --html page.html`` plays them back. The probe is
fixed for the whole run, resumes included:

    induction preset   a random segment repeated to fill T tokens (`repeated_segments`, seeded
                       by the run's seed): the induction stripe appears on it as the heads form
    text presets       T tokens of the validation split, from the start of its first whole
                       line (after the first line break, blank lines skipped)

with T = min(`MAX_TOKENS`, block_size). The weights come from the model in eval mode (no
dropout, no autocast) through `selfattn.recording`, as `selfattn explain` traces them; the
scores are `selfattn.train.induction`'s, on the probe.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor

from selfattn.models.gpt import GPT
from selfattn.probe_file import MAX_TOKENS, PROBES, Probes, read_probes
from selfattn.recording import recording
from selfattn.train.data import Tokenizer
from selfattn.train.files import atomic_write_bytes
from selfattn.train.induction import induction_scores, previous_token_scores, repeated_segments
from selfattn.train.traces import token_label

_PROBE_SEED = 0x70726F62  # "prob": the induction probe's draw, mixed with the run's seed
_LINE_SEARCH = 2000  # how far into the validation split the first line's start is looked for


def probe_tokens(cfg, tokenizer: Tokenizer, val: Tensor | None) -> tuple[Tensor, str, str]:
    """The run's probe: (tokens (T,), kind, what it is in words). ``val``: the validation
    split's ids (None for the induction task)."""
    length = min(MAX_TOKENS, cfg.block_size)
    if cfg.data == "induction":
        generator = torch.Generator().manual_seed(cfg.seed ^ _PROBE_SEED)
        tokens = repeated_segments(1, length, tokenizer.vocab_size, generator)[0]
        return tokens, "induction", f"{length} tokens: a random segment, repeated"
    start = _first_line(val, tokenizer)
    if start + length > val.numel():  # a short validation split: from its start instead
        start = 0
    tokens = val[start : start + length].clone()
    about = f"{tokens.numel()} tokens of the validation split, from its first whole line"
    return tokens, "text", about


def _first_line(val: Tensor, tokenizer: Tokenizer) -> int:
    """The index of the first token of the first line that is not blank, after the first line
    break (0 if there is none near the start)."""
    ids = val[:_LINE_SEARCH].tolist()
    breaks = [i for i, token in enumerate(ids) if tokenizer.decode([token]).endswith("\n")]
    if not breaks:
        return 0
    start = breaks[0] + 1
    while start < len(ids) and not tokenizer.decode([ids[start]]).strip():
        start += 1  # blank lines (and leading spaces)
    return start if start < len(ids) else 0


@torch.no_grad()
def probe_attention(model: GPT, tokens: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The model's heads on the probe: attention (layers, H, T, T) float32, and the induction
    and previous-token scores (layers, H). The model is in eval mode while it runs, on this
    process alone (rank 0 probes while a context-parallel run's other ranks wait)."""
    was_training = model.training
    model.eval()
    x = tokens[None].to(next(model.parameters()).device)  # (1, T)
    try:
        with recording() as layers, model.without_context_parallel():
            model(x)
    finally:
        model.train(was_training)
    weights = torch.stack([steps["weights"][0].float().cpu() for steps in layers])  # (Ly, H, T, T)
    ids = tokens[None].cpu()  # (1, T)
    induction = torch.stack([induction_scores(w[None], ids) for w in weights])  # (Ly, H)
    previous = torch.stack([previous_token_scores(w[None]) for w in weights])  # (Ly, H)
    return weights, induction, previous


class ProbeRecorder:
    """Rank 0's recorder: a `selfattn.train.loop.Hooks.on_evaluated` hook that adds each
    evaluation's attention on the probe to RUN/probes.safetensors (rewritten atomically).
    ``last``: the latest evaluation's (iteration, attention (layers, H, T, T), induction and
    previous-token scores (layers, H)), for TensorBoard."""

    def __init__(self, out: Path, probes: Probes) -> None:
        self.path = Path(out) / PROBES
        self.probes = probes
        self.last: tuple[int, Tensor, Tensor, Tensor] | None = None

    @classmethod
    def for_run(cls, run, val: Tensor | None) -> ProbeRecorder:
        """The recorder of ``run`` (a `selfattn.train.loop.Run`): a resumed run continues its
        file, cut to its checkpoint's iteration, with the probe it started with."""
        start = run.state.iteration if run.state is not None else 0
        if start > 0 and (Path(run.out) / PROBES).is_file():
            return cls(run.out, read_probes(run.out).until(start))
        tokens, kind, about = probe_tokens(run.config, run.tokenizer, val)
        labels = [token_label(run.tokenizer.decode([t])) for t in tokens.tolist()]
        return cls(run.out, Probes(tokens, labels, kind, about))

    def __call__(self, run, records: list[dict]) -> None:
        iteration = records[-1]["iter"]
        attention, induction, previous = probe_attention(run.model, self.probes.tokens)
        self.probes = self.probes.add(iteration, attention, induction, previous)
        atomic_write_bytes(self.path, self.probes.to_bytes())
        self.last = (iteration, attention, induction, previous)


def kept_probes(out: Path, iteration: int) -> tuple[bool, Probes | None]:
    """A resume's probes: RUN/probes.safetensors' evaluations up to the checkpoint's
    ``iteration`` (later ones, like metrics.jsonl's later records, were not checkpointed), and
    whether that changes the file; None when none are left. Read before the resume changes
    anything (a damaged file: ValueError)."""
    if not (Path(out) / PROBES).is_file():
        return False, None
    probes = read_probes(out)
    kept = probes.until(iteration)
    return len(kept) != len(probes), kept if len(kept) else None


def write_probes(out: Path, probes: Probes | None) -> None:
    """Write ``probes`` (`kept_probes`) as the run's file; None removes it."""
    path = Path(out) / PROBES
    if probes is None:
        path.unlink(missing_ok=True)
    else:
        atomic_write_bytes(path, probes.to_bytes())
