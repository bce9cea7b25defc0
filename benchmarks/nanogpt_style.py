"""A nanoGPT-style training script: the contender of `benchmarks/train.py --whole`.

    python benchmarks/nanogpt_style.py --data DIR     # DIR holds train.bin, val.bin, meta.json

Written here after nanoGPT's ``train.py`` and ``model.py`` (karpathy/nanoGPT), as its CPU recipe
for tiny Shakespeare characters runs them::

    python train.py config/train_shakespeare_char.py --device=cpu --compile=False \\
        --eval_iters=20 --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 \\
        --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

What it keeps of nanoGPT, so that its wall time is nanoGPT's:
- the model: token and position embeddings, pre-LayerNorm blocks (LayerNorm without bias),
  one fused ``c_attn`` Linear for q, k, v (no bias), ``F.scaled_dot_product_attention`` with
  ``is_causal``, a GELU MLP, a tied ``lm_head``; normal(0, 0.02) init, ``c_proj`` scaled by
  1/sqrt(2 n_layer);
- the data: ``np.memmap`` of uint16 token ids (``prepare`` writes them, as nanoGPT's
  ``data/shakespeare_char/prepare.py`` does, before the timed run), random windows per batch;
- the loop: the learning rate set each iteration (warm-up, cosine, floor), forward, backward,
  clipping at 1.0, AdamW (nanoGPT asks for fused kernels on CUDA only, so here torch's default
  CPU implementation), the next batch fetched after the forward, a log line every iteration;
- the evaluation at iteration 0 and every 250: ``eval_iters`` batches of each split, and a
  ``torch.save`` checkpoint whenever the validation loss improves (``always_save_checkpoint``
  is False in that config).

Prints one line per evaluation and, last, ``final val loss X``. Measured, not imported: the
whole process is the contender (start-up, data, evaluations, checkpoints).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

BLOCK, BATCH, LAYERS, HEADS, EMB = 64, 12, 4, 4, 128
MAX_ITERS, EVAL_INTERVAL, EVAL_ITERS = 2000, 250, 20
LR, MIN_LR, WARMUP, DECAY = 1e-3, 1e-4, 100, 2000
BETAS, WEIGHT_DECAY, GRAD_CLIP = (0.9, 0.99), 0.1, 1.0


def prepare(text: str, out: Path) -> None:
    """nanoGPT's shakespeare_char/prepare.py: sorted characters, 90/10 split, uint16 ids."""
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    n = len(text)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", text[: int(n * 0.9)]), ("val", text[int(n * 0.9) :])):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(out / f"{name}.bin")
    (out / "meta.json").write_text(json.dumps({"vocab_size": len(chars)}))


class LayerNorm(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = LayerNorm(EMB), LayerNorm(EMB)
        self.c_attn = nn.Linear(EMB, 3 * EMB, bias=False)
        self.attn_proj = nn.Linear(EMB, EMB, bias=False)
        self.c_fc = nn.Linear(EMB, 4 * EMB, bias=False)
        self.mlp_proj = nn.Linear(4 * EMB, EMB, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)  # (B, T, C) each
        q, k, v = (t.view(B, T, HEADS, C // HEADS).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hs)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, EMB), nn.Embedding(BLOCK, EMB)
        self.h = nn.ModuleList([Block() for _ in range(LAYERS)])
        self.ln_f = LayerNorm(EMB)
        self.lm_head = nn.Linear(EMB, vocab, bias=False)
        self.wte.weight = self.lm_head.weight  # weight tying
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * LAYERS) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], dtype=torch.long)
        x = self.wte(idx) + self.wpe(pos)  # (B, T, C)
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))  # (B, T, V)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def get_lr(it: int) -> float:
    if it < WARMUP:
        return LR * (it + 1) / (WARMUP + 1)
    if it > DECAY:
        return MIN_LR
    ratio = (it - WARMUP) / (DECAY - WARMUP)
    return MIN_LR + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (LR - MIN_LR)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True, help="train.bin, val.bin, meta.json")
    p.add_argument("--out", type=Path, required=True, help="where ckpt.pt goes")
    p.add_argument("--iters", type=int, default=MAX_ITERS)
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    vocab = json.loads((args.data / "meta.json").read_text())["vocab_size"]

    def get_batch(split: str) -> tuple[torch.Tensor, torch.Tensor]:
        data = np.memmap(args.data / f"{split}.bin", dtype=np.uint16, mode="r")
        ix = torch.randint(len(data) - BLOCK, (BATCH,))
        rows = [torch.from_numpy(data[i : i + 1 + BLOCK].astype(np.int64)) for i in ix]
        x = torch.stack([r[:-1] for r in rows])  # (B, T)
        y = torch.stack([r[1:] for r in rows])  # (B, T)
        return x, y

    model = NanoGPT(vocab)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=LR, betas=BETAS)

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        model.eval()
        out = {}
        for split in ("train", "val"):
            losses = torch.zeros(EVAL_ITERS)
            for k in range(EVAL_ITERS):
                losses[k] = model(*get_batch(split)).item()
            out[split] = losses.mean().item()
        model.train()
        return out

    args.out.mkdir(parents=True, exist_ok=True)
    best, losses = 1e9, {}
    x, y = get_batch("train")
    t0 = time.time()
    for it in range(args.iters + 1):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it)
        if it % EVAL_INTERVAL == 0:
            losses = estimate_loss()
            print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if losses["val"] < best and it > 0:
                best = losses["val"]
                state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "iter_num": it, "best_val_loss": best}  # fmt: skip
                torch.save(state, args.out / "ckpt.pt")
        if it == args.iters:
            break
        loss = model(x, y)
        x, y = get_batch("train")  # the next batch while (on a GPU) this one computes
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t1 = time.time()
        print(f"iter {it}: loss {loss.item():.4f}, time {(t1 - t0) * 1000:.2f}ms", flush=False)
        t0 = t1
    print(f"final val loss {losses['val']:.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
