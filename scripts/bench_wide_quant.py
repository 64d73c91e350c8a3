"""Quantized decoding of a wide model on this CPU: a random Llama-shaped model with d_model 4096 and MLP
width 14336 (2 layers, so that it fits anywhere), int8 and int4, batch 1, 16 new tokens.

    python scripts/bench_wide_quant.py

Rows this wide are where XLA's CPU backend leaves its fast fused matrix-vector loop, so this is the check
for `quantize.MATVEC_COLUMNS` (the README's "Quantized weights" section has the figures).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxdecode as jd
from jaxdecode import quantize, weights
from jaxdecode.bench import machine

CONFIG = jd.ModelConfig(
    family="llama",
    vocab_size=32000,
    d_model=4096,
    num_layers=2,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    ffn_dim=14336,
    max_seq_len=2048,
    tie_embeddings=False,
)


def main() -> None:
    print(f"machine: {machine()}")
    host = jax.tree.map(np.asarray, jd.init_params(CONFIG, jax.random.key(0)))
    stored = jax.tree_util.tree_map_with_path(lambda p, a: a.T if p[-1].key == "weight" else a, host)  # [out, in]
    for quant in ("int8", "int4"):
        params = weights.to_model_layout(quantize.quantize_params(stored, quant))
        model = jd.Model(CONFIG, jax.tree.map(jnp.asarray, params), None, f"wide-{quant}")
        jd.generate(model, [[1, 2, 3]], max_new_tokens=4, stop_ids=())  # compile
        out = jd.generate(model, [[1, 2, 3]], max_new_tokens=16, stop_ids=())
        mb = quantize.param_bytes(params) / 1e6
        print(f"{quant}: decode {out.decode_tokens_per_s:.2f} tok/s, {mb:.0f} MB of weights a step")


if __name__ == "__main__":
    main()
