"""The generation machinery on a tiny random model: jit-ability, buckets, batching, stop tokens, streaming."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode as jd

from tiny import TINY, tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def _prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, TINY.vocab_size, size=n).tolist() for n in lengths]


def _reference_greedy(model, prompt, steps):
    """Greedy decoding by re-running the full cache-free forward each step (no KV cache at all)."""
    tokens = list(prompt)
    for _ in range(steps):
        logits = jd.forward(model, [tokens])
        tokens.append(int(jnp.argmax(logits[0, -1])))
    return tokens[len(prompt) :]


def test_greedy_equals_cache_free_reference(model):
    prompt = _prompts([7])[0]
    out = jd.generate(model, [prompt], max_new_tokens=10, stop_ids=())
    assert out.tokens[0] == _reference_greedy(model, prompt, 10)
    assert out.finish_reasons == ["length"]


def test_ragged_batch_equals_each_alone(model):
    prompts = _prompts([3, 11, 1, 8], seed=1)
    batch = jd.generate(model, prompts, max_new_tokens=9, stop_ids=())
    for prompt, tokens in zip(prompts, batch.tokens):
        assert jd.generate(model, [prompt], max_new_tokens=9, stop_ids=()).tokens[0] == tokens


def test_generate_inside_outer_jit(model):
    prompts = _prompts([5, 9], seed=2)
    tokens = np.zeros((2, 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, : len(p)] = p
    lengths = jnp.asarray([len(p) for p in prompts], jnp.int32)

    @jax.jit
    def user_program(params, tokens, lengths, key):
        out = jd.generate_tokens(params, model.config, tokens, lengths, key, max_new_tokens=6)
        # Something of the user's own after generation, inside the same jit.
        return out.tokens, jnp.sum(out.num_tokens)

    generated, total = user_program(model.params, jnp.asarray(tokens), lengths, jax.random.key(0))
    expected = jd.generate(model, prompts, max_new_tokens=6, stop_ids=())
    assert np.asarray(generated).tolist() == expected.tokens
    assert int(total) == 12


def test_one_compilation_per_bucket(model):
    """Prompt lengths 17..31 share the 32-token bucket: after the first call nothing is compiled."""
    compiles = []

    def listener(event, duration, **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        fresh = tiny_model(seed=3)  # its own executables: the first call must compile
        counts = []
        for n in (17, 20, 23, 26, 29, 31):
            before = len(compiles)
            jd.generate(fresh, _prompts([n], seed=n), max_new_tokens=5, stop_ids=())
            counts.append(len(compiles) - before)
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    assert counts[0] >= 2, counts  # the prefill and the decode loop
    assert counts[1:] == [0] * 5, counts


def test_stop_tokens_end_rows_independently(model):
    prompts = _prompts([4, 6], seed=4)
    free = jd.generate(model, prompts, max_new_tokens=8, stop_ids=())
    stop = free.tokens[0][3]
    first = free.tokens[0].index(stop)
    out = jd.generate(model, prompts, max_new_tokens=8, stop_ids=[stop])
    assert out.tokens[0] == free.tokens[0][:first]
    assert out.finish_reasons[0] == "stop"
    if stop in free.tokens[1]:
        assert out.tokens[1] == free.tokens[1][: free.tokens[1].index(stop)]
    else:
        assert out.tokens[1] == free.tokens[1] and out.finish_reasons[1] == "length"


def test_max_new_tokens_not_a_power_of_two(model):
    out = jd.generate(model, _prompts([5]), max_new_tokens=13, stop_ids=())
    assert len(out.tokens[0]) == 13


def test_stream_matches_generate(model):
    prompt = _prompts([6], seed=5)[0]
    for sampling in (jd.Sampling(), jd.Sampling(temperature=0.9, top_k=20)):
        whole = jd.generate(model, [prompt], max_new_tokens=10, sampling=sampling, seed=7, stop_ids=())
        streamed = [
            p.token for p in jd.stream(model, prompt, max_new_tokens=10, sampling=sampling, seed=7, stop_ids=())
        ]
        assert streamed == whole.tokens[0]


def test_per_row_sampling_settings(model):
    prompts = _prompts([5, 5], seed=6)
    greedy = jd.generate(model, prompts[:1], max_new_tokens=8, stop_ids=())
    mixed = jd.generate(
        model, prompts, max_new_tokens=8, sampling=[jd.Sampling(), jd.Sampling(temperature=1.5)], stop_ids=()
    )
    assert mixed.tokens[0] == greedy.tokens[0]


def test_seed_controls_sampling(model):
    prompt = _prompts([5], seed=8)
    hot = jd.Sampling(temperature=2.0)
    a = jd.generate(model, prompt, max_new_tokens=12, sampling=hot, seed=1, stop_ids=())
    b = jd.generate(model, prompt, max_new_tokens=12, sampling=hot, seed=1, stop_ids=())
    c = jd.generate(model, prompt, max_new_tokens=12, sampling=hot, seed=2, stop_ids=())
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens


def test_repetition_penalty_matches_hf(tmp_path):
    """Greedy decoding with a repetition penalty, against HF's generate on the same random Llama."""
    import torch

    from hf_models import build

    hf_model = build("llama", tmp_path)
    model = jd.load(tmp_path)
    prompt = _prompts([6], seed=9)[0]
    hf_model.generation_config.eos_token_id = None  # run the full 12 tokens, as we do with stop_ids=()
    with torch.no_grad():
        expected = hf_model.generate(
            torch.tensor([prompt]), max_new_tokens=12, do_sample=False, repetition_penalty=1.5, pad_token_id=0
        )[0, len(prompt) :].tolist()
    out = jd.generate(model, [prompt], max_new_tokens=12, sampling=jd.Sampling(repetition_penalty=1.5), stop_ids=())
    assert out.tokens[0] == expected
    plain = jd.generate(model, [prompt], max_new_tokens=12, stop_ids=())
    assert plain.tokens[0] != expected, "the penalty must change this output, or the test proves nothing"


def test_pallas_kernels_in_interpret_mode_generate_the_same_tokens(model):
    """attention="interpret" runs the Pallas TPU kernel (prefill and split-KV decode) through the whole
    jitted generation loop; greedy tokens equal the XLA path's for a ragged batch."""
    prompts = _prompts([3, 11, 6], seed=4)
    xla = jd.generate(model, prompts, max_new_tokens=12, stop_ids=())
    kernels = jd.generate(dataclasses.replace(model, attention="interpret"), prompts, max_new_tokens=12, stop_ids=())
    assert kernels.tokens == xla.tokens


def test_auto_falls_back_to_xla_when_a_kernel_does_not_compile(model, monkeypatch):
    """Safe dispatch: a kernel that does not compile on the device at hand (injected here: a custom call
    with no implementation, which lowers and then fails in XLA's compiler) makes `auto` compile that
    program with XLA attention, with one warning naming the error per program; a backend asked for by
    name raises the error."""
    import jaxdecode.attention as attention

    real = attention.pallas_kernels.decode_attention

    def broken(q, k, v, lengths, *, backend, **kwargs):
        if backend == "xla":
            return real(q, k, v, lengths, backend=backend, **kwargs)
        return jax.ffi.ffi_call("jaxdecode_kernel_that_does_not_compile", jax.ShapeDtypeStruct(q.shape, q.dtype))(q)

    prompts = _prompts([3, 11, 6], seed=4)
    expected = jd.generate(model, prompts, max_new_tokens=8, stop_ids=()).tokens
    monkeypatch.setattr(attention.pallas_kernels, "decode_attention", broken)
    fresh = dataclasses.replace(model, executables={})
    with pytest.warns(
        RuntimeWarning, match="decode_loop: the attention kernel did not compile .*kernel_that_does_not_c"
    ):
        assert jd.generate(fresh, prompts, max_new_tokens=8, stop_ids=()).tokens == expected
    by_name = dataclasses.replace(model, attention="interpret", executables={})
    with pytest.raises(Exception, match="kernel_that_does_not_compile"):
        jd.generate(by_name, prompts, max_new_tokens=8, stop_ids=())


def test_decode_programs_update_the_cache_in_place(model):
    """The decode loop and the streaming step donate their state: the compiled programs alias it to
    their output instead of copying the KV cache on every call."""
    jd.generate(model, _prompts([4]), max_new_tokens=3, stop_ids=())
    list(jd.stream(model, _prompts([4])[0], max_new_tokens=3, stop_ids=()))
    programs = {key[0]: exe for key, exe in model.executables.items()}
    for name in ("decode_loop", "decode_step"):
        assert "input_output_alias" in programs[name].as_text(), name
