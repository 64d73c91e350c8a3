"""Tiny GGUF files written from tiny HF models the way llama.cpp's `convert_hf_to_gguf.py` writes them.

What the converter does per architecture, and so what a GGUF loader must undo:
- llama: Q and K rows permuted for adjacent-pair RoPE; Llama 3.1 scaling as a `rope_freqs` tensor.
- gemma, gemma2, gemma3: every RMSNorm weight stored as (1 + w); fixed local/global patterns.
- phi3: fused `attn_qkv` and `ffn_up` (= [gate; up]); longrope factors as tensors.
- qwen2 / qwen3: names only.
- Mixtral (`llama` with experts), qwen2moe, qwen3moe: each layer's experts stacked into one tensor per
  projection (`ffn_{gate,up,down}_exps`, [E, out, in]), the router as `ffn_gate_inp`; Qwen2-MoE's shared
  expert as `ffn_*_shexp` and its one-row gate as the vector `ffn_gate_inp_shexp`.
Where HF transformers reads the architecture from GGUF too, the tests load these files there as well,
which checks this writer against an implementation no one here wrote.
"""

from __future__ import annotations

import math
from pathlib import Path

import gguf
import numpy as np
import torch
import transformers as tf

import hf_models

VOCAB = hf_models.VOCAB


def configs() -> dict[str, tuple[str, tf.PretrainedConfig]]:
    """name -> (GGUF architecture, HF config), tiny, with sequences of the tests longer than any window.
    Where a family's tiny HF-parity config suits llama.cpp's assumptions it is reused from hf_models."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=112)
    # Gemma as llama.cpp assumes it: query_pre_attn_scalar = head_dim, every 2nd (Gemma 2) or 6th (Gemma 3)
    # layer global, Gemma 3's local base 10k.
    gemma = dict(common, num_attention_heads=2, num_key_value_heads=1, head_dim=256, query_pre_attn_scalar=256)
    parity = hf_models.configs()
    return {
        "llama": ("llama", tf.LlamaConfig(**common, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)),
        "llama31": ("llama", parity["llama"]),  # Llama 3.1 scaling: llama.cpp writes it as `rope_freqs`
        "qwen2": ("qwen2", parity["qwen2"]),
        "qwen3": (
            "qwen3",
            # head_dim 128 (!= 64 / 4), as every Qwen3: HF's GGUF reader assumes it rather than reading key_length.
            tf.Qwen3Config(**common, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=128),
        ),
        "gemma": ("gemma", parity["gemma"]),
        "gemma2": ("gemma2", tf.Gemma2Config(**gemma, num_hidden_layers=4, sliding_window=7)),
        "gemma3": ("gemma3", tf.Gemma3TextConfig(**gemma, num_hidden_layers=6, sliding_window=5)),
        "phi3": ("phi3", parity["phi3"]),
        "phi3_longrope": ("phi3", parity["phi3_longrope"]),
        # No sliding window: llama.cpp's `llama` architecture has none (nor has Mixtral-8x7B). Expert width 128:
        # whole 32-blocks in every expert matrix, so that they can be stored quantized.
        "mixtral": (
            "llama",
            tf.MixtralConfig(
                **{**common, "intermediate_size": 128},
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_local_experts=4,
            ),
        ),
        # The experts' widths are HF's defaults (1408, shared 5632; 768 for Qwen3-MoE): HF's GGUF reader does
        # not read expert_feed_forward_length, and it rereads these files as a check of this writer.
        "qwen2moe": (
            "qwen2moe",
            tf.Qwen2MoeConfig(
                **common,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                num_experts=4,
                num_experts_per_tok=2,
            ),
        ),
        # All layers MoE (llama.cpp's qwen3moe has no dense layers), head_dim 128 as for Qwen3.
        "qwen3moe": (
            "qwen3moe",
            tf.Qwen3MoeConfig(
                **common,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                head_dim=128,
                num_experts=4,
                num_experts_per_tok=2,
                norm_topk_prob=True,
            ),
        ),
    }


def build(name: str, seed: int = 0) -> tuple[str, torch.nn.Module]:
    """The tiny HF model `name` (eval, float32) with every weight perturbed; returns (architecture, model)."""
    arch, config = configs()[name]
    return arch, hf_models.perturbed(config, seed)


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: rotate-half row order -> adjacent pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NORMS = {  # HF name -> llama.cpp name, for the Gemma 2/3 sandwich layout
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
}


def write(arch: str, model: torch.nn.Module, path: Path, quantized: dict[str, str] | None = None) -> Path:
    """Write `model` as a GGUF of architecture `arch` at `path`: float32 tensors, except that a matrix whose
    name ends with a key of `quantized` is stored in that GGUF type (e.g. {"ffn_down.weight": "Q5_0"})."""
    cfg = model.config
    sd = {k.removeprefix("model."): v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    gemma = arch.startswith("gemma")
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if experts:
        w.add_expert_count(experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        if arch != "llama":
            w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if arch == "qwen2moe":
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)
    rope = cfg.rope_parameters
    rope = rope.get("full_attention", rope)
    w.add_rope_freq_base(rope["rope_theta"])
    rotary = int(head_dim * rope.get("partial_rotary_factor", 1.0))
    w.add_rope_dimension_count(rotary)
    if arch in ("gemma2", "gemma3"):
        w.add_sliding_window(cfg.sliding_window)
    if arch == "gemma2":
        w.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
        w.add_final_logit_softcapping(cfg.final_logit_softcapping)
    tokens = [f"<t{i}>" for i in range(VOCAB)]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([1] * VOCAB)
    w.add_token_merges([])
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)

    def add(name: str, value: np.ndarray) -> None:
        value = np.ascontiguousarray(value, dtype=np.float32)
        kind = next((k for suffix, k in (quantized or {}).items() if name.endswith(suffix)), None)
        if kind is None:
            w.add_tensor(name, value)
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)

    def norm(value: np.ndarray) -> np.ndarray:
        return value + 1.0 if gemma else value

    add("token_embd.weight", sd["embed_tokens.weight"])
    if "lm_head.weight" in sd and not cfg.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    add("output_norm.weight", norm(sd["norm.weight"]))
    if rope.get("rope_type") == "longrope":
        w.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
        scale = cfg.max_position_embeddings / cfg.original_max_position_embeddings
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(cfg.original_max_position_embeddings)))
        add("rope_factors_long.weight", np.asarray(rope["long_factor"]))
        add("rope_factors_short.weight", np.asarray(rope["short_factor"]))
    if rope.get("rope_type") == "llama3":  # llama.cpp's precomputed divisors: base / scaled frequencies
        base = 1.0 / (rope["rope_theta"] ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
        add("rope_freqs.weight", base / model.model.rotary_emb.inv_freq.numpy())
    for i in range(cfg.num_hidden_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        if arch == "phi3":
            add(b + "attn_qkv.weight", sd[p + "self_attn.qkv_proj.weight"])
            add(b + "ffn_up.weight", sd[p + "mlp.gate_up_proj.weight"])
        else:
            q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
            if arch == "llama":
                q, k = _permute(q, heads), _permute(k, kv_heads)
            add(b + "attn_q.weight", q)
            add(b + "attn_k.weight", k)
            add(b + "attn_v.weight", sd[p + "self_attn.v_proj.weight"])
            for proj in "qkv":
                if p + f"self_attn.{proj}_proj.bias" in sd:
                    add(b + f"attn_{proj}.bias", sd[p + f"self_attn.{proj}_proj.bias"])
            if experts:
                gate_up = sd[p + "mlp.experts.gate_up_proj"]  # HF's in-memory [E, 2f, d]: rows [gate; up]
                add(b + "ffn_gate_inp.weight", sd[p + "mlp.gate.weight"])
                add(b + "ffn_gate_exps.weight", gate_up[:, : gate_up.shape[1] // 2])
                add(b + "ffn_up_exps.weight", gate_up[:, gate_up.shape[1] // 2 :])
                add(b + "ffn_down_exps.weight", sd[p + "mlp.experts.down_proj"])
                if arch == "qwen2moe":
                    for proj in ("gate", "up", "down"):
                        add(b + f"ffn_{proj}_shexp.weight", sd[p + f"mlp.shared_expert.{proj}_proj.weight"])
                    add(b + "ffn_gate_inp_shexp.weight", sd[p + "mlp.shared_expert_gate.weight"][0])
            else:
                add(b + "ffn_gate.weight", sd[p + "mlp.gate_proj.weight"])
                add(b + "ffn_up.weight", sd[p + "mlp.up_proj.weight"])
        add(b + "attn_output.weight", sd[p + "self_attn.o_proj.weight"])
        if not experts:
            add(b + "ffn_down.weight", sd[p + "mlp.down_proj.weight"])
        for proj in "qk":
            if p + f"self_attn.{proj}_norm.weight" in sd:
                add(b + f"attn_{proj}_norm.weight", norm(sd[p + f"self_attn.{proj}_norm.weight"]))
        if arch in ("gemma2", "gemma3"):
            for theirs, ours in _NORMS.items():
                add(b + ours + ".weight", norm(sd[p + theirs + ".weight"]))
        else:
            add(b + "attn_norm.weight", norm(sd[p + "input_layernorm.weight"]))
            add(b + "ffn_norm.weight", norm(sd[p + "post_attention_layernorm.weight"]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
