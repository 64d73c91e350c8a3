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


# Falcon and GPT-BigCode (MQA, like the tiny GQA model's replicated KV head) run in the slow set.
SLOW_FAMILY = pytest.mark.slow


@pytest.mark.parametrize(
    "family",
    [
        "llama",
        pytest.param("gpt_bigcode", marks=SLOW_FAMILY),
        pytest.param("falcon", marks=SLOW_FAMILY),
        "bloom",
        "mpt",
    ],
)
def test_families_on_meshes(family, tmp_path):
    """GQA (llama), MQA (gpt_bigcode, falcon: one KV head replicated on every shard), ALiBi with 6 heads
    (bloom, mpt: each shard takes its heads' slopes), on every mesh the model divides."""
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
