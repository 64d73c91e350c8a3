"""The one attention dispatch seam of the model.

Every attention call of every family goes through `prefill_attention` (causal self-attention among
new tokens, no cache read) or `cached_attention` (a few new queries against the KV cache), both
served by `pallas_kernels` with a static backend name:

- "auto": per lowering platform, the Mosaic TPU kernel on TPU, the Mosaic GPU kernel on CUDA (XLA
  where it does not apply, e.g. float32), XLA on CPU. The default.
- "xla": XLA everywhere.
- "tpu" / "gpu": that Pallas kernel (what `jd.load(attention="pallas")` resolves to on its platform).
- "interpret": the Pallas TPU kernel in interpret mode (runs on CPU; slow, for tests).
"""

from __future__ import annotations

import jax

import pallas_kernels

CHOICES = ("auto", "xla", "pallas", "interpret")  # what users pass as `attention=`


def prefill_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    scale: float,
    alibi_slopes: jax.Array | None = None,
    window: int | None = None,
    softcap: float | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Causal attention among T new tokens. q `[B, Hq, T, D]`, k/v `[B, Hkv, T, D]` -> `[B, Hq, T, D]`.

    Right padding needs no mask: a valid query never sees a later (padding) key.
    """
    return pallas_kernels.flash_attention(
        q, k, v, causal=True, alibi_slopes=alibi_slopes, window=window, scale=scale, softcap=softcap, backend=impl
    )


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
    softcap: float | None = None,
    impl: str = "auto",
) -> jax.Array:
    """Tq new queries `[B, Hq, Tq, D]` against the cache `[B, Hkv, S, D]`; the last query of row b sits
    at `lengths[b] - 1`. Returns `[B, Hq, Tq, D]`."""
    return pallas_kernels.decode_attention(
        q,
        k_cache,
        v_cache,
        lengths,
        scale=scale,
        alibi_slopes=alibi_slopes,
        window=window,
        sinks=sinks,
        softcap=softcap,
        backend=impl,
    )


def resolve(choice: str, dtype: str) -> str:
    """The backend for a user's `attention=` choice ("auto", "xla", "pallas", "interpret") on this machine.

    "pallas" means the kernel of the default JAX platform, and is refused where none exists (CPU) or the
    GPU kernel cannot take the dtype, rather than silently running something else.
    """
    if choice not in CHOICES:
        raise ValueError(f"unknown attention {choice!r}; use one of: {', '.join(CHOICES)}")
    if choice != "pallas":
        return choice
    platform = jax.default_backend()
    if platform == "tpu":
        return "tpu"
    if platform == "gpu":
        if not pallas_kernels.gpu_kernel_runs_here():
            device = jax.devices()[0]
            raise ValueError(
                f"attention='pallas' on GPU needs a Hopper GPU (sm_90, e.g. H100) for its wgmma kernel; this is "
                f"{device.device_kind} (sm_{getattr(device, 'compute_capability', '?')}); use attention='auto'"
            )
        if dtype == "float32":
            raise ValueError(
                "attention='pallas' on GPU needs dtype='bfloat16' (tensor-core MMA has no float32 inputs); "
                "use attention='auto' to fall back to XLA for float32"
            )
        return "gpu"
    raise ValueError(
        f"attention='pallas' needs a TPU or CUDA GPU, and JAX runs on {platform}; "
        "use attention='interpret' to run the kernels on CPU, or 'auto'"
    )
