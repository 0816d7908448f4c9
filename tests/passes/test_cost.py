"""Training FLOPs in the cost model: forward and backward (3 × forward) plus the backbone passes a head adds."""

from pathlib import Path

import pytest

from archgen.passes.cost import cost_report
from archgen.pipeline import compile_spec

ROOT = Path(__file__).resolve().parents[2]


def test_training_flops_are_three_forwards_without_extra_passes():
    report = cost_report(compile_spec(ROOT / "specs/hymba_plus.yaml", "tiny").ir, seq_len=64)
    assert report.train_flops_per_token == 3 * report.forward_flops_per_token


def test_jepa_adds_a_trained_and_an_untrained_pass_of_the_backbone():
    """Nexus's JEPA head runs the backbone on the masked sequence (forward and backward: 3 ×) and on the target
    encoder's copy (forward only: 1 ×); the backbone is the model without its heads and without the unembedding."""
    seq_len = 64
    with_jepa = compile_spec(ROOT / "specs/nexus.yaml", "tiny")
    without_heads = cost_report(compile_spec(ROOT / "specs/nexus.yaml", "tiny", ("heads={}",)).ir, seq_len=seq_len)
    dims = with_jepa.ir.dims
    backbone = without_heads.forward_flops_per_token - 2 * dims.d_model * dims.vocab_size
    report = cost_report(with_jepa.ir, seq_len=seq_len)
    assert report.train_flops_per_token == pytest.approx(3 * report.forward_flops_per_token + 4 * backbone, rel=1e-12)


def test_the_layers_are_counted_over_the_meta_tokens_positions_too():
    """Hymba's meta tokens go through every layer with the sequence (the layers process T + count positions) and are
    dropped before the output layer: the layers cost what they cost without meta tokens at T + count, the
    unembedding what it costs at T, and the attention caches hold the meta tokens' keys."""
    seq_len, count = 60, 4  # the tiny preset's meta tokens
    with_meta = cost_report(compile_spec(ROOT / "specs/hymba_plus.yaml", "tiny").ir, seq_len=seq_len, context=seq_len)
    longer = cost_report(compile_spec(ROOT / "specs/hymba_plus.yaml", "tiny", ("meta_tokens=null",)).ir,
                         seq_len=seq_len + count, context=seq_len + count)
    layers = [layer for layer in with_meta.layers if layer.index is not None]
    layers_longer = [layer for layer in longer.layers if layer.index is not None]
    assert len(layers) == len(layers_longer) == 4
    for layer, peer in zip(layers, layers_longer, strict=True):
        assert layer.flops_per_token * seq_len == pytest.approx(peer.flops_per_token * (seq_len + count), rel=1e-12)
        assert layer.cache_bytes == peer.cache_bytes
    lm_head = {layer.label: layer for layer in with_meta.layers}["lm_head"]
    assert lm_head.flops_per_token == {layer.label: layer for layer in longer.layers}["lm_head"].flops_per_token
