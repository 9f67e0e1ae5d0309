#!/usr/bin/env python3
"""Batch-1 decode speed of Hugging Face `transformers` on a GPTBigCode checkpoint folder: the
peer figure for onehead-engine-bench, on the very checkpoints that benchmark writes.

A plain step loop with the reference's own KV cache, bf16, greedy, logits to the host each step.
    .venv/bin/python scripts/bench_hf.py DIR [DIR ...] --context 128 --steps 24 --threads 2
"""
import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


@torch.no_grad()
def bench(path, context, steps):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    prompt = torch.tensor([[(i * 7) % 1000 for i in range(context)]])
    out = model(prompt, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    times = []
    for step in range(steps + 3):
        token = logits.argmax(-1, keepdim=True)
        start = time.perf_counter()
        out = model(token, past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
        logits.float().tolist()
        if step >= 3:
            times.append((time.perf_counter() - start) * 1e3)
    return {"checkpoint": path, "step_ms": statistics.mean(times), "step_ms_median": statistics.median(times)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("dirs", nargs="+")
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--steps", type=int, default=24)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for d in args.dirs:
        r = bench(d, args.context, args.steps)
        print(f"transformers {transformers.__version__}: {d}: {r['step_ms']:.1f} ms/step (median {r['step_ms_median']:.1f})", flush=True)
        results.append(r)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"transformers": transformers.__version__, "torch": torch.__version__,
                       "threads": args.threads, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
