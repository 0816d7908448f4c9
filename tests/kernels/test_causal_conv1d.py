"""kernels/causal_conv1d.py against torch's grouped conv1d: y, the new state and every gradient.

Runs in Triton's interpreter without CUDA, at small ragged shapes (T not a multiple of the time block, T = 1, channels
not a multiple of the channel block, widths 2 to 4). Kernel-written buffers start as NaN (torch.empty is poisoned).
"""

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
pytest.importorskip("triton")

from archgen_kernels import causal_conv1d as conv
from templates.runtime import ssm
from tests.kernels.gpu_configs import per_case
from tests.numerics import relative_norm_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.usefixtures("poisoned_empty")  # tests/kernels/conftest.py
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 1e-2}


def randn(g: torch.Generator, *shape: int) -> torch.Tensor:
    """Standard normal samples drawn from g on the CPU (the same numbers on every machine), on the test device."""
    return torch.randn(*shape, generator=g).to(DEVICE)




@pytest.mark.parametrize(
    ("batch", "seqlen", "dim", "width", "dtype", "with_state", "with_bias", "activation"),
    [
        (2, 19, 37, 4, torch.float32, True, True, "silu"),
        (1, 1, 20, 4, torch.float32, True, False, None),  # a decoding step
        (2, 3, 17, 2, torch.float32, False, True, None),  # T shorter than the width
        (2, 11, 17, 3, torch.bfloat16, True, True, "silu"),
        (2, 13, 17, 6, torch.float32, True, True, "silu"),  # wider than the sliding window: the two-pass backward
        (1, 2, 9, 1, torch.float32, False, True, "silu"),  # width 1: no state at all
    ],
)
def test_matches_reference(batch, seqlen, dim, width, dtype, with_state, with_bias, activation):
    check(batch, seqlen, dim, width, dtype, with_state, with_bias, activation)


@pytest.mark.parametrize(
    ("batch", "seqlen", "dim", "width", "dtype", "with_state", "with_bias", "activation", "choice"),
    per_case({"window-bf16-2x19x37-K4": (2, 19, 37, 4, torch.bfloat16, True, True, "silu"),
              "tiles-fp32-2x13x17-K6": (2, 13, 17, 6, torch.float32, True, True, "silu")},
             {"window-bf16-2x19x37-K4": 6, "tiles-fp32-2x13x17-K6": 4}, covering=True),
)
def test_every_gpu_config(gpu_configs, choice, batch, seqlen, dim, width, dtype, with_state, with_bias, activation):
    """Forward and backward at the configs a GPU can launch (gpu_configs.py): the untuned choice, then a covering
    set of the others (every value of every field: BLOCK_T, BLOCK_D, GATHER, WINDOW, PREFETCH, SEGMENTS, KEEP_EDGES,
    CHANNELS_FASTEST; every forward config at width 4, 7 of the one-pass backward's 10, and of the wider widths'
    tiles 5 of 7 forward, 4 of 5 SiLU and 5 of 6 tap-sum configs), blocks of up to 512 steps and 256 channels on
    13-19 steps of 17-37 channels; then a decoding step's forward."""
    gpu_configs.choose(choice)
    with gpu_configs.named():
        check(batch, seqlen, dim, width, dtype, with_state, with_bias, activation)
        g = torch.Generator().manual_seed(width)
        x, weight, state = randn(g, batch, 1, dim).to(dtype), randn(g, dim, width), randn(g, batch, dim, width - 1)
        y, new_state = conv.causal_conv1d_forward(x, weight, None, state.to(dtype), silu=True)
        y_ref, new_state_ref = conv.causal_conv1d_reference(x, weight, None, state.to(dtype), "silu")
        assert relative_norm_error(y, y_ref) <= TOL[dtype] and torch.equal(new_state, new_state_ref)


def check(batch, seqlen, dim, width, dtype, with_state, with_bias, activation):
    g = torch.Generator().manual_seed(seqlen * 7 + width)

    def randn(*shape, dt=torch.float32):
        return torch.randn(*shape, generator=g).to(dt).to(DEVICE)

    args = [randn(batch, seqlen, dim, dt=dtype), randn(dim, width) * 0.5, randn(dim) if with_bias else None,
            randn(batch, dim, width - 1, dt=dtype) if with_state else None]
    leaves = [a.clone().requires_grad_() if a is not None else None for a in args]
    ref_leaves = [a.detach().double().requires_grad_() if a is not None else None for a in args]
    y, new_state = conv.causal_conv1d(*leaves, activation=activation)
    y_ref, new_state_ref = conv.causal_conv1d_reference(*ref_leaves, activation=activation)
    dy = torch.randn(y_ref.shape, generator=g, dtype=torch.float64).to(DEVICE)
    dstate = torch.randn(new_state_ref.shape, generator=g, dtype=torch.float64).to(DEVICE)
    present = [a for a in leaves if a is not None]
    grads = torch.autograd.grad((y.double() * dy).sum() + (new_state.double() * dstate).sum(), present)
    grads_ref = torch.autograd.grad((y_ref * dy).sum() + (new_state_ref * dstate).sum(),
                                    [a for a in ref_leaves if a is not None])
    assert y.dtype == dtype and new_state.dtype == dtype
    errors = {"y": relative_norm_error(y, y_ref), "new_state": relative_norm_error(new_state, new_state_ref)}
    errors.update({f"grad{i}": relative_norm_error(a, b) for i, (a, b) in enumerate(zip(grads, grads_ref, strict=True))})
    assert all(err <= TOL[dtype] for err in errors.values()), errors


@pytest.mark.parametrize("with_state", [True, False])
def test_gathering_forward_matches_reference(with_state):
    """The forward's gathering variant (overlapping time tiles, taps by tl.gather), across several tiles."""
    g = torch.Generator().manual_seed(5)
    x, weight, bias = randn(g, 2, 29, 21), randn(g, 21, 4), randn(g, 21)
    state = randn(g, 2, 21, 3) if with_state else None
    config = {"BLOCK_T": 8, "BLOCK_D": 16, "num_warps": 4, "GATHER": True}
    y, new_state = conv.causal_conv1d_forward(x, weight, bias, state, silu=True, config=config)
    y_ref, new_state_ref = conv.causal_conv1d_reference(x, weight, bias, state, "silu")
    assert relative_norm_error(y, y_ref) <= TOL[torch.float32] and torch.equal(new_state, new_state_ref)


@pytest.mark.parametrize(
    ("seqlen", "width", "with_state", "dtype"),
    [(29, 4, True, torch.float32), (29, 4, False, torch.float32), (10, 3, True, torch.float32),
     (2, 2, True, torch.float32), (9, 1, False, torch.float32), (19, 4, True, torch.bfloat16),
     (1, 4, True, torch.float32)],  # a decoding step
    ids=lambda v: str(v).replace("torch.", ""),
)
@pytest.mark.parametrize("prefetch", [False, True], ids=["", "prefetch"])
def test_window_forward_matches_reference(seqlen, width, with_state, dtype, prefetch):
    """The forward's sliding-window variant (widths up to 4, four rows a step, three inputs carried; the next step's
    rows loaded ahead or not): across several time blocks, T not a multiple of the step or shorter than the width or
    1, channels not a multiple of the block, x a strided slice as the Mamba blocks hand it over."""
    g = torch.Generator().manual_seed(seqlen + width)
    packed = randn(g, 2, seqlen, 45).to(dtype)
    x = packed[:, :, 3:24]  # 21 channels, rows 45 apart
    weight, bias = randn(g, 21, width), randn(g, 21)
    state = randn(g, 2, 21, width - 1).to(dtype) if with_state else None
    config = {"BLOCK_T": 8, "BLOCK_D": 16, "num_warps": 1, "WINDOW": True, "PREFETCH": prefetch}
    y, new_state = conv.causal_conv1d_forward(x, weight, bias, state, silu=True, config=config)
    y_ref, new_state_ref = conv.causal_conv1d_reference(x, weight, bias, state, "silu")
    assert relative_norm_error(y, y_ref) <= TOL[dtype] and torch.equal(new_state, new_state_ref)


@pytest.mark.parametrize(
    "tile",
    [{"BLOCK_T": 16}, {"BLOCK_T": 16, "PREFETCH": True},
     {"BLOCK_T": 8, "SEGMENTS": 2, "num_warps": 2, "PREFETCH": True, "CHANNELS_FASTEST": True},
     {"BLOCK_T": 8, "SEGMENTS": 4, "num_warps": 4, "KEEP_EDGES": True}],
    ids=["", "prefetch", "2-segments-prefetch-channels-fastest", "4-segments-keep-edges"],
)
@pytest.mark.parametrize(
    ("seqlen", "width", "dim", "dtype"),
    [(45, 4, 19, torch.float32), (21, 4, 32, torch.float32), (29, 3, 32, torch.float32), (6, 3, 19, torch.float32),
     (1, 4, 19, torch.float32), (37, 4, 32, torch.bfloat16)],
    ids=lambda v: str(v).replace("torch.", ""),
)
def test_window_backward_matches_reference(seqlen, width, dim, dtype, tile):
    """The one-pass backward (widths up to 4) with its tile given, the next rows loaded ahead or not, one segment a
    program or several side by side: several time blocks, whose inner steps run or not, a ragged last one (and with
    segments, programs whose last segments start past the sequence; the grid's axes in either order), channels a
    multiple of the block or not, a state, every gradient; bf16 x and dy (their bits widened by hand)."""
    g = torch.Generator().manual_seed(seqlen + width)
    args = [randn(g, 3, seqlen, dim).to(dtype), randn(g, dim, width), randn(g, dim),
            randn(g, 3, dim, width - 1).to(dtype)]  # 3 rows, 2 channel blocks: the grid's axes told apart
    dy = randn(g, 3, seqlen, dim).to(dtype)
    config = {"BLOCK_D": 16, "num_warps": 1, **tile}
    grads = conv.causal_conv1d_backward(dy, None, *args, silu=True, config=config)
    leaves = [a.double().requires_grad_() for a in args]
    y_ref, _ = conv.causal_conv1d_reference(*leaves, activation="silu")
    grads_ref = torch.autograd.grad(y_ref, leaves, dy.double())
    for name, got, want in zip(("dx", "dweight", "dbias", "dconv_state"), grads, grads_ref, strict=True):
        assert relative_norm_error(got, want) <= TOL[dtype], name


def test_reference_matches_runtime_causal_conv1d():
    """The reference computes templates/runtime/ssm.py's causal_conv1d (ops/ssm.py), then the activation."""
    g = torch.Generator().manual_seed(2)
    x, weight, bias, state = randn(g, 2, 9, 6), randn(g, 6, 4), randn(g, 6), randn(g, 2, 6, 3)
    y, new_state = conv.causal_conv1d_reference(x, weight, bias, state, "silu")
    y_rt, new_state_rt = ssm.causal_conv1d(x, weight, bias, state)
    assert torch.allclose(y, F.silu(y_rt), atol=1e-6) and torch.equal(new_state, new_state_rt)


def test_update_threads_the_state_like_one_call():
    """Prefill then decoding steps with causal_conv1d_update give the outputs of one call over the whole sequence."""
    g = torch.Generator().manual_seed(4)
    x, weight, bias = randn(g, 2, 7, 18), randn(g, 18, 4), randn(g, 18)
    y_full, state_full = conv.causal_conv1d(x, weight, bias, None, "silu")
    y, state = conv.causal_conv1d(x[:, :5], weight, bias, None, "silu")
    steps = [y]
    for t in range(5, 7):
        y_t, state = conv.causal_conv1d_update(x[:, t], state, weight, bias, "silu")
        steps.append(y_t.unsqueeze(1))
    assert torch.allclose(torch.cat(steps, 1), y_full, atol=1e-6) and torch.equal(state, state_full)


def test_opcheck():
    g = torch.Generator().manual_seed(6)
    args = (*(randn(g, *shape).requires_grad_() for shape in ((1, 5, 6), (6, 4), (6,), (1, 6, 3))), True)
    torch.library.opcheck(conv.causal_conv1d_op, args,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration",
                                      "test_aot_dispatch_dynamic"))


def test_the_custom_ops_autograd_matches_the_eager_path():
    """torch.compile and torch.export run the custom ops and their registered autograd; eager mode runs the same
    implementations through an autograd.Function: the same outputs and gradients, the state's included."""
    g = torch.Generator().manual_seed(3)
    args = [randn(g, 2, 9, 6), randn(g, 6, 4), randn(g, 6), randn(g, 2, 6, 3)]
    dy, dstate = randn(g, 2, 9, 6), randn(g, 2, 6, 3)
    results = []
    for run in (lambda *a: conv.causal_conv1d_op(*a, True), lambda *a: conv.causal_conv1d(*a, activation="silu")):
        leaves = [a.clone().requires_grad_() for a in args]
        y, new_state = run(*leaves)
        torch.autograd.backward([y, new_state], [dy, dstate])
        results.append([y, new_state, *(t.grad for t in leaves)])
    for got, want in zip(*results, strict=True):
        assert torch.equal(got.detach(), want.detach())


@pytest.mark.parametrize("width", [4, 6], ids=["window", "two-pass"])
def test_the_backward_op_returns_the_layouts_its_fake_promises(width):
    """torch.compile and CUDA-graph captures plan with the fake's shapes and strides: the real gradients match them
    (d weight is computed transposed)."""
    g = torch.Generator().manual_seed(width)
    x, weight, bias = randn(g, 2, 7, 5), randn(g, 5, width), randn(g, 5)
    state, dy = randn(g, 2, 5, width - 1), randn(g, 2, 7, 5)
    real = conv.causal_conv1d_backward_op(dy, None, x, weight, bias, state, True)
    fake = conv._backward_fake(dy, None, x, weight, bias, state, True)
    assert [(t.shape, t.stride()) for t in real] == [(t.shape, t.stride()) for t in fake]


def test_bad_activation_is_named():
    with pytest.raises(ValueError, match="activation"):
        conv.causal_conv1d(torch.randn(1, 2, 3, device=DEVICE), torch.randn(3, 4, device=DEVICE), activation="gelu")


@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no-bias"])
def test_the_blocks_sums_add_up_to_the_parameters_gradients(with_bias):
    """The backward's per-block sums (B, time blocks, K + 1, D) come to d weight (D, K) and d bias in the parameters'
    dtypes: more blocks than one step of the sum takes (PARTS_BLOCK_P), channels not a multiple of its block."""
    g = torch.Generator().manual_seed(5)
    part = randn(g, 3, 50, 5, 37)
    weight, bias = randn(g, 37, 4).to(torch.bfloat16), randn(g, 37)
    dweight, dbias = conv._summed_parts(part, weight, bias if with_bias else None)
    sums = part.double().sum((0, 1))
    assert dweight.dtype == torch.bfloat16 and dweight.is_contiguous()
    assert relative_norm_error(dweight, sums[:4].t()) <= TOL[torch.bfloat16]
    if with_bias:
        assert dbias.dtype == torch.float32 and relative_norm_error(dbias, sums[4]) <= TOL[torch.float32]
    else:
        assert dbias is None


@pytest.mark.parametrize(
    ("width", "dtype", "state_dtype", "with_bias"),
    [
        (4, torch.float32, torch.float32, True),
        (4, torch.bfloat16, torch.float32, True),  # a float32 cache of bf16 inputs: its entries rounded to bf16
        (3, torch.bfloat16, torch.bfloat16, False),
        (2, torch.float16, torch.float32, True),
        (6, torch.float32, torch.float32, True),  # wider than the window kernel: the functional kernel and a copy
        (1, torch.float32, torch.float32, True),  # no state entries at all
    ],
)
def test_the_in_place_step_computes_the_functional_step_and_shifts_the_state_where_it_lies(width, dtype, state_dtype,
                                                                                           with_bias):
    """causal_conv1d_update_ gives the functional step's y bit for bit and leaves in the state what copying the
    functional step's new state into it leaves (the cache's bits), on a strided x (a slice of a projection) with
    channels not a multiple of the block; the state tensor is the same object, written by the kernel."""
    g = torch.Generator().manual_seed(11)
    batch, dim = 2, 37
    x = randn(g, batch, 1, 2 * dim).to(dtype)[..., :dim]  # (B, 1, D) with a row stride of 2D, as in_proj's x
    weight, bias = randn(g, dim, width), randn(g, dim) if with_bias else None
    state = randn(g, batch, dim, width - 1).to(state_dtype)
    # the functional step as the GPU runs it at widths up to 4: the sliding-window kernel, whose tap order the in-place
    # step keeps (the interpreter's default config is a tile, which sums the taps in another order)
    window = {"BLOCK_T": 8, "BLOCK_D": 16, "num_warps": 1, "WINDOW": True} if 2 <= width <= 4 else None
    y_functional, new_state = conv.causal_conv1d_forward(x, weight, bias, state, True, config=window)
    expected_state = state.clone().copy_(new_state)
    in_place = state.clone()
    address = in_place.data_ptr()
    y = conv.causal_conv1d_update_(x, weight, bias, in_place, "silu")
    assert in_place.data_ptr() == address and y.shape == (batch, 1, dim) and y.dtype == dtype
    assert torch.equal(y, y_functional), "y: the functional step's, bit for bit"
    assert torch.equal(in_place, expected_state), "the state: the functional step's new state copied in"
    reference_y, _ = conv.causal_conv1d_reference(x, weight, bias, state, "silu")
    assert relative_norm_error(y, reference_y) < TOL[dtype]


def test_in_place_steps_thread_the_state_like_one_call():
    """Prefill, then decoding steps that each shift the cache's state in place: the outputs of one call."""
    g = torch.Generator().manual_seed(12)
    x, weight, bias = randn(g, 2, 9, 18), randn(g, 18, 4), randn(g, 18)
    y_full, state_full = conv.causal_conv1d(x, weight, bias, None, "silu")
    y, state = conv.causal_conv1d(x[:, :6], weight, bias, None, "silu")
    steps = [y]
    for t in range(6, 9):
        steps.append(conv.causal_conv1d_update_(x[:, t : t + 1], weight, bias, state, "silu"))
    assert torch.allclose(torch.cat(steps, 1), y_full, atol=1e-6) and torch.equal(state, state_full)


def test_in_place_op_declares_its_mutation_and_compiles_in_one_graph():
    """The op's schema says it writes conv_state (torch.compile must not reorder or drop the write, and 2.11's did
    not write back an input that an op both mutated and returned: this one returns y only); compiled, the state the
    function was given is shifted, as eagerly."""
    g = torch.Generator().manual_seed(13)
    x, weight, bias, state = randn(g, 1, 1, 6), randn(g, 6, 4), randn(g, 6), randn(g, 1, 6, 3)
    torch.library.opcheck(conv.causal_conv1d_update_in_place_op, (x, weight, bias, state.clone(), True),
                          test_utils=("test_schema", "test_faketensor"))
    assert torch.ops.archgen_v1.causal_conv1d_update_.default._schema.arguments[3].alias_info.is_write

    def step(x, state):
        return conv.causal_conv1d_update_(x, weight, bias, state, "silu") * 2

    eager_state, compiled_state = state.clone(), state.clone()
    eager = step(x, eager_state)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(x, compiled_state)
    assert torch.equal(compiled, eager) and torch.equal(compiled_state, eager_state)
    assert not torch.equal(eager_state, state)


def test_the_in_place_step_takes_one_step_with_a_state():
    g = torch.Generator().manual_seed(14)
    x, weight, state = randn(g, 1, 2, 6), randn(g, 6, 4), randn(g, 1, 6, 3)
    with pytest.raises(ValueError, match="one step"):
        conv.causal_conv1d_step_in_place(x, weight, None, state, True)
