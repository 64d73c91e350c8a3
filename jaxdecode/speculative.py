"""Speculative decoding: a cheap draft proposes `gamma` tokens, the model verifies them in one pass.

Two drafts:
- `SelfSpeculative` (MagicDec): the model itself, attending only to a StreamingLLM view of its own KV
  cache, the first `sinks` entries plus the most recent `budget - sinks`. Each round gathers that view
  into a small cache (`budget + gamma + 1` slots) and drafts on it; there is no second full-length
  cache. Keys in the cache already carry their RoPE rotation, so the view keeps true positions.
- `DraftModel`: a smaller model with the same tokenizer and its own (full) cache. It drafts gamma + 1
  steps so that its cache always holds every token up to the last draft, then is rolled back with the
  target's cache.

Verification (`verify`) is the standard rule (Leviathan et al. 2023; Chen et al. 2023): accept draft
token x_i with probability min(1, p(x_i) / q(x_i)); at the first rejection draw from
norm(max(0, p - q)); when all are accepted draw a bonus token from p. Temperature / top-k / top-p /
min-p are applied identically to p and q first, so the output distribution is exactly the model's.
Greedy rows use one-hot distributions, which reduces the rule to "the longest prefix where the
model's argmax agrees, plus the model's next token". Every row accepts its own count; each cache's
length is rolled back to what its row accepted (entries beyond are overwritten later).

This module holds the settings, the cost model, the StreamingLLM view and the rule; a round runs as a
step of the one decode loop (`loop.py`), in one `lax.while_loop` and, on a mesh, as one shard of a
`shard_map` (greedy uses the distributed argmax; sampled rows gather the vocabulary, and every shard
draws the same numbers from the replicated per-row keys).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from .kv_cache import KVCache
from .sampling import SamplingArrays, SamplingPlan, filter_logits

# Random streams of a round (folded into each row's key with the round number).
DRAFT_STREAM, _ACCEPT, _RESIDUAL = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class SelfSpeculative:
    """MagicDec self-speculation: draft with the model on a StreamingLLM view of its cache.

    budget: cache entries the draft reads (sinks + the most recent budget - sinks).
    sinks: the first entries, always visible ("attention sinks").
    gamma: tokens drafted per round; None picks it with `choose_gamma` (the cost model; it may choose
      plain decoding where speculation is not predicted to pay).
    acceptance: the per-token acceptance rate the cost model assumes when gamma is None.
    draft_weights: "same" (the model's own) or "int8": the draft multiplies by an int8 copy of the
      weights (per output channel, made once per model), the verification by the model's own, so the
      output is still exactly the model's.
    """

    budget: int = 512
    sinks: int = 16
    gamma: int | None = None
    acceptance: float = 0.8
    draft_weights: str = "same"

    def __post_init__(self) -> None:
        if not 0 <= self.sinks < self.budget:
            raise ValueError(f"need 0 <= sinks < budget, got sinks={self.sinks}, budget={self.budget}")
        if self.draft_weights not in ("same", "int8"):
            raise ValueError(f"draft_weights must be 'same' or 'int8', got {self.draft_weights!r}")
        _check_gamma(self.gamma)
        if not 0.0 < self.acceptance < 1.0:
            raise ValueError(f"acceptance must be in (0, 1), got {self.acceptance}")


@dataclasses.dataclass(frozen=True)
class DraftModel:
    """Draft with a smaller model (a `jaxdecode.Model` with the target's tokenizer) for `gamma` tokens."""

    draft: Any
    gamma: int = 4

    def __post_init__(self) -> None:
        _check_gamma(self.gamma)


def _check_gamma(gamma: int | None) -> None:
    if gamma is not None and not 1 <= gamma <= 16:
        raise ValueError(f"gamma must be between 1 and 16 tokens per round, got {gamma}")


# ------------------------------------------------------------------------------------------------
# The cost model.


def expected_tokens(acceptance: float, gamma: int) -> float:
    """Tokens per round when each draft token is accepted with probability `acceptance`: (1-a^(g+1))/(1-a)."""
    return gamma + 1.0 if acceptance >= 1 else (1 - acceptance ** (gamma + 1)) / (1 - acceptance)


@dataclasses.dataclass(frozen=True)
class PassCosts:
    """What a decode pass of a model reads and computes, per row and per key: `of(config, params)`."""

    weight_bytes: float  # every weight but the experts', read once per pass
    matmul_flops: float  # per new token through the weights: 2 x multiplied params (the routed experts' only)
    kv_bytes_per_token: float  # K and V of one cached token, all layers
    attention_flops: float  # per new token and key attended: 4 x query heads x head_dim, summed over layers
    expert_bytes: float = 0.0  # all experts' weights (mixtures of experts)
    expert_share: float = 0.0  # experts_per_token / num_experts: the share one token routes to

    @classmethod
    def of(cls, config: Any, params: Any) -> PassCosts:
        """From a `ModelConfig` and its (float or quantized) params; the cache in the params' float dtype."""
        from .quantize import is_quantized, param_bytes

        leaves = jax.tree_util.tree_flatten_with_path(params, is_leaf=is_quantized)[0]
        experts = [leaf for path, leaf in leaves if len(path) > 1 and getattr(path[-2], "key", None) == "experts"]
        share = config.experts_per_token / config.num_experts if config.num_experts else 0.0
        multiplied = sum(
            math.prod(leaf.shape) for path, leaf in leaves if getattr(path[-1], "key", None) in ("weight", "lm_head")
        ) + share * sum(math.prod(leaf.shape) for leaf in experts)
        if config.tie_embeddings:
            multiplied += config.vocab_size * config.d_model  # the embedding, as the LM head
        itemsize = jnp.dtype(params["embed"].dtype).itemsize  # a quantized embedding names its float dtype
        # Gemma 4's per-layer embedding is read a row per token, not whole: left out like the experts.
        by_row = [leaf for path, leaf in leaves if getattr(path[-1], "key", None) == "per_layer_embed"]
        head_dims = sum(config.head_dim_of(i) for i in range(config.num_layers))
        return cls(
            weight_bytes=param_bytes(params) - param_bytes(experts) - param_bytes(by_row),
            matmul_flops=2 * multiplied,
            kv_bytes_per_token=config.kv_values_per_token * itemsize,
            attention_flops=4 * config.num_heads * head_dims,
            expert_bytes=param_bytes(experts),
            expert_share=share,
        )

    def weights_read(self, tokens: float) -> float:
        """Weight bytes a pass over `tokens` tokens reads: the dense weights, and of the experts the
        expected share some token routes to (uniform routing: 1 - (1 - k/E)^tokens)."""
        return self.weight_bytes + self.expert_bytes * (1 - (1 - self.expert_share) ** tokens)


def pass_seconds(costs: PassCosts, roofline: Any, rows: int, new_tokens: int, keys: int) -> float:
    """The roofline time of one pass: `rows` rows of `new_tokens` tokens each, attending to `keys`
    cached keys per row (a `targets.Roofline` for the device)."""
    bytes_read = costs.weights_read(rows * new_tokens) + rows * keys * costs.kv_bytes_per_token
    flops = rows * new_tokens * (costs.matmul_flops + keys * costs.attention_flops)
    return roofline.seconds(bytes_read, flops)


def predicted_speedup(
    acceptance: float, gamma: int, costs: PassCosts, roofline: Any, batch: int, context: int, budget: int
) -> float:
    """Speedup over plain decoding with each pass at its roofline time (`pass_seconds`): plain decoding
    is one pass over the whole context per token; a round is gamma draft passes over the view
    (`min(budget, context)` keys) and one verification pass of gamma + 1 tokens over the context, and
    yields `expected_tokens`. MagicDec's model counted the bytes only: on a CPU, where the verification
    of batch x (gamma + 1) rows is compute-bound, it over-predicted 1.1-1.7x."""
    plain = pass_seconds(costs, roofline, batch, 1, context)
    draft = pass_seconds(costs, roofline, batch, 1, min(budget, context))
    verify = pass_seconds(costs, roofline, batch, gamma + 1, context)
    return expected_tokens(acceptance, gamma) * plain / (gamma * draft + verify)


# Speculation is chosen where the roofline predicts a margin over plain decoding (it leaves out the
# per-pass overheads a round has more of), and gamma stays <= 4 (MagicDec's best gammas were 2-4).
MIN_PREDICTED_SPEEDUP = 1.1
MAX_GAMMA = 4


def choose_gamma(acceptance: float, **costs: Any) -> int:
    """The gamma in 1..MAX_GAMMA with the best `predicted_speedup`, or 0 (decode plainly) unless it is
    predicted to reach MIN_PREDICTED_SPEEDUP (short contexts and small batches, where the draft
    costs about what the model does)."""
    best = max(range(1, MAX_GAMMA + 1), key=lambda g: predicted_speedup(acceptance, g, **costs))
    return best if predicted_speedup(acceptance, best, **costs) >= MIN_PREDICTED_SPEEDUP else 0


# ------------------------------------------------------------------------------------------------
# The StreamingLLM view.


def streaming_view(cache: KVCache, budget: int, sinks: int, extra: int) -> KVCache:
    """Gather each row's first `sinks` entries and latest `budget - sinks` entries (all entries when the
    row holds <= budget) into a cache of `budget + extra` slots; its lengths are `min(length, budget)`."""
    lengths = cache.lengths
    slots = jnp.arange(budget)[None, :]  # [1, budget]
    recent = lengths[:, None] - budget + slots  # the last budget - sinks entries, for slots >= sinks
    index = jnp.where((lengths[:, None] > budget) & (slots >= sinks), recent, slots)  # [B, budget]
    # A budget beyond the cache's slots (a short request) reads its last slot again: out-of-range gathers
    # fill with NaN, and a NaN value times its zero attention weight is NaN (it made every draft wrong).
    index = jnp.minimum(index, cache.keys[0].shape[2] - 1)

    def gather(buffer: jax.Array) -> jax.Array:  # [B, H, S, D] -> [B, H, budget + extra, D]
        picked = jnp.take_along_axis(buffer, index[:, None, :, None], axis=2)
        return jnp.pad(picked, ((0, 0), (0, 0), (0, extra), (0, 0)))

    return KVCache(
        tuple(map(gather, cache.keys)), tuple(map(gather, cache.values)), jnp.minimum(lengths, budget).astype(jnp.int32)
    )


# ------------------------------------------------------------------------------------------------
# Distributions and the verification rule.


def distributions(logits: jax.Array, sampling: SamplingArrays, plan: SamplingPlan) -> jax.Array:
    """Sampling distributions float32 `[B, T, V]` from logits `[B, T, V]`: temperature and filters as
    in `sampling.sample`, one-hot on the argmax for greedy rows (temperature 0)."""
    batch, steps, vocab = logits.shape
    flat = logits.reshape(batch * steps, vocab).astype(jnp.float32)
    repeat = jax.tree.map(lambda a: jnp.repeat(a, steps, axis=0), sampling)
    probs = jax.nn.softmax(filter_logits(flat, repeat, plan), axis=-1)
    one_hot = jax.nn.one_hot(jnp.argmax(flat, axis=-1), vocab, dtype=jnp.float32)
    probs = jnp.where(repeat.temperature[:, None] > 0, probs, one_hot)
    return probs.reshape(batch, steps, vocab)


def draw(keys: jax.Array, probs: jax.Array) -> jax.Array:
    """One draw per row: keys `[B]`, probs `[B, V]` -> int32 `[B]`."""
    return jax.vmap(lambda k, p: jax.random.categorical(k, jnp.log(p)))(keys, probs).astype(jnp.int32)


def verify(draft_tokens: jax.Array, q: jax.Array, p: jax.Array, keys: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The speculative rule, per row.

    draft_tokens int32 `[B, g]`; q `[B, g, V]` the draft's distributions they were drawn from; p
    `[B, g + 1, V]` the model's distributions at the same positions plus one; keys `[B]` (this round's).
    Returns (tokens int32 `[B, g + 1]`, accepted int32 `[B]`): the row's new tokens are
    `tokens[b, :accepted[b] + 1]` (accepted draft tokens, then the correction or bonus token).
    """
    gamma = draft_tokens.shape[1]
    p_draft = jnp.take_along_axis(p[:, :gamma], draft_tokens[..., None], axis=-1)[..., 0]
    q_draft = jnp.take_along_axis(q, draft_tokens[..., None], axis=-1)[..., 0]
    uniform = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, _ACCEPT), (gamma,)))(keys)
    # u < p/q written without dividing (q > 0 for a drawn token; q == 0 would reject)
    accept = uniform * q_draft < p_draft
    accepted = jnp.sum(jnp.cumprod(accept, axis=1), axis=1).astype(jnp.int32)  # [B]
    p_next = jnp.take_along_axis(p, accepted[:, None, None], axis=1)[:, 0]  # [B, V]
    q_padded = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)  # no draft after the last: bonus from p
    q_next = jnp.take_along_axis(q_padded, accepted[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(p_next - q_next, 0.0)
    mass = jnp.sum(residual, axis=-1, keepdims=True)
    residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p_next)  # p == q: rejection impossible
    final = draw(jax.vmap(lambda k: jax.random.fold_in(k, _RESIDUAL))(keys), residual)
    tokens = jnp.concatenate([draft_tokens, jnp.zeros_like(draft_tokens[:, :1])], axis=1)
    tokens = jnp.where(jnp.arange(gamma + 1)[None, :] == accepted[:, None], final[:, None], tokens)
    return tokens, accepted


def verify_greedy(draft_tokens: jax.Array, target_tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Greedy verification: draft `[B, g]`, the model's argmax `[B, g + 1]` -> (tokens, accepted) as in
    `verify` (accepted draft tokens equal the model's, so the new tokens are the model's argmax)."""
    match = draft_tokens == target_tokens[:, :-1]
    return target_tokens, jnp.sum(jnp.cumprod(match, axis=1), axis=1).astype(jnp.int32)
