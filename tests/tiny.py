"""A tiny random Llama-style model (no tokenizer) for fast tests of the generation machinery."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import jaxdecode as jd

TINY = jd.ModelConfig(
    family="llama",
    vocab_size=64,
    d_model=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    ffn_dim=48,
    max_seq_len=96,
)


def tiny_model(seed: int = 0, config: jd.ModelConfig = TINY) -> jd.Model:
    # A larger init than the default 0.02 so that logits are far from uniform and greedy choices are stable.
    params = jd.init_params(config, jax.random.key(seed))
    params = jax.tree.map(lambda p: p * 40.0 if p.ndim == 2 else p, params)
    return jd.Model(config=config, params=params, tokenizer=None, source="tiny")


def quantized(model: jd.Model, quant: str, group_size: int = 32) -> jd.Model:
    """The model with its weights quantized by `quantize_params` (loaders' `[out, in]` layout in, model
    layout out)."""
    from jaxdecode.quantize import quantize_params
    from jaxdecode.weights import to_model_layout

    host = to_model_layout(jax.tree.map(np.asarray, model.params))
    params = to_model_layout(quantize_params(host, quant, group_size))
    return jd.Model(model.config, jax.tree.map(jnp.asarray, params), None, f"{model.source}-{quant}")


# Prompts of different lengths for the mesh tests (also used by the 2-process worker).
PROMPTS_FOR_MESH = [[5, 17, 33, 2, 9], [40, 3, 3, 61, 12, 8, 30, 1, 44, 7, 19], [11, 22, 60]]
