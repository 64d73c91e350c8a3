"""Checkpoints: a model (config, tokenizer, float or quantized params) saved with Orbax and restored,
optionally straight onto the devices of a mesh.

Layout of a checkpoint directory:

    DIR/LATEST              the name of the complete version (replaced atomically, written last)
    DIR/v-<time>-<pid>/     one version: jaxdecode.json (format, config, quantized weights),
                            tokenizer.json, params/ (Orbax), MANIFEST.json (size + sha256 of every file)

Saving writes a new version next to the old one, then switches LATEST with one atomic rename, then
removes the old version: an interrupted save leaves the previous checkpoint loadable, and a version
is used only once its manifest and LATEST exist. Loading checks every file against the manifest
first, so a truncated or corrupted checkpoint is refused with a clear error instead of producing
wrong weights. Nothing here unpickles: JSON, `tokenizers` JSON and Orbax's array files only.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tokenizers

from .config import ModelConfig, RopeScaling
from .io.tokenizer import Tokenizer
from .quantize import QuantizedWeight, is_quantized

FORMAT = "jaxdecode-checkpoint/1"
LATEST = "LATEST"
MANIFEST = "MANIFEST.json"
PARAMS = "params"
QUANT_PARTS = ("values", "scales", "offsets")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or corrupted (the message says which and what to do)."""


def is_checkpoint(path: Path) -> bool:
    """A checkpoint directory, complete or not (a first save that was interrupted leaves only `v-*`)."""
    return path.is_dir() and ((path / LATEST).exists() or any(p.is_dir() for p in path.glob("v-*")))


# ------------------------------------------------------------------------------------------------
# Params <-> a tree of plain arrays plus a JSON description of the quantized weights.


def _key(path) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def _split_quantized(params: Any) -> tuple[Any, dict[str, dict[str, Any]]]:
    """Quantized weights become dicts of their arrays; their static fields go to a JSON-able dict."""
    quantized: dict[str, dict[str, Any]] = {}

    def plain(path, leaf):
        if not is_quantized(leaf):
            return leaf
        quantized[_key(path)] = {"kind": leaf.kind, "shape": list(leaf.shape), "dtype": leaf.dtype}
        return {p: getattr(leaf, p) for p in QUANT_PARTS if getattr(leaf, p) is not None}

    return jax.tree_util.tree_map_with_path(plain, params, is_leaf=is_quantized), quantized


def _join_quantized(tree: Any, quantized: dict[str, dict[str, Any]]) -> Any:
    def walk(node: Any, prefix: str) -> Any:
        if prefix in quantized:
            info = quantized[prefix]
            return QuantizedWeight(
                node["values"], node["scales"], node.get("offsets"), info["kind"], tuple(info["shape"]), info["dtype"]
            )
        if isinstance(node, dict):
            return {k: walk(v, f"{prefix}/{k}" if prefix else k) for k, v in node.items()}
        return node

    return walk(tree, "")


def _config_to_json(config: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _tuples(data: dict[str, Any]) -> dict[str, Any]:
    """JSON lists back to the tuples a frozen (hashable) config holds."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def _config_from_json(data: dict[str, Any]) -> ModelConfig:
    scaling = data.get("rope_scaling")
    return ModelConfig(**{**_tuples(data), "rope_scaling": RopeScaling(**_tuples(scaling)) if scaling else None})


# ------------------------------------------------------------------------------------------------
# Saving.


def _file_digests(root: Path) -> dict[str, dict[str, Any]]:
    digests = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        digests[str(path.relative_to(root))] = {"size": path.stat().st_size, "sha256": h.hexdigest()}
    return digests


def check_destination(directory: Path) -> None:
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"cannot save to {directory}: it is a file; choose a directory")
    if directory.is_dir() and any(directory.iterdir()) and not is_checkpoint(directory):
        raise CheckpointError(
            f"cannot save to {directory}: it is a non-empty directory that is not a jaxdecode checkpoint "
            "(nothing was changed); choose a new or empty directory"
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"cannot write to {directory}: {e.strerror or e}") from e


def save(config: ModelConfig, params: Any, tokenizer: Tokenizer | None, directory: str | os.PathLike[str]) -> Path:
    """Write a checkpoint into `directory` (created, or an existing checkpoint replaced safely).
    Returns the directory of the new version."""
    directory = Path(directory).absolute()
    check_destination(directory)
    version = directory / f"v-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    try:
        version.mkdir()
        tree, quantized = _split_quantized(params)
        tree = jax.tree.map(np.asarray, tree)
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(version / PARAMS, tree)
            checkpointer.wait_until_finished()
        meta = {"format": FORMAT, "config": _config_to_json(config), "quantized": quantized}
        if tokenizer is not None:
            (version / "tokenizer.json").write_text(tokenizer.backend.to_str())
            meta["tokenizer"] = {
                "stop_ids": list(tokenizer.stop_ids),
                "chat_template": tokenizer.chat_template,
                "special_tokens": tokenizer.special_tokens,
            }
        (version / "jaxdecode.json").write_text(json.dumps(meta, indent=1))
        (version / MANIFEST).write_text(json.dumps(_file_digests(version), indent=1))
        _fsync_tree(version)
        pointer = directory / f".{LATEST}.{os.getpid()}"
        pointer.write_text(version.name)
        _fsync(pointer)
        os.replace(pointer, directory / LATEST)  # the commit point
        _fsync(directory)
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)
        raise
    for stale in directory.glob("v-*"):  # the previous version and leftovers of interrupted saves
        if stale.name != version.name:
            shutil.rmtree(stale, ignore_errors=True)
    return version


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for path in [*root.rglob("*"), root]:
        _fsync(path)


def _latest_name(directory: Path) -> str | None:
    pointer = directory / LATEST
    return pointer.read_text().strip() if pointer.exists() else None


# ------------------------------------------------------------------------------------------------
# Loading.


def _version(directory: Path) -> Path:
    name = _latest_name(directory)
    if name is None:
        raise CheckpointError(
            f"{directory} holds no complete checkpoint ({LATEST} is missing: a save may have been interrupted); "
            "save or convert it again"
        )
    return directory / name


def _verified_version(directory: Path) -> Path:
    version = _version(directory)
    name = version.name
    manifest_path = version / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(f"{directory}: version {name} is incomplete (no {MANIFEST}); save or convert it again")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{directory}: {MANIFEST} is corrupted ({e}); save or convert it again") from e
    actual = _file_digests(version)
    actual.pop(MANIFEST, None)
    for rel, expected in manifest.items():
        found = actual.get(rel)
        if found is None:
            problem = "is missing"
        elif found["size"] != expected["size"]:
            problem = f"has {found['size']} bytes, expected {expected['size']} (truncated?)"
        elif found["sha256"] != expected["sha256"]:
            problem = "does not match its checksum"
        else:
            continue
        raise CheckpointError(f"checkpoint {directory} is corrupted: {rel} {problem}; save or convert it again")
    return version


def _metadata(version: Path) -> dict[str, Any]:
    meta = json.loads((version / "jaxdecode.json").read_text())
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{version}: unknown checkpoint format {meta.get('format')!r} (expected {FORMAT})")
    return meta


def saved_config(directory: str | os.PathLike[str]) -> ModelConfig:
    """The config of the checkpoint in `directory` (read without checking the files; `load` checks them)."""
    version = _version(Path(directory))
    if not (version / "jaxdecode.json").is_file():
        raise CheckpointError(f"{directory}: version {version.name} is incomplete; save or convert it again")
    return _config_from_json(_metadata(version)["config"])


def load(directory: str | os.PathLike[str], shardings: Any = None) -> tuple[ModelConfig, Any, Tokenizer | None]:
    """Restore (config, params, tokenizer) from a checkpoint.

    `shardings`: None (params come back as host NumPy arrays), or a function from the abstract params
    (quantized weights as dicts of their arrays) to a tree of `jax.sharding.Sharding`: Orbax then reads
    each device's shard straight onto it."""
    directory = Path(directory)
    version = _verified_version(directory)
    meta = _metadata(version)
    config = _config_from_json(meta["config"])
    quantized = meta["quantized"]
    with ocp.StandardCheckpointer() as checkpointer:
        abstract = checkpointer.metadata(version / PARAMS).item_metadata
        abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), dict(abstract))
        if shardings is None:
            cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
            target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), abstract)
        else:
            target = jax.tree.map(
                lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings(abstract)
            )
        tree = checkpointer.restore(version / PARAMS, target)
    if shardings is None:
        tree = jax.tree.map(np.asarray, tree)
    tokenizer = None
    if "tokenizer" in meta:
        t = meta["tokenizer"]
        tokenizer = Tokenizer(
            backend=tokenizers.Tokenizer.from_str((version / "tokenizer.json").read_text()),
            stop_ids=tuple(t["stop_ids"]),
            chat_template=t["chat_template"],
            special_tokens=t["special_tokens"],
        )
    return config, _join_quantized(tree, quantized), tokenizer
