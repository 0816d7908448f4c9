"""archgen_kernels.triton_support: tuning tables pin winners only for the GPU and versions they were measured on,
and ops register once per process under the versioned namespace."""

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # must precede the first import of triton
pytest.importorskip("triton")

from archgen_kernels import selective_scan as ss
from archgen_kernels import triton_support
from tests.kernels.gpu_configs import GpuChoice, covering_set


@pytest.fixture
def fresh_tables(monkeypatch):
    """Tuners and pinned entries of this test only."""
    monkeypatch.setattr(triton_support, "TUNERS", {})
    monkeypatch.setattr(triton_support, "_PINNED", {})


def entry(key, block, **changes):
    return {**triton_support.environment(), "kernel": "op.forward", "key": key, "config": {"BLOCK_D": block, "num_warps": 4},
            **changes}


@pytest.mark.usefixtures("fresh_tables")
def test_a_table_pins_only_what_was_measured_here():
    tuner = triton_support.Autotuner("op.forward", [{"BLOCK_D": 16, "num_warps": 4}], {"BLOCK_D": 16, "num_warps": 4})
    table = {"format": 1, "entries": [
        entry("D64-bfloat16", 32),
        entry("D128-bfloat16", 64, gpu="Some Other GPU"),
        entry("D256-bfloat16", 64, torch="0.0.1"),
        entry("D512-bfloat16", 64, triton="0.0.1"),
    ]}
    assert triton_support.load_tuning_table(table) == 1
    assert tuner.chosen == {"D64-bfloat16": {"BLOCK_D": 32, "num_warps": 4}}


@pytest.mark.usefixtures("fresh_tables")
def test_a_table_pins_tuners_created_after_it_and_reads_back(tmp_path):
    path = tmp_path / "tuning.json"
    path.write_text(json.dumps({"format": 1, "entries": [entry("D64-float32", 32)]}))
    assert triton_support.load_tuning_table(path) == 1
    tuner = triton_support.Autotuner("op.forward", [], {})
    assert tuner.chosen == {"D64-float32": {"BLOCK_D": 32, "num_warps": 4}}
    assert triton_support.tuning_table() == {"format": 1, "entries": [entry("D64-float32", 32)]}


@pytest.mark.usefixtures("fresh_tables")
def test_a_table_of_another_format_is_refused():
    with pytest.raises(ValueError, match="tuning table format 2; this archgen reads format 1"):
        triton_support.load_tuning_table({"format": 2, "entries": []})


def test_ops_live_in_the_versioned_namespace_and_register_once():
    assert triton_support.OP_NAMESPACE == "archgen_v1"
    assert triton_support.op_overload("selective_scan") is torch.ops.archgen_v1.selective_scan.default
    # A second copy of the op file (a generated package's) gets the registered op back and registers nothing.
    again = triton_support.register_op("selective_scan", lambda *args: None, lambda *args: None)
    assert again is torch.ops.archgen_v1.selective_scan
    assert ss.decomposition(lambda *args, **kwargs: None, 8).keys() == {torch.ops.archgen_v1.selective_scan.default}


CONFIGS = [{"BLOCK_D": 16, "num_warps": 4}, {"BLOCK_D": 32, "num_warps": 8}]
INTERPRETER = {"BLOCK_D": 8, "num_warps": 1}


@pytest.mark.usefixtures("fresh_tables")
def test_a_tuning_session_tunes_every_new_bucket_and_tables_only_those(monkeypatch):
    monkeypatch.setattr(triton_support, "RUNTIME_TUNING", False)  # a session tunes even where running never does
    tuner = triton_support.Autotuner("op.forward", CONFIGS, INTERPRETER)
    tuner.pin({"D64-float32": CONFIGS[1]})  # chosen before the session: neither reused nor tabled inside it
    launched = []
    with triton_support.tuning_session() as table:
        for key in ("D64-float32", "D128-float32", "D64-float32"):
            tuner.known(key) or tuner.tune(key, launched.append)
        entries = table()["entries"]
    expected = INTERPRETER if triton_support.interpreting() else None
    assert [(e["kernel"], e["key"]) for e in entries] == [("op.forward", "D128-float32"), ("op.forward", "D64-float32")]
    assert all(e["gpu"] == triton_support.environment()["gpu"] and isinstance(e["ms"], float) for e in entries)
    if expected is not None:  # the interpreter times its one config: the plumbing, not a measurement
        assert launched == [INTERPRETER, INTERPRETER] and all(e["config"] == INTERPRETER for e in entries)
    assert tuner.chosen == {"D64-float32": CONFIGS[1]}, "the choices from before the session come back"
    assert triton_support.load_tuning_table({"format": 1, "entries": entries}) == 2


@pytest.mark.usefixtures("fresh_tables")
def test_without_runtime_tuning_an_untuned_bucket_runs_the_default_and_says_so_once(monkeypatch):
    monkeypatch.setattr(triton_support, "RUNTIME_TUNING", False)
    monkeypatch.setattr(triton_support, "UNTUNED", {})
    tuner = triton_support.Autotuner("op.forward", CONFIGS, INTERPRETER, default=CONFIGS[1])
    launched = []
    with pytest.warns(RuntimeWarning, match="no tuned config for op.forward at D64-float32") as caught:
        for key in ("D64-float32", "D128-float32", "D64-float32"):
            launched.append(tuner.known(key) or tuner.tune(key, lambda config: pytest.fail("timed at run time")))
    assert len([w for w in caught if "no tuned config" in str(w.message)]) == 1, "said once per process"
    default = INTERPRETER if triton_support.interpreting() else CONFIGS[1]
    assert launched == [default] * 3
    assert set(triton_support.UNTUNED) == {("op.forward", "D64-float32"), ("op.forward", "D128-float32")}
    assert tuner.chosen == {} and triton_support.tuning_table()["entries"] == []


@pytest.mark.usefixtures("fresh_tables")
def test_a_pinned_bucket_runs_its_config_without_tuning_or_warning(monkeypatch):
    monkeypatch.setattr(triton_support, "RUNTIME_TUNING", False)
    monkeypatch.setattr(triton_support, "UNTUNED", {})
    tuner = triton_support.Autotuner("op.forward", CONFIGS, INTERPRETER)
    triton_support.load_tuning_table({"format": 1, "entries": [entry("D64-float32", 32)]})
    assert tuner.known("D64-float32") == {"BLOCK_D": 32, "num_warps": 4}
    assert triton_support.UNTUNED == {}


@pytest.mark.usefixtures("fresh_tables")
def test_the_untuned_config_is_the_default_among_the_candidates_else_the_first():
    tuner = triton_support.Autotuner("op.forward", CONFIGS, INTERPRETER, default=CONFIGS[1])
    assert tuner.untuned_config(CONFIGS) == CONFIGS[1]
    assert tuner.untuned_config(CONFIGS[:1]) == CONFIGS[0], "the default filtered out for this shape: the first"


@pytest.mark.usefixtures("fresh_tables")
def test_the_gpu_configs_mode_launches_the_untuned_choice_then_each_other_candidate(gpu_configs):
    """tests/kernels/gpu_configs.py: the call's candidates, not the space or the interpreter's config; candidates
    that differ only in launch options count once; indices past the last clamp; explicit configs win; a tuner with
    more candidates than the test runs fails it."""
    space = [{"BLOCK": 16, "num_warps": 4}, {"BLOCK": 16, "num_warps": 8}, {"BLOCK": 32, "num_warps": 4},
             {"BLOCK": 64, "num_warps": 4}, {"BLOCK": 128, "num_warps": 4}]
    tuner = triton_support.Autotuner("op.forward", space, {"BLOCK": 2, "num_warps": 1}, default=space[3])
    shape_filtered = space[:4]  # what a launcher would pass: the 128 block does not fit this shape

    def launched(index, count=2, explicit=None):
        gpu_configs.choose(GpuChoice(index, count))
        return tuner.known("key", explicit) or tuner.tune("key", lambda config: None, shape_filtered)

    assert launched(None) == space[3]
    assert [launched(i) for i in range(3)] == [space[0], space[2], space[2]]
    assert launched(0, explicit={"BLOCK": 8}) == {"BLOCK": 8}
    with pytest.raises(AssertionError, match="op.forward has 2 other candidates at key, the test runs 1"):
        launched(0, count=1)
    assert gpu_configs.launched["op.forward"][:2] == [space[3], space[0]]
    # a covering set: every value of every field (C missing from a config: None) in 4 of the 6
    candidates = [{"A": 1, "B": 1}, {"A": 1, "B": 2}, {"A": 2, "B": 2}, {"A": 2, "B": 1, "C": 1},
                  {"A": 2, "B": 2, "C": 1}, {"A": 1, "B": 1, "C": 1, "num_warps": 8}]
    assert covering_set(candidates) == candidates[:4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs: a GPU's timing (the interpreter times one run)")
def test_a_short_launch_is_timed_from_graphs_without_the_hosts_time():
    """A decoding-sized launch (a few µs on the GPU, more on the host) timed as the tuner times it: from CUDA graphs,
    so its time is the GPU's (below the eager timing, which waits on the host), and with its inputs out of L2 (a
    16 MB copy then takes at least its bytes over a generous 10 TB/s)."""
    source = torch.randn(4 * 2**20, device="cuda")
    target = torch.empty_like(source)
    timed = triton_support._graph_time_ms(lambda: target.copy_(source))
    assert 2 * source.numel() * 4 / 10e12 * 1e3 < timed < 0.2, timed
    small = torch.zeros(16, device="cuda")
    assert triton_support._graph_time_ms(lambda: small.add_(1)) < 0.02

