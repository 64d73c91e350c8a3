"""Mixtures of experts beyond HF parity (test_hf_parity.py has Mixtral, Qwen2-MoE and Qwen3-MoE): the routed
MLP's two paths against a float64 reference, expert parallelism on 8 virtual devices, what a decode step
reads, what a sharded step communicates, expert-load statistics and damaged expert tensors."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers as tf

import jaxdecode as jd
from jaxdecode import parallel, weights
from jaxdecode.config import ModelConfig
from jaxdecode.io.validate import ModelFileError
from jaxdecode.quantize import dequantize, quantize_int8

from hf_models import VOCAB, build, perturbed


def _silu(x):
    return x / (1 + np.exp(-x))


def _reference_mlp(x, experts, coefficients, gate, up, down):
    """float64: sum over pairs of coefficient * down_e(silu(gate_e x) * up_e x)."""
    x, gate, up, down = (np.asarray(a, np.float64) for a in (x, gate, up, down))
    out = np.zeros_like(x)
    for n, a in np.ndindex(experts.shape):
        if coefficients[n, a]:
            e = experts[n, a]
            out[n] += coefficients[n, a] * (down[e] @ (_silu(gate[e] @ x[n]) * (up[e] @ x[n])))
    return out


@pytest.mark.parametrize("rows,pairs,f", [(1, 2, 80), (2, 4, 80), (5, 2, 80), (40, 3, 80), (1, 2, 2100)])
def test_expert_mlp_matches_float64(rows, pairs, f):
    """Few pairs take the per-pair matrix-vector path, many the grouped matmul; both equal the float64 sum.
    A zero coefficient drops its pair whatever its expert id (another shard's expert, out of range). An
    expert row wider than `MATVEC_COLUMNS` (down's 2100 columns) is multiplied in pieces."""
    rng = np.random.default_rng(rows * 10 + pairs)
    count, d = 8, 48
    gate, up = rng.normal(size=(2, count, f, d)).astype(np.float32) * 0.2
    down = rng.normal(size=(count, d, f)).astype(np.float32) * 0.2
    x = rng.normal(size=(rows, d)).astype(np.float32)
    experts = rng.integers(0, count, size=(rows, pairs)).astype(np.int32)
    coefficients = rng.uniform(0.1, 1, size=(rows, pairs)).astype(np.float32)
    coefficients[0, 0], experts[0, 0] = 0.0, count + 3  # not this shard's: dropped
    expected = _reference_mlp(x, experts, coefficients, gate, up, down)
    got = weights.expert_mlp(
        jnp.asarray(x), jnp.asarray(experts), jnp.asarray(coefficients), (gate, up, down), jax.nn.silu
    )
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5 * np.abs(expected).max())
    # int8 experts: the same sum over the dequantized matrices
    quantized = tuple(quantize_int8(w) for w in (gate, up, down))
    got = weights.expert_mlp(jnp.asarray(x), jnp.asarray(experts), jnp.asarray(coefficients), quantized, jax.nn.silu)
    expected = _reference_mlp(x, experts, coefficients, *(np.asarray(dequantize(w)) for w in quantized))
    np.testing.assert_allclose(np.asarray(got), expected, rtol=0, atol=1e-5 * np.abs(expected).max())


def _two_expert_mixtral():
    """Fewer experts (2) than model shards (4): each shard holds half of one expert's columns."""
    config = tf.MixtralConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=112,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=2,
        num_experts_per_tok=1,
    )
    return perturbed(config)


@pytest.mark.parametrize(
    "name,quant",
    [("mixtral", None), ("qwen2_moe", None), ("gemma4_moe", "int8"), ("two_experts", None), ("two_experts", "int8")],
)
def test_moe_on_meshes_gives_one_devices_tokens(tmp_path, name, quant):
    """Meshes (1, 4) and (2, 2): the one-device logits (<= 1e-5 relative) and greedy tokens, with the experts
    split over `model` (4 experts: one or two per shard; 2 experts: column slices), float and int8; Gemma 4's
    experts beside a dense MLP in every layer."""
    if name == "two_experts":
        _two_expert_mixtral().save_pretrained(tmp_path)
    else:
        build(name, tmp_path)
    model = jd.load(tmp_path, quant=quant)
    tokens = np.random.default_rng(0).integers(0, VOCAB, (4, 11), dtype=np.int32)
    logits = np.asarray(jd.forward(model, tokens))
    greedy = jd.generate(model, tokens.tolist(), max_new_tokens=6, stop_ids=()).tokens
    for data, model_size in [(1, 4), (2, 2)]:
        sharded = jd.shard(model, jd.make_mesh(data=data, model=model_size))
        got = parallel.fetch(jd.forward(sharded, tokens))
        assert np.abs(got - logits).max() <= 1e-5 * np.abs(logits).max(), (data, model_size)
        assert jd.generate(sharded, tokens.tolist(), max_new_tokens=6, stop_ids=()).tokens == greedy, (data, model_size)
    if quant:  # a saved int8 MoE restores onto a mesh, read straight onto the devices
        jd.save(model, tmp_path / "saved")
        restored = jd.load(tmp_path / "saved", mesh=jd.make_mesh(data=1, model=4))
        assert jd.generate(restored, tokens.tolist(), max_new_tokens=6, stop_ids=()).tokens == greedy


SMALL_MOE = ModelConfig(
    family="mixtral",
    vocab_size=256,
    d_model=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    ffn_dim=1024,
    max_seq_len=256,
    tie_embeddings=False,
    num_experts=8,
    experts_per_token=2,
    expert_ffn_dim=1024,
)


def _decode_step_hlo(config, batch, devices=None):
    params = jax.eval_shape(lambda: jd.init_params(config, jax.random.key(0)))
    cache = jax.eval_shape(lambda: jd.init_cache(config, batch, 64))
    tokens = jax.ShapeDtypeStruct((batch, 1), jnp.int32)
    step = jax.jit(lambda p, t, c: jd.apply(p, config, t, t, c)[0])
    return step.lower(params, tokens, cache).compile().as_text()


def test_decode_step_reads_only_the_routed_experts():
    """From the compiled batch-1 decode step: every read of a stacked expert tensor is a dynamic slice of
    one expert fused into its matrix-vector product, and there are layers x k x 3 of them: 12 of the 48
    expert matrices (12.6 of 50.3 MB, against 50.3 MB for the dense equivalent, all experts)."""
    text = _decode_step_hlo(SMALL_MOE, batch=1)
    stacked = re.compile(r"f32\[8,(1024,256|256,1024)\]")
    reads = set()
    for block in text.split("\n\n"):
        header = block.strip().splitlines()[0] if block.strip() else ""
        if header.startswith("%fused") and stacked.search(header):
            # the stacked operand is only sliced, one expert at a time, inside a fusion that also multiplies
            assert re.search(r"dynamic-slice\([^)]*\), dynamic_slice_sizes=\{1,", block), header
            assert " dot(" in block, header
            reads.add(header.split()[0])
    matrix_bytes = 1024 * 256 * 4
    routed = len(reads) * matrix_bytes
    dense = SMALL_MOE.num_layers * 3 * SMALL_MOE.num_experts * matrix_bytes
    assert len(reads) == SMALL_MOE.num_layers * SMALL_MOE.experts_per_token * 3
    assert routed == dense // 4
    # and the program uses the stacked parameters nowhere else: each use is a call of one of those fusions
    entry = text[text.index("\nENTRY") :].splitlines()[1:]
    names = [m.group(1) for line in entry if (m := re.match(r"\s*(%\S+) = f32\[8,\d+,\d+\]\S* parameter\(", line))]
    assert len(names) == 3 * SMALL_MOE.num_layers
    uses = [line for line in entry for name in names if name + "," in line or name + ")" in line]
    assert len(uses) == len(reads) and all(re.search(r"calls=(%[\w.]+)", u).group(1) in reads for u in uses)


def test_sharded_moe_step_communicates_one_sum_per_layer(tmp_path):
    """Expert parallelism by a psum of partial outputs, not by exchanging tokens: each shard runs its own
    experts' pairs of the (replicated) tokens and the MoE layer sums them once, the collective a dense
    row-parallel MLP has anyway. The decode loop all-reduces [B, 1, d] twice per layer (attention's output
    projection, the experts) plus once for the embedding, and has no all-to-all: 2 x 4 x 64 x 4 bytes per
    layer for the experts' sum at batch 4 on model=4."""
    build("mixtral", tmp_path)
    model = jd.shard(jd.load(tmp_path), jd.make_mesh(data=1, model=4))
    out = jd.generate(model, [[1, 2, 3]] * 4, max_new_tokens=2, stop_ids=())
    assert out.tokens
    (loop,) = [exe for key, exe in model.executables.items() if key[0] == "decode_loop"]
    ops = parallel.hlo_collectives(loop.as_text())
    assert not [o for o in ops if o[0] == "all-to-all"]
    d = model.config.d_model
    activations = [o for o in ops if o[0] == "all-reduce" and o[2] in ((4, 1, d), (4, d))]  # rows x d
    assert len(activations) == 2 * model.config.num_layers + 1, ops
    rest = [o for o in ops if o not in activations]
    assert all(np.prod(o[2], dtype=int) <= 4 for o in rest), rest  # the argmax and the stop test's scalars


def test_generate_reports_expert_load(tmp_path):
    """expert_load=True: per layer, how many of the batch's tokens (prompts and generated, padding left
    out) each expert received; k per token, summing to k x tokens in every MoE layer, none in dense ones."""
    build("qwen3_moe", tmp_path)  # layer 1 dense
    model = jd.load(tmp_path)
    prompts = [[3, 4, 5, 6, 7], [9, 10]]
    out = jd.generate(model, prompts, max_new_tokens=4, stop_ids=(), expert_load=True)
    load = np.asarray(out.expert_load)
    assert load.shape == (model.config.num_layers, model.config.num_experts)
    tokens = sum(len(p) + 4 - 1 for p in prompts)  # the last generated token is never fed back
    k = model.config.experts_per_token
    assert load[0].sum() == load[2].sum() == k * tokens and load[1].sum() == 0
    # the same counts from the teacher-forced routing of the generated sequences, one row at a time
    again = sum(np.asarray(jd.expert_load(model, [p + t[:-1]])) for p, t in zip(prompts, out.tokens))
    np.testing.assert_array_equal(again, load)


def test_missing_or_extra_expert_names_the_fix(tmp_path):
    """A checkpoint short of one expert, or with an expert the config does not have, is refused by name."""
    from safetensors.numpy import load_file, save_file

    build("mixtral", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    missing = {k: v for k, v in tensors.items() if ".experts.3.w2." not in k}
    save_file(missing, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match=r"lacks expert 3's down projection; the config has 4 experts"):
        jd.load(tmp_path)
    extra = dict(tensors)
    extra["model.layers.0.block_sparse_moe.experts.9.w1.weight"] = tensors[
        "model.layers.0.block_sparse_moe.experts.0.w1.weight"
    ]
    save_file(extra, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match=r"has expert 9, but the config has 4 experts"):
        jd.load(tmp_path)


def test_stacked_experts_of_the_wrong_width_are_refused(tmp_path):
    """Gemma 4 stores its experts stacked, gate|up fused: a fused tensor of the wrong width is refused by name."""
    from safetensors.numpy import load_file, save_file

    build("gemma4_moe", tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    name = "model.layers.1.experts.gate_up_proj"
    tensors[name] = tensors[name][:, :-2]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match=r"gate_up_proj.*implies 80 fused gate\|up rows"):
        jd.load(tmp_path)
