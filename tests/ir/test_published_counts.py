"""The cost model against numbers computed outside archgen: published parameter counts, the closed-form FLOPs of a
dense transformer, Llama-3-8B's KV cache, and the active parameters of a small MoE worked out by hand.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from archgen.passes.cost import cost_report
from archgen.pipeline import compile_spec

PUBLISHED = Path(__file__).resolve().parents[1] / "specs" / "published"
LLAMA = PUBLISHED / "llama3_8b.yaml"
MAMBA = PUBLISHED / "mamba_2p8b.yaml"

# Llama-3-8B as released: 32 layers, d_model 4096, 32 query heads and 8 KV heads of 128, SwiGLU 14336, vocab 128256.
L3_LAYERS, L3_D, L3_HEADS, L3_KV_HEADS, L3_HEAD_DIM, L3_HIDDEN, L3_VOCAB = 32, 4096, 32, 8, 128, 14336, 128256


def report(path, preset=None, overrides=(), **options):
    return cost_report(compile_spec(path, preset, overrides).ir, **options)


# ------------------------------------------------------------------------------------------------ parameters
def test_llama3_8b_has_exactly_the_published_8_030_261_248_parameters():
    assert report(LLAMA).total_params == 8_030_261_248


def test_mamba_2p8b_has_exactly_the_published_2_768_345_600_parameters():
    assert report(MAMBA).total_params == 2_768_345_600


def test_mamba_2p8b_layer_matches_the_reference_module_term_by_term():
    d, d_inner, dt_rank, d_state, d_conv = 2560, 5120, 160, 16, 4
    layer = (
        d * 2 * d_inner  # in_proj (x and z), no bias
        + d_inner * d_conv + d_inner  # depthwise conv1d with bias
        + d_inner * (dt_rank + 2 * d_state)  # x_proj -> dt, B, C
        + dt_rank * d_inner + d_inner  # dt_proj with bias
        + d_inner * d_state + d_inner  # A_log, D
        + d_inner * d  # out_proj
        + d  # the block's RMSNorm
    )
    costs = report(MAMBA)
    assert [row.params for row in costs.layers if row.index is not None] == [layer] * 64
    assert costs.total_params == 64 * layer + 50280 * d + d  # tied embedding, final norm


def test_llama3_8b_layer_matches_the_reference_module_term_by_term():
    d, kv = L3_D, L3_KV_HEADS * L3_HEAD_DIM
    layer = 2 * d * d + 2 * d * kv + 3 * d * L3_HIDDEN + 2 * d  # q, o; k, v; gate, up, down; two RMSNorms
    costs = report(LLAMA)
    assert [row.params for row in costs.layers if row.index is not None] == [layer] * L3_LAYERS
    assert costs.embedding_params == L3_VOCAB * d


# ------------------------------------------------------------------------------------------------------ FLOPs
def dense_matmul_params() -> int:
    """Llama-3-8B's parameters that multiply activations: every projection and the untied LM head (no embedding,
    no norm weights)."""
    d, kv = L3_D, L3_KV_HEADS * L3_HEAD_DIM
    per_layer = 2 * d * d + 2 * d * kv + 3 * d * L3_HIDDEN
    return L3_LAYERS * per_layer + L3_VOCAB * d


def causal_attention_flops(seq_len: int, window: int | None = None) -> int:
    """QK^T and AV over the keys each query sees: 2 matmuls x 2 FLOPs per multiply-add x heads x head_dim x keys."""
    keys = sum(min(i + 1, window or seq_len) for i in range(seq_len))
    return L3_LAYERS * 2 * 2 * L3_HEADS * L3_HEAD_DIM * keys


@pytest.mark.parametrize("seq_len", [1, 63, 2048, 8192])
def test_dense_forward_flops_are_2_n_per_token_plus_the_causal_attention_term(seq_len):
    costs = report(LLAMA, seq_len=seq_len)
    expected = 2 * dense_matmul_params() * seq_len + causal_attention_flops(seq_len)
    assert costs.forward_flops_per_sequence == expected
    assert costs.forward_flops_per_token == pytest.approx(expected / seq_len, rel=1e-12)


@pytest.mark.parametrize("seq_len, window", [(2048, 512), (63, 16), (100, 100), (100, 1000)])
def test_sliding_window_attention_counts_only_the_keys_in_the_window(seq_len, window):
    costs = report(LLAMA, overrides=[f"mixers.attn.window={window}"], seq_len=seq_len)
    assert costs.forward_flops_per_sequence == 2 * dense_matmul_params() * seq_len + causal_attention_flops(seq_len, window)


def test_llama3_8b_flops_per_token_at_2048_are_near_the_2n_rule_of_thumb():
    costs = report(LLAMA, seq_len=2048)
    non_embedding = costs.total_params - costs.embedding_params
    assert 2 * non_embedding < costs.forward_flops_per_token < 2 * non_embedding * 1.1


# -------------------------------------------------------------------------------------------------------- cache
def test_llama3_8b_kv_cache_at_8192_tokens_in_bf16_is_one_gib():
    expected = 2 * L3_LAYERS * L3_KV_HEADS * L3_HEAD_DIM * 8192 * 2  # K and V, layers, heads, dim, tokens, bytes
    assert expected == 2**30
    costs = report(LLAMA, context=8192, contexts=(8192, 2048))
    assert costs.cache_bytes_by_context == {8192: expected, 2048: expected // 4}
    assert sum(row.cache_bytes for row in costs.layers) == expected


def test_kv_cache_in_float32_is_twice_bf16():
    assert report(LLAMA, cache_dtype="float32", contexts=(8192,)).cache_bytes_by_context[8192] == 2**31


def test_mamba_cache_does_not_grow_with_context():
    by_context = report(MAMBA, contexts=(2048, 131072)).cache_bytes_by_context
    assert by_context[2048] == by_context[131072] > 0


# ---------------------------------------------------------------------------------------------------------- MoE
SMALL_MOE = """\
schema_version: 1
name: small_moe
model: {d_model: 64, vocab_size: 256, tie_embeddings: false}
mixers:
  attn: {kind: attention, n_heads: 4}
ffns:
  moe: {kind: moe, n_experts: 8, top_k: 2, shared_experts: 1, expert: {activation: swiglu, hidden: 128}}
layout: {n_layers: 2, mixers: attn, ffns: moe}
"""


def test_small_moe_total_and_active_parameters_match_a_hand_count(tmp_path):
    spec = tmp_path / "small_moe.yaml"
    spec.write_text(SMALL_MOE, encoding="utf-8")
    d, vocab, hidden, experts, top_k = 64, 256, 128, 8, 2
    expert = 3 * d * hidden  # SwiGLU: gate, up, down = 24,576
    layer = (
        4 * d * d  # q, k, v, o (4 heads of 16, no GQA) = 16,384
        + 2 * d  # two RMSNorms
        + experts * d  # router = 512
        + experts * expert  # routed experts = 196,608
        + expert  # one shared expert, always on
    )
    total = 2 * vocab * d + 2 * layer + d  # embedding, untied head, 2 layers, final norm
    active = total - 2 * (experts - top_k) * expert  # 6 of the 8 routed experts idle for each token, per layer
    assert (total, active) == (509_248, 214_336)

    costs = report(spec)
    assert costs.total_params == total
    assert costs.active_params == active
