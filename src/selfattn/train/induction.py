"""`--preset induction`: a task only a content-matching head can solve, and the scores that watch
that head form (Olsson et al. 2022, "In-context learning and induction heads").

Each sequence is a random segment of random length L (8 to 32 distinct symbols) repeated to fill
the context. Inside the first copy the next token is unpredictable; from the first repeat on it
is exactly the token that followed the current one's previous occurrence. Neither a position nor
a fixed offset finds it (L differs per sequence): a two-layer circuit does, a previous-token head
(layer 0: each position copies in the token before it) feeding an induction head (layer 1: the
query "my token" matches the key "the token before me was ...", and attends there).

    segment  a b c d e                (L = 5, drawn per sequence)
    tokens   a b c d e a b c d e a b ...
                       ^ from here on every next token is known: the accuracy counts these

The scores, for one head's attention weights w (L queries x L keys, rows sum to 1):

    previous-token score   mean over queries t >= 1 of  w[t, t - 1]
    induction score        mean over queries t whose token occurred before of the sum of
                           w[t, s + 1] over every s < t with x[s] == x[t]: the share of
                           attention on the keys right after the token's earlier occurrences

The symbols are characters (`ALPHABET`), so the run's tokenizer is a `CharTokenizer` and
``selfattn explain --checkpoint DIR --text "abcdeabcde"`` shows the trained heads directly.
"""

from __future__ import annotations

import torch
from torch import Tensor

from selfattn.recording import recording
from selfattn.train.data import CharTokenizer, RandomBatches

SEGMENT_LENGTHS = (8, 32)  # the shortest and longest segment, both included
ALPHABET = (
    "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz!#$%&*+-<=>?@^~"  # 77 symbols
)
DEFAULT_VOCAB = 64
EVAL_SEQUENCES = 64  # sequences per evaluation of the scores (whatever the batch size)


def induction_tokenizer(vocab_size: int | None) -> CharTokenizer:
    """The first ``vocab_size`` symbols of `ALPHABET` (default `DEFAULT_VOCAB`)."""
    n = DEFAULT_VOCAB if vocab_size is None else vocab_size
    longest, alphabet = SEGMENT_LENGTHS[1], len(ALPHABET)
    if not longest <= n <= alphabet:
        raise ValueError(
            f"--vocab-size for the induction task must be in {longest}..{alphabet} (a segment "
            f"of up to {longest} distinct symbols, from an alphabet of {alphabet}), got {n}"
        )
    return CharTokenizer(ALPHABET[:n])


def repeated_segments(
    batch: int, length: int, vocab_size: int, generator: torch.Generator
) -> Tensor:
    """(batch, length) int64: each row a segment of L distinct tokens, L uniform in
    `SEGMENT_LENGTHS`, repeated (and cut) to ``length`` tokens."""
    low, high = SEGMENT_LENGTHS
    seg_len = torch.randint(low, high + 1, (batch, 1), generator=generator)  # (B, 1)
    symbols = torch.rand(batch, vocab_size, generator=generator).argsort(dim=1)[:, :high]  # (B, 32)
    positions = torch.arange(length) % seg_len  # (B, length): 0 1 .. L-1 0 1 ..
    return symbols.gather(1, positions)


class InductionBatches(RandomBatches):
    """Synthetic batches of repeated segments (see `selfattn.train.data.RandomBatches`).

    Both "splits" come from the same distribution, each evaluation from the generator it is
    given, and never the same sequences: an evaluation draw is seeded by the generator and the
    split.
    """

    def __init__(
        self,
        vocab_size: int,
        batch_size: int,
        block_size: int,
        seed: int,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(batch_size, block_size, seed, device, rank, world_size)
        self.vocab_size = vocab_size

    def sequences(self, split: str, generator: torch.Generator) -> Tensor:
        if generator is not self.generator:  # an evaluation: its own draw per split
            seed = int(torch.randint(2**62, (1,), generator=generator)) + (split == "val")
            generator = torch.Generator().manual_seed(seed)
        seq = repeated_segments(self.batch_size, self.block_size + 1, self.vocab_size, generator)
        return seq[self.rows]  # (B_local, T + 1)


# --- the scores ----------------------------------------------------------------------------------


def induction_keys(x: Tensor) -> Tensor:
    """x (B, L) tokens -> (B, L queries, L keys) bool: True at key s + 1 for every s < t with
    x[s] == x[t], the key right after an earlier occurrence of query t's token.

        x = a b c a b a     query 3 (a): key 1;  query 4 (b): key 2;  query 5 (a): keys 1, 4
    """
    length = x.shape[-1]
    same = x[:, :, None] == x[:, None, :]  # (B, L queries, L keys)
    earlier = torch.ones(length, length, dtype=torch.bool, device=x.device).tril(-1)  # s < t
    occurrence = same & earlier  # (B, L, L): s is an earlier occurrence of x[t]
    keys = torch.zeros_like(occurrence)
    keys[:, :, 1:] = occurrence[:, :, :-1]  # shift to the key after it: s + 1 (<= t)
    return keys


def induction_scores(weights: Tensor, x: Tensor) -> Tensor:
    """weights (B, H, L, L), x (B, L) -> (H,): each head's share of attention on the keys of
    `induction_keys`, averaged over the queries whose token occurred before (NaN if none did)."""
    keys = induction_keys(x)  # (B, L, L)
    has = keys.any(dim=-1)  # (B, L): queries whose token repeats
    share = (weights * keys[:, None]).sum(dim=-1)  # (B, H, L)
    return (share * has[:, None]).sum(dim=(0, 2)) / has.sum()


def previous_token_scores(weights: Tensor) -> Tensor:
    """weights (B, H, L, L) -> (H,): each head's mean weight on the previous key, w[t, t - 1],
    over queries t >= 1."""
    return weights.diagonal(offset=-1, dim1=-2, dim2=-1).mean(dim=(0, 2))  # (B, H, L-1) -> (H,)


def repeat_accuracy(logits: Tensor, x: Tensor, y: Tensor) -> float:
    """The share of right next-token guesses (argmax) at the positions whose token repeats an
    earlier one: logits (B, L, V), x, y (B, L)."""
    repeats = induction_keys(x).any(dim=-1)  # (B, L)
    right = logits.argmax(dim=-1) == y  # (B, L)
    return (right & repeats).sum().item() / max(repeats.sum().item(), 1)


def induction_metrics(ctx) -> dict[str, float]:
    """The evaluation hook (`selfattn.train.loop.Hooks.on_eval`): accuracy on the repeats, and
    per head "induction/L{layer}H{head}" and "prev_token/L{layer}H{head}"."""
    model, batches = ctx.model, ctx.batches
    draws = -(-EVAL_SEQUENCES // batches.batch_size)  # global batches: the same on every rank
    pairs = [batches.eval_batch("val", ctx.generator) for _ in range(draws)]
    x, y = torch.cat([x for x, _ in pairs]), torch.cat([y for _, y in pairs])  # (N, T)
    with torch.no_grad(), recording() as layers:
        logits = model(x)  # (N, T, V)
    out = {"accuracy": repeat_accuracy(logits, x, y)}
    for layer, steps in enumerate(layers):
        w = steps["weights"].float()  # (N, H, T, T)
        for name, scores in (
            ("induction", induction_scores(w, x)),
            ("prev_token", previous_token_scores(w)),
        ):
            for head, score in enumerate(scores.tolist()):
                out[f"{name}/L{layer}H{head}"] = score
    return out
