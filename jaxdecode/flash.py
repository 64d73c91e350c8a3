"""LLM in a flash (Alizadeh et al., arXiv 2312.11514): a model larger than the memory it may use, with the
MLP ("FFN") weights left in storage and only the neurons predicted active read, token by token.

Storage (`jaxdecode convert SRC DST --flash`): a normal checkpoint (`checkpoint.py`: Orbax, manifest,
atomic versions) without the dense MLP weights, plus `flash/` inside its version:

    flash/bundles.json           format, dtype, layers, d_model, ffn_dim, record_bytes, gated
    flash/layer_NNN.bin          one record per neuron i: row i of gate, row i of up, column i of down
                                 (3 x d_model values; 2 x for an ungated MLP), padded to a multiple of
                                 512 bytes so that records can be read with O_DIRECT. float32, or int8
                                 (`convert --flash --quant int8`: the model's per-output-channel int8,
                                 the gate and up rows' scales after the values, float32)
    flash/down_scales.safetensors int8 only: each layer's down scales float32 `[d_model]` (its output
                                 channels: shared by every neuron, resident)
    flash/predictors.safetensors written by `train_predictors` (`jaxdecode train-predictors`)

Every file is covered by the checkpoint's manifest: a damaged bundle is refused at load, by name.

Runtime (`load(DST, offload=Offload(...))`): attention, norms and embeddings stay resident and jitted;
each dense MLP becomes a `weights.HostMLP`, computed on the host through one `io_callback` per layer and
step (66 us each on 2 EPYC cores, measured: ~2 ms a token for 30 layers). For each call `_Layer.ffn`:
  1. predicts the active neurons of every row: the top `fraction` of a low-rank predictor's scores
     (`predictor="trained"`), or of the true |act(gate . x) * (up . x)| (`"oracle"`: the gate and up
     matrices are then held in RAM, outside the budget, to compute it; a check of the loading machinery);
  2. reads the bundles of the active neurons that are not cached (consecutive neurons in one read,
     reads spread over `threads` threads, straight into the cache's slots; O_DIRECT where the file
     system allows it, else buffered reads with the pages dropped after each read);
  3. computes the MLP over the active neurons only (each row over its own);
  4. windowing: neurons not used by the last `window` tokens leave the cache, by moving the last
     slots into the holes (swap-with-last: the cache is preallocated and never reallocated). A cache too
     small for a token's set evicts the least recently used first; what still does not fit is read
     into a scratch buffer, used and dropped.
`reads="matrices"` (the naive baseline) keeps as many whole layers as the budget holds and reads the
others' whole matrices every token; `reads="mmap"` memory-maps the bundles, keeps the same layers mapped
and drops the others' pages after each use.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import ModelConfig
from .io.validate import ModelFileError, read_json
from .quantize import QuantizedWeight, is_quantized
from .weights import HostMLP

FLASH = "flash"
BUNDLES = "bundles.json"
PREDICTORS = "predictors.safetensors"
DOWN_SCALES = "down_scales.safetensors"
DTYPES = ("float32", "int8")
FORMAT = "jaxdecode-flash/1"
ALIGN = 512  # O_DIRECT needs offsets, lengths and buffers aligned to the device's logical block (512 here)
MAX_GAP = 2  # records read through between two runs rather than issuing a second read (measured: see README)
SCRATCH_NEURONS = 256  # overflow records read per piece when a token's set does not fit the cache
PREDICTORS_HINT = "train them with `jaxdecode train-predictors DST --text-file F`, or use predictor='oracle'"


@dataclass(frozen=True)
class Offload:
    """How a flash checkpoint runs when its weights may not all be in RAM.

    memory_budget_mb: megabytes (1e6 bytes) for weights in RAM: the resident part (embeddings, attention,
      norms, predictors) plus the neuron caches. The KV cache and activations are not counted (the
      statistics report them beside it).
    window: a neuron stays cached while one of the last `window` tokens used it, and leaves after (the
      paper's windowing: the cache holds what recent tokens need, less than the budget allows when
      that is more). None: keep whatever the budget holds, the least recently used neuron leaving first.
    predictor: "trained" (the checkpoint's predictors) or "oracle" (the true activity; see the module doc).
    fraction: the share of each layer's neurons a token computes (default: what the predictors were trained
      for; 1.0 computes every neuron, the model unchanged).
    reads: "neurons" (the scheme above), "matrices" (naive: whole FFN matrices, read when needed) or "mmap".
    threads: reads in flight.
    """

    memory_budget_mb: float
    window: int | None = 5
    predictor: str = "trained"
    fraction: float | None = None
    reads: str = "neurons"
    threads: int = 16

    def __post_init__(self):
        if not (isinstance(self.memory_budget_mb, (int, float)) and self.memory_budget_mb > 0):
            raise ValueError(f"memory_budget_mb must be a positive number of megabytes, got {self.memory_budget_mb!r}")
        if self.window is not None and not (isinstance(self.window, int) and self.window >= 1):
            raise ValueError(f"window must be a positive number of tokens or None, got {self.window!r}")
        if self.predictor not in ("trained", "oracle"):
            raise ValueError(f"predictor must be 'trained' or 'oracle', got {self.predictor!r}")
        if self.fraction is not None and not (isinstance(self.fraction, (int, float)) and 0 < self.fraction <= 1):
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")
        if self.reads not in ("neurons", "matrices", "mmap"):
            raise ValueError(f"reads must be 'neurons', 'matrices' or 'mmap', got {self.reads!r}")
        if not (isinstance(self.threads, int) and 1 <= self.threads <= 256):
            raise ValueError(f"threads must be 1..256, got {self.threads!r}")


# ------------------------------------------------------------------------------------------------
# Storage.


@dataclass(frozen=True)
class Bundles:
    """flash/bundles.json, checked against the config."""

    layers: int
    d_model: int
    ffn_dim: int
    gated: bool
    dtype: str  # "float32" or "int8"
    record_bytes: int

    @property
    def parts(self) -> int:
        return 3 if self.gated else 2

    @property
    def layer_bytes(self) -> int:
        return self.ffn_dim * self.record_bytes

    def split(self, records: np.ndarray) -> tuple[list[np.ndarray], np.ndarray | None]:
        """Records uint8 `[n, record_bytes]` -> ([gate, up, down] (or [up, down]) `[n, d_model]`, views of the
        records: float32, or int8 values; and for int8 the gate and up rows' scales float32 `[n, parts - 1]`,
        else None)."""
        d, k = self.d_model, self.parts
        if self.dtype == "float32":
            values = records.view(np.float32)
            return [values[:, j * d : (j + 1) * d] for j in range(k)], None
        values = records[:, : k * d].view(np.int8)
        scales = records[:, k * d : k * d + 4 * (k - 1)].view(np.float32)
        return [values[:, j * d : (j + 1) * d] for j in range(k)], scales


def record_bytes(config: ModelConfig, dtype: str) -> int:
    """The padded size of one neuron's record."""
    parts = 3 if config.mlp == "gated" else 2
    raw = parts * config.d_model * 4 if dtype == "float32" else parts * config.d_model + (parts - 1) * 4
    return math.ceil(raw / ALIGN) * ALIGN


def is_flash(version: Path) -> bool:
    return (version / FLASH).is_dir()


def check_convertible(config: ModelConfig) -> None:
    """A config whose every MLP can be bundled: dense, without biases (`write_bundles` needs it)."""
    if config.num_experts:
        raise ValueError("--flash needs dense MLPs; a mixture of experts keeps its experts resident")
    if config.mlp_bias:
        raise ValueError("--flash supports MLPs without biases")
    if len({config.ffn_dim_of(i) for i in range(config.num_layers)}) > 1:
        raise ValueError("--flash needs MLPs of one width in every layer; this model's K/V-sharing layers are wider")


def _bundle_dtype(mlp: dict) -> str:
    """float32 for float `{"weight": [in, out]}` MLPs, int8 for per-channel int8 `QuantizedWeight`s."""
    weights = [linear["weight"] for linear in mlp.values()]
    kinds = {w.kind if is_quantized(w) else str(w.dtype) for w in weights}
    if kinds in ({"float32"}, {"int8"}):
        return kinds.pop()
    raise ValueError(
        f"flash bundles hold float32 or int8 MLP weights, not {sorted(kinds)}: convert with --dtype float32 "
        "and no --quant, or with --quant int8"
    )


def write_bundles(version: Path, config: ModelConfig, params: Any) -> Any:
    """Write flash/ into a checkpoint version from host params of a `check_convertible` config: float32 MLPs
    in the model layout (`[in, out]`) or int8 ones (`QuantizedWeight`, `[out, in]`); returns the params
    without the dense MLPs (what the Orbax part holds)."""
    from safetensors.numpy import save_file

    d, f = config.d_model, config.ffn_dim
    names = ["gate", "up", "down"] if config.mlp == "gated" else ["up", "down"]
    mlps = {name: value["mlp"] for name, value in params.items() if name.startswith("layer_") and "mlp" in value}
    dtypes = {_bundle_dtype(mlp) for mlp in mlps.values()}
    if len(dtypes) != 1:
        raise ValueError(f"flash bundles hold one dtype for every layer; these MLPs are {sorted(dtypes)}")
    dtype = dtypes.pop()
    size = record_bytes(config, dtype)
    (version / FLASH).mkdir()
    down_scales = {}
    for name, mlp in mlps.items():
        records = np.zeros((f, size), np.uint8)
        if dtype == "float32":  # gate / up [d, f]: row i of the [f, d] matrix is neuron i; down [f, d]
            rows = [np.asarray(mlp[n]["weight"], np.float32).T for n in names[:-1]]
            values = np.concatenate([*rows, np.asarray(mlp["down"]["weight"], np.float32)], axis=1)
            records[:, : values.nbytes // f] = values.view(np.uint8)
        else:  # gate / up [f, d] with scales [f, 1]; down [d, f] with scales [d, 1]: column i is neuron i
            gate_up, down = [mlp[n]["weight"] for n in names[:-1]], mlp["down"]["weight"]
            values = np.concatenate([*(w.values for w in gate_up), down.values.T], axis=1)
            scales = np.concatenate([w.scales for w in gate_up], axis=1).astype(np.float32)
            records[:, : values.shape[1]] = values.view(np.uint8)
            records[:, values.shape[1] : values.shape[1] + scales.nbytes // f] = scales.view(np.uint8)
            down_scales[name] = np.ascontiguousarray(down.scales[:, 0], np.float32)
        (version / FLASH / f"{name}.bin").write_bytes(records.tobytes())
    if down_scales:
        save_file(down_scales, str(version / FLASH / DOWN_SCALES))
    meta = {"format": FORMAT, "layers": config.num_layers, "d_model": d, "ffn_dim": f}
    meta |= {"gated": config.mlp == "gated", "record_bytes": size, "dtype": dtype}
    (version / FLASH / BUNDLES).write_text(json.dumps(meta, indent=1))
    return {
        name: {k: v for k, v in value.items() if k != "mlp"} if name in mlps else value
        for name, value in params.items()
    }


def read_bundles(version: Path, config: ModelConfig) -> Bundles:
    path = version / FLASH / BUNDLES
    if not path.is_file():
        raise ModelFileError(version / FLASH, f"has no {BUNDLES}; convert the model again with --flash")
    meta = read_json(path)
    dtype = meta.get("dtype")
    if meta.get("format") != FORMAT or dtype not in DTYPES:
        raise ModelFileError(path, f"unknown flash format {meta.get('format')!r} / dtype {dtype!r}")
    gated = config.mlp == "gated"
    expected = {"layers": config.num_layers, "d_model": config.d_model, "ffn_dim": config.ffn_dim, "gated": gated}
    for key, value in expected.items():
        if meta.get(key) != value:
            raise ModelFileError(path, f"is {meta.get(key)!r}, the config says {value!r}", key)
    record = meta.get("record_bytes")
    if record != record_bytes(config, dtype):
        raise ModelFileError(path, f"is {record!r}, not the padded size of a record of this config", "record_bytes")
    bundles = Bundles(config.num_layers, config.d_model, config.ffn_dim, gated, dtype, record)
    for i in range(config.num_layers):
        file = version / FLASH / f"layer_{i}.bin"
        size = file.stat().st_size if file.is_file() else None
        if size != bundles.layer_bytes:
            raise ModelFileError(file, f"has {size} bytes, expected {bundles.layer_bytes}; convert the model again")
    return bundles


def read_layer(version: Path, bundles: Bundles, layer: int) -> np.ndarray:
    """All records of one layer, uint8 `[ffn_dim, record_bytes]` (`Bundles.split` reads them)."""
    data = np.fromfile(version / FLASH / f"layer_{layer}.bin", np.uint8)
    return data.reshape(bundles.ffn_dim, bundles.record_bytes)


def read_down_scales(version: Path, bundles: Bundles) -> list[np.ndarray]:
    """int8 bundles: each layer's down scales float32 `[d_model]` (float32 bundles: [])."""
    from safetensors import SafetensorError, safe_open

    if bundles.dtype == "float32":
        return []
    path = version / FLASH / DOWN_SCALES
    try:
        with safe_open(str(path), framework="numpy") as f:
            scales = [f.get_tensor(f"layer_{i}") for i in range(bundles.layers)]
    except (SafetensorError, OSError) as e:
        raise ModelFileError(path, f"cannot be read ({e}); convert the model again with --flash --quant int8") from e
    for i, s in enumerate(scales):
        if s.shape != (bundles.d_model,) or s.dtype != np.float32:
            raise ModelFileError(
                path, f"is {s.dtype}{list(s.shape)}, expected float32[{bundles.d_model}]", f"layer_{i}"
            )
    return scales


def _int8(values: np.ndarray, scales: np.ndarray) -> QuantizedWeight:
    import jax.numpy as jnp

    values = np.ascontiguousarray(values)
    return QuantizedWeight(jnp.asarray(values), jnp.asarray(scales.reshape(-1, 1)), None, "int8", values.shape)


def resident_mlps(version: Path, config: ModelConfig, bundles: Bundles, params: Any) -> Any:
    """`params` with the dense MLPs read back from the bundles as device arrays (float32 `{"weight"}` or
    int8 `QuantizedWeight`s, as converted), one layer at a time (a flash checkpoint loaded without offload)."""
    import jax.numpy as jnp

    out = dict(params)
    names = ["gate", "up"] if bundles.gated else ["up"]
    down_scales = read_down_scales(version, bundles)
    for i in range(config.num_layers):
        parts, scales = bundles.split(read_layer(version, bundles, i))
        if scales is None:
            mlp = {n: {"weight": jnp.asarray(parts[k].T)} for k, n in enumerate(names)}
            mlp["down"] = {"weight": jnp.asarray(parts[-1])}
        else:  # gate / up [f, d] with their rows' scales, down [d, f] with its output channels'
            mlp = {n: {"weight": _int8(parts[k], scales[:, k])} for k, n in enumerate(names)}
            mlp["down"] = {"weight": _int8(parts[-1].T, down_scales[i])}
        out[f"layer_{i}"] = {**params[f"layer_{i}"], "mlp": mlp}
    return out


def _drop_cached_pages(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------
# Predictors: per layer, scores = relu(x A + a) B + b, trained by `train_predictors`.


def read_predictors(version: Path, config: ModelConfig) -> tuple[list[dict[str, np.ndarray]], float]:
    """The checkpoint's predictors (one dict of arrays per layer) and the fraction they were trained for."""
    from safetensors import SafetensorError, safe_open

    path = version / FLASH / PREDICTORS
    if not path.is_file():
        raise ValueError(f"{version.parent} has no trained predictors; {PREDICTORS_HINT}")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            layers = [
                {k: f.get_tensor(f"layer_{i}.{k}") for k in ("a", "a_bias", "b", "b_bias")}
                for i in range(config.num_layers)
            ]
    except (SafetensorError, OSError) as e:
        raise ModelFileError(path, f"cannot be read ({e}); train the predictors again") from e
    try:
        fraction = float(meta["fraction"])
    except (KeyError, ValueError):
        raise ModelFileError(path, "has no valid 'fraction' in its metadata; train the predictors again") from None
    d, f = config.d_model, config.ffn_dim
    for i, p in enumerate(layers):
        rank = p["a"].shape[-1] if p["a"].ndim == 2 else -1
        shapes = {"a": (d, rank), "a_bias": (rank,), "b": (rank, f), "b_bias": (f,)}
        for k, shape in shapes.items():
            if p[k].shape != shape or p[k].dtype != np.float32:
                raise ModelFileError(
                    path, f"is {p[k].dtype}{list(p[k].shape)}, expected float32{list(shape)}", f"layer_{i}.{k}"
                )
    if not 0 < fraction <= 1:
        raise ModelFileError(path, f"is {fraction}, expected a fraction in (0, 1]", "fraction")
    return layers, fraction


def predictor_scores(p: dict[str, np.ndarray], x: np.ndarray) -> np.ndarray:
    """float32 `[N, ffn_dim]` scores (logits of 'active') for FFN inputs `[N, d_model]`."""
    return np.maximum(x @ p["a"] + p["a_bias"], 0) @ p["b"] + p["b_bias"]


# ------------------------------------------------------------------------------------------------
# Runtime.


def _activation(name: str):
    if name == "silu":
        return lambda t: t / (1 + np.exp(-t))
    if name == "gelu_tanh":
        return lambda t: 0.5 * t * (1 + np.tanh(np.sqrt(2 / np.pi) * (t + 0.044715 * t**3)))
    from scipy.special import erf

    return lambda t: 0.5 * t * (1 + erf(t / np.sqrt(2)))


class _Buffer:
    """A page-aligned, preallocated array of `rows` records (anonymous mmap: O_DIRECT reads land in it)."""

    def __init__(self, rows: int, record_bytes: int):
        self.record_bytes = record_bytes
        self.memory = mmap.mmap(-1, max(rows, 1) * record_bytes)
        self.rows = np.frombuffer(self.memory, np.uint8).reshape(max(rows, 1), record_bytes)
        self.view = memoryview(self.memory)

    def span(self, first: int, count: int) -> memoryview:
        return self.view[first * self.record_bytes : (first + count) * self.record_bytes]


class _Reader:
    """Reads runs of consecutive records of the layer files into buffers, several in flight."""

    BUFFERED = "buffered, pages dropped after each read (posix_fadvise)"

    def __init__(self, version: Path, bundles: Bundles, threads: int):
        self.bundles, self.pool = bundles, ThreadPoolExecutor(threads, thread_name_prefix="jaxdecode-flash")
        self.threads, self.direct = threads, hasattr(os, "O_DIRECT")
        self.files = [version / FLASH / f"layer_{i}.bin" for i in range(bundles.layers)]
        self.fds = [self._open(f) for f in self.files]
        self.gap = _Buffer(MAX_GAP, bundles.record_bytes)  # records read past, between two wanted runs
        self.bytes = 0
        self.seconds = 0.0

    def _open(self, path: Path) -> int:
        if self.direct:
            try:
                return os.open(path, os.O_RDONLY | os.O_DIRECT)
            except OSError:
                self.direct = False
        return os.open(path, os.O_RDONLY)

    @property
    def mode(self) -> str:
        return "O_DIRECT" if self.direct else self.BUFFERED

    def _read(self, layer: int, jobs: list[tuple[int, list[memoryview]]]) -> None:
        fd = self.fds[layer]
        for offset, targets in jobs:
            total, done = sum(len(t) for t in targets), 0
            while done < total:  # a short read continues where it stopped
                rest, skip = [], done
                for t in targets:
                    if skip >= len(t):
                        skip -= len(t)
                        continue
                    rest.append(t[skip:])
                    skip = 0
                n = os.preadv(fd, rest, offset + done)
                if n <= 0:
                    raise ModelFileError(self.files[layer], f"ended at byte {offset + done} (truncated after loading?)")
                done += n
            if not self.direct:
                os.posix_fadvise(fd, offset, total, os.POSIX_FADV_DONTNEED)

    def read(self, layer: int, neurons: np.ndarray, buffer: _Buffer, first_row: int) -> None:
        """Records `neurons` (sorted) of `layer` into rows first_row, first_row + 1, ... of `buffer`. Runs of
        consecutive neurons are one read; runs at most `MAX_GAP` records apart are one read too, the
        records between them landing in a throwaway buffer (fewer, larger reads: cheaper here than the
        bytes they add; the bytes are counted)."""
        if neurons.size == 0:
            return
        start = time.perf_counter()
        size = self.bundles.record_bytes
        gaps = np.diff(neurons) - 1
        breaks = np.flatnonzero(gaps > MAX_GAP) + 1
        starts = np.concatenate([[0], breaks])
        ends = np.concatenate([breaks, [neurons.size]])
        jobs, read = [], 0
        for s, e in zip(starts.tolist(), ends.tolist()):
            targets, run = [], s
            for i in (s + 1 + np.flatnonzero(gaps[s : e - 1] > 0)).tolist():  # a gap before neuron i
                targets += [buffer.span(first_row + run, i - run), self.gap.span(0, int(gaps[i - 1]))]
                run = i
            targets.append(buffer.span(first_row + run, e - run))
            jobs.append((int(neurons[s]) * size, targets))
            read += (int(neurons[e - 1]) - int(neurons[s]) + 1) * size
        groups = [jobs[i :: self.threads] for i in range(min(self.threads, len(jobs)))]
        list(self.pool.map(lambda g: self._read(layer, g), groups))
        self.bytes += read
        self.seconds += time.perf_counter() - start


@dataclass
class _Counts:
    calls: int = 0
    tokens: int = 0
    needed: int = 0  # neurons computed, summed over calls
    hits: int = 0  # of which already cached
    compute_s: float = 0.0


class _Layer:
    """One layer's neuron cache: `capacity` slots, `used` of them filled; `neuron_of[slot]`, `slot_of[neuron]`
    (-1: not cached) and `last_used[slot]` (the step)."""

    def __init__(self, store: FlashStore, layer: int, capacity: int):
        self.store, self.layer, self.capacity = store, layer, capacity
        f = store.bundles.ffn_dim
        self.cache = _Buffer(capacity, store.bundles.record_bytes)
        self.slot_of = np.full(f, -1, np.int64)
        self.neuron_of = np.zeros(max(capacity, 1), np.int64)
        self.last_used = np.zeros(max(capacity, 1), np.int64)
        self.used = 0
        self.step = 0

    def _evict(self, victims: np.ndarray) -> None:
        """Remove the cached slots `victims`: the last filled slots move into the holes (no reallocation)."""
        if victims.size == 0:
            return
        new_used = self.used - victims.size
        holes = np.sort(victims[victims < new_used])
        is_victim = np.zeros(self.used, bool)
        is_victim[victims] = True
        movers = np.arange(new_used, self.used)[~is_victim[new_used:]]
        self.slot_of[self.neuron_of[victims]] = -1
        self.cache.rows[holes] = self.cache.rows[movers]
        self.neuron_of[holes] = self.neuron_of[movers]
        self.last_used[holes] = self.last_used[movers]
        self.slot_of[self.neuron_of[holes]] = holes
        self.used = new_used

    def _make_room(self, needed_now: np.ndarray, count: int) -> None:
        """Evict what the window no longer holds, then (if `count` new records still do not fit) the least
        recently used slots not needed by this token."""
        window = self.store.offload.window
        if window is not None:
            stale = np.flatnonzero(self.last_used[: self.used] <= self.step - window)
            self._evict(stale[~np.isin(self.neuron_of[stale], needed_now)])
        short = count - (self.capacity - self.used)
        if short > 0:
            spare = np.flatnonzero(~np.isin(self.neuron_of[: self.used], needed_now))
            self._evict(spare[np.argsort(self.last_used[spare], kind="stable")[:short]])

    def ffn(self, x: np.ndarray) -> np.ndarray:
        """The MLP of `x` float32 `[..., d_model]` over each row's active neurons."""
        store = self.store
        rows = np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])
        start = time.perf_counter()
        active = store.active(self.layer, rows)  # bool [N, F], or None: every neuron
        needed = np.arange(store.bundles.ffn_dim) if active is None else np.flatnonzero(active.any(axis=0))
        self.step += 1
        cached = self.slot_of[needed] >= 0
        missing = needed[~cached]
        self._make_room(needed, missing.size)
        fits = min(missing.size, self.capacity - self.used)
        store.reader.read(self.layer, missing[:fits], self.cache, self.used)
        new_slots = np.arange(self.used, self.used + fits)
        self.slot_of[missing[:fits]] = new_slots
        self.neuron_of[new_slots] = missing[:fits]
        self.used += fits
        held = needed[self.slot_of[needed] >= 0]
        self.last_used[self.slot_of[held]] = self.step
        mask = None if active is None else active[:, held]
        out = store.compute(self.layer, self.cache.rows[self.slot_of[held]], rows, mask)
        overflow = missing[fits:]  # a set larger than the cache: read piecewise into scratch, used, dropped
        for first in range(0, overflow.size, store.scratch.rows.shape[0]):
            piece = overflow[first : first + store.scratch.rows.shape[0]]
            store.reader.read(self.layer, piece, store.scratch, 0)
            mask = None if active is None else active[:, piece]
            out += store.compute(self.layer, store.scratch.rows[: piece.size], rows, mask)
        counts = store.counts[store.phase]
        counts.calls += 1
        counts.tokens += rows.shape[0] if self.layer == 0 else 0
        counts.needed += needed.size
        counts.hits += int(cached.sum())
        counts.compute_s += time.perf_counter() - start
        return out.reshape(x.shape)


class _WholeLayers:
    """The naive baseline (`reads="matrices"`) and `reads="mmap"`: dense MLPs; the first `kept` layers stay in
    RAM, the others' whole matrices are read each time they are needed."""

    def __init__(self, store: FlashStore, kept: int):
        self.store, self.kept = store, kept
        b = store.bundles
        self.maps = []
        if store.offload.reads == "mmap":
            for path in store.reader.files:
                with open(path, "rb") as f:
                    self.maps.append(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ))
            self.resident = []
        else:
            self.resident = [read_layer(store.version, b, i) for i in range(kept)]
            self.scratch = _Buffer(b.ffn_dim, b.record_bytes)
        self.everything = np.arange(b.ffn_dim)

    def ffn(self, layer: int, x: np.ndarray) -> np.ndarray:
        store, b = self.store, self.store.bundles
        rows = np.ascontiguousarray(x, np.float32).reshape(-1, x.shape[-1])
        start = time.perf_counter()
        hit = layer < self.kept
        if self.maps:
            records = np.frombuffer(self.maps[layer], np.uint8).reshape(b.ffn_dim, b.record_bytes)
            out = store.compute(layer, records, rows, None)
            if not hit:  # out of the budget: drop its pages, so the next use reads storage again
                self.maps[layer].madvise(mmap.MADV_DONTNEED)
                _drop_cached_pages(store.reader.files[layer])
                store.reader.bytes += b.layer_bytes
        elif hit:
            out = store.compute(layer, self.resident[layer], rows, None)
        else:
            store.reader.read(layer, self.everything, self.scratch, 0)
            out = store.compute(layer, self.scratch.rows, rows, None)
        counts = store.counts[store.phase]
        counts.calls += 1
        counts.tokens += rows.shape[0] if layer == 0 else 0
        counts.needed += b.ffn_dim
        counts.hits += b.ffn_dim if hit else 0
        counts.compute_s += time.perf_counter() - start
        return out.reshape(x.shape)


class FlashStore:
    """The host side of an offloaded model: the reader, the per-layer caches, predictors and statistics."""

    def __init__(self, version: Path, config: ModelConfig, bundles: Bundles, offload: Offload, resident_bytes: int):
        self.version, self.config, self.bundles, self.offload = version, config, bundles, offload
        self.act = _activation(config.activation)
        self.reader = _Reader(version, bundles, offload.threads)
        self.predictors, trained_fraction = [], 1.0
        if offload.predictor == "trained" and offload.reads == "neurons" and (offload.fraction or 0) < 1:
            self.predictors, trained_fraction = read_predictors(version, config)
        self.fraction = offload.fraction or trained_fraction
        predictor_bytes = sum(a.nbytes for p in self.predictors for a in p.values())
        self.down_scales = read_down_scales(version, bundles)
        self.resident_bytes = resident_bytes + predictor_bytes + sum(s.nbytes for s in self.down_scales)
        budget = int(offload.memory_budget_mb * 1e6)
        d, b = config.d_model, bundles
        self.oracle = []  # per layer [d, F] (up) or [d, 2F] (gate | up) (oracle only: outside the budget)
        if offload.predictor == "oracle" and offload.reads == "neurons" and self.fraction < 1:
            for i in range(config.num_layers):
                parts, scales = b.split(read_layer(version, b, i))
                inputs = [p * (1 if scales is None else scales[:, j : j + 1]) for j, p in enumerate(parts[:-1])]
                self.oracle.append(np.stack(inputs, axis=1, dtype=np.float32).reshape(-1, d).T.copy())
        if offload.reads == "neurons":
            scratch_rows = min(SCRATCH_NEURONS, b.ffn_dim)
            scratch = scratch_rows * b.record_bytes
            minimum = self.resident_bytes + scratch + config.num_layers * b.record_bytes
            spare = budget - self.resident_bytes - scratch
            capacity = min(b.ffn_dim, spare // (config.num_layers * b.record_bytes)) if spare > 0 else 0
            self.scratch = _Buffer(scratch_rows, b.record_bytes)
            self.layers = [_Layer(self, i, int(capacity)) for i in range(config.num_layers)]
            self.cache_bytes = capacity * b.record_bytes * config.num_layers + scratch
        else:
            scratch = 0 if offload.reads == "mmap" else b.layer_bytes
            minimum = self.resident_bytes + scratch
            spare = budget - self.resident_bytes - scratch
            kept = min(config.num_layers, max(spare, 0) // b.layer_bytes)
            self.whole = _WholeLayers(self, int(kept))
            self.cache_bytes = kept * b.layer_bytes + scratch
        if budget < minimum:
            raise ValueError(
                f"memory_budget_mb={offload.memory_budget_mb:g} cannot hold the resident part of {version.parent} "
                f"({self.resident_bytes / 1e6:.4g} MB of embeddings, attention, norms"
                f"{' and predictors' if predictor_bytes else ''}) and a neuron cache; "
                f"the minimum is {minimum / 1e6:.4g} MB"
            )
        for path in self.reader.files:  # loading checked the files' digests: start with them out of the page cache
            _drop_cached_pages(path)
        self.begin()

    def host_mlps(self, params: Any) -> Any:
        """`params` with each dense MLP replaced by its `HostMLP`."""
        out = dict(params)
        for i in range(self.config.num_layers):
            compute = self.layers[i].ffn if hasattr(self, "layers") else (lambda x, i=i: self.whole.ffn(i, x))
            out[f"layer_{i}"] = {**params[f"layer_{i}"], "mlp": {"host": HostMLP(compute)}}
        return out

    def active(self, layer: int, rows: np.ndarray) -> np.ndarray | None:
        """bool `[N, F]`: the neurons each row computes (its top `fraction`), or None for all of them."""
        f = self.bundles.ffn_dim
        keep = math.ceil(self.fraction * f)
        if keep >= f:
            return None
        if self.oracle:
            projected = (rows @ self.oracle[layer]).reshape(rows.shape[0], f, -1)  # [N, F, (gate, up)]
            hidden = (
                self.act(projected[..., 0]) * projected[..., 1] if self.bundles.gated else self.act(projected[..., 0])
            )
            scores = np.abs(hidden)
        else:
            scores = predictor_scores(self.predictors[layer], rows)
        top = np.argpartition(-scores, keep - 1, axis=1)[:, :keep]
        active = np.zeros(scores.shape, bool)
        np.put_along_axis(active, top, True, axis=1)
        return active

    def compute(self, layer: int, records: np.ndarray, rows: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
        """float32 rows `[N, d]` through `layer`'s neurons `records` uint8 `[n, record_bytes]` -> float32 `[N, d]`;
        `mask` bool `[N, n]`: rows x neurons. int8 records are widened to float32 here, the scales applied to
        the products (per neuron to gate and up, per output channel to down's)."""
        parts, scales = self.bundles.split(records)
        parts = [np.asarray(p, np.float32) for p in parts]
        inputs = [rows @ p.T for p in parts[:-1]]
        if scales is not None:
            inputs = [h * scales[:, j] for j, h in enumerate(inputs)]
        hidden = self.act(inputs[0]) * inputs[1] if self.bundles.gated else self.act(inputs[0])
        if mask is not None:
            hidden = hidden * mask
        out = hidden @ parts[-1]
        return out if scales is None else out * self.down_scales[layer]

    def begin(self) -> None:
        """Start counting for a generation: its prefill, until `prefill_done`, then its decode steps."""
        self.counts = {"prefill": _Counts(), "decode": _Counts()}
        self.phase = "prefill"
        self.reader.bytes, self.reader.seconds = 0, 0.0
        self.read_mark = (0, 0.0)

    def prefill_done(self) -> None:
        self.phase = "decode"
        self.read_mark = (self.reader.bytes, self.reader.seconds)

    def statistics(self) -> dict[str, Any]:
        """The decode phase's statistics since `begin` (per token: per row and step)."""
        decode = self.counts["decode"]
        tokens = max(decode.tokens, 1)
        read = self.reader.bytes - self.read_mark[0]
        neurons = self.offload.reads == "neurons"
        return {
            "strategy": self.offload.reads,
            "predictor": self.offload.predictor if neurons else None,
            "fraction": self.fraction if neurons else 1.0,
            "bytes_read_per_token": read / tokens,
            "ffn_fraction_read": read / tokens / (self.bundles.layer_bytes * self.config.num_layers),
            "hit_rate": decode.hits / max(decode.needed, 1),
            "ffn_fraction_computed": decode.needed / max(decode.calls, 1) / self.bundles.ffn_dim,
            "io_s": self.reader.seconds - self.read_mark[1],
            "compute_s": decode.compute_s,
            "prefill_bytes_read": self.read_mark[0],
            "budget_mb": self.offload.memory_budget_mb,
            "resident_mb": self.resident_bytes / 1e6,
            "cache_mb": self.cache_bytes / 1e6,
            "oracle_mb": sum(a.nbytes for a in self.oracle) / 1e6,
            "read_mode": "mmap, pages dropped after use (madvise + fadvise)"
            if self.offload.reads == "mmap"
            else self.reader.mode,
        }
