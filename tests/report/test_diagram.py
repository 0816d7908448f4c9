"""The layer diagram is valid SVG that shows every module of the model with a label in the picture (not only in
tooltips), tells windowed from global attention, and wraps long models into rows."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from archgen.pipeline import compile_spec
from archgen.report.diagram import ROW, layout_svg
from tests.conftest import ROOT

SVG = "{http://www.w3.org/2000/svg}"


def drawn(spec: str, preset: str | None = "tiny", overrides: tuple[str, ...] = ()):
    resolved = compile_spec(ROOT / "specs" / spec, preset, overrides).resolved
    root = ET.fromstring(layout_svg(resolved))
    return resolved, root, [t.text for t in root.iter(f"{SVG}title")], ["".join(t.itertext()) for t in root.iter(f"{SVG}text")]


def test_diagram_draws_every_branch_and_feed_forward():
    resolved, _, titles, _ = drawn("hymba_plus.yaml")
    for layer in resolved.layers:
        for name in layer.mixers:
            assert any(t.startswith(f"layer {layer.index}: {name} (") for t in titles)
        assert any(t.startswith(f"layer {layer.index}: {layer.ffn} (") for t in titles)


def test_meta_tokens_heads_and_the_ends_are_labelled_in_the_picture():
    _, _, _, texts = drawn("hymba_plus.yaml")
    assert "meta ×4" in texts and "emb" in texts and "norm" in texts
    assert "lm head, tied" in texts


def test_memory_symbolic_and_heads_of_nexus_are_labelled():
    _, _, _, texts = drawn("nexus.yaml")
    assert "memory (titans)" in texts and "symbolic (symbolic)" in texts
    assert "jepa head" in texts


def test_windowed_attention_is_drawn_apart_from_global_attention():
    _, root, _, texts = drawn("hymba_plus.yaml")
    striped = [t.text for g in root.iter(f"{SVG}g") if any(r.get("fill") == "url(#window)" for r in g.iter(f"{SVG}rect"))
               for t in g.iter(f"{SVG}title")]
    assert any(s.endswith(": attn (attention, window 16)") for s in striped), striped
    assert not any("global_attn" in s for s in striped)
    assert "attn: attention, window 16" in texts and "global_attn: attention" in texts


def test_a_hundred_layers_wrap_into_rows_of_readable_width():
    resolved, root, titles, texts = drawn("hns_ss_jepa_moe.yaml", None, ("layout.n_layers=100",))
    assert resolved.n_layers == 100
    assert float(root.get("width")) < 1400, "one row of 100 columns would be ~3,000 px wide"
    assert float(root.get("height")) > 4 * 60, "four rows"
    assert sum(t.startswith("layer ") for t in titles) == 200 and str(4 * (ROW // 4) * 3) in texts
