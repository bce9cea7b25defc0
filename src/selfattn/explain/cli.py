"""`selfattn explain`: its arguments, turned into an `ExplainRequest` for `selfattn.explain.run`.

`add_explain_parser(subparsers)` registers the sub-command on `selfattn.cli`'s parser, as
`selfattn.bench.cli` and `selfattn.train.cli` do for theirs.
"""

from __future__ import annotations

import argparse
import functools

from selfattn._argtypes import non_negative_int, positive_int, probability, seed
from selfattn.explain.run import CheckpointScores, CheckpointTraces, precision
from selfattn.module_kinds import MODULE_KINDS


def add_explain_parser(
    sub,
    *,
    checkpoint_traces: CheckpointTraces | None = None,
    checkpoint_scores: CheckpointScores | None = None,
) -> None:
    """The ``explain`` sub-command: what to run (`_what_to_run`), its settings (`_settings`) and
    what to show (`_outputs`). ``checkpoint_traces`` reads a checkpoint for --checkpoint, and
    ``checkpoint_scores`` scores its heads for --induction-scores (see `selfattn.explain.run`)."""
    ex = sub.add_parser(
        "explain",
        help="walk through the attention computation step by step",
        description="Run a self-attention module on the chapter's example (or real text) and "
        "print every step: inputs, Q/K/V, scores, scaled scores, mask, softmax weights, dropout, "
        "context, heads merged and out_proj. An option that does not apply to the run asked for "
        "is a usage error.",
    )
    _what_to_run(ex)
    _settings(ex)
    _outputs(ex)
    ex.set_defaults(
        run=functools.partial(
            run, checkpoint_traces=checkpoint_traces, checkpoint_scores=checkpoint_scores
        )
    )


def _what_to_run(ex: argparse.ArgumentParser) -> None:
    """The module or model, and its input text."""
    which = ex.add_mutually_exclusive_group()
    which.add_argument(
        "--module",
        choices=list(MODULE_KINDS),
        default=None,
        help="which module to explain (default: v1); simple: no trainable weights, the "
        "chapter's starting point",
    )
    which.add_argument(
        "--model",
        choices=["minilm"],
        default=None,
        help="a real pretrained model instead: all-MiniLM-L6-v2's own attention, 6 layers of "
        "12 heads (needs the 'text' extra)",
    )
    which.add_argument(
        "--checkpoint",
        metavar="DIR",
        default=None,
        help="a model trained by `selfattn train`, or a transformers GPT-2 folder (config.json, "
        "model.safetensors, tokenizer.json): its attention on --text, one layer per block, the "
        "tokenizer's tokens as labels",
    )
    ex.add_argument(
        "--induction-scores",
        action="store_true",
        help="with --checkpoint: a table of every layer's and head's induction and "
        "previous-token scores on random tokens repeated (Olsson et al. 2022); --seed seeds it",
    )
    ex.add_argument(
        "--timeline",
        action="store_true",
        help="with --checkpoint RUN and --html FILE: a page to watch the heads form, a slider "
        "over the evaluated iterations driving every head's attention on the probe the run "
        "recorded, beside the loss and score curves",
    )
    ex.add_argument(
        "--text",
        default=None,
        help="real text: tokenized by MiniLM's tokenizer and fed its pretrained word embeddings "
        "(default: the chapter's six-token example; needs the 'text' extra)",
    )
    ex.add_argument(
        "--truncate", action="store_true", help="cut --text past the model's 512 tokens"
    )


def _settings(ex: argparse.ArgumentParser) -> None:
    """The module's sizes, seed and dropout; which layer and head to show."""
    ex.add_argument(
        "--seed",
        type=seed,
        default=None,
        help="torch.manual_seed before building it, and for --dropout (default: 123; 789 for v2)",
    )
    ex.add_argument(
        "--d-out",
        type=positive_int,
        default=None,
        help="output width (default: 2; 64 with --text)",
    )
    ex.add_argument(
        "--heads",
        type=positive_int,
        default=None,
        help="heads for --module wrapper or mha (default: 2)",
    )
    ex.add_argument(
        "--dropout",
        type=probability,
        default=None,
        metavar="P",
        help="also show the weights after dropout in training mode (0 <= P < 1), seeded",
    )
    ex.add_argument(
        "--layer",
        type=non_negative_int,
        default=None,
        help="which layer, for --model or --checkpoint (default: 0)",
    )
    ex.add_argument(
        "--head",
        type=non_negative_int,
        default=None,
        help="show one head only (default: every head; head 0 for --model's walkthrough and JSON)",
    )


def _outputs(ex: argparse.ArgumentParser) -> None:
    """Where the run goes: the terminal (with its precision), JSON, an image or a web page."""
    ex.add_argument(
        "--precision", type=precision, default=None, help="decimals shown, 0..8 (default: 4)"
    )
    ex.add_argument("--json", action="store_true", help="print the run as JSON instead")
    ex.add_argument(
        "--png",
        metavar="FILE",
        default=None,
        help="save heatmaps, one per head, as an image: .png, or .svg / .pdf by the name",
    )
    ex.add_argument(
        "--html",
        metavar="FILE",
        default=None,
        help="save one self-contained, offline web page to explore every step, head and layer",
    )
    ex.add_argument(
        "--step",
        choices=["weights", "scores", "scaled_scores"],
        default=None,
        help="what --png draws, and the step --html opens on (default: weights)",
    )


def run(
    args: argparse.Namespace,
    checkpoint_traces: CheckpointTraces | None = None,
    checkpoint_scores: CheckpointScores | None = None,
) -> int:
    from selfattn.explain.run import ExplainRequest, run_explain

    fields = ExplainRequest.__dataclass_fields__
    request = ExplainRequest(**{name: getattr(args, name) for name in fields})
    run_explain(request, checkpoint_traces=checkpoint_traces, checkpoint_scores=checkpoint_scores)
    return 0
