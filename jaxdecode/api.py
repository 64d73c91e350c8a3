"""The public Python API, a thin front: `load`, `save`, `shard` (`loading.py`), `generate`, `stream` and
`forward` (the one decode engine, `engine.py`), `perplexity` and `expert_load`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from . import engine, parallel
from .engine import GenerationResult, Model, StreamPiece, forward, integer, token_array
from .loading import DTYPES, load, load_config, save, shard
from .sampling import Sampling
from .speculative import DraftModel, SelfSpeculative

__all__ = [
    "DTYPES",
    "GenerationResult",
    "Model",
    "StreamPiece",
    "expert_load",
    "forward",
    "generate",
    "load",
    "load_config",
    "perplexity",
    "save",
    "shard",
    "stream",
]


def generate(
    model: Model,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    sampling: Sampling | Sequence[Sampling] = Sampling(),
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
    speculative: SelfSpeculative | DraftModel | None = None,
    expert_load: bool = False,
) -> GenerationResult:
    """Generate continuations of one prompt or a batch (strings or token-id lists, lengths may differ).

    `sampling` is one setting for all prompts or one per prompt. Generation of a row ends at one of
    `stop_ids` (default: the tokenizer's end-of-text / end-of-turn tokens) or after `max_new_tokens`.
    `speculative`: `SelfSpeculative(...)` or `DraftModel(draft, gamma)` (see `speculative.py`): the same
    output distribution (greedy: the same tokens), fewer passes over the full KV cache; the result's
    `speculation` carries gamma and the acceptance rate. `expert_load=True` (a mixture of experts): the
    result's `expert_load` counts, per layer, the tokens the router sent to each expert (`expert_load`).
    """
    return engine.generate(
        model,
        prompts,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        seed=seed,
        stop_ids=stop_ids,
        speculative=speculative,
        expert_load=expert_load,
    )


def expert_load(model: Model, sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """Per layer, how many tokens of `sequences` (token-id lists) a mixture of experts routes to each expert:
    int64 `[num_layers, num_experts]` (zeros in dense layers), from one causal forward over them. Each token
    counts `experts_per_token` times; an even load is `tokens * experts_per_token / num_experts` each."""
    return engine.routed_counts(model, sequences)


def stream(
    model: Model,
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int = 64,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
    speculative: SelfSpeculative | DraftModel | None = None,
) -> Iterator[StreamPiece]:
    """Generate for one prompt, yielding each token and its text as soon as it is produced; with
    `speculative`, each round's accepted tokens as the round ends.

    Produces the same tokens as `generate` with the same arguments (same seed, same jitted step).
    """
    return engine.stream(
        model,
        prompt,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        seed=seed,
        stop_ids=stop_ids,
        speculative=speculative,
    )


@jax.jit
def _token_nll(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """-log p(target) float32 `[B, T]` from logits `[B, T, V]` and int32 targets `[B, T]`."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


def perplexity(model: Model, token_ids: Sequence[int], window: int = 1024, batch: int = 4) -> tuple[float, int]:
    """Perplexity of `token_ids` scored in non-overlapping windows of `window` tokens, no BOS added:
    in each window every token after the first is predicted from the ones before it in that window
    (a shorter last window is scored the same way; a window is at most the model's context). Returns
    (perplexity, number of scored tokens). `batch` windows run per forward pass."""
    ids = token_array(model, token_ids, "token_ids", ndim=1, max_len=engine.INT32_MAX)
    window = min(integer(window, "window", 2, engine.INT32_MAX), model.config.max_seq_len)
    batch = integer(batch, "batch", 1, 1 << 16)
    if ids.size < 2:
        raise ValueError(f"need at least 2 tokens to score, got {ids.size}")
    windows = [ids[i : i + window] for i in range(0, ids.size, window)]
    windows = [w for w in windows if w.size >= 2]
    total, count = 0.0, 0
    for length in sorted({w.size for w in windows}):  # one shape per window length
        same = np.stack([w for w in windows if w.size == length])
        for start in range(0, len(same), batch):
            chunk = same[start : start + batch]
            logits = forward(model, chunk)
            nll = _token_nll(jnp.asarray(parallel.fetch(logits) if model.mesh else logits)[:, :-1], chunk[:, 1:])
            total += float(np.sum(np.asarray(nll, np.float64)))
            count += chunk.shape[0] * (length - 1)
    return float(np.exp(total / count)), count
