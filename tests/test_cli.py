"""The CLI end to end on the embedded model."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from cli_output import stderr_lines


def _run(args: list[str], stdin: str | None = None, tmp_path=None) -> subprocess.CompletedProcess:
    env = None
    if tmp_path is not None:
        import os

        env = {**os.environ, "JAXDECODE_CACHE_DIR": str(tmp_path)}
    return subprocess.run(
        [sys.executable, "-m", "jaxdecode.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def test_generate_streams_text(tmp_path):
    result = _run(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "6"], tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(" Paris.")


def test_generate_json(tmp_path):
    result = _run(
        ["generate", "--prompt", "What is the capital of France?", "--chat", "--json", "--max-new-tokens", "24"],
        tmp_path=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert set(record) >= {
        "prompt_tokens",
        "tokens",
        "text",
        "prefill_tokens_per_s",
        "decode_tokens_per_s",
        "compile_s",
    }
    assert "Paris" in record["text"]
    assert record["prompt_tokens"][-4:] == [1, 520, 9531, 198]  # the template's "<|im_start|>assistant\n"
    assert record["decode_tokens_per_s"] > 0 and record["prefill_tokens_per_s"] > 0
    assert any(tmp_path.rglob("*")), "the persistent compilation cache was not written"


def test_chat_reads_turns_from_stdin(tmp_path):
    result = _run(["chat", "--max-new-tokens", "32"], stdin="What is the capital of France?\n", tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


@pytest.mark.slow  # every engine in its own process (~2 minutes)
def test_bench_runs_jaxdecode_and_reports_every_peer(tmp_path):
    """A tiny decode suite: jaxdecode measured, each peer measured or skipped with a reason (never a failure),
    JSON rows in the documented schema, and a plot."""
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    args = ["bench", "--suite", "decode", "--peers", "hf,llamacpp", "--prompt", "16", "--new-tokens", "4"]
    result = _run([*args, "--runs", "1", "--json", str(out), "--plot", str(png)], tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["machine"] and report["suite"] == "decode"
    engines = [(r["engine"], r["dtype"]) for r in report["rows"]]
    assert engines == [("jaxdecode", "float32"), ("hf", "float32"), ("hf", "bfloat16"), ("llamacpp", "q4_1")]
    for row in report["rows"]:
        assert (row["batch"], row["prompt"], row["new_tokens"]) == (1, 16, 4)
        if "skipped" in row:
            assert row["engine"] != "jaxdecode" and row["skipped"]
            continue
        for key in ("prefill_tokens_per_s", "decode_tokens_per_s", "ttft_s", "peak_rss_mb"):
            assert row[key] > 0, (row["engine"], key)
    assert "skipped" not in report["rows"][0]
    assert "| decode | jaxdecode float32 | 1 | 16 |" in result.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow  # four formats, each loaded and compiled in its own process (~2 minutes)
def test_bench_quant_suite_reports_bytes_speed_and_perplexity(tmp_path):
    out = tmp_path / "quant.json"
    args = ["bench", "--suite", "quant", "--peers", "none", "--runs", "1", "--new-tokens", "4"]
    result = _run([*args, "--ppl-tokens", "256", "--ppl-window", "128", "--json", str(out)])
    assert result.returncode == 0, result.stderr
    rows = {r["quant"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {None, "int8", "int4", "native"}
    f32 = rows[None]
    assert f32["param_bytes"] == 134_515_008 * 4  # SmolLM2-135M's parameters in float32
    assert 3.9 < f32["param_bytes"] / rows["int8"]["param_bytes"] < 4.0  # int8 + one scale per row
    assert rows["native"]["param_bytes"] < rows["int8"]["param_bytes"]
    # native holds the very weights float32 is dequantized from; int8 is close to them
    assert rows["native"]["perplexity"] == pytest.approx(f32["perplexity"], rel=1e-4)
    assert rows["int8"]["perplexity"] == pytest.approx(f32["perplexity"], rel=0.02)
    assert "| weights | params MB |" in result.stdout


def test_bench_bad_arguments_are_one_line(tmp_path):
    for args, message in [
        (["bench", "--peers", "vllm"], "unknown peer 'vllm'"),
        (["bench", "--suite", "spec,decode"], "unknown suite 'spec'"),
        (["bench", "--dtypes", "float16"], "unsupported dtype 'float16'"),
    ]:
        result = _run(args, tmp_path=tmp_path)
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert len(stderr_lines(result.stderr)) == 1


def test_doctor_checks_every_kernel_here(tmp_path):
    """On CPU `jaxdecode doctor` runs our two kernels and JAX's own in interpret mode against XLA (decode,
    verify, prefill)."""
    result = _run(["doctor", "--json"], tmp_path=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["platform"] == "cpu" and data["versions"]["jax"]
    assert {c["backend"] for c in data["checks"]} == {"interpret-tpu", "interpret-triton", "interpret-jax-ops"}
    for check in data["checks"]:
        tolerance = 1e-5 if check["dtype"] == "float32" else 3e-2  # jax-ops run in bfloat16
        assert "error" not in check and check["max_abs_error"] < tolerance and check["seconds"] > 0, check
