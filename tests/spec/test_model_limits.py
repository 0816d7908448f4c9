"""Model-level limits: what a forward pass needs against max_seq_len, and bounds that keep `archgen check` fast.

The largest spec the bounds accept (every width at its field bound, MAX_LAYERS layers of the heaviest layer there is,
MAX_PRESETS presets) must check in under 5 seconds of CPU time; at the old bound of 100,000 layers check took 115 s.
"""

from __future__ import annotations

import json
import time

import pytest
from click.testing import CliRunner

from archgen.cli import main
from archgen.errors import CompileError
from archgen.resolve.layout_types import MAX_LAYERS
from archgen.spec.limits import MAX_PRESETS
from archgen.spec.load import load_spec_text
from archgen.spec.models import MAX_SIZE

WIDE = MAX_SIZE


def largest_spec() -> str:
    presets = "".join(f"  p{i}: {{model: {{d_model: {WIDE - i}}}}}\n" for i in range(MAX_PRESETS))
    return f"""schema_version: 1
name: largest
model: {{d_model: {WIDE}, vocab_size: {WIDE}, max_seq_len: {WIDE}}}
mixers:
  attn: {{kind: attention, n_heads: {WIDE}, head_dim: 1, rope: null}}
  ssm: {{kind: mamba, d_state: {WIDE}, expand: {WIDE}}}
  ssd: {{kind: mamba2, head_dim: {WIDE}, expand: {WIDE}, chunk_size: {WIDE}}}
  sparse: {{kind: sparse_attention, n_heads: {WIDE}, head_dim: 1, rope: null, window: {WIDE}}}
  conv: {{kind: conv, d_conv: {WIDE}}}
ffns:
  moe: {{kind: moe, n_experts: {WIDE}, top_k: {WIDE}, shared_experts: {WIDE}, expert: {{hidden: {WIDE}}}}}
layout: {{n_layers: {MAX_LAYERS}, mixers: "attn|ssm|ssd|sparse|conv", ffns: moe}}
meta_tokens: {{count: {WIDE - 1}}}
memory: {{kind: titans, depth: 16, chunk_size: {WIDE}}}
symbolic: {{predicates: [a, b], learned_rules: {WIDE}, steps: 256}}
heads:
  lm: {{kind: lm}}
  medusa: {{kind: medusa, n_heads: 16, hidden_layers: 16}}
  jepa: {{kind: jepa, predictor_layers: 256}}
presets:
{presets}"""


def test_the_largest_accepted_spec_checks_in_under_five_seconds_with_an_exact_cost_report(tmp_path, monkeypatch):
    monkeypatch.setenv("ARCHGEN_VERIFY_IR", "0")  # time what a user runs; the suite's IR verifier doubles the work
    spec = tmp_path / "largest.yaml"
    spec.write_text(largest_spec(), encoding="utf-8")
    started = time.process_time()  # CPU time: the machine running the suite may be shared
    result = CliRunner().invoke(main, ["check", str(spec)])
    seconds = time.process_time() - started
    assert result.exit_code == 0, result.output
    assert f"preset p{MAX_PRESETS - 1}" in result.output
    assert seconds < 5, f"check took {seconds:.1f} s of CPU"

    result = CliRunner().invoke(main, ["inspect", str(spec), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    layers = report["layers"]
    assert isinstance(report["total_params"], int) and report["total_params"] == sum(row["params"] for row in layers)
    assert all(isinstance(row["params"], int) and isinstance(row["cache_bytes"], int) for row in layers)


@pytest.mark.parametrize("n_layers", [MAX_LAYERS + 1, 100_000])
def test_depth_above_the_bound_is_refused_with_a_fix(n_layers):
    text = f"""schema_version: 1
name: deep
model: {{d_model: 64, vocab_size: 256}}
mixers: {{attn: {{kind: attention, n_heads: 4}}}}
layout: {{mixers: "attn*{n_layers}"}}
"""
    from archgen.resolve.resolve import resolve

    with pytest.raises(CompileError) as caught:
        resolve(load_spec_text(text, "deep.yaml"))
    assert any(f"above the limit of {MAX_LAYERS}" in d.message and d.fix for d in caught.value.diagnostics)


BASE = """schema_version: 1
name: limited
model: {d_model: 64, vocab_size: 256, max_seq_len: 128}
mixers: {attn: {kind: attention, n_heads: 4}, ssd: {kind: mamba2, head_dim: 16, chunk_size: 64}}
layout: {n_layers: 2, mixers: "attn, ssd"}
"""


@pytest.mark.parametrize("extra, path, accepted", [
    ("meta_tokens: {count: 127}", "meta_tokens.count", True),
    ("meta_tokens: {count: 128}", "meta_tokens.count", False),
    ("meta_tokens: {count: 100001}", "meta_tokens.count", False),
    ("memory: {kind: titans, chunk_size: 128}", "memory.chunk_size", True),
    ("memory: {kind: titans, chunk_size: 129}", "memory.chunk_size", False),
])
def test_extras_are_checked_against_max_seq_len(extra, path, accepted):
    text = BASE + extra + "\n"
    if accepted:
        load_spec_text(text, "limits.yaml")
        return
    with pytest.raises(CompileError) as caught:
        load_spec_text(text, "limits.yaml")
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.path == path and "max_seq_len=128" in diagnostic.message and diagnostic.fix


@pytest.mark.parametrize("override, path", [
    ("mixers.attn.window=129", "mixers.attn.window"),
    ("mixers.ssd.chunk_size=256", "mixers.ssd.chunk_size"),
])
def test_mixer_lengths_are_checked_against_max_seq_len(override, path):
    with pytest.raises(CompileError) as caught:
        load_spec_text(BASE, "limits.yaml", overrides=[override])
    (diagnostic,) = caught.value.diagnostics
    assert diagnostic.path == path and diagnostic.location.file == f"--set {override}" and diagnostic.fix
    load_spec_text(BASE, "limits.yaml", overrides=[override.replace("129", "128").replace("256", "128")])
