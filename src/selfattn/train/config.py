"""A training run's settings: one small typed dataclass, and the model it describes."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from selfattn import _checks as checks
from selfattn.models.gpt import GPTConfig

DTYPES = ("float32", "bfloat16")  # bfloat16: autocast around the forward, fp32 weights
DATA = ("text", "induction")


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides the text. Presets fill it; every field has a flag."""

    # data
    data: str = "text"  # "text", or "induction": synthetic repeated segments (train.induction)
    text_file: str | None = None  # None: the built-in tiny Shakespeare
    tokenizer: str = "char"  # "char" or "bpe"
    vocab_size: int | None = None  # BPE (default 512), or the induction task's symbols (64)
    block_size: int = 64  # T, the model's context_length
    batch_size: int = 12  # B, the global batch (all processes together)
    # model
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int | None = None
    emb_dim: int = 128
    dropout: float = 0.0
    backend: str = "auto"
    attn_only: bool = False  # blocks without the feed-forward (GPTConfig.attn_only)
    # optimisation: AdamW, warm-up then cosine decay (see `selfattn.train.schedule`)
    iters: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    decay_iters: int | None = None  # None: iters; a new run stores it (`with_fixed_schedule`)
    beta1: float = 0.9
    beta2: float = 0.99
    weight_decay: float = 0.1  # on matrices and embeddings only, not biases or norms
    grad_clip: float = 1.0  # max global gradient norm; 0 = off
    # bookkeeping
    eval_every: int = 250
    eval_iters: int = 20  # batches per split for each loss estimate
    sample_tokens: int = 200  # tokens of samples.txt at each evaluation
    device: str = "cpu"
    dtype: str = "float32"
    seed: int = 1337
    threads: int | None = None  # torch.set_num_threads; None leaves torch's default
    compile: bool = False  # torch.compile the training forward and backward (see docs/training)

    def __post_init__(self) -> None:
        """Every number held to the check its flag uses (`selfattn._checks`: the same values
        accepted, in the same words), then the settings that depend on each other."""
        optional = ("n_kv_heads", "vocab_size", "decay_iters", "threads")  # None: the default
        for check, names in (
            (checks.positive_int, ("block_size", "batch_size", "n_layers", "n_heads", "emb_dim")),
            (checks.positive_int, ("iters", "eval_every", "eval_iters", *optional)),
            (checks.non_negative_int, ("warmup_iters", "sample_tokens")),
            (checks.probability, ("dropout", "beta1", "beta2")),
            (checks.positive_float, ("lr",)),
            (checks.non_negative_float, ("min_lr", "weight_decay", "grad_clip")),
            (checks.seed, ("seed",)),
        ):
            for name in names:
                if not (name in optional and getattr(self, name) is None):
                    check(name, getattr(self, name))
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must be <= lr ({self.lr})")
        if self.decay_iters is not None and self.decay_iters < self.warmup_iters:
            raise ValueError(
                f"decay_iters ({self.decay_iters}) must be >= warmup_iters ({self.warmup_iters}): "
                "the cosine decay starts where the warm-up ends"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.compile, bool):
            raise TypeError(f"compile must be a bool, got {type(self.compile).__name__}")
        if self.device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {self.device!r}")
        if self.tokenizer not in ("char", "bpe"):
            raise ValueError(f"tokenizer must be 'char' or 'bpe', got {self.tokenizer!r}")
        if self.data not in DATA:
            raise ValueError(f"data must be one of {', '.join(DATA)}, got {self.data!r}")
        if self.data == "induction" and (self.text_file is not None or self.tokenizer != "char"):
            raise ValueError(
                "the induction task makes its own sequences: --text-file and --tokenizer do not "
                "apply to it"
            )

    @property
    def lr_decay_iters(self) -> int:
        return self.iters if self.decay_iters is None else self.decay_iters

    def with_fixed_schedule(self) -> TrainConfig:
        """These settings with the decay's end written out, as a new run stores them in
        config.json: a resume with a larger --iters keeps the schedule (and continues at
        min_lr past its end) unless --decay-iters is given. None becomes --iters, or
        --warmup-iters when the run is all warm-up (the same learning rates)."""
        if self.decay_iters is not None:
            return self
        return self.replace(decay_iters=max(self.iters, self.warmup_iters))

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def model_config(self, vocab_size: int) -> GPTConfig:
        """The GPT these settings train, for a tokenizer of ``vocab_size`` tokens."""
        return GPTConfig(
            vocab_size=vocab_size,
            context_length=self.block_size,
            emb_dim=self.emb_dim,
            n_heads=self.n_heads,
            n_kv_heads=self.n_kv_heads,
            n_layers=self.n_layers,
            drop_rate=self.dropout,
            qkv_bias=False,
            backend=self.backend,
            attn_only=self.attn_only,
        )

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        """From config.json's "train" entry; an unknown key is a ValueError."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}")
        return cls(**data)


# Settings a resumed run may change; any other flag must agree with the checkpoint. decay_iters
# only when given: without it a resumed run keeps the schedule it started with.
RESUMABLE = frozenset(
    {
        "iters",
        "decay_iters",
        "eval_every",
        "eval_iters",
        "sample_tokens",
        "device",
        "threads",
        "backend",
        "compile",
    }  # every engine computes the same function, compiled or not: the weights do not depend on it
)
