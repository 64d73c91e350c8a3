"""The accelerator tier of LLM in a flash, compiled for a TPU compile-only target (no TPU needed).

On a TPU or GPU the tiers are host RAM (the FFN bundles, JAX memory kind `pinned_host`) and HBM (the budget:
resident weights plus a neuron cache, memory kind `device`). One layer's FFN step, all inside one jitted
program, static shapes throughout:

  1. the low-rank predictor runs on the device: scores [F], the top K neurons `active` [K];
  2. the cache is direct-mapped (neuron i may live in slot i mod C; `tags[slot]` says which neuron is
     there), so hits are found with one gather: hit = tags[active mod C] == active;
  3. the first M misses (M, static: the expected misses per token with headroom) are gathered from the
     host bundles *on the host* (`compute_on("device_host")`): only M rows cross to HBM, not the layer;
  4. the fetched rows are written into their slots (and tags), and the FFN is computed over the K active
     rows: hits from the cache, misses from the fetched rows (a miss beyond M is dropped this token);
  5. the new cache and tags are returned (donated: updated in place).

What the compile shows (printed): the host argument is the layer's bundles, the device arguments the
cache and predictor, and the device temporaries are of the size of M rows, not of the layer: the gather
happens on the host. This is compiled, not run: no accelerator was available to these sessions.

    python scripts/compile_flash_tpu.py [--target v5e-4] [--model llama-3.1-8b]
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-4")
os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental.compute_on import compute_on  # noqa: E402
from jax.sharding import SingleDeviceSharding  # noqa: E402

from jaxdecode import targets  # noqa: E402

SHAPES = {  # d_model, ffn_dim (SwiGLU)
    "llama-3.1-8b": (4096, 14336),
    "smollm2-135m": (576, 1536),
}


def layer_ffn(bundles, cache, tags, x, a, b, *, keep: int, max_misses: int, hbm):
    """bundles [F, 3d] (host), cache [C, 3d] and tags int32 [C] (device), x [1, d], predictor a [d, r], b [r, F]
    -> (FFN output [1, d], new cache, new tags)."""
    d = x.shape[-1]
    slots_total = cache.shape[0]
    scores = jax.nn.relu(x @ a) @ b
    _, active = jax.lax.top_k(scores[0], keep)  # [K]
    slots = active % slots_total
    hit = tags[slots] == active
    # The first `max_misses` misses, in order (hits sort after them): their neuron ids and their place in `active`.
    order = jnp.argsort(hit, stable=True)[:max_misses]
    wanted = active[order]
    with compute_on("device_host"):
        fetched_host = jnp.take(bundles, wanted, axis=0)  # [M, 3d], gathered where the bundles live
    fetched = jax.device_put(fetched_host, hbm)  # only these M rows cross from host RAM to HBM
    fetched_ok = ~hit[order]
    cache = cache.at[jnp.where(fetched_ok, slots[order], slots_total)].set(fetched, mode="drop")
    tags = tags.at[jnp.where(fetched_ok, slots[order], slots_total)].set(wanted, mode="drop")
    rows = cache[slots]  # [K, 3d]: every fetched row is in its slot now
    usable = tags[slots] == active  # misses beyond M (and slot conflicts) are left out this token
    gate, up, down = rows[:, :d], rows[:, d : 2 * d], rows[:, 2 * d :]
    hidden = jax.nn.silu(x @ gate.T) * (x @ up.T) * usable
    return hidden.astype(down.dtype) @ down, cache, tags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="v5e-4")
    parser.add_argument("--model", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--fraction", type=float, default=0.3, help="share of neurons computed per token")
    parser.add_argument("--cache", type=float, default=0.5, help="cache slots, as a share of the neurons")
    parser.add_argument("--misses", type=float, default=0.1, help="rows fetched per token, as a share")
    parser.add_argument("--rank", type=int, default=128)
    args = parser.parse_args()
    device = targets.compile_only_devices(args.target)[0]
    host = SingleDeviceSharding(device, memory_kind="pinned_host")
    hbm = SingleDeviceSharding(device, memory_kind="device")
    d, f = SHAPES[args.model]
    slots, keep, misses = int(args.cache * f), int(args.fraction * f), int(args.misses * f)
    shapes = (
        jax.ShapeDtypeStruct((f, 3 * d), jnp.bfloat16, sharding=host),
        jax.ShapeDtypeStruct((slots, 3 * d), jnp.bfloat16, sharding=hbm),
        jax.ShapeDtypeStruct((slots,), jnp.int32, sharding=hbm),
        jax.ShapeDtypeStruct((1, d), jnp.bfloat16, sharding=hbm),
        jax.ShapeDtypeStruct((d, args.rank), jnp.bfloat16, sharding=hbm),
        jax.ShapeDtypeStruct((args.rank, f), jnp.bfloat16, sharding=hbm),
    )
    step = jax.jit(
        lambda *a: layer_ffn(*a, keep=keep, max_misses=misses, hbm=hbm),
        in_shardings=tuple(s.sharding for s in shapes),
        out_shardings=(hbm, hbm, hbm),
        donate_argnums=(1, 2),
    )
    compiled = step.lower(*shapes).compile()
    memory = compiled.memory_analysis()
    row = 3 * d * 2
    print(f"{args.model} FFN layer on {args.target} ({device.device_kind}): compiled")
    print(f"  host bundles (pinned_host): {memory.host_argument_size_in_bytes / 1e6:.1f} MB = {f} neurons x {row} B")
    print(f"  device arguments: {memory.argument_size_in_bytes / 1e6:.1f} MB (cache of {slots} slots, predictor)")
    print(
        f"  device temporaries: {memory.temp_size_in_bytes / 1e6:.1f} MB "
        f"({misses} fetched rows = {misses * row / 1e6:.1f} MB, {keep} active rows = {keep * row / 1e6:.1f} MB)"
    )
    print(f"  aliased (cache updated in place): {memory.alias_size_in_bytes / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
