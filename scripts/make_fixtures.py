#!/usr/bin/env python3
"""Writes the parity fixtures under tests/fixtures/ with the reference implementation.

Each case is a tiny random Hugging Face checkpoint (fixed seed, weights widened so logits are
far from uniform) plus `reference.json`: the greedy continuation of a fixed prompt computed by
`transformers` with its KV cache, the logprob of each chosen token (log-softmax of the raw
logits), and the logprob of every next token of the whole sequence from one full forward.

Run it with the project's torch environment plus transformers:
    .venv/bin/pip install transformers==5.24.0
    .venv/bin/python scripts/make_fixtures.py
"""
import json
import shutil
from pathlib import Path

import torch
import transformers
from transformers import GPTBigCodeConfig, GPTBigCodeForCausalLM

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
NEW_TOKENS = 20


def widen(model: torch.nn.Module, seed: int) -> None:
    """Re-draws every parameter: std 0.3 for matrices, layer norms near 1, small biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "ln" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.3 * noise)


@torch.no_grad()
def reference(model, prompt_ids):
    """Greedy decoding through the reference's own KV cache, then one full forward."""
    ids = torch.tensor([prompt_ids])
    out = model(ids, use_cache=True)
    past = out.past_key_values
    logits = out.logits[0, -1]
    new_ids, logprobs = [], []
    for _ in range(NEW_TOKENS):
        lp = torch.log_softmax(logits.float(), dim=-1)
        tok = int(torch.argmax(logits))
        new_ids.append(tok)
        logprobs.append(float(lp[tok]))
        out = model(torch.tensor([[tok]]), past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = out.logits[0, -1]
    seq = prompt_ids + new_ids
    full = torch.log_softmax(model(torch.tensor([seq]), use_cache=False).logits[0].float(), dim=-1)
    seq_logprobs = [float(full[i, seq[i + 1]]) for i in range(len(seq) - 1)]
    # The reference agrees with itself: incremental decode equals the full forward.
    for i, lp in enumerate(logprobs):
        assert abs(lp - seq_logprobs[len(prompt_ids) - 1 + i]) < 1e-4, (i, lp)
    return new_ids, logprobs, seq_logprobs


def case(name, *, seed, prompt_len, dtype=torch.float32, max_shard_size=None, **config):
    torch.manual_seed(seed)
    cfg = GPTBigCodeConfig(n_positions=64, n_layer=2, bos_token_id=0, eos_token_id=1, **config)
    model = GPTBigCodeForCausalLM(cfg).eval()
    widen(model, seed)
    model = model.to(dtype)
    out = ROOT / name
    shutil.rmtree(out, ignore_errors=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    # The reference runs in f32 on exactly the stored weights (bf16 ones are upcast exactly).
    ref_model = model.float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    # Avoid the EOS id in the prompt; the continuation is greedy and ignores EOS.
    prompt_ids = [int(t) for t in torch.randint(2, cfg.vocab_size, (prompt_len,), generator=g)]
    new_ids, logprobs, seq_logprobs = reference(ref_model, prompt_ids)
    ref = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "prompt_ids": prompt_ids,
        "new_ids": new_ids,
        "logprobs": logprobs,
        "sequence_logprobs": seq_logprobs,
    }
    (out / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{name}: {size / 1024:.0f} KiB, new_ids {new_ids}")


def main():
    common = dict(n_embd=32, n_head=4, vocab_size=97)
    case("mqa_f32", seed=1, prompt_len=7, multi_query=True, activation_function="gelu_pytorch_tanh", **common)
    case("mha_f32", seed=2, prompt_len=9, multi_query=False, activation_function="gelu", **common)
    # head_dim 12, 7 heads (no split of 2, 3 or 4 is even), untied LM head, unscaled attention.
    case("mqa_hd12_untied", seed=3, prompt_len=5, multi_query=True, n_embd=84, n_head=7, n_inner=96,
         vocab_size=101, tie_word_embeddings=False, scale_attn_weights=False, layer_norm_epsilon=1e-4,
         activation_function="gelu_pytorch_tanh")
    case("mqa_sharded", seed=4, prompt_len=11, multi_query=True, n_embd=48, n_head=6, vocab_size=89,
         max_shard_size="40KB", activation_function="gelu_new")
    case("mqa_bf16", seed=5, prompt_len=6, dtype=torch.bfloat16, multi_query=True, **common)


if __name__ == "__main__":
    main()
