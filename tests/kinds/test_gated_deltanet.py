"""The Gated DeltaNet kind: its checks, derived sizes, exact parameter table and cache size against generated modules
in every variant the spec allows, and the generated layer against the published formula written out here.

The whole-model behaviour (training, cached decoding, export) is tested through specs/gated_deltanet_hybrid.yaml by the
tests that run every spec (tests/generated/test_build_specs.py, tests/export/)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from archgen.errors import CompileError
from archgen.kinds import Dims, kind_of
from archgen.pipeline import compile_spec
from archgen.spec import models
from tests.conftest import ROOT
from tests.numerics import assert_close

SPEC = ROOT / "specs" / "gated_deltanet_hybrid.yaml"
GDN = kind_of("gated_deltanet")
VARIANTS = [
    pytest.param((), id="as-written"),
    pytest.param(("mixers.gdn.output_gate=false", "mixers.gdn.conv_bias=true"), id="no-gate-conv-bias"),
    pytest.param(("mixers.gdn.n_v_heads=2", "mixers.gdn.head_v_dim=24", "mixers.gdn.allow_neg_eigval=true"),
                 id="HV=H-V24-neg-eigval"),
]


def test_value_heads_must_be_a_multiple_of_key_heads():
    with pytest.raises(CompileError) as caught:
        compile_spec(SPEC, "tiny", ("mixers.gdn.n_v_heads=3",))
    (problem,) = [d for d in caught.value.diagnostics if d.path.endswith("n_v_heads")]
    assert "n_v_heads=3 is not a multiple of n_heads=2" in problem.message
    assert "2, 4, 6, 8" in problem.fix


def test_value_sizes_default_to_the_key_sizes_and_are_locked():
    spec = models.GatedDeltaNetSpec(kind="gated_deltanet", n_heads=4, head_dim=32)
    config = GDN.resolve(spec, models.ModelDims(d_model=64, vocab_size=16))
    assert (config.n_v_heads, config.head_v_dim) == (4, 32)
    locked = GDN.lock(spec, config)
    assert (locked["n_v_heads"], locked["head_v_dim"]) == (4, 32)


def test_cost_formulas_at_hand_computed_sizes():
    """d = 8, H = 1, HV = 2, K = 4, V = 3, conv width 2: key_dim 4, value_dim 6, conv channels 14, state 2·4·3 = 24."""
    spec = models.GatedDeltaNetSpec(kind="gated_deltanet", n_heads=1, n_v_heads=2, head_dim=4, head_v_dim=3, d_conv=2)
    dims = Dims(d_model=8, vocab_size=16)
    config = GDN.resolve(spec, models.ModelDims(d_model=8, vocab_size=16))
    # q, k, v, gate projections (4 + 4 + 6 + 6) and a, b (2 + 2): 2·8·24; conv 2·14·2; recurrence 7·24; o_proj 2·6·8.
    assert GDN.forward_flops(config, dims, seq_len=5) == 5 * (2 * 8 * 24 + 2 * 14 * 2 + 7 * 24 + 2 * 6 * 8)
    assert GDN.cache_bytes(config, dims, context=1000, itemsize=2) == 14 * 1 * 2 + 24 * 4
    assert sum(torch.Size(s).numel() for s in GDN.parameters(config, dims).values()) == (
        8 * 24 + 14 * 2 + 2 + 2 + 3 + 8 * 6)  # projections, conv, A_log, dt_bias, o_norm, o_proj


@pytest.mark.parametrize("overrides", VARIANTS)
def test_parameter_table_and_cache_match_the_generated_layer(build, overrides):
    package = build(SPEC, "tiny", overrides)
    op = next(op for op in compile_spec(SPEC, "tiny", overrides).ir.ops() if op.kind == "gated_deltanet")
    dims = Dims(d_model=64, vocab_size=256)
    layer = package.Model().layers[0].mixer
    assert {n: tuple(p.shape) for n, p in layer.named_parameters()} == GDN.parameters(op.config, dims)
    cache = layer.empty_cache(batch=1, max_len=128, dtype=torch.bfloat16)
    actual_bytes = sum(t.numel() * t.element_size() for t in (cache.conv_state, cache.recurrent_state))
    assert actual_bytes == GDN.cache_bytes(op.config, dims, context=128, itemsize=2)


def test_generated_layer_is_the_published_layer(build):
    """The generated module (chunked op, one conv over q|k|v) against the layer's formula computed independently."""
    package = build(SPEC, "tiny", ("mixers.gdn.n_v_heads=4",))
    torch.manual_seed(0)
    layer = package.Model().layers[0].mixer.double()
    x = torch.randn(2, 37, 64, dtype=torch.float64)
    H, K, HV, V = 2, 16, 4, 16
    B, T, _ = x.shape
    key_dim = H * K
    conv = layer.conv1d.weight  # (q | k | v channels, 1, width)

    def short_conv(u, w):  # causal depthwise conv, then SiLU
        return F.silu(F.conv1d(F.pad(u.transpose(1, 2), (w.shape[-1] - 1, 0)), w, groups=u.shape[-1]).transpose(1, 2))

    with torch.no_grad():
        q = short_conv(layer.q_proj(x), conv[:key_dim]).view(B, T, H, K)
        k = short_conv(layer.k_proj(x), conv[key_dim:2 * key_dim]).view(B, T, H, K)
        v = short_conv(layer.v_proj(x), conv[2 * key_dim:]).view(B, T, HV, V)
        q, k = (t / torch.sqrt(t.square().sum(-1, keepdim=True) + 1e-6) for t in (q, k))  # fla's l2norm, eps 1e-6
        q, k = q.repeat_interleave(HV // H, dim=2), k.repeat_interleave(HV // H, dim=2)  # value head h reads h // 2
        alpha = torch.exp(-layer.A_log.exp() * F.softplus(layer.a_proj(x) + layer.dt_bias))  # (B, T, HV)
        beta = torch.sigmoid(layer.b_proj(x))
        S = torch.zeros(B, HV, K, V, dtype=x.dtype)
        eye = torch.eye(K, dtype=x.dtype)
        outputs = []
        for t in range(T):
            k_t, b_t = k[:, t, :, :, None], beta[:, t, :, None, None]
            S = alpha[:, t, :, None, None] * (eye - b_t * k_t @ k_t.mT) @ S + b_t * k_t @ v[:, t, :, None, :]
            outputs.append((q[:, t, :, None, :] @ S).squeeze(-2) / K**0.5)
        o = torch.stack(outputs, dim=1)  # (B, T, HV, V)
        o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + layer.o_norm.eps) * layer.o_norm.weight
        o = o * F.silu(layer.g_proj(x)).view(B, T, HV, V)
        expected = layer.o_proj(o.reshape(B, T, HV * V))
        assert_close(layer(x), expected, 1e-6, "generated Gated DeltaNet layer")
