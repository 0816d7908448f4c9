"""How many ops one batch-1 decode step dispatches, at the real sizes of bench/specs/bamba_1b.yaml and
specs/hymba_plus.yaml (on the meta device: nothing is computed). Inside a CUDA graph a step costs a few microseconds
per kernel on top of reading the weights, so these counts are tracked: a change that adds ops to a step fails here
and must say why, or lower the bound when it removes some (bench/decode.py counts the CUDA kernels on the GPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from archgen.benchmark import decode_step_ops
from tests.conftest import build_package

ROOT = Path(__file__).resolve().parents[2]


def step_ops(tmp_path, spec: str, context: int = 256) -> dict:
    pytest.importorskip("triton")
    package = build_package(ROOT / spec, tmp_path, preset=None)
    with torch.device("meta"):
        model = package.Model().to(torch.bfloat16).eval()
    return decode_step_ops(model, context=context)


def test_a_mamba2_layer_decodes_in_four_ops_and_bamba_in_at_most_141(tmp_path):
    """A Mamba-2 mixer's step: its in_proj, the fused mamba2_step_ (conv, SiLU, Δ, state update written in place, D,
    z gate), the copy of its new conv state into the cache, its out_proj (the projections are DecodeLinear modules: the
    GEMV); its gated norm is one FusedRMSNorm op. A SwiGLU MLP's: the gate and up products with the gate (one GEMV),
    down_proj with the block's residual add in its epilogue (residual_linear: 167 ops with the add). An attention layer's q, k and v products, its RoPE and cache write: one
    qkv_rope_write_kv_, the GEMV with the rotation and the write in its epilogue (151 ops with the GEMV, qkv_linear, and
    the RoPE kernel, apply_rope_write_kv_; before that, the rotation and two index_copy_); its attention over the cache: one
    decode_attention_one_launch (the split-KV kernel, its mask from the positions, its splits combined in the same
    launch: 171 ops with SDPA and the mask's ops)."""
    ops = step_ops(tmp_path, "bench/specs/bamba_1b.yaml")
    assert ops["by_op"]["archgen_v1.mamba2_step_.default"] == ops["instances"]["Ssm"] == 12
    assert ops["by_module"]["Ssm"] == 2 * 12, ops["by_module"]
    assert ops["by_op"]["archgen_v1.swiglu_linear.default"] == ops["instances"]["Mlp"] == 16
    # down_proj with the block's residual add in its epilogue (residual_linear): the Mlp's own op, no add after it
    assert ops["by_op"]["archgen_v1.residual_linear.default"] == 16
    assert ops["by_module"]["Mlp"] == 2 * 16, ops["by_module"]
    assert ops["by_op"]["archgen_v1.qkv_rope_write_kv_.default"] == ops["instances"]["Attn"] == 4
    assert "aten.mm.default" not in ops["by_op"], ops["by_op"]  # every product of the step is a GEMV
    # RoPE's angles: once a step (StepContext), not once a layer, in one launch (the cast, product, cos and sin before)
    assert ops["by_op"]["archgen_v1.rope_cos_sin.default"] == 1 and "aten.cos.default" not in ops["by_op"]
    assert "archgen_v1.qkv_linear.default" not in ops["by_op"], ops["by_op"]
    assert "archgen_v1.apply_rope_write_kv_.default" not in ops["by_op"], ops["by_op"]
    assert "aten.index_copy_.default" not in ops["by_op"], ops["by_op"]
    assert ops["by_op"]["archgen_v1.decode_attention_one_launch.default"] == 4
    assert "aten.scaled_dot_product_attention" not in ops["by_op"], ops["by_op"]
    assert ops["total"] <= 141, ops["by_module"]


def test_hymba_plus_decodes_in_at_most_294_ops(tmp_path):
    """A Mamba-1 head's step: in_proj's GEMV with the conv at T = 1 in its epilogue, shifting the cache's conv state in
    place (in_proj_conv_step_: 433 ops with the GEMV and causal_conv1d_update_, 529 before that with the functional
    conv and the copy of its new state into the cache) and mamba_step_low_rank_, which projects Δ from its low rank
    (dt_proj) and writes the SSM state in place (its x_proj and out_proj are DecodeLinear modules). Each of the 32 attention heads (29 windowed, 3 global) takes its q,
    k and v products in one GEMV. RoPE's angles and the mask are computed by the first layer of each attention
    component (attn, global_attn) and shared by the rest, the angles by every layer with the same RoPE (both
    components here) in one launch (rope_cos_sin; 337 ops with each component's cast, product, cos and sin, an arange
    for the step's positions and one for the plain caches' slot positions, which are now kept, and the positions a
    view): an attention layer's step is its qkv GEMV with the RoPE of
    q and k and the write of the rotated k and v into the cache in its epilogue (qkv_rope_write_kv_: 401 ops with the
    GEMV and the RoPE kernel writing the cache, apply_rope_write_kv_, 604 with the two index_copy_ a layer before it),
    decode_attention_one_launch (the split-KV kernel, whose mask comes from the slots' positions: 540 ops with SDPA and
    the mask)
    (the slots' positions too are asked of the first layer's cache only). Each parallel layer then runs its two branches'
    output projections (o_proj, out_proj) as combining_linear_, whose second launch combines the branches (two norms,
    two scales, the mean), adds the result to the residual stream and norms that for the MLP (369 ops with the two
    projections' GEMVs and normalized_mean_add_norm after them; 465 with normalized_mean and the ffn_norm's add +
    norm), and each MLP adds the residual stream in its down projection's GEMV (residual_linear: 497 ops with the
    add). The block's mixer_norm runs inside both branches' first GEMVs (rms_norm_in_proj_conv_step_ and
    rms_norm_qkv_rope_write_kv_, the parallel layers' Kind.folds_input_norm: 326 ops with its own launch)."""
    ops = step_ops(tmp_path, "specs/hymba_plus.yaml")
    assert "aten.mm.default" not in ops["by_op"], ops["by_op"]
    assert ops["by_op"]["archgen_v1.mamba_step_low_rank_.default"] == ops["instances"]["Ssm"] == 32
    assert ops["by_op"]["archgen_v1.rms_norm_in_proj_conv_step_.default"] == 32
    assert "archgen_v1.in_proj_conv_step_.default" not in ops["by_op"], ops["by_op"]
    assert "archgen_v1.causal_conv1d_update_.default" not in ops["by_op"], ops["by_op"]
    assert ops["by_module"]["Ssm"] == 2 * 32, ops["by_module"]
    assert ops["by_op"]["archgen_v1.rms_norm_qkv_rope_write_kv_.default"] == ops["instances"]["Attn"] + ops["instances"]["GlobalAttn"] == 32
    # one RoPE (the windowed and the global layers share it): its angles once a step
    assert ops["by_op"]["archgen_v1.rope_cos_sin.default"] == 1 and "aten.cos.default" not in ops["by_op"]
    assert "aten.arange.default" not in ops["by_op"], ops["by_op"]  # the positions: a view; the slots': the cache's
    assert "archgen_v1.qkv_linear.default" not in ops["by_op"], ops["by_op"]
    assert "archgen_v1.apply_rope_write_kv_.default" not in ops["by_op"], ops["by_op"]
    assert "aten.index_copy_.default" not in ops["by_op"], ops["by_op"]
    assert ops["by_module"]["Attn"] <= 3 * ops["instances"]["Attn"] + 12, ops["by_module"]
    assert ops["by_op"]["archgen_v1.combining_linear_.default"] == 2 * 32
    assert "archgen_v1.normalized_mean_add_norm.default" not in ops["by_op"], ops["by_op"]
    assert "archgen_v1.normalized_mean.default" not in ops["by_op"], ops["by_op"]
    assert ops["by_op"]["archgen_v1.linear.default"] == 32 + 1  # x_proj and the LM head: no o_proj, no out_proj
    assert ops["by_op"]["archgen_v1.rms_norm.default"] == 1  # the final norm only: the mixer norms are folded
    assert ops["by_op"]["archgen_v1.residual_linear.default"] == 32
    assert ops["by_op"]["archgen_v1.decode_attention_one_launch.default"] == 32
    assert "aten.scaled_dot_product_attention" not in ops["by_op"], ops["by_op"]
    assert ops["by_module"]["AttnSsmParallel"] == 2 * ops["instances"]["AttnSsmParallel"], ops["by_module"]
    assert ops["total"] <= 294, ops["by_module"]


def test_hymba_plus_ring_caches_decode_in_at_most_304_ops(tmp_path):
    """Past its window (2048 positions: the 29 windowed layers' caches are rings of 1024) a step writes each ring
    through the qkv GEMV's epilogue too, at the slot the StepContext computed once for the component (one remainder, and one
    for the slots' positions decode_attention masks with), never one a layer."""
    ops = step_ops(tmp_path, "specs/hymba_plus.yaml", context=2048)
    assert ops["by_op"]["archgen_v1.rms_norm_qkv_rope_write_kv_.default"] == 32
    assert "aten.index_copy_.default" not in ops["by_op"], ops["by_op"]
    assert ops["by_op"]["aten.remainder.Scalar"] == 2, ops["by_op"]
    assert ops["by_op"]["archgen_v1.decode_attention_one_launch.default"] == 32
    assert ops["total"] <= 304, ops["by_module"]
