"""GGUF files: metadata -> `ModelConfig`, tensors -> the parameter pytree, tokenizer from metadata.

Reading uses the `gguf` package (memory-mapped). Weights are dequantised with
`gguf.quants.dequantize`, the reference implementation.

llama.cpp's converter permutes the rows of the Q and K projections so that RoPE rotates adjacent
pairs; our model (like HF) rotates halves, so the loader undoes that permutation.
"""

from __future__ import annotations

import dataclasses
import math
import os
import struct
import warnings
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..config import MAX_LAYERS, ModelConfig, RopeScaling
from ..quantize import GGUF_KINDS, QuantizedWeight, from_gguf_blocks, quantize_int8
from .tokenizer import Tokenizer, tokenizer_from_gguf
from .validate import ModelFileError, expected_shapes

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "qwen2moe", "qwen3moe")
# GGUF architecture -> our family, where the names differ (`llama` with experts is Mixtral).
_FAMILIES = {"qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}
# Whether llama.cpp renormalises the top-k routing weights when the file does not say
# (`{arch}.expert_weights_norm`): Mixtral and Qwen3-MoE do, Qwen2-MoE does not.
_NORMALIZE_ROUTING = {"llama": True, "qwen2moe": False, "qwen3moe": True}
# Architectures whose RoPE llama.cpp applies to adjacent pairs, so its converter permuted Q/K rows
# (the others use the NEOX, rotate-half layout, as HF and this model do).
_PERMUTED_QK = ("llama",)
_GEMMAS = ("gemma", "gemma2", "gemma3")

GGUF_MAGIC = b"GGUF"
_MAX_DIMS = 4  # GGML_MAX_DIMS
# GGUF metadata value types -> numpy dtypes (little-endian); 7 is bool, 8 string, 9 array.
_VALUE_DTYPES = {
    0: "<u1",
    1: "<i1",
    2: "<u2",
    3: "<i2",
    4: "<u4",
    5: "<i4",
    6: "<f4",
    7: "<u1",
    10: "<u8",
    11: "<i8",
    12: "<f8",
}
_STRING, _ARRAY, _BOOL = 8, 9, 7
_STRUCT_FORMATS = {"<u1": "<B", "<i1": "<b", "<u2": "<H", "<i2": "<h", "<u4": "<I", "<i4": "<i", "<f4": "<f"}
_STRUCT_FORMATS.update({"<u8": "<Q", "<i8": "<q", "<f8": "<d"})
# Tensor types stored as plain numbers (read as such); every other type is read as raw bytes per row.
_PLAIN_TENSOR_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "<i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file. `shape` is in GGUF's order (fastest-varying dimension first); `data` is a
    read-only memory map in numpy order: numbers for plain types, uint8 `[..., bytes per row]` for blocks;
    `offset` is where the data starts in the file."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray
    offset: int

    @property
    def numpy_shape(self) -> tuple[int, ...]:
        """The logical shape in numpy order (`[rows, columns]` for a matrix)."""
        return tuple(reversed(self.shape))

    @property
    def n_bytes(self) -> int:
        return int(self.data.nbytes)


class _Cursor:
    """Reads little-endian GGUF fields from a byte buffer; every length and count is checked against the
    bytes left *before* anything is allocated or looped over, so a hostile header cannot make it loop or
    allocate without bound."""

    def __init__(self, buffer: memoryview):
        self.buffer, self.pos = buffer, 0

    def left(self) -> int:
        return len(self.buffer) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.left():
            raise ValueError(f"{what} needs {n} bytes at offset {self.pos}, but the file has {self.left()} left")
        view = self.buffer[self.pos : self.pos + n]
        self.pos += n
        return view

    def number(self, dtype: str, what: str) -> Any:
        fmt = _STRUCT_FORMATS[dtype]
        if struct.calcsize(fmt) > self.left():
            raise ValueError(f"{what} needs {struct.calcsize(fmt)} bytes at offset {self.pos}, the file ends first")
        (value,) = struct.unpack_from(fmt, self.buffer, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self, what: str) -> str:
        length = self.number("<u8", what)
        raw = self.take(length, what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what} is not valid UTF-8 ({e.reason} at byte {self.pos - length + e.start})") from e

    def value(self, kind: int, what: str) -> Any:
        if kind == _STRING:
            return self.string(what)
        if kind == _ARRAY:
            item_kind, count = self.number("<u4", what), self.number("<u8", what)
            if item_kind in _VALUE_DTYPES:
                dtype = np.dtype(_VALUE_DTYPES[item_kind])
                if count > self.left() // dtype.itemsize:
                    raise ValueError(f"{what}: an array of {count} items does not fit in the file")
                items = np.frombuffer(self.take(count * dtype.itemsize, what), dtype).tolist()
                return [bool(x) for x in items] if item_kind == _BOOL else items
            if item_kind in (_STRING, _ARRAY):
                # Each item takes at least 8 bytes (a length or a type + count), so `count` is bounded too.
                if count > self.left() // 8:
                    raise ValueError(f"{what}: an array of {count} items does not fit in the file")
                return [self.value(item_kind, what) for _ in range(count)]
            raise ValueError(f"{what}: unknown array item type {item_kind}")
        if kind in _VALUE_DTYPES:
            item = self.number(_VALUE_DTYPES[kind], what)
            return bool(item) if kind == _BOOL else item
        raise ValueError(f"{what}: unknown value type {kind}")


class GGUFFile:
    """An opened, validated GGUF file: its metadata dict and tensors by name.

    The header is parsed here (not with `gguf.GGUFReader`, which loops over every element of a metadata
    array in Python: 28 s for Gemma's 262k-token vocabulary, and without bound on a hostile count); the
    tensor data is memory-mapped and dequantized with `gguf.quants`.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such GGUF file: {self.path}")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ModelFileError(self.path, f"is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        try:
            self.metadata, self.tensors = self._parse(memoryview(self._map))
        except ValueError as e:
            raise ModelFileError(self.path, f"is a corrupt or truncated GGUF file ({e})") from e
        self.converted_types: set[str] = set()  # quantized types `native` turned into int8

    def _parse(self, buffer: memoryview) -> tuple[dict[str, Any], dict[str, GGUFTensor]]:
        cursor = _Cursor(buffer)
        cursor.take(4, "magic")
        version = cursor.number("<u4", "version")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} (supported: 2, 3; a big-endian file reads as a huge number)")
        tensor_count, kv_count = cursor.number("<u8", "tensor count"), cursor.number("<u8", "metadata count")
        if kv_count > len(buffer) // 12 or tensor_count > len(buffer) // 28:  # each takes at least that many bytes
            raise ValueError(f"{kv_count} metadata entries and {tensor_count} tensors do not fit in the file")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = cursor.string("a metadata key")
            metadata[key] = cursor.value(cursor.number("<u4", f"type of {key}"), key)
        infos = []
        for _ in range(tensor_count):
            name = cursor.string("a tensor name")
            n_dims = cursor.number("<u4", f"{name} dims")
            if not 1 <= n_dims <= _MAX_DIMS:
                raise ValueError(f"tensor {name!r} has {n_dims} dimensions (1..{_MAX_DIMS})")
            dims = tuple(cursor.number("<u8", f"{name} shape") for _ in range(n_dims))
            kind = cursor.number("<u4", f"{name} type")
            offset = cursor.number("<u8", f"{name} offset")
            try:
                qtype = gguf.GGMLQuantizationType(kind)
            except ValueError as e:
                raise ValueError(f"tensor {name!r} has unknown type {kind}") from e
            infos.append((name, dims, qtype, offset))
        alignment = metadata.get("general.alignment", 32)
        if (
            isinstance(alignment, bool)
            or not isinstance(alignment, int)
            or alignment < 1
            or alignment & (alignment - 1)
        ):
            raise ValueError(f"general.alignment must be a power of two, got {alignment!r}")
        data_start = -(-cursor.pos // alignment) * alignment
        tensors: dict[str, GGUFTensor] = {}
        for name, dims, qtype, offset in infos:
            if name in tensors:
                raise ValueError(f"tensor {name!r} appears twice")
            if offset % alignment:
                raise ValueError(f"tensor {name!r} starts at data offset {offset}, not a multiple of {alignment}")
            tensors[name] = self._tensor(buffer, name, dims, qtype, data_start + offset, data_start)
        previous = None
        for t in sorted(tensors.values(), key=lambda t: t.offset):
            if previous is not None and t.offset < previous.offset + previous.n_bytes:
                raise ValueError(f"tensors {previous.name!r} and {t.name!r} overlap in the file")
            previous = t
        return metadata, tensors

    def _tensor(self, buffer: memoryview, name: str, dims: tuple[int, ...], qtype, start: int, data_start: int):
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if any(d < 1 for d in dims) or dims[0] % block:
            raise ValueError(
                f"tensor {name!r} has shape {list(dims)} (each dimension >= 1, the first a multiple of {block})"
            )
        elements = math.prod(dims)
        n_bytes = elements // block * type_size
        if start + n_bytes > len(buffer):
            raise ValueError(
                f"tensor {name!r} ({n_bytes} bytes at offset {start}) runs past the end of the file "
                f"({len(buffer)} bytes; data starts at {data_start})"
            )
        raw = self._map[start : start + n_bytes]
        numpy_shape = tuple(reversed(dims))
        plain = _PLAIN_TENSOR_DTYPES.get(qtype.name)
        if plain is not None:
            data = raw.view(plain).reshape(numpy_shape)
        else:
            data = raw.reshape(*numpy_shape[:-1], dims[0] // block * type_size)
        return GGUFTensor(name, qtype, dims, data, start)

    @property
    def data_bytes(self) -> int:
        """Bytes of all tensor data as stored."""
        return sum(t.n_bytes for t in self.tensors.values())

    @property
    def architecture(self) -> str:
        return self.metadata.get("general.architecture", "<missing>")

    def array(self, name: str) -> np.ndarray:
        """The tensor `name` dequantised to float32, in row-major `[out, in]` order."""
        if name not in self.tensors:
            raise ModelFileError(self.path, "is missing", f"tensor {name}")
        t = self.tensors[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)

    def native(self, name: str, dtype: str) -> QuantizedWeight | np.ndarray:
        """The tensor `name` as stored: a Q8_0 / Q4_0 / Q4_1 matrix as a QuantizedWeight (its blocks,
        never via float), a float tensor as a float32 array. A matrix of another quantized type (K-quants,
        Q5_0, ...) is dequantized and re-quantized to int8 per output channel; its type is added to
        `self.converted_types`."""
        if name not in self.tensors:
            raise ModelFileError(self.path, "is missing", f"tensor {name}")
        t = self.tensors[name]
        kind = t.tensor_type.name
        if kind in ("F32", "F16", "BF16") or len(t.shape) != 2:
            return self.array(name)
        if kind not in GGUF_KINDS:
            self.converted_types.add(kind)
            return quantize_int8(self.array(name), dtype)
        columns, rows = (int(n) for n in t.shape)  # GGUF lists the fastest-varying dimension first
        return from_gguf_blocks(t.data, kind, (rows, columns), dtype)


def _metadata_reader(metadata: dict[str, Any], arch: str):
    """Typed getters for `{arch}.*` metadata: a ValueError naming the key for a missing or ill-typed value
    (the ranges are checked by `ModelConfig`)."""

    def value(key: str, default: Any, kinds: tuple[type, ...], what: str) -> Any:
        full = f"{arch}.{key}"
        if full not in metadata:
            if default is _REQUIRED:
                raise ValueError(f"GGUF metadata lacks {full!r}")
            return default
        found = metadata[full]
        if isinstance(found, bool) or not isinstance(found, kinds):
            raise ValueError(f"GGUF metadata {full!r} must be {what}, got {found!r}")
        return found

    def integer(key: str, default: Any = _REQUIRED) -> int:
        return value(key, default, (int,), "an integer")

    def number(key: str, default: Any = _REQUIRED) -> float:
        found = value(key, default, (int, float), "a number")
        return None if found is None else float(found)

    def string(key: str, default: Any = _REQUIRED) -> str:
        return value(key, default, (str,), "a string")

    return integer, number, string


_REQUIRED = object()


def config_from_gguf(metadata: dict[str, Any], tensors: dict[str, Any] | None = None) -> ModelConfig:
    """A `ModelConfig` from GGUF metadata (keys as llama.cpp writes them) and, where llama.cpp keeps
    settings as tensors (RoPE frequency factors; bias tensors), the file's tensors (arrays, or for the
    biases anything: only their presence is read)."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    tensors = tensors or {}
    integer, number, string = _metadata_reader(metadata, arch)

    d_model = integer("embedding_length")
    heads = integer("attention.head_count")
    layers = integer("block_count")
    if heads < 1:
        raise ValueError(f"GGUF metadata {arch}.attention.head_count must be >= 1, got {heads}")
    head_dim = integer("attention.key_length", d_model // heads)
    vocab = integer("vocab_size", None)
    if vocab is None:
        tokens = metadata.get("tokenizer.ggml.tokens")
        if not isinstance(tokens, list):
            raise ValueError("GGUF metadata lacks both the vocabulary size and tokenizer.ggml.tokens")
        vocab = len(tokens)
    rotary_dim = integer("rope.dimension_count", head_dim)
    context = integer("context_length")
    settings: dict[str, Any] = {}
    scaling_type = string("rope.scaling.type", "none")
    scaling: RopeScaling | None = None
    if scaling_type == "linear":
        scaling = RopeScaling("linear", number("rope.scaling.factor"))
    elif scaling_type != "none":
        raise ValueError(f"unsupported GGUF RoPE scaling {scaling_type!r}; supported: none, linear")
    long_factors, short_factors = tensors.get("rope_factors_long.weight"), tensors.get("rope_factors_short.weight")
    if long_factors is not None:  # Phi-3 longrope: the factor lists are tensors
        if short_factors is None:
            raise ValueError("GGUF file has rope_factors_long.weight but no rope_factors_short.weight")
        original = integer("rope.scaling.original_context_length")
        if original < 2:
            raise ValueError(f"GGUF metadata {arch}.rope.scaling.original_context_length must be >= 2, got {original}")
        factor = context / original
        default_attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        scaling = RopeScaling(
            "longrope",
            factor,
            original_max_position=original,
            short_factor=tuple(float(x) for x in np.ravel(short_factors)),
            long_factor=tuple(float(x) for x in np.ravel(long_factors)),
            attention_factor=number("rope.scaling.attn_factor", default_attention),
        )
    elif tensors.get("rope_freqs.weight") is not None:
        # Llama 3.1's scaling, precomputed by the converter as per-frequency divisors: a longrope with
        # one factor set and no attention factor is exactly that.
        divisors = tuple(float(x) for x in np.ravel(tensors["rope_freqs.weight"]))
        scaling = RopeScaling(
            "longrope", 1.0, original_max_position=context, short_factor=divisors, long_factor=divisors
        )
    if arch in _GEMMAS:
        settings.update(norm_offset=1.0, embed_scale=True, activation="gelu_tanh", norm_eps=1e-6)
    if arch in ("gemma2", "gemma3"):
        window = integer("attention.sliding_window")
        pattern = 2 if arch == "gemma2" else 6  # llama.cpp's fixed patterns: every 2nd / 6th layer global
        layer_types = tuple("sliding" if (i + 1) % pattern else "full" for i in range(min(layers, MAX_LAYERS)))
        # llama.cpp: the 27B models scale scores by (d_model / heads)^-0.5, the others by head_dim^-0.5.
        is_27b = layers == (46 if arch == "gemma2" else 62)
        settings.update(
            sliding_window=window,
            layer_types=layer_types,
            sandwich_norm=True,
            attn_scale=(d_model / heads) ** -0.5 if is_27b else head_dim**-0.5 if head_dim > 0 else 0.0,
        )
    if arch == "gemma2":
        settings.update(
            attn_softcap=number("attn_logit_softcapping", 50.0), final_softcap=number("final_logit_softcapping", 30.0)
        )
    if arch == "gemma3":
        settings.update(qk_norm=True, rope_local_theta=10000.0)
    if arch in ("qwen3", "qwen3moe"):
        settings.update(qk_norm=True)
    experts = integer("expert_count", 0)
    if arch in _NORMALIZE_ROUTING and experts:
        normalize = metadata.get(f"{arch}.expert_weights_norm", _NORMALIZE_ROUTING[arch])
        if not isinstance(normalize, bool):
            raise ValueError(f"GGUF metadata {arch}.expert_weights_norm must be true or false, got {normalize!r}")
        settings.update(
            num_experts=experts,
            experts_per_token=integer("expert_used_count"),
            expert_ffn_dim=integer("expert_feed_forward_length", None) or integer("feed_forward_length"),
            normalize_routing=normalize,
            shared_expert_dim=integer("expert_shared_feed_forward_length", 0) if arch == "qwen2moe" else 0,
        )
    elif arch in _FAMILIES:
        raise ValueError(f"GGUF metadata lacks {arch}.expert_count (a {arch} model has experts)")
    if arch == "phi3" and integer("attention.sliding_window", None):
        settings.update(sliding_window=integer("attention.sliding_window"))
    if f"{arch}.attention.layer_norm_rms_epsilon" in metadata:
        settings["norm_eps"] = number("attention.layer_norm_rms_epsilon")
    return ModelConfig(
        family="mixtral" if arch == "llama" and experts else _FAMILIES.get(arch, arch),
        vocab_size=vocab,
        d_model=d_model,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=integer("attention.head_count_kv", heads),
        head_dim=head_dim,
        ffn_dim=integer("feed_forward_length", settings.get("expert_ffn_dim")),
        max_seq_len=context,
        rope_theta=number("rope.freq_base", 10000.0),
        rope_scaling=scaling,
        rotary_dim=None if rotary_dim == head_dim else rotary_dim,
        # Biases and the LM head: as the file has them (Qwen2 has QKV biases; a tied model has no output).
        qkv_bias="blk.0.attn_q.bias" in tensors,
        tie_embeddings="output.weight" not in tensors,
        **settings,
    )


def _unpermute(weight: np.ndarray | QuantizedWeight, num_heads: int) -> np.ndarray | QuantizedWeight:
    """Undo llama.cpp's Q/K row permutation (adjacent-pair RoPE back to rotate-half order)."""
    if isinstance(weight, QuantizedWeight):  # rows are output channels in every part of it
        parts = ("values", "scales", "offsets")
        rows = {p: _unpermute(getattr(weight, p), num_heads) for p in parts if getattr(weight, p) is not None}
        return dataclasses.replace(weight, **rows)
    out = weight.shape[0]
    half = out // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


# Our parameter path (after "layer_{i}/") -> llama.cpp's tensor name (after "blk.{i}."). In Gemma 2/3
# `ffn_norm` is the pre-MLP norm and post_attention_norm / post_ffw_norm the sandwich norms.
_BLOCK_NAMES = {
    "attn_norm/scale": "attn_norm.weight",
    "mlp_norm/scale": "ffn_norm.weight",
    "post_attn_norm/scale": "post_attention_norm.weight",
    "post_mlp_norm/scale": "post_ffw_norm.weight",
    "attn/q/weight": "attn_q.weight",
    "attn/k/weight": "attn_k.weight",
    "attn/v/weight": "attn_v.weight",
    "attn/o/weight": "attn_output.weight",
    "attn/q/bias": "attn_q.bias",
    "attn/k/bias": "attn_k.bias",
    "attn/v/bias": "attn_v.bias",
    "attn/q_norm/scale": "attn_q_norm.weight",
    "attn/k_norm/scale": "attn_k_norm.weight",
    "mlp/gate/weight": "ffn_gate.weight",
    "mlp/up/weight": "ffn_up.weight",
    "mlp/down/weight": "ffn_down.weight",
    # Mixtures of experts: the router, the stacked experts [E, out, in], Qwen2-MoE's shared expert and its gate.
    "moe/router/weight": "ffn_gate_inp.weight",
    "moe/experts/gate": "ffn_gate_exps.weight",
    "moe/experts/up": "ffn_up_exps.weight",
    "moe/experts/down": "ffn_down_exps.weight",
    "moe/shared/gate/weight": "ffn_gate_shexp.weight",
    "moe/shared/up/weight": "ffn_up_shexp.weight",
    "moe/shared/down/weight": "ffn_down_shexp.weight",
    "moe/shared_gate/weight": "ffn_gate_inp_shexp.weight",
}
# llama.cpp stores the shared expert's one-row gate as a vector [d].
_VECTOR_FOR_ROW = ("moe/shared_gate/weight",)
_TOP_NAMES = {"embed": "token_embd.weight", "lm_head": "output.weight", "final_norm/scale": "output_norm.weight"}
# Tensors that hold settings rather than weights (read by `config_from_gguf`).
_SETTING_TENSORS = ("rope_factors_long.weight", "rope_factors_short.weight", "rope_freqs.weight")


@dataclasses.dataclass(frozen=True)
class _Source:
    """Where one parameter comes from: rows [start, stop) of GGUF tensor `name` (all rows: stop None)."""

    name: str
    start: int = 0
    stop: int | None = None


def _tensor_plan(config: ModelConfig, tensors: dict[str, GGUFTensor], path: Path) -> dict[str, _Source]:
    """Our parameter path -> its GGUF source, for every parameter the config needs, with every tensor's
    shape checked against the config before anything is read (ModelFileError naming the tensor). Phi-3's
    fused attn_qkv (rows [q; k; v]) and ffn_up (rows [gate; up]) are split by rows."""
    expected = expected_shapes(config)
    plan: dict[str, _Source] = {}
    fused_rows: dict[str, int] = {}
    q_rows, kv_rows = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    for ours in expected:
        layer, _, rest = ours.partition("/")
        if ours in _TOP_NAMES:
            plan[ours] = _Source(_TOP_NAMES[ours])
            continue
        if not layer.startswith("layer_") or rest not in _BLOCK_NAMES:
            raise ModelFileError(path, f"a {config.family} GGUF file has no tensor for our parameter {ours}")
        blk = f"blk.{layer[6:]}."
        source = _Source(blk + _BLOCK_NAMES[rest])
        if rest in ("attn/q/weight", "attn/k/weight", "attn/v/weight") and blk + "attn_qkv.weight" in tensors:
            start = {"q": 0, "k": q_rows, "v": q_rows + kv_rows}[rest[5]]
            source = _Source(blk + "attn_qkv.weight", start, start + expected[ours][0])
        elif rest in ("mlp/gate/weight", "mlp/up/weight") and blk + "ffn_gate.weight" not in tensors:
            start = 0 if rest == "mlp/gate/weight" else config.ffn_dim
            source = _Source(blk + "ffn_up.weight", start, start + config.ffn_dim)
        if source.stop is not None:
            fused_rows[source.name] = max(fused_rows.get(source.name, 0), source.stop)
        plan[ours] = source
    for ours, source in plan.items():
        if source.name not in tensors:
            raise ModelFileError(path, f"is missing (a {config.family} model with this config needs it)", source.name)
        shape = tensors[source.name].numpy_shape
        if source.stop is not None:
            if shape[0] != fused_rows[source.name]:
                raise ModelFileError(
                    path, f"has {shape[0]} rows, expected {fused_rows[source.name]} from the config", source.name
                )
            shape = (source.stop - source.start, *shape[1:])
        if ours.partition("/")[2] in _VECTOR_FOR_ROW and (1, *shape) == expected[ours]:
            shape = expected[ours]
        if shape != expected[ours]:
            raise ModelFileError(
                path,
                f"has shape {list(shape)}, expected {list(expected[ours])} from the config (d_model={config.d_model}, "
                f"heads={config.num_heads}, kv_heads={config.num_kv_heads}, head_dim={config.head_dim}, "
                f"ffn={config.ffn_dim}, vocab={config.vocab_size})",
                source.name,
            )
    used = {source.name for source in plan.values()} | set(_SETTING_TENSORS)
    unused = sorted(set(tensors) - used)
    if unused:
        raise ModelFileError(
            path, f"is not used by a {config.family} model with this config ({len(unused)} such tensors)", unused[0]
        )
    return plan


@dataclasses.dataclass
class GGUFModel:
    """A GGUF file whose metadata, tensor table and tokenizer have all been validated (nothing read yet
    but the header): its config, the plan of which tensor feeds which parameter, and the tokenizer."""

    file: GGUFFile
    config: ModelConfig
    plan: dict[str, _Source]
    tokenizer: Tokenizer


def open_model(path: str | os.PathLike[str]) -> GGUFModel:
    """Open and validate a GGUF model file: header, metadata, tensor table (offsets, sizes, every tensor's
    shape against the config) and tokenizer. Raises ModelFileError naming the file and what is wrong."""
    f = GGUFFile(path)
    try:
        factors = {n: f.array(n) for n in _SETTING_TENSORS if n in f.tensors}
        config = config_from_gguf(f.metadata, {**f.tensors, **factors})
    except ModelFileError:
        raise
    except ValueError as e:
        raise ModelFileError(f.path, str(e)) from e
    plan = _tensor_plan(config, f.tensors, f.path)
    tokenizer = tokenizer_from_gguf(f.metadata, config.vocab_size, f.path)
    return GGUFModel(f, config, plan, tokenizer)


def load_gguf(
    path: str | os.PathLike[str], dtype: Any, native: bool = False
) -> tuple[ModelConfig, dict[str, Any], Tokenizer]:
    """Read a GGUF file: (config, params cast to `dtype` with Linear weights `[out, in]` as stored, tokenizer).
    With `native`, Q8_0 / Q4_0 / Q4_1 matrices stay in their GGUF blocks (`QuantizedWeight`, see
    quantize.py) and other quantized types become int8 (one warning names them)."""
    model = open_model(path)
    f, config = model.file, model.config
    arch = f.architecture
    dtype_name = np.dtype(dtype).name
    params: dict[str, Any] = {}
    for ours, source in model.plan.items():
        if source.stop is not None:  # a slice of a fused tensor: dequantized, then re-quantized if native
            value = _requantize(f.array(source.name)[source.start : source.stop], f, source.name, native, dtype_name)
        elif ours.endswith("/scale") and arch in _GEMMAS:
            # llama.cpp's converter stores Gemma's RMSNorm weights as (1 + w); the model adds the 1 itself.
            value = f.array(source.name) - 1.0
        elif native and "/experts/" in ours:
            value = _requantize(f.array(source.name), f, source.name, native, dtype_name, "stacked experts")
        else:
            value = f.native(source.name, dtype_name) if native else f.array(source.name)
        if ours.partition("/")[2] in _VECTOR_FOR_ROW:
            value = value.reshape(expected_shapes(config)[ours])
        if arch in _PERMUTED_QK and ours.endswith(("attn/q/weight", "attn/k/weight")):
            value = _unpermute(value, config.num_heads if "/q/" in ours else config.num_kv_heads)
        *parents, leaf = ours.split("/")
        node = params
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value if isinstance(value, QuantizedWeight) else value.astype(dtype)
    if f.converted_types:
        warnings.warn(
            f"{f.path.name}: quant='native' keeps {', '.join(GGUF_KINDS)} blocks; its "
            f"{', '.join(sorted(f.converted_types))} matrices were converted to int8 per channel",
            stacklevel=2,
        )
    return config, params, model.tokenizer


def _requantize(
    part: np.ndarray, f: GGUFFile, name: str, native: bool, dtype: str, what: str = "fused"
) -> np.ndarray | QuantizedWeight:
    """A slice of a fused tensor, or stacked experts (already dequantized): float, or with `native` int8
    (the slice boundaries need not fall on GGUF blocks of the fused rows' layout; stacked experts are int8
    in every quantization, see quantize.py), so blocks are not kept."""
    if not native or f.tensors[name].tensor_type.name in ("F32", "F16", "BF16"):
        return part.astype(dtype)
    f.converted_types.add(f"{f.tensors[name].tensor_type.name} ({what})")
    return quantize_int8(part, dtype)
