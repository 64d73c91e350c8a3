"""Sharded inference on a device mesh, the layout part: tensor parallelism over `model`, data
parallelism over `data`. Three parts, bottom up: `collectives.py` (what compiled code calls inside a
shard), this module (meshes, specs, placing host arrays and fetching results) and `engine.py` (the
`shard_map` programs, their in and out specs declared by the state types they carry).

Megatron-style tensor parallelism, written with `jax.shard_map` and explicit collectives:

- Q/K/V and gate/up are column-parallel: each `model` shard holds `Hq / M` query heads, its KV heads
  and `F / M` MLP columns; attention (through the dispatch seam, any backend) and the activation run
  on local heads. O and down are row-parallel: each shard multiplies its slice of the input features
  and one `psum` per projection sums the partial results (bias added once, after the sum).
  Quantized weights split the same way, their scales alongside (`weights.py`): column-parallel ones
  by output rows, row-parallel ones by input columns (4-bit kinds re-packed shard by shard).
- KV heads are split across `model` when `Hkv % M == 0`; when there are fewer KV heads than shards
  (`M % Hkv == 0`, e.g. MQA) each shard keeps the one KV head its query heads use, so the K/V
  projection columns of a head are repeated `M / Hkv` times in the sharded layout.
- The embedding and the LM head are split over the vocabulary (padded to a multiple of M with
  rows that can never be chosen): a lookup is a masked local gather plus one `psum`; logits stay
  vocab-sharded. Greedy decoding takes a distributed argmax (local max and index, then `pmax` /
  `pmin` over shards) without gathering logits; sampling gathers the logits of the new position and
  every shard draws the same random numbers (the per-row keys are replicated across `model`).
- The KV cache is `[B, Hkv, S, D]` sharded as `P("data", "model")`; everything per row is sharded
  over `data`. Norms, positions and the rest are replicated.

Multi-host: call `jax.distributed.initialize()` first in every process (see the README); meshes span
all processes' devices, parameters are placed shard by shard from each process's host copy, and
results are gathered to every process.
"""

from __future__ import annotations

import re
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from . import collectives, weights
from .collectives import DATA, MODEL, Parallel
from .config import ModelConfig


def make_mesh(data: int = 1, model: int = 1, devices: list | None = None) -> Mesh:
    """A `data x model` mesh over the first `data * model` devices (all processes' devices by default)."""
    devices = jax.devices() if devices is None else list(devices)
    if data < 1 or model < 1:
        raise ValueError(f"mesh axes must be >= 1, got data={data}, model={model}")
    if data * model > len(devices):
        raise ValueError(
            f"a mesh of data={data} x model={model} needs {data * model} devices, but JAX sees {len(devices)}"
            " (on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before JAX starts)"
        )
    return Mesh(np.asarray(devices[: data * model]).reshape(data, model), (DATA, MODEL))


def parallel_of(mesh: Mesh) -> Parallel:
    return Parallel(model_size=mesh.shape[MODEL])


def check_config(config: ModelConfig, model_size: int, params: Any = None) -> None:
    """Refuse a model (and its quantized `params`, if given) that cannot be split `model_size` ways,
    naming the numbers."""
    m = model_size
    problems = []
    if config.num_heads % m:
        problems.append(f"{config.num_heads} query heads are not divisible by model={m}")
    for kv_heads in sorted({config.kv_heads_of(i) for i in range(config.num_layers)}):
        if kv_heads % m and m % kv_heads:
            problems.append(f"{kv_heads} KV heads neither divide into model={m} shards nor replicate evenly over them")
    if config.ffn_dim % m and not all(config.is_moe(i) for i in range(config.num_layers)):
        problems.append(f"MLP width {config.ffn_dim} is not divisible by model={m}")
    if config.num_experts:
        slices = collectives.expert_slices(config.num_experts, Parallel(m))
        if config.expert_ffn_dim % slices:
            problems.append(
                f"{config.num_experts} experts on model={m} shards need each expert's {config.expert_ffn_dim} MLP "
                f"columns cut into {slices} slices"
            )
        if config.shared_expert_dim % m:
            problems.append(f"shared expert width {config.shared_expert_dim} is not divisible by model={m}")
    if problems:
        raise ValueError(f"cannot shard {config.family} over model={m}: " + "; ".join(problems))
    if params is not None:
        weights.check_shardable(params, m)


def place(tree: Any, specs: Any, mesh: Mesh) -> Any:
    """Host arrays -> global arrays on the mesh, each device receiving only its shard (works across
    processes: every process supplies the shards of its own devices from its host copy). Random key
    arrays travel as their raw key data."""

    def put(x, spec):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x), spec), impl=jax.random.key_impl(x))
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, NamedSharding(mesh, spec), lambda index: x[index])

    return jax.tree.map(put, tree, specs)


def fetch(x: jax.Array) -> np.ndarray:
    """A global array as a host NumPy array in every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def row_spec(x: Any) -> P:
    """Per-row inputs are split over `data` along their first axis; scalars are replicated."""
    return P(DATA) if np.ndim(x) else P()


def place_rows(tree: Any, mesh: Mesh) -> Any:
    """Host per-row inputs (arrays with a leading batch axis, or scalars) -> global arrays on the mesh."""
    return place(tree, jax.tree.map(row_spec, tree), mesh)


_COLLECTIVE = re.compile(r"= (\w+)\[([\d,]*)\][^\n]*? (all-reduce|all-gather|reduce-scatter|all-to-all)(?:-start)?\(")


def hlo_collectives(hlo_text: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(op, dtype, shape) of every cross-device collective in an HLO module's text, e.g. a compiled
    program's `as_text()`: how to read what a sharded step communicates."""
    return [
        (op, dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims, op in _COLLECTIVE.findall(hlo_text)
    ]
