"""Loading: sources -> params, quantization, placement. What `jaxdecode.load`, `save` and `shard` do.

Sources (`io/sources.py`) are embedded names, GGUF files, HF directories, hub ids and saved Orbax
checkpoints (`checkpoint.py`); every one is untrusted input, read through `io/validate.py`'s bounds.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import checkpoint, flash, parallel, weights
from .attention import resolve as resolve_attention
from .collectives import MODEL
from .config import ModelConfig
from .engine import Model
from .io.gguf import load_gguf, open_model
from .io.hf import load_hf, read_hf_config
from .io.sources import resolve_source
from .quantize import check_choice as check_quant_choice
from .quantize import is_quantized, param_bytes, quantize_params

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def load(
    source: str | os.PathLike[str],
    *,
    dtype: str = "float32",
    attention: str = "auto",
    mesh: jax.sharding.Mesh | None = None,
    quant: str | None = None,
    group_size: int = 128,
    offload: flash.Offload | None = None,
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
        (tensor parallel over `model`, batch over `data`, float or quantized; see `jaxdecode/parallel.py`).
      quant: None (float weights), "int8" (per output channel), "int4" (groups of `group_size` columns)
        or "native" (a GGUF's own Q8_0 / Q4_0 / Q4_1 blocks). See `jaxdecode/quantize.py`.
      group_size: int4 group size, 32, 64 or 128.
      offload: `Offload(memory_budget_mb=...)` for a flash checkpoint (`jaxdecode convert SRC DST --flash`):
        the MLP weights stay in storage and are read neuron by neuron (`flash.py`); without it, a flash
        checkpoint loads whole into RAM.
    """
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; use one of: {', '.join(DTYPES)}")
    check_quant_choice(quant, group_size)
    backend = resolve_attention(attention)
    path = resolve_source(source)
    if checkpoint.is_checkpoint(path):
        return _load_checkpoint(path, dtype, backend, mesh, quant, offload)
    if offload is not None:
        raise ValueError(
            f"offload needs a flash checkpoint: convert {source} first (jaxdecode convert SRC DST --flash)"
        )
    np_dtype = np.dtype(DTYPES[dtype])
    if path.is_dir():
        if quant == "native":
            raise ValueError(f"quant='native' keeps a GGUF file's blocks; {path} is not a GGUF file: use int8 or int4")
        config, params, tokenizer = load_hf(path, np_dtype)
    else:
        config, params, tokenizer = load_gguf(path, np_dtype, native=quant == "native")
    if quant in ("int8", "int4"):
        params = quantize_params(params, quant, group_size, dtype)
    model = Model(config, weights.to_model_layout(params), tokenizer, str(source), backend)
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


def _load_checkpoint(
    path: Path, dtype: str, backend: str, mesh: jax.sharding.Mesh | None, quant: str | None, offload: Any
) -> Model:
    """A `save`d checkpoint; with a mesh, params are read straight onto their devices where the sharded
    layout is the saved one (no KV-head repetition, vocabulary padding or 4-bit re-packing), else
    placed by `shard`. A flash checkpoint's MLPs come from its bundles: read whole, or offloaded."""
    if quant is not None:
        raise ValueError(f"{path} is a saved checkpoint, loaded as saved: convert it with --quant {quant} instead")
    version = checkpoint.version_dir(path)
    if flash.is_flash(version):
        return _load_flash(path, dtype, backend, mesh, offload)
    if offload is not None:
        raise ValueError(f"offload needs a flash checkpoint; {path} is not one (jaxdecode convert SRC DST --flash)")
    model_size = 1 if mesh is None else mesh.shape[MODEL]
    direct = []  # whether the params were read straight onto the mesh

    def shardings(config: ModelConfig, abstract: Any) -> Any:
        if not weights.layout_is_identity(abstract, config, model_size):
            return None
        parallel.check_config(config, model_size, abstract)
        direct.append(True)
        return jax.tree.map(lambda spec: jax.sharding.NamedSharding(mesh, spec), weights.specs(abstract))

    config, params, tokenizer = checkpoint.load(path, shardings if mesh is not None else None)
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


def _load_flash(path: Path, dtype: str, backend: str, mesh: jax.sharding.Mesh | None, offload: Any) -> Model:
    if dtype != "float32":
        raise ValueError(f"{path} is a float32 flash checkpoint: load it with dtype='float32'")
    if offload is not None and mesh is not None:
        raise ValueError("offload runs on one host device: load without a mesh")
    # Restored straight into device arrays (every file checked against the manifest first): a host copy
    # next to them would double the resident part.
    cpu = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    on_device = None if mesh is not None else (lambda _, abstract: jax.tree.map(lambda _: cpu, abstract))
    config, params, tokenizer = checkpoint.load(path, on_device)
    version = checkpoint.version_dir(path)
    bundles = flash.read_bundles(version, config)
    if offload is None:
        model = Model(config, flash.resident_mlps(version, config, bundles, params), tokenizer, str(path), backend)
        return shard(model, mesh) if mesh is not None else model
    store = flash.FlashStore(version, config, bundles, offload, param_bytes(params))
    return Model(config, store.host_mlps(params), tokenizer, str(path), backend, offload=store)


def save(model: Model, directory: str | os.PathLike[str], flash: bool = False) -> Path:
    """Save `model` (config, tokenizer, float or quantized params) as an Orbax checkpoint in `directory`;
    `load(directory)` restores it bit for bit. An existing checkpoint there is replaced only once the
    new one is complete. See `jaxdecode/checkpoint.py`. `flash=True`: a float32 model's dense MLPs (float32,
    or int8 when loaded with quant="int8") go into per-layer bundle files, for
    `load(directory, offload=Offload(...))` (`jaxdecode/flash.py`)."""
    if flash and jnp.dtype(model.params["embed"].dtype) != jnp.float32:
        raise ValueError("flash checkpoints run in float32: convert with --dtype float32 (and --quant int8 or none)")
    if model.offload is not None:
        raise ValueError(
            "an offloaded model's MLPs are in its flash checkpoint already; load it without offload to save it"
        )
    if model.mesh is not None:
        raise ValueError("save the model as loaded without a mesh (a sharded model holds the mesh's layout)")
    params = jax.tree.map(np.asarray, model.params) if flash else model.params
    return checkpoint.save(model.config, params, model.tokenizer, directory, offload_mlps=flash)


def shard(model: Model, mesh: jax.sharding.Mesh) -> Model:
    """The model with its params split over `mesh` (tensor parallel over `model`, see `parallel.py`).

    Each device receives only its shard, from the host copy (in every process of a multi-host run).
    Raises ValueError naming the numbers when heads, the MLP width or a quantized weight's groups do
    not divide by the mesh.
    """
    if model.mesh is not None:
        raise ValueError("the model is already sharded; shard the unsharded model onto the new mesh")
    model_size = mesh.shape[MODEL]
    parallel.check_config(model.config, model_size, model.params)
    host = jax.tree.map(np.asarray, model.params)
    layout = weights.shard_layout(host, model.config, model_size)
    params = parallel.place(layout, weights.specs(layout), mesh)
    return replace(model, params=params, mesh=mesh, executables={}, derived={})
