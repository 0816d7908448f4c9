"""templates/runtime/ssm.py against plain sequential loops written here, independent of the chunked scan."""

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from templates.runtime import ssm
from tests.numerics import TOLERANCE, assert_close

# ---------------------------------------------------------------------------------------------
# Sequential references
# ---------------------------------------------------------------------------------------------


def loop_selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=True, initial_state=None):
    """h_t = exp(Δ_t A) h_{t-1} + Δ_t u_t B_t, y_t = C_t·h_t + D u_t, y *= silu(z), one position at a time."""
    batch, seqlen, dim = u.shape
    dt = delta + delta_bias if delta_bias is not None else delta
    dt = F.softplus(dt) if delta_softplus else dt
    h = torch.zeros(batch, dim, A.shape[1], dtype=u.dtype) if initial_state is None else initial_state
    ys = []
    for t in range(seqlen):
        h = torch.exp(dt[:, t, :, None] * A) * h + (dt[:, t] * u[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + D * u
    if z is not None:
        y = y * F.silu(z)
    return y, h


def conv1d_reference(x, weight, bias, conv_state=None):
    """torch's own conv1d over (conv_state, x) or the left-zero-padded x; returns y only."""
    width = weight.shape[1]
    x_t = x.transpose(1, 2)  # (B, D, T)
    x_t = F.pad(x_t, (width - 1, 0)) if conv_state is None else torch.cat([conv_state, x_t], dim=2)
    return F.conv1d(x_t, weight.unsqueeze(1), bias, groups=weight.shape[0]).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------------

FEATURES = ("D", "z", "delta_bias", "initial_state")


def make_inputs(batch, seqlen, dim, dstate, *, features=(), dtype=torch.float32, delta_mean=-1.0, a_max=16.0, seed=0):
    """Mamba-like inputs: Δ = softplus(delta) around 0.3 by default, A = -exp(.) in [-a_max, -1]."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, mean=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + mean).to(dtype)

    args = dict(
        u=randn(batch, seqlen, dim),
        delta=randn(batch, seqlen, dim, scale=0.5, mean=delta_mean),
        A=-torch.exp(torch.rand(dim, dstate, generator=g, dtype=torch.float64) * math.log(a_max)).to(dtype),
        B=randn(batch, seqlen, dstate),
        C=randn(batch, seqlen, dstate),
    )
    optional = dict(
        D=randn(dim),
        z=randn(batch, seqlen, dim),
        delta_bias=randn(dim, scale=0.5),
        initial_state=randn(batch, dim, dstate),
    )
    args.update({k: v for k, v in optional.items() if k in features})
    return args


def double(args):
    return {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in args.items()}


# (batch, seqlen, dim, dstate, chunk): odd and ragged lengths, a single position, an exact multiple.
SHAPES = [
    pytest.param(2, 63, 24, 8, 32, id="B2-T63-D24-N8-L32"),
    pytest.param(1, 1, 8, 4, 32, id="B1-T1-D8-N4-L32"),
    pytest.param(2, 130, 16, 8, 64, id="B2-T130-D16-N8-L64"),
    pytest.param(3, 130, 5, 3, 32, id="B3-T130-D5-N3-L32"),
    pytest.param(1, 128, 12, 16, 64, id="B1-T128-D12-N16-L64"),
    pytest.param(2, 7, 6, 4, 1, id="B2-T7-D6-N4-L1"),
]
FEATURE_SETS = [
    pytest.param((), id="plain"),
    pytest.param(("D",), id="D"),
    pytest.param(("z",), id="z"),
    pytest.param(("delta_bias",), id="bias"),
    pytest.param(("initial_state",), id="h0"),
    pytest.param(FEATURES, id="all"),
]


# ---------------------------------------------------------------------------------------------
# selective_scan
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("features", FEATURE_SETS)
@pytest.mark.parametrize("batch,seqlen,dim,dstate,chunk", SHAPES)
def test_selective_scan_matches_loop(batch, seqlen, dim, dstate, chunk, features):
    args = make_inputs(batch, seqlen, dim, dstate, features=features)
    y, h = ssm.selective_scan(**args, chunk_size=chunk)
    y_ref, h_ref = loop_selective_scan(**double(args))
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    assert_close(y, y_ref, TOLERANCE[torch.float32], "y")
    assert_close(h, h_ref, TOLERANCE[torch.float32], "final_state")


@pytest.mark.parametrize("batch,seqlen,dim,dstate,chunk", SHAPES)
def test_selective_scan_float64(batch, seqlen, dim, dstate, chunk):
    args = make_inputs(batch, seqlen, dim, dstate, features=FEATURES, dtype=torch.float64)
    y, h = ssm.selective_scan(**args, chunk_size=chunk)
    y_ref, h_ref = loop_selective_scan(**args)
    assert y.dtype == torch.float64 and h.dtype == torch.float64
    assert_close(y, y_ref, TOLERANCE[torch.float64], "y")
    assert_close(h, h_ref, TOLERANCE[torch.float64], "final_state")


def test_selective_scan_without_softplus():
    args = make_inputs(2, 45, 8, 4, features=FEATURES)
    args["delta"] = args["delta"].abs() * 0.3  # already a positive step size
    args["delta_bias"] = args["delta_bias"].abs() * 0.1
    y, h = ssm.selective_scan(**args, delta_softplus=False, chunk_size=16)
    y_ref, h_ref = loop_selective_scan(**double(args), delta_softplus=False)
    assert_close(y, y_ref, TOLERANCE[torch.float32], "y")
    assert_close(h, h_ref, TOLERANCE[torch.float32], "final_state")


def test_selective_scan_bfloat16_inputs():
    """Low-precision inputs: y comes back in bfloat16, the state in float32, the math in float32."""
    args = make_inputs(2, 40, 8, 4, features=FEATURES, dtype=torch.bfloat16)
    args["initial_state"] = args["initial_state"].float()
    y, h = ssm.selective_scan(**args, chunk_size=16)
    y_ref, h_ref = loop_selective_scan(**double(args))
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert_close(y, y_ref, TOLERANCE[torch.bfloat16], "y")
    assert_close(h, h_ref, TOLERANCE[torch.float32], "final_state")


@pytest.mark.parametrize("chunk", [1, 3, 16, 64, 1000])
def test_selective_scan_does_not_depend_on_chunk_size(chunk):
    args = make_inputs(2, 50, 6, 4, features=FEATURES, dtype=torch.float64)
    y, h = ssm.selective_scan(**args, chunk_size=chunk)
    y_ref, h_ref = ssm.selective_scan(**args, chunk_size=50)
    assert_close(y, y_ref, TOLERANCE[torch.float64], "y")
    assert_close(h, h_ref, TOLERANCE[torch.float64], "final_state")


@pytest.mark.parametrize(
    "delta_mean,a_max",
    [
        pytest.param(5.0, 16.0, id="dt5-A16"),  # Δ·A ≈ -80 a step: one step underflows e^{Δ·A} past 1e-35
        pytest.param(100.0, 100.0, id="dt100-A100"),  # Δ·A ≈ -10^4: every decay is exactly 0
        pytest.param(-12.0, 1.0, id="dt6e-6-A1"),  # Δ ≈ 6e-6: decays within 1e-5 of 1, long memory
    ],
)
def test_selective_scan_extreme_decay_is_finite_and_exact(delta_mean, a_max):
    args = make_inputs(2, 130, 8, 4, features=FEATURES, delta_mean=delta_mean, a_max=a_max)
    y, h = ssm.selective_scan(**args, chunk_size=32)
    y_ref, h_ref = loop_selective_scan(**double(args))
    assert_close(y, y_ref, TOLERANCE[torch.float32], "y")
    assert_close(h, h_ref, TOLERANCE[torch.float32], "final_state")

    leaves = {k: v.requires_grad_() for k, v in args.items()}
    y, h = ssm.selective_scan(**leaves, chunk_size=32)
    (y.square().sum() + h.square().sum()).backward()
    for name, leaf in leaves.items():
        assert torch.isfinite(leaf.grad).all(), f"grad of {name} has non-finite values"


def test_selective_scan_accepts_channel_slices():
    """In Mamba, u and z are halves of one projection, delta, B, C slices of another (non-contiguous views)."""
    batch, seqlen, dim, dstate = 2, 32, 8, 4
    args = make_inputs(batch, seqlen, dim, dstate, features=FEATURES)
    u, z = torch.cat([args["u"], args["z"]], dim=-1).chunk(2, dim=-1)
    delta, B, C = torch.split(torch.cat([args["delta"], args["B"], args["C"]], dim=-1), [dim, dstate, dstate], dim=-1)
    sliced = dict(args, u=u, z=z, delta=delta, B=B, C=C, initial_state=args["initial_state"].mT.contiguous().mT)
    assert not sliced["u"].is_contiguous() and not sliced["initial_state"].is_contiguous()
    y, h = ssm.selective_scan(**sliced, chunk_size=16)
    y_ref, h_ref = ssm.selective_scan(**args, chunk_size=16)
    assert_close(y, y_ref, TOLERANCE[torch.float32], "y")
    assert_close(h, h_ref, TOLERANCE[torch.float32], "final_state")


def test_selective_scan_mixed_decay_within_a_chunk():
    """Huge decays early in a chunk, tiny ones after: short segments late in the chunk must stay exact.

    A scan built on differences of prefix sums, cumsum[t] - cumsum[s] ≈ -4000 - (-4000), would lose
    the digits of those segments.
    """
    args = make_inputs(1, 64, 4, 4, features=FEATURES)
    delta = torch.full_like(args["delta"], -7.0)  # Δ ≈ 1e-3
    delta[:, :16] = 16.0  # Δ·A down to -256 a step over the first 16 positions
    args["delta"] = delta
    y, h = ssm.selective_scan(**args, chunk_size=64)
    y_ref, h_ref = loop_selective_scan(**double(args))
    assert_close(y, y_ref, TOLERANCE[torch.float32], "y")
    assert_close(h, h_ref, TOLERANCE[torch.float32], "final_state")


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_selective_scan_gradients_match_loop(dtype):
    args = make_inputs(2, 37, 6, 4, features=FEATURES, dtype=dtype)
    weights = torch.randn(2, 37, 6, generator=torch.Generator().manual_seed(1), dtype=dtype)

    def grads(fn, inputs):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        y, h = fn(**leaves)
        ((y * weights.to(y.dtype)).sum() + h.sum()).backward()
        return {k: v.grad for k, v in leaves.items()}

    got = grads(lambda **a: ssm.selective_scan(**a, chunk_size=8), args)
    expected = grads(loop_selective_scan, double(args))
    for name in args:
        assert_close(got[name], expected[name], 10 * TOLERANCE[dtype], f"grad of {name}")


def test_selective_scan_gradcheck():
    args = make_inputs(1, 5, 2, 3, features=FEATURES, dtype=torch.float64)
    names = list(args)

    def fn(*tensors):
        return ssm.selective_scan(**dict(zip(names, tensors, strict=True)), chunk_size=2)

    leaves = tuple(args[k].requires_grad_() for k in names)
    assert torch.autograd.gradcheck(fn, leaves)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefill", [1, 17, 32, 40])
def test_prefill_then_steps_equals_full_scan(prefill):
    seqlen = 41
    args = make_inputs(2, seqlen, 8, 4, features=FEATURES)
    y_full, h_full = ssm.selective_scan(**args, chunk_size=16)

    per_time = ("u", "delta", "B", "C", "z")
    first = {k: (v[:, :prefill] if k in per_time else v) for k, v in args.items()}
    y_pre, state = ssm.selective_scan(**first, chunk_size=16)
    ys = [y_pre]
    for t in range(prefill, seqlen):
        step = {k: v[:, t] for k, v in args.items() if k in per_time}
        y_t, state = ssm.selective_state_step(state, **step, A=args["A"], D=args["D"], delta_bias=args["delta_bias"])
        ys.append(y_t[:, None])
    assert_close(torch.cat(ys, dim=1), y_full, TOLERANCE[torch.float32], "y")
    assert_close(state, h_full, TOLERANCE[torch.float32], "final_state")


def test_decode_with_cache_equals_full_sequence():
    """conv + SSM of a Mamba layer, prefilled then decoded through a MambaCache, equals one full pass."""
    batch, seqlen, dim, dstate, width, prefill = 2, 23, 8, 4, 4, 9
    args = make_inputs(batch, seqlen, dim, dstate, features=("D", "z", "delta_bias"))
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(dim, width, generator=g), torch.randn(dim, generator=g)

    def mixer(x, cache, sl):
        xc, cache.conv_state = ssm.causal_conv1d(x, weight, bias, cache.conv_state)
        xc = F.silu(xc)
        per_time = {k: args[k][:, sl] for k in ("delta", "B", "C", "z")}
        if xc.shape[1] == 1:
            step = {k: v[:, 0] for k, v in per_time.items()}
            y, new_state = ssm.selective_state_step(
                cache.ssm_state, xc[:, 0], **step, A=args["A"], D=args["D"], delta_bias=args["delta_bias"]
            )
            y = y[:, None]
        else:
            y, new_state = ssm.selective_scan(
                xc, **per_time, A=args["A"], D=args["D"], delta_bias=args["delta_bias"], initial_state=cache.ssm_state
            )
        cache.ssm_state.copy_(new_state)
        return y

    x = args["u"]
    full_cache = ssm.MambaCache.empty(batch, dim, width, dstate, dtype=x.dtype)
    y_full = mixer(x, full_cache, slice(0, seqlen))

    cache = ssm.MambaCache.empty(batch, dim, width, dstate, dtype=x.dtype)
    ys = [mixer(x[:, :prefill], cache, slice(0, prefill))]
    ys += [mixer(x[:, t : t + 1], cache, slice(t, t + 1)) for t in range(prefill, seqlen)]
    assert_close(torch.cat(ys, dim=1), y_full, TOLERANCE[torch.float32], "y")
    assert_close(cache.ssm_state, full_cache.ssm_state, TOLERANCE[torch.float32], "ssm_state")
    assert torch.equal(cache.conv_state, full_cache.conv_state)


def test_mamba_cache_empty():
    cache = ssm.MambaCache.empty(3, 16, 4, 8, dtype=torch.bfloat16)
    assert cache.conv_state.shape == (3, 16, 3) and cache.conv_state.dtype == torch.bfloat16
    assert cache.ssm_state.shape == (3, 16, 8) and cache.ssm_state.dtype == torch.float32
    assert not cache.conv_state.any() and not cache.ssm_state.any()


# ---------------------------------------------------------------------------------------------
# causal_conv1d
# ---------------------------------------------------------------------------------------------

CONV_SHAPES = [
    pytest.param(2, 63, 24, 4, id="B2-T63-D24-K4"),
    pytest.param(1, 1, 8, 4, id="B1-T1-D8-K4"),
    pytest.param(3, 2, 5, 4, id="B3-T2-D5-K4"),
    pytest.param(2, 17, 6, 2, id="B2-T17-D6-K2"),
    pytest.param(2, 9, 3, 1, id="B2-T9-D3-K1"),
]


def make_conv_inputs(batch, seqlen, dim, width, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, seqlen, dim, generator=g).to(dtype)
    weight = torch.randn(dim, width, generator=g).to(dtype)
    bias = torch.randn(dim, generator=g).to(dtype)
    state = torch.randn(batch, dim, width - 1, generator=g).to(dtype)
    return x, weight, bias, state


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("batch,seqlen,dim,width", CONV_SHAPES)
def test_causal_conv1d_matches_torch_conv1d(batch, seqlen, dim, width, with_bias):
    x, weight, bias, _ = make_conv_inputs(batch, seqlen, dim, width)
    bias = bias if with_bias else None
    y, state = ssm.causal_conv1d(x, weight, bias)
    assert_close(y, conv1d_reference(x, weight, bias), TOLERANCE[torch.float32], "y")
    x_ext = torch.cat([x.new_zeros(batch, width - 1, dim), x], dim=1)
    assert torch.equal(state, x_ext[:, x_ext.shape[1] - (width - 1) :].transpose(1, 2))


@pytest.mark.parametrize("batch,seqlen,dim,width", CONV_SHAPES)
def test_causal_conv1d_with_state_matches_torch_conv1d(batch, seqlen, dim, width):
    x, weight, bias, conv_state = make_conv_inputs(batch, seqlen, dim, width)
    y, _ = ssm.causal_conv1d(x, weight, bias, conv_state)
    assert_close(y, conv1d_reference(x, weight, bias, conv_state), TOLERANCE[torch.float32], "y")


@pytest.mark.parametrize("width", [1, 2, 4])
@pytest.mark.parametrize("split", [1, 2, 10, 20])
def test_causal_conv1d_streams(split, width):
    """Convolving in two pieces, threading the state, equals one call; so does one position at a time."""
    x, weight, bias, conv_state = make_conv_inputs(2, 21, 6, width)
    y_full, state_full = ssm.causal_conv1d(x, weight, bias, conv_state)

    y1, state = ssm.causal_conv1d(x[:, :split], weight, bias, conv_state)
    y2, state = ssm.causal_conv1d(x[:, split:], weight, bias, state)
    assert_close(torch.cat([y1, y2], dim=1), y_full, TOLERANCE[torch.float32], "y")
    assert torch.equal(state, state_full)

    ys, state = [], conv_state
    for t in range(x.shape[1]):
        y_t, state = ssm.causal_conv1d(x[:, t : t + 1], weight, bias, state)
        ys.append(y_t)
    assert_close(torch.cat(ys, dim=1), y_full, TOLERANCE[torch.float32], "y (one position at a time)")
    assert torch.equal(state, state_full)


def test_causal_conv1d_keeps_dtype_and_gradients():
    x, weight, bias, conv_state = make_conv_inputs(2, 9, 4, 4, dtype=torch.bfloat16)
    y, state = ssm.causal_conv1d(x, weight, bias, conv_state)
    assert y.dtype == torch.bfloat16 and state.dtype == torch.bfloat16
    assert torch.equal(state, x[:, -3:].transpose(1, 2))

    leaves = [t.double().requires_grad_() for t in (x, weight, bias, conv_state)]
    assert torch.autograd.gradcheck(lambda *a: ssm.causal_conv1d(*a), leaves)


def test_causal_conv1d_rejects_wrong_state_shape():
    x, weight, bias, _ = make_conv_inputs(2, 9, 4, 4)
    with pytest.raises(ValueError, match=r"conv_state must be \(B, D, K-1\) = \(2, 4, 3\).*got \(2, 4, 4\)"):
        ssm.causal_conv1d(x, weight, bias, torch.zeros(2, 4, 4))


# ---------------------------------------------------------------------------------------------
# Packaging
# ---------------------------------------------------------------------------------------------


def test_imports_only_torch_and_stdlib():
    """The file is copied verbatim into generated packages, so it may import nothing else."""
    tree = ast.parse(Path(ssm.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"relative import on line {node.lineno}"
            imported.add(node.module.split(".")[0])
    assert imported <= {"torch", "math", "typing", "dataclasses"}, f"unexpected imports: {sorted(imported)}"


def test_torch_export_with_dynamic_batch():
    class Mixer(torch.nn.Module):
        def forward(self, u, delta, A, B, C, D, z, delta_bias, initial_state):
            return ssm.selective_scan(u, delta, A, B, C, D, z, delta_bias, True, initial_state, chunk_size=16)

    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    per_batch = {"u", "delta", "B", "C", "z", "initial_state"}
    batch = torch.export.Dim("batch")
    dynamic = tuple({0: batch} if k in per_batch else None for k in names)
    args = make_inputs(2, 40, 8, 4, features=FEATURES)
    program = torch.export.export(Mixer(), tuple(args[k] for k in names), dynamic_shapes=dynamic)

    args = make_inputs(3, 40, 8, 4, features=FEATURES, seed=1)  # another batch size
    y, h = program.module()(*(args[k] for k in names))
    y_ref, h_ref = ssm.selective_scan(**args, chunk_size=16)
    assert_close(y, y_ref, TOLERANCE[torch.float64], "y")
    assert_close(h, h_ref, TOLERANCE[torch.float64], "final_state")


def test_torch_export_with_dynamic_batch_and_length():
    """One program for every batch size and every length up to max_seqlen: a symbolic T is cut into chunks of the full
    chunk_size (the last one padded with identity steps) and the scan across chunks runs the doubling rounds of the
    bound. A single position, less than a chunk, an exact multiple and the bound itself all match the eager scan."""

    class Mixer(torch.nn.Module):
        def forward(self, u, delta, A, B, C, D, z, delta_bias, initial_state):
            return ssm.selective_scan(u, delta, A, B, C, D, z, delta_bias, True, initial_state, chunk_size=16, max_seqlen=100)

    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    per_time = {"u", "delta", "B", "C", "z"}
    batch, length = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("length", min=1, max=100)
    dynamic = tuple({0: batch, 1: length} if k in per_time else {0: batch} if k == "initial_state" else None for k in names)
    args = make_inputs(2, 40, 8, 4, features=FEATURES)
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):  # as archgen export traces: sizes >= 2
        program = torch.export.export(Mixer(), tuple(args[k] for k in names), dynamic_shapes=dynamic)

    for b, t in ((1, 1), (3, 15), (1, 48), (2, 100)):
        args = make_inputs(b, t, 8, 4, features=FEATURES, seed=t)
        y, h = program.module()(*(args[k] for k in names))
        y_ref, h_ref = ssm.selective_scan(**args, chunk_size=16)
        assert_close(y, y_ref, TOLERANCE[torch.float32], f"y, B={b} T={t}")
        assert_close(h, h_ref, TOLERANCE[torch.float32], f"final_state, B={b} T={t}")


def test_symbolic_length_without_max_seqlen_is_an_error():
    class Mixer(torch.nn.Module):
        def forward(self, u, delta, A, B, C):
            return ssm.selective_scan(u, delta, A, B, C, chunk_size=16)

    args = make_inputs(2, 40, 8, 4)
    length = torch.export.Dim("length", min=2, max=100)
    with pytest.raises(Exception, match="needs max_seqlen when the sequence length is symbolic"):
        torch.export.export(Mixer(), tuple(args[k] for k in ("u", "delta", "A", "B", "C")),
                            dynamic_shapes=({1: length}, {1: length}, None, {1: length}, {1: length}))
