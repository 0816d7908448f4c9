"""archgen_kernels.selective_scan (kernels/selective_scan.py) against a plain loop over time: the output, the final
state and every gradient.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set below before triton is imported),
which is slow, so shapes are small — but ragged: T not a multiple of the chunk, D not a multiple of BLOCK_D, N not a
power of two. The reference runs in float64 on the very values the kernel got (half-precision inputs included),
so every difference is the kernel's.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
pytest.importorskip("triton")

from archgen_kernels import selective_scan as ss
from archgen_kernels import triton_support
from templates.runtime import ssm
from tests.kernels.gpu_configs import gpu_choices
from tests.numerics import TOLERANCE, assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"



# Half-precision outputs and input gradients are rounded once to their dtype (TOLERANCE[dtype]); everything inside
# runs in float32, where the kernel sums the parameter gradients over chunks and batch in another order than the
# reference, so float32 results get ten times the table's float32 tolerance.
FLOAT32_TOL = 10 * TOLERANCE[torch.float32]
OPTIONAL = ("D", "z", "delta_bias", "initial_state")
GRADIENTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(batch, seqlen, dim, dstate, *, features=OPTIONAL, dtype=torch.float32, delta_mean=-1.0, a_max=16.0,
                seed=0):
    """Mamba-like inputs: Δ = softplus(delta) around 0.3 by default, A = -exp(.) in [-a_max, -1]; u, delta, z, B, C in
    `dtype`, the parameters (A, D, delta_bias) and the initial state in float32 as the Mamba block passes them."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, mean=0.0, dt=torch.float32):
        return (torch.randn(*shape, generator=g) * scale + mean).to(dt).to(DEVICE)

    args = dict(
        u=randn(batch, seqlen, dim, dt=dtype),
        delta=randn(batch, seqlen, dim, scale=0.5, mean=delta_mean, dt=dtype),
        A=-torch.exp(torch.rand(dim, dstate, generator=g) * math.log(a_max)).to(DEVICE),
        B=randn(batch, seqlen, dstate, dt=dtype),
        C=randn(batch, seqlen, dstate, dt=dtype),
    )
    optional = dict(
        D=randn(dim),
        z=randn(batch, seqlen, dim, dt=dtype),
        delta_bias=randn(dim, scale=0.5),
        initial_state=randn(batch, dim, dstate),
    )
    args.update({k: v for k, v in optional.items() if k in features})
    return args


def run_and_differentiate(fn, args, grad_y, grad_state, **kwargs):
    """fn(**args) -> (y, final_state); backward of Σ y·grad_y + Σ final·grad_state. Returns y, final, {name: grad}."""
    leaves = {k: v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v for k, v in args.items()}
    y, state = fn(**leaves, **kwargs)
    loss = 0.0
    if grad_y is not None:
        loss = loss + (y.double() * grad_y).sum()
    if grad_state is not None:
        loss = loss + (state.double() * grad_state).sum()
    loss.backward()
    return y, state, {k: v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor)}


def check_against_reference(args, chunk, tol, *, grad_y=True, grad_state=True, seed=1, **flags):
    """Kernel (through the custom op and its autograd) against the float64 loop: y, final state, every gradient."""
    g = torch.Generator().manual_seed(seed)
    batch, seqlen, dim = args["u"].shape
    gy = torch.randn(batch, seqlen, dim, generator=g, dtype=torch.float64).to(DEVICE) if grad_y else None
    gh = torch.randn(batch, dim, args["A"].shape[1], generator=g, dtype=torch.float64).to(DEVICE) if grad_state else None

    y, state, grads = run_and_differentiate(ss.selective_scan, args, gy, gh, chunk_size=chunk, **flags)
    as_double = {k: v.double() for k, v in args.items()}
    y_ref, state_ref, grads_ref = run_and_differentiate(ss.selective_scan_reference, as_double, gy, gh, **flags)

    assert y.dtype == args["u"].dtype and state.dtype == torch.float32
    assert_close(y, y_ref, tol, "y")
    assert_close(state, state_ref, tol, "final_state")
    for name in GRADIENTS:
        if name in args:
            assert grads[name].dtype == args[name].dtype, f"d{name} is {grads[name].dtype}, its input {args[name].dtype}"
            expected = grads_ref[name] if grads_ref[name] is not None else torch.zeros_like(args[name])  # unused input
            assert_close(grads[name], expected, tol, f"d{name}")


# (batch, seqlen, dim, dstate, chunk, BLOCK_D, optional inputs)
CASES = [
    pytest.param(2, 11, 6, 4, 4, 4, OPTIONAL, id="B2-T11-D6-N4-L4-BD4-all"),
    pytest.param(1, 9, 5, 16, 4, 4, (), id="B1-T9-D5-N16-L4-BD4-plain"),
    pytest.param(2, 5, 3, 4, 8, 4, ("z",), id="B2-T5-D3-N4-L8-BD4-z"),  # T < chunk: one partial chunk
    pytest.param(1, 8, 8, 4, 4, 8, ("D", "delta_bias"), id="B1-T8-D8-N4-L4-BD8-D-bias"),  # exact multiples
    pytest.param(2, 7, 6, 5, 4, 4, ("initial_state",), id="B2-T7-D6-N5-L4-BD4-h0"),  # N padded to 8
    pytest.param(1, 1, 4, 4, 4, 4, OPTIONAL, id="B1-T1-D4-N4-L4-BD4-all"),  # one position
    pytest.param(1, 37, 5, 4, ss.CHUNK_SIZE, 4, OPTIONAL, id=f"B1-T37-D5-N4-L{ss.CHUNK_SIZE}-BD4-all"),  # default chunk
    pytest.param(1, 37, 5, 4, 16, 4, OPTIONAL, id="B1-T37-D5-N4-L16-BD4-all"),  # one chunk a forward tile
    # a warp's 32 channels a block, as on the GPU (the sums over channels scattered over the lanes, each held twice)
    pytest.param(1, 9, 40, 16, 4, 32, OPTIONAL, id="B1-T9-D40-N16-L4-BD32-all"),
]


@pytest.fixture
def block_d(monkeypatch):
    """Set the interpreter's config: BLOCK_D, whether the forward prefetches, how many steps' states the backward
    holds and into how many time segments it splits the sequence (on a GPU the autotuner chooses). The tuners hold the
    config they were made with: patch theirs."""

    def set_block(width, *, prefetch=1, sub=4, segments=1, steps=0, tile=ss.FORWARD_TILE):
        config = {"BLOCK_D": width, "num_warps": 4, "PREFETCH": prefetch, "SUB": sub, "SEGMENTS": segments,
                  "STEPS": steps, "TILE": tile}
        monkeypatch.setattr(ss.FORWARD_TUNER, "interpreter_config", config)
        monkeypatch.setattr(ss.BACKWARD_TUNER, "interpreter_config", config)

    return set_block


@pytest.mark.parametrize("batch,seqlen,dim,dstate,chunk,width,features", CASES)
def test_matches_reference_float32(batch, seqlen, dim, dstate, chunk, width, features, block_d):
    block_d(width)
    args = make_inputs(batch, seqlen, dim, dstate, features=features, seed=seqlen * 100 + dim)
    check_against_reference(args, chunk, FLOAT32_TOL)


@pytest.mark.usefixtures("poisoned_empty")
@pytest.mark.parametrize("choice", gpu_choices(2))
@pytest.mark.parametrize(("batch", "seqlen", "dim", "dstate", "dtype", "h200_segments"),
                         [(1, 13, 37, 5, torch.float32, True), (1, 6, 20, 16, torch.bfloat16, False)],
                         ids=["fp32-B1-T13-D37-N5-H200-segments", "bf16-B1-T6-D20-N16"])
def test_every_gpu_config(gpu_configs, monkeypatch, choice, batch, seqlen, dim, dstate, dtype, h200_segments):
    """Forward (stepping or not, tiles of 4-16 steps) and backward (16-64 channels, 2 or 4 steps held) at each config
    a GPU can launch (gpu_configs.py), every optional input, outputs poisoned: 37 channels (64-channel blocks are
    candidates only above 32), 13 or 6 steps (partial chunks and tiles), N 5; the backward split into time segments
    as an H200 splits a small grid (one a chunk), and unsplit as on the interpreter."""
    if h200_segments:
        monkeypatch.setattr(ss, "_segments_to_fill", lambda device, warps: max(1, 132 * ss.RESIDENT_WARPS_PER_SM // warps))
    gpu_configs.choose(choice)
    args = make_inputs(batch, seqlen, dim, dstate, dtype=dtype, seed=seqlen + dim)
    with gpu_configs.named():
        check_against_reference(args, ss.CHUNK_SIZE, FLOAT32_TOL if dtype == torch.float32 else TOLERANCE[dtype])


@pytest.mark.parametrize("batch,seqlen,dim,dstate,chunk,width,features", [CASES[0], CASES[2], CASES[5], CASES[6]])
def test_without_prefetch_matches_reference(batch, seqlen, dim, dstate, chunk, width, features, block_d):
    """The forward loading each chunk's inputs in its own iteration (PREFETCH 0, what older tuning tables pin)."""
    block_d(width, prefetch=0)
    args = make_inputs(batch, seqlen, dim, dstate, features=features, seed=seqlen * 100 + dim)
    check_against_reference(args, chunk, FLOAT32_TOL)


@pytest.mark.parametrize("prefetch,tile", [(1, 4), (0, 16)], ids=["prefetch-tile4", "tile16"])
@pytest.mark.parametrize("batch,seqlen,dim,dstate,chunk,width,features", [CASES[0], CASES[2], CASES[4], CASES[7]])
def test_stepping_forward_matches_reference(batch, seqlen, dim, dstate, chunk, width, features, prefetch, tile,
                                            block_d):
    """The forward one step after the other (STEPS), its checkpoints feeding the backward; tiles of one chunk or of
    several (a tile is never shorter than the chunk)."""
    block_d(width, prefetch=prefetch, steps=1, tile=tile)
    args = make_inputs(batch, seqlen, dim, dstate, features=features, seed=seqlen * 100 + dim + 1)
    check_against_reference(args, chunk, FLOAT32_TOL)


@pytest.mark.parametrize("batch,seqlen,dim,dstate,chunk,width,features", [CASES[0], CASES[2], CASES[6], CASES[7]])
def test_backward_holding_two_steps_matches_reference(batch, seqlen, dim, dstate, chunk, width, features, block_d):
    """The backward holding 2 steps' states at once (SUB 2, its config on the H200)."""
    block_d(width, sub=2)
    args = make_inputs(batch, seqlen, dim, dstate, features=features, seed=seqlen * 100 + dim)
    check_against_reference(args, chunk, FLOAT32_TOL)


# (batch, seqlen, dim, dstate, chunk, segments, SUB, optional inputs)
SEGMENT_CASES = [
    # 10 chunks in 3 segments of 4, 4 and 2, the last chunk partial; every input and both state gradients
    pytest.param(2, 37, 6, 4, 4, 3, 4, OPTIONAL, id="B2-T37-D6-N4-L4-S3-all"),
    # 3 chunks asked into 4 segments (run as 3 of one chunk each), the backward recomputing within a chunk
    pytest.param(1, 23, 5, 5, 8, 4, 2, ("z", "delta_bias"), id="B1-T23-D5-N5-L8-S4-SUB2-z-bias"),
    # 2 segments without the gate or the skip, the final state's gradient carried across both
    pytest.param(1, 16, 4, 16, 4, 2, 4, ("initial_state",), id="B1-T16-D4-N16-L4-S2-h0"),
]


@pytest.mark.parametrize("batch,seqlen,dim,dstate,chunk,segments,sub,features", SEGMENT_CASES)
def test_backward_in_time_segments_matches_reference(batch, seqlen, dim, dstate, chunk, segments, sub, features,
                                                     block_d):
    """The backward split into time segments run in parallel, each started from the adjoint the pre-pass carries
    back to its right end."""
    block_d(4, sub=sub, segments=segments)
    args = make_inputs(batch, seqlen, dim, dstate, features=features, seed=seqlen * 100 + dim + segments)
    check_against_reference(args, chunk, FLOAT32_TOL)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_matches_reference_half(dtype, block_d):
    """u, delta, z, B, C in half precision (as in a bf16 model); the reference gets the same rounded values."""
    block_d(4)
    args = make_inputs(2, 9, 6, 4, dtype=dtype, seed=7)
    check_against_reference(args, 4, TOLERANCE[dtype])


def test_without_softplus(block_d):
    block_d(4)
    args = make_inputs(1, 10, 5, 4, delta_mean=0.5, seed=3)  # Δ = delta + bias used as is: keep it positive
    args["delta"], args["delta_bias"] = args["delta"].abs(), args["delta_bias"].abs()
    check_against_reference(args, 4, FLOAT32_TOL, delta_softplus=False)


def test_extreme_decays(block_d):
    """Δ·A down to about -1000: decays underflow to 0, the softplus takes its linear branch; nothing may turn NaN."""
    block_d(4)
    args = make_inputs(2, 9, 5, 4, delta_mean=6.0, a_max=200.0, seed=5)
    check_against_reference(args, 4, FLOAT32_TOL)


def test_strided_inputs(block_d):
    """Views as the Mamba block hands them over: u, z from one projection, B, C from another, delta transposed
    (time contiguous), A, D, the initial state with non-unit strides."""
    block_d(4)
    batch, seqlen, dim, dstate = 2, 10, 6, 4
    g = torch.Generator().manual_seed(11)
    xz = torch.randn(batch, seqlen, 2 * dim, generator=g).to(DEVICE)
    x_dbl = torch.randn(batch, seqlen, 3 + 2 * dstate, generator=g).to(DEVICE)
    args = dict(
        u=xz[..., :dim],
        delta=(torch.randn(batch, dim, seqlen, generator=g) * 0.5 - 1).to(DEVICE).transpose(1, 2),
        A=-torch.exp(torch.rand(dstate, dim, generator=g) * 2.7).to(DEVICE).t(),
        B=x_dbl[..., 3 : 3 + dstate],
        C=x_dbl[..., 3 + dstate :],
        D=torch.randn(2 * dim, generator=g).to(DEVICE)[::2],
        z=xz[..., dim:],
        delta_bias=torch.randn(dim, generator=g).to(DEVICE) * 0.5,
        initial_state=torch.randn(batch, dstate, dim, generator=g).to(DEVICE).transpose(1, 2),
    )
    assert not any(args[k].is_contiguous() for k in ("u", "delta", "A", "B", "C", "D", "z", "initial_state"))
    check_against_reference(args, 4, FLOAT32_TOL)


def test_gradient_of_final_state_only(block_d):
    """y unused: its gradient reaches the backward as None."""
    block_d(4)
    args = make_inputs(2, 6, 5, 4, seed=13)
    check_against_reference(args, 4, FLOAT32_TOL, grad_y=False)


def test_backward_without_saved_checkpoints(block_d):
    """Inference writes no checkpoints; a backward through such an output writes them by running the forward again."""
    block_d(4)
    args = make_inputs(1, 7, 5, 4, seed=17)
    positional = [args.get(k) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    y, _, checkpoints = ss.selective_scan_op(*positional, True, args["initial_state"], False, 4)
    assert checkpoints.shape == (1, 0, 5, 4)

    def op_without_checkpoints(**kw):
        y, state, _ = ss.selective_scan_op(*[kw.get(k) for k in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")],
                                           True, kw["initial_state"], False, 4)
        return y, state

    gy = torch.randn_like(y, dtype=torch.float64)
    _, _, grads = run_and_differentiate(op_without_checkpoints, args, gy, None)
    _, _, grads_ref = run_and_differentiate(ss.selective_scan_reference, {k: v.double() for k, v in args.items()},
                                            gy, None)
    for name in GRADIENTS:
        assert_close(grads[name], grads_ref[name], FLOAT32_TOL, f"d{name}")


def test_empty_sequence():
    """T = 0: no output, the initial state passes through, and so does its gradient."""
    args = make_inputs(2, 0, 3, 4, seed=19)
    ones = torch.ones(2, 3, 4, dtype=torch.float64, device=DEVICE)
    y, state, grads = run_and_differentiate(ss.selective_scan, args, None, ones)
    assert y.shape == (2, 0, 3)
    assert torch.equal(state, args["initial_state"])
    assert torch.equal(grads["initial_state"], ones.float())


# ---------------------------------------------------------------------------------------------------------------
# The reference, tied to the product's reference path
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("features", [(), OPTIONAL], ids=["plain", "all"])
@pytest.mark.parametrize("softplus", [True, False], ids=["softplus", "linear"])
def test_reference_matches_runtime_selective_scan(features, softplus):
    """selective_scan_reference (a loop over time) against templates/runtime/ssm.py's chunked scan, which every
    generated package runs: same outputs and gradients, in float64."""
    args = make_inputs(2, 37, 6, 4, features=features, dtype=torch.float64, seed=23)
    args = {k: v.double() for k, v in args.items()}
    if not softplus:
        args["delta"] = args["delta"].abs()
        if "delta_bias" in args:
            args["delta_bias"] = args["delta_bias"].abs()
    g = torch.Generator().manual_seed(29)
    gy = torch.randn(2, 37, 6, generator=g, dtype=torch.float64).to(DEVICE)
    gh = torch.randn(2, 6, 4, generator=g, dtype=torch.float64).to(DEVICE)
    y, state, grads = run_and_differentiate(ss.selective_scan_reference, args, gy, gh, delta_softplus=softplus)
    y_rt, state_rt, grads_rt = run_and_differentiate(ssm.selective_scan, args, gy, gh, delta_softplus=softplus,
                                                     chunk_size=8)
    assert_close(y, y_rt, 1e-10, "y")
    assert_close(state, state_rt, 1e-10, "final_state")
    for name, grad in grads.items():
        assert_close(grad, grads_rt[name], 1e-10, f"d{name}")


# ---------------------------------------------------------------------------------------------------------------
# The operator: fake implementation, autograd registration, export
# ---------------------------------------------------------------------------------------------------------------


def test_opcheck(block_d):
    """torch.library.opcheck: schema, fake implementation against the real one, autograd registration, and
    AOTAutograd (what torch.compile runs: the backward traced on fake tensors through the backward op)."""
    block_d(4)
    args = make_inputs(1, 5, 3, 4, seed=31)
    leaves = {k: v.requires_grad_() for k, v in args.items()}
    forward_args = (leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"], leaves["z"],
                    leaves["delta_bias"], True, leaves["initial_state"], True, 4)
    torch.library.opcheck(ss.selective_scan_op, forward_args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                      "test_aot_dispatch_dynamic"))

    _, _, checkpoints = ss.selective_scan_op(*[a.detach() if isinstance(a, torch.Tensor) else a for a in forward_args])
    plain = {k: v.detach() for k, v in args.items()}
    backward_args = (torch.randn(1, 5, 3, device=DEVICE), torch.randn(1, 3, 4, device=DEVICE), plain["u"], plain["delta"],
                     plain["A"], plain["B"], plain["C"], plain["D"], plain["z"], plain["delta_bias"], True,
                     plain["initial_state"], checkpoints, 4)
    torch.library.opcheck(ss.selective_scan_backward_op, backward_args, test_utils=("test_schema", "test_faketensor"))


def test_export_is_one_node_with_dynamic_length():
    """torch.export sees one archgen_v1.selective_scan node (traced on fake tensors: no kernel runs)."""

    class Scan(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.A = torch.nn.Parameter(-torch.rand(6, 4, device=DEVICE) - 0.5)
            self.D = torch.nn.Parameter(torch.ones(6, device=DEVICE))

        def forward(self, u, delta, B, C, z):
            return ss.selective_scan(u, delta, self.A, B, C, self.D, z)

    batch, seqlen = 2, 9
    inputs = tuple(torch.randn(batch, seqlen, width, device=DEVICE) for width in (6, 6, 4, 4, 6))
    seq = torch.export.Dim("seq", min=2, max=4096)
    with torch.no_grad():
        program = torch.export.export(Scan(), inputs, dynamic_shapes=({1: seq}, {1: seq}, {1: seq}, {1: seq}, {1: seq}))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert [t for t in targets if "selective_scan" in t] == ["archgen_v1.selective_scan.default"], targets


# ---------------------------------------------------------------------------------------------------------------
# Guards and the autotune space
# ---------------------------------------------------------------------------------------------------------------


def test_refuses_cpu_tensors_outside_the_interpreter(monkeypatch):
    monkeypatch.setattr(triton_support, "interpreting", lambda: False)  # what triton_on_cpu() asks
    monkeypatch.setattr(ss, "interpreting", lambda: False)  # what the input checks ask
    args = {k: v.cpu() for k, v in make_inputs(1, 3, 2, 4).items()}
    with pytest.raises(RuntimeError, match="needs CUDA tensors.*ops/ssm.py"):
        ss.selective_scan(**args)


def test_input_errors_name_the_argument():
    args = make_inputs(1, 3, 2, 4, features=())
    with pytest.raises(ValueError, match=r"B must have shape \(1, 3, 4\)"):
        ss.selective_scan_forward(**{**args, "B": args["B"][:, :, :3]})
    with pytest.raises(TypeError, match="delta is torch.float64"):
        ss.selective_scan_forward(**{**args, "delta": args["delta"].double()})
    with pytest.raises(ValueError, match="chunk_size must be a power of two, got 12"):
        ss.selective_scan_forward(**args, chunk_size=12)


@pytest.mark.parametrize("dim,widest", [(3, 16), (24, 32), (4096, 32)])
def test_forward_autotune_space_is_pruned_to_the_width(dim, widest):
    kept = ss.candidates(ss.FORWARD_TUNER, dim)
    assert max(c["BLOCK_D"] for c in kept) == widest
    assert all(c["PREFETCH"] for c in kept)


@pytest.mark.parametrize("dim,widest", [(3, 32), (24, 32), (100, 64), (4096, 64)])
def test_backward_autotune_space_is_pruned_to_the_width(dim, widest):
    kept = ss.candidates(ss.BACKWARD_TUNER, dim)
    assert max(c["BLOCK_D"] for c in kept) == widest
    assert all(c["BLOCK_D"] == 32 * c["num_warps"] for c in kept)  # one channel per lane


def test_backward_splits_time_only_where_the_grid_leaves_the_gpu_idle(monkeypatch):
    """Without SEGMENTS in its config the backward splits time into as many segments as the GPU's resident warps
    hold grids of its size: a batch-1 grid is split, the anchor's (B 8, 1024 warps) runs whole, and without a GPU
    (the interpreter) nothing is split."""
    properties = type("Properties", (), {"multi_processor_count": 132})()  # an H200
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: properties)
    cuda = torch.device("cuda")
    assert ss._segments_to_fill(cuda, 128) == 132 * ss.RESIDENT_WARPS_PER_SM // 128 == 8
    assert ss._segments_to_fill(cuda, 100) == 10  # Hymba+'s 3200 channels at batch 1
    assert ss._segments_to_fill(cuda, 1024) == 1
    assert ss._segments_to_fill(cuda, 4096) == 1
    assert ss._segments_to_fill(torch.device("cpu"), 128) == 1


def test_autotuner_keeps_the_fastest_and_skips_failing_configs(monkeypatch):
    """The tuning logic with a stand-in for triton.testing.do_bench (which needs a GPU)."""
    import triton.testing

    def fake_do_bench(fn, **kwargs):
        fn()
        return 1.0 / launched[-1]["BLOCK_D"] + launched[-1]["num_warps"] * 1e-3  # wider and fewer warps is faster

    def launch(config):
        launched.append(config)
        if config["BLOCK_D"] == 64:
            raise RuntimeError("out of resources: registers")

    launched = []
    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    monkeypatch.setattr(triton_support, "interpreting", lambda: False)  # as on a GPU: every candidate is timed
    monkeypatch.setattr(triton_support, "RUNTIME_TUNING", True)  # the tests' GPU runs turn it off (conftest)
    narrow, fastest = {"BLOCK_D": 16, "num_warps": 4, "PREFETCH": 1}, {"BLOCK_D": 32, "num_warps": 8, "PREFETCH": 1}
    too_wide = {"BLOCK_D": 64, "num_warps": 8, "PREFETCH": 1}
    tuner = triton_support.Autotuner("test.forward", [narrow, fastest, too_wide], ss.INTERPRETER_CONFIG)
    key = ss.shape_key(4096, 16, 16, torch.bfloat16)
    assert key == "D4096-N16-L16-bfloat16"
    assert tuner.tune(key, launch, ss.candidates(tuner, 4096)) == fastest
    assert tuner.timings[key]["BLOCK_D=64,num_warps=8,PREFETCH=1"].startswith("RuntimeError: out of resources")
    assert tuner.chosen == {key: fastest}

    pinned = triton_support.Autotuner("test.forward", ss.FORWARD_CONFIGS, ss.INTERPRETER_CONFIG)
    pinned.pin({key: {"BLOCK_D": 32, "num_warps": 8}})
    assert pinned.chosen == {key: {"BLOCK_D": 32, "num_warps": 8}}


def test_first_call_tunes_then_reuses_the_choice(monkeypatch):
    """The launchers' tuning path, run in the interpreter with a stand-in timer: every candidate runs on the call's
    own tensors (the backward's partial sums sized by each launch for its block), and the result with the chosen
    (wider) block still matches the reference."""
    import triton.testing

    monkeypatch.setattr(triton_support, "interpreting", lambda: False)  # as on a GPU: tune, not INTERPRETER_CONFIG
    monkeypatch.setattr(triton_support, "RUNTIME_TUNING", True)  # as archgen_kernels runs (the tests' GPU runs do not)
    monkeypatch.setattr(ss, "triton_on_cpu", lambda: True)  # ...and still launch the kernels on these CPU tensors
    monkeypatch.setattr(ss, "_check_inputs", lambda *args: None)  # which would refuse CPU tensors outside it
    monkeypatch.setattr(ss, "FORWARD_TUNER", triton_support.Autotuner("test.forward", ss.FORWARD_CONFIGS, {}))
    monkeypatch.setattr(ss, "BACKWARD_TUNER", triton_support.Autotuner("test.backward", ss.BACKWARD_CONFIGS, {}))
    fake_ms = iter(range(1000, 0, -1))  # each later candidate is faster: the last (widest, most warps) wins

    def fake_do_bench(fn, **kwargs):
        fn()
        return float(next(fake_ms))

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    args = make_inputs(1, 6, 40, 4, seed=37)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")

    def op(**kw):
        y, state, _ = ss.selective_scan_op(*[kw[k] for k in names], True, kw["initial_state"], True, 4)
        return y, state

    gy = torch.randn(1, 6, 40, dtype=torch.float64, device=DEVICE)
    y, _, grads = run_and_differentiate(op, args, gy, None)
    y_ref, _, grads_ref = run_and_differentiate(ss.selective_scan_reference, {k: v.double() for k, v in args.items()},
                                                gy, None)
    key = ss.shape_key(40, 4, 4, torch.float32)  # every config of both: none is wider than 64 channels
    training = ss.shape_key(40, 4, 4, torch.float32, checkpoints=True)  # the forward under autograd writes them
    assert training == key + "-checkpoints"
    assert ss.tuned_configs() == {"forward": {training: ss.FORWARD_CONFIGS[-1]},
                                  "backward": {key: ss.BACKWARD_CONFIGS[-1]}}
    assert ss.BACKWARD_CONFIGS[-1]["BLOCK_D"] > ss.BACKWARD_CONFIGS[0]["BLOCK_D"]  # the partial sums' sizing is tested
    assert len(ss.FORWARD_TUNER.timings[training]) == len(ss.FORWARD_CONFIGS)
    assert len(ss.BACKWARD_TUNER.timings[key]) == len(ss.BACKWARD_CONFIGS)
    assert_close(y, y_ref, FLOAT32_TOL, "y")
    for name in GRADIENTS:
        assert_close(grads[name], grads_ref[name], FLOAT32_TOL, f"d{name}")

    # A second call reuses the choice: no candidate is timed again.
    op(**args)
    assert len(ss.FORWARD_TUNER.timings[training]) == len(ss.FORWARD_CONFIGS)
    assert len(ss.BACKWARD_TUNER.timings[key]) == len(ss.BACKWARD_CONFIGS)


def test_backward_untuned_without_runtime_tuning(monkeypatch):
    """As in a generated package (no tuning at run time): an untuned bucket runs the tuner's default config, under
    the interpreter its interpreter config, narrower here than every candidate; the backward's per-block partial sums
    must be sized for the block that runs (they were once sized for the narrowest candidate, and overflowed)."""
    narrow = {"BLOCK_D": 8, "num_warps": 4, "SUB": 4}
    monkeypatch.setattr(triton_support, "RUNTIME_TUNING", False)
    monkeypatch.setattr(triton_support, "UNTUNED", {})  # the warning comes once per process: make this its first
    monkeypatch.setattr(ss, "FORWARD_TUNER", triton_support.Autotuner("test.forward", ss.FORWARD_CONFIGS, narrow))
    monkeypatch.setattr(ss, "BACKWARD_TUNER", triton_support.Autotuner("test.backward", ss.BACKWARD_CONFIGS, narrow))
    args = make_inputs(1, 5, 40, 4, seed=41)
    with pytest.warns(RuntimeWarning, match="no tuned config"):
        check_against_reference(args, 4, FLOAT32_TOL)
    ran = narrow if triton_support.interpreting() else ss.candidates(ss.BACKWARD_TUNER, 40)[0]  # a GPU: the first
    assert ss.BACKWARD_TUNER.defaulted == {ss.shape_key(40, 4, 4, torch.float32): ran}
