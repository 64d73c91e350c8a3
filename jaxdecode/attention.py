"""The one attention dispatch seam of the model.

Every attention call of every family goes through `prefill_attention` (causal self-attention among
new tokens, no cache read) or `cached_attention` (a few new queries against the KV cache), both
served by `pallas_kernels` with a static backend name:

- "auto": per lowering platform, the Mosaic TPU kernel on TPU, the Triton kernel on CUDA (XLA where
  it does not apply: a head_dim that is not a power of two), XLA on CPU. The default.
- "xla": XLA everywhere.
- "tpu" / "triton": that Pallas kernel (what `jd.load(attention="pallas")` resolves to on its platform).
- "interpret" (= "interpret-tpu"), "interpret-triton": that kernel in interpret mode (runs on CPU;
  slow, for tests).
"""

from __future__ import annotations

import jax

import pallas_kernels

CHOICES = ("auto", "xla", "pallas", "interpret", "interpret-tpu", "interpret-triton")  # what users pass as `attention=`


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


def skips_outside_window(impl: str) -> bool:
    """Whether cached attention on this backend reads only the KV blocks a window (and its sinks) can
    see: the Pallas kernels skip the others; XLA reads the whole cache and masks it."""
    return jax.default_backend() in ("tpu", "gpu") if impl == "auto" else impl != "xla"


def resolve(choice: str) -> str:
    """The backend for a user's `attention=` choice (one of `CHOICES`) on this machine.

    "pallas" means the kernel of the default JAX platform, and is refused where none exists (CPU) rather
    than silently running something else; a model the kernel cannot take (the Triton kernel needs a
    power-of-two head_dim) is refused by the kernel when the program is built.
    """
    if choice not in CHOICES:
        raise ValueError(f"unknown attention {choice!r}; use one of: {', '.join(CHOICES)}")
    if choice != "pallas":
        return choice
    platform = jax.default_backend()
    if platform == "tpu":
        return "tpu"
    if platform == "gpu":
        return "triton"
    raise ValueError(
        f"attention='pallas' needs a TPU or CUDA GPU, and JAX runs on {platform}; "
        "use attention='interpret' to run the kernels on CPU, or 'auto'"
    )
