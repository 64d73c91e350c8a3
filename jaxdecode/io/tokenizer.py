"""Tokenizers from GGUF metadata (byte-level BPE) or an HF `tokenizer.json`, and chat templates."""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, processors

from .validate import ModelFileError, read_json, read_text

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
    """Text <-> token ids, the ids that end generation, and the chat template. `source` names the file it
    came from: the template and the vocabulary are the model file's, and so are their errors."""

    backend: tokenizers.Tokenizer  # its post-processor adds BOS/EOS where the model wants them
    stop_ids: tuple[int, ...]
    chat_template: str | None = None
    special_tokens: dict[str, str] = field(default_factory=dict)
    source: str = "the model's tokenizer"

    def __post_init__(self) -> None:
        """Checks what can be checked before use: the template compiles, and text encodes."""
        if self.chat_template is not None:
            try:
                _compiled_template(self.chat_template)
            except (jinja2.TemplateError, TypeError, RecursionError) as e:
                raise ModelFileError(self.source, f"does not compile ({type(e).__name__}: {e})", "chat_template") from e
        self.encode("Hello, world 1.")

    def encode(self, text: str) -> list[int]:
        try:
            return self.backend.encode(text).ids
        except Exception as e:  # noqa: BLE001 - a damaged vocabulary fails here, inside `tokenizers`
            raise ModelFileError(self.source, f"cannot encode text ({e})", "tokenizer") from e

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """Render `messages` ([{"role": ..., "content": ...}]) with the model's template (as HF does)."""
        if not self.chat_template:
            raise ValueError("this model has no chat template; use a plain prompt instead of chat")
        try:
            return _compiled_template(self.chat_template).render(
                messages=messages, add_generation_prompt=add_generation_prompt, **self.special_tokens
            )
        except (jinja2.TemplateError, TypeError, OverflowError, RecursionError) as e:
            # A template is code from the model file: its errors (undefined names, `raise_exception` on
            # roles it does not accept, the sandbox's limits) are the file's, not the caller's.
            raise ModelFileError(self.source, f"failed ({type(e).__name__}: {e})", "chat_template") from e


@functools.lru_cache(maxsize=8)
def _compiled_template(source: str) -> jinja2.Template:
    """A chat template compiled once (at load), as HF renders them: Jinja's immutable sandbox, with
    `raise_exception`."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    env.globals["raise_exception"] = raise_exception
    return env.from_string(source)


def _stop_ids(vocab: dict[str, int], eos_ids: Sequence[int]) -> tuple[int, ...]:
    ids = {int(i) for i in eos_ids}
    ids.update(vocab[t] for t in _END_OF_TURN if t in vocab)
    return tuple(sorted(ids))


MAX_TOKEN_CHARS = 2048  # real vocabularies stay below 100
MAX_SPLIT_WORK = 1 << 31  # sum of squared token lengths; Gemma 3's 262k tokens need about 1% of it


def _check_gguf_tokenizer_metadata(metadata: dict[str, Any], vocab_size: int | None) -> None:
    """The `tokenizer.ggml.*` values a tokenizer is built from, typed and in range (ValueError naming the key)."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ValueError("tokenizer.ggml.tokens must be a non-empty list of strings")
    longest = max(len(t) for t in tokens)
    if longest > MAX_TOKEN_CHARS:
        raise ValueError(f"tokenizer.ggml.tokens has a token of {longest} characters (at most {MAX_TOKEN_CHARS})")
    # Rebuilding SentencePiece merges splits every token at every place: quadratic in each token's length.
    if metadata.get("tokenizer.ggml.model") == "llama" and sum(len(t) ** 2 for t in tokens) > MAX_SPLIT_WORK:
        raise ValueError("tokenizer.ggml.tokens is far larger than any real vocabulary (long tokens)")
    if vocab_size is not None and len(tokens) > vocab_size:
        raise ValueError(f"tokenizer.ggml.tokens has {len(tokens)} tokens, more than the model's {vocab_size}")
    for key, kinds in (("token_type", (int,)), ("scores", (int, float))):
        values = metadata.get(f"tokenizer.ggml.{key}")
        if values is not None and not (
            isinstance(values, list) and len(values) == len(tokens) and all(isinstance(v, kinds) for v in values)
        ):
            raise ValueError(f"tokenizer.ggml.{key} must be a list of {len(tokens)} numbers, one per token")
    merges = metadata.get("tokenizer.ggml.merges", [])
    if not isinstance(merges, list) or not all(isinstance(m, str) and " " in m.strip(" ") for m in merges):
        bad = next((m for m in merges if not (isinstance(m, str) and " " in m.strip(" "))), merges)
        raise ValueError(f"tokenizer.ggml.merges must be a list of 'left right' strings, found {bad!r}")
    for key in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id"):
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(tokens)
        ):
            raise ValueError(f"tokenizer.ggml.{key} must be a token id in 0..{len(tokens) - 1}, got {value!r}")
    for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.chat_template"):
        if metadata.get(key) is not None and not isinstance(metadata[key], str):
            raise ValueError(f"{key} must be a string, got {metadata[key]!r}")
    for key in ("add_bos_token", "add_space_prefix"):
        if not isinstance(metadata.get(f"tokenizer.ggml.{key}", False), bool):
            raise ValueError(f"tokenizer.ggml.{key} must be true or false")


def tokenizer_from_gguf(
    metadata: dict[str, Any], vocab_size: int | None = None, path: str | os.PathLike[str] = "GGUF metadata"
) -> Tokenizer:
    """The tokenizer described by `tokenizer.ggml.*` metadata: byte-level BPE (`gpt2`) split as llama.cpp
    splits it, or SentencePiece BPE with byte fallback (`llama`: Llama 2, Mistral, Gemma, Phi-3), built
    the way HF transformers builds it from the same file so that both give the same ids. Damaged or
    inconsistent metadata raises ModelFileError naming `path` and the key."""
    try:
        _check_gguf_tokenizer_metadata(metadata, vocab_size)
        return _tokenizer_from_gguf(metadata, str(path))
    except ModelFileError:
        raise
    except ValueError as e:
        raise ModelFileError(path, str(e), "tokenizer") from e
    except Exception as e:  # noqa: BLE001 - `tokenizers` raises plain Exception on vocabularies it cannot build
        raise ModelFileError(path, f"cannot be built from the file's vocabulary ({e})", "tokenizer") from e


def _tokenizer_from_gguf(metadata: dict[str, Any], source: str) -> Tokenizer:
    kind = metadata.get("tokenizer.ggml.model")
    tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
    token_types: list[int] = list(metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    if kind == "gpt2":
        backend = _byte_level_backend(metadata, tokens)
    elif kind == "llama":
        backend = _sentencepiece_backend(metadata, tokens)
    else:
        raise ValueError(
            f"unsupported GGUF tokenizer {kind!r}; supported: 'gpt2' (byte-level BPE), 'llama' (SentencePiece)"
        )
    vocab = backend.get_vocab(with_added_tokens=False)
    bos = metadata.get("tokenizer.ggml.bos_token_id")
    eos = metadata.get("tokenizer.ggml.eos_token_id")
    # llama.cpp adds BOS to a SentencePiece vocabulary whose file does not say otherwise.
    if metadata.get("tokenizer.ggml.add_bos_token", kind == "llama") and bos is not None:
        backend.post_processor = processors.TemplateProcessing(
            single=f"{tokens[bos]} $A", special_tokens=[(tokens[bos], bos)]
        )
    # Control tokens (type 3) are matched whole in text and skipped when decoding; user-defined (4) matched whole.
    backend.add_special_tokens(
        [tokenizers.AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, token_types) if k == 3]
    )
    backend.add_tokens(
        [
            tokenizers.AddedToken(t, special=False, normalized=False)
            for t, k in zip(tokens, token_types)
            if k == 4 and t in vocab
        ]
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
        source=source,
    )


def _byte_level_backend(metadata: dict[str, Any], tokens: list[str]) -> tokenizers.Tokenizer:
    merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
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
    return backend


_SPACE = "\u2581"  # SentencePiece's visible space


def _sentencepiece_backend(metadata: dict[str, Any], tokens: list[str]) -> tokenizers.Tokenizer:
    """SentencePiece BPE as a `tokenizers` BPE with byte fallback. The file has no merges; they are
    recovered from the vocabulary: every split of a token into two tokens is a merge, ranked by the
    merged token's score (Gemma: by its place in the vocabulary, which is its merge order)."""
    gemma = metadata.get("general.architecture") in ("gemma", "gemma2", "gemma3")
    if gemma:  # Gemma stores its runs of spaces as real spaces; its pieces spell them as the visible space
        tokens = [_SPACE * len(t) if " " in t and not t.strip() else t for t in tokens]
        scores = {t: -float(i) for i, t in enumerate(tokens)}
    else:
        scores = dict(zip(tokens, (float(x) for x in metadata["tokenizer.ggml.scores"])))
    vocab = {t: i for i, t in enumerate(tokens)}
    unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    backend = tokenizers.Tokenizer(
        models.BPE(
            vocab=vocab, merges=_merges_from_vocab(vocab, scores), fuse_unk=True, unk_token=unk, byte_fallback=True
        )
    )
    pieces = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    add_prefix_space = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    if gemma:
        backend.normalizer = normalizers.Replace(" ", _SPACE)
    elif metadata.get("general.architecture") == "phi3":  # the prefix space comes from a normalizer (as HF's)
        backend.normalizer = normalizers.Sequence([normalizers.Prepend(_SPACE), normalizers.Replace(" ", _SPACE)])
        pieces.append(decoders.Strip(content=" ", left=1))
    else:
        scheme = "first" if add_prefix_space else "never"
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement=_SPACE, prepend_scheme=scheme, split=False)
        if add_prefix_space:
            pieces.append(decoders.Strip(content=" ", left=1))
    backend.decoder = decoders.Sequence(pieces)
    return backend


def _merges_from_vocab(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocabulary, best first: for each token every (left, right)
    split into two tokens, ordered by the token's score, then by the lengths of the halves (the order
    HF transformers' `generate_merges` gives, so both tokenize alike)."""
    merges = []
    for piece, score in scores.items():
        local = [(piece[:i], piece[i:]) for i in range(1, len(piece)) if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend((left, right, score) for left, right in local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _token_text(entry: Any) -> str | None:
    if isinstance(entry, dict):
        return entry.get("content")
    return entry


def tokenizer_from_hf_dir(directory: Path, eos_ids: Sequence[int], vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer of an HF model directory (`tokenizer.json` + `tokenizer_config.json`). Damaged files
    raise ModelFileError naming the file; ids beyond `vocab_size` (the model's) are refused."""
    path = directory / "tokenizer.json"
    if not path.is_file():
        raise ModelFileError(directory, "has no tokenizer.json (needed to turn text into tokens)")
    text = read_text(path, max_bytes=1 << 30)  # bounded, UTF-8; read once, parsed once (by `tokenizers`)
    try:
        backend = tokenizers.Tokenizer.from_str(text)
    except Exception as e:  # noqa: BLE001 - `tokenizers` raises plain Exception for any file it cannot read
        raise ModelFileError(path, f"is not a tokenizer `tokenizers` can read ({e})") from e
    config: dict[str, Any] = {}
    config_path = directory / "tokenizer_config.json"
    if config_path.exists():
        config = read_json(config_path)
    template = config.get("chat_template")
    if template is None and (directory / "chat_template.jinja").exists():
        template = read_text(directory / "chat_template.jinja")
    if isinstance(template, list):  # older files: named templates; the default one is the chat template
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise ModelFileError(config_path, f"must be a string, found {type(template).__name__}", "chat_template")
    vocab = backend.get_vocab(with_added_tokens=True)
    special = {}
    for name in ("bos_token", "eos_token"):
        text = _token_text(config.get(name))
        if text is not None and not isinstance(text, str):
            raise ModelFileError(config_path, f"must be a token's text, found {config.get(name)!r}", name)
        if text:
            special[name] = text
    eos = list(eos_ids)
    if "eos_token" in special and special["eos_token"] in vocab:
        eos.append(vocab[special["eos_token"]])
    stop_ids = _stop_ids(vocab, eos)
    largest = max(vocab.values(), default=0)
    if vocab_size is not None and (largest >= vocab_size or any(not 0 <= i < vocab_size for i in stop_ids)):
        bad = largest if largest >= vocab_size else next(i for i in stop_ids if not 0 <= i < vocab_size)
        raise ModelFileError(path, f"has token id {bad}, outside the model's vocabulary of {vocab_size}")
    return Tokenizer(backend, stop_ids, template, special, source=str(config_path if template else path))
