"""The one decode engine: every mode (plain or speculative, self-draft or draft model, one device or a
mesh, whole or streamed) runs the same stages once: encode -> place -> compile (cached) -> run ->
fetch -> decode.

- encode: prompts to padded token arrays, checked against the vocabulary; the batch padded to a
  multiple of the mesh's `data` axis; prompt and buffer lengths bucketed to powers of two so that a
  new length reuses a compiled program;
- place: per-row inputs split over `data` (`parallel.place_rows`);
- compile: the programs of `loop.py` under one static `Decoding`, as a `shard_map` on a mesh with the
  in and out specs the state types declare (`DecodeState.specs`, `weights.specs`), cached per model;
  `auto` attention falls back to XLA attention where a Pallas kernel does not compile;
- run: prefill, then the decode loop (or one step at a time, for streaming);
- fetch and decode: the rows' tokens (cut at their stop tokens on the device) and their text.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P
from tokenizers.decoders import DecodeStream

from . import parallel, weights
from .attention import skips_outside_window
from .collectives import DATA, MODEL
from .config import ModelConfig
from .io.tokenizer import Tokenizer
from .loop import DecodeState, Decoding, Speculation, decode_loop, decode_step, prefill
from .model import Params, apply, routing
from .quantize import is_quantized, quantize_params
from .sampling import Sampling, prepare
from .speculative import DraftModel, PassCosts, SelfSpeculative, choose_gamma
from .targets import roofline_here

MIN_BUCKET = 16
INT32_MAX = 2**31 - 1


@dataclass
class Model:
    """A loaded model: static config, parameter pytree, tokenizer.

    `params` and `config` are what the jittable functions (`jaxdecode.apply`,
    `jaxdecode.generate_tokens`) take. `executables` caches the compiled programs of the engine.
    """

    config: ModelConfig
    params: Params
    tokenizer: Tokenizer | None
    source: str = ""
    attention: str = "auto"
    mesh: jax.sharding.Mesh | None = None  # set by `shard`: params are in the sharded layout (weights.py)
    executables: dict[Any, Any] = field(default_factory=dict, repr=False)
    derived: dict[str, Params] = field(default_factory=dict, repr=False)  # e.g. an int8 self-draft's weights
    offload: Any = None  # a `flash.FlashStore`: the MLP weights are in storage (`load(..., offload=...)`)

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise ValueError(f"model {self.source!r} has no tokenizer: pass token ids instead of text")
        return self.tokenizer

    def decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens) if self.tokenizer is not None else ""


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
    expert_load: np.ndarray | None = None  # int64 [layers, experts]: tokens routed to each (`expert_load=True`)
    offload: dict[str, Any] | None = None  # an offloaded model's decode statistics (`flash.FlashStore.statistics`)

    @property
    def prefill_tokens_per_s(self) -> float:
        return sum(len(p) for p in self.prompt_tokens) / self.prefill_s

    @property
    def decode_tokens_per_s(self) -> float:
        """Tokens computed per second by the decode loop, summed over the batch (the first token of
        each row comes from the prefill and is not counted)."""
        produced = self.decode_tokens or (self.decode_steps - 1) * len(self.tokens)
        return produced / self.decode_s if self.decode_s > 0 else float("nan")


@dataclass
class StreamPiece:
    token: int
    text: str  # the new text this token completes (may be "" while a multi-byte character is incomplete)


# ------------------------------------------------------------------------------------------------
# Encode: checked inputs.


def bucket(length: int, limit: int) -> int:
    """The padded length for a prompt of `length` tokens: the next power of two (>= 16), capped at `limit`."""
    size = MIN_BUCKET
    while size < length:
        size *= 2
    return min(size, max(limit, length))


INT32_MAX = 2**31 - 1


def integer(value: Any, name: str, low: int, high: int) -> int:
    """`value` (a Python or NumPy integer, not a bool) as an int in [low, high], else an error naming `name`."""
    if not is_token(value):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if not low <= int(value) <= high:
        raise ValueError(f"{name} must be in {low}..{high}, got {value}")
    return int(value)


def is_token(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def token_ids(model: Model, ids: Any, name: str) -> list[int]:
    """One sequence of token ids (a list / tuple of Python or NumPy integers, or a 1-D integer array),
    each checked against the vocabulary."""
    if isinstance(ids, np.ndarray):
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise TypeError(f"{name} must be a 1-D array of integer token ids, got {ids.dtype}{list(ids.shape)}")
        ids = ids.tolist()
    if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Sequence):
        raise TypeError(f"{name} must be a list of integer token ids, got {type(ids).__name__}")
    bad_type = next((t for t in ids if not is_token(t)), None)
    if bad_type is not None:
        raise TypeError(f"{name}: token ids must be integers, got {type(bad_type).__name__} {bad_type!r}")
    out = [int(t) for t in ids]
    bad = next((t for t in out if not 0 <= t < model.config.vocab_size), None)
    if bad is not None:
        raise ValueError(f"{name}: token id {bad} is outside the vocabulary (0..{model.config.vocab_size - 1})")
    return out


def token_array(model: Model, tokens: Any, name: str, ndim: int, max_len: int | None = None) -> np.ndarray:
    """Token ids as an int32 array of `ndim` (1: a sequence, 2: `[batch, length]`) with at least one token
    per row, each in the vocabulary and each row at most `max_len` (default: the context) long."""
    rows = [tokens] if ndim == 1 else tokens
    if isinstance(rows, np.ndarray):
        rows = list(rows)
    if isinstance(rows, (str, bytes, bytearray)) or not isinstance(rows, Sequence) or not rows:
        raise TypeError(f"{name} must be {'a list' if ndim == 1 else 'a [batch, length] list'} of token ids")
    ids = [token_ids(model, row, name) for row in rows]
    if len({len(row) for row in ids}) != 1 or not ids[0]:
        raise ValueError(f"{name}: every row needs the same number (>= 1) of tokens, got {[len(r) for r in ids]}")
    limit = model.config.max_seq_len if max_len is None else max_len
    if len(ids[0]) > limit:
        raise ValueError(f"{name}: {len(ids[0])} tokens exceed the model's context of {limit}")
    array = np.asarray(ids, np.int32)
    return array[0] if ndim == 1 else array


def prompt_list(prompts: Any) -> list[Any]:
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
    return [prompts] if is_token(prompts[0]) else list(prompts)


def encode_prompts(model: Model, prompts: str | Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
    encoded = []
    for p in prompt_list(prompts):
        ids = model.require_tokenizer().encode(p) if isinstance(p, str) else token_ids(model, p, "prompts")
        if not ids:
            raise ValueError("empty prompt: give at least one token of text")
        encoded.append(ids)
    return encoded


def _pad(prompts: list[list[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    tokens = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    return tokens, np.asarray([len(p) for p in prompts], np.int32)


def _rows_for_mesh(model: Model, batch: int) -> np.ndarray:
    """Row indices that pad a batch to a multiple of the mesh's `data` axis by repeating rows (the
    extra rows' results are dropped); `arange(batch)` without a mesh."""
    data = 1 if model.mesh is None else model.mesh.shape[DATA]
    return np.resize(np.arange(batch), -(-batch // data) * data)


def _on_mesh(model: Model, tree: Any) -> Any:
    """Per-row host inputs as the model's programs take them: global arrays split over `data` on a mesh."""
    return tree if model.mesh is None else parallel.place_rows(tree, model.mesh)


# ------------------------------------------------------------------------------------------------
# Compile: the programs of loop.py, one static Decoding each, sharded by the specs their types declare.


def _loop_specs(params: Any, settings: Decoding, draft: Any) -> tuple:
    """(params, state, sampling, limit, draft_params) of `decode_step` / `decode_loop`."""
    return (weights.specs(params), DecodeState.specs(settings), P(DATA), P(), _draft_specs(draft))


def _prefill_specs(params: Any, settings: Decoding, draft: Any) -> tuple:
    """(params, tokens, lengths, keys, sampling, draft_params) of `prefill`."""
    return (weights.specs(params), P(DATA), P(DATA), P(DATA), P(DATA), _draft_specs(draft))


def _draft_specs(draft: Any) -> Any:
    return P() if draft is None else weights.specs(draft)


IN_SPECS = {prefill: _prefill_specs, decode_step: _loop_specs, decode_loop: _loop_specs}


def program(fn: Any, settings: Decoding, mesh: jax.sharding.Mesh | None) -> Any:
    """`fn(params, *args)` (a program of `loop.py` with `settings` bound): on a mesh one `shard_map`, each
    device running `fn` on its shard with `settings.parallel` set; its output is a `DecodeState`."""
    if mesh is None:
        return lambda params, *args: fn(params, settings, *args)
    settings = replace(settings, parallel=parallel.parallel_of(mesh))

    def run(params, *args):
        in_specs = IN_SPECS[fn](params, settings, args[-1])
        local = lambda params, *args: fn(params, settings, *args)  # noqa: E731
        out_specs = DecodeState.specs(settings)
        return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)(params, *args)

    return run


def compiled(model: Model, fn: Any, settings: Decoding, args: tuple, donate: tuple[int, ...] = ()):
    """`fn` compiled for these settings and argument shapes, once per model: (executable, seconds spent
    compiling). `donate`: positions of arguments updated in place (the loop state)."""
    shapes = jax.tree.map(lambda a: (a.shape, a.dtype), args)
    key = (fn.__name__, settings, str(shapes))
    if key in model.executables:
        return model.executables[key], 0.0
    start = time.perf_counter()

    def build(settings: Decoding) -> Any:
        return jax.jit(program(fn, settings, model.mesh), donate_argnums=donate).lower(*args).compile()

    try:
        executable = build(settings)
    except Exception as error:
        if settings.attention != "auto":
            raise  # a kernel asked for by name fails loudly
        executable = _with_xla_attention(fn.__name__, build, settings, error)
    model.executables[key] = executable
    return executable, time.perf_counter() - start


def _with_xla_attention(name: str, build: Any, settings: Decoding, error: Exception) -> Any:
    """`auto`'s safety net on real hardware: a program whose Pallas kernel does not compile on the device at
    hand (a Mosaic version, an unforeseen shape) is compiled with XLA attention instead, with one warning
    naming the error. If that fails too, the error was not the kernel's: raise the original."""
    try:
        executable = build(replace(settings, attention="xla"))
    except Exception:
        raise error from None
    device = jax.devices()[0].device_kind
    first_line = next((line for line in str(error).splitlines() if line.strip()), type(error).__name__)
    warnings.warn(
        f"{name}: the attention kernel did not compile on {device} ({type(error).__name__}: {first_line}); "
        "this program runs with XLA attention instead (attention='pallas' raises the error)",
        RuntimeWarning,
        stacklevel=5,
    )
    return executable


# ------------------------------------------------------------------------------------------------
# Run: one generation request through the stages.


@dataclass
class Run:
    """A request after encode, place, compile and prefill: what the decode phase takes."""

    model: Model
    settings: Decoding
    prompts: list[list[int]]  # the real rows' prompt ids
    state: DecodeState  # after the prefill (the first token of each row is sampled)
    sampling: Any  # SamplingArrays on the mesh
    max_new_tokens: int
    limit: jax.Array  # int32 [] max_new_tokens, as the programs take it
    draft_params: Params | None
    compile_s: float
    prefill_s: float

    @property
    def args(self) -> tuple:
        """The decode programs' arguments: (params, state, sampling, limit, draft_params)."""
        return (self.model.params, self.state, self.sampling, self.limit, self.draft_params)


def _speculation(model: Model, speculative: Any, sampling: Any, batch: int, context: int) -> Speculation | None:
    """The static speculative settings of a request, checked (None: decode plainly, also where the cost
    model predicts no gain)."""
    if speculative is None:
        return None
    if not isinstance(speculative, (SelfSpeculative, DraftModel)):
        raise ValueError("speculative must be jd.SelfSpeculative(...) or jd.DraftModel(draft, gamma=...)")
    if any(s.repetition_penalty != 1.0 for s in ([sampling] if isinstance(sampling, Sampling) else sampling)):
        raise ValueError("speculative decoding does not take a repetition penalty (it changes p between drafts)")
    if isinstance(speculative, DraftModel):
        draft = speculative.draft
        if draft.config.vocab_size != model.config.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({draft.config.vocab_size}) differs from the model's "
                f"({model.config.vocab_size}): a draft must share the tokenizer"
            )
        if (draft.mesh is None) != (model.mesh is None) or (draft.mesh is not None and draft.mesh != model.mesh):
            raise ValueError("the draft model must be on the same mesh as the model (jd.shard both, or neither)")
        return Speculation(speculative.gamma, draft_config=draft.config)
    if speculative.draft_weights == "int8" and any(
        map(is_quantized, jax.tree.leaves(model.params, is_leaf=is_quantized))
    ):
        raise ValueError(
            "draft_weights='int8' copies float weights to int8; this model's weights are quantized already"
        )
    gamma = speculative.gamma
    if gamma is None:  # the cost model's choice for this batch and context, at this device's roofline
        costs = PassCosts.of(model.config, model.params)
        gamma = choose_gamma(
            speculative.acceptance, costs=costs, roofline=roofline_here(), batch=batch, context=context,
            budget=speculative.budget,
        )  # fmt: skip
    in_place = skips_outside_window(model.attention)
    return Speculation(gamma, speculative.budget, speculative.sinks, in_place=in_place) if gamma else None


def draft_params(model: Model, speculative: SelfSpeculative | DraftModel) -> Params | None:
    """The draft's weights: a draft model's, an int8 copy of the model's (made once), or None (the model's)."""
    if isinstance(speculative, DraftModel):
        return speculative.draft.params
    if speculative.draft_weights != "int8":
        return None
    if "int8" not in model.derived:
        host = weights.to_model_layout(jax.tree.map(parallel.fetch, model.params))  # the loaders' [out, in]
        dtype = str(jnp.dtype(model.params["embed"].dtype))
        int8 = weights.to_model_layout(quantize_params(host, "int8", dtype=dtype))
        # int8 columns split over `model` as they are (no re-packing): the sharded layout is kept
        model.derived["int8"] = (
            jax.tree.map(jnp.asarray, int8)
            if model.mesh is None
            else parallel.place(int8, weights.specs(int8), model.mesh)
        )
    return model.derived["int8"]


def _shapes(model: Model, prompts: list[list[int]], max_new_tokens: int, extra: int) -> tuple[int, int, int]:
    """(prompt length, token buffer, cache length), bucketed; refuses a request beyond the context."""
    if not is_token(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    context = model.config.max_seq_len
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens + extra > context:
        raise ValueError(
            f"prompt of {longest} tokens + max_new_tokens {max_new_tokens}"
            + (f" + {extra} for speculation" if extra else "")
            + f" exceeds the model's context of {context} tokens; shorten the prompt or lower max_new_tokens"
        )
    prompt_len, buffer = bucket(longest, context), bucket(int(max_new_tokens), context)
    return prompt_len, buffer + extra, prompt_len + buffer + extra


def start(
    model: Model,
    prompts: str | Sequence[str] | Sequence[Sequence[int]],
    *,
    max_new_tokens: int = 64,
    sampling: Sampling | Sequence[Sampling] = Sampling(),
    seed: int = 0,
    stop_ids: Sequence[int] | None = None,
    speculative: SelfSpeculative | DraftModel | None = None,
    reserve_gamma: int = 0,
) -> Run:
    """Encode, place, compile (cached) and run the prefill of a request (the arguments of `generate`).
    `reserve_gamma`: size the buffers for speculation up to this gamma (one prefill for several)."""
    encoded = encode_prompts(model, prompts)
    seed = integer(seed, "seed", -(2**63), 2**63 - 1)
    if stop_ids is None:
        stop_ids = model.tokenizer.stop_ids if model.tokenizer is not None else ()
    stop_ids = tuple(token_ids(model, stop_ids, "stop_ids"))
    speculation = _speculation(model, speculative, sampling, len(encoded), max(map(len, encoded)))
    gamma = max(reserve_gamma, 0 if speculation is None else speculation.gamma)
    arrays, plan = prepare(sampling, len(encoded))
    rows = _rows_for_mesh(model, len(encoded))  # on a mesh the batch splits over `data`
    padded = [encoded[i] for i in rows]
    arrays = jax.tree.map(lambda a: np.asarray(a)[rows], arrays)
    prompt_len, buffer, cache_len = _shapes(model, padded, max_new_tokens, 2 * (gamma + 1) if gamma else 0)
    settings = Decoding(model.config, plan, buffer, cache_len, stop_ids, model.attention, speculation=speculation)
    tokens, lengths = _pad(padded, prompt_len)
    keys = jax.random.split(jax.random.key(seed), len(padded))
    tokens, lengths, keys, arrays, limit = _on_mesh(model, (tokens, lengths, keys, arrays, np.int32(max_new_tokens)))
    draft = draft_params(model, speculative) if speculation is not None else None
    args = (model.params, tokens, lengths, keys, arrays, draft)
    executable, compile_s = compiled(model, prefill, settings, args)
    if model.offload is not None:  # its statistics count this request's prefill, then its decode steps
        model.offload.begin()
    begin = time.perf_counter()
    state = jax.block_until_ready(executable(*args))
    prefill_s = time.perf_counter() - begin
    if model.offload is not None:
        model.offload.prefill_done()
    return Run(model, settings, encoded, state, arrays, int(max_new_tokens), limit, draft, compile_s, prefill_s)


def generate(
    model: Model, prompts: Any, *, speculative: Any = None, expert_load: bool = False, **request: Any
) -> GenerationResult:
    """Generate continuations of one prompt or a batch (`jaxdecode.generate` documents the arguments)."""
    if expert_load and not model.config.num_experts:
        raise ValueError(f"expert_load needs a mixture-of-experts model; {model.config.family} has no experts")
    if model.offload is not None and speculative is not None:
        raise ValueError("an offloaded model decodes plainly: speculative decoding would read each neuron per draft")
    run = start(model, prompts, speculative=speculative, **request)
    loop, compile_s = compiled(model, decode_loop, run.settings, run.args, donate=(1,))
    begin = time.perf_counter()
    state = jax.block_until_ready(loop(*run.args))
    decode_s = time.perf_counter() - begin
    result = finish(run, state)
    speculation = None
    if speculative is not None:
        speculation = {"gamma": 0, "acceptance_rate": float("nan"), "tokens_per_round": 1.0}
        if run.settings.speculation is not None:
            speculation = speculation_stats(run, state)
    load = None
    if expert_load:  # what the model read: the prompt and every generated token it was fed back
        fed = [
            p + (g if why == "stop" else g[:-1]) for p, g, why in zip(run.prompts, result.tokens, result.finish_reasons)
        ]
        load = routed_counts(model, fed)
    offload = model.offload.statistics() if model.offload is not None else None
    return replace(
        result,
        decode_s=decode_s,
        compile_s=run.compile_s + compile_s,
        speculation=speculation,
        expert_load=load,
        offload=offload,
    )


def finish(run: Run, state: DecodeState) -> GenerationResult:
    """Fetch a finished state and decode it (timings of the decode phase left at 0)."""
    count = len(run.prompts)
    tokens, num_tokens, done, written = (
        parallel.fetch(x)[:count] for x in (state.tokens, state.num_tokens, state.done, state.written)
    )
    generated = [tokens[i, : num_tokens[i]].tolist() for i in range(count)]
    written = np.minimum(written, run.max_new_tokens)
    produced = 0 if run.settings.speculation is None else max(int(written.sum()) - count, 1)
    return GenerationResult(
        tokens=generated,
        text=[run.model.decode(g) for g in generated],
        prompt_tokens=run.prompts,
        finish_reasons=["stop" if d else "length" for d in done],
        prefill_s=run.prefill_s,
        decode_s=0.0,
        compile_s=run.compile_s,
        decode_steps=int(parallel.fetch(state.step)) - (run.settings.speculation is not None),
        decode_tokens=produced,
    )


def speculation_stats(run: Run, state: DecodeState) -> dict[str, float]:
    """Gamma, the acceptance rate, tokens per round and rounds of a finished speculative state."""
    count, gamma = len(run.prompts), run.settings.speculation.gamma
    accepted = int(parallel.fetch(state.accepted)[:count].sum())
    drafted = int(parallel.fetch(state.drafted)[:count].sum())
    return {
        "gamma": gamma,
        "acceptance_rate": accepted / drafted if drafted else float("nan"),
        "tokens_per_round": 1 + accepted / max(drafted / gamma, 1),
        "rounds": int(parallel.fetch(state.step)) - 1,
    }


def stream(model: Model, prompt: Any, *, sampling: Sampling = Sampling(), **request: Any) -> Iterator[StreamPiece]:
    """Generate for one prompt, yielding each token and its text as soon as it is produced (a whole
    speculative round's accepted tokens at once). The same tokens as `generate`: the same programs'
    step, the same keys."""
    count = len(prompt_list(prompt))
    if count != 1:
        raise ValueError(f"stream takes one prompt, got {count}; use generate for a batch")
    if not isinstance(sampling, Sampling):
        raise TypeError(f"sampling must be one jd.Sampling for stream, got {type(sampling).__name__}")
    run = start(model, prompt, sampling=sampling, **request)
    step, _ = compiled(model, decode_step, run.settings, run.args, donate=(1,))
    # tokenizers' incremental decoder: each step costs one token, not a re-decode of all text so far,
    # and it returns None while a multi-byte character is still incomplete.
    decoder = DecodeStream(skip_special_tokens=True)
    state, emitted = run.state, 0
    while True:
        tokens, num_tokens, done, written = (
            parallel.fetch(x)[0] for x in (state.tokens, state.num_tokens, state.done, state.written)
        )
        for token in tokens[emitted:num_tokens].tolist():
            text = decoder.step(model.tokenizer.backend, token) if model.tokenizer is not None else None
            yield StreamPiece(token, text or "")
        emitted = int(num_tokens)
        if done or written >= run.max_new_tokens:
            return
        state = step(model.params, state, run.sampling, run.limit, run.draft_params)


# ------------------------------------------------------------------------------------------------
# The cache-free forward.


def _logits(params, config, tokens, positions, *, attention_impl="auto", parallel=None) -> jax.Array:
    return apply(params, config, tokens, positions, attention_impl=attention_impl, parallel=parallel)[0]


# The cache-free causal passes: what each returns, and how its output splits on a mesh (rows over `data`).
_PASSES = {"forward": (_logits, P(DATA, None, MODEL)), "routing": (routing, P(None, DATA))}
_PASS_JITS = {name: jax.jit(fn, static_argnames=("config", "attention_impl")) for name, (fn, _) in _PASSES.items()}


def _causal_pass(model: Model, name: str, tokens: np.ndarray) -> jax.Array:
    """Run pass `name` (`_PASSES`) over int32 tokens `[B, T]`, on the model's mesh if it has one (rows
    padded to the `data` axis, the padding rows cut off again; the sharded program cached per model)."""
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    if model.mesh is None:
        return _PASS_JITS[name](model.params, model.config, tokens, positions, attention_impl=model.attention)
    batch = tokens.shape[0]
    rows = _rows_for_mesh(model, batch)
    if name not in model.executables:
        model.executables[name] = _sharded_pass(model.mesh, model.config, model.attention, *_PASSES[name])
    out = model.executables[name](model.params, *_on_mesh(model, (tokens[rows], positions[rows])))
    return out[:batch] if name == "forward" else out[:, :batch]


def forward(model: Model, tokens: Any) -> jax.Array:
    """Full causal forward without a cache: int32 `[B, T]` -> float32 logits `[B, T, vocab]`
    (on a mesh: split over `data` by row; `parallel.fetch` brings it to the host in every process)."""
    return _causal_pass(model, "forward", token_array(model, tokens, "tokens", ndim=2))


def _sharded_pass(mesh: jax.sharding.Mesh, config: ModelConfig, attention: str, fn: Any, out_specs: P) -> Any:
    """`(params, tokens, positions) -> fn's output` as one jitted shard_map (logits cut to the vocabulary)."""
    shard = parallel.parallel_of(mesh)

    def local(params, tokens, positions):
        return fn(params, config, tokens, positions, attention_impl=attention, parallel=shard)

    def run(params, tokens, positions):
        in_specs = (weights.specs(params), P(DATA), P(DATA))
        out = jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)
        out = out(params, tokens, positions)
        return out[..., : config.vocab_size] if fn is _logits else out

    return jax.jit(run)


def routed_counts(model: Model, sequences: Sequence[Sequence[int]]) -> np.ndarray:
    """How many tokens of `sequences` (token-id lists, lengths may differ) the router of each layer sends to
    each expert, from one causal forward over them (the routing of a cached decode too, up to float
    rounding at exact ties): int64 `[num_layers, num_experts]`, zeros in dense layers."""
    config = model.config
    encoded = encode_prompts(model, list(sequences))
    tokens, lengths = _pad(encoded, max(map(len, encoded)))
    chosen = parallel.fetch(_causal_pass(model, "routing", tokens))  # [L, B, T, k]
    valid = np.arange(tokens.shape[1])[None, :] < lengths[:, None]
    counts = np.zeros((config.num_layers, config.num_experts), np.int64)
    for layer in range(config.num_layers):
        ids = chosen[layer][valid].reshape(-1)
        counts[layer] = np.bincount(ids[ids >= 0], minlength=config.num_experts)
    return counts
