"""Where a decode step's time goes: XLA's own profile of the decode loop, split into parts, beside the
weight-read floor the same run measures (`jaxdecode bench --suite profile`).

Method: the request is prefilled, then the compiled decode loop (`loop.decode_loop`, the program
`generate` runs) executes once under `jax.profiler.trace`. XLA's CPU runtime records every thunk it
runs (a fusion, a library dot, a scatter) with its HLO instruction's name; the instruction's
`op_name` metadata in the compiled program says which part of the model it comes from (the Flax
module path: `layer_3/attn/q`, `layer_3/attn/jit(decode_attention)`, ...). Each part's time is
the sum of its thunks' durations, per decode step. "between thunks" is the traced loop's wall time
less the thunks' total: the runtime's dispatch, waits and the loop's condition (negative where the
two cores ran thunks at once). The measured step is the median untraced `generate` step; the parts
add up to the traced step, and the report gives both.

The floor: one matrix-vector product over a float32 weight as large as the model's weights, timed
in the same process; the model's weights read at that bandwidth give the floor step time.
"""

from __future__ import annotations

import collections
import glob
import re
import statistics
import tempfile
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels.benchmark import time_call

from . import engine, quantize
from .loop import decode_loop

# Parts, in the order reported. A Linear's weight read is named by its module (q, k, v, o, gate, up, ...).
ATTENTION, CACHE_WRITE, OTHER_LAYER = "attention over the cache", "cache write", "norms, RoPE, residuals"
EMBEDDING, HEAD, SAMPLING = "embedding lookup", "LM head", "sampling and bookkeeping"
BETWEEN = "between thunks"
_LINEAR = re.compile(
    r"/layer_\d+/(?:attn|mlp|moe|moe/shared)/(q|k|v|o|gate|up|down|router|experts|shared_gate)/"
    r"|/(?:layer_\d+/)?(per_layer_gate|per_layer_proj|per_layer_model_proj)/"  # Gemma 4's per-layer inputs
)
_NAME = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = ")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALL = re.compile(r" (dot|tuple|get-tuple-element|while)\(([^)]*)\)")
_INDEX = re.compile(r"index=(\d+)")
_COMMENT = re.compile(r"/\*.*?\*/")
_CONTROL = re.compile(r" (while|conditional|call)\(")
# A parameter's op_name: params['layer_3']['attn']['q']['weight'], params['embed'] (the tied head), ...
_WEIGHT = re.compile(r"\['(\w+)'\]\['weight'\]$|\['(embed|lm_head)'\]$")


def part_of(op_name: str) -> str:
    """The part an HLO instruction belongs to, from its `op_name` metadata."""
    if "decode_attention" in op_name or "flash_attention" in op_name:
        return ATTENTION
    linear = _LINEAR.search(op_name)
    if linear:
        return f"weights: {linear.group(1) or linear.group(2)}"
    if "/attn/scatter" in op_name:
        return CACHE_WRITE
    if "/layer_" in op_name:
        return OTHER_LAYER
    if "Decoder/" in op_name:
        if "final_norm" in op_name:
            return OTHER_LAYER
        return EMBEDDING if re.search(r"Decoder/(?:jit\()?(take|gather|embed)", op_name) else HEAD
    return SAMPLING


def instruction_parts(hlo_text: str) -> dict[str, str | None]:
    """Instruction name -> part, for the instructions of a compiled program's text (None: control flow,
    a `while` or `conditional` whose thunk runs other thunks).

    Most instructions carry the op_name of the JAX operation they come from. XLA's CPU pipeline drops it
    from the library dots of float weights; such a dot is named by its weight operand instead: an entry
    parameter (`params['layer_3']['attn']['q']['weight']`), or inside the decode loop's body the loop
    state's element that the `while` starts from that parameter.
    """
    op_names: dict[str, str] = {}
    operands: dict[str, tuple[str, list[str]]] = {}
    element: dict[str, int] = {}  # get-tuple-element -> its index
    while_start, control = None, []
    for line in hlo_text.splitlines():
        name = _NAME.match(line)
        if name is None:
            continue
        name = name.group(1)
        if _CONTROL.search(line):
            control.append(name)
        op_name = _OP_NAME.search(line)
        if op_name:
            op_names[name] = op_name.group(1).replace("\\'", "'")  # the text escapes quotes
        call = _CALL.search(line)
        if call:
            listed = _COMMENT.sub("", call.group(2))  # long lists carry /*index=N*/ marks
            kind, args = call.group(1), [a.strip().lstrip("%") for a in listed.split(",") if a.strip()]
            operands[name] = (kind, args)
            if kind == "get-tuple-element":
                element[name] = int(_INDEX.search(line).group(1))
            elif kind == "while":
                while_start = args[0]
    start = operands.get(while_start, ("", []))[1]  # the loop state's elements as the loop begins

    def weight_part(operand: str) -> str | None:
        if operand in element and element[operand] < len(start):
            operand = start[element[operand]]
        weight = _WEIGHT.search(op_names.get(operand, ""))
        if weight is None:
            return None
        return HEAD if weight.group(2) else f"weights: {weight.group(1)}"

    parts: dict[str, str | None] = {name: part_of(op_name) for name, op_name in op_names.items()}
    for name in control:
        parts[name] = None  # its thunk's time is its body's thunks' time: counted there
    for name, (kind, args) in operands.items():
        if kind == "dot" and name not in op_names:
            found = [p for p in map(weight_part, args) if p is not None]
            if found:
                parts[name] = found[0]
    return parts


def thunk_times(trace_dir: str, parts: dict[str, str | None]) -> tuple[dict[str, float], int]:
    """Seconds per part summed over the thunks of a trace (events named after an instruction of `parts`;
    control flow skipped), and how many thunk events were not found among `parts` (counted as "other")."""
    files = glob.glob(f"{trace_dir}/**/*.xplane.pb", recursive=True)
    if not files:
        raise RuntimeError(f"jax.profiler wrote no trace under {trace_dir}")
    data = jax.profiler.ProfileData.from_file(files[0])
    seconds: dict[str, float] = collections.defaultdict(float)
    unknown = 0
    for plane in data.planes:
        for line in plane.lines:
            for event in line.events:
                stats = dict(event.stats)
                if "hlo_op" not in stats:
                    continue
                if stats["hlo_op"] not in parts:
                    unknown += 1
                part = parts.get(stats["hlo_op"], "other")
                if part is None:
                    continue
                seconds[part] += event.duration_ns * 1e-9
    return dict(seconds), unknown


def weight_read_floor(weight_bytes: int, d_model: int, runs: int = 30) -> dict[str, float]:
    """Bandwidth of one float32 matrix-vector product `[1, d] @ [d, n]` over `weight_bytes` (median of
    `runs`), and the time the model's weights take to read at it."""
    columns = max(weight_bytes // 4 // d_model, 1)
    weight = jnp.asarray(np.random.default_rng(0).standard_normal((d_model, columns), np.float32))
    x = jnp.ones((1, d_model), jnp.float32)
    bandwidth = weight.nbytes / time_call(jax.jit(lambda x, w: x @ w), (x, weight), runs)
    return {"floor_gb_per_s": bandwidth / 1e9, "floor_step_ms": weight_bytes / bandwidth * 1e3}


def profile_decode(model: Any, prompt: list[int], batch: int, new_tokens: int, runs: int) -> dict[str, Any]:
    """Profile `model`'s decode loop on `batch` copies of `prompt` for `new_tokens` greedy tokens.

    Returns a row: the measured step (median of `runs` untraced generations after a warm-up), the
    traced step, seconds per step of each part, the weight bytes and the floor (see the module doc).
    """
    from .api import generate

    prompts = [prompt] * batch
    generate(model, prompts, max_new_tokens=new_tokens, stop_ids=())  # compiles
    measured = [generate(model, prompts, max_new_tokens=new_tokens, stop_ids=()) for _ in range(runs)]
    step_s = batch / statistics.median(r.decode_tokens_per_s for r in measured)

    run = engine.start(model, prompts, max_new_tokens=new_tokens, stop_ids=())
    loop, _ = engine.compiled(model, decode_loop, run.settings, run.args, donate=(1,))
    parts = instruction_parts(loop.as_text())
    with tempfile.TemporaryDirectory() as trace_dir:
        options = jax.profiler.ProfileOptions()
        options.python_tracer_level = 0  # only XLA's runtime is of interest
        with jax.profiler.trace(trace_dir, profiler_options=options):
            start = time.perf_counter()
            state = jax.block_until_ready(loop(*run.args))
            traced_s = time.perf_counter() - start
        seconds, unknown = thunk_times(trace_dir, parts)
    steps = engine.finish(run, state).decode_steps - 1  # decode_steps counts the prefill's token
    per_step = {part: s / steps for part, s in sorted(seconds.items(), key=lambda kv: -kv[1])}
    per_step[BETWEEN] = traced_s / steps - sum(per_step.values())
    weight_bytes = quantize.param_bytes(model.params)
    return {
        "decode_tokens_per_s": batch / step_s,
        "step_ms": step_s * 1e3,
        "traced_step_ms": traced_s / steps * 1e3,
        "parts_ms": {part: s * 1e3 for part, s in per_step.items()},
        "unattributed_thunks": unknown,
        "param_bytes": weight_bytes,
        **weight_read_floor(weight_bytes, model.config.d_model),
    }


def report(row: dict[str, Any]) -> str:
    """The profile of one row as text: each part in ms per step and its share, then the floor."""
    weights = row["dtype"] + (f" {row['quant']}" if row["quant"] else "")
    label = f"{weights} batch {row['batch']} prompt {row['prompt']}"
    lines = [
        f"{label}: step {row['step_ms']:.2f} ms measured ({row['decode_tokens_per_s']:.1f} tok/s), "
        f"{row['traced_step_ms']:.2f} ms traced"
    ]
    for part, ms in row["parts_ms"].items():
        lines.append(f"  {part:28s} {ms:8.3f} ms  {100 * ms / row['traced_step_ms']:5.1f}%")
    floor_ms = row["floor_step_ms"]
    lines.append(
        f"  weight-read floor: {row['param_bytes'] / 1e6:.0f} MB at {row['floor_gb_per_s']:.1f} GB/s = "
        f"{floor_ms:.2f} ms a step; the measured step runs at {floor_ms / row['step_ms']:.0%} of the floor's speed"
    )
    return "\n".join(lines)
