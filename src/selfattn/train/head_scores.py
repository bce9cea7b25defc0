"""Every head's induction and previous-token score: `selfattn explain --checkpoint DIR
--induction-scores`, on any checkpoint (a `selfattn train` run or a GPT-2 folder).

The probe is Olsson et al.'s (2022, "In-context Learning and Induction Heads"): a sequence of
random tokens, repeated. In the second copy each token's next token is the one that followed its
first occurrence, so an induction head attends from token t to the key right after t's earlier
occurrence; a previous-token head attends from t to t - 1.

    [bos]  r1 r2 ... rN  r1 r2 ... rN        N random token ids, uniform over the vocabulary,
                                              drawn with a seeded generator; a GPT-2 folder's
                                              bos_token_id first, where its config has one

The scores are `selfattn.train.induction`'s (the same ones the induction preset logs while it
trains), averaged over `SEQUENCES` probes:

    induction score        the share of attention on the keys right after earlier occurrences
                           of the query's token, over the queries whose token occurred before
    previous-token score   the mean weight on the previous key, over every query t >= 1

Both lie in [0, 1]; a uniform head over T keys scores about 1/T on each.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfattn.models.gpt import GPT
from selfattn.recording import recording
from selfattn.train.checkpoint import load_checkpoint
from selfattn.train.induction import induction_scores, previous_token_scores

SEQUENCES = 8  # probes per score
LENGTH = 50  # random tokens per copy (fewer when the context is short)
DEFAULT_SEED = 0


def probe(
    vocab_size: int, length: int, sequences: int, seed: int, bos: int | None = None
) -> Tensor:
    """(sequences, [1 +] 2 * length) int64: random tokens, repeated once; ``bos`` first if given."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randint(vocab_size, (sequences, length), generator=generator)
    x = torch.cat([tokens, tokens], dim=1)  # (S, 2N)
    if bos is not None:
        x = torch.cat([torch.full((sequences, 1), bos, dtype=torch.long), x], dim=1)
    return x


def head_scores(model: GPT, x: Tensor) -> list[dict]:
    """model's heads on the probe x (S, T): one row per head, {"layer", "head", "induction",
    "previous_token"}, layer by layer."""
    with torch.no_grad(), recording() as layers:
        model(x.to(next(model.parameters()).device))
    rows = []
    for layer, steps in enumerate(layers):
        w = steps["weights"].float().cpu()  # (S, H, T, T)
        for head, (ind, prev) in enumerate(
            zip(induction_scores(w, x).tolist(), previous_token_scores(w).tolist(), strict=True)
        ):
            rows.append({"layer": layer, "head": head, "induction": ind, "previous_token": prev})
    return rows


def checkpoint_head_scores(folder: str, seed: int | None = None, device: str = "cpu") -> dict:
    """The table for `selfattn explain --checkpoint DIR --induction-scores`, as plain data:
    {"checkpoint", "model", "probe": {...}, "heads": [rows of `head_scores`]}."""
    loaded = load_checkpoint(folder, device)
    cfg = loaded.model.config
    room = cfg.context_length - (loaded.bos_token_id is not None)
    length = min(LENGTH, room // 2)
    if length < 2:
        raise ValueError(
            f"--induction-scores needs a context of at least 4 tokens (two copies of two random "
            f"tokens); {folder} has {cfg.context_length}"
        )
    seed = DEFAULT_SEED if seed is None else seed
    x = probe(loaded.tokenizer.vocab_size, length, SEQUENCES, seed, loaded.bos_token_id)
    return {
        "checkpoint": str(folder),
        "model": loaded.description,
        "probe": {
            "kind": "random tokens repeated (Olsson et al. 2022)",
            "tokens_per_copy": length,
            "sequences": SEQUENCES,
            "seed": seed,
            "bos_token_id": loaded.bos_token_id,
        },
        "heads": head_scores(loaded.model, x),
    }
