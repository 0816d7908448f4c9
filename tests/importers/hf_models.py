"""Tiny random Hugging Face models of every importable model type, built offline on the CPU with transformers."""

from __future__ import annotations

import math
from pathlib import Path

import torch

VOCAB = 128
ATTENTION = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
}
# Windows and chunks shorter than the prompts, so the masks and the chunked scans are exercised.
TINY = {
    "llama": dict(ATTENTION, attention_bias=True, mlp_bias=True),
    "mistral": dict(ATTENTION, sliding_window=8),
    "qwen2": dict(ATTENTION, num_hidden_layers=3, use_sliding_window=True, sliding_window=8, max_window_layers=1),
    "qwen3": dict(ATTENTION, head_dim=32, rope_theta=1000.0),
    "mixtral": dict(ATTENTION, num_local_experts=4, num_experts_per_tok=2),
    "mamba": {"hidden_size": 64, "num_hidden_layers": 2, "vocab_size": VOCAB, "state_size": 8},
    "mamba2": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "vocab_size": VOCAB,
        "state_size": 8,
        "num_heads": 8,
        "head_dim": 16,
        "n_groups": 2,
        "chunk_size": 8,
    },
    "jamba": {
        **ATTENTION,
        "num_hidden_layers": 4,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "expert_layer_period": 2,
        "expert_layer_offset": 1,
        "attn_layer_period": 4,
        "attn_layer_offset": 2,
        "mamba_d_state": 8,
        "mamba_dt_rank": 8,
    },
    "bamba": dict(
        ATTENTION,
        num_hidden_layers=4,
        attn_layer_indices=[1, 3],
        mamba_n_heads=8,
        mamba_d_head=16,
        mamba_n_groups=1,
        mamba_d_state=8,
        mamba_chunk_size=8,
    ),
    # Megatron's pattern; Δ floored by a time_step_limit high enough to bind for some heads and tokens
    "nemotron_h": {
        "hidden_size": 64,
        "vocab_size": VOCAB,
        "layers_block_type": ["linear_attention", "mlp", "full_attention", "mlp", "linear_attention", "mlp"],
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "intermediate_size": 128,
        "ssm_state_size": 8,
        "mamba_num_heads": 8,
        "mamba_head_dim": 16,
        "n_groups": 2,
        "chunk_size": 8,
        "time_step_limit": (0.3, math.inf),
    },
    # Granite's scalars far from 1 so each shows; a shared MLP wider than the experts
    "granitemoehybrid": dict(
        ATTENTION,
        num_hidden_layers=3,
        intermediate_size=32,
        layer_types=["mamba", "attention", "mamba"],
        shared_intermediate_size=48,
        num_local_experts=4,
        num_experts_per_tok=2,
        mamba_n_heads=8,
        mamba_d_state=8,
        mamba_chunk_size=8,
        position_embedding_type="rope",
        embedding_multiplier=12.0,
        residual_multiplier=0.22,
        attention_multiplier=0.0078125,
        logits_scaling=8.0,
    ),
    # Every muP multiplier away from 1 and each distinct, a Mamba-2 narrower than expand·hidden_size (mamba_d_ssm) with
    # two groups, and Falcon-H1-0.5B's norm choice (none); the variant below normalises the gated output in two groups
    "falcon_h1": dict(
        ATTENTION,
        head_dim=32,
        intermediate_size=96,
        mamba_d_ssm=96,
        mamba_n_heads=6,
        mamba_n_groups=2,
        mamba_d_state=8,
        mamba_chunk_size=8,
        embedding_multiplier=5.5,
        lm_head_multiplier=0.04,
        key_multiplier=0.4,
        attention_in_multiplier=1.3,
        attention_out_multiplier=0.9,
        ssm_in_multiplier=1.25,
        ssm_out_multiplier=0.24,
        ssm_multipliers=[0.35, 0.25, 0.45, 0.5, 0.3],
        mlp_multipliers=[0.88, 0.59],
    ),
    "falcon_h1-gated_norm": dict(
        ATTENTION, model_type="falcon_h1", mamba_d_ssm=128, mamba_n_heads=8, mamba_n_groups=2, mamba_d_state=8,
        mamba_chunk_size=8, mamba_rms_norm=True, mamba_norm_before_gate=False, ssm_multipliers=[1.5, 0.5, 1.0, 1.0, 0.7],
        tie_word_embeddings=True,
    ),
    # Gated DeltaNet with two value heads per key head, gated attention every second layer, experts every second layer
    # (dense MLPs between) with a gated shared expert wider than the experts; zero-centred norms moved from 0
    "qwen3_next": dict(
        ATTENTION,
        num_hidden_layers=4,
        head_dim=32,
        intermediate_size=96,
        full_attention_interval=2,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        decoder_sparse_step=2,
    ),
    # one value head per key head, experts in every layer but mlp_only_layers, routing weights not renormalised,
    # attention with biases on every projection
    "qwen3_next-dense_layer": dict(
        ATTENTION,
        model_type="qwen3_next",
        num_hidden_layers=4,
        head_dim=32,
        intermediate_size=96,
        full_attention_interval=4,
        attention_bias=True,
        linear_num_key_heads=2,
        linear_num_value_heads=2,
        linear_key_head_dim=16,
        linear_value_head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=32,
        mlp_only_layers=[0],
        norm_topk_prob=False,
    ),
    # RoPE scalings, with a trained context shorter than the prompts so every branch of the frequency rule is used
    "llama-rope_llama3": dict(
        ATTENTION,
        model_type="llama",
        head_dim=32,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
        tie_word_embeddings=True,
    ),
    "qwen2-rope_yarn": dict(
        ATTENTION,
        model_type="qwen2",
        head_dim=32,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "beta_fast": 16.0,
                         "original_max_position_embeddings": 16},
    ),
}


def tiny_model(case: str, **overrides):
    """A random model of TINY[case] (float32, eval mode), its norm weights moved away from 1 so they matter
    and its Mamba-2 Δ biases spread down. A case is
    named by its model_type, or carries its model_type where it is a variant."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    fields = {**TINY[case], **overrides}
    config = AutoConfig.for_model(fields.pop("model_type", case), **fields)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
            if name.endswith("dt_bias"):  # some steps Δ below the initial range, where a Δ floor binds
                param.sub_(2 * torch.rand_like(param))
            if case == "nemotron_h" and name.endswith(("mixer.D", "mixer.in_proj.weight")):  # the scan, not the skip
                param.mul_(0.05 if name.endswith("D") else 5)
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, like the generated package
    model.generation_config.pad_token_id = 0
    return model


def save_tiny(case: str, directory: Path, **overrides):
    model = tiny_model(case, **overrides)
    model.save_pretrained(directory)
    return model
