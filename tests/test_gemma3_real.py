"""The real Gemma 3 270M (Q4_K_M GGUF) against HF transformers loading the same file in float32.

HF dequantises every tensor to float32 and builds its own tokenizer from the file's metadata; both are
references no one here wrote. Loading there takes about two minutes, so everything shares one fixture.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jaxdecode as jd
from jaxdecode.io.sources import embedded_model_path

PROMPTS = [
    "Photosynthesis converts",
    "The three laws of motion are",
    "La capitale de l'Italie est",
]
NEW_TOKENS = 32
NEAR_TIE = 1e-2  # top-2 logit margin under which two float32 engines may legitimately differ


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = embedded_model_path("gemma3-270m")
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


@pytest.fixture(scope="module")
def model():
    return jd.load("gemma3-270m", dtype="float32")


def test_config_matches_the_file(model):
    c = model.config
    assert (c.family, c.num_layers, c.d_model, c.num_heads, c.num_kv_heads, c.head_dim) == (
        "gemma3",
        18,
        640,
        4,
        1,
        256,
    )
    assert (c.ffn_dim, c.vocab_size, c.sliding_window, c.rope_theta, c.rope_local_theta) == (
        2048,
        262144,
        512,
        1e6,
        1e4,
    )
    assert [i for i in range(18) if not c.is_sliding(i)] == [5, 11, 17]


SAMPLES = [
    "Photosynthesis converts light into chemical energy.",
    "Der schnelle braune Fuchs springt über den faulen Hund. Ça va très bien, merci !",
    "東京は日本の首都です。北京是中国的首都。서울은 한국의 수도입니다.",
    "Emoji: 🙂🚀🇫🇷 👩‍💻 and a zero-width joiner.",
    "   leading spaces, two  spaces,\ttabs\tand\n\nnew lines\r\n  ",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n",
    "Ünïcödé àccents, Ελληνικά, русский текст, עברית, العربية",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
]


def test_tokenizer_matches_hf(model, hf):
    _, reference = hf
    for text in SAMPLES:
        expected = reference(text)["input_ids"]
        got = model.tokenizer.encode(text)
        assert got == expected, text
        assert model.tokenizer.decode(got) == reference.decode(expected, skip_special_tokens=True), text


def test_logits_match_hf(model, hf):
    """A sequence longer than the 512-token window of the local layers, so the window is exercised."""
    from pydoc_data.topics import topics

    reference, tokenizer = hf
    ids = tokenizer(topics["assert"] + topics["class"])["input_ids"][:700]
    assert len(ids) == 700
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits.float().numpy()
    got = np.asarray(jd.forward(model, np.asarray([ids], np.int32)))
    err = np.abs(got - expected).max()
    assert err <= 1e-4 * np.abs(expected).max(), f"max |diff| {err:.3g}, max |logit| {np.abs(expected).max():.3g}"


@pytest.mark.slow  # test_logits_match_hf keeps the real model's parity with HF in the default set
def test_greedy_tokens_match_hf(model, hf):
    """Greedy continuations agree token for token, except after a near tie in HF's own logits."""
    reference, tokenizer = hf
    for prompt in PROMPTS:
        ids = tokenizer(prompt)["input_ids"]
        got = jd.generate(model, [ids], max_new_tokens=NEW_TOKENS, stop_ids=()).tokens[0]
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([ids]),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                output_scores=True,
                return_dict_in_generate=True,
                eos_token_id=None,
            )
        expected = out.sequences[0, len(ids) :].tolist()
        assert len(got) == len(expected) == NEW_TOKENS
        for step, (a, b) in enumerate(zip(got, expected)):
            if a != b:
                top2 = torch.topk(out.scores[step][0], 2).values
                margin = float(top2[0] - top2[1])
                assert margin < NEAR_TIE, f"{prompt!r}: token {step} differs ({a} vs {b}) with margin {margin:.3g}"
                break


def test_generates_the_reference_continuation(model):
    """The float32 continuation that HF transformers gives for this prompt (../shared/BRIEF.md §4)."""
    out = jd.generate(model, "Photosynthesis converts", max_new_tokens=12)
    assert out.text[0].startswith(" carbon dioxide into carbohydrates and oxygen into water.")
