"""Every spec in specs/, built at its tiny preset: it imports on its own, trains, decodes with caches exactly like a
full forward, and has exactly the parameters the cost model counts."""

from __future__ import annotations

import pytest
import torch

from archgen.pipeline import compile_spec
from tests.conftest import SPECS, assert_parameters_match_the_cost_model, decode_in_steps

SPEC_IDS = [path.stem for path in SPECS]


@pytest.fixture(params=SPECS, ids=SPEC_IDS)
def spec_path(request):
    return request.param


def test_generated_package_does_not_import_archgen(spec_path, build):
    package = build(spec_path)
    for module in ("__init__.py", "model.py", "config.py"):
        source = (package.__path__[0] + "/" + module)
        text = open(source).read()
        assert "archgen" not in "\n".join(line for line in text.splitlines() if line.startswith(("import", "from"))), module


def test_parameters_match_the_cost_model_exactly(spec_path, build):
    model = build(spec_path).Model()
    assert_parameters_match_the_cost_model(model, compile_spec(spec_path, "tiny").ir)


def test_loss_falls_when_memorising_one_batch(spec_path, build):
    torch.manual_seed(0)
    model = build(spec_path).Model()
    tokens = torch.randint(0, 256, (2, 33))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, lm_losses = [], []
    for _ in range(25):
        out = model(inputs, targets=targets)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
        lm_losses.append(torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), targets.flatten()).item())
    assert all(torch.isfinite(torch.tensor(losses)))
    # The total includes the heads' and routers' auxiliary losses (VICReg starts large and falls slowly), so the
    # next-token loss must halve and the total must fall.
    assert lm_losses[-1] < 0.5 * lm_losses[0], f"next-token loss went {lm_losses[0]:.3f} -> {lm_losses[-1]:.3f}"
    assert losses[-1] < losses[0], f"total loss went {losses[0]:.3f} -> {losses[-1]:.3f}"


@pytest.mark.parametrize("position", ["int", "tensor"])
@pytest.mark.parametrize("prefill", [1, 7])
def test_cached_decoding_equals_full_forward(spec_path, build, prefill, position):
    """Crosses the tiny presets' 16-token sliding window, starts after meta tokens, and goes through the HSPMN router;
    the steps take the position as an int (eager generate) or as a tensor (the step a CUDA graph records)."""
    torch.manual_seed(1)
    model = build(spec_path).Model().eval()
    tokens = torch.randint(0, 256, (2, 40))
    with torch.no_grad():
        full = model(tokens).logits
    incremental = decode_in_steps(model, tokens, prefill, max_len=64, length_as_tensor=position == "tensor")
    error = ((incremental - full).abs().max() / full.abs().max()).item()
    assert error < 1e-4, f"relative error {error:.2e}"


def test_generate_greedy_is_deterministic_and_sampling_respects_top_k(spec_path, build):
    torch.manual_seed(2)
    model = build(spec_path).Model().eval()
    prompt = torch.randint(0, 256, (2, 5))
    first = model.generate(prompt, max_new_tokens=6, temperature=0)
    assert first.shape == (2, 11) and torch.equal(first[:, :5], prompt)
    assert torch.equal(first, model.generate(prompt, max_new_tokens=6, temperature=0))
    sampled = model.generate(prompt, max_new_tokens=6, do_sample=True, temperature=1.0, top_k=1)
    assert torch.equal(sampled, first), "top_k=1 sampling must equal greedy decoding"


def test_gradient_checkpointing_gives_the_same_gradients(spec_path, build):
    torch.manual_seed(3)
    package = build(spec_path)
    model = package.Model()
    tokens = torch.randint(0, 256, (2, 17))
    grads = []
    for checkpointing in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = checkpointing
        torch.manual_seed(4)  # the same router noise in both passes
        model(tokens[:, :-1], targets=tokens[:, 1:]).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-4, atol=1e-6)


def test_save_and_load_round_trip_checks_the_spec_hash(spec_path, build, tmp_path):
    package = build(spec_path)
    model = package.Model().eval()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = package.Model.from_pretrained(tmp_path / "ckpt").eval()
    tokens = torch.randint(0, 256, (1, 9))
    assert torch.equal(model(tokens).logits, loaded(tokens).logits)
    config = (tmp_path / "ckpt" / "config.json")
    config.write_text(config.read_text().replace(package.SPEC_HASH, "0" * 64))
    with pytest.raises(ValueError, match="but this package was generated from"):
        package.Model.from_pretrained(tmp_path / "ckpt")


def test_model_builds_on_the_meta_device(spec_path, build):
    package = build(spec_path)
    with torch.device("meta"):
        model = package.Model()
    assert all(p.is_meta for p in model.parameters())
    model.to_empty(device="cpu")
    model.init_weights()
    tokens = torch.randint(0, 256, (1, 5))
    assert torch.isfinite(model(tokens).logits).all()
