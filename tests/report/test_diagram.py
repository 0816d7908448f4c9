"""The layer diagram is valid SVG with one box per mixer branch and feed-forward."""

from __future__ import annotations

import xml.etree.ElementTree as ET

from archgen.pipeline import compile_spec
from archgen.report.diagram import layout_svg
from tests.conftest import ROOT

SVG = "{http://www.w3.org/2000/svg}"


def test_diagram_draws_every_branch_and_feed_forward():
    resolved = compile_spec(ROOT / "specs" / "hymba_plus.yaml", "tiny").resolved
    root = ET.fromstring(layout_svg(resolved))
    titles = [t.text for t in root.iter(f"{SVG}title")]
    for layer in resolved.layers:
        for name in layer.mixers:
            assert any(t.startswith(f"layer {layer.index}: {name} (") for t in titles)
        assert any(t.startswith(f"layer {layer.index}: {layer.ffn} (") for t in titles)
    assert any("4 meta tokens" == t for t in titles)
