"""Shape inference over the IR: symbolic batch and length, meta tokens in the sequence, head output shapes."""

from __future__ import annotations

import networkx as nx

from archgen.pipeline import compile_spec
from tests.conftest import ROOT


def test_every_op_gets_shapes_and_the_graph_is_a_dag():
    ir = compile_spec(ROOT / "specs" / "hns_ss_jepa_moe.yaml", "tiny").ir
    assert nx.is_directed_acyclic_graph(ir.graph)
    assert list(nx.topological_sort(ir.graph))[0] == "embed"
    for op in ir.ops():
        assert op.out_shape is not None, op.name
    assert ir.op("embed").in_shapes == [("B", "T")]
    assert ir.op("layers.3.mixer").out_shape == ("B", "T", 64)
    assert ir.op("lm_head").out_shape == ("B", "T", 256)
    assert ir.op("heads.medusa").out_shape == (2, "B", "T", 256)


def test_meta_tokens_lengthen_the_backbone_sequence_and_no_logits_are_made_at_their_positions():
    ir = compile_spec(ROOT / "specs" / "hymba_plus.yaml", "tiny").ir
    assert ir.op("meta").out_shape == ("B", "T+4", 64)
    assert ir.op("layers.0.mixer").out_shape == ("B", "T+4", 64)
    assert ir.op("drop_meta").out_shape == ir.op("norm_f").out_shape == ("B", "T", 64)
    assert ir.op("lm_head").out_shape == ("B", "T", 256)


def test_parallel_branches_feed_one_combine_node():
    ir = compile_spec(ROOT / "specs" / "hymba_plus.yaml", "tiny").ir
    combine = ir.op("layers.1.mixer")
    assert combine.kind == "parallel_combine"
    assert sorted(ir.graph.predecessors("layers.1.mixer")) == ["layers.1.mixer.attn", "layers.1.mixer.ssm"]
    assert combine.in_shapes == [("B", "T+4", 64)] * 2


def test_ops_follow_the_resolved_layout():
    compiled = compile_spec(ROOT / "specs" / "nexus.yaml", "tiny")
    kinds = [compiled.ir.op(f"layers.{i}.mixer").kind for i in range(compiled.resolved.n_layers)]
    assert [i for i, kind in enumerate(kinds) if kind == "attention"] == [4, 12]
    assert compiled.ir.op("memory").layer == compiled.resolved.n_layers - 1
