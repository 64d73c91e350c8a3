"""Weight-only quantization: quantized weights as pytrees, and the matmul that reads them directly.

A `QuantizedWeight` is a matrix `[out, in]` (one row per output channel, the layout of checkpoints
and of the LM head) stored as integers plus per-group scales (and offsets); a mixture of experts' stacked
matrices `[E, out, in]` are int8, one scale per expert and output channel (`weights.expert_mlp` reads them):

| kind   | values                  | group            | dequantized weight            | from                |
|--------|-------------------------|------------------|-------------------------------|---------------------|
| int8   | int8 `[out, in]`        | the whole row    | `v * s`, s = amax/127         | any float weight    |
| int4   | 4-bit, two a byte       | 32 / 64 / 128    | `(q - z) * s`, z uint8        | any float weight    |
| q8_0   | int8 `[out, in]`        | 32 (GGUF block)  | `v * d`, d float16            | a GGUF Q8_0 tensor  |
| q4_0   | 4-bit, two a byte       | 32 (GGUF block)  | `(q - 8) * d`                 | a GGUF Q4_0 tensor  |
| q4_1   | 4-bit, two a byte       | 32 (GGUF block)  | `q * d + m`, d, m float16     | a GGUF Q4_1 tensor  |

GGUF tensors are taken block for block: the same integers, the same float16 `d` (and `m`), never via
float; `dequantize` is bit-identical to `gguf.quants.dequantize`. Only the nibble order differs: GGUF
puts elements j and j+16 of a block in one byte; here byte j of a row holds column j (low nibble) and
column j + in_padded/2 (high nibble), in_padded being `in` rounded up to two whole groups. Why: the
matmul below then reads x as two contiguous halves, which XLA's CPU backend vectorises (a strided or
interleaved x makes the fused loop 4-5x slower, measured). The padding columns hold zeros and meet
zeros in x.

The matmul (`matmul(x, w)`) never materialises a float copy of a weight when few rows are multiplied
(decoding): each output is a `dot` whose weight operand is the elementwise dequantization, which
XLA fuses into one loop over the integers (on CPU, "copy_dot_fusion": 20-30 G weights/s for int8 on
2 cores, vs 8-10 G weights/s for a float32 matrix-vector product). That fusion only forms when the
dot is the last op of its fusion and x is one row, so rows are multiplied one at a time (up to
`MATVEC_ROWS`) and the two 4-bit halves' partial results are summed through a concatenation.
With more rows (prefill), the weight is dequantized once (one matrix at a time) and multiplied by a
dense dot: the float copy is transient, a few MB, and amortised over the rows.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

KINDS = ("int8", "int4", "q8_0", "q4_0", "q4_1")
GGUF_KINDS = {"Q8_0": "q8_0", "Q4_0": "q4_0", "Q4_1": "q4_1"}
GROUP_SIZES = (32, 64, 128)
GGUF_BLOCK = 32
MATVEC_ROWS = 4  # up to this many rows: one fused matrix-vector product per row (see module doc)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A quantized matrix `[out, in]` (see the module docstring for the kinds).

    values: int8 `[out, in]` (int8, q8_0) or uint8 `[out, in_padded // 2]` (int4, q4_0, q4_1); stacked
      experts: int8 `[E, out, in]`.
    scales: `[out, groups]`, float32 (int8, int4) or float16 (GGUF kinds); stacked experts `[E, out, 1]`.
    offsets: int4: zero points uint8 `[out, groups]`; q4_1: float16 mins `[out, groups]`; else None.
    kind, shape ((out, in), or (E, out, in)) and dtype (the float dtype of activations and results) are static.
    """

    values: jax.Array
    scales: jax.Array
    offsets: jax.Array | None
    kind: str = dataclasses.field(metadata=dict(static=True))
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True), default="float32")

    @property
    def four_bit(self) -> bool:
        return self.kind in ("int4", "q4_0", "q4_1")

    @property
    def padded_in(self) -> int:
        return self.values.shape[-1] * (2 if self.four_bit else 1)

    @property
    def group_size(self) -> int:
        return self.padded_in // self.scales.shape[-1]

    @property
    def nbytes(self) -> int:
        parts = (self.values, self.scales, self.offsets)
        return sum(math.prod(a.shape) * a.dtype.itemsize for a in parts if a is not None)


def _padded_in(columns: int, group_size: int, four_bit: bool) -> int:
    unit = 2 * group_size if four_bit else group_size
    return -(-columns // unit) * unit


def _pad_columns(w: np.ndarray, columns: int) -> np.ndarray:
    return np.pad(w, ((0, 0), (0, columns - w.shape[1])))


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """uint8 `[out, P]` with values < 16 -> `[out, P/2]`: column j low nibble, column j + P/2 high."""
    half = q.shape[1] // 2
    return (q[:, :half] | (q[:, half:] << 4)).astype(np.uint8)


def _unpack_nibbles(values: jax.Array) -> jax.Array:
    return jnp.concatenate([values & 15, values >> 4], axis=1)


# ------------------------------------------------------------------------------------------------
# Quantizing (host side, NumPy, at load or convert time).


def quantize_int8(weight: np.ndarray, dtype: str = "float32") -> QuantizedWeight:
    """Per-output-channel symmetric int8: `s = amax_row / 127`, `v = round(w / s)` (of each matrix of a
    stack `[E, out, in]` too)."""
    w = np.asarray(weight, np.float32)
    amax = np.max(np.abs(w), axis=-1, keepdims=True)
    scale = np.where(amax > 0, amax / 127, 1).astype(np.float32)
    values = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return QuantizedWeight(values, scale, None, "int8", w.shape, dtype)


def quantize_int4(weight: np.ndarray, group_size: int = 128, dtype: str = "float32") -> QuantizedWeight:
    """Group-wise asymmetric 4-bit (AWQ-style round to nearest): per group of `group_size` columns
    `s = (max - min) / 15`, `z = round(-min / s)`, `q = clamp(round(w / s) + z, 0, 15)`. The range is
    widened to include 0 (so z lies in [0, 15] and |w - (q - z) s| <= s/2 holds for every weight)."""
    if group_size not in GROUP_SIZES:
        raise ValueError(f"unsupported int4 group size {group_size}; use one of {', '.join(map(str, GROUP_SIZES))}")
    w = np.asarray(weight, np.float32)
    out, columns = w.shape
    padded = _pad_columns(w, _padded_in(columns, group_size, True))
    groups = padded.reshape(out, -1, group_size)
    low = np.minimum(groups.min(axis=2), 0)
    high = np.maximum(groups.max(axis=2), 0)
    scale = np.where(high > low, (high - low) / 15, 1).astype(np.float32)
    zero = np.clip(np.rint(-low / scale), 0, 15)
    q = np.clip(np.rint(groups / scale[..., None]) + zero[..., None], 0, 15).astype(np.uint8)
    return QuantizedWeight(
        _pack_nibbles(q.reshape(out, -1)), scale, zero.astype(np.uint8), "int4", (out, columns), dtype
    )


def from_gguf_blocks(blocks: np.ndarray, gguf_type: str, shape: tuple[int, int], dtype: str = "float32"):
    """A GGUF tensor's raw blocks (uint8 `[out, bytes per row]`, as GGUF stores them) ->
    QuantizedWeight, integers and float16 scales copied bit for bit."""
    kind = GGUF_KINDS.get(gguf_type)
    if kind is None:
        raise ValueError(f"GGUF type {gguf_type} has no native form; native supports {', '.join(GGUF_KINDS)}")
    out, columns = shape
    if columns % GGUF_BLOCK:
        raise ValueError(f"a {gguf_type} row of {columns} columns is not whole blocks of {GGUF_BLOCK}")
    header = {"q8_0": 2, "q4_0": 2, "q4_1": 4}[kind]
    payload = 32 if kind == "q8_0" else 16
    raw = np.ascontiguousarray(blocks, dtype=np.uint8).reshape(out, columns // GGUF_BLOCK, header + payload)
    scales = raw[..., 0:2].copy().view(np.float16)[..., 0]
    offsets = raw[..., 2:4].copy().view(np.float16)[..., 0] if kind == "q4_1" else None
    data = raw[..., header:]
    if kind == "q8_0":
        return QuantizedWeight(data.copy().view(np.int8).reshape(out, columns), scales, None, kind, shape, dtype)
    # A 4-bit block: byte j = element j (low nibble) and element j + 16 (high nibble).
    q = np.concatenate([data & 15, data >> 4], axis=2).reshape(out, columns)
    if columns % (2 * GGUF_BLOCK):  # our layout needs whole pairs of blocks: pad with one zero block
        q = _pad_columns(q, columns + GGUF_BLOCK)
        zeros = np.zeros((out, 1), np.float16)
        scales = np.concatenate([scales, zeros], axis=1)
        offsets = None if offsets is None else np.concatenate([offsets, zeros], axis=1)
    return QuantizedWeight(_pack_nibbles(q), scales, offsets, kind, shape, dtype)


def quantize(weight: np.ndarray, quant: str, group_size: int = 128, dtype: str = "float32") -> QuantizedWeight:
    """A float weight `[out, in]` -> "int8" or "int4" (group-wise)."""
    if quant == "int8":
        return quantize_int8(weight, dtype)
    if quant == "int4":
        return quantize_int4(weight, group_size, dtype)
    raise ValueError(f"unknown quantization {quant!r}; use int8 or int4 (or native for a GGUF's own blocks)")


# ------------------------------------------------------------------------------------------------
# Dequantizing and multiplying (traced, inside jit).


def _dequantize_columns(w: QuantizedWeight, integers: jax.Array, groups: slice) -> jax.Array:
    """float32 `[out, columns]` from integers `[out, columns]` and the scales/offsets of `groups`."""
    out, columns = integers.shape
    scale = w.scales[:, groups].astype(jnp.float32)
    count = scale.shape[1]
    q = integers.reshape(out, count, columns // count)
    if w.kind == "int4":
        q = q.astype(jnp.int32) - w.offsets[:, groups, None].astype(jnp.int32)
    elif w.kind == "q4_0":
        q = q.astype(jnp.int32) - 8
    result = q.astype(jnp.float32) * scale[..., None]
    if w.kind == "q4_1":
        result = result + w.offsets[:, groups, None].astype(jnp.float32)
    return result.reshape(out, columns)


def _dequantize_padded(w: QuantizedWeight) -> jax.Array:
    """float32 `[out, padded_in]` (padding columns are zeros)."""
    integers = _unpack_nibbles(w.values) if w.four_bit else w.values
    return _dequantize_columns(w, integers, slice(None))


def dequantize(w: QuantizedWeight) -> jax.Array:
    """The float32 matrix `[out, in]` (for GGUF kinds bit-identical to `gguf.quants.dequantize`), or the
    stacked experts' `[E, out, in]`."""
    if len(w.shape) == 3:
        return w.values.astype(jnp.float32) * w.scales
    return _dequantize_padded(w)[:, : w.shape[1]]


def take_rows(w: QuantizedWeight, ids: jax.Array) -> jax.Array:
    """Rows `ids` (int `[...]`) dequantized -> `[..., in]` in w.dtype (an embedding lookup)."""
    rows = QuantizedWeight(
        jnp.take(w.values, ids.reshape(-1), axis=0),
        jnp.take(w.scales, ids.reshape(-1), axis=0),
        None if w.offsets is None else jnp.take(w.offsets, ids.reshape(-1), axis=0),
        w.kind,
        (ids.size, w.shape[1]),
        w.dtype,
    )
    return dequantize(rows).reshape(*ids.shape, w.shape[1]).astype(w.dtype)


# The widest contraction one fused matrix-vector product takes at speed: XLA's CPU backend runs the fused
# dequantize-dot loop of a row of 4096 or more columns at 0.2-0.4 GB/s, against 15-30 GB/s up to 2048
# (int8 [4096, 4096]: 82 ms whole, 1.2 ms as two pieces of 2048 columns; AMD EPYC, 2 cores, measured).
MATVEC_COLUMNS = 2048


def _matvec_row(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """One row x float32 `[padded_in]` -> float32 `[out]` without a float copy of w (module doc)."""
    # Pieces: (first column in x, integers of the piece, its scale groups). A 4-bit weight's two nibble
    # halves are pieces of their own; every piece is at most MATVEC_COLUMNS wide and whole groups.
    width = w.values.shape[1]
    halves = (
        [(0, w.values & 15, 0), (width, w.values >> 4, w.scales.shape[1] // 2)] if w.four_bit else [(0, w.values, 0)]
    )
    per_row = w.scales.shape[1] == 1  # int8: one scale for the whole row
    step = MATVEC_COLUMNS if per_row else max(MATVEC_COLUMNS // w.group_size, 1) * w.group_size
    pieces = []
    for start, integers, first_group in halves:
        for c in range(0, width, step):
            part = integers[:, c : c + step]
            groups = (
                slice(0, 1)
                if per_row
                else slice(first_group + c // w.group_size, first_group + (c + part.shape[1]) // w.group_size)
            )
            # Written x @ W^T: XLA's CPU backend fuses the dequantization into the dot only in this
            # orientation (as W @ x it dequantizes W into a buffer and calls a library matmul: 35x slower).
            pieces.append(jnp.dot(x[start + c : start + c + part.shape[1]], _dequantize_columns(w, part, groups).T))
    if len(pieces) == 1:
        return pieces[0]
    # Summed through a concatenation: `a + b` would become the second dot's output fusion, which forces
    # its weight out into a float buffer (an optimization barrier does not stop that; measured).
    return jnp.concatenate(pieces).reshape(len(pieces), -1).sum(0)


def matmul(x: jax.Array, w: QuantizedWeight) -> jax.Array:
    """x `[..., in]` times w `[out, in]` (contracted on `in`) -> `[..., out]` in x's dtype,
    accumulated in float32. Inside a `shard_map` w may be one shard's part (`split_columns`): its
    arrays then hold fewer rows or columns than `w.shape` names, so the sizes come from the arrays."""
    *lead, columns = x.shape
    if columns > w.padded_in:
        raise ValueError(f"x has {columns} features, the quantized weight takes {w.shape[1]}")
    rows = math.prod(lead)
    flat = jnp.pad(x.reshape(rows, columns).astype(jnp.float32), ((0, 0), (0, w.padded_in - columns)))
    if rows > MATVEC_ROWS:
        y = lax.dot_general(flat, _dequantize_padded(w), (((1,), (1,)), ((), ())))
    else:
        # x + 0 through a reduction: a fusion boundary. Otherwise XLA fuses x's producers (the norm, even
        # the embedding lookup) into the dot loop and recomputes them for every output row (measured:
        # 1.5x slower matrix-vector products inside the model).
        flat = jnp.stack([flat, jnp.zeros_like(flat)]).sum(0)
        y = jnp.stack([_matvec_row(flat[r], w) for r in range(rows)])
    return y.reshape(*lead, w.values.shape[0]).astype(x.dtype)


def split_columns(w: QuantizedWeight, shards: int, xp: Any = np) -> QuantizedWeight:
    """w's input columns as `shards` equal parts laid side by side, each packed as a weight of its own
    (4-bit kinds: its own padding and nibble halves; see the module doc), so that splitting the arrays'
    columns `shards` ways gives every shard a valid weight over its `in / shards` input features.
    int8 and q8_0 need no re-packing (their columns split as they are). Needs whole groups per part
    (`weights.check_shardable`). `xp=jnp` traces it (abstract params)."""
    if not w.four_bit or shards == 1:
        return w
    out, columns = w.shape
    group, local = w.group_size, columns // shards
    per_part, padded = local // group, _padded_in(local, group, True)
    integers = xp.concatenate([w.values & 15, w.values >> 4], axis=1)

    def part(a: Any, index: int, size: int, width: int) -> Any:
        piece = a[:, index * size : (index + 1) * size]
        return xp.concatenate([piece, xp.zeros((out, width - size), a.dtype)], axis=1)

    values, scales, offsets = [], [], []
    for s in range(shards):
        q = part(integers, s, local, padded)
        values.append((q[:, : padded // 2] | (q[:, padded // 2 :] << 4)).astype(np.uint8))
        scales.append(part(w.scales, s, per_part, padded // group))  # zero scales: the padding is zeros
        if w.offsets is not None:
            offsets.append(part(w.offsets, s, per_part, padded // group))
    joined = [xp.concatenate(p, axis=1) if p else None for p in (values, scales, offsets)]
    return QuantizedWeight(*joined, w.kind, w.shape, w.dtype)


def is_quantized(leaf: Any) -> bool:
    return isinstance(leaf, QuantizedWeight)


def param_bytes(params: Any) -> int:
    """Bytes of a parameter pytree as stored (quantized weights count their integers and scales)."""
    leaves = jax.tree.leaves(params, is_leaf=is_quantized)
    # NumPy, jax.Array, QuantizedWeight and abstract (jax.ShapeDtypeStruct) leaves alike, no copy
    return sum(leaf.nbytes if is_quantized(leaf) else math.prod(leaf.shape) * leaf.dtype.itemsize for leaf in leaves)


QUANT_CHOICES = ("int8", "int4", "native")


def _is_experts(path) -> bool:
    return len(path) > 1 and getattr(path[-2], "key", None) == "experts"


def _is_router(path) -> bool:
    return len(path) > 1 and getattr(path[-2], "key", None) == "router"


EMBEDDING_NAMES = ("embed", "lm_head", "per_layer_embed")  # tables read by row (or whole, as the head)


def check_choice(quant: str | None, group_size: int) -> None:
    """Refuse an unknown quantization or int4 group size, naming the choices."""
    if quant not in (None, *QUANT_CHOICES):
        raise ValueError(f"unknown quantization {quant!r}; use one of: {', '.join(QUANT_CHOICES)}")
    if quant == "int4" and group_size not in GROUP_SIZES:
        raise ValueError(f"unsupported int4 group size {group_size}; use one of {', '.join(map(str, GROUP_SIZES))}")


def quantize_params(params: Any, quant: str, group_size: int = 128, dtype: str = "float32") -> Any:
    """Host params (Linear weights `[out, in]`, as loaders return them) with every Linear weight and the
    embedding / LM head quantized. With "int4" the embedding and LM head are int8 (per vocabulary row):
    they are read whole every token and matter most for accuracy, as in llama.cpp's 4-bit files. Stacked
    experts are int8 whatever `quant` is (per expert and output channel); a router stays float (its
    scores pick the experts)."""

    def convert(path, leaf):
        name = getattr(path[-1], "key", None)
        if _is_experts(path):
            return quantize_int8(leaf, dtype)
        if _is_router(path):
            return leaf
        if name in EMBEDDING_NAMES:
            return quantize_int8(leaf, dtype)
        if name == "weight" and np.ndim(leaf) == 2:
            return quantize(leaf, quant, group_size, dtype)
        return leaf

    return jax.tree_util.tree_map_with_path(convert, params)


def quantize_abstract(params: Any, quant: str, group_size: int = 128, dtype: str = "float32") -> Any:
    """What `quantize_params` makes of a model, as shapes only: abstract params in the model's layout
    (`jax.eval_shape(init_params, ...)`, Linear weights `[in, out]`) -> the same tree with the quantized
    leaves as `QuantizedWeight`s of `jax.ShapeDtypeStruct`s (no weights needed: `jaxdecode.plan`).

    The shapes come from quantizing one zero row of each weight with the real quantizer, so they cannot
    drift from what loading produces."""

    def convert(path, leaf):
        name = getattr(path[-1], "key", None)
        if _is_experts(path):
            values = jax.ShapeDtypeStruct(leaf.shape, np.int8)
            scales = jax.ShapeDtypeStruct((*leaf.shape[:-1], 1), np.float32)
            return QuantizedWeight(values, scales, None, "int8", tuple(leaf.shape), dtype)
        if _is_router(path):
            return leaf
        if name in EMBEDDING_NAMES:
            kind, (out, columns) = "int8", leaf.shape
        elif name == "weight" and len(leaf.shape) == 2:
            kind, (columns, out) = quant, leaf.shape
        else:
            return leaf
        row = quantize(np.zeros((1, columns), np.float32), kind, group_size, dtype)

        def grow(a):
            return None if a is None else jax.ShapeDtypeStruct((out, *a.shape[1:]), a.dtype)

        return QuantizedWeight(grow(row.values), grow(row.scales), grow(row.offsets), row.kind, (out, columns), dtype)

    return jax.tree_util.tree_map_with_path(convert, params)
