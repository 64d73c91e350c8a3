"""Our peers: the Pallas attention kernels JAX itself ships (`jax.experimental.pallas.ops`), behind the same
problem and semantics, as backend "jax-ops" ("interpret-jax-ops" in interpret mode).

- decoding on CUDA: `ops.gpu.decode_attention.gqa`, a Triton split-K GQA decode with ragged lengths;
- prefill on CUDA: `ops.gpu.attention.mha`, Triton FlashAttention (causal; ragged lengths as segment ids).

They cover less than ours (`supports`): one query per row when decoding (no speculative verify block), no
ALiBi, no window or sinks, no softcap, 16-bit inputs only (in float32 their blocks overflow shared memory),
and `mha` has no GQA (K/V heads are repeated for it, a copy of K/V).
JAX's TPU kernels (`ops.tpu.flash_attention`, `splash_attention`, `ragged_paged_attention`) are not here:
the first two have no GQA and no ragged lengths in our layout, the third reads a paged cache, and none runs
in interpret mode on a CPU in jax 0.10.2, so none could be checked here against the float64 reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as gpu_attention
from jax.experimental.pallas.ops.gpu import decode_attention as gpu_decode

from .common import Problem, triton_tileable

_SPLITS = (16, 8, 4, 2, 1)
_PREFILL_BLOCK = 128  # mha's default block_q / block_k


def _decode_splits(capacity: int) -> int | None:
    """A k_splits `gqa` accepts: S splits evenly into chunks of >= 16 keys, each a whole number of blocks."""
    for splits in _SPLITS:
        chunk = capacity // splits
        if capacity % splits == 0 and chunk >= 16 and chunk % min(128, chunk) == 0 and triton_tileable(min(128, chunk)):
            return splits
    return None


def supports(problem: Problem, dtype, prefill: bool) -> bool:
    plain = problem.window is None and problem.softcap is None and not problem.has_alibi
    # 16-bit inputs only: with float32 their default blocks exceed a GPU's shared memory (the compile checks:
    # prefill on H100, A100 and L4, e.g. 262,656 > 232,448 bytes on the H100; decode at 4k context on the L4).
    sixteen_bit = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    common_ok = plain and triton_tileable(problem.head_dim) and sixteen_bit
    if prefill:
        seq = problem.kv_capacity
        return common_ok and (seq % _PREFILL_BLOCK == 0 or (seq < _PREFILL_BLOCK and triton_tileable(seq)))
    return common_ok and problem.q_len == 1 and _decode_splits(problem.kv_capacity) is not None


def decode(q, k, v, kv_len, problem: Problem, interpret: bool) -> jax.Array:
    """q `[B, Hq, 1, D]`, k/v `[B, Hkv, S, D]`, kv_len int32 `[B]` -> `[B, Hq, 1, D]`."""
    out = gpu_decode.gqa(
        q[:, :, 0],
        jnp.swapaxes(k, 1, 2),  # gqa takes [B, S, Hkv, D] (and swaps back inside: XLA folds the two)
        jnp.swapaxes(v, 1, 2),
        kv_seq_len=kv_len,
        sm_scale=problem.scale,
        k_splits=_decode_splits(problem.kv_capacity),
        interpret=interpret,
    )
    return out[:, :, None].astype(q.dtype)


def prefill(q, k, v, kv_len, problem: Problem, interpret: bool) -> jax.Array:
    """Causal prefill: q `[B, Hq, T, D]`, k/v `[B, Hkv, T, D]`, kv_len int32 `[B]` -> `[B, Hq, T, D]`."""
    seq = q.shape[2]
    repeat = problem.group
    k, v = (jnp.repeat(x, repeat, axis=1) if repeat > 1 else x for x in (k, v))
    # Keys at or past a row's length form another segment than the real tokens (their queries are padding).
    segments = (jnp.arange(seq)[None, :] < kv_len[:, None]).astype(jnp.int32)
    out = gpu_attention.mha(
        *(jnp.swapaxes(x, 1, 2) for x in (q, k, v)),
        segments,
        sm_scale=problem.scale,
        causal=True,
        interpret=interpret,
    )
    return jnp.swapaxes(out, 1, 2).astype(q.dtype)
