"""The bottom of the sharding stack: what compiled code calls inside a `shard_map` over the mesh.

`Parallel` is the static description of the mesh axes a program runs on (a jit static, hashable);
the functions are the local sizes and the collectives of Megatron-style tensor parallelism. Every
function is the identity (no communication) when `parallel` is None or the `model` axis has one
shard. Nothing here knows a model, a weight kind or a loop (see `parallel.py` for the layout of
params on the mesh and `engine.py` for the programs).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

DATA, MODEL = "data", "model"


@dataclasses.dataclass(frozen=True)
class Parallel:
    """Static description of the mesh axes a sharded program runs on (hashable, a jit static)."""

    model_size: int
    model_axis: str = MODEL
    data_axis: str = DATA


def splits_model(parallel: Parallel | None) -> bool:
    """Whether there is anything to communicate over the model axis (a size-1 axis needs no collective)."""
    return parallel is not None and parallel.model_size > 1


def model_size(parallel: Parallel | None) -> int:
    return 1 if parallel is None else parallel.model_size


def per_shard(count: int, parallel: Parallel | None) -> int:
    return count // model_size(parallel)


def local_kv_heads(count: int, parallel: Parallel | None) -> int:
    """KV heads per shard: fewer KV heads than shards leaves one (repeated) head on each shard."""
    return max(count // model_size(parallel), 1)


def expert_slices(num_experts: int, parallel: Parallel | None) -> int:
    """Into how many column slices each expert's MLP is cut so that the (virtual) experts split evenly over
    the model shards: 1 when the experts do (expert parallelism), else `M / gcd(E, M)` (tensor parallelism
    inside the experts, e.g. 2 experts on 4 shards: each shard holds half of one expert's columns)."""
    m = model_size(parallel)
    return m // math.gcd(num_experts, m)


def local_experts(num_experts: int, parallel: Parallel | None) -> int:
    """The (virtual) experts each model shard holds."""
    return num_experts * expert_slices(num_experts, parallel) // model_size(parallel)


def padded_vocab(vocab_size: int, parallel: Parallel | None) -> int:
    """The vocabulary rounded up to a multiple of the model shards (the padding ids are never chosen)."""
    m = model_size(parallel)
    return -(-vocab_size // m) * m


def shard_index(parallel: Parallel) -> jax.Array:
    return lax.axis_index(parallel.model_axis)


def sum_over_model(x: jax.Array, parallel: Parallel | None) -> jax.Array:
    """Sum the partial products of a row-parallel projection (or a masked lookup) over the model shards."""
    return lax.psum(x, parallel.model_axis) if splits_model(parallel) else x


def any_on_any_device(flag: jax.Array, parallel: Parallel | None) -> jax.Array:
    """A scalar bool that is True if it is True on any device: a loop condition every shard agrees on
    (their collectives must pair up, so every shard runs the same number of iterations)."""
    if parallel is None:
        return flag
    return lax.pmax(flag.astype(jnp.int32), (parallel.data_axis, parallel.model_axis)) > 0


def mask_vocab_padding(logits: jax.Array, vocab_size: int, parallel: Parallel | None) -> jax.Array:
    """Local logits `[..., V_local]` with the padding ids (>= vocab_size) at -inf."""
    if not splits_model(parallel) or padded_vocab(vocab_size, parallel) == vocab_size:
        return logits
    ids = shard_index(parallel) * logits.shape[-1] + jnp.arange(logits.shape[-1])
    return jnp.where(ids < vocab_size, logits, -jnp.inf)


def argmax_tokens(logits: jax.Array, parallel: Parallel | None) -> jax.Array:
    """Greedy tokens int32 `[B]` from local logits `[B, V_local]`: per-shard max and index, then a
    cross-shard max and the smallest index holding it (the same tie rule as `jnp.argmax`)."""
    if not splits_model(parallel):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    best = jnp.max(logits, axis=-1)
    index = jnp.argmax(logits, axis=-1).astype(jnp.int32) + shard_index(parallel) * logits.shape[-1]
    top = lax.pmax(best, parallel.model_axis)
    return lax.pmin(jnp.where(best == top, index, jnp.iinfo(jnp.int32).max), parallel.model_axis)


def gather_vocab(logits: jax.Array, vocab_size: int, parallel: Parallel | None) -> jax.Array:
    """The full logits `[..., V]` on every shard (for sampling, which needs the whole distribution)."""
    if not splits_model(parallel):
        return logits[..., :vocab_size]
    full = lax.all_gather(logits, parallel.model_axis, axis=logits.ndim - 1, tiled=True)
    return full[..., :vocab_size]
