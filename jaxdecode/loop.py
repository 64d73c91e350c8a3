"""The jittable decode loop: prefill, one decode step and the whole loop in `lax.while_loop`, for plain
and speculative decoding alike.

Everything here is a pure function of (params, one static `Decoding`, arrays, keys): it runs under
`jax.jit`, inside a user's own jitted function, or as one shard of a `shard_map` (`engine.py` builds
those programs from the specs the state types declare). A step produces one token per row (plain
decoding) or a speculative round's accepted tokens plus one (`speculative.py` has the rule); both
go through the same bookkeeping (`_record`): tokens into the row's buffer, stop tokens detected on
the device, the row's output length kept there, so the host only fetches and never rescans.

Batches of prompts of different lengths are right-padded to a common length T; each row keeps its
own cache length, so padding is never attended (it is overwritten before it could be). A row that
has finished (a stop token, or its limit) computes along with the batch but keeps its state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

from . import collectives as col
from .collectives import DATA, Parallel
from .config import ModelConfig
from .kv_cache import KVCache, init_cache
from .model import Params, apply
from .sampling import Sampling, SamplingArrays, SamplingPlan, prepare, sample
from .speculative import DRAFT_STREAM, distributions, draw, streaming_view, verify, verify_greedy


@dataclasses.dataclass(frozen=True)
class Speculation:
    """The static settings of speculative decoding (see `speculative.py`).

    gamma: tokens drafted per round. budget, sinks: the StreamingLLM view a self-draft reads.
    draft_config: a draft model's config (its params are the programs' `draft_params`); None drafts
    with the model itself (with `draft_params`, if given: the same model's weights in another form,
    e.g. int8, with its own cache).
    in_place: the self-draft reads the view in place, through the attention's window and sinks (where
    the kernels skip what lies outside: `attention.skips_outside_window`), rather than gathering a
    copy of it each round (XLA on CPU, where a windowed read still reads the whole cache).
    """

    gamma: int
    budget: int = 512
    sinks: int = 16
    draft_config: ModelConfig | None = None
    in_place: bool = False


@dataclasses.dataclass(frozen=True)
class Decoding:
    """Every static setting of the compiled programs, one hashable object (a jit static).

    buffer_size: token slots per row (what is asked for, plus a speculative round's overshoot);
    cache_len: KV cache slots per row (>= prompt length + buffer_size, + gamma + 1 when speculating).
    parallel: set when the programs run as shards of a mesh (`engine.py` sets it).
    """

    config: ModelConfig
    plan: SamplingPlan
    buffer_size: int
    cache_len: int
    stop_ids: tuple[int, ...] = ()
    attention: str = "auto"
    parallel: Parallel | None = None
    speculation: Speculation | None = None

    def forward(self, params: Params, config: ModelConfig, tokens, positions, kv_cache, **options):
        """`model.apply` with this program's attention backend and shard (config: the model's or the draft's)."""
        return apply(
            params,
            config,
            tokens,
            positions,
            kv_cache,
            attention_impl=self.attention,
            parallel=self.parallel,
            **options,
        )


class DecodeState(NamedTuple):
    """Everything the decode loop carries. Row b's output is `tokens[b, :num_tokens[b]]`."""

    kv_cache: KVCache
    last_token: jax.Array  # int32 [B], generated and not yet in the cache
    step: jax.Array  # int32 [], steps so far, the prefill's included (a token or a speculative round each)
    tokens: jax.Array  # int32 [B, N], generated ids; a row writes tokens[b, :written[b]]
    written: jax.Array  # int32 [B], tokens generated (a stop token and what its round drafted after it included)
    num_tokens: jax.Array  # int32 [B], tokens before the row's first stop token, at most the limit
    done: jax.Array  # bool [B], a stop token was generated within the limit
    keys: jax.Array  # [B] random keys, one per row: a row's draws do not depend on how the batch is split
    seen: jax.Array | None  # bool [B, V], tokens in prompt or output (only for the repetition penalty)
    draft_cache: KVCache | None  # a draft model's cache (speculative decoding with a draft model only)
    accepted: jax.Array  # int32 [B], draft tokens accepted (speculative decoding; zero otherwise)
    drafted: jax.Array  # int32 [B], draft tokens proposed while the row was running

    @staticmethod
    def specs(settings: Decoding) -> DecodeState:
        """Its sharding on a mesh for these settings: caches by `KVCache.specs`, the step counter
        replicated, everything else per row over `data`; absent fields None."""
        row, cache = P(DATA), KVCache.specs()
        draft = settings.speculation is not None and settings.speculation.draft_config is not None
        return DecodeState(
            kv_cache=cache,
            last_token=row,
            step=P(),
            tokens=row,
            written=row,
            num_tokens=row,
            done=row,
            keys=row,
            seen=row if settings.plan.repetition_penalty else None,
            draft_cache=cache if draft else None,
            accepted=row,
            drafted=row,
        )


class GenerateOutput(NamedTuple):
    tokens: jax.Array  # int32 [B, N]; row b's generated ids are tokens[b, :num_tokens[b]]
    num_tokens: jax.Array  # int32 [B]
    stopped: jax.Array  # bool [B]: True if the row ended on a stop token, False if it ran out of budget


def _record(
    state: DecodeState, new: jax.Array, count: jax.Array, running: jax.Array, limit: jax.Array, stop_ids: tuple
) -> DecodeState:
    """The bookkeeping of every step: `new` int32 `[B, k]`, of which each running row takes its first
    `count[b]` (1..k) tokens. Writes them, detects stop tokens within the limit, advances the counts."""
    batch, k = new.shape
    offsets = jnp.arange(k)[None, :]
    valid = running[:, None] & (offsets < count[:, None])
    slots = state.written[:, None] + offsets
    rows = jnp.arange(batch)[:, None]
    tokens = state.tokens.at[rows, jnp.where(valid, slots, state.tokens.shape[1])].set(new, mode="drop")
    is_stop = valid & (slots < limit) & jnp.isin(new, jnp.asarray(stop_ids, jnp.int32)) if stop_ids else valid & False
    stopped = jnp.any(is_stop, axis=1)
    before_stop = jnp.where(stopped, jnp.argmax(is_stop, axis=1), jnp.where(running, count, 0))
    num_tokens = jnp.where(state.done, state.num_tokens, jnp.minimum(state.num_tokens + before_stop, limit))
    last = jnp.take_along_axis(new, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
    seen = state.seen
    if seen is not None:
        seen = seen.at[rows, new].max(valid)
    return state._replace(
        last_token=jnp.where(running, last, state.last_token),
        step=state.step + 1,
        tokens=tokens,
        written=state.written + jnp.where(running, count, 0),
        num_tokens=num_tokens.astype(jnp.int32),
        done=state.done | stopped,
        seen=seen,
    )


def next_tokens(
    logits: jax.Array, settings: Decoding, keys: jax.Array, step: jax.Array, sampling: SamplingArrays, seen
) -> jax.Array:
    """Tokens int32 `[B]` from the new position's logits `[B, V]` (vocab-sharded under `parallel`).

    Greedy batches under tensor parallelism take the distributed argmax; anything else gathers the
    logits, and every model shard draws the same numbers because the per-row keys are replicated.
    """
    plan, parallel = settings.plan, settings.parallel
    if parallel is not None and plan.all_greedy and not plan.repetition_penalty:
        return col.argmax_tokens(logits, parallel)
    logits = col.gather_vocab(logits, settings.config.vocab_size, parallel)
    step_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, step)
    return sample(logits, step_keys, sampling, plan, seen)


def prefill_cache(
    params: Params, settings: Decoding, config: ModelConfig, prompt_tokens: jax.Array, prompt_lengths: jax.Array
) -> tuple[jax.Array, KVCache]:
    """A fresh cache of `settings.cache_len` slots filled with the right-padded prompts `[B, T]`: (the
    logits at each row's last prompt token `[B, V]`, the cache with lengths = prompt_lengths)."""
    batch, steps = prompt_tokens.shape
    dtype = jnp.dtype(params["embed"].dtype)  # a quantized embedding names its float dtype
    cache = init_cache(config, batch, settings.cache_len, dtype, settings.parallel)
    positions = jnp.broadcast_to(jnp.arange(steps, dtype=jnp.int32), (batch, steps))
    logits, cache = settings.forward(
        params, config, prompt_tokens, positions, cache, prefill=True, logits_at=prompt_lengths - 1
    )
    return logits, cache._replace(lengths=prompt_lengths.astype(jnp.int32))


def prefill(
    params: Params,
    settings: Decoding,
    prompt_tokens: jax.Array,
    prompt_lengths: jax.Array,
    keys: jax.Array,
    sampling: SamplingArrays,
    draft_params: Params | None = None,
) -> DecodeState:
    """Run the prompts through the model (and a draft model, if speculating with one) and sample the
    first new token of each row.

    prompt_tokens int32 `[B, T]` right-padded; prompt_lengths int32 `[B]` (>= 1); keys: `[B]` random
    keys (e.g. `jax.random.split(key, B)`). The cache holds `settings.cache_len` slots.
    """
    config = settings.config
    batch, steps = prompt_tokens.shape
    logits, cache = prefill_cache(params, settings, config, prompt_tokens, prompt_lengths)
    draft_cache = None
    spec = settings.speculation
    if spec is not None and spec.draft_config is not None:
        _, draft_cache = prefill_cache(draft_params, settings, spec.draft_config, prompt_tokens, prompt_lengths)
    seen = None
    if settings.plan.repetition_penalty:
        valid = jnp.arange(steps)[None, :] < prompt_lengths[:, None]
        seen = jnp.zeros((batch, config.vocab_size), bool)
        seen = seen.at[jnp.arange(batch)[:, None], prompt_tokens].max(valid)
    zeros = jnp.zeros((batch,), jnp.int32)
    state = DecodeState(
        kv_cache=cache,
        last_token=zeros,
        step=jnp.zeros((), jnp.int32),
        tokens=jnp.zeros((batch, settings.buffer_size), jnp.int32),
        written=zeros,
        num_tokens=zeros,
        done=jnp.zeros((batch,), bool),
        keys=keys,
        seen=seen,
        draft_cache=draft_cache,
        accepted=zeros,
        drafted=zeros,
    )
    token = next_tokens(logits, settings, keys, state.step, sampling, seen)
    everyone = jnp.ones((batch,), bool)
    return _record(state, token[:, None], zeros + 1, everyone, jnp.int32(settings.buffer_size), settings.stop_ids)


def _draft(
    params: Params,
    settings: Decoding,
    config: ModelConfig,
    cache: KVCache,
    state: DecodeState,
    steps: int,
    keys: jax.Array,
    sampling: SamplingArrays,
    kv_view: tuple[int, int] | None = None,
) -> tuple[KVCache, jax.Array, jax.Array | None]:
    """`steps` single-token draft passes from each row's last token at its true position (cache slots
    from `cache.lengths`; `kv_view` as in `model.apply`). Returns (cache, draft tokens `[B, steps]`,
    their distributions `[B, steps, V]` or None when every row is greedy)."""
    plan, parallel, positions = settings.plan, settings.parallel, state.kv_cache.lengths

    def one(carry, i):
        cache, token = carry
        logits, cache = settings.forward(
            params,
            config,
            token[:, None],
            (positions + i)[:, None],
            cache,
            logits_at=jnp.zeros_like(token),
            cache_start=cache.lengths,
            kv_view=kv_view,
        )
        if plan.all_greedy:
            nxt = col.argmax_tokens(logits, parallel)
            return (cache, nxt), (nxt, jnp.zeros((), jnp.float32))
        probs = distributions(col.gather_vocab(logits, config.vocab_size, parallel)[:, None], sampling, plan)[:, 0]
        nxt = draw(jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(k, DRAFT_STREAM), i))(keys), probs)
        return (cache, nxt), (nxt, probs)

    (cache, _), (tokens, probs) = lax.scan(one, (cache, state.last_token), jnp.arange(steps))
    return cache, tokens.T, None if plan.all_greedy else probs.transpose(1, 0, 2)


def _speculative_step(
    params: Params,
    settings: Decoding,
    state: DecodeState,
    sampling: SamplingArrays,
    draft_params: Params | None,
    running: jax.Array,
) -> tuple[DecodeState, jax.Array, jax.Array]:
    """One round: draft gamma tokens per row, verify them in one pass of the model over gamma + 1
    positions, roll each row's caches back to what it accepted. Returns (state with the new caches and
    counts, tokens `[B, gamma + 1]`, how many of them each row takes `[B]`)."""
    spec, config, plan = settings.speculation, settings.config, settings.plan
    gamma, lengths = spec.gamma, state.kv_cache.lengths
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(state.keys, state.step)
    draft_cache, cache = state.draft_cache, state.kv_cache
    self_weights = params if draft_params is None else draft_params  # a self-draft's weights (maybe int8)
    if spec.draft_config is None and spec.in_place:  # the model on its own cache, seen through the view
        view = (spec.budget - spec.sinks + 1, spec.sinks)  # + 1: the new token, as the gathered view holds it
        cache, drafted, q = _draft(self_weights, settings, config, cache, state, gamma, keys, sampling, view)
        cache = cache._replace(lengths=lengths)  # the draft's entries are overwritten by the verification
    elif spec.draft_config is None:  # the model on a gathered copy of the StreamingLLM view
        view = streaming_view(cache, spec.budget, spec.sinks, gamma + 1)
        _, drafted, q = _draft(self_weights, settings, config, view, state, gamma, keys, sampling)
    else:  # gamma + 1 steps: the draft's cache then holds the last draft token too
        draft_cache, drafted, q = _draft(
            draft_params, settings, spec.draft_config, draft_cache, state, gamma + 1, keys, sampling
        )
        drafted, q = drafted[:, :gamma], None if q is None else q[:, :gamma]

    block = jnp.concatenate([state.last_token[:, None], drafted], axis=1)  # [B, gamma + 1]
    positions = lengths[:, None] + jnp.arange(gamma + 1)[None, :]
    logits, cache = settings.forward(params, config, block, positions, cache)
    if plan.all_greedy:
        flat = col.argmax_tokens(logits.reshape(-1, logits.shape[-1]), settings.parallel)
        tokens, accepted = verify_greedy(drafted, flat.reshape(block.shape))
    else:
        p = distributions(col.gather_vocab(logits, config.vocab_size, settings.parallel), sampling, plan)
        tokens, accepted = verify(drafted, q, p, keys)
    new_lengths = jnp.where(running, lengths + accepted + 1, lengths)  # the last token and accepted drafts
    state = state._replace(
        kv_cache=cache._replace(lengths=new_lengths),
        draft_cache=None if draft_cache is None else draft_cache._replace(lengths=new_lengths),
        accepted=state.accepted + jnp.where(running, accepted, 0),
        drafted=state.drafted + jnp.where(running, gamma, 0),
    )
    return state, tokens, accepted + 1


def decode_step(
    params: Params,
    settings: Decoding,
    state: DecodeState,
    sampling: SamplingArrays,
    limit: jax.Array | int,
    draft_params: Params | None = None,
) -> DecodeState:
    """One step for every row that is still running (no stop token, fewer than `limit` tokens): feed
    its last token and sample the next one, or one speculative round when `settings.speculation`."""
    limit = jnp.asarray(limit, jnp.int32)
    running = ~state.done & (state.written < limit)
    if settings.speculation is not None:
        state, new, count = _speculative_step(params, settings, state, sampling, draft_params, running)
        return _record(state, new, count, running, limit, settings.stop_ids)
    lengths = state.kv_cache.lengths
    logits, cache = settings.forward(
        params, settings.config, state.last_token[:, None], lengths[:, None], state.kv_cache,
        logits_at=jnp.zeros_like(lengths),
    )  # fmt: skip
    token = next_tokens(logits, settings, state.keys, state.step, sampling, state.seen)
    state = state._replace(kv_cache=cache._replace(lengths=jnp.where(running, lengths + 1, lengths)))
    return _record(state, token[:, None], jnp.ones_like(lengths), running, limit, settings.stop_ids)


def decode_loop(
    params: Params,
    settings: Decoding,
    state: DecodeState,
    sampling: SamplingArrays,
    limit: jax.Array | int,
    draft_params: Params | None = None,
) -> DecodeState:
    """`decode_step` until no row is running; `limit` (<= the buffer size; may be traced) tokens per row."""
    limit = jnp.minimum(jnp.asarray(limit, jnp.int32), state.tokens.shape[1])

    def cond(s: DecodeState) -> jax.Array:
        return col.any_on_any_device(jnp.any(~s.done & (s.written < limit)), settings.parallel)

    def step(s: DecodeState) -> DecodeState:
        # Tie the params to the loop state: otherwise XLA hoists loop-invariant work on them out of the
        # loop, e.g. dequantizing every quantized weight into a float copy carried through the loop
        # (measured: int8 decode slower than float32). The barrier costs nothing at run time.
        (step_params, step_draft), s = lax.optimization_barrier(((params, draft_params), s))
        return decode_step(step_params, settings, s, sampling, limit, step_draft)

    return lax.while_loop(cond, step, state)


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
    batch, steps = prompt_tokens.shape
    arrays, plan = prepare(sampling, batch)
    settings = Decoding(config, plan, max_new_tokens, steps + max_new_tokens, tuple(stop_ids), attention_impl)
    state = prefill(params, settings, prompt_tokens, prompt_lengths, jax.random.split(key, batch), arrays)
    state = decode_loop(params, settings, state, arrays, max_new_tokens)
    return GenerateOutput(state.tokens, state.num_tokens, state.done)
