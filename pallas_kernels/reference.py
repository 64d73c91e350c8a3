"""XLA attention: the semantics every kernel must match, and the CPU path.

Scores and softmax are computed in float32 whatever the input dtype; the T x S score matrix is
materialised (fine for XLA on CPU at decode and short-prompt sizes; the kernels tile it), except in
long causal prefill, which is tiled here too (`causal_prefill`).
A fully masked query row (only possible for padding queries) gets a uniform distribution, not NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from .common import MASKED, Problem, cdiv, round_up, scale_block, score_block

_PREFILL_ONE_PIECE = 512  # the longest prompt whose causal prefill is one `attend` (no blocked loop)
_PREFILL_BLOCK_KV = 512  # keys per causal-prefill block
_PREFILL_TILE_ROWS = 2304  # query rows (batch x heads x queries) per causal-prefill block
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
    """Causal prefill of T queries at positions 0..T-1 (q `[B, Hq, T, D]`, k/v `[B, Hkv, T, D]`).

    Up to `_PREFILL_ONE_PIECE` queries go through `attend` in one piece. Longer prompts take the
    FlashAttention-2 loop in XLA: a `lax.map` over query blocks, each a `fori_loop` over only the key
    blocks it can see (causal, and from the window's start), with an online softmax. No score tile
    bigger than one block pair exists, so memory stays flat in T, and the loop compiles once per layer
    whatever T is. Materialised T x S scores cost more than their arithmetic on XLA's CPU backend
    (writing fresh tens-of-MB buffers): at 4096 tokens (SmolLM2's 9 x 3 heads, AMD EPYC, 2 cores) the
    512-row chunks this replaced took 670-750 ms a layer alone, these blocks 260-300 ms, torch's SDPA
    230 ms; the whole prefill went from 0.74x to 0.94x HF transformers' (README, "Long prompts").
    """
    steps = problem.q_len
    if steps <= _PREFILL_ONE_PIECE:
        q_positions = jnp.broadcast_to(jnp.arange(steps, dtype=jnp.int32), (problem.batch, steps))
        return attend(q, k, v, q_positions, kv_len, problem, alibi_slopes)
    batch, num_kv_heads, group, head_dim = problem.batch, problem.num_kv_heads, problem.group, problem.head_dim
    n = batch * num_kv_heads
    # About _PREFILL_TILE_ROWS query rows (all batch rows and heads together) per block: the score tile
    # stays a few MB whatever the batch and GQA group.
    block_q = min(_PREFILL_ONE_PIECE, max(16, round_up(_PREFILL_TILE_ROWS // (n * group), 16)))
    num_q_blocks = cdiv(steps, block_q)
    padded_q, padded_kv = num_q_blocks * block_q, round_up(steps, _PREFILL_BLOCK_KV)
    rows = group * block_q

    def pad(x, length):
        return jnp.pad(x, ((0, 0), (0, 0), (0, length - steps), (0, 0)))

    # Keys and values as [B*Hkv, S, D]; queries as [blocks, B*Hkv, G*block_q, D] (rows ordered (g, t)).
    k, v = (pad(x, padded_kv).reshape(n, padded_kv, head_dim) for x in (k, v))
    q_blocks = pad(q, padded_q).reshape(batch, num_kv_heads, group, num_q_blocks, block_q, head_dim)
    q_blocks = q_blocks.transpose(3, 0, 1, 2, 4, 5).reshape(num_q_blocks, n, rows, head_dim)
    kv_valid = jnp.repeat(kv_len.astype(jnp.int32), num_kv_heads)[:, None, None]  # [n, 1, 1]
    row_offset = jnp.tile(jnp.arange(block_q, dtype=jnp.int32), group)[None, :, None]  # [1, rows, 1]
    slope = None
    if alibi_slopes is not None:  # per query row: [n, rows, 1]
        slope = jnp.repeat(alibi_slopes.astype(jnp.float32).reshape(num_kv_heads, group), block_q, axis=1)
        slope = jnp.tile(slope, (batch, 1))[:, :, None]

    def query_block(args):
        index, q_block = args
        first = index * block_q
        last = first + block_q - 1
        q_pos = first + row_offset
        # Key blocks [lo, hi) are visible to some query of this block; those in [full_lo, full_hi) to
        # every one of them (all keys causal and in the window), which need no mask: about 10% of the
        # prefill at 4096 tokens. (Skipping the length mask there changes only padding queries.)
        lo, full_lo, full_hi = 0, 0, (first + 1) // _PREFILL_BLOCK_KV
        if problem.window is not None:
            full_lo = cdiv(jnp.maximum(last - problem.window + 1, 0), _PREFILL_BLOCK_KV)
            if not problem.sinks:
                lo = jnp.maximum(first - problem.window + 1, 0) // _PREFILL_BLOCK_KV
        full_lo = jnp.minimum(full_lo, full_hi)
        hi = last // _PREFILL_BLOCK_KV + 1

        def key_block(j, carry, masked=True):
            m, total, acc = carry
            keys = lax.dynamic_slice_in_dim(k, j * _PREFILL_BLOCK_KV, _PREFILL_BLOCK_KV, axis=1)
            values = lax.dynamic_slice_in_dim(v, j * _PREFILL_BLOCK_KV, _PREFILL_BLOCK_KV, axis=1)
            scores = jnp.einsum("nrd,nsd->nrs", q_block, keys, preferred_element_type=jnp.float32)
            key_pos = j * _PREFILL_BLOCK_KV + jnp.arange(_PREFILL_BLOCK_KV, dtype=jnp.int32)[None, None, :]
            if masked:
                scores, _ = score_block(problem, scores, q_pos, key_pos, kv_valid, slope)
            else:
                scores = scale_block(problem, scores, q_pos, key_pos, slope)
            m_new = jnp.maximum(m, scores.max(axis=-1, keepdims=True))
            probs = jnp.exp(scores - m_new)
            rescale = jnp.exp(m - m_new)
            total = total * rescale + probs.sum(axis=-1, keepdims=True)
            pv = jnp.einsum("nrs,nsd->nrd", probs.astype(v.dtype), values, preferred_element_type=jnp.float32)
            return m_new, total, acc * rescale + pv

        carry = (
            jnp.full((n, rows, 1), -jnp.inf, jnp.float32),
            jnp.zeros((n, rows, 1), jnp.float32),
            jnp.zeros((n, rows, head_dim), jnp.float32),
        )
        carry = lax.fori_loop(lo, full_lo, key_block, carry)
        carry = lax.fori_loop(full_lo, full_hi, lambda j, c: key_block(j, c, masked=False), carry)
        _, total, acc = lax.fori_loop(full_hi, hi, key_block, carry)  # lo <= full_hi
        return (acc / total).astype(q.dtype)  # every row sees at least one (possibly masked) key: total > 0

    out = lax.map(query_block, (jnp.arange(num_q_blocks, dtype=jnp.int32), q_blocks))
    out = out.reshape(num_q_blocks, batch, num_kv_heads, group, block_q, head_dim).transpose(1, 2, 3, 0, 4, 5)
    return out.reshape(batch, num_kv_heads * group, padded_q, head_dim)[:, :, :steps]
