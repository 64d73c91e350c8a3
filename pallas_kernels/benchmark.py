"""Decode-attention benchmark: the XLA path and (on a GPU or TPU) the Pallas kernels, per context and batch.

    python scripts/bench_kernels.py                        # the grid, on whatever JAX runs on
    jaxdecode bench --suite kernels                        # the same
    python scripts/bench_kernels.py --context 1024 8192 --batch 1 8 --json kernels.json
    python scripts/bench_kernels.py --roofline             # the README's bandwidth-bound table (no timing)

One decode step of one attention layer (one new query per sequence against a full cache), shaped like
Llama-3-8B by default (32 query heads, 8 KV heads, head_dim 128). Reports the median time per call, the
K/V bytes that must be read (`2 * B * Hkv * context * D * itemsize`), the achieved read bandwidth, and on
a known GPU/TPU the fraction of its peak HBM bandwidth and the bandwidth-bound time. Configurations whose
K/V would not fit the memory budget are skipped and listed as such.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels as pk

# Peak HBM bandwidth in bytes/s by device kind (vendor data sheets).
PEAK_BANDWIDTH = {
    "H100 SXM": 3.35e12,
    "H100 PCIe": 2.0e12,
    "H100": 3.35e12,
    "H200": 4.8e12,
    "A100": 2.04e12,
    "L4": 0.3e12,
    "TPU v4": 1.2e12,
    "TPU v5 lite": 0.819e12,  # v5e
    "TPU v5p": 2.765e12,
    "TPU v5": 2.765e12,
    "TPU v6 lite": 1.64e12,  # Trillium
}
ROOFLINE_DEVICES = {"H100 SXM": 3.35e12, "TPU v5e": 0.819e12}


def peak_bandwidth(device_kind: str) -> float | None:
    for name, peak in PEAK_BANDWIDTH.items():  # most specific names first
        if name.lower() in device_kind.lower():
            return peak
    return None


def kv_bytes(batch: int, kv_heads: int, context: int, head_dim: int, itemsize: int) -> int:
    return 2 * batch * kv_heads * context * head_dim * itemsize


def time_call(fn, args, runs: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + first run
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def roofline(args) -> None:
    itemsize = jnp.dtype(args.dtype).itemsize
    print(
        f"Bandwidth-bound decode-attention time per layer, batch 1, {args.heads} heads (q:kv), head_dim "
        f"{args.head_dim}, {args.dtype} K/V:\n"
    )
    print(
        "| context | K/V bytes read | "
        + " | ".join(f"{d} ({p / 1e12:.2f} TB/s)" for d, p in ROOFLINE_DEVICES.items())
        + " |"
    )
    print("|---|---|" + "---|" * len(ROOFLINE_DEVICES))
    kv_heads = int(args.heads.split(":")[1])
    for context in args.context:
        size = kv_bytes(1, kv_heads, context, args.head_dim, itemsize)
        cells = " | ".join(f"{size / p * 1e6:.1f} us" for p in ROOFLINE_DEVICES.values())
        print(f"| {context} | {size / 2**20:.1f} MiB | {cells} |")


def main(argv: list[str] | None = None) -> None:
    on_cpu = jax.default_backend() == "cpu"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 4, 32])
    parser.add_argument("--heads", default="32:8", help="query heads : KV heads (default Llama-3-8B)")
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--dtype", default="float32" if on_cpu else "bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--memory-gb", type=float, default=None, help="K/V budget (default: 4 on CPU, 40%% of device)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--roofline", action="store_true", help="print the bandwidth-bound table and exit")
    args = parser.parse_args(argv)
    if args.roofline:
        roofline(args)
        return

    num_heads, kv_heads = (int(x) for x in args.heads.split(":"))
    dtype = jnp.dtype(args.dtype)
    device = jax.devices()[0]
    peak = None if on_cpu else peak_bandwidth(device.device_kind)
    if args.memory_gb is not None:
        budget = args.memory_gb * 1e9
    elif on_cpu:
        budget = 4e9
    else:
        budget = 0.4 * (device.memory_stats() or {}).get("bytes_limit", 16e9)
    # On a GPU: the Triton kernel (what `auto` runs) and, on Hopper, the Mosaic GPU kernel beside it.
    # JAX's own Triton decode kernel ("jax-ops") runs beside them, on the same shapes.
    kernels = {"tpu": ["tpu"], "gpu": ["triton", "jax-ops"] + (["mosaic-gpu"] if pk.mosaic_gpu_runs_here() else [])}
    backends = ["xla", *kernels.get(jax.default_backend(), [])]
    if dtype == jnp.float32:  # JAX's own kernels take 16-bit inputs only
        backends = [b for b in backends if b != "jax-ops"]
    print(
        f"device: {device.device_kind} ({jax.default_backend()}), peak HBM {peak and peak / 1e12} TB/s; "
        f"heads {num_heads}:{kv_heads}, head_dim {args.head_dim}, {args.dtype}; backends {backends}"
        + ("" if len(backends) > 1 else " (the Pallas kernels run on TPU/GPU only; interpret mode is for correctness)")
    )

    rows = []
    rng = np.random.default_rng(0)
    for context in args.context:
        for batch in args.batch:
            size = kv_bytes(batch, kv_heads, context, args.head_dim, dtype.itemsize)
            if size > budget:
                print(f"context {context:6d} batch {batch:3d}: skipped ({size / 1e9:.1f} GB of K/V > budget)")
                continue
            q = jnp.asarray(rng.normal(size=(batch, num_heads, 1, args.head_dim)), dtype)
            k = jnp.asarray(rng.normal(size=(batch, kv_heads, context, args.head_dim)), dtype)
            v = jnp.asarray(rng.normal(size=(batch, kv_heads, context, args.head_dim)), dtype)
            lengths = jnp.full((batch,), context, jnp.int32)
            for backend in backends:
                fn = jax.jit(lambda q, k, v, n, b=backend: pk.decode_attention(q, k, v, n, backend=b))
                seconds = time_call(fn, (q, k, v, lengths), args.runs)
                problem = pk.common.Problem(
                    batch, kv_heads, num_heads // kv_heads, 1, context, args.head_dim, 1.0, None, 0, None, False
                )
                row = {
                    "backend": backend,
                    "device": device.device_kind,
                    "batch": batch,
                    "context": context,
                    "num_splits": None
                    if backend in ("xla", "jax-ops")
                    else pk.default_num_splits(problem, backend, dtype),
                    "seconds": seconds,
                    "kv_bytes": size,
                    "bandwidth_gb_s": size / seconds / 1e9,
                    "peak_fraction": None if peak is None else size / seconds / peak,
                    "bandwidth_bound_s": None if peak is None else size / peak,
                }
                rows.append(row)
                extra = "" if peak is None else f", {row['peak_fraction']:.0%} of peak"
                print(
                    f"context {context:6d} batch {batch:3d} {backend:10s}: {seconds * 1e6:9.1f} us, "
                    f"{row['bandwidth_gb_s']:7.1f} GB/s{extra}",
                    flush=True,
                )
            del q, k, v
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device.device_kind, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
