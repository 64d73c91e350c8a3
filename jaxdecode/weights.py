"""The one weight layer: how the model multiplies by, looks up in and shards its weights, whatever
their kind (float or any `quantize.py` kind) and whatever the mesh.

The model (`model.py`) calls `linear`, `lookup` and `logits` and never asks what a weight is. The
two physical layouts stay where they measure best on XLA's CPU backend: float Linear weights
`[in, out]` (batch 8: 17.9 ms against 27.1 ms for `[out, in]`, SmolLM2's layers) and quantized
ones `[out, in]` (the dequantization fuses into the matrix-vector dot only in that orientation,
see `quantize.py`). What is one is the logical layout every rule here is written in: a Linear maps
`in` features to `out` features, column-parallel projections split `out` over the `model` axis,
row-parallel ones split `in`, embeddings and the LM head split the vocabulary; `spec` and
`shard_layout` translate that into each kind's arrays, scales alongside their integers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import io_callback
from jax.sharding import PartitionSpec as P

from . import collectives as col
from . import quantize
from .collectives import MODEL, Parallel
from .config import ModelConfig
from .quantize import QuantizedWeight, is_quantized

Weight = jax.Array | QuantizedWeight
COLUMN_PARALLEL = ("q", "k", "v", "gate", "up")
ROW_PARALLEL = ("o", "down")
VOCAB = ("embed", "lm_head")
EXPERTS = "experts"  # stacked expert matrices [E, out, in], split over `model` by expert

_init = nn.initializers.normal(stddev=0.02)


@jax.tree_util.register_static
@dataclass(frozen=True, eq=False)
class HostMLP:
    """A dense MLP whose weights are not among the params: `compute(x)` (NumPy float32 `[..., d_model]` ->
    the same) runs it on the host, reading its weights from storage (`flash.py`). A pytree without
    leaves: it travels inside the params as static data, compared by identity."""

    compute: Callable[[np.ndarray], np.ndarray]


def host_mlp(x: jax.Array, mlp: HostMLP) -> jax.Array:
    """x `[..., d_model]` through a `HostMLP`: one ordered host callback (it keeps the host's caches in step)."""
    out = jax.ShapeDtypeStruct(x.shape, jnp.float32)
    y = io_callback(mlp.compute, out, x.astype(jnp.float32), ordered=True)
    return y.astype(x.dtype)


def param(module: nn.Module, name: str, shape: tuple[int, ...], dtype: Any) -> Any:
    """`module.param`, except that a stored quantized weight is returned as it is (Flax's param would
    compare its first leaf's shape with the float shape)."""
    if module.has_variable("params", name) and is_quantized(module.get_variable("params", name)):
        return module.get_variable("params", name)
    return module.param(name, _init, shape, dtype)


def linear(x: jax.Array, weight: Weight) -> jax.Array:
    """x `[..., in]` times a Linear weight -> `[..., out]` in x's dtype, accumulated in float32."""
    if is_quantized(weight):
        return quantize.matmul(x, weight)
    y = lax.dot_general(
        x.astype(weight.dtype), weight, (((x.ndim - 1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )
    return y.astype(x.dtype)


def lookup(table: Weight, tokens: jax.Array, parallel: Parallel | None) -> jax.Array:
    """Rows of the (vocab-sharded) embedding table for int `tokens` `[...]` -> `[..., d_model]`: each shard
    gathers the ids it holds, then one sum over the shards."""
    take = quantize.take_rows if is_quantized(table) else lambda t, ids: jnp.take(t, ids, axis=0)
    if not col.splits_model(parallel):
        return take(table, tokens)
    rows = (table.values if is_quantized(table) else table).shape[0]
    local = tokens - col.shard_index(parallel) * rows
    inside = (local >= 0) & (local < rows)
    found = take(table, jnp.clip(local, 0, rows - 1))
    return col.sum_over_model(found * inside[..., None].astype(found.dtype), parallel)


def logits(x: jax.Array, table: Weight) -> jax.Array:
    """x `[..., d_model]` against the (local rows of the) embedding / LM head -> float32 `[..., V_local]`."""
    if is_quantized(table):
        return quantize.matmul(x.astype(jnp.float32), table)
    return lax.dot_general(
        x.astype(table.dtype), table, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )


# ------------------------------------------------------------------------------------------------
# Experts: stacked `[E, out, in]` (each expert's matrix as checkpoints store it), read per routed expert.

# Up to this many (row, expert) pairs, and no more than there are experts, each pair multiplies its expert's
# matrices alone (decoding): XLA's CPU backend fuses the expert's dynamic slice into that matrix-vector
# product, so only the routed experts' weights are read (28 GB/s on 2 EPYC cores for float32 `x @ W_e^T`,
# against 1.9 GB/s for a gather of the experts followed by a batched dot; 32 pairs of 32 experts of
# 512 x 512: 3.1 ms a layer, against 9-18 ms through the grouped matmul; measured). More pairs go through
# the grouped matmul below, which reads each expert in use once per tile of its rows.
GATHER_PAIRS = 64


def _expert_matrix(w: Weight, expert: jax.Array) -> jax.Array:
    """Expert `expert`'s matrix `[out, in]` of stacked experts (float, or int8 `[E, out, in]` with scales
    `[E, out, 1]`), dequantized to float32 where it is quantized (fused into the dot that reads it)."""
    if is_quantized(w):
        values = lax.dynamic_index_in_dim(w.values, expert, 0, keepdims=False)
        return values.astype(jnp.float32) * lax.dynamic_index_in_dim(w.scales, expert, 0, keepdims=False)
    return lax.dynamic_index_in_dim(w, expert, 0, keepdims=False)


def _times_expert(x: jax.Array, w: Weight, expert: jax.Array) -> jax.Array:
    """x float32 `[rows, in]` (a tile of the grouped matmul) times expert `expert`'s matrix (contracted on
    `in`) -> float32 `[rows, out]`."""
    matrix = _expert_matrix(w, expert)
    # Written x @ W^T, as `_row_times_expert`: a dot_general contracting both on `in` copies the slice out
    # first (for one row: 13 ms against 1.1 ms, measured).
    return jnp.matmul(x.astype(matrix.dtype), matrix.T, preferred_element_type=jnp.float32)


def _row_times_expert(x: jax.Array, w: Weight, expert: jax.Array) -> jax.Array:
    """One row x float32 `[in]` times expert `expert`'s matrix -> float32 `[out]`: a fused matrix-vector
    product (XLA's CPU backend fuses the expert's slice into it only when written x @ W^T) per piece of at
    most `quantize.MATVEC_COLUMNS` input columns (wider rows fall off XLA's CPU fast path: a 1024 x 4096
    expert matrix at 0.7 GB/s whole, 27 GB/s in two pieces; measured)."""
    matrix, step = _expert_matrix(w, expert), quantize.MATVEC_COLUMNS
    pieces = [
        jnp.dot(x[c : c + step].astype(matrix.dtype), matrix[:, c : c + step].T, preferred_element_type=jnp.float32)
        for c in range(0, x.shape[0], step)
    ]
    return pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces).reshape(len(pieces), -1).sum(0)


def _num_experts(w: Weight) -> int:
    return (w.values if is_quantized(w) else w).shape[0]


def expert_mlp(
    x: jax.Array, experts: jax.Array, coefficients: jax.Array, mlp: tuple[Weight, Weight, Weight], act: Any
) -> jax.Array:
    """Routed gated MLPs: row n gets `sum_a coefficients[n, a] * MLP_e(x[n])`, e = experts[n, a], with
    `MLP_e(x) = down_e(act(gate_e(x)) * up_e(x))`.

    x `[N, d]`; experts int32 `[N, A]` (local expert ids; any id where the coefficient is 0, e.g. another
    shard's expert); coefficients float32 `[N, A]`; mlp the stacked (gate, up, down), gate / up `[E, f, d]`,
    down `[E, d, f]`. Returns float32 `[N, d]`. No routed pair is ever dropped (no capacity factor).

    Few pairs (decoding): each pair multiplies its own expert's matrices, so the step reads only routed
    experts. Many pairs (prefill): a grouped matmul, the pairs sorted by expert (`_grouped_mlp`).
    """
    n, pairs = experts.shape
    count = _num_experts(mlp[0])
    if n * pairs > min(GATHER_PAIRS, count):
        return _grouped_mlp(x, experts, coefficients, mlp, act)
    gate, up, down = mlp
    xf = x.astype(jnp.float32)
    ids = jnp.clip(experts, 0, count - 1).reshape(-1)
    rows = [(p // pairs, ids[p]) for p in range(n * pairs)]

    def each_pair(inputs: list[jax.Array], w: Weight) -> jax.Array:
        # Joined by a concatenation: an elementwise consumer would be fused into the dot as its output,
        # and XLA's CPU backend then copies the expert's matrix out before multiplying (measured 15x slower).
        return jnp.stack([_row_times_expert(x_p, w, e) for x_p, (_, e) in zip(inputs, rows)])

    pair_x = [xf[r] for r, _ in rows]
    hidden = act(each_pair(pair_x, gate)) * each_pair(pair_x, up)  # [P, f]
    y = each_pair([hidden[p] for p in range(n * pairs)], down)  # [P, d]
    return jnp.sum(y.reshape(n, pairs, -1) * coefficients[..., None], axis=1)


def _grouped_mlp(
    x: jax.Array, experts: jax.Array, coefficients: jax.Array, mlp: tuple[Weight, Weight, Weight], act: Any
) -> jax.Array:
    """`expert_mlp` for many pairs: the pairs sorted by expert into a buffer where each expert's rows start
    on a tile boundary, then a loop over tiles of `tile` rows, each multiplied by its one expert's matrices
    (a grouped matmul: every expert's weights read once per tile of its rows, no FLOPs spent on experts a
    row does not use). Static sizes: the buffer has room for every pair plus each expert's last partial tile.
    """
    n, pairs = experts.shape
    count = _num_experts(mlp[0])
    total = n * pairs
    # about the mean rows per expert (2048 pairs over 32 experts of 512 x 512: 27 ms with tiles of 64 rows,
    # 52 with 32 or 128, 67 with 8; `lax.ragged_dot`, which XLA's CPU backend computes densely: 522 ms)
    tile = int(np.clip(2 ** int(np.log2(max(total // count, 1))), 8, 256))
    capacity = -(-(total + count * (tile - 1)) // tile) * tile
    group = jnp.where(coefficients != 0, experts, count).reshape(-1)  # id `count`: not ours, dropped
    order = jnp.argsort(group, stable=True)
    sorted_group = group[order]
    sizes = jnp.bincount(group, length=count + 1)[:count]
    padded = -(-sizes // tile) * tile
    used = jnp.sum(padded)
    start, padded_start = jnp.cumsum(sizes) - sizes, jnp.cumsum(padded) - padded
    g = jnp.clip(sorted_group, 0, count - 1)
    rank = jnp.arange(total) - start[g]
    slot = jnp.where(sorted_group < count, padded_start[g] + rank, capacity)  # `capacity`: out of range
    buffer = (
        jnp.zeros((capacity, x.shape[1]), jnp.float32).at[slot].set(x.astype(jnp.float32)[order // pairs], mode="drop")
    )
    tile_starts = jnp.arange(capacity // tile) * tile
    tile_expert = jnp.clip(jnp.searchsorted(jnp.cumsum(padded), tile_starts, side="right"), 0, count - 1)
    gate, up, down = mlp

    def mlp_of(rows: jax.Array, e: jax.Array) -> jax.Array:
        return _times_expert(act(_times_expert(rows, gate, e)) * _times_expert(rows, up, e), down, e)

    def one_tile(t: jax.Array) -> jax.Array:
        rows, e = lax.dynamic_slice_in_dim(buffer, t * tile, tile), tile_expert[t]
        # the buffer's room for partial tiles left over: no rows, so no expert's weights read for them
        return lax.cond(t * tile < used, mlp_of, lambda r, e: jnp.zeros_like(r), rows, e)

    out = lax.map(one_tile, jnp.arange(capacity // tile)).reshape(capacity, -1)
    per_pair = jnp.zeros((total, out.shape[1]), jnp.float32).at[order].set(out.at[slot].get(mode="fill", fill_value=0))
    return (per_pair.reshape(n, pairs, -1) * coefficients[..., None]).sum(1)


def to_model_layout(params: Any) -> Any:
    """Loader params (every Linear weight `[out, in]`, as checkpoints store them) -> the model's layout:
    float Linear weights transposed to `[in, out]`, quantized ones kept `[out, in]`."""

    def fix(path, leaf):
        return leaf.T if getattr(path[-1], "key", None) == "weight" else leaf

    return jax.tree_util.tree_map_with_path(fix, params)


# ------------------------------------------------------------------------------------------------
# Weights on the mesh.


def _role(path) -> tuple[str, str]:
    """(role, name): role "column", "row", "vocab", "experts" or "" (replicated) from a leaf's place in the tree."""
    keys = [getattr(p, "key", str(p)) for p in path]
    module, name = (keys[-2] if len(keys) > 1 else ""), keys[-1]
    if module == EXPERTS:
        return "experts", name
    if name in VOCAB:
        return "vocab", name
    if module in COLUMN_PARALLEL:
        return "column", name
    if module in ROW_PARALLEL:
        return "row", name
    return "", name


def spec(path, leaf: Any) -> Any:
    """The PartitionSpec of one parameter (a `QuantizedWeight` of specs for a quantized one)."""
    role, name = _role(path)
    if role == "experts":  # (virtual) experts split over the shards, scales alongside
        split = P(MODEL, None, None)
        return jax.tree.map(lambda _: split, leaf) if is_quantized(leaf) else split
    if is_quantized(leaf):
        rows, columns = P(MODEL, None), P(None, MODEL)
        split = {"vocab": rows, "column": rows, "row": columns}.get(role, P())
        # int8's one scale per output row covers every input column: each shard scales its partial sum
        scale = P() if role == "row" and leaf.kind == "int8" else split
        offsets = None if leaf.offsets is None else scale
        return QuantizedWeight(split, scale, offsets, leaf.kind, leaf.shape, leaf.dtype)
    if role == "vocab":
        return P(MODEL, None)
    if role == "column":
        return P(None, MODEL) if name == "weight" else P(MODEL)
    if role == "row" and name == "weight":
        return P(MODEL, None)
    return P()


def specs(params: Any) -> Any:
    return jax.tree_util.tree_map_with_path(spec, params, is_leaf=is_quantized)


def check_shardable(params: Any, model_size: int) -> None:
    """Refuse quantized weights whose row-parallel split would cut a scale group, naming the fix."""
    if model_size == 1:
        return
    for path, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]:
        # int8's one scale per row needs no whole groups; its columns split as the heads / MLP width do
        if is_quantized(leaf) and leaf.kind != "int8" and _role(path)[0] == "row":
            columns, group = leaf.shape[1], leaf.group_size
            if columns % model_size or (columns // model_size) % group:
                where = jax.tree_util.keystr(path)
                fix = "a smaller --group-size" if leaf.kind == "int4" else "int8, or fewer model shards"
                raise ValueError(
                    f"cannot split {where} ({leaf.kind}, {columns} input columns in groups of {group}) over "
                    f"model={model_size}: each shard needs whole groups ({columns // model_size} columns); use {fix}"
                )


def shard_layout(params: Any, config: ModelConfig, model_size: int, xp: Any = np) -> Any:
    """Host params -> the layout `spec` splits:
    - K/V output features of each KV head repeated when there are fewer KV heads than shards;
    - embedding / LM head rows padded to a multiple of the shard count;
    - row-parallel 4-bit weights re-packed shard by shard (`quantize.split_columns`).

    `xp=jnp` traces it (under `jax.eval_shape`, for abstract params: `jaxdecode.plan`)."""
    vocab = col.padded_vocab(config.vocab_size, Parallel(model_size))

    def kv_repeat(path) -> tuple[int, int]:
        """(KV heads, how often each is repeated) of the layer a leaf is in."""
        top = getattr(path[0], "key", "")
        heads = config.kv_heads_of(int(top[len("layer_") :])) if top.startswith("layer_") else config.num_kv_heads
        return heads, (model_size // heads if heads < model_size else 1)

    def pad_rows(a: Any) -> Any:
        return a if a is None else xp.concatenate([a, xp.zeros((vocab - a.shape[0], *a.shape[1:]), a.dtype)])

    def repeat_heads(a: Any, axis: int, path) -> Any:
        if a is None:
            return a
        axis = axis % a.ndim
        num_kv_heads, repeat = kv_repeat(path)
        heads = a.reshape(*a.shape[:axis], num_kv_heads, -1, *a.shape[axis + 1 :])
        return xp.repeat(heads, repeat, axis=axis).reshape(*a.shape[:axis], -1, *a.shape[axis + 1 :])

    slices = col.expert_slices(config.num_experts, Parallel(model_size)) if config.num_experts else 1

    def slice_experts(a: Any, name: str) -> Any:
        """[E, out, in] -> [E * slices, ...]: expert e's MLP columns cut into `slices` virtual experts
        (rows of gate / up, columns of down), so that they split evenly over the shards."""
        if a is None or slices == 1:
            return a
        if name != "down":  # [E, f, d] (its scales [E, f, 1]): consecutive row blocks
            return a.reshape(a.shape[0] * slices, a.shape[1] // slices, a.shape[2])
        e, d, f = a.shape
        if f == 1:  # down's int8 scales [E, d, 1]: one per output row, the same for each column slice
            return xp.repeat(a, slices, axis=0)
        return a.reshape(e, d, slices, f // slices).transpose(0, 2, 1, 3).reshape(e * slices, d, f // slices)

    def fix(path, leaf):
        role, name = _role(path)
        module = getattr(path[-2], "key", "") if len(path) > 1 else ""
        if role == "experts":
            return jax.tree.map(lambda a: slice_experts(xp.asarray(a), name), leaf)
        if is_quantized(leaf):
            if role == "vocab" and vocab != leaf.values.shape[0]:
                leaf = jax.tree.map(pad_rows, leaf)
            if module in ("k", "v") and kv_repeat(path)[1] > 1:
                leaf = jax.tree.map(lambda a: repeat_heads(a, 0, path), leaf)
            if role == "row" and model_size > 1:
                leaf = quantize.split_columns(leaf, model_size, xp)
            return leaf
        leaf = xp.asarray(leaf)
        if role == "vocab" and vocab != leaf.shape[0]:
            leaf = pad_rows(leaf)
        if module in ("k", "v") and kv_repeat(path)[1] > 1:
            leaf = repeat_heads(leaf, -1, path)
        return leaf

    return jax.tree_util.tree_map_with_path(fix, params, is_leaf=is_quantized)


def layout_is_identity(params: Any, config: ModelConfig, model_size: int) -> bool:
    """Whether `shard_layout` leaves these (possibly abstract) params as they are: then a checkpoint can
    be read onto the mesh as saved."""
    if model_size == 1:
        return True
    repacked = any(leaf.four_bit for leaf in jax.tree.leaves(params, is_leaf=is_quantized) if is_quantized(leaf))
    padded = col.padded_vocab(config.vocab_size, Parallel(model_size)) != config.vocab_size
    sliced = config.num_experts and col.expert_slices(config.num_experts, Parallel(model_size)) > 1
    repeated = any(config.kv_heads_of(i) < model_size for i in range(config.num_layers))
    return not (repacked or padded or sliced or repeated)
