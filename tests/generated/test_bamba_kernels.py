"""Bamba (bench/specs/bamba_1b.yaml: Mamba-2 layers and RoPE attention) at toy sizes with every kernel it selects:
the same logits and gradients as its reference ops, and cached decoding through the kernels (the fused Mamba-2 step,
the RoPE kernel of kernels/rope.py, the RMSNorm and SwiGLU-gate kernels, the GEMV of every linear layer) equal to
the full forward. The kernels run in Triton's
interpreter on CPU tensors; a spy counts their calls, so a model that fell back to its references fails here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch._dynamo.backends.registry import lookup_backend

from tests.conftest import assert_kernels_match_references, build_spied_package, decode_in_steps
from tests.numerics import assert_close

ROOT = Path(__file__).resolve().parents[2]
BAMBA_TOY = ("model.d_model=36", "model.vocab_size=64", "mixers.ssm.n_heads=3", "mixers.ssm.head_dim=24",
             "mixers.ssm.expand=2", "mixers.ssm.d_state=8", "mixers.ssm.chunk_size=16", "mixers.attn.n_heads=4",
             "mixers.attn.head_dim=12", "mixers.attn.n_kv_heads=2", "mixers.attn.rope.rotary_dim=8",
             "ffns.mlp.hidden=48", "layout.mixers=ssm,attn", "model.max_seq_len=64")
SPIED = ("state_update_module.mamba2_step_", "apply_rope_qk", "apply_rope_write_kv", "rms_norm", "silu_mul", "linear",
         "swiglu_linear", "qkv_linear", "decode_attention", "decode_attention_one_launch", "residual_linear",
         "qkv_rope_write_kv_")


@pytest.fixture
def package(tmp_path, monkeypatch):
    """The built package, its kernels spied on: package.calls counts each kernel function's calls."""
    return build_spied_package(ROOT / "bench/specs/bamba_1b.yaml", tmp_path, monkeypatch, SPIED, overrides=BAMBA_TOY)


def test_kernels_and_references_give_the_same_logits_and_gradients(package):
    torch.manual_seed(0)
    model = package.Model()
    tokens = torch.randint(0, 64, (2, 19))
    assert_kernels_match_references(package, model, tokens)
    assert package.calls["apply_rope_qk"] == 1 and package.calls["mamba2_step_"] == 0, package.calls
    assert package.calls["apply_rope_write_kv"] == 0, package.calls  # no cache
    assert package.calls["silu_mul"] == 2, package.calls  # one per layer
    assert package.calls["linear"] == package.calls["swiglu_linear"] == package.calls["qkv_linear"] == 0, package.calls
    assert package.calls["decode_attention"] == 0, package.calls  # no cache
    # (36 rows: cuBLAS)


def test_cached_decoding_with_kernels_equals_the_full_forward(package):
    torch.manual_seed(1)
    model = package.Model().eval()
    tokens = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        package.model.USE_KERNELS = False
        full = model(tokens).logits
        package.model.USE_KERNELS = True
    cached = decode_in_steps(model, tokens, prefill=16, length_as_tensor=True)
    # a cached forward rotates and writes in one launch: the prefill's in the RoPE kernel, each step's in the qkv GEMV's
    # epilogue (qkv_rope_write_kv_)
    assert package.calls["mamba2_step_"] == 4 and package.calls["apply_rope_write_kv"] == 1, package.calls
    assert package.calls["qkv_rope_write_kv_"] == 4 and package.calls["apply_rope_qk"] == 0, package.calls
    # each step's one query a head over the cache: the split-KV kernel, its splits combined in its launch (the
    # prefill's 16 queries: SDPA)
    assert package.calls["decode_attention_one_launch"] == 4 and package.calls["decode_attention"] == 0, package.calls
    # the prefill's 32 rows take cuBLAS and the gate kernel; each step's 2 rows the GEMV: the SwiGLU pair of each MLP
    # in one, q, k and v with RoPE and the cache write in one, the two down_proj with the blocks' residual adds, and
    # in_proj, out_proj, o and the lm_head
    assert package.calls["silu_mul"] == 2 and package.calls["swiglu_linear"] == 2 * 4, package.calls
    assert package.calls["residual_linear"] == 2 * 4, package.calls
    assert package.calls["qkv_linear"] == 0 and package.calls["linear"] == 4 * 4, package.calls
    assert_close(cached, full, 1e-5, "cached logits")


def test_layers_with_kernels_compile_whole_and_equal_eager(tmp_path, monkeypatch):
    """The package's kernels under torch.compile (archgen.benchmark's `kernels_compiled`, which compiles each layer):
    every kernel is a custom op, so dynamo traces each layer in one graph (fullgraph) holding the kernels as nodes,
    the two Mamba-2 layers share one graph, and the loss and every gradient equal eager's."""
    package = build_spied_package(ROOT / "bench/specs/bamba_1b.yaml", tmp_path, monkeypatch, (),
                                  overrides=(*BAMBA_TOY, "layout.mixers=ssm*2,attn"))
    torch.manual_seed(0)
    model = package.Model()
    tokens = torch.randint(0, 64, (2, 19))

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        loss = model(tokens[:, :-1], targets=tokens[:, 1:]).loss
        loss.backward()
        return loss.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    expected_loss, expected_grads = loss_and_grads()
    graphs = []

    def counting_aot_eager(graph, inputs):
        graphs.append(graph)
        return lookup_backend("aot_eager")(graph, inputs)

    torch._dynamo.reset()
    for layer in model.layers:
        layer.compile(fullgraph=True, backend=counting_aot_eager)
    loss, grads = loss_and_grads()
    assert len(graphs) == 2, "one graph per layer class"
    custom_ops = {str(node.target).removesuffix(".default") for graph in graphs for node in graph.graph.nodes
                  if str(node.target).startswith("archgen")}  # an op or its default overload, as the op file calls it
    assert {"archgen_v1.ssd_scan", "archgen_v1.silu_mul"} <= custom_ops, custom_ops
    assert_close(loss, expected_loss, 1e-5, "loss")
    for name, grad in grads.items():
        assert_close(grad, expected_grads[name], 1e-4, f"gradient of {name}")
