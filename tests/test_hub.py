"""Hub ids resolve through huggingface_hub's standard cache, offline, against a cache this test builds
(`models--org--name/refs/main` + `snapshots/<commit>/`); no network is used."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import jaxdecode as jd

from cli_output import stderr_lines
from hf_models import VOCAB, build, hf_logits

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _cache_repo(cache, repo_id: str, files: dict) -> None:
    """A hub cache entry as huggingface_hub lays it out; `files` maps names to source paths or bytes."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, content in files.items():
        if isinstance(content, bytes):
            (snapshot / name).write_bytes(content)
        else:
            shutil.copy(content, snapshot / name)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def test_load_by_hub_id_from_the_cache(offline_cache, tmp_path):
    hf_model = build("qwen3", tmp_path / "saved")
    files = {p.name: p for p in (tmp_path / "saved").iterdir()}
    _cache_repo(offline_cache, "tiny-org/tiny-qwen3", files)
    model = jd.load("tiny-org/tiny-qwen3")
    assert model.config.family == "qwen3"
    tokens = np.random.default_rng(0).integers(0, VOCAB, (1, 12), dtype=np.int32)
    expected = hf_logits(hf_model, tokens).numpy()
    np.testing.assert_allclose(np.asarray(jd.forward(model, tokens)), expected, atol=1e-4 * np.abs(expected).max())


def test_repo_with_only_pickled_weights_is_refused(offline_cache):
    _cache_repo(offline_cache, "org/pickled", {"config.json": b'{"model_type": "llama"}', "pytorch_model.bin": b"x"})
    with pytest.raises(ValueError, match="no safetensors weights; jaxdecode never loads pickled weights"):
        jd.load("org/pickled")


def test_offline_and_not_cached(offline_cache):
    with pytest.raises(FileNotFoundError, match="not in the hub cache .* HF_HUB_OFFLINE is set"):
        jd.load("org/never-downloaded")


def test_cli_hub_errors_are_one_line(offline_cache):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "jaxdecode.cli", "generate", "--model", "org/never-downloaded", "--prompt", "hi"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert len(stderr_lines(result.stderr)) == 1 and "HF_HUB_OFFLINE" in result.stderr, result.stderr
