"""What the TPU and GPU kernels share: the row layout of the queries, the visible KV range, the split
heuristic and the combine of split-KV partial results.

Both kernels see one problem, "rows of queries against one KV head": decoding and prefill differ only
in how many rows there are and where they sit.

- The queries of one KV group become the rows of one matrix, `row = g * Tq + t` for query head
  `g` of the group and query `t` (GQA/MQA natively: each K/V tile is read once for the whole group).
  q `[B, Hq, Tq, D]` -> `[B * Hkv, R, D]` with `R = G * Tq` padded to the kernel's row block.
- Query `t` of batch row `b` sits at position `q_offset[b] + t`; keys `< kv_len[b]` exist.
  Decoding: `q_offset = lengths - Tq`, `kv_len = lengths`. Prefill: `q_offset = 0`, `kv_len = T`
  (or the row's length under right padding).
- A key at `k` is visible to a query at `p` if `k <= p`, `k < kv_len`, and with a window
  `k > p - window` or `k < sinks`.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax

MASKED = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite, so no inf - inf = NaN anywhere


@dataclasses.dataclass(frozen=True)
class Problem:
    """Static description of one attention call (hashable; a kernel is specialised on it)."""

    batch: int
    num_kv_heads: int
    group: int  # query heads per KV head
    q_len: int  # Tq: queries per head
    kv_capacity: int  # S: slots in the K/V arrays
    head_dim: int
    scale: float
    window: int | None
    sinks: int
    softcap: float | None
    has_alibi: bool

    @property
    def rows(self) -> int:
        return self.group * self.q_len


def triton_tileable(n: int) -> bool:
    """Whether a dimension can be a Triton tile: a power of two, at least `tl.dot`'s 16."""
    return n >= 16 and n & (n - 1) == 0


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def round_up(a: int, b: int) -> int:
    return cdiv(a, b) * b


def num_splits_heuristic(num_blocks: int, num_cores: int, num_kv_blocks: int, max_splits: int = 128) -> int:
    """FlashAttention-2's `num_splits_heuristic` with FlashAttention-3's "never split <= 4 KV blocks".

    `num_blocks` is the parallel work without splitting (batch x KV heads x row blocks). If it fills
    80% of the cores, splitting only adds a combine. Otherwise take the smallest split count whose wave
    efficiency `w / ceil(w)` (`w = num_blocks * s / num_cores`) is at least 85% of the best, skipping
    counts that give the same chunk size as one fewer split.
    """
    if num_blocks >= 0.8 * num_cores or num_kv_blocks <= 4:
        return 1
    max_splits = min(max_splits, num_cores, num_kv_blocks)

    def eligible(s: int) -> bool:
        return s == 1 or cdiv(num_kv_blocks, s) != cdiv(num_kv_blocks, s - 1)

    def efficiency(s: int) -> float:
        waves = num_blocks * s / num_cores
        return waves / math.ceil(waves)

    best = max(efficiency(s) for s in range(1, max_splits + 1) if eligible(s))
    return next(s for s in range(1, max_splits + 1) if eligible(s) and efficiency(s) >= 0.85 * best)


def row_inputs(q: jax.Array, alibi_slopes: jax.Array | None, problem: Problem, padded_rows: int):
    """What a kernel reads per row: the query rows `[B * Hkv, R_pad, D]`, each row's query index int32
    `[R_pad]` and its ALiBi slope float32 `[Hkv, R_pad]`."""
    return (
        query_rows(q, problem.num_kv_heads, padded_rows),
        row_query_index(problem, padded_rows),
        row_slopes(alibi_slopes, problem, padded_rows),
    )


def heads_output(out: jax.Array, lse: jax.Array, q: jax.Array) -> jax.Array:
    """A kernel's per-split outputs `[N, splits, R_pad, D]` (and lse `[N, splits, R_pad]`) -> the
    attention output `[B, Hq, Tq, D]` in q's dtype (one split needs no combine)."""
    merged = out[:, 0] if out.shape[1] == 1 else combine_splits(out, lse)
    batch, num_heads, q_len, _ = q.shape
    return rows_to_heads(merged.astype(q.dtype), batch, num_heads, q_len)


def query_rows(q: jax.Array, num_kv_heads: int, padded_rows: int) -> jax.Array:
    """q `[B, Hq, Tq, D]` -> `[B * Hkv, padded_rows, D]`, row `g * Tq + t`, zero padding rows."""
    batch, num_heads, q_len, head_dim = q.shape
    rows = q.reshape(batch * num_kv_heads, num_heads // num_kv_heads * q_len, head_dim)
    return jnp.pad(rows, ((0, 0), (0, padded_rows - rows.shape[1]), (0, 0)))


def rows_to_heads(rows: jax.Array, batch: int, num_heads: int, q_len: int) -> jax.Array:
    """Inverse of `query_rows`: `[B * Hkv, R_pad, D]` -> `[B, Hq, Tq, D]`."""
    num_kv_heads = rows.shape[0] // batch
    real = rows[:, : num_heads // num_kv_heads * q_len]
    return real.reshape(batch, num_heads, q_len, rows.shape[-1])


def row_query_index(problem: Problem, padded_rows: int) -> jax.Array:
    """int32 `[padded_rows]`: the query index t of each row; padding rows act as the last query."""
    t = jnp.arange(padded_rows, dtype=jnp.int32) % problem.q_len
    return jnp.where(jnp.arange(padded_rows) < problem.rows, t, problem.q_len - 1)


def row_slopes(alibi_slopes: jax.Array | None, problem: Problem, padded_rows: int) -> jax.Array:
    """float32 `[Hkv, padded_rows]`: the ALiBi slope of each row's query head (zeros without ALiBi)."""
    if alibi_slopes is None:
        return jnp.zeros((problem.num_kv_heads, padded_rows), jnp.float32)
    per_head = alibi_slopes.astype(jnp.float32).reshape(problem.num_kv_heads, problem.group)
    per_row = jnp.repeat(per_head, problem.q_len, axis=1)
    return jnp.pad(per_row, ((0, 0), (0, padded_rows - problem.rows)))


def visible_kv_blocks(problem: Problem, q_offset, kv_len, t_min, t_max, block_kv: int):
    """KV blocks a row block with queries `t_min..t_max` can see: `[0, sink_end)` and `[window_start, end)`.

    Traced int32 scalars in and out, so the same code serves index maps and kernels. (Division is
    `lax.div`, not `//`: all values are non-negative, and Mosaic TPU lowers `//`'s sign fix-up only
    when it knows the chip.)
    Without a window, `sink_end = 0` and `window_start = 0` (everything up to `end`).
    """
    end = jnp.maximum(jnp.minimum(kv_len, q_offset + t_max + 1), 0)
    end_block = lax.div(end + block_kv - 1, block_kv)
    if problem.window is None:
        return 0, 0, end_block
    first_key = jnp.maximum(q_offset + t_min - problem.window + 1, 0)
    sink_end = cdiv(problem.sinks, block_kv) if problem.sinks else 0
    return sink_end, lax.div(first_key, block_kv), end_block


def row_block_query_range(problem: Problem, row_block, block_rows: int):
    """The smallest and largest query index t among the real rows of a row block (traced scalars)."""
    first = row_block * block_rows
    last = jnp.minimum(first + block_rows, problem.rows) - 1
    same_head = lax.div(first, problem.q_len) == lax.div(last, problem.q_len)
    t_first, t_last = lax.rem(first, problem.q_len), lax.rem(last, problem.q_len)
    return jnp.where(same_head, t_first, 0), jnp.where(same_head, t_last, problem.q_len - 1)


def split_blocks(
    problem: Problem, q_offset, kv_len, row_block, split, blocks_per_split: int, block_rows: int, block_kv: int
):
    """The KV blocks a row block sees within a split, as `(kv_block(i), count)` for i in [0, count): first
    the sink blocks, then the window up to the length (`visible_kv_blocks`). For kernels that loop over a
    dynamic number of blocks (the GPU kernels) rather than over a grid axis (the TPU kernel)."""
    t_min, t_max = row_block_query_range(problem, row_block, block_rows)
    sink_end, window_start, end = visible_kv_blocks(problem, q_offset, kv_len, t_min, t_max, block_kv)
    split_lo = split * blocks_per_split
    split_hi = split_lo + blocks_per_split
    lo1, hi1 = split_lo, jnp.minimum(jnp.minimum(sink_end, split_hi), end)
    lo2 = jnp.maximum(jnp.maximum(window_start, sink_end), split_lo)
    hi2 = jnp.minimum(end, split_hi)
    count1 = jnp.maximum(hi1 - lo1, 0)
    count = count1 + jnp.maximum(hi2 - lo2, 0)

    def kv_block(i):
        return jnp.where(i < count1, lo1 + i, lo2 + i - count1)

    return kv_block, count


def scale_block(problem: Problem, scores, q_pos, key_pos, slope):
    """Scale, soft-cap and ALiBi one tile of raw scores (float32 `[rows, keys]`); q_pos int32 `[rows, 1]`,
    key_pos int32 `[1, keys]`, slope float32 `[rows, 1]`."""
    scores = scores * problem.scale
    if problem.softcap is not None:
        scores = jnp.tanh(scores / problem.softcap) * problem.softcap
    if problem.has_alibi:
        scores = scores + slope * (key_pos - q_pos).astype(jnp.float32)
    return scores


def score_block(problem: Problem, scores, q_pos, key_pos, kv_len, slope):
    """`scale_block`, then mask (kv_len int32, broadcastable to `[rows, 1]`). Returns the masked scores
    and the visibility mask."""
    scores = scale_block(problem, scores, q_pos, key_pos, slope)
    mask = (key_pos <= q_pos) & (key_pos < kv_len)
    if problem.window is not None:
        in_window = key_pos > q_pos - problem.window
        if problem.sinks:
            in_window = in_window | (key_pos < problem.sinks)
        mask = mask & in_window
    return jnp.where(mask, scores, MASKED), mask


def finish_rows(acc: jax.Array, m: jax.Array, total: jax.Array, out_dtype) -> tuple[jax.Array, jax.Array]:
    """A split's online-softmax state -> its output and log-sum-exp: acc float32 `[R, D]`, m and total
    float32 `[R, 1]` -> (`acc / total` in out_dtype, lse `[R, 1]`). A row that saw no key in this split
    (total 0) gives output 0 and lse -inf, so the combine ignores it."""
    seen = total > 0
    safe_total = jnp.where(seen, total, 1.0)
    out = (acc * jnp.where(seen, 1.0 / safe_total, 0.0)).astype(out_dtype)
    return out, jnp.where(seen, m + jnp.log(safe_total), -jnp.inf)


def combine_splits(out: jax.Array, lse: jax.Array) -> jax.Array:
    """Merge split-KV partials: out float32 `[N, splits, R, D]` (each normalised within its split),
    lse float32 `[N, splits, R]` (-inf for a split that saw no key) -> `[N, R, D]`.

    `o = sum_s exp(lse_s - M) o_s / sum_s exp(lse_s - M)` with `M = max_s lse_s`; rows whose splits are
    all empty (padding only) give 0, never NaN.
    """
    top = jnp.max(lse, axis=1, keepdims=True)
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    weights = jnp.exp(lse - top)  # exp(-inf) = 0 for empty splits
    total = jnp.sum(weights, axis=1)
    merged = jnp.einsum("nsr,nsrd->nrd", weights, out)
    return merged / jnp.where(total > 0, total, 1.0)[..., None]
