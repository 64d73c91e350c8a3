"""Sampling strategies: a small frozen settings dataclass and pure functions of (logits, key, settings).

Settings may differ per row of a batch. They travel into the jitted loop as arrays (`SamplingArrays`),
so new values do not recompile; only which filters are in use at all (`SamplingPlan`) is static.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


@dataclass(frozen=True)
class Sampling:
    """How to pick the next token. The default is greedy (temperature 0).

    temperature: 0 is greedy; otherwise logits are divided by it before sampling.
    top_k: keep the k most likely tokens (0: off).
    top_p: keep the smallest set of most likely tokens whose probability reaches top_p (1: off).
    min_p: drop tokens less likely than min_p times the most likely one (0: off).
    repetition_penalty: HF/CTRL style; logits of tokens already in the prompt or output are divided
      by it when positive and multiplied when negative (1: off). Applies to greedy decoding too.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        # NumPy scalars are taken as the Python numbers they hold; anything else that is not a number is
        # refused by name (and int32 bounds the top-k, which travels as an int32 array).
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
            object.__setattr__(self, name, float(value))
        if isinstance(self.top_k, (bool, np.bool_)) or not isinstance(self.top_k, (int, np.integer)):
            raise TypeError(f"top_k must be an integer, got {type(self.top_k).__name__} {self.top_k!r}")
        object.__setattr__(self, "top_k", int(self.top_k))
        if self.top_k > 2**31 - 1:
            raise ValueError(f"top_k must be at most {2**31 - 1} (0 turns it off), got {self.top_k}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 turns it off), got {self.top_k!r}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1] (1 turns it off), got {self.top_p}")
        if not (0.0 <= self.min_p < 1.0):
            raise ValueError(f"min_p must be in [0, 1) (0 turns it off), got {self.min_p}")
        if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
            raise ValueError(
                f"repetition_penalty must be a finite number > 0 (1 turns it off), got {self.repetition_penalty}"
            )

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class SamplingArrays(NamedTuple):
    """Per-row settings, each `[B]`."""

    temperature: jax.Array  # float32
    top_k: jax.Array  # int32, 0 = off
    top_p: jax.Array  # float32
    min_p: jax.Array  # float32
    repetition_penalty: jax.Array  # float32


@dataclass(frozen=True)
class SamplingPlan:
    """Which filters any row uses; static under jit so unused ones cost nothing."""

    all_greedy: bool
    top_k: bool
    top_p: bool
    min_p: bool
    repetition_penalty: bool


def prepare(sampling: Sampling | Sequence[Sampling], batch_size: int) -> tuple[SamplingArrays, SamplingPlan]:
    """One `Sampling` for the whole batch, or one per row -> (arrays, static plan)."""
    if isinstance(sampling, Sampling):
        rows = [sampling] * batch_size
    elif isinstance(sampling, Sequence) and all(isinstance(s, Sampling) for s in sampling):
        rows = list(sampling)
    else:
        raise TypeError(f"sampling must be a jd.Sampling or a list of them, got {type(sampling).__name__}")
    if len(rows) != batch_size:
        raise ValueError(f"got {len(rows)} sampling settings for {batch_size} prompts; give one, or one per prompt")
    sampled = [s for s in rows if not s.greedy]
    arrays = SamplingArrays(
        temperature=jnp.asarray([s.temperature for s in rows], jnp.float32),
        top_k=jnp.asarray([s.top_k for s in rows], jnp.int32),
        top_p=jnp.asarray([s.top_p for s in rows], jnp.float32),
        min_p=jnp.asarray([s.min_p for s in rows], jnp.float32),
        repetition_penalty=jnp.asarray([s.repetition_penalty for s in rows], jnp.float32),
    )
    plan = SamplingPlan(
        all_greedy=not sampled,
        top_k=any(s.top_k > 0 for s in sampled),
        top_p=any(s.top_p < 1.0 for s in sampled),
        min_p=any(s.min_p > 0.0 for s in sampled),
        repetition_penalty=any(s.repetition_penalty != 1.0 for s in rows),
    )
    return arrays, plan


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: jax.Array) -> jax.Array:
    """logits float32 `[B, V]`, seen bool `[B, V]`, penalty `[B]`."""
    p = penalty[:, None]
    return jnp.where(seen, jnp.where(logits > 0, logits / p, logits * p), logits)


def filter_logits(logits: jax.Array, settings: SamplingArrays, plan: SamplingPlan) -> jax.Array:
    """Temperature, then top-k, top-p and min-p: filtered-out tokens get -inf. `[B, V]` float32."""
    temperature = jnp.where(settings.temperature > 0, settings.temperature, 1.0)
    logits = logits / temperature[:, None]
    if plan.top_k or plan.top_p:
        descending = -jnp.sort(-logits, axis=-1)
        if plan.top_k:
            k = jnp.clip(settings.top_k, 1, logits.shape[-1])
            kth = jnp.take_along_axis(descending, (k - 1)[:, None], axis=-1)
            kth = jnp.where(settings.top_k[:, None] > 0, kth, -jnp.inf)
            logits = jnp.where(logits < kth, -jnp.inf, logits)
            descending = jnp.where(descending < kth, -jnp.inf, descending)
        if plan.top_p:
            probs = jax.nn.softmax(descending, axis=-1)
            before = jnp.cumsum(probs, axis=-1) - probs  # probability mass strictly above each token
            # Rows with top_p = 1 keep everything: rounding can bring a float32 cumulative sum to 1 early.
            keep = (before < settings.top_p[:, None]) | (settings.top_p[:, None] >= 1.0)
            threshold = jnp.min(jnp.where(keep, descending, jnp.inf), axis=-1, keepdims=True)
            logits = jnp.where(logits < threshold, -jnp.inf, logits)
    if plan.min_p:
        probs = jax.nn.softmax(logits, axis=-1)
        floor = settings.min_p[:, None] * jnp.max(probs, axis=-1, keepdims=True)
        logits = jnp.where(probs < floor, -jnp.inf, logits)
    return logits


def sample(
    logits: jax.Array,
    keys: jax.Array,
    settings: SamplingArrays,
    plan: SamplingPlan,
    seen: jax.Array | None = None,
) -> jax.Array:
    """Next tokens int32 `[B]` from logits float32 `[B, V]`, drawing row b's token with `keys[b]` (`[B]`
    keys). `seen` bool `[B, V]` marks tokens for the repetition penalty (required when the plan uses it)."""
    logits = logits.astype(jnp.float32)
    if plan.repetition_penalty:
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if plan.all_greedy:
        return greedy
    filtered = filter_logits(logits, settings, plan)
    sampled = jax.vmap(lambda key, row: jax.random.categorical(key, row))(keys, filtered).astype(jnp.int32)
    return jnp.where(settings.temperature > 0, sampled, greedy)
