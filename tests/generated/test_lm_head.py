"""The output layer of a vocabulary that is not a multiple of 64 (Hymba+'s 32001): over a sequence (training, prefill)
its product runs on the weight padded with zero rows (LMHead), which changes neither the logits nor any gradient; an
aligned vocabulary has no such class."""

from pathlib import Path

import torch
import torch.nn.functional as F

from tests.numerics import assert_close

ROOT = Path(__file__).resolve().parents[2]


def test_a_padded_output_product_gives_nn_linears_logits_and_gradients(build):
    package = build(ROOT / "specs/hymba_plus.yaml", "tiny", ("model.vocab_size=250",))
    torch.manual_seed(0)
    model = package.Model()
    assert type(model.lm_head).__name__ == "LMHead" and model.lm_head.weight is model.embed.weight
    x = torch.randn(2, 7, 64, requires_grad=True)
    logits = model.lm_head(x)
    expected = F.linear(x, model.embed.weight)
    assert logits.shape == (2, 7, 250)
    assert_close(logits, expected, 1e-6, "logits")
    grad = torch.randn_like(expected)
    x_grad, weight_grad = torch.autograd.grad(logits, (x, model.embed.weight), grad)
    expected_x_grad, expected_weight_grad = torch.autograd.grad(expected, (x, model.embed.weight), grad)
    assert_close(x_grad, expected_x_grad, 1e-6, "input gradient")
    assert_close(weight_grad, expected_weight_grad, 1e-6, "weight gradient")
    with torch.no_grad():  # prefill: the padded product; a decoding step's one position: the weight as it is
        assert_close(model.lm_head(x), expected, 1e-6, "logits without autograd")
        assert_close(model.lm_head(x[:, -1:]), expected[:, -1:], 1e-6, "one position's logits")
    tokens = torch.randint(0, 250, (2, 9))
    model(tokens[:, :-1], targets=tokens[:, 1:]).loss.backward()  # the training forward through the padded product
    assert model.embed.weight.grad.shape == (250, 64)


def test_an_aligned_vocabulary_has_no_padded_product(build):
    package = build(ROOT / "specs/hymba_plus.yaml", "tiny")  # vocabulary 256
    assert not hasattr(package.model, "LMHead")
    assert type(package.Model().lm_head).__name__ in ("Linear", "DecodeLinear")  # the decoding GEMV's where selected
