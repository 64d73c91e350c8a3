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
import warnings
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..config import ModelConfig, RopeScaling
from ..quantize import GGUF_KINDS, QuantizedWeight, from_gguf_blocks, quantize_int8
from .tokenizer import Tokenizer, tokenizer_from_gguf

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3")
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
# Tensor types stored as plain numbers (read as such); every other type is read as raw bytes per row.
_PLAIN_TENSOR_DTYPES = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "I8": "<i1", "I16": "<i2", "I32": "<i4", "I64": "<i8"}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file. `shape` is in GGUF's order (fastest-varying dimension first); `data` is a
    read-only memory map in numpy order: numbers for plain types, uint8 `[..., bytes per row]` for blocks."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]
    data: np.ndarray

    @property
    def n_bytes(self) -> int:
        return int(self.data.nbytes)


class _Cursor:
    """Reads little-endian GGUF fields from a byte buffer; every length and count is checked against the
    bytes left *before* anything is allocated or looped over, so a hostile header cannot make it loop or
    allocate without bound."""

    def __init__(self, buffer: memoryview):
        self.buffer, self.pos = buffer, 0

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > len(self.buffer) - self.pos:
            raise ValueError(
                f"{what} needs {n} bytes at offset {self.pos}, but the file has {len(self.buffer) - self.pos} left"
            )
        view = self.buffer[self.pos : self.pos + n]
        self.pos += n
        return view

    def number(self, dtype: str, what: str) -> Any:
        return np.frombuffer(self.take(np.dtype(dtype).itemsize, what), dtype)[0].item()

    def string(self, what: str) -> str:
        length = self.number("<u8", what)
        raw = self.take(length, what)
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{what} is not valid UTF-8 ({e})") from e

    def value(self, kind: int, what: str) -> Any:
        if kind == _STRING:
            return self.string(what)
        if kind == _ARRAY:
            item_kind, count = self.number("<u4", what), self.number("<u8", what)
            if item_kind in _VALUE_DTYPES:
                dtype = np.dtype(_VALUE_DTYPES[item_kind])
                if count > (len(self.buffer) - self.pos) // dtype.itemsize:
                    raise ValueError(f"{what}: an array of {count} items does not fit in the file")
                items = np.frombuffer(self.take(count * dtype.itemsize, what), dtype).tolist()
                return [bool(x) for x in items] if item_kind == _BOOL else items
            if item_kind in (_STRING, _ARRAY):
                # Each item takes at least 8 bytes (a length or a type + count), so `count` is bounded too.
                if count > (len(self.buffer) - self.pos) // 8:
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
            raise ValueError(f"{self.path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        self._map = np.memmap(self.path, dtype=np.uint8, mode="r")
        try:
            self.metadata, self.tensors = self._parse(memoryview(self._map))
        except ValueError as e:
            raise ValueError(f"{self.path} is a corrupt or truncated GGUF file ({e})") from e
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
        if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
            raise ValueError(f"general.alignment must be a power of two, got {alignment!r}")
        data_start = -(-cursor.pos // alignment) * alignment
        tensors = {}
        for name, dims, qtype, offset in infos:
            if name in tensors:
                raise ValueError(f"tensor {name!r} appears twice")
            tensors[name] = self._tensor(buffer, name, dims, qtype, data_start + offset)
        return metadata, tensors

    def _tensor(self, buffer: memoryview, name: str, dims: tuple[int, ...], qtype, start: int) -> GGUFTensor:
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if any(d < 1 for d in dims) or dims[0] % block:
            raise ValueError(
                f"tensor {name!r} has shape {list(dims)} (the first dimension must be a multiple of {block})"
            )
        elements = math.prod(dims)
        n_bytes = elements // block * type_size
        if start + n_bytes > len(buffer):
            raise ValueError(f"tensor {name!r} ({n_bytes} bytes at {start}) runs past the end of the file")
        raw = self._map[start : start + n_bytes]
        numpy_shape = tuple(reversed(dims))
        plain = _PLAIN_TENSOR_DTYPES.get(qtype.name)
        if plain is not None:
            data = raw.view(plain).reshape(numpy_shape)
        else:
            data = raw.reshape(*numpy_shape[:-1], dims[0] // block * type_size)
        return GGUFTensor(name, qtype, dims, data)

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
            raise ValueError(f"{self.path} has no tensor {name!r}")
        t = self.tensors[name]
        return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)

    def native(self, name: str, dtype: str) -> QuantizedWeight | np.ndarray:
        """The tensor `name` as stored: a Q8_0 / Q4_0 / Q4_1 matrix as a QuantizedWeight (its blocks,
        never via float), a float tensor as a float32 array. A matrix of another quantized type (K-quants,
        Q5_0, ...) is dequantized and re-quantized to int8 per output channel; its type is added to
        `self.converted_types`."""
        if name not in self.tensors:
            raise ValueError(f"{self.path} has no tensor {name!r}")
        t = self.tensors[name]
        kind = t.tensor_type.name
        if kind in ("F32", "F16", "BF16") or len(t.shape) != 2:
            return self.array(name)
        if kind not in GGUF_KINDS:
            self.converted_types.add(kind)
            return quantize_int8(self.array(name), dtype)
        columns, rows = (int(n) for n in t.shape)  # GGUF lists the fastest-varying dimension first
        return from_gguf_blocks(t.data, kind, (rows, columns), dtype)


def config_from_gguf(metadata: dict[str, Any], tensors: dict[str, Any] | None = None) -> ModelConfig:
    """A `ModelConfig` from GGUF metadata (keys as llama.cpp writes them) and, where llama.cpp keeps
    settings as tensors (RoPE frequency factors), the file's tensors."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    tensors = tensors or {}

    def get(key: str, default: Any = None) -> Any:
        full = f"{arch}.{key}"
        if full not in metadata and default is None:
            raise ValueError(f"GGUF metadata lacks {full!r}")
        return metadata.get(full, default)

    d_model = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    layers = int(get("block_count"))
    head_dim = int(get("attention.key_length", d_model // max(heads, 1)))
    vocab = metadata.get(f"{arch}.vocab_size") or len(metadata["tokenizer.ggml.tokens"])
    rotary_dim = int(get("rope.dimension_count", head_dim))
    context = int(get("context_length"))
    settings: dict[str, Any] = {}
    scaling_type = get("rope.scaling.type", "none")
    scaling: RopeScaling | None = None
    if scaling_type == "linear":
        scaling = RopeScaling("linear", float(get("rope.scaling.factor")))
    elif scaling_type not in ("none", None):
        raise ValueError(f"unsupported GGUF RoPE scaling {scaling_type!r}; supported: none, linear")
    long_factors, short_factors = tensors.get("rope_factors_long.weight"), tensors.get("rope_factors_short.weight")
    if long_factors is not None:  # Phi-3 longrope: the factor lists are tensors
        original = int(get("rope.scaling.original_context_length"))
        factor = context / original
        default_attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
        scaling = RopeScaling(
            "longrope",
            factor,
            original_max_position=original,
            short_factor=tuple(float(x) for x in short_factors),
            long_factor=tuple(float(x) for x in long_factors),
            attention_factor=float(get("rope.scaling.attn_factor", default_attention)),
        )
    elif tensors.get("rope_freqs.weight") is not None:
        # Llama 3.1's scaling, precomputed by the converter as per-frequency divisors: a longrope with
        # one factor set and no attention factor is exactly that.
        divisors = tuple(float(x) for x in tensors["rope_freqs.weight"])
        scaling = RopeScaling(
            "longrope", 1.0, original_max_position=context, short_factor=divisors, long_factor=divisors
        )
    if arch in _GEMMAS:
        settings.update(norm_offset=1.0, embed_scale=True, activation="gelu_tanh", norm_eps=1e-6)
    if arch in ("gemma2", "gemma3"):
        window = int(get("attention.sliding_window"))
        pattern = 2 if arch == "gemma2" else 6  # llama.cpp's fixed patterns: every 2nd / 6th layer global
        layer_types = tuple("sliding" if (i + 1) % pattern else "full" for i in range(layers))
        # llama.cpp: the 27B models scale scores by (d_model / heads)^-0.5, the others by head_dim^-0.5.
        is_27b = layers == (46 if arch == "gemma2" else 62)
        settings.update(
            sliding_window=window,
            layer_types=layer_types,
            sandwich_norm=True,
            attn_scale=(d_model / heads) ** -0.5 if is_27b else head_dim**-0.5,
        )
    if arch == "gemma2":
        settings.update(
            attn_softcap=float(get("attn_logit_softcapping", 50.0)),
            final_softcap=float(get("final_logit_softcapping", 30.0)),
        )
    if arch == "gemma3":
        settings.update(qk_norm=True, rope_local_theta=10000.0)
    if arch == "qwen3":
        settings.update(qk_norm=True)
    if arch == "qwen2":
        settings.update(qkv_bias=True)
    if arch == "phi3" and metadata.get("phi3.attention.sliding_window"):
        settings.update(sliding_window=int(metadata["phi3.attention.sliding_window"]))
    eps_key = "attention.layer_norm_rms_epsilon"
    if f"{arch}.{eps_key}" in metadata:
        settings["norm_eps"] = float(get(eps_key))
    return ModelConfig(
        family=arch,  # every supported architecture name is a family name
        vocab_size=int(vocab),
        d_model=d_model,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=head_dim,
        ffn_dim=int(get("feed_forward_length")),
        max_seq_len=context,
        rope_theta=float(get("rope.freq_base", 10000.0)),
        rope_scaling=scaling,
        rotary_dim=None if rotary_dim == head_dim else rotary_dim,
        tie_embeddings=False,  # decided by the loader from the presence of `output.weight`
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


# Our parameter path -> llama.cpp's tensor name in block `i`, per norm kind. In Gemma 2/3 `ffn_norm` is the
# pre-MLP norm and post_attention_norm / post_ffw_norm the sandwich norms; QK-norms are per-head.
_BLOCK_NORMS = {
    "attn_norm": "attn_norm",
    "mlp_norm": "ffn_norm",
    "post_attn_norm": "post_attention_norm",
    "post_mlp_norm": "post_ffw_norm",
}


def load_gguf(
    path: str | os.PathLike[str], dtype: Any, native: bool = False
) -> tuple[ModelConfig, dict[str, Any], Tokenizer]:
    """Read a GGUF file: (config, params cast to `dtype` with Linear weights `[out, in]` as stored, tokenizer).
    With `native`, Q8_0 / Q4_0 / Q4_1 matrices stay in their GGUF blocks (`QuantizedWeight`, see
    quantize.py) and other quantized types become int8 (one warning names them)."""
    f = GGUFFile(path)
    arch = f.architecture
    factor_tensors = ("rope_factors_long.weight", "rope_factors_short.weight", "rope_freqs.weight")
    config = config_from_gguf(f.metadata, {n: f.array(n) for n in factor_tensors if n in f.tensors})
    tied = "output.weight" not in f.tensors
    config = config.replace(tie_embeddings=tied)
    dtype_name = np.dtype(dtype).name

    def cast(a: np.ndarray | QuantizedWeight) -> np.ndarray | QuantizedWeight:
        return a if isinstance(a, QuantizedWeight) else a.astype(dtype)

    def tensor(name: str) -> np.ndarray | QuantizedWeight:
        return cast(f.native(name, dtype_name) if native else f.array(name))

    def norm(name: str) -> np.ndarray:
        # llama.cpp's converter stores Gemma's RMSNorm weights as (1 + w); the model adds the 1 itself.
        return cast(f.array(name) - 1.0 if arch in _GEMMAS else f.array(name))

    def unpermute(weight: np.ndarray | QuantizedWeight, heads: int) -> np.ndarray | QuantizedWeight:
        return _unpermute(weight, heads) if arch in _PERMUTED_QK else weight

    params: dict[str, Any] = {"embed": tensor("token_embd.weight")}
    hd = config.head_dim
    for i in range(config.num_layers):
        blk = f"blk.{i}"
        layer: dict[str, Any] = {
            ours: {"scale": norm(f"{blk}.{theirs}.weight")}
            for ours, theirs in _BLOCK_NORMS.items()
            if f"{blk}.{theirs}.weight" in f.tensors
        }
        attn: dict[str, Any] = {"o": {"weight": tensor(f"{blk}.attn_output.weight")}}
        if f"{blk}.attn_qkv.weight" in f.tensors:  # Phi-3: fused [q; k; v] rows
            qkv = f.array(f"{blk}.attn_qkv.weight")
            q_rows, kv_rows = config.num_heads * hd, config.num_kv_heads * hd
            parts = np.split(qkv, [q_rows, q_rows + kv_rows])
            for proj, part in zip("qkv", parts):
                attn[proj] = {"weight": _requantize(part, f, f"{blk}.attn_qkv.weight", native, dtype_name)}
        else:
            attn["q"] = {"weight": unpermute(tensor(f"{blk}.attn_q.weight"), config.num_heads)}
            attn["k"] = {"weight": unpermute(tensor(f"{blk}.attn_k.weight"), config.num_kv_heads)}
            attn["v"] = {"weight": tensor(f"{blk}.attn_v.weight")}
        for proj in "qkv":
            if f"{blk}.attn_{proj}.bias" in f.tensors:
                attn[proj]["bias"] = cast(f.array(f"{blk}.attn_{proj}.bias"))
        for proj in "qk":
            if f"{blk}.attn_{proj}_norm.weight" in f.tensors:
                attn[f"{proj}_norm"] = {"scale": norm(f"{blk}.attn_{proj}_norm.weight")}
        layer["attn"] = attn
        if f"{blk}.ffn_gate.weight" in f.tensors:
            mlp = {name: {"weight": tensor(f"{blk}.ffn_{name}.weight")} for name in ("gate", "up", "down")}
        else:  # Phi-3: ffn_up holds [gate; up] rows
            gate, up = np.split(f.array(f"{blk}.ffn_up.weight"), 2)
            mlp = {
                "gate": {"weight": _requantize(gate, f, f"{blk}.ffn_up.weight", native, dtype_name)},
                "up": {"weight": _requantize(up, f, f"{blk}.ffn_up.weight", native, dtype_name)},
                "down": {"weight": tensor(f"{blk}.ffn_down.weight")},
            }
        layer["mlp"] = mlp
        params[f"layer_{i}"] = layer
    params["final_norm"] = {"scale": norm("output_norm.weight")}
    if not tied:
        params["lm_head"] = tensor("output.weight")
    expected = (config.vocab_size, config.d_model)
    if params["embed"].shape != expected:
        raise ValueError(f"{path}: token_embd.weight has shape {params['embed'].shape}, expected {expected}")
    if f.converted_types:
        warnings.warn(
            f"{f.path.name}: quant='native' keeps {', '.join(GGUF_KINDS)} blocks; its "
            f"{', '.join(sorted(f.converted_types))} matrices were converted to int8 per channel",
            stacklevel=2,
        )
    return config, params, tokenizer_from_gguf(f.metadata)


def _requantize(part: np.ndarray, f: GGUFFile, name: str, native: bool, dtype: str) -> np.ndarray | QuantizedWeight:
    """A slice of a fused tensor (already dequantized): float, or with `native` int8 (the slice boundaries
    need not fall on GGUF blocks of the fused rows' layout, so blocks are not kept)."""
    if not native or f.tensors[name].tensor_type.name in ("F32", "F16", "BF16"):
        return part.astype(dtype)
    f.converted_types.add(f.tensors[name].tensor_type.name + " (fused)")
    return quantize_int8(part, dtype)
