"""Real compiles for TPU and CUDA targets from this CPU machine (`jaxdecode.targets`, the `aot` extra).

Lowering is not compiling: here XLA:TPU and Mosaic (TPU v5e, v6e) and XLA:GPU with Triton (H100 sm_90,
A100 sm_80, L4 sm_89) build every kernel configuration the numerics tests cover and the whole generation
programs, with abstract parameters. A Mosaic layout error, a Triton kernel over a GPU's shared memory or
an HBM overflow fails here. These need the compilers: the README's test command installs them
(`.[test,aot]`); without them the tests fail, naming the install, rather than skip.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import SingleDeviceSharding

import jaxdecode as jd
import pallas_kernels as pk
from jaxdecode import plan as jp
from jaxdecode import targets

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

TPU_CHIPS = ("v5e-1", "v6e-1")
GPUS = ("h100", "a100", "l4")


def _device(name: str):
    return targets.compile_only_devices(name)[0]


def _compile(fn, device, *shapes) -> None:
    sharding = SingleDeviceSharding(device)
    args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in shapes]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        compiled = jax.jit(fn).lower(*args).compile()
    assert compiled.memory_analysis().argument_size_in_bytes > 0


def _s(*shape, dtype=jnp.bfloat16):
    return jax.ShapeDtypeStruct(shape, dtype)


def test_the_compilers_are_installed():
    for platform in ("tpu", "cuda"):
        assert targets.compilers_installed(platform), f"the {platform} compiler is missing: {targets.AOT_INSTALL}"


# ---------------------------------------------------------------------------------------------------
# Kernels. The numerics tests draw dtype, head_dim, head layout, Tq, capacity and the features (ALiBi,
# window + sinks, softcap) at random; here every value of each is compiled, with capacities (ragged, not a
# multiple of the block, long) and features cycled over the product of the rest.

HEAD_LAYOUTS = [(1, 1), (3, 1), (8, 1), (4, 4)]  # (group, Hkv) as in test_kernels
CAPACITIES = [32, 96, 160, 520, 2048]
FEATURES = [{}, dict(window=40, sinks=4, softcap=3.0, alibi=True), dict(window=7), dict(softcap=50.0, alibi=True)]


def _decode_cases(dtypes, q_lens):
    grid = itertools.product(dtypes, [64, 128, 256], HEAD_LAYOUTS, q_lens)
    for i, (dtype, head_dim, (group, kv_heads), q_len) in enumerate(grid):
        yield dtype, head_dim, group, kv_heads, q_len, CAPACITIES[i % len(CAPACITIES)], FEATURES[i % len(FEATURES)]


def _compile_decode(device, backend, dtype, head_dim, group, kv_heads, q_len, capacity, features):
    features = dict(features)
    alibi = features.pop("alibi", False)
    heads, batch = group * kv_heads, 2
    shapes = [
        _s(batch, heads, q_len, head_dim, dtype=dtype),
        *[_s(batch, kv_heads, capacity, head_dim, dtype=dtype)] * 2,
    ]
    shapes += [_s(batch, dtype=jnp.int32)] + ([_s(heads, dtype=jnp.float32)] if alibi else [])

    def fn(q, k, v, lengths, *slopes):
        slopes = slopes[0] if slopes else None
        return pk.decode_attention(q, k, v, lengths, alibi_slopes=slopes, backend=backend, **features)

    _compile(fn, device, *shapes)


def _compile_prefill(device, backend, dtype, head_dim, group, kv_heads, seq, features, ragged):
    features = dict(features)
    features.pop("sinks", None)
    alibi = features.pop("alibi", False)
    heads = group * kv_heads
    shapes = [_s(2, heads, seq, head_dim, dtype=dtype), *[_s(2, kv_heads, seq, head_dim, dtype=dtype)] * 2]
    shapes += ([_s(2, dtype=jnp.int32)] if ragged else []) + ([_s(heads, dtype=jnp.float32)] if alibi else [])

    def fn(q, k, v, *rest):
        lengths = rest[0] if ragged else None
        slopes = rest[-1] if alibi else None
        return pk.flash_attention(q, k, v, lengths=lengths, alibi_slopes=slopes, backend=backend, **features)

    _compile(fn, device, *shapes)


@pytest.mark.parametrize("chip,every", [("v5e-1", 1), ("v6e-1", 2)])
def test_tpu_kernels_compile(chip, every):
    """Every decode configuration for v5e, every other one for v6e (each dtype, head_dim and Tq still)."""
    device = _device(chip)
    for i, case in enumerate(_decode_cases([jnp.float32, jnp.bfloat16], [1, 4, 16])):
        if i % every == 0:
            _compile_decode(device, "tpu", *case)
    for i, (dtype, head_dim, (group, kv_heads)) in enumerate(
        itertools.product([jnp.float32, jnp.bfloat16], [64, 128, 256], HEAD_LAYOUTS)
    ):
        seq = [8, 200, 1024][i % 3]
        _compile_prefill(device, "tpu", dtype, head_dim, group, kv_heads, seq, FEATURES[i % len(FEATURES)], i % 2 == 0)


def _compile_triton(gpu: str, every: int) -> None:
    device = _device(gpu)
    for i, case in enumerate(_decode_cases([jnp.float32, jnp.bfloat16, jnp.float16], [1, 16])):
        if i % every == 0:
            _compile_decode(device, "triton", *case)
    for i, (dtype, head_dim) in enumerate(itertools.product([jnp.float32, jnp.bfloat16, jnp.float16], [64, 128, 256])):
        _compile_prefill(device, "triton", dtype, head_dim, 4, 2, [200, 1024][i % 2], FEATURES[1], i % 2 == 0)


@pytest.mark.parametrize("gpu,every", [("l4", 6), ("h100", 6), pytest.param("a100", 6, marks=pytest.mark.slow)])
def test_triton_kernels_compile(gpu, every):
    """The Triton kernel becomes a GPU binary at XLA compile time, against this GPU's shared memory (the L4
    has the least: 101,376 bytes per block). Every sixth decode configuration (each dtype, head_dim and Tq
    still); all of them for all three GPUs in the slow set."""
    _compile_triton(gpu, every)


@pytest.mark.slow
@pytest.mark.parametrize("gpu", GPUS)
def test_triton_kernels_compile_all(gpu):
    _compile_triton(gpu, 1)


@pytest.mark.parametrize("gpu", ["h100", *(pytest.param(g, marks=pytest.mark.slow) for g in GPUS if g != "h100")])
def test_jax_ops_peers_compile(gpu):
    """JAX's own Triton kernels (backend "jax-ops") in the 16-bit dtypes they take. (In float32 their default
    blocks overflow shared memory: prefill on all three GPUs, 4k-context decode on the L4; `jax_ops.supports`
    refuses float32 for that reason.)"""
    device = _device(gpu)
    for dtype, (group, kv_heads), capacity in itertools.product(
        [jnp.float16, jnp.bfloat16], [(1, 1), (8, 1), (4, 4)], [256, 4096]
    ):
        _compile_decode(device, "jax-ops", dtype, 128, group, kv_heads, 1, capacity, {})
    for dtype in (jnp.float16, jnp.bfloat16):
        _compile_prefill(device, "jax-ops", dtype, 128, 4, 2, 1024, {}, True)


def test_triton_kernel_over_shared_memory_is_refused_by_the_compiler(monkeypatch):
    """The premise of the GPU checks: the compile enforces the GPU's shared-memory limit (L4: 101,376
    bytes), so a block size too large for it fails here, not on a user's GPU."""
    monkeypatch.setattr(pk.triton, "_TILE_BYTES", 65536)
    with pytest.raises(Exception, match="Shared memory size limit exceeded"):
        _compile_decode(_device("l4"), "triton", jnp.float32, 128, 3, 1, 16, 2048, {})


def test_auto_compiles_to_each_platforms_kernel():
    """`auto` is the TPU kernel on TPU and the Triton kernel on CUDA, in the compiled programs."""
    shapes = [_s(1, 8, 1, 128), _s(1, 2, 1024, 128), _s(1, 2, 1024, 128), _s(1, dtype=jnp.int32)]
    for name, marker in [("v5e-1", "tpu_custom_call"), ("h100", "__gpu$xla.gpu.triton")]:
        sharding = SingleDeviceSharding(_device(name))
        args = [jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding) for s in shapes]
        text = jax.jit(lambda q, k, v, n: pk.decode_attention(q, k, v, n)).lower(*args).compile().as_text()
        assert marker in text, name


# ---------------------------------------------------------------------------------------------------
# Whole programs: prefill + decode loop (float, int8, int4), the speculative loop and the sharded programs,
# with abstract params, as `jaxdecode.plan` builds them.

SMALL_LLAMA = jd.ModelConfig(
    family="llama",
    vocab_size=1024,
    d_model=512,
    num_layers=2,
    num_heads=8,
    num_kv_heads=2,
    head_dim=64,
    ffn_dim=1024,
    max_seq_len=2048,
    tie_embeddings=False,
)
# Gemma 3's shape: head_dim 256, a sliding and a full layer (two windows in one program), QK-norm.
SMALL_GEMMA3 = jd.ModelConfig(
    family="gemma3",
    vocab_size=1024,
    d_model=256,
    num_layers=2,
    num_heads=4,
    num_kv_heads=1,
    head_dim=256,
    ffn_dim=512,
    max_seq_len=2048,
    norm_offset=1.0,
    activation="gelu_tanh",
    embed_scale=True,
    sliding_window=128,
    layer_types=("sliding", "full"),
    rope_local_theta=10000.0,
    qk_norm=True,
    sandwich_norm=True,
)
# Gemma 4's shapes: head_dim 256 in sliding layers and 512 in the full one, the last layer reading layer
# 0's K/V (no cache of its own) with a double-wide MLP, per-layer inputs, proportional RoPE.
SMALL_GEMMA4 = SMALL_GEMMA3.replace(
    family="gemma4",
    num_layers=3,
    norm_offset=0.0,
    layer_types=("sliding", "full", "sliding"),
    layer_head_dims=(256, 512, 256),
    kv_shared_layers=1,
    double_wide_shared_mlp=True,
    v_norm=True,
    attn_scale=1.0,
    rope_scaling=jd.RopeScaling("proportional", 1.0, rotary_fraction=0.25),
    per_layer_dim=64,
    per_layer_vocab=1024,
    layer_scalar=True,
)
# A mixture of experts: 8 experts, top-2, split over the model axis (two per chip on model=4).
SMALL_MIXTRAL = SMALL_LLAMA.replace(family="mixtral", num_experts=8, experts_per_token=2, expert_ffn_dim=1024)
WORKLOAD = jp.Workload(batch=4, prompt_len=256, new_tokens=32)
PROGRAMS = [  # (config, workload changes, mesh (data, model))
    (SMALL_LLAMA, {}, (1, 1)),
    (SMALL_LLAMA, dict(quant="int8"), (1, 1)),
    (SMALL_LLAMA, dict(quant="int4"), (1, 1)),
    (SMALL_LLAMA, dict(gamma=3), (1, 1)),
    (SMALL_LLAMA, dict(dtype="float32"), (1, 1)),
    (SMALL_GEMMA3, {}, (1, 1)),
    (SMALL_GEMMA4, {}, (1, 1)),
    (SMALL_LLAMA, {}, (1, 4)),
    (SMALL_LLAMA, {}, (2, 2)),
    (SMALL_LLAMA, dict(gamma=3), (2, 2)),
    (SMALL_LLAMA, dict(quant="int8"), (4, 1)),
    (SMALL_LLAMA, dict(quant="int8"), (1, 4)),  # quantized tensor parallelism
    (SMALL_LLAMA, dict(quant="int4"), (2, 2)),
    (SMALL_MIXTRAL, {}, (1, 1)),
    (SMALL_MIXTRAL, {}, (2, 2)),  # expert parallelism on v5e:2x2
    (SMALL_MIXTRAL, dict(quant="int8"), (1, 4)),
]


def _program_id(case):
    config, changes, (data, model) = case
    return f"{config.family}-{'-'.join(f'{k}={v}' for k, v in changes.items()) or 'bf16'}-{data}x{model}"


ONE_DEVICE = [case for case in PROGRAMS if case[2] == (1, 1)]
SHARDED = [case for case in PROGRAMS if case[2] != (1, 1)]
# The default set leaves out float32 (rare on accelerators); on one GPU int4 too, and on the A100 (sm_80)
# also the speculative and Gemma 3 programs the H100 (sm_90) builds. The slow set compiles all of them.
# On the TPU also Llama's int4 on one chip, bf16 on 2x2 and int8 on data=4 (the 2x2 and 1x4 cases build the same code).
LEFT_FOR_SLOW = [(dict(quant="int4"), (1, 1)), ({}, (2, 2)), (dict(quant="int8"), (4, 1))]
TPU_PROGRAMS = [
    c
    for c in PROGRAMS
    if c[1].get("dtype") != "float32" and not (c[0] is SMALL_LLAMA and (c[1], c[2]) in LEFT_FOR_SLOW)
]
GPU_PROGRAMS = [c for c in ONE_DEVICE if c[1].get("quant") != "int4" and c[1].get("dtype") != "float32"]
A100_PROGRAMS = [c for c in GPU_PROGRAMS if c[0] is SMALL_LLAMA and "gamma" not in c[1]]


@pytest.mark.parametrize(
    "target,cases",
    [
        ("v5e-4", TPU_PROGRAMS),
        ("h100", GPU_PROGRAMS),
        ("a100", A100_PROGRAMS),
        pytest.param("h100-8", SHARDED, marks=pytest.mark.slow),
    ],
)
def test_generation_programs_compile(target, cases):
    _compile_programs(target, cases)


@pytest.mark.slow
@pytest.mark.parametrize(
    "target,cases", [("h100", ONE_DEVICE), ("a100", ONE_DEVICE), ("a100-8", SHARDED), ("v6e-4", PROGRAMS)]
)
def test_more_generation_programs_compile(target, cases):
    _compile_programs(target, cases)


def _compile_programs(target, cases):
    devices = targets.compile_only_devices(target)
    for case in cases:
        config, changes, (data, model) = case
        workload = jp.Workload(**{**WORKLOAD.__dict__, **changes})
        program, args = jp.generation_program(config, workload, devices, data, model)
        stats = program.lower(*args).compile().memory_analysis()
        analytic = jp.analytic_bytes(config, workload, data, model)
        # The compiler's per-device argument bytes are the params' shard (plus a few small inputs).
        assert analytic["params"] <= stats.argument_size_in_bytes <= 1.01 * analytic["params"] + 65536, _program_id(
            case
        )


# ---------------------------------------------------------------------------------------------------
# `jaxdecode plan`.


def test_plan_reports_the_compilers_figures_and_overflow():
    """A workload over one v5e's HBM is refused by XLA:TPU in its own words; on four chips (model=4)
    it fits with the compiled program's peak; the analytic estimate is within 10% of the compiled params + KV."""
    # KV cache: 4 layers x K and V x 640 rows x 8 heads x 2048 slots x 128 x 2 bytes = 20 GiB > 16 GiB.
    heavy = jp.Workload(batch=640, prompt_len=1024, new_tokens=1024)
    big = SMALL_LLAMA.replace(num_layers=4, num_kv_heads=8, head_dim=128, num_heads=8, d_model=1024, max_seq_len=4096)
    report = jp.plan(big, "v5e-1", heavy)
    assert report["analytic_bytes"]["kv_cache"] == 20 * 2**30
    assert report["compiled"] and not report["fits"], report
    assert "RESOURCE_EXHAUSTED" in report["compiler_message"] and "HBM" in report["compiler_message"]
    report = jp.plan(big, "v5e-4", heavy, mesh=(1, 4))
    assert report["fits"] and report["mesh"] == {"data": 1, "model": 4}
    # (That the peak is the compiled program's own `memory_analysis` is checked by recompiling in the slow
    # `test_plan_llama_3_1_8b`.)
    compiled = report["per_device_bytes"]["params"] + report["per_device_bytes"]["kv_cache"]
    analytic = report["analytic_bytes"]["params"] + report["analytic_bytes"]["kv_cache"]
    assert abs(analytic - compiled) <= 0.1 * compiled
    assert report["decode_tokens_per_s"] > 0


def test_plan_cli_json_from_a_config_directory(tmp_path):
    """`jaxdecode plan` on a directory with only a config.json; the analytic fallback when asked."""
    (tmp_path / "config.json").write_text((jp.PRESETS / "qwen3-8b.json").read_text())
    command = [sys.executable, "-m", "jaxdecode.cli", "plan", "--model", str(tmp_path), "--target", "h100", "--json"]
    command += ["--batch", "1", "--context", "512", "--new-tokens", "16", "--analytic"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    keys = {"target", "mesh", "fits", "compiled", "per_device_bytes", "device_memory_bytes", "compiler_message"}
    assert keys | {"decode_step_s", "decode_tokens_per_s"} <= set(report)
    assert report["fits"] and not report["compiled"] and report["mesh"] == {"data": 1, "model": 1}
    # Qwen3-8B in bf16: 8.19 G parameters, 2 bytes each.
    assert 16.0e9 < report["per_device_bytes"]["params"] < 16.8e9


def test_quantized_shapes_match_quantizing():
    """`quantize_abstract` (what plan compiles) gives exactly the leaves that quantizing real weights gives."""
    import numpy as np

    from jaxdecode.model import init_params
    from jaxdecode.quantize import quantize_params
    from jaxdecode.weights import to_model_layout

    floats = init_params(SMALL_LLAMA, jax.random.key(0))
    for quant in ("int8", "int4"):
        host = to_model_layout(jax.tree.map(np.asarray, floats))  # back to the loaders' [out, in]
        real = quantize_params(host, quant)
        abstract = jp.abstract_params(SMALL_LLAMA, jp.Workload(dtype="float32", quant=quant))
        same = jax.tree.map(lambda a, b: (a.shape, a.dtype) == (b.shape, b.dtype), real, abstract)
        assert all(jax.tree.leaves(same)) and jax.tree.structure(real) == jax.tree.structure(abstract), quant


def test_without_the_compilers_plan_estimates_and_says_so(monkeypatch):
    monkeypatch.setattr(targets, "compilers_installed", lambda platform: False)
    with pytest.raises(targets.TargetUnavailable, match=r'pip install "jaxdecode\[aot\]"'):
        targets.compile_only_devices("v5e-4")
    report = jp.plan(SMALL_LLAMA, "v5e-4", WORKLOAD)
    assert not report["compiled"] and "not installed" in report["note"] and report["per_device_bytes"]["peak"] is None
    assert report["fits"] and report["mesh"] == {"data": 1, "model": 1}  # the smallest model axis that fits
    tied = jp.plan(SMALL_GEMMA3, "h100", WORKLOAD)  # tied embeddings: the LM head is the embedding
    assert tied["decode_tokens_per_s"] > 0 and not tied["compiled"]


@pytest.mark.slow  # three compiles of a 32-layer 8B program: about three minutes
def test_plan_llama_3_1_8b():
    """The acceptance case: Llama-3.1-8B, bf16, batch 8, 1024 + 128 tokens."""
    config = jp.load_plan_config("llama-3.1-8b")
    workload = jp.Workload(batch=8, prompt_len=1024, new_tokens=128)
    one = jp.plan(config, "v5e-1", workload)
    assert not one["fits"] and "Ran out of memory on HBM" in one["compiler_message"]
    four = jp.plan(config, "v5e-4", workload, mesh=(1, 4))
    program, args = jp.generation_program(config, workload, targets.compile_only_devices("v5e-4"), 1, 4)
    assert (
        four["fits"]
        and four["per_device_bytes"]["peak"] == program.lower(*args).compile().memory_analysis().peak_memory_in_bytes
    )
    h100 = jp.plan(config, "h100", workload)
    assert h100["fits"]
    for report in (four, h100):
        compiled = report["per_device_bytes"]["params"] + report["per_device_bytes"]["kv_cache"]
        analytic = report["analytic_bytes"]["params"] + report["analytic_bytes"]["kv_cache"]
        assert abs(analytic - compiled) <= 0.1 * compiled


def test_flash_accelerator_tier_compiles_for_tpu_with_the_gather_on_the_host():
    """scripts/compile_flash_tpu.py: one FFN layer of LLM in a flash with its bundles in host memory
    (pinned_host) and its neuron cache in HBM, compiled for v5e: only the fetched rows are device
    temporaries (the host gathers them), and the cache is updated in place."""
    root = __import__("pathlib").Path(__file__).resolve().parent.parent
    done = subprocess.run(
        [sys.executable, str(root / "scripts" / "compile_flash_tpu.py"), "--model", "smollm2-135m"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    lines = {line.split(":")[0].strip(): line for line in done.stdout.splitlines()}
    mb = lambda key: float(lines[key].split(":")[1].split("MB")[0])  # noqa: E731
    bundles = 1536 * 3 * 576 * 2 / 1e6
    assert mb("host bundles (pinned_host)") == pytest.approx(bundles, abs=0.1)
    assert mb("device temporaries") < bundles / 4  # the 153 fetched rows (10%), not the layer
    assert mb("aliased (cache updated in place)") > 0
