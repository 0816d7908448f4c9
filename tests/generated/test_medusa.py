"""Medusa heads as generated into a model: K logits per position through the shared unembedding, head k scored
against token t+k+2, and draft-and-verify decoding that returns exactly the tokens of greedy `generate`.

The defining test decodes every layout that can carry the heads: Mamba with windowed attention and MoE (HNS, as
written), attention ∥ Mamba with meta tokens and sliding windows (Hymba+), convolution ∥ routed attention (HSPMN),
and Mamba with attention, a test-time memory and the symbolic module (Nexus). With heads that guess at random most
drafts are rejected, so every step rolls the recurrent states back; with heads trained on a cycle, most drafts
are accepted. The acceptance rule and the snapshot are unit-tested in tests/templates/runtime/test_medusa.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from archgen.pipeline import compile_spec
from archgen.testing import build_generated
from tests.conftest import assert_parameters_match_the_cost_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread is faster on shared CPUs

WITH_MEDUSA = ("heads.medusa={kind: medusa, n_heads: 3}",)
SPECS = {  # name: (spec, overrides, K)
    "hns_ss_jepa_moe": ("specs/hns_ss_jepa_moe.yaml", (), 2),  # its tiny preset declares 2 heads
    "hymba_plus": ("specs/hymba_plus.yaml", WITH_MEDUSA, 3),
    "hspmn": ("specs/hspmn.yaml", WITH_MEDUSA, 3),
    "nexus": ("specs/nexus.yaml", WITH_MEDUSA, 3),
}
VOCAB = 256  # every tiny preset


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """packages(name) → the generated package, built once per module (the `build` fixture builds once per test)."""
    built = {}

    def get(name):
        if name not in built:
            spec, overrides, _ = SPECS[name]
            built[name] = build_generated(spec, tmp_path_factory.mktemp(name), "tiny", overrides)[0]
        return built[name]

    return get


def scramble_heads(model, seed: int) -> None:
    """Large random head weights: the guesses become arbitrary tokens, so nearly every draft is rejected."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.heads["medusa"].parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 5)


@pytest.mark.parametrize("name", SPECS)
def test_heads_give_k_logits_per_position_and_a_weighted_loss(packages, name):
    torch.manual_seed(0)
    model = packages(name).Model()
    tokens = torch.randint(0, VOCAB, (2, 12))
    out = model(tokens[:, :-1], targets=tokens[:, 1:])
    K = SPECS[name][2]
    assert out.heads["medusa"].shape == (K, 2, 11, VOCAB)
    assert torch.isfinite(out.aux_losses["medusa"])


@pytest.mark.parametrize("name", ["hns_ss_jepa_moe", "hspmn"])
def test_heads_start_as_the_next_token_head(packages, name):
    """Zero-initialised blocks (Medusa's initialisation): every head's logits equal the model's own at init, also
    when the model is built on the meta device and initialised after to_empty."""
    torch.manual_seed(0)
    Model = packages(name).Model
    with torch.device("meta"):
        meta = Model()
    meta.to_empty(device="cpu")
    meta.init_weights()
    tokens = torch.randint(0, VOCAB, (1, 9))
    for model in (Model(), meta):
        with torch.no_grad():
            out = model(tokens)
        for k in range(SPECS[name][2]):
            assert torch.equal(out.heads["medusa"][k], out.logits), f"head {k} differs from the next-token head at init"


def test_head_k_is_scored_against_the_token_k_plus_2_ahead(packages):
    head = packages("hspmn").Model().heads["medusa"]
    K, B, T = 3, 2, 9
    targets = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(0))
    targets[1, -2] = -100  # an ignored target is skipped, not scored

    def confident(shift: int) -> torch.Tensor:
        """Logits sure of targets[:, t + k + shift] for head k at position t."""
        logits = torch.zeros(K, B, T, VOCAB)
        for k in range(K):
            for t in range(T - k - shift):
                for b in range(B):
                    if targets[b, t + k + shift] >= 0:
                        logits[k, b, t, targets[b, t + k + shift]] = 30.0
        return logits

    right = head.losses(confident(1), targets=targets)["medusa"].item()
    off_by_one = head.losses(confident(0), targets=targets)["medusa"].item()
    uniform = head.losses(torch.zeros(K, B, T, VOCAB), targets=targets)["medusa"].item()
    assert right < 1e-6, f"head k sure of targets[t+k+1] (token t+k+2) should score ~0, got {right:.3g}"
    assert off_by_one > 1.0, f"head k sure of token t+k+1 should score badly, got {off_by_one:.3g}"
    assert uniform == pytest.approx(0.2 * math.log(VOCAB), rel=1e-5), "uniform logits: loss_weight 0.2 times log V"


def generation_cases():
    for name in SPECS:
        for heads in ("as-initialised", "guessing"):
            for seed in (0, 1):
                for prompt in (1, 7, 20):  # 20 prompt tokens + 20 new ones cross the 16-token windows
                    yield pytest.param(name, heads, seed, prompt, id=f"{name}-{heads}-seed{seed}-prompt{prompt}")


@pytest.mark.parametrize("name, heads, seed, prompt_len", list(generation_cases()))
def test_medusa_decoding_returns_exactly_the_greedy_tokens(packages, name, heads, seed, prompt_len):
    """Crosses the 16-token sliding windows, starts after meta tokens and goes through the HSPMN router."""
    torch.manual_seed(seed)
    model = packages(name).Model().eval()
    if heads == "guessing":
        scramble_heads(model, seed)
    prompt = torch.randint(0, VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(100 + seed))
    greedy = model.generate(prompt, max_new_tokens=20, temperature=0)
    tokens, stats = model.generate_medusa(prompt, max_new_tokens=20)
    assert torch.equal(tokens, greedy), f"first difference at position {(tokens != greedy).nonzero()[0, 1].item()}"
    K = SPECS[name][2]
    assert 1.0 <= stats.mean_accepted_length <= K + 1
    assert sum(stats.accepted) <= 20
    if heads == "guessing":
        assert stats.reruns > 0, f"no draft was rejected (accepted {stats.accepted}), so the rollback went untested"


@pytest.mark.parametrize("max_new_tokens", [0, 1, 2, 5])
def test_short_generations_match_greedy(packages, max_new_tokens):
    torch.manual_seed(3)
    model = packages("hspmn").Model().eval()
    prompt = torch.randint(0, VOCAB, (1, 4))
    tokens, _ = model.generate_medusa(prompt, max_new_tokens)
    assert torch.equal(tokens, model.generate(prompt, max_new_tokens, temperature=0))


def test_heads_trained_on_a_cycle_accept_several_tokens_per_forward(packages):
    """Greedy decoding of a 7-token cycle: once the heads have learnt it, a verify forward keeps most of its draft."""
    torch.manual_seed(0)
    model = packages("hspmn").Model()
    cycle = torch.tensor([3, 141, 59, 26, 53, 58, 97])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(40):
        phase = torch.randint(0, len(cycle), (8, 1))
        tokens = cycle[(phase + torch.arange(17)) % len(cycle)]  # (8, 17)
        loss = model(tokens[:, :-1], targets=tokens[:, 1:]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    prompt = cycle[:4].view(1, -1)
    tokens, stats = model.generate_medusa(prompt, max_new_tokens=20)
    assert torch.equal(tokens, model.generate(prompt, 20, temperature=0))
    assert stats.mean_accepted_length > 2.5, f"mean accepted length {stats.mean_accepted_length:.2f} ({stats.accepted})"


def test_a_batch_of_several_sequences_is_refused(packages):
    model = packages("hspmn").Model().eval()
    with pytest.raises(ValueError, match="one sequence at a time, got a batch of 2"):
        model.generate_medusa(torch.zeros(2, 3, dtype=torch.long), 4)


@pytest.mark.parametrize("n_heads, hidden_layers", [(1, 0), (3, 2)], ids=["K1-no-blocks", "K3-two-blocks"])
def test_parameters_match_the_cost_model(build, n_heads, hidden_layers):
    overrides = [f"heads.medusa={{kind: medusa, n_heads: {n_heads}, hidden_layers: {hidden_layers}}}"]
    model = build("specs/hspmn.yaml", overrides=overrides).Model()
    assert_parameters_match_the_cost_model(model, compile_spec("specs/hspmn.yaml", "tiny", overrides).ir)
