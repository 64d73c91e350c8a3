"""`jaxdecode doctor`: the first command to run on a new TPU VM, GPU box or Colab runtime.

It prints the versions (JAX, jaxlib, libtpu, the CUDA plugin), the host CPU and the XLA CPU flags chosen
for it (`cpu.py`), the devices, which attention backend
`auto` picks for each program on this platform, and runs every kernel that exists here against the XLA
path on the device at hand: the largest difference, the time per call and the K/V bytes read per second.
On a CPU the kernels run in Pallas interpret mode (correctness only: interpret mode is slow). A kernel
that fails to compile or run is reported with its error, and the rest still run.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk
from pallas_kernels.benchmark import time_call

from .cpu import host_cpu, tuning_report

# (label, batch, query heads, KV heads, Tq, KV length, head_dim): SmolLM2's and a Llama-3-8B-like decode,
# Gemma 3's head_dim, a speculative verify block; and a prefill.
DECODE_SHAPES = [
    ("decode 9:3 d64 (SmolLM2)", 1, 9, 3, 1, 2048, 64),
    ("decode 32:8 d128 (Llama-3-8B) batch 8", 8, 32, 8, 1, 4096, 128),
    ("decode 4:1 d256 (Gemma 3)", 1, 4, 1, 1, 2048, 256),
    ("verify 32:8 d128, 8 queries", 4, 32, 8, 8, 4096, 128),
]
PREFILL_SHAPE = ("prefill 32:8 d128, 2048 tokens", 1, 32, 8, 2048, 2048, 128)
CPU_SHAPES = [  # interpret mode is slow: smaller shapes, the same features
    ("decode 9:3 d64", 1, 9, 3, 1, 512, 64),
    ("decode 4:1 d256", 1, 4, 1, 1, 256, 256),
    ("verify 8:2 d128, 4 queries", 2, 8, 2, 4, 256, 128),
]
CPU_PREFILL = ("prefill 8:2 d64, 128 tokens", 1, 8, 2, 128, 128, 64)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def kernels_here() -> list[str]:
    """The kernel backends that can run on the default platform."""
    platform = jax.default_backend()
    if platform == "tpu":
        return ["tpu"]
    if platform == "gpu":
        return ["triton", "jax-ops"] + (["mosaic-gpu"] if pk.mosaic_gpu_runs_here() else [])
    return ["interpret-tpu", "interpret-triton", "interpret-jax-ops"]


def auto_choice(head_dim: int) -> str:
    """What `attention='auto'` runs on this platform for a model with this head_dim."""
    platform = jax.default_backend()
    if platform == "tpu":
        return "tpu (Mosaic TPU kernel)"
    if platform == "gpu":
        return "triton" if pk.common.triton_tileable(head_dim) else "xla (Triton tiles need a power-of-two head_dim)"
    return "xla (no Pallas kernel compiles for CPU; `interpret` runs them slowly)"


def check_kernel(backend: str, shape: tuple, prefill: bool, runs: int, dtype: Any) -> dict[str, Any] | None:
    """One kernel on one shape against XLA: max |kernel - xla|, seconds per call, K/V GB/s (None: the
    kernel does not take such calls)."""
    label, batch, num_heads, kv_heads, q_len, kv_len, head_dim = shape
    # Ragged lengths, a window with sinks and a softcap: the features the models use (JAX's own kernels,
    # "jax-ops", take none of the last three, one query per row and 16-bit inputs only: they get plain
    # bfloat16 decode / prefill).
    peer = backend.endswith("jax-ops")
    if peer and q_len > 1 and not prefill:
        return None
    dtype = jnp.bfloat16 if peer else dtype
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(batch, num_heads, q_len, head_dim)), dtype)
    k = jnp.asarray(rng.normal(size=(batch, kv_heads, kv_len, head_dim)), dtype)
    v = jnp.asarray(rng.normal(size=(batch, kv_heads, kv_len, head_dim)), dtype)
    lengths = jnp.asarray(np.linspace(max(q_len, kv_len // 2), kv_len, batch).astype(np.int32))
    settings = {} if peer else dict(window=kv_len // 2, softcap=50.0, **({} if prefill else {"sinks": 4}))
    if prefill:

        def run(b):
            return jax.jit(lambda q, k, v: pk.flash_attention(q, k, v, backend=b, **settings))

        args = (q, k, v)
    else:

        def run(b):
            return jax.jit(lambda q, k, v, n: pk.decode_attention(q, k, v, n, backend=b, **settings))

        args = (q, k, v, lengths)
    row = {"backend": backend, "shape": label, "dtype": jnp.dtype(dtype).name, "features": sorted(settings)}
    try:
        expected = np.asarray(run("xla")(*args), np.float32)
        out = np.asarray(run(backend)(*args), np.float32)
        seconds = time_call(run(backend), args, runs)
    except Exception as error:  # noqa: BLE001 - reported, and the other kernels still run
        first = next((line for line in str(error).splitlines() if line.strip()), "")
        return {**row, "error": f"{type(error).__name__}: {first[:300]}"}
    kv_bytes = 2 * batch * kv_heads * kv_len * head_dim * jnp.dtype(dtype).itemsize
    return {
        **row,
        "max_abs_error": float(np.max(np.abs(out - expected))),
        "seconds": seconds,
        "kv_gb_per_s": kv_bytes / seconds / 1e9,
    }


def report(runs: int | None = None) -> dict[str, Any]:
    """Everything `jaxdecode doctor` prints, as one dict (`--json`)."""
    on_cpu = jax.default_backend() == "cpu"
    runs = runs or (1 if on_cpu else 20)
    dtype = jnp.float32 if on_cpu else jnp.bfloat16
    devices = jax.devices()
    versions = {name: _version(name) for name in ("jax", "jaxlib", "libtpu", "jax-cuda12-plugin", "jax-cuda13-plugin")}
    decode, prefill = (CPU_SHAPES, CPU_PREFILL) if on_cpu else (DECODE_SHAPES, PREFILL_SHAPE)
    checks = []
    for backend in kernels_here():
        checks += [check_kernel(backend, shape, False, runs, dtype) for shape in decode]
        checks.append(check_kernel(backend, prefill, True, runs, dtype))
    checks = [c for c in checks if c is not None]
    return {
        "versions": {k: v for k, v in versions.items() if v is not None},
        "platform": jax.default_backend(),
        "host_cpu": host_cpu().describe(),
        "cpu_tuning": tuning_report(),
        "devices": [f"{d.device_kind} ({d.platform}:{d.id})" for d in devices],
        "auto": {f"head_dim {d}": auto_choice(d) for d in (64, 96, 128, 256)},
        "checks": checks,
    }


def format_report(data: dict[str, Any]) -> str:
    lines = ["versions: " + ", ".join(f"{k} {v}" for k, v in data["versions"].items())]
    lines.append(f"host CPU: {data['host_cpu']}")
    lines.append(data["cpu_tuning"])
    lines.append(f"platform {data['platform']}: {len(data['devices'])} device(s): {', '.join(data['devices'][:8])}")
    lines += [f"attention='auto' for {k}: {v}" for k, v in data["auto"].items()]
    for c in data["checks"]:
        head = f"{c['backend']:17s} {c['shape']:40s} {c['dtype']:8s} {','.join(c['features']) or 'plain':22s}"
        if "error" in c:
            lines.append(f"{head} FAILED: {c['error']}")
        else:
            lines.append(
                f"{head} max|kernel - xla| {c['max_abs_error']:.2e}  {c['seconds'] * 1e6:10.1f} us  "
                f"{c['kv_gb_per_s']:8.2f} GB/s of K/V"
            )
    return "\n".join(lines)
