"""Compile-time cost of per-layer attention settings (Gemma 3's local/global layers) in one program.

Each layer of the decoder is its own Flax module with static settings (window, RoPE base and scaling), so
the layers are unrolled into one compiled program whatever they differ in. This script measures what that
costs: the compile time of `generate` (prefill + decode loop) for Gemma 3 270M as it is (15 sliding
layers with base 10k + 3 global layers with base 1M) and for the same weights with every layer alike.

`--model gemma4-shape` does the same for a Gemma 4 layer structure with random weights (35 layers, 4
sliding : 1 full, head_dim 256 / 512 in full layers, the last 20 layers sharing K/V with double-wide MLPs,
per-layer inputs) at a small width, against the same layers made alike (no sharing, no per-layer inputs,
head_dim 256 everywhere).

    python scripts/compile_per_layer.py [--model gemma3-270m | gemma4-shape] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import jax

import jaxdecode as jd

_LAYERS = 35
GEMMA4_SHAPE = jd.ModelConfig(
    family="gemma4",
    vocab_size=4096,
    d_model=256,
    num_layers=_LAYERS,
    num_heads=4,
    num_kv_heads=1,
    head_dim=256,
    ffn_dim=512,
    max_seq_len=4096,
    activation="gelu_tanh",
    rope_local_theta=10000.0,
    rope_theta=1e6,
    rope_scaling=jd.RopeScaling("proportional", 1.0, rotary_fraction=0.25),
    embed_scale=True,
    sliding_window=512,
    layer_types=tuple("full" if (i + 1) % 5 == 0 else "sliding" for i in range(_LAYERS)),
    attn_scale=1.0,
    qk_norm=True,
    sandwich_norm=True,
    final_softcap=30.0,
    layer_head_dims=tuple(512 if (i + 1) % 5 == 0 else 256 for i in range(_LAYERS)),
    kv_shared_layers=20,
    v_norm=True,
    double_wide_shared_mlp=True,
    per_layer_dim=64,
    per_layer_vocab=4096,
    layer_scalar=True,
)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    if args.model == "gemma4-shape":  # random weights; the uniform variant has its own (other shapes)
        uniform = GEMMA4_SHAPE.replace(
            layer_types=None,
            sliding_window=None,
            rope_local_theta=None,
            rope_scaling=None,
            layer_head_dims=None,
            kv_shared_layers=0,
            double_wide_shared_mlp=False,
            per_layer_dim=0,
            per_layer_vocab=0,
        )
        variants = {
            name: jd.Model(config, jd.init_params(config, jax.random.key(0)), tokenizer=None)
            for name, config in (("per-layer (as the model is)", GEMMA4_SHAPE), ("uniform layers", uniform))
        }
    else:
        model = jd.load(args.model)
        uniform = model.config.replace(layer_types=None, sliding_window=None, rope_local_theta=None)
        variants = {
            "per-layer (as the model is)": model,
            "uniform layers": dataclasses.replace(model, config=uniform),
        }
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):  # alternate, so neither variant always compiles first
        for name, model in variants.items():
            fresh = dataclasses.replace(model, executables={})
            prompt = "Photosynthesis converts" if model.tokenizer else [list(range(1, 17))]
            out = jd.generate(fresh, prompt, max_new_tokens=8, stop_ids=())
            times[name].append(out.compile_s)
    for name, values in times.items():
        print(f"{name}: compile {statistics.median(values):.2f} s (median of {len(values)}: {values})")


if __name__ == "__main__":
    main()
