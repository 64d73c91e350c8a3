"""The real SmolLM2-135M GGUF against HF transformers loading the same file (float32, dequantised)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import jaxdecode as jd
from jaxdecode.io.sources import embedded_model_path

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n",
    "<|im_start|>user\nName three colours.<|im_end|>\n<|im_start|>assistant\n",
    "In 1969, the first humans landed on",
]
NEW_TOKENS = 24
NEAR_TIE = 1e-3  # logit gap under which two engines may legitimately pick different tokens


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


@pytest.fixture(scope="module")
def model():
    return jd.load("smollm2-135m", dtype="float32")


def test_config_matches_brief(model):
    c = model.config
    assert (c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.head_dim) == (30, 576, 9, 3, 64)
    assert (c.ffn_dim, c.vocab_size, c.max_seq_len, c.rope_theta) == (1536, 49152, 8192, 100000.0)
    assert c.tie_embeddings


def _texts() -> list[str]:
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)[:40]] + ["In 1984, 12345 people paid $3.50 — déjà vu 🙂", " two  spaces"]


def test_tokenizer_matches_reference(model, hf):
    """Against HF's tokenizer built from the same GGUF, with SmolLM2's published pre-tokenizer.

    HF's GGUF converter has no entry for `tokenizer.ggml.pre = smollm` and falls back to GPT-2's split,
    which glues whitespace to a following digit. SmolLM2's own tokenizer.json (and llama.cpp's `smollm`
    rule) split every digit first: `Digits(individual_digits=True)` then `ByteLevel(use_regex=True)`.
    """
    from tokenizers import Tokenizer, pre_tokenizers

    _, hf_tokenizer = hf
    reference = Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())  # a copy: the fixture stays as HF made it
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    for text in _texts():
        ids = model.tokenizer.encode(text)
        assert ids == reference.encode(text, add_special_tokens=False).ids
        assert model.tokenizer.decode(ids) == text
    assert model.tokenizer.encode("The capital of France is") == [504, 3575, 282, 4649, 314]
    assert model.tokenizer.encode("<|im_start|>user") == [1, 4093]


def test_tokenizer_matches_hf_gguf_without_digits(model, hf):
    _, hf_tokenizer = hf
    for text in _texts():
        text = "".join(c for c in text if not c.isdigit())
        assert model.tokenizer.encode(text) == hf_tokenizer(text, add_special_tokens=False).input_ids


def test_forward_logits_match_hf(model, hf):
    hf_model, _ = hf
    tokens = np.asarray([model.tokenizer.encode(PROMPTS[0] + " Paris, and the capital of Germany is Berlin.")])
    with torch.no_grad():
        expected = hf_model(torch.as_tensor(tokens, dtype=torch.long)).logits.numpy()
    got = np.asarray(jd.forward(model, tokens))
    err = np.abs(got - expected).max()
    assert err <= 1e-4 * np.abs(expected).max(), f"max |diff| {err:.3g} vs max |logit| {np.abs(expected).max():.3g}"


def _check_greedy_against_hf(hf_model, prompt_ids: list[int], ours: list[int]) -> None:
    """Our greedy tokens must be HF's argmax at every step, up to the first top-2 near tie."""
    sequence = torch.as_tensor([prompt_ids + ours], dtype=torch.long)
    with torch.no_grad():
        logits = hf_model(sequence).logits[0, len(prompt_ids) - 1 : -1].double()
    top2 = torch.topk(logits, 2, dim=-1)
    for i, token in enumerate(ours):
        if token != int(top2.indices[i, 0]):
            gap = float(top2.values[i, 0] - logits[i, token])
            assert gap <= NEAR_TIE, f"step {i}: ours {token}, HF argmax {int(top2.indices[i, 0])}, gap {gap:.3g}"
            return  # after a near tie the two continuations legitimately differ


def test_greedy_generation_matches_hf(model, hf):
    hf_model, _ = hf
    out = jd.generate(model, PROMPTS, max_new_tokens=NEW_TOKENS, stop_ids=())
    assert [len(t) for t in out.tokens] == [NEW_TOKENS] * len(PROMPTS)
    for prompt_ids, ours in zip(out.prompt_tokens, out.tokens):
        _check_greedy_against_hf(hf_model, prompt_ids, ours)
    # HF's own greedy loop on the first prompt (the BRIEF's reference continuation starts " Paris.\n\n").
    with torch.no_grad():
        hf_out = hf_model.generate(torch.tensor([out.prompt_tokens[0]]), max_new_tokens=NEW_TOKENS, do_sample=False)
    assert out.tokens[0] == hf_out[0, len(out.prompt_tokens[0]) :].tolist()
    assert out.text[0].startswith(" Paris.\n\nThe answer is: 2018-01-22")


@pytest.mark.slow  # interpret mode on the real model; the family parity tests run the kernels in the default run
def test_pallas_kernels_in_interpret_mode_match_xla(model):
    """The real model through the Pallas kernels (interpret mode): same greedy tokens as XLA, a few steps."""
    kernels = dataclasses.replace(model, attention="interpret")
    prompts = PROMPTS[:2]
    assert (
        jd.generate(kernels, prompts, max_new_tokens=6, stop_ids=()).tokens
        == jd.generate(model, prompts, max_new_tokens=6, stop_ids=()).tokens
    )


@pytest.mark.slow  # the tiny model checks the same in test_generate.py; here one compile per prompt length
def test_ragged_batch_equals_each_prompt_alone(model):
    batch = jd.generate(model, PROMPTS, max_new_tokens=12, stop_ids=())
    for i, prompt in enumerate(PROMPTS):
        alone = jd.generate(model, prompt, max_new_tokens=12, stop_ids=())
        assert alone.tokens[0] == batch.tokens[i], f"prompt {i}"


def test_chat_template_and_stop(model):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = model.tokenizer.apply_chat_template(messages)
    assert prompt.endswith("<|im_start|>assistant\n") and "<|im_start|>system\n" in prompt
    out = jd.generate(model, prompt, max_new_tokens=48)
    assert "Paris" in out.text[0]
    assert out.finish_reasons == ["stop"], "the instruct model ends its answer with <|im_end|>"
    assert 2 not in out.tokens[0]


def test_hf_directory_of_the_same_model(model, hf, tmp_path):
    """HF transformers writes the GGUF out as a sharded safetensors directory with tokenizer.json and
    tokenizer_config.json; loading that directory must give the same logits, tokens and chat prompt."""
    import copy

    from transformers import LlamaForCausalLM

    hf_model, hf_tokenizer = hf
    # HF will not save a model it loaded from GGUF; a plain copy of it saves like any checkpoint.
    config = copy.deepcopy(hf_model.config)
    config.quantization_config = None
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(hf_model.state_dict())
    plain.save_pretrained(tmp_path, max_shard_size="100MB")
    hf_tokenizer.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors.index.json").exists()
    from_dir = jd.load(tmp_path)
    assert from_dir.config == model.config.replace(max_seq_len=from_dir.config.max_seq_len)
    tokens = [model.tokenizer.encode("The capital of France is Paris, and the capital of Germany is")]
    np.testing.assert_allclose(
        np.asarray(jd.forward(from_dir, tokens)), np.asarray(jd.forward(model, tokens)), rtol=0, atol=1e-4
    )
    text = _texts()[0]
    assert from_dir.tokenizer.encode(text) == hf_tokenizer(text).input_ids
    messages = [{"role": "user", "content": "Hi there"}]
    assert from_dir.tokenizer.apply_chat_template(messages) == hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert model.tokenizer.apply_chat_template(messages) == from_dir.tokenizer.apply_chat_template(messages)
    assert 2 in from_dir.tokenizer.stop_ids
