"""kernels/rope.py against the runtime op it replaces (templates/runtime/attention.py apply_rope on q and on k): every
RoPE scaling, partial rotary, per-sequence angles, grouped heads, odd sizes, float32 and half precision; q's and k's
gradients; the in-place path (inference) on a projection's strided view; poisoned outputs; torch.export and the
decomposition. Without CUDA the kernel runs in Triton's CPU interpreter (TRITON_INTERPRET=1), so shapes are small.
"""

import pytest
import torch

pytest.importorskip("triton")

from archgen_kernels import rope
from templates.runtime import attention as runtime
from tests.kernels.gpu_configs import gpu_choices
from tests.numerics import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
SCALINGS = {  # rope_inv_freq's keyword arguments for each scaling the spec language has
    "none": {},
    "linear": {"factor": 4.0},
    "ntk": {"factor": 4.0},
    "yarn": {"factor": 8.0, "original_max_position": 64},
    "llama3": {"factor": 8.0, "original_max_position": 64, "low_freq_factor": 1.0, "high_freq_factor": 4.0},
}


def randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype)


def angles(rotary_dim: int, positions, scaling: str = "none"):
    inv_freq, mscale = runtime.rope_inv_freq(rotary_dim, theta=10000.0, scaling=scaling, **SCALINGS[scaling])
    return runtime.rope_cos_sin(inv_freq, torch.as_tensor(positions, device=DEVICE), mscale)


def projected(B, H, T, D, dtype, seed):
    """(B, H, T, D) as attention gets it: a view of a (B, T, H·D) projection, transposed (strides not contiguous)."""
    return randn(B, T, H * D, dtype=dtype, seed=seed).view(B, T, H, D).transpose(1, 2)


@pytest.mark.parametrize("scaling", list(SCALINGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("B", "HQ", "HK", "T", "D", "R"), [(2, 4, 2, 7, 16, 16), (1, 3, 1, 5, 24, 16),
                                                          (2, 2, 2, 9, 20, 12)], ids=lambda v: str(v))
def test_matches_runtime_rope_with_gradients(scaling, dtype, B, HQ, HK, T, D, R):
    check_with_gradients(scaling, dtype, B, HQ, HK, T, D, R)


def check_with_gradients(scaling, dtype, B, HQ, HK, T, D, R):
    q, k = projected(B, HQ, T, D, dtype, seed=1), projected(B, HK, T, D, dtype, seed=2)
    cos, sin = angles(R, torch.arange(T) + 3, scaling)
    dq_out, dk_out = randn(B, HQ, T, D, dtype=dtype, seed=3), randn(B, HK, T, D, dtype=dtype, seed=4)

    leaves = [q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()]
    q_rot, k_rot = rope.apply_rope_qk(*leaves, cos, sin)
    torch.autograd.backward([q_rot, k_rot], [dq_out, dk_out])

    ref_leaves = [q.detach().double().requires_grad_(), k.detach().double().requires_grad_()]
    q_ref, k_ref = (runtime.apply_rope(t, cos.double(), sin.double()) for t in ref_leaves)
    torch.autograd.backward([q_ref, k_ref], [dq_out.double(), dk_out.double()])

    assert q_rot.dtype == dtype and leaves[0].grad.dtype == dtype
    for name, got, want in (("q", q_rot, q_ref), ("k", k_rot, k_ref), ("dq", leaves[0].grad, ref_leaves[0].grad),
                            ("dk", leaves[1].grad, ref_leaves[1].grad)):
        assert_close(got.detach(), want.detach().to(dtype), TOL[dtype], name)
    # the pass-through channels are copied exactly, and so is their gradient
    assert torch.equal(q_rot[..., R:], q[..., R:]) and torch.equal(leaves[1].grad[..., R:], dk_out[..., R:])


@pytest.mark.parametrize("choice", gpu_choices(3))
@pytest.mark.parametrize(("B", "HQ", "HK", "T", "D", "R"), [(2, 5, 1, 37, 24, 16), (1, 3, 3, 1, 20, 12)],
                         ids=lambda v: str(v))
def test_every_gpu_config(gpu_configs, monkeypatch, choice, B, HQ, HK, T, D, R):
    """The rotation forward (in place too) and its gradient at each config a GPU can launch (gpu_configs.py): 37
    tokens (no multiple of any BLOCK_T), one decoding token, odd head counts, partial rotary, outputs poisoned."""
    gpu_configs.choose(choice)
    real_layout = rope.projection_layout
    monkeypatch.setattr(rope, "projection_layout", lambda t: real_layout(t).fill_(float("nan")))
    with gpu_configs.named():
        check_with_gradients("llama3", torch.bfloat16, B, HQ, HK, T, D, R)
        q, k = projected(B, HQ, T, D, torch.float32, seed=5), projected(B, HK, T, D, torch.float32, seed=6)
        cos, sin = angles(R, torch.arange(T) + 2, "yarn")
        q_ref, k_ref = runtime.apply_rope(q, cos, sin), runtime.apply_rope(k, cos, sin)
        rope.rope_forward(q, k, cos, sin, in_place=True)
        assert_close(q, q_ref, TOL[torch.float32], "q in place")
        assert_close(k, k_ref, TOL[torch.float32], "k in place")


def test_in_place_without_gradients_rotates_the_projection_where_it_lies():
    B, HQ, HK, T, D, R = 2, 4, 2, 6, 16, 8
    q, k = projected(B, HQ, T, D, torch.float32, seed=1), projected(B, HK, T, D, torch.float32, seed=2)
    cos, sin = angles(R, [[0, 1, 2, 3, 4, 5], [4, 5, 6, 7, 8, 9]], "yarn")  # (B, T, R/2): each row its positions
    q_ref, k_ref = runtime.apply_rope(q, cos, sin), runtime.apply_rope(k, cos, sin)
    q_storage = q.data_ptr()
    with torch.no_grad():
        q_rot, k_rot = rope.apply_rope_qk(q, k, cos, sin)
    assert q_rot is q and k_rot is k and q.data_ptr() == q_storage, "without gradients q and k rotate in place"
    assert_close(q, q_ref, 1e-5, "q")
    assert_close(k, k_ref, 1e-5, "k")


@pytest.mark.parametrize("programs_to_fill", [1, 6, 512])
def test_heads_split_over_programs_or_looped_in_one(programs_to_fill, monkeypatch):
    """Training shapes loop every head in one program per token block; decoding splits the heads over programs (an
    uneven split too: 5 q heads, 2 k heads over 3 programs): the same rotation."""
    monkeypatch.setattr(rope, "PROGRAMS_TO_FILL", programs_to_fill)
    q, k = projected(2, 5, 3, 16, torch.float32, seed=1), projected(2, 2, 3, 16, torch.float32, seed=2)
    cos, sin = angles(12, torch.arange(3) + 7, "llama3")
    q_rot, k_rot = rope.rope_forward(q, k, cos, sin)
    assert_close(q_rot, runtime.apply_rope(q, cos, sin), 1e-5, "q")
    assert_close(k_rot, runtime.apply_rope(k, cos, sin), 1e-5, "k")


def test_the_custom_ops_match_the_eager_path():
    """torch.compile and torch.export run the custom ops (and the functional one's registered autograd); eager mode
    the same implementations directly: the same rotations and gradients, in place too."""
    q, k = projected(1, 3, 5, 12, torch.float32, seed=1), projected(1, 1, 5, 12, torch.float32, seed=2)
    cos, sin = angles(8, torch.arange(5) + 1, "yarn")
    dq, dk = randn(1, 3, 5, 12, seed=3), randn(1, 1, 5, 12, seed=4)
    results = []
    for op in (rope.rope_op, rope._EagerRope.apply):
        leaves = [q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_()]
        out = op(*leaves, cos, sin, False)
        torch.autograd.backward(list(out), [dq, dk])
        results.append([*(t.detach() for t in out), *(t.grad for t in leaves)])
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
    q_op, k_op = q.clone(), k.clone()
    rope.rope_in_place_op(q_op, k_op, cos, sin)
    assert torch.equal(q_op, results[0][0]) and torch.equal(k_op, results[0][1])


@pytest.mark.parametrize("op", [rope.rope_op, rope._EagerRope.apply], ids=["custom_op", "eager"])
def test_the_gradients_reach_the_projection_in_its_layout(op):
    """The attention kernels hand back dq and dk contiguous as (B, H, T, D); the backward's rotation writes them laid
    out as the projection's output, so the view-and-transpose that made q and k passes them on without a copy."""
    B, HQ, HK, T, D = 2, 3, 1, 5, 8
    projection = randn(B, T, (HQ + HK) * D, seed=1).requires_grad_()
    q, k = projection.view(B, T, HQ + HK, D).transpose(1, 2).split([HQ, HK], dim=1)
    cos, sin = angles(D, torch.arange(T))
    layouts = []
    for t in (q, k):
        t.register_hook(lambda grad: layouts.append((grad.stride(), rope.projection_layout(grad).stride())))
    q_rot, k_rot = op(q, k, cos, sin, False)
    assert q_rot.stride() == rope.projection_layout(q_rot).stride(), "the forward keeps the projection's layout"
    torch.autograd.backward([q_rot, k_rot], [randn(B, HQ, T, D, seed=2), randn(B, HK, T, D, seed=3)])
    assert len(layouts) == 2 and all(got == want for got, want in layouts), layouts


def test_the_inverse_undoes_the_rotation():
    q, k = randn(1, 2, 5, 8, seed=1), randn(1, 1, 5, 8, seed=2)
    cos, sin = angles(8, torch.arange(5), "none")
    q_rot, k_rot = rope.rope_forward(q, k, cos, sin)
    q_back, k_back = rope.rope_forward(q_rot, k_rot, cos, sin, inverse=True)
    assert_close(q_back, q, 1e-5, "q")
    assert_close(k_back, k, 1e-5, "k")


def test_outputs_are_fully_written(monkeypatch):
    real_layout = rope.projection_layout
    monkeypatch.setattr(rope, "projection_layout", lambda t: real_layout(t).fill_(float("nan")))
    q, k = projected(2, 3, 5, 12, torch.float32, seed=1), projected(2, 1, 5, 12, torch.float32, seed=2)
    cos, sin = angles(8, torch.arange(5))
    for t in rope.rope_forward(q, k, cos, sin, config=rope.INTERPRETER_CONFIG):
        assert t.isfinite().all(), "unwritten (NaN) elements"


def test_exports_as_one_node_and_decomposes():
    class Rotate(torch.nn.Module):
        def forward(self, q, k, cos, sin):
            return rope.apply_rope_qk(q, k, cos, sin)

    q, k = randn(1, 2, 4, 8, seed=1), randn(1, 1, 4, 8, seed=2)
    cos, sin = angles(4, torch.arange(4))
    program = torch.export.export(Rotate(), (q, k, cos, sin))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "archgen_v1.apply_rope_qk.default" in targets
    lowered = program.run_decompositions(rope.decomposition(runtime_apply_rope_qk))
    assert not any(str(n.target).startswith("archgen_v1.") for n in lowered.graph.nodes if n.op == "call_function")
    for got, want in zip(lowered.module()(q, k, cos, sin), runtime_apply_rope_qk(q, k, cos, sin), strict=True):
        assert_close(got, want, 1e-6)


def test_the_lowered_op_runs_in_onnxruntime_at_other_lengths(tmp_path):
    """The decomposition is standard ops only, with no shape fixed at the traced length."""
    from archgen.export.onnx_export import onnx_session

    class Rotate(torch.nn.Module):
        def forward(self, q, k, cos, sin):
            return rope.apply_rope_qk(q, k, cos, sin)

    def inputs(T):
        cos, sin = angles(4, torch.arange(T) + 2)
        return randn(2, 4, T, 8, seed=T).cpu(), randn(2, 2, T, 8, seed=T + 1).cpu(), cos.cpu(), sin.cpu()

    length = torch.export.Dim("length", min=2, max=1024)
    program = torch.export.export(Rotate(), inputs(6), dynamic_shapes=({2: length}, {2: length}, {0: length},
                                                                       {0: length}))
    onnx_program = torch.onnx.export(program.run_decompositions(rope.decomposition(runtime_apply_rope_qk)), (),
                                     dynamo=True, opset_version=18, verbose=False)
    onnx_program.save(str(tmp_path / "rope.onnx"))
    session = onnx_session(tmp_path / "rope.onnx")
    for T in (3, 11):
        args = inputs(T)
        got = session.run(None, {i.name: a.numpy() for i, a in zip(session.get_inputs(), args, strict=True)})
        for a, e in zip(got, runtime_apply_rope_qk(*args), strict=True):
            assert_close(torch.from_numpy(a), e, 1e-6, f"{T} tokens")


def runtime_apply_rope_qk(q, k, cos, sin):
    return runtime.apply_rope_qk(q, k, cos, sin)


def test_rejects_bad_inputs():
    q, k = randn(1, 2, 4, 8), randn(1, 1, 4, 8)
    cos, sin = angles(8, torch.arange(4))
    with pytest.raises(ValueError, match="exceeds head_dim"):
        rope.apply_rope_qk(q[..., :6], k[..., :6], cos, sin)
    with pytest.raises(ValueError, match=r"\(T, R/2\)"):
        rope.apply_rope_qk(q, k, cos[:3], sin[:3])
    with pytest.raises(ValueError, match="one dtype"):
        rope.apply_rope_qk(q, k.double(), cos, sin)
    with pytest.raises(ValueError, match="must be"):
        rope.apply_rope_qk(q, randn(1, 1, 5, 8), cos, sin)


# ---------------------------------------------------------------------------------------------------------------
# A cached step's rotation and cache write in one launch (apply_rope_write_kv)
# ---------------------------------------------------------------------------------------------------------------


def poisoned_caches(B, HK, L, D, dtype):
    """Caches whose every slot is NaN: a slot the kernel writes must come out finite, one it must not stays NaN."""
    return (torch.full((B, HK, L, D), float("nan"), device=DEVICE, dtype=dtype) for _ in "kv")


def check_write_kv(B, HQ, HK, T, D, R, L, slots, dtype, cache_dtype, per_sequence=False, config=None):
    """The op (eager entry point) against the reference (rotation, index_copy_) on fresh inputs and poisoned caches:
    q rotated into a new tensor, q, k and v untouched, the caches' slots written, every other slot left as it was."""
    q, k, v = (projected(B, H, T, D, dtype, seed=seed) for seed, H in ((11, HQ), (12, HK), (13, HK)))
    positions = torch.tensor(slots).reshape(1, T) + torch.arange(B).reshape(B, 1) if per_sequence else slots
    cos, sin = angles(R, positions, "yarn")
    slots = torch.as_tensor(slots, device=DEVICE)
    k_cache, v_cache = poisoned_caches(B, HK, L, D, cache_dtype)
    k_ref_cache, v_ref_cache = k_cache.clone(), v_cache.clone()
    q_ref = rope.apply_rope_write_kv_reference(q, k, v, cos, sin, k_ref_cache, v_ref_cache, slots)
    q_before, k_before, v_before = q.clone(), k.clone(), v.clone()
    with torch.no_grad():
        if config is None:
            q_out = rope.apply_rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
        else:
            q_out = rope.rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots, config=config)
    assert q_out.data_ptr() != q.data_ptr(), "q rotated into a new tensor"
    assert all(torch.equal(a, b) for a, b in ((q, q_before), (k, k_before), (v, v_before))), "q, k, v left alone"
    assert_close(q_out, q_ref, TOL[dtype], "q")
    written = torch.zeros(L, dtype=torch.bool, device=DEVICE)
    written[slots] = True
    for name, got, want in (("k cache", k_cache, k_ref_cache), ("v cache", v_cache, v_ref_cache)):
        assert got[:, :, written].isfinite().all(), f"{name}: a slot written is NaN"
        assert got[:, :, ~written].isnan().all(), f"{name}: a slot not written was touched"
        assert_close(got[:, :, written], want[:, :, written], TOL[cache_dtype], name)
    # v is copied exactly (cast once), and so are k's pass-through channels
    assert torch.equal(v_cache[:, :, slots], v.to(cache_dtype))
    assert torch.equal(k_cache[:, :, slots, R:], k[..., R:].to(cache_dtype))


@pytest.mark.parametrize(("dtype", "cache_dtype"), [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                    (torch.float16, torch.float32)], ids=str)
@pytest.mark.parametrize(("B", "HQ", "HK", "T", "D", "R", "L", "slots"), [
    (1, 5, 1, 1, 16, 16, 8, [5]),  # a decoding step: one token into a plain cache
    (2, 3, 3, 1, 20, 12, 6, [0]),  # partial rotary, odd heads (MHA), the ring's slot 0 after it wrapped
    (2, 4, 2, 6, 24, 16, 16, list(range(7, 13))),  # a chunk of a prompt at start 7
    (1, 3, 1, 5, 16, 8, 5, [3, 4, 0, 1, 2]),  # slots wrapping round a ring of 5
], ids=lambda v: str(v))
def test_write_kv_matches_the_rotation_and_index_copy(dtype, cache_dtype, B, HQ, HK, T, D, R, L, slots):
    check_write_kv(B, HQ, HK, T, D, R, L, slots, dtype, cache_dtype)


def test_write_kv_takes_per_sequence_angles():
    check_write_kv(2, 4, 2, 3, 16, 16, 9, [2, 3, 4], torch.float32, torch.float32, per_sequence=True)


def test_write_kv_reads_strided_slots():
    q, k, v = randn(1, 2, 3, 8, seed=1), randn(1, 1, 3, 8, seed=2), randn(1, 1, 3, 8, seed=3)
    cos, sin = angles(8, torch.arange(3))
    slots = torch.tensor([5, 0, 3, 0, 1, 0], device=DEVICE)[::2]  # [5, 3, 1], stride 2
    k_cache, v_cache = poisoned_caches(1, 1, 6, 8, torch.float32)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    q_ref = rope.apply_rope_write_kv_reference(q, k, v, cos, sin, k_ref, v_ref, slots)
    q_out = rope.rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
    assert_close(q_out, q_ref, 1e-5, "q")
    for got, want in ((k_cache, k_ref), (v_cache, v_ref)):
        assert torch.equal(got.isnan(), want.isnan())
        assert_close(got.nan_to_num(), want.nan_to_num(), 1e-5, "cache")


@pytest.mark.parametrize("choice", gpu_choices(3))
@pytest.mark.parametrize(("T", "slots"), [(1, [6]), (37, list(range(37)))], ids=["decode", "T37"])
def test_write_kv_every_gpu_config(gpu_configs, choice, T, slots):
    """At each config a GPU can launch for the call (write_candidates: one for a decoding step)."""
    gpu_configs.choose(choice)
    with gpu_configs.named():
        check_write_kv(2, 5, 1, T, 24, 16, 40, slots, torch.bfloat16, torch.bfloat16)


def test_write_kv_candidates_fit_the_tokens():
    assert [c["BLOCK_T"] for c in rope.write_candidates(1)] == [8]
    assert {c["BLOCK_T"] for c in rope.write_candidates(12)} == {8, 16}
    assert rope.write_candidates(1000) == rope.CONFIGS


def test_write_kv_with_a_gradient_or_a_strided_head_takes_the_functional_path():
    """q needing a gradient gets a new rotated q with its gradient (the caches written as the reference writes them);
    the same result as without."""
    B, HQ, HK, T, D, R, L = 1, 2, 1, 2, 8, 8, 4
    q, k, v = randn(B, HQ, T, D, seed=1), randn(B, HK, T, D, seed=2), randn(B, HK, T, D, seed=3)
    cos, sin = angles(R, torch.arange(T) + 1)
    slots = torch.tensor([1, 2], device=DEVICE)
    k_cache, v_cache = (torch.zeros(B, HK, L, D, device=DEVICE) for _ in "kv")
    leaf = q.clone().requires_grad_()
    q_rot = rope.apply_rope_write_kv(leaf, k, v, cos, sin, k_cache, v_cache, slots)
    assert q_rot is not leaf and q_rot.requires_grad
    q_rot.sum().backward()
    k_ref, v_ref = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    q_ref = rope.apply_rope_write_kv_reference(q, k, v, cos, sin, k_ref, v_ref, slots)
    assert_close(q_rot.detach(), q_ref, 1e-5, "q")
    assert_close(k_cache, k_ref, 1e-5, "k cache")
    assert torch.equal(v_cache, v_ref) and leaf.grad is not None


def test_write_kv_custom_op_matches_the_eager_path_and_passes_opcheck():
    """torch.compile and CUDA graphs' recording see the custom op (its schema says it writes the caches; the fake
    gives q's rotation the kernel's layout); eager mode calls its implementation directly: the same results."""
    B, HQ, HK, T, D, R, L = 1, 3, 1, 2, 12, 8, 6
    q, k, v = randn(B, HQ, T, D, seed=1), randn(B, HK, T, D, seed=2), randn(B, HK, T, D, seed=3)
    cos, sin = angles(R, torch.arange(T) + 4)
    slots = torch.tensor([4, 5], device=DEVICE)
    results = []
    for run in (rope.rope_write_kv_op, rope._rope_write_kv_impl):
        k_cache, v_cache = torch.zeros(B, HK, L, D, device=DEVICE), torch.zeros(B, HK, L, D, device=DEVICE)
        q_out = run(q, k, v, cos, sin, k_cache, v_cache, slots)
        results.append((q_out, k_cache, v_cache))
    for got, want in zip(*results, strict=True):
        assert torch.equal(got, want)
    args = (q.clone(), k, v, cos, sin, torch.zeros(B, HK, L, D, device=DEVICE), torch.zeros(B, HK, L, D, device=DEVICE),
            slots)
    torch.library.opcheck(rope.rope_write_kv_op, args, test_utils=("test_schema", "test_faketensor"))


def test_write_kv_exports_without_the_mutating_op():
    """While torch.export traces, the entry point takes the functional rotation and index_copy_: the program holds
    apply_rope_qk (which the decomposition lowers) and no mutating custom op, and computes the same."""

    class Step(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("k_cache", torch.zeros(1, 1, 6, 8))
            self.register_buffer("v_cache", torch.zeros(1, 1, 6, 8))

        def forward(self, q, k, v, cos, sin, slots):
            q = rope.apply_rope_write_kv(q, k, v, cos, sin, self.k_cache, self.v_cache, slots)
            return q, self.k_cache + 0, self.v_cache + 0

    q, k, v = randn(1, 2, 1, 8, seed=1).cpu(), randn(1, 1, 1, 8, seed=2).cpu(), randn(1, 1, 1, 8, seed=3).cpu()
    cos, sin = (t.cpu() for t in angles(8, torch.arange(1) + 3))
    slots = torch.tensor([3])
    program = torch.export.export(Step(), (q, k, v, cos, sin, slots))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "archgen_v1.apply_rope_qk.default" in targets
    assert not any("write_kv" in target for target in targets), targets
    lowered = program.run_decompositions(rope.decomposition(runtime_apply_rope_qk))
    assert not any(str(n.target).startswith("archgen_v1.") for n in lowered.graph.nodes if n.op == "call_function")
    k_cache, v_cache = torch.zeros(1, 1, 6, 8), torch.zeros(1, 1, 6, 8)
    want = (rope.apply_rope_write_kv_reference(q, k, v, cos, sin, k_cache, v_cache, slots), k_cache, v_cache)
    for got, expected in zip(lowered.module()(q, k, v, cos, sin, slots), want, strict=True):
        assert_close(got, expected, 1e-6)


def test_write_kv_rejects_bad_caches():
    q, k, v = randn(1, 2, 1, 8), randn(1, 1, 1, 8), randn(1, 1, 1, 8)
    cos, sin = angles(8, torch.arange(1))
    k_cache, v_cache = torch.zeros(1, 1, 4, 8, device=DEVICE), torch.zeros(1, 1, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match="caches"):
        rope.apply_rope_write_kv(q, k, v, cos, sin, k_cache[..., :6], v_cache[..., :6], torch.tensor([0], device=DEVICE))
    with pytest.raises(ValueError, match="slots"):
        rope.apply_rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, torch.tensor([0, 1], device=DEVICE))


def test_write_kv_compiles_in_one_graph():
    """Under torch.compile the custom op is one node of one graph (fullgraph: no break), and the functionalized graph
    returns q rotated, leaves the input q alone and writes the caches, as eager does (on torch 2.11 a q mutated in
    place kept its input values under compile: gpu11)."""
    B, HQ, HK, T, D, R, L = 1, 3, 1, 1, 16, 8, 4
    q, k, v = randn(B, HQ, T, D, seed=1), randn(B, HK, T, D, seed=2), randn(B, HK, T, D, seed=3)
    cos, sin = angles(R, torch.arange(T) + 2)
    slots = torch.tensor([2], device=DEVICE)

    def step(q, k, v, cos, sin, k_cache, v_cache, slots):
        return rope.apply_rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, slots) * 2

    results = []
    for run in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        q_in, k_cache, v_cache = q.clone(), torch.zeros(B, HK, L, D, device=DEVICE), torch.zeros(B, HK, L, D,
                                                                                                 device=DEVICE)
        with torch.no_grad():
            out = run(q_in, k, v, cos, sin, k_cache, v_cache, slots)
        results.append((out, q_in, k_cache, v_cache))
    for got, want in zip(*results, strict=True):
        assert_close(got, want, 1e-6)
    assert torch.equal(results[1][1], q), "the input q is left alone"
    assert results[0][2][:, :, 2].abs().sum() > 0, "the cache slot was written"


# ---------------------------------------------------------------------------------------------------------------
# The angles: rope_cos_sin
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scaling", ["none", "yarn"])
@pytest.mark.parametrize("freq_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [(1,), (37,), (2, 5)], ids=str)
def test_angles_match_the_runtime_rope_cos_sin(scaling, freq_dtype, shape):
    """Fresh random positions (up to 8k, as a long decode reaches) and frequencies in the model's dtype (a bf16
    model's buffer): the kernel's cos and sin are the runtime's, to a float32 ulp or two (relative to the largest: the
    interpreter's numpy cos may round differently from torch's), with mscale applied (YaRN's is not 1)."""
    inv_freq, mscale = runtime.rope_inv_freq(16, theta=10000.0, scaling=scaling, **SCALINGS[scaling])
    inv_freq = inv_freq.to(device=DEVICE, dtype=freq_dtype)
    positions = torch.randint(0, 8192, shape, generator=torch.Generator().manual_seed(len(shape))).to(DEVICE)
    cos, sin = rope.rope_cos_sin(inv_freq, positions, mscale)
    cos_ref, sin_ref = runtime.rope_cos_sin(inv_freq, positions, mscale)
    assert cos.shape == sin.shape == (*shape, 8) and cos.dtype == sin.dtype == torch.float32
    if DEVICE == "cuda":  # libdevice's cosf and sinf, as torch's kernels: equal bits (H200, triton 3.6, session 20)
        assert torch.equal(cos, cos_ref) and torch.equal(sin, sin_ref)
    assert_close(cos, cos_ref, 1e-6)
    assert_close(sin, sin_ref, 1e-6)


def test_angles_of_float_positions_and_float64_take_the_reference():
    """Interpolated (float) positions in float32 run the kernel; float64 positions or frequencies compute as written."""
    inv_freq, _ = runtime.rope_inv_freq(8, theta=500.0, scaling="none")
    positions = torch.rand(6, generator=torch.Generator().manual_seed(3)) * 100
    cos, sin = rope.rope_cos_sin(inv_freq.to(DEVICE), positions.to(DEVICE))
    assert_close(cos, runtime.rope_cos_sin(inv_freq, positions)[0].to(DEVICE), 1e-6)
    cos64, _ = rope.rope_cos_sin(inv_freq.double().to(DEVICE), positions.double().to(DEVICE))
    assert cos64.dtype == torch.float32 and torch.equal(cos64, rope.rope_cos_sin_reference(
        inv_freq.double().to(DEVICE), positions.double().to(DEVICE))[0])


def test_angles_custom_op_matches_the_eager_path_and_exports_as_the_reference():
    """torch.compile and CUDA graphs' recording see the custom op (opcheck: schema and fake); eager mode calls the
    implementation; while torch.export traces, the entry point is the reference's ops (no custom op to lower)."""
    inv_freq, _ = runtime.rope_inv_freq(8, theta=10000.0, scaling="none")
    inv_freq, positions = inv_freq.to(DEVICE), torch.tensor([3, 900, 17], device=DEVICE)
    through_op = rope.angles_op(inv_freq, positions, 1.0)
    direct = rope._angles_impl(inv_freq, positions, 1.0)
    assert all(torch.equal(a, b) for a, b in zip(through_op, direct, strict=True))
    torch.library.opcheck(rope.angles_op, (inv_freq, positions, 0.5), test_utils=("test_schema", "test_faketensor"))

    class Angles(torch.nn.Module):
        def forward(self, positions):
            return rope.rope_cos_sin(inv_freq, positions)

    program = torch.export.export(Angles(), (positions,))
    assert not any("rope_cos_sin" in str(node.target) for node in program.graph.nodes)
    assert_close(program.module()(positions)[1], direct[1], 1e-6)
