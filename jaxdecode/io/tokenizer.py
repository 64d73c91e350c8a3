"""Tokenizers from GGUF metadata (byte-level BPE) or an HF `tokenizer.json`, and chat templates."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, decoders, models, pre_tokenizers, processors

# Split rules of llama.cpp's pre-tokenizers (`tokenizer.ggml.pre`), applied one after the other.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (_GPT2_SPLIT,),
    "gpt-2": (_GPT2_SPLIT,),
    # SmolLM (like StarCoder's tokenizers) splits every digit on its own first.
    "smollm": (r"\p{N}", _GPT2_SPLIT),
    "starcoder": (r"\p{N}", _GPT2_SPLIT),
    "llama-bpe": (_LLAMA3_SPLIT,),
    "llama3": (_LLAMA3_SPLIT,),
    "qwen2": (_QWEN2_SPLIT,),
}

# Tokens that end a turn in common chat formats; any of them present in the vocabulary stops generation.
_END_OF_TURN = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "</s>", "<|end|>")


@dataclass
class Tokenizer:
    """Text <-> token ids, the ids that end generation, and the chat template."""

    backend: tokenizers.Tokenizer  # its post-processor adds BOS/EOS where the model wants them
    stop_ids: tuple[int, ...]
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)

    def encode(self, text: str) -> list[int]:
        return self.backend.encode(text).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's template (as HF does)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use a plain prompt instead of chat")
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise jinja2.exceptions.TemplateError(message)

        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
        )


def _stop_ids(vocab: dict[str, int], eos_ids: Sequence[int]) -> tuple[int, ...]:
    ids = {int(i) for i in eos_ids}
    ids.update(vocab[t] for t in _END_OF_TURN if t in vocab)
    return tuple(sorted(ids))


def tokenizer_from_gguf(metadata: dict[str, Any]) -> Tokenizer:
    """A byte-level BPE tokenizer built from `tokenizer.ggml.*` metadata, matching llama.cpp's splitting."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"unsupported GGUF tokenizer {kind!r}: only byte-level BPE ('gpt2') is supported")
    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    token_types: list[int] = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZER_SPLITS:
        raise ValueError(f"unsupported GGUF pre-tokenizer {pre!r}; supported: {', '.join(PRE_TOKENIZER_SPLITS)}")

    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(rule), behavior="isolated") for rule in PRE_TOKENIZER_SPLITS[pre]]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    backend.decoder = decoders.ByteLevel()
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    if metadata.get("tokenizer.ggml.add_bos_token", False) and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", special_tokens=[(tokens[bos], bos)]
        )
    # Control tokens (type 3) are matched whole in text and skipped when decoding; user-defined (4) matched whole.
    backend.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, token_types) if k == 3]
    )
    backend.add_tokens(
        [tokenizers.AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, token_types) if k == 4]
    )
    special = {}
    for name, key in (("bos_token", bos), ("eos_token", eos)):
        if key is not None:
            special[name] = tokens[key]
    return Tokenizer(
        backend=backend,
        stop_ids=_stop_ids(vocab, [] if eos is None else [eos]),
        chat_template=metadata.get("tokenizer.chat_template"),
        special_tokens=special,
    )


def _token_text(entry: Any) -> str | None:
    if isinstance(entry, dict):
        return entry.get("content")
    return entry


def tokenizer_from_hf_dir(directory: Path, eos_ids: Sequence[int]) -> Tokenizer:
    """The tokenizer of an HF model directory (`tokenizer.json` + `tokenizer_config.json`)."""
    path = directory / "tokenizer.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory} has no tokenizer.json (needed to turn text into tokens)")
    backend = tokenizers.Tokenizer.from_file(str(path))
    config: dict[str, Any] = {}
    if (directory / "tokenizer_config.json").exists():
        config = json.loads((directory / "tokenizer_config.json").read_text())
    template = config.get("chat_template")
    if template is None and (directory / "chat_template.jinja").exists():
        template = (directory / "chat_template.jinja").read_text()
    vocab = backend.get_vocab(with_added_tokens=True)
    special = {name: _token_text(config.get(name)) for name in ("bos_token", "eos_token")}
    special = {k: v for k, v in special.items() if v}
    eos = list(eos_ids)
    if "eos_token" in special and special["eos_token"] in vocab:
        eos.append(vocab[special["eos_token"]])
    return Tokenizer(
        backend=backend,
        stop_ids=_stop_ids(vocab, eos),
        chat_template=template,
        special_tokens=special,
    )
