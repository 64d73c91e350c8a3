"""Hugging Face model directories: `config.json` + `*.safetensors` (sharded index included).

Each family's tensor names map onto our one parameter layout; fused QKV projections (Falcon, BLOOM,
MPT, GPT-BigCode) are split into q, k and v here, in the family's own fused order.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import jax
import numpy as np
from safetensors import SafetensorError, safe_open

from ..config import ModelConfig, config_from_hf
from .tokenizer import Tokenizer, tokenizer_from_hf_dir
from .validate import ModelFileError, check_params, inside, read_json

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
# Gemma 4: Gemma 3's names plus the per-layer inputs and each layer's scalar.
_GEMMA4_NAMES = [
    (r"embed_tokens_per_layer\.weight", "per_layer_embed"),
    (r"per_layer_model_projection\.weight", "per_layer_model_proj/weight"),
    (r"per_layer_projection_norm\.weight", "per_layer_proj_norm/scale"),
    (r"layers\.(\d+)\.per_layer_input_gate\.weight", "layer_{0}/per_layer_gate/weight"),
    (r"layers\.(\d+)\.per_layer_projection\.weight", "layer_{0}/per_layer_proj/weight"),
    (r"layers\.(\d+)\.post_per_layer_input_norm\.weight", "layer_{0}/per_layer_norm/scale"),
    (r"layers\.(\d+)\.layer_scalar", "layer_{0}/layer_scalar"),
    # the MoE variant: experts stacked as transformers 5 stores them, gate|up fused (split in `_finish`)
    (r"layers\.(\d+)\.router\.proj\.weight", "layer_{0}/moe/router/weight"),
    (r"layers\.(\d+)\.router\.scale", "layer_{0}/moe/router_scale"),
    (r"layers\.(\d+)\.router\.per_expert_scale", "layer_{0}/moe/expert_scale"),
    (r"layers\.(\d+)\.experts\.(gate_up|down)_proj", "layer_{0}/moe/experts/{1}"),
    (r"layers\.(\d+)\.post_feedforward_layernorm_1\.weight", "layer_{0}/post_mlp_norm_1/scale"),
    (r"layers\.(\d+)\.pre_feedforward_layernorm_2\.weight", "layer_{0}/moe_norm/scale"),
    (r"layers\.(\d+)\.post_feedforward_layernorm_2\.weight", "layer_{0}/post_moe_norm/scale"),
]
# Mixture of experts: the router, each expert's matrices (stacked into [E, out, in] in `_finish`) and
# Qwen2-MoE's shared expert. Mixtral's w1 / w3 / w2 are gate / up / down.
_MIXTRAL_NAMES = [
    (r"layers\.(\d+)\.block_sparse_moe\.gate\.weight", "layer_{0}/moe/router/weight"),
    (r"layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.w([123])\.weight", "layer_{0}/moe/expert/{1}/w{2}"),
]
_QWEN_MOE_NAMES = [
    (r"layers\.(\d+)\.mlp\.gate\.weight", "layer_{0}/moe/router/weight"),
    (r"layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", "layer_{0}/moe/expert/{1}/{2}"),
    (r"layers\.(\d+)\.mlp\.shared_expert\.(gate|up|down)_proj\.weight", "layer_{0}/moe/shared/{1}/weight"),
    (r"layers\.(\d+)\.mlp\.shared_expert_gate\.weight", "layer_{0}/moe/shared_gate/weight"),
]
_EXPERT_PARTS = {"w1": "gate", "w3": "up", "w2": "down", "gate": "gate", "up": "up", "down": "down"}
_LN = r"(weight|bias)"
_NAMES: dict[str, list[tuple[str, str]]] = {
    "llama": _LLAMA_NAMES,
    "mistral": _LLAMA_NAMES,
    "qwen2": _LLAMA_NAMES,
    "qwen3": _LLAMA_NAMES + _QK_NORM_NAMES,
    "gemma": _LLAMA_NAMES,
    "mixtral": _MIXTRAL_NAMES + _LLAMA_NAMES,
    "qwen2_moe": _QWEN_MOE_NAMES + _LLAMA_NAMES,
    "qwen3_moe": _QWEN_MOE_NAMES + _LLAMA_NAMES + _QK_NORM_NAMES,
    "gemma2": _GEMMA2_NAMES,
    "gemma3": _GEMMA2_NAMES + _QK_NORM_NAMES,
    "gemma4": _GEMMA4_NAMES + _GEMMA2_NAMES + _QK_NORM_NAMES,
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
    """The safetensors files to read: those the index names (each checked to stay inside `directory`),
    else every `*.safetensors` file there."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFileError(index, "must be an object of tensor name -> file name", "weight_map")
        bad = next((name for name in weight_map.values() if not isinstance(name, str)), None)
        if bad is not None:
            raise ModelFileError(index, f"must map tensor names to file names, found {bad!r}", "weight_map")
        names = sorted(set(weight_map.values()))
        # A hub snapshot's files are links into its repository's blobs/ (huggingface_hub's cache layout).
        blobs = directory.parent.parent / "blobs" if directory.parent.name == "snapshots" else None
        files = [inside(directory, name, index, "weight_map", also=blobs) for name in names]
        for file in files:
            if not file.is_file():
                raise ModelFileError(index, f"names {file.name}, which is not in {directory}", "weight_map")
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelFileError(directory, "has no *.safetensors files")
    return files


def _set(tree: dict[str, Any], path: str, value: np.ndarray) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def read_hf_config(directory: Path) -> tuple[ModelConfig, dict[str, Any]]:
    """(config, the config.json dict) of an HF model directory, validated (ModelFileError)."""
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise ModelFileError(directory, "has no config.json (an HF model directory needs one)")
    hf = read_json(config_path)
    try:
        return config_from_hf(hf), hf
    except ValueError as e:
        raise ModelFileError(config_path, str(e)) from e


def load_hf(directory: str | os.PathLike[str], dtype: Any) -> tuple[ModelConfig, dict[str, Any], Tokenizer | None]:
    """Read an HF model directory: (config, params cast to `dtype` with Linear weights `[out, in]` as
    stored, tokenizer or None if it has none). Every file is validated as it is read (ModelFileError)."""
    directory = Path(directory)
    config, hf = read_hf_config(directory)
    names = [(re.compile(pattern), target) for pattern, target in _NAMES[config.family]]
    params: dict[str, Any] = {}
    origin: dict[str, str] = {}  # our parameter path -> "file: tensor name", for messages
    for file in _tensor_files(directory):
        try:
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
                            origin[path] = f"{file.name}: {name}"
                            break
        except SafetensorError as e:
            raise ModelFileError(file, f"is not a valid safetensors file ({e})") from e
    _finish(params, config, hf, origin, directory)
    check_params(config, params, directory, origin)
    params = jax.tree.map(lambda a: np.asarray(a, dtype=np.float32).astype(dtype), params)
    tokenizer = None
    if (directory / "tokenizer.json").exists():
        eos = hf.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        tokenizer = tokenizer_from_hf_dir(directory, eos_ids, config.vocab_size)
    return config, params, tokenizer


def _finish(params: dict[str, Any], config: ModelConfig, hf: dict[str, Any], origin: dict[str, str], directory) -> None:
    """Split fused QKV and gate|up projections (their row counts checked first), drop a tied LM head."""
    layout = _qkv_layout(config, hf)
    h, hkv, d = config.num_heads, config.num_kv_heads, config.head_dim
    qkv_rows = 3 * h * d if layout == "per_head" else (h + 2 * hkv) * d
    for i in range(config.num_layers):
        layer = params.get(f"layer_{i}", {})
        attn = layer.get("attn", {})
        for part, fused in attn.pop("qkv", {}).items():  # part: "weight" or "bias"
            name = f"layer_{i}/attn/qkv/{part}"
            if fused.ndim != (2 if part == "weight" else 1) or fused.shape[0] != qkv_rows:
                raise ModelFileError(
                    directory,
                    f"has shape {list(fused.shape)}; the config implies {qkv_rows} fused q/k/v rows",
                    origin.get(name, name),
                )
            for proj, value in zip("qkv", split_qkv(fused, config, layout)):
                attn.setdefault(proj, {})[part] = value
                origin[f"layer_{i}/attn/{proj}/{part}"] = origin.get(name, name)
        mlp = layer.get("mlp", {})
        if "gate_up" in mlp:  # Phi-3: [2f, d], rows [gate; up]
            name = f"layer_{i}/mlp/gate_up/weight"
            gate, up = _split_gate_up(
                mlp.pop("gate_up")["weight"], 0, config.ffn_dim, origin.get(name, name), directory
            )
            mlp["gate"], mlp["up"] = {"weight": gate}, {"weight": up}
        experts = layer.get("moe", {}).get("experts", {})
        if "gate_up" in experts:  # Gemma 4's stacked experts: [E, 2f, d], rows [gate; up]
            path = f"layer_{i}/moe/experts/gate_up"
            name = origin.get(path, path)
            experts["gate"], experts["up"] = _split_gate_up(
                experts.pop("gate_up"), 1, config.expert_ffn_dim, name, directory
            )
            for part in ("gate", "up"):
                origin[f"layer_{i}/moe/experts/{part}"] = name
        elif "moe" in layer:
            _stack_experts(layer["moe"], config, i, origin, directory)
        if config.kv_source(i) != i:  # K/V-sharing layers: files may keep unused K/V weights (HF ignores them)
            for unused in ("k", "v", "k_norm"):
                attn.pop(unused, None)
    if config.tie_embeddings:
        params.pop("lm_head", None)


def _split_gate_up(fused: np.ndarray, axis: int, width: int, name: str, directory) -> tuple[np.ndarray, np.ndarray]:
    """A fused gate|up weight -> (gate, up), halves along `axis` (refused unless it has 2 x `width` rows there)."""
    if fused.ndim != axis + 2 or fused.shape[axis] != 2 * width:
        raise ModelFileError(
            directory, f"has shape {list(fused.shape)}; the config implies {2 * width} fused gate|up rows", name
        )
    gate, up = np.split(fused, 2, axis=axis)
    return gate, up


def _stack_experts(moe: dict[str, Any], config: ModelConfig, layer: int, origin: dict[str, str], directory) -> None:
    """Per-expert matrices (`moe/expert/<j>/<part>`, as HF checkpoints store them) -> stacked
    `moe/experts/{gate,up,down}` `[E, out, in]`, refusing a missing expert or part, or a ragged stack."""
    found = moe.pop("expert", {})
    stacked = {}
    for part in ("gate", "up", "down"):
        matrices = []
        for j in range(config.num_experts):
            named = {_EXPERT_PARTS[k]: v for k, v in found.get(str(j), {}).items()}
            if part not in named:
                raise ModelFileError(
                    directory,
                    f"lacks expert {j}'s {part} projection; the config has {config.num_experts} experts per layer",
                    f"layer {layer}",
                )
            matrices.append(named[part])
        if len({m.shape for m in matrices}) != 1:
            problem = f"has experts of different shapes in its {part} projections"
            raise ModelFileError(directory, problem, f"layer {layer}")
        stacked[part] = np.stack(matrices)
        origin[f"layer_{layer}/moe/experts/{part}"] = f"layer {layer}'s experts' {part} projections"
    extra = sorted(set(found) - {str(j) for j in range(config.num_experts)}, key=int)
    if extra:
        raise ModelFileError(
            directory, f"has expert {extra[0]}, but the config has {config.num_experts} experts", f"layer {layer}"
        )
    moe["experts"] = stacked
