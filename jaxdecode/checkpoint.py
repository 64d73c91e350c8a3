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
import re
import shutil
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
import tokenizers

from . import flash
from .config import ModelConfig, RopeScaling
from .io.tokenizer import Tokenizer
from .io.validate import ModelFileError, check_params, inside, read_json, read_text
from .quantize import GGUF_KINDS, QuantizedWeight, is_quantized

FORMAT = "jaxdecode-checkpoint/1"
LATEST = "LATEST"
MANIFEST = "MANIFEST.json"
PARAMS = "params"
QUANT_PARTS = ("values", "scales", "offsets")


class CheckpointError(ModelFileError):
    """A checkpoint that is missing, incomplete or corrupted (the message says which and what to do)."""


_AGAIN = "save or convert it again"
_VERSION_NAME = re.compile(r"v-[\w.-]{1,200}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


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


def _join_quantized(tree: Any, quantized: dict[str, dict[str, Any]], source: Path = Path(PARAMS)) -> Any:
    """The saved tree with each quantized weight's arrays (a dict of `QUANT_PARTS`) made a QuantizedWeight."""
    found: set[str] = set()

    def walk(node: Any, prefix: str) -> Any:
        if prefix in quantized:
            info = quantized[prefix]
            found.add(prefix)
            if not isinstance(node, dict) or not {"values", "scales"} <= set(node) or set(node) - set(QUANT_PARTS):
                raise CheckpointError(source, f"must hold the arrays {', '.join(QUANT_PARTS)}", prefix)
            return QuantizedWeight(
                node["values"], node["scales"], node.get("offsets"), info["kind"], tuple(info["shape"]), info["dtype"]
            )
        if isinstance(node, dict):
            return {k: walk(v, f"{prefix}/{k}" if prefix else k) for k, v in node.items()}
        return node

    joined = walk(tree, "")
    if set(quantized) - found:
        raise CheckpointError(
            source, "is missing (jaxdecode.json lists it as quantized)", sorted(set(quantized) - found)[0]
        )
    return joined


def _config_to_json(config: ModelConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def _tuples(data: dict[str, Any]) -> dict[str, Any]:
    """JSON lists back to the tuples a frozen (hashable) config holds."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}


def _fields_of(kind: type, data: Any, source: Path, field: str) -> dict[str, Any]:
    """`data` as keyword arguments of dataclass `kind`: an object with exactly its fields (the optional
    ones may be left out)."""
    if not isinstance(data, dict):
        raise CheckpointError(source, f"must be an object, found {type(data).__name__}", field)
    names = {f.name for f in dataclasses.fields(kind)}
    required = {f.name for f in dataclasses.fields(kind) if f.default is dataclasses.MISSING}
    unknown, missing = sorted(set(data) - names), sorted(required - set(data))
    if unknown or missing:
        what = f"has the unknown field {unknown[0]!r}" if unknown else f"lacks the field {missing[0]!r}"
        raise CheckpointError(source, f"{what}; {_AGAIN}", field)
    return _tuples(data)


def _config_from_json(data: Any, source: Path = Path("jaxdecode.json")) -> ModelConfig:
    fields = _fields_of(ModelConfig, data, source, "config")
    scaling = fields.get("rope_scaling")
    try:
        if scaling is not None:
            fields["rope_scaling"] = RopeScaling(**_fields_of(RopeScaling, scaling, source, "config.rope_scaling"))
        return ModelConfig(**fields)
    except ValueError as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(source, str(e), "config") from e


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
        raise CheckpointError(directory, "cannot be saved to: it is a file; choose a directory")
    if directory.is_dir() and any(directory.iterdir()) and not is_checkpoint(directory):
        raise CheckpointError(
            directory,
            "cannot be saved to: it is a non-empty directory that is not a jaxdecode checkpoint "
            "(nothing was changed); choose a new or empty directory",
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(directory, f"cannot be written to: {e.strerror or e}") from e


def _new_version(directory: Path) -> Path:
    version = directory / f"v-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    version.mkdir()
    return version


def _commit(directory: Path, version: Path) -> None:
    """Write the manifest of `version`, make it LATEST atomically, remove the other versions."""
    (version / MANIFEST).write_text(json.dumps(_file_digests(version), indent=1))
    _fsync_tree(version)
    pointer = directory / f".{LATEST}.{os.getpid()}"
    pointer.write_text(version.name)
    _fsync(pointer)
    os.replace(pointer, directory / LATEST)  # the commit point
    _fsync(directory)
    for stale in directory.glob("v-*"):  # the previous version and leftovers of interrupted saves
        if stale.name != version.name:
            shutil.rmtree(stale, ignore_errors=True)


def save(
    config: ModelConfig,
    params: Any,
    tokenizer: Tokenizer | None,
    directory: str | os.PathLike[str],
    offload_mlps: bool = False,
) -> Path:
    """Write a checkpoint into `directory` (created, or an existing checkpoint replaced safely).
    `offload_mlps`: the dense MLPs go into flash bundles (`flash.py`), the rest into Orbax.
    Returns the directory of the new version."""
    directory = Path(directory).absolute()
    check_destination(directory)
    if offload_mlps:
        flash.check_convertible(config)
    version = None
    try:
        version = _new_version(directory)
        if offload_mlps:
            params = flash.write_bundles(version, config, params)
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
        _commit(directory, version)
    except BaseException:
        if version is not None:
            shutil.rmtree(version, ignore_errors=True)
        raise
    return version


def add_files(directory: str | os.PathLike[str], files: dict[str, bytes]) -> Path:
    """A new version of the checkpoint in `directory`: its files (hard links where the file system has
    them, else copies) plus `files` (relative name -> contents, replacing any of the same name),
    committed like a save. Returns the new version."""
    directory = Path(directory).absolute()
    old = _verified_version(directory)
    version = _new_version(directory)
    try:
        for path in sorted(p for p in old.rglob("*") if p.is_file() and p.name != MANIFEST):
            target = version / path.relative_to(old)
            target.parent.mkdir(parents=True, exist_ok=True)
            if str(path.relative_to(old)) in files:
                continue
            try:
                os.link(path, target)
            except OSError:
                shutil.copy2(path, target)
        for name, data in files.items():
            target = inside(version, name, version, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        _commit(directory, version)
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)
        raise
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
    """The version LATEST names: one `v-*` directory name (never a path leading elsewhere)."""
    pointer = directory / LATEST
    if not pointer.exists():
        return None
    name = read_text(pointer, max_bytes=4096).strip()
    if not _VERSION_NAME.fullmatch(name):
        raise CheckpointError(pointer, f"names {name[:80]!r}, not a version of this checkpoint (v-...); {_AGAIN}")
    return name


# ------------------------------------------------------------------------------------------------
# Loading.


def _version(directory: Path) -> Path:
    name = _latest_name(directory)
    if name is None:
        raise CheckpointError(
            directory,
            f"holds no complete checkpoint ({LATEST} is missing: a save may have been interrupted); {_AGAIN}",
        )
    version = directory / name
    if not version.is_dir():
        raise CheckpointError(directory / LATEST, f"names {name}, which is not in {directory}; {_AGAIN}")
    return version


def _manifest(version: Path) -> dict[str, dict[str, Any]]:
    """MANIFEST.json: relative file name -> {"size": bytes, "sha256": hex digest}, every entry checked."""
    path = version / MANIFEST
    if not path.is_file():
        raise CheckpointError(version, f"is incomplete (no {MANIFEST}); {_AGAIN}")
    manifest = read_json(path)
    for name, entry in manifest.items():
        inside(version, name, path, name)
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("size"), int)
            and not isinstance(entry.get("size"), bool)
            and entry["size"] >= 0
            and isinstance(entry.get("sha256"), str)
            and _SHA256.fullmatch(entry["sha256"])
        ):
            raise CheckpointError(path, f'must be {{"size": bytes, "sha256": hex digest}}, found {entry!r}', name)
    return manifest


def _verified_version(directory: Path) -> Path:
    """The LATEST version, once every file in it matches the manifest and the manifest covers every file
    in it (so no file that loading reads can be edited, added or removed unnoticed)."""
    version = _version(directory)
    manifest = _manifest(version)
    actual = _file_digests(version)
    actual.pop(MANIFEST, None)
    for required in ("jaxdecode.json", f"{PARAMS}/"):
        if not any(name == required or name.startswith(required) for name in manifest):
            raise CheckpointError(version / MANIFEST, f"does not cover {required}; {_AGAIN}")
    uncovered = sorted(set(actual) - set(manifest))
    if uncovered:
        raise CheckpointError(
            version / uncovered[0], f"is not in {MANIFEST} (added after the save?); remove it, or {_AGAIN}"
        )
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
        raise CheckpointError(version / rel, f"{problem}; the checkpoint is corrupted, {_AGAIN}")
    return version


def _metadata(version: Path) -> dict[str, Any]:
    """jaxdecode.json, with every field checked (the config by `ModelConfig` itself)."""
    path = version / "jaxdecode.json"
    if not path.is_file():
        raise CheckpointError(version, f"is incomplete (no jaxdecode.json); {_AGAIN}")
    meta = read_json(path)
    if meta.get("format") != FORMAT:
        raise CheckpointError(path, f"unknown checkpoint format {meta.get('format')!r} (expected {FORMAT})", "format")
    meta["config"] = _config_from_json(meta.get("config"), path)
    quantized = meta.get("quantized", {})
    if not isinstance(quantized, dict):
        raise CheckpointError(path, "must be an object of parameter path -> quantization", "quantized")
    kinds = ("int8", "int4", *GGUF_KINDS.values())
    for name, info in quantized.items():
        if not (
            isinstance(info, dict)
            and info.get("kind") in kinds
            and info.get("dtype") in ("float32", "bfloat16")
            and isinstance(info.get("shape"), list)
            and len(info["shape"]) in (2, 3)  # [out, in], or stacked experts [E, out, in]
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in info["shape"])
        ):
            raise CheckpointError(
                path, f"must be {{kind, shape [out, in] or [E, out, in], dtype}}, found {info!r}", f"quantized.{name}"
            )
    meta["quantized"] = quantized
    tokenizer = meta.get("tokenizer")
    if tokenizer is not None:
        vocab = meta["config"].vocab_size
        stop_ids = tokenizer.get("stop_ids") if isinstance(tokenizer, dict) else None
        special = tokenizer.get("special_tokens", {}) if isinstance(tokenizer, dict) else None
        template = tokenizer.get("chat_template") if isinstance(tokenizer, dict) else None
        if not (
            isinstance(stop_ids, list)
            and all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < vocab for i in stop_ids)
            and isinstance(special, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in special.items())
            and (template is None or isinstance(template, str))
        ):
            raise CheckpointError(
                path,
                "must hold stop_ids (token ids), special_tokens (name -> text) and a chat_template string",
                "tokenizer",
            )
    return meta


def version_dir(directory: str | os.PathLike[str]) -> Path:
    """The LATEST version's directory (unchecked: `load` checks it)."""
    return _version(Path(directory))


def saved_config(directory: str | os.PathLike[str]) -> ModelConfig:
    """The config of the checkpoint in `directory` (read without checking the files; `load` checks them)."""
    return _metadata(_version(Path(directory)))["config"]


def load(directory: str | os.PathLike[str], shardings: Any = None) -> tuple[ModelConfig, Any, Tokenizer | None]:
    """Restore (config, params, tokenizer) from a checkpoint.

    `shardings`: None (params come back as host NumPy arrays), or a function from (the config, the abstract
    params: quantized weights as `QuantizedWeight`s of shapes) to a tree of `jax.sharding.Sharding` of the same
    structure, or to None (then host arrays as without it): Orbax reads each device's shard straight
    onto it. Every file is checked against the manifest, and every tensor's
    shape against the config, before any array is read."""
    directory = Path(directory)
    version = _verified_version(directory)
    meta = _metadata(version)
    config, quantized = meta["config"], meta["quantized"]
    tokenizer = None
    if "tokenizer" in meta:
        t = meta["tokenizer"]
        text = read_text(version / "tokenizer.json", max_bytes=1 << 30)
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as e:  # noqa: BLE001 - `tokenizers` raises plain Exception for what it cannot read
            raise CheckpointError(version / "tokenizer.json", f"cannot be read by `tokenizers` ({e}); {_AGAIN}") from e
        tokenizer = Tokenizer(
            backend=backend,
            stop_ids=tuple(t["stop_ids"]),
            chat_template=t.get("chat_template"),
            special_tokens=t.get("special_tokens", {}),
            source=str(version / "jaxdecode.json"),
        )
    params_dir = version / PARAMS
    with ocp.StandardCheckpointer() as checkpointer:
        try:
            abstract = checkpointer.metadata(params_dir).item_metadata
            abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), dict(abstract))
        except Exception as e:  # noqa: BLE001 - Orbax / TensorStore raise many types on damaged metadata
            raise CheckpointError(params_dir, f"cannot be read by Orbax ({type(e).__name__}: {e}); {_AGAIN}") from e
        # Saved as the model holds them: float Linear weights [in, out], quantized ones [out, in].
        joined = _join_quantized(abstract, quantized, params_dir)
        check_params(config, joined, params_dir, in_out=True, dense_mlps=not flash.is_flash(version))
        placement = None if shardings is None else shardings(config, joined)
        if placement is None:
            cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
            target = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), abstract)
        else:
            placement = _split_quantized(placement)[0]
            target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, placement)
        try:
            tree = checkpointer.restore(params_dir, target)
        except Exception as e:  # noqa: BLE001 - as above, for the array files
            raise CheckpointError(params_dir, f"cannot be read by Orbax ({type(e).__name__}: {e}); {_AGAIN}") from e
    if placement is None:
        tree = jax.tree.map(np.asarray, tree)
    return config, _join_quantized(tree, quantized, params_dir), tokenizer
