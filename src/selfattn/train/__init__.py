"""Training the chapter's GPT on text: data, the loop, checkpoints, presets.

data.py         the corpus, char / BPE tokenizers, the 90/10 split, random-window batches
config.py       TrainConfig: every setting of a run, one dataclass
presets.py      shakespeare-char, induction, tiny
schedule.py     the learning rate: warm-up, cosine decay (a pure function)
loop.py         train(run): the loop, evaluation, hooks, stop on Ctrl-C / SIGTERM
checkpoint.py   safetensors weights and training state, atomic and checksummed; load_run, and
                load_checkpoint (a run or a transformers GPT-2 folder)
data_parallel.py  data parallel (torchrun): which process writes, which rows each trains on
context_parallel.py  --context-parallel C: a (data, context) device mesh, zigzag shards of each
                sequence, the GPT on ring attention
induction.py    the induction-head task: repeated random segments, accuracy and head scores
progress.py     the rich progress bar, or plain lines
command.py      `selfattn train` / `selfattn generate`: request -> run (cli.py: their flags)
traces.py       a trained run's attention on a text, for `selfattn explain --checkpoint`
head_scores.py  every head's induction / previous-token score, for `--induction-scores`
probes.py       every head's attention on a fixed probe at each evaluation (the timeline)
tensorboard_log.py  --tensorboard DIR: scalars, probe scores and attention images
files.py        atomic, durable writes (CheckpointWriteError)
plot.py         loss.png and scores.png
"""

from selfattn.train.checkpoint import LoadedRun, load_run
from selfattn.train.config import TrainConfig
from selfattn.train.loop import EvalContext, Hooks, Result, Run, StopRequest, train
from selfattn.train.presets import PRESETS
from selfattn.train.schedule import learning_rate

__all__ = [
    "PRESETS",
    "EvalContext",
    "Hooks",
    "LoadedRun",
    "Result",
    "Run",
    "StopRequest",
    "TrainConfig",
    "learning_rate",
    "load_run",
    "train",
]
