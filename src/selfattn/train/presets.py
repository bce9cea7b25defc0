"""Named starting points for `selfattn train --preset NAME`; every field can be overridden."""

from __future__ import annotations

from dataclasses import dataclass

from selfattn.train.config import TrainConfig


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    config: TrainConfig


PRESETS = {
    p.name: p
    for p in (
        Preset(
            "shakespeare-char",
            "tiny Shakespeare, characters; 4 layers x 4 heads, emb 128, context 64, batch 12, "
            "2000 iterations (minutes on a laptop CPU; validation loss about 1.9)",
            TrainConfig(
                block_size=64,
                batch_size=12,
                n_layers=4,
                n_heads=4,
                emb_dim=128,
                dropout=0.0,
                iters=2000,
                lr=1e-3,
                min_lr=1e-4,
                warmup_iters=100,
                beta1=0.9,
                beta2=0.99,
                weight_decay=0.1,
                grad_clip=1.0,
                eval_every=250,
                eval_iters=20,
                sample_tokens=200,
            ),
        ),
        Preset(
            "induction",
            "the induction-head task: repeated random segments of 8-32 symbols; a 2-layer "
            "attention-only model, 4 heads, emb 64, context 96, batch 32; accuracy on the "
            "repeats and per-head induction / previous-token scores at each evaluation",
            TrainConfig(
                data="induction",
                vocab_size=64,
                attn_only=True,
                block_size=96,
                batch_size=32,
                n_layers=2,
                n_heads=4,
                emb_dim=64,
                dropout=0.0,
                iters=1000,
                lr=3e-3,
                min_lr=3e-4,
                warmup_iters=50,
                beta1=0.9,
                beta2=0.99,
                weight_decay=0.1,
                grad_clip=1.0,
                eval_every=100,
                eval_iters=2,
                sample_tokens=0,
            ),
        ),
        Preset(
            "tiny",
            "a run of seconds for tests and a first look: 2 layers x 2 heads, emb 32, context "
            "32, batch 8, 60 iterations",
            TrainConfig(
                block_size=32,
                batch_size=8,
                n_layers=2,
                n_heads=2,
                emb_dim=32,
                dropout=0.0,
                iters=60,
                lr=3e-3,
                min_lr=3e-4,
                warmup_iters=5,
                eval_every=20,
                eval_iters=4,
                sample_tokens=40,
            ),
        ),
    )
}
