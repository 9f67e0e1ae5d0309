#!/usr/bin/env python3
"""Trains small code models on the Python standard library: the built-in `builtin:code` model,
and the multi-head / grouped / multi-query trio of the paper's quality table (issue 25).

The data is every `.py` file of this Python's standard library but its test suites (and
site-packages). A file
goes to the validation split when the SHA-1 of its path relative to the library starts with a
byte below 5 (2%); the rest is training text. Files are joined with `<|endoftext|>`. The
tokenizer is a byte-level BPE of 4096 tokens trained on the training split. Training draws
windows of 512 tokens at offsets from a seeded generator: every run with the same arguments
sees the same data in the same order, on one thread count (2, fixed below).

    .venv/bin/python scripts/train_code_model.py builtin OUT_DIR          # builtin:code
    .venv/bin/python scripts/train_code_model.py train OUT_DIR --family llama --kv-heads 4 \
        --steps 300 [--init DIR]                                         # the table's models
    .venv/bin/python scripts/train_code_model.py eval DIR [DIR ...]       # validation perplexity
    .venv/bin/python scripts/train_code_model.py fixture DIR OUT.json     # the CI perplexity check

`scripts/train-models.sh` runs all of it. Each training run writes a Hugging Face folder (config,
bf16 safetensors, tokenizer) and `training.json` (arguments, loss curve, validation figures).
"""
import argparse
import hashlib
import json
import math
import sys
import sysconfig
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SEED = 1905
VOCAB = 4096
WINDOW = 512
EOT = "<|endoftext|>"
# Keyed by what decides the tokens: the Python (its standard library), the vocabulary, the split.
CACHE = Path.home() / ".cache" / "onehead" / "train" / f"py{sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]}-v{VOCAB}-split5-notests"
torch.set_num_threads(2)


def is_test_suite(rel: str) -> bool:
    """The library's own test suites (`test/`, `*/tests/`, `idlelib/idle_test/`, `test_*.py`):
    more than half its text, mostly `self.assertEqual` lines that would crowd out the code
    a user prompts for."""
    parts = rel.split("/")
    return any(p in ("test", "tests", "idle_test") for p in parts[:-1]) or parts[-1].startswith("test_")


def stdlib_files():
    """(relative path, text) of the standard library's `.py` files, sorted by path, without
    site-packages and the test suites."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")) or is_test_suite(rel):
            continue
        try:
            out.append((rel, path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue  # a few test files are deliberately not UTF-8
    return out


def is_validation(rel: str) -> bool:
    return hashlib.sha1(rel.encode()).digest()[0] < 5


def split_texts():
    train, valid = [], []
    for rel, text in stdlib_files():
        (valid if is_validation(rel) else train).append(text)
    return train, valid


def train_tokenizer(texts) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def data():
    """The tokenizer and the token ids of both splits, cached under ~/.cache/onehead/train."""
    CACHE.mkdir(parents=True, exist_ok=True)
    tok_path, ids_path = CACHE / "tokenizer.json", CACHE / "ids.pt"
    if tok_path.exists() and ids_path.exists():
        ids = torch.load(ids_path)
        return Tokenizer.from_file(str(tok_path)), ids["train"], ids["valid"]
    train, valid = split_texts()
    tok = train_tokenizer(train)
    eot = tok.token_to_id(EOT)

    def encode(texts):
        out = []
        for enc in tok.encode_batch(texts):
            out.extend(enc.ids)
            out.append(eot)
        return torch.tensor(out, dtype=torch.int32)

    ids = {"train": encode(train), "valid": encode(valid)}
    tok.save(str(tok_path))
    torch.save(ids, ids_path)
    return tok, ids["train"], ids["valid"]


def config(family: str, kv_heads: int, width: int, layers: int, heads: int):
    from transformers import GPTBigCodeConfig, LlamaConfig

    if family == "gpt_bigcode":
        if kv_heads not in (1, heads):
            raise SystemExit(f"--kv-heads {kv_heads}: GPTBigCode has 1 (multi_query) or {heads}")
        return GPTBigCodeConfig(
            vocab_size=VOCAB, n_positions=WINDOW, n_embd=width, n_layer=layers, n_head=heads,
            multi_query=kv_heads == 1, activation_function="gelu_pytorch_tanh",
            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
        )
    if family == "llama":
        return LlamaConfig(
            vocab_size=VOCAB, hidden_size=width, intermediate_size=width * 8 // 3 // 32 * 32,
            num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
            max_position_embeddings=WINDOW, rope_theta=10000.0, rms_norm_eps=1e-5,
            bos_token_id=0, eos_token_id=0, tie_word_embeddings=True,
        )
    raise SystemExit(f"--family {family}: expected gpt_bigcode or llama")


@torch.no_grad()
def perplexity(model, ids, windows=None):
    """exp(mean NLL) over consecutive windows of WINDOW tokens (each scored from its 2nd token)."""
    model.eval()
    n = (len(ids) - 1) // WINDOW if windows is None else windows
    total, count = 0.0, 0
    for start in range(0, n * WINDOW, WINDOW * 8):
        rows = [ids[s:s + WINDOW].long() for s in range(start, min(start + WINDOW * 8, n * WINDOW), WINDOW)]
        x = torch.stack(rows)
        logits = model(x).logits.float()
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum")
        total += nll.item()
        count += x[:, 1:].numel()
    model.train()
    return math.exp(total / count), total / count


def save(model, tok, out: Path, info: dict):
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    model.float()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": EOT, "eos_token": EOT,
        # A code model has no chat turns: messages become comments, and the answer follows.
        "chat_template": "{% for message in messages %}# {{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}# assistant:\n{% endif %}",
    }, indent=2) + "\n")
    (out / "training.json").write_text(json.dumps(info, indent=2) + "\n")


def train(out: Path, *, family: str, kv_heads: int, steps: int, width: int, layers: int, heads: int,
          batch: int, lr: float, init: Path = None, seed: int = SEED):
    from transformers import AutoModelForCausalLM

    tok, train_ids, valid_ids = data()
    torch.manual_seed(seed)
    if init is not None:
        model = AutoModelForCausalLM.from_pretrained(init, dtype=torch.float32)
    else:
        model = AutoModelForCausalLM.from_config(config(family, kv_heads, width, layers, heads))
        model.float()
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, min(100, steps // 10))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    # Uptraining draws other windows than the run it starts from.
    g = torch.Generator().manual_seed(seed + (1 if init is not None else 0))
    losses, t0 = [], time.time()
    model.train()
    for step in range(steps):
        offsets = torch.randint(0, len(train_ids) - WINDOW, (batch,), generator=g)
        x = torch.stack([train_ids[o:o + WINDOW].long() for o in offsets.tolist()])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(x).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, VOCAB), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(round(loss.item(), 4))
        if step % 25 == 0 or step == steps - 1:
            print(f"{out.name}: step {step}/{steps} loss {loss.item():.3f} ({time.time() - t0:.0f} s)", flush=True)
    train_s = time.time() - t0
    ppl, nll = perplexity(model, valid_ids)
    valid_bytes = sum(len(t.encode()) + len(EOT) for t in split_texts()[1])
    n_scored = ((len(valid_ids) - 1) // WINDOW) * (WINDOW - 1)
    c = model.config
    info = {
        "model_type": c.model_type, "kv_heads": 1 if getattr(c, "multi_query", False) else c.num_key_value_heads,
        "width": c.hidden_size, "layers": c.num_hidden_layers, "heads": c.num_attention_heads,
        "steps": steps, "batch": batch, "window": WINDOW, "lr": lr, "init": str(init) if init else None, "seed": seed,
        "parameters": params, "train_tokens": len(train_ids), "valid_tokens": len(valid_ids),
        "tokens_seen": steps * batch * WINDOW, "train_seconds": round(train_s, 1),
        "valid_perplexity": round(ppl, 4), "valid_nll": round(nll, 5),
        "valid_bytes_per_token": round(valid_bytes / len(valid_ids), 4),
        "valid_scored_tokens": n_scored, "losses": losses,
    }
    print(f"{out.name}: {params / 1e6:.2f}M parameters, {train_s:.0f} s, validation perplexity {ppl:.3f}", flush=True)
    save(model, tok, out, info)
    return info


def evaluate(dirs):
    from transformers import AutoModelForCausalLM

    _, _, valid_ids = data()
    for d in dirs:
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        ppl, _ = perplexity(model, valid_ids)
        print(json.dumps({"model": str(d), "valid_perplexity": round(ppl, 4)}))


def fixture(model_dir: Path, out: Path, windows: int = 4):
    """The start of the validation split as text, its token ids, and transformers' perplexity
    over its first `windows` windows in bf16 (as onehead serves the model):
    engine/tests/builtin_code.rs tokenizes the text and recomputes the perplexity with onehead."""
    from transformers import AutoModelForCausalLM

    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    text = EOT.join(split_texts()[1])[:windows * WINDOW * 8]
    ids = torch.tensor(tok.encode(text).ids[:windows * WINDOW], dtype=torch.int32)
    assert len(ids) == windows * WINDOW
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16)
    ppl, _ = perplexity(model, ids, windows)
    info = json.loads((model_dir / "training.json").read_text())
    out.write_text(json.dumps({
        "model": "builtin:code", "window": WINDOW, "text": text, "ids": ids.tolist(),
        "bf16_perplexity": round(ppl, 4), "valid_perplexity": info["valid_perplexity"],
    }) + "\n")
    print(f"{out}: {windows} windows, transformers bf16 perplexity {ppl:.3f}")


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("builtin", help="train builtin:code (GPTBigCode MQA)")
    b.add_argument("out", type=Path)
    b.add_argument("--steps", type=int, default=1100)
    t = sub.add_parser("train", help="train one model of the quality table")
    t.add_argument("out", type=Path)
    t.add_argument("--family", default="llama")
    t.add_argument("--kv-heads", type=int, required=True)
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--width", type=int, default=256)
    t.add_argument("--layers", type=int, default=4)
    t.add_argument("--heads", type=int, default=8)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--lr", type=float, default=2e-3)
    t.add_argument("--init", type=Path, help="start from this checkpoint (uptraining)")
    t.add_argument("--seed", type=int, default=SEED, help="initialisation and data order")
    e = sub.add_parser("eval", help="validation perplexity of model folders")
    e.add_argument("dirs", type=Path, nargs="+")
    f = sub.add_parser("fixture", help="write the CI perplexity fixture")
    f.add_argument("dir", type=Path)
    f.add_argument("out", type=Path)
    a = p.parse_args()
    if a.cmd == "builtin":
        train(a.out, family="gpt_bigcode", kv_heads=1, steps=a.steps, width=256, layers=6, heads=8,
              batch=8, lr=2e-3)
    elif a.cmd == "train":
        train(a.out, family=a.family, kv_heads=a.kv_heads, steps=a.steps, width=a.width, layers=a.layers,
              heads=a.heads, batch=a.batch, lr=a.lr, init=a.init, seed=a.seed)
    elif a.cmd == "eval":
        evaluate(a.dirs)
    else:
        fixture(a.dir, a.out)


if __name__ == "__main__":
    main()
