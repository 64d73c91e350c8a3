"""Sharded inference on a device mesh: tensor parallelism over `model`, data parallelism over `data`.

Megatron-style tensor parallelism, written with `jax.shard_map` and explicit collectives:

- Q/K/V and gate/up are column-parallel: each `model` shard holds `Hq / M` query heads, its KV heads
  and `F / M` MLP columns; attention (through the dispatch seam, any backend) and the activation run
  on local heads. O and down are row-parallel: each shard multiplies its slice of the input features
  and one `psum` per projection sums the partial results (bias added once, after the sum).
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

import dataclasses
import re
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from .config import ModelConfig
from .kv_cache import KVCache
from .quantize import QuantizedWeight, take_rows

DATA, MODEL = "data", "model"
COLUMN_PARALLEL = ("q", "k", "v", "gate", "up")
ROW_PARALLEL = ("o", "down")


@dataclasses.dataclass(frozen=True)
class Parallel:
    """Static description of the mesh axes a sharded program runs on (hashable, a jit static)."""

    model_size: int
    model_axis: str = MODEL
    data_axis: str = DATA


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


def check_config(config: ModelConfig, model_size: int) -> None:
    """Refuse a model that cannot be split `model_size` ways, naming the numbers."""
    m = model_size
    problems = []
    if config.num_heads % m:
        problems.append(f"{config.num_heads} query heads are not divisible by model={m}")
    if config.num_kv_heads % m and m % config.num_kv_heads:
        problems.append(
            f"{config.num_kv_heads} KV heads neither divide into model={m} shards nor replicate evenly over them"
        )
    if config.ffn_dim % m:
        problems.append(f"MLP width {config.ffn_dim} is not divisible by model={m}")
    if problems:
        raise ValueError(f"cannot shard {config.family} over model={m}: " + "; ".join(problems))


# ------------------------------------------------------------------------------------------------
# Local sizes and collectives used by the model (all identity when `parallel` is None).


def _splits_model(parallel: Parallel | None) -> bool:
    """Whether there is anything to communicate over the model axis (a size-1 axis needs no collective)."""
    return parallel is not None and parallel.model_size > 1


def per_shard(count: int, parallel: Parallel | None) -> int:
    return count if parallel is None else count // parallel.model_size


def local_kv_heads(count: int, parallel: Parallel | None) -> int:
    return count if parallel is None else max(count // parallel.model_size, 1)


def padded_vocab(vocab_size: int, parallel: Parallel | None) -> int:
    m = 1 if parallel is None else parallel.model_size
    return -(-vocab_size // m) * m


def shard_index(parallel: Parallel) -> jax.Array:
    return lax.axis_index(parallel.model_axis)


def reduce_partial(x: jax.Array, parallel: Parallel | None) -> jax.Array:
    """Sum the partial products of a row-parallel projection over the model shards."""
    return lax.psum(x, parallel.model_axis) if _splits_model(parallel) else x


def embed_lookup(table: jax.Array, tokens: jax.Array, parallel: Parallel | None) -> jax.Array:
    """Rows of the (vocab-sharded) embedding table: each shard gathers the ids it holds, one psum."""
    if isinstance(table, QuantizedWeight):
        return take_rows(table, tokens)  # quantized params are not split over `model` (check_config)
    if not _splits_model(parallel):
        return jnp.take(table, tokens, axis=0)
    rows = table.shape[0]
    local = tokens - shard_index(parallel) * rows
    inside = (local >= 0) & (local < rows)
    found = jnp.take(table, jnp.clip(local, 0, rows - 1), axis=0) * inside[..., None].astype(table.dtype)
    return lax.psum(found, parallel.model_axis)


def mask_vocab_padding(logits: jax.Array, vocab_size: int, parallel: Parallel | None) -> jax.Array:
    """Local logits `[..., V_local]` with the padding ids (>= vocab_size) at -inf."""
    if not _splits_model(parallel) or padded_vocab(vocab_size, parallel) == vocab_size:
        return logits
    ids = shard_index(parallel) * logits.shape[-1] + jnp.arange(logits.shape[-1])
    return jnp.where(ids < vocab_size, logits, -jnp.inf)


def argmax_tokens(logits: jax.Array, parallel: Parallel | None) -> jax.Array:
    """Greedy tokens int32 `[B]` from local logits `[B, V_local]`: per-shard max and index, then a
    cross-shard max and the smallest index holding it (the same tie rule as `jnp.argmax`)."""
    if not _splits_model(parallel):
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    best = jnp.max(logits, axis=-1)
    index = jnp.argmax(logits, axis=-1).astype(jnp.int32) + shard_index(parallel) * logits.shape[-1]
    top = lax.pmax(best, parallel.model_axis)
    return lax.pmin(jnp.where(best == top, index, jnp.iinfo(jnp.int32).max), parallel.model_axis)


def gather_vocab(logits: jax.Array, vocab_size: int, parallel: Parallel | None) -> jax.Array:
    """The full logits `[B, V]` on every shard (for sampling, which needs the whole distribution)."""
    if not _splits_model(parallel):
        return logits[..., :vocab_size]
    full = lax.all_gather(logits, parallel.model_axis, axis=logits.ndim - 1, tiled=True)
    return full[..., :vocab_size]


# ------------------------------------------------------------------------------------------------
# Parameters: the sharded layout and its placement.


def _leaf_name(path) -> tuple[str, str]:
    keys = [getattr(p, "key", str(p)) for p in path]
    return (keys[-2] if len(keys) > 1 else ""), keys[-1]


def param_spec(path, leaf) -> P:
    """The PartitionSpec of one parameter, by its place in the tree."""
    module, name = _leaf_name(path)
    if name in ("embed", "lm_head"):
        return P(MODEL, None)
    if module in COLUMN_PARALLEL:
        return P(None, MODEL) if name == "weight" else P(MODEL)
    if module in ROW_PARALLEL and name == "weight":
        return P(MODEL, None)
    return P()


def param_specs(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(param_spec, params)


def layout_is_identity(config: ModelConfig, model_size: int) -> bool:
    """Whether `sharded_layout` leaves params as they are (then a checkpoint can be read onto the mesh as is)."""
    return model_size == 1 or (
        config.num_kv_heads >= model_size and padded_vocab(config.vocab_size, Parallel(model_size)) == config.vocab_size
    )


def sharded_layout(params: Any, config: ModelConfig, model_size: int, xp: Any = np) -> Any:
    """Host params -> the layout `param_spec` splits: K/V columns of each KV head repeated when there are
    fewer KV heads than shards, embedding / LM head rows padded to a multiple of the shard count.

    `xp=jnp` traces it (under `jax.eval_shape`, for abstract params: `jaxdecode.plan`)."""
    parallel = Parallel(model_size)
    repeat = model_size // config.num_kv_heads if config.num_kv_heads < model_size else 1
    vocab = padded_vocab(config.vocab_size, parallel)

    def fix(path, leaf):
        module, name = _leaf_name(path)
        leaf = xp.asarray(leaf)
        if name in ("embed", "lm_head") and vocab != leaf.shape[0]:
            leaf = xp.concatenate([leaf, xp.zeros((vocab - leaf.shape[0], leaf.shape[1]), leaf.dtype)])
        if module in ("k", "v") and repeat > 1:
            heads = leaf.reshape(*leaf.shape[:-1], config.num_kv_heads, config.head_dim)
            leaf = xp.repeat(heads, repeat, axis=-2).reshape(*leaf.shape[:-1], -1)
        return leaf

    return jax.tree_util.tree_map_with_path(fix, params)


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


def _row_spec(x: Any) -> Any:
    """Per-row inputs are split over `data` along their first axis (a tuple of them: a spec prefix);
    scalars are replicated."""
    return P(DATA) if isinstance(x, tuple) or jnp.ndim(x) else P()


_SCALAR_FIELDS = ("step", "rounds")  # loop counters, the same on every device


def state_specs(state: Any) -> Any:
    """The specs of a loop state (`generate.DecodeState`, `speculative.SpecState`) or a `KVCache`: caches
    over data and KV heads, counters replicated, everything else per row; absent fields stay None."""
    if isinstance(state, KVCache):
        return KVCache(keys=P(DATA, MODEL), values=P(DATA, MODEL), lengths=P(DATA))
    return _specs_of(type(state), absent=tuple(k for k, v in state._asdict().items() if v is None))


def _specs_of(state_type: Any, absent: tuple[str, ...] = ()) -> Any:
    cache = KVCache(keys=P(DATA, MODEL), values=P(DATA, MODEL), lengths=P(DATA))
    fields = {}
    for name in state_type._fields:
        if name in absent:
            fields[name] = None
        elif name in ("kv_cache", "draft_cache"):
            fields[name] = cache
        else:
            fields[name] = P() if name in _SCALAR_FIELDS else P(DATA)
    return state_type(**fields)


def _output_specs(name: str, statics: dict, rest: tuple) -> Any:
    """The specs of what a generation function returns (from its name: outputs cannot be traced here,
    the params being in the sharded layout)."""
    from .generate import DecodeState
    from .speculative import SpecState

    if name == "draft_prefill":
        return state_specs(KVCache((), (), None))
    if name == "speculative_loop":
        with_draft = any(isinstance(a, KVCache) for a in rest)
        return _specs_of(SpecState, absent=() if with_draft else ("draft_cache",))
    return _specs_of(DecodeState, absent=() if statics["plan"].repetition_penalty else ("seen",))


def sharded_generate_fn(fn: Any, mesh: Mesh) -> Any:
    """`fn(params, *rest, **statics)` from `generate.py` (prefill, decode_step, decode_loop) as one
    `shard_map` over the mesh: each device runs `fn` on its shard with `parallel` set."""
    parallel = parallel_of(mesh)

    def spec(a: Any) -> Any:
        if a is None:  # an absent optional input (no draft model)
            return P()
        if isinstance(a, dict):  # a second model's params (the speculative draft)
            return param_specs(a)
        if isinstance(a, KVCache) or hasattr(a, "kv_cache"):
            return state_specs(a)
        return _row_spec(a)

    def run(params, *rest, **statics):
        in_specs = (param_specs(params), *map(spec, rest))
        local = partial(fn, **statics, parallel=parallel)
        out_specs = _output_specs(fn.__name__, statics, rest)
        return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(params, *rest)

    return run


def sharded_logits_fn(mesh: Mesh, config: ModelConfig, attention_impl: str) -> Any:
    """`(params, tokens, positions) -> logits [B, T, vocab]`, a cache-free forward as one shard_map."""
    from .model import apply

    parallel = parallel_of(mesh)

    def local(params, tokens, positions):
        return apply(params, config, tokens, positions, attention_impl=attention_impl, parallel=parallel)[0]

    def run(params, tokens, positions):
        in_specs = (param_specs(params), P(DATA), P(DATA))
        logits = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=P(DATA, None, MODEL), check_vma=False)(
            params, tokens, positions
        )
        return logits[..., : config.vocab_size]

    return jax.jit(run)


def place_rows(tree: Any, mesh: Mesh) -> Any:
    """Host per-row inputs (arrays with a leading batch axis, or scalars) -> global arrays on the mesh."""
    return place(tree, jax.tree.map(_row_spec, tree), mesh)


_COLLECTIVE = re.compile(r"= (\w+)\[([\d,]*)\][^\n]*? (all-reduce|all-gather|reduce-scatter|all-to-all)(?:-start)?\(")


def hlo_collectives(hlo_text: str) -> list[tuple[str, str, tuple[int, ...]]]:
    """(op, dtype, shape) of every cross-device collective in an HLO module's text, e.g. a compiled
    program's `as_text()`: how to read what a sharded step communicates."""
    return [
        (op, dtype, tuple(int(d) for d in dims.split(",") if d)) for dtype, dims, op in _COLLECTIVE.findall(hlo_text)
    ]
