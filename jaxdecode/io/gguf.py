"""GGUF files: metadata -> `ModelConfig`, tensors -> the parameter pytree, tokenizer from metadata.

Reading uses the `gguf` package (memory-mapped). Weights are dequantised with
`gguf.quants.dequantize`, the reference implementation.

llama.cpp's converter permutes the rows of the Q and K projections so that RoPE rotates adjacent
pairs; our model (like HF) rotates halves, so the loader undoes that permutation.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from ..config import ModelConfig
from ..quantize import GGUF_KINDS, QuantizedWeight, from_gguf_blocks
from .tokenizer import Tokenizer, tokenizer_from_gguf

SUPPORTED_ARCHITECTURES = ("llama",)

GGUF_MAGIC = b"GGUF"


class GGUFFile:
    """An opened, validated GGUF file: its metadata dict and tensors by name."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"no such GGUF file: {self.path}")
        with open(self.path, "rb") as f:
            magic = f.read(4)
        if magic != GGUF_MAGIC:
            raise ValueError(f"{self.path} is not a GGUF file (magic {magic!r}, expected {GGUF_MAGIC!r})")
        try:
            self.reader = gguf.GGUFReader(self.path)
        except Exception as e:  # the reader raises assorted errors on truncated or corrupt files (header or data)
            raise ValueError(f"{self.path} is a corrupt or truncated GGUF file ({type(e).__name__}: {e})") from e
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.metadata: dict[str, Any] = {}
        for key, field in self.reader.fields.items():
            if key.startswith("GGUF."):
                continue
            self.metadata[key] = field.contents()

    @property
    def data_bytes(self) -> int:
        """Bytes of all tensor data as stored."""
        return sum(int(t.n_bytes) for t in self.reader.tensors)

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
        never via float), a float tensor as a float32 array; other quantized types are refused."""
        if name not in self.tensors:
            raise ValueError(f"{self.path} has no tensor {name!r}")
        t = self.tensors[name]
        kind = t.tensor_type.name
        if kind in ("F32", "F16", "BF16"):
            return self.array(name)
        if kind not in GGUF_KINDS or len(t.shape) != 2:
            raise ValueError(
                f"{self.path}: tensor {name!r} is {kind}; native keeps only {', '.join(GGUF_KINDS)} matrices: "
                "use quant='int8' or 'int4' for this file"
            )
        columns, rows = (int(n) for n in t.shape)  # GGUF lists the fastest-varying dimension first
        return from_gguf_blocks(t.data, kind, (rows, columns), dtype)


def config_from_gguf(metadata: dict[str, Any]) -> ModelConfig:
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")

    def get(key: str, default: Any = None) -> Any:
        full = f"{arch}.{key}"
        if full not in metadata and default is None:
            raise ValueError(f"GGUF metadata lacks {full!r}")
        return metadata.get(full, default)

    d_model = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    vocab = metadata.get(f"{arch}.vocab_size") or len(metadata["tokenizer.ggml.tokens"])
    scaling_type = metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling_type not in ("none", None):
        raise ValueError(f"unsupported GGUF RoPE scaling {scaling_type!r}")
    return ModelConfig(
        family="llama",
        vocab_size=int(vocab),
        d_model=d_model,
        num_layers=int(get("block_count")),
        num_heads=heads,
        num_kv_heads=int(get("attention.head_count_kv", heads)),
        head_dim=int(get("attention.key_length", d_model // heads)),
        ffn_dim=int(get("feed_forward_length")),
        max_seq_len=int(get("context_length")),
        norm_eps=float(get("attention.layer_norm_rms_epsilon")),
        rope_theta=float(get("rope.freq_base", 10000.0)),
        tie_embeddings=False,  # decided by the loader from the presence of `output.weight`
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


def load_gguf(
    path: str | os.PathLike[str], dtype: Any, native: bool = False
) -> tuple[ModelConfig, dict[str, Any], Tokenizer]:
    """Read a GGUF file: (config, params cast to `dtype` with Linear weights `[out, in]` as stored, tokenizer).
    With `native`, quantized matrices stay in their GGUF blocks (`QuantizedWeight`, see quantize.py)."""
    f = GGUFFile(path)
    config = config_from_gguf(f.metadata)
    tied = "output.weight" not in f.tensors
    config = config.replace(tie_embeddings=tied)
    dtype_name = np.dtype(dtype).name

    def cast(a: np.ndarray | QuantizedWeight) -> np.ndarray | QuantizedWeight:
        return a if isinstance(a, QuantizedWeight) else a.astype(dtype)

    def tensor(name: str) -> np.ndarray | QuantizedWeight:
        return f.native(name, dtype_name) if native else f.array(name)

    params: dict[str, Any] = {"embed": cast(tensor("token_embd.weight"))}
    for i in range(config.num_layers):
        blk = f"blk.{i}"
        params[f"layer_{i}"] = {
            "attn_norm": {"scale": cast(f.array(f"{blk}.attn_norm.weight"))},
            "attn": {
                "q": {"weight": cast(_unpermute(tensor(f"{blk}.attn_q.weight"), config.num_heads))},
                "k": {"weight": cast(_unpermute(tensor(f"{blk}.attn_k.weight"), config.num_kv_heads))},
                "v": {"weight": cast(tensor(f"{blk}.attn_v.weight"))},
                "o": {"weight": cast(tensor(f"{blk}.attn_output.weight"))},
            },
            "mlp_norm": {"scale": cast(f.array(f"{blk}.ffn_norm.weight"))},
            "mlp": {
                "gate": {"weight": cast(tensor(f"{blk}.ffn_gate.weight"))},
                "up": {"weight": cast(tensor(f"{blk}.ffn_up.weight"))},
                "down": {"weight": cast(tensor(f"{blk}.ffn_down.weight"))},
            },
        }
    params["final_norm"] = {"scale": cast(f.array("output_norm.weight"))}
    if not tied:
        params["lm_head"] = cast(tensor("output.weight"))
    expected = (config.vocab_size, config.d_model)
    if params["embed"].shape != expected:
        raise ValueError(f"{path}: token_embd.weight has shape {params['embed'].shape}, expected {expected}")
    return config, params, tokenizer_from_gguf(f.metadata)
