"""The public Python API: load a model, run a forward pass, generate text (whole or streamed).

These are the edges around the jittable core in `generate.py`: text in and out, prompt-length
buckets (so a new prompt length reuses a compiled program), timing, and streaming.
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from tokenizers.decoders import DecodeStream

from . import checkpoint, parallel
from .attention import resolve as resolve_attention
from .config import ModelConfig
from .generate import config_as_keyword, decode_loop, decode_step, prefill
from .io.gguf import load_gguf, open_model
from .io.hf import load_hf, read_hf_config
from .io.sources import resolve_source
from .io.tokenizer import Tokenizer
from .model import Params, apply, linear_weights_to_in_out
from .quantize import check_choice as check_quant_choice
from .quantize import is_quantized, param_bytes, quantize_params
from .sampling import Sampling, prepare
from .speculative import DraftModel, SelfSpeculative, choose_gamma, draft_prefill, speculative_loop

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MIN_BUCKET = 16


@dataclass
class Model:
    """A loaded model: static config, parameter pytree, tokenizer.

    `params` and `config` are what the jittable functions (`jaxdecode.apply`,
    `jaxdecode.generate_tokens`) take. `executables` caches compiled programs of `generate`.
    """

    config: ModelConfig
    params: Params
    tokenizer: Tokenizer | None
    source: str = ""
    attention: str = "auto"
    mesh: jax.sharding.Mesh | None = None  # set by `shard`: params are in parallel.py's sharded layout
    executables: dict[Any, Any] = field(default_factory=dict, repr=False)

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"model {self.source!r} has no tokenizer: pass token ids instead of text")
        return self.tokenizer


def load(
    source: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    attention: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    quant: str | None = None,
    group_size: int = 128,
) -> Model:
    """Load a model.

    Args:
      source: an embedded name ("smollm2-135m", "gemma3-270m"), a `.gguf` file, an HF directory
        (config.json + safetensors), a `save`d checkpoint, or a hub id ("org/name", fetched into the
        Hugging Face cache; see `jaxdecode/io/sources.py`).
      dtype: "float32" or "bfloat16" for the weights, the activations and the KV cache.
      attention: "auto" (Pallas kernels on TPU / GPU, XLA on CPU), "xla", "pallas" (the kernel of this
        platform, an error where there is none) or "interpret" / "interpret-triton" (the TPU / Triton
        kernel in Pallas interpret mode, for checking the kernels on CPU; slow). See `jaxdecode/attention.py`.
      mesh: a `make_mesh(data=..., model=...)` mesh: params go straight from the host to their shards
        (tensor parallel over `model`, batch over `data`; see `jaxdecode/parallel.py`).
      quant: None (float weights), "int8" (per output channel), "int4" (groups of `group_size` columns)
        or "native" (a GGUF's own Q8_0 / Q4_0 / Q4_1 blocks). See `jaxdecode/quantize.py`.
      group_size: int4 group size, 32, 64 or 128.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
    check_quant_choice(quant, group_size)
    backend = resolve_attention(attention)
    path = resolve_source(source)
    if checkpoint.is_checkpoint(path):
        return _load_checkpoint(path, dtype, backend, mesh, quant)
    np_dtype = np.dtype(DTYPES[dtype])
    if path.is_dir():
        if quant == "native":
            raise ValueError(f"quant='native' keeps a GGUF file's blocks; {path} is not a GGUF file: use int8 or int4")
        config, params, tokenizer = load_hf(path, np_dtype)
    else:
        config, params, tokenizer = load_gguf(path, np_dtype, native=quant == "native")
    if quant in ("int8", "int4"):
        params = quantize_params(params, quant, group_size, dtype)
    model = Model(config, linear_weights_to_in_out(params), tokenizer, str(source), backend)
    return shard(model, mesh) if mesh is not None else replace(model, params=jax.tree.map(jnp.asarray, model.params))


def load_config(source: str | os.PathLike[str]) -> ModelConfig:
    """The config of anything `load` takes, validated, without reading the weights (a directory with only
    a config.json is enough; a GGUF file is read up to its tensor table)."""
    path = resolve_source(source)
    if checkpoint.is_checkpoint(path):
        return checkpoint.saved_config(path)
    if path.is_dir():
        return read_hf_config(path)[0]
    return open_model(path).config


def _load_checkpoint(path: Path, dtype: str, backend: str, mesh: jax.sharding.Mesh | None, quant: str | None) -> Model:
    """A `save`d checkpoint; with a mesh, params are read straight onto their devices where the sharded
    layout is the saved one (no KV-head repetition or vocabulary padding needed), else placed by `shard`."""
    if quant is not None:
        raise ValueError(f"{path} is a saved checkpoint, loaded as saved: convert it with --quant {quant} instead")

    model_size = 1 if mesh is None else mesh.shape[parallel.MODEL]
    direct = mesh is not None and parallel.layout_is_identity(checkpoint.saved_config(path), model_size)

    def shardings(abstract: Any) -> Any:
        return jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, spec), parallel.param_specs(abstract))

    config, params, tokenizer = checkpoint.load(path, shardings if direct else None)
    _refuse_quantized_tensor_parallel(params, model_size)
    float_dtype = DTYPES[dtype]

    def cast(leaf: Any) -> Any:
        if is_quantized(leaf):
            return replace(leaf, dtype=dtype)
        floating = jnp.issubdtype(leaf.dtype, jnp.floating) and leaf.dtype != float_dtype
        return leaf.astype(float_dtype) if floating else leaf

    params = jax.tree.map(cast, params, is_leaf=is_quantized)
    model = Model(config, params, tokenizer, str(path), backend)
    if direct:
        return replace(model, mesh=mesh)
    return shard(model, mesh) if mesh is not None else replace(model, params=jax.tree.map(jnp.asarray, params))


def save(model: Model, directory: str | os.PathLike[str]) -> Path:
    """Save `model` (config, tokenizer, float or quantized params) as an Orbax checkpoint in `directory`;
    `load(directory)` restores it bit for bit. An existing checkpoint there is replaced only once the
    new one is complete. See `jaxdecode/checkpoint.py`."""
    if model.mesh is not None:
        raise ValueError("save the model as loaded without a mesh (a sharded model holds the mesh's layout)")
    return checkpoint.save(model.config, model.params, model.tokenizer, directory)


def _refuse_quantized_tensor_parallel(params: Params, model_size: int) -> None:
    if model_size > 1 and any(map(is_quantized, jax.tree.leaves(params, is_leaf=is_quantized))):
        raise ValueError(
            f"quantized weights are not split over model={model_size} yet: use a mesh with model=1 "
            "(data parallel) for a quantized model, or float weights for tensor parallelism"
        )


def shard(model: Model, mesh: jax.sharding.Mesh) -> Model:
    """The model with its params split over `mesh` (tensor parallel over `model`, see `parallel.py`).

    Each device receives only its shard, from the host copy (in every process of a multi-host run).
    Raises ValueError naming the numbers when heads or the MLP width do not divide by the mesh.
    """
    if model.mesh is not None:
        raise ValueError("the model is already sharded; shard the unsharded model onto the new mesh")
    model_size = mesh.shape[parallel.MODEL]
    parallel.check_config(model.config, model_size)
    _refuse_quantized_tensor_parallel(model.params, model_size)
    host = jax.tree.map(np.asarray, model.params)
    layout = parallel.sharded_layout(host, model.config, model_size)
    params = parallel.place(layout, parallel.param_specs(layout), mesh)
    return replace(model, params=params, mesh=mesh, executables={})


_apply_jit = jax.jit(apply, static_argnames=("config", "prefill", "attention_impl"))


def forward(model: Model, tokens: Any) -> jax.Array:
    """Full causal forward without a cache: int32 `[B, T]` -> float32 logits `[B, T, vocab]`
    (on a mesh: split over `data` by row; `parallel.fetch` brings it to the host in every process)."""
    tokens = _token_array(model, tokens, "tokens", ndim=2)
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    if model.mesh is None:
        return _apply_jit(model.params, model.config, tokens, positions, attention_impl=model.attention)[0]
    batch = tokens.shape[0]
    rows = _rows_for_mesh(model, batch)
    if "forward" not in model.executables:
        model.executables["forward"] = parallel.sharded_logits_fn(model.mesh, model.config, model.attention)
    logits = model.executables["forward"](model.params, *_on_mesh(model, (tokens[rows], positions[rows])))
    return logits[:batch]


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
    ids = _token_array(model, token_ids, "token_ids", ndim=1, max_len=INT32_MAX)
    window = min(_integer(window, "window", 2, INT32_MAX), model.config.max_seq_len)
    batch = _integer(batch, "batch", 1, 1 << 16)
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


def _rows_for_mesh(model: Model, batch: int) -> np.ndarray:
    """Row indices that pad a batch to a multiple of the mesh's `data` axis by repeating rows (the
    extra rows' results are dropped); `arange(batch)` without a mesh."""
    data = 1 if model.mesh is None else model.mesh.shape[parallel.DATA]
    return np.resize(np.arange(batch), -(-batch // data) * data)


def _on_mesh(model: Model, tree: Any) -> Any:
    """Per-row host inputs as the model's programs take them: global arrays split over `data` on a mesh."""
    return tree if model.mesh is None else parallel.place_rows(tree, model.mesh)


@dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt (stop tokens excluded)
    text: list[str]
    prompt_tokens: list[list[int]]
    finish_reasons: list[str]  # "stop" (a stop token) or "length" (max_new_tokens)
    prefill_s: float
    decode_s: float
    compile_s: float
    decode_steps: int  # decode loop iterations (speculative rounds for speculative decoding)
    decode_tokens: int = 0  # tokens the decode loop produced, summed over the batch (0: decode_steps - 1 each)
    speculation: dict[str, float] | None = None  # gamma, acceptance rate, tokens per round (speculative only)

    @property
    def prefill_tokens_per_s(self) -> float:
        return sum(len(p) for p in self.prompt_tokens) / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens computed per second by the decode loop, summed over the batch (the first token of
        each row comes from the prefill and is not counted)."""
        produced = self.decode_tokens or (self.decode_steps - 1) * len(self.tokens)
        return produced / self.decode_s if self.decode_s > 0 else float("nan")


def bucket(length: int, limit: int) -> int:
    """The padded length for a prompt of `length` tokens: the next power of two (>= 16), capped at `limit`."""
    size = MIN_BUCKET
    while size < length:
        size *= 2
    return min(size, max(limit, length))


INT32_MAX = 2**31 - 1


def _integer(value: Any, name: str, low: int, high: int) -> int:
    """`value` (a Python or NumPy integer, not a bool) as an int in [low, high], else an error naming `name`."""
    if not _is_token(value):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    return int(value)


def _is_token(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _token_ids(model: Model, ids: Any, name: str) -> list[int]:
    """One sequence of token ids (a list / tuple of Python or NumPy integers, or a 1-D integer array),
    each checked against the vocabulary."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise TypeError(f"{name} must be a 1-D array of integer token ids, got {ids.dtype}{list(ids.shape)}")
        ids = ids.tolist()
    if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Sequence):
        raise TypeError(f"{name} must be a list of integer token ids, got {type(ids).__name__}")
    bad_type = next((t for t in ids if not _is_token(t)), None)
    if bad_type is not None:
        raise TypeError(f"{name}: token ids must be integers, got {type(bad_type).__name__} {bad_type!r}")
    out = [int(t) for t in ids]
    bad = next((t for t in out if not 0 <= t < model.config.vocab_size), None)
    if bad is not None:
        raise ValueError(f"{name}: token id {bad} is outside the vocabulary (0..{model.config.vocab_size - 1})")
    return out


def _token_array(model: Model, tokens: Any, name: str, ndim: int, max_len: int | None = None) -> np.ndarray:
    """Token ids as an int32 array of `ndim` (1: a sequence, 2: `[batch, length]`) with at least one token
    per row, each in the vocabulary and each row at most `max_len` (default: the context) long."""
    rows = [tokens] if ndim == 1 else tokens
    if isinstance(rows, np.ndarray):
        rows = list(rows)
    if isinstance(rows, (str, bytes, bytearray)) or not isinstance(rows, Sequence) or not rows:
        raise TypeError(f"{name} must be {'a list' if ndim == 1 else 'a [batch, length] list'} of token ids")
    ids = [_token_ids(model, row, name) for row in rows]
    if len({len(row) for row in ids}) != 1 or not ids[0]:
        raise ValueError(f"{name}: every row needs the same number (>= 1) of tokens, got {[len(r) for r in ids]}")
    limit = model.config.max_seq_len if max_len is None else max_len
    if len(ids[0]) > limit:
        raise ValueError(f"{name}: {len(ids[0])} tokens exceed the model's context of {limit}")
    array = np.asarray(ids, np.int32)
    return array[0] if ndim == 1 else array


def _prompt_list(prompts: Any) -> list[Any]:
    """One prompt (text, or a sequence / 1-D array of ids) or a batch of them -> a list of prompts."""
    if isinstance(prompts, np.ndarray):
        if prompts.ndim not in (1, 2):
            raise TypeError(f"prompts: an array of token ids must be 1-D or 2-D, got shape {list(prompts.shape)}")
        return [prompts] if prompts.ndim == 1 else list(prompts)
    if isinstance(prompts, str):
        return [prompts]
    if isinstance(prompts, (bytes, bytearray)) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be text, token ids or a list of them, got {type(prompts).__name__}")
    if not prompts:
        raise ValueError("no prompts given")
    return [prompts] if _is_token(prompts[0]) else list(prompts)


def _encode_prompts(model: Model, prompts: str | Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    encoded = []
    for p in _prompt_list(prompts):
        ids = model.require_tokenizer().encode(p) if isinstance(p, str) else _token_ids(model, p, "prompts")
        if not ids:
            raise ValueError("empty prompt: give at least one token of text")
        encoded.append(ids)
    return encoded


@dataclass(frozen=True)
class _Plan:
    """Padded shapes of one generate call."""

    batch: int
    prompt_len: int
    buffer_size: int
    cache_len: int


def _plan(model: Model, prompts: list[list[int]], max_new_tokens: int, extra_slots: int = 0) -> _Plan:
    if not _is_token(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    max_new_tokens = int(max_new_tokens)
    context = model.config.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens + extra_slots > context:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens}"
            + (f" + {extra_slots} for speculation" if extra_slots else "")
            + f" exceeds the model's context of {context} tokens; shorten the prompt or lower max_new_tokens"
        )
    prompt_len = bucket(longest, context)
    buffer_size = bucket(max_new_tokens, context)
    return _Plan(len(prompts), prompt_len, buffer_size, prompt_len + buffer_size + extra_slots)


def _compiled(model: Model, name: str, fn: Any, statics: dict[str, Any], args: tuple, donate: tuple[int, ...] = ()):
    """Compile `fn` for these argument shapes once per model; returns (executable, seconds spent compiling)."""
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), args)
    key = (name, tuple(sorted(statics.items())), str(shapes))
    if key in model.executables:
        return model.executables[key], 0.0
    start = time.perf_counter()
    fn = config_as_keyword(fn)
    if model.mesh is not None:
        fn = parallel.sharded_generate_fn(fn, model.mesh)
    # Donation by position: the wrappers take `*args`, so argument names would match nothing (and JAX
    # would silently donate nothing, copying the whole KV cache on every call).
    jitted = jax.jit(fn, static_argnames=tuple(statics), donate_argnums=donate)
    try:
        executable = jitted.lower(*args, **statics).compile()
    except Exception as error:
        if statics.get("attention_impl") != "auto":
            raise  # a kernel asked for by name fails loudly
        executable = _compiled_with_xla_attention(name, jitted, statics, args, error)
    model.executables[key] = executable
    return executable, time.perf_counter() - start


def _compiled_with_xla_attention(name: str, jitted: Any, statics: dict[str, Any], args: tuple, error: Exception):
    """`auto`'s safety net on real hardware: a program whose Pallas kernel does not compile on the device at
    hand (a Mosaic version, an unforeseen shape) is compiled with XLA attention instead, with one warning
    naming the error. If that fails too, the error was not the kernel's: raise the original."""
    try:
        executable = jitted.lower(*args, **{**statics, "attention_impl": "xla"}).compile()
    except Exception:
        raise error from None
    device = jax.devices()[0].device_kind
    first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    warnings.warn(
        f"{name}: the attention kernel did not compile on {device} ({type(error).__name__}: {first_line}); "
        "this program runs with XLA attention instead (attention='pallas' raises the error)",
        RuntimeWarning,
        stacklevel=4,
    )
    return executable


def _pad(prompts: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, np.asarray([len(p) for p in prompts], np.int32)


def _start(model, prompts, max_new_tokens, sampling, seed, stop_ids, extra_slots=0):
    """Encode, pad, compile (cached) and run the prefill. Returns what the decode phase needs."""
    encoded = _encode_prompts(model, prompts)
    seed = _integer(seed, "seed", -(2**63), 2**63 - 1)
    if stop_ids is not None:
        stop_ids = _token_ids(model, stop_ids, "stop_ids")
    arrays, sampling_plan = prepare(sampling, len(encoded))
    rows = _rows_for_mesh(model, len(encoded))  # on a mesh the batch splits over `data`
    padded = [encoded[i] for i in rows]
    arrays = jax.tree.map(lambda a: np.asarray(a)[rows], arrays)
    plan = _plan(model, padded, max_new_tokens, extra_slots)
    if stop_ids is None:
        stop_ids = model.tokenizer.stop_ids if model.tokenizer is not None else ()
    statics = dict(
        config=model.config,
        plan=sampling_plan,
        stop_ids=tuple(int(s) for s in stop_ids),
        attention_impl=model.attention,
    )
    tokens, lengths = _pad(padded, plan.prompt_len)
    keys = jax.random.split(jax.random.key(seed), plan.batch)
    tokens, lengths, keys, arrays = _on_mesh(model, (tokens, lengths, keys, arrays))
    prefill_args = (model.params, tokens, lengths, keys, arrays)
    prefill_exe, compile_s = _compiled(
        model,
        "prefill",
        prefill,
        {**statics, "buffer_size": plan.buffer_size + extra_slots, "cache_len": plan.cache_len},
        prefill_args,
    )
    start = time.perf_counter()
    state = jax.block_until_ready(prefill_exe(*prefill_args))
    return encoded, arrays, statics, state, compile_s, time.perf_counter() - start, (tokens, lengths, plan)


def generate(
    model: Model,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    sampling: Sampling | Sequence[Sampling] = Sampling(),
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
    speculative: SelfSpeculative | DraftModel | None = None,
) -> GenerationResult:
    """Generate continuations of one prompt or a batch (strings or token-id lists, lengths may differ).

    `sampling` is one setting for all prompts or one per prompt. Generation of a row ends at one of
    `stop_ids` (default: the tokenizer's end-of-text / end-of-turn tokens) or after `max_new_tokens`.
    `speculative`: `SelfSpeculative(...)` or `DraftModel(draft, gamma)` (see `speculative.py`): the same
    output distribution (greedy: the same tokens), fewer passes over the full KV cache; the result's
    `speculation` carries gamma and the acceptance rate.
    """
    if speculative is not None:
        return _generate_speculative(model, prompts, max_new_tokens, sampling, seed, stop_ids, speculative)
    encoded, arrays, statics, state, compile_s, prefill_s, _ = _start(
        model, prompts, max_new_tokens, sampling, seed, stop_ids
    )
    limit = _on_mesh(model, np.int32(max_new_tokens))
    loop_exe, loop_compile_s = _compiled(
        model, "decode_loop", decode_loop, statics, (model.params, state, arrays, limit), donate=(1,)
    )
    start = time.perf_counter()
    state = jax.block_until_ready(loop_exe(model.params, state, arrays, limit))
    decode_s = time.perf_counter() - start

    tokens, counts, done, steps = (parallel.fetch(x) for x in (state.tokens, state.num_tokens, state.done, state.step))
    generated = [tokens[i, : counts[i]].tolist() for i in range(len(encoded))]
    text = [model.tokenizer.decode(g) for g in generated] if model.tokenizer is not None else [""] * len(generated)
    return GenerationResult(
        tokens=generated,
        text=text,
        prompt_tokens=encoded,
        finish_reasons=["stop" if d else "length" for d in done[: len(encoded)]],
        prefill_s=prefill_s,
        decode_s=decode_s,
        compile_s=compile_s + loop_compile_s,
        decode_steps=int(steps),
    )


def _gamma(model: Model, speculative: SelfSpeculative | DraftModel, batch: int, context: int) -> int:
    """The configured gamma, or the cost model's choice for this batch and context (self-speculation)."""
    if speculative.gamma is not None:
        return speculative.gamma
    cfg = model.config
    itemsize = jnp.dtype(model.params["embed"].dtype).itemsize  # the KV cache's dtype (quantized: its dtype)
    kv_per_token = cfg.num_layers * 2 * cfg.num_kv_heads * cfg.head_dim * itemsize
    return choose_gamma(
        speculative.acceptance,
        weight_bytes=param_bytes(model.params),
        kv_bytes_per_token=kv_per_token,
        batch=batch,
        context=context,
        budget=speculative.budget,
    )


def _generate_speculative(model, prompts, max_new_tokens, sampling, seed, stop_ids, speculative):
    if not isinstance(speculative, (SelfSpeculative, DraftModel)):
        raise ValueError("speculative must be jd.SelfSpeculative(...) or jd.DraftModel(draft, gamma=...)")
    encoded = _encode_prompts(model, prompts)
    if any(s.repetition_penalty != 1.0 for s in ([sampling] if isinstance(sampling, Sampling) else sampling)):
        raise ValueError("speculative decoding does not take a repetition penalty (it changes p between drafts)")
    draft = speculative.draft if isinstance(speculative, DraftModel) else None
    if draft is not None:
        if draft.config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the model's "
                f"({model.config.vocab_size}): a draft must share the tokenizer"
            )
        if (draft.mesh is None) != (model.mesh is None) or (draft.mesh is not None and draft.mesh != model.mesh):
            raise ValueError("the draft model must be on the same mesh as the model (jd.shard both, or neither)")
    gamma = _gamma(model, speculative, len(encoded), max(map(len, encoded)))
    if gamma == 0:  # the cost model predicts no gain: decode plainly
        result = generate(
            model, encoded, max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop_ids=stop_ids
        )
        return replace(result, speculation={"gamma": 0, "acceptance_rate": float("nan"), "tokens_per_round": 1.0})
    extra = 2 * (gamma + 1)
    encoded, arrays, statics, state, compile_s, prefill_s, (tokens, lengths, plan) = _start(
        model, encoded, max_new_tokens, sampling, seed, stop_ids, extra_slots=extra
    )
    draft_params, draft_cache, draft_config = None, None, None
    budget = sinks = 0
    if draft is None:
        budget, sinks = speculative.budget, speculative.sinks
    else:
        draft_config = draft.config
        args = (draft.params, tokens, lengths)
        draft_statics = dict(config=draft.config, cache_len=plan.cache_len, attention_impl=model.attention)
        exe, seconds = _compiled(draft, "draft_prefill", draft_prefill, draft_statics, args)
        compile_s += seconds
        start = time.perf_counter()
        draft_cache = jax.block_until_ready(exe(*args))
        prefill_s += time.perf_counter() - start
        draft_params = draft.params
    limit = _on_mesh(model, np.int32(max_new_tokens))
    statics = {**statics, "draft_config": draft_config, "gamma": gamma, "budget": budget, "sinks": sinks}
    args = (model.params, state, arrays, draft_params, draft_cache, limit)
    loop_exe, loop_compile_s = _compiled(model, "speculative_loop", speculative_loop, statics, args, donate=(1, 4))
    start = time.perf_counter()
    state = jax.block_until_ready(loop_exe(*args))
    decode_s = time.perf_counter() - start

    out, counts, accepted, drafted = (
        parallel.fetch(x) for x in (state.tokens, state.count, state.accepted, state.drafted)
    )
    stop = set(statics["stop_ids"])
    generated, reasons = [], []
    for i in range(len(encoded)):
        row = out[i, : min(int(counts[i]), max_new_tokens)].tolist()
        cut = next((j for j, t in enumerate(row) if t in stop), None)
        generated.append(row if cut is None else row[:cut])
        reasons.append("length" if cut is None else "stop")
    text = [model.tokenizer.decode(g) for g in generated] if model.tokenizer is not None else [""] * len(generated)
    rounds = int(parallel.fetch(state.rounds))
    total_accepted, total_drafted = int(accepted[: len(encoded)].sum()), int(drafted[: len(encoded)].sum())
    produced = int(sum(min(int(c), max_new_tokens) - 1 for c in counts[: len(encoded)]))
    return GenerationResult(
        tokens=generated,
        text=text,
        prompt_tokens=encoded,
        finish_reasons=reasons,
        prefill_s=prefill_s,
        decode_s=decode_s,
        compile_s=compile_s + loop_compile_s,
        decode_steps=rounds,
        decode_tokens=max(produced, 1),
        speculation={
            "gamma": gamma,
            "acceptance_rate": total_accepted / total_drafted if total_drafted else float("nan"),
            "tokens_per_round": 1 + total_accepted / max(total_drafted / gamma, 1),
            "rounds": rounds,
        },
    )


@dataclass
class StreamPiece:
    token: int
    text: str  # the new text this token completes (may be "" while a multi-byte character is incomplete)


def stream(
    model: Model,
    prompt: str | Sequence[int],
    *,
    max_new_tokens: int = 64,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
) -> Iterator[StreamPiece]:
    """Generate for one prompt, yielding each token and its text as soon as it is sampled.

    Produces the same tokens as `generate` with the same arguments (same seed, same jitted step).
    """
    count = len(_prompt_list(prompt))
    if count != 1:
        raise ValueError(f"stream takes one prompt, got {count}; use generate for a batch")
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be one jd.Sampling for stream, got {type(sampling).__name__}")
    _, arrays, statics, state, _, _, _ = _start(model, prompt, max_new_tokens, sampling, seed, stop_ids)
    step_exe, _ = _compiled(model, "decode_step", decode_step, statics, (model.params, state, arrays), donate=(1,))
    # tokenizers' incremental decoder: each step costs one token, not a re-decode of all text so far,
    # and it returns None while a multi-byte character is still incomplete.
    decoder = DecodeStream(skip_special_tokens=True)
    for i in range(max_new_tokens):
        if i:
            state = step_exe(model.params, state, arrays)
        if bool(state.done[0]):
            return
        token = int(state.last_token[0])
        text = decoder.step(model.tokenizer.backend, token) if model.tokenizer is not None else None
        yield StreamPiece(token, text or "")
