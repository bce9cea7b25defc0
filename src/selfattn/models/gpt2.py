"""OpenAI's GPT-2 in the chapter's GPT: the book's chapter-5 weight mapping, both ways.

    transformers' GPT-2 folder                      the chapter's GPT (`selfattn.models.gpt`)
    config.json  n_positions, n_embd, n_head, ...   GPTConfig  context_length, emb_dim, ...
    model.safetensors (or pytorch_model.bin)        state_dict
      wte, wpe                                        tok_emb, pos_emb
      h.i.ln_1, ln_2 (weight, bias)                   trf_blocks.i.norm1, norm2 (scale, shift)
      h.i.attn.c_attn (E, 3E) Conv1D                  W_query, W_key, W_value: the three (E, E)
                                                      column blocks, transposed; bias split too
      h.i.attn.c_proj (E, E) Conv1D                   att.out_proj, transposed
      h.i.mlp.c_fc, c_proj Conv1D                     ff.layers.0, ff.layers.2, transposed
      ln_f                                            final_norm
      lm_head = wte (tied)                            out_head = tok_emb (tie_embeddings=True)

A `Conv1D` stores its weight as (in, out), a `Linear` as (out, in): hence the transposes. GPT-2's
LayerNorm eps (1e-5), its GELU (the tanh approximation, "gelu_new") and its learned positions are
the chapter's; a config.json that asks for anything else (another activation or eps, an inner
width other than 4E, unscaled attention, cross-attention) is refused, naming what differs.

`GPT.from_hf(folder or GPT2LMHeadModel)` builds the GPT (with `read_source` and
`state_from_hf`); `GPT.to_hf(folder)` (`save_hf`) writes a folder that
``transformers.GPT2LMHeadModel.from_pretrained`` loads with the same logits. This module works
on plain configs and tensors and does not import `selfattn.models.gpt` (which calls it). A model
of `selfattn train` whose options GPT-2 lacks is written as an exactly equivalent GPT-2:

    qkv_bias=False       c_attn's bias is zeros (no bias and a zero bias compute the same)
    n_kv_heads < n_heads  each key/value head repeated for its group of query heads (query head h
                          reads key/value head h // (n_heads / n_kv_heads), as the engines do)
    attn_only            each block's MLP all zeros (it adds exactly 0), ln_2 the identity
    tie_embeddings=False  "tie_word_embeddings": false and lm_head.weight written
    window               refused: GPT-2 has no sliding window

`load_tokenizer(folder)` reads its tokenizer.json (or vocab.json + merges.txt) with `tokenizers`.
Loading a folder needs safetensors (and torch); only a `GPT2LMHeadModel` instance needs
transformers. pytorch_model.bin is read with ``torch.load(weights_only=True)``: nothing is
unpickled but tensors.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from selfattn._extras import require

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
PICKLE = "pytorch_model.bin"
TOKENIZER = "tokenizer.json"
VOCAB, MERGES = "vocab.json", "merges.txt"
GELU_TANH = ("gelu_new", "gelu_pytorch_tanh")  # transformers' names of the tanh GELU
EPS = 1e-5  # the chapter's LayerNorm eps
# GPT2Config's defaults: a key missing from config.json takes these, as transformers does.
DEFAULTS = {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12}
_MASK_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers in older GPT-2 files
GPT2_VOCAB = 50257
GPT2_EOS = 50256  # <|endoftext|>, GPT-2's bos and eos


# --- the config -----------------------------------------------------------------------------------


def is_transformers_config(record: object) -> bool:
    """Whether a parsed config.json is a transformers config (it has a ``model_type``)."""
    return isinstance(record, dict) and "model_type" in record


def config_from_hf(hf: dict, where: str = CONFIG) -> dict:
    """The GPTConfig fields (a dict) of a transformers GPT-2 config (a dict). ValueError naming
    every setting that the chapter's GPT does not compute (``where`` names the file)."""
    if not isinstance(hf, dict):
        raise ValueError(f"{where} is not a JSON object")
    if hf.get("model_type") != "gpt2":
        raise ValueError(
            f"{where}: model_type {hf.get('model_type')!r}, not a GPT-2 checkpoint "
            "(model_type 'gpt2' expected)"
        )
    sizes = {k: hf.get(k, v) for k, v in DEFAULTS.items()}
    problems = [
        f"{k} {v!r} (a positive integer expected)"
        for k, v in sizes.items()
        if not isinstance(v, int) or isinstance(v, bool) or v < 1
    ]
    if problems:
        raise ValueError(f"{where} is not GPT-2 shaped: {'; '.join(problems)}")
    emb = sizes["n_embd"]
    act = hf.get("activation_function", "gelu_new")
    checks = [
        (act not in GELU_TANH, f"activation_function {act!r} (the chapter's GELU is 'gelu_new')"),
        (hf.get("layer_norm_epsilon", EPS) != EPS, f"layer_norm_epsilon "
         f"{hf.get('layer_norm_epsilon')} (the chapter's LayerNorm has eps {EPS})"),
        (hf.get("n_inner") not in (None, 4 * emb), f"n_inner {hf.get('n_inner')} (the chapter's "
         f"feed-forward is 4 * n_embd = {4 * emb} wide)"),
        (not hf.get("scale_attn_weights", True), "scale_attn_weights false (the chapter scales "
         "scores by 1/sqrt(head width))"),
        (bool(hf.get("scale_attn_by_inverse_layer_idx")), "scale_attn_by_inverse_layer_idx true"),
        (bool(hf.get("add_cross_attention")), "add_cross_attention true (no encoder here)"),
    ]  # fmt: skip
    problems = [reason for wrong, reason in checks if wrong]
    if emb % sizes["n_head"]:
        problems.append(f"n_embd {emb} is not a multiple of n_head {sizes['n_head']}")
    if problems:
        raise ValueError(f"{where} is not GPT-2 shaped: {'; '.join(problems)}")
    return dict(
        vocab_size=sizes["vocab_size"],
        context_length=sizes["n_positions"],
        emb_dim=emb,
        n_heads=sizes["n_head"],
        n_layers=sizes["n_layer"],
        drop_rate=float(hf.get("resid_pdrop", 0.1)),  # the chapter has one rate (train only)
        qkv_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


def hf_config(cfg) -> dict:
    """The transformers config.json (a dict) of a GPT whose config is ``cfg`` (a GPTConfig)."""
    if cfg.window is not None:
        raise ValueError(
            f"a GPT with a sliding window (window={cfg.window}) has no GPT-2 equivalent: GPT-2 "
            "attends to every earlier token"
        )
    special = GPT2_EOS if cfg.vocab_size == GPT2_VOCAB else None
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length,
        "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers,
        "n_head": cfg.n_heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": EPS,
        "resid_pdrop": cfg.drop_rate,
        "embd_pdrop": cfg.drop_rate,
        "attn_pdrop": cfg.drop_rate,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "bos_token_id": special,
        "eos_token_id": special,
        "dtype": "float32",
    }


# --- the tensors ----------------------------------------------------------------------------------


def hf_shapes(cfg) -> dict[str, tuple[int, ...]]:
    """{name: shape} of a GPT-2 state dict (no "transformer." prefix) for ``cfg``."""
    e, v = cfg.emb_dim, cfg.vocab_size
    shapes: dict[str, tuple[int, ...]] = {
        "wte.weight": (v, e),
        "wpe.weight": (cfg.context_length, e),
    }
    for i in range(cfg.n_layers):
        h = f"h.{i}."
        shapes.update({
            h + "ln_1.weight": (e,), h + "ln_1.bias": (e,),
            h + "attn.c_attn.weight": (e, 3 * e), h + "attn.c_attn.bias": (3 * e,),
            h + "attn.c_proj.weight": (e, e), h + "attn.c_proj.bias": (e,),
            h + "ln_2.weight": (e,), h + "ln_2.bias": (e,),
            h + "mlp.c_fc.weight": (e, 4 * e), h + "mlp.c_fc.bias": (4 * e,),
            h + "mlp.c_proj.weight": (4 * e, e), h + "mlp.c_proj.bias": (e,),
        })  # fmt: skip
    shapes.update({"ln_f.weight": (e,), "ln_f.bias": (e,)})
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (v, e)
    return shapes


def _unprefixed(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The GPT-2 tensors without "transformer." (GPT2LMHeadModel's prefix; GPT2Model's files and
    OpenAI's converted ones have none) and without the causal-mask buffers of older files."""
    out = {}
    for name, value in tensors.items():
        if name.endswith(_MASK_BUFFERS):
            continue
        out[name.removeprefix("transformer.")] = value
    return out


def shape_problems(
    saved: dict[str, tuple], expected: dict[str, tuple], stranger: str = "is not in a GPT-2"
) -> list[str]:
    """What differs between saved and expected {name: shape}: in expected's order, then the
    names only ``saved`` has ("NAME ``stranger``"). Also what a selfattn checkpoint reports."""
    problems = []
    for name, shape in expected.items():
        if name not in saved:
            problems.append(f"{name} missing")
        elif saved[name] != shape:
            problems.append(f"{name} saved {saved[name]}, expected {shape}")
    problems += [f"{name} {stranger}" for name in saved if name not in expected]
    return problems


def misfit(where: object, config: object, problems: list[str]) -> ValueError:
    """One line: what does not fit, the first three, then how many more."""
    shown = "; ".join(problems[:3]) + (f"; {len(problems) - 3} more" if len(problems) > 3 else "")
    return ValueError(f"{where} does not fit {config}: {shown}")


def state_from_hf(
    tensors: dict[str, Tensor], cfg, where: str = "the weights", config: str = CONFIG
) -> dict[str, Tensor]:
    """GPT-2 tensors -> the state dict of a GPT with config ``cfg`` (the chapter-5 mapping),
    float32. ValueError naming every tensor that is missing, extra or of another shape than
    ``cfg`` says."""
    hf = _unprefixed(tensors)
    if cfg.tie_embeddings:
        hf.pop("lm_head.weight", None)  # tied: it is wte (some files store it anyway)
    saved = {name: tuple(t.shape) for name, t in hf.items()}
    problems = shape_problems(saved, hf_shapes(cfg))
    if problems:
        raise misfit(where, config, problems)
    e = cfg.emb_dim
    state = {"tok_emb.weight": hf["wte.weight"], "pos_emb.weight": hf["wpe.weight"]}
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        q_w, k_w, v_w = hf[h + "attn.c_attn.weight"].split(e, dim=1)  # (E, E) each, Conv1D
        q_b, k_b, v_b = hf[h + "attn.c_attn.bias"].split(e, dim=0)
        for name, w, bias in (("W_query", q_w, q_b), ("W_key", k_w, k_b), ("W_value", v_w, v_b)):
            state[f"{b}att.{name}.weight"] = w.T
            state[f"{b}att.{name}.bias"] = bias
        pairs = {
            "att.out_proj": "attn.c_proj", "ff.layers.0": "mlp.c_fc", "ff.layers.2": "mlp.c_proj"
        }  # fmt: skip
        for ours, theirs in pairs.items():
            state[f"{b}{ours}.weight"] = hf[f"{h}{theirs}.weight"].T
            state[f"{b}{ours}.bias"] = hf[f"{h}{theirs}.bias"]
        for ours, theirs in (("norm1", "ln_1"), ("norm2", "ln_2")):
            state[f"{b}{ours}.scale"] = hf[f"{h}{theirs}.weight"]
            state[f"{b}{ours}.shift"] = hf[f"{h}{theirs}.bias"]
    state["final_norm.scale"], state["final_norm.shift"] = hf["ln_f.weight"], hf["ln_f.bias"]
    if not cfg.tie_embeddings:
        state["out_head.weight"] = hf["lm_head.weight"]
    return {name: t.float().contiguous() for name, t in state.items()}


def state_to_hf(model: nn.Module) -> dict[str, Tensor]:
    """The GPT's weights as GPT2LMHeadModel's state dict ("transformer." names, Conv1D layouts;
    see the module's docstring for the options GPT-2 lacks)."""
    cfg = model.config
    hf_config(cfg)  # refuses what has no equivalent
    e, group = cfg.emb_dim, cfg.n_heads // (cfg.n_kv_heads or cfg.n_heads)
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {"wte.weight": sd["tok_emb.weight"], "wpe.weight": sd["pos_emb.weight"]}
    for i in range(cfg.n_layers):
        h, b = f"h.{i}.", f"trf_blocks.{i}."
        weights, biases = [], []
        for name in ("W_query", "W_key", "W_value"):
            w = sd[f"{b}att.{name}.weight"]  # (H or Hkv * d, E)
            bias = sd.get(f"{b}att.{name}.bias", torch.zeros(w.shape[0]))
            if name != "W_query" and group > 1:  # GQA: repeat each kv head for its queries
                w = w.view(-1, e // cfg.n_heads, e).repeat_interleave(group, dim=0).reshape(e, e)
                bias = bias.view(-1, e // cfg.n_heads).repeat_interleave(group, dim=0).reshape(e)
            weights.append(w.T)
            biases.append(bias)
        out[h + "attn.c_attn.weight"] = torch.cat(weights, dim=1)  # (E, 3E)
        out[h + "attn.c_attn.bias"] = torch.cat(biases)
        out[h + "attn.c_proj.weight"] = sd[f"{b}att.out_proj.weight"].T
        out[h + "attn.c_proj.bias"] = sd[f"{b}att.out_proj.bias"]
        out[h + "ln_1.weight"], out[h + "ln_1.bias"] = sd[b + "norm1.scale"], sd[b + "norm1.shift"]
        if cfg.attn_only:  # an MLP of zeros adds exactly 0: x + 0
            out.update(_zero_mlp(h, e))
            continue
        out[h + "ln_2.weight"], out[h + "ln_2.bias"] = sd[b + "norm2.scale"], sd[b + "norm2.shift"]
        for ours, theirs in (("ff.layers.0", "mlp.c_fc"), ("ff.layers.2", "mlp.c_proj")):
            out[f"{h}{theirs}.weight"] = sd[f"{b}{ours}.weight"].T
            out[f"{h}{theirs}.bias"] = sd[f"{b}{ours}.bias"]
    out["ln_f.weight"], out["ln_f.bias"] = sd["final_norm.scale"], sd["final_norm.shift"]
    out = {f"transformer.{k}": v for k, v in out.items()}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["out_head.weight"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def _zero_mlp(h: str, e: int) -> dict[str, Tensor]:
    return {
        h + "ln_2.weight": torch.ones(e), h + "ln_2.bias": torch.zeros(e),
        h + "mlp.c_fc.weight": torch.zeros(e, 4 * e), h + "mlp.c_fc.bias": torch.zeros(4 * e),
        h + "mlp.c_proj.weight": torch.zeros(4 * e, e), h + "mlp.c_proj.bias": torch.zeros(e),
    }  # fmt: skip


# --- folders --------------------------------------------------------------------------------------


def read_config(folder: str | Path) -> dict:
    """A GPT-2 folder's config.json, parsed (not yet checked: see `config_from_hf`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"no checkpoint folder {folder}")
    path = folder / CONFIG
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{folder} is not a GPT-2 checkpoint (no {CONFIG})") from None
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"{path} is truncated or corrupted (not JSON)") from None


def read_tensors(folder: str | Path) -> tuple[dict[str, Tensor], Path]:
    """(tensors, the file they came from): model.safetensors, else pytorch_model.bin read with
    ``torch.load(weights_only=True)``."""
    folder = Path(folder)
    path = folder / SAFETENSORS
    if path.is_file():
        st = require("safetensors.torch", "text", "a GPT-2 checkpoint's model.safetensors")
        try:
            return st.load_file(str(path)), path
        except Exception:  # safetensors raises its own error type for a bad header
            raise ValueError(f"checkpoint file {path} is truncated or corrupted") from None
    path = folder / PICKLE
    if path.is_file():
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # an UnpicklingError names what weights_only refused
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ValueError(
                f"cannot read {path} as tensors (weights_only=True): {first}"
            ) from None
        if not isinstance(tensors, dict) or not all(
            isinstance(t, Tensor) for t in tensors.values()
        ):
            raise ValueError(f"{path} holds no state dict of tensors")
        return tensors, path
    if (folder / (SAFETENSORS + ".index.json")).exists():
        raise ValueError(f"{folder}: sharded checkpoints are not read; GPT-2 fits one file")
    raise ValueError(f"{folder} holds no weights ({SAFETENSORS} or {PICKLE} expected)")


def read_source(source: str | Path | nn.Module) -> tuple[dict, dict[str, Tensor], str, str]:
    """(GPTConfig fields, GPT-2 tensors, where the tensors came from, where the config came
    from) of a GPT-2 folder or a `GPT2LMHeadModel`; the config checked (`config_from_hf`)."""
    if isinstance(source, nn.Module):
        config = getattr(source, "config", None)
        if config is None or not hasattr(config, "to_dict"):
            raise TypeError(f"from_hf expects a GPT2LMHeadModel, got {type(source).__name__}")
        name = type(source).__name__
        fields = config_from_hf(config.to_dict(), f"{name}.config")
        return fields, dict(source.state_dict()), f"{name}'s weights", f"{name}.config"
    if isinstance(source, str | Path):
        folder = Path(source)
        fields = config_from_hf(read_config(folder), str(folder / CONFIG))
        tensors, path = read_tensors(folder)
        return fields, tensors, str(path), str(folder / CONFIG)
    raise TypeError(
        f"from_hf expects a folder (str or Path) or a GPT2LMHeadModel, got {type(source).__name__}"
    )


def save_hf(
    model: nn.Module, folder: str | Path, tokenizer=None, *, overwrite: bool = False
) -> Path:
    """Write ``model`` as a transformers GPT-2 folder: config.json, model.safetensors and, given
    a ``tokenizer`` (a `tokenizers.Tokenizer`, or a `selfattn train` BPE tokenizer wrapping
    one), tokenizer.json.

    Atomic: everything goes to a temporary folder beside it, which is then renamed into place.
    An existing non-empty ``folder`` is refused (nothing written) unless ``overwrite``."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{folder} is a file, not a folder")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise ValueError(f"{folder} is not empty: pick another folder, or pass overwrite=True")
    st = require("safetensors.torch", "text", "GPT.to_hf")
    files = {
        CONFIG: (json.dumps(hf_config(model.config), indent=2) + "\n").encode(),
        SAFETENSORS: st.save(state_to_hf(model), {"format": "pt"}),
    }
    if tokenizer is not None:
        files[TOKENIZER] = _tokenizer_json(tokenizer).encode()
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        _swap_in(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _tokenizer_json(tokenizer) -> str:
    inner = getattr(tokenizer, "tokenizer", tokenizer)  # selfattn's BPETokenizer wraps one
    if not hasattr(inner, "to_str"):
        raise TypeError(
            f"to_hf writes a tokenizers.Tokenizer as tokenizer.json, got "
            f"{type(tokenizer).__name__} (a character tokenizer has no GPT-2 equivalent)"
        )
    return inner.to_str()


def _swap_in(tmp: Path, folder: Path) -> None:
    """Rename the written ``tmp`` to ``folder``; an old folder is moved aside, then removed."""
    old = None
    if folder.is_dir():
        if any(folder.iterdir()):
            old = folder.parent / f".{folder.name}.old-{os.getpid()}"
            shutil.rmtree(old, ignore_errors=True)
            folder.rename(old)
        else:
            folder.rmdir()
    tmp.rename(folder)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_tokenizer(folder: str | Path):
    """The folder's `tokenizers.Tokenizer`: tokenizer.json, else GPT-2's vocab.json + merges.txt
    (a byte-level BPE). ValueError when it has neither, or they do not load."""
    folder = Path(folder)
    tk = require("tokenizers", "text", "a GPT-2 checkpoint's tokenizer")
    path = folder / TOKENIZER
    try:
        if path.is_file():
            return tk.Tokenizer.from_file(str(path))
        if (folder / VOCAB).is_file() and (folder / MERGES).is_file():
            path = folder / VOCAB
            tok = tk.Tokenizer(tk.models.BPE.from_file(str(folder / VOCAB), str(folder / MERGES)))
            tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = tk.decoders.ByteLevel()
            return tok
    except Exception as err:  # the library raises its own Exception subclass
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load the tokenizer {path}: {first}") from None
    raise ValueError(
        f"{folder} has no tokenizer: {TOKENIZER}, or {VOCAB} + {MERGES}, expected beside {CONFIG}"
    )
