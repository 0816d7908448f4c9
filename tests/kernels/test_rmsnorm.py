"""kernels/rmsnorm.py against its reference: y (and s), and every gradient (x, residual, weight), on fresh random
inputs of odd widths, float32 and half precision; poisoned outputs; the custom ops under torch.export and their
decomposition. Without CUDA the kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is
imported), so shapes are small.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
pytest.importorskip("triton")

from archgen_kernels import rmsnorm as rn
from tests.kernels.gpu_configs import gpu_choices
from tests.numerics import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# max |kernel - reference| / max |reference|; the reference runs in float64 on the kernel's input values
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SHAPES = [(1, 5), (3, 7), (5, 33), (2, 3, 100), (17, 64)]


def randn(*shape, dtype=torch.float32, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(device=DEVICE, dtype=dtype)


def reference_grads(fn, inputs, cotangents):
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(outputs, [c.double() for c in cotangents])
    return [o.detach() for o in outputs], [t.grad for t in leaves]


def kernel_grads(fn, inputs, cotangents):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    outputs = fn(*leaves)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    torch.autograd.backward(outputs, list(cotangents))
    return [o.detach() for o in outputs], [t.grad for t in leaves]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_rms_norm_matches_reference_with_gradients(shape, dtype):
    check_rms_norm(shape, dtype)


def check_rms_norm(shape, dtype):
    N = shape[-1]
    x = randn(*shape, dtype=dtype, seed=N, scale=3.0)
    w = randn(N, seed=N + 1) * 0.5 + 1  # float32 weight, as a model keeps it
    dy = randn(*shape, dtype=dtype, seed=N + 2)
    eps = 1e-6
    (y,), (dx, dw) = kernel_grads(lambda x, w: rn.rms_norm(x, w, eps), [x, w], [dy])
    (y_ref,), (dx_ref, dw_ref) = reference_grads(lambda x, w: rn.rms_norm_reference(x, w, eps), [x, w], [dy])
    assert y.dtype == dtype and dx.dtype == dtype and dw.dtype == torch.float32
    for name, a, e in (("y", y, y_ref), ("dx", dx, dx_ref), ("dw", dw, dw_ref)):
        assert_close(a, e, TOL[dtype], name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_add_rms_norm_matches_reference_with_gradients(shape, dtype):
    check_add_rms_norm(shape, dtype)


@pytest.mark.parametrize("choice", gpu_choices(11))
@pytest.mark.parametrize(("shape", "dtype", "multiprocessors"), [((37, 33), torch.float32, 132),
                                                                 ((2, 3, 100), torch.bfloat16, 2)],
                         ids=["fp32-37x33-132SMs", "bf16-2x3x100-2SMs"])
@pytest.mark.usefixtures("poisoned_empty")
def test_every_gpu_config(gpu_configs, monkeypatch, choice, shape, dtype, multiprocessors):
    """rms_norm and add_rms_norm, forward and backward, at each config a GPU can launch (gpu_configs.py: of the
    60-config backward space, the 7 and 11 that run differently among these widths' candidates), at widths below
    their block, on an H200's 132 SMs (one tile a program) and on 2 (programs looping over several tiles, the last
    one short), outputs poisoned."""
    monkeypatch.setattr(rn, "_multiprocessors", lambda device: multiprocessors)
    gpu_configs.choose(choice)
    with gpu_configs.named():
        check_rms_norm(shape, dtype)
        check_add_rms_norm(shape, dtype)


def check_add_rms_norm(shape, dtype):
    N = shape[-1]
    x, res = randn(*shape, dtype=dtype, seed=N), randn(*shape, dtype=dtype, seed=N + 1, scale=2.0)
    w = (randn(N, seed=N + 2) * 0.5 + 1).to(dtype)
    dy, ds = randn(*shape, dtype=dtype, seed=N + 3), randn(*shape, dtype=dtype, seed=N + 4)
    eps = 1e-5

    (y, s), grads = kernel_grads(lambda x, r, w: rn.add_rms_norm(x, r, w, eps), [x, res, w], [dy, ds])

    def reference(x, res, w):
        # normalises the very s the kernel produced (its rounding of x + res), with the gradient of x + res
        s64 = x + res
        s64 = s64 + (s.double() - s64).detach()
        return rn.rms_norm_reference(s64, w, eps), s64

    (y_ref, _), grads_ref = reference_grads(reference, [x, res, w], [dy, ds])
    if DEVICE == "cuda":
        assert torch.equal(s, x + res), "s must be exactly the unfused x + residual"
    else:  # Triton's interpreter truncates float32 -> half casts instead of rounding to nearest: one ulp apart
        assert_close(s, x + res, {torch.float32: 0.0, torch.bfloat16: 2**-7}[dtype], "s")
    assert_close(y, y_ref, TOL[dtype], "y")
    for name, a, e in zip(("dx", "dresidual", "dw"), grads, grads_ref, strict=True):
        assert_close(a, e, TOL[dtype], name)


def test_a_bfloat16_branch_onto_a_float32_residual_stream_sums_in_float32():
    """bf16 autocast: a layer's bf16 output meets the float32 residual stream (found by `archgen train` of Bamba-1B on
    the H200): s and y come out float32 like the reference's x + residual, and the gradients reach both dtypes."""
    x, res = randn(3, 40, dtype=torch.bfloat16, seed=1), randn(3, 40, seed=2, scale=2.0)
    w = randn(40, seed=3) * 0.5 + 1
    dy, ds = randn(3, 40, seed=4), randn(3, 40, seed=5)
    (y, s), (dx, dres, dw) = kernel_grads(lambda x, r, w: rn.add_rms_norm(x, r, w, 1e-5), [x, res, w], [dy, ds])
    (y_ref, s_ref), grads_ref = reference_grads(lambda x, r, w: rn.add_rms_norm_reference(x, r, w, 1e-5), [x, res, w],
                                                [dy, ds])
    assert y.dtype == s.dtype == torch.float32 and dx.dtype == torch.bfloat16 and dres.dtype == torch.float32
    assert_close(s, s_ref, TOL[torch.float32], "s")
    assert_close(y, y_ref, TOL[torch.float32], "y")
    for name, a, e in zip(("dx", "dresidual", "dw"), (dx, dres, dw), grads_ref, strict=True):
        assert_close(a, e, TOL[torch.bfloat16 if name == "dx" else torch.float32], name)


def test_the_custom_ops_autograd_matches_the_eager_path():
    """torch.compile and torch.export run the custom ops and their registered autograd; eager mode runs the same
    implementations through autograd.Functions: the same outputs and gradients."""
    x, res, w = randn(5, 33, seed=1), randn(5, 33, seed=2), randn(33, seed=3)
    dy, ds = randn(5, 33, seed=4), randn(5, 33, seed=5)
    for fused in (False, True):
        results = []
        for run in ((lambda x, r, w: rn.add_rms_norm_op(x, r, w, 1e-6)[:2]) if fused else
                    (lambda x, r, w: rn.rms_norm_op(x, w, 1e-6)[:1]),
                    (lambda x, r, w: rn.add_rms_norm(x, r, w, 1e-6)) if fused else
                    (lambda x, r, w: (rn.rms_norm(x, w, 1e-6),))):
            leaves = [t.detach().clone().requires_grad_() for t in (x, res, w)]
            out = run(*leaves)
            torch.autograd.backward(list(out), [dy, ds][:len(out)])
            results.append([*out, *(t.grad if t.grad is not None else torch.zeros_like(t) for t in leaves)])
        for got, want in zip(*results, strict=True):
            assert_close(got.detach(), want.detach(), 1e-6)


def test_strided_inputs_give_contiguous_outputs_of_their_shape():
    """Rows of a wider tensor (row stride > N) and a transposed one (strided last dim): the same values as contiguous
    copies; y, s, ds come back contiguous in the input's shape."""
    wide = randn(6, 40, seed=1)[:, 3:36]  # (6, 33), rows 40 apart
    transposed = randn(33, 6, seed=2).t()  # (6, 33), last dim strided
    w, dy, ds_out = randn(33, seed=3), randn(6, 33, seed=4), randn(6, 33, seed=5)
    y, s, rstd = rn.rms_norm_forward(wide, transposed, w, 1e-6)
    y_ref, s_ref = rn.add_rms_norm_reference(wide.contiguous(), transposed.contiguous(), w, 1e-6)
    assert y.shape == s.shape == (6, 33) and y.is_contiguous() and s.is_contiguous()
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(s, s_ref, 1e-6, "s")
    ds, dw = rn.rms_norm_backward(dy.t().contiguous().t(), ds_out, s, w, rstd)
    ds_ref, dw_ref = rn._backward_reference(dy, ds_out, s_ref, w, rstd)
    assert ds.is_contiguous()
    assert_close(ds, ds_ref, 1e-5, "ds")
    assert_close(dw, dw_ref, 1e-5, "dw")


def test_outputs_are_fully_written(monkeypatch):
    """Poisoned output buffers: every element must be overwritten by the kernels."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(rn.torch, "empty", poisoned)
    x, res = randn(6, 45, seed=1), randn(6, 45, seed=2)
    w = randn(45, seed=3)
    y, s, rstd = rn.rms_norm_forward(x, res, w, 1e-6)
    ds, dw = rn.rms_norm_backward(randn(6, 45, seed=4), randn(6, 45, seed=5), s, w, rstd)
    for name, t in (("y", y), ("s", s), ("rstd", rstd), ("ds", ds), ("dw", dw)):
        assert t.isfinite().all(), f"{name} has unwritten (NaN) elements"


@pytest.mark.parametrize("prefetch", [0, 1])
def test_backward_config_with_partial_last_program(prefetch):
    """Programs whose runs of rows do not divide the row count: the last program's missing rows are skipped, dw
    still complete; tiles of several rows, at an odd and a power-of-two width; with the next tile prefetched (up to
    each program's last row) and without."""
    for N, tile_rows in ((24, 1), (32, 2), (24, 4)):
        x, w, dy = randn(11, N, seed=1), randn(N, seed=2), randn(11, N, seed=3)
        _, s, rstd = rn.rms_norm_forward(x, None, w, 1e-6)
        config = {"PER_SM": 2, "BLOCK_R": tile_rows, "num_warps": 4, "num_stages": 2, "PREFETCH": prefetch}
        programs, rows_per_program = rn.backward_grid(11, s.device, config)
        assert programs > 1 and rows_per_program % tile_rows == 0 and programs * rows_per_program >= 11
        ds, dw = rn.rms_norm_backward(dy, None, s, w, rstd, config=config)
        ds_ref, dw_ref = rn._backward_reference(dy, None, s, w, rstd)
        assert_close(ds, ds_ref, 1e-5, f"ds (BLOCK_R {tile_rows})")
        assert_close(dw, dw_ref, 1e-5, f"dw (BLOCK_R {tile_rows})")


def test_ops_export_as_single_nodes_and_decompose():
    class Norm(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(16))

        def forward(self, x, res):
            y, s = rn.add_rms_norm(x, res, self.weight, 1e-6)
            return rn.rms_norm(y, self.weight, 1e-6), s

    x, res, norm = randn(3, 16, seed=1), randn(3, 16, seed=2), Norm().to(DEVICE)
    program = torch.export.export(norm, (x, res))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert {"archgen_v1.add_rms_norm.default", "archgen_v1.rms_norm.default"} <= targets
    lowered = program.run_decompositions(rn.decomposition())
    lowered_targets = {str(n.target) for n in lowered.graph.nodes if n.op == "call_function"}
    assert not any(t.startswith("archgen_v1.") for t in lowered_targets)
    for a, e in zip(lowered.module()(x, res), norm(x, res), strict=True):
        assert_close(a, e, 1e-5)


def test_rejects_bad_inputs():
    x = randn(2, 8)
    with pytest.raises(ValueError, match="weight"):
        rn.rms_norm(x, randn(7), 1e-6)
    with pytest.raises(ValueError, match="residual"):
        rn.add_rms_norm(x, randn(2, 9), randn(8), 1e-6)
    with pytest.raises(ValueError, match="takes"):
        rn.rms_norm(x.double(), randn(8).double(), 1e-6)


@pytest.mark.parametrize("tile_rows", [1, 4])
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_forward_tiles_of_several_rows_with_a_partial_last_tile(tile_rows, fused):
    """BLOCK_R rows per program with R not a multiple of it, odd and power-of-two widths: every row right; one row
    per program takes its own (1-D) form."""
    for N in (24, 32):
        x, res, w = randn(10, N, seed=N), randn(10, N, seed=N + 1), randn(N, seed=N + 2)
        y, s, rstd = rn.rms_norm_forward(x, res if fused else None, w, 1e-6,
                                         config={"BLOCK_R": tile_rows, "num_warps": 2})
        y_ref, s_ref = rn.add_rms_norm_reference(x, res, w, 1e-6) if fused else (rn.rms_norm_reference(x, w, 1e-6), x)
        assert_close(y, y_ref, 1e-5, "y")
        assert_close(s, s_ref, 1e-6, "s")
        assert_close(rstd, rn._rstd(s_ref, 1e-6), 1e-5, "rstd")


@pytest.mark.parametrize("N", [1, 7, 64, 1000, 4096, 65536])
def test_candidates_fit_the_row_and_put_the_default_first(N):
    block = rn._block_n(N)
    forward, backward = rn.forward_candidates(N), rn.backward_candidates(N)
    assert len({str(c) for c in forward}) == len(forward) and len({str(c) for c in backward}) == len(backward)
    assert all(c["BLOCK_R"] * block <= max(rn.MAX_TILE, block) for c in forward)
    assert forward[0]["BLOCK_R"] * block >= min(4096, block), "the default tile holds ~4096 elements (or one row)"
    assert forward[0]["BLOCK_R"] == 1 if N >= 4096 else forward[0]["BLOCK_R"] > 1
    assert all(c in rn.BACKWARD_CONFIGS and c.keys() == backward[0].keys() for c in backward[1:])
    for itemsize in (2, 4):  # what the pipelined loop stages fits in shared memory, the default's too
        assert all(rn._staged_bytes(c["BLOCK_R"] * block, itemsize, c["num_stages"]) <= rn.MAX_STAGED_BYTES
                   for c in rn.backward_candidates(N, itemsize))
    assert all(c["BLOCK_R"] * block <= max(rn.MAX_BACKWARD_TILE, block) for c in backward)


def test_shape_key_buckets_rows_and_names_the_variant():
    assert rn.shape_key(4096, 32768, torch.bfloat16, True) == "N4096-R32768-bfloat16-fused"
    assert rn.shape_key(4096, 3000, torch.float32, False) == "N4096-R4096-float32-plain"
    assert rn.shape_key(64, 1, torch.float32, False) == rn.shape_key(64, 1024, torch.float32, False)
    assert rn.shape_key(64, 10**7, torch.float32, False) == "N64-R131072-float32-plain"


def test_the_generated_models_call_with_a_residual_is_the_fused_op():
    """kernels.rms_norm(x, w, eps, residual): the signature of the package's reference (ops/norm.py), fused."""
    x, res, w = randn(4, 24, seed=1), randn(4, 24, seed=2), randn(24, seed=3)
    y, s = rn.rms_norm(x, w, 1e-6, res)
    y_ref, s_ref = rn.add_rms_norm_reference(x, res, w, 1e-6)
    assert_close(y, y_ref, 1e-5, "y")
    assert_close(s, s_ref, 1e-6, "s")
