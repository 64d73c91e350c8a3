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

FAMILIES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3",
    "gemma4",
    "phi3",
    "falcon",
    "bloom",
    "mpt",
    "gpt_bigcode",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
)


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling.

    - "linear": positions divided by `factor`.
    - "llama3" (Llama-3.1): long wavelengths divided by `factor`, short ones kept, a smooth ramp between.
    - "longrope" (Phi-3): per-frequency divisors, `short_factor` while a row's sequence fits in
      `original_max_position` tokens and `long_factor` beyond; cos/sin are multiplied by `attention_factor`.
    - "proportional" (Gemma 4's full layers): only the first `rotary_fraction` of each half of the head
      turns, at the frequencies a full-width rotation would give those pairs (exponents over the whole
      head_dim); the remaining pairs have frequency 0 (pass through); all divided by `factor`.
    """

    kind: Literal["linear", "llama3", "longrope", "proportional"]
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    attention_factor: float = 1.0
    rotary_fraction: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "llama3", "longrope", "proportional"):
            raise ValueError(f"rope_scaling kind must be linear, llama3, longrope or proportional, got {self.kind!r}")
        if isinstance(self.rotary_fraction, bool) or not (
            isinstance(self.rotary_fraction, (int, float)) and 0 < self.rotary_fraction <= 1
        ):
            raise ValueError(f"rope_scaling.rotary_fraction must be in (0, 1], got {self.rotary_fraction!r}")
        for name in ("factor", "low_freq_factor", "high_freq_factor", "attention_factor"):
            _check_number(f"rope_scaling.{name}", getattr(self, name))
        if self.kind == "llama3" and self.low_freq_factor >= self.high_freq_factor:
            raise ValueError(
                f"rope_scaling.low_freq_factor ({self.low_freq_factor}) must be below high_freq_factor "
                f"({self.high_freq_factor})"
            )
        _check_count("rope_scaling.original_max_position", self.original_max_position, MAX_CONTEXT)
        for name in ("short_factor", "long_factor"):
            values = getattr(self, name)
            if not isinstance(values, tuple):
                raise ValueError(f"rope_scaling.{name} must be a list of numbers, got {values!r}")
            for value in values:
                _check_number(f"rope_scaling.{name}", value)
        if self.kind == "longrope" and not (self.short_factor and len(self.short_factor) == len(self.long_factor)):
            raise ValueError(
                "a longrope rope_scaling needs short_factor and long_factor lists of the same length, got "
                f"{len(self.short_factor)} and {len(self.long_factor)}"
            )


# Upper bounds that no model reaches (the largest have 262k tokens, 16k wide layers, a few hundred layers
# and 10M tokens of context): a file claiming more is damaged, and is refused before anything is sized by it.
MAX_VOCAB = 1 << 24
MAX_WIDTH = 1 << 20
MAX_LAYERS = 4096
MAX_CONTEXT = 1 << 28
MAX_EXPERTS = 1 << 12
_LIMITS = {
    "vocab_size": MAX_VOCAB,
    "d_model": MAX_WIDTH,
    "num_layers": MAX_LAYERS,
    "num_heads": MAX_WIDTH,
    "num_kv_heads": MAX_WIDTH,
    "head_dim": MAX_WIDTH,
    "ffn_dim": MAX_WIDTH,
    "max_seq_len": MAX_CONTEXT,
}
_BOOLS = (
    "norm_bias",
    "qkv_bias",
    "out_bias",
    "mlp_bias",
    "parallel_block",
    "parallel_mlp_norm",
    "embed_scale",
    "embed_norm",
    "tie_embeddings",
    "qk_norm",
    "sandwich_norm",
    "normalize_routing",
    "k_eq_v",
    "v_norm",
    "double_wide_shared_mlp",
    "layer_scalar",
    "moe_beside_mlp",
)
_COUNTS_OR_ZERO = (
    "num_experts",
    "experts_per_token",
    "expert_ffn_dim",
    "shared_expert_dim",
    "kv_shared_layers",
    "per_layer_dim",
    "per_layer_vocab",
)
_CHOICES = {
    "norm": ("rms", "layer"),
    "mlp": ("gated", "plain"),
    "activation": ("silu", "gelu", "gelu_tanh"),
    "position": ("rope", "alibi", "learned"),
    "alibi_scheme": ("bloom", "mpt"),
}


def _check_count(name: str, value: Any, limit: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= limit:
        raise ValueError(f"{name} must be an integer in 1..{limit}, got {value!r}")


def _check_number(name: str, value: Any, optional: bool = False) -> None:
    """A finite number > 0 (or None where `optional`)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


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
    # Per-layer attention: "sliding" (within `sliding_window`) or "full". None: every layer is sliding
    # when `sliding_window` is set (Mistral), else full. Gemma 2 alternates; Gemma 3 has 5 sliding : 1 full.
    layer_types: tuple[Literal["sliding", "full"], ...] | None = None
    rope_local_theta: float | None = None  # RoPE base of sliding layers, unscaled (Gemma 3); None: as full layers
    rotary_dim: int | None = None  # rotate only the first dims of each head (Phi-3 partial rotary); None: all
    attn_scale: float | None = None  # default head_dim ** -0.5
    qkv_clip: float | None = None  # MPT's clip_qkv
    qk_norm: bool = False  # Qwen3, Gemma 3: a norm over head_dim on every head of q and k, before RoPE
    sandwich_norm: bool = False  # Gemma 2/3: norms after attention and after the MLP too (four per block)
    attn_softcap: float | None = None  # Gemma 2: scores become c * tanh(scores / c)
    final_softcap: float | None = None  # Gemma 2: logits become c * tanh(logits / c)
    # Mixture of experts (Mixtral, Qwen2/3-MoE): `num_experts` gated MLPs of width `expert_ffn_dim` per MoE
    # layer, `experts_per_token` of them routed to each token (softmax, then top-k; the k weights renormalised
    # to sum to 1 with `normalize_routing`), plus Qwen2-MoE's sigmoid-gated shared expert of width
    # `shared_expert_dim`. Layers in `dense_layers` keep a dense MLP of width `ffn_dim`. 0 experts: dense.
    num_experts: int = 0
    experts_per_token: int = 0
    expert_ffn_dim: int = 0
    normalize_routing: bool = True
    shared_expert_dim: int = 0
    dense_layers: tuple[int, ...] = ()
    # Gemma 4. Per-layer attention shapes (its full layers have wider heads, and with `k_eq_v` fewer KV
    # heads): None means `head_dim` / `num_kv_heads` in every layer.
    layer_head_dims: tuple[int, ...] | None = None
    layer_kv_heads: tuple[int, ...] | None = None
    # The last `kv_shared_layers` layers compute no K/V of their own: each reads the cache of the last
    # earlier layer of its kind (sliding / full), so the cache holds only the other layers (`cache_layers`).
    kv_shared_layers: int = 0
    k_eq_v: bool = False  # full layers have no V projection: V is K's projection (before K's norm and RoPE)
    v_norm: bool = False  # V normed over head_dim by an RMSNorm without a scale
    double_wide_shared_mlp: bool = False  # the K/V-sharing layers' MLPs are twice `ffn_dim` wide
    # Per-layer inputs: a second embedding `[per_layer_vocab, num_layers * per_layer_dim]` plus a projection
    # of the embedding give each layer a `per_layer_dim` vector, gated into the residual after its MLP.
    per_layer_dim: int = 0
    per_layer_vocab: int = 0
    layer_scalar: bool = False  # each layer's output multiplied by a learned scalar
    # Gemma 4's MoE: each layer keeps its dense MLP and adds the routed experts' output beside it (each
    # normed), the router reading the unnormed residual through a scale-less RMSNorm, a learned scale per
    # feature and 1/sqrt(d_model); the top-k weights (renormalised) times a learned scale per expert.
    moe_beside_mlp: bool = False

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"unsupported model family {self.family!r}; supported: {', '.join(FAMILIES)}")
        for name, limit in _LIMITS.items():
            _check_count(name, getattr(self, name), limit)
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name, choices in _CHOICES.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")
        for name in ("norm_eps", "rope_theta", "alibi_bias_max"):
            _check_number(name, getattr(self, name))
        for name in ("rope_local_theta", "attn_scale", "qkv_clip", "attn_softcap", "final_softcap"):
            _check_number(name, getattr(self, name), optional=True)
        if isinstance(self.norm_offset, bool) or self.norm_offset not in (0, 1):
            raise ValueError(f"norm_offset must be 0 or 1, got {self.norm_offset!r}")
        if self.sliding_window is not None:
            _check_count("sliding_window", self.sliding_window, MAX_CONTEXT)
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, RopeScaling):
            raise ValueError(f"rope_scaling must be a RopeScaling or None, got {self.rope_scaling!r}")
        for name in _COUNTS_OR_ZERO:  # 0 means "none"; anything else is checked against its limit below
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if self.num_experts:
            _check_count("num_experts", self.num_experts, MAX_EXPERTS)
            _check_count("experts_per_token", self.experts_per_token, self.num_experts)
            _check_count("expert_ffn_dim", self.expert_ffn_dim, MAX_WIDTH)
        elif self.experts_per_token or self.expert_ffn_dim or self.shared_expert_dim:
            raise ValueError("experts_per_token, expert_ffn_dim and shared_expert_dim need num_experts > 0")
        if self.shared_expert_dim:
            _check_count("shared_expert_dim", self.shared_expert_dim, MAX_WIDTH)
        if not isinstance(self.dense_layers, tuple) or any(
            isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.num_layers for i in self.dense_layers
        ):
            last = self.num_layers - 1
            raise ValueError(f"dense_layers must be layer indices in 0..{last}, got {self.dense_layers!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.layer_types is not None:
            kinds = ("sliding", "full")
            if (
                not isinstance(self.layer_types, tuple)
                or len(self.layer_types) != self.num_layers
                or any(t not in kinds for t in self.layer_types)
            ):
                raise ValueError(
                    f"layer_types must name 'sliding' or 'full' for each of the {self.num_layers} layers, "
                    f"got {self.layer_types!r}"
                )
            if "sliding" in self.layer_types and not self.sliding_window:
                raise ValueError("layer_types has sliding layers but sliding_window is not set")
        if self.rotary_dim is not None and not (
            isinstance(self.rotary_dim, int) and 0 < self.rotary_dim <= self.head_dim and self.rotary_dim % 2 == 0
        ):
            raise ValueError(f"rotary_dim must be even and in 1..head_dim ({self.head_dim}), got {self.rotary_dim!r}")
        if self.position == "rope" and (self.rotary_dim or self.head_dim) % 2:
            raise ValueError(f"RoPE rotates pairs: head_dim must be even, got {self.rotary_dim or self.head_dim}")
        if self.rope_scaling is not None and self.rope_scaling.kind == "longrope":
            pairs = (self.rotary_dim or self.head_dim) // 2
            if len(self.rope_scaling.short_factor) != pairs:
                raise ValueError(
                    f"longrope factor lists need one factor per rotated pair ({pairs}), "
                    f"got {len(self.rope_scaling.short_factor)}"
                )

        self._check_gemma4_fields()

    def _check_gemma4_fields(self) -> None:
        for name in ("layer_head_dims", "layer_kv_heads"):
            values = getattr(self, name)
            if values is None:
                continue
            if not isinstance(values, tuple) or len(values) != self.num_layers:
                raise ValueError(f"{name} must give one value for each of the {self.num_layers} layers, got {values!r}")
            for value in values:
                _check_count(name, value, MAX_WIDTH)
        for i in range(self.num_layers):
            if self.num_heads % self.kv_heads_of(i):
                raise ValueError(
                    f"num_heads ({self.num_heads}) must be a multiple of layer {i}'s KV heads ({self.kv_heads_of(i)})"
                )
            if self.position == "rope" and self.head_dim_of(i) % 2:
                raise ValueError(f"RoPE rotates pairs: layer {i}'s head_dim must be even, got {self.head_dim_of(i)}")
        if self.kv_shared_layers >= self.num_layers:
            raise ValueError(
                f"kv_shared_layers must be below num_layers ({self.num_layers}), got {self.kv_shared_layers}"
            )
        for i in range(self.num_layers - self.kv_shared_layers, self.num_layers):
            if self.kv_source(i) is None:
                raise ValueError(f"layer {i} shares K/V, but no earlier layer of its kind computes them")
        if self.per_layer_dim or self.per_layer_vocab:
            _check_count("per_layer_dim", self.per_layer_dim, MAX_WIDTH)
            _check_count("per_layer_vocab", self.per_layer_vocab, MAX_VOCAB)

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    def is_sliding(self, layer: int) -> bool:
        """Whether `layer` attends within `sliding_window` (else to the whole cache)."""
        if self.layer_types is None:
            return self.sliding_window is not None
        return self.layer_types[layer] == "sliding"

    def is_moe(self, layer: int) -> bool:
        """Whether `layer`'s MLP is a mixture of experts (else dense)."""
        return self.num_experts > 0 and layer not in self.dense_layers

    def window(self, layer: int) -> int | None:
        """The attention window of `layer` (None: unlimited)."""
        return self.sliding_window if self.is_sliding(layer) else None

    def head_dim_of(self, layer: int) -> int:
        return self.head_dim if self.layer_head_dims is None else self.layer_head_dims[layer]

    def kv_heads_of(self, layer: int) -> int:
        return self.num_kv_heads if self.layer_kv_heads is None else self.layer_kv_heads[layer]

    def kv_source(self, layer: int) -> int | None:
        """The layer whose K/V `layer` attends over: itself, or for the last `kv_shared_layers` layers the
        last earlier layer of the same kind that computes its own (None if there is none)."""
        first_shared = self.num_layers - self.kv_shared_layers
        if layer < first_shared:
            return layer
        same = [i for i in range(first_shared) if self.is_sliding(i) == self.is_sliding(layer)]
        return same[-1] if same else None

    @property
    def cache_layers(self) -> tuple[int, ...]:
        """The layers that own an entry of the KV cache, in order (all but the K/V-sharing ones)."""
        return tuple(range(self.num_layers - self.kv_shared_layers))

    def ffn_dim_of(self, layer: int) -> int:
        shared = layer >= self.num_layers - self.kv_shared_layers
        return self.ffn_dim * (2 if self.double_wide_shared_mlp and shared else 1)

    @property
    def kv_values_per_token(self) -> int:
        """K and V values one token adds to the cache, over all cache layers."""
        return sum(2 * self.kv_heads_of(i) * self.head_dim_of(i) for i in self.cache_layers)

    @property
    def norm_scales_in_float32(self) -> bool:
        """Gemma scales the normed activations in float32 and casts after; Llama casts first."""
        return bool(self.norm_offset) or self.family == "gemma4"

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)


def _base_inv_freq(theta: float, dim: int) -> np.ndarray:
    """Unscaled RoPE inverse frequencies `[dim // 2]` float32, computed as HF computes them."""
    return (1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))).astype(np.float32)


def rope_inv_freq(config: ModelConfig, layer: int = 0) -> np.ndarray:
    """Inverse frequencies `[rotary_dim // 2]` float32 of `layer`, with its scaling applied (as HF computes
    them). Sliding layers of a config with `rope_local_theta` use that base, unscaled (Gemma 3).
    For "longrope" this is the short-factor set; `rope_long_inv_freq` gives the long one."""
    dim = config.rotary_dim or config.head_dim_of(layer)
    local = config.rope_local_theta is not None and config.is_sliding(layer)
    theta = config.rope_local_theta if local else config.rope_theta
    scaling = None if local else config.rope_scaling
    if scaling is not None and scaling.kind == "proportional":
        pairs = int(scaling.rotary_fraction * dim // 2)  # as HF's `_compute_proportional_rope_parameters`
        inv_freq = np.concatenate([_base_inv_freq(theta, dim)[:pairs], np.zeros(dim // 2 - pairs, np.float32)])
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    inv_freq = _base_inv_freq(theta, dim)
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
    if scaling.kind == "longrope":
        return (inv_freq / np.asarray(scaling.short_factor, np.float32)).astype(np.float32)
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


def rope_long_inv_freq(config: ModelConfig) -> np.ndarray:
    """The long-factor inverse frequencies of a "longrope" config `[rotary_dim // 2]` float32."""
    base = _base_inv_freq(config.rope_theta, config.rotary_dim or config.head_dim)
    return (base / np.asarray(config.rope_scaling.long_factor, np.float32)).astype(np.float32)


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


_LAYER_TYPES = {"sliding_attention": "sliding", "full_attention": "full"}


def _rope_from_hf(hf: dict[str, Any], layer_type: str = "full_attention") -> tuple[float, RopeScaling | None]:
    """RoPE theta and scaling of one layer type, from transformers-5 `rope_parameters` (flat, or nested by
    layer type as Gemma 3 writes it) or from older `rope_scaling` + `rope_theta` (+ Phi-3's top-level
    `original_max_position_embeddings`)."""
    params = hf.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise ValueError(f"rope_parameters must be an object, got {type(params).__name__}")
    if any(k in params for k in _LAYER_TYPES):
        params = params.get(layer_type) or {}
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
    if kind == "proportional":
        fraction = float(spec.get("partial_rotary_factor", 1.0))
        return theta, RopeScaling("proportional", float(spec.get("factor", 1.0)), rotary_fraction=fraction)
    if kind in ("longrope", "su"):
        original = int(
            hf.get("original_max_position_embeddings")
            or spec.get("original_max_position_embeddings")
            or hf.get("max_position_embeddings", 8192)
        )
        # As HF's `_compute_longrope_parameters`: the default attention factor comes from the context
        # extension ratio max_position_embeddings / original_max_position_embeddings.
        factor = spec.get("factor") or hf.get("max_position_embeddings", original) / original
        attention_factor = spec.get("attention_factor")
        if attention_factor is None:
            attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        return theta, RopeScaling(
            "longrope",
            float(factor),
            original_max_position=original,
            short_factor=tuple(float(x) for x in spec["short_factor"]),
            long_factor=tuple(float(x) for x in spec["long_factor"]),
            attention_factor=float(attention_factor),
        )
    raise ValueError(f"unsupported RoPE scaling {kind!r}; supported: default, linear, llama3, longrope, proportional")


def _layer_types(hf: dict[str, Any], default_pattern: int | None) -> tuple[str, ...] | None:
    """Per-layer attention kinds from `layer_types`, else from Gemma's `sliding_window_pattern` (every
    pattern-th layer full), else None."""
    n = hf["num_hidden_layers"]
    names = hf.get("layer_types")
    if names is not None:
        if not isinstance(names, list) or any(t not in _LAYER_TYPES for t in names):
            raise ValueError(f"layer_types must be a list of {' / '.join(_LAYER_TYPES)}, got {names!r}")
        return tuple(_LAYER_TYPES[t] for t in names)
    pattern = hf.get("sliding_window_pattern") or default_pattern
    if pattern is None:
        return None
    return tuple("sliding" if (i + 1) % int(pattern) else "full" for i in range(n))


def _decoder_dims(hf: dict[str, Any], *, max_seq_len: int, norm_eps: float, head_dim: int | None = None) -> dict:
    """The sizes every RMSNorm family's `config.json` spells alike (HF's Llama names), with the family's
    defaults for the context length and the norm epsilon."""
    heads = hf["num_attention_heads"]
    return dict(
        vocab_size=hf["vocab_size"],
        d_model=hf["hidden_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=hf.get("num_key_value_heads") or heads,
        head_dim=hf.get("head_dim") or head_dim or hf["hidden_size"] // heads,
        ffn_dim=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", max_seq_len),
        norm_eps=hf.get("rms_norm_eps", norm_eps),
    )


def _partial_rotary_dim(hf: dict[str, Any], head_dim: int) -> int | None:
    params = hf.get("rope_parameters") if isinstance(hf.get("rope_parameters"), dict) else {}
    factor = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    return None if factor == 1.0 else int(head_dim * factor)


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


# The types of the config.json fields that `config_from_hf` reads (checked before any is used, so that a
# damaged file gives a message naming the field, not a TypeError from the arithmetic on it).
_HF_INTS = (
    "vocab_size hidden_size num_hidden_layers num_attention_heads intermediate_size max_position_embeddings "
    "n_embed n_embd n_head n_layer n_heads n_layers d_model n_positions seq_length"
).split()
_HF_OPTIONAL_INTS = (
    "num_key_value_heads head_dim n_inner ffn_hidden_size sliding_window num_kv_heads num_ln_in_parallel_attn "
    "original_max_position_embeddings sliding_window_pattern num_local_experts num_experts num_experts_per_tok "
    "moe_intermediate_size shared_expert_intermediate_size decoder_sparse_step global_head_dim "
    "num_global_key_value_heads vocab_size_per_layer_input top_k_experts"
).split()
_HF_NUMBERS = "rms_norm_eps layer_norm_epsilon rope_theta rope_local_base_freq query_pre_attn_scalar".split()
_HF_OPTIONAL_NUMBERS = "attn_logit_softcapping final_logit_softcapping partial_rotary_factor".split()
_HF_BOOLS = (
    "tie_word_embeddings attention_bias mlp_bias use_sliding_window new_decoder_architecture parallel_attn "
    "multi_query alibi bias scale_attn_weights no_bias "
    "apply_residual_connection_post_layernorm norm_topk_prob qkv_bias attention_k_eq_v use_double_wide_mlp "
    "enable_moe_block"
).split()
_HF_STRINGS = "model_type hidden_act hidden_activation activation activation_function".split()
_HF_OBJECTS = "rope_scaling rope_parameters attn_config text_config per_layer_config".split()
_ROPE_INTS = ("original_max_position_embeddings",)
_ROPE_NUMBERS = "factor low_freq_factor high_freq_factor rope_theta attention_factor partial_rotary_factor".split()
_ROPE_LISTS = ("short_factor", "long_factor")
_MPT_BOOLS = ("alibi", "qk_ln")
_MPT_NUMBERS = ("alibi_bias_max", "softmax_scale", "clip_qkv")


def _check_hf_fields(hf: dict[str, Any], prefix: str = "") -> None:
    """Raise ValueError naming the first field of `hf` whose type is wrong (see the tables above)."""

    def fail(key: str, expected: str) -> None:
        raise ValueError(f"field {prefix}{key} must be {expected}, got {hf[key]!r}")

    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_CONTEXT

    def is_number(v: Any) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    for key in hf:
        value = hf[key]
        if key in _HF_INTS and not is_int(value):
            fail(key, f"an integer in 1..{MAX_CONTEXT}")
        elif key in _HF_OPTIONAL_INTS and value is not None and not is_int(value):
            fail(key, f"an integer in 1..{MAX_CONTEXT} or null")
        elif key in _HF_NUMBERS and not is_number(value):
            fail(key, "a finite number > 0")
        elif key in _HF_OPTIONAL_NUMBERS and value is not None and not is_number(value):
            fail(key, "a finite number > 0 or null")
        elif key in _HF_BOOLS and value is not None and not isinstance(value, bool):
            fail(key, "true, false or null")
        elif key in _HF_STRINGS and value is not None and not isinstance(value, str):
            fail(key, "a string")
        elif key in _HF_OBJECTS and value is not None and not isinstance(value, dict):
            fail(key, "an object or null")
        elif (
            key == "layer_types"
            and value is not None
            and not (isinstance(value, list) and all(isinstance(t, str) for t in value))
        ):
            fail(key, "a list of strings")
        elif key == "use_bidirectional_attention" and not (
            value is None or isinstance(value, bool) or value in ("all", "vision")
        ):
            fail(key, "true, false, 'all', 'vision' or null")
        elif key in ("num_kv_shared_layers", "hidden_size_per_layer_input") and not (
            value is None or (type(value) is int and 0 <= value <= MAX_WIDTH)
        ):
            fail(key, f"an integer in 0..{MAX_WIDTH} or null")
        elif key == "per_layer_config" and isinstance(value, dict):
            for inner in value.values():
                for name, number in inner.items() if isinstance(inner, dict) else ():
                    if not is_int(number):
                        raise ValueError(
                            f"field {prefix}{key}: {name} must be an integer in 1..{MAX_CONTEXT}, got {number!r}"
                        )
        elif key == "mlp_only_layers" and not (
            value is None or (isinstance(value, list) and all(type(i) is int for i in value))
        ):
            fail(key, "a list of layer indices")
        elif key == "eos_token_id" and not (
            value is None
            or (isinstance(value, int) and not isinstance(value, bool))
            or (isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value))
        ):
            fail(key, "an integer, a list of integers or null")
    for key in ("rope_scaling", "rope_parameters"):
        params = hf.get(key) or {}
        specs = [(f"{prefix}{key}.", params)]  # Gemma 3 nests one spec per layer type
        for layer_type in _LAYER_TYPES:
            if params.get(layer_type) is not None and not isinstance(params[layer_type], dict):
                raise ValueError(f"field {prefix}{key}.{layer_type} must be an object")
            specs.append((f"{prefix}{key}.{layer_type}.", params.get(layer_type) or {}))
        for inner, spec in specs:
            for name, value in spec.items():
                if name in _ROPE_INTS and not is_int(value):
                    raise ValueError(f"field {inner}{name} must be a positive integer, got {value!r}")
                if name in _ROPE_NUMBERS and value is not None and not is_number(value):
                    raise ValueError(f"field {inner}{name} must be a finite number > 0, got {value!r}")
                if name in _ROPE_LISTS and not (isinstance(value, list) and all(map(is_number, value))):
                    raise ValueError(f"field {inner}{name} must be a list of numbers > 0, got {value!r}")
                if name in ("rope_type", "type") and not isinstance(value, str):
                    raise ValueError(f"field {inner}{name} must be a string, got {value!r}")
    attn = hf.get("attn_config") or {}
    for name, value in attn.items():
        if name in _MPT_BOOLS and not isinstance(value, bool):
            raise ValueError(f"field attn_config.{name} must be true or false, got {value!r}")
        if name in _MPT_NUMBERS and value is not None and not is_number(value):
            raise ValueError(f"field attn_config.{name} must be a finite number > 0, got {value!r}")
    if isinstance(hf.get("text_config"), dict):
        _check_hf_fields(hf["text_config"], "text_config.")


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Map a Hugging Face `config.json` (as a dict) to a `ModelConfig`. Raises ValueError naming the field
    for a missing or ill-typed field and for settings no model can have."""
    if type(hf.get("sliding_window")) is int and hf["sliding_window"] == 0:  # Qwen2-MoE writes 0 for none
        hf = {**hf, "sliding_window": None}
    _check_hf_fields(hf)
    try:
        return _config_from_hf(hf)
    except KeyError as e:
        raise ValueError(f"lacks the field {e.args[0]!r} (a {hf.get('model_type')} config needs it)") from e


def _config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type in ("llama", "mistral", "ministral", "qwen2"):
        theta, scaling = _rope_from_hf(hf)
        window, layer_types = None, None
        if model_type in ("mistral", "ministral"):
            window = hf.get("sliding_window")
            layer_types = _layer_types(hf, None) if window else None  # Ministral: per-layer
        elif model_type == "qwen2" and hf.get("use_sliding_window"):
            window = hf.get("sliding_window")
        return ModelConfig(
            family="mistral" if model_type == "ministral" else model_type,
            **_decoder_dims(hf, max_seq_len=4096, norm_eps=1e-6),
            activation=_hf_activation(hf.get("hidden_act", "silu")),
            qkv_bias=model_type == "qwen2" or bool(hf.get("attention_bias", False)),
            out_bias=bool(hf.get("attention_bias", False)) and model_type == "llama",
            mlp_bias=bool(hf.get("mlp_bias", False)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_embeddings=bool(hf.get("tie_word_embeddings", model_type == "qwen2")),
            sliding_window=window,
            layer_types=layer_types,
        )
    if model_type == "gemma":
        theta, scaling = _rope_from_hf(hf)
        return ModelConfig(
            family="gemma",
            **_decoder_dims(hf, max_seq_len=8192, norm_eps=1e-6, head_dim=256),
            **_gemma_settings(hf),
            norm_offset=1.0,
            rope_theta=theta,
            rope_scaling=scaling,
        )
    if model_type in ("gemma2", "gemma3_text", "gemma3"):
        if model_type == "gemma3" and "text_config" in hf:  # the multimodal wrapper: its text model
            return _config_from_hf({**hf["text_config"], "model_type": "gemma3_text"})
        if hf.get("use_bidirectional_attention"):
            raise ValueError("use_bidirectional_attention=True is an encoder (e.g. EmbeddingGemma), not a decoder")
        gemma2 = model_type == "gemma2"
        theta, scaling = _rope_from_hf(hf, "full_attention")
        local = {**hf, "rope_theta": hf.get("rope_local_base_freq", 10000.0)}
        local_theta, _ = _rope_from_hf(local, "sliding_attention")
        heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
        return ModelConfig(
            family="gemma2" if gemma2 else "gemma3",
            **_decoder_dims(hf, max_seq_len=8192, norm_eps=1e-6),
            **_gemma_settings(hf),
            norm_offset=1.0,
            rope_theta=theta,
            rope_scaling=scaling,
            rope_local_theta=None if gemma2 else local_theta,
            sliding_window=hf.get("sliding_window") or (4096 if gemma2 else 512),
            layer_types=_layer_types(hf, 2 if gemma2 else 6),
            attn_scale=float(hf.get("query_pre_attn_scalar", head_dim)) ** -0.5,
            qk_norm=not gemma2,
            sandwich_norm=True,
            attn_softcap=hf.get("attn_logit_softcapping", 50.0 if gemma2 else None),
            final_softcap=hf.get("final_logit_softcapping", 30.0 if gemma2 else None),
        )
    if model_type in ("gemma4", "gemma4_text"):
        return _gemma4_config(hf)
    if model_type == "qwen3":
        theta, scaling = _rope_from_hf(hf)
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        layer_types = _layer_types(hf, None) if window else None
        return ModelConfig(
            family="qwen3",
            **_decoder_dims(hf, max_seq_len=32768, norm_eps=1e-6),
            activation=_hf_activation(hf.get("hidden_act", "silu")),
            qkv_bias=bool(hf.get("attention_bias", False)),
            out_bias=bool(hf.get("attention_bias", False)),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=window,
            layer_types=layer_types,
            qk_norm=True,
        )
    if model_type in ("mixtral", "qwen2_moe", "qwen3_moe"):
        return _moe_config(hf, model_type)
    if model_type == "phi3":
        theta, scaling = _rope_from_hf(hf)
        dims = _decoder_dims(hf, max_seq_len=4096, norm_eps=1e-5)
        return ModelConfig(
            family="phi3",
            **dims,
            activation=_hf_activation(hf.get("hidden_act", "silu")),
            rope_theta=theta,
            rope_scaling=scaling,
            rotary_dim=_partial_rotary_dim(hf, dims["head_dim"]),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=hf.get("sliding_window"),
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
            # As HF's Falcon: null (or absent) means two norms in the new decoder architecture.
            parallel_mlp_norm=new_arch and (hf.get("num_ln_in_parallel_attn") or 2) == 2,
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
    raise ValueError(f"unsupported model_type {model_type!r} in config.json; supported: {', '.join(HF_MODEL_TYPES)}")


def _moe_config(hf: dict[str, Any], model_type: str) -> ModelConfig:
    """Mixtral (Mistral attention, top-k renormalised) and Qwen2-MoE / Qwen3-MoE (Qwen2 / Qwen3 attention,
    `norm_topk_prob`, dense layers from `mlp_only_layers` and `decoder_sparse_step`, Qwen2-MoE's shared expert)."""
    theta, scaling = _rope_from_hf(hf)
    n = hf["num_hidden_layers"]
    if model_type == "mixtral":
        window = hf.get("sliding_window")
        experts = dict(
            num_experts=hf.get("num_local_experts") or 8,  # HF's defaults: Mixtral-8x7B's
            experts_per_token=hf.get("num_experts_per_tok") or 2,
            expert_ffn_dim=hf["intermediate_size"],
        )
        dense, bias = (), bool(hf.get("attention_bias", False))
    else:
        window = hf.get("sliding_window") if hf.get("use_sliding_window") else None
        step, only = hf.get("decoder_sparse_step") or 1, set(hf.get("mlp_only_layers") or ())
        dense = tuple(i for i in range(n) if i in only or (i + 1) % step)
        experts = dict(
            num_experts=hf.get("num_experts") or hf["num_local_experts"],  # transformers 5 writes the latter
            experts_per_token=hf["num_experts_per_tok"],
            expert_ffn_dim=hf["moe_intermediate_size"],
            normalize_routing=bool(hf.get("norm_topk_prob", False)),
            shared_expert_dim=hf["shared_expert_intermediate_size"] if model_type == "qwen2_moe" else 0,
        )
        bias = hf.get("qkv_bias", True) if model_type == "qwen2_moe" else bool(hf.get("attention_bias", False))
    return ModelConfig(
        family=model_type,
        **_decoder_dims(hf, max_seq_len=32768, norm_eps=1e-6 if model_type != "mixtral" else 1e-5),
        activation=_hf_activation(hf.get("hidden_act", "silu")),
        qkv_bias=bool(bias),
        out_bias=bool(hf.get("attention_bias", False)) and model_type == "qwen3_moe",
        rope_theta=theta,
        rope_scaling=scaling,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=window,
        qk_norm=model_type == "qwen3_moe",
        dense_layers=dense,
        **experts,
    )


def _gemma_settings(hf: dict[str, Any]) -> dict[str, Any]:
    """What every Gemma generation's config.json maps alike: GeGLU (tanh) unless it says otherwise, one
    `attention_bias` for q/k/v and the output, embeddings scaled by sqrt(d), a tied head by default."""
    act = hf.get("hidden_activation") or hf.get("hidden_act") or "gelu_pytorch_tanh"
    bias = bool(hf.get("attention_bias", False))
    return dict(
        activation=_hf_activation(act),
        qkv_bias=bias,
        out_bias=bias,
        embed_scale=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
    )


_GEMMA4_ROPE = {
    "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1000000.0},
}


def _gemma4_config(hf: dict[str, Any]) -> ModelConfig:
    """Gemma 4 (text; the multimodal wrapper's `text_config`): Gemma 3's block with plain-scale norms, a
    V norm, attention scale 1, wider heads in full layers (`global_head_dim`, or transformers'
    `per_layer_config`), V = K in full layers with `attention_k_eq_v`, K/V shared by the last layers,
    per-layer inputs, a learned scalar per layer, and with `enable_moe_block` experts beside every MLP."""
    if "text_config" in hf:
        return _gemma4_config({**hf["text_config"], "model_type": "gemma4_text"})
    if hf.get("use_bidirectional_attention") == "all":
        raise ValueError("use_bidirectional_attention='all' is an encoder, not a decoder")
    experts = {}
    if hf.get("enable_moe_block"):
        for key in ("num_experts", "top_k_experts", "moe_intermediate_size"):
            if hf.get(key) is None:
                raise ValueError(f"enable_moe_block=true needs {key}")
        experts = dict(
            num_experts=hf["num_experts"],
            experts_per_token=hf["top_k_experts"],
            expert_ffn_dim=hf["moe_intermediate_size"],
            moe_beside_mlp=True,
        )
    dims = _decoder_dims(hf, max_seq_len=131072, norm_eps=1e-6, head_dim=256)
    layer_types = _layer_types(hf, 6)
    head_dims, kv_heads = [dims["head_dim"]] * dims["num_layers"], [dims["num_kv_heads"]] * dims["num_layers"]
    overrides = hf.get("per_layer_config")
    if overrides is None:  # the form Google's config.json files write
        full = {"head_dim": hf.get("global_head_dim") or dims["head_dim"]}
        if hf.get("attention_k_eq_v") and hf.get("num_global_key_value_heads"):
            full["num_key_value_heads"] = hf["num_global_key_value_heads"]
        overrides = {str(i): full for i, kind in enumerate(layer_types) if kind == "full"}
    if not isinstance(overrides, dict) or not all(isinstance(v, dict) for v in overrides.values()):
        raise ValueError(f"per_layer_config must be an object of layer index -> settings, got {overrides!r}")
    for key, settings in overrides.items():
        if not (isinstance(key, str) and key.isdigit() and int(key) < dims["num_layers"]):
            raise ValueError(f"per_layer_config names layer {key!r}; the model has {dims['num_layers']} layers")
        unknown = sorted(set(settings) - {"head_dim", "num_key_value_heads"})
        if unknown:
            raise ValueError(
                f"per_layer_config.{key} sets {unknown[0]!r}; only head_dim and num_key_value_heads are read"
            )
        head_dims[int(key)] = settings.get("head_dim", head_dims[int(key)])
        kv_heads[int(key)] = settings.get("num_key_value_heads", kv_heads[int(key)])
    if not hf.get("rope_parameters"):  # transformers' defaults for Gemma 4
        hf = {**hf, "rope_parameters": _GEMMA4_ROPE}
    theta, scaling = _rope_from_hf(hf, "full_attention")
    local_theta, _ = _rope_from_hf(hf, "sliding_attention")
    per_layer_dim = hf.get("hidden_size_per_layer_input") or 0
    return ModelConfig(
        family="gemma4",
        **dims,
        **_gemma_settings(hf),
        rope_theta=theta,
        rope_scaling=scaling,
        rope_local_theta=local_theta,
        sliding_window=hf.get("sliding_window") or 512,
        layer_types=layer_types,
        attn_scale=1.0,
        qk_norm=True,
        sandwich_norm=True,
        final_softcap=hf.get("final_logit_softcapping"),
        layer_head_dims=tuple(head_dims),
        layer_kv_heads=tuple(kv_heads),
        kv_shared_layers=hf.get("num_kv_shared_layers") or 0,
        k_eq_v=bool(hf.get("attention_k_eq_v", False)),
        v_norm=True,
        double_wide_shared_mlp=bool(hf.get("use_double_wide_mlp", False)),
        per_layer_dim=per_layer_dim,
        per_layer_vocab=(hf.get("vocab_size_per_layer_input") or hf["vocab_size"]) if per_layer_dim else 0,
        layer_scalar=True,
        **experts,
    )


# The `model_type` values of config.json that `config_from_hf` reads.
HF_MODEL_TYPES = (
    "llama",
    "mistral",
    "ministral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "gemma3_text",
    "gemma3",
    "gemma4_text",
    "gemma4",
    "phi3",
    "falcon",
    "bloom",
    "mpt",
    "gpt_bigcode",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
)
