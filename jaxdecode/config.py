"""Model configuration: one frozen dataclass for every supported decoder family.

`ModelConfig` is hashable, so it can be a static argument of `jax.jit`. The per-family mapping from
a Hugging Face `config.json` lives here (`config_from_hf`); the GGUF mapping lives in `io/gguf.py`
next to the file reader, because it needs the GGUF metadata keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

FAMILIES = ("llama", "mistral", "qwen2", "gemma", "falcon", "bloom", "mpt", "gpt_bigcode")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling. `kind` is "linear" (positions divided by `factor`) or "llama3"
    (Llama-3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between)."""

    kind: Literal["linear", "llama3"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a decoder-only transformer.

    Families differ only through these fields; there is one attention module and one block.
    """

    family: str
    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    ffn_dim: int
    max_seq_len: int
    # Norms: "rms" (RMSNorm) or "layer" (LayerNorm). Gemma scales by (1 + w): norm_offset = 1.
    norm: Literal["rms", "layer"] = "rms"
    norm_eps: float = 1e-5
    norm_bias: bool = False
    norm_offset: float = 0.0
    # MLP: "gated" is act(x W_gate) * (x W_up) W_down (SwiGLU, GeGLU); "plain" is act(x W_up) W_down.
    mlp: Literal["gated", "plain"] = "gated"
    activation: Literal["silu", "gelu", "gelu_tanh"] = "silu"
    qkv_bias: bool = False
    out_bias: bool = False
    mlp_bias: bool = False
    # Positions: rotary, ALiBi (bias in attention) or learned absolute embeddings.
    position: Literal["rope", "alibi", "learned"] = "rope"
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    alibi_scheme: Literal["bloom", "mpt"] = "bloom"
    alibi_bias_max: float = 8.0
    # Falcon: attention and MLP read the same input and are added to the residual together.
    parallel_block: bool = False
    # Falcon-40B style: the parallel block has its own norm for the MLP input.
    parallel_mlp_norm: bool = False
    embed_scale: bool = False  # Gemma: embeddings multiplied by sqrt(d_model)
    embed_norm: bool = False  # BLOOM: LayerNorm right after the embedding
    tie_embeddings: bool = True
    sliding_window: int | None = None
    attn_scale: float | None = None  # default head_dim ** -0.5
    qkv_clip: float | None = None  # MPT's clip_qkv

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unsupported model family {self.family!r}; supported: {', '.join(FAMILIES)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse frequencies `[head_dim // 2]` float32, with the config's scaling applied (as HF computes them)."""
    dim = config.head_dim
    inv_freq = (1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(
        np.float32
    )
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    low_wavelen = scaling.original_max_position / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def alibi_slopes(config: ModelConfig) -> np.ndarray:
    """Per-head ALiBi slopes `[num_heads]` float32, in the family's own scheme.

    BLOOM: geometric slopes 2^(-8i/n) for the largest power of two n below the head count, the rest
    interleaved from the next power of two. MPT: slopes for the next power of two (with
    `alibi_bias_max`), odd-indexed ones first, truncated.
    """
    n = config.num_heads
    if config.alibi_scheme == "bloom":
        closest = 2 ** math.floor(math.log2(n))
        base = 2.0 ** (-(2.0 ** -(math.log2(closest) - 3)))
        slopes = [base**p for p in range(1, closest + 1)]
        if closest != n:
            extra_base = 2.0 ** (-(2.0 ** -(math.log2(2 * closest) - 3)))
            remaining = min(closest, n - closest)
            slopes += [extra_base**p for p in range(1, 1 + 2 * remaining, 2)]
        return np.asarray(slopes, dtype=np.float32)
    n_pow2 = 2 ** math.ceil(math.log2(n))
    base = np.arange(1, n_pow2 + 1, dtype=np.float32) * np.float32(config.alibi_bias_max / n_pow2)
    slopes = (1.0 / np.power(np.float32(2), base)).astype(np.float32)
    if n_pow2 != n:
        slopes = np.concatenate([slopes[1::2], slopes[::2]])[:n]
    return slopes


def _rope_from_hf(hf: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """RoPE theta and scaling from either transformers-5 `rope_parameters` or older `rope_scaling` + `rope_theta`."""
    params = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    spec = {**legacy, **params}
    kind = spec.get("rope_type", spec.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind == "linear":
        return theta, RopeScaling("linear", float(spec["factor"]))
    if kind == "llama3":
        return theta, RopeScaling(
            "llama3",
            float(spec["factor"]),
            float(spec.get("low_freq_factor", 1.0)),
            float(spec.get("high_freq_factor", 4.0)),
            int(spec.get("original_max_position_embeddings", 8192)),
        )
    raise ValueError(f"unsupported RoPE scaling {kind!r}; supported: default, linear, llama3")


def _hf_activation(name: str) -> str:
    mapping = {
        "silu": "silu",
        "swish": "silu",
        "gelu": "gelu",
        "gelu_new": "gelu_tanh",
        "gelu_pytorch_tanh": "gelu_tanh",
        "gelu_fast": "gelu_tanh",
    }
    if name not in mapping:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(mapping))}")
    return mapping[name]


def _layernorm_settings(hf: dict[str, Any], *, norm_bias: bool, linear_bias: bool) -> dict[str, Any]:
    """What the LayerNorm families (Falcon, BLOOM, MPT, GPT-BigCode) share: LayerNorm, a plain MLP, and
    biases on every linear layer or on none."""
    return dict(
        norm="layer",
        norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        norm_bias=norm_bias,
        mlp="plain",
        qkv_bias=linear_bias,
        out_bias=linear_bias,
        mlp_bias=linear_bias,
    )


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map a Hugging Face `config.json` (as a dict) to a `ModelConfig`."""
    model_type = hf.get("model_type")
    if model_type in ("llama", "mistral", "qwen2"):
        theta, scaling = _rope_from_hf(hf)
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        window = None
        if model_type == "mistral":
            window = hf.get("sliding_window")
        elif model_type == "qwen2" and hf.get("use_sliding_window"):
            window = hf.get("sliding_window")
        return ModelConfig(
            family=model_type,
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            ffn_dim=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 4096),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            activation=_hf_activation(hf.get("hidden_act", "silu")),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            out_bias=bool(hf.get("attention_bias", False)) and model_type == "llama",
            mlp_bias=bool(hf.get("mlp_bias", False)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_embeddings=bool(hf.get("tie_word_embeddings", model_type == "qwen2")),
            sliding_window=window,
        )
    if model_type == "gemma":
        theta, scaling = _rope_from_hf(hf)
        act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
        return ModelConfig(
            family="gemma",
            vocab_size=hf["vocab_size"],
            d_model=hf["hidden_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=hf["num_attention_heads"],
            num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim", 256),
            ffn_dim=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 8192),
            norm_eps=hf.get("rms_norm_eps", 1e-6),
            norm_offset=1.0,
            activation=_hf_activation(act),
            qkv_bias=bool(hf.get("attention_bias", False)),
            out_bias=bool(hf.get("attention_bias", False)),
            rope_theta=theta,
            rope_scaling=scaling,
            embed_scale=True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )
    if model_type == "falcon":
        heads = hf["num_attention_heads"]
        new_arch = bool(hf.get("new_decoder_architecture", False))
        if hf.get("alibi", False):
            raise ValueError("Falcon with alibi=True is not supported (no released Falcon checkpoint uses it)")
        if not hf.get("parallel_attn", True) and new_arch:
            raise ValueError("Falcon with new_decoder_architecture and parallel_attn=False is not supported")
        if new_arch:
            kv_heads = hf.get("num_kv_heads") or heads
        else:
            kv_heads = 1 if hf.get("multi_query", True) else heads
        theta, scaling = _rope_from_hf(hf)
        d_model = hf["hidden_size"]
        return ModelConfig(
            family="falcon",
            vocab_size=hf["vocab_size"],
            d_model=d_model,
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=d_model // heads,
            ffn_dim=hf.get("ffn_hidden_size") or 4 * d_model,
            max_seq_len=hf.get("max_position_embeddings", 2048),
            **_layernorm_settings(hf, norm_bias=True, linear_bias=bool(hf.get("bias", False))),
            activation=_hf_activation(hf.get("activation", "gelu")),
            rope_theta=theta,
            rope_scaling=scaling,
            parallel_block=bool(hf.get("parallel_attn", True)),
            parallel_mlp_norm=new_arch and hf.get("num_ln_in_parallel_attn", 2) == 2,
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )
    if model_type == "bloom":
        d_model = hf.get("hidden_size") or hf["n_embed"]
        heads = hf.get("n_head") or hf["num_attention_heads"]
        if hf.get("apply_residual_connection_post_layernorm", False):
            raise ValueError("BLOOM with apply_residual_connection_post_layernorm=True is not supported")
        return ModelConfig(
            family="bloom",
            vocab_size=hf["vocab_size"],
            d_model=d_model,
            num_layers=hf.get("n_layer") or hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=d_model // heads,
            ffn_dim=4 * d_model,
            max_seq_len=hf.get("seq_length", 2048),
            **_layernorm_settings(hf, norm_bias=True, linear_bias=True),
            activation="gelu_tanh",
            position="alibi",
            alibi_scheme="bloom",
            embed_norm=True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )
    if model_type == "mpt":
        attn = hf.get("attn_config") or {}
        if not attn.get("alibi", True):
            raise ValueError("MPT without ALiBi is not supported")
        if attn.get("qk_ln", False):
            raise ValueError("MPT with qk_ln=True is not supported")
        d_model = hf["d_model"]
        heads = hf["n_heads"]
        if not hf.get("no_bias", True):
            raise ValueError("MPT with no_bias=False is not supported")
        return ModelConfig(
            family="mpt",
            vocab_size=hf["vocab_size"],
            d_model=d_model,
            num_layers=hf["n_layers"],
            num_heads=heads,
            num_kv_heads=heads,
            head_dim=d_model // heads,
            ffn_dim=4 * d_model,  # as HF's MptMLP, which ignores expansion_ratio
            max_seq_len=hf.get("max_seq_len", 2048),
            **_layernorm_settings(hf, norm_bias=False, linear_bias=False),
            activation="gelu",
            position="alibi",
            alibi_scheme="mpt",
            alibi_bias_max=float(attn.get("alibi_bias_max", 8)),
            attn_scale=attn.get("softmax_scale"),
            qkv_clip=attn.get("clip_qkv"),
            tie_embeddings=True,
        )
    if model_type == "gpt_bigcode":
        d_model = hf.get("n_embd") or hf["hidden_size"]
        heads = hf.get("n_head") or hf["num_attention_heads"]
        if not hf.get("scale_attn_weights", True):
            raise ValueError("GPT-BigCode with scale_attn_weights=False is not supported")
        return ModelConfig(
            family="gpt_bigcode",
            vocab_size=hf["vocab_size"],
            d_model=d_model,
            num_layers=hf.get("n_layer") or hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=1 if hf.get("multi_query", True) else heads,
            head_dim=d_model // heads,
            ffn_dim=hf.get("n_inner") or 4 * d_model,
            max_seq_len=hf.get("n_positions", 2048),
            **_layernorm_settings(hf, norm_bias=True, linear_bias=True),
            activation=_hf_activation(hf.get("activation_function", "gelu_pytorch_tanh")),
            position="learned",
            tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        )
    raise ValueError(
        f"unsupported model_type {model_type!r} in config.json; supported: "
        "llama, mistral, qwen2, gemma, falcon, bloom, mpt, gpt_bigcode"
    )
