"""Hymba+ (specs/hymba_plus.yaml, tiny: attention and Mamba heads side by side in every layer, meta tokens, a sliding
window of 16) with its parallel combine's kernels (normalized_mean, and normalized_mean_add_norm, which goes on with the
block's residual add and its feed-forward's norm), the RoPE kernel and the split-KV decode attention:
cached decoding equals the full forward through the references, past the window (the windowed layers' ring-buffer
cache), with each forward's RoPE angles, masks and key positions shared by the layers of an attention component
(StepContext). The kernels run in Triton's interpreter on CPU tensors (the others keep their references: the
interpreter takes minutes for the whole model); a spy counts their calls, so a model that fell back to its references
fails here."""

from __future__ import annotations

from pathlib import Path

import torch

from tests.conftest import build_spied_package, decode_in_steps
from tests.numerics import assert_close

ROOT = Path(__file__).resolve().parents[2]
SPIED = ("normalized_mean", "normalized_mean_add_norm", "apply_rope_qk", "apply_rope_write_kv", "decode_attention")


def test_cached_decoding_with_the_combine_kernel_equals_the_full_forward(tmp_path, monkeypatch):
    package = build_spied_package(ROOT / "specs/hymba_plus.yaml", tmp_path, monkeypatch, SPIED, preset="tiny")
    forced = {package.kernels.normalized_mean, package.kernels.normalized_mean_add_norm, package.kernels.apply_rope_qk,
              package.kernels.apply_rope_write_kv, package.kernels.decode_attention}
    monkeypatch.setattr(package.model, "use_kernel", lambda kernel, x: package.model.USE_KERNELS and kernel in forced)
    torch.manual_seed(0)
    model = package.Model().eval()
    tokens = torch.randint(0, 256, (2, 14))  # 4 meta tokens + 14 > the window of 16
    with torch.no_grad():
        package.model.USE_KERNELS = False
        full = model(tokens).logits
        package.model.USE_KERNELS = True
    cached = decode_in_steps(model, tokens, prefill=12, max_len=4 + 14, length_as_tensor=True)
    # 4 layers, each combining its attention and Mamba branches, adding the residual stream and norming it for the
    # feed-forward in one kernel, in the prefill and in both steps; the combine's own kernel is not left to run
    assert package.calls["normalized_mean_add_norm"] == 4 * 3 and not package.calls["normalized_mean"], package.calls
    # RoPE and the cache write in one launch wherever the write has slots: the two global layers' plain caches in the
    # prefill and every layer in both steps (the windowed layers' ring at T = 1, positions 16 and 17 wrapping to slots
    # 0 and 1); the windowed layers' prefill (a ring at T > 1) rotates, then writes the ring in torch
    assert package.calls["apply_rope_write_kv"] == 2 + 4 * 2 and package.calls["apply_rope_qk"] == 2, package.calls
    # the split-KV attention in both steps of every layer (rings and plain caches); the prefill's 16 queries a row
    # (more than FEW_QUERIES) keep the masked SDPA
    assert package.calls["decode_attention"] == 4 * 2, package.calls
    assert_close(cached, full, 1e-5, "cached logits")


def test_the_fused_combine_add_and_norm_gives_the_bits_of_the_combine_and_the_fused_norm(tmp_path, monkeypatch):
    """bench/decode.py --without normalized_mean_add_norm switches the kernel off (None) in the same process: the block
    then runs normalized_mean and the FusedRMSNorm's add + norm (rms_norm with the residual), two launches. Both sides
    give the same logits bit for bit, in bfloat16 (the kernels round y, the sum and h as the two launches do)."""
    package = build_spied_package(ROOT / "specs/hymba_plus.yaml", tmp_path, monkeypatch,
                                  ("normalized_mean", "normalized_mean_add_norm", "rms_norm"), preset="tiny")
    forced = {package.kernels.normalized_mean, package.kernels.normalized_mean_add_norm, package.kernels.rms_norm}
    monkeypatch.setattr(package.model, "use_kernel", lambda kernel, x: kernel is not None and kernel in forced)
    torch.manual_seed(0)
    model = package.Model().to(torch.bfloat16).eval()
    with torch.no_grad():  # the norms' weights and scales away from 1, so that the norm's weight is not a no-op
        for name, parameter in model.named_parameters():
            if name.endswith(("_scale", "norm.weight")):
                parameter.copy_(1 + torch.randn_like(parameter) / 2)
    tokens = torch.randint(0, 256, (2, 8))
    fused = decode_in_steps(model, tokens, prefill=6, max_len=4 + 8)
    assert package.calls["normalized_mean_add_norm"] == 4 * 3 and not package.calls["normalized_mean"], package.calls
    package.calls.clear()
    monkeypatch.setattr(package.kernels, "normalized_mean_add_norm", None)
    two_launches = decode_in_steps(model, tokens, prefill=6, max_len=4 + 8)
    assert package.calls["normalized_mean"] == 4 * 3, package.calls
    assert torch.equal(fused, two_launches), (fused.float() - two_launches.float()).abs().max()


def test_the_in_proj_conv_step_decodes_as_the_full_forward_and_as_its_two_launches(tmp_path, monkeypatch):
    """Each Mamba head's decoding step runs in_proj and the conv step in one launch (in_proj_conv_step_: the GEMV with
    the conv, SiLU and the conv state's shift in its epilogue): cached decoding equals the full forward (references),
    and in bfloat16 gives the bits of the two launches it replaces (the GEMV's `linear`, then causal_conv1d_update_),
    which bench/decode.py --without in_proj_conv_step_ restores in the same process (the kernel function None)."""
    package = build_spied_package(ROOT / "specs/hymba_plus.yaml", tmp_path, monkeypatch,
                                  ("in_proj_conv_step_", "causal_conv1d_update_", "linear"), preset="tiny")
    forced = {package.kernels.in_proj_conv_step_, package.kernels.causal_conv1d_update_, package.kernels.linear}
    monkeypatch.setattr(package.model, "use_kernel", lambda kernel, x: package.model.USE_KERNELS and kernel in forced)
    torch.manual_seed(0)
    model = package.Model().eval()
    tokens = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        package.model.USE_KERNELS = False
        full = model(tokens).logits
        package.model.USE_KERNELS = True
    cached = decode_in_steps(model, tokens, prefill=6, max_len=4 + 8)
    # 4 layers' Mamba heads in both steps; the prefill (T = 6) keeps in_proj and the sequence conv
    assert package.calls["in_proj_conv_step_"] == 4 * 2 and not package.calls["causal_conv1d_update_"], package.calls
    assert_close(cached, full, 1e-5, "cached logits")

    model = model.to(torch.bfloat16)
    package.calls.clear()
    fused = decode_in_steps(model, tokens, prefill=6, max_len=4 + 8)
    assert package.calls["in_proj_conv_step_"] == 4 * 2, package.calls
    package.calls.clear()
    monkeypatch.setattr(package.kernels, "in_proj_conv_step_", None)
    two_launches = decode_in_steps(model, tokens, prefill=6, max_len=4 + 8)
    assert package.calls["causal_conv1d_update_"] == 4 * 2 and not package.calls["in_proj_conv_step_"], package.calls
    assert torch.equal(fused, two_launches), (fused.float() - two_launches.float()).abs().max()


def test_the_projections_combining_in_their_epilogue_decode_as_the_full_forward(tmp_path, monkeypatch):
    """On a decoding step each parallel layer's branches stop before their output projections, which run the combine,
    the block's residual add and its feed-forward norm in the epilogue of the second of the two
    (kernels/combine_projections.py): cached decoding equals the full forward (references), and in bfloat16 the two
    GEMVs and normalized_mean_add_norm it replaces, which bench/decode.py --without combining_linear_ restores in the
    same process (the kernel function None), within rounding (the projections' tiles differ from the GEMV's)."""
    spied = ("combine_projections_module.combining_linear_", "normalized_mean_add_norm", "linear")
    package = build_spied_package(ROOT / "specs/hymba_plus.yaml", tmp_path, monkeypatch, spied, preset="tiny")
    forced = {package.kernels.combining_linear_, package.kernels.normalized_mean_add_norm, package.kernels.linear}
    monkeypatch.setattr(package.model, "use_kernel", lambda kernel, x: package.model.USE_KERNELS and kernel in forced)
    torch.manual_seed(0)
    model = package.Model().eval()
    with torch.no_grad():  # the norms' weights and scales away from 1, so that each is read where it belongs
        for name, parameter in model.named_parameters():
            if name.endswith(("_scale", "norm.weight")):
                parameter.copy_(1 + torch.randn_like(parameter) / 2)
    tokens = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        package.model.USE_KERNELS = False
        full = model(tokens).logits
        package.model.USE_KERNELS = True
    cached = decode_in_steps(model, tokens, prefill=6, max_len=4 + 8)
    # both branches of 4 layers in both steps; the prefill's 20 rows (more than the GEMV's few) keep the one launch
    assert package.calls["combining_linear_"] == 4 * 2 * 2, package.calls
    assert package.calls["normalized_mean_add_norm"] == 4, package.calls
    assert_close(cached, full, 1e-5, "cached logits")

    model = model.to(torch.bfloat16)
    combined = decode_in_steps(model, tokens, prefill=6, max_len=4 + 8)
    package.calls.clear()
    monkeypatch.setattr(package.kernels, "combining_linear_", None)
    separate = decode_in_steps(model, tokens, prefill=6, max_len=4 + 8)
    assert package.calls["normalized_mean_add_norm"] == 4 * 3 and not package.calls["combining_linear_"], package.calls
    assert_close(combined, separate, what="bf16 logits, combined against separate")


def test_a_decoding_step_folds_the_mixer_norm_into_its_branches_first_products(tmp_path, monkeypatch):
    """Where both branches' first GEMVs take the block's RMSNorm (Kind.folds_input_norm: in_proj_conv_step_ and
    qkv_rope_write_kv_, with the combining projections), the block hands the parallel mixer x un-normed and the
    decoding step hands mixer_norm to both: no norm launch for the mixer on a step, only the final norm's. Cached
    decoding equals the full forward (references); in bfloat16 the same step with x normed first (the norm kernel,
    rounded to bf16 before the products) is within rounding, not bit-equal (kernels/gemv.py, "RMSNorm folded in")."""
    spied = ("in_proj_conv_step_", "qkv_rope_write_kv_", "rms_norm", "combine_projections_module.combining_linear_")
    package = build_spied_package(ROOT / "specs/hymba_plus.yaml", tmp_path, monkeypatch, spied, preset="tiny")
    kernels = package.kernels
    forced = {kernels.in_proj_conv_step_, kernels.qkv_rope_write_kv_, kernels.rms_norm, kernels.combining_linear_,
              kernels.normalized_mean_add_norm, kernels.linear}
    monkeypatch.setattr(package.model, "use_kernel", lambda kernel, x: package.model.USE_KERNELS and kernel in forced)
    torch.manual_seed(0)
    model = package.Model().eval()
    with torch.no_grad():  # the norms' weights away from 1, so that a norm read in the wrong place shows
        for name, parameter in model.named_parameters():
            if name.endswith(("_scale", "norm.weight")):
                parameter.copy_(1 + torch.randn_like(parameter) / 2)
    tokens = torch.randint(0, 256, (2, 8))
    with torch.no_grad():
        package.model.USE_KERNELS = False
        full = model(tokens).logits
        package.model.USE_KERNELS = True
    cached = decode_in_steps(model, tokens, prefill=6, max_len=4 + 8)
    # both steps of 4 layers: each branch's first GEMV; rms_norm: the prefill's 4 mixer norms (its 10 rows take the
    # forward, which norms x first) and the final norm, then only the final norm in each step
    assert package.calls["in_proj_conv_step_"] == package.calls["qkv_rope_write_kv_"] == 4 * 2, package.calls
    assert package.calls["combining_linear_"] == 4 * 2 * 2, package.calls
    assert package.calls["rms_norm"] == 4 + 1 + 2, package.calls
    assert_close(cached, full, 1e-5, "cached logits")

    model = model.to(torch.bfloat16)
    folded = decode_in_steps(model, tokens, prefill=6, max_len=4 + 8)
    parallel = type(model.layers[1].mixer)
    decoding_step = parallel.decoding_step

    def normed_first(self, x, positions, cache, pads, step, residual, norm, input_norm):
        return decoding_step(self, input_norm(x), positions, cache, pads, step, residual, norm, None)

    for cls in {type(layer.mixer) for layer in model.layers}:
        monkeypatch.setattr(cls, "decoding_step", normed_first if cls is parallel else cls.decoding_step)
    package.calls.clear()
    unfolded = decode_in_steps(model, tokens, prefill=6, max_len=4 + 8)
    assert package.calls["rms_norm"] == 4 + 1 + 2 * (1 + 2), package.calls  # layers 1 and 2's mixer norms as launches
    assert_close(folded, unfolded, 2e-2, "folded against normed first (bf16)")
