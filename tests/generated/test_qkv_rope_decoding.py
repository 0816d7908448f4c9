"""qkv_rope_write_kv_ in generated packages: an attention layer's decoding step runs its q, k and v GEMV with RoPE and
the KV-cache write in the epilogue (kernels/qkv_rope.py), and gives the bits of the two launches it replaces
(qkv_linear, then apply_rope_write_kv), which bench/decode.py --without qkv_rope_write_kv_ restores in the same
process (the package's kernel function None). A tiny Hymba+ (windowed and global attention, full rotary) and a toy
Bamba-1B (partial rotary: 8 of 12 dims), cached decoding over a few steps, in bfloat16 and float32, the kernels in
Triton's interpreter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import build_spied_package, decode_in_steps
from tests.generated.test_bamba_kernels import BAMBA_TOY
from tests.numerics import assert_close

ROOT = Path(__file__).resolve().parents[2]
SPIED = ("qkv_rope_write_kv_", "qkv_linear", "apply_rope_write_kv")
# spec, build options, attention layers, tokens, the prefill's (then one at a time), the cache's positions
MODELS = {"hymba_plus": ("specs/hymba_plus.yaml", {"preset": "tiny"}, 4, 8, 6, 4 + 8),  # 4 meta tokens first
          "bamba_toy": ("bench/specs/bamba_1b.yaml", {"overrides": BAMBA_TOY}, 1, 7, 4, 7)}


@pytest.mark.parametrize("name", MODELS)
def test_decoding_with_the_fused_qkv_rope_gives_the_two_launches_bits(name, tmp_path, monkeypatch):
    spec, options, attention_layers, length, prefill, max_len = MODELS[name]
    package = build_spied_package(ROOT / spec, tmp_path, monkeypatch, SPIED, **options)
    kernels = package.kernels
    # the GEMV (runs_gemv asks for kernels.linear) and the three functions; the other layers keep their references
    forced = {kernels.qkv_rope_write_kv_, kernels.qkv_linear, kernels.apply_rope_write_kv, kernels.linear}
    monkeypatch.setattr(package.model, "use_kernel", lambda kernel, x: package.model.USE_KERNELS and kernel in forced)
    torch.manual_seed(0)
    model = package.Model().eval()
    tokens = torch.randint(0, 64, (2, length))
    steps = length - prefill
    with torch.no_grad():
        package.model.USE_KERNELS = False
        full = model(tokens).logits
        package.model.USE_KERNELS = True
    cached = decode_in_steps(model, tokens, prefill=prefill, max_len=max_len)
    # every attention layer in every step; the prefill (more rows than FEW_ROWS) keeps cuBLAS and the rope kernel
    assert package.calls["qkv_rope_write_kv_"] == attention_layers * steps, package.calls
    assert not package.calls["qkv_linear"], package.calls
    assert_close(cached, full, 1e-5, "cached logits")

    model = model.to(torch.bfloat16)
    package.calls.clear()
    fused = decode_in_steps(model, tokens, prefill=prefill, max_len=max_len)
    assert package.calls["qkv_rope_write_kv_"] == attention_layers * steps, package.calls
    package.calls.clear()
    monkeypatch.setattr(kernels, "qkv_rope_write_kv_", None)  # what bench/decode.py --without qkv_rope_write_kv_ does
    two_launches = decode_in_steps(model, tokens, prefill=prefill, max_len=max_len)
    assert package.calls["qkv_linear"] == attention_layers * steps and not package.calls["qkv_rope_write_kv_"]
    assert torch.equal(fused, two_launches), (fused.float() - two_launches.float()).abs().max()
