"""Hugging Face's conventions in a generated package: `labels=` shifted inside forward, a ModelOutput read by
attribute, key or position with the losses apart, and `generate` with transformers' names and defaults (greedy
unless do_sample, max_length, per-row eos stopping with padding, repetition_penalty, a streamer), also for Medusa.

One tiny hybrid (HSPMN: convolution ∥ routed attention, with Medusa heads added) built once for the module."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from archgen.testing import build_generated

VOCAB = 256  # the tiny preset's


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    return build_generated("specs/hspmn.yaml", tmp_path_factory.mktemp("hf"), "tiny",
                           ("heads.medusa={kind: medusa, n_heads: 2}",))[0]


@pytest.fixture(scope="module")
def model(package):
    torch.manual_seed(0)
    return package.Model().eval()


def test_labels_are_shifted_inside_and_equal_pre_shifted_targets(model):
    tokens = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        by_labels = model(tokens, labels=tokens)
        by_targets = model(tokens[:, :-1], targets=tokens[:, 1:])
    next_token = F.cross_entropy(by_labels.logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    assert torch.allclose(by_labels.lm_loss, next_token, rtol=1e-5), "labels must train next-token prediction"
    assert torch.allclose(by_labels.lm_loss, by_targets.lm_loss, rtol=1e-5)
    # The Medusa heads score against the same shifted tokens; the router's losses see one position more.
    assert torch.allclose(by_labels.aux_losses["medusa"], by_targets.aux_losses["medusa"], rtol=1e-5)
    assert torch.allclose(by_labels.loss, by_labels.lm_loss + sum(by_labels.aux_losses.values()))
    with pytest.raises(ValueError, match="not both"):
        model(tokens, labels=tokens, targets=tokens)


def test_ignored_labels_do_not_count(model):
    tokens = torch.randint(0, VOCAB, (1, 10), generator=torch.Generator().manual_seed(2))
    labels = tokens.clone()
    labels[:, :6] = -100  # a prompt that is not trained on
    with torch.no_grad():
        out = model(tokens, labels=labels)
    expected = F.cross_entropy(out.logits[0, 5:-1], tokens[0, 6:])
    assert torch.allclose(out.lm_loss, expected, rtol=1e-5)


def test_model_output_reads_by_attribute_key_and_position(model):
    tokens = torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        out = model(tokens, labels=tokens)
        bare = model(tokens)
    assert out["loss"] is out.loss and out[0] is out.loss and out[1] is out.logits
    assert "lm_loss" in out and out.keys()[:3] == ["loss", "logits", "lm_loss"]
    loss, logits = out.to_tuple()[:2]
    assert logits is out.logits
    assert bare[0] is bare.logits and "loss" not in bare and bare.loss is None
    with pytest.raises(KeyError):
        bare["loss"]


def greedy_reference(model, prompt, steps, penalty=1.0):
    """Greedy decoding by full forwards, with CTRL's repetition penalty written out."""
    tokens = prompt
    for _ in range(steps):
        logits = model(tokens).logits[:, -1].clone()
        for row in range(tokens.size(0)):
            seen = tokens[row].unique()
            values = logits[row, seen]
            logits[row, seen] = torch.where(values < 0, values * penalty, values / penalty)
        tokens = torch.cat([tokens, logits.argmax(-1, keepdim=True)], dim=1)
    return tokens


def test_generate_is_greedy_unless_do_sample(model):
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = greedy_reference(model, prompt, 6)
    assert torch.equal(model.generate(prompt, 6), expected)
    assert torch.equal(model.generate(prompt, 6, temperature=0.7, top_k=50), expected), "no do_sample: greedy"
    assert torch.equal(model.generate(prompt, max_length=11), expected), "max_length counts the prompt"
    assert model.generate(prompt).shape == (2, 20), "neither length: 20 tokens in all, as transformers"
    sampled = [model.generate(prompt, 6, do_sample=True, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(sampled[0], sampled[1]) and not torch.equal(sampled[0], sampled[2])


def test_repetition_penalty_matches_its_definition(model):
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = greedy_reference(model, prompt, 6, penalty=1.8)
    assert torch.equal(model.generate(prompt, 6, repetition_penalty=1.8), expected)


def test_rows_stop_at_their_own_eos_and_are_padded(model):
    prompt = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(5))
    greedy = model.generate(prompt, 10)
    new = greedy[:, 4:]
    eos = [int(new[0, 2]), int(new[1, 5])]
    tokens = model.generate(prompt, 10, eos_token_id=eos, pad_token_id=0)
    expected = greedy.clone()
    ended = []
    for row in range(3):
        hits = [i for i, t in enumerate(new[row].tolist()) if t in eos]
        if hits:
            expected[row, 4 + hits[0] + 1 :] = 0
        ended.append(4 + hits[0] + 1 if hits else None)
    length = greedy.size(1) if None in ended else max(ended)
    assert torch.equal(tokens, expected[:, :length])


def test_decoding_stops_when_every_row_has_ended(model):
    prompt = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(6))
    greedy = model.generate(prompt, 10)
    first = int(greedy[0, 4])
    assert torch.equal(model.generate(prompt, 10, eos_token_id=first), greedy[:, :5])


def test_streamer_gets_the_prompt_then_every_token(model):
    class Streamer:
        def __init__(self):
            self.pieces, self.ended = [], 0

        def put(self, tokens):
            self.pieces.append(tokens)

        def end(self):
            self.ended += 1

    prompt = torch.randint(0, VOCAB, (1, 4))
    streamer = Streamer()
    tokens = model.generate(prompt, 5, streamer=streamer)
    assert torch.equal(streamer.pieces[0], prompt) and streamer.ended == 1
    assert torch.equal(torch.cat([p.view(-1) for p in streamer.pieces]), tokens[0])
    seen = []
    model.generate(prompt, 5, streamer=seen.append)
    assert torch.equal(torch.cat([p.view(-1) for p in seen]), tokens[0])


def test_medusa_stops_at_eos_and_streams_like_generate(model):
    prompt = torch.randint(0, VOCAB, (1, 4), generator=torch.Generator().manual_seed(7))
    greedy = model.generate(prompt, 16)
    eos = int(greedy[0, 4 + 9])
    end = 4 + greedy[0, 4:].tolist().index(eos) + 1
    seen = []
    tokens, _ = model.generate_medusa(prompt, 16, eos_token_id=eos, streamer=seen.append)
    assert torch.equal(tokens, greedy[:, :end])
    assert torch.equal(torch.cat([p.view(-1) for p in seen]), tokens[0])
    assert torch.equal(model.generate_medusa(prompt, max_length=12)[0], greedy[:, :12])


def test_from_pretrained_reads_straight_into_the_dtype_and_device_asked_for(package, model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["spec"] == json.loads(json.dumps(package.CONFIG)) and config["spec_hash"] == package.SPEC_HASH
    loaded = package.Model.from_pretrained(tmp_path).eval()
    tokens = torch.randint(0, VOCAB, (2, 7))
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)
        half = package.Model.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
        assert {t.dtype for t in half.state_dict().values()} == {torch.bfloat16}
        assert torch.equal(half(tokens).logits, package.Model.from_pretrained(tmp_path).to(torch.bfloat16).eval()(tokens).logits)
    assert half.lm_head.weight is half.embed.weight, "tied embeddings stay one tensor"
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    structure = package.Model.from_pretrained(tmp_path, device="meta", torch_dtype=torch.bfloat16)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in structure.parameters())


def test_from_pretrained_refuses_a_checkpoint_of_another_spec(package, model, tmp_path):
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["spec"]["model"]["d_model"] = 4096
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="generated from 'hspmn'"):
        package.Model.from_pretrained(tmp_path)


def test_gradient_checkpointing_switches_on_and_off(model):
    model.gradient_checkpointing_enable()
    assert model.gradient_checkpointing
    model.gradient_checkpointing_disable()
    assert not model.gradient_checkpointing
