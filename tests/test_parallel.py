"""Sharded inference on 8 virtual CPU devices (conftest sets the flag): every mesh gives the one-device
logits (<= 1e-5 relative, float32) and the same tokens; the collectives are Megatron's; a 2-process
localhost run generates what one process does."""

from __future__ import annotations

import dataclasses
import json
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode as jd
from jaxdecode import parallel

from hf_models import VOCAB, build
from tiny import PROMPTS_FOR_MESH, TINY, tiny_model

MESHES = [(1, 8), (2, 4), (4, 2), (8, 1)]  # (data, model)
RELATIVE = 1e-5


def test_eight_virtual_devices():
    assert jax.device_count() == 8, "conftest.py must set --xla_force_host_platform_device_count=8 before JAX starts"


def _divisible(config, model_size):
    try:
        parallel.check_config(config, model_size)
        return True
    except ValueError:
        return False


def _tokens(batch, length, vocab, seed=0):
    return np.random.default_rng(seed).integers(0, vocab, size=(batch, length), dtype=np.int32)


def _check_mesh(model, data, model_size, tokens, prompts, new_tokens=8, reference=None):
    reference = reference or (
        np.asarray(jd.forward(model, tokens)),
        jd.generate(model, prompts, max_new_tokens=new_tokens, stop_ids=()).tokens,
    )
    sharded = jd.shard(model, jd.make_mesh(data=data, model=model_size))
    logits = parallel.fetch(jd.forward(sharded, tokens))
    err = np.abs(logits - reference[0]).max() / np.abs(reference[0]).max()
    assert err <= RELATIVE, f"mesh {data}x{model_size}: relative logit error {err:.2g}"
    got = jd.generate(sharded, prompts, max_new_tokens=new_tokens, stop_ids=()).tokens
    assert got == reference[1], f"mesh {data}x{model_size}"
    return reference


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


@pytest.mark.parametrize("data,model_size", [m for m in MESHES if _divisible(TINY, m[1])] + [(2, 2)])
def test_tiny_gqa_model_on_meshes(tiny, data, model_size):
    """4 query heads, 2 KV heads: split over 2 shards, replicated (one per shard) over 4."""
    _check_mesh(tiny, data, model_size, _tokens(3, 11, TINY.vocab_size), PROMPTS_FOR_MESH)


# Falcon and GPT-BigCode (MQA, like the tiny GQA model's replicated KV head) and BLOOM (ALiBi, as MPT) run in
# the slow set.
SLOW_FAMILY = pytest.mark.slow


@pytest.mark.parametrize(
    "family",
    [
        "llama",
        pytest.param("gpt_bigcode", marks=SLOW_FAMILY),
        pytest.param("falcon", marks=SLOW_FAMILY),
        pytest.param("bloom", marks=SLOW_FAMILY),
        "mpt",
        "gemma4_k_eq_v",
        pytest.param("gemma4", marks=SLOW_FAMILY),
    ],
)
def test_families_on_meshes(family, tmp_path):
    """GQA (llama), MQA (gpt_bigcode, falcon: one KV head replicated on every shard), ALiBi with 6 heads
    (bloom, mpt: each shard takes its heads' slopes), per-layer KV heads (gemma4_k_eq_v: 2 in sliding
    layers, 1 in full ones), per-layer inputs and K/V-sharing layers (gemma4), on every mesh the model
    divides."""
    build(family, tmp_path)
    model = jd.load(tmp_path)
    meshes = [m for m in MESHES if _divisible(model.config, m[1])]
    assert any(m[1] > 1 for m in meshes), "no tensor-parallel mesh tested"
    tokens = _tokens(4, 13, VOCAB, seed=1)
    prompts = [t[:n].tolist() for t, n in zip(tokens, [13, 4, 9, 1])]
    reference = None
    for data, model_size in meshes:
        reference = _check_mesh(model, data, model_size, tokens, prompts, reference=reference)


def test_sampling_under_tensor_parallelism_matches_one_device(tiny):
    """Sampled rows draw the same numbers on every model shard and the same as on one device."""
    sampling = [jd.Sampling(temperature=1.0, top_p=0.9), jd.Sampling(temperature=0.7, top_k=5), jd.Sampling()]
    expected = jd.generate(tiny, PROMPTS_FOR_MESH, max_new_tokens=12, sampling=sampling, seed=3, stop_ids=()).tokens
    for data, model_size in [(1, 4), (2, 2)]:
        sharded = jd.shard(tiny, jd.make_mesh(data=data, model=model_size))
        got = jd.generate(sharded, PROMPTS_FOR_MESH, max_new_tokens=12, sampling=sampling, seed=3, stop_ids=())
        assert got.tokens == expected


def test_batch_not_divisible_by_data_is_padded(tiny):
    sharded = jd.shard(tiny, jd.make_mesh(data=4, model=2))
    expected = jd.generate(tiny, PROMPTS_FOR_MESH[:1], max_new_tokens=6, stop_ids=())
    got = jd.generate(sharded, PROMPTS_FOR_MESH[:1], max_new_tokens=6, stop_ids=())
    assert got.tokens == expected.tokens and got.finish_reasons == ["length"]


# ------------------------------------------------------------------------------------------------
# Communication: read off the compiled decode step.


def decode_step_hlo(model, batch, sampling=None):
    """The optimised HLO of one decode step of `model` (sharded) for `batch` rows."""
    out = jd.generate(model, [[1, 2, 3]] * batch, max_new_tokens=2, sampling=sampling or jd.Sampling(), stop_ids=())
    assert out.tokens
    (executable,) = [exe for key, exe in model.executables.items() if key[0] == "decode_loop"]
    return executable.as_text()


def test_decode_step_communicates_what_megatron_must(tiny):
    """Per layer, exactly two all-reduces of the [rows, 1, d_model] activations (after O and after down);
    plus one for the embedding lookup and scalars for the argmax and the stop test. No logits gathered."""
    mesh = jd.make_mesh(data=2, model=2)
    ops = parallel.hlo_collectives(decode_step_hlo(jd.shard(tiny, mesh), batch=4))
    activations = [o for o in ops if o[0] == "all-reduce" and o[2] == (2, 1, TINY.d_model)]
    assert len(activations) == 2 * TINY.num_layers + 1  # + the vocab-parallel embedding lookup
    assert not [o for o in ops if o[0] == "all-gather"], "greedy decoding gathered logits"
    small = [o for o in ops if o not in activations]
    assert all(np.prod(o[2], dtype=int) <= 2 for o in small), small  # argmax max/index and the all-done flag


def test_sampling_gathers_only_the_new_positions_logits(tiny):
    mesh = jd.make_mesh(data=1, model=2)
    ops = parallel.hlo_collectives(
        decode_step_hlo(jd.shard(tiny, mesh), batch=2, sampling=jd.Sampling(temperature=1.0))
    )
    gathers = [o for o in ops if o[0] == "all-gather"]
    assert gathers and all(o[2] == (2, TINY.vocab_size) for o in gathers), gathers


# ------------------------------------------------------------------------------------------------
# Mistakes.


def test_mesh_larger_than_the_devices():
    with pytest.raises(ValueError, match=r"data=4 x model=4 needs 16 devices, but JAX sees 8"):
        jd.make_mesh(data=4, model=4)


def test_heads_not_divisible_names_the_numbers(tiny):
    with pytest.raises(ValueError, match=r"4 query heads are not divisible by model=8"):
        jd.shard(tiny, jd.make_mesh(data=1, model=8))
    odd = tiny_model(config=TINY.replace(num_heads=6, num_kv_heads=3, ffn_dim=51))
    with pytest.raises(ValueError, match=r"3 KV heads neither divide.*MLP width 51 is not divisible by model=2"):
        jd.shard(odd, jd.make_mesh(data=1, model=2))


def test_sharding_twice_is_refused(tiny):
    mesh = jd.make_mesh(data=1, model=2)
    with pytest.raises(ValueError, match="already sharded"):
        jd.shard(jd.shard(tiny, mesh), mesh)


# ------------------------------------------------------------------------------------------------
# The real model and several processes.


@pytest.mark.slow  # SmolLM2 on three meshes (~1.5 minutes); the tiny families cover each mesh in the default run
def test_smollm2_on_meshes():
    """9 query heads, 3 KV heads: tensor parallel over 3 shards (one KV head each), and data parallel."""
    model = jd.load("smollm2-135m")
    prompts = ["The capital of France is", "def fibonacci(n):\n", "In 1969, the first humans landed on"]
    tokens = np.asarray([model.tokenizer.encode(p)[:5] for p in prompts], np.int32)
    reference = None
    for data, model_size in [(1, 3), (2, 3), (8, 1)]:
        reference = _check_mesh(model, data, model_size, tokens, prompts, new_tokens=6, reference=reference)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_generate_what_one_does(tiny):
    """`jax.distributed` on localhost with CPU collectives: 2 processes x 2 devices, mesh data=2 x model=2."""
    worker = Path(__file__).with_name("multihost_worker.py")
    port = str(_free_port())
    procs = [
        subprocess.Popen(
            [sys.executable, str(worker), str(i), "2", port], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
    result = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert result["devices"] == 4
    assert result["tokens"] == jd.generate(tiny, PROMPTS_FOR_MESH, max_new_tokens=10, stop_ids=()).tokens


def test_attention_kernels_run_per_shard(tiny):
    """The Pallas kernels (interpret mode) inside the shard_map: each shard attends over its own heads."""
    kernels = dataclasses.replace(tiny, attention="interpret")
    _check_mesh(kernels, 2, 2, _tokens(3, 11, TINY.vocab_size), PROMPTS_FOR_MESH)


# 6 query heads, one KV head (repeated onto every shard), 192 input columns into o and down: 64 per shard on
# 3 shards, 96 on 2, whole groups of 32 either way (int4 g32 and GGUF's 32-blocks split without cutting a
# scale group); 91 vocabulary rows, padded to a multiple of the shards.
QUANT_TINY = dataclasses.replace(TINY, d_model=64, num_heads=6, num_kv_heads=1, head_dim=32, ffn_dim=192, vocab_size=91)
GGUF_KINDS = {"q": "Q4_0", "k": "Q8_0", "v": "Q4_1", "o": "Q4_0", "gate": "Q4_1", "up": "Q8_0", "down": "Q4_1"}


def _quantized_tiny(quant: str, group_size: int = 32) -> jd.Model:
    """QUANT_TINY with int8 / int4 (g32) weights, or GGUF blocks made by `gguf` itself (a mix of kinds,
    as a GGUF file's tensors are; embedding Q8_0) for "native"."""
    import gguf

    from jaxdecode import quantize
    from jaxdecode.weights import to_model_layout

    model = tiny_model(config=QUANT_TINY)
    host = to_model_layout(jax.tree.map(np.asarray, model.params))  # the loaders' [out, in]
    if quant != "native":
        params = quantize.quantize_params(host, quant, group_size)
    else:

        def blocks(path, leaf):
            keys = [getattr(p, "key", "") for p in path]
            kind = "Q8_0" if keys[-1] == "embed" else GGUF_KINDS.get(keys[-2]) if keys[-1] == "weight" else None
            if kind is None:
                return leaf
            raw = gguf.quants.quantize(leaf, getattr(gguf.GGMLQuantizationType, kind))
            return quantize.from_gguf_blocks(raw, kind, leaf.shape)

        params = jax.tree_util.tree_map_with_path(blocks, host)
    params = jax.tree.map(jnp.asarray, to_model_layout(params))
    return jd.Model(QUANT_TINY, params, None, f"tiny-{quant}")


@pytest.mark.parametrize("quant", ["int8", "int4", "native"])
def test_quantized_weights_split_over_model(quant, tmp_path):
    """Quantized tensor parallelism: every kind's integers and scales split over `model` (row-parallel
    4-bit weights re-packed shard by shard) give one device's greedy tokens on (1, 3) and (2, 2), and
    each shard holds its part only; a saved 4-bit checkpoint is re-packed onto the mesh as it loads."""
    model = _quantized_tiny(quant)
    prompts = PROMPTS_FOR_MESH
    expected = jd.generate(model, prompts, max_new_tokens=8, stop_ids=()).tokens
    if quant == "int4":
        jd.save(model, tmp_path / "ck")
    for data, model_size in [(1, 3), (2, 2)]:
        mesh = jd.make_mesh(data=data, model=model_size)
        sharded = jd.load(tmp_path / "ck", mesh=mesh) if quant == "int4" else jd.shard(model, mesh)
        down = sharded.params["layer_0"]["mlp"]["down"]["weight"]
        local = down.values.addressable_shards[0].data.shape
        assert local[1] * model_size == down.values.shape[1] and local[0] == QUANT_TINY.d_model
        assert jd.generate(sharded, prompts, max_new_tokens=8, stop_ids=()).tokens == expected, (quant, data)


def test_quantized_split_that_cuts_a_group_is_refused():
    """int4 groups of 128 over model=3: 64 input columns per shard of o / down is not a whole group."""
    model = _quantized_tiny("int4", group_size=128)
    with pytest.raises(ValueError, match=r"layer_0.*o.*int4, 192 input columns in groups of 128.*model=3.*group-size"):
        jd.shard(model, jd.make_mesh(data=1, model=3))
