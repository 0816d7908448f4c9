"""The Titans memory as generated into a model (specs/nexus.yaml at its tiny preset): the memory state lives in the
generation cache, reading without writing changes nothing, decoding with writes equals one prefill with writes,
and the writes are trained through. The memory's arithmetic itself is tested in tests/templates/runtime/test_memory.py.

JEPA (the seed's head) is emitted by another part of issue 4, so these builds drop the heads: the memory does not
depend on them.
"""

from __future__ import annotations

import pytest
import torch

from archgen.pipeline import compile_spec
from tests.conftest import assert_parameters_match_the_cost_model, decode_in_steps
from tests.numerics import relative_error

NEXUS = "specs/nexus.yaml"
NO_HEADS = ("heads={}",)
# Chunks of 8 tokens, so a 40-token sequence writes 5 times; lr 1 so that the writes move the logits visibly.
WRITING = NO_HEADS + ("memory.chunk_size=8", "memory.learning_rate=1.0")


@pytest.fixture
def writing_model(build):
    """A tiny Nexus whose memory values are of unit scale (not the 0.02 init) and whose gate is nearly open."""
    package = build(NEXUS, overrides=WRITING)
    torch.manual_seed(1)
    model = package.Model().eval()
    with torch.no_grad():
        model.memory.v_proj.weight.normal_(0.0, 1.0)
        model.memory.gate.bias.fill_(3.0)
    return package, model


@pytest.mark.parametrize("prefill", [pytest.param(1, id="prefill1"), pytest.param(13, id="prefill13-crosses-a-chunk")])
def test_decoding_with_memory_writes_equals_one_prefill_with_writes(writing_model, prefill):
    _, model = writing_model
    tokens = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(tokens, update_memory=True).logits
        without_writes = model(tokens).logits
    assert relative_error(without_writes, full) > 1e-2, "the writes barely change the logits, so this test would not see them"
    error = relative_error(decode_in_steps(model, tokens, prefill, max_len=64, update_memory=True), full)
    assert error < 1e-4, f"token-by-token decoding with writes differs from one prefill with writes: relative error {error:.2e}"


def test_the_cache_carries_the_memory_state(writing_model):
    package, model = writing_model
    tokens = torch.randint(0, 256, (2, 13), generator=torch.Generator().manual_seed(3))
    cache = model.empty_cache(2, 64)
    assert isinstance(cache.memory, package.model.MemoryState)
    for layer, weight in zip(model.memory.mlp, cache.memory.weights, strict=True):
        assert torch.equal(weight, layer.weight.expand(2, -1, -1)), "a fresh cache must start from the learned memory weights"
    with torch.no_grad():
        model(tokens, cache=cache, update_memory=True)
    written = cache.memory
    assert written.pending_keys.shape == (2, 8, 128), "the pending buffer holds one chunk, whatever is waiting"
    waiting = written.pending_keys.abs().sum(-1)[0]  # (8,)
    assert (waiting[:5] > 0).all() and not waiting[5:].any(), "13 tokens in chunks of 8: one write, five keys waiting"
    assert not torch.equal(written.weights[0], model.memory.mlp[0].weight.expand(2, -1, -1)), "the first chunk was not written"
    with torch.no_grad():
        model(tokens[:, :3], cache=cache)  # update_memory=False
    assert cache.memory.weights[0] is written.weights[0] and cache.memory.pending_keys is written.pending_keys


def test_reading_without_update_keeps_the_state_and_equals_a_fresh_state(writing_model):
    _, model = writing_model
    x = torch.randn(2, 11, 128, generator=torch.Generator().manual_seed(4))
    state = model.memory.empty_state(2, x.device)
    with torch.no_grad():
        read, returned = model.memory(x, state, update=False)
        fresh, _ = model.memory(x, None, update=False)
    assert returned is state
    assert all(torch.equal(w, layer.weight.expand(2, -1, -1))
               for w, layer in zip(returned.weights, model.memory.mlp, strict=True))
    assert torch.equal(read, fresh)


def test_a_written_state_is_read_back_by_later_tokens(writing_model):
    """After writing 16 tokens, reading the same tokens gives a different result than a fresh memory does."""
    _, model = writing_model
    x = torch.randn(2, 16, 128, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _, written = model.memory(x, None, update=True)
        after, _ = model.memory(x, written, update=False)
        before, _ = model.memory(x, None, update=False)
    assert relative_error(after, before) > 1e-2


def test_training_with_memory_writes_reaches_the_key_and_value_projections(build):
    """Keys and values only feed the writes: they get gradients when writing and none when only reading."""
    model = build(NEXUS, overrides=WRITING).Model()
    tokens = torch.randint(0, 256, (2, 25), generator=torch.Generator().manual_seed(6))
    for update, has_grad in ((True, True), (False, False)):
        model.zero_grad(set_to_none=True)
        model(tokens[:, :-1], targets=tokens[:, 1:], update_memory=update).loss.backward()
        for name in ("k_proj", "v_proj"):
            grad = getattr(model.memory, name).weight.grad
            if has_grad:
                assert grad is not None and grad.abs().sum() > 0, f"no gradient reached memory.{name} through the writes"
            else:
                assert grad is None, f"memory.{name} got a gradient although nothing was written"


VARIANTS = [
    pytest.param((), id="nexus"),
    pytest.param(("memory.depth=1",), id="depth1"),
    pytest.param(("memory.depth=3", "memory.hidden=96"), id="depth3-hidden96"),
]


@pytest.mark.parametrize("overrides", VARIANTS)
def test_parameters_match_the_cost_model(build, overrides):
    overrides = NO_HEADS + overrides
    model = build(NEXUS, overrides=overrides).Model()
    ir = compile_spec(NEXUS, "tiny", overrides).ir
    assert_parameters_match_the_cost_model(model, ir)


def test_nexus_trains_and_decodes_like_a_full_forward(build):
    """Issue 4's acceptance for the Nexus seed (without JEPA): loss falls, cached decoding without writes equals
    the full forward, and the model builds on the meta device."""
    package = build(NEXUS, overrides=NO_HEADS)
    torch.manual_seed(0)
    model = package.Model()
    tokens = torch.randint(0, 256, (2, 33))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = model(tokens[:, :-1], targets=tokens[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], f"loss went {losses[0]:.3f} -> {losses[-1]:.3f}"

    model.eval()
    with torch.no_grad():
        full = model(tokens).logits
    assert relative_error(decode_in_steps(model, tokens, prefill=7, max_len=64), full) < 1e-4

    with torch.device("meta"):
        meta = package.Model()
    meta.to_empty(device="cpu")
    meta.init_weights()
    assert torch.isfinite(meta(tokens[:, :5], update_memory=True).logits).all()
