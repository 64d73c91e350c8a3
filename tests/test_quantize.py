"""Quantized weights: error bounds, GGUF blocks bit-exact against `gguf`, the quantized matmul against a
float64 matmul on the dequantized weights, no float copy of a weight in the decode loop, Orbax
checkpoints (bit-exact round trip, restore onto a mesh, refusal of damaged checkpoints, safe
overwrite) and the CLI's bad inputs."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode as jd
from jaxdecode import checkpoint, quantize
from jaxdecode.io.gguf import GGUFFile
from jaxdecode.io.sources import embedded_model_path

from tiny import TINY, quantized, tiny_model

RNG = np.random.default_rng(0)


def _weights(out: int, columns: int) -> np.ndarray:
    w = RNG.standard_normal((out, columns)).astype(np.float32)
    w[0] = 0.0  # an all-zero row
    w[1] = np.abs(w[1]) + 0.5  # a row that never crosses zero
    w[2, :5] = 30.0  # outliers
    return w


@pytest.mark.parametrize("columns", [64, 100, 576])
def test_int8_error_within_half_a_step(columns):
    w = _weights(24, columns)
    q = quantize.quantize_int8(w)
    deq = np.asarray(quantize.dequantize(jax.tree.map(jnp.asarray, q)))
    scale = np.asarray(q.scales)  # [out, 1]
    assert q.values.dtype == np.int8 and q.scales.shape == (24, 1)
    assert np.all(np.abs(w - deq) <= scale / 2 * (1 + 1e-6) + 1e-30)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("columns", [64, 100, 576])
def test_int4_error_within_half_a_step(group_size, columns):
    w = _weights(24, columns)
    q = quantize.quantize_int4(w, group_size)
    assert q.values.dtype == np.uint8 and q.values.shape[1] * 2 == q.padded_in >= columns
    assert q.group_size == group_size and np.max(q.offsets) <= 15
    deq = np.asarray(quantize.dequantize(jax.tree.map(jnp.asarray, q)))
    assert deq.shape == w.shape
    scale = np.repeat(np.asarray(q.scales), group_size, axis=1)[:, :columns]
    assert np.all(np.abs(w - deq) <= scale / 2 * (1 + 1e-5))
    assert np.array_equal(deq[0], np.zeros(columns))  # zero stays exactly zero


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("columns", [64, 96])  # 96: an odd number of blocks (our 4-bit layout pads one)
def test_gguf_blocks_bit_exact(kind, columns):
    qtype = gguf.GGMLQuantizationType[kind]
    w = _weights(16, columns)
    blocks = gguf.quants.quantize(w, qtype)
    expected = gguf.quants.dequantize(blocks, qtype)
    q = quantize.from_gguf_blocks(blocks, kind, w.shape)
    got = jax.jit(quantize.dequantize)(jax.tree.map(jnp.asarray, q))
    assert np.array_equal(np.asarray(got), expected)  # bit for bit
    rows = jnp.asarray([3, 0, 15])
    assert np.array_equal(np.asarray(quantize.take_rows(jax.tree.map(jnp.asarray, q), rows)), expected[[3, 0, 15]])


@pytest.mark.parametrize("name", ["blk.0.ffn_down.weight", "blk.3.attn_k.weight", "token_embd.weight"])
def test_real_gguf_tensors_bit_exact(name):
    f = GGUFFile(embedded_model_path("smollm2-135m"))
    q = f.native(name, "float32")
    assert q.kind == {"token_embd.weight": "q8_0"}.get(name, "q4_1")
    got = np.asarray(jax.jit(quantize.dequantize)(jax.tree.map(jnp.asarray, q)))
    assert np.array_equal(got, f.array(name))


GGUF_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q4_K", "Q5_K", "Q6_K")


def _random_blocks(qtype: gguf.GGMLQuantizationType, rows: int, columns: int) -> np.ndarray:
    """Random raw blocks of `qtype` for a `[rows, columns]` tensor. Bytes whose float16 reading (as the
    high byte of a scale) would be inf or NaN are avoided, so every block decodes to finite numbers."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    finite = np.array([b for b in range(256) if b & 0x7C != 0x7C], np.uint8)
    return RNG.choice(finite, size=(rows, columns // block * type_size)).astype(np.uint8)


@pytest.mark.parametrize("kind", GGUF_TYPES)
def test_every_gguf_type_read_as_gguf_dequantizes_it(tmp_path, kind):
    """Each supported tensor type, written to a file as raw blocks: `array` is `gguf.quants.dequantize` of
    those bytes in `[out, in]` order; `native` keeps Q8_0/Q4_x blocks bit for bit and turns the other
    quantized types into int8 within half a step of the dequantized values, saying which."""
    qtype = gguf.GGMLQuantizationType[kind]
    rows, columns = 8, 256  # 256: one K-quant super-block per row
    if kind in ("F32", "F16", "BF16"):
        raw = gguf.quants.quantize(_weights(rows, columns), qtype)
    else:
        raw = _random_blocks(qtype, rows, columns)
    expected = gguf.quants.dequantize(raw, qtype)
    assert expected.shape == (rows, columns) and np.isfinite(expected).all()
    path = tmp_path / f"{kind}.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("w", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    f = GGUFFile(path)
    assert np.array_equal(f.array("w"), expected.astype(np.float32))
    native = f.native("w", "float32")
    if kind in ("F32", "F16", "BF16"):
        assert np.array_equal(native, expected.astype(np.float32)) and not f.converted_types
        return
    deq = np.asarray(quantize.dequantize(jax.tree.map(jnp.asarray, native)))
    if kind in quantize.GGUF_KINDS:
        assert native.kind == quantize.GGUF_KINDS[kind] and np.array_equal(deq, expected)
        assert not f.converted_types
    else:
        assert native.kind == "int8" and f.converted_types == {kind}
        # Half a step, plus float32 rounding of values this large (random blocks span a wide range).
        bound = np.asarray(native.scales) / 2 * (1 + 1e-6) + 2 * np.spacing(np.abs(expected))
        assert np.all(np.abs(deq - expected) <= bound)


def test_real_gemma_tensors_of_every_stored_type():
    """The Gemma 3 file's Q8_0, Q5_0, Q4_K, Q6_K and F32 tensors: `array` equals gguf's dequantization of
    the stored blocks, shaped `[out, in]` as GGUF's reversed dimensions say."""
    f = GGUFFile(embedded_model_path("gemma3-270m"))
    by_type = {}
    for t in sorted(f.tensors.values(), key=lambda t: t.n_bytes):  # the smallest tensor of each type
        by_type.setdefault(t.tensor_type.name, t)
    assert {"Q8_0", "Q5_0", "Q4_K", "Q6_K", "F32"} <= set(by_type)
    for t in by_type.values():
        got = f.array(t.name)
        assert got.shape == tuple(int(n) for n in reversed(t.shape))
        assert np.array_equal(got, gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(got.shape))


def _quantized_weights(out: int, columns: int) -> dict[str, quantize.QuantizedWeight]:
    w = _weights(out, columns)
    weights = {"int8": quantize.quantize_int8(w), "int4-g32": quantize.quantize_int4(w, 32)}
    weights["int4-g128"] = quantize.quantize_int4(w, 128)
    for kind in ("Q8_0", "Q4_0", "Q4_1"):
        qtype = gguf.GGMLQuantizationType[kind]
        weights[kind] = quantize.from_gguf_blocks(gguf.quants.quantize(w, qtype), kind, w.shape)
    return weights


@pytest.mark.parametrize("lead", [(1,), (1, 1), (3,), (2, 5), (40,)])  # up to 3 rows: the per-row path
def test_quantized_matmul_matches_float64(lead):
    assert 3 <= quantize.MATVEC_ROWS < 10
    for name, q in _quantized_weights(48, 96).items():
        q = jax.tree.map(jnp.asarray, q)
        deq = np.asarray(quantize.dequantize(q), np.float64)
        x = RNG.standard_normal((*lead, 96)).astype(np.float32)
        got = np.asarray(jax.jit(quantize.matmul)(jnp.asarray(x), q))
        ref = x.astype(np.float64) @ deq.T
        assert got.shape == (*lead, 48)
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=name)


def test_wide_quantized_matvec_matches_float64():
    """Rows wider than `MATVEC_COLUMNS` are multiplied in pieces (whole groups each, the 4-bit halves
    apart): 4160 input columns, not a multiple of the piece width, give the float64 product."""
    columns = 2 * quantize.MATVEC_COLUMNS + 64
    for name, q in _quantized_weights(16, columns).items():
        q = jax.tree.map(jnp.asarray, q)
        deq = np.asarray(quantize.dequantize(q), np.float64)
        x = RNG.standard_normal((2, columns)).astype(np.float32)
        got = np.asarray(jax.jit(quantize.matmul)(jnp.asarray(x), q))
        ref = x.astype(np.float64) @ deq.T
        np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max(), err_msg=name)


def _dequantized_float_model(model: jd.Model) -> jd.Model:
    """The same model with every quantized weight replaced by its float32 dequantization (model layout)."""

    def to_float(path, leaf):
        if not quantize.is_quantized(leaf):
            return leaf
        deq = quantize.dequantize(leaf)
        return deq if getattr(path[-1], "key", None) in quantize.EMBEDDING_NAMES else deq.T

    params = jax.tree_util.tree_map_with_path(to_float, model.params, is_leaf=quantize.is_quantized)
    return jd.Model(model.config, params, model.tokenizer, "dequantized")


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_quantized_model_equals_float_model_on_dequantized_weights(quant):
    q = quantized(tiny_model(), quant)
    reference = _dequantized_float_model(q)
    tokens = np.asarray([[5, 17, 33, 2, 9, 40, 3, 61]] * 2)
    ref = np.asarray(jd.forward(reference, tokens))
    np.testing.assert_allclose(np.asarray(jd.forward(q, tokens)), ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    # decoding goes through the per-row path: the same tokens and logits as the float model
    out = jd.generate(q, [[5, 17, 33], [40, 3]], max_new_tokens=6, stop_ids=())
    assert out.tokens == jd.generate(reference, [[5, 17, 33], [40, 3]], max_new_tokens=6, stop_ids=()).tokens


_FLOAT_ARRAY = re.compile(r"^\s*%\S+ = (?:f32|bf16)\[([\d,]+)\]\S* (?:fusion|copy|convert|transpose)\(")


def _materialised_float_sizes(hlo: str) -> list[int]:
    """Element counts of float arrays written to memory by the top-level (non-fused) computations."""
    sizes, in_fused = [], False
    for line in hlo.splitlines():
        if line and not line.startswith(" "):
            in_fused = "fused_computation" in line or "wrapped_" in line
        m = _FLOAT_ARRAY.match(line)
        if m and not in_fused:
            sizes.append(int(np.prod([int(d) for d in m.group(1).split(",")])))
    return sizes


# int8 runs by default; int4 and native (the same fused loop over other block layouts) with the slow set.
@pytest.mark.parametrize("quant", ["int8", *(pytest.param(q, marks=pytest.mark.slow) for q in ("int4", "native"))])
def test_decode_loop_never_materialises_a_float_weight(quant):
    model = jd.load("smollm2-135m", quant=quant)
    jd.generate(model, [[504, 3575, 282, 4649, 314]], max_new_tokens=4, stop_ids=())
    hlo = next(exe.as_text() for key, exe in model.executables.items() if "decode_loop" in str(key))
    smallest_weight = model.config.num_kv_heads * model.config.head_dim * model.config.d_model  # k / v
    sizes = _materialised_float_sizes(hlo)
    assert sizes, "the HLO parse found no float arrays at all"
    assert max(sizes) < smallest_weight, f"a float array of {max(sizes)} elements is written in the decode loop"
    assert "copy_dot_fusion" in hlo  # the fused dequantize-dot loops


@pytest.mark.slow  # the premise of the check above (it can fail); the product's behaviour is tested there
def test_float_decode_loop_hlo_check_can_fail():
    """The check above does see a materialised dequantization when there is one (prefill's dense path)."""
    model = jd.load("smollm2-135m", quant="int8")
    jd.generate(model, [list(range(100, 140))], max_new_tokens=2, stop_ids=())
    hlo = next(exe.as_text() for key, exe in model.executables.items() if "prefill" in str(key))
    assert max(_materialised_float_sizes(hlo)) >= 576 * 576


# ------------------------------------------------------------------------------------------------
# Orbax checkpoints.


def _same_params(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    same_structure = jax.tree.structure(a) == jax.tree.structure(b)
    return same_structure and all(
        x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(la, lb)
    )


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_checkpoint_round_trip_bit_exact(tmp_path, quant):
    model = tiny_model() if quant is None else quantized(tiny_model(), quant)
    jd.save(model, tmp_path / "ck")
    restored = jd.load(tmp_path / "ck")
    assert restored.config == model.config
    assert _same_params(model.params, restored.params)
    tokens = [[5, 17, 33]]
    assert jd.generate(restored, tokens, max_new_tokens=5).tokens == jd.generate(model, tokens, max_new_tokens=5).tokens


def test_checkpoint_of_real_model_keeps_gguf_blocks_and_tokenizer(tmp_path):
    model = jd.load("smollm2-135m", quant="native")
    jd.save(model, tmp_path / "ck")
    restored = jd.load(tmp_path / "ck")
    assert _same_params(model.params, restored.params)
    assert restored.params["embed"].kind == "q8_0" and restored.params["layer_0"]["mlp"]["up"]["weight"].kind == "q4_1"
    assert restored.tokenizer.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert restored.tokenizer.chat_template == model.tokenizer.chat_template


def test_checkpoint_restored_onto_a_mesh(tmp_path):
    model = tiny_model()
    jd.save(model, tmp_path / "ck")
    mesh = jd.make_mesh(data=2, model=2)  # TINY: 2 KV heads, vocab 64: read straight onto the shards
    sharded = jd.load(tmp_path / "ck", mesh=mesh)
    q = sharded.params["layer_0"]["attn"]["q"]["weight"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "model") and len(q.addressable_shards) == 4
    assert q.addressable_shards[0].data.shape == (TINY.d_model, TINY.num_heads * TINY.head_dim // 2)
    assert _same_params(jax.tree.map(jd.parallel.fetch, sharded.params), model.params)
    tokens = [[5, 17, 33], [40, 3]]
    expected = jd.generate(model, tokens, max_new_tokens=5).tokens
    assert jd.generate(sharded, tokens, max_new_tokens=5).tokens == expected
    int8_model = quantized(model, "int8")
    jd.save(int8_model, tmp_path / "q")
    on_data_mesh = jd.load(tmp_path / "q", mesh=jd.make_mesh(data=8))
    assert len(on_data_mesh.params["embed"].values.addressable_shards) == 8
    assert (
        jd.generate(on_data_mesh, tokens, max_new_tokens=5).tokens
        == jd.generate(int8_model, tokens, max_new_tokens=5).tokens
    )
    # Quantized and tensor parallel: int8 is read straight onto the shards (its layout is the saved one;
    # a 4-bit checkpoint is re-packed shard by shard on the way: test_parallel.py).
    on_model_mesh = jd.load(tmp_path / "q", mesh=mesh)
    values = on_model_mesh.params["layer_0"]["attn"]["q"]["weight"].values
    assert values.sharding.spec == jax.sharding.PartitionSpec("model", None)
    assert (
        jd.generate(on_model_mesh, tokens, max_new_tokens=5).tokens
        == jd.generate(int8_model, tokens, max_new_tokens=5).tokens
    )


def _largest_file(root):
    return max(
        (p for p in root.rglob("*") if p.is_file() and p.name != checkpoint.MANIFEST), key=lambda p: p.stat().st_size
    )


def test_damaged_checkpoints_are_refused(tmp_path):
    directory = tmp_path / "ck"
    jd.save(tiny_model(), directory)
    version = directory / (directory / checkpoint.LATEST).read_text()
    victim = _largest_file(version)
    original = victim.read_bytes()
    victim.write_bytes(original[: len(original) // 2])
    with pytest.raises(
        jd.CheckpointError, match=r"has \d+ bytes, expected \d+ \(truncated\?\); the checkpoint is corrupted"
    ):
        jd.load(directory)
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    victim.write_bytes(bytes(flipped))
    with pytest.raises(jd.CheckpointError, match="does not match its checksum"):
        jd.load(directory)
    victim.write_bytes(original)
    jd.load(directory)  # intact again
    (version / checkpoint.MANIFEST).unlink()
    with pytest.raises(jd.CheckpointError, match="incomplete"):
        jd.load(directory)
    (directory / checkpoint.LATEST).unlink()
    with pytest.raises(jd.CheckpointError, match="no complete checkpoint"):
        jd.load(directory)


def test_interrupted_save_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    directory = tmp_path / "ck"
    old = tiny_model(seed=1)
    jd.save(old, directory)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # e.g. the user stops it half-way

    monkeypatch.setattr(checkpoint, "_file_digests", crash)
    with pytest.raises(KeyboardInterrupt):
        jd.save(tiny_model(seed=2), directory)
    monkeypatch.undo()
    assert _same_params(jd.load(directory).params, old.params)
    assert len(list(directory.glob("v-*"))) == 1  # the half-written version was removed
    new = tiny_model(seed=2)
    jd.save(new, directory)
    assert _same_params(jd.load(directory).params, new.params)
    assert len(list(directory.glob("v-*"))) == 1


def test_save_refuses_a_foreign_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(jd.CheckpointError, match="not a jaxdecode checkpoint .*nothing was changed"):
        jd.save(tiny_model(), tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "keep me"


# ------------------------------------------------------------------------------------------------
# CLI.


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxdecode.cli", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "args, message",
    [
        (["convert", "smollm2-135m", "{tmp}/x", "--quant", "int5"], "unknown quantization 'int5'"),
        (["convert", "smollm2-135m", "{tmp}/x", "--quant", "int4", "--group-size", "100"], "group size 100"),
        (["convert", "smollm2-135m", "/proc/jaxdecode-ck"], "/proc/jaxdecode-ck: cannot be written to"),
        (["convert", "smollm2-135m", "{tmp}/file.txt"], "it is a file"),
        (["eval-ppl", "--text-file", "{tmp}/missing.txt"], "no such text file"),
        (["generate", "--prompt", "hi", "--quant", "fp3"], "unknown quantization 'fp3'"),
    ],
)
def test_cli_bad_inputs(tmp_path, args, message):
    (tmp_path / "file.txt").write_text("x")
    result = _cli(*[a.format(tmp=tmp_path) for a in args])
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("jaxdecode: error:")


@pytest.mark.slow  # about 50 s (two CLI runs on SmolLM2); convert and perplexity are covered through the API
def test_cli_convert_and_eval_ppl(tmp_path):
    text = tmp_path / "text.txt"
    from pydoc_data.topics import topics

    text.write_text("\n\n".join(topics[k] for k in sorted(topics))[:20000])
    result = _cli("convert", "smollm2-135m", str(tmp_path / "ck"), "--quant", "int8")
    assert result.returncode == 0, result.stderr
    result = _cli(
        "eval-ppl",
        "--model",
        str(tmp_path / "ck"),
        "--text-file",
        str(text),
        "--max-tokens",
        "300",
        "--window",
        "128",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["tokens"] == 127 * 2 + 43  # windows of 128, 128 and 44 tokens
    # Independently: float64 log-softmax over the model's logits, window by window.
    model = jd.load(tmp_path / "ck")
    ids = model.tokenizer.encode(text.read_text())[:300]
    nll = []
    for start in range(0, 300, 128):
        window = np.asarray([ids[start : start + 128]])
        logits = np.asarray(jd.forward(model, window), np.float64)[0, :-1]
        logp = logits - logits.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        nll += [-logp[t, window[0, t + 1]] for t in range(window.shape[1] - 1)]
    assert record["perplexity"] == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-5)
