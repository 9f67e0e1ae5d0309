#!/usr/bin/env python3
"""Writes the parity fixtures under tests/fixtures/ with the reference implementation.

Each case is a tiny random Hugging Face checkpoint (fixed seed, weights widened so logits are
far from uniform) plus `reference.json`: the greedy continuation of a fixed prompt computed by
`transformers` with its KV cache, the logprob of each chosen token (log-softmax of the raw
logits), and the logprob of every next token of the whole sequence from one full forward.
`converted/NAME.json` holds the same for a fixture whose K/V heads this script mean-pools itself
(onehead-convert's parity; the test converts the source fixture with onehead-convert).

Run it with the project's torch environment plus transformers (names limit it to those cases):
    .venv/bin/pip install -r scripts/reference-requirements.txt
    .venv/bin/python scripts/make_fixtures.py [CASE ...]      (converted cases: converted/NAME)
"""
import json
import shutil
import sys
from pathlib import Path

import torch
import transformers
from transformers import (
    FalconConfig,
    FalconForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3Config,
    Gemma3ForCausalLM,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    GemmaConfig,
    GemmaForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    GPTBigCodeConfig,
    GPTBigCodeForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
    Starcoder2Config,
    Starcoder2ForCausalLM,
)

ROOT = Path(__file__).resolve().parent.parent / "tests" / "fixtures"
NEW_TOKENS = 20


def widen(model: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    """Re-draws every parameter: std `std` for matrices, norms near 1, small biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if ("ln" in name or "norm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(std * noise)


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


def gpt_bigcode(**config):
    cfg = GPTBigCodeConfig(n_positions=64, n_layer=2, bos_token_id=0, eos_token_id=1, **config)
    return GPTBigCodeForCausalLM(cfg)


def falcon(**config):
    cfg = FalconConfig(max_position_embeddings=64, num_hidden_layers=2, bos_token_id=0, eos_token_id=1, **config)
    return FalconForCausalLM(cfg)


LLAMA_FAMILY = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "mistral": (MistralConfig, MistralForCausalLM),
    "gemma": (GemmaConfig, GemmaForCausalLM),
    "gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "gemma3_text": (Gemma3TextConfig, Gemma3ForCausalLM),
    "starcoder2": (Starcoder2Config, Starcoder2ForCausalLM),
    "granite": (GraniteConfig, GraniteForCausalLM),
}


def gemma3_multimodal(text_config):
    """Gemma 3 4B's layout: a language model beside a small vision tower (never run here: the
    prompts are text), saved as transformers saves `Gemma3ForConditionalGeneration`."""
    text_config = dict(max_position_embeddings=64, bos_token_id=0, eos_token_id=1, **text_config)
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = Gemma3Config(text_config=text_config, vision_config=vision, mm_tokens_per_image=4, image_token_index=96,
                       boi_token_index=94, eoi_token_index=95)
    return Gemma3ForConditionalGeneration(cfg)


def llama_family(model_type, **config):
    """A Llama-architecture model of 2 layers (unless told), 64 positions, in `model_type`'s dialect."""
    config_class, model_class = LLAMA_FAMILY[model_type]
    config.setdefault("eos_token_id", 1)
    config.setdefault("num_hidden_layers", 2)
    cfg = config_class(max_position_embeddings=64, bos_token_id=0, **config)
    return model_class(cfg)


# The RefinedWeb code's names for FalconConfig's (tiiuae's original config.json files).
REFINED_WEB_NAMES = {"num_attention_heads": "n_head", "num_hidden_layers": "n_layer", "num_kv_heads": "n_head_kv"}


def refined_web(out: Path, model_type: str, drop: tuple) -> None:
    """Rewrites a saved Falcon config.json in the RefinedWeb dialect, without the keys `drop`."""
    path = out / "config.json"
    config = json.loads(path.read_text())
    config = {REFINED_WEB_NAMES.get(k, k): v for k, v in config.items() if k not in drop}
    config["model_type"] = model_type
    path.write_text(json.dumps(config, indent=2) + "\n")


@torch.no_grad()
def bf16_logprobs(model_class, out: Path, seq):
    """The logprob of every next token of `seq` from the saved checkpoint loaded in bf16."""
    model = model_class.from_pretrained(out, dtype=torch.bfloat16).eval()
    full = torch.log_softmax(model(torch.tensor([seq])).logits[0].float(), dim=-1)
    return [float(full[i, seq[i + 1]]) for i in range(len(seq) - 1)]


def case(name, model, *, seed, prompt_len, dtype=torch.float32, max_shard_size=None, dialect=None, std=0.3,
         bf16=False):
    torch.manual_seed(seed)
    model = model().eval()
    widen(model, seed, std)
    model = model.to(dtype)
    out = ROOT / name
    shutil.rmtree(out, ignore_errors=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, safe_serialization=True, **kwargs)
    if dialect:
        refined_web(out, *dialect)
    # The reference runs in f32 on exactly the stored weights (bf16 ones are upcast exactly).
    ref_model = model.float().eval()
    g = torch.Generator().manual_seed(seed + 1)
    # Avoid the EOS id in the prompt; the continuation is greedy and ignores EOS.
    vocab_size = model.config.get_text_config().vocab_size
    prompt_ids = [int(t) for t in torch.randint(2, vocab_size, (prompt_len,), generator=g)]
    new_ids, logprobs, seq_logprobs = reference(ref_model, prompt_ids)
    ref = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "prompt_ids": prompt_ids,
        "new_ids": new_ids,
        "logprobs": logprobs,
        "sequence_logprobs": seq_logprobs,
    }
    if bf16:
        ref["bf16_sequence_logprobs"] = bf16_logprobs(type(model), out, prompt_ids + new_ids)
    (out / "reference.json").write_text(json.dumps(ref, indent=1) + "\n")
    size = sum(f.stat().st_size for f in out.iterdir())
    print(f"{name}: {size / 1024:.0f} KiB, new_ids {new_ids}")


def cases():
    common = dict(n_embd=32, n_head=4, vocab_size=97)
    yield "mqa_f32", dict(seed=1, prompt_len=7), lambda: gpt_bigcode(
        multi_query=True, activation_function="gelu_pytorch_tanh", **common)
    yield "mha_f32", dict(seed=2, prompt_len=9), lambda: gpt_bigcode(
        multi_query=False, activation_function="gelu", **common)
    # head_dim 12, 7 heads (no split of 2, 3 or 4 is even), untied LM head, unscaled attention.
    yield "mqa_hd12_untied", dict(seed=3, prompt_len=5), lambda: gpt_bigcode(
        multi_query=True, n_embd=84, n_head=7, n_inner=96, vocab_size=101, tie_word_embeddings=False,
        scale_attn_weights=False, layer_norm_epsilon=1e-4, activation_function="gelu_pytorch_tanh")
    yield "mqa_sharded", dict(seed=4, prompt_len=11, max_shard_size="40KB"), lambda: gpt_bigcode(
        multi_query=True, n_embd=48, n_head=6, vocab_size=89, activation_function="gelu_new")
    yield "mqa_bf16", dict(seed=5, prompt_len=6, dtype=torch.bfloat16), lambda: gpt_bigcode(
        multi_query=True, **common)
    # Heads of 32, the smallest that decode attention on AMX takes (a bf16 test loads them as
    # bf16): multi-query GPTBigCode, and Falcon with 2 K/V groups of 2. The Falcon one is stored
    # in f32: cast to bf16 and back, the reference's rotary frequencies (a buffer) would be
    # rounded too, and it would no longer compute what the stored weights define.
    yield "mqa_hd32_bf16", dict(seed=6, prompt_len=9, dtype=torch.bfloat16), lambda: gpt_bigcode(
        multi_query=True, n_embd=128, n_head=4, n_inner=128, vocab_size=97, activation_function="gelu_pytorch_tanh")
    yield "falcon_gqa_hd32", dict(seed=16, prompt_len=9), lambda: falcon(
        hidden_size=128, num_attention_heads=4, num_kv_heads=2, vocab_size=97, new_decoder_architecture=True,
        ffn_hidden_size=128)
    # Falcon-7B's layout: multi-query, parallel attention and MLP on one norm, 7 heads (odd).
    yield "falcon_mqa", dict(seed=11, prompt_len=9), lambda: falcon(
        hidden_size=56, num_attention_heads=7, vocab_size=103, multi_query=True, parallel_attn=True,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    # Falcon-40B's: the new decoder architecture, 4 K/V groups of 2 (3 shards split a group),
    # two norms, biases.
    yield "falcon_gqa", dict(seed=12, prompt_len=8), lambda: falcon(
        hidden_size=64, num_attention_heads=8, num_kv_heads=4, vocab_size=107, new_decoder_architecture=True,
        bias=True, ffn_hidden_size=96)
    # The new decoder architecture on one norm, 3 groups of 2 query heads, untied LM head.
    yield "falcon_gqa_one_ln", dict(seed=13, prompt_len=6), lambda: falcon(
        hidden_size=48, num_attention_heads=6, num_kv_heads=3, vocab_size=89, new_decoder_architecture=True,
        num_ln_in_parallel_attn=1, tie_word_embeddings=False, activation="gelu_pytorch_tanh")
    # tiiuae's original Falcon-7B dialect (RefinedWebModel), here with multi-head attention run
    # sequentially (attention, then MLP, each on its own norm).
    yield "falcon_rw_mha_sequential", dict(
        seed=14, prompt_len=7, dialect=("RefinedWebModel", ("rope_parameters", "num_kv_heads"))), lambda: falcon(
        hidden_size=32, num_attention_heads=4, vocab_size=97, multi_query=False, parallel_attn=False)
    # tiiuae's original Falcon-40B dialect (RefinedWeb): n_head_kv groups, and no
    # new_decoder_architecture key (the dialect implies it).
    yield "falcon_rw40b", dict(
        seed=15, prompt_len=7,
        dialect=("RefinedWeb", ("rope_parameters", "new_decoder_architecture", "num_ln_in_parallel_attn"))),\
        lambda: falcon(hidden_size=48, num_attention_heads=6, num_kv_heads=2, vocab_size=97,
                       new_decoder_architecture=True)


def llama_cases():
    # Llama 3's rotary scaling over heads of 16 (not hidden / heads): with an original context
    # of 32 the 8 frequencies are kept (1), interpolated (1) and divided (6). 6 query heads
    # over 2 K/V heads, so 4 shards split a group.
    llama3 = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
              "high_freq_factor": 4.0, "original_max_position_embeddings": 32}
    yield "llama3_gqa", dict(seed=21, prompt_len=9), lambda: llama_family(
        "llama", hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=16, intermediate_size=64,
        vocab_size=97, rope_parameters=llama3, eos_token_id=[1, 2])
    # Multi-query (one K/V head on every shard), 7 heads, tied embeddings, every bias.
    yield "llama_mqa_bias", dict(seed=22, prompt_len=7), lambda: llama_family(
        "llama", hidden_size=56, num_attention_heads=7, num_key_value_heads=1, intermediate_size=72, vocab_size=101,
        tie_word_embeddings=True, attention_bias=True, mlp_bias=True, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0})
    # Qwen2: biases on q, k and v; 6 heads over 3 K/V heads, tied embeddings.
    yield "qwen2_gqa", dict(seed=23, prompt_len=8), lambda: llama_family(
        "qwen2", hidden_size=48, num_attention_heads=6, num_key_value_heads=3, intermediate_size=80, vocab_size=89,
        tie_word_embeddings=True)
    # Qwen3: RMSNorm of each query and key head; heads of 8 over a width of 32.
    yield "qwen3_gqa", dict(seed=24, prompt_len=8), lambda: llama_family(
        "qwen3", hidden_size=32, num_attention_heads=6, num_key_value_heads=2, head_dim=8, intermediate_size=64,
        vocab_size=97)
    # Mistral without a sliding window: 4 heads over 2 K/V heads.
    yield "mistral_gqa", dict(seed=25, prompt_len=7), lambda: llama_family(
        "mistral", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48, vocab_size=97,
        sliding_window=None)
    # Mistral's sliding window, 5 keys of the 64 positions: prompts and chunks cross it. 5 query
    # heads over 1 K/V head.
    yield "mistral_window", dict(seed=26, prompt_len=9), lambda: llama_family(
        "mistral", hidden_size=40, num_attention_heads=5, num_key_value_heads=1, intermediate_size=48, vocab_size=97,
        sliding_window=5)
    # Gemma 3 1B's shape: multi-query (6 query heads over 1 K/V head), heads of 16 over a width of
    # 48, 5 layers of which the third is full (sliding_window_pattern 3) and the others slide
    # over 4 keys, each kind with its own rope base; scale 24 ** -0.5, soft-capped logits.
    gemma3_rope = {"full_attention": {"rope_type": "default", "rope_theta": 1000.0},
                   "sliding_attention": {"rope_type": "default", "rope_theta": 30.0}}
    yield "gemma3_mqa", dict(seed=27, prompt_len=9), lambda: llama_family(
        "gemma3_text", hidden_size=48, num_attention_heads=6, num_key_value_heads=1, head_dim=16,
        intermediate_size=64, vocab_size=97, num_hidden_layers=5, sliding_window=4, sliding_window_pattern=3,
        rope_parameters=gemma3_rope, query_pre_attn_scalar=24, final_logit_softcapping=5.0, pad_token_id=0)
    # Gemma 3 4B's rope: the full layers' frequencies divided by 4 (linear scaling), the sliding
    # layers' base of their own; 4 query heads over 2 K/V heads, window 3, every other layer full.
    gemma3_linear = {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1000.0},
                     "sliding_attention": {"rope_type": "default", "rope_theta": 30.0}}
    yield "gemma3_linear_rope", dict(seed=32, prompt_len=9), lambda: llama_family(
        "gemma3_text", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=48, vocab_size=97, num_hidden_layers=4, sliding_window=3, sliding_window_pattern=2,
        rope_parameters=gemma3_linear, query_pre_attn_scalar=16, pad_token_id=0)
    # A multimodal Gemma 3 checkpoint (`gemma3`): its language model, multi-query (6 heads over
    # 1), 3 layers with the last full, served from `language_model.*`. Its logits are not capped
    # (`Gemma3ForConditionalGeneration` does not), so matrices of std 0.15: at 0.3 the greedy
    # continuation repeats one token.
    yield "gemma3_multimodal", dict(seed=33, prompt_len=8, std=0.15), lambda: gemma3_multimodal(dict(
        hidden_size=48, num_attention_heads=6, num_key_value_heads=1, head_dim=16, intermediate_size=64,
        vocab_size=97, num_hidden_layers=3, sliding_window=4, sliding_window_pattern=3,
        rope_parameters=gemma3_rope, query_pre_attn_scalar=24, pad_token_id=0))
    # Qwen2's sliding window on the layers from `max_window_layers` (1) on: the first of 3
    # layers full, the others over 5 keys; 6 heads over 2 K/V heads.
    yield "qwen2_window", dict(seed=34, prompt_len=9), lambda: llama_family(
        "qwen2", hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=64, vocab_size=97,
        num_hidden_layers=3, use_sliding_window=True, sliding_window=5, max_window_layers=1)
    # Gemma 1: 6 heads over 3 K/V heads, heads of 12 over a width of 48, tied embeddings.
    yield "gemma_gqa", dict(seed=28, prompt_len=8), lambda: llama_family(
        "gemma", hidden_size=48, num_attention_heads=6, num_key_value_heads=3, head_dim=12, intermediate_size=64,
        vocab_size=89, pad_token_id=0)
    # Gemma 2: 6 heads over 2 K/V heads, heads of 16 over a width of 48, 4 layers alternating
    # sliding (window 4) and full, attention scores capped at 3 and logits at 8, scale 20 ** -0.5.
    yield "gemma2_gqa", dict(seed=29, prompt_len=9), lambda: llama_family(
        "gemma2", hidden_size=48, num_attention_heads=6, num_key_value_heads=2, head_dim=16, intermediate_size=64,
        vocab_size=97, num_hidden_layers=4, sliding_window=4, attn_logit_softcapping=3.0,
        final_logit_softcapping=8.0, query_pre_attn_scalar=20, pad_token_id=0)
    # Starcoder2: LayerNorm with biases, a plain tanh-GELU MLP, every bias; 6 heads over 2 K/V
    # heads, a window of 5.
    yield "starcoder2_gqa", dict(seed=30, prompt_len=9), lambda: llama_family(
        "starcoder2", hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=64,
        vocab_size=97, sliding_window=5, rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    # Granite: Llama with its four multipliers, none of them 1; 6 heads over 2 K/V heads.
    yield "granite_gqa", dict(seed=31, prompt_len=8), lambda: llama_family(
        "granite", hidden_size=48, num_attention_heads=6, num_key_value_heads=2, intermediate_size=64,
        vocab_size=97, embedding_multiplier=2.0, attention_multiplier=0.2, residual_multiplier=0.5,
        logits_scaling=3.0)


def load_fixture(path: Path):
    """A model folder in transformers, the RefinedWeb dialects read back into Falcon's names."""
    config = json.loads((path / "config.json").read_text())
    if config["model_type"] in ("RefinedWebModel", "RefinedWeb"):
        names = {v: k for k, v in REFINED_WEB_NAMES.items()}
        # RefinedWeb (Falcon-40B's dialect) means the new decoder architecture without saying so.
        config.setdefault("new_decoder_architecture", config["model_type"] == "RefinedWeb")
        config = {names.get(k, k): v for k, v in config.items() if k != "model_type"}
        return FalconForCausalLM.from_pretrained(path, config=FalconConfig(**config), dtype=torch.float32)
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def pooled_state(model, kv_heads):
    """The source model's weights with K/V heads mean-pooled into `kv_heads` groups, and the
    config changes that say so: an implementation independent of onehead-convert's block lists
    (reshapes and means over whole tensors)."""
    c = model.config
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if c.model_type == "gpt_bigcode" or (c.model_type == "falcon" and not c.new_decoder_architecture):
        assert kv_heads == 1
        heads, hd = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        for name in [n for n in state if n.endswith(("attn.c_attn.weight", "attn.c_attn.bias",
                                                       "query_key_value.weight", "query_key_value.bias"))]:
            w = state[name]
            v = w.view(heads, 3, hd, *w.shape[1:])
            state[name] = torch.cat([v[:, 0].reshape(heads * hd, *w.shape[1:]), v[:, 1].mean(0), v[:, 2].mean(0)])
        return state, {"multi_query": True, "num_key_value_heads" if c.model_type == "gpt_bigcode" else "num_kv_heads": 1}
    if c.model_type == "falcon":
        groups, hd = c.num_kv_heads, c.hidden_size // c.num_attention_heads
        q = c.num_attention_heads // groups
        for name in [n for n in state if n.endswith(("query_key_value.weight", "query_key_value.bias"))]:
            w = state[name]
            v = w.view(kv_heads, groups // kv_heads, q + 2, hd, *w.shape[1:])
            queries = v[:, :, :q].reshape(kv_heads, groups // kv_heads * q, hd, *w.shape[1:])
            state[name] = torch.cat([queries, v[:, :, q:q + 1].mean(1), v[:, :, q + 1:].mean(1)], 1).reshape(-1, *w.shape[1:])
        return state, {"num_kv_heads": kv_heads}
    n_kv, hd = c.num_key_value_heads, c.head_dim
    for name in [n for n in state if ".k_proj." in n or ".v_proj." in n]:
        w = state[name]
        state[name] = w.view(kv_heads, n_kv // kv_heads, hd, *w.shape[1:]).mean(1).reshape(kv_heads * hd, *w.shape[1:])
    return state, {"num_key_value_heads": kv_heads}


def expanded_state(model, heads, groups):
    """The inverse of `pooled_state`: each of `model`'s K/V heads repeated for the `groups`
    (per layer) of the source, in the source's layout. The source architecture run on these
    weights must compute what `model` does: a check of this script's reading of each layout
    against transformers' own, which pooling alone cannot give (pooled and reference would
    share a misreading)."""
    c = model.config
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hd = c.hidden_size // c.num_attention_heads if c.model_type != "llama" else c.head_dim
    for name in list(state):
        w = state[name]
        rest = w.shape[1:]
        if name.endswith(("attn.c_attn.weight", "attn.c_attn.bias")) or (
                name.endswith(("query_key_value.weight", "query_key_value.bias"))
                and not c.new_decoder_architecture):
            q, k, v = w[:heads * hd].view(heads, 1, hd, *rest), w[heads * hd:heads * hd + hd], w[heads * hd + hd:]
            kv = torch.stack([k, v]).unsqueeze(0).expand(heads, 2, hd, *rest)
            state[name] = torch.cat([q, kv], 1).reshape(-1, *rest)
        elif name.endswith(("query_key_value.weight", "query_key_value.bias")):
            to = c.num_kv_heads
            q = heads // groups
            v = w.view(to, groups // to * q + 2, hd, *rest)
            queries = v[:, :-2].reshape(to, groups // to, q, hd, *rest)
            kv = v[:, -2:].unsqueeze(1).expand(to, groups // to, 2, hd, *rest)
            state[name] = torch.cat([queries, kv], 2).reshape(-1, *rest)
        elif ".k_proj." in name or ".v_proj." in name:
            to = c.num_key_value_heads
            state[name] = w.view(to, 1, hd, *rest).expand(to, groups // to, hd, *rest).reshape(-1, *rest)
    return state


def converted(name, source, kv_heads):
    """converted/NAME.json: the reference of fixture `source` pooled to `kv_heads` K/V heads. No
    weights: the test makes them with onehead-convert, and scripts/convert_roundtrip.py loads
    those in transformers."""
    src = load_fixture(ROOT / source)
    state, changes = pooled_state(src, kv_heads)
    config = src.config.to_dict()
    config.update(changes)
    config = type(src.config).from_dict(config)
    model = type(src)(config).eval()
    model.load_state_dict(state)
    ref_src = json.loads((ROOT / source / "reference.json").read_text())
    prompt_ids = ref_src["prompt_ids"]
    new_ids, logprobs, seq_logprobs = reference(model, prompt_ids)
    # The pooled model, its heads repeated back into the source's layout, computes the same.
    groups = getattr(src.config, "num_key_value_heads", None) if src.config.model_type == "llama" else (
        src.config.num_kv_heads if src.config.model_type == "falcon" and src.config.new_decoder_architecture
        else src.config.num_attention_heads)
    src.load_state_dict(expanded_state(model, src.config.num_attention_heads, groups))
    seq = torch.tensor([prompt_ids + new_ids])
    with torch.no_grad():
        worst = (torch.log_softmax(src(seq).logits, -1) - torch.log_softmax(model(seq).logits, -1)).abs().max()
    assert worst < 1e-5, f"{name}: the layouts are misread ({worst})"
    out = ROOT / "converted"
    out.mkdir(exist_ok=True)
    ref = {
        "generator": f"scripts/make_fixtures.py, transformers {transformers.__version__}, torch {torch.__version__}",
        "source": source, "kv_heads": kv_heads,
        "prompt_ids": prompt_ids, "new_ids": new_ids, "logprobs": logprobs, "sequence_logprobs": seq_logprobs,
    }
    (out / f"{name}.json").write_text(json.dumps(ref, indent=1) + "\n")
    print(f"converted/{name}.json: {source} pooled to {kv_heads} K/V heads, new_ids {new_ids}")


# onehead-convert's cases: (name, source fixture, K/V heads after).
CONVERTED = [
    ("gpt_bigcode_mqa", "mha_f32", 1),
    ("falcon_gqa2", "falcon_gqa", 2),
    ("falcon_rw_mqa", "falcon_rw_mha_sequential", 1),
    ("llama3_mqa", "llama3_gqa", 1),
]


def main():
    wanted = set(sys.argv[1:])
    # The Llama-architecture cases also record the reference's own bf16 logprobs.
    llama = [(name, dict(options, bf16=True), model) for name, options, model in llama_cases()]
    for name, options, model in [*cases(), *llama]:
        if not wanted or name in wanted:
            case(name, model, **options)
    for name, source, kv_heads in CONVERTED:
        if not wanted or f"converted/{name}" in wanted:
            converted(name, source, kv_heads)


if __name__ == "__main__":
    main()
