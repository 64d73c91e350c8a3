"""Random-weight parity with HF transformers for every family, and cache consistency."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode as jd
from jaxdecode.config import config_from_hf

from hf_models import FAMILY_CASES, VOCAB, build, hf_logits

SEQ = 19


@pytest.fixture(scope="module", params=FAMILY_CASES)
def family(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = build(request.param, directory)
    return request.param, hf_model, jd.load(directory)


def _tokens(batch: int, length: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(batch, length), dtype=np.int32)


# "auto" is XLA on this CPU; "interpret" runs the Pallas kernels (prefill and split-KV decode) in interpret mode.
ATTENTION = pytest.mark.parametrize("attention", ["auto", "interpret"])


@ATTENTION
def test_forward_matches_hf(family, attention):
    name, hf_model, model = family
    model = dataclasses.replace(model, attention=attention)
    tokens = _tokens(2, SEQ)
    expected = hf_logits(hf_model, tokens).numpy()
    got = np.asarray(jd.forward(model, tokens))
    assert got.shape == expected.shape
    err = np.max(np.abs(got - expected))
    assert err <= 1e-4 * np.max(np.abs(expected)), (
        f"{name}: max |diff| {err:.3g}, max |logit| {np.abs(expected).max():.3g}"
    )


@ATTENTION
def test_incremental_decoding_matches_full_forward(family, attention):
    """Prefill part of a ragged batch, then feed one token at a time: every logit equals the full forward."""
    _, _, model = family
    tokens = _tokens(2, SEQ, seed=2)
    full = np.asarray(jd.forward(model, tokens))
    prompt_lengths = np.array([5, 9], np.int32)
    cache = jd.init_cache(model.config, 2, 32)
    positions = np.broadcast_to(np.arange(9, dtype=np.int32), (2, 9))
    logits, cache = jd.apply(
        model.params, model.config, jnp.asarray(tokens[:, :9]), positions, cache, prefill=True, attention_impl=attention
    )
    for row, n in enumerate(prompt_lengths):
        np.testing.assert_allclose(np.asarray(logits[row, :n]), full[row, :n], rtol=0, atol=1e-4 * np.abs(full).max())
    cache = cache._replace(lengths=jnp.asarray(prompt_lengths))
    # Rows advance from different lengths; each step feeds the next true token of every row.
    for step in range(SEQ - 9):
        pos = prompt_lengths + step
        next_tokens = tokens[np.arange(2), pos][:, None]
        logits, cache = jd.apply(
            model.params,
            model.config,
            jnp.asarray(next_tokens),
            jnp.asarray(pos[:, None]),
            cache,
            attention_impl=attention,
        )
        np.testing.assert_allclose(
            np.asarray(logits[:, 0]), full[np.arange(2), pos], rtol=0, atol=1e-4 * np.abs(full).max()
        )
    assert np.asarray(cache.lengths).tolist() == (prompt_lengths + SEQ - 9).tolist()


@ATTENTION
def test_verify_block_matches_full_forward(family, attention):
    """Several new queries at once against a filled cache (the speculative-verify shape)."""
    _, _, model = family
    tokens = _tokens(1, SEQ, seed=3)
    full = np.asarray(jd.forward(model, tokens))
    cache = jd.init_cache(model.config, 1, 32)
    head = np.arange(12, dtype=np.int32)[None]
    _, cache = jd.apply(
        model.params, model.config, jnp.asarray(tokens[:, :12]), head, cache, prefill=True, attention_impl=attention
    )
    tail = np.arange(12, SEQ, dtype=np.int32)[None]
    logits, _ = jd.apply(model.params, model.config, jnp.asarray(tokens[:, 12:]), tail, cache, attention_impl=attention)
    np.testing.assert_allclose(np.asarray(logits), full[:, 12:], rtol=0, atol=1e-4 * np.abs(full).max())


def test_bfloat16_close_to_float32(tmp_path):
    """bfloat16 weights, activations and cache: logits within bfloat16 rounding of the float32 model."""
    build("llama", tmp_path)
    f32 = jd.load(tmp_path)
    bf16 = jd.load(tmp_path, dtype="bfloat16")
    assert bf16.params["layer_0"]["attn"]["q"]["weight"].dtype == jnp.bfloat16
    tokens = _tokens(2, SEQ, seed=4)
    ref = np.asarray(jd.forward(f32, tokens))
    got = np.asarray(jd.forward(bf16, tokens))
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() <= 3e-2 * np.abs(ref).max()
    out = jd.generate(bf16, tokens.tolist(), max_new_tokens=4, stop_ids=())
    assert all(len(t) == 4 for t in out.tokens)


@pytest.mark.parametrize("name", ["gemma3", "gemma4", "phi3_longrope"])
def test_per_layer_and_longrope_configs_survive_a_checkpoint(tmp_path, name):
    """Tuples in the config (layer_types, longrope factor lists) come back as tuples: equal and hashable."""
    build(name, tmp_path / "hf")
    model = jd.load(tmp_path / "hf")
    jd.save(model, tmp_path / "checkpoint")
    restored = jd.load(tmp_path / "checkpoint")
    assert restored.config == model.config and hash(restored.config) == hash(model.config)
    tokens = _tokens(1, SEQ, seed=5)
    np.testing.assert_array_equal(np.asarray(jd.forward(restored, tokens)), np.asarray(jd.forward(model, tokens)))


def test_gemma4_config_as_google_writes_it(tmp_path):
    """Google's config.json files name the full layers' head_dim and KV heads (`global_head_dim`,
    `num_global_key_value_heads`, nested in the multimodal wrapper's `text_config`) where transformers 5
    writes `per_layer_config`: all read alike. An MoE config without its expert width and bidirectional
    attention are refused."""
    build("gemma4_k_eq_v", tmp_path)
    written = json.loads((tmp_path / "config.json").read_text())
    assert "per_layer_config" in written
    google = {k: v for k, v in written.items() if k != "per_layer_config"}
    google.update(global_head_dim=32, num_global_key_value_heads=1)
    expected = config_from_hf(written)
    assert expected.layer_head_dims == (16, 32, 16, 32) and expected.layer_kv_heads == (2, 1, 2, 1)
    assert config_from_hf(google) == expected
    assert config_from_hf({"model_type": "gemma4", "text_config": google}) == expected
    # Without attention_k_eq_v the global KV head count does not apply (transformers' rule).
    plain = config_from_hf({**google, "attention_k_eq_v": False})
    assert plain.layer_kv_heads == (2, 2, 2, 2) and plain.layer_head_dims == (16, 32, 16, 32)
    with pytest.raises(ValueError, match="enable_moe_block=true needs moe_intermediate_size"):
        config_from_hf({**google, "enable_moe_block": True, "num_experts": 4, "top_k_experts": 2})
    with pytest.raises(ValueError, match="encoder"):
        config_from_hf({**google, "use_bidirectional_attention": "all"})
    with pytest.raises(ValueError, match="per_layer_config names layer '9'"):
        config_from_hf({**written, "per_layer_config": {"9": {"head_dim": 32}}})


def test_gemma4_int8_quantizes_the_per_layer_embedding(tmp_path):
    """int8 turns the per-layer embedding (Gemma 4 E2B's largest table) into int8 rows too, and the int8
    model computes what the float model does with the dequantized weights. (Against the float weights
    this tiny random model moves far: attention scale 1 over normed q and k makes its softmax sharp, so
    bfloat16 alone moves its logits by 11%.)"""
    from jaxdecode.quantize import dequantize, is_quantized

    build("gemma4", tmp_path)
    tokens = _tokens(2, SEQ, seed=6)
    model = jd.load(tmp_path, quant="int8")
    assert model.params["per_layer_embed"].kind == "int8"
    assert model.params["layer_5"]["per_layer_gate"]["weight"].kind == "int8"

    def dequantized(path, leaf):  # back to the float layout: tables [rows, d], Linear weights [in, out]
        if not is_quantized(leaf):
            return leaf
        w = np.asarray(dequantize(leaf))
        return w if path[-1].key in ("embed", "lm_head", "per_layer_embed") else w.T

    float_params = jax.tree_util.tree_map_with_path(dequantized, model.params, is_leaf=is_quantized)
    ref = np.asarray(jd.forward(dataclasses.replace(jd.load(tmp_path), params=float_params), tokens))
    got = np.asarray(jd.forward(model, tokens))
    assert np.abs(got - ref).max() <= 1e-4 * np.abs(ref).max()
