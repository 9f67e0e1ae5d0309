#!/usr/bin/env python3
"""The peer for onehead-bench: Hugging Face `transformers` serving a JSONL prompt set as one
static batch with its own KV cache (bf16, greedy, every request generating its `output_len`).

Reports the decode-phase rate (median ms per step with the whole batch decoding) and the
end-to-end time and generated tokens/s of the workload (prefill, then decode to the end), and
with --spot-check N also writes the greedy ids of the first N prompts (f32) for comparison
with onehead's.
    .venv/bin/python scripts/bench_hf_serving.py CHECKPOINT prompts.jsonl --json hf.json
"""
import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import AutoModelForCausalLM


def load(path, dtype, attn_implementation=None):
    # transformers 5 calls the argument `dtype`; 4.x calls it `torch_dtype`.
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    kwargs = {key: dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    return AutoModelForCausalLM.from_pretrained(path, **kwargs).eval()


def read_prompts(path):
    lines = [json.loads(line) for line in open(path) if line.strip()]
    return [(line["prompt_ids"], line["output_len"]) for line in lines]


@torch.no_grad()
def static_batch(model, prompts, new_tokens):
    """One batch: prefill all prompts (equal lengths, so no padding), then decode greedily."""
    ids = torch.tensor([p for p, _ in prompts])
    started = time.perf_counter()
    out = model(ids, use_cache=True)
    cache, logits = out.past_key_values, out.logits[:, -1]
    tokens = [logits.argmax(-1)]
    tokens[-1].tolist()
    prefill_s = time.perf_counter() - started
    steps = []
    for _ in range(new_tokens - 1):
        step_started = time.perf_counter()
        out = model(tokens[-1][:, None], past_key_values=cache, use_cache=True)
        cache, logits = out.past_key_values, out.logits[:, -1]
        tokens.append(logits.argmax(-1))
        # The ids come back to the host every step, as a server's would.
        tokens[-1].tolist()
        steps.append((time.perf_counter() - step_started) * 1e3)
    total_s = time.perf_counter() - started
    generated = torch.stack(tokens, 1).tolist()
    return prefill_s, steps, total_s, generated


def main():
    p = argparse.ArgumentParser()
    p.add_argument("checkpoint")
    p.add_argument("prompts")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--spot-check", type=int, default=0, help="greedy ids of the first N prompts in f32")
    p.add_argument("--spot-check-tokens", type=int, default=16)
    p.add_argument("--attn-implementation", help="sdpa (the default) or eager")
    p.add_argument("--json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    prompts = read_prompts(args.prompts)
    new_tokens = prompts[0][1]
    assert all(len(q) == len(prompts[0][0]) and n == new_tokens for q, n in prompts), "one shape for the batch"
    report = {"transformers": transformers.__version__, "torch": torch.__version__, "threads": args.threads,
              "checkpoint": args.checkpoint, "batch": len(prompts), "prompt_tokens": len(prompts[0][0]),
              "new_tokens": new_tokens, "attn_implementation": args.attn_implementation or "default"}
    if args.spot_check:
        model = load(args.checkpoint, torch.float32)
        _, _, _, ids = static_batch(model, prompts[:args.spot_check], args.spot_check_tokens)
        report["spot_check_f32_ids"] = ids
        del model
    model = load(args.checkpoint, torch.bfloat16, args.attn_implementation)
    prefill_s, steps, total_s, _ = static_batch(model, prompts, new_tokens)
    generated = len(prompts) * new_tokens
    report.update({"prefill_s": prefill_s, "decode_step_ms_median": statistics.median(steps),
                   "decode_step_ms_mean": statistics.mean(steps), "e2e_s": total_s,
                   "generated_tokens_per_s": generated / total_s,
                   "decode_tokens_per_s": len(prompts) * 1e3 / statistics.median(steps)})
    print(f"transformers {transformers.__version__} ({report['attn_implementation']} attention), {args.threads} threads: batch {len(prompts)} x "
          f"{len(prompts[0][0])} prompt + {new_tokens} new tokens: prefill {prefill_s:.1f} s, decode "
          f"{report['decode_step_ms_median']:.0f} ms/step (median), end to end {total_s:.1f} s = "
          f"{report['generated_tokens_per_s']:.1f} generated tokens/s", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
