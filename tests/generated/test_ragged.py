"""Ragged batches: a batch of left-padded prompts of different lengths (attention_mask, 1 = token, 0 = pad, Hugging
Face's convention) gives, row by row, the logits and the greedy tokens of each prompt run alone.

Every seed spec and the Gated DeltaNet hybrid at `tiny`, so every mixer kind is covered: full, grouped-query and
sliding-window attention (its ring-buffer cache: 4 meta tokens + 17 + 16 positions pass a window of 16), HSPMN's
routed sparse attention and convolution, Mamba-1 (with and without meta tokens in front), Gated DeltaNet, a mixture
of experts, Nexus's Titans memory (chunks of 4, so prompts and decoding write it) and symbolic module. The runtime
pieces are tested on their own in tests/templates/runtime/test_ragged_ops.py.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from archgen.testing import build_generated
from tests.numerics import assert_close, relative_error

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on shared CPUs

SPECS = {  # name: (spec, overrides)
    "hspmn": ("specs/hspmn.yaml", ()),
    "hymba_plus": ("specs/hymba_plus.yaml", ()),
    "nexus": ("specs/nexus.yaml", ("layout.n_layers=8", "memory.chunk_size=4", "memory.learning_rate=1.0")),
    "hns_ss_jepa_moe": ("specs/hns_ss_jepa_moe.yaml", ()),
    "gated_deltanet_hybrid": ("specs/gated_deltanet_hybrid.yaml", ()),
}
LENGTHS = (3, 17, 9, 5)  # the batch's prompt lengths: the second row has no padding
NEW_TOKENS = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            spec, overrides = SPECS[name]
            package = build_generated(spec, tmp_path_factory.mktemp(name), "tiny", overrides)[0]
            torch.manual_seed(0)
            model = package.Model().eval()
            if hasattr(model, "memory"):  # values of unit scale and an open gate: the memory's writes move the logits
                with torch.no_grad():
                    model.memory.v_proj.weight.normal_(0.0, 1.0)
                    model.memory.gate.bias.fill_(3.0)
            built[name] = model
        return built[name]

    return get


def ragged_batch(seed: int = 1) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """The prompts, and them left-padded into input_ids (B, T) (pads are token 0) with their attention_mask."""
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 256, (n,), generator=generator) for n in LENGTHS]
    T = max(LENGTHS)
    input_ids = torch.zeros(len(prompts), T, dtype=torch.long)
    attention_mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        input_ids[row, T - len(prompt):] = prompt
        attention_mask[row, T - len(prompt):] = 1
    return prompts, input_ids, attention_mask


def writing(model) -> dict:
    """A model with a test-time memory writes it, so the test sees that pads are never written."""
    return {"update_memory": True} if "update_memory" in inspect.signature(model.forward).parameters else {}


@pytest.mark.parametrize("name", list(SPECS))
def test_a_left_padded_batch_gives_each_row_its_own_logits(models, name):
    model = models(name)
    prompts, input_ids, attention_mask = ragged_batch()
    T = input_ids.size(1)
    with torch.no_grad():
        batched = model(input_ids, attention_mask=attention_mask, **writing(model)).logits
        unmasked = model(input_ids, **writing(model)).logits
        for row, prompt in enumerate(prompts):
            alone = model(prompt[None], **writing(model)).logits[0]
            assert_close(batched[row, T - len(prompt):], alone, what=f"{name} row {row} ({len(prompt)} tokens), padded")
    shortest = LENGTHS.index(min(LENGTHS))
    assert relative_error(unmasked[shortest, -LENGTHS[shortest]:], batched[shortest, -LENGTHS[shortest]:]) > 1e-3, \
        "without the mask the pads should change the row: otherwise this test could not see a mask that does nothing"


@pytest.mark.parametrize("name", list(SPECS))
def test_a_left_padded_batch_decodes_each_row_like_the_row_alone(models, name):
    model = models(name)
    prompts, input_ids, attention_mask = ragged_batch(seed=2)
    T = input_ids.size(1)
    with torch.no_grad():
        batched = model.generate(input_ids, NEW_TOKENS, temperature=0, attention_mask=attention_mask)
        for row, prompt in enumerate(prompts):
            alone = model.generate(prompt[None], NEW_TOKENS, temperature=0)[0, len(prompt):]
            assert torch.equal(batched[row, T:], alone), f"{name} row {row}: {batched[row, T:].tolist()} != {alone.tolist()}"
    assert torch.equal(batched[:, :T], input_ids)


def test_a_mask_of_ones_changes_nothing(models):
    model = models("hymba_plus")
    input_ids = torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(input_ids).logits
        masked = model(input_ids, attention_mask=torch.ones_like(input_ids)).logits
    assert_close(masked, plain, what="logits with a mask of ones")


def test_the_cache_keeps_the_pads_for_the_tokens_that_follow(models):
    """A prefill with the mask, then decode steps without it: the steps still hide the pads (chunked prefill too)."""
    model = models("hspmn")
    prompts, input_ids, attention_mask = ragged_batch(seed=4)
    T = input_ids.size(1)
    follow = torch.randint(1, 256, (len(prompts), 3), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cache = model.empty_cache(len(prompts), T + 3)
        model(input_ids, cache=cache, attention_mask=attention_mask)
        assert cache.pads.tolist() == [T - n for n in LENGTHS]
        steps = model(follow, cache=cache).logits  # (B, 3, V)
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat([prompt, follow[row]])[None]).logits[0, -3:]
            assert_close(steps[row], alone, what=f"row {row}: the tokens after a padded prefill")


@pytest.mark.parametrize("mask, message", [
    pytest.param([[1, 1, 0], [1, 1, 1]], "left-padded", id="right-padded"),
    pytest.param([[0, 1, 0], [1, 1, 1]], "left-padded", id="a-hole"),
    pytest.param([[0, 0, 0], [1, 1, 1]], "without a token", id="an-empty-row"),
])
def test_a_mask_that_is_not_left_padding_is_refused(models, mask, message):
    model = models("hspmn")
    with pytest.raises(ValueError, match=message):
        model(torch.ones(2, 3, dtype=torch.long), attention_mask=torch.tensor(mask))


def test_medusa_drafting_leaves_a_rows_pads_out(models):
    model = models("hns_ss_jepa_moe")
    prompts, input_ids, attention_mask = ragged_batch(seed=6)
    row = 0  # the shortest prompt: the most pads
    with torch.no_grad():
        drafted, _ = model.generate_medusa(input_ids[row:row + 1], 8, attention_mask=attention_mask[row:row + 1])
        greedy = model.generate(prompts[row][None], 8, temperature=0)
    assert torch.equal(drafted[0, :input_ids.size(1)], input_ids[row])
    assert torch.equal(drafted[0, input_ids.size(1):], greedy[0, len(prompts[row]):])
