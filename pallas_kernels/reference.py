"""XLA reference attention: the semantics every kernel must match, and the CPU path.

Scores and softmax are computed in float32 whatever the input dtype. A fully masked query row
(only possible for padding queries) gets a uniform distribution rather than NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

_MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)
_FEW_QUERIES = 64  # query rows per KV head (group x Tq) up to which decode-shaped dots are used


def _attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    kv_valid: jax.Array,
    *,
    scale: float,
    alibi_slopes: jax.Array | None,
    window: int | None,
    sinks: int,
    softcap: float | None,
) -> jax.Array:
    """q `[B, Hq, Tq, D]`, k/v `[B, Hkv, S, D]`, q_positions int32 `[B, Tq]`, kv_valid int32 `[B]`."""
    batch, num_heads, q_len, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    # One batch dimension (batch x kv-head) for the dots: all query heads of a KV group share its K/V
    # read, and no size-1 batch dim is left for XLA to squeeze (which made it copy the cache at batch 1).
    qg = q.reshape(batch * num_kv_heads, group * q_len, head_dim)
    kg = k.reshape(batch * num_kv_heads, kv_len, head_dim)
    vg = v.reshape(batch * num_kv_heads, kv_len, head_dim)
    if group * q_len <= _FEW_QUERIES:
        # Decode / verify: scores as K @ q^T ([N, S, G*Tq]). XLA's CPU dot reads K row-major contracted on
        # its last axis about 1.5x faster than in the q @ K^T form (8 x 3 KV heads x 1152 slots: 0.36 vs
        # 0.58 ms); with many queries (prefill) the transpose back costs more than that saves.
        scores = lax.dot_general(kg, qg, (((2,), (2,)), ((0,), (0,))), preferred_element_type=jnp.float32)
        scores = jnp.moveaxis(scores.reshape(batch, num_kv_heads, kv_len, group, q_len), 2, -1)
    else:
        scores = jnp.einsum("ntd,nsd->nts", qg, kg, preferred_element_type=jnp.float32)
        scores = scores.reshape(batch, num_kv_heads, group, q_len, kv_len)
    scores = scores * scale  # [B, Hkv, G, Tq, S]
    if softcap is not None:
        scores = jnp.tanh(scores / softcap) * softcap
    k_pos = jnp.arange(kv_len, dtype=jnp.int32)[None, None, :]  # [1, 1, S]
    qp = q_positions[:, :, None]  # [B, Tq, 1]
    if alibi_slopes is not None:
        slopes = alibi_slopes.astype(jnp.float32).reshape(1, num_kv_heads, group, 1, 1)
        scores = scores + slopes * (k_pos - qp).astype(jnp.float32)[:, None, None]
    mask = (k_pos <= qp) & (k_pos < kv_valid[:, None, None])
    if window is not None:
        in_window = k_pos > qp - window
        if sinks:
            in_window = in_window | (k_pos < sinks)
        mask = mask & in_window
    scores = jnp.where(mask[:, None, None], scores, _MASKED)
    probs = jax.nn.softmax(scores, axis=-1).reshape(batch * num_kv_heads, group * q_len, kv_len)
    out = jnp.einsum("nts,nsd->ntd", probs.astype(v.dtype), vg, preferred_element_type=jnp.float32)
    return out.reshape(batch, num_heads, q_len, head_dim).astype(q.dtype)


def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    scale: float | None = None,
    alibi_slopes: jax.Array | None = None,
    window: int | None = None,
    sinks: int = 0,
    softcap: float | None = None,
) -> jax.Array:
    """Attention of a few new queries against a KV cache.

    Args:
      q: `[B, Hq, Tq, D]`, the Tq newest positions of each row; the last sits at `lengths - 1`,
        and they are causal among themselves.
      k_cache, v_cache: `[B, Hkv, S, D]` with `Hq % Hkv == 0` (GQA, MQA when Hkv = 1).
      lengths: int32 `[B]`, valid cache entries per row, the Tq new ones included.
      scale: score scale, default `D ** -0.5`.
      alibi_slopes: float `[Hq]`; adds `slope * (key_pos - query_pos)` to the scores.
      window: a query at p sees keys in `(p - window, p]`; with `sinks`, keys `< sinks` stay visible.
      softcap: scores become `softcap * tanh(scores / softcap)`.

    Returns:
      `[B, Hq, Tq, D]` in q's dtype.
    """
    q_len = q.shape[2]
    q_positions = lengths[:, None] - q_len + jnp.arange(q_len, dtype=jnp.int32)[None, :]
    return _attend(
        q,
        k_cache,
        v_cache,
        q_positions,
        lengths,
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
        alibi_slopes=alibi_slopes,
        window=window,
        sinks=sinks,
        softcap=softcap,
    )


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    lengths: jax.Array | None = None,
    alibi_slopes: jax.Array | None = None,
    window: int | None = None,
    scale: float | None = None,
) -> jax.Array:
    """Prefill self-attention. q `[B, Hq, T, D]`, k/v `[B, Hkv, T, D]`; `lengths` int32 `[B]` masks
    keys at or past each row's length (right padding). Returns `[B, Hq, T, D]` in q's dtype."""
    batch, _, seq, _ = q.shape
    positions = jnp.arange(seq, dtype=jnp.int32)
    # Non-causal: every query sees every valid key, expressed as a query position past the end.
    q_positions = jnp.broadcast_to(positions if causal else jnp.full((seq,), seq, jnp.int32), (batch, seq))
    valid = jnp.full((batch,), seq, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    if not causal and (alibi_slopes is not None or window is not None):
        raise ValueError("alibi_slopes and window need causal=True (they are defined by query positions)")
    return _attend(
        q,
        k,
        v,
        q_positions,
        valid,
        scale=q.shape[-1] ** -0.5 if scale is None else scale,
        alibi_slopes=alibi_slopes,
        window=window,
        sinks=0,
        softcap=None,
    )
