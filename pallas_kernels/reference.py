"""XLA attention: the semantics every kernel must match, and the CPU path.

Scores and softmax are computed in float32 whatever the input dtype; the T x S score matrix is
materialised (fine for XLA on CPU, which fuses it well at these sizes; the kernels tile it).
A fully masked query row (only possible for padding queries) gets a uniform distribution, not NaN.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from .common import MASKED, Problem

_PREFILL_CHUNK = 512  # query rows per causal-prefill chunk (longer prompts are split)
_FEW_QUERIES = 64  # query rows per KV head (group x Tq) up to which decode-shaped dots are used


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    kv_valid: jax.Array,
    problem: Problem,
    alibi_slopes: jax.Array | None,
) -> jax.Array:
    """q `[B, Hq, Tq, D]`, k/v `[B, Hkv, S, D]`, q_positions int32 `[B, Tq]`, kv_valid int32 `[B]`."""
    scale, window, sinks, softcap = problem.scale, problem.window, problem.sinks, problem.softcap
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
    scores = jnp.where(mask[:, None, None], scores, MASKED)
    probs = jax.nn.softmax(scores, axis=-1).reshape(batch * num_kv_heads, group * q_len, kv_len)
    out = jnp.einsum("nts,nsd->ntd", probs.astype(v.dtype), vg, preferred_element_type=jnp.float32)
    return out.reshape(batch, num_heads, q_len, head_dim).astype(q.dtype)


def causal_prefill(q, k, v, kv_len, alibi_slopes, problem: Problem) -> jax.Array:
    """Causal prefill of T queries at positions 0..T-1 (q `[B, Hq, T, D]`, k/v `[B, Hkv, T, D]`), in
    query chunks of `_PREFILL_CHUNK`, each against the keys up to its end: the upper triangle of the
    score matrix is never computed and at most `_PREFILL_CHUNK x T` scores exist at a time (the whole
    T x T matrix made XLA's CPU prefill 3x slower per token at 4k tokens than at 128)."""
    outputs = []
    for start in range(0, problem.q_len, _PREFILL_CHUNK):
        stop = min(start + _PREFILL_CHUNK, problem.q_len)
        chunk = dataclasses.replace(problem, q_len=stop - start, kv_capacity=stop)
        q_positions = jnp.broadcast_to(jnp.arange(start, stop, dtype=jnp.int32), (problem.batch, stop - start))
        keys, values = k[:, :, :stop], v[:, :, :stop]
        outputs.append(attend(q[:, :, start:stop], keys, values, q_positions, kv_len, chunk, alibi_slopes))
    return jnp.concatenate(outputs, axis=2)
