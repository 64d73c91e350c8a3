"""A random mixture-of-experts model on this CPU: jaxdecode against HF transformers in the same run, and the
bytes a compiled decode step reads (routed experts against all of them).

    python scripts/bench_moe.py [--batch 1 8] [--new-tokens 64] [--json out.json]

The model is Qwen3-MoE-shaped and random (HF's init): 8 layers, d_model 512, 32 experts of width 512,
top 4 renormalised, float32. Both engines decode greedily from the same prompt ids; decode tok/s is
(new tokens - 1) / (time to generate them - time to generate one), the median of `--runs`.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import jaxdecode as jd
from jaxdecode.bench import machine

CONFIG = dict(
    vocab_size=8192,
    hidden_size=512,
    intermediate_size=1536,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    num_experts=32,
    num_experts_per_tok=4,
    moe_intermediate_size=512,
    norm_topk_prob=True,
    max_position_embeddings=4096,
    tie_word_embeddings=False,
)


def expert_reads(config: jd.ModelConfig, params, batch: int) -> dict:
    """From the compiled decode step (batch rows, one token each): how many expert matrices it reads (each
    a fusion that slices one expert out of a stacked tensor and multiplies), and their bytes against all
    experts' (the dense equivalent)."""
    abstract = jax.eval_shape(lambda: params)
    cache = jax.eval_shape(lambda: jd.init_cache(config, batch, 256))
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    step = jax.jit(lambda p, t, c: jd.apply(p, config, t, t, c)[0])
    text = step.lower(abstract, tokens, cache).compile().as_text()
    e, f, d = config.num_experts, config.expert_ffn_dim, config.d_model
    stacked = re.compile(rf"f32\[{e},({f},{d}|{d},{f})\]")
    sliced = [
        b for b in text.split("\n\n") if b.startswith("%fused") and stacked.search(b.splitlines()[0]) and " dot(" in b
    ]
    matrix = f * d * 4
    all_experts = config.num_layers * 3 * e * matrix
    loops = " while(" in text  # the grouped path (many pairs) reads experts inside a loop over tiles
    return {
        "batch": batch,
        "expert_matrices_read": None if loops else len(sliced),
        "routed_mb": None if loops else len(sliced) * matrix / 1e6,
        "all_experts_mb": all_experts / 1e6,
    }


def time_jaxdecode(model, prompt: list[int], batch: int, new_tokens: int, runs: int) -> dict:
    prompts = [prompt] * batch
    jd.generate(model, prompts, max_new_tokens=new_tokens, stop_ids=())  # compile
    results = [jd.generate(model, prompts, max_new_tokens=new_tokens, stop_ids=()) for _ in range(runs)]
    return {
        "prefill_tok_s": float(np.median([r.prefill_tokens_per_s for r in results])),
        "decode_tok_s": float(np.median([r.decode_tokens_per_s for r in results])),
        "tokens": results[0].tokens,
    }


def time_hf(model, prompt: list[int], batch: int, new_tokens: int, runs: int) -> dict:
    import torch

    ids = torch.as_tensor([prompt] * batch)

    def seconds(n: int) -> float:
        begin = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return time.perf_counter() - begin

    seconds(2)  # warm up
    one = np.median([seconds(1) for _ in range(runs)])
    full = np.median([seconds(new_tokens) for _ in range(runs)])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return {
        "prefill_tok_s": batch * len(prompt) / one,
        "decode_tok_s": batch * (new_tokens - 1) / (full - one),
        "tokens": out[:, len(prompt) :].tolist(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt", type=int, default=64, help="prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)

    import torch
    import transformers as tf

    torch.manual_seed(0)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    hf = tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(**CONFIG)).float().eval()
    with tempfile.TemporaryDirectory() as directory:
        hf.save_pretrained(directory)
        model = jd.load(Path(directory))
    prompt = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], args.prompt).tolist()
    print(f"machine: {machine()}")
    print(
        f"model: random Qwen3-MoE, {CONFIG['num_hidden_layers']} layers, {CONFIG['num_experts']} experts top "
        f"{CONFIG['num_experts_per_tok']}, float32, {sum(p.numel() for p in hf.parameters()) / 1e6:.0f}M params"
    )
    rows = []
    for batch in args.batch:
        ours = time_jaxdecode(model, prompt, batch, args.new_tokens, args.runs)
        theirs = time_hf(hf, prompt, batch, args.new_tokens, args.runs)
        same = ours.pop("tokens") == theirs.pop("tokens")
        row = {"batch": batch, "jaxdecode": ours, "hf": theirs, "same_greedy_tokens": same}
        row["decode_vs_hf"] = ours["decode_tok_s"] / theirs["decode_tok_s"]
        row["step_reads"] = expert_reads(model.config, model.params, batch)
        rows.append(row)
        print(
            f"batch {batch}: decode {ours['decode_tok_s']:.1f} tok/s vs HF {theirs['decode_tok_s']:.1f} "
            f"({row['decode_vs_hf']:.2f}x), prefill {ours['prefill_tok_s']:.0f} vs {theirs['prefill_tok_s']:.0f} "
            f"tok/s, same greedy tokens: {same}; step reads {row['step_reads']}"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "config": CONFIG, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
