"""Fuzzing the model-file boundaries: mutants of the real GGUF file (SmolLM2-135M), of a tiny HF directory
and of a saved checkpoint, each loaded under a per-case timeout in a worker process with an address-space
limit.

    python tests/fuzz.py {gguf,hf,checkpoint} COUNT SEED [--keep DIR] [--part I/N]

prints one JSON report: the count of each outcome and a few examples of each. `--keep DIR` copies a few
refused mutants there (for the CLI test). Outcomes:

- refused: our `ModelFileError`, naming the file (the only acceptable failure);
- ok: loaded, and the model is structurally sound (`jax.eval_shape` of a forward pass with the loaded
  params gives `[1, 4, vocab]` logits; the tokenizer encodes; the chat template renders or is refused
  with our error);
- escaped: any other exception; unclear: a ModelFileError-less ValueError/OSError (the classes of the code
  before the validation layer); hang: over the per-case timeout twice (a case over it once is run again
  under three times the limit: a loaded 2-core machine stalls a 0.1 s case now and then, which CI saw
  once in ~20 runs; the stalls are listed in the report); memory: MemoryError under the limit;
  outside: a mutant that names a file outside the model's directory (an index entry or LATEST leading to
  a valid model next to it) loaded; broken: loaded, but the forward pass cannot run on it.

GGUF mutants are checked with `jaxdecode.io.gguf.open_model` (everything `load` validates: header, tensor
table, config, tensor shapes, tokenizer) and, when that accepts one whose structure (config and tensor
table) differs from the original file's, with a full `jd.load(..., quant="native")` too: data regions are
not re-read for mutants that only changed metadata the structure does not depend on.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

CASE_TIMEOUT_S = 20.0
ADDRESS_SPACE_HEADROOM = 6 << 30  # bytes of address space a case may add to the worker's
HUGE = (2**63 - 1, 2**64 - 1, 2**40, 2**32 + 1, 2**31)


class _Timeout(BaseException):
    pass


def _on_alarm(signum, frame):
    raise _Timeout()


# ------------------------------------------------------------------------------------------------
# The oracle shared by every kind.


_sound_cache: dict = {}


def _structurally_sound(model) -> str | None:
    """None if a forward pass can run on the loaded model (checked abstractly), else why not."""
    import jax
    import jax.numpy as jnp

    import jaxdecode as jd

    shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), model.params)
    key = (model.config, str(shapes))
    if key not in _sound_cache:
        tokens = jnp.zeros((1, 4), jnp.int32)
        try:
            out = jax.eval_shape(lambda p: jd.apply(p, model.config, tokens, tokens)[0], model.params)
            expected = (1, 4, model.config.vocab_size)
            _sound_cache[key] = None if out.shape == expected else f"logits {out.shape}, expected {expected}"
        except Exception as e:  # noqa: BLE001 - any failure here is the finding
            _sound_cache[key] = f"{type(e).__name__}: {str(e)[:300]}"
    return _sound_cache[key]


def _check_tokenizer(tokenizer, vocab_size: int) -> None:
    """Encode, decode and render the chat template as the CLI would (errors: ours or the finding)."""
    if tokenizer is None:
        return
    ids = tokenizer.encode("Hello world, 12 apples.")
    if any(not 0 <= i < vocab_size for i in ids):
        raise AssertionError(f"tokenizer gives ids outside the vocabulary: {ids}")
    tokenizer.decode(ids)
    assert all(0 <= s < vocab_size for s in tokenizer.stop_ids), tokenizer.stop_ids
    if tokenizer.chat_template:
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def _ours(error: BaseException) -> bool:
    from jaxdecode.io import validate

    return isinstance(error, validate.ModelFileError) and bool(error.path)


def _classify(run, names_outside: bool) -> tuple[str, str, bool]:
    """Run one case; (outcome, detail, stalled). A case over the timeout runs once more under three times
    it: a hang is what does not finish twice; one that then finishes is `stalled`."""
    outcome, detail = _classify_once(run, names_outside, CASE_TIMEOUT_S)
    if outcome != "hang":
        return outcome, detail, False
    outcome, detail = _classify_once(run, names_outside, 3 * CASE_TIMEOUT_S)
    return outcome, detail, outcome != "hang"


def _classify_once(run, names_outside: bool, limit: float) -> tuple[str, str]:
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        problem = run()
        outcome = ("outside" if names_outside else "ok") if problem is None else "broken"
        return outcome, problem or ""
    except _Timeout:
        return "hang", f"over {limit} s"
    except MemoryError as e:
        return "memory", str(e)[:200]
    except Exception as e:  # noqa: BLE001 - the classification is the point
        message = f"{type(e).__name__}: {str(e)[:300]}"
        if _ours(e):
            return "refused", message
        if isinstance(e, (ValueError, OSError)):
            return "unclear", message
        return "escaped", message
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)


# ------------------------------------------------------------------------------------------------
# GGUF: the header's layout, for targeted mutations.


def _gguf_layout(data: bytes) -> dict:
    """Offsets of the header's fields: counts, every metadata entry's type / length / count / value,
    every tensor's dims, type and offset."""
    pos = 24
    kvs, tensors = [], []

    def u32(at):
        return struct.unpack_from("<I", data, at)[0]

    def u64(at):
        return struct.unpack_from("<Q", data, at)[0]

    sizes = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    tensor_count, kv_count = u64(8), u64(16)
    for _ in range(kv_count):
        key_len = u64(pos)
        key = data[pos + 8 : pos + 8 + key_len].decode()
        type_at = pos + 8 + key_len
        kind = u32(type_at)
        entry = {"key": key, "key_len_at": pos, "type_at": type_at, "type": kind, "value_at": type_at + 4}
        pos = type_at + 4
        if kind == 8:
            entry["len_at"] = pos
            pos += 8 + u64(pos)
        elif kind == 9:
            item, count = u32(pos), u64(pos + 4)
            entry.update(item=item, count_at=pos + 4, items_at=pos + 12, count=count)
            pos += 12
            if item == 8:
                entry["item_len_ats"] = []
                for _ in range(count):
                    entry["item_len_ats"].append(pos)
                    pos += 8 + u64(pos)
            else:
                pos += sizes[item] * count
        else:
            entry["size"] = sizes[kind]
            pos += sizes[kind]
        kvs.append(entry)
    for _ in range(tensor_count):
        name_len = u64(pos)
        name = data[pos + 8 : pos + 8 + name_len].decode()
        pos += 8 + name_len
        n_dims = u32(pos)
        entry = {"name": name, "ndims_at": pos, "dims_at": [pos + 4 + 8 * i for i in range(n_dims)]}
        pos += 4 + 8 * n_dims
        entry.update(type_at=pos, offset_at=pos + 4, offset=u64(pos + 4))
        pos += 12
        tensors.append(entry)
    return {"kvs": kvs, "tensors": tensors, "header_end": pos}


def _gguf_mutants(data: bytes, layout: dict, arch: str, rng: random.Random):
    """Yields (description, patches [(offset, bytes)] or None, length to truncate to or None)."""
    kvs, tensors, header_end = layout["kvs"], layout["tensors"], layout["header_end"]
    by_key = {e["key"]: e for e in kvs}
    ndims_ats = {t["ndims_at"] for t in tensors}
    numeric = [e for e in kvs if e["type"] in (4, 5, 10, 11, 6, 12) and e["key"].startswith((arch, "tokenizer"))]
    structural = [8, 16] + [e["type_at"] for e in kvs] + [e["key_len_at"] for e in kvs]
    structural += [e.get("len_at", e.get("count_at", e["type_at"])) for e in kvs]
    structural += [t["ndims_at"] for t in tensors] + [t["type_at"] for t in tensors] + [t["offset_at"] for t in tensors]
    structural += [d for t in tensors for d in t["dims_at"]]
    lengths = (
        [8, 16]
        + [e["key_len_at"] for e in kvs]
        + [e.get("len_at", e.get("count_at")) for e in kvs if e["type"] in (8, 9)]
    )
    lengths += [a for e in kvs for a in e.get("item_len_ats", [])[:50]]
    lengths += [t["ndims_at"] for t in tensors]

    def flip(at: int) -> tuple[int, bytes]:
        return at, bytes([data[at] ^ (1 << rng.randrange(8))])

    def u64(at: int, value: int) -> tuple[int, bytes]:
        return at, struct.pack("<Q", value % 2**64)

    def number(entry: dict, value) -> tuple[int, bytes]:
        fmt = {4: "<I", 5: "<i", 10: "<Q", 11: "<q", 6: "<f", 12: "<d"}[entry["type"]]
        if fmt in ("<f", "<d"):
            return entry["value_at"], struct.pack(fmt, float(value))
        bits = struct.calcsize(fmt) * 8
        value = int(value) % 2**bits
        if fmt in ("<i", "<q") and value >= 2 ** (bits - 1):
            value -= 2**bits
        return entry["value_at"], struct.pack(fmt, value)

    kinds = [
        "bitflip-header",
        "bitflip-structural",
        "truncate",
        "huge-count",
        "bad-offset",
        "wrong-type",
        "value-edit",
        "dims-edit",
        "tokenizer",
        "data-flip",
    ]
    while True:
        kind = rng.choice(kinds)
        if kind == "bitflip-header":
            spots = [rng.randrange(header_end) for _ in range(rng.randint(1, 4))]
            yield f"{kind} at {spots}", [flip(s) for s in spots], None
        elif kind == "bitflip-structural":
            at = rng.choice(structural) + rng.randrange(4)
            yield f"{kind} at {at}", [flip(at)], None
        elif kind == "truncate":
            cut = rng.randrange(header_end + 64) if rng.random() < 0.7 else rng.randrange(len(data))
            yield f"{kind} to {cut} bytes", None, cut
        elif kind == "huge-count":
            at, value = rng.choice(lengths), rng.choice(HUGE + (len(data), len(data) // 8))
            if at in ndims_ats:
                yield f"{kind}: n_dims at {at} := {value % 2**32}", [(at, struct.pack("<I", value % 2**32))], None
            else:
                yield f"{kind}: length at {at} := {value}", [u64(at, value)], None
        elif kind == "bad-offset":
            t = rng.choice(tensors)
            other = rng.choice(tensors)
            value = rng.choice([t["offset"] + 1, t["offset"] + 16, len(data), other["offset"], 2**63, 2**64 - 32])
            yield f"{kind}: {t['name']} offset := {value}", [u64(t["offset_at"], value)], None
        elif kind == "wrong-type":
            e = rng.choice(kvs)
            new = rng.choice([0, 1, 2, 4, 5, 6, 7, 8, 9, 10, 12, 13, 255, 2**31])
            yield f"{kind}: {e['key']} type := {new}", [(e["type_at"], struct.pack("<I", new))], None
        elif kind == "value-edit":
            e = rng.choice(numeric)
            if e["type"] in (6, 12):
                value = rng.choice([0.0, -1.0, float("nan"), float("inf"), 1e-30, 1e30])
            else:
                current = struct.unpack_from({4: "<I", 5: "<i", 10: "<Q", 11: "<q"}[e["type"]], data, e["value_at"])[0]
                value = rng.choice([0, 1, 3, 7, -1, 2**31, 2**32 - 1, current + 1, current * 2, current - 1])
            yield f"{kind}: {e['key']} := {value}", [number(e, value)], None
        elif kind == "dims-edit":
            t = rng.choice(tensors)
            i = rng.randrange(len(t["dims_at"]))
            current = struct.unpack_from("<Q", data, t["dims_at"][i])[0]
            value = rng.choice([0, 1, current * 2, current // 2, current + 32, 2**40])
            yield f"{kind}: {t['name']} dim {i} := {value}", [u64(t["dims_at"][i], value)], None
        elif kind == "tokenizer":
            tokens = by_key["tokenizer.ggml.tokens"]
            merges = by_key.get("tokenizer.ggml.merges")
            choice = rng.randrange(4)
            if choice == 0:  # a token that is not UTF-8
                at = rng.choice(tokens["item_len_ats"])
                if struct.unpack_from("<Q", data, at)[0] == 0:
                    continue
                yield f"{kind}: token at {at} not UTF-8", [(at + 8, b"\xff")], None
            elif choice == 1 and merges:  # a merge without its space
                at = rng.choice(merges["item_len_ats"])
                text = data[at + 8 : at + 8 + struct.unpack_from("<Q", data, at)[0]]
                if b" " not in text:
                    continue
                yield f"{kind}: merge {text!r} without a space", [(at + 8 + text.index(b" "), b"x")], None
            elif choice == 2:  # the tokenizer model's name
                e = by_key["tokenizer.ggml.model"]
                yield f"{kind}: tokenizer.ggml.model renamed", [(e["value_at"] + 8, b"X")], None
            else:  # a count of tokens that disagrees with the vocabulary size
                yield f"{kind}: token count - 1", [u64(tokens["count_at"], tokens["count"] - 1)], None
        else:  # data-flip: GGUF has no checksums; these may load
            spots = [rng.randrange(header_end + 64, len(data)) for _ in range(3)]
            yield f"{kind} at {spots}", [flip(s) for s in spots], None


def _fuzz_gguf(count: int, rng: random.Random, work: Path, mine):
    import jaxdecode as jd
    from jaxdecode.io import gguf as gguf_io
    from jaxdecode.io.sources import embedded_model_path

    original = embedded_model_path("smollm2-135m")
    data = original.read_bytes()
    layout = _gguf_layout(data)
    target = work / "model.gguf"
    shutil.copyfile(original, target)

    def signature(opened):
        table = {n: (t.tensor_type, t.shape, t.offset) for n, t in opened.file.tensors.items()}
        return opened.config, str(sorted(table.items()))

    opened = gguf_io.open_model(original)
    reference = signature(opened)
    mutants = _gguf_mutants(data, layout, opened.file.architecture, rng)
    for i in range(count):
        description, patches, cut = next(mutants)
        if not mine(i):
            continue
        path = target
        if cut is not None:
            path = work / "cut.gguf"
            with open(path, "wb") as f:
                f.write(data[:cut])
        else:
            with open(target, "r+b") as f:
                for at, new in patches:
                    f.seek(at)
                    f.write(new)

        def run(path=path):
            opened = gguf_io.open_model(path)
            if signature(opened) == reference:
                _check_tokenizer(opened.tokenizer, opened.config.vocab_size)
                return None
            model = jd.load(path, quant="native")
            _check_tokenizer(model.tokenizer, model.config.vocab_size)
            return _structurally_sound(model)

        yield description, _classify(run, False), path
        if cut is None:
            with open(target, "r+b") as f:
                for at, new in patches:
                    f.seek(at)
                    f.write(data[at : at + len(new)])


# ------------------------------------------------------------------------------------------------
# HF directories: a tiny Llama with a BPE tokenizer and a chat template, in two safetensors shards.

TINY_HF_CONFIG = {
    "model_type": "llama",
    "vocab_size": 64,
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 48,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "eos_token_id": 2,
}


def _tiny_tokenizer_json() -> str:
    import tokenizers
    from tokenizers import models, pre_tokenizers, trainers

    tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=64, special_tokens=["<unk>", "<s>", "</s>"])
    tokenizer.train_from_iterator(["hello world apples and oranges 12 34 " * 4], trainer)
    return tokenizer.to_str()


def make_hf_dir(directory: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the tiny HF directory; returns its tensors by HF name."""
    from safetensors.numpy import save_file

    directory.mkdir(parents=True, exist_ok=True)
    c = TINY_HF_CONFIG
    d, f, hd = c["hidden_size"], c["intermediate_size"], c["hidden_size"] // c["num_attention_heads"]
    rng = np.random.default_rng(seed)
    tensors = {
        "model.embed_tokens.weight": (c["vocab_size"], d),
        "model.norm.weight": (d,),
        "lm_head.weight": (c["vocab_size"], d),
    }
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        tensors.update(
            {
                p + "self_attn.q_proj.weight": (c["num_attention_heads"] * hd, d),
                p + "self_attn.k_proj.weight": (c["num_key_value_heads"] * hd, d),
                p + "self_attn.v_proj.weight": (c["num_key_value_heads"] * hd, d),
                p + "self_attn.o_proj.weight": (d, c["num_attention_heads"] * hd),
                p + "mlp.gate_proj.weight": (f, d),
                p + "mlp.up_proj.weight": (f, d),
                p + "mlp.down_proj.weight": (d, f),
                p + "input_layernorm.weight": (d,),
                p + "post_attention_layernorm.weight": (d,),
            }
        )
    arrays = {k: rng.normal(0, 0.5, s).astype(np.float32) for k, s in tensors.items()}
    names = sorted(arrays)
    shards = {
        "model-00001-of-00002.safetensors": names[: len(names) // 2],
        "model-00002-of-00002.safetensors": names[len(names) // 2 :],
    }
    for file, keys in shards.items():
        save_file({k: arrays[k] for k in keys}, str(directory / file))
    index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    (directory / "config.json").write_text(json.dumps(c))
    (directory / "tokenizer.json").write_text(_tiny_tokenizer_json())
    template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"chat_template": template, "eos_token": "</s>", "bos_token": {"content": "<s>"}})
    )
    return arrays


_WRONG_VALUES = ("abc", None, True, False, [], {}, -1, 0, 2**40, 1.5, float("nan"), "no", [1, 2])


def _json_bytes(value) -> bytes:
    return json.dumps(value).encode()


def _hf_mutants(directory: Path, outside: Path, rng: random.Random):
    """Yields (description, {relative file: new bytes or None (delete)}, names_outside)."""
    config = json.loads((directory / "config.json").read_text())
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    files = sorted(p.name for p in directory.iterdir())
    kinds = [
        "config-field",
        "config-shape",
        "config-whole",
        "safetensors",
        "index",
        "tokenizer",
        "template",
        "delete",
        "tensors",
        "bitflip",
    ]
    while True:
        kind = rng.choice(kinds)
        if kind == "config-field":
            key = rng.choice(
                sorted(config) + ["head_dim", "rope_scaling", "sliding_window", "rope_parameters", "layer_types"]
            )
            mutated = dict(config)
            if rng.random() < 0.25 and key in mutated:
                del mutated[key]
                yield f"config: {key} deleted", {"config.json": _json_bytes(mutated)}, False
            else:
                mutated[key] = rng.choice(
                    _WRONG_VALUES
                    + (
                        {"rope_type": "linear"},
                        {"rope_type": "llama3", "factor": "x"},
                        {"rope_type": "longrope", "short_factor": [1.0]},
                    )
                )
                yield f"config: {key} := {mutated[key]!r}", {"config.json": _json_bytes(mutated)}, False
        elif kind == "config-shape":  # consistent JSON, inconsistent with the weights
            key = rng.choice(
                [
                    "vocab_size",
                    "hidden_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "intermediate_size",
                    "head_dim",
                ]
            )
            value = rng.choice([1, 3, 8, 16, 63, 65, 128, 5])
            yield f"config: {key} := {value}", {"config.json": _json_bytes({**config, key: value})}, False
        elif kind == "config-whole":
            raw = json.dumps(config).encode()
            choice = rng.choice(["list", "string", "truncated", "utf8", "nested", "empty", "nan"])
            new = {
                "list": b"[1, 2]",
                "string": b'"llama"',
                "truncated": raw[: rng.randrange(len(raw))],
                "utf8": raw.replace(b"llama", b"ll\xffma"),
                "nested": b"[" * 100000 + b"]" * 100000,
                "empty": b"",
                "nan": raw.replace(b"1e-05", b"NaN"),
            }[choice]
            yield f"config.json: {choice}", {"config.json": new}, False
        elif kind == "safetensors":
            shard = rng.choice(shards)
            raw = (directory / shard).read_bytes()
            header_len = struct.unpack_from("<Q", raw)[0]
            choice = rng.choice(["truncate", "header-len", "header-flip", "dtype", "shape", "offsets", "huge-len"])
            if choice == "truncate":
                new = raw[: rng.randrange(len(raw))]
            elif choice == "header-len":
                new = struct.pack("<Q", header_len + rng.choice([-3, 1, 100])) + raw[8:]
            elif choice == "huge-len":
                new = struct.pack("<Q", rng.choice(HUGE)) + raw[8:]
            elif choice == "header-flip":
                at = rng.randrange(8, 8 + header_len)
                new = raw[:at] + bytes([raw[at] ^ (1 << rng.randrange(8))]) + raw[at + 1 :]
            else:
                header = json.loads(raw[8 : 8 + header_len])
                name = rng.choice([k for k in header if k != "__metadata__"])
                if choice == "dtype":
                    header[name]["dtype"] = rng.choice(["F8", "XX", "I32", "BOOL", "F64"])
                elif choice == "shape":
                    header[name]["shape"] = rng.choice([[], [0], [3, 5], [2**40, 2], header[name]["shape"][::-1]])
                else:
                    header[name]["data_offsets"] = rng.choice([[0, 2**40], [5, 3], [-1, 4], [0, 1]])
                body = json.dumps(header).encode()
                new = struct.pack("<Q", len(body)) + body + raw[8 + header_len :]
            yield f"{shard}: {choice}", {shard: new}, False
        elif kind == "index":
            choice = rng.choice(
                ["parent", "absolute", "missing", "long", "not-dict", "no-map", "list-entry", "nested-outside"]
            )
            mutated = copy.deepcopy(index)
            name = rng.choice(sorted(mutated["weight_map"]))
            shard_outside = outside / shards[0]
            if choice == "parent":
                mutated["weight_map"][name] = f"../{outside.name}/{shards[0]}"
            elif choice == "absolute":
                mutated["weight_map"][name] = str(shard_outside)
            elif choice == "nested-outside":
                mutated["weight_map"][name] = f"sub/../../{outside.name}/{shards[0]}"
            elif choice == "missing":
                mutated["weight_map"][name] = "model-00009-of-00009.safetensors"
            elif choice == "long":
                mutated["weight_map"][name] = "x" * 300 + ".safetensors"
            elif choice == "not-dict":
                mutated["weight_map"] = ["a"]
            elif choice == "no-map":
                del mutated["weight_map"]
            else:
                mutated["weight_map"][name] = [shards[0]]
            outside_named = choice in ("parent", "absolute", "nested-outside")
            yield f"index: {choice}", {"model.safetensors.index.json": _json_bytes(mutated)}, outside_named
        elif kind == "tokenizer":
            raw = (directory / "tokenizer.json").read_bytes()
            choice = rng.choice(["truncate", "flip", "vocab-id", "not-json", "model-type"])
            if choice == "truncate":
                new = raw[: rng.randrange(len(raw))]
            elif choice == "flip":
                at = rng.randrange(len(raw))
                new = raw[:at] + bytes([raw[at] ^ (1 << rng.randrange(8))]) + raw[at + 1 :]
            elif choice == "not-json":
                new = b"\xff\xfe not json"
            else:
                tok = json.loads(raw)
                if choice == "vocab-id":
                    key = rng.choice(sorted(tok["model"]["vocab"]))
                    tok["model"]["vocab"][key] = rng.choice([2**31, 10**6, -1, 64, 100])
                else:
                    tok["model"]["type"] = "Nonsense"
                new = _json_bytes(tok)
            yield f"tokenizer.json: {choice}", {"tokenizer.json": new}, False
        elif kind == "template":
            template = rng.choice(
                [
                    "{{ foo.bar.baz }}",
                    "{{ raise_exception('roles must alternate') }}",
                    "{% if %}",
                    123,
                    ["x"],
                    "{% for m in messages %}{% if loop.index0 % 2 == 0 and m['role'] != 'user' %}"
                    "{{ raise_exception('x') }}{% endif %}{% endfor %}",
                    "{{ messages[5]['content'] }}",
                    "{{ ''.__class__.__mro__ }}",
                    "{% for i in range(10**9) %}x{% endfor %}",
                ]
            )
            eos = rng.choice(["</s>", {"content": 5}, 17, None, {"no": "content"}])
            meta = {"chat_template": template, "eos_token": eos}
            yield (
                f"tokenizer_config: template {str(template)[:40]!r}, eos {eos!r}",
                {"tokenizer_config.json": _json_bytes(meta)},
                False,
            )
        elif kind == "delete":
            name = rng.choice(files)
            yield f"delete {name}", {name: None}, False
        elif kind == "tensors":
            from safetensors.numpy import load_file, save_file

            shard = rng.choice(shards)
            arrays = load_file(str(directory / shard))
            name = rng.choice(sorted(arrays))
            choice = rng.choice(["shape", "missing", "extra", "int", "scalar"])
            if choice == "shape":
                a = arrays[name]
                arrays[name] = np.zeros(a.shape[::-1] if a.ndim == 2 else (a.shape[0] + 1,), np.float32)
            elif choice == "missing":
                del arrays[name]
            elif choice == "extra":
                arrays["model.layers.7.mlp.up_proj.weight"] = np.zeros((48, 32), np.float32)
            elif choice == "int":
                arrays[name] = arrays[name].astype(np.int32)
            else:
                arrays[name] = np.zeros((), np.float32)
            tmp = directory.parent / "rewrite.safetensors"
            save_file(arrays, str(tmp))
            yield f"{shard}: tensor {name} {choice}", {shard: tmp.read_bytes()}, False
        else:
            name = rng.choice(files)
            raw = (directory / name).read_bytes()
            at = rng.randrange(len(raw))
            yield (
                f"bitflip {name}@{at}",
                {name: raw[:at] + bytes([raw[at] ^ (1 << rng.randrange(8))]) + raw[at + 1 :]},
                False,
            )


@contextlib.contextmanager
def _patched(directory: Path, changes: dict):
    """Apply {relative name: bytes or None} to `directory`, restore afterwards."""
    saved = {}
    for name, new in changes.items():
        path = directory / name
        saved[name] = path.read_bytes() if path.exists() else None
        if new is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(new)
    try:
        yield
    finally:
        for name, old in saved.items():
            path = directory / name
            if old is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(old)


def _load_and_check(path: Path) -> str | None:
    import jaxdecode as jd

    model = jd.load(path)
    _check_tokenizer(model.tokenizer, model.config.vocab_size)
    return _structurally_sound(model)


def _fuzz_hf(count: int, rng: random.Random, work: Path, mine):
    directory, outside = work / "model", work / "outside"
    make_hf_dir(directory)
    make_hf_dir(outside, seed=1)
    mutants = _hf_mutants(directory, outside, rng)
    for i in range(count):
        description, changes, names_outside = next(mutants)
        if not mine(i):
            continue
        with _patched(directory, changes):
            result = _classify(lambda: _load_and_check(directory), names_outside)
            yield description, result, directory


# ------------------------------------------------------------------------------------------------
# Checkpoints: the tiny HF model saved (float, and int8), mutated file by file.


def _manifest(version: Path) -> bytes:
    digests = {}
    for path in sorted(p for p in version.rglob("*") if p.is_file() and p.name != "MANIFEST.json"):
        digests[str(path.relative_to(version))] = {
            "size": path.stat().st_size,
            "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        }
    return _json_bytes(digests)


def _damaged(raw: bytes, rng: random.Random) -> tuple[str, bytes | None]:
    """A file deleted (None), truncated or with one bit flipped."""
    choice = rng.choice(["delete", "truncate", "flip"])
    if choice == "delete":
        return choice, None
    if choice == "truncate" or not raw:
        return "truncate", raw[: rng.randrange(max(len(raw), 1))]
    at = rng.randrange(len(raw))
    return choice, raw[:at] + bytes([raw[at] ^ (1 << rng.randrange(8))]) + raw[at + 1 :]


def _checkpoint_mutants(directory: Path, outside: Path, rng: random.Random):
    """Yields (description, {path relative to `directory`: bytes or None}, names_outside, re-sign).
    With re-sign the manifest is recomputed after the change (an edit by someone who knows the format)."""
    version = directory / (directory / "LATEST").read_text()
    files = sorted(str(p.relative_to(directory)) for p in version.rglob("*") if p.is_file())
    meta_name = f"{version.name}/jaxdecode.json"
    meta = json.loads((directory / meta_name).read_text())
    manifest_name = f"{version.name}/MANIFEST.json"
    manifest = json.loads((directory / manifest_name).read_text())
    kinds = ["damage", "manifest", "latest", "config", "meta", "params", "extra"]
    while True:
        kind = rng.choice(kinds)
        if kind == "damage":
            name = rng.choice(files)
            choice, new = _damaged((directory / name).read_bytes(), rng)
            yield f"{choice} {name}", {name: new}, False, False
        elif kind == "manifest":
            choice = rng.choice(["empty", "drop", "bogus", "size-type", "sha", "list", "json", "utf8"])
            m = copy.deepcopy(manifest)
            if choice == "empty":
                m = {}
            elif choice == "drop":
                del m[rng.choice(sorted(m))]
            elif choice == "bogus":
                m["../../etc/passwd"] = {"size": 1, "sha256": "0" * 64}
            elif choice == "size-type":
                m[rng.choice(sorted(m))]["size"] = rng.choice(["x", None, -1, 1.5])
            elif choice == "sha":
                m[rng.choice(sorted(m))]["sha256"] = rng.choice([5, "zz", None])
            elif choice == "list":
                m = list(m)
            new = {"json": b"{not json", "utf8": b'{"\xff": 1}'}.get(choice, _json_bytes(m))
            yield f"manifest: {choice}", {manifest_name: new}, False, False
        elif kind == "latest":
            choice = rng.choice(["parent", "absolute", "empty", "long", "utf8", "missing", "dot", "nested"])
            other = next(p for p in outside.iterdir() if p.name.startswith("v-"))
            new = {
                "parent": f"../{outside.name}/{other.name}",
                "absolute": str(other),
                "empty": "",
                "long": "v-" + "x" * 300,
                "missing": "v-nonexistent",
                "dot": ".",
                "nested": f"{version.name}/../../{outside.name}/{other.name}",
            }.get(choice)
            raw = b"\xff\xfe" if choice == "utf8" else new.encode()
            yield f"LATEST: {choice}", {"LATEST": raw}, choice in ("parent", "absolute", "nested"), False
        elif kind in ("config", "meta"):
            m = copy.deepcopy(meta)
            if kind == "config":
                key = rng.choice(sorted(m["config"]) + ["no_such_field"])
                if rng.random() < 0.2 and key in m["config"]:
                    del m["config"][key]
                    what = f"config.{key} deleted"
                else:
                    m["config"][key] = rng.choice(_WRONG_VALUES + (3, 16, 65, "rms", "xla", {"kind": "linear"}))
                    what = f"config.{key} := {m['config'][key]!r}"
            else:
                choice = rng.choice(
                    [
                        "format",
                        "quantized",
                        "quantized-kind",
                        "quantized-shape",
                        "stop_ids",
                        "template",
                        "special",
                        "whole",
                        "no-config",
                    ]
                )
                if choice == "format":
                    m["format"] = rng.choice(["jaxdecode-checkpoint/9", None, 3])
                elif choice == "quantized":
                    m["quantized"] = rng.choice(
                        [[], "x", {"embed": {"kind": "int8", "shape": [64, 32], "dtype": "float32"}}]
                    )
                elif choice in ("quantized-kind", "quantized-shape") and m["quantized"]:
                    name = rng.choice(sorted(m["quantized"]))
                    if choice == "quantized-kind":
                        m["quantized"][name]["kind"] = rng.choice(["int3", None, "q4_0", "int4"])
                    else:
                        m["quantized"][name]["shape"] = rng.choice([[1, 1], [], "x", [2**40, 2], [32, 48, 1]])
                elif choice == "stop_ids" and "tokenizer" in m:
                    m["tokenizer"]["stop_ids"] = rng.choice([[2**40], [-1], ["x"], 5, [64]])
                elif choice == "template" and "tokenizer" in m:
                    m["tokenizer"]["chat_template"] = rng.choice([5, "{{ foo.bar.baz }}", "{% if %}", ["x"]])
                elif choice == "special" and "tokenizer" in m:
                    m["tokenizer"]["special_tokens"] = rng.choice([[1], "x", {"bos_token": 5}])
                elif choice == "whole":
                    m = rng.choice([[], "x", None])
                else:
                    m.pop("config", None)
                what = f"meta: {choice}"
            yield what, {meta_name: _json_bytes(m)}, False, True
        elif kind == "params":
            name = rng.choice([f for f in files if "/params/" in f])
            choice, new = _damaged((directory / name).read_bytes(), rng)
            yield f"params (re-signed): {choice} {name}", {name: new}, False, True
        else:
            yield "extra file", {f"{version.name}/params/extra.bin": b"\x00" * 8}, False, rng.random() < 0.5


def _fuzz_checkpoint(count: int, rng: random.Random, work: Path, mine):
    import jaxdecode as jd

    make_hf_dir(work / "hf")
    sources = {}
    for quant in (None, "int8"):
        directory = work / f"ckpt-{quant or 'float'}"
        jd.save(jd.load(work / "hf", quant=quant), directory)
        sources[quant] = directory
    outside = work / "outside"
    jd.save(jd.load(work / "hf"), outside)
    streams = {q: _checkpoint_mutants(d, outside, rng) for q, d in sources.items()}
    for i in range(count):
        directory = sources[None if i % 2 else "int8"]
        description, changes, names_outside, resign = next(streams[None if i % 2 else "int8"])
        if not mine(i):
            continue
        version = (directory / "LATEST").read_text()
        manifest_name = f"{version}/MANIFEST.json"
        with _patched(directory, changes):
            extra = {manifest_name: _manifest(directory / version)} if resign and (directory / version).is_dir() else {}
            with _patched(directory, extra):
                result = _classify(lambda d=directory: _load_and_check(d), names_outside)
                yield f"{directory.name}: {description}", result, directory


# ------------------------------------------------------------------------------------------------


def _limit_address_space() -> None:
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    limit = vm + ADDRESS_SPACE_HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("kind", choices=["gguf", "hf", "checkpoint"])
    parser.add_argument("count", type=int)
    parser.add_argument("seed", type=int)
    parser.add_argument("--keep", type=Path, help="copy up to 3 refused mutants here")
    parser.add_argument("--part", default="0/1", help="I/N: run the cases whose index is I modulo N (same mutants)")
    args = parser.parse_args()
    part, parts = (int(n) for n in args.part.split("/"))
    import warnings

    import jax

    warnings.simplefilter("ignore")
    jax.devices()  # start the backend before the limit
    signal.signal(signal.SIGALRM, _on_alarm)
    rng = random.Random(args.seed)
    keep_rng = random.Random(args.seed + 1)  # which refused mutants to keep, without changing the mutants
    counts: Counter = Counter()
    examples: dict[str, list] = defaultdict(list)
    stalls: list = []
    kept = 0
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _limit_address_space()
        fuzz = {"gguf": _fuzz_gguf, "hf": _fuzz_hf, "checkpoint": _fuzz_checkpoint}[args.kind]
        for description, (outcome, detail, stalled), path in fuzz(args.count, rng, work, lambda i: i % parts == part):
            counts[outcome] += 1
            if stalled:
                stalls.append([description, outcome])
            if len(examples[outcome]) < (40 if outcome not in ("refused", "ok") else 8):
                examples[outcome].append([description, detail])
            if args.keep and outcome == "refused" and kept < 3 and keep_rng.random() < 0.2:
                target = args.keep / f"{args.kind}-{part}-{kept}{path.suffix}"
                (shutil.copytree if path.is_dir() else shutil.copyfile)(path, target)
                kept += 1
    report = {"kind": args.kind, "count": sum(counts.values()), "counts": dict(counts), "examples": examples}
    report["stalls"] = stalls
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(__file__))
    main()
