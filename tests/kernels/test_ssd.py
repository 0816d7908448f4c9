"""kernels/ssd.py against a plain loop over time: the output, the final state and every gradient.

Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set by tests/conftest.py),
slowly, so shapes are small but ragged: T not a multiple of the chunk and T = 1, heads not a power of two, head_dim
and d_state below the 16-wide tiles, several groups. Every buffer the kernels write starts as NaN (torch.empty is
poisoned), so an element a kernel forgets shows up. The reference runs in float64 on the very values the kernel got.
"""

import math

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from archgen_kernels import ssd
from templates.runtime import ssd as runtime_ssd
from tests.kernels.gpu_configs import GpuChoice, per_case
from tests.numerics import relative_norm_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned_empty")  # kernel-written buffers start as NaN


# Relative error ‖kernel - reference‖ / ‖reference‖ per input dtype (the bars: float32 1e-5, bf16 1e-2).
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}
GRADIENTS = ("x", "dt", "A", "B", "C", "D", "initial_state", "dt_bias")


def make_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, *, dtype=torch.float32, seed=0, optional=True):
    """Mamba-2-like inputs: raw dt around -1 (Δ = softplus(dt + bias) ≈ 0.3), A = -exp(.) in [-8, -0.5]; x, B, C in
    `dtype`, dt and the parameters in float32 as the Mamba-2 block passes them."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0, mean=0.0, dt=torch.float32):
        return (torch.randn(*shape, generator=g) * scale + mean).to(dt).to(DEVICE)

    args = {
        "x": randn(batch, seqlen, nheads, headdim, dt=dtype),
        "dt": randn(batch, seqlen, nheads, scale=0.5, mean=-1.0),
        "A": -torch.exp(torch.rand(nheads, generator=g) * math.log(16.0)).mul(0.5).to(DEVICE),
        "B": randn(batch, seqlen, ngroups, dstate, dt=dtype),
        "C": randn(batch, seqlen, ngroups, dstate, dt=dtype),
    }
    if optional:
        args.update(D=randn(nheads), initial_state=randn(batch, nheads, headdim, dstate), dt_bias=randn(nheads, scale=0.3))
    return args


def run_both(args, chunk, softplus=True, grad_final=True, seed=1):
    """(kernel, reference) results: y, final state and the gradients of a random loss of both, by name."""
    leaves = {k: v.clone().requires_grad_() for k, v in args.items()}
    ref_leaves = {k: v.detach().double().requires_grad_() for k, v in args.items()}

    def call(fn, t):
        return fn(t["x"], t["dt"], t["A"], t["B"], t["C"], chunk, t.get("D"), t.get("initial_state"),
                  dt_bias=t.get("dt_bias"), dt_softplus=softplus)

    y, final = call(ssd.ssd_scan, leaves)
    y_ref, final_ref = call(ssd.ssd_scan_reference, ref_leaves)
    g = torch.Generator().manual_seed(seed)
    dy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64).to(DEVICE)
    dfinal = torch.randn(final_ref.shape, generator=g, dtype=torch.float64).to(DEVICE) if grad_final else None
    loss = (y.double() * dy).sum() + ((final.double() * dfinal).sum() if grad_final else 0.0)
    loss_ref = (y_ref * dy).sum() + ((final_ref * dfinal).sum() if grad_final else 0.0)
    grads = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values())), strict=True))
    grads_ref = dict(zip(ref_leaves, torch.autograd.grad(loss_ref, list(ref_leaves.values())), strict=True))
    return (y, final, grads), (y_ref, final_ref, grads_ref)


def check(args, chunk, dtype, **kwargs):
    (y, final, grads), (y_ref, final_ref, grads_ref) = run_both(args, chunk, **kwargs)
    tol = TOL[dtype]
    errors = {"y": relative_norm_error(y, y_ref), "final_state": relative_norm_error(final, final_ref)}
    errors.update({f"d{name}": relative_norm_error(grads[name], grads_ref[name]) for name in grads})
    assert y.dtype == args["x"].dtype and final.dtype == torch.float32
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"relative errors above {tol:.0e}: {bad} (all: {errors})"


@pytest.mark.parametrize(
    ("batch", "seqlen", "nheads", "headdim", "ngroups", "dstate", "chunk"),
    [
        (2, 37, 3, 8, 1, 5, 32),  # T = one chunk and a ragged tail; 3 heads share one group
        (1, 70, 6, 16, 3, 16, 16),  # several chunks of one block each, 3 groups of 2 heads
        (1, 150, 5, 8, 1, 5, 64),  # chunks of 4 blocks (pairs spanning blocks between), heads split unevenly
    ],
)
def test_matches_reference_float32(batch, seqlen, nheads, headdim, ngroups, dstate, chunk):
    check(make_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, seed=seqlen), chunk, torch.float32)


def test_kernels_tile_the_chunk_independently(monkeypatch):
    """Each kernel's tuner picks its own block size on the GPU: dB and dC read the dCB kernel's tiles at another."""
    configs = {"output_fwd": {"BLOCK_T": 32}, "dx_bwd": {"BLOCK_T": 32}, "db_bwd": {"BLOCK_T": 32, "HEAD_SPLIT": 2},
               "dcb_bwd": {"BLOCK_T": 16, "HEAD_SPLIT": 3}, "dc_bwd": {"BLOCK_T": 64, "HEAD_SPLIT": 1}}
    for name, config in configs.items():
        monkeypatch.setattr(ssd.TUNERS[name], "interpreter_config", {**config, "num_warps": 4, "num_stages": 1})
    check(make_inputs(1, 140, 4, 8, 2, 5, seed=13), 64, torch.float32)


def test_length_one_without_optional_inputs():
    """T = 1 (a decode-sized prefill), no D, no initial state, Δ passed as is (no bias, no softplus), only y used."""
    args = make_inputs(2, 1, 5, 8, 1, 4, seed=3, optional=False)
    args["dt"] = torch.nn.functional.softplus(args["dt"])
    check(args, 16, torch.float32, softplus=False, grad_final=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_matches_reference_half(dtype):
    check(make_inputs(2, 45, 3, 8, 1, 5, dtype=dtype, seed=5), 32, dtype)


def test_bfloat16_decay_gradients_where_their_parts_cancel():
    """A Mamba-2 block's dt_bias gradient, Σ_t dΔ_t σ(dt_t + dt_bias), sums a dΔ whose direct part (x_s · inner_s)
    nearly cancels its log-decay part, and so does dA: neither the dx kernel's CB ⊙ decay nor the chunk states and
    the products that build them may round to bf16 (they did: d dt_bias 1.6e-3 and dA 5.6e-4 from float64 here, and
    Bamba-1B's dt_bias gradients were the one gradient farther from a float32 model with the kernels than with the
    bf16 references). Bamba's initialisation (Δ log-uniform in [1e-3, 0.1], A in [-16, -1]), x, B, C and dy in
    bf16, softplus in float32 as the block applies it; four chunks of 32, the last one ragged."""
    g = torch.Generator().manual_seed(0)
    batch, seqlen, nheads, headdim, dstate, chunk = 1, 100, 4, 32, 16, 32
    x = torch.randn(batch, seqlen, nheads, headdim, generator=g).to(DEVICE, torch.bfloat16)
    B, C = (torch.randn(batch, seqlen, 1, dstate, generator=g).mul(0.3).to(DEVICE, torch.bfloat16) for _ in range(2))
    step = torch.exp(torch.rand(nheads, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    dt_bias = (step + torch.log(-torch.expm1(-step))).to(DEVICE)  # softplus⁻¹
    dt = (torch.randn(batch, seqlen, nheads, generator=g) * 0.5).to(DEVICE, torch.bfloat16).float()
    A = -torch.rand(nheads, generator=g).mul(15).add(1).to(DEVICE)
    dy = torch.randn(batch, seqlen, nheads, headdim, generator=g).to(DEVICE, torch.bfloat16)

    def decay_gradients(scan, dtype, inputs_dtype):
        bias, A_ = (t.to(dtype).requires_grad_() for t in (dt_bias, A))
        x_, B_, C_ = (t.to(inputs_dtype) for t in (x, B, C))
        y, _ = scan(x_, F.softplus(dt.to(dtype) + bias), A_, B_, C_, chunk, torch.ones(nheads, device=DEVICE))
        return torch.autograd.grad((y.to(dtype) * dy.to(dtype)).sum(), (bias, A_))

    truth = decay_gradients(runtime_ssd.ssd_scan, torch.float64, torch.float64)
    kernel = decay_gradients(ssd.ssd_scan, torch.float32, torch.bfloat16)
    errors = {name: relative_norm_error(k, t) for name, k, t in zip(("dt_bias", "A"), kernel, truth, strict=True)}
    assert all(error <= 1e-4 for error in errors.values()), errors


def test_reference_matches_runtime_ssd_scan():
    """The loop reference computes what templates/runtime/ssd.py's chunked ssd_scan (ops/ssd.py) computes."""
    args = make_inputs(2, 23, 4, 3, 2, 5, dtype=torch.float64, seed=7)
    args = {k: v.double() for k, v in args.items()}
    step = torch.nn.functional.softplus(args["dt"] + args["dt_bias"])
    y, final = ssd.ssd_scan_reference(args["x"], args["dt"], args["A"], args["B"], args["C"], 8, args["D"],
                                      args["initial_state"], dt_bias=args["dt_bias"], dt_softplus=True)
    y_rt, final_rt = runtime_ssd.ssd_scan(args["x"], step, args["A"], args["B"], args["C"], 8, D=args["D"],
                                          initial_state=args["initial_state"])
    assert relative_norm_error(y, y_rt) < 1e-12 and relative_norm_error(final, final_rt) < 1e-12


def test_empty_sequence_passes_the_state_through():
    args = make_inputs(1, 0, 2, 4, 1, 3, seed=9)
    y, final = ssd.ssd_scan(args["x"], args["dt"], args["A"], args["B"], args["C"], 16, args["D"],
                            args["initial_state"], dt_bias=args["dt_bias"], dt_softplus=True)
    assert y.shape == (1, 0, 2, 4) and torch.equal(final, args["initial_state"])


def test_opcheck():
    """Schema, fake implementation against the real one, autograd registration and AOTAutograd (torch.compile)."""
    args = make_inputs(1, 5, 2, 4, 1, 3, seed=11)
    leaves = {k: v.requires_grad_() for k, v in args.items()}
    forward_args = (leaves["x"], leaves["dt"], leaves["A"], leaves["B"], leaves["C"], 16, leaves["D"],
                    leaves["initial_state"], leaves["dt_bias"], True)
    torch.library.opcheck(ssd.ssd_scan_op, forward_args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                      "test_aot_dispatch_dynamic"))


def test_export_is_one_node_with_dynamic_length():
    """torch.export sees one archgen_v1.ssd_scan node (traced on fake tensors: no kernel runs)."""

    class Scan(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.A = torch.nn.Parameter(-torch.rand(4, device=DEVICE) - 0.5)
            self.D = torch.nn.Parameter(torch.ones(4, device=DEVICE))

        def forward(self, x, dt, B, C):
            return ssd.ssd_scan(x, dt, self.A, B, C, 16, self.D)

    inputs = (torch.randn(2, 9, 4, 8, device=DEVICE), torch.rand(2, 9, 4, device=DEVICE),
              torch.randn(2, 9, 1, 5, device=DEVICE), torch.randn(2, 9, 1, 5, device=DEVICE))
    seq = torch.export.Dim("seq", min=2, max=4096)
    with torch.no_grad():
        program = torch.export.export(Scan(), inputs, dynamic_shapes=({1: seq}, {1: seq}, {1: seq}, {1: seq}))
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert [t for t in targets if "ssd_scan" in t] == ["archgen_v1.ssd_scan.default"], targets


def test_cpu_tensors_outside_the_interpreter_are_refused(monkeypatch):
    monkeypatch.setenv("ARCHGEN_TRITON_ON_CPU", "0")
    args = make_inputs(1, 3, 2, 4, 1, 3)
    if DEVICE == "cpu":
        with pytest.raises(RuntimeError, match="reference"):
            ssd.ssd_scan(args["x"], args["dt"], args["A"], args["B"], args["C"], 16)


@pytest.mark.parametrize(
    ("change", "message"),
    [({"chunk": 24}, "power of two"), ({"A": torch.ones(2)}, "A must have shape"), ({"groups": 2}, "multiple")],
)
def test_input_errors_name_the_problem(change, message):
    args = make_inputs(1, 4, 3, 4, 1, 3, optional=False)
    if "groups" in change:
        args["B"] = args["C"] = torch.randn(1, 4, 2, 3, device=DEVICE)
    args.update({k: v.to(DEVICE) for k, v in change.items() if k == "A"})
    with pytest.raises((ValueError, TypeError), match=message):
        ssd.ssd_scan_forward(args["x"], args["dt"], args["A"], args["B"], args["C"], change.get("chunk", 16))


def test_a_chunk_smaller_than_every_candidate_block_runs_blocks_that_tile_it(gpu_configs):
    """The GPU's untuned choice (each space's first config that tiles the chunk) at a 32-row chunk, where no cb
    candidate does: the first one's 64 rows ran past the chunk and gave NaN on the H200 (gpu9/call4)."""
    assert not any(ssd._fits_chunk(32, "BLOCK_T")(config) for config in ssd.CB_CONFIGS)
    gpu_configs.choose(GpuChoice(None, count=3))
    with gpu_configs.named():
        check(make_inputs(2, 37, 3, 8, 1, 5, seed=37), 32, torch.float32)
    assert gpu_configs.launched["ssd.cb"][0]["BLOCK_T"] == 32


@pytest.mark.parametrize(
    ("batch", "seqlen", "nheads", "headdim", "ngroups", "dstate", "chunk", "dtype", "choice"),
    per_case({"bf16-B2-T37-H3-P8-G1-N5-L32": (2, 37, 3, 8, 1, 5, 32, torch.bfloat16),
              "fp32-B1-T130-H3-P8-G1-N5-L128": (1, 130, 3, 8, 1, 5, 128, torch.float32)},
             {"bf16-B2-T37-H3-P8-G1-N5-L32": 1, "fp32-B1-T130-H3-P8-G1-N5-L128": 3}),
)
def test_every_gpu_config(gpu_configs, choice, batch, seqlen, nheads, headdim, ngroups, dstate, chunk, dtype):
    """Forward and backward at each config a GPU can launch (gpu_configs.py): the candidates that tile the chunk
    (`_fits_chunk`; at 32 rows no cb candidate does, and the fallback is cut to the chunk), blocks of 64 on head_dim
    8 and d_state 5, 3 heads (HEAD_SPLIT 4 and 8 leave a partial split), T one chunk and a ragged tail."""
    gpu_configs.choose(choice)
    with gpu_configs.named():
        # seed 1: at seed 130 the 3-element dA sits at 1.14e-5 of the float64 loop under every config, the
        # interpreter's too (its per-head sums over 130 steps cancel), above the 1e-5 float32 bar
        check(make_inputs(batch, seqlen, nheads, headdim, ngroups, dstate, dtype=dtype, seed=1), chunk, dtype)
