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
from jax.sharding import PartitionSpec as P

from .collectives import DATA, MODEL, Parallel, local_kv_heads
from .config import ModelConfig


class KVCache(NamedTuple):
    keys: tuple[jax.Array, ...]  # per cache layer: [batch, num_kv_heads, max_len, head_dim]
    values: tuple[jax.Array, ...]  # same
    lengths: jax.Array  # int32 [batch]

    @staticmethod
    def specs() -> KVCache:
        """Its sharding on a mesh: rows over `data`, KV heads over `model` (a spec prefix per field)."""
        return KVCache(keys=P(DATA, MODEL), values=P(DATA, MODEL), lengths=P(DATA))


def init_cache(
    config: ModelConfig,
    batch_size: int,
    max_len: int,
    dtype: jnp.dtype = jnp.float32,
    parallel: Parallel | None = None,
) -> KVCache:
    """An empty cache for `batch_size` rows of up to `max_len` tokens: one entry per layer of
    `config.cache_layers`, each of that layer's KV heads (a model shard's under `parallel`) and head_dim."""

    def empty(layer: int) -> jax.Array:
        heads = local_kv_heads(config.kv_heads_of(layer), parallel)
        return jnp.zeros((batch_size, heads, max_len, config.head_dim_of(layer)), dtype)

    return KVCache(
        keys=tuple(empty(i) for i in config.cache_layers),
        values=tuple(empty(i) for i in config.cache_layers),
        lengths=jnp.zeros((batch_size,), jnp.int32),
    )


def write(buffer: jax.Array, new: jax.Array, start: jax.Array) -> jax.Array:
    """Write `new` `[B, T, Hkv, D]` into `buffer` `[B, Hkv, S, D]` at slots `start[b] .. start[b] + T`.

    One scatter on the whole buffer; inside a jitted step whose cache is donated, XLA does it in
    place. The caller guarantees `start + T <= S`; out-of-range slots are undefined behaviour (XLA may clamp),
    which is what lets XLA update the buffer in place without a bounds-checking select.
    """
    batch, steps, num_kv_heads, head_dim = new.shape
    max_len = buffer.shape[2]
    # Scatter into the [B * Hkv, S, D] view: the attention dots read the cache in that view too, so
    # XLA sees one buffer updated in place rather than a write it must copy to reshape (at batch 1).
    rows = (jnp.arange(batch)[:, None] * num_kv_heads + jnp.arange(num_kv_heads)[None, :]).reshape(-1)  # [B*Hkv]
    slots = start[:, None] + jnp.arange(steps)[None, :]  # [B, T]
    slots = jnp.repeat(slots, num_kv_heads, axis=0)  # [B*Hkv, T]
    merged = buffer.reshape(batch * num_kv_heads, max_len, head_dim)
    update = new.transpose(0, 2, 1, 3).reshape(batch * num_kv_heads, steps, head_dim).astype(buffer.dtype)
    merged = merged.at[rows[:, None], slots].set(update, mode="promise_in_bounds")
    return merged.reshape(buffer.shape)
