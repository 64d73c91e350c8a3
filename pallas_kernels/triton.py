"""The CUDA kernel (Pallas on Triton), same problem and semantics as `tpu`: Ampere and newer (A100, L4, H100).

Grid `(batch x KV heads, row blocks, splits)`. A program loads its block of query rows (the GQA group of a
decode step, or a block of prefill rows) once, then walks only the KV blocks its rows can see within its
split (`common.split_blocks`: the sink blocks, then the window up to the row block's length). The trip count
is dynamic, so nothing past a row's length is read. Scores `q @ k^T` and `p @ v` are `tl.dot`s (tensor cores
for 16-bit inputs, full float32 for float32), the online softmax runs in registers; Triton pipelines the K/V
loads of the loop (`num_stages`).

K/V stay `[B * Hkv, S, D]` (a free reshape of the cache). S need not be a multiple of the KV block: loads past
the end are masked to zero (and those keys are masked out of the scores anyway). head_dim must be a power of
two (Triton tiles are) and at least 16 (`tl.dot`'s minimum); other head dims (Phi-3's 96) go to XLA under
`auto` (`supports`).

Block sizes fit the smallest shared memory of the three targets (L4, 101,376 bytes per block): the compile
checks build every configuration for H100, A100 and L4.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from . import common
from .common import Problem

NUM_WARPS = 4
NUM_STAGES = 2


_TILE_BYTES = 16384  # one K (or V) tile; with two pipeline stages of K and V that is 64 KiB of shared memory


def block_sizes(problem: Problem, dtype) -> tuple[int, int]:
    """(rows per block, keys per block): 16 rows for decoding (`tl.dot`'s smallest M; a GQA group of a step
    fits), 64 for prefill (32 with head_dim 256, whose float32 accumulator would not fit the registers);
    keys so that a K tile is 16 KiB at most (64 keys of bfloat16 at head_dim 128; 16 of float32 at 256),
    which keeps the pipelined tiles within an L4's 101,376 bytes of shared memory per block."""
    if problem.rows <= 16:
        block_rows = 16
    else:
        block_rows = 32 if problem.head_dim > 128 else 64
    block_kv = min(64, _TILE_BYTES // (problem.head_dim * jnp.dtype(dtype).itemsize))
    return block_rows, block_kv


def supports(problem: Problem, dtype) -> bool:
    floats = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
    return jnp.dtype(dtype) in floats and common.triton_tileable(problem.head_dim)


def _dot(a: jax.Array, b: jax.Array, trans_b: bool = False) -> jax.Array:
    # float32 inputs: full precision (Triton would otherwise use TF32, 10 mantissa bits).
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return plt.dot(a, b, trans_b=trans_b, precision=precision).astype(jnp.float32)


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
    *,
    problem: Problem,
    block_rows: int,
    block_kv: int,
    blocks_per_split: int,
):
    n, row_block, split = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    b = lax.div(n, problem.num_kv_heads)
    q_offset, kv_len = q_offset_ref[b], kv_len_ref[b]
    kv_block, count = common.split_blocks(
        problem, q_offset, kv_len, row_block, split, blocks_per_split, block_rows, block_kv
    )

    q = q_ref[...]
    q_pos = q_offset + row_t_ref[...][:, None]
    slope = slope_ref[...][:, None]
    key_iota = jnp.arange(block_kv, dtype=jnp.int32)

    def step(i, carry):
        acc, m_prev, l_prev = carry
        start = kv_block(i) * block_kv
        key_pos = start + key_iota
        in_cache = (key_pos < problem.kv_capacity)[:, None]
        k = plt.load(k_ref.at[pl.ds(start, block_kv), :], mask=in_cache, other=0.0)
        scores, mask = common.score_block(problem, _dot(q, k, trans_b=True), q_pos, key_pos[None, :], kv_len, slope)
        m_next = jnp.maximum(m_prev, jnp.max(scores, axis=1))
        # Masked keys get exactly zero weight, so a row that sees nothing keeps l = 0 (-> lse = -inf).
        p = jnp.where(mask, jnp.exp(scores - m_next[:, None]), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        v = plt.load(v_ref.at[pl.ds(start, block_kv), :], mask=in_cache, other=0.0)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_next, alpha * l_prev + jnp.sum(p, axis=1)

    acc = jnp.zeros((block_rows, problem.head_dim), jnp.float32)
    m = jnp.full((block_rows,), common.MASKED, jnp.float32)
    total = jnp.zeros((block_rows,), jnp.float32)
    acc, m, total = lax.fori_loop(0, count, step, (acc, m, total))

    out, lse = common.finish_rows(acc, m[:, None], total[:, None], out_ref.dtype)
    out_ref[...] = out
    lse_ref[...] = lse[:, 0]


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
    if not supports(problem, q.dtype):
        raise ValueError(
            f"the Triton kernel needs float inputs and a power-of-two head_dim >= 16; got {q.dtype}, head_dim "
            f"{problem.head_dim} (use backend='auto' to fall back to XLA)"
        )
    batch, head_dim = q.shape[0], q.shape[3]
    block_rows, block_kv = block_sizes(problem, q.dtype)
    padded_rows = common.round_up(problem.rows, block_rows)
    blocks_per_split = common.cdiv(common.cdiv(problem.kv_capacity, block_kv), num_splits)
    n = batch * problem.num_kv_heads
    rows, row_t, slopes = common.row_inputs(q, alibi_slopes, problem, padded_rows)
    kv_shape = (n, problem.kv_capacity, head_dim)
    out_dtype = q.dtype if num_splits == 1 else jnp.float32
    kernel = functools.partial(
        _kernel, problem=problem, block_rows=block_rows, block_kv=block_kv, blocks_per_split=blocks_per_split
    )
    out, lse = pl.pallas_call(
        kernel,
        grid=(n, padded_rows // block_rows, num_splits),
        in_specs=[
            pl.BlockSpec((batch,), lambda n_, r, s: (0,)),
            pl.BlockSpec((batch,), lambda n_, r, s: (0,)),
            pl.BlockSpec((None, block_rows, head_dim), lambda n_, r, s: (n_, r, 0)),
            pl.BlockSpec((block_rows,), lambda n_, r, s: (r,)),
            pl.BlockSpec((None, block_rows), lambda n_, r, s: (lax.rem(n_, problem.num_kv_heads), r)),
            pl.BlockSpec((None, problem.kv_capacity, head_dim), lambda n_, r, s: (n_, 0, 0)),
            pl.BlockSpec((None, problem.kv_capacity, head_dim), lambda n_, r, s: (n_, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, block_rows, head_dim), lambda n_, r, s: (n_, s, r, 0)),
            pl.BlockSpec((None, None, block_rows), lambda n_, r, s: (n_, s, r)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((n, num_splits, padded_rows, head_dim), out_dtype),
            jax.ShapeDtypeStruct((n, num_splits, padded_rows), jnp.float32),
        ],
        compiler_params=plt.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name="jaxdecode_attention_triton",
    )(q_offset, kv_len, rows, row_t, slopes, k.reshape(kv_shape), v.reshape(kv_shape))
    return common.heads_output(out, lse, q)
