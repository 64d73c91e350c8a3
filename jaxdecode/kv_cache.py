"""The KV cache: an explicit pytree passed into and out of every model call.

Layout per layer: keys and values `[batch, num_kv_heads, max_len, head_dim]` (the layout of
`pallas_kernels.decode_attention`). One array per layer rather than one stacked array, so a layer
reads and updates its own buffer without XLA slicing (copying) it out of a larger one.
`lengths` int32 `[batch]` counts the valid entries of each row; rows of a batch may differ.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .config import ModelConfig


class KVCache(NamedTuple):
    keys: tuple[jax.Array, ...]  # num_layers x [batch, num_kv_heads, max_len, head_dim]
    values: tuple[jax.Array, ...]  # same
    lengths: jax.Array  # int32 [batch]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]


def init_cache(config: ModelConfig, batch_size: int, max_len: int, dtype: jnp.dtype = jnp.float32) -> KVCache:
    """An empty cache for `batch_size` rows of up to `max_len` tokens."""
    shape = (batch_size, config.num_kv_heads, max_len, config.head_dim)
    return KVCache(
        keys=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        values=tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers)),
        lengths=jnp.zeros((batch_size,), jnp.int32),
    )


def write(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write `new` `[B, T, Hkv, D]` into `buffer` `[B, Hkv, S, D]` at slots `start[b] .. start[b] + T`.

    One scatter on the whole buffer; inside a jitted step whose cache is donated, XLA does it in
    place. The caller guarantees `start + T <= S` (a slot past the end would be dropped).
    """
    batch, steps = new.shape[:2]
    rows = jnp.arange(batch)[:, None]
    slots = start[:, None] + jnp.arange(steps)[None, :]
    # Advanced indices (rows, slots) around a slice put their [B, T] dims first: the update is [B, T, Hkv, D].
    return buffer.at[rows, :, slots].set(new.astype(buffer.dtype), mode="drop")
