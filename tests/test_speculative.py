"""Speculative decoding: the verification rule (edge cases and its output distribution), greedy
speculation token-identical to plain greedy decoding on SmolLM2 (self-speculative with prompts longer
than the budget, and with a draft model), sampled speculation distributed as the model's own
sampling, the sharded verifier equal to the single-device one, the cost model, and bad settings."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxdecode as jd
from jaxdecode import bench, speculative, targets

from tiny import TINY, quantized, tiny_model

# chi-square critical values at p = 0.001 by degrees of freedom (a wrong rule fails by far more)
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59}


def _chi_square(samples: np.ndarray, probs: np.ndarray) -> tuple[float, int]:
    """Pearson's statistic of integer samples against probs, bins with expected count < 5 pooled."""
    counts = np.bincount(samples, minlength=len(probs)).astype(float)
    expected = probs * len(samples)
    big = expected >= 5
    observed = np.append(counts[big], counts[~big].sum())
    wanted = np.append(expected[big], expected[~big].sum())
    keep = wanted > 0
    stat = float(np.sum((observed[keep] - wanted[keep]) ** 2 / wanted[keep]))
    return stat, int(keep.sum() - 1)


def _keys(n: int, seed: int = 0) -> jax.Array:
    return jax.random.split(jax.random.key(seed), n)


def test_verify_edge_cases():
    v = 4
    p = jnp.asarray([[[0.1, 0.2, 0.3, 0.4]] * 3])  # [1, g + 1 = 3, V]
    # p == q: every draft is accepted, the bonus token comes from p at the last position
    tokens, accepted = speculative.verify(jnp.asarray([[1, 3]]), p[:, :2], p, _keys(1))
    assert int(accepted[0]) == 2 and tokens[0, :2].tolist() == [1, 3]
    # the first draft token has p = 0: always rejected, replaced by a draw from norm(max(0, p - q))
    p0 = jnp.asarray([[[0.0, 0.5, 0.5, 0.0], [0.25] * 4, [0.25] * 4]])
    q = jnp.asarray([[[1.0, 0.0, 0.0, 0.0], [0.25] * 4]])
    for seed in range(20):
        tokens, accepted = speculative.verify(jnp.asarray([[0, 2]]), q, p0, _keys(1, seed))
        assert int(accepted[0]) == 0 and int(tokens[0, 0]) in (1, 2)
    # q(x) = 0 where p(x) > 0: those tokens can only come from the residual, and they do
    q_zero = jnp.asarray([[[0.5, 0.5, 0.0, 0.0], [0.25] * 4]])
    p_wide = jnp.asarray([[[0.25] * 4] * 3])
    drafted = jax.vmap(lambda k: jax.random.categorical(k, jnp.log(q_zero[0, 0])))(_keys(4000, 1))
    tokens, accepted = jax.vmap(lambda d, k: speculative.verify(jnp.asarray([[d, 0]]), q_zero, p_wide, k[None]))(
        drafted, _keys(4000, 2)
    )
    first = np.asarray(tokens[:, 0, 0])
    stat, df = _chi_square(first, np.full(v, 0.25))
    assert stat < CHI2_999[df]
    assert set(np.unique(first)) == {0, 1, 2, 3}
    # greedy: the longest agreeing prefix plus the model's token
    tokens, accepted = speculative.verify_greedy(
        jnp.asarray([[5, 6, 7], [5, 9, 7]]), jnp.asarray([[5, 6, 8, 1], [5, 6, 7, 2]])
    )
    assert accepted.tolist() == [2, 1] and tokens[0, :3].tolist() == [5, 6, 8] and tokens[1, :2].tolist() == [5, 6]


def test_verify_output_distribution_is_the_models():
    """Drafts drawn from q, verified against p: the first new token is distributed as p_0, and the
    second (when the first draft was accepted) as p_1; chi-square at p = 0.001 over 20k trials."""
    rng = np.random.default_rng(0)
    v, gamma, trials = 6, 2, 20000
    p = rng.dirichlet(np.ones(v), size=gamma + 1).astype(np.float32)
    q = rng.dirichlet(np.ones(v) * 0.5, size=gamma).astype(np.float32)
    draw_keys = _keys(trials * gamma, 3).reshape(trials, gamma)
    drafts = jax.vmap(jax.vmap(lambda k, row: jax.random.categorical(k, jnp.log(row))), in_axes=(0, None))(
        draw_keys, jnp.asarray(q)
    ).astype(jnp.int32)
    tokens, accepted = speculative.verify(
        drafts, jnp.broadcast_to(q, (trials, gamma, v)), jnp.broadcast_to(p, (trials, gamma + 1, v)), _keys(trials, 4)
    )
    tokens, accepted = np.asarray(tokens), np.asarray(accepted)
    stat, df = _chi_square(tokens[:, 0], p[0])
    assert stat < CHI2_999[df], stat
    second = tokens[accepted >= 1, 1]
    stat, df = _chi_square(second, p[1])
    assert stat < CHI2_999[df], stat
    # the acceptance rate of the first draft is sum_x min(p, q) (the rule's known value)
    assert np.mean(accepted >= 1) == pytest.approx(np.minimum(p[0], q[0]).sum(), abs=0.015)
    # and a wrong rule (always accept) is caught by the same test
    wrong = np.asarray(drafts[:, 0])
    assert _chi_square(wrong, p[0])[0] > CHI2_999[df]


@pytest.fixture(scope="module")
def smollm2():
    return jd.load("smollm2-135m")


def _ragged_long_prompts() -> list[list[int]]:
    text = bench.prompt_ids(200)
    return [text, text[:130], text[40:190]]  # all longer than the budget below


# SmolLM2 with prompts longer than the budget; the default set checks greedy equality through the view on the
# tiny model (test_view_read_in_place_is_the_gathered_view, test_speculative_stream_equals_generate).
@pytest.mark.slow
@pytest.mark.parametrize("gamma", [1, 3])
def test_self_speculative_greedy_equals_plain_greedy(smollm2, gamma):
    prompts = _ragged_long_prompts()
    plain = jd.generate(smollm2, prompts, max_new_tokens=24, stop_ids=())
    spec = jd.generate(
        smollm2,
        prompts,
        max_new_tokens=24,
        stop_ids=(),
        speculative=jd.SelfSpeculative(budget=64, sinks=16, gamma=gamma),
    )
    assert spec.tokens == plain.tokens
    assert spec.speculation["gamma"] == gamma and 0 < spec.speculation["acceptance_rate"] <= 1
    assert spec.decode_steps < 24  # fewer passes than tokens: drafts were accepted


@pytest.mark.parametrize("kind", ["self", pytest.param("draft", marks=pytest.mark.slow)])
def test_speculative_stream_equals_generate(kind):
    """`stream(..., speculative=...)` yields what `generate` returns (greedy and sampled), and a stop
    token found on the device in the middle of a round cuts both where plain decoding stops."""
    model = tiny_model()
    if kind == "self":
        spec = jd.SelfSpeculative(budget=64, sinks=4, gamma=3)  # the whole context: every draft accepted
    else:
        spec = jd.DraftModel(tiny_model(), gamma=2)  # the model itself as its draft: every draft accepted
    prompt = list(range(3, 20))
    plain = jd.generate(model, [prompt], max_new_tokens=20, stop_ids=()).tokens[0]
    stop = (plain[7],)  # the first occurrence of this token ends the row
    expected = plain[: plain.index(stop[0])]
    for sampling, stop_ids in [(jd.Sampling(), ()), (jd.Sampling(), stop), (jd.Sampling(temperature=1.0), stop)]:
        request = dict(max_new_tokens=20, sampling=sampling, seed=1, stop_ids=stop_ids, speculative=spec)
        whole = jd.generate(model, [prompt], **request)
        streamed = [piece.token for piece in jd.stream(model, prompt, **request)]
        assert streamed == whole.tokens[0], (sampling, stop_ids)
        if sampling.temperature == 0:
            assert whole.tokens[0] == (expected if stop_ids else plain)
            assert whole.finish_reasons == ["stop" if stop_ids else "length"]
            assert whole.speculation["acceptance_rate"] > 0


def test_streaming_view_really_differs_from_the_full_cache():
    """The draft's view drops the middle of a long cache: its logits differ from the full model's."""
    model = tiny_model()
    cache = jd.init_cache(TINY, 1, 64)
    tokens = jnp.asarray([list(range(1, 41))])
    positions = jnp.arange(40)[None]
    full_logits, cache = jd.apply(model.params, TINY, tokens, positions, cache, prefill=True)
    view = speculative.streaming_view(cache, budget=12, sinks=4, extra=2)
    assert view.keys[0].shape[2] == 14 and int(view.lengths[0]) == 12
    np.testing.assert_array_equal(view.keys[0][0, :, :4], cache.keys[0][0, :, :4])
    np.testing.assert_array_equal(view.keys[0][0, :, 4:12], cache.keys[0][0, :, 32:40])
    new = jnp.asarray([[7]])
    a, _ = jd.apply(model.params, TINY, new, jnp.asarray([[40]]), cache)
    b, _ = jd.apply(model.params, TINY, new, jnp.asarray([[40]]), view, cache_start=view.lengths)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
    short = speculative.streaming_view(cache._replace(lengths=jnp.asarray([9])), budget=12, sinks=4, extra=2)
    np.testing.assert_array_equal(short.keys[0][0, :, :9], cache.keys[0][0, :, :9])  # <= budget: everything
    wide = speculative.streaming_view(cache, budget=80, sinks=4, extra=2)  # more than the cache's 64 slots
    assert bool(jnp.all(jnp.isfinite(wide.keys[0]))) and int(wide.lengths[0]) == 40


@pytest.mark.parametrize("attention", ["xla", "interpret"])
def test_view_read_in_place_is_the_gathered_view(attention):
    """The self-draft's view read in place (`kv_view`: the kernels' window + sinks over the full cache)
    gives the first draft step's logits of the gathered copy, and self-speculation through it keeps
    plain greedy decoding's tokens (the interpret-mode TPU kernel here; what TPUs and GPUs run)."""
    model = dataclasses.replace(tiny_model(), attention=attention)
    cache = jd.init_cache(TINY, 1, 64)
    positions = jnp.arange(40)[None]
    _, cache = jd.apply(model.params, TINY, jnp.asarray([list(range(1, 41))]), positions, cache, prefill=True)
    new, at = jnp.asarray([[7]]), jnp.asarray([[40]])
    view = speculative.streaming_view(cache, budget=12, sinks=4, extra=2)
    gathered, _ = jd.apply(model.params, TINY, new, at, view, cache_start=view.lengths, attention_impl=attention)
    in_place, _ = jd.apply(model.params, TINY, new, at, cache, kv_view=(12 - 4 + 1, 4), attention_impl=attention)
    full, _ = jd.apply(model.params, TINY, new, at, cache, attention_impl=attention)
    np.testing.assert_allclose(in_place, gathered, rtol=1e-5, atol=1e-5)
    assert float(jnp.max(jnp.abs(in_place - full))) > 1e-3  # the view hides something
    if attention == "interpret":
        prompts = [list(range(3, 30)), list(range(50, 60))]
        plain = jd.generate(model, prompts, max_new_tokens=10, stop_ids=()).tokens
        spec = jd.SelfSpeculative(budget=12, sinks=4, gamma=2)
        assert jd.generate(model, prompts, max_new_tokens=10, stop_ids=(), speculative=spec).tokens == plain


def test_int8_self_draft_keeps_the_models_tokens():
    """The quantized self-draft: an int8 copy of the weights drafts on the view, the float model verifies
    (greedy: its own tokens exactly; on a mesh too); the copy is made once per model."""
    model = tiny_model()
    prompts = [list(range(3, 30)), list(range(50, 60))]
    plain = jd.generate(model, prompts, max_new_tokens=10, stop_ids=()).tokens
    spec = jd.SelfSpeculative(budget=64, sinks=4, gamma=3, draft_weights="int8")
    out = jd.generate(model, prompts, max_new_tokens=10, stop_ids=(), speculative=spec)
    assert out.tokens == plain and out.speculation["acceptance_rate"] > 0.5  # int8 drafts mostly agree
    int8 = model.derived["int8"]
    assert int8["layer_0"]["mlp"]["up"]["weight"].kind == "int8"
    jd.generate(model, prompts, max_new_tokens=4, stop_ids=(), speculative=spec)
    assert model.derived["int8"] is int8
    sharded = jd.shard(model, jd.make_mesh(data=2, model=2))
    assert jd.generate(sharded, prompts, max_new_tokens=10, stop_ids=(), speculative=spec).tokens == plain
    with pytest.raises(ValueError, match="quantized already"):
        jd.generate(jd.Model(TINY, quantized(model, "int8").params, None), prompts, max_new_tokens=4, speculative=spec)


@pytest.mark.slow  # the draft path stays in the default set through tiny models (the distribution test below)
def test_draft_model_greedy_equals_plain_greedy(smollm2):
    draft_config = jd.ModelConfig(
        family="llama",
        vocab_size=49152,
        d_model=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        ffn_dim=128,
        max_seq_len=8192,
    )
    draft = jd.Model(draft_config, jd.init_params(draft_config, jax.random.key(0)), None, "random draft")
    prompts = _ragged_long_prompts()
    plain = jd.generate(smollm2, prompts, max_new_tokens=12, stop_ids=())
    spec = jd.generate(smollm2, prompts, max_new_tokens=12, stop_ids=(), speculative=jd.DraftModel(draft, gamma=2))
    assert spec.tokens == plain.tokens


def test_sampled_speculation_matches_the_models_distribution():
    """Tiny vocabulary (64): the second generated token (the first from a speculative round) over
    3000 rows against its exact marginal under the model, sum_x p(x | prompt) p(y | prompt, x)."""
    model, draft = tiny_model(seed=0), tiny_model(seed=1)
    prompt, rows = [5, 17, 33, 2, 9, 40, 3, 61, 12, 8], 3000  # longer than the self-draft budget
    sampling = jd.Sampling(temperature=1.0, top_k=20)
    for spec in (jd.DraftModel(draft, gamma=3), jd.SelfSpeculative(budget=4, sinks=1, gamma=2)):
        out = jd.generate(
            model, [prompt] * rows, max_new_tokens=3, sampling=sampling, seed=7, stop_ids=(), speculative=spec
        )
        second = np.asarray([t[1] for t in out.tokens])
        logits = np.asarray(jd.forward(model, np.asarray([prompt + [x] for x in range(64)])), np.float64)
        p_first = _filtered_probs(np.asarray(jd.forward(model, np.asarray([prompt])), np.float64)[0, -1], 20)
        marginal = sum(p_first[x] * _filtered_probs(logits[x, -1], 20) for x in range(64))
        stat, df = _chi_square(second, marginal)
        assert stat < CHI2_999.get(df, 2 * df + 20), (type(spec).__name__, stat, df)
        assert 0 < out.speculation["acceptance_rate"] < 1


def _filtered_probs(logits: np.ndarray, top_k: int) -> np.ndarray:
    kth = np.sort(logits)[-top_k]
    z = np.where(logits >= kth, logits, -np.inf)
    e = np.exp(z - z.max())
    return e / e.sum()


@pytest.mark.slow  # SmolLM2's sharded speculative programs take about a minute to compile
def test_sharded_verifier_equals_single_device_on_the_real_model(smollm2):
    prompts = _ragged_long_prompts()
    spec = jd.SelfSpeculative(budget=64, sinks=16, gamma=2)
    single = jd.generate(smollm2, prompts, max_new_tokens=10, stop_ids=(), speculative=spec)
    sharded = jd.shard(smollm2, jd.make_mesh(data=2, model=3))
    assert jd.generate(sharded, prompts, max_new_tokens=10, stop_ids=(), speculative=spec).tokens == single.tokens


def test_sharded_verifier_equals_single_device():
    # sampled, on a tiny model over (data 2, model 2): the same draws on every shard and every mesh
    settings = dict(
        max_new_tokens=8,
        sampling=jd.Sampling(temperature=0.9, top_p=0.9),
        seed=3,
        speculative=jd.SelfSpeculative(budget=4, sinks=1, gamma=2),
    )
    one = jd.generate(tiny_model(), [[5, 17, 33], [40, 3]], **settings)
    mesh_model = jd.shard(tiny_model(), jd.make_mesh(data=2, model=2))
    two = jd.generate(mesh_model, [[5, 17, 33], [40, 3]], **settings)
    assert two.tokens == one.tokens


def test_cost_model():
    # MagicDec's numbers: acceptance 0.8, gamma 3 -> 2.95 tokens per round
    assert speculative.expected_tokens(0.8, 3) == pytest.approx(2.952)
    # SmolLM2 in float32: 538 MB of weights, 46 KB of K/V per token
    smollm2 = speculative.PassCosts(538e6, 2 * 134.5e6, 46e3, 4 * 9 * 64 * 30)
    tpu = targets.Roofline(bandwidth=819e9, flops=197e12, source="v5e")  # memory-bound at these batches
    costs = dict(costs=smollm2, roofline=tpu, budget=512)
    # short context, batch 1: the draft costs what the model does -> no speedup: plain decoding (gamma 0)
    assert speculative.predicted_speedup(0.8, 3, batch=1, context=256, **costs) < 1
    assert speculative.choose_gamma(0.8, batch=1, context=256, **costs) == 0
    # long context, large batch: KV reads dominate, the draft is cheap -> > 2x predicted
    assert speculative.predicted_speedup(0.8, 3, batch=16, context=8192, **costs) > 2
    assert speculative.choose_gamma(0.8, batch=16, context=8192, **costs) >= 2
    assert speculative.choose_gamma(0.9, batch=16, context=8192, **costs) >= speculative.choose_gamma(
        0.6, batch=16, context=8192, **costs
    )
    # where the verification's batch x (gamma + 1) rows are compute-bound (a 2-core CPU), less is predicted
    cpu = dict(costs, roofline=targets.Roofline(bandwidth=40e9, flops=100e9, source="cpu"))
    on_cpu = speculative.predicted_speedup(0.8, 3, batch=16, context=8192, **cpu)
    assert on_cpu < speculative.predicted_speedup(0.8, 3, batch=16, context=8192, **costs) / 1.2
    # gamma=None at a short context decodes plainly, and says so
    out = jd.generate(tiny_model(), [[5, 17, 33]], max_new_tokens=6, speculative=jd.SelfSpeculative(budget=8, sinks=2))
    assert out.speculation["gamma"] == 0
    assert out.tokens == jd.generate(tiny_model(), [[5, 17, 33]], max_new_tokens=6).tokens


def test_bad_speculative_settings(smollm2):
    with pytest.raises(ValueError, match="sinks < budget"):
        jd.SelfSpeculative(budget=16, sinks=16)
    with pytest.raises(ValueError, match="gamma must be between 1 and 16"):
        jd.DraftModel(tiny_model(), gamma=0)
    with pytest.raises(ValueError, match="repetition penalty"):
        jd.generate(
            tiny_model(),
            [[1, 2]],
            sampling=jd.Sampling(repetition_penalty=1.2),
            speculative=jd.SelfSpeculative(budget=8, sinks=2),
        )
    with pytest.raises(ValueError, match="vocabulary .* must share the tokenizer"):
        jd.generate(smollm2, [[1, 2]], speculative=jd.DraftModel(tiny_model()))
