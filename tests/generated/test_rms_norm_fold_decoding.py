"""The block's RMSNorm in the prologue of a decoding step's first GEMVs, in generated packages: a block whose mixer's
first GEMVs can compute it (Hymba+'s parallel layers: the attention's qkv_rope_write_kv_ and the Mamba head's
in_proj_conv_step_; Bamba's attention layers: qkv_rope_write_kv_) hands the mixer x un-normed and its mixer_norm, and
a decoding step runs `rms_norm_qkv_rope_write_kv_` / `rms_norm_in_proj_conv_step_` (kernels/qkv_rope.py,
kernels/in_proj_conv.py) where the norm kernel and the fused GEMV ran. bench/decode.py --without
rms_norm_qkv_rope_write_kv_,rms_norm_in_proj_conv_step_ switches them off in the same process (the package's kernel
functions None): the norm's launch, then the fused GEMV, as before. Both sides give the same logits within rounding
(the fold sums the squares in another order) and, in float32, the same greedy tokens; cached decoding with the fold
equals the full forward. A tiny Hymba+ and a toy Bamba-1B, the kernels in Triton's interpreter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import build_spied_package, decode_in_steps
from tests.generated.test_bamba_kernels import BAMBA_TOY
from tests.numerics import assert_close

ROOT = Path(__file__).resolve().parents[2]
FOLDS = {"rms_norm_qkv_rope_write_kv_": "qkv_rope_write_kv_", "rms_norm_in_proj_conv_step_": "in_proj_conv_step_"}
# spec, build options, {fold: the layers running it}, tokens, the prefill's (then one at a time), the cache's positions
MODELS = {"hymba_plus": ("specs/hymba_plus.yaml", {"preset": "tiny"},
                         {"rms_norm_qkv_rope_write_kv_": 4, "rms_norm_in_proj_conv_step_": 4}, 8, 6, 4 + 8),
          "bamba_toy": ("bench/specs/bamba_1b.yaml", {"overrides": BAMBA_TOY}, {"rms_norm_qkv_rope_write_kv_": 1}, 7, 4,
                        7)}


def _with_norms_away_from_one(model):
    with torch.no_grad():  # the norms' weights away from 1: the fold must apply the weight
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.copy_(1 + torch.randn_like(parameter) / 2)
    return model


@pytest.mark.parametrize("name", MODELS)
def test_decoding_with_the_norm_in_the_first_gemvs_gives_the_norm_kernel_then_the_gemvs(name, tmp_path, monkeypatch):
    spec, options, folding, length, prefill, max_len = MODELS[name]
    unfused = tuple(FOLDS[f] for f in folding)
    package = build_spied_package(ROOT / spec, tmp_path, monkeypatch, (*folding, *unfused, "rms_norm"), **options)
    kernels = package.kernels
    folds = {f: getattr(kernels, f) for f in folding}
    # the GEMV (runs_gemv asks for kernels.linear), the fused GEMVs and the norm; the other layers keep their references
    forced = {*folds.values(), *(getattr(kernels, f) for f in unfused), kernels.rms_norm, kernels.linear,
              kernels.apply_rope_write_kv}
    monkeypatch.setattr(package.model, "use_kernel", lambda kernel, x: package.model.USE_KERNELS and kernel in forced)
    torch.manual_seed(0)
    model = _with_norms_away_from_one(package.Model().eval())
    tokens = torch.randint(0, 64, (2, length))
    steps = length - prefill
    layers = max(folding.values())  # the blocks whose mixer norms x itself
    with torch.no_grad():
        package.model.USE_KERNELS = False
        full = model(tokens).logits
        package.model.USE_KERNELS = True
    folded = decode_in_steps(model, tokens, prefill=prefill, max_len=max_len)
    # every folding layer in every step, none of them through the fused GEMV alone; the prefill (more rows than
    # FEW_ROWS) norms x once in the block's mixer and keeps cuBLAS
    assert {f: package.calls[f] for f in folding} == {f: n * steps for f, n in folding.items()}, package.calls
    assert not any(package.calls[f] for f in unfused), package.calls
    assert_close(folded, full, 1e-5, "cached logits")
    folded_norms = package.calls["rms_norm"]

    package.calls.clear()
    for fold in folding:  # what bench/decode.py --without rms_norm_qkv_rope_write_kv_,rms_norm_in_proj_conv_step_ does
        monkeypatch.setattr(kernels, fold, None)
    unfolded = decode_in_steps(model, tokens, prefill=prefill, max_len=max_len)
    assert {f: package.calls[f] for f in unfused} == {FOLDS[f]: n * steps for f, n in folding.items()}, package.calls
    # the norm's launch back, once a layer and step (a parallel layer norms x once for both branches)
    assert package.calls["rms_norm"] == folded_norms + layers * steps, package.calls
    assert_close(folded, unfolded, 1e-5, "logits with the fold against without it (float32)")
    assert torch.equal(folded.argmax(-1), unfolded.argmax(-1)), "greedy tokens (float32)"

    model = model.to(torch.bfloat16)
    unfolded = decode_in_steps(model, tokens, prefill=prefill, max_len=max_len)
    for fold, function in folds.items():
        monkeypatch.setattr(kernels, fold, function)
    package.calls.clear()
    folded = decode_in_steps(model, tokens, prefill=prefill, max_len=max_len)
    assert {f: package.calls[f] for f in folding} == {f: n * steps for f, n in folding.items()}, package.calls
    assert_close(folded, unfolded, 3e-2, "logits with the fold against without it (bfloat16)")


def test_a_parallel_layer_with_one_fold_switched_off_norms_x_once_for_both_branches(tmp_path, monkeypatch):
    """Hymba+ with only the attention's fold off: the parallel layer norms x once before its branches (not each branch
    on its own stream), and both run their fused GEMVs without the norm, as before the fold; the logits as with both
    folds within rounding."""
    folding = tuple(MODELS["hymba_plus"][2])
    package = build_spied_package(ROOT / "specs/hymba_plus.yaml", tmp_path, monkeypatch,
                                  (*folding, *(FOLDS[f] for f in folding), "rms_norm"), preset="tiny")
    kernels = package.kernels
    forced = {*(getattr(kernels, f) for f in (*folding, *(FOLDS[f] for f in folding))), kernels.rms_norm,
              kernels.linear, kernels.apply_rope_write_kv}
    monkeypatch.setattr(package.model, "use_kernel", lambda kernel, x: package.model.USE_KERNELS and kernel in forced)
    torch.manual_seed(0)
    model = _with_norms_away_from_one(package.Model().eval())
    tokens = torch.randint(0, 64, (2, 8))
    both = decode_in_steps(model, tokens, prefill=6, max_len=12)
    monkeypatch.setattr(kernels, "rms_norm_qkv_rope_write_kv_", None)
    package.calls.clear()
    one = decode_in_steps(model, tokens, prefill=6, max_len=12)
    assert package.calls["in_proj_conv_step_"] == package.calls["qkv_rope_write_kv_"] == 4 * 2, package.calls
    assert not package.calls["rms_norm_in_proj_conv_step_"], package.calls
    assert_close(one, both, 1e-5, "logits with one fold against both")
