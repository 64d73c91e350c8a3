"""The one attention dispatch seam of the model.

Every attention call of every family goes through `prefill_attention` (causal self-attention among
new tokens, no cache read) or `cached_attention` (a few new queries against the KV cache). Today the
only implementation is XLA (`pallas_kernels.reference`); Pallas kernels plug in here, chosen by the
static `impl` name, without the model changing.
"""

from __future__ import annotations

import jax

import pallas_kernels

IMPLEMENTATIONS = ("xla",)


def _check(impl: str) -> None:
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {impl!r}; available: {', '.join(IMPLEMENTATIONS)}")


def prefill_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    alibi_slopes: jax.Array | None = None,
    window: int | None = None,
    impl: str = "xla",
) -> jax.Array:
    """Causal attention among T new tokens. q `[B, Hq, T, D]`, k/v `[B, Hkv, T, D]` -> `[B, Hq, T, D]`.

    Right padding needs no mask: a valid query never sees a later (padding) key.
    """
    _check(impl)
    return pallas_kernels.flash_attention(q, k, v, causal=True, alibi_slopes=alibi_slopes, window=window, scale=scale)


def cached_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    scale: float,
    alibi_slopes: jax.Array | None = None,
    window: int | None = None,
    sinks: int = 0,
    impl: str = "xla",
) -> jax.Array:
    """Tq new queries `[B, Hq, Tq, D]` against the cache `[B, Hkv, S, D]`; the last query of row b sits
    at `lengths[b] - 1`. Returns `[B, Hq, Tq, D]`."""
    _check(impl)
    return pallas_kernels.decode_attention(
        q, k_cache, v_cache, lengths, scale=scale, alibi_slopes=alibi_slopes, window=window, sinks=sinks
    )
