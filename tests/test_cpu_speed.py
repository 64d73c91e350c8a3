"""CPU speed tooling: the host CPU's facts and its XLA flags (`cpu.py`), and the decode-step profile
(`profile.py`, `jaxdecode bench --suite profile`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from jaxdecode import cpu, profile

from tiny import tiny_model

XEON = """processor	: 0
vendor_id	: GenuineIntel
model name	: Intel(R) Xeon(R) Processor
flags		: fpu sse2 avx2 fma avx512f avx512dq avx512_vnni avx512_bf16 amx_tile amx_int8

processor	: 1
vendor_id	: GenuineIntel
"""
EPYC = """processor	: 0
vendor_id	: AuthenticAMD
model name	: AMD EPYC 7B13
flags		: fpu sse2 avx2 fma
"""


def test_cpu_facts_and_the_flags_chosen_for_them():
    xeon, epyc = cpu.host_cpu(XEON), cpu.host_cpu(EPYC)
    assert (xeon.vendor, xeon.model) == ("GenuineIntel", "Intel(R) Xeon(R) Processor")
    assert xeon.features == ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_int8")
    assert epyc.features == ("avx2", "fma") and "AMD EPYC 7B13 (AuthenticAMD)" in epyc.describe()
    assert cpu.tuned_flags(xeon) == {"xla_cpu_prefer_vector_width": "512"}
    assert cpu.tuned_flags(epyc) == {} and cpu.tuned_flags(cpu.host_cpu("")) == {}
    # the user's own XLA_FLAGS value wins, other flags are kept, the opt-out turns it off
    assert cpu.tuning_to_add(xeon, {"XLA_FLAGS": "--xla_cpu_prefer_vector_width=256"}) == {}
    assert cpu.tuning_to_add(xeon, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}) == {
        "xla_cpu_prefer_vector_width": "512"
    }
    assert cpu.tuning_to_add(xeon, {cpu.OPT_OUT: "0"}) == {}
    assert "turned off" in cpu.tuning_report(xeon, {cpu.OPT_OUT: "off"})
    assert "not applied" in cpu.tuning_report(xeon, {})
    assert "in effect" in cpu.tuning_report(xeon, {"XLA_FLAGS": "--xla_cpu_prefer_vector_width=512"})
    assert "user's own values" in cpu.tuning_report(xeon, {"XLA_FLAGS": "--xla_cpu_prefer_vector_width=256"})
    assert "none for this CPU" in cpu.tuning_report(epyc, {})


def _flags_after(code: str, **env: str) -> str:
    """XLA_FLAGS as a fresh interpreter sees them after running `code`."""
    environ = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", cpu.OPT_OUT)}
    done = subprocess.run(
        [sys.executable, "-c", f"import os\n{code}\nprint(os.environ.get('XLA_FLAGS', ''))"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**environ, "JAX_PLATFORMS": "cpu", **env},
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def test_import_sets_this_cpus_flags_only_before_jax_runs():
    wanted = " ".join(f"--{n}={v}" for n, v in cpu.tuned_flags(cpu.host_cpu()).items())
    assert _flags_after("import jaxdecode") == wanted
    assert _flags_after("import jaxdecode", JAXDECODE_CPU_TUNING="0") == ""
    assert _flags_after("import jaxdecode", XLA_FLAGS="--xla_cpu_prefer_vector_width=128") == (
        "--xla_cpu_prefer_vector_width=128"
    )
    # JAX's backend already exists: XLA has read its flags, so nothing is changed (doctor says so)
    assert _flags_after("import jax.numpy as jnp\njnp.ones(1).block_until_ready()\nimport jaxdecode") == ""


def test_parts_are_named_from_op_names():
    body = "jit(run)/while/body/Decoder/layer_7"
    assert profile.part_of(f"{body}/attn/q/dot_general") == "weights: q"
    assert profile.part_of(f"{body}/mlp/down/dot_general") == "weights: down"
    assert profile.part_of(f"{body}/moe/experts/dynamic_slice") == "weights: experts"
    assert profile.part_of(f"{body}/attn/jit(decode_attention)/cond/branch_0_fun/exp") == profile.ATTENTION
    assert profile.part_of(f"{body}/attn/scatter") == profile.CACHE_WRITE
    assert profile.part_of(f"{body}/attn_norm/rsqrt") == profile.OTHER_LAYER
    assert profile.part_of(f"{body}/per_layer_gate/dot_general") == "weights: per_layer_gate"
    assert profile.part_of("jit(run)/Decoder/per_layer_model_proj/dot_general") == "weights: per_layer_model_proj"
    assert profile.part_of("jit(run)/while/body/Decoder/dot_general") == profile.HEAD
    assert profile.part_of("jit(run)/while/body/Decoder/jit(take)/gather") == profile.EMBEDDING
    assert profile.part_of("jit(run)/while/body/argmax") == profile.SAMPLING


def test_profile_splits_the_traced_step_into_parts():
    row = profile.profile_decode(tiny_model(), [1, 2, 3, 4], batch=2, new_tokens=12, runs=2)
    parts = row["parts_ms"]
    for part in ("weights: q", "weights: down", profile.ATTENTION, profile.CACHE_WRITE, profile.HEAD):
        assert parts[part] > 0, part
    assert sum(parts.values()) == pytest.approx(row["traced_step_ms"], rel=1e-9)
    assert row["unattributed_thunks"] == 0
    assert row["step_ms"] > 0 and row["decode_tokens_per_s"] == pytest.approx(2e3 / row["step_ms"])
    assert row["floor_gb_per_s"] > 0 and row["floor_step_ms"] > 0


@pytest.mark.slow  # two weight formats of the real model, each in its own process (~1 minute)
def test_bench_profile_suite(tmp_path):
    out = tmp_path / "profile.json"
    args = ["bench", "--suite", "profile", "--quants", "none,int8", "--new-tokens", "8", "--runs", "1"]
    done = subprocess.run(
        [sys.executable, "-m", "jaxdecode.cli", *args, "--json", str(out)], capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    assert "XLA_FLAGS=" in report["machine"] and "cores" in report["machine"]
    rows = {r["quant"]: r for r in report["rows"]}
    assert set(rows) == {None, "int8"}
    for row in rows.values():
        weights = sum(ms for part, ms in row["parts_ms"].items() if part.startswith("weights: "))
        assert weights > 0.3 * row["traced_step_ms"]  # SmolLM2's step is mostly its weight reads
    assert "weight-read floor" in done.stdout and "attention over the cache" in done.stdout
