"""Will a model fit an accelerator you do not have yet, and how fast can it decode there?

`plan` builds the real generation program (prefill, then the decode loop, as `jaxdecode.generate` runs
them) with abstract parameters (`jax.eval_shape`: no weights are read or made), compiles it for a
target's compile-only devices (`jaxdecode.targets`) and reads the compiler's own per-device memory
figures. Without the compilers (`pip install "jaxdecode[aot]"`) it falls back to an analytic estimate of
the same quantities and says so.

The decode speed is a roofline: a decode step must read every weight of its shard and the KV cache
written so far (HBM bytes / bandwidth) and do its FLOPs (/ peak); the larger of the two is the step's
time. It ignores the cross-chip collectives of tensor parallelism and kernel launch overheads, so it is an
upper bound on speed.

`generation_program` is also what the compile checks in the test suite build, for every target.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from . import engine, parallel, targets, weights
from .api import DTYPES, load_config
from .collectives import DATA, MODEL, Parallel
from .config import ModelConfig, config_from_hf
from .kv_cache import init_cache
from .loop import Decoding, Speculation, decode_loop, prefill
from .model import init_params
from .quantize import quantize_abstract
from .sampling import Sampling, prepare
from .speculative import PassCosts
from .targets import Roofline, Target

PRESETS = Path(__file__).parent / "presets"


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.json"))


@dataclasses.dataclass(frozen=True)
class Workload:
    """What the program serves: a batch of prompts of `prompt_len` tokens, `new_tokens` more each."""

    batch: int = 8
    prompt_len: int = 1024
    new_tokens: int = 128
    dtype: str = "bfloat16"
    quant: str | None = None  # None, "int8" or "int4"
    group_size: int = 128
    attention: str = "auto"
    gamma: int | None = None  # self-speculative decoding with this many drafts per round

    @property
    def extra_slots(self) -> int:
        return 0 if self.gamma is None else 2 * (self.gamma + 1)

    @property
    def cache_len(self) -> int:
        return self.prompt_len + self.new_tokens + self.extra_slots


@functools.cache  # plan() asks for them per mesh, per check and for the roofline: one trace each
def abstract_params(config: ModelConfig, workload: Workload) -> Any:
    """The params `jaxdecode.load` would make for `config`, as `jax.ShapeDtypeStruct`s (model layout;
    shared between callers: not to be modified)."""
    floats = jax.eval_shape(partial(init_params, config, dtype=DTYPES[workload.dtype]), jax.random.key(0))
    if workload.quant is None:
        return floats
    return quantize_abstract(floats, workload.quant, workload.group_size, workload.dtype)


def _check_mesh(config: ModelConfig, workload: Workload, data: int, model: int) -> None:
    """Refuse a mesh the batch or the model cannot split."""
    if workload.batch % data:
        raise ValueError(f"batch {workload.batch} does not split over data={data}")
    parallel.check_config(config, model, abstract_params(config, workload) if workload.quant else None)


def _sharded_params(config: ModelConfig, params: Any, model: int) -> Any:
    """Abstract params in the layout of a `model`-way split (`weights.shard_layout`)."""
    if model == 1:
        return params
    return jax.eval_shape(partial(weights.shard_layout, config=config, model_size=model, xp=jnp), params)


def generation_program(
    config: ModelConfig, workload: Workload, devices: list, data: int = 1, model: int = 1
) -> tuple[Any, tuple]:
    """(jitted program, abstract args) for prefill + decode loop (plain or self-speculative) on `devices`
    as a `data x model` mesh (a single device when both are 1). `program.lower(*args).compile()`
    compiles it for whatever platform the devices belong to; the program returns the final loop state
    (KV cache included), as `jaxdecode.generate`'s decode executable does: the same engine programs."""
    _check_mesh(config, workload, data, model)
    params = _sharded_params(config, abstract_params(config, workload), model)
    arrays, sampling_plan = prepare(Sampling(), workload.batch)
    in_place = workload.attention != "xla"  # the targets' kernels read the self-draft's view in place
    speculation = None if workload.gamma is None else Speculation(workload.gamma, in_place=in_place)
    buffer = workload.new_tokens + workload.extra_slots
    settings = Decoding(
        config, sampling_plan, buffer, workload.cache_len, (), workload.attention, speculation=speculation
    )

    if data * model == 1:
        mesh, place = None, SingleDeviceSharding(devices[0])
        row, replicated = place, place
        param_shardings = jax.tree.map(lambda _: place, params)
    else:
        mesh = Mesh(np.asarray(devices[: data * model]).reshape(data, model), (DATA, MODEL))
        row, replicated = NamedSharding(mesh, P(DATA)), NamedSharding(mesh, P())
        param_shardings = jax.tree.map(lambda spec: NamedSharding(mesh, spec), weights.specs(params))
    prefill_fn, loop_fn = engine.program(prefill, settings, mesh), engine.program(decode_loop, settings, mesh)

    def abstract(x: Any, sharding: Any) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding)

    batch = workload.batch
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), batch))
    args = (
        jax.tree.map(abstract, params, param_shardings),
        abstract(jax.ShapeDtypeStruct((batch, workload.prompt_len), jnp.int32), row),
        abstract(jax.ShapeDtypeStruct((batch,), jnp.int32), row),
        abstract(keys, row),
        jax.tree.map(lambda a: abstract(a, row), arrays),
        abstract(jax.ShapeDtypeStruct((), jnp.int32), replicated),
    )

    def program(params, tokens, lengths, keys, arrays, limit):
        state = prefill_fn(params, tokens, lengths, keys, arrays, None)
        return loop_fn(params, state, arrays, limit, None)

    return jax.jit(program), args


# ------------------------------------------------------------------------------------------------
# The report.


def _sharded_bytes(leaf: Any, spec: P, mesh_shape: dict[str, int]) -> int:
    """Bytes of one device's shard of an abstract leaf under `spec`."""
    shape = list(leaf.shape)
    for axis, name in enumerate(spec):
        if name is not None:
            shape[axis] = -(-shape[axis] // mesh_shape[name])
    return int(np.prod(shape)) * jnp.dtype(leaf.dtype).itemsize


def analytic_bytes(config: ModelConfig, workload: Workload, data: int, model: int) -> dict[str, int]:
    """Per-device params and KV-cache bytes from the shapes alone (what needs no compiler)."""
    params = _sharded_params(config, abstract_params(config, workload), model)
    mesh_shape = {DATA: data, MODEL: model}
    specs = weights.specs(params)
    param_bytes = sum(
        _sharded_bytes(leaf, spec, mesh_shape)
        for leaf, spec in zip(jax.tree.leaves(params), jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P)))
    )
    cache = jax.eval_shape(
        lambda: init_cache(
            config,
            workload.batch,
            workload.cache_len,
            DTYPES[workload.dtype],
            Parallel(model),
        )
    )
    kv_bytes = sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in (*cache.keys, *cache.values)) // data
    return {"params": param_bytes, "kv_cache": kv_bytes}


def roofline(
    config: ModelConfig, workload: Workload, target: Target, bytes_: dict[str, int], data: int, model: int
) -> float:
    """Seconds per decode step on one device of the mesh: max(bytes read / HBM bandwidth, FLOPs / peak).
    Bytes: the device's params (of experts, the expected routed share) and its KV cache at the mean length
    of the decode. (All params: a step
    reads only B rows of an untied embedding table, so this overstates the bytes by its share, 1/16 for
    Llama-3.1-8B.)"""
    mean_len = workload.prompt_len + workload.new_tokens / 2
    kv_read = bytes_["kv_cache"] * mean_len / workload.cache_len
    costs = PassCosts.of(config, abstract_params(config, dataclasses.replace(workload, quant=None)))  # FLOPs only
    rows, tokens = workload.batch / data, 1 if workload.gamma is None else workload.gamma + 1
    flops = rows * tokens * (costs.matmul_flops + mean_len * costs.attention_flops) / model
    peak = target.int8_ops if workload.quant else target.bf16_flops
    # Of a mixture of experts' weights a step reads the routed experts' (the same share on every shard).
    read = costs.weights_read(rows * tokens) / (costs.weight_bytes + costs.expert_bytes)
    return Roofline(target.bandwidth, peak, target.name).seconds(bytes_["params"] * read + kv_read, flops)


def _compile(config: ModelConfig, workload: Workload, target: Target, data: int, model: int) -> dict[str, Any]:
    program, args = generation_program(config, workload, targets.compile_only_devices(target), data, model)
    try:
        compiled = program.lower(*args).compile()
    except Exception as error:  # XLA's own words: RESOURCE_EXHAUSTED (HBM), Mosaic layout errors, ...
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "RESOURCE_EXHAUSTED" not in message and "memory" not in message.lower():
            raise
        return {"fits": False, "compiler_message": message, "memory": None}
    stats = compiled.memory_analysis()
    memory = {
        "params": int(stats.argument_size_in_bytes),
        "kv_cache": int(stats.output_size_in_bytes),
        "temp": int(stats.temp_size_in_bytes),
        "peak": int(stats.peak_memory_in_bytes),
    }
    return {"fits": memory["peak"] <= target.memory_bytes, "compiler_message": None, "memory": memory}


def plan(
    config: ModelConfig,
    target: Target | str,
    workload: Workload = Workload(),
    mesh: tuple[int, int] | None = None,
    compile: bool | None = None,
) -> dict[str, Any]:
    """The plan for serving `workload` with `config` on `target` (see the module docstring).

    mesh: (data, model); default the smallest `model` (data 1) that fits, trying the divisors of the
    target's device count (skipping, uncompiled, those whose params + KV cache alone exceed a chip).
    compile: None compiles when the compilers are installed, else estimates; True insists (raises
    `targets.TargetUnavailable`); False estimates.
    Returns the `--json` object of `jaxdecode plan` (keys in the README).
    """
    target = targets.get(target) if isinstance(target, str) else target
    if compile is None:
        compile = targets.compilers_installed(target.platform)
    if mesh is not None:
        meshes = [mesh]
        if mesh[0] * mesh[1] > target.devices:
            need = mesh[0] * mesh[1]
            raise ValueError(f"mesh {mesh[0]}x{mesh[1]} needs {need} devices; {target.name} has {target.devices}")
    else:
        meshes = [(1, m) for m in range(1, target.devices + 1) if target.devices % m == 0]
        meshes = [(d, m) for d, m in meshes if _fits_mesh(config, workload, d, m)]
        if not meshes:
            raise ValueError(f"{config.family} cannot be laid out on {target.name} ({target.devices} devices)")
    for data, model in meshes:
        estimate = analytic_bytes(config, workload, data, model)
        resident = estimate["params"] + estimate["kv_cache"]
        if resident > target.memory_bytes and (data, model) != meshes[-1]:
            continue  # cannot fit by arithmetic alone: no need to compile it
        result = _compile(config, workload, target, data, model) if compile else None
        if result is None:
            per_device = {**estimate, "temp": None, "peak": None}
            fits, message = resident <= target.memory_bytes, None
        else:
            per_device = result["memory"] or {**estimate, "temp": None, "peak": None}
            fits, message = result["fits"], result["compiler_message"]
        if fits:
            break
    step_s = roofline(config, workload, target, estimate, data, model)
    return {
        "target": target.name,
        "device": target.description,
        "mesh": {"data": data, "model": model},
        "fits": bool(fits),
        "compiled": bool(compile),
        "per_device_bytes": per_device,
        "analytic_bytes": estimate,
        "device_memory_bytes": target.memory_bytes,
        "compiler_message": message,
        "decode_step_s": step_s,
        "decode_tokens_per_s": workload.batch / step_s if workload.gamma is None else None,
        "workload": dataclasses.asdict(workload),
        "note": None if compile else _analytic_note(target),
    }


def _analytic_note(target: Target) -> str:
    if targets.compilers_installed(target.platform):
        return "analytic estimate (not compiled; temporaries and peak unknown)"
    return f"analytic estimate: the {target.platform} compiler is not installed ({targets.AOT_INSTALL})"


def _fits_mesh(config: ModelConfig, workload: Workload, data: int, model: int) -> bool:
    try:
        _check_mesh(config, workload, data, model)
    except ValueError:
        return False
    return True


def load_plan_config(source: str) -> ModelConfig:
    """A preset name (`preset_names()`), or anything `jaxdecode.load` takes, read without its weights."""
    if source.lower() in preset_names():
        return config_from_hf(json.loads((PRESETS / f"{source.lower()}.json").read_text()))
    return load_config(source)


def format_report(report: dict[str, Any]) -> str:
    """The plan as a few lines of text."""

    def gib(n: int | None) -> str:
        return "?" if n is None else f"{n / 2**30:.2f} GiB"

    b = report["per_device_bytes"]
    mesh = report["mesh"]
    lines = [
        f"target {report['target']} ({report['device']}), mesh data={mesh['data']} x model={mesh['model']}",
        f"per device: params {gib(b['params'])}, KV cache {gib(b['kv_cache'])}, temporaries {gib(b['temp'])}, "
        f"peak {gib(b['peak'])} of {gib(report['device_memory_bytes'])}",
        f"fits: {'yes' if report['fits'] else 'no'}"
        + (f" ({report['compiler_message']})" if report["compiler_message"] else "")
        + ("" if report["compiled"] else f" [{report['note']}]"),
        f"decode roofline: {report['decode_step_s'] * 1e3:.2f} ms per step"
        + (f", {report['decode_tokens_per_s']:.0f} tokens/s" if report["decode_tokens_per_s"] else ""),
    ]
    return "\n".join(lines)
