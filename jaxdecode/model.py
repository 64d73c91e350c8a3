"""Pure-functional decoder models (Flax Linen) for every supported family.

One attention module and one block serve all families; `ModelConfig` fields switch RoPE / ALiBi /
learned positions, RMSNorm / LayerNorm, gated / plain MLPs and sequential / parallel blocks.

The entry point is `apply(params, config, tokens, positions, kv_cache)`; params are a plain nested
dict of arrays. Every weight goes through the one weight layer (`weights.py`: `linear`, `lookup`,
`logits`), so this module knows neither the weights' kind (float or quantized) nor the mesh; under
tensor parallelism it sees its own shard's heads and columns and sums the row-parallel projections
(`collectives.py`). The embedding is `[vocab, d_model]` and doubles as the (tied) LM head.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from . import attention, weights
from . import collectives as par
from .collectives import Parallel
from .config import ModelConfig, alibi_slopes, rope_inv_freq, rope_long_inv_freq
from .kv_cache import KVCache, write

Params = dict[str, Any]

_init = nn.initializers.normal(stddev=0.02)


class Linear(nn.Module):
    """`x @ weight + bias`. With `row_parallel`, x and weight hold one model shard's slice of the input
    features: the partial products are summed over the shards before the bias is added (once)."""

    features: int
    use_bias: bool = False
    row_parallel: Parallel | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        weight = weights.param(self, "weight", (x.shape[-1], self.features), x.dtype)
        y = par.sum_over_model(weights.linear(x, weight), self.row_parallel)
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,), x.dtype).astype(y.dtype)
        return y


class Norm(nn.Module):
    """RMSNorm or LayerNorm, computed in float32 and cast back to the input dtype. `with_scale=False`:
    an RMSNorm without a learned scale (Gemma 4's V norm)."""

    config: ModelConfig
    with_scale: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        xf = x.astype(jnp.float32)
        if cfg.norm == "rms" or not self.with_scale:
            normed = xf * lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + cfg.norm_eps)
            if not self.with_scale:
                return normed.astype(x.dtype)
        scale_init = nn.initializers.zeros if cfg.norm_offset else nn.initializers.ones
        scale = self.param("scale", scale_init, (x.shape[-1],), x.dtype).astype(jnp.float32) + cfg.norm_offset
        if cfg.norm == "rms":
            if cfg.norm_scales_in_float32:  # Gemma scales in float32; Llama casts back first, then scales.
                return (normed * scale).astype(x.dtype)
            return normed.astype(x.dtype) * scale.astype(x.dtype)
        mean = jnp.mean(xf, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
        y = (xf - mean) * lax.rsqrt(var + cfg.norm_eps) * scale
        if cfg.norm_bias:
            y = y + self.param("bias", nn.initializers.zeros, (x.shape[-1],), x.dtype).astype(jnp.float32)
        return y.astype(x.dtype)


def apply_rope(
    x: jax.Array, positions: jax.Array, config: ModelConfig, layer: int, cache_capacity: int | None
) -> jax.Array:
    """Rotate halves (HF layout) of the first `rotary_dim` dims of each head. x `[B, T, H, D]`, positions
    int32 `[B, T]`.

    Per-layer bases (Gemma 3's local and global layers) are static: each layer's frequencies are
    constants of the one compiled program. "longrope" (Phi-3) picks its long factors for a row whose
    sequence exceeds the pretraining length: without a cache, by the row's last position (HF's rule);
    with a cache, by the cache's capacity, so that every entry of a cache is rotated with one set (HF
    instead recomputes its cache when a sequence crosses the boundary).
    """
    inv_freq = jnp.asarray(rope_inv_freq(config, layer))  # [R/2]
    scaling = config.rope_scaling
    longrope = scaling is not None and scaling.kind == "longrope" and not config.is_sliding(layer)
    if longrope:
        long_inv_freq = jnp.asarray(rope_long_inv_freq(config))
        if cache_capacity is not None:  # static: the cache's size decides
            inv_freq = long_inv_freq if cache_capacity > scaling.original_max_position else inv_freq
        else:
            use_long = (jnp.max(positions, axis=1) + 1 > scaling.original_max_position)[:, None, None]
            inv_freq = jnp.where(use_long, long_inv_freq, inv_freq)  # [B, 1, R/2]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if longrope:
        cos, sin = cos * scaling.attention_factor, sin * scaling.attention_factor
    cos, sin = cos.astype(x.dtype), sin.astype(x.dtype)
    rotary = 2 * inv_freq.shape[-1]
    x_rot, x_pass = x[..., :rotary], x[..., rotary:]
    half = rotary // 2
    rotated = jnp.concatenate([-x_rot[..., half:], x_rot[..., :half]], axis=-1)
    out = x_rot * cos + rotated * sin
    return out if rotary == x.shape[-1] else jnp.concatenate([out, x_pass], axis=-1)


class Attention(nn.Module):
    """Self-attention over this model shard's heads (all heads without `parallel`).

    A layer that shares another's K/V (`shared`: that layer's new K and V `[B, T, Hkv, D]`, and as
    `layer_cache` its updated cache) has no K/V projections and writes no cache: it attends over the new
    K/V in a prefill and over the other layer's cache otherwise. Returns (output, cache, (K, V))."""

    config: ModelConfig
    layer: int
    impl: str = "auto"
    parallel: Parallel | None = None
    kv_view: tuple[int, int] | None = None

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        positions: jax.Array,
        layer_cache: tuple[jax.Array, jax.Array] | None,
        prefill: bool,
        cache_start: jax.Array | None = None,
        shared: tuple[jax.Array, jax.Array] | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None, tuple[jax.Array, jax.Array]]:
        cfg, parallel, layer = self.config, self.parallel, self.layer
        batch, steps, _ = x.shape
        head_dim = cfg.head_dim_of(layer)
        num_heads = par.per_shard(cfg.num_heads, parallel)
        num_kv_heads = par.local_kv_heads(cfg.kv_heads_of(layer), parallel)
        capacity = None if layer_cache is None else layer_cache[0].shape[2]
        q = Linear(num_heads * head_dim, cfg.qkv_bias, name="q")(x)
        if shared is None:
            k = Linear(num_kv_heads * head_dim, cfg.qkv_bias, name="k")(x)
            if cfg.k_eq_v and not cfg.is_sliding(layer):  # V is K's projection, before K's norm and RoPE
                v = k
            else:
                v = Linear(num_kv_heads * head_dim, cfg.qkv_bias, name="v")(x)
            if cfg.qkv_clip is not None:
                k, v = (jnp.clip(t, -cfg.qkv_clip, cfg.qkv_clip) for t in (k, v))
            k = k.reshape(batch, steps, num_kv_heads, head_dim)
            v = v.reshape(batch, steps, num_kv_heads, head_dim)
            if cfg.qk_norm:  # over head_dim, per head
                k = Norm(cfg, name="k_norm")(k)
            if cfg.v_norm:
                v = Norm(cfg, with_scale=False, name="v_norm")(v)
            if cfg.position == "rope":
                k = apply_rope(k, positions, cfg, layer, capacity)
        else:
            k, v = shared
        if cfg.qkv_clip is not None:
            q = jnp.clip(q, -cfg.qkv_clip, cfg.qkv_clip)
        q = q.reshape(batch, steps, num_heads, head_dim)
        if cfg.qk_norm:
            q = Norm(cfg, name="q_norm")(q)
        if cfg.position == "rope":
            q = apply_rope(q, positions, cfg, layer, capacity)
        slopes = None
        if cfg.position == "alibi":
            slopes = jnp.asarray(alibi_slopes(cfg))
            if parallel is not None:  # this shard's heads
                slopes = lax.dynamic_slice_in_dim(slopes, par.shard_index(parallel) * num_heads, num_heads)
        window, sinks, softcap = cfg.window(self.layer), 0, cfg.attn_softcap
        if self.kv_view is not None and (window is None or self.kv_view[0] < window):
            window, sinks = self.kv_view  # the StreamingLLM view, read in place
        options = dict(scale=cfg.scale, alibi_slopes=slopes, window=window, softcap=softcap, impl=self.impl)
        q_heads = q.transpose(0, 2, 1, 3)  # [B, Hq, T, D]

        start = positions[:, 0] if cache_start is None else cache_start
        if layer_cache is not None and shared is None:
            layer_cache = (write(layer_cache[0], k, start), write(layer_cache[1], v, start))
        if layer_cache is None or prefill:
            out = attention.prefill_attention(q_heads, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), **options)
        else:
            lengths = start + steps
            out = attention.cached_attention(q_heads, layer_cache[0], layer_cache[1], lengths, sinks=sinks, **options)
        out = out.transpose(0, 2, 1, 3).reshape(batch, steps, num_heads * head_dim)
        return Linear(cfg.d_model, cfg.out_bias, parallel, name="o")(out), layer_cache, (k, v)


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu": lambda t: jax.nn.gelu(t, approximate=False),
    "gelu_tanh": lambda t: jax.nn.gelu(t, approximate=True),
}


class MLP(nn.Module):
    """Gated or plain MLP of `width` columns (default `ffn_dim`), this shard's columns under `parallel`."""

    config: ModelConfig
    parallel: Parallel | None = None
    width: int | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.has_variable("params", "host"):  # weights in storage, computed by the weight layer (flash.py)
            return weights.host_mlp(x, self.get_variable("params", "host"))
        cfg, act = self.config, _ACTIVATIONS[self.config.activation]
        width = par.per_shard(self.width or cfg.ffn_dim, self.parallel)
        up = Linear(width, cfg.mlp_bias, name="up")(x)
        hidden = act(Linear(width, cfg.mlp_bias, name="gate")(x)) * up if cfg.mlp == "gated" else act(up)
        self.sow("intermediates", "input", x)  # read by `mlp_activity`
        self.sow("intermediates", "hidden", hidden)
        return Linear(cfg.d_model, cfg.mlp_bias, self.parallel, name="down")(hidden)


class Experts(nn.Module):
    """This shard's experts, stacked: gate / up `[E_local, f_local, d]`, down `[E_local, d, f_local]`. With
    fewer experts than shards each expert is cut into column slices (`collectives.expert_slices`), and
    the slices are the (virtual) experts the shards hold."""

    config: ModelConfig
    parallel: Parallel | None = None

    @nn.compact
    def __call__(self, x: jax.Array, experts: jax.Array, coefficients: jax.Array) -> jax.Array:
        cfg = self.config
        local = par.local_experts(cfg.num_experts, self.parallel)
        width = cfg.expert_ffn_dim // par.expert_slices(cfg.num_experts, self.parallel)
        shapes = {"gate": (local, width, cfg.d_model), "up": (local, width, cfg.d_model)}
        shapes["down"] = (local, cfg.d_model, width)
        mlp = tuple(weights.param(self, name, shape, x.dtype) for name, shape in shapes.items())
        return weights.expert_mlp(x, experts, coefficients, mlp, _ACTIVATIONS[cfg.activation])


class MoE(nn.Module):
    """Mixture of experts: a router (softmax over the experts, then the top k, renormalised where the
    family does), the routed experts, and Qwen2-MoE's sigmoid-gated shared expert. Exact routing: every
    token reaches its k experts (no capacity, no dropping). Under `parallel` each shard runs the routed
    pairs of its own experts and one sum over the shards adds them up (the collective a dense MLP's
    down projection has anyway). Sows the chosen experts (`routing`)."""

    config: ModelConfig
    parallel: Parallel | None = None

    @nn.compact
    def __call__(self, x: jax.Array, expert_input: jax.Array | None = None) -> jax.Array:
        """x `[B, T, d]` routed; the experts read `expert_input` (default x) of the same shape."""
        cfg, parallel = self.config, self.parallel
        rows = x.reshape(-1, x.shape[-1])
        router_input = rows
        if cfg.moe_beside_mlp:  # Gemma 4's router: scale-less RMSNorm, a learned scale, 1/sqrt(d)
            router_scale = self.param("router_scale", nn.initializers.ones, (cfg.d_model,), x.dtype)
            router_input = Norm(cfg, with_scale=False, name="router_norm")(rows) * router_scale
            router_input = router_input * jnp.asarray(cfg.d_model**-0.5, x.dtype)
        scores = Linear(cfg.num_experts, name="router")(router_input).astype(jnp.float32)
        probs, chosen = lax.top_k(jax.nn.softmax(scores, axis=-1), cfg.experts_per_token)  # [N, k]
        if cfg.normalize_routing:
            probs = probs / jnp.sum(probs, axis=-1, keepdims=True)
        if cfg.moe_beside_mlp:
            expert_scale = self.param("expert_scale", nn.initializers.ones, (cfg.num_experts,), x.dtype)
            probs = probs * expert_scale.astype(jnp.float32)[chosen]
        if expert_input is not None:
            rows = expert_input.reshape(rows.shape)
        self.sow("intermediates", "chosen", chosen.reshape(*x.shape[:-1], -1))  # read by `routing`
        # Each chosen expert is `slices` virtual experts; this shard holds `local` of them.
        slices = par.expert_slices(cfg.num_experts, parallel)
        local = par.local_experts(cfg.num_experts, parallel)
        virtual = (chosen[..., None] * slices + jnp.arange(slices)).reshape(rows.shape[0], -1)
        coefficients = jnp.repeat(probs, slices, axis=1)
        if par.splits_model(parallel):
            virtual = virtual - par.shard_index(parallel) * local
            coefficients = jnp.where((virtual >= 0) & (virtual < local), coefficients, 0.0)
        out = par.sum_over_model(Experts(cfg, parallel, name="experts")(rows, virtual, coefficients), parallel)
        out = out.astype(x.dtype).reshape(x.shape)
        if cfg.shared_expert_dim:
            shared = MLP(cfg, parallel, cfg.shared_expert_dim, name="shared")(x)
            out = out + jax.nn.sigmoid(Linear(1, name="shared_gate")(x)) * shared
        return out


class Block(nn.Module):
    """One decoder layer; see `Attention` for `shared`. Returns (x, cache, this layer's new (K, V))."""

    config: ModelConfig
    layer: int
    impl: str = "auto"
    parallel: Parallel | None = None
    kv_view: tuple[int, int] | None = None

    @nn.compact
    def __call__(self, x, positions, layer_cache, prefill, cache_start=None, shared=None, per_layer_input=None):
        cfg, layer = self.config, self.layer
        h = Norm(cfg, name="attn_norm")(x)
        attention_layer = Attention(cfg, layer, self.impl, self.parallel, self.kv_view, name="attn")
        attn_out, layer_cache, kv = attention_layer(h, positions, layer_cache, prefill, cache_start, shared)
        if cfg.is_moe(layer) and not cfg.moe_beside_mlp:
            mlp = MoE(cfg, self.parallel, name="moe")
        else:
            mlp = MLP(cfg, self.parallel, cfg.ffn_dim_of(layer), name="mlp")
        if cfg.parallel_block:
            mlp_in = Norm(cfg, name="mlp_norm")(x) if cfg.parallel_mlp_norm else h
            return x + attn_out + mlp(mlp_in), layer_cache, kv
        if cfg.sandwich_norm:  # Gemma 2/3/4: each sub-layer's output is normed before the residual add
            attn_out = Norm(cfg, name="post_attn_norm")(attn_out)
        x = x + attn_out
        mlp_out = mlp(Norm(cfg, name="mlp_norm")(x))
        if cfg.is_moe(layer) and cfg.moe_beside_mlp:  # Gemma 4: the experts' output beside the MLP's
            moe_out = MoE(cfg, self.parallel, name="moe")(x, Norm(cfg, name="moe_norm")(x))
            mlp_out = Norm(cfg, name="post_mlp_norm_1")(mlp_out) + Norm(cfg, name="post_moe_norm")(moe_out)
        if cfg.sandwich_norm:
            mlp_out = Norm(cfg, name="post_mlp_norm")(mlp_out)
        x = x + mlp_out
        if cfg.per_layer_dim:  # Gemma 4: this layer's input vector, gated by the residual, added back
            gate = _ACTIVATIONS[cfg.activation](Linear(cfg.per_layer_dim, name="per_layer_gate")(x))
            x = x + Norm(cfg, name="per_layer_norm")(Linear(cfg.d_model, name="per_layer_proj")(gate * per_layer_input))
        if cfg.layer_scalar:
            x = x * self.param("layer_scalar", nn.initializers.ones, (1,), x.dtype)
        return x, layer_cache, kv


class Decoder(nn.Module):
    """Token ids in, logits out. See `apply` for the calling convention. With `parallel`, runs as one
    shard of a `shard_map` (see `parallel.py`): params, cache and logits are that shard's."""

    config: ModelConfig
    impl: str = "auto"
    dtype: Any = jnp.float32
    parallel: Parallel | None = None
    kv_view: tuple[int, int] | None = None

    @nn.compact
    def __call__(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        kv_cache: KVCache | None = None,
        prefill: bool = False,
        logits_at: jax.Array | None = None,
        cache_start: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache | None]:
        cfg, parallel = self.config, self.parallel
        vocab = par.per_shard(par.padded_vocab(cfg.vocab_size, parallel), parallel)
        embedding = weights.param(self, "embed", (vocab, cfg.d_model), self.dtype)
        x = weights.lookup(embedding, tokens, parallel)
        if cfg.embed_scale:
            x = x * jnp.asarray(cfg.d_model**0.5, x.dtype)
        if cfg.position == "learned":
            pos_embedding = self.param("pos_embed", _init, (cfg.max_seq_len, cfg.d_model), self.dtype)
            x = x + jnp.take(pos_embedding, positions, axis=0)
        if cfg.embed_norm:
            x = Norm(cfg, name="embed_norm")(x)
        per_layer_inputs = self._per_layer_inputs(tokens, x) if cfg.per_layer_dim else None

        # Cache entry j belongs to layer j (`config.cache_layers`); a K/V-sharing layer reads its source's.
        keys = [] if kv_cache is None else list(kv_cache.keys)
        values = [] if kv_cache is None else list(kv_cache.values)
        new_kv = {}
        for i in range(cfg.num_layers):
            source = cfg.kv_source(i)
            layer_cache = None if kv_cache is None else (keys[source], values[source])
            shared = None if source == i else new_kv[source]
            block = Block(cfg, i, self.impl, parallel, self.kv_view, name=f"layer_{i}")
            per_layer_input = None if per_layer_inputs is None else per_layer_inputs[:, :, i]
            x, layer_cache, new_kv[i] = block(x, positions, layer_cache, prefill, cache_start, shared, per_layer_input)
            if layer_cache is not None and source == i:
                keys[i], values[i] = layer_cache

        if logits_at is not None:  # only the positions whose logits are needed go through the head
            x = jnp.take_along_axis(x, logits_at[:, None, None], axis=1)[:, 0]
        x = Norm(cfg, name="final_norm")(x)
        head = embedding
        if not cfg.tie_embeddings:
            head = weights.param(self, "lm_head", (vocab, cfg.d_model), self.dtype)
        logits = weights.logits(x, head)
        if cfg.final_softcap is not None:
            logits = jnp.tanh(logits / cfg.final_softcap) * cfg.final_softcap
        logits = par.mask_vocab_padding(logits, cfg.vocab_size, parallel)
        new_cache = None
        if kv_cache is not None:
            start = positions[:, 0] if cache_start is None else cache_start
            new_cache = KVCache(tuple(keys), tuple(values), (start + tokens.shape[1]).astype(jnp.int32))
        return logits, new_cache

    def _per_layer_inputs(self, tokens: jax.Array, x: jax.Array) -> jax.Array:
        """Gemma 4's per-layer inputs `[B, T, num_layers, per_layer_dim]`: the token's row of the per-layer
        embedding (times sqrt(per_layer_dim)) averaged, by 1/sqrt(2), with the normed projection of the
        (scaled) embedding x `[B, T, d_model]` (times 1/sqrt(d_model))."""
        cfg = self.config
        shape = (*tokens.shape, cfg.num_layers, cfg.per_layer_dim)
        table = weights.param(
            self, "per_layer_embed", (cfg.per_layer_vocab, cfg.num_layers * cfg.per_layer_dim), self.dtype
        )
        from_token = weights.lookup(table, tokens, None) * jnp.asarray(cfg.per_layer_dim**0.5, x.dtype)
        projected = Linear(cfg.num_layers * cfg.per_layer_dim, name="per_layer_model_proj")(x)
        projected = Norm(cfg, name="per_layer_proj_norm")(
            (projected * jnp.asarray(cfg.d_model**-0.5, x.dtype)).reshape(shape)
        )
        return (projected + from_token.reshape(shape)) * jnp.asarray(2**-0.5, x.dtype)


def apply(
    params: Params,
    config: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    kv_cache: KVCache | None = None,
    *,
    prefill: bool = False,
    logits_at: jax.Array | None = None,
    attention_impl: str = "auto",
    parallel: Parallel | None = None,
    cache_start: jax.Array | None = None,
    kv_view: tuple[int, int] | None = None,
) -> tuple[jax.Array, KVCache | None]:
    """Run the decoder.

    Args:
      params: the parameter pytree (as returned by `init_params` or a loader).
      config: static architecture.
      tokens: int32 `[B, T]`.
      positions: int32 `[B, T]`, contiguous per row (`p0 + arange(T)`).
      kv_cache: None for a cache-free causal forward. Otherwise the K/V of token t of row b is
        written to cache slot `cache_start[b] + t` (default `positions[b, 0] + t`) and the returned
        cache has `lengths = cache_start + T`.
      prefill: with a cache, attend only among the new tokens (the cache holds nothing before them):
        cheaper than reading the whole cache, and the path the prefill kernel takes.
      logits_at: int32 `[B]`: return logits only at these indices of T, `[B, vocab]`.
      attention_impl: the attention dispatch implementation (see `attention.py`).
      parallel: set when running as one shard inside `shard_map` (`engine.py`); params, cache and the
        returned logits (`[..., padded vocab / model shards]`) are then this shard's.
      cache_start: int32 `[B]`: the cache slot of each row's first token when it is not its position
        (a compacted cache, e.g. the StreamingLLM view of self-speculative drafting); default
        `positions[:, 0]`. Positions still set RoPE / ALiBi / learned embeddings.
      kv_view: (recent, sinks), static: cached attention sees only each query's last `recent` keys and
        the first `sinks` (a StreamingLLM view of the cache, read in place: the Pallas kernels skip
        the blocks outside it). A layer's own smaller window wins.

    Returns:
      (logits float32 `[B, T, vocab]` or `[B, vocab]`, the updated cache or None).
    """
    dtype = jnp.dtype(params["embed"].dtype)  # a quantized embedding names its float dtype
    return Decoder(config, attention_impl, dtype, parallel, kv_view).apply(
        {"params": params}, tokens, positions, kv_cache, prefill, logits_at, cache_start
    )


def routing(
    params: Params,
    config: ModelConfig,
    tokens: jax.Array,
    positions: jax.Array,
    *,
    attention_impl: str = "auto",
    parallel: Parallel | None = None,
) -> jax.Array:
    """The experts the causal forward (`apply` without a cache) routes each token to: int32
    `[num_layers, B, T, experts_per_token]`, -1 in dense layers."""
    dtype = jnp.dtype(params["embed"].dtype)
    _, captured = Decoder(config, attention_impl, dtype, parallel).apply(
        {"params": params}, tokens, positions, mutable=["intermediates"]
    )
    chosen = captured.get("intermediates", {})
    none = jnp.full((*tokens.shape, config.experts_per_token), -1, jnp.int32)
    return jnp.stack(
        [chosen[f"layer_{i}"]["moe"]["chosen"][0] if config.is_moe(i) else none for i in range(config.num_layers)]
    )


def mlp_activity(params: Params, config: ModelConfig, tokens: jax.Array, positions: jax.Array) -> tuple:
    """Each dense MLP's input and hidden activations (`act(gate . x) * (up . x)`) in the causal forward:
    float32 `[num_layers, B, T, d_model]` and `[num_layers, B, T, ffn_dim]` (for training flash predictors)."""
    dtype = jnp.dtype(params["embed"].dtype)
    _, captured = Decoder(config, "xla", dtype).apply({"params": params}, tokens, positions, mutable=["intermediates"])
    layers = [captured["intermediates"][f"layer_{i}"]["mlp"] for i in range(config.num_layers)]
    return (
        jnp.stack([m["input"][0] for m in layers]).astype(jnp.float32),
        jnp.stack([m["hidden"][0] for m in layers]).astype(jnp.float32),
    )


def init_params(config: ModelConfig, key: jax.Array, dtype: Any = jnp.float32) -> Params:
    """Random parameters (normal, std 0.02) for `config`, e.g. for tests or a toy draft model."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return Decoder(config, "auto", dtype).init(key, tokens, tokens)["params"]
