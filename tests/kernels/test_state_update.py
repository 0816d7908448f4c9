"""kernels/state_update.py: the one-token Mamba-2 and Mamba-1 steps against their references and the runtime's.

Runs in Triton's interpreter without CUDA, at small odd shapes (P and N below the tile, heads not a power of two,
several groups). Kernel-written buffers start as NaN (torch.empty is poisoned).
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
pytest.importorskip("triton")

from archgen_kernels import state_update as su
from templates.runtime import ssd as runtime_ssd
from templates.runtime import ssm as runtime_ssm

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


@pytest.fixture(autouse=True)
def triton_on_cpu(monkeypatch):
    monkeypatch.setenv("ARCHGEN_TRITON_ON_CPU", "1")


@pytest.fixture(autouse=True)
def poisoned_empty(monkeypatch):
    empty = torch.empty

    def poisoned(*args, **kwargs):
        t = empty(*args, **kwargs)
        return t.fill_(math.nan) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", poisoned)


def rel_error(actual, expected):
    assert actual.shape == expected.shape and not actual.isnan().any()
    return ((actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize(("dtype", "nheads", "ngroups", "fused_step"),
                         [(torch.float32, 6, 3, True), (torch.float32, 5, 1, False), (torch.bfloat16, 3, 1, True)])
def test_ssd_step_matches_reference(dtype, nheads, ngroups, fused_step):
    batch, headdim, dstate = 2, 20, 5
    g = torch.Generator().manual_seed(nheads)
    state = torch.randn(batch, nheads, headdim, dstate, generator=g)
    x = torch.randn(batch, nheads, headdim, generator=g).to(dtype)
    dt = torch.randn(batch, nheads, generator=g) * 0.5 - 1.0
    A = -torch.rand(nheads, generator=g) * 4 - 0.5
    B = torch.randn(batch, ngroups, dstate, generator=g).to(dtype)
    C = torch.randn(batch, ngroups, dstate, generator=g).to(dtype)
    D, bias = torch.randn(nheads, generator=g), torch.randn(nheads, generator=g) * 0.3
    kwargs = {"dt_bias": bias, "dt_softplus": True} if fused_step else {}
    if not fused_step:
        dt = torch.nn.functional.softplus(dt)
    y, new_state = su.ssd_step(state, x, dt, A, B, C, D, **kwargs)
    as64 = [t.double() for t in (state, x, dt, A, B, C, D)]
    y_ref, state_ref = su.ssd_step_reference(*as64, **{k: (v.double() if torch.is_tensor(v) else v)
                                                       for k, v in kwargs.items()})
    assert y.dtype == dtype and new_state.dtype == torch.float32
    assert rel_error(y, y_ref) <= TOL[dtype] and rel_error(new_state, state_ref) <= TOL[dtype]
    if fused_step:  # the runtime's step, given the Δ it expects
        step = torch.nn.functional.softplus(as64[2] + bias.double())
        y_rt, state_rt = runtime_ssd.ssd_step(as64[0], as64[1], step, *as64[3:])
        assert rel_error(y_ref, y_rt) < 1e-12 and rel_error(state_ref, state_rt) < 1e-12


@pytest.mark.parametrize(("dtype", "with_optional"), [(torch.float32, True), (torch.float32, False),
                                                      (torch.bfloat16, True)])
def test_selective_state_step_matches_reference(dtype, with_optional):
    batch, dim, dstate = 3, 70, 5
    g = torch.Generator().manual_seed(dim)
    state = torch.randn(batch, dim, dstate, generator=g)
    u = torch.randn(batch, dim, generator=g).to(dtype)
    delta = (torch.randn(batch, dim, generator=g) * 0.5 - 1.0).to(dtype)
    A = -torch.exp(torch.rand(dim, dstate, generator=g) * 2)
    B = torch.randn(batch, dstate, generator=g).to(dtype)
    C = torch.randn(batch, dstate, generator=g).to(dtype)
    optional = [torch.randn(dim, generator=g), torch.randn(batch, dim, generator=g).to(dtype),
                torch.randn(dim, generator=g) * 0.3] if with_optional else [None, None, None]
    y, new_state = su.selective_state_step(state, u, delta, A, B, C, *optional)
    as64 = [t.double() if t is not None else None for t in (state, u, delta, A, B, C, *optional)]
    y_ref, state_ref = su.selective_state_step_reference(*as64)
    y_rt, state_rt = runtime_ssm.selective_state_step(*as64)
    assert rel_error(y, y_ref) <= TOL[dtype] and rel_error(new_state, state_ref) <= TOL[dtype]
    assert rel_error(y_ref, y_rt) < 1e-12 and rel_error(state_ref, state_rt) < 1e-12


def test_ops_have_fake_implementations():
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(1, 2, 4, 3, generator=g), torch.randn(1, 2, 4, generator=g), torch.rand(1, 2, generator=g),
            -torch.rand(2, generator=g), torch.randn(1, 1, 3, generator=g), torch.randn(1, 1, 3, generator=g), None,
            None, False)
    torch.library.opcheck(su.ssd_step_op, args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(("dtype", "ngroups"), [(torch.float32, 2), (torch.bfloat16, 1)])
def test_fused_mamba2_decode_step_matches_the_unfused_reference(dtype, ngroups):
    """Conv update + SiLU + SSM step in one launch, against ops/ssm.py's causal_conv1d and ops/ssd.py's ssd_step."""
    batch, nheads, headdim, dstate, width = 2, 4, 20, 5, 4
    channels = nheads * headdim + 2 * ngroups * dstate
    g = torch.Generator().manual_seed(ngroups)
    xbc = torch.randn(batch, channels, generator=g).to(dtype)
    conv_state = torch.randn(batch, channels, width - 1, generator=g).to(dtype)
    conv_weight, conv_bias = torch.randn(channels, width, generator=g) * 0.5, torch.randn(channels, generator=g)
    state = torch.randn(batch, nheads, headdim, dstate, generator=g)
    dt = torch.randn(batch, nheads, generator=g) * 0.5 - 1.0
    A, D = -torch.rand(nheads, generator=g) * 4 - 0.5, torch.randn(nheads, generator=g)
    bias = torch.randn(nheads, generator=g) * 0.3
    y, new_conv, new_state = su.mamba2_decode_step(xbc, conv_state, conv_weight, conv_bias, state, dt, A, D,
                                                   dt_bias=bias, dt_softplus=True, ngroups=ngroups)
    y_ref, conv_ref, state_ref = su.mamba2_decode_step_reference(xbc, conv_state, conv_weight, conv_bias, state, dt, A,
                                                                 D, dt_bias=bias, dt_softplus=True, ngroups=ngroups)
    assert torch.equal(new_conv, conv_ref)
    assert rel_error(y, y_ref) <= TOL[dtype] and rel_error(new_state, state_ref) <= TOL[dtype]
    # The reference is the runtime's two steps.
    conv_y, conv_rt = runtime_ssm.causal_conv1d(xbc.unsqueeze(1).double(), conv_weight.double(), conv_bias.double(),
                                                conv_state.double())
    x, B, C = torch.nn.functional.silu(conv_y[:, 0]).split([nheads * headdim, ngroups * dstate, ngroups * dstate], -1)
    step = torch.nn.functional.softplus(dt.double() + bias.double())
    y_rt, state_rt = runtime_ssd.ssd_step(state.double(), x.reshape(batch, nheads, headdim), step, A.double(),
                                          B.reshape(batch, ngroups, dstate), C.reshape(batch, ngroups, dstate),
                                          D.double())
    assert torch.equal(conv_rt.to(dtype), conv_ref)
    if dtype == torch.float32:
        assert rel_error(y_ref, y_rt) < 1e-5 and rel_error(state_ref, state_rt) < 1e-5
