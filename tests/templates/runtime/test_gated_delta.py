"""templates/runtime/gated_delta.py against a plain loop over time written here, independent of the chunked algorithm.

The loop applies the published recurrence literally, S_t = α_t (I − β_t k_t k_tᵀ) S_{t-1} + β_t k_t v_tᵀ,
o_t = scale · S_tᵀ q_t, one position at a time in float64, with no pseudo-values, WY form or chunks.
"""

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from templates.runtime import gated_delta as gd
from tests.numerics import assert_close

# Worst relative error allowed, max|actual - expected| / max|expected|, per dtype of the inputs.
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-2}
PER_TIME = ("q", "k", "v", "g", "beta")


def loop_gated_delta(q, k, v, g, beta, scale=None, initial_state=None):
    """The gated delta rule one position at a time; value head h reads key head h // (HV / H)."""
    batch, seqlen, nheads, dk = q.shape
    nv_heads, dv = v.shape[-2:]
    q, k = (t.repeat_interleave(nv_heads // nheads, dim=2) for t in (q, k))
    scale = dk**-0.5 if scale is None else scale
    eye = torch.eye(dk, dtype=v.dtype)
    S = torch.zeros(batch, nv_heads, dk, dv, dtype=v.dtype) if initial_state is None else initial_state
    outputs = []
    for t in range(seqlen):
        k_t, b_t = k[:, t, :, :, None], beta[:, t, :, None, None]  # (B, HV, K, 1), (B, HV, 1, 1)
        transition = torch.exp(g[:, t])[:, :, None, None] * (eye - b_t * k_t @ k_t.mT)  # (B, HV, K, K)
        S = transition @ S + b_t * k_t @ v[:, t, :, None, :]
        outputs.append(scale * (q[:, t, :, None, :] @ S).squeeze(-2))
    return torch.stack(outputs, dim=1), S


def make_inputs(batch, seqlen, nheads, nv_heads, dk, dv, *, h0=True, dtype=torch.float32, g_scale=1.0, seed=0):
    """GDN-like inputs: unit q and k, g = −exp(A_log)·softplus(.) ≤ 0, β = sigmoid(.)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    a_rate = torch.rand(nv_heads, generator=gen, dtype=torch.float64)  # exp(A_log), per value head
    args = {
        "q": gd.l2_normalize(randn(batch, seqlen, nheads, dk)),
        "k": gd.l2_normalize(randn(batch, seqlen, nheads, dk)),
        "v": randn(batch, seqlen, nv_heads, dv),
        "g": -g_scale * a_rate * F.softplus(randn(batch, seqlen, nv_heads)),
        "beta": torch.sigmoid(randn(batch, seqlen, nv_heads)),
    }
    if h0:
        args["initial_state"] = randn(batch, nv_heads, dk, dv)
    return {name: t.to(dtype) for name, t in args.items()}


def double(args):
    return {name: t.double() for name, t in args.items()}


# (batch, seqlen, H, HV, K, V, chunk)
SHAPES = [
    pytest.param(2, 63, 2, 2, 8, 8, 16, id="B2-T63-H2-K8-V8-L16"),
    pytest.param(1, 1, 2, 2, 4, 6, 64, id="B1-T1-H2-K4-V6-L64"),
    pytest.param(2, 130, 2, 6, 8, 4, 64, id="B2-T130-H2-HV6-K8-V4-L64"),
    pytest.param(1, 64, 3, 3, 16, 12, 64, id="B1-T64-H3-K16-V12-L64"),
    pytest.param(3, 9, 1, 3, 5, 3, 1, id="B3-T9-H1-HV3-K5-V3-L1"),
    pytest.param(2, 50, 1, 1, 6, 7, 7, id="B2-T50-H1-K6-V7-L7"),
]


# ---------------------------------------------------------------------------------------------
# gated_delta_rule
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("h0", [False, True], ids=["zero-state", "h0"])
@pytest.mark.parametrize("batch,seqlen,nheads,nv_heads,dk,dv,chunk", SHAPES)
def test_chunked_matches_loop(batch, seqlen, nheads, nv_heads, dk, dv, chunk, h0):
    args = make_inputs(batch, seqlen, nheads, nv_heads, dk, dv, h0=h0)
    o, S = gd.gated_delta_rule(**args, chunk_size=chunk)
    o_ref, S_ref = loop_gated_delta(**double(args))
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    assert_close(o, o_ref, TOL[torch.float32], "o")
    assert_close(S, S_ref, TOL[torch.float32], "final_state")


@pytest.mark.parametrize("batch,seqlen,nheads,nv_heads,dk,dv,chunk", SHAPES)
def test_chunked_float64(batch, seqlen, nheads, nv_heads, dk, dv, chunk):
    args = make_inputs(batch, seqlen, nheads, nv_heads, dk, dv, dtype=torch.float64)
    o, S = gd.gated_delta_rule(**args, chunk_size=chunk, scale=0.3)
    o_ref, S_ref = loop_gated_delta(**args, scale=0.3)
    assert o.dtype == torch.float64 and S.dtype == torch.float64
    assert_close(o, o_ref, TOL[torch.float64], "o")
    assert_close(S, S_ref, TOL[torch.float64], "final_state")


def test_bfloat16_inputs():
    """Low-precision inputs: o comes back in bfloat16, the state in float32, the math in float32."""
    args = make_inputs(2, 40, 2, 4, 8, 8, dtype=torch.bfloat16)
    args["initial_state"] = args["initial_state"].float()
    o, S = gd.gated_delta_rule(**args, chunk_size=16)
    o_ref, S_ref = loop_gated_delta(**double(args))
    assert o.dtype == torch.bfloat16 and S.dtype == torch.float32
    assert_close(o, o_ref, TOL[torch.bfloat16], "o")
    assert_close(S, S_ref, TOL[torch.float32], "final_state")


@pytest.mark.parametrize("chunk", [1, 3, 16, 64, 1000])
def test_result_does_not_depend_on_chunk_size(chunk):
    args = make_inputs(2, 50, 2, 2, 4, 4, dtype=torch.float64)
    o, S = gd.gated_delta_rule(**args, chunk_size=chunk)
    o_ref, S_ref = gd.gated_delta_rule(**args, chunk_size=50)
    assert_close(o, o_ref, TOL[torch.float64], "o")
    assert_close(S, S_ref, TOL[torch.float64], "final_state")


@pytest.mark.parametrize(
    "g_scale", [pytest.param(1e3, id="alpha~0"), pytest.param(1e-6, id="alpha~1")]
)
def test_extreme_gates_are_finite_and_exact(g_scale):
    """α near 0 (g down to −thousands: every segment's decay underflows to exactly 0) and α within 1e-6 of 1."""
    args = make_inputs(2, 130, 2, 2, 8, 4, g_scale=g_scale)
    o, S = gd.gated_delta_rule(**args, chunk_size=64)
    o_ref, S_ref = loop_gated_delta(**double(args))
    assert_close(o, o_ref, TOL[torch.float32], "o")
    assert_close(S, S_ref, TOL[torch.float32], "final_state")

    leaves = {name: t.requires_grad_() for name, t in args.items()}
    o, S = gd.gated_delta_rule(**leaves, chunk_size=64)
    (o.square().sum() + S.square().sum()).backward()
    for name, leaf in leaves.items():
        assert torch.isfinite(leaf.grad).all(), f"grad of {name} has non-finite values"


def test_repeated_keys_without_decay():
    """The same key at every position with β = 1 and α = 1: A is the all-ones strictly lower matrix, whose powers
    reach C(63, 31) ≈ 1e18 in a chunk of 64. A Neumann-series inverse cancels catastrophically there; block doubling
    stays exact (the inverse is bidiagonal), and each write replaces the last: S = k v_{T-1}ᵀ."""
    args = make_inputs(1, 128, 1, 1, 8, 4, h0=False)
    args["k"] = args["k"][:, :1].expand_as(args["k"]).contiguous()
    args["g"] = torch.zeros_like(args["g"])
    args["beta"] = torch.ones_like(args["beta"])
    o, S = gd.gated_delta_rule(**args, chunk_size=64)
    o_ref, S_ref = loop_gated_delta(**double(args))
    assert_close(o, o_ref, TOL[torch.float32], "o")
    assert_close(S, S_ref, TOL[torch.float32], "final_state")
    assert_close(S, args["k"][:, -1, :, :, None] @ args["v"][:, -1, :, None, :], TOL[torch.float32], "S = k vᵀ")


def test_mixed_gates_within_a_chunk():
    """Huge decays early in a chunk, tiny ones after: short segments late in the chunk must stay exact (a difference
    of prefix sums, cumsum[t] − cumsum[s] ≈ −4000 − (−4000), would lose their digits)."""
    args = make_inputs(1, 64, 2, 2, 4, 4)
    g = torch.full_like(args["g"], -1e-3)
    g[:, :16] = -250.0
    args["g"] = g
    o, S = gd.gated_delta_rule(**args, chunk_size=64)
    o_ref, S_ref = loop_gated_delta(**double(args))
    assert_close(o, o_ref, TOL[torch.float32], "o")
    assert_close(S, S_ref, TOL[torch.float32], "final_state")


def test_accepts_channel_slices():
    """In the layer, q, k and v are slices of one conv output (non-contiguous views)."""
    args = make_inputs(2, 33, 2, 4, 4, 6)
    qkv = torch.cat([args["q"].flatten(2), args["k"].flatten(2), args["v"].flatten(2)], dim=-1)
    q, k, v = torch.split(qkv, [8, 8, 24], dim=-1)
    sliced = dict(args, q=q.unflatten(-1, (2, 4)), k=k.unflatten(-1, (2, 4)), v=v.unflatten(-1, (4, 6)))
    assert not sliced["q"].is_contiguous()
    o, S = gd.gated_delta_rule(**sliced, chunk_size=16)
    o_ref, S_ref = gd.gated_delta_rule(**args, chunk_size=16)
    assert_close(o, o_ref, TOL[torch.float32], "o")
    assert_close(S, S_ref, TOL[torch.float32], "final_state")


def test_rejects_value_heads_not_multiple_of_key_heads():
    args = make_inputs(1, 4, 2, 3, 4, 4)
    with pytest.raises(ValueError, match="HV a multiple of the H = 2 heads of q"):
        gd.gated_delta_rule(**args)


def test_rejects_mismatched_state():
    args = make_inputs(1, 4, 2, 2, 4, 6)
    args["initial_state"] = args["initial_state"].mT  # (B, HV, V, K): the other layout
    with pytest.raises(ValueError, match=r"initial_state must have shape \(1, 2, 4, 6\)"):
        gd.gated_delta_rule(**args)


def test_l2_normalize():
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.bfloat16)
    y = gd.l2_normalize(x)
    assert y.dtype == torch.bfloat16
    assert_close(y.float(), torch.tensor([[0.6, 0.8], [0.0, 0.0]]), 1e-2, "l2_normalize")


# ---------------------------------------------------------------------------------------------
# Gradients
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_gradients_match_loop(dtype):
    """Every input's gradient, through both the output and the final state, against autograd through the loop."""
    args = make_inputs(2, 37, 1, 2, 4, 3, dtype=dtype)
    gen = torch.Generator().manual_seed(1)
    o_weights = torch.randn(2, 37, 2, 3, generator=gen, dtype=dtype)
    S_weights = torch.randn(2, 2, 4, 3, generator=gen, dtype=dtype)

    def grads(fn, inputs):
        leaves = {name: t.detach().clone().requires_grad_() for name, t in inputs.items()}
        o, S = fn(**leaves)
        ((o * o_weights.to(o.dtype)).sum() + (S * S_weights.to(S.dtype)).sum()).backward()
        return {name: t.grad for name, t in leaves.items()}

    got = grads(lambda **a: gd.gated_delta_rule(**a, chunk_size=8), args)
    expected = grads(loop_gated_delta, double(args))
    for name in args:
        assert_close(got[name], expected[name], 10 * TOL[dtype], f"grad of {name}")


def test_gradcheck():
    args = make_inputs(1, 5, 1, 2, 3, 2, dtype=torch.float64)
    names = list(args)

    def fn(*tensors):
        return gd.gated_delta_rule(**dict(zip(names, tensors, strict=True)), chunk_size=2)

    assert torch.autograd.gradcheck(fn, tuple(args[name].requires_grad_() for name in names))


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("prefill", [1, 17, 32, 40])
def test_prefill_then_steps_equals_full_forward(prefill):
    seqlen = 41
    args = make_inputs(2, seqlen, 2, 4, 8, 4)
    o_full, S_full = gd.gated_delta_rule(**args, chunk_size=16)

    first = {name: (t[:, :prefill] if name in PER_TIME else t) for name, t in args.items()}
    o_pre, state = gd.gated_delta_rule(**first, chunk_size=16)
    outputs = [o_pre]
    for t in range(prefill, seqlen):
        o_t, state = gd.gated_delta_step(state, **{name: args[name][:, t] for name in PER_TIME})
        outputs.append(o_t[:, None])
    assert_close(torch.cat(outputs, dim=1), o_full, TOL[torch.float32], "o")
    assert_close(state, S_full, TOL[torch.float32], "final_state")


def test_step_matches_loop_from_any_state():
    args = make_inputs(3, 1, 2, 6, 4, 8)
    o, S = gd.gated_delta_step(args["initial_state"], **{name: args[name][:, 0] for name in PER_TIME}, scale=0.7)
    o_ref, S_ref = loop_gated_delta(**double(args), scale=0.7)
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    assert_close(o, o_ref[:, 0], TOL[torch.float32], "o")
    assert_close(S, S_ref, TOL[torch.float32], "new_state")


def test_cache_empty():
    cache = gd.GatedDeltaCache.empty(
        batch=3, nheads=2, nv_heads=4, head_k_dim=8, head_v_dim=16, d_conv=4, dtype=torch.bfloat16
    )
    assert cache.conv_state.shape == (3, 2 * 2 * 8 + 4 * 16, 3) and cache.conv_state.dtype == torch.bfloat16
    assert cache.recurrent_state.shape == (3, 4, 8, 16) and cache.recurrent_state.dtype == torch.float32
    assert not cache.conv_state.any() and not cache.recurrent_state.any()


# ---------------------------------------------------------------------------------------------
# Packaging and export
# ---------------------------------------------------------------------------------------------


def test_imports_only_torch_and_stdlib():
    """The file is copied verbatim into generated packages, so it may import nothing else but ssm.py, which every
    package with a gated_deltanet layer carries (the layer's convolution is ssm.py's causal_conv1d)."""
    tree = ast.parse(Path(gd.__file__).read_text())
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


class Mixer(torch.nn.Module):
    def forward(self, q, k, v, g, beta, initial_state):
        return gd.gated_delta_rule(q, k, v, g, beta, initial_state=initial_state, chunk_size=16, max_seqlen=200)


NAMES = ("q", "k", "v", "g", "beta", "initial_state")


def dynamic_batch_and_length():
    batch, length = torch.export.Dim("batch", min=1, max=8), torch.export.Dim("length", min=1, max=200)
    return tuple({0: batch} if name == "initial_state" else {0: batch, 1: length} for name in NAMES)


def test_torch_export_with_dynamic_batch_and_length():
    """One program for every batch size and length up to max_seqlen: the chunk length is the full chunk_size and the
    state passes between chunks in a fixed number of doubling rounds, with no loop whose count depends on T."""
    args = make_inputs(2, 40, 2, 4, 8, 4)
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):  # as archgen export traces: sizes >= 2
        program = torch.export.export(Mixer(), tuple(args[n] for n in NAMES), dynamic_shapes=dynamic_batch_and_length())

    for b, t in ((1, 1), (3, 15), (1, 48), (2, 200)):
        args = make_inputs(b, t, 2, 4, 8, 4, seed=t)
        o, S = program.module()(*(args[n] for n in NAMES))
        o_ref, S_ref = loop_gated_delta(**double(args))
        assert_close(o, o_ref, TOL[torch.float32], f"o, B={b} T={t}")
        assert_close(S, S_ref, TOL[torch.float32], f"final_state, B={b} T={t}")


def test_symbolic_length_without_max_seqlen_is_an_error():
    class Unbounded(torch.nn.Module):
        def forward(self, q, k, v, g, beta):
            return gd.gated_delta_rule(q, k, v, g, beta, chunk_size=16)

    args = make_inputs(2, 40, 2, 2, 4, 4, h0=False)
    length = torch.export.Dim("length", min=2, max=100)
    with pytest.raises(Exception, match="needs max_seqlen when the sequence length is symbolic"):
        dynamic = tuple({1: length} for _ in PER_TIME)
        torch.export.export(Unbounded(), tuple(args[n] for n in PER_TIME), dynamic_shapes=dynamic)


@pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")  # torch.onnx's own deprecated internals
def test_onnx_export_runs_in_onnxruntime_at_other_lengths(tmp_path):
    """The decomposed op has no control flow and maps to ONNX operators (no triangular solve, no loop)."""
    from archgen.export.onnx_export import onnx_session

    args = make_inputs(2, 40, 2, 4, 8, 4)
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        program = torch.export.export(Mixer(), tuple(args[n] for n in NAMES), dynamic_shapes=dynamic_batch_and_length())
    onnx_program = torch.onnx.export(program, (), dynamo=True, opset_version=18, verbose=False)
    onnx_program.save(str(tmp_path / "gdn.onnx"))
    ops = {node.op_type for node in onnx_program.model_proto.graph.node}
    assert not ops & {"If", "Loop", "Scan"}, f"control flow in the exported op: {sorted(ops & {'If', 'Loop', 'Scan'})}"
    session = onnx_session(tmp_path / "gdn.onnx")

    for b, t in ((1, 1), (3, 17), (2, 130)):
        args = make_inputs(b, t, 2, 4, 8, 4, seed=t)
        feeds = {i.name: args[n].numpy() for i, n in zip(session.get_inputs(), NAMES, strict=True)}
        o, S = (torch.from_numpy(x) for x in session.run(None, feeds))
        o_ref, S_ref = loop_gated_delta(**double(args))
        assert_close(o, o_ref, 1e-4, f"o through onnxruntime, B={b} T={t}")
        assert_close(S, S_ref, 1e-4, f"final_state through onnxruntime, B={b} T={t}")
