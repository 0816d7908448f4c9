"""Triton kernels in generated packages: copied only where a kind uses them, optional at import, and wired so that a
model computes the same thing with the kernel as with its reference op.

Without a GPU the kernel runs in Triton's interpreter (tests/conftest.py sets TRITON_INTERPRET=1), which is slow, so
the model here is a two-layer Mamba of width 16. The kernel's own numerics are tested in tests/kernels/.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from archgen.emit import emit
from archgen.pipeline import compile_spec
from tests.conftest import ROOT, assert_kernels_match_references, build_package, decode_in_steps
from tests.numerics import assert_close

SMALL_MAMBA = textwrap.dedent("""\
    schema_version: 1
    name: small_mamba
    model: {d_model: 16, vocab_size: 64, max_seq_len: 64, norm: {kind: rmsnorm, eps: 1.0e-5}}
    mixers:
      ssm: {kind: mamba, d_state: 4, d_conv: 4, expand: 2}
    ffns:
      mlp: {kind: mlp, activation: swiglu, hidden: 32}
    layout: {mixers: ssm*2, ffns: mlp}
    """)
SMALL_HSPMN = textwrap.dedent("""\
    schema_version: 1
    name: small_hspmn
    model: {d_model: 32, vocab_size: 64, max_seq_len: 64, norm: {kind: rmsnorm, eps: 1.0e-5}}
    mixers:
      reflex: {kind: conv, d_conv: 4}
      context: {kind: sparse_attention, n_heads: 2, n_kv_heads: 1, fraction: 0.4, rope: {theta: 10000}}
    ffns:
      mlp: {kind: mlp, activation: swiglu, hidden: 48}
    layout: {n_layers: 2, mixers: reflex|context, ffns: mlp, parallel_combine: sum}
    """)
ATTENTION_ONLY = textwrap.dedent("""\
    schema_version: 1
    name: attention_only
    model: {d_model: 32, vocab_size: 64, max_seq_len: 64, norm: {kind: layernorm, eps: 1.0e-5}}
    mixers:
      attn: {kind: attention, n_heads: 2, n_kv_heads: 1, rope: null}
    ffns:
      mlp: {kind: mlp, activation: gelu, hidden: 64}  # no kernel (SwiGLU's: kernels/silu_mul.py)
    layout: {mixers: attn*2, ffns: mlp}
    """)


def emitted_files(spec: str) -> dict[str, str]:
    return emit(compile_spec(ROOT / "specs" / spec, "tiny"), f"specs/{spec}").files


def test_a_mamba_model_carries_the_selective_scan_kernel_verbatim():
    files = emitted_files("nexus.yaml")
    assert files["kernels/selective_scan.py"] == (ROOT / "kernels" / "selective_scan.py").read_text()
    assert "from .selective_scan import selective_scan" in files["kernels/__init__.py"]
    assert "kernels.selective_scan(" in files["model.py"]


def test_hspmn_carries_the_packed_query_attention_kernel_verbatim():
    files = emitted_files("hspmn.yaml")
    assert files["kernels/packed_query_attention.py"] == (ROOT / "kernels" / "packed_query_attention.py").read_text()
    assert "from .packed_query_attention import packed_query_attention" in files["kernels/__init__.py"]
    assert "kernels.packed_query_attention(" in files["model.py"]


def test_a_kernel_file_comes_with_the_kernel_files_it_imports(tmp_path):
    """kernels/swiglu.py runs kernels/silu_mul.py's launchers: a MoE model without a gated MLP (so no silu_mul rule)
    carries both, verbatim, and its kernels/__init__.py imports only the functions its ops call."""
    spec = tmp_path / "small_moe.yaml"
    spec.write_text(SMALL_MOE)
    files = emit(compile_spec(spec, None), "small_moe.yaml").files
    assert files["kernels/silu_mul.py"] == (ROOT / "kernels" / "silu_mul.py").read_text()
    assert "from .silu_mul import" in files["kernels/swiglu.py"]
    assert "from .swiglu import swiglu" in files["kernels/__init__.py"]
    assert "silu_mul" not in files["kernels/__init__.py"]


def test_a_model_without_a_kernel_kind_has_only_the_gemv_the_decode_attention_and_the_greedy_pick(tmp_path):
    """An attention-only model: the GEMV of its linear layers, the split-KV attention of its decoding steps and the
    greedy pick of its captured steps."""
    spec = tmp_path / "attention_only.yaml"
    spec.write_text(ATTENTION_ONLY)
    files = emit(compile_spec(spec, None), "attention_only.yaml").files
    assert {path for path in files if path.startswith("kernels/")} == {
        "kernels/__init__.py", "kernels/triton_support.py", "kernels/gemv.py", "kernels/decode_attention.py",
        "kernels/greedy_pick.py"}
    functions = {line.split(" import ")[1] for line in files["kernels/__init__.py"].splitlines() if "from .gemv import" in line}
    assert functions == {"linear", "qkv_linear"}, "an MLP without SwiGLU has no gate to fuse: swiglu_linear is not shipped"


def test_the_package_runs_without_triton(tmp_path):
    """A CPU-only install without triton: the kernels are None and the reference ops run."""
    build_package(ROOT / "specs" / "nexus.yaml", tmp_path)
    script = textwrap.dedent(f"""
        import sys
        sys.modules["triton"] = None  # import triton now raises ImportError
        sys.path.insert(0, {str(tmp_path)!r})
        import torch
        import nexus
        assert nexus.model.kernels.selective_scan is None
        logits = nexus.Model()(torch.randint(0, 256, (1, 5))).logits
        assert torch.isfinite(logits).all()
        print("ok")
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def small_package(tmp_path, monkeypatch, name: str, text: str, kernel: str):
    pytest.importorskip("triton")
    monkeypatch.setenv("ARCHGEN_TRITON_ON_CPU", "1")  # the kernel, in Triton's interpreter, not the op's CPU reference
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(text)
    package = build_package(spec, tmp_path / "out", preset=None)
    if getattr(package.kernels, kernel) is None:
        pytest.skip("triton did not import")
    if not torch.cuda.is_available():  # the kernel takes CPU tensors only in Triton's interpreter
        package.model.use_kernel = lambda kernel, x: package.model.USE_KERNELS and kernel is not None
    return package


@pytest.fixture
def small_mamba(tmp_path, monkeypatch):
    return small_package(tmp_path, monkeypatch, "small_mamba", SMALL_MAMBA, "selective_scan")


@pytest.fixture
def small_hspmn(tmp_path, monkeypatch):
    return small_package(tmp_path, monkeypatch, "small_hspmn", SMALL_HSPMN, "packed_query_attention")


def test_kernel_and_reference_give_the_same_model(small_mamba):
    """Logits, loss and every gradient of one model, with the Triton kernels (conv1d + SiLU, scan) and with the
    reference ops."""
    torch.manual_seed(0)
    model = small_mamba.Model()
    tokens = torch.randint(0, 64, (2, 23))
    assert_kernels_match_references(small_mamba, model, tokens)


@pytest.mark.parametrize("conv_step", ["in_proj_conv_step_", "causal_conv1d_update_"])
def test_a_kernel_prefill_continues_into_kernel_decoding(small_mamba, monkeypatch, conv_step):
    """The conv and scan kernels' final states are the cache the kernel decode steps (in_proj's GEMV with the conv at
    T = 1 in its epilogue shifting the cache's conv state in place, in_proj_conv_step_, or, with that kernel off as
    bench/decode.py --without switches it, the conv step alone, causal_conv1d_update_; and mamba_step_low_rank_,
    which projects Δ and writes the SSM state in place) continue from: the same logits as one full pass of the
    reference ops."""
    torch.manual_seed(1)
    model = small_mamba.Model().eval()
    tokens = torch.randint(0, 64, (2, 12))
    steps_run, convs_run = [], []
    module = small_mamba.kernels.state_update_module
    step = module.mamba_step_low_rank_
    monkeypatch.setattr(module, "mamba_step_low_rank_", lambda *args: steps_run.append(1) or step(*args))
    if conv_step != "in_proj_conv_step_":
        monkeypatch.setattr(small_mamba.kernels, "in_proj_conv_step_", None)
    conv = getattr(small_mamba.kernels, conv_step)
    monkeypatch.setattr(small_mamba.kernels, conv_step,
                        lambda *args, **kwargs: convs_run.append(1) or conv(*args, **kwargs))
    with torch.no_grad():
        small_mamba.model.USE_KERNELS = False
        full = model(tokens).logits
        small_mamba.model.USE_KERNELS = True
    cached = decode_in_steps(model, tokens, prefill=9)
    assert len(steps_run) == len(convs_run) == 3 * 2  # three tokens, two layers
    assert_close(cached, full, 1e-5, "cached logits")


def test_hspmn_kernel_and_reference_give_the_same_model(small_hspmn):
    """Training mode (the router samples its selection; the same seed picks the same tokens for both): logits, loss
    and every gradient with the packed-query kernel and with ops/routing.py's packed_query_attention."""
    torch.manual_seed(0)
    model = small_hspmn.Model()
    tokens = torch.randint(0, 64, (2, 15))
    assert_kernels_match_references(small_hspmn, model, tokens, reseed=1)


def test_hspmn_kernel_decoding_equals_the_full_forward(small_hspmn):
    """Prefill, then one token at a time through the cache, all with the kernel: the logits of one full forward."""
    torch.manual_seed(2)
    model = small_hspmn.Model().eval()
    tokens = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        full = model(tokens).logits
    assert_close(decode_in_steps(model, tokens, prefill=7), full, 1e-5, "cached logits")


SMALL_ROPE = textwrap.dedent("""\
    schema_version: 1
    name: small_rope
    model: {d_model: 32, vocab_size: 64, max_seq_len: 64, norm: {kind: layernorm, eps: 1.0e-5}}
    mixers:
      attn:
        kind: attention
        n_heads: 4
        n_kv_heads: 2
        rope: {theta: 10000, scaling: yarn, factor: 4, original_max_position: 16, rotary_dim: 4}
    ffns:
      mlp: {kind: mlp, activation: swiglu, hidden: 48}
    layout: {mixers: attn*2, ffns: mlp}
    """)


@pytest.fixture
def small_rope(tmp_path, monkeypatch):
    package = small_package(tmp_path, monkeypatch, "small_rope", SMALL_ROPE, "apply_rope_qk")
    calls = []
    real = package.kernels.apply_rope_qk
    monkeypatch.setattr(package.kernels, "apply_rope_qk", lambda *args: calls.append(args[0].shape) or real(*args))
    package.rope_calls = calls
    writes, real_write = [], package.kernels.apply_rope_write_kv
    monkeypatch.setattr(package.kernels, "apply_rope_write_kv",
                        lambda *args: writes.append(args[0].shape) or real_write(*args))
    package.rope_write_calls = writes
    fused, real_fused = [], package.kernels.qkv_rope_write_kv_
    monkeypatch.setattr(package.kernels, "qkv_rope_write_kv_",
                        lambda *args: fused.append(args[0].shape) or real_fused(*args))
    package.qkv_rope_calls = fused
    return package


def test_rope_kernel_and_reference_give_the_same_model(small_rope):
    """YaRN on 4 of 8 head dims, grouped heads: logits, loss and every gradient with kernels/rope.py (one pass over q
    and k) and with ops/attention.py's apply_rope_qk."""
    torch.manual_seed(0)
    model = small_rope.Model()
    tokens = torch.randint(0, 64, (2, 13))
    assert_kernels_match_references(small_rope, model, tokens)
    assert small_rope.rope_calls, "the attention layers did not call kernels.apply_rope_qk"


def test_rope_kernel_in_place_decoding_equals_the_full_forward(small_rope):
    """Without gradients the kernel rotates q and k in place (the full pass), and a cached forward rotates q
    and writes the rotated k and v into the cache in the same launch (apply_rope_write_kv: the prefill; each decoding
    step's few rows also take their q, k and v products in it, qkv_rope_write_kv_; partial rotary): the cached logits
    are the full pass's."""
    torch.manual_seed(1)
    model = small_rope.Model().eval()
    tokens = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        full = model(tokens).logits
    assert len(small_rope.rope_calls) == 2 and not small_rope.rope_write_calls  # no cache: the rotation alone
    cached = decode_in_steps(model, tokens, prefill=6)
    assert len(small_rope.rope_calls) == 2, "a cached forward rotated without writing the cache in the same launch"
    assert len(small_rope.rope_write_calls) == 2, small_rope.rope_write_calls  # 2 layers' prefill
    assert len(small_rope.qkv_rope_calls) == 2 * 4, small_rope.qkv_rope_calls  # 2 layers, 4 steps
    assert_close(cached, full, 1e-5, "cached logits")


SMALL_WINDOWED = textwrap.dedent("""\
    schema_version: 1
    name: small_windowed
    model: {d_model: 32, vocab_size: 64, max_seq_len: 64, norm: {kind: layernorm, eps: 1.0e-5}}
    mixers:
      local: {kind: attention, n_heads: 4, n_kv_heads: 2, window: 5, rope: {theta: 10000}}
    ffns:
      mlp: {kind: mlp, activation: swiglu, hidden: 48}
    layout: {mixers: local*2, ffns: mlp}
    """)


@pytest.fixture
def small_windowed(tmp_path, monkeypatch):
    return small_package(tmp_path, monkeypatch, "small_windowed", SMALL_WINDOWED, "sliding_window_attention")


def test_windowed_attention_kernel_and_reference_give_the_same_model(small_windowed, monkeypatch):
    """Logits, loss and every gradient with the sliding-window kernel and with ops/attention.py's banded SDPA."""
    torch.manual_seed(0)
    model = small_windowed.Model()
    tokens = torch.randint(0, 64, (2, 20))
    calls = []
    kernel = small_windowed.kernels.sliding_window_attention
    monkeypatch.setattr(small_windowed.kernels, "sliding_window_attention", lambda *a, **kw: calls.append(1) or
                        kernel(*a, **kw))
    assert_kernels_match_references(small_windowed, model, tokens)
    assert len(calls) == 2, "both layers ran the kernel"


def test_an_output_gated_window_gates_the_kernels_output_too(tmp_path, monkeypatch):
    """With an output gate, the sliding-window kernel's output is gated as the banded SDPA's is (until session 14 the
    kernel's path returned o_proj(y) before the gate): logits, loss and gradients the same both ways."""
    spec = SMALL_WINDOWED.replace("rope: {theta: 10000}}", "rope: {theta: 10000}, output_gate: true}")
    package = small_package(tmp_path, monkeypatch, "small_windowed_gated", spec, "sliding_window_attention")
    torch.manual_seed(0)
    calls = []
    kernel = package.kernels.sliding_window_attention
    monkeypatch.setattr(package.kernels, "sliding_window_attention", lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    assert_kernels_match_references(package, package.Model(), torch.randint(0, 64, (2, 20)))
    assert len(calls) == 2, "both layers ran the kernel"


def test_windowed_kernel_forward_equals_ring_buffer_decoding_past_the_window(small_windowed):
    """The full forward (the kernel) against a prefill and one token at a time through the ring-buffer cache of 5
    slots, for 3x the window: the same logits."""
    torch.manual_seed(3)
    model = small_windowed.Model().eval()
    tokens = torch.randint(0, 64, (2, 17))
    with torch.no_grad():
        full = model(tokens).logits
    assert_close(decode_in_steps(model, tokens, prefill=2), full, 1e-5, "cached logits")


def test_split_kv_decode_attention_decodes_a_ragged_batch_as_the_reference(small_windowed, monkeypatch):
    """A left-padded batch decoded past the window through the ring caches: every step's attention on the split-KV
    kernel (kernels/decode_attention.py, its mask from the slots' positions with the pads hidden) gives the logits of
    the masked SDPA path (kernels off), the pad rows' empty queries included."""
    calls = []
    kernel = small_windowed.kernels.decode_attention_one_launch  # the splits combined in their launch: what runs
    monkeypatch.setattr(small_windowed.kernels, "decode_attention_one_launch",
                        lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    torch.manual_seed(4)
    model = small_windowed.Model().eval()
    tokens = torch.randint(1, 64, (3, 12))
    attention_mask = torch.ones_like(tokens)
    attention_mask[0, :4] = 0  # row 0: 4 pads, row 1: 1 pad, row 2: none
    attention_mask[1, :1] = 0
    with torch.no_grad():
        small_windowed.model.USE_KERNELS = False
        try:
            reference = decode_in_steps(model, tokens, prefill=3, attention_mask=attention_mask)
        finally:
            small_windowed.model.USE_KERNELS = True
        assert not calls
        kernels = decode_in_steps(model, tokens, prefill=3, attention_mask=attention_mask)
    assert len(calls) == 2 * (12 - 3) + 2, calls  # every step of both layers, and the prefill's 3 queries
    assert_close(kernels, reference, 1e-5, "ragged cached logits")


SMALL_MOE = textwrap.dedent("""\
    schema_version: 1
    name: small_moe
    model: {d_model: 16, vocab_size: 64, max_seq_len: 64, norm: {kind: rmsnorm, eps: 1.0e-5}}
    mixers:
      attn: {kind: attention, n_heads: 2}
    ffns:
      moe: {kind: moe, n_experts: 4, top_k: 2, expert: {activation: swiglu, hidden: 24}}
    layout: {mixers: attn, ffns: moe}
    """)


def test_a_swiglu_moe_runs_the_swiglu_and_router_kernels_and_computes_the_same(tmp_path, monkeypatch):
    """The MoE kind's kernels (kernels/swiglu.py, kernels/moe_router.py): shipped, called by the layer, and the
    model's logits and gradients (the router's through both auxiliary losses) equal the reference's. A GELU MoE gets
    no SwiGLU kernel."""
    pytest.importorskip("triton")
    monkeypatch.setenv("ARCHGEN_TRITON_ON_CPU", "1")
    spec = tmp_path / "small_moe.yaml"
    spec.write_text(SMALL_MOE)
    package = build_package(spec, tmp_path / "out", preset=None)
    if package.kernels.swiglu is None:
        pytest.skip("triton did not import")
    if not torch.cuda.is_available():
        package.model.use_kernel = lambda kernel, x: package.model.USE_KERNELS and kernel is not None
    calls, router_calls = [], []
    real, real_router = package.kernels.swiglu, package.kernels.moe_router
    monkeypatch.setattr(package.kernels, "swiglu", lambda h: calls.append(h.shape) or real(h))
    monkeypatch.setattr(package.kernels, "moe_router", lambda *args: router_calls.append(args[0].shape) or real_router(*args))
    torch.manual_seed(0)
    model = package.Model()
    tokens = torch.randint(0, 64, (2, 9))
    assert_kernels_match_references(package, model, tokens)
    assert calls, "the MoE layer did not call kernels.swiglu"
    assert router_calls, "the MoE layer did not call kernels.moe_router"
    gelu_spec = tmp_path / "gelu_moe.yaml"
    gelu_spec.write_text(SMALL_MOE.replace("swiglu", "gelu"))
    gelu = emit(compile_spec(gelu_spec), "gelu_moe.yaml").files
    assert "kernels/swiglu.py" not in gelu and "swiglu" not in gelu["model.py"]
