"""Activity predictors for flash checkpoints (`flash.py`): one low-rank model per layer,
`scores = relu(x A + a) B + b`, trained with optax to tell from an MLP's input x which neurons will be active.

A neuron is active for a token when |act(gate . x) * (up . x)| is above its layer's threshold, the
threshold being the layer's `1 - fraction` quantile over the training tokens (so `fraction` of the neurons
are active on average). SwiGLU models are not sparse the way the paper's ReLU models are: every neuron
contributes a little, and leaving out the small ones costs quality (measured in the README).
At inference a token computes the top `fraction` of its scores; precision and recall below are of that set
against the true active set, on held-out tokens.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint, flash
from .engine import Model
from .model import mlp_activity

WINDOW = 512  # tokens per recorded window


@dataclass(frozen=True)
class Training:
    rank: int = 128
    fraction: float = 0.3
    max_tokens: int = 8192
    steps: int = 400
    batch_tokens: int = 512
    learning_rate: float = 3e-3
    held_out: float = 0.1
    seed: int = 0

    def __post_init__(self):
        if not (isinstance(self.rank, int) and 1 <= self.rank <= 4096):
            raise ValueError(f"rank must be 1..4096, got {self.rank!r}")
        if not (isinstance(self.fraction, (int, float)) and 0 < self.fraction < 1):
            raise ValueError(f"fraction must be in (0, 1), got {self.fraction!r}")
        if not (isinstance(self.max_tokens, int) and self.max_tokens >= 2 * WINDOW):
            raise ValueError(f"max_tokens must be at least {2 * WINDOW}, got {self.max_tokens!r}")


def record(model: Model, token_ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """MLP inputs float32 `[L, N, d]` and |hidden| float32 `[L, N, F]` over `token_ids` in windows of 512."""
    run = jax.jit(lambda p, t, pos: mlp_activity(p, model.config, t, pos))
    usable = len(token_ids) // WINDOW * WINDOW
    tokens = np.asarray(token_ids[:usable], np.int32).reshape(-1, WINDOW)
    positions = np.broadcast_to(np.arange(WINDOW, dtype=np.int32), (4, WINDOW))
    inputs, hidden = [], []
    for first in range(0, tokens.shape[0], 4):
        chunk = tokens[first : first + 4]
        x, h = run(model.params, jnp.asarray(chunk), jnp.asarray(positions[: chunk.shape[0]]))
        inputs.append(np.asarray(x).reshape(x.shape[0], -1, x.shape[-1]))
        hidden.append(np.abs(np.asarray(h)).reshape(h.shape[0], -1, h.shape[-1]))
    return np.concatenate(inputs, axis=1), np.concatenate(hidden, axis=1)


def _scores(p: dict[str, jax.Array], x: jax.Array) -> jax.Array:
    return (
        jnp.einsum("lnr,lrf->lnf", jax.nn.relu(jnp.einsum("lnd,ldr->lnr", x, p["a"]) + p["a_bias"][:, None]), p["b"])
        + p["b_bias"][:, None]
    )


def train(
    model: Model,
    token_ids: list[int],
    settings: Training = Training(),
    progress: Callable[[int, float], None] | None = None,
) -> tuple[list[dict[str, np.ndarray]], dict[str, Any]]:
    """Train one predictor per layer on `token_ids`. Returns (per-layer arrays, a report: thresholds and
    held-out precision / recall per layer). `progress(step, loss)` is called as training goes."""
    import optax

    inputs, activity = record(model, token_ids[: settings.max_tokens])
    n = inputs.shape[1]
    split = n - max(int(n * settings.held_out), WINDOW // 4)
    layers, d, f = inputs.shape[0], inputs.shape[2], activity.shape[2]
    thresholds = np.quantile(activity[:, :split], 1 - settings.fraction, axis=(1, 2)).astype(np.float32)  # [L]
    labels = activity > thresholds[:, None, None]
    key = jax.random.key(settings.seed)
    k1, k2 = jax.random.split(key)
    prior = math.log(settings.fraction / (1 - settings.fraction))
    params = {
        "a": jax.random.normal(k1, (layers, d, settings.rank)) / math.sqrt(d),
        "a_bias": jnp.zeros((layers, settings.rank)),
        "b": jax.random.normal(k2, (layers, settings.rank, f)) / math.sqrt(settings.rank),
        "b_bias": jnp.full((layers, f), prior),
    }
    optimizer = optax.adam(settings.learning_rate)
    state = optimizer.init(params)

    @jax.jit
    def step(params, state, x, y):
        def loss_fn(p):
            return jnp.mean(optax.sigmoid_binary_cross_entropy(_scores(p, x), y))

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    rng = np.random.default_rng(settings.seed)
    train_x, train_y = inputs[:, :split], labels[:, :split]
    for i in range(settings.steps):
        batch = rng.choice(split, size=min(settings.batch_tokens, split), replace=False)
        params, state, loss = step(params, state, train_x[:, batch], train_y[:, batch].astype(np.float32))
        if progress is not None:
            progress(i + 1, float(loss))
    keep = math.ceil(settings.fraction * f)
    scores = np.asarray(_scores(params, jnp.asarray(inputs[:, split:])))
    top = np.argpartition(-scores, keep - 1, axis=-1)[..., :keep]
    chosen = np.zeros(scores.shape, bool)
    np.put_along_axis(chosen, top, True, axis=-1)
    truth = labels[:, split:]
    both = (chosen & truth).sum(axis=(1, 2))
    report = {
        "fraction": settings.fraction,
        "rank": settings.rank,
        "train_tokens": split,
        "held_out_tokens": n - split,
        "thresholds": thresholds.tolist(),
        "precision": (both / chosen.sum(axis=(1, 2))).tolist(),
        "recall": (both / np.maximum(truth.sum(axis=(1, 2)), 1)).tolist(),
    }
    host = jax.tree.map(lambda a: np.asarray(a, np.float32), params)
    return [{k: host[k][i] for k in host} for i in range(layers)], report


def save(directory: str | os.PathLike[str], predictors: list[dict[str, np.ndarray]], report: dict[str, Any]) -> None:
    """Store the predictors in the flash checkpoint `directory` (a new version, committed atomically)."""
    from safetensors.numpy import save as to_bytes

    tensors = {f"layer_{i}.{k}": np.ascontiguousarray(v) for i, p in enumerate(predictors) for k, v in p.items()}
    meta = {"fraction": str(report["fraction"]), "report": json.dumps(report)}
    checkpoint.add_files(directory, {f"{flash.FLASH}/{flash.PREDICTORS}": to_bytes(tensors, metadata=meta)})
