"""kernels/state_update.py: the one-token Mamba-2 and Mamba-1 steps against their references and the runtime's.

Runs in Triton's interpreter without CUDA, at small odd shapes (P and N below the tile, heads not a power of two,
several groups). Kernel-written buffers start as NaN (torch.empty is poisoned). The steps have no tuner: they launch
SSD_STEP_CONFIG and SELECTIVE_STEP_CONFIG in the interpreter as on a GPU, so these tests run the GPU's configs
(tests/kernels/gpu_configs.py has nothing to choose here).
"""

import math

import pytest
import torch

pytest.importorskip("triton")

from archgen_kernels import state_update as su
from templates.runtime import ssd as runtime_ssd
from templates.runtime import ssm as runtime_ssm
from tests.numerics import relative_norm_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned_empty")  # kernel-written buffers start as NaN
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    """Standard normal samples drawn from g on the CPU (the same numbers on every machine), on the test device."""
    return torch.randn(*shape, generator=g).to(DEVICE)


def rand(g: torch.Generator, *shape: int) -> torch.Tensor:
    """Uniform [0, 1) samples drawn from g on the CPU, on the test device."""
    return torch.rand(*shape, generator=g).to(DEVICE)


@pytest.mark.parametrize(("dtype", "with_optional"), [(torch.float32, True), (torch.float32, False),
                                                      (torch.bfloat16, True)])
def test_mamba_step_computes_A_from_A_log_in_the_kernel(dtype, with_optional):
    """mamba_step = ops/ssm.py's selective_state_step with A = -exp(A_log) and a softplus step, against ops/ssm.py's
    mamba_step in float64, with and without D, z and the step bias; odd width (several programs, the last one
    partial) and state size."""
    batch, dim, dstate = 2, 83, 7
    g = torch.Generator().manual_seed(dim)
    state = randn(g, batch, dim, dstate)
    u, z = randn(g, batch, dim).to(dtype), randn(g, batch, dim).to(dtype)
    delta = (randn(g, batch, dim) * 0.5 - 1.0).to(dtype)
    A_log = torch.log(rand(g, dim, dstate) * 8 + 0.5)
    B, C = randn(g, batch, dstate).to(dtype), randn(g, batch, dstate).to(dtype)
    D, bias = randn(g, dim), randn(g, dim) * 0.3
    if not with_optional:
        D = z = bias = None
    y, new_state = su.mamba_step(state, u, delta, A_log, B, C, D, z, bias)
    as64 = [t.double() if t is not None else None for t in (state, u, delta, A_log, B, C, D, z, bias)]
    y_rt, state_rt = runtime_ssm.mamba_step(*as64)
    y_ref, state_ref = su.mamba_step_reference(*as64)
    assert y.dtype == dtype and new_state.dtype == torch.float32
    assert relative_norm_error(y, y_rt) <= TOL[dtype] and relative_norm_error(new_state, state_rt) <= TOL[dtype]
    assert relative_norm_error(y_ref, y_rt) < 1e-12 and relative_norm_error(state_ref, state_rt) < 1e-12


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mamba_step_low_rank_projects_delta_in_the_kernel(dtype):
    """mamba_step_low_rank = ops/ssm.py's mamba_step_low_rank (Δ = dt_proj's weight · its low rank, then the step),
    in float64, at an odd width and a rank that is not a power of two; mamba_step_low_rank_ writes the same state over
    the one given and returns the same y."""
    batch, dim, dstate, rank = 2, 83, 7, 13
    g = torch.Generator().manual_seed(rank)
    state = randn(g, batch, dim, dstate)
    u, z = randn(g, batch, dim).to(dtype), randn(g, batch, dim).to(dtype)
    delta_low = (randn(g, batch, rank) * 0.3).to(dtype)
    delta_proj_weight = (randn(g, dim, rank) * rank**-0.5).to(dtype)
    A_log = torch.log(rand(g, dim, dstate) * 8 + 0.5)
    B, C = randn(g, batch, dstate).to(dtype), randn(g, batch, dstate).to(dtype)
    D, bias = randn(g, dim), randn(g, dim) * 0.3 - 1.0
    args = (state, u, delta_low, delta_proj_weight, A_log, B, C, D, z, bias)
    y, new_state = su.mamba_step_low_rank(*args)
    as64 = [t.double() for t in args]
    y_rt, state_rt = runtime_ssm.mamba_step_low_rank(*as64)
    y_ref, state_ref = su.mamba_step_low_rank_reference(*as64)
    assert y.dtype == dtype and new_state.dtype == torch.float32
    assert relative_norm_error(y, y_rt) <= TOL[dtype] and relative_norm_error(new_state, state_rt) <= TOL[dtype]
    assert relative_norm_error(y_ref, y_rt) < 1e-12 and relative_norm_error(state_ref, state_rt) < 1e-12
    y_in_place = su.mamba_step_low_rank_(state, *args[1:])
    assert torch.equal(y_in_place, y) and torch.equal(state, new_state)
    with pytest.raises(ValueError, match=r"delta_proj_weight must be \(D, R\)"):
        su.mamba_step_low_rank(state, u, delta_low, delta_proj_weight[:, :5], *args[4:])


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_mamba_step_in_place_writes_the_functional_steps_state_over_the_one_given(cache_dtype):
    """mamba_step_ leaves in `state` what mamba_step returns (in the cache's dtype) and the same y; a state with
    padded rows (a strided view) keeps its padding."""
    batch, dim, dstate = 2, 83, 7
    g = torch.Generator().manual_seed(3)
    padded = randn(g, batch, dim, dstate + 2).to(cache_dtype)
    state = padded[..., :dstate]
    u, z, delta = (randn(g, batch, dim) for _ in range(3))
    A_log = torch.log(rand(g, dim, dstate) * 8 + 0.5)
    B, C = randn(g, batch, dstate), randn(g, batch, dstate)
    D, bias = randn(g, dim), randn(g, dim) * 0.3
    padding = padded[..., dstate:].clone()
    y_functional, new_state = su.mamba_step(state.clone(), u, delta, A_log, B, C, D, z, bias)
    y = su.mamba_step_(state, u, delta, A_log, B, C, D, z, bias)
    assert torch.equal(y, y_functional)
    assert torch.equal(padded[..., dstate:], padding)
    if cache_dtype == torch.float32:
        assert torch.equal(state, new_state)
    else:  # stored by the kernel in bfloat16 (the interpreter rounds unlike torch's .to, as design.md notes)
        assert relative_norm_error(state, new_state) <= TOL[cache_dtype]


def test_ops_have_fake_implementations():
    g = torch.Generator().manual_seed(0)
    step_args = (randn(g, 1, 8), randn(g, 1, 14), randn(g, 1, 2), randn(g, 1, 14, 3), randn(g, 14, 4), None,
                 randn(g, 1, 2, 4, 3), randn(g, 2), None, None, 0.0, math.inf, 1)
    torch.library.opcheck(su.mamba2_step_op, step_args, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(su.mamba2_step_in_place_op, step_args, test_utils=("test_schema", "test_faketensor"))
    mamba_args = (randn(g, 1, 6, 3), randn(g, 1, 6), randn(g, 1, 6), randn(g, 6, 3), randn(g, 1, 3), randn(g, 1, 3),
                  None, None, None)
    torch.library.opcheck(su.mamba_step_op, mamba_args, test_utils=("test_schema", "test_faketensor"))
    low_rank_args = (randn(g, 1, 6, 3), randn(g, 1, 6), randn(g, 1, 2), randn(g, 6, 2), randn(g, 6, 3), randn(g, 1, 3),
                     randn(g, 1, 3), None, None, None)
    torch.library.opcheck(su.mamba_step_low_rank_op, low_rank_args, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(su.mamba_step_low_rank_in_place_op, low_rank_args, test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(su.mamba_step_in_place_op, mamba_args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize(("dtype", "nheads", "ngroups", "headdim", "dstate", "width", "bounds"), [
    (torch.float32, 4, 2, 20, 5, 4, (0.0, math.inf)),  # P and N below their tiles, two groups
    (torch.float32, 6, 3, 37, 17, 3, (0.05, 0.4)),  # odd P (three row blocks) and N, Δ clamped at both ends
    (torch.bfloat16, 3, 1, 20, 5, 4, (0.0, math.inf)),
    (torch.bfloat16, 5, 1, 16, 8, 2, (0.0, math.inf)),
], ids=["fp32-H4-G2-P20-N5-K4", "fp32-H6-G3-P37-N17-K3-clamped", "bf16-H3-G1-P20-N5-K4", "bf16-H5-G1-P16-N8-K2"])
def test_mamba2_step_matches_the_runtime_step(dtype, nheads, ngroups, headdim, dstate, width, bounds):
    """The whole step (conv update, SiLU, Δ, SSM update, D skip, z gate) in one launch, against the kernel file's
    reference and ops/ssd.py's mamba2_step (ops/ssm.py's conv, then ssd_step) in float64; z, xbc and dt are strided
    views of one in-projection row, as the block passes them."""
    batch = 2
    d_inner = nheads * headdim
    channels = d_inner + 2 * ngroups * dstate
    g = torch.Generator().manual_seed(nheads * headdim)
    projected = randn(g, batch, 1, d_inner + channels + nheads).to(dtype)
    z, xbc, dt = projected.split([d_inner, channels, nheads], dim=-1)
    z, xbc, dt = z[:, 0], xbc[:, 0], dt[:, 0] * 0.5 - 1.0
    conv_state = randn(g, batch, channels, width - 1).to(dtype)
    conv_weight, conv_bias = randn(g, channels, width) * 0.5, randn(g, channels)
    ssm_state = randn(g, batch, nheads, headdim, dstate)
    A_log, D = rand(g, nheads) * 2 - 0.5, randn(g, nheads)
    dt_bias = randn(g, nheads) * 0.3
    args = (z, xbc, dt, conv_state, conv_weight, conv_bias, ssm_state, A_log, D, dt_bias, *bounds, ngroups)
    before = [t.clone() for t in (conv_state, ssm_state)]
    y, new_conv, new_state = su.mamba2_step(*args)
    assert torch.equal(conv_state, before[0]) and torch.equal(ssm_state, before[1])  # the inputs are left untouched
    y_ref, conv_ref, state_ref = su.mamba2_step_reference(*args)
    as64 = [t.double() if torch.is_tensor(t) else t for t in args]
    y_rt, conv_rt, state_rt = runtime_ssd.mamba2_step(*as64)
    assert y.dtype == dtype and new_conv.dtype == dtype and new_state.dtype == torch.float32
    assert torch.equal(new_conv, conv_ref) and torch.equal(conv_rt.to(dtype), conv_ref)
    assert relative_norm_error(y, y_rt) <= TOL[dtype] and relative_norm_error(new_state, state_rt) <= TOL[dtype]
    assert relative_norm_error(y_ref, y_rt) <= TOL[dtype] and relative_norm_error(state_ref, state_rt) <= TOL[dtype]
    y_in_place, conv_in_place = su.mamba2_step_(*args)  # the SSM state written over ssm_state, the same results
    assert torch.equal(y_in_place, y) and torch.equal(conv_in_place, new_conv) and torch.equal(ssm_state, new_state)


def test_mamba2_step_says_which_argument_has_the_wrong_shape():
    state = torch.zeros(1, 2, 4, 3, device=DEVICE)
    channels = 2 * 4 + 2 * 3
    shapes = ((1, 8), (1, channels), (1, 2), (1, channels, 2), (channels, 4))
    with pytest.raises(ValueError, match=r"conv_state must be \(1, 14, 3\)"):
        su.mamba2_step(*(torch.zeros(shape, device=DEVICE) for shape in shapes), None, state,
                       torch.zeros(2, device=DEVICE))
