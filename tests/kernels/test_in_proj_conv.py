"""kernels/in_proj_conv.py: a Mamba-1 decoding step's in_proj GEMV with the conv step (+ SiLU) in its epilogue against
the two launches it replaces (kernels/gemv.py's linear, then kernels/causal_conv1d.py's causal_conv1d_update_ on the x
half), bit for bit, and against the references; the conv state shifted where it lies. Odd sizes (channels and outputs
not a multiple of the tile, a block straddling the x and z halves), widths 2 to 4, float32 and bfloat16, one row and
several. Runs in Triton's interpreter without CUDA; kernel-written buffers start as NaN."""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
pytest.importorskip("triton")

from archgen_kernels import causal_conv1d as conv
from archgen_kernels import gemv
from archgen_kernels import in_proj_conv as kernel
from templates.runtime import ssm
from tests.numerics import relative_norm_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned_empty")  # tests/kernels/conftest.py
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}

# id: (dtype, state dtype, batch, d_inner D, K in, conv width, in_proj bias, conv bias)
CASES = {"fp32-B1-D37-K70-W4-biases": (torch.float32, torch.float32, 1, 37, 70, 4, True, True),
         "bf16-B1-D19-K45-W4-fp32-state": (torch.bfloat16, torch.float32, 1, 19, 45, 4, False, True),
         "bf16-B3-D13-K33-W3": (torch.bfloat16, torch.bfloat16, 3, 13, 33, 3, True, False),
         "fp32-B2-D6-K17-W2": (torch.float32, torch.float32, 2, 6, 17, 2, False, True)}


def _inputs(case):
    dtype, state_dtype, batch, D, K, width, bias, conv_bias = CASES[case]
    g = torch.Generator().manual_seed(D * K + width)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(DEVICE, dtype)

    x = randn(batch, 1, K)
    weight = randn(2 * D, K, scale=1 / math.sqrt(K))
    conv_weight = randn(D, 1, width)[:, 0]  # nn.Conv1d's (D, 1, W) weight as the layer hands it: a strided view
    state = torch.randn(batch, D, width - 1, generator=g).to(DEVICE, state_dtype)
    return (x, weight, randn(2 * D) if bias else None, conv_weight, randn(D) if conv_bias else None, state)


@pytest.mark.parametrize("config", [None, {"BLOCK_N": 8, "BLOCK_K": 16, "num_warps": 1}], ids=["default", "8x16"])
@pytest.mark.parametrize("case", CASES)
def test_one_launch_gives_the_two_launches_bits_and_state(case, config):
    """y and the shifted state: the GEMV (the same config) then the in-place conv step on its x half, bit for bit, on
    the same state object the cache holds."""
    x, weight, bias, conv_weight, conv_bias, state = _inputs(case)
    D = conv_weight.shape[0]
    products = gemv.gemv_forward(x, weight, bias, config=config)
    two_state = state.clone()
    x_conv = conv.causal_conv1d_step_in_place(products[..., :D], conv_weight, conv_bias, two_state, True)
    fused_state = state.clone()
    address = fused_state.data_ptr()
    y, z = kernel.in_proj_conv_step_forward(x, weight, bias, conv_weight, conv_bias, fused_state, True, config=config)
    assert y.shape == z.shape == (x.shape[0], 1, D) and y.dtype == z.dtype == x.dtype and y.is_contiguous()
    assert fused_state.data_ptr() == address
    assert torch.equal(y, x_conv), "y: linear then causal_conv1d_update_, bit for bit"
    assert torch.equal(z, products[..., D:]), "z: linear's, bit for bit"
    assert torch.equal(fused_state, two_state), "the state: as the in-place conv step leaves it"
    reference_state = state.clone()
    reference = kernel.in_proj_conv_step_reference(x, weight, bias, conv_weight, conv_bias, reference_state, True)
    assert relative_norm_error(torch.cat([y, z], -1), torch.cat(reference, -1)) < TOL[x.dtype]
    # close, not equal: the new entry is the product, whose float32 sum F.linear orders otherwise, and the interpreter
    # truncates where the kernel rounds a float32 state's kept entries through bfloat16 (the GPU rounds to nearest)
    assert relative_norm_error(fused_state, reference_state) < TOL[x.dtype]


def test_the_entry_point_and_op_match_the_runtime_reference():
    """kernels.in_proj_conv_step_ (eager and through the custom op) against ops/ssm.py's function of the same name,
    without the SiLU too; steps thread the state like the functional conv over the whole sequence."""
    x, weight, bias, conv_weight, conv_bias, state = _inputs("fp32-B1-D37-K70-W4-biases")
    for activation in ("silu", None):
        ours, theirs = state.clone(), state.clone()
        y = torch.cat(kernel.in_proj_conv_step_(x, weight, bias, conv_weight, conv_bias, ours, activation), -1)
        y_op = kernel.in_proj_conv_step_op(x, weight, bias, conv_weight, conv_bias, state.clone(), activation == "silu")
        expected = ssm.in_proj_conv_step_(x, weight, bias, conv_weight, conv_bias, theirs, activation == "silu")
        assert relative_norm_error(y, torch.cat(expected, -1)) < 1e-5 and torch.equal(y, torch.cat(y_op, -1))
        assert torch.allclose(ours, theirs)


def test_steps_thread_the_state_like_one_call():
    """Three fused steps from a prefilled state: the functional conv over the in_proj products of all the tokens."""
    g = torch.Generator().manual_seed(5)
    D, K = 10, 24
    tokens = torch.randn(2, 7, K, generator=g).to(DEVICE)
    weight, conv_weight, conv_bias = (torch.randn(*s, generator=g).to(DEVICE) for s in ((2 * D, K), (D, 4), (D,)))
    products = gemv.linear_reference(tokens, weight)
    y_full, state_full = conv.causal_conv1d_reference(products[..., :D], conv_weight, conv_bias, None, "silu")
    _, state = conv.causal_conv1d_reference(products[:, :4, :D], conv_weight, conv_bias, None, "silu")
    steps = [kernel.in_proj_conv_step_(tokens[:, t : t + 1], weight, None, conv_weight, conv_bias, state, "silu")[0]
             for t in range(4, 7)]
    assert torch.allclose(torch.cat(steps, 1), y_full[:, 4:], atol=1e-5)
    assert torch.allclose(state, state_full, atol=1e-6)


def test_the_op_declares_its_mutation_and_compiles_in_one_graph():
    x, weight, bias, conv_weight, conv_bias, state = _inputs("fp32-B2-D6-K17-W2")
    torch.library.opcheck(kernel.in_proj_conv_step_op, (x, weight, bias, conv_weight, conv_bias, state.clone(), True),
                          test_utils=("test_schema", "test_faketensor"))
    assert torch.ops.archgen_v1.in_proj_conv_step_.default._schema.arguments[5].alias_info.is_write

    def step(x, state):
        y, z = kernel.in_proj_conv_step_(x, weight, bias, conv_weight, conv_bias, state, "silu")
        return y * z

    eager_state, compiled_state = state.clone(), state.clone()
    eager = step(x, eager_state)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, compiled_state)
    # To a few float32 ulps, not bit for bit: under torch.compile the op's inputs are functionalized copies, and
    # Triton specializes a kernel on its arguments (a stride of 1, 16-byte alignment), so the compiled call may run
    # another binary of the same kernel, whose fused multiply-adds LLVM contracts its own way (kernels/rope.py's
    # _rotate_pair: the same source 1 ulp apart in two kernels on sm_90). On the H200 the products differed by 1-2
    # ulps (2.4e-7) in 9-10 of 12 elements, in y * z and in the state's new column alike (session 14, call 5: the
    # likely cause, not confirmed). The mutation itself is checked: the state moved, as eager's did.
    torch.testing.assert_close(compiled, eager, rtol=1e-6, atol=1e-6, msg=lambda m: f"y * z: {m}")
    torch.testing.assert_close(compiled_state, eager_state, rtol=1e-6, atol=1e-6, msg=lambda m: f"conv state: {m}")
    assert not torch.equal(eager_state, state)


def test_more_rows_than_a_gemv_takes_run_the_two_ops():
    """Beyond gemv.FEW_ROWS rows (cuBLAS's): F.linear, then the in-place conv step; the same results as the reference."""
    g = torch.Generator().manual_seed(6)
    batch, D, K = gemv.FEW_ROWS + 1, 5, 12
    x = torch.randn(batch, 1, K, generator=g).to(DEVICE)
    weight, conv_weight = torch.randn(2 * D, K, generator=g).to(DEVICE), torch.randn(D, 4, generator=g).to(DEVICE)
    state = torch.randn(batch, D, 3, generator=g).to(DEVICE)
    ours, theirs = state.clone(), state.clone()
    y = torch.cat(kernel.in_proj_conv_step_(x, weight, None, conv_weight, None, ours, "silu"), -1)
    expected = torch.cat(kernel.in_proj_conv_step_reference(x, weight, None, conv_weight, None, theirs, True), -1)
    assert relative_norm_error(y, expected) < 1e-5 and torch.equal(ours, theirs)


def test_bad_inputs_are_named():
    x, weight, bias, conv_weight, conv_bias, state = _inputs("fp32-B2-D6-K17-W2")
    with pytest.raises(ValueError, match="one decoding step"):
        kernel.in_proj_conv_step_forward(x.expand(2, 3, 17), weight, bias, conv_weight, conv_bias, state, True)
    with pytest.raises(ValueError, match="conv_state must be"):
        kernel.in_proj_conv_step_forward(x, weight, bias, conv_weight, conv_bias, state[:1], True)
    with pytest.raises(ValueError, match="W from 2 to 4"):
        kernel.in_proj_conv_step_forward(x, weight, bias, torch.zeros(6, 5), conv_bias, state, True)
    with pytest.raises(ValueError, match="activation"):
        kernel.in_proj_conv_step_(x, weight, bias, conv_weight, conv_bias, state, "gelu")
