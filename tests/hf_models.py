"""Tiny random-weight Hugging Face models of every supported family, saved as HF directories.

The reference implementation is HF transformers' own model code; weights are HF's init plus
noise on every tensor (norm scales and biases included), so no parameter can go unused unnoticed.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf

VOCAB = 96


def _configs() -> dict[str, tf.PretrainedConfig]:
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, intermediate_size=112)
    phi3 = dict(common, num_attention_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return {
        # GQA 4:2, Llama-3.1 frequency scaling, untied head.
        "llama": tf.LlamaConfig(
            **common,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=256,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        ),
        # Linear RoPE scaling, MHA, tied embeddings.
        "llama_linear": tf.LlamaConfig(
            **common,
            num_attention_heads=4,
            num_key_value_heads=4,
            max_position_embeddings=256,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        ),
        # Sliding window shorter than the test sequences.
        "mistral": tf.MistralConfig(
            **common, num_attention_heads=4, num_key_value_heads=2, sliding_window=7, max_position_embeddings=256
        ),
        "qwen2": tf.Qwen2Config(**common, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256),
        # MQA, head_dim != hidden / heads, GeGLU, (1 + w) RMSNorm, sqrt(d) embedding scale.
        "gemma": tf.GemmaConfig(
            **common, num_attention_heads=4, num_key_value_heads=1, head_dim=24, max_position_embeddings=256
        ),
        # Mistral v0.3 / Ministral style: explicit head_dim (!= hidden / heads), no window.
        "mistral_head_dim": tf.MistralConfig(
            **common, num_attention_heads=4, num_key_value_heads=2, head_dim=24, sliding_window=None
        ),
        # Ministral: per-layer sliding / full attention from layer_types, explicit head_dim.
        "ministral": tf.MinistralConfig(
            **{**common, "num_hidden_layers": 3},
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"],
            max_position_embeddings=256,
        ),
        # Gemma 2: alternating sliding (window 7 < the test sequences) / full layers, both soft-caps small
        # enough to bend the scores, query_pre_attn_scalar != head_dim, four norms per block.
        "gemma2": tf.Gemma2Config(
            **{**common, "num_hidden_layers": 3},
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            sliding_window=7,
            query_pre_attn_scalar=24,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=3.0,
            max_position_embeddings=256,
        ),
        # Gemma 3 (text): MQA, QK-norm, 2 sliding : 1 full, local base 10k, global 1e6 with linear scaling.
        "gemma3": tf.Gemma3TextConfig(
            **{**common, "num_hidden_layers": 3},
            num_attention_heads=4,
            num_key_value_heads=1,
            head_dim=32,
            sliding_window=5,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            query_pre_attn_scalar=32,
            max_position_embeddings=256,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            },
        ),
        # Gemma 4 with per-layer inputs (as its small "E" models), the last 2 of 6 layers sharing K/V (one
        # sliding, one full) with double-wide MLPs, wider heads in full layers (per_layer_config),
        # proportional RoPE turning a quarter of each full head, a V norm, attention scale 1, a final
        # soft-cap that bends the logits.
        "gemma4": tf.Gemma4TextConfig(
            **{**common, "num_hidden_layers": 6},
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            global_head_dim=32,
            sliding_window=5,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
            num_kv_shared_layers=2,
            use_double_wide_mlp=True,
            hidden_size_per_layer_input=8,
            vocab_size_per_layer_input=VOCAB,
            final_logit_softcapping=3.0,
            max_position_embeddings=256,
        ),
        # Gemma 4 whose full layers take V from K's projection (attention_k_eq_v) and have one KV head
        # (MQA) against two in sliding layers; no per-layer inputs, no K/V sharing; half of each full head turning.
        "gemma4_k_eq_v": tf.Gemma4TextConfig(
            **{**common, "num_hidden_layers": 4},
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            global_head_dim=32,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"] * 2,
            hidden_size_per_layer_input=0,
            max_position_embeddings=256,
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5, "rope_theta": 1e5},
            },
        ),
        # Gemma 4's MoE variant (as gemma-4-26B-A4B): every layer's dense MLP plus top-2 of 4 experts
        # beside it, the router's norm, feature scale and per-expert scales; experts stored stacked.
        "gemma4_moe": tf.Gemma4TextConfig(
            **{**common, "num_hidden_layers": 2},
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            global_head_dim=32,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention"],
            hidden_size_per_layer_input=0,
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=40,
            max_position_embeddings=256,
        ),
        # Qwen3: QK-norm, explicit head_dim, no QKV bias, untied head.
        "qwen3": tf.Qwen3Config(
            **common, num_attention_heads=4, num_key_value_heads=2, head_dim=24, max_position_embeddings=256
        ),
        # Phi-3.5 style: longrope past a 16-token pretraining length (the test sequences exceed it), partial rotary.
        "phi3_longrope": tf.Phi3Config(
            **phi3,
            num_key_value_heads=2,
            max_position_embeddings=64,
            original_max_position_embeddings=16,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.5,
                "short_factor": [1.0, 1.3, 1.9, 2.4],
                "long_factor": [1.1, 2.5, 4.0, 7.5],
            },
        ),
        # longrope within the pretraining length (short factors), full rotary.
        "phi3_short": tf.Phi3Config(
            **phi3,
            num_key_value_heads=4,
            max_position_embeddings=256,
            original_max_position_embeddings=64,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0, 1.2, 1.5, 1.7, 2.0, 2.2, 2.6, 3.0],
                "long_factor": [1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0],
            },
        ),
        # Phi-3-mini-4k style: plain RoPE, fused projections.
        "phi3": tf.Phi3Config(**phi3, num_key_value_heads=2, max_position_embeddings=256),
        # Falcon-7B style: MQA, parallel attention + MLP with one shared LayerNorm.
        "falcon": tf.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            multi_query=True,
            parallel_attn=True,
            new_decoder_architecture=False,
            bias=False,
            alibi=False,
        ),
        # Falcon-40B style: grouped KV heads, separate LayerNorms for attention and MLP, biases.
        "falcon_40b": tf.FalconConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_kv_heads=2,
            new_decoder_architecture=True,
            bias=True,
            alibi=False,
        ),
        # Mixtral: 4 experts, top-2 renormalised, GQA, a sliding window shorter than the test sequences.
        "mixtral": tf.MixtralConfig(
            **common,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=11,
            max_position_embeddings=256,
        ),
        # Qwen3-MoE: top-3 of 6 renormalised (norm_topk_prob), QK-norm, layer 1 dense (mlp_only_layers).
        "qwen3_moe": tf.Qwen3MoeConfig(
            **{**common, "num_hidden_layers": 3},
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=24,
            num_experts=6,
            num_experts_per_tok=3,
            moe_intermediate_size=40,
            norm_topk_prob=True,
            mlp_only_layers=[1],
            max_position_embeddings=256,
        ),
        # Qwen2-MoE: top-1 of 4 without renormalisation, the sigmoid-gated shared expert, QKV bias.
        "qwen2_moe": tf.Qwen2MoeConfig(
            **common,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=4,
            num_experts_per_tok=1,
            moe_intermediate_size=48,
            shared_expert_intermediate_size=72,
            norm_topk_prob=False,
            max_position_embeddings=256,
        ),
        # ALiBi with a non-power-of-two head count (6).
        "bloom": tf.BloomConfig(vocab_size=VOCAB, hidden_size=96, n_layer=2, n_head=6),
        "mpt": tf.MptConfig(vocab_size=VOCAB, d_model=96, n_layers=2, n_heads=6, max_seq_len=256),
        # MQA with learned absolute positions.
        "gpt_bigcode": tf.GPTBigCodeConfig(
            vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256, multi_query=True
        ),
    }


FAMILY_CASES = tuple(_configs())


def perturbed(config: tf.PretrainedConfig, seed: int = 0) -> torch.nn.Module:
    """The HF model for `config` (eval, float32, eager attention) with noise added to every weight."""
    torch.manual_seed(seed)
    config._attn_implementation = "eager"
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="eager").float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for name, buffer in model.named_buffers():  # Gemma 4's per-layer output scale is a saved buffer
            if name.endswith("layer_scalar"):
                buffer.mul_(1 + torch.randn_like(buffer) * 0.3)
    return model


def configs() -> dict[str, tf.PretrainedConfig]:
    return _configs()


def build(name: str, directory: Path, seed: int = 0) -> torch.nn.Module:
    """Create the tiny HF model `name`, perturb every weight, save it to `directory`; return it (eval, float32)."""
    model = perturbed(_configs()[name], seed)
    model.save_pretrained(directory)
    return model


def hf_logits(model: torch.nn.Module, tokens) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.as_tensor(tokens, dtype=torch.long)).logits.float()
