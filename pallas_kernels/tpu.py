"""The TPU kernel (Pallas on Mosaic TPU), also the kernel that interpret mode runs on CPU.

One `pallas_call` serves decoding (few rows, split-KV) and prefill (many row blocks, one split).
Grid `(batch x KV heads, row blocks, splits, KV blocks per split)`; the last axis is the online-softmax
reduction carried in VMEM scratch, the others are parallel (a megacore chip spreads them over its two
TensorCores). The rows and positions follow `common`.

KV blocks a row block cannot see (past its length, before its window, other than the sinks) are
skipped twice over: the kernel body does not run for them, and the K/V index map clamps them onto a
neighbouring visible block. Pallas only issues a DMA when a block index changes, so skipped blocks
cost neither compute nor HBM bandwidth.

Layout: K/V stay `[B * Hkv, S, D]` (a free reshape of the cache): a `(block_kv, D)` tile is a
contiguous slab, D is the lane dimension (full, so any head_dim lowers; 128 fills the lanes).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from . import common
from .common import Problem

_KV_BLOCKS = (512, 256, 128, 64, 32, 16)
_MAX_ROW_BLOCK = 128


def block_sizes(problem: Problem, dtype) -> tuple[int, int]:
    """(rows per block, keys per block). Rows pad to the sublane packing (8 rows of 32 bits)."""
    packing = 8 * (4 // jnp.dtype(dtype).itemsize)
    rows = common.round_up(problem.rows, packing)
    block_rows = rows if rows <= _MAX_ROW_BLOCK else _MAX_ROW_BLOCK
    block_kv = next((b for b in _KV_BLOCKS if problem.kv_capacity % b == 0), problem.kv_capacity)
    return block_rows, block_kv


def _visible_block(problem: Problem, q_offset, kv_len, row_block, block_rows, kv_block, block_kv):
    """Whether `kv_block` is visible to `row_block`, and the visible block to fetch in its place."""
    t_min, t_max = common.row_block_query_range(problem, row_block, block_rows)
    sink_end, window_start, end = common.visible_kv_blocks(problem, q_offset, kv_len, t_min, t_max, block_kv)
    visible = (kv_block < end) & ((kv_block < sink_end) | (kv_block >= window_start))
    # A skipped block maps onto the next block that will be fetched anyway (or the last visible one).
    in_gap = (kv_block >= sink_end) & (kv_block < window_start)
    fetch = jnp.where(in_gap, window_start, jnp.minimum(kv_block, end - 1))
    return visible, jnp.maximum(fetch, 0)


def _kernel(
    q_offset_ref,
    kv_len_ref,
    q_ref,
    row_t_ref,
    slope_ref,
    k_ref,
    v_ref,
    out_ref,
    lse_ref,
    m_scratch,
    l_scratch,
    acc_scratch,
    *,
    problem: Problem,
    block_rows: int,
    block_kv: int,
    blocks_per_split: int,
):
    n, row_block, split, step = (pl.program_id(i) for i in range(4))
    b = lax.div(n, problem.num_kv_heads)
    q_offset, kv_len = q_offset_ref[b], kv_len_ref[b]
    kv_block = split * blocks_per_split + step
    visible, _ = _visible_block(problem, q_offset, kv_len, row_block, block_rows, kv_block, block_kv)

    @pl.when(step == 0)
    def _init():
        m_scratch[...] = jnp.full(m_scratch.shape, common.MASKED, jnp.float32)
        l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
        acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

    @pl.when(visible)
    def _accumulate():
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        raw = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
        key_pos = kv_block * block_kv + lax.broadcasted_iota(jnp.int32, (1, block_kv), 1)
        q_pos = q_offset + row_t_ref[...]
        scores, mask = common.score_block(problem, raw, q_pos, key_pos, kv_len, slope_ref[...])
        m_prev = m_scratch[...]
        m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1, keepdims=True))
        # Masked keys get exactly zero weight, so a row that sees nothing keeps l = 0 (-> lse = -inf).
        p = jnp.where(mask, jnp.exp(scores - m_next), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_scratch[...] = alpha * l_scratch[...] + jnp.sum(p, axis=1, keepdims=True)
        pv = lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)
        acc_scratch[...] = alpha * acc_scratch[...] + pv
        m_scratch[...] = m_next

    @pl.when(step == blocks_per_split - 1)
    def _finish():
        out_ref[...], lse_ref[...] = common.finish_rows(acc_scratch[...], m_scratch[...], l_scratch[...], out_ref.dtype)


@functools.partial(jax.jit, static_argnames=("problem", "num_splits", "interpret"))
def attend_rows(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_offset: jax.Array,
    kv_len: jax.Array,
    alibi_slopes: jax.Array | None,
    *,
    problem: Problem,
    num_splits: int,
    interpret: bool,
) -> jax.Array:
    """q `[B, Hq, Tq, D]`, k/v `[B, Hkv, S, D]`, q_offset/kv_len int32 `[B]` -> `[B, Hq, Tq, D]`."""
    batch, head_dim = q.shape[0], q.shape[3]
    block_rows, block_kv = block_sizes(problem, q.dtype)
    padded_rows = common.round_up(problem.rows, block_rows)
    num_kv_blocks = common.cdiv(problem.kv_capacity, block_kv)
    blocks_per_split = common.cdiv(num_kv_blocks, num_splits)
    n = batch * problem.num_kv_heads

    rows, row_t, slopes = common.row_inputs(q, alibi_slopes, problem, padded_rows)
    kv_shape = (n, problem.kv_capacity, head_dim)

    def kv_index(n_, row_block, split, step, q_offset_ref, kv_len_ref):
        b = lax.div(n_, problem.num_kv_heads)
        kv_block = jnp.minimum(split * blocks_per_split + step, num_kv_blocks - 1)
        _, fetch = _visible_block(problem, q_offset_ref[b], kv_len_ref[b], row_block, block_rows, kv_block, block_kv)
        return n_, fetch, 0

    out_dtype = q.dtype if num_splits == 1 else jnp.float32
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(n, padded_rows // block_rows, num_splits, blocks_per_split),
        in_specs=[
            pl.BlockSpec((None, block_rows, head_dim), lambda n_, r, s, j, *_: (n_, r, 0)),
            pl.BlockSpec((block_rows, 1), lambda n_, r, s, j, *_: (r, 0)),
            pl.BlockSpec((None, block_rows, 1), lambda n_, r, s, j, *_: (lax.rem(n_, problem.num_kv_heads), r, 0)),
            pl.BlockSpec((None, block_kv, head_dim), kv_index),
            pl.BlockSpec((None, block_kv, head_dim), kv_index),
        ],
        out_specs=[
            pl.BlockSpec((None, None, block_rows, head_dim), lambda n_, r, s, j, *_: (n_, s, r, 0)),
            pl.BlockSpec((None, None, block_rows, 1), lambda n_, r, s, j, *_: (n_, s, r, 0)),
        ],
        scratch_shapes=[
            pltpu.VMEM((block_rows, 1), jnp.float32),
            pltpu.VMEM((block_rows, 1), jnp.float32),
            pltpu.VMEM((block_rows, head_dim), jnp.float32),
        ],
    )
    kernel = functools.partial(
        _kernel, problem=problem, block_rows=block_rows, block_kv=block_kv, blocks_per_split=blocks_per_split
    )
    out, lse = pl.pallas_call(
        kernel,
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((n, num_splits, padded_rows, head_dim), out_dtype),
            jax.ShapeDtypeStruct((n, num_splits, padded_rows, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="jaxdecode_attention",
    )(q_offset, kv_len, rows, row_t[:, None], slopes[..., None], k.reshape(kv_shape), v.reshape(kv_shape))
    return common.heads_output(out, lse[..., 0], q)
