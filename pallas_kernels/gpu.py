"""The GPU kernel (Pallas on Mosaic GPU, Hopper warpgroup MMA), same problem and semantics as `tpu`.

Grid `(batch x KV heads, row blocks, splits)`, one warpgroup per CUDA block. A block loads its 64 query
rows (the whole GQA group of a decode step, or 64 prefill rows) into shared memory once, then walks only
the KV blocks its rows can see (sink blocks, then the window up to its length, within its split): the
trip count is dynamic, so nothing past a row's length is read. K/V tiles arrive by TMA into two
shared-memory slots, the next tile's copy in flight while the current one is used (one slot for
head_dim > 128, which would not fit twice: `slots`). Scores
`q @ k^T` and `p @ v` run on the tensor cores (wgmma, M = 64), the online softmax in registers.

Constraints (else `supports` is False and the caller falls back to XLA): 16-bit inputs (wgmma has no
float32 operands), head_dim a multiple of 64 (128-byte swizzle) and S a multiple of 8 (TMA tiling). S
need not be a multiple of the KV block: a TMA read past the end of K/V fills zeros, and those keys are
masked anyway.

Checked here by lowering for CUDA (tests) and by testing `split_blocks` against brute force; its
arithmetic is `common.score_block` and the same online softmax as the TPU kernel, which interpret mode
tests. JAX 0.10.2's Mosaic GPU interpreter cannot run it (no transposed shared-memory operands, no
`layout_cast`), so it has not been executed without a Hopper GPU.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from . import common
from .common import Problem

BLOCK_ROWS = 64  # one warpgroup's wgmma M
BLOCK_KV = 64  # keys per K/V tile: the K of the p @ v wgmma, which must be a multiple of 64 for 16-bit inputs


def slots(problem: Problem) -> int:
    """K/V tiles in flight: two (the next tile's copy overlaps this one's math), or one for head_dim > 128.
    With head_dim 256 (Gemma) two slots of K and V, q and a float32 output tile need 234,552 bytes of shared
    memory, over an H100's 232,448 (the CUDA lowering refuses it); one slot needs 65,536 bytes less."""
    return 2 if problem.head_dim <= 128 else 1


def supports(problem: Problem, dtype) -> bool:
    return (
        jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        and problem.head_dim % 64 == 0
        and problem.kv_capacity % 8 == 0
    )


def _kernel(
    q_offset_ref,
    kv_len_ref,
    row_t_ref,
    slope_ref,
    q_ref,
    k_ref,
    v_ref,
    out_ref,
    lse_ref,
    q_smem,
    k_smem,
    v_smem,
    o_smem,
    lse_smem,
    row_t_smem,
    slope_smem,
    row_barriers,
    k_barriers,
    v_barriers,
    *,
    problem: Problem,
    blocks_per_split: int,
):
    n, row_block, split = lax.axis_index("n"), lax.axis_index("rows"), lax.axis_index("split")
    b = lax.div(n, problem.num_kv_heads)
    head = lax.rem(n, problem.num_kv_heads)
    q_offset, kv_len = q_offset_ref[b], kv_len_ref[b]
    row_start = row_block * BLOCK_ROWS

    kv_block, count = common.split_blocks(
        problem, q_offset, kv_len, row_block, split, blocks_per_split, BLOCK_ROWS, BLOCK_KV
    )

    def fetch(i, slot):
        rows = pl.ds(kv_block(i) * BLOCK_KV, BLOCK_KV)
        plgpu.copy_gmem_to_smem(k_ref.at[n, rows], k_smem.at[slot], k_barriers.at[slot])
        plgpu.copy_gmem_to_smem(v_ref.at[n, rows], v_smem.at[slot], v_barriers.at[slot])

    row_slice = pl.ds(row_start, BLOCK_ROWS)
    plgpu.copy_gmem_to_smem(q_ref.at[n, row_slice], q_smem, row_barriers.at[0])
    plgpu.copy_gmem_to_smem(row_t_ref.at[row_slice], row_t_smem, row_barriers.at[1])
    plgpu.copy_gmem_to_smem(slope_ref.at[head, row_slice], slope_smem, row_barriers.at[2])

    @pl.when(count > 0)
    def _():
        fetch(0, 0)

    row_layout = plgpu.Layout.WGMMA.reduce(1)
    tile = (BLOCK_ROWS, BLOCK_KV)
    key_iota = plgpu.broadcasted_iota(jnp.int32, tile, 1, layout=plgpu.Layout.WGMMA)
    for i in range(3):
        plgpu.barrier_wait(row_barriers.at[i])
    q_pos = lax.broadcast_in_dim(q_offset + plgpu.layout_cast(row_t_smem[...], row_layout), tile, [0])
    slope = lax.broadcast_in_dim(plgpu.layout_cast(slope_smem[...], row_layout), tile, [0])

    double_buffered = slots(problem) == 2

    def step(i, carry):
        acc, m_prev, l_prev = carry
        slot = lax.rem(i, slots(problem))

        if double_buffered:  # the other slot was consumed by step i - 1 (its wgmmas were waited for): refill it

            @pl.when(i + 1 < count)
            def _():
                fetch(i + 1, 1 - slot)

        plgpu.barrier_wait(k_barriers.at[slot])

        def qk(acc_ref):
            plgpu.wgmma(acc_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
            return acc_ref[...]

        raw = pl.run_scoped(qk, plgpu.ACC(tile, jnp.float32))
        key_pos = kv_block(i) * BLOCK_KV + key_iota
        scores, mask = common.score_block(problem, raw, q_pos, key_pos, kv_len, slope)
        m_next = jnp.maximum(m_prev, scores.max(axis=1))
        p = jnp.where(mask, jnp.exp(scores - lax.broadcast_in_dim(m_next, tile, [0])), 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_next = alpha * l_prev + p.sum(axis=1)
        plgpu.barrier_wait(v_barriers.at[slot])

        def pv(acc_ref):
            plgpu.wgmma(acc_ref, p.astype(v_smem.dtype), v_smem.at[slot])
            return acc_ref[...]

        pv_block = pl.run_scoped(pv, plgpu.ACC((BLOCK_ROWS, problem.head_dim), jnp.float32))
        if not double_buffered:  # the one slot is free once this step's wgmmas are done: load the next tile

            @pl.when(i + 1 < count)
            def _():
                fetch(i + 1, 0)

        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0]) + pv_block
        return acc, m_next, l_next

    acc = plgpu.layout_cast(jnp.zeros((BLOCK_ROWS, problem.head_dim), jnp.float32), plgpu.Layout.WGMMA)
    m = plgpu.layout_cast(jnp.full((BLOCK_ROWS,), common.MASKED, jnp.float32), row_layout)
    total = plgpu.layout_cast(jnp.zeros((BLOCK_ROWS,), jnp.float32), row_layout)
    acc, m, total = lax.fori_loop(0, count, step, (acc, m, total))

    seen = total > 0  # a row that saw no key in this split: output 0, lse -inf
    safe_total = jnp.where(seen, total, 1.0)
    o_smem[...] = (acc * lax.broadcast_in_dim(jnp.where(seen, 1.0 / safe_total, 0.0), acc.shape, [0])).astype(
        o_smem.dtype
    )
    lse_smem[...] = jnp.where(seen, m + jnp.log(safe_total), -jnp.inf)
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, out_ref.at[n, split, pl.ds(row_start, BLOCK_ROWS)])
    plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[n, split, pl.ds(row_start, BLOCK_ROWS)])
    plgpu.wait_smem_to_gmem(0)


@functools.partial(jax.jit, static_argnames=("problem", "num_splits"))
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
) -> jax.Array:
    """q `[B, Hq, Tq, D]`, k/v `[B, Hkv, S, D]`, q_offset/kv_len int32 `[B]` -> `[B, Hq, Tq, D]`."""
    if not supports(problem, q.dtype):
        raise ValueError(
            f"the Mosaic GPU kernel needs bfloat16/float16 inputs, head_dim % 64 == 0 and S % 8 == 0; got "
            f"{q.dtype}, head_dim {problem.head_dim}, S {problem.kv_capacity} (use backend='auto' to fall back to XLA)"
        )
    batch, head_dim = q.shape[0], q.shape[3]
    padded_rows = common.round_up(problem.rows, BLOCK_ROWS)
    blocks_per_split = common.cdiv(common.cdiv(problem.kv_capacity, BLOCK_KV), num_splits)
    n = batch * problem.num_kv_heads
    out_dtype = q.dtype if num_splits == 1 else jnp.float32
    swizzled = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    kernel = plgpu.kernel(
        functools.partial(_kernel, problem=problem, blocks_per_split=blocks_per_split),
        out_type=[
            jax.ShapeDtypeStruct((n, num_splits, padded_rows, head_dim), out_dtype),
            jax.ShapeDtypeStruct((n, num_splits, padded_rows), jnp.float32),
        ],
        scratch_types=[
            plgpu.SMEM((BLOCK_ROWS, head_dim), q.dtype, transforms=swizzled),
            plgpu.SMEM((slots(problem), BLOCK_KV, head_dim), k.dtype, transforms=swizzled),
            plgpu.SMEM((slots(problem), BLOCK_KV, head_dim), v.dtype, transforms=swizzled),
            plgpu.SMEM((BLOCK_ROWS, head_dim), out_dtype),
            plgpu.SMEM((BLOCK_ROWS,), jnp.float32),
            plgpu.SMEM((BLOCK_ROWS,), jnp.int32),
            plgpu.SMEM((BLOCK_ROWS,), jnp.float32),
            plgpu.Barrier(num_barriers=3),
            plgpu.Barrier(num_barriers=slots(problem)),
            plgpu.Barrier(num_barriers=slots(problem)),
        ],
        grid=(n, padded_rows // BLOCK_ROWS, num_splits),
        grid_names=("n", "rows", "split"),
        compiler_params=plgpu.CompilerParams(approx_math=True),
    )
    rows, row_t, slopes = common.row_inputs(q, alibi_slopes, problem, padded_rows)
    kv_shape = (n, problem.kv_capacity, head_dim)
    out, lse = kernel(q_offset, kv_len, row_t, slopes, rows, k.reshape(kv_shape), v.reshape(kv_shape))
    return common.heads_output(out, lse, q)
