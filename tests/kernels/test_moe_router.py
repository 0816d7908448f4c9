"""kernels/moe_router.py against the runtime ops it replaces (templates/runtime/moe.py: route_top_k,
load_balancing_loss, router_z_loss): the chosen experts, their weights, both losses and the gradient reaching the
logits through all three, normalised or not, with and without a ragged batch's pads, odd expert counts; poisoned
outputs; torch.export and the decomposition. Without CUDA the kernels run in Triton's CPU interpreter.
"""

import pytest
import torch

pytest.importorskip("triton")

from archgen_kernels import moe_router as mr
from templates.runtime import moe as runtime
from tests.kernels.gpu_configs import gpu_choices
from tests.numerics import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def randn(*shape, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE)


def runtime_router(logits, top_k, normalize, valid):
    routing = runtime.route_top_k(logits, top_k, normalize)
    E = logits.shape[1]
    return (routing.expert_index, routing.expert_weight,
            runtime.load_balancing_loss(logits, routing.expert_index, E, valid=valid),
            runtime.router_z_loss(logits, valid=valid))


def run(router, logits, top_k, normalize, valid, d_weight):
    leaf = logits.detach().clone().requires_grad_()
    index, weight, balance, z = router(leaf, top_k, normalize, valid)
    ((weight * d_weight).sum() + 0.7 * balance + 0.3 * z).backward()
    return index, weight.detach(), balance.detach(), z.detach(), leaf.grad


@pytest.mark.parametrize("ragged", [False, True], ids=["all-tokens", "ragged"])
@pytest.mark.parametrize("normalize", [True, False], ids=["normalized", "raw"])
@pytest.mark.parametrize(("N", "E", "top_k"), [(37, 8, 2), (5, 3, 1), (70, 13, 3), (16, 16, 16)],
                         ids=lambda v: str(v))
def test_matches_the_runtime_router_and_losses_with_gradients(N, E, top_k, normalize, ragged):
    check(N, E, top_k, normalize, ragged)


@pytest.mark.parametrize("choice", gpu_choices(2))
@pytest.mark.parametrize(("N", "E", "top_k"), [(37, 13, 3), (5, 600, 2)], ids=lambda v: str(v))
def test_every_gpu_config(gpu_configs, monkeypatch, choice, N, E, top_k):
    """Forward (outputs poisoned) and backward at each config a GPU can launch (gpu_configs.py: 32, 64 or 128 rows
    a program) on token counts below every block, ragged, and at 600 experts, too wide for any candidate (one
    config of the rows that fit)."""
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    monkeypatch.setattr(mr.torch, "empty", poisoned)
    gpu_configs.choose(choice)
    with gpu_configs.named():
        check(N, E, top_k, True, True)


def check(N, E, top_k, normalize, ragged):
    logits = randn(N, E, seed=N + E, scale=2.0)
    valid = (torch.arange(N, device=DEVICE) % 4 != 1) if ragged else None
    d_weight = randn(N, top_k, seed=1)
    got = run(mr.moe_router, logits, top_k, normalize, valid, d_weight)
    want = run(runtime_router, logits.double(), top_k, normalize, valid, d_weight.double())
    assert torch.equal(got[0], want[0]), "different experts chosen"
    for name, a, e in zip(("weight", "load_balancing", "z_loss", "d_logits"), got[1:], want[1:], strict=True):
        assert a.dtype == torch.float32
        assert_close(a, e.float(), 1e-5, name)


def test_the_custom_op_autograd_matches_the_eager_path():
    """torch.compile and torch.export run the custom op and its registered autograd; eager mode the same
    implementations through an autograd.Function: the same routing and logit gradient."""
    logits, valid, d_weight = randn(19, 6, seed=7), torch.arange(19, device=DEVICE) % 5 != 0, randn(19, 2, seed=8)
    results = []
    for op in (mr.router_op, mr._EagerRouter.apply):
        leaf = logits.detach().clone().requires_grad_()
        index, weight, _, _, prob_sums, z_sum = op(leaf, valid, 2, True)
        ((weight * d_weight).sum() + prob_sums.square().sum() + z_sum).backward()
        results.append((index, weight.detach(), leaf.grad))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want) if got.dtype == torch.int64 else torch.allclose(got, want, rtol=0, atol=1e-7)


def test_the_reference_is_the_runtime_router():
    logits, valid = randn(9, 5, seed=2), torch.arange(9, device=DEVICE) < 7
    for got, want in zip(mr.moe_router_reference(logits, 2, True, valid), runtime_router(logits, 2, True, valid),
                         strict=True):
        assert_close(got.double(), want.double(), 1e-6)


def test_outputs_are_fully_written(monkeypatch):
    real_empty = torch.empty

    def poisoned(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(-7)

    monkeypatch.setattr(mr.torch, "empty", poisoned)
    logits = randn(21, 6, seed=3)
    outputs = mr.moe_router_forward(logits, None, 2, True, config=mr.INTERPRETER_CONFIG)
    index = outputs[0]
    assert ((index >= 0) & (index < 6)).all(), "unwritten expert indices"
    for t in outputs[1:]:
        assert t.isfinite().all(), "unwritten (NaN) elements"


def test_exports_as_one_node_and_decomposes():
    class Router(torch.nn.Module):
        def forward(self, logits):
            return mr.moe_router(logits, 2, True)

    logits = randn(6, 4, seed=4)
    program = torch.export.export(Router(), (logits,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "archgen_v1.moe_router.default" in targets
    lowered = program.run_decompositions(mr.decomposition())
    assert not any(str(n.target).startswith("archgen_v1.") for n in lowered.graph.nodes if n.op == "call_function")
    for got, want in zip(lowered.module()(logits), runtime_router(logits, 2, True, None), strict=True):
        assert_close(got.double(), want.double(), 1e-6)


def test_the_lowered_op_runs_in_onnxruntime_at_other_token_counts(tmp_path):
    """The decomposition is standard ops only, with no shape fixed at the traced token count."""
    from archgen.export.onnx_export import onnx_session

    class Router(torch.nn.Module):
        def forward(self, logits, valid):
            return mr.moe_router(logits, 2, True, valid)

    tokens = torch.export.Dim("tokens", min=2, max=1024)
    logits, valid = randn(12, 5, seed=5).cpu(), torch.arange(12) % 3 != 0
    program = torch.export.export(Router(), (logits, valid), dynamic_shapes=({0: tokens}, {0: tokens}))
    onnx_program = torch.onnx.export(program.run_decompositions(mr.decomposition()), (), dynamo=True, opset_version=18,
                                     verbose=False)
    onnx_program.save(str(tmp_path / "router.onnx"))
    session = onnx_session(tmp_path / "router.onnx")
    for n in (7, 40):
        logits, valid = randn(n, 5, seed=n).cpu(), torch.arange(n) % 3 != 0
        got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), (logits, valid), strict=True)})
        for a, e in zip(got, runtime_router(logits, 2, True, valid), strict=True):
            assert_close(torch.from_numpy(a).double(), e.double(), 1e-6, f"{n} tokens")


@pytest.mark.parametrize("E", [2, 16, 100, 256, 1024])
def test_candidates_keep_the_tile_in_registers_and_put_the_default_first(E):
    width = 1 << (E - 1).bit_length()
    candidates = mr.candidates(E)
    assert candidates and all(c["BLOCK_N"] * width <= mr.MAX_TILE for c in candidates)
    assert candidates[0] == mr.DEFAULT_CONFIG or mr.DEFAULT_CONFIG not in candidates


def test_rejects_bad_inputs():
    logits = randn(4, 5)
    with pytest.raises(ValueError, match="top_k must be in"):
        mr.moe_router(logits, 6)
    with pytest.raises(ValueError, match=r"\(N, E\)"):
        mr.moe_router(logits[None], 2)
    with pytest.raises(ValueError, match="valid must be"):
        mr.moe_router(logits, 2, True, torch.ones(3, dtype=torch.bool, device=DEVICE))
