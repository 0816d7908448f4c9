"""kernels/gated_delta_rule.py against a plain loop over time: the output, the final state and every gradient.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before triton is imported),
slowly, so shapes are small but ragged: T not a multiple of the chunk and T = 1, value heads not a power of two and
grouped over fewer key heads, head dims below or between the 16-wide tiles. Every buffer the kernels write starts as
NaN (torch.empty is poisoned), so an element a kernel forgets shows up. The reference runs in float64 on the very
values the kernel got.
"""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
pytest.importorskip("triton")

from archgen_kernels import gated_delta_rule as gdr
from templates.runtime import gated_delta as runtime_gated_delta
from tests.kernels.gpu_configs import gpu_choices
from tests.numerics import relative_norm_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned_empty")  # tests/kernels/conftest.py

# Relative error ‖kernel − reference‖ / ‖reference‖ per input dtype (issue 10's bars: float32 1e-5, bf16 1e-2).
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}




def make_inputs(batch, seqlen, nheads, nv_heads, dk, dv, *, dtype=torch.float32, seed=0, initial_state=True,
                decay_scale=1.0):
    """The layer's operands: unit q and k, g = log α = −decay_scale·softplus(.) ≤ 0 (float32, as the layer passes
    it), β = sigmoid(.); q, k, v and β in `dtype`."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    args = {
        "q": F.normalize(randn(batch, seqlen, nheads, dk), dim=-1).to(dtype),
        "k": F.normalize(randn(batch, seqlen, nheads, dk), dim=-1).to(dtype),
        "v": randn(batch, seqlen, nv_heads, dv).to(dtype),
        "g": -decay_scale * F.softplus(randn(batch, seqlen, nv_heads) - 1.0),
        "beta": torch.sigmoid(randn(batch, seqlen, nv_heads)).to(dtype),
        "initial_state": randn(batch, nv_heads, dk, dv) if initial_state else None,
    }
    return {name: t.to(DEVICE) if t is not None else None for name, t in args.items()}


def check(args, chunk, dtype):
    o, final = gdr.gated_delta_rule(**args, chunk_size=chunk)
    wide = {name: t.double() if t is not None else None for name, t in args.items()}
    o_ref, final_ref = gdr.gated_delta_rule_reference(**wide)
    assert o.dtype == args["v"].dtype and final.dtype == torch.float32
    assert not o.isnan().any() and not final.isnan().any(), "NaN: an element the kernels did not write"
    errors = {"o": relative_norm_error(o, o_ref), "final_state": relative_norm_error(final, final_ref)}
    bad = {name: err for name, err in errors.items() if not err <= TOL[dtype]}
    assert not bad, f"relative errors above {TOL[dtype]:.0e}: {bad} (all: {errors})"


@pytest.mark.parametrize(
    ("batch", "seqlen", "nheads", "nv_heads", "dk", "dv", "chunk"),
    [
        # 3 chunks, a ragged tail; 3 value heads read 1 key head
        pytest.param(2, 37, 1, 3, 16, 16, 16, id="B2-T37-H1-HV3-K16-V16-L16"),
        pytest.param(1, 70, 2, 6, 20, 12, 32, id="B1-T70-H2-HV6-K20-V12-L32"),  # head dims between the 16-wide tiles
        pytest.param(1, 150, 3, 3, 8, 40, 64, id="B1-T150-H3-HV3-K8-V40-L64"),  # K below a tile, V over 2 blocks
    ],
)
def test_matches_reference_float32(batch, seqlen, nheads, nv_heads, dk, dv, chunk):
    check(make_inputs(batch, seqlen, nheads, nv_heads, dk, dv, seed=seqlen), chunk, torch.float32)


def test_length_one_without_initial_state():
    check(make_inputs(2, 1, 2, 2, 16, 16, seed=3, initial_state=False), 16, torch.float32)


def test_strong_decay_stays_finite():
    """log α down to about −40 per step: within a chunk exp(c_t − c_s) spans e^−1000, and nothing overflows."""
    check(make_inputs(1, 40, 1, 2, 16, 16, seed=4, decay_scale=30.0), 32, torch.float32)


def test_write_strengths_up_to_two():
    """β = 2·sigmoid(.) (allow_neg_eigval): I − β k kᵀ may reflect, and T⁻¹ is still exact."""
    args = make_inputs(1, 40, 1, 2, 16, 16, seed=8)
    args["beta"] = 2 * args["beta"]
    check(args, 32, torch.float32)


def test_matches_reference_bfloat16():
    check(make_inputs(2, 45, 1, 2, 32, 16, dtype=torch.bfloat16, seed=5), 16, torch.bfloat16)


def test_strided_values_as_the_layer_passes_them():
    """v a view into the convolution's output (q, k, v concatenated), as the generated layer hands it over."""
    args = make_inputs(1, 20, 1, 2, 16, 16, seed=6)
    qkv = torch.cat([args["q"].flatten(2), args["k"].flatten(2), args["v"].flatten(2)], dim=-1)
    args["v"] = qkv[..., 32:].view(1, 20, 2, 16)
    assert not args["v"].is_contiguous()
    check(args, 16, torch.float32)


def test_reference_matches_runtime_gated_delta_rule():
    """The loop reference computes what templates/runtime/gated_delta.py's chunked gated_delta_rule computes."""
    args = {name: t.double() for name, t in make_inputs(2, 23, 2, 4, 5, 3, seed=7).items()}
    o, final = gdr.gated_delta_rule_reference(**args)
    o_rt, final_rt = runtime_gated_delta.gated_delta_rule(**args, chunk_size=8)
    assert relative_norm_error(o, o_rt) < 1e-12 and relative_norm_error(final, final_rt) < 1e-12


def test_empty_sequence_passes_the_state_through():
    args = make_inputs(1, 0, 1, 2, 16, 16, seed=9)
    o, final = gdr.gated_delta_rule(**args, chunk_size=16)
    assert o.shape == (1, 0, 2, 16) and torch.equal(final, args["initial_state"])


def test_opcheck():
    """Schema and the fake implementation against the real one, eager and under AOT dispatch (torch.compile)."""
    args = make_inputs(1, 5, 1, 2, 16, 16, seed=11)
    forward_args = (args["q"], args["k"], args["v"], args["g"], args["beta"], 0.25, args["initial_state"], 16)
    torch.library.opcheck(gdr.gated_delta_rule_op, forward_args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def check_gradients(args, chunk, dtype, *, with_final_state=True):
    """Every gradient of `gated_delta_rule` (through the op's autograd: the backward kernels) against autograd through
    the loop reference in float64 on the same values, for a random dO (and dS for the final state)."""
    gen = torch.Generator().manual_seed(99)
    inputs = {name: t.detach().requires_grad_() if t is not None else None for name, t in args.items()}
    wide = {name: t.detach().double().requires_grad_() if t is not None else None for name, t in args.items()}
    do = torch.randn(args["v"].shape, generator=gen).to(DEVICE)
    dfinal = torch.randn(args["v"].shape[0], args["v"].shape[2], args["q"].shape[3], args["v"].shape[3],
                         generator=gen).to(DEVICE)
    o, final = gdr.gated_delta_rule(**inputs, chunk_size=chunk)
    o_ref, final_ref = gdr.gated_delta_rule_reference(**wide)
    loss = (o.float() * do).sum() + ((final * dfinal).sum() if with_final_state else 0)
    loss_ref = (o_ref * do.double()).sum() + ((final_ref * dfinal.double()).sum() if with_final_state else 0)
    loss.backward()
    loss_ref.backward()
    errors = {}
    for name, t in inputs.items():
        if t is None:
            continue
        assert t.grad is not None and t.grad.dtype == t.dtype, f"d{name}: {t.grad}"
        assert not t.grad.isnan().any(), f"d{name} has NaN: an element the kernels did not write"
        errors[f"d{name}"] = relative_norm_error(t.grad, wide[name].grad)
    bad = {name: err for name, err in errors.items() if not err <= TOL[dtype]}
    assert not bad, f"relative errors above {TOL[dtype]:.0e}: {bad} (all: {errors})"


@pytest.mark.parametrize(
    ("batch", "seqlen", "nheads", "nv_heads", "dk", "dv", "chunk"),
    [
        pytest.param(2, 37, 1, 3, 16, 16, 16, id="B2-T37-H1-HV3-K16-V16-L16"),
        pytest.param(1, 70, 2, 6, 20, 12, 32, id="B1-T70-H2-HV6-K20-V12-L32"),
        pytest.param(1, 150, 3, 3, 8, 40, 64, id="B1-T150-H3-HV3-K8-V40-L64"),
    ],
)
def test_gradients_match_reference_float32(batch, seqlen, nheads, nv_heads, dk, dv, chunk):
    check_gradients(make_inputs(batch, seqlen, nheads, nv_heads, dk, dv, seed=seqlen), chunk, torch.float32)


@pytest.mark.parametrize("choice", gpu_choices(2))
@pytest.mark.parametrize(
    ("batch", "seqlen", "nheads", "nv_heads", "dk", "dv", "chunk", "dtype"),
    [pytest.param(1, 70, 1, 2, 20, 40, 64, torch.float32, id="fp32-B1-T70-H1-HV2-K20-V40-L64"),
     pytest.param(1, 21, 1, 2, 16, 12, 16, torch.bfloat16, id="bf16-B1-T21-H1-HV2-K16-V12-L16")],
)
def test_every_gpu_config(gpu_configs, choice, batch, seqlen, nheads, nv_heads, dk, dv, chunk, dtype):
    """Outputs, final state and every gradient at each config a GPU can launch (gpu_configs.py: either WY kernel,
    blocks of 16-128 over head dims of 12-40, GROUPED or not), 2 value heads on one key head, ragged tails, chunks
    of 64 and of 16 (below every block of 32-64)."""
    gpu_configs.choose(choice)
    args = make_inputs(batch, seqlen, nheads, nv_heads, dk, dv, dtype=dtype, seed=seqlen)
    with gpu_configs.named():
        check(args, chunk, dtype)
        check_gradients(args, chunk, dtype)


@pytest.mark.parametrize("tiled", [0, 1], ids=["T-inverse-by-doubling", "T-inverse-from-16-tiles"])
@pytest.mark.parametrize("chunk", [32, 64], ids=lambda chunk: f"L{chunk}")
def test_either_wy_kernel_gives_the_reference(tiled, chunk, monkeypatch):
    """The WY tuner picks between _chunk_wy_kernel and _chunk_wy_tiled_kernel: both give the reference's outputs and
    gradients (the tiled one also at L = 32, half its tiles identity steps)."""
    monkeypatch.setattr(gdr.TUNERS["wy"], "interpreter_config", {**gdr.INTERPRETER_CONFIGS["wy"], "TILED": tiled})
    check(make_inputs(1, 150, 2, 4, 24, 20, seed=chunk), chunk, torch.float32)
    check_gradients(make_inputs(1, 100, 1, 2, 16, 16, seed=chunk + 1), chunk, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_sum_adds_each_key_heads_value_heads_in_float32(dtype):
    """dq and dk per value head (B, T, HV, K) summed over the HV / H value heads of each key head, rounded once."""
    gen = torch.Generator().manual_seed(31)
    dq_heads, dk_heads = (torch.randn(2, 5, 6, 20, generator=gen).to(dtype).to(DEVICE) for _ in range(2))
    dq, dk = (torch.empty(2, 5, 2, 20, dtype=torch.bfloat16, device=DEVICE) for _ in range(2))
    gdr._sum_over_groups(dq_heads, dk_heads, dq, dk)
    for got, heads in ((dq, dq_heads), (dk, dk_heads)):
        expected = heads.float().view(2, 5, 2, 3, 20).sum(3).to(torch.bfloat16)
        assert torch.equal(got, expected)


@pytest.mark.parametrize("grouped", [1, 0], ids=["summed-in-the-chunk-kernel", "summed-by-group-sum-kernel"])
def test_grouped_key_heads_get_the_sum_of_their_value_heads_gradients(grouped, monkeypatch):
    """dq and dk of a key head read by 3 value heads (GROUPED: the chunk kernel adds each value head's share in turn;
    else _group_sum_kernel sums per-value-head copies) against the same run with the key head repeated, one copy per
    value head, summed over the copies."""
    monkeypatch.setattr(gdr.TUNERS["chunk_backward"], "interpreter_config",
                        {**gdr.INTERPRETER_CONFIGS["chunk_backward"], "GROUPED": grouped})
    args = make_inputs(1, 40, 2, 6, 16, 16, seed=21)
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(args["v"].shape, generator=gen).to(DEVICE)
    rest = (args["v"], args["g"], args["beta"], 0.25, args["initial_state"], 16)
    dq, dk, *others = gdr.gated_delta_rule_backward(do, None, args["q"], args["k"], *rest)
    repeated = [t.repeat_interleave(3, dim=2) for t in (args["q"], args["k"])]
    dq_each, dk_each, *others_each = gdr.gated_delta_rule_backward(do, None, *repeated, *rest)
    for got, each in ((dq, dq_each), (dk, dk_each)):
        assert got.shape == args["q"].shape
        assert relative_norm_error(got, each.view(1, 40, 2, 3, 16).sum(3)) < 1e-6
    for got, want in zip(others, others_each, strict=True):  # dv, dg, dβ, dS_0: per value head, unchanged
        assert relative_norm_error(got, want) < 1e-6


def test_gradients_at_length_one_without_final_state_gradient():
    check_gradients(make_inputs(2, 1, 2, 2, 16, 16, seed=3), 16, torch.float32, with_final_state=False)


def test_gradients_without_initial_state():
    """Over 2 chunks (at T = 1 without a state, dg is exactly 0 and has no relative error to measure)."""
    check_gradients(make_inputs(1, 23, 1, 2, 16, 16, seed=15, initial_state=False), 16, torch.float32)


def test_gradients_under_strong_decay_and_write_strengths_up_to_two():
    """exp(c_t − c_s) down to e^−1000 in a chunk, and β up to 2: the backward's exponents stay masked and finite."""
    args = make_inputs(1, 40, 1, 2, 16, 16, seed=4, decay_scale=30.0)
    args["beta"] = 2 * args["beta"]
    check_gradients(args, 32, torch.float32)


def test_gradients_bfloat16():
    check_gradients(make_inputs(2, 45, 1, 2, 32, 16, dtype=torch.bfloat16, seed=5), 16, torch.bfloat16)


def test_backward_reference_is_autograd_through_the_reference():
    """gated_delta_rule_backward_reference (the backward op's CPU path) against the kernels' backward."""
    args = make_inputs(1, 19, 1, 2, 16, 16, seed=14)
    gen = torch.Generator().manual_seed(1)
    do = torch.randn(args["v"].shape, generator=gen).to(DEVICE)
    dfinal = torch.randn(args["initial_state"].shape, generator=gen).to(DEVICE)
    positional = (args["q"], args["k"], args["v"], args["g"], args["beta"], 0.25, args["initial_state"], 16)
    kernel = gdr.gated_delta_rule_backward(do, dfinal, *positional)
    reference = gdr.gated_delta_rule_backward_reference(do, dfinal, *positional)
    for name, got, want in zip(("dq", "dk", "dv", "dg", "dbeta", "dinitial_state"), kernel, reference, strict=True):
        assert relative_norm_error(got, want) < TOL[torch.float32], name


def test_backward_without_initial_state_has_no_state_gradient():
    args = make_inputs(1, 5, 1, 1, 16, 16, seed=12, initial_state=False)
    *_, dinit = gdr.gated_delta_rule_backward(torch.ones_like(args["v"]), None, args["q"], args["k"], args["v"],
                                              args["g"], args["beta"], 0.25, None, 16)
    assert dinit is None


def test_backward_opcheck():
    """The backward op's schema and fake against the real one, and the forward op's autograd registration."""
    args = make_inputs(1, 5, 1, 2, 16, 16, seed=11)
    gen = torch.Generator().manual_seed(2)
    do = torch.randn(args["v"].shape, generator=gen).to(DEVICE)
    backward_args = (do, None, args["q"], args["k"], args["v"], args["g"], args["beta"], 0.25, args["initial_state"], 16)
    torch.library.opcheck(gdr.gated_delta_rule_backward_op, backward_args, test_utils=("test_schema", "test_faketensor"))
    inputs = [args[name].requires_grad_() for name in ("q", "k", "v", "g", "beta", "initial_state")]
    torch.library.opcheck(gdr.gated_delta_rule_op, (*inputs[:5], 0.25, inputs[5], 16),
                          test_utils=("test_schema", "test_autograd_registration"))


def test_export_is_one_node_with_dynamic_length():
    """torch.export sees one archgen_v1.gated_delta_rule node (traced on fake tensors: no kernel runs)."""

    class Rule(torch.nn.Module):
        def forward(self, q, k, v, g, beta):
            return gdr.gated_delta_rule(q, k, v, g, beta, chunk_size=16)

    args = make_inputs(2, 9, 1, 2, 16, 16, initial_state=False)
    inputs = tuple(args[name] for name in ("q", "k", "v", "g", "beta"))
    seq = torch.export.Dim("seq", min=2, max=4096)
    with torch.no_grad():
        program = torch.export.export(Rule(), inputs, dynamic_shapes=tuple({1: seq} for _ in inputs))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert [t for t in targets if "gated_delta" in t] == ["archgen_v1.gated_delta_rule.default"], targets


def test_decomposition_is_the_runtime_reference():
    """What ONNX export lowers the op to: the chunked runtime reference, with the same results as the kernels."""
    args = make_inputs(1, 21, 1, 2, 16, 16, seed=13)
    (decomposed,) = gdr.decomposition(runtime_gated_delta.gated_delta_rule, max_seqlen=64).values()
    o, final = decomposed(args["q"], args["k"], args["v"], args["g"], args["beta"], 0.25, args["initial_state"], 16)
    o_kernel, final_kernel = gdr.gated_delta_rule(**args, scale=0.25, chunk_size=16)
    assert relative_norm_error(o_kernel, o) < TOL[torch.float32] and relative_norm_error(final_kernel, final) < TOL[torch.float32]


def test_cpu_tensors_outside_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("ARCHGEN_TRITON_ON_CPU", "0")
    args = make_inputs(1, 3, 1, 1, 16, 16)
    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match="reference"):
            gdr.gated_delta_rule(**args)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"chunk_size": 24}, "power of two"), ({"chunk_size": 128}, "from 16 to 64"),
     ({"g": torch.zeros(1, 4, 3)}, "g must have shape"), ({"v": torch.zeros(1, 4, 3, 16)}, "multiple"),
     ({"q": torch.zeros(1, 4, 2, 16, dtype=torch.float64)}, "float64")],
)
def test_input_errors_name_the_problem(change, message):
    args = make_inputs(1, 4, 2, 2, 16, 16, initial_state=False)
    args.update({name: value.to(DEVICE) if isinstance(value, torch.Tensor) else value for name, value in change.items()})
    if "q" in change:
        args["k"] = args["k"].double()
    with pytest.raises((ValueError, TypeError), match=message):
        gdr.gated_delta_rule_forward(args["q"], args["k"], args["v"], args["g"], args["beta"], 0.25,
                                     chunk_size=args.get("chunk_size", 16))


def test_build_time_tuning_hook_tunes_every_kernel():
    """autotune(...) as `archgen build --autotune` calls it: inside a tuning session each kernel tunes its bucket."""
    from archgen_kernels import triton_support

    config = {"n_heads": 1, "head_dim": 16, "n_v_heads": 2, "head_v_dim": 16, "chunk_size": 16}
    with triton_support.tuning_session() as table:
        gdr.autotune(config, {}, 1, 20, torch.bfloat16, DEVICE)
        tuned = {entry["kernel"] for entry in table()["entries"]}
    assert tuned == {f"gated_delta_rule.{kernel}" for kernel in gdr.TUNERS}
    assert set(gdr.TUNERS) == {"wy", "state", "output", "intra_chunk_dpseudo", "state_backward", "chunk_backward"}


def test_float32_intermediates_are_the_more_accurate_form():
    """W, U, u and the chunk states in bfloat16 (the op's choice for bf16 inputs, as fla) or in float32 (the
    launcher's option): both within the bar, float32 near the bf16 output's own rounding."""
    args = make_inputs(2, 45, 1, 2, 32, 16, dtype=torch.bfloat16, seed=5)
    o_ref, final_ref = gdr.gated_delta_rule_reference(**{name: t.double() for name, t in args.items()})
    rounding = relative_norm_error(o_ref.to(torch.bfloat16), o_ref)
    errors = {}
    for intermediates in (None, torch.float32):
        o, final = gdr.gated_delta_rule_forward(**args, scale=32**-0.5, chunk_size=16, intermediates=intermediates)
        errors[intermediates] = {"o": relative_norm_error(o, o_ref), "final_state": relative_norm_error(final, final_ref)}
    assert max(errors[None].values()) <= 5e-3, errors
    assert errors[torch.float32]["o"] <= 1.2 * rounding and errors[torch.float32]["final_state"] <= 1e-5, errors


def step_inputs(batch, nheads, nv_heads, dk, dv, *, dtype=torch.float32, seed=0):
    """One position of make_inputs, and a state to start from."""
    args = make_inputs(batch, 1, nheads, nv_heads, dk, dv, dtype=dtype, seed=seed)
    step = {name: t[:, 0] for name, t in args.items() if name != "initial_state"}
    return {"state": args["initial_state"], **step}


@pytest.mark.parametrize(("nheads", "nv_heads", "dk", "dv", "dtype"), [
    pytest.param(1, 3, 20, 40, torch.float32, id="H1-HV3-K20-V40-float32"),  # head dims off the tiles, V over 2 blocks
    pytest.param(2, 4, 16, 16, torch.bfloat16, id="H2-HV4-K16-V16-bfloat16"),
])
def test_decode_step_matches_the_runtime_step(nheads, nv_heads, dk, dv, dtype):
    args = step_inputs(2, nheads, nv_heads, dk, dv, dtype=dtype, seed=dk)
    before = args["state"].clone()
    o, new_state = gdr.gated_delta_step(**args)
    o_ref, state_ref = runtime_gated_delta.gated_delta_step(**{name: t.double() for name, t in args.items()})
    assert torch.equal(args["state"], before), "the step wrote into its input state"
    assert o.dtype == args["v"].dtype and new_state.dtype == torch.float32
    errors = {"o": relative_norm_error(o, o_ref), "new_state": relative_norm_error(new_state, state_ref)}
    assert max(errors.values()) <= TOL[dtype], errors


def test_decode_step_reference_and_lowering_are_the_runtime_step():
    args = step_inputs(2, 1, 2, 16, 16, seed=14)
    o_rt, state_rt = runtime_gated_delta.gated_delta_step(**args, scale=0.25)
    o_ref, state_ref = gdr.gated_delta_step_reference(**args, scale=0.25)
    (lowered,) = gdr.decomposition(runtime_gated_delta.gated_delta_step, max_seqlen=64).values()
    o_low, state_low = lowered(args["state"], args["q"], args["k"], args["v"], args["g"], args["beta"], 0.25)
    for o, state in ((o_ref, state_ref), (o_low, state_low)):
        assert relative_norm_error(o, o_rt) < 1e-6 and relative_norm_error(state, state_rt) < 1e-6


def test_decode_step_opcheck():
    args = step_inputs(1, 1, 2, 16, 16, seed=15)
    torch.library.opcheck(gdr.gated_delta_step_op, (*args.values(), 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
