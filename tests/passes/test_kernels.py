"""Kernel selection: the pass gives each op one kernel per function, from the first matching rule naming it, and the
emitter ships and calls exactly the kernels the ops were given."""

from __future__ import annotations

from pathlib import Path

import pytest

from archgen.emit import emit
from archgen.passes.kernels import KERNEL_RULES, KernelRule, select_kernels
from archgen.pipeline import compile_spec
from tests.conftest import ROOT

NEXUS = ROOT / "specs" / "nexus.yaml"  # Mamba-1 and attention
HSPMN = ROOT / "specs" / "hspmn.yaml"  # convolution and sparse attention
ATTENTION_ONLY = """\
schema_version: 1
name: attention_only
model: {d_model: 32, vocab_size: 64, max_seq_len: 64, norm: {kind: layernorm, eps: 1.0e-5}}
mixers:
  attn: {kind: attention, n_heads: 2, n_kv_heads: 1, rope: null}
ffns:
  mlp: {kind: mlp, activation: gelu, hidden: 64}  # no kernel (SwiGLU's: kernels/silu_mul.py)
layout: {mixers: attn*2, ffns: mlp}
"""
BAMBA = ROOT / "bench" / "specs" / "bamba_1b.yaml"  # Mamba-2 and attention
HYMBA = ROOT / "specs" / "hymba_plus.yaml"  # attention ∥ Mamba-1, combined by the normalized mean

MAMBA_KERNELS = {"selective_scan": "selective_scan", "causal_conv1d": "causal_conv1d", "causal_conv1d_update_": "causal_conv1d",
                 "in_proj_conv_step_": "in_proj_conv",  # a decoding step's in_proj GEMV with the conv step in its epilogue
                 "mamba_step_low_rank": "state_update"}
MAMBA2_KERNELS = {"ssd_scan": "ssd", "causal_conv1d": "causal_conv1d", "mamba2_step": "state_update"}
RMSNORM_KERNELS = {"rms_norm": "rmsnorm"}
ROPE_KERNELS = {"apply_rope_qk": "rope", "apply_rope_write_kv": "rope",  # the rotation; a cached step's with its write
                "rope_cos_sin": "rope",  # a decoding step's angles in one launch
                "qkv_rope_write_kv_": "qkv_rope"}  # and a decoding step's in the qkv GEMV's epilogue
SWIGLU_KERNELS = {"silu_mul": "silu_mul", "swiglu_linear": "gemv", "residual_linear": "gemv"}
GEMV_KERNELS = {"linear": "gemv"}  # every linear layer of the GEMV kinds, on a decoding step's few rows
QKV_KERNELS = {"qkv_linear": "gemv"}  # attention's q, k and v projections in one launch
COMBINE_KERNELS = {"normalized_mean": "normalized_mean",  # the combine; and going on with the residual add and the norm
                   "normalized_mean_add_norm": "normalized_mean",
                   "combining_linear_": "combine_projections"}  # run by the branches' output projections
GREEDY_KERNELS = {"greedy_pick_": "greedy_pick"}  # the lm_head's: a captured decoding step's argmax and picks
DECODE_KERNELS = {"decode_attention": "decode_attention",  # every attention op: a decoding step's split-KV attention
                  "decode_attention_one_launch": "decode_attention"}  # and its splits combined in the same launch


def chosen_kernels(ir, kind: str | None = None) -> dict[str, dict[str, str]]:
    """{op: {function: kernel file}} for the ops (of `kind`, or of every kind) that got any kernel."""
    return {op.name: {f: k.file for f, k in op.kernels.items()} for op in ir.ops()
            if op.kernels and kind in (None, op.kind)}


def test_every_mamba_op_gets_its_scan_conv_and_step_kernels_every_rmsnorm_its_kernel_and_nothing_else_one():
    ir = compile_spec(NEXUS, "tiny").ir
    kinds = {"mamba": MAMBA_KERNELS | GEMV_KERNELS, "rmsnorm": RMSNORM_KERNELS,
             "attention": ROPE_KERNELS | DECODE_KERNELS | QKV_KERNELS | GEMV_KERNELS, "mlp": SWIGLU_KERNELS | GEMV_KERNELS,
             "lm_head": GREEDY_KERNELS | GEMV_KERNELS}
    expected = {op.name: kinds[op.kind] for op in ir.ops() if op.kind in kinds}
    assert set(kinds) <= {ir.op(name).kind for name in expected} and chosen_kernels(ir) == expected


def test_attention_with_rope_gets_the_rope_kernel_and_without_rope_none(tmp_path):
    spec = tmp_path / "attention_only.yaml"
    spec.write_text(ATTENTION_ONLY.replace("rope: null", "rope: {theta: 10000}"))
    ir = compile_spec(spec, None).ir
    attention = {op.name for op in ir.ops() if op.kind == "attention"}
    without_rope = DECODE_KERNELS | QKV_KERNELS | GEMV_KERNELS
    assert attention and chosen_kernels(ir, "attention") == dict.fromkeys(attention, ROPE_KERNELS | without_rope)
    spec.write_text(ATTENTION_ONLY)
    assert chosen_kernels(compile_spec(spec, None).ir, "attention") == dict.fromkeys(attention, without_rope)


def test_the_qkv_gemv_rotates_in_its_epilogue_only_where_the_products_are_what_rope_rotates(tmp_path):
    """qkv_rope_write_kv_ needs RoPE on q_proj's, k_proj's and v_proj's products as they come: not with qk-norm (between
    them) nor an output gate (q_proj's rows interleave each head's query and gate); those keep the two launches."""
    spec = tmp_path / "attention_only.yaml"
    for change in ("qk_norm: true", "output_gate: true"):
        spec.write_text(ATTENTION_ONLY.replace("rope: null", f"rope: {{theta: 10000}}, {change}"))
        for functions in chosen_kernels(compile_spec(spec, None).ir, "attention").values():
            assert "qkv_rope_write_kv_" not in functions and "apply_rope_write_kv" in functions, change


def test_every_sparse_attention_op_gets_the_packed_query_kernel():
    ir = compile_spec(HSPMN, "tiny").ir
    sparse = {op.name for op in ir.ops() if op.kind == "sparse_attention"}
    assert sparse and chosen_kernels(ir, "sparse_attention") == dict.fromkeys(
        sparse, {"packed_query_attention": "packed_query_attention"})


def test_attention_with_a_window_gets_the_sliding_window_kernel_and_full_attention_none(tmp_path):
    spec = tmp_path / "windowed.yaml"
    spec.write_text(ATTENTION_ONLY.replace("mixers:\n", "mixers:\n  local: {kind: attention, n_heads: 2, window: 8}\n")
                    .replace("attn*2", "attn|local"))
    ir = compile_spec(spec, None).ir
    window_kernel = {op.config.window: chosen_kernels(ir).get(op.name, {}).get("sliding_window_attention")
                     for op in ir.ops() if op.kind == "attention"}
    assert window_kernel == {8: "packed_query_attention", None: None}


def test_every_mamba2_op_gets_the_ssd_conv_and_step_kernels():
    ir = compile_spec(BAMBA).ir
    mamba2 = {op.name for op in ir.ops() if op.kind == "mamba2"}
    assert mamba2 and chosen_kernels(ir, "mamba2") == dict.fromkeys(mamba2, MAMBA2_KERNELS | GEMV_KERNELS)


def test_an_ssd_chunk_the_kernel_cannot_tile_keeps_the_reference_scan_and_only_that():
    ir = compile_spec(BAMBA).ir
    for op in ir.ops():
        if op.kind == "mamba2":
            op.config = type(op.config)(**{**vars(op.config), "chunk_size": 48})  # not a power of two
    select_kernels(ir)
    for functions in chosen_kernels(ir, "mamba2").values():
        assert set(functions) == {"causal_conv1d", "mamba2_step", "linear"}


def test_a_rule_with_a_condition_applies_only_where_it_holds_and_the_first_rule_per_function_wins():
    ir = compile_spec(NEXUS, "tiny").ir
    windowed = KernelRule("attention", "windowed_attention", "attention", "attention", "test rule",
                          when=lambda config: config.window is not None)
    full = KernelRule("attention", "full_attention", "attention", "attention", "test rule")
    select_kernels(ir, [windowed, full, *KERNEL_RULES])
    for op in ir.ops():
        if op.kind == "attention":
            # the test rules' and the real rules'
            assert set(op.kernels) == {"attention", *ROPE_KERNELS, *DECODE_KERNELS, *QKV_KERNELS, *GEMV_KERNELS}
            assert op.kernels["attention"].file == ("windowed_attention" if op.config.window else "full_attention")


def test_a_parallel_combine_gets_its_kernels_and_the_block_hands_it_the_stream_and_the_norm_only_then():
    """The normalized mean of two RMSNorm'd branches gets the combine kernel and its form with the block's residual add
    and ffn_norm; the block then calls the mixer with residual= and norm= (Kind.takes_residual_norm). A LayerNorm model
    gets neither kernel, and its block keeps the mixer's output and the ffn_norm's add as two lines."""
    compiled = compile_spec(HYMBA, "tiny")
    combines = {op.name for op in compiled.ir.ops() if op.kind == "parallel_combine"}
    assert combines and chosen_kernels(compiled.ir, "parallel_combine") == dict.fromkeys(combines, COMBINE_KERNELS)
    model = emit(compiled, "specs/hymba_plus.yaml").files["model.py"]
    assert "use_kernel(kernels.normalized_mean_add_norm, x)" in model
    # its branches' first GEMVs both fold the mixer norm (Kind.folds_input_norm): the block hands over x and the norm
    assert "residual=x, norm=self.ffn_norm, input_norm=self.mixer_norm)" in model and "self.ffn_norm(y, x)" not in model
    assert "self.mixer(self.mixer_norm(x)" not in model
    # an input multiplier on attn comes between the norm and its products: attn's layers norm x first, global_attn's fold
    model = emit(compile_spec(HYMBA, "tiny", ("mixers.attn.input_multiplier=2",)), "specs/hymba_plus.yaml").files["model.py"]
    assert "h, x = self.mixer(self.mixer_norm(x), positions" in model and "residual=x, norm=self.ffn_norm)" in model
    assert "input_norm=self.mixer_norm)" in model

    compiled = compile_spec(HYMBA, "tiny", ("model.norm.kind=layernorm",))
    assert not chosen_kernels(compiled.ir, "parallel_combine")
    model = emit(compiled, "specs/hymba_plus.yaml").files["model.py"]
    assert "norm=self.ffn_norm" not in model and "residual=None, norm=None" not in model


@pytest.mark.parametrize("override", ["mixers.attn.out_bias=true", "mixers.ssm.bias=true"])
def test_the_branches_project_the_combine_only_when_both_end_in_a_plain_projection(override):
    """Hymba+'s branches (attention's o_proj, Mamba's out_proj, neither with a bias) run the combine in their
    projections' epilogue: the mixer emits decoding_step and the branches take project=; a bias on either projection
    (the kernel adds none) keeps the combine's own launch, and the branch classes as they were."""
    compiled = compile_spec(HYMBA, "tiny")
    model = emit(compiled, "specs/hymba_plus.yaml").files["model.py"]
    assert "def decoding_step(self, x, positions, cache, pads, step, residual, norm, input_norm):" in model
    assert "combine.project(0, attn_in, self.attn.o_proj)" in model
    assert "combine.project(1, ssm_in, self.ssm.out_proj)" in model
    assert model.count("return self.o_proj(y) if project else y") == 2  # attn and global_attn
    assert "return self.out_proj(y) if project else y" in model

    compiled = compile_spec(HYMBA, "tiny", (override,))
    layer = next(op for op in compiled.ir.ops() if op.kind == "parallel_combine" and op.config.branches[0] == "attn")
    assert "combining_linear_" not in layer.kernels and "normalized_mean_add_norm" in layer.kernels
    model = emit(compiled, "specs/hymba_plus.yaml").files["model.py"]
    classes = {chunk.split("(")[0]: chunk for chunk in model.split("\nclass ")[1:]}
    assert "def decoding_step" not in classes["AttnSsmParallel"] and "project=True" not in classes["Attn"]
    # the global_attn layers, whose o_proj has no bias, keep it with the ssm's bias-free out_proj
    attn_only = override.startswith("mixers.attn")
    assert ("def decoding_step" in classes["GlobalAttnSsmParallel"]) == attn_only
    assert ("project=True" in classes["Ssm"]) == attn_only


def test_the_emitted_package_ships_and_calls_only_the_chosen_kernels():
    compiled = compile_spec(NEXUS, "tiny")
    files = emit(compiled, Path(NEXUS).relative_to(ROOT).as_posix()).files
    for function, file in MAMBA_KERNELS.items():
        assert f"kernels/{file}.py" in files
        assert f"use_kernel(kernels.{function}," in files["model.py"]  # (mamba_step runs as its in-place form)
        assert f"from .{file} import {function}" in files["kernels/__init__.py"]

    for op in compiled.ir.ops():
        op.kernels = {f: k for f, k in op.kernels.items() if f == "causal_conv1d"}  # as if only the conv rule matched
    files = emit(compiled, Path(NEXUS).relative_to(ROOT).as_posix()).files
    assert {path for path in files if path.startswith("kernels/")} == {
        "kernels/__init__.py", "kernels/triton_support.py", "kernels/causal_conv1d.py"}
    assert "kernels.causal_conv1d(" in files["model.py"] and "kernels.selective_scan" not in files["model.py"]

    for op in compiled.ir.ops():
        op.kernels = {}  # as if no rule matched
    files = emit(compiled, Path(NEXUS).relative_to(ROOT).as_posix()).files
    assert not any(path.startswith("kernels/") for path in files)
    assert "kernels." not in files["model.py"] and "use_kernel" not in files["model.py"]


def test_a_model_without_a_kernel_kind_ships_only_the_gemv_the_decode_attention_and_the_greedy_pick(tmp_path):
    spec = tmp_path / "attention_only.yaml"
    spec.write_text(ATTENTION_ONLY)
    files = emit(compile_spec(spec, None), "attention_only.yaml").files
    assert {path for path in files if path.startswith("kernels/")} == {
        "kernels/__init__.py", "kernels/triton_support.py", "kernels/gemv.py", "kernels/decode_attention.py",
        "kernels/greedy_pick.py"}
    assert "pick=pick_greedy," in files["model.py"]  # the CUDA-graph decoder's pick: the kernel, or ops/decoding.py's
    assert "ops/linear.py" in files  # the reference an ONNX export lowers the GEMV to
    assert "self.lm_head = DecodeLinear(" in files["model.py"] and "self.q_proj = DecodeLinear(" in files["model.py"]


def test_every_gated_deltanet_op_gets_the_conv_and_step_kernels_and_its_forward_kernel_where_its_chunk_fits():
    ir = compile_spec(ROOT / "specs" / "gated_deltanet_hybrid.yaml").ir
    gdn = {op.name for op in ir.ops() if op.kind == "gated_deltanet"}
    expected = {"causal_conv1d": "causal_conv1d", "gated_delta_rule": "gated_delta_rule",
                "gated_delta_step": "gated_delta_rule"}
    assert gdn and chosen_kernels(ir, "gated_deltanet") == dict.fromkeys(gdn, expected)
    for op in ir.ops():
        if op.kind == "gated_deltanet":
            op.config = type(op.config)(**{**vars(op.config), "chunk_size": 128})  # (L, L) tiles too large
    select_kernels(ir)
    assert chosen_kernels(ir, "gated_deltanet") == dict.fromkeys(
        gdn, {"causal_conv1d": "causal_conv1d", "gated_delta_step": "gated_delta_rule"})
