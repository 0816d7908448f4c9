"""For every importable model type: a tiny random transformers model -> `archgen import hf --weights` -> build ->
from_pretrained gives transformers' logits (float32, 1e-4 relative) and the same 32 greedy tokens.

Transformers runs prompts of different lengths as separate unpadded batches (a batch of two prompts of one length,
a third prompt of another length on its own: its SSM layers do not skip pads); the generated package runs all three
as one left-padded batch with an attention_mask too, and each row gives transformers' logits and tokens for it.
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
    rows = []  # (prompt, transformers' logits, transformers' 32 new tokens) per prompt
    with torch.no_grad():
        for prompts in batches:
            expected = hf(prompts).logits
            assert relative_error(model(prompts).logits, expected) < 1e-4
            tokens = model.generate(prompts, 32, temperature=0)
            expected_tokens = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=32, do_sample=False)
            assert torch.equal(tokens, expected_tokens)
            rows += zip(prompts, expected, expected_tokens[:, prompts.size(1):], strict=True)

        T = max(prompt.numel() for prompt, _, _ in rows)
        padded = torch.stack([torch.cat([prompt.new_zeros(T - prompt.numel()), prompt]) for prompt, _, _ in rows])
        mask = torch.stack([torch.arange(T) >= T - prompt.numel() for prompt, _, _ in rows]).long()
        logits = model(padded, attention_mask=mask).logits
        tokens = model.generate(padded, 32, temperature=0, attention_mask=mask)[:, T:]
        for row, (prompt, expected, expected_tokens) in enumerate(rows):
            assert relative_error(logits[row, T - prompt.numel():], expected) < 1e-4, f"row {row} of the padded batch"
            assert torch.equal(tokens[row], expected_tokens), f"row {row} of the padded batch"
