"""For every importable model type: a tiny random transformers model -> `archgen import hf --weights` -> build ->
from_pretrained gives transformers' logits (float32, 1e-4 relative) and the same 32 greedy tokens.

The generated packages take no attention mask, so prompts of different lengths run as separate unpadded batches:
a batch of two prompts of one length, and a third prompt of another length on its own.
"""

from __future__ import annotations

import pytest
import torch

from archgen.importers import import_hf
from tests.conftest import build_package
from tests.importers.hf_models import TINY, VOCAB, save_tiny

pytest.importorskip("transformers")


def relative_error(actual, expected):
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("case", sorted(TINY))
def test_imported_model_computes_what_transformers_computes(case, tmp_path):
    hf = save_tiny(case, tmp_path / "hf")
    result = import_hf(tmp_path / "hf", tmp_path / "imported", weights=True)
    assert result.n_params == hf.num_parameters()
    package = build_package(result.spec_path, tmp_path / "generated", preset=None)
    model = package.Model.from_pretrained(result.weights).eval()

    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, VOCAB, (2, 21), generator=generator), torch.randint(0, VOCAB, (1, 13), generator=generator)]
    with torch.no_grad():
        for prompts in batches:
            expected = hf(prompts).logits
            assert relative_error(model(prompts).logits, expected) < 1e-4
            tokens = model.generate(prompts, 32, temperature=0)
            expected_tokens = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=32, do_sample=False)
            assert torch.equal(tokens, expected_tokens)
