"""Hugging Face model directories: `config.json` + `*.safetensors` (sharded index included).

Each family's tensor names map onto our one parameter layout; fused QKV projections (Falcon, BLOOM,
MPT, GPT-BigCode) are split into q, k and v here, in the family's own fused order.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import safe_open

from ..config import ModelConfig, config_from_hf
from .tokenizer import Tokenizer, tokenizer_from_hf_dir

# (regex on the HF name with its "model."/"transformer." prefix removed, our path template).
_LLAMA_NAMES = [
    (r"embed_tokens\.weight", "embed"),
    (r"layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)", "layer_{0}/attn/{1}/{2}"),
    (r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.(weight|bias)", "layer_{0}/mlp/{1}/{2}"),
    (r"layers\.(\d+)\.input_layernorm\.weight", "layer_{0}/attn_norm/scale"),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", "layer_{0}/mlp_norm/scale"),
    (r"norm\.weight", "final_norm/scale"),
    (r"lm_head\.weight", "lm_head"),
]
_QK_NORM_NAMES = [(r"layers\.(\d+)\.self_attn\.([qk])_norm\.weight", "layer_{0}/attn/{1}_norm/scale")]
# Gemma 2/3: four norms per block; HF's post_attention_layernorm is the norm *after* attention here.
_GEMMA2_NAMES = [
    (r"embed_tokens\.weight", "embed"),
    (r"layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)", "layer_{0}/attn/{1}/{2}"),
    (r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", "layer_{0}/mlp/{1}/weight"),
    (r"layers\.(\d+)\.input_layernorm\.weight", "layer_{0}/attn_norm/scale"),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", "layer_{0}/post_attn_norm/scale"),
    (r"layers\.(\d+)\.pre_feedforward_layernorm\.weight", "layer_{0}/mlp_norm/scale"),
    (r"layers\.(\d+)\.post_feedforward_layernorm\.weight", "layer_{0}/post_mlp_norm/scale"),
    (r"norm\.weight", "final_norm/scale"),
    (r"lm_head\.weight", "lm_head"),
]
_LN = r"(weight|bias)"
_NAMES: dict[str, list[tuple[str, str]]] = {
    "llama": _LLAMA_NAMES,
    "mistral": _LLAMA_NAMES,
    "qwen2": _LLAMA_NAMES,
    "qwen3": _LLAMA_NAMES + _QK_NORM_NAMES,
    "gemma": _LLAMA_NAMES,
    "gemma2": _GEMMA2_NAMES,
    "gemma3": _GEMMA2_NAMES + _QK_NORM_NAMES,
    # Phi-3: fused q|k|v and gate|up projections, split in `_finish`.
    "phi3": [
        (r"embed_tokens\.weight", "embed"),
        (r"layers\.(\d+)\.self_attn\.qkv_proj\.weight", "layer_{0}/attn/qkv/weight"),
        (r"layers\.(\d+)\.self_attn\.o_proj\.weight", "layer_{0}/attn/o/weight"),
        (r"layers\.(\d+)\.mlp\.gate_up_proj\.weight", "layer_{0}/mlp/gate_up/weight"),
        (r"layers\.(\d+)\.mlp\.down_proj\.weight", "layer_{0}/mlp/down/weight"),
        (r"layers\.(\d+)\.input_layernorm\.weight", "layer_{0}/attn_norm/scale"),
        (r"layers\.(\d+)\.post_attention_layernorm\.weight", "layer_{0}/mlp_norm/scale"),
        (r"norm\.weight", "final_norm/scale"),
        (r"lm_head\.weight", "lm_head"),
    ],
    "falcon": [
        (r"word_embeddings\.weight", "embed"),
        (r"h\.(\d+)\.self_attention\.query_key_value\.(weight|bias)", "layer_{0}/attn/qkv/{1}"),
        (r"h\.(\d+)\.self_attention\.dense\.(weight|bias)", "layer_{0}/attn/o/{1}"),
        (r"h\.(\d+)\.mlp\.dense_h_to_4h\.(weight|bias)", "layer_{0}/mlp/up/{1}"),
        (r"h\.(\d+)\.mlp\.dense_4h_to_h\.(weight|bias)", "layer_{0}/mlp/down/{1}"),
        (rf"h\.(\d+)\.(?:input_layernorm|ln_attn)\.{_LN}", "layer_{0}/attn_norm/{1}"),
        (rf"h\.(\d+)\.(?:post_attention_layernorm|ln_mlp)\.{_LN}", "layer_{0}/mlp_norm/{1}"),
        (rf"ln_f\.{_LN}", "final_norm/{0}"),
        (r"lm_head\.weight", "lm_head"),
    ],
    "bloom": [
        (r"word_embeddings\.weight", "embed"),
        (rf"word_embeddings_layernorm\.{_LN}", "embed_norm/{0}"),
        (r"h\.(\d+)\.self_attention\.query_key_value\.(weight|bias)", "layer_{0}/attn/qkv/{1}"),
        (r"h\.(\d+)\.self_attention\.dense\.(weight|bias)", "layer_{0}/attn/o/{1}"),
        (r"h\.(\d+)\.mlp\.dense_h_to_4h\.(weight|bias)", "layer_{0}/mlp/up/{1}"),
        (r"h\.(\d+)\.mlp\.dense_4h_to_h\.(weight|bias)", "layer_{0}/mlp/down/{1}"),
        (rf"h\.(\d+)\.input_layernorm\.{_LN}", "layer_{0}/attn_norm/{1}"),
        (rf"h\.(\d+)\.post_attention_layernorm\.{_LN}", "layer_{0}/mlp_norm/{1}"),
        (rf"ln_f\.{_LN}", "final_norm/{0}"),
        (r"lm_head\.weight", "lm_head"),
    ],
    "mpt": [
        (r"wte\.weight", "embed"),
        (r"blocks\.(\d+)\.attn\.Wqkv\.weight", "layer_{0}/attn/qkv/weight"),
        (r"blocks\.(\d+)\.attn\.out_proj\.weight", "layer_{0}/attn/o/weight"),
        (r"blocks\.(\d+)\.ffn\.up_proj\.weight", "layer_{0}/mlp/up/weight"),
        (r"blocks\.(\d+)\.ffn\.down_proj\.weight", "layer_{0}/mlp/down/weight"),
        (r"blocks\.(\d+)\.norm_1\.weight", "layer_{0}/attn_norm/weight"),
        (r"blocks\.(\d+)\.norm_2\.weight", "layer_{0}/mlp_norm/weight"),
        (r"norm_f\.weight", "final_norm/weight"),
        (r"lm_head\.weight", "lm_head"),
    ],
    "gpt_bigcode": [
        (r"wte\.weight", "embed"),
        (r"wpe\.weight", "pos_embed"),
        (r"h\.(\d+)\.attn\.c_attn\.(weight|bias)", "layer_{0}/attn/qkv/{1}"),
        (r"h\.(\d+)\.attn\.c_proj\.(weight|bias)", "layer_{0}/attn/o/{1}"),
        (r"h\.(\d+)\.mlp\.c_fc\.(weight|bias)", "layer_{0}/mlp/up/{1}"),
        (r"h\.(\d+)\.mlp\.c_proj\.(weight|bias)", "layer_{0}/mlp/down/{1}"),
        (rf"h\.(\d+)\.ln_1\.{_LN}", "layer_{0}/attn_norm/{1}"),
        (rf"h\.(\d+)\.ln_2\.{_LN}", "layer_{0}/mlp_norm/{1}"),
        (rf"ln_f\.{_LN}", "final_norm/{0}"),
        (r"lm_head\.weight", "lm_head"),
    ],
}


def _qkv_layout(config: ModelConfig, hf: dict[str, Any]) -> str:
    """How a family orders q, k and v inside its fused projection's output rows."""
    if config.family in ("mpt", "phi3") or (config.family == "gpt_bigcode" and config.num_kv_heads == 1):
        return "contiguous"  # [q (all heads), k, v]
    if config.family == "falcon" and (hf.get("new_decoder_architecture") or config.num_kv_heads == 1):
        return "grouped"  # per KV head: [its G query heads, k, v]
    return "per_head"  # per head: [q, k, v]


def split_qkv(fused: np.ndarray, config: ModelConfig, layout: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split a fused QKV weight `[out, in]` or bias `[out]` into q, k, v (rows in head order)."""
    h, hkv, d = config.num_heads, config.num_kv_heads, config.head_dim
    rest = fused.shape[1:]
    if layout == "contiguous":
        return fused[: h * d], fused[h * d : (h + hkv) * d], fused[(h + hkv) * d :]
    if layout == "grouped":
        g = h // hkv
        w = fused.reshape(hkv, g + 2, d, *rest)
        return w[:, :g].reshape(h * d, *rest), w[:, g].reshape(hkv * d, *rest), w[:, g + 1].reshape(hkv * d, *rest)
    w = fused.reshape(h, 3, d, *rest)
    return w[:, 0].reshape(h * d, *rest), w[:, 1].reshape(h * d, *rest), w[:, 2].reshape(h * d, *rest)


def _tensor_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [directory / name for name in sorted(set(weight_map.values()))]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} has no *.safetensors files")
    return files


def _set(tree: dict[str, Any], path: str, value: np.ndarray) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def load_hf(directory: str | os.PathLike[str], dtype: Any) -> tuple[ModelConfig, dict[str, Any], Tokenizer | None]:
    """Read an HF model directory: (config, params cast to `dtype` with Linear weights `[out, in]` as
    stored, tokenizer or None if it has none)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(f"{directory} has no config.json")
    hf = json.loads(config_path.read_text())
    config = config_from_hf(hf)
    names = [(re.compile(pattern), target) for pattern, target in _NAMES[config.family]]
    params: dict[str, Any] = {}
    for file in _tensor_files(directory):
        with safe_open(str(file), framework="numpy") as f:
            for name in f.keys():
                # Gemma 3's multimodal checkpoints keep the text model under language_model.
                short = re.sub(r"^(model\.language_model|language_model\.model|model|transformer)\.", "", name)
                for pattern, target in names:
                    m = pattern.fullmatch(short)
                    if m:
                        # Norm weights are our `scale`, whatever the family calls them.
                        path = re.sub(r"norm/weight$", "norm/scale", target.format(*m.groups()))
                        _set(params, path, f.get_tensor(name))
                        break
    _finish(params, config, hf)
    params = jax.tree.map(lambda a: np.asarray(a, dtype=np.float32).astype(dtype), params)
    tokenizer = None
    if (directory / "tokenizer.json").exists():
        eos = hf.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        tokenizer = tokenizer_from_hf_dir(directory, eos_ids)
    return config, params, tokenizer


def _finish(params: dict[str, Any], config: ModelConfig, hf: dict[str, Any]) -> None:
    """Split fused QKV projections, check that every expected tensor is there."""
    layout = _qkv_layout(config, hf)
    for i in range(config.num_layers):
        layer = params.get(f"layer_{i}")
        if layer is None:
            raise ValueError(f"checkpoint has no weights for layer {i} of {config.num_layers}")
        attn = layer["attn"]
        for part, fused in attn.pop("qkv", {}).items():  # part: "weight" or "bias"
            for proj, value in zip("qkv", split_qkv(fused, config, layout)):
                attn.setdefault(proj, {})[part] = value
        mlp = layer.get("mlp", {})
        if "gate_up" in mlp:  # Phi-3: rows [gate; up]
            gate, up = np.split(mlp.pop("gate_up")["weight"], 2)
            mlp["gate"], mlp["up"] = {"weight": gate}, {"weight": up}
    if config.tie_embeddings:
        params.pop("lm_head", None)
    elif "lm_head" not in params:
        raise ValueError("config says tie_word_embeddings=False but the checkpoint has no lm_head.weight")
    if "embed" not in params:
        raise ValueError("checkpoint has no token embedding")
