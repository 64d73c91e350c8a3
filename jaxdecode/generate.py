"""The jittable generation core: prefill, a decode step, and the whole decode loop in `lax.while_loop`.

Everything here is a pure function of (params, static config, arrays, key): it runs under `jax.jit`,
also inside a user's own jitted function. `api.py` adds the edges (text, buckets, timing, streaming).

Batches of prompts of different lengths are right-padded to a common length T; each row keeps its
own cache length, so padding is never attended (it is overwritten before it could be).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from . import parallel as par
from .config import ModelConfig
from .kv_cache import KVCache, init_cache
from .model import Params, apply
from .parallel import Parallel
from .sampling import Sampling, SamplingArrays, SamplingPlan, prepare, sample


class DecodeState(NamedTuple):
    """Everything the decode loop carries. `tokens` `[B, N]` holds the generated ids (N = buffer size)."""

    kv_cache: KVCache
    last_token: jax.Array  # int32 [B], the token to feed next
    step: jax.Array  # int32 [], tokens generated so far (per row, including stopped rows)
    tokens: jax.Array  # int32 [B, N]
    num_tokens: jax.Array  # int32 [B], tokens before the row's first stop token
    done: jax.Array  # bool [B], the row has produced a stop token
    seen: jax.Array | None  # bool [B, V], tokens in prompt or output (only for the repetition penalty)
    keys: jax.Array  # [B] random keys, one per row: a row's draws do not depend on how the batch is split


class GenerateOutput(NamedTuple):
    tokens: jax.Array  # int32 [B, N]; row b's generated ids are tokens[b, :num_tokens[b]]
    num_tokens: jax.Array  # int32 [B]
    stopped: jax.Array  # bool [B]: True if the row ended on a stop token, False if it ran out of budget


def _record(state: DecodeState, token: jax.Array, stop_ids: tuple[int, ...]) -> DecodeState:
    is_stop = jnp.isin(token, jnp.asarray(stop_ids, jnp.int32)) if stop_ids else jnp.zeros_like(state.done)
    counts = state.num_tokens + (~state.done & ~is_stop).astype(jnp.int32)
    seen = state.seen
    if seen is not None:
        seen = seen.at[jnp.arange(token.shape[0]), token].set(True)
    return state._replace(
        last_token=token,
        step=state.step + 1,
        tokens=state.tokens.at[:, state.step].set(token),
        num_tokens=counts,
        done=state.done | is_stop,
        seen=seen,
    )


def next_tokens(
    logits: jax.Array,
    vocab_size: int,
    keys: jax.Array,
    step: jax.Array,
    sampling: SamplingArrays,
    plan: SamplingPlan,
    seen: jax.Array | None,
    parallel: Parallel | None,
) -> jax.Array:
    """Tokens int32 `[B]` from the new position's logits `[B, V]` (vocab-sharded under `parallel`).

    Greedy batches under tensor parallelism take the distributed argmax; anything else gathers the
    logits, and every model shard draws the same numbers because the per-row keys are replicated.
    """
    if parallel is not None and plan.all_greedy and not plan.repetition_penalty:
        return par.argmax_tokens(logits, parallel)
    logits = par.gather_vocab(logits, vocab_size, parallel)
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
    return sample(logits, step_keys, sampling, plan, seen)


def prefill_cache(
    params: Params,
    config: ModelConfig,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    *,
    cache_len: int,
    attention_impl: str = "auto",
    parallel: Parallel | None = None,
) -> tuple[jax.Array, KVCache]:
    """A fresh cache of `cache_len` slots filled with the right-padded prompts `[B, T]`: (the logits at
    each row's last prompt token `[B, V]`, the cache with lengths = prompt_lengths)."""
    batch, steps = prompt_tokens.shape
    dtype = jnp.dtype(params["embed"].dtype)  # a quantized embedding names its float dtype
    cache = init_cache(config, batch, cache_len, dtype, par.local_kv_heads(config.num_kv_heads, parallel))
    positions = jnp.broadcast_to(jnp.arange(steps, dtype=jnp.int32), (batch, steps))
    logits, cache = apply(
        params,
        config,
        prompt_tokens,
        positions,
        cache,
        prefill=True,
        logits_at=prompt_lengths - 1,
        attention_impl=attention_impl,
        parallel=parallel,
    )
    return logits, cache._replace(lengths=prompt_lengths.astype(jnp.int32))


def prefill(
    params: Params,
    config: ModelConfig,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    keys: jax.Array,
    sampling: SamplingArrays,
    *,
    plan: SamplingPlan,
    buffer_size: int,
    cache_len: int,
    stop_ids: tuple[int, ...] = (),
    attention_impl: str = "auto",
    parallel: Parallel | None = None,
) -> DecodeState:
    """Run the prompts through the model and sample the first new token of each row.

    prompt_tokens int32 `[B, T]` right-padded; prompt_lengths int32 `[B]` (>= 1); keys: `[B]` random
    keys (e.g. `jax.random.split(key, B)`). The cache holds `cache_len` slots, which must be
    >= T + buffer_size.
    """
    batch, steps = prompt_tokens.shape
    logits, cache = prefill_cache(
        params,
        config,
        prompt_tokens,
        prompt_lengths,
        cache_len=cache_len,
        attention_impl=attention_impl,
        parallel=parallel,
    )
    seen = None
    if plan.repetition_penalty:
        valid = jnp.arange(steps)[None, :] < prompt_lengths[:, None]
        seen = jnp.zeros((batch, config.vocab_size), bool)
        seen = seen.at[jnp.arange(batch)[:, None], prompt_tokens].max(valid)
    state = DecodeState(
        kv_cache=cache,
        last_token=jnp.zeros((batch,), jnp.int32),
        step=jnp.zeros((), jnp.int32),
        tokens=jnp.zeros((batch, buffer_size), jnp.int32),
        num_tokens=jnp.zeros((batch,), jnp.int32),
        done=jnp.zeros((batch,), bool),
        seen=seen,
        keys=keys,
    )
    token = next_tokens(logits, config.vocab_size, keys, state.step, sampling, plan, seen, parallel)
    return _record(state, token, stop_ids)


def decode_step(
    params: Params,
    config: ModelConfig,
    state: DecodeState,
    sampling: SamplingArrays,
    *,
    plan: SamplingPlan,
    stop_ids: tuple[int, ...] = (),
    attention_impl: str = "auto",
    parallel: Parallel | None = None,
) -> DecodeState:
    """Feed each row's last token, sample the next one."""
    cache = state.kv_cache
    logits, cache = apply(
        params,
        config,
        state.last_token[:, None],
        cache.lengths[:, None],
        cache,
        logits_at=jnp.zeros_like(cache.lengths),
        attention_impl=attention_impl,
        parallel=parallel,
    )
    token = next_tokens(logits, config.vocab_size, state.keys, state.step, sampling, plan, state.seen, parallel)
    return _record(state._replace(kv_cache=cache), token, stop_ids)


def decode_loop(
    params: Params,
    config: ModelConfig,
    state: DecodeState,
    sampling: SamplingArrays,
    max_new_tokens: jax.Array | int,
    *,
    plan: SamplingPlan,
    stop_ids: tuple[int, ...] = (),
    attention_impl: str = "auto",
    parallel: Parallel | None = None,
) -> DecodeState:
    """Decode until every row has stopped or `max_new_tokens` (<= the buffer size; may be traced) are out."""
    limit = jnp.minimum(jnp.asarray(max_new_tokens, jnp.int32), state.tokens.shape[1])

    def cond(s: DecodeState) -> jax.Array:
        all_done = jnp.all(s.done)
        if parallel is not None:  # every shard runs the same number of steps (their collectives must pair up)
            all_done = lax.pmin(all_done.astype(jnp.int32), (parallel.data_axis, parallel.model_axis)) > 0
        return (s.step < limit) & ~all_done

    def step(s: DecodeState) -> DecodeState:
        # Tie the params to the loop state: otherwise XLA hoists loop-invariant work on them out of the
        # loop, e.g. dequantizing every quantized weight into a float copy carried through the loop
        # (measured: int8 decode slower than float32). The barrier costs nothing at run time.
        step_params, s = lax.optimization_barrier((params, s))
        return decode_step(
            step_params,
            config,
            s,
            sampling=sampling,
            plan=plan,
            stop_ids=stop_ids,
            attention_impl=attention_impl,
            parallel=parallel,
        )

    return lax.while_loop(cond, step, state)


def config_as_keyword(fn):
    """`fn(params, config, *rest, **kw)` (prefill, decode_loop, ...) as `fn(params, *rest, config=..., **kw)`:
    every static a keyword, as `jax.jit(static_argnames=...)` and `parallel.sharded_generate_fn` take them."""

    def wrapped(params, *rest, config, **statics):
        return fn(params, config, *rest, **statics)

    wrapped.__name__ = fn.__name__
    return wrapped


def generate_tokens(
    params: Params,
    config: ModelConfig,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    key: jax.Array,
    *,
    max_new_tokens: int,
    sampling: Sampling | Sequence[Sampling] = Sampling(),
    stop_ids: tuple[int, ...] = (),
    attention_impl: str = "auto",
) -> GenerateOutput:
    """Generate up to `max_new_tokens` per row: the jittable core of `jaxdecode.generate`.

    Args:
      params, config: the model (`model.params`, `model.config` of a loaded `jaxdecode.Model`).
      prompt_tokens: int32 `[B, T]`, right-padded prompts.
      prompt_lengths: int32 `[B]`, the number of real tokens of each row (1..T).
      key: a `jax.random` key.
      max_new_tokens, sampling, stop_ids, attention_impl: static settings (hashable Python values).

    Returns:
      `GenerateOutput` with `tokens` int32 `[B, max_new_tokens]`.

    Use it under `jax.jit` with `config` and the keyword settings static, e.g.
    `jax.jit(generate_tokens, static_argnames=("config", "max_new_tokens", "sampling", "stop_ids"))`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    arrays, plan = prepare(sampling, prompt_tokens.shape[0])
    static = dict(plan=plan, stop_ids=tuple(stop_ids), attention_impl=attention_impl)
    state = prefill(
        params,
        config,
        prompt_tokens,
        prompt_lengths,
        jax.random.split(key, prompt_tokens.shape[0]),
        arrays,
        buffer_size=max_new_tokens,
        cache_len=prompt_tokens.shape[1] + max_new_tokens,
        **static,
    )
    state = decode_loop(params, config, state, arrays, max_new_tokens, **static)
    return GenerateOutput(state.tokens, state.num_tokens, state.done)
