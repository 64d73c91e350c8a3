"""The two public entry points and the choice of backend.

Backends:
- "auto": chosen per *lowering platform* with `lax.platform_dependent`, so one traced function lowers
  to the Mosaic TPU kernel for `tpu`, the Triton kernel for `cuda` (XLA where it does not apply: a
  head_dim that is not a power of two) and XLA elsewhere (CPU).
- "xla": the reference implementation (`reference.py`).
- "tpu": the Mosaic TPU kernel; "triton": the Triton kernel (Ampere and newer); "mosaic-gpu": the
  Hopper-only Mosaic GPU kernel, by name only (see `gpu.py` and the README). Each lowers only for its
  own platform.
- "jax-ops": the kernels JAX ships (`jax_ops.py`: Triton decode and prefill on CUDA), our peers, where
  their features cover the call (else a ValueError naming what they lack).
- "interpret-tpu" (alias "interpret"), "interpret-triton", "interpret-jax-ops": that kernel in Pallas
  interpret mode; runs anywhere, slowly (the numerics tests on CPU).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from . import common, gpu, jax_ops, reference, tpu, triton
from .common import Problem

BACKENDS = (
    "auto",
    "xla",
    "tpu",
    "triton",
    "mosaic-gpu",
    "jax-ops",
    "interpret-tpu",
    "interpret-triton",
    "interpret-jax-ops",
    "interpret",
)
_ALIASES = {"interpret": "interpret-tpu"}
_H100_SMS = 132  # CUDA cores count for the split heuristic when lowering for a GPU we cannot query


def _num_cores(platform: str) -> int:
    """Parallel units a split can occupy: SMs on a GPU, TensorCores on a TPU chip (2 on megacore v4/v5p).

    Read from the device when the default backend is that platform; otherwise (lowering for another
    platform) an H100's 132 SMs or one TensorCore.
    """
    if jax.default_backend() == platform:
        device = jax.devices()[0]
        return int(getattr(device, "core_count", None) or getattr(device, "num_cores", None) or 1)
    return _H100_SMS if platform == "gpu" else 1


def mosaic_gpu_runs_here() -> bool:
    """The Mosaic GPU kernel uses Hopper's wgmma (sm_90): on a present GPU of another generation it cannot
    run. When lowering for CUDA from a machine without a GPU, assume a Hopper target."""
    if jax.default_backend() != "gpu":
        return True
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9.")


def _kernel_of(backend: str) -> str:
    """The kernel a backend runs: "tpu", "triton" or "mosaic-gpu"."""
    return backend.removeprefix("interpret-")


def default_num_splits(problem: Problem, backend: str, dtype) -> int:
    """The split heuristic (`common.num_splits_heuristic`) with the backend's block sizes and cores."""
    kernel = _kernel_of(_ALIASES.get(backend, backend))
    if kernel == "mosaic-gpu":
        block_rows, block_kv, cores = gpu.BLOCK_ROWS, gpu.BLOCK_KV, _num_cores("gpu")
    elif kernel == "triton":
        (block_rows, block_kv), cores = triton.block_sizes(problem, dtype), _num_cores("gpu")
    else:
        (block_rows, block_kv), cores = tpu.block_sizes(problem, dtype), _num_cores("tpu")
    work = problem.batch * problem.num_kv_heads * common.cdiv(problem.rows, block_rows)
    return common.num_splits_heuristic(work, cores, common.cdiv(problem.kv_capacity, block_kv))


def _attend(
    q,
    k,
    v,
    q_offset,
    kv_len,
    alibi_slopes,
    problem: Problem,
    num_splits: int | None,
    backend: str,
    causal_prefill: bool = False,
):
    def kernel(name: str):
        def run(q, k, v, q_offset, kv_len, alibi_slopes):
            splits = default_num_splits(problem, name, q.dtype) if num_splits is None else num_splits
            rows = (q, k, v, q_offset, kv_len, alibi_slopes)
            if name == "mosaic-gpu":
                return gpu.attend_rows(*rows, problem=problem, num_splits=splits)
            attend_rows = triton.attend_rows if _kernel_of(name) == "triton" else tpu.attend_rows
            return attend_rows(*rows, problem=problem, num_splits=splits, interpret=name.startswith("interpret"))

        return run

    def xla(q, k, v, q_offset, kv_len, alibi_slopes):
        if causal_prefill:
            return reference.causal_prefill(q, k, v, kv_len, alibi_slopes, problem)
        q_positions = q_offset[:, None] + jnp.arange(problem.q_len, dtype=jnp.int32)[None, :]
        return reference.attend(q, k, v, q_positions, kv_len, problem, alibi_slopes)

    args = (q, k, v, q_offset, kv_len, alibi_slopes)
    if _kernel_of(backend) == "jax-ops":
        if not jax_ops.supports(problem, q.dtype, causal_prefill):
            raise ValueError(
                "JAX's own kernels (backend='jax-ops') cover causal prefill and one-query decoding without ALiBi, "
                f"window or softcap, in bfloat16/float16 with a power-of-two head_dim; this call is {q.dtype} "
                f"{problem}"
            )
        attend = jax_ops.prefill if causal_prefill else jax_ops.decode
        return attend(q, k, v, kv_len, problem, interpret=backend.startswith("interpret"))
    if backend == "auto":
        cuda = kernel("triton") if triton.supports(problem, q.dtype) else xla
        return lax.platform_dependent(*args, tpu=kernel("tpu"), cuda=cuda, default=xla)
    return (xla if backend == "xla" else kernel(backend))(*args)


def _problem(q, k, *, scale, window, sinks, softcap, alibi_slopes) -> Problem:
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k/v must be [B, H, T, D]; got q {q.shape}, k {k.shape}")
    batch, num_heads, q_len, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim or num_heads % k.shape[1]:
        raise ValueError(
            f"k/v {k.shape} do not fit q {q.shape}: need the same batch and head_dim, and Hq divisible by Hkv"
        )
    if alibi_slopes is not None and alibi_slopes.shape != (num_heads,):
        raise ValueError(f"alibi_slopes must be [Hq] = [{num_heads}], got {alibi_slopes.shape}")
    if window is not None and window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    return Problem(
        batch=batch,
        num_kv_heads=k.shape[1],
        group=num_heads // k.shape[1],
        q_len=q_len,
        kv_capacity=k.shape[2],
        head_dim=head_dim,
        scale=float(head_dim**-0.5 if scale is None else scale),
        window=window,
        sinks=int(sinks) if window is not None else 0,
        softcap=softcap,
        has_alibi=alibi_slopes is not None,
    )


def _check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    return _ALIASES.get(backend, backend)


@functools.partial(jax.jit, static_argnames=("num_splits", "scale", "window", "sinks", "softcap", "backend"))
def decode_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    lengths: jax.Array,
    *,
    num_splits: int | None = None,
    scale: float | None = None,
    alibi_slopes: jax.Array | None = None,
    window: int | None = None,
    sinks: int = 0,
    softcap: float | None = None,
    backend: str = "auto",
) -> jax.Array:
    """Split-KV (Flash-Decoding) attention of a few new queries against a KV cache.

    Args:
      q: `[B, Hq, Tq, D]`, the Tq newest positions of each row (1 for decoding, up to 16 for a
        speculative verify); the last sits at `lengths - 1` and they are causal among themselves.
      k_cache, v_cache: `[B, Hkv, S, D]`, `Hq % Hkv == 0` (GQA; MQA when Hkv = 1).
      lengths: int32 `[B]`, valid cache entries per row including the Tq new ones (1..S).
      num_splits: KV chunks per (row, KV head) run in parallel then combined; None picks by the
        FlashAttention-2 heuristic from batch, heads, length and the device (`default_num_splits`).
      scale: score scale, default `D ** -0.5`.
      alibi_slopes: float `[Hq]`; adds `slope * (key_pos - query_pos)` in the kernel.
      window: a query at p sees keys in `(p - window, p]`; with `sinks`, keys `< sinks` stay visible
        (the StreamingLLM view). `sinks` is ignored without a window.
      softcap: scores become `softcap * tanh(scores / softcap)`.
      backend: see `BACKENDS` in this module.

    Returns:
      `[B, Hq, Tq, D]` in q's dtype.
    """
    backend = _check_backend(backend)
    problem = _problem(q, k_cache, scale=scale, window=window, sinks=sinks, softcap=softcap, alibi_slopes=alibi_slopes)
    if num_splits is not None and num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    lengths = lengths.astype(jnp.int32)
    return _attend(q, k_cache, v_cache, lengths - problem.q_len, lengths, alibi_slopes, problem, num_splits, backend)


@functools.partial(jax.jit, static_argnames=("causal", "window", "scale", "softcap", "backend"))
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
    softcap: float | None = None,
    backend: str = "auto",
) -> jax.Array:
    """Prefill attention, tiled with an online softmax (no T x T score matrix), GQA/MQA native.

    q `[B, Hq, T, D]`, k/v `[B, Hkv, T, D]`; `lengths` int32 `[B]` hides keys at or past each row's
    length (right padding). ALiBi slopes `[Hq]` and `window` as in `decode_attention` (causal only);
    `softcap` as there.
    Returns `[B, Hq, T, D]` in q's dtype.
    """
    backend = _check_backend(backend)
    if not causal and (alibi_slopes is not None or window is not None):
        raise ValueError("alibi_slopes and window need causal=True (they are defined by query positions)")
    if k.shape[2] != q.shape[2]:
        raise ValueError(f"prefill needs as many keys as queries; got q {q.shape}, k {k.shape}")
    problem = _problem(q, k, scale=scale, window=window, sinks=0, softcap=softcap, alibi_slopes=alibi_slopes)
    batch, _, seq, _ = q.shape
    kv_len = jnp.full((batch,), seq, jnp.int32) if lengths is None else lengths.astype(jnp.int32)
    # Non-causal: every query sees every valid key, as if it sat past the end.
    q_offset = jnp.zeros((batch,), jnp.int32) if causal else jnp.full((batch,), seq, jnp.int32)
    return _attend(q, k, v, q_offset, kv_len, alibi_slopes, problem, None, backend, causal_prefill=causal)
