"""`selfattn train` and `selfattn generate`: the arguments, turned into a request.

`add_train_parsers(subparsers)` registers both sub-commands on `selfattn.cli`'s parser. Every
`TrainConfig` field has a flag; a flag left out takes the preset's value (or, with --resume, the
run's), so only the flags given are overrides.
"""

from __future__ import annotations

import argparse

from selfattn._argtypes import (
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    probability,
    seed,
)

# (flag, TrainConfig field, argparse type, help); each is an override, absent unless given
_FIELDS = [
    ("--iters", "iters", positive_int, "iterations in all (with --resume: continue up to N)"),
    ("--batch-size", "batch_size", positive_int, "sequences per iteration"),
    ("--block-size", "block_size", positive_int, "tokens per sequence: the context length"),
    ("--n-layers", "n_layers", positive_int, "transformer blocks"),
    ("--n-heads", "n_heads", positive_int, "attention heads per block"),
    ("--n-kv-heads", "n_kv_heads", positive_int, "key/value heads (grouped-query attention)"),
    ("--emb-dim", "emb_dim", positive_int, "embedding width"),
    ("--dropout", "dropout", probability, "dropout rate"),
    ("--lr", "lr", positive_float, "peak learning rate"),
    ("--min-lr", "min_lr", non_negative_float, "learning rate at the end of the decay"),
    ("--warmup-iters", "warmup_iters", non_negative_int, "linear warm-up iterations"),
    (
        "--decay-iters",
        "decay_iters",
        positive_int,
        "where the cosine decay ends (default: --iters)",
    ),
    ("--beta1", "beta1", probability, "AdamW beta1"),
    ("--beta2", "beta2", probability, "AdamW beta2"),
    ("--weight-decay", "weight_decay", non_negative_float, "AdamW weight decay"),
    ("--grad-clip", "grad_clip", non_negative_float, "max gradient norm (0: off)"),
    ("--eval-every", "eval_every", positive_int, "evaluate and checkpoint every N iterations"),
    ("--eval-iters", "eval_iters", positive_int, "batches per split for each loss estimate"),
    ("--sample-tokens", "sample_tokens", non_negative_int, "tokens of each sample in samples.txt"),
    ("--seed", "seed", seed, "seed of the weights, the batches and the samples"),
    ("--threads", "threads", positive_int, "CPU threads (torch.set_num_threads)"),
    ("--text-file", "text_file", str, "train on this UTF-8 text (default: tiny Shakespeare)"),
    (
        "--vocab-size",
        "vocab_size",
        positive_int,
        "BPE vocabulary size (default: 512); the induction task's symbols (default: 64)",
    ),
]


def add_train_parsers(subparsers) -> None:
    from selfattn.engines import available
    from selfattn.train.presets import PRESETS

    presets = "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values())
    tr = subparsers.add_parser(
        "train",
        help="train a small GPT on text, with live progress and safe checkpoints",
        description="Train the chapter's GPT (on selfattn's MultiHeadAttention) on tiny "
        "Shakespeare or any text. --out receives model.safetensors, config.json, metrics.jsonl, "
        "loss.png, samples.txt and probes.safetensors (every head's attention on a fixed probe "
        f"at each evaluation: explain --timeline). Presets: {presets}. Ctrl-C saves a "
        "checkpoint (exit 130).",
    )
    add = tr.add_argument
    add("--preset", choices=list(PRESETS), help="starting settings (default: shakespeare-char)")
    for flag, name, kind, text in _FIELDS:
        metavar = {str: "PATH", positive_float: "X", probability: "X", non_negative_float: "X"}
        add(flag, dest=name, type=kind, metavar=metavar.get(kind, "N"), default=argparse.SUPPRESS,
            help=text)  # fmt: skip
    add("--tokenizer", choices=("char", "bpe"), default=argparse.SUPPRESS, help="default: char")
    add("--backend", choices=available(), default=argparse.SUPPRESS, help="attention engine")
    add("--device", choices=("cpu", "cuda"), default=argparse.SUPPRESS, help="default: cpu")
    add("--dtype", choices=("float32", "bfloat16"), default=argparse.SUPPRESS, help="autocast")
    add("--compile", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
        help="torch.compile the training steps: the first iteration compiles (seconds to "
        "a minute), later ones run faster; see docs/training.md")  # fmt: skip
    add("--attn-only", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
        help="blocks of attention alone, no feed-forward (the induction preset's)")  # fmt: skip
    add("--out", metavar="DIR", help="the run's folder (default: runs/<preset>)")
    add("--resume", metavar="DIR", help="continue the run in DIR (up to --iters in all)")
    add("--force", action="store_true", help="overwrite a run already in --out")
    add("--quiet", action="store_true", help="no progress bar: one line per evaluation")
    add("--tensorboard", metavar="DIR", default=None,
        help="also write the scalars and the probe's attention images for TensorBoard into DIR "
        "(needs the 'tensorboard' extra)")  # fmt: skip
    add("--context-parallel", metavar="C", type=positive_int, default=None,
        help="under torchrun: split each sequence across C processes (ring attention; C "
        "divides the processes, the rest is data parallel)")  # fmt: skip
    tr.set_defaults(run=_run_train)

    gen = subparsers.add_parser(
        "generate",
        help="continue a prompt with a model trained by `selfattn train`, or GPT-2",
        description="Load a run's model and tokenizer (or a transformers GPT-2 folder's) and "
        "stream its continuation of a prompt.",
    )
    add = gen.add_argument
    add("--checkpoint", metavar="DIR", required=True,
        help="a folder written by selfattn train, or a transformers GPT-2 folder (config.json, "
        "model.safetensors, tokenizer.json)")  # fmt: skip
    add("--prompt", default="\n", help="text to continue (default: a newline)")
    add("--max-new-tokens", type=non_negative_int, default=200, help="default: 200")
    add("--temperature", type=non_negative_float, default=1.0, help="0: greedy (default: 1)")
    add("--top-k", type=positive_int, default=None, help="sample among the k likeliest tokens")
    add("--seed", type=seed, default=None, help="seed of the sampling (default: random)")
    add("--device", choices=("cpu", "cuda"), default="cpu", help="default: cpu")
    gen.set_defaults(run=_run_generate)


_NOT_OVERRIDES = {"command", "run", "preset", "out", "resume", "force", "quiet", "tensorboard"}
_NOT_OVERRIDES |= {"context_parallel"}


def _run_train(args: argparse.Namespace) -> int:
    from selfattn.train.command import TrainRequest, run_train

    overrides = {k: v for k, v in vars(args).items() if k not in _NOT_OVERRIDES}
    request = TrainRequest(args.preset, overrides, args.out, args.resume, args.force, args.quiet,
                           tensorboard=args.tensorboard,
                           context_parallel=args.context_parallel)  # fmt: skip
    return run_train(request)


def _run_generate(args: argparse.Namespace) -> int:
    from selfattn.train.command import GenerateRequest, run_generate

    fields = GenerateRequest.__dataclass_fields__
    return run_generate(GenerateRequest(**{name: getattr(args, name) for name in fields}))
