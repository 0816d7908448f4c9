"""templates/runtime/ssd.py against a plain sequential loop written here, independent of the chunked algorithm."""

import ast
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from templates.runtime import ssd
from tests.numerics import TOLERANCE, assert_close


def loop_ssd(x, dt, A, B, C, D=None, initial_state=None):
    """h_t = exp(dt_t A) h_{t-1} + dt_t x_t ⊗ B_t, y_t = h_t C_t + D x_t, one position at a time."""
    batch, seqlen, nheads, headdim = x.shape
    heads_per_group = nheads // B.shape[2]
    B = B.repeat_interleave(heads_per_group, dim=2)  # head h reads group h // R
    C = C.repeat_interleave(heads_per_group, dim=2)
    h = torch.zeros(batch, nheads, headdim, B.shape[-1], dtype=x.dtype) if initial_state is None else initial_state
    ys = []
    for t in range(seqlen):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        h = decay * h + (dt[:, t, :, None] * x[:, t])[:, :, :, None] * B[:, t, :, None, :]
        ys.append((h * C[:, t, :, None, :]).sum(-1))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + D[:, None] * x
    return y, h


def make_inputs(
    batch,
    seqlen,
    nheads,
    headdim,
    ngroups,
    dstate,
    *,
    features=(),
    dtype=torch.float32,
    dt_mean=-1.0,
    a_max=16.0,
    seed=0,
):
    """Mamba-2-like inputs: dt = softplus(.) around 0.3 by default, A = -exp(.) in [-a_max, -1]."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, mean=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + mean).to(dtype)

    args = dict(
        x=randn(batch, seqlen, nheads, headdim),
        dt=F.softplus(randn(batch, seqlen, nheads, scale=0.5, mean=dt_mean)),
        A=-torch.exp(torch.rand(nheads, generator=g, dtype=torch.float64) * math.log(a_max)).to(dtype),
        B=randn(batch, seqlen, ngroups, dstate),
        C=randn(batch, seqlen, ngroups, dstate),
    )
    optional = dict(D=randn(nheads), initial_state=randn(batch, nheads, headdim, dstate))
    args.update({k: v for k, v in optional.items() if k in features})
    return args


def double(args):
    return {k: v.double() for k, v in args.items()}


FEATURES = ("D", "initial_state")
# (batch, seqlen, nheads, headdim, ngroups, dstate, chunk)
SHAPES = [
    pytest.param(2, 63, 4, 8, 2, 8, 32, id="B2-T63-H4-P8-G2-N8-L32"),
    pytest.param(1, 1, 2, 4, 1, 4, 32, id="B1-T1-H2-P4-G1-N4-L32"),
    pytest.param(2, 130, 6, 4, 3, 8, 64, id="B2-T130-H6-P4-G3-N8-L64"),
    pytest.param(1, 130, 4, 16, 1, 16, 32, id="B1-T130-H4-P16-G1-N16-L32"),
    pytest.param(2, 128, 2, 8, 2, 4, 64, id="B2-T128-H2-P8-G2-N4-L64"),
    pytest.param(3, 9, 3, 5, 1, 3, 1, id="B3-T9-H3-P5-G1-N3-L1"),
]
FEATURE_SETS = [
    pytest.param((), id="plain"),
    pytest.param(("D",), id="D"),
    pytest.param(("initial_state",), id="h0"),
    pytest.param(FEATURES, id="all"),
]


# ---------------------------------------------------------------------------------------------
# ssd_scan
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("features", FEATURE_SETS)
@pytest.mark.parametrize("batch,seqlen,nheads,headdim,ngroups,dstate,chunk", SHAPES)
def test_ssd_scan_matches_loop(batch, seqlen, nheads, headdim, ngroups, dstate, chunk, features):
    args = make_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, features=features)
    y, h = ssd.ssd_scan(**args, chunk_size=chunk)
    y_ref, h_ref = loop_ssd(**double(args))
    assert y.dtype == torch.float32 and h.dtype == torch.float32
    assert_close(y, y_ref, TOLERANCE[torch.float32], "y")
    assert_close(h, h_ref, TOLERANCE[torch.float32], "final_state")


@pytest.mark.parametrize("batch,seqlen,nheads,headdim,ngroups,dstate,chunk", SHAPES)
def test_ssd_scan_float64(batch, seqlen, nheads, headdim, ngroups, dstate, chunk):
    args = make_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, features=FEATURES, dtype=torch.float64)
    y, h = ssd.ssd_scan(**args, chunk_size=chunk)
    y_ref, h_ref = loop_ssd(**args)
    assert y.dtype == torch.float64 and h.dtype == torch.float64
    assert_close(y, y_ref, TOLERANCE[torch.float64], "y")
    assert_close(h, h_ref, TOLERANCE[torch.float64], "final_state")


def test_ssd_scan_bfloat16_inputs():
    """Low-precision inputs: y comes back in bfloat16, the state in float32, the math in float32."""
    args = make_inputs(2, 40, 4, 8, 2, 4, features=FEATURES, dtype=torch.bfloat16)
    args["initial_state"] = args["initial_state"].float()
    y, h = ssd.ssd_scan(**args, chunk_size=16)
    y_ref, h_ref = loop_ssd(**double(args))
    assert y.dtype == torch.bfloat16 and h.dtype == torch.float32
    assert_close(y, y_ref, TOLERANCE[torch.bfloat16], "y")
    assert_close(h, h_ref, TOLERANCE[torch.float32], "final_state")


@pytest.mark.parametrize("chunk", [1, 3, 16, 64, 1000])
def test_ssd_scan_does_not_depend_on_chunk_size(chunk):
    args = make_inputs(2, 50, 4, 4, 2, 4, features=FEATURES, dtype=torch.float64)
    y, h = ssd.ssd_scan(**args, chunk_size=chunk)
    y_ref, h_ref = ssd.ssd_scan(**args, chunk_size=50)
    assert_close(y, y_ref, TOLERANCE[torch.float64], "y")
    assert_close(h, h_ref, TOLERANCE[torch.float64], "final_state")


@pytest.mark.parametrize(
    "dt_mean,a_max",
    [
        pytest.param(5.0, 16.0, id="dt5-A16"),  # dt·A ≈ -80 a step, thousands over a chunk
        pytest.param(100.0, 100.0, id="dt100-A100"),  # dt·A ≈ -10^4: every decay is exactly 0
        pytest.param(-12.0, 1.0, id="dt6e-6-A1"),  # dt ≈ 6e-6: decays within 1e-5 of 1, long memory
    ],
)
def test_ssd_scan_extreme_decay_is_finite_and_exact(dt_mean, a_max):
    args = make_inputs(2, 130, 4, 8, 2, 4, features=FEATURES, dt_mean=dt_mean, a_max=a_max)
    y, h = ssd.ssd_scan(**args, chunk_size=64)
    y_ref, h_ref = loop_ssd(**double(args))
    assert_close(y, y_ref, TOLERANCE[torch.float32], "y")
    assert_close(h, h_ref, TOLERANCE[torch.float32], "final_state")

    leaves = {k: v.requires_grad_() for k, v in args.items()}
    y, h = ssd.ssd_scan(**leaves, chunk_size=64)
    (y.square().sum() + h.square().sum()).backward()
    for name, leaf in leaves.items():
        assert torch.isfinite(leaf.grad).all(), f"grad of {name} has non-finite values"


def test_ssd_scan_mixed_decay_within_a_chunk():
    """Huge decays early in a chunk, tiny ones after: short segments late in the chunk must stay exact.

    This is where a difference of prefix sums, cumsum[t] - cumsum[s] ≈ -4000 - (-4000), would lose
    the digits of the segment; the masked cumulative sum does not.
    """
    args = make_inputs(1, 64, 2, 4, 1, 4, features=FEATURES, dtype=torch.float32)
    dt = torch.full_like(args["dt"], 1e-3)
    dt[:, :16] = 16.0  # dt·A down to -256 a step over the first 16 positions
    args["dt"] = dt
    y, h = ssd.ssd_scan(**args, chunk_size=64)
    y_ref, h_ref = loop_ssd(**double(args))
    assert_close(y, y_ref, TOLERANCE[torch.float32], "y")
    assert_close(h, h_ref, TOLERANCE[torch.float32], "final_state")


def test_ssd_scan_accepts_channel_slices():
    """In Mamba-2, x, B and C are slices of one conv output (non-contiguous views), T often a chunk multiple."""
    batch, seqlen, nheads, headdim, ngroups, dstate = 2, 32, 4, 8, 2, 4
    args = make_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, features=FEATURES)
    xBC = torch.cat([args["x"].flatten(2), args["B"].flatten(2), args["C"].flatten(2)], dim=-1)
    x, B, C = torch.split(xBC, [nheads * headdim, ngroups * dstate, ngroups * dstate], dim=-1)
    sliced = dict(
        args,
        x=x.unflatten(-1, (nheads, headdim)),
        B=B.unflatten(-1, (ngroups, dstate)),
        C=C.unflatten(-1, (ngroups, dstate)),
        initial_state=args["initial_state"].mT.contiguous().mT,
    )
    assert not sliced["x"].is_contiguous() and not sliced["initial_state"].is_contiguous()
    y, h = ssd.ssd_scan(**sliced, chunk_size=16)
    y_ref, h_ref = ssd.ssd_scan(**args, chunk_size=16)
    assert_close(y, y_ref, TOLERANCE[torch.float32], "y")
    assert_close(h, h_ref, TOLERANCE[torch.float32], "final_state")


def test_ssd_scan_rejects_heads_not_multiple_of_groups():
    args = make_inputs(1, 4, 3, 2, 2, 4)
    with pytest.raises(ValueError, match="H = 3 must be a multiple of the number of groups G = 2"):
        ssd.ssd_scan(**args, chunk_size=4)


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_ssd_scan_gradients_match_loop(dtype):
    args = make_inputs(2, 37, 4, 4, 2, 4, features=FEATURES, dtype=dtype)
    weights = torch.randn(2, 37, 4, 4, generator=torch.Generator().manual_seed(1), dtype=dtype)

    def grads(fn, inputs):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in inputs.items()}
        y, h = fn(**leaves)
        ((y * weights.to(y.dtype)).sum() + h.sum()).backward()
        return {k: v.grad for k, v in leaves.items()}

    got = grads(lambda **a: ssd.ssd_scan(**a, chunk_size=8), args)
    expected = grads(loop_ssd, double(args))
    for name in args:
        assert_close(got[name], expected[name], 10 * TOLERANCE[dtype], f"grad of {name}")


def test_ssd_scan_gradcheck():
    args = make_inputs(1, 5, 2, 2, 1, 2, features=FEATURES, dtype=torch.float64)
    names = list(args)

    def fn(*tensors):
        return ssd.ssd_scan(**dict(zip(names, tensors, strict=True)), chunk_size=2)

    leaves = tuple(args[k].requires_grad_() for k in names)
    assert torch.autograd.gradcheck(fn, leaves)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefill", [1, 17, 32, 40])
def test_prefill_then_steps_equals_full_scan(prefill):
    seqlen = 41
    args = make_inputs(2, seqlen, 4, 8, 2, 4, features=FEATURES)
    y_full, h_full = ssd.ssd_scan(**args, chunk_size=16)

    per_time = ("x", "dt", "B", "C")
    first = {k: (v[:, :prefill] if k in per_time else v) for k, v in args.items()}
    y_pre, state = ssd.ssd_scan(**first, chunk_size=16)
    ys = [y_pre]
    for t in range(prefill, seqlen):
        y_t, state = ssd.ssd_step(state, **{k: args[k][:, t] for k in per_time}, A=args["A"], D=args["D"])
        ys.append(y_t[:, None])
    assert_close(torch.cat(ys, dim=1), y_full, TOLERANCE[torch.float32], "y")
    assert_close(state, h_full, TOLERANCE[torch.float32], "final_state")


def test_ssd_step_matches_loop_from_any_state():
    args = make_inputs(3, 1, 6, 4, 3, 8, features=FEATURES)
    step = {k: args[k][:, 0] for k in ("x", "dt", "B", "C")}
    y, h = ssd.ssd_step(args["initial_state"], **step, A=args["A"], D=args["D"])
    y_ref, h_ref = loop_ssd(**double(args))
    assert_close(y, y_ref[:, 0], TOLERANCE[torch.float32], "y")
    assert_close(h, h_ref, TOLERANCE[torch.float32], "new_state")


def test_mamba2_cache_empty():
    cache = ssd.Mamba2Cache.empty(batch=3, nheads=4, headdim=8, ngroups=2, d_state=16, d_conv=4, dtype=torch.bfloat16)
    assert cache.conv_state.shape == (3, 4 * 8 + 2 * 2 * 16, 3) and cache.conv_state.dtype == torch.bfloat16
    assert cache.ssm_state.shape == (3, 4, 8, 16) and cache.ssm_state.dtype == torch.float32
    assert not cache.conv_state.any() and not cache.ssm_state.any()


# ---------------------------------------------------------------------------------------------
# Packaging
# ---------------------------------------------------------------------------------------------


def test_imports_only_torch_and_stdlib():
    """The file is copied verbatim into generated packages, so it may import nothing else."""
    tree = ast.parse(Path(ssd.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # a sibling runtime file, copied beside this one
                assert node.module == "ssm", f"relative import of {node.module!r} on line {node.lineno}"
                continue
            imported.add(node.module.split(".")[0])
    assert imported <= {"torch", "math", "typing", "dataclasses"}, f"unexpected imports: {sorted(imported)}"


def test_torch_export_with_dynamic_batch():
    class Mixer(torch.nn.Module):
        def forward(self, x, dt, A, B, C, D, initial_state):
            return ssd.ssd_scan(x, dt, A, B, C, 16, D, initial_state)

    names = ("x", "dt", "A", "B", "C", "D", "initial_state")
    per_batch = {"x", "dt", "B", "C", "initial_state"}
    batch = torch.export.Dim("batch")
    dynamic = tuple({0: batch} if k in per_batch else None for k in names)
    args = make_inputs(2, 40, 4, 8, 2, 4, features=FEATURES)
    program = torch.export.export(Mixer(), tuple(args[k] for k in names), dynamic_shapes=dynamic)

    args = make_inputs(3, 40, 4, 8, 2, 4, features=FEATURES, seed=1)  # another batch size
    y, h = program.module()(*(args[k] for k in names))
    y_ref, h_ref = ssd.ssd_scan(**args, chunk_size=16)
    assert_close(y, y_ref, TOLERANCE[torch.float64], "y")
    assert_close(h, h_ref, TOLERANCE[torch.float64], "final_state")


def test_torch_export_with_dynamic_batch_and_length():
    """One program for every batch size and length: a symbolic T is cut into chunks of the full chunk_size, and the
    state passes between chunks in one quadratic-in-chunks einsum, with no loop whose count depends on T."""

    class Mixer(torch.nn.Module):
        def forward(self, x, dt, A, B, C, D, initial_state):
            return ssd.ssd_scan(x, dt, A, B, C, 16, D, initial_state)

    names = ("x", "dt", "A", "B", "C", "D", "initial_state")
    per_time = {"x", "dt", "B", "C"}
    batch, length = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("length", min=1, max=200)
    dynamic = tuple({0: batch, 1: length} if k in per_time else {0: batch} if k == "initial_state" else None for k in names)
    args = make_inputs(2, 40, 4, 8, 2, 4, features=FEATURES)
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):  # as archgen export traces: sizes >= 2
        program = torch.export.export(Mixer(), tuple(args[k] for k in names), dynamic_shapes=dynamic)

    for b, t in ((1, 1), (3, 15), (1, 48), (2, 200)):
        args = make_inputs(b, t, 4, 8, 2, 4, features=FEATURES, seed=t)
        y, h = program.module()(*(args[k] for k in names))
        y_ref, h_ref = ssd.ssd_scan(**args, chunk_size=16)
        assert_close(y, y_ref, TOLERANCE[torch.float32], f"y, B={b} T={t}")
        assert_close(h, h_ref, TOLERANCE[torch.float32], f"final_state, B={b} T={t}")
