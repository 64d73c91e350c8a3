"""Model files are untrusted input: the one error for a bad model source, and the checks every loader
applies where the data enters.

- `ModelFileError`: a `ValueError` that carries the file and the field or tensor at fault; the CLI prints
  it as one line (exit status 2).
- `read_json`: a bounded read of a JSON object; decoding, syntax, nesting and type problems become
  `ModelFileError`s naming the file.
- `inside`: a file name read from a model file, resolved under the directory it belongs to, or refused.
- `check_params`: every tensor of a loaded parameter tree against the shapes the config implies (from
  the model's own definition, `init_params`), before any weight is used.

Nothing here unpickles; the loaders read only GGUF, safetensors, JSON and Orbax's array files.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

MAX_JSON_BYTES = 64 << 20  # config / index / manifest / metadata files are far smaller
MAX_NAME_BYTES = 255  # one path component (NAME_MAX on Linux and macOS)


class ModelFileError(ValueError):
    """A model file (GGUF, HF directory, checkpoint) that is damaged, inconsistent or unsupported.

    `path`: the file or directory; `field`: the metadata key, config field or tensor at fault (or None).
    The message names both, what was expected and what was found.
    """

    def __init__(self, path: str | os.PathLike[str], problem: str, field: str | None = None):
        self.path, self.field, self.problem = str(path), field, problem
        super().__init__(f"{path}: {field}: {problem}" if field else f"{path}: {problem}")


def read_text(path: Path, max_bytes: int = MAX_JSON_BYTES) -> str:
    """The UTF-8 text of `path` (at most `max_bytes`), or a ModelFileError naming the file."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ModelFileError(path, f"is {size} bytes, more than the {max_bytes} such a file may have")
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ModelFileError(path, f"is not UTF-8 text ({e.reason} at byte {e.start})") from e
    except OSError as e:
        raise ModelFileError(path, f"cannot be read ({e.strerror or e})") from e


def read_json(path: Path, kind: type = dict, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value in `path`, which must be of type `kind` (an object by default)."""
    text = read_text(path, max_bytes)
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ModelFileError(path, f"is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from e
    except RecursionError as e:
        raise ModelFileError(path, "is not valid JSON (nested too deeply)") from e
    if not isinstance(value, kind):
        raise ModelFileError(path, f"must hold a JSON {_json_kind(kind)}, found {_json_kind(type(value))}")
    return value


def _json_kind(kind: type) -> str:
    names = {dict: "object", list: "array", str: "string", int: "integer", float: "number", bool: "boolean"}
    return names.get(kind, "null" if kind is type(None) else kind.__name__)


def inside(directory: Path, name: Any, source: Path, field: str, also: Path | None = None) -> Path:
    """`directory / name` for a relative file name read from `source`, refused (ModelFileError naming
    `source` and `field`) unless it is a string naming a path that stays inside `directory` (resolved:
    a symbolic link may lead only into `directory` or into `also`)."""
    if not isinstance(name, str) or not name:
        raise ModelFileError(source, f"must be a file name, found {name!r}", field)
    if any(len(part.encode()) > MAX_NAME_BYTES for part in Path(name).parts) or len(name) > 1024:
        raise ModelFileError(source, f"names a file whose name is too long ({name[:40]!r}...)", field)
    if Path(name).is_absolute() or ".." in Path(name).parts or "\x00" in name:
        raise ModelFileError(
            source, f"names {name!r}, which is outside {directory}; only files inside it are read", field
        )
    path = directory / name
    target = path.resolve()
    if not any(target.is_relative_to(root.resolve()) for root in (directory, also) if root is not None):
        raise ModelFileError(source, f"names {name!r}, which resolves outside {directory}", field)
    return path


# ------------------------------------------------------------------------------------------------
# Parameter shapes against the config.


@functools.lru_cache(maxsize=16)
def expected_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Parameter path ("layer_0/attn/q/weight") -> shape in the checkpoint layout (Linear weights
    `[out, in]`), from the model's own definition (abstractly: nothing is allocated)."""
    import jax

    from ..model import init_params

    abstract = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    shapes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(abstract):
        name = "/".join(str(p.key) for p in path)
        shapes[name] = tuple(leaf.shape[::-1]) if name.endswith("/weight") else tuple(leaf.shape)
    return shapes


def check_params(
    config: Any,
    params: Any,
    source: str | os.PathLike[str],
    origin: dict[str, str] | None = None,
    in_out: bool = False,
    dense_mlps: bool = True,
) -> None:
    """Every tensor of `params` (arrays, `ShapeDtypeStruct`s or `QuantizedWeight`s; float Linear weights
    `[out, in]` as files store them, or `[in, out]` as the model holds them with `in_out`) present, of the
    shape `config` implies and of a floating-point dtype, and no tensor the config has no use for: a
    ModelFileError naming the first that is not (as `origin` names it: our path -> the file's own name).
    `dense_mlps=False`: the dense MLPs' weights are elsewhere (a flash checkpoint's bundles) and not expected."""
    import jax

    from ..quantize import QuantizedWeight, is_quantized

    origin = origin or {}
    expected = expected_shapes(config)
    if not dense_mlps:
        expected = {name: shape for name, shape in expected.items() if "/mlp/" not in name}
    found = {
        "/".join(str(getattr(p, "key", p)) for p in path): leaf
        for path, leaf in jax.tree_util.tree_leaves_with_path(params, is_leaf=is_quantized)
    }
    dims = (
        f"(vocab_size={config.vocab_size}, d_model={config.d_model}, num_heads={config.num_heads}, "
        f"num_kv_heads={config.num_kv_heads}, head_dim={config.head_dim}, ffn_dim={config.ffn_dim}, "
        f"num_layers={config.num_layers})"
    )
    for name, shape in expected.items():
        if name not in found:
            raise ModelFileError(source, f"is missing; a {config.family} model {dims} needs it", name)
        leaf = found[name]
        actual = tuple(leaf.shape)
        if in_out and name.endswith("/weight") and not isinstance(leaf, QuantizedWeight):
            actual = actual[::-1]
        field = origin.get(name, name)
        if actual != shape:
            raise ModelFileError(
                source, f"has shape {list(actual)}, expected {list(shape)} from the config {dims}", field
            )
        if isinstance(leaf, QuantizedWeight):
            _check_quantized(leaf, source, field)
        elif not (np.issubdtype(leaf.dtype, np.floating) or str(leaf.dtype) == "bfloat16"):
            raise ModelFileError(source, f"has dtype {leaf.dtype}, expected a floating-point type", field)
    extra = sorted(set(found) - set(expected))
    if extra:
        field = origin.get(extra[0], extra[0])
        raise ModelFileError(source, f"is not used by a {config.family} model {dims}; is the config right?", field)


def _check_quantized(weight: Any, source: str | os.PathLike[str], name: str) -> None:
    """The arrays of a quantized weight against its kind and logical shape (see quantize.py)."""
    from ..quantize import GGUF_BLOCK, GGUF_KINDS, GROUP_SIZES

    kinds = ("int8", "int4", *GGUF_KINDS.values())
    if weight.kind not in kinds:
        raise ModelFileError(source, f"has quantization kind {weight.kind!r}; known: {', '.join(kinds)}", name)
    *stack, out, columns = weight.shape
    values, scales, offsets = weight.values, weight.scales, weight.offsets
    value_dtype = "int8" if weight.kind in ("int8", "q8_0") else "uint8"
    problems = []
    if stack:  # stacked experts: int8, one scale per expert and row
        expected = (*weight.shape[:-1], 1)
        if weight.kind != "int8" or str(values.dtype) != "int8" or tuple(values.shape) != tuple(weight.shape):
            found = f"{values.dtype}{list(values.shape)}"
            problems.append(f"stacked {weight.kind} values {found} (expected int8 {list(weight.shape)})")
        elif tuple(scales.shape) != expected or offsets is not None:
            problems.append(f"scales {list(scales.shape)} (expected {list(expected)}, no offsets)")
    elif str(values.dtype) != value_dtype or len(values.shape) != 2 or values.shape[0] != out:
        problems.append(f"values {values.dtype}{list(values.shape)} (expected {value_dtype} with {out} rows)")
    elif len(scales.shape) != 2 or scales.shape[0] != out or not 1 <= scales.shape[1] <= values.shape[1] * 2:
        problems.append(f"scales {list(scales.shape)} for values {list(values.shape)}")
    else:
        padded = values.shape[1] * (2 if weight.four_bit else 1)
        group = padded // scales.shape[1]
        allowed = (
            (GGUF_BLOCK,)
            if weight.kind in GGUF_KINDS.values()
            else ((padded,) if weight.kind == "int8" else GROUP_SIZES)
        )
        if padded < columns or padded % scales.shape[1] or group not in allowed:
            problems.append(f"{padded} stored columns in groups of {padded / scales.shape[1]:g} for {columns} columns")
        needs_offsets = weight.kind in ("int4", "q4_1")
        if needs_offsets != (offsets is not None) or (
            offsets is not None and tuple(offsets.shape) != tuple(scales.shape)
        ):
            problems.append("offsets " + ("missing" if offsets is None else f"{list(offsets.shape)}"))
    if problems:
        raise ModelFileError(source, f"is an inconsistent {weight.kind} weight: {problems[0]}", name)
