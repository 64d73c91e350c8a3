"""Every GGUF architecture, from tiny files written as llama.cpp's converter writes them
(`gguf_models.py`): loaded here, the logits equal the HF model the file was made from; where HF
transformers reads that architecture from GGUF too, HF's own load of the file agrees as well."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxdecode as jd

from gguf_models import VOCAB, build, write

# name -> whether HF transformers' GGUF loader supports it (no Gemma 1; no longrope or Llama 3.1 factors).
CASES = {
    "llama": True,
    "llama31": False,
    "qwen2": True,
    "qwen3": True,
    "gemma": False,
    "gemma2": True,
    "gemma3": True,
    "phi3": True,
    "phi3_longrope": False,
    "mixtral": False,  # HF reads a `llama` GGUF without its experts
    "qwen2moe": True,
    "qwen3moe": True,
}
SEQ = 19
FAMILIES = {"mixtral": "mixtral", "qwen2moe": "qwen2_moe", "qwen3moe": "qwen3_moe"}  # where not the architecture


@pytest.mark.parametrize("name", CASES)
def test_gguf_family_matches_hf(tmp_path, name):
    arch, hf_model = build(name)
    path = write(arch, hf_model, tmp_path / f"{name}.gguf")
    tokens = np.random.default_rng(1).integers(0, VOCAB, (2, SEQ), dtype=np.int32)
    with torch.no_grad():
        expected = hf_model(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
    tolerance = 1e-4 * np.abs(expected).max()
    model = jd.load(path)
    assert model.config.family == FAMILIES.get(name, arch)
    got = np.asarray(jd.forward(model, tokens))
    assert np.abs(got - expected).max() <= tolerance, f"{name}: {np.abs(got - expected).max():.3g}"
    if CASES[name]:
        from transformers import AutoModelForCausalLM

        reread = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).eval()
        with torch.no_grad():
            theirs = reread(torch.as_tensor(tokens, dtype=torch.long)).logits.float().numpy()
        assert np.abs(theirs - expected).max() <= tolerance, (
            f"{name}: the test's GGUF writer disagrees with HF's reader"
        )


def test_native_keeps_legacy_blocks_and_converts_other_types_once(tmp_path):
    """quant='native': Q8_0 blocks are kept, Q5_0 (which the native path lacks) becomes int8, with one
    warning naming the type; the model stays within quantization error of the same file loaded as float."""
    arch, hf_model = build("qwen3")
    path = write(arch, hf_model, tmp_path / "mixed.gguf", {"attn_q.weight": "Q8_0", "ffn_gate.weight": "Q5_0"})
    with pytest.warns(UserWarning, match=r"Q5_0 matrices were converted to int8") as caught:
        model = jd.load(path, quant="native")
    assert len(caught) == 1
    mlp, attn = model.params["layer_0"]["mlp"], model.params["layer_0"]["attn"]
    assert attn["q"]["weight"].kind == "q8_0" and mlp["gate"]["weight"].kind == "int8"
    tokens = np.random.default_rng(2).integers(0, VOCAB, (1, SEQ), dtype=np.int32)
    reference = np.asarray(jd.forward(jd.load(path), tokens))
    got = np.asarray(jd.forward(model, tokens))
    assert np.abs(got - reference).max() <= 2e-2 * np.abs(reference).max()


def test_native_moe_experts_become_int8(tmp_path):
    """A Mixtral GGUF with Q5_0 experts and Q8_0 attention, quant='native': the stacked experts are int8
    (per expert and channel; the warning names them), the router stays float32, and the model is within
    quantization error of the same file loaded as float."""
    arch, hf_model = build("mixtral")
    quantized = {"_exps.weight": "Q5_0", "attn_q.weight": "Q8_0"}
    path = write(arch, hf_model, tmp_path / "moe.gguf", quantized)
    with pytest.warns(UserWarning, match=r"Q5_0 \(stacked experts\)"):
        model = jd.load(path, quant="native")
    moe = model.params["layer_0"]["moe"]
    assert moe["experts"]["gate"].kind == "int8" and moe["experts"]["gate"].values.shape == (4, 128, 64)
    assert moe["router"]["weight"].dtype == np.float32
    assert model.params["layer_0"]["attn"]["q"]["weight"].kind == "q8_0"
    tokens = np.random.default_rng(2).integers(0, VOCAB, (1, SEQ), dtype=np.int32)
    reference = np.asarray(jd.forward(jd.load(path), tokens))
    got = np.asarray(jd.forward(model, tokens))
    assert np.abs(got - reference).max() <= 2e-2 * np.abs(reference).max()
