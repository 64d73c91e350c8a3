"""The CLI end to end on the embedded model."""

from __future__ import annotations

import json
import subprocess
import sys


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
