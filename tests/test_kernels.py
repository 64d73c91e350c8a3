"""The Pallas attention kernels: numerics in interpret mode against a float64 NumPy reference, lowering
for TPU and CUDA, the split heuristic, and the dispatch.

Tolerance (FlashAttention's rule): `max|out - ref| <= 3 * max|out_lowprec_ref - ref| + 1e-5`, where
`ref` is the float64 reference and `out_lowprec_ref` the same reference in the input's precision
(float32 arithmetic; for bfloat16 inputs also bfloat16 probabilities and output, as a plain bfloat16
attention has). Interpret mode fills every output and scratch buffer with NaN before the kernel runs
(checked below), so an output element the kernel forgets to write fails the comparison.
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.experimental import pallas as pl

import pallas_kernels as pk

HEAD_LAYOUTS = [(1, 1), (3, 1), (8, 1), (4, 4)]  # (group = Hq / Hkv, Hkv): 1:1, 3:1, 8:1 GQA, MQA (Hkv = 1)
INTERPRETED = ["interpret-tpu", "interpret-triton"]  # the TPU and the Triton kernel, in Pallas interpret mode
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


def attention_np(q, k, v, q_pos, kv_len, *, scale, slopes=None, window=None, sinks=0, softcap=None, lowprec=None):
    """Plain attention, one (batch, head) at a time. q `[B, Hq, Tq, D]`, k/v `[B, Hkv, S, D]`, q_pos
    `[B, Tq]`, kv_len `[B]`. float64 when `lowprec` is None; else float32 arithmetic with probabilities
    and output rounded to `lowprec` (the precision of a plain attention in that dtype)."""
    work = np.float64 if lowprec is None else np.float32
    q, k, v = (np.asarray(x, np.float32).astype(work) for x in (q, k, v))
    batch, num_heads, q_len, _ = q.shape
    group = num_heads // k.shape[1]
    out = np.zeros(q.shape, work)
    key_pos = np.arange(k.shape[2])[None, :]
    for b in range(batch):
        qp = np.asarray(q_pos[b])[:, None]
        visible = (key_pos <= qp) & (key_pos < kv_len[b])
        if window is not None:
            visible &= (key_pos > qp - window) | (key_pos < sinks)
        for h in range(num_heads):
            s = q[b, h] @ k[b, h // group].T * work(scale)
            if softcap is not None:
                s = np.tanh(s / softcap) * softcap
            if slopes is not None:
                s = s + work(slopes[h]) * (key_pos - qp)
            s = np.where(visible, s, -np.inf)
            p = np.exp(s - s.max(axis=1, keepdims=True))
            p = p / p.sum(axis=1, keepdims=True)
            if lowprec is not None:
                p = p.astype(lowprec).astype(work)
            out[b, h] = p @ v[b, h // group]
    return out if lowprec is None else out.astype(lowprec).astype(np.float64)


def assert_flash_rule(out, ref, lowprec_ref, valid_queries=None):
    """valid_queries bool `[B, Tq]` selects the queries to compare (right-padding queries are unspecified)."""
    out = np.asarray(out, np.float32).astype(np.float64)
    if valid_queries is not None:
        pick = np.broadcast_to(valid_queries[:, None, :], out.shape[:3])
        out, ref, lowprec_ref = out[pick], ref[pick], lowprec_ref[pick]
    assert np.isfinite(out).all(), "NaN/inf in the kernel output (an unwritten or poisoned element)"
    err, bound = np.max(np.abs(out - ref)), 3 * np.max(np.abs(lowprec_ref - ref)) + 1e-5
    assert err <= bound, f"max|out - ref| = {err:.3g} > {bound:.3g}"


def check_against_reference(out, q, k, v, q_pos, kv_len, valid_queries=None, **kwargs):
    """The FlashAttention rule for `out` against `attention_np` in float64 and in q's precision (kwargs:
    scale, slopes, window, sinks, softcap)."""
    if kwargs.get("slopes") is not None:
        kwargs["slopes"] = np.asarray(kwargs["slopes"])
    lowprec = ml_dtypes.bfloat16 if q.dtype == jnp.bfloat16 else np.float32
    with np.errstate(invalid="ignore"):  # padding queries that see no key are NaN in the reference
        ref = attention_np(q, k, v, q_pos, kv_len, **kwargs)
        low = attention_np(q, k, v, q_pos, kv_len, lowprec=lowprec, **kwargs)
    assert_flash_rule(out, ref, low, valid_queries)


def _inputs(rng, batch, group, num_kv_heads, q_len, kv_len, head_dim, dtype):
    def normal(*shape):
        return jnp.asarray(rng.normal(size=shape), dtype)

    num_heads = group * num_kv_heads
    return (
        normal(batch, num_heads, q_len, head_dim),
        normal(batch, num_kv_heads, kv_len, head_dim),
        normal(batch, num_kv_heads, kv_len, head_dim),
    )


def _slopes(rng, num_heads):
    return jnp.asarray(rng.uniform(0.01, 0.6, size=num_heads), jnp.float32)


def check_decode(
    seed,
    batch,
    heads,
    head_dim,
    q_len,
    capacity,
    lengths,
    splits,
    dtype,
    alibi,
    window,
    sinks,
    softcap=None,
    backend="interpret-tpu",
):
    rng = np.random.default_rng(seed)
    group, num_kv_heads = heads
    q, k, v = _inputs(rng, batch, group, num_kv_heads, q_len, capacity, head_dim, dtype)
    slopes = _slopes(rng, group * num_kv_heads) if alibi else None
    lengths = np.asarray(lengths, np.int32)
    out = pk.decode_attention(
        q,
        k,
        v,
        jnp.asarray(lengths),
        num_splits=splits,
        alibi_slopes=slopes,
        window=window,
        sinks=sinks,
        softcap=softcap,
        backend=backend,
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    q_pos = lengths[:, None] - q_len + np.arange(q_len)[None, :]
    check_against_reference(
        out, q, k, v, q_pos, lengths, scale=head_dim**-0.5, slopes=slopes, window=window, sinks=sinks, softcap=softcap
    )


@st.composite
def decode_cases(draw):
    q_len = draw(st.sampled_from([1, 4]))
    capacity = draw(st.sampled_from([32, 96, 160]))
    batch = draw(st.integers(1, 3))
    # Ragged lengths, with the extremes (only the new queries; the whole cache) drawn often.
    length = st.one_of(st.just(q_len), st.just(capacity), st.integers(q_len, capacity))
    window = draw(st.sampled_from([None, 7, 40]))
    return dict(
        seed=draw(st.integers(0, 2**16)),
        batch=batch,
        heads=draw(st.sampled_from(HEAD_LAYOUTS)),
        head_dim=draw(st.sampled_from([64, 128, 256])),  # 256: Gemma
        q_len=q_len,
        capacity=capacity,
        lengths=[draw(length) for _ in range(batch)],
        splits=draw(st.sampled_from([1, 2, None, "max"])),
        dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
        alibi=draw(st.booleans()),
        window=window,
        sinks=draw(st.sampled_from([0, 4])) if window else 0,
        softcap=draw(st.sampled_from([None, 3.0])),  # Gemma 2 caps scores
    )


def _block_kv(capacity, head_dim, dtype, backend):
    problem = pk.common.Problem(1, 1, 1, 1, capacity, head_dim, 1.0, None, 0, None, False)
    if backend == "interpret-triton":
        return pk.triton.block_sizes(problem, dtype)[1]
    return pk.tpu.block_sizes(problem, dtype)[1]


@pytest.mark.parametrize("backend", INTERPRETED)
@settings(max_examples=25, deadline=None)
@given(case=decode_cases())
def test_decode_kernel_matches_float64_reference(backend, case):
    if case["splits"] == "max":  # one split per KV block: the most the kernel can use
        case["splits"] = -(-case["capacity"] // _block_kv(case["capacity"], case["head_dim"], case["dtype"], backend))
    check_decode(**case, backend=backend)


@pytest.mark.parametrize("backend", INTERPRETED)
@pytest.mark.parametrize("splits", [1, 2, 3, 6])
def test_decode_empty_chunks_and_extreme_lengths(splits, backend):
    """Lengths 1 and S with many splits: most chunks of the short row are empty and must add nothing."""
    check_decode(0, 2, (3, 2), 64, 1, 96, [1, 96], splits, jnp.float32, False, None, 0, backend=backend)


@pytest.mark.parametrize("backend", INTERPRETED)
def test_decode_streaming_view_skips_the_middle(backend):
    """sinks + window (the self-speculation draft view) over a long cache, verify-shaped queries."""
    check_decode(1, 2, (8, 1), 64, 4, 512, [512, 300], 4, jnp.float32, False, 64, 16, backend=backend)


def test_decode_softcap():
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, 1, 2, 2, 1, 64, 64, jnp.float32)
    lengths = np.array([50], np.int32)
    out = pk.decode_attention(q, k, v, jnp.asarray(lengths), softcap=5.0, backend="interpret", num_splits=2)
    q_pos = lengths[:, None] - 1
    check_against_reference(out, q, k, v, q_pos, lengths, scale=0.125, softcap=5.0)


@st.composite
def prefill_cases(draw):
    seq = draw(st.sampled_from([16, 37, 160]))
    batch = draw(st.integers(1, 2))
    causal = draw(st.booleans())
    return dict(
        seed=draw(st.integers(0, 2**16)),
        batch=batch,
        heads=draw(st.sampled_from(HEAD_LAYOUTS)),
        head_dim=draw(st.sampled_from([64, 128, 256])),
        seq=seq,
        lengths=draw(st.none() | st.lists(st.integers(1, seq), min_size=batch, max_size=batch)),
        dtype=draw(st.sampled_from([jnp.float32, jnp.bfloat16])),
        causal=causal,
        alibi=causal and draw(st.booleans()),
        window=draw(st.sampled_from([None, 9])) if causal else None,
        softcap=draw(st.sampled_from([None, 3.0])),
    )


@pytest.mark.parametrize("backend", INTERPRETED)
@settings(max_examples=15, deadline=None)
@given(case=prefill_cases())
def test_prefill_kernel_matches_float64_reference(backend, case):
    rng = np.random.default_rng(case["seed"])
    group, num_kv_heads = case["heads"]
    seq, dtype, lengths = case["seq"], case["dtype"], case["lengths"]
    q, k, v = _inputs(rng, case["batch"], group, num_kv_heads, seq, seq, case["head_dim"], dtype)
    slopes = _slopes(rng, group * num_kv_heads) if case["alibi"] else None
    out = pk.flash_attention(
        q,
        k,
        v,
        causal=case["causal"],
        lengths=None if lengths is None else jnp.asarray(lengths, jnp.int32),
        alibi_slopes=slopes,
        window=case["window"],
        softcap=case["softcap"],
        backend=backend,
    )
    kv_len = np.full(case["batch"], seq) if lengths is None else np.asarray(lengths)
    q_pos = np.broadcast_to(np.arange(seq) if case["causal"] else np.full(seq, seq), (case["batch"], seq))
    valid = np.arange(seq)[None, :] < kv_len[:, None]
    check_against_reference(
        out,
        q,
        k,
        v,
        q_pos,
        kv_len,
        valid,
        scale=case["head_dim"] ** -0.5,
        slopes=slopes,
        window=case["window"],
        softcap=case["softcap"],
    )


@pytest.mark.parametrize("heads", HEAD_LAYOUTS)
def test_jax_ops_peers_match_float64_reference(heads):
    """JAX's own kernels (backend "jax-ops": Triton decode and prefill), in interpret mode, under the same
    rule as ours, on the cases they cover (one query per row; causal prefill; ragged lengths)."""
    group, num_kv_heads = heads
    dtype = jnp.bfloat16  # they take 16-bit inputs only (see jax_ops.supports)
    check_decode(3, 3, heads, 64, 1, 256, [1, 256, 100], None, dtype, False, None, 0, backend="interpret-jax-ops")
    rng = np.random.default_rng(5)
    q, k, v = _inputs(rng, 2, group, num_kv_heads, 128, 128, 128, dtype)
    lengths = np.array([128, 70], np.int32)
    out = pk.flash_attention(q, k, v, lengths=jnp.asarray(lengths), backend="interpret-jax-ops")
    q_pos = np.broadcast_to(np.arange(128), (2, 128))
    valid = np.arange(128)[None, :] < lengths[:, None]
    check_against_reference(out, q, k, v, q_pos, lengths, valid, scale=128**-0.5)


def test_jax_ops_refuse_what_they_do_not_cover():
    q, kv = jnp.zeros((1, 4, 1, 64), jnp.bfloat16), jnp.zeros((1, 2, 256, 64), jnp.bfloat16)
    for features in (dict(window=16), dict(softcap=5.0), dict(alibi_slopes=jnp.zeros(4))):
        with pytest.raises(ValueError, match="JAX's own kernels"):
            pk.decode_attention(q, kv, kv, jnp.array([9]), backend="interpret-jax-ops", **features)
    with pytest.raises(ValueError, match="JAX's own kernels"):  # a verify block: 4 queries per row
        pk.decode_attention(jnp.zeros((1, 4, 4, 64), jnp.bfloat16), kv, kv, jnp.array([9]), backend="interpret-jax-ops")
    with pytest.raises(ValueError, match="JAX's own kernels"):  # float32
        pk.decode_attention(q.astype(jnp.float32), *[kv.astype(jnp.float32)] * 2, jnp.array([9]), backend="jax-ops")


def test_interpret_mode_poisons_outputs():
    """The premise of the NaN check above: interpret mode starts outputs as NaN, so skipped writes show."""

    def writes_nothing(x_ref, o_ref):
        pass

    out = pl.pallas_call(writes_nothing, out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32), interpret=True)(
        jnp.zeros((8, 128), jnp.float32)
    )
    assert np.isnan(np.asarray(out)).all()


# ---------------------------------------------------------------------------------------------------
# Lowering for TPU and CUDA, traced on this CPU.

LOWERING_SHAPES = [  # batch, Hq, Hkv, Tq, S, D, dtype
    (1, 9, 3, 1, 2048, 64, jnp.bfloat16),  # SmolLM2 decode
    (4, 32, 8, 16, 1024, 128, jnp.bfloat16),  # GQA 4:1, verify-shaped
    (2, 8, 1, 1, 4096, 128, jnp.float16),  # MQA
    (1, 4, 4, 1, 520, 64, jnp.bfloat16),  # S not a multiple of the KV block
    (1, 4, 1, 1, 1024, 256, jnp.bfloat16),  # Gemma 3 270M: MQA, head_dim 256
]
MARKER = {"tpu": "tpu_custom_call", "triton": "__gpu$xla.gpu.triton", "mosaic-gpu": "mosaic_gpu"}
AUTO_KERNEL = {"tpu": "tpu", "cuda": "triton"}  # what `auto` lowers to per platform


def _lowered(fn, platform, *args):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()


def _shapes(batch, num_heads, num_kv_heads, q_len, kv_len, head_dim, dtype):
    return (
        jax.ShapeDtypeStruct((batch, num_heads, q_len, head_dim), dtype),
        jax.ShapeDtypeStruct((batch, num_kv_heads, kv_len, head_dim), dtype),
        jax.ShapeDtypeStruct((batch, num_kv_heads, kv_len, head_dim), dtype),
    )


LOWERINGS = [("tpu", "tpu"), ("cuda", "triton"), ("cuda", "mosaic-gpu"), ("tpu", "auto"), ("cuda", "auto")]


def _marker(platform, backend):
    return MARKER[AUTO_KERNEL[platform] if backend == "auto" else backend]


@pytest.mark.parametrize("platform,backend", LOWERINGS)
@pytest.mark.parametrize("shape", LOWERING_SHAPES, ids=lambda s: "x".join(map(str, s[:6])))
def test_decode_kernel_lowers(platform, backend, shape):
    q, k, v = _shapes(*shape)
    batch, num_heads = shape[0], shape[1]
    lengths = jax.ShapeDtypeStruct((batch,), jnp.int32)
    slopes = jax.ShapeDtypeStruct((num_heads,), jnp.float32)

    def fn(q, k, v, lengths, slopes):
        return pk.decode_attention(
            q, k, v, lengths, alibi_slopes=slopes, window=256, sinks=16, softcap=50.0, backend=backend
        )

    assert _marker(platform, backend) in _lowered(fn, platform, q, k, v, lengths, slopes)


@pytest.mark.parametrize("platform,backend", LOWERINGS)
@pytest.mark.parametrize(
    "shape", [(1, 9, 3, 512, 64), (2, 8, 1, 1024, 128), (1, 4, 2, 200, 64), (1, 4, 1, 512, 256)], ids=str
)
def test_prefill_kernel_lowers(platform, backend, shape):
    batch, num_heads, num_kv_heads, seq, head_dim = shape
    q, k, v = _shapes(batch, num_heads, num_kv_heads, seq, seq, head_dim, jnp.bfloat16)

    def fn(q, k, v):
        return pk.flash_attention(q, k, v, window=128, softcap=50.0, backend=backend)

    assert _marker(platform, backend) in _lowered(fn, platform, q, k, v)


def test_auto_is_chosen_per_lowering_platform():
    """One traced function: the TPU kernel for tpu, the Triton kernel for cuda, plain XLA for cpu; on CUDA a
    head_dim Triton cannot tile (not a power of two: Phi-3's 96) falls back to XLA."""
    lengths = jax.ShapeDtypeStruct((1,), jnp.int32)
    traced = jax.jit(lambda q, k, v, n: pk.decode_attention(q, k, v, n))
    cases = [
        (jnp.bfloat16, 64, {"tpu": True, "cuda": True}),
        (jnp.float32, 64, {"tpu": True, "cuda": True}),
        (jnp.bfloat16, 96, {"tpu": True, "cuda": False}),
    ]
    for dtype, head_dim, expect in cases:
        args = (*_shapes(1, 9, 3, 1, 1024, head_dim, dtype), lengths)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            texts = {p: traced.trace(*args).lower(lowering_platforms=(p,)).as_text() for p in ("cpu", "tpu", "cuda")}
        assert not any(m in texts["cpu"] for m in MARKER.values())
        for platform, has_kernel in expect.items():
            assert (_marker(platform, "auto") in texts[platform]) == has_kernel, (dtype, head_dim, platform)


# ---------------------------------------------------------------------------------------------------
# Split heuristic and dispatch.


def test_split_heuristic_follows_flash_attention_2():
    # Enough parallel work (>= 80% of the cores): never split.
    assert pk.num_splits_heuristic(num_blocks=106, num_cores=132, num_kv_blocks=64) == 1
    # FlashAttention-3: 4 KV blocks or fewer are never split.
    assert pk.num_splits_heuristic(num_blocks=1, num_cores=132, num_kv_blocks=4) == 1
    # SmolLM2 at batch 1 (3 KV heads), 32 KV blocks: efficiency 3s/132 grows up to s = 32, and only
    # s = 32 reaches 85% of it among the eligible counts (17..31 give the same chunk size as 16).
    assert pk.num_splits_heuristic(num_blocks=3, num_cores=132, num_kv_blocks=32) == 32
    # 48 blocks on 132 cores, 1024 KV blocks: wave efficiency 48s/132 / ceil(48s/132) is .36, .73, .55,
    # .73, .91 for s = 1..5 and peaks at 1.0 (s = 11); s = 5 is the first >= 0.85 * 1.0.
    assert pk.num_splits_heuristic(num_blocks=48, num_cores=132, num_kv_blocks=1024) == 5
    # One TensorCore: splitting cannot help.
    assert pk.num_splits_heuristic(num_blocks=1, num_cores=1, num_kv_blocks=64) == 1


def test_bad_arguments_are_named():
    q = jnp.zeros((1, 4, 1, 64))
    kv = jnp.zeros((1, 3, 32, 64))
    with pytest.raises(ValueError, match="Hq divisible by Hkv"):
        pk.decode_attention(q, kv, kv, jnp.array([4]))
    kv = jnp.zeros((1, 2, 32, 64))
    with pytest.raises(ValueError, match="unknown attention backend 'cuda'"):
        pk.decode_attention(q, kv, kv, jnp.array([4]), backend="cuda")
    with pytest.raises(ValueError, match="num_splits must be >= 1"):
        pk.decode_attention(q, kv, kv, jnp.array([4]), num_splits=0)
    with pytest.raises(ValueError, match=r"alibi_slopes must be \[Hq\]"):
        pk.decode_attention(q, kv, kv, jnp.array([4]), alibi_slopes=jnp.zeros(2))
    with pytest.raises(ValueError, match="need causal=True"):
        pk.flash_attention(q, kv[:, :, :1], kv[:, :, :1], causal=False, window=4)


# ---------------------------------------------------------------------------------------------------
# Which KV blocks each kernel reads: exactly the visible ones (checked by brute force over keys). This is
# the logic of the GPU kernels' dynamic loop and of the TPU kernel's skipping, in plain JAX on the CPU.


def _visible_blocks_brute_force(problem, q_offset, kv_len, t_values, block_kv):
    keys = np.arange(problem.kv_capacity)
    seen = np.zeros(problem.kv_capacity, bool)
    for t in t_values:
        p = q_offset + t
        visible = (keys <= p) & (keys < kv_len)
        if problem.window is not None:
            visible &= (keys > p - problem.window) | (keys < problem.sinks)
        seen |= visible
    return sorted({int(k) // block_kv for k in keys[seen]})


BLOCK_CASES = [  # q_len, group, capacity, window, sinks, (q_offset, kv_len) pairs
    (1, 3, 2048, None, 0, [(0, 1), (99, 100), (2047, 2048)]),
    (4, 8, 2048, 512, 16, [(0, 4), (600, 604), (2044, 2048), (1000, 1004)]),
    (16, 2, 1024, 64, 0, [(0, 16), (500, 516)]),
    (1, 1, 4096, 100, 130, [(4095, 4096), (129, 130), (300, 301)]),  # sinks spanning 3 blocks of 64
]


@pytest.mark.parametrize("case", BLOCK_CASES, ids=str)
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_gpu_kernels_walk_exactly_the_visible_blocks(case, num_splits):
    q_len, group, capacity, window, sinks, rows = case
    problem = pk.common.Problem(1, 1, group, q_len, capacity, 64, 1.0, window, sinks, None, False)
    blocks_per_split = -(-(capacity // pk.gpu.BLOCK_KV) // num_splits)
    for q_offset, kv_len in rows:
        walked = []
        for split in range(num_splits):
            kv_block, count = pk.common.split_blocks(
                problem, q_offset, kv_len, 0, split, blocks_per_split, pk.gpu.BLOCK_ROWS, pk.gpu.BLOCK_KV
            )
            blocks = [int(kv_block(i)) for i in range(int(count))]
            assert all(split * blocks_per_split <= b < (split + 1) * blocks_per_split for b in blocks)
            walked += blocks
        expected = _visible_blocks_brute_force(problem, q_offset, kv_len, range(q_len), pk.gpu.BLOCK_KV)
        assert walked == expected, (q_offset, kv_len)


@pytest.mark.parametrize("case", BLOCK_CASES, ids=str)
@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_tpu_kernel_computes_visible_blocks_and_fetches_little_else(case, num_splits):
    q_len, group, capacity, window, sinks, rows = case
    problem = pk.common.Problem(1, 1, group, q_len, capacity, 64, 1.0, window, sinks, None, False)
    block_rows, block_kv = pk.tpu.block_sizes(problem, jnp.float32)
    num_blocks = capacity // block_kv
    blocks_per_split = -(-num_blocks // num_splits)
    for q_offset, kv_len in rows:
        computed, dmas = [], 0
        for split in range(num_splits):
            previous = None
            for step in range(blocks_per_split):
                kv_block = split * blocks_per_split + step
                visible, fetch = pk.tpu._visible_block(
                    problem, q_offset, kv_len, 0, block_rows, min(kv_block, num_blocks - 1), block_kv
                )
                if bool(visible) and kv_block < num_blocks:
                    computed.append(kv_block)
                    assert int(fetch) == kv_block  # a computed block is the one in VMEM
                dmas += int(fetch) != previous  # Pallas copies a block only when its index changes
                previous = int(fetch)
        expected = _visible_blocks_brute_force(problem, q_offset, kv_len, range(q_len), block_kv)
        assert computed == expected
        assert dmas <= len(expected) + num_splits  # at most one wasted copy per split


@pytest.mark.parametrize(
    "window,alibi,softcap,dtype",
    [(None, False, None, jnp.float32), (None, True, 3.0, jnp.float32), (200, True, 3.0, jnp.bfloat16)],
)
def test_xla_long_prefill_matches_float64_reference(window, alibi, softcap, dtype):
    """Long prompts take the blocked XLA prefill: query blocks against only the key blocks they see (with
    window 200 the last query block skips the first key block), without a mask where every query of
    the block sees the whole key block (the last query block's first key block without a window)."""
    rng = np.random.default_rng(7)
    seq = 1100  # three key blocks, the last one partial; three query blocks
    q, k, v = _inputs(rng, 2, 3, 1, seq, seq, 64, dtype)
    slopes = _slopes(rng, 3) if alibi else None
    lengths = np.array([seq, 700], np.int32)
    out = pk.flash_attention(
        q, k, v, lengths=jnp.asarray(lengths), alibi_slopes=slopes, window=window, softcap=softcap, backend="xla"
    )
    q_pos = np.broadcast_to(np.arange(seq), (2, seq))
    valid = np.arange(seq)[None, :] < lengths[:, None]
    check_against_reference(
        out, q, k, v, q_pos, lengths, valid, scale=0.125, slopes=slopes, window=window, softcap=softcap
    )
