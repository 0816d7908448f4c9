"""`archgen build --autotune`: the kernels a model uses are tuned at its shapes and the winners ship in the package
(kernels/tuning.json), which loads them at import and never tunes while running; an untuned shape runs a default
config and says so once; without a GPU the build refuses and writes nothing; without --autotune nothing changes.

Without a GPU the flow runs in Triton's interpreter (TRITON_INTERPRET=1 and ARCHGEN_TRITON_ON_CPU=1), where every
shape bucket "tunes" its one interpreter config: the plumbing, end to end, on a Mamba of width 16. The GPU run of the
same command is bench/rmsnorm_autotune.py's.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner

from archgen.cli import main
from archgen.emit.tune import seq_len_buckets, tuning_cases
from archgen.pipeline import compile_spec

SPEC = textwrap.dedent("""\
    schema_version: 1
    name: tuned_mamba
    model: {d_model: 16, vocab_size: 64, max_seq_len: 8, norm: {kind: rmsnorm, eps: 1.0e-5}}
    mixers:
      ssm: {kind: mamba, d_state: 4, d_conv: 4, expand: 2}
    ffns:
      mlp: {kind: mlp, activation: swiglu, hidden: 32}
    layout: {mixers: ssm*2, ffns: mlp}
    """)


@pytest.fixture
def spec(tmp_path):
    path = tmp_path / "tuned_mamba.yaml"
    path.write_text(SPEC)
    return path


def build(*args):
    return CliRunner().invoke(main, ["build", *map(str, args)])


def test_sequence_length_buckets_come_from_max_seq_len_and_the_command_line():
    assert seq_len_buckets(4096) == [256, 512, 1024, 2048, 4096]
    assert seq_len_buckets(3000, [1, 100]) == [1, 100, 256, 512, 1024, 2048, 3000]
    assert seq_len_buckets(8) == [8]


def test_cases_are_one_per_distinct_kernel_config_and_shape(spec):
    cases = tuning_cases(compile_spec(spec).ir, [8, 16], [1, 2])
    assert {c.file for c in cases} == {"selective_scan", "causal_conv1d", "state_update", "in_proj_conv", "rmsnorm",
                                       "silu_mul", "gemv", "greedy_pick"}
    assert len(cases) == 10 * 4, "the Mamba layers share one config, the norms another, the MLPs a third, and the GEMV " \
                                 "runs in the Mamba layers, the MLPs and the lm_head (with the greedy pick): each " \
                                 "kernel file tuned once per op config and batch × length"
    assert next(c for c in cases if c.file == "selective_scan").params["A_log"] == (32, 4)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_without_a_gpu_autotune_is_an_error_and_writes_nothing(spec, tmp_path, monkeypatch):
    monkeypatch.delenv("ARCHGEN_TRITON_ON_CPU", raising=False)
    result = build(spec, "--autotune", "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "--autotune: no CUDA GPU here" in result.output and "without --autotune" in result.output
    assert not (tmp_path / "out").exists()


def test_autotune_writes_the_table_the_package_loads_and_running_never_tunes(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHGEN_TRITON_ON_CPU", "1")  # interpreter: the plumbing runs on the CPU
    for name in ("plain", "tuned"):  # built with the same -o (the package's README and header name it), from two places
        (tmp_path / name).mkdir()
    monkeypatch.chdir(tmp_path / "plain")
    plain = build(spec, "-o", ".")
    monkeypatch.chdir(tmp_path / "tuned")
    tuned = build(spec, "--autotune", "--tune-dtype", "float32", "--tune-batch", "2", "-o", ".")
    assert plain.exit_code == 0 and tuned.exit_code == 0, plain.output + tuned.output
    assert "tuned 17 kernel configs of tuned_mamba" in tuned.output

    plain_files = {p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*") if p.is_file()}
    tuned_files = {p.relative_to(tmp_path / "tuned") for p in (tmp_path / "tuned").rglob("*") if p.is_file()}
    table_path = tmp_path / "tuned" / "tuned_mamba" / "kernels" / "tuning.json"
    assert tuned_files - plain_files == {table_path.relative_to(tmp_path / "tuned")}
    for path in plain_files:  # without --autotune the package is what it always was
        assert (tmp_path / "plain" / path).read_bytes() == (tmp_path / "tuned" / path).read_bytes(), path

    table = json.loads(table_path.read_text())
    assert table["tuned_for"]["batches"] == [2] and table["tuned_for"]["seq_lens"] == [8]
    keys = {(e["kernel"], e["key"]) for e in table["entries"]}
    assert keys == {("selective_scan.forward", "D32-N4-L4-float32"), ("selective_scan.forward", "D32-N4-L4-float32-checkpoints"),
                    ("selective_scan.backward", "D32-N4-L4-float32"),
                    *(("rms_norm." + kernel, f"N16-R1024-float32-{variant}") for kernel in ("forward", "backward")
                      for variant in ("plain", "fused")),
                    # the conv over a sequence (forward, one-pass backward) and a decoding step from its state
                    ("causal_conv1d.forward", "D32-K4-Tn-float32"), ("causal_conv1d.window_backward", "D32-K4-silu-float32"),
                    ("causal_conv1d.forward", "D32-K4-T1-state-float32"),
                    ("causal_conv1d.step_in_place", "D32-K4-step-in-place-state-float32"),  # the step in place
                    # every weight matrix at the decoding batch: in_proj (also the bucket of in_proj_conv_step_, which
                    # runs the GEMV's config) and lm_head, out_proj and down_proj, x_proj, dt_proj, gate_proj and
                    # up_proj, and the gate and up pair
                    *(("gemv.forward", f"N{n}-K{k}-M2-float32") for n, k in ((64, 16), (16, 32), (9, 32), (32, 1), (32, 16))),
                    ("gemv.forward", "N32-K16-M2-float32-gated")}
    assert all(e["gpu"] == "cpu" for e in table["entries"])

    # A fresh process, as a deployment imports it: the table is pinned at import; the tuned shape runs silently and
    # untimed; an untuned one (bfloat16) runs the default config with one warning, however many times it runs.
    script = textwrap.dedent(f"""
        import sys, warnings
        sys.path.insert(0, {str(tmp_path / "tuned")!r})
        import torch
        import tuned_mamba
        kernels = tuned_mamba.model.kernels
        support = kernels.triton_support
        assert support.RUNTIME_TUNING is False
        forward = support.TUNERS["selective_scan.forward"]
        assert set(forward.chosen) == {{"D32-N4-L4-float32", "D32-N4-L4-float32-checkpoints"}}, forward.chosen

        def run(dtype):
            g = torch.Generator().manual_seed(0)
            u, dt, z = (torch.randn(1, 5, 32, generator=g).to(dtype) for _ in range(3))
            B, C = (torch.randn(1, 5, 4, generator=g).to(dtype) for _ in range(2))
            A = -torch.rand(32, 4, generator=g)
            return kernels.selective_scan(u, dt, A, B, C, torch.ones(32), z)[0]

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run(torch.float32)
            assert not caught and not support.UNTUNED, [str(w.message) for w in caught]
            run(torch.bfloat16)
            run(torch.bfloat16)
        messages = [str(w.message) for w in caught if "no tuned config" in str(w.message)]
        assert len(messages) == 1, messages
        assert "selective_scan.forward at D32-N4-L4-bfloat16" in messages[0] and "--autotune" in messages[0]
        assert list(support.UNTUNED) == [("selective_scan.forward", "D32-N4-L4-bfloat16")]
        assert not forward.timings, "running never tunes"
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "TRITON_INTERPRET": "1", "ARCHGEN_TRITON_ON_CPU": "1"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr


def test_autotune_with_check_is_refused(spec, tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHGEN_TRITON_ON_CPU", "1")
    result = build(spec, "--autotune", "--check", "-o", tmp_path)
    assert result.exit_code == 2 and "--autotune and --check do not go together" in result.output


ATTENTION_MOE = textwrap.dedent("""\
    schema_version: 1
    name: tuned_attention_moe
    model: {d_model: 16, vocab_size: 64, max_seq_len: 8, norm: {kind: layernorm, eps: 1.0e-5}}
    mixers:
      attn: {kind: attention, n_heads: 4, n_kv_heads: 2, rope: {theta: 10000, rotary_dim: 2}}
    ffns:
      moe: {kind: moe, n_experts: 5, top_k: 2, expert: {activation: gelu, hidden: 8}}
    layout: {mixers: attn*2, ffns: moe}
    """)


def test_the_rope_and_router_hooks_tune_the_buckets_their_ops_run(tmp_path, monkeypatch):
    """kernels/rope.py's, kernels/decode_attention.py's and kernels/moe_router.py's `autotune` read the op's resolved
    config and parameter shapes (heads, head_dim and rotary_dim; experts and top_k) and tune exactly the buckets the
    model's calls will look up."""
    pytest.importorskip("triton")
    monkeypatch.setenv("ARCHGEN_TRITON_ON_CPU", "1")
    from archgen.resources import kernels_package

    kernels_package()
    import importlib

    from archgen_kernels import triton_support

    path = tmp_path / "tuned_attention_moe.yaml"
    path.write_text(ATTENTION_MOE)
    cases = tuning_cases(compile_spec(path).ir, [3], [2])
    # the GEMV: the attention's and lm_head's linears; the decode attention: a cached step's attention; qkv_rope: the
    # qkv GEMV with the rotation in its epilogue, which runs the GEMV's qkv bucket (below); the greedy pick (the
    # lm_head's, a fixed config: no hook)
    assert {c.file for c in cases} == {"rope", "moe_router", "gemv", "decode_attention", "qkv_rope", "greedy_pick"}
    gemv_cases = {c.file: c for c in cases if c.file in ("gemv", "qkv_rope") and "q_proj.weight" in c.params}
    cases = [c for c in cases if c.file not in ("gemv", "qkv_rope", "greedy_pick")]
    with triton_support.tuning_session() as table:
        for case in cases:
            module = importlib.import_module(f"archgen_kernels.{case.file}")
            module.autotune(case.config, case.params, case.batch, case.seqlen, torch.float32, "cpu")
        keys = {(e["kernel"], e["key"]) for e in table()["entries"]}
    # rope.write_kv: a cached forward of 3 tokens and a decoding step share the 8-token block's bucket; the decode
    # attention: 2 query heads a KV head, one query each, over a cache of the 3 slots (rounded up to 4)
    assert keys == {("rope.forward", "D4-R2-float32"), ("rope.write_kv", "D4-R2-float32-float32-T8"),
                    ("decode_attention.forward", "M2-S4-D4-float32"), ("moe_router.forward", "E8-k2-float32"),
                    ("moe_router.backward", "E8-k2-float32")}
    # qkv_rope's hook tunes the qkv bucket (q, k and v stacked: 16 + 2 × 8 rows of 16, 2 rows of x), which gemv's does too
    tuned = {}
    for file, case in gemv_cases.items():
        with triton_support.tuning_session() as table:
            importlib.import_module(f"archgen_kernels.{file}").autotune(case.config, case.params, case.batch,
                                                                        case.seqlen, torch.float32, "cpu")
            tuned[file] = {(e["kernel"], e["key"]) for e in table()["entries"]}
    assert ("gemv.forward", "N32-K16-M2-float32-qkv") in tuned["qkv_rope"] and tuned["qkv_rope"] <= tuned["gemv"]
